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
}

impl Loader {
    /// `elf` is the object `ebpf` was loaded from.
    pub fn new(ebpf: &Ebpf, elf: &[u8]) -> Result<Loader, SessionError> {
        let mut obj = aya_obj::Object::parse(elf).map_err(SessionError::Parse)?;
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
        Ok(Loader { obj })
    }

    /// Loads program `name` for a link of `kind` and attaches it to `path` at each file
    /// offset, each with its cookie, for process `pid` (all its threads) only.
    pub fn attach(
        &self,
        name: &str,
        kind: LinkKind,
        path: &Path,
        offsets: &[u64],
        cookies: &[u64],
        pid: u32,
    ) -> Result<UprobeLink, SessionError> {
        let program = self.load(name, kind)?;
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

    fn load(&self, name: &str, kind: LinkKind) -> Result<OwnedFd, SessionError> {
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
