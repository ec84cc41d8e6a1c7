//! Uprobes through uprobe-multi links, which aya 0.14 cannot create: one link holds a
//! program's probes at every offset (a cookie each), skips the perf-event layer of aya's
//! per-site uprobes, and is placed and removed at once: closing it waits for one RCU grace
//! period (~100 ms here) however many probes it holds, where aya's links wait one each.
//! Full mode attaches the allocator entries, their returns and free this way; sampling mode
//! the allocators as a uprobe *session* (Linux 6.13+), whose entry program decides per call
//! whether the return probe runs at all, and free. Programs are loaded with the bpf(2)
//! syscall from the same object file, relocated against the maps aya already created.
use std::{
    collections::HashSet,
    ffi::CString,
    io,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use aya::{Ebpf, maps::Map};

/// `enum bpf_cmd` values (include/uapi/linux/bpf.h).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_BTF_LOAD: libc::c_long = 18;
/// `BPF_PROG_TYPE_KPROBE`: uprobe programs are kprobe programs to the kernel.
const BPF_PROG_TYPE_KPROBE: u32 = 2;
/// `enum bpf_attach_type` values, as in this kernel's BTF.
const BPF_TRACE_UPROBE_MULTI: u32 = 48;
const BPF_TRACE_UPROBE_SESSION: u32 = 57;

/// `uprobe_multi.flags`: the probes are return probes.
const BPF_F_UPROBE_MULTI_RETURN: u32 = 1;

/// How a program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    /// Entry probe; the return probe runs the same program when the entry returned 0.
    Session,
    /// Entry probe only.
    Multi,
    /// Return probe only.
    MultiReturn,
}

impl LinkKind {
    fn attach_type(self) -> u32 {
        match self {
            LinkKind::Session => BPF_TRACE_UPROBE_SESSION,
            LinkKind::Multi | LinkKind::MultiReturn => BPF_TRACE_UPROBE_MULTI,
        }
    }

    fn flags(self) -> u32 {
        match self {
            LinkKind::MultiReturn => BPF_F_UPROBE_MULTI_RETURN,
            LinkKind::Session | LinkKind::Multi => 0,
        }
    }
}
/// Verifier log kept when a load fails.
const LOG_SIZE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("parse the BPF object")]
    Parse(#[source] aya_obj::ParseError),
    #[error("the BPF object's BTF")]
    Btf(#[source] aya_obj::btf::BtfError),
    #[error("load the BPF object's BTF")]
    BtfLoad(#[source] io::Error),
    #[error("relocate the BPF programs against their maps")]
    Relocate(#[source] aya_obj::relocation::EbpfRelocationError),
    #[error("BPF program {0} is not in the object")]
    Missing(String),
    #[error("map {0} of the BPF object was not created by the loader")]
    MapMissing(String),
    #[error(
        "load BPF program {name} for a uprobe-multi link (uprobe-multi links need Linux 6.6 or later, sessions 6.13): {source}{log}"
    )]
    Load {
        name: String,
        log: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "attach {name} to {} at {count} offsets with a uprobe-multi link (uprobe-multi links need Linux 6.6 or later, sessions 6.13)",
        path.display()
    )]
    Attach {
        name: String,
        path: PathBuf,
        count: usize,
        #[source]
        source: io::Error,
    },
}

/// A loaded program and its uprobe-multi link; dropping it detaches every probe it placed.
pub struct UprobeLink {
    // Field order is drop order: the link before its program.
    link: OwnedFd,
    _program: OwnedFd,
}

impl UprobeLink {
    /// The link alone, to be closed together with others (see [`super::ebpf::close_at_once`]);
    /// the program may go any time after.
    pub fn into_link(self) -> OwnedFd {
        self.link
    }
}

/// The part of `union bpf_attr` that BPF_PROG_LOAD reads up to `expected_attach_type`; the
/// kernel takes a shorter attr as zero-extended.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    /// The object's BTF, and which of its functions each subprogram is: the verifier needs
    /// them for a program that passes a callback (the stack walker's `bpf_loop`).
    prog_btf_fd: u32,
    func_info_rec_size: u32,
    func_info: u64,
    func_info_cnt: u32,
    line_info_rec_size: u32,
    line_info: u64,
    line_info_cnt: u32,
    attach_btf_id: u32,
}

/// BPF_BTF_LOAD's attr.
#[repr(C)]
#[derive(Default)]
struct BtfLoadAttr {
    btf: u64,
    btf_log_buf: u64,
    btf_size: u32,
    btf_log_size: u32,
    btf_log_level: u32,
}

/// BPF_LINK_CREATE's attr with its `uprobe_multi` member.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    path: u64,
    offsets: u64,
    ref_ctr_offsets: u64,
    cookies: u64,
    cnt: u32,
    multi_flags: u32,
    pid: u32,
    _pad: u32,
}

/// The file descriptor of a map aya created, whatever its type.
fn map_fd(map: &Map) -> Option<RawFd> {
    let data = match map {
        Map::Array(d)
        | Map::HashMap(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuHashMap(d)
        | Map::PerCpuLruHashMap(d)
        | Map::RingBuf(d)
        | Map::PerfEventArray(d)
        | Map::StackTraceMap(d)
        | Map::Queue(d)
        | Map::Stack(d)
        | Map::ProgramArray(d)
        | Map::Unsupported(d) => d,
        _ => return None,
    };
    Some(data.fd().as_fd().as_raw_fd())
}

fn bpf(cmd: libc::c_long, attr: *const u8, size: usize) -> io::Result<OwnedFd> {
    // SAFETY: attr points at a live, initialized attr struct of `size` bytes whose pointer
    // fields point at buffers that outlive the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The BPF object, parsed once and relocated against the maps aya created for it, from which
/// programs are loaded for uprobe-multi links.
pub struct Loader {
    obj: aya_obj::Object,
    btf: Option<OwnedFd>,
}

impl Loader {
    /// `elf` is the object `ebpf` was loaded from.
    pub fn new(ebpf: &Ebpf, elf: &[u8]) -> Result<Loader, SessionError> {
        let mut obj = aya_obj::Object::parse(elf).map_err(SessionError::Parse)?;
        // Every BTF kind this kernel (6.6+, for uprobe-multi) knows: nothing to strip, only
        // the fix-ups an object file needs (section sizes, variable offsets).
        let features = aya_obj::btf::BtfFeatures::new(true, true, true, true, true, true, true, true);
        let btf = match obj.fixup_and_sanitize_btf(&features).map_err(SessionError::Btf)? {
            Some(btf) => {
                let bytes = btf.to_bytes();
                let attr = BtfLoadAttr {
                    btf: bytes.as_ptr() as u64,
                    btf_size: bytes.len() as u32,
                    ..BtfLoadAttr::default()
                };
                Some(bpf(BPF_BTF_LOAD, (&raw const attr).cast(), size_of::<BtfLoadAttr>()).map_err(SessionError::BtfLoad)?)
            }
            None => None,
        };
        let maps: Vec<(String, aya_obj::Map)> = obj.maps.drain().collect();
        let mut fds = Vec::with_capacity(maps.len());
        for (map_name, _) in &maps {
            let fd = ebpf
                .map(map_name)
                .and_then(map_fd)
                .ok_or_else(|| SessionError::MapMissing(map_name.clone()))?;
            fds.push(fd);
        }
        let relocate = SessionError::Relocate;
        let text_sections: HashSet<usize> =
            obj.functions.keys().map(|(section, _)| *section).collect();
        obj.relocate_maps(
            maps.iter()
                .zip(&fds)
                .map(|((map_name, map), fd)| (map_name.as_str(), *fd, map)),
            &text_sections,
        )
        .map_err(relocate)?;
        obj.relocate_calls(&text_sections).map_err(relocate)?;
        Ok(Loader { obj, btf })
    }

    /// Attaches program `program` (loaded by [`Loader::prepare`] as `name`, for `kind`) to
    /// `path` at each file offset, each with its cookie, for process `pid` (all its threads)
    /// only.
    #[expect(clippy::too_many_arguments, reason = "the link's whole description, as the kernel takes it")]
    pub fn link(
        &self,
        program: OwnedFd,
        name: &str,
        kind: LinkKind,
        path: &Path,
        offsets: &[u64],
        cookies: &[u64],
        pid: u32,
    ) -> Result<UprobeLink, SessionError> {
        let c_path =
            CString::new(path.as_os_str().as_bytes()).map_err(|e| SessionError::Attach {
                name: name.to_owned(),
                path: path.to_owned(),
                count: offsets.len(),
                source: io::Error::new(io::ErrorKind::InvalidInput, e),
            })?;
        assert_eq!(offsets.len(), cookies.len(), "one cookie per offset");
        let attr = LinkCreateAttr {
            prog_fd: program.as_raw_fd() as u32,
            attach_type: kind.attach_type(),
            path: c_path.as_ptr() as u64,
            offsets: offsets.as_ptr() as u64,
            cookies: cookies.as_ptr() as u64,
            cnt: offsets.len() as u32,
            multi_flags: kind.flags(),
            pid,
            ..LinkCreateAttr::default()
        };
        let link = bpf(
            BPF_LINK_CREATE,
            (&raw const attr).cast(),
            size_of::<LinkCreateAttr>(),
        )
        .map_err(|source| SessionError::Attach {
            name: name.to_owned(),
            path: path.to_owned(),
            count: offsets.len(),
            source,
        })?;
        Ok(UprobeLink {
            link,
            _program: program,
        })
    }

    /// Loads program `name` for a link of `kind` without attaching it, so that the verifier's
    /// time is spent before any link exists.
    pub fn prepare(&self, name: &str, kind: LinkKind) -> Result<OwnedFd, SessionError> {
        let obj = &self.obj;
        let key = obj
            .programs
            .get(name)
            .ok_or_else(|| SessionError::Missing(name.to_owned()))?
            .function_key();
        let function = obj
            .functions
            .get(&key)
            .ok_or_else(|| SessionError::Missing(name.to_owned()))?;

        let mut prog_name = [0u8; 16];
        for (slot, byte) in prog_name.iter_mut().zip(name.bytes().take(15)) {
            *slot = byte;
        }
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_KPROBE,
            insn_cnt: function.instructions.len() as u32,
            insns: function.instructions.as_ptr() as u64,
            license: obj.license.as_ptr() as u64,
            prog_name,
            expected_attach_type: kind.attach_type(),
            ..ProgLoadAttr::default()
        };
        if let Some(btf) = &self.btf {
            let funcs = &function.func_info.func_info;
            attr.prog_btf_fd = btf.as_raw_fd() as u32;
            attr.func_info_rec_size = function.func_info_rec_size as u32;
            attr.func_info = funcs.as_ptr() as u64;
            attr.func_info_cnt = funcs.len() as u32;
        }
        match bpf(
            BPF_PROG_LOAD,
            (&raw const attr).cast(),
            size_of::<ProgLoadAttr>(),
        ) {
            Ok(fd) => Ok(fd),
            Err(first) => {
                // Load again with the verifier's log, for the error message.
                let mut log = vec![0u8; LOG_SIZE];
                attr.log_level = 1;
                attr.log_size = LOG_SIZE as u32;
                attr.log_buf = log.as_mut_ptr() as u64;
                let _ = bpf(
                    BPF_PROG_LOAD,
                    (&raw const attr).cast(),
                    size_of::<ProgLoadAttr>(),
                );
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                let text = String::from_utf8_lossy(&log[..end]);
                // The verifier's verdict is at the end of its log.
                let tail: Vec<&str> = text.lines().rev().take(12).collect();
                let log = if tail.is_empty() {
                    String::new()
                } else {
                    format!(
                        "\nverifier log (last lines):\n{}",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    )
                };
                Err(SessionError::Load {
                    name: name.to_owned(),
                    log,
                    source: first,
                })
            }
        }
    }
}

/// Per-stack counts of the sampling mode are kept in the kernel in units of 2^-16
/// allocation: the nearest whole number (live counts may dip below zero mid-update).
pub fn whole_count(fixed: i64) -> i64 {
    const HALF: i64 = 1 << (tracer_common::sampling::COUNT_SHIFT - 1);
    (fixed + HALF) >> tracer_common::sampling::COUNT_SHIFT
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offsets of `union bpf_attr` members in include/uapi/linux/bpf.h.
    #[test]
    fn attr_layouts_match_the_kernel() {
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, prog_name), 48);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, expected_attach_type), 68);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, prog_btf_fd), 72);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, func_info), 80);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, line_info), 96);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, attach_btf_id), 108);
        assert_eq!(std::mem::offset_of!(LinkCreateAttr, path), 16);
        assert_eq!(std::mem::offset_of!(LinkCreateAttr, cnt), 48);
        assert_eq!(std::mem::offset_of!(LinkCreateAttr, pid), 56);
    }

    #[test]
    fn fixed_point_counts_round_to_the_nearest_allocation() {
        assert_eq!(whole_count(0), 0);
        assert_eq!(whole_count(3 << 16), 3);
        assert_eq!(whole_count((5 << 16) + (1 << 15)), 6);
        assert_eq!(whole_count((5 << 16) + (1 << 15) - 1), 5);
        assert_eq!(whole_count(-(1 << 16)), -1);
    }
}
