//! What the bench needs to know about uprobes in a workload: where glibc's allocator functions
//! are (file offsets and addresses in the running process), whether a tool's probes are in
//! place yet (the breakpoint byte), and the kernel's floor: uprobes that run an empty BPF
//! program, attached with the bpf(2) syscall.

use std::{
    ffi::CString,
    fs,
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::fs::FileExt as _,
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};

/// x86's int3, which the kernel writes over a probed instruction.
pub const BREAKPOINT: u8 = 0xcc;

/// An allocator function of the workload's C library.
#[derive(Clone, Debug)]
pub struct LibcFunction {
    pub name: String,
    /// Offset of its first byte in the library file.
    pub file_offset: u64,
    /// Its address in the workload process.
    pub address: u64,
    /// Its first bytes, as in the file.
    pub prologue: Vec<u8>,
}

/// The C library a process maps, and the named functions in it.
pub struct Libc {
    pub path: PathBuf,
    pub functions: Vec<LibcFunction>,
}

impl Libc {
    pub fn function(&self, name: &str) -> Result<&LibcFunction> {
        self.functions
            .iter()
            .find(|f| f.name == name)
            .with_context(|| format!("{name} not found in {}", self.path.display()))
    }
}

/// Finds `names` in the libc that `pid` maps (its dynamic symbols; through the ELF program
/// headers to file offsets, and through /proc/PID/maps to addresses).
pub fn libc_of(pid: u32, names: &[&str]) -> Result<Libc> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps"))
        .with_context(|| format!("read /proc/{pid}/maps"))?;
    // (start, file offset of start, end) of each mapping of libc.
    let mut ranges = Vec::new();
    let mut path = None;
    for line in maps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 6 || !fields[5].contains("/libc.so") {
            continue;
        }
        let (start, end) = fields[0].split_once('-').context("maps range")?;
        let start = u64::from_str_radix(start, 16)?;
        let end = u64::from_str_radix(end, 16)?;
        let offset = u64::from_str_radix(fields[2], 16)?;
        ranges.push((start, offset, end));
        path = Some(PathBuf::from(fields[5]));
    }
    let path = path.with_context(|| format!("process {pid} maps no libc.so"))?;
    let data = fs::read(&path).with_context(|| format!("read {}", path.display()))?;
    let elf = object::File::parse(&*data).with_context(|| format!("parse {}", path.display()))?;
    let mut functions = Vec::new();
    for &name in names {
        let symbol = elf
            .dynamic_symbols()
            .find(|s| s.name() == Ok(name) && s.address() != 0)
            .with_context(|| format!("{name} is not a dynamic symbol of {}", path.display()))?;
        let vaddr = symbol.address();
        let file_offset = elf
            .segments()
            .find_map(|seg| {
                let (off, size) = seg.file_range();
                (vaddr >= seg.address() && vaddr < seg.address() + size)
                    .then(|| off + (vaddr - seg.address()))
            })
            .with_context(|| format!("{name} at {vaddr:#x} is in no loaded segment"))?;
        let address = ranges
            .iter()
            .find(|&&(start, off, end)| file_offset >= off && file_offset < off + (end - start))
            .map(|&(start, off, _)| start + (file_offset - off))
            .with_context(|| {
                format!("{name} (file offset {file_offset:#x}) is not mapped in {pid}")
            })?;
        let at = file_offset as usize;
        let prologue = data.get(at..at + 16).unwrap_or_default().to_vec();
        functions.push(LibcFunction {
            name: name.to_owned(),
            file_offset,
            address,
            prologue,
        });
    }
    Ok(Libc { path, functions })
}

/// Waits until every one of `functions` starts with a breakpoint in `pid`: the tool's uprobes
/// are in. Tools say "attaching" before they attach, not after.
pub fn wait_for_breakpoints(
    pid: u32,
    functions: &[&LibcFunction],
    timeout: Duration,
) -> Result<()> {
    let mem = fs::File::open(format!("/proc/{pid}/mem"))
        .with_context(|| format!("open /proc/{pid}/mem"))?;
    let deadline = Instant::now() + timeout;
    loop {
        let mut missing = Vec::new();
        for f in functions {
            let mut byte = [0u8; 1];
            mem.read_exact_at(&mut byte, f.address)
                .with_context(|| format!("read {} of process {pid}", f.name))?;
            if byte[0] != BREAKPOINT {
                missing.push(f.name.as_str());
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "after {timeout:?} no uprobe at the start of {} in process {pid}",
                missing.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Where a cheap (emulated) probe on `free` goes: glibc 2.36's free starts with
/// `test %rdi,%rdi` (48 85 ff), which the kernel single-steps (~10 us a hit); the `je` after
/// it is emulated. The tracer decodes the prologue properly (iced-x86); this only recognizes
/// that one instruction, and otherwise probes the first.
pub fn cheap_free_offset(free: &LibcFunction) -> u64 {
    if free.prologue.starts_with(&[0x48, 0x85, 0xff]) {
        3
    } else {
        0
    }
}

/// Where the floor's probes go, and this tracer's first ones: `malloc` and `free` at its cheap
/// offset (named `free+N` then), in the libc that `pid` maps.
pub fn cheap_sites(pid: u32) -> Result<(PathBuf, [LibcFunction; 2])> {
    let libc = libc_of(pid, &["malloc", "free"])?;
    let malloc = libc.function("malloc")?.clone();
    let mut free = libc.function("free")?.clone();
    let at = cheap_free_offset(&free);
    if at != 0 {
        free.file_offset += at;
        free.address += at;
        free.name = format!("free+{at}");
    }
    Ok((libc.path, [malloc, free]))
}

/// The kernel's floor for per-call uprobe tracing: uprobes that run an empty BPF program
/// (`r0 = 0; exit`), attached through one uprobe-multi link, the cheapest way a BPF tool can
/// be called at a function here.
pub struct EmptyUprobes {
    _link: OwnedFd,
    _program: OwnedFd,
}

/// `enum bpf_cmd` and `enum bpf_attach_type` values (include/uapi/linux/bpf.h).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_KPROBE: u32 = 2;
const BPF_TRACE_UPROBE_MULTI: u32 = 48;

/// BPF_PROG_LOAD's attr, up to `expected_attach_type`.
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

fn bpf(cmd: libc::c_long, attr: *const u8, size: usize, what: &str) -> Result<OwnedFd> {
    // SAFETY: attr points at a live attr struct of `size` bytes whose pointers outlive the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context(what.to_owned());
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

impl EmptyUprobes {
    /// The floor on process `pid`: attached at [`cheap_sites`], and in place (the breakpoints
    /// are in its memory) when this returns. Also gives the name of the free probe's place.
    pub fn attach_floor(pid: u32, timeout: Duration) -> Result<(Self, String)> {
        let (path, [malloc, free]) = cheap_sites(pid)?;
        let probes = Self::attach(&path, &[malloc.file_offset, free.file_offset], pid)?;
        wait_for_breakpoints(pid, &[&malloc, &free], timeout)?;
        Ok((probes, free.name))
    }

    /// Attaches at each file offset of `path`, for process `pid` only.
    pub fn attach(path: &Path, offsets: &[u64], pid: u32) -> Result<Self> {
        // mov r0, 0; exit
        let insns: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];
        let license = c"GPL";
        let mut name = [0u8; 16];
        name[..8].copy_from_slice(b"bench_fl");
        let load = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_KPROBE,
            insn_cnt: 2,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name: name,
            expected_attach_type: BPF_TRACE_UPROBE_MULTI,
            ..ProgLoadAttr::default()
        };
        let program = bpf(
            BPF_PROG_LOAD,
            (&raw const load).cast(),
            size_of::<ProgLoadAttr>(),
            "load the empty BPF program",
        )?;
        let c_path = CString::new(path.as_os_str().as_encoded_bytes())?;
        let link = LinkCreateAttr {
            prog_fd: std::os::fd::AsRawFd::as_raw_fd(&program) as u32,
            attach_type: BPF_TRACE_UPROBE_MULTI,
            path: c_path.as_ptr() as u64,
            offsets: offsets.as_ptr() as u64,
            cnt: offsets.len() as u32,
            pid,
            ..LinkCreateAttr::default()
        };
        let link = bpf(
            BPF_LINK_CREATE,
            (&raw const link).cast(),
            size_of::<LinkCreateAttr>(),
            &format!("attach uprobes to {} at {offsets:#x?}", path.display()),
        )?;
        Ok(EmptyUprobes {
            _link: link,
            _program: program,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpf_attr_layouts_match_the_kernel() {
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, expected_attach_type), 68);
        assert_eq!(std::mem::offset_of!(LinkCreateAttr, path), 16);
        assert_eq!(std::mem::offset_of!(LinkCreateAttr, pid), 56);
    }

    #[test]
    fn free_probe_skips_only_the_single_stepped_test() {
        let f = |bytes: &[u8]| LibcFunction {
            name: "free".into(),
            file_offset: 0,
            address: 0,
            prologue: bytes.to_vec(),
        };
        assert_eq!(cheap_free_offset(&f(&[0x48, 0x85, 0xff, 0x0f, 0x84])), 3);
        assert_eq!(cheap_free_offset(&f(&[0x55, 0x48, 0x89, 0xe5])), 0);
    }
}
