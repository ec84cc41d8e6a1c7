//! The mmap family at the syscall level: the raw tracepoint on syscall exit, the libc wrapper
//! sites whose callers the BPF side recovers, and the event stream.
//!
//! Why one raw tracepoint on `raw_syscalls:sys_exit` and not the per-syscall tracepoints
//! (`syscalls:sys_{enter,exit}_mmap`, ...): each of those is a perf event, and closing one
//! waits for an RCU grace period while holding the kernel's `event_mutex`, so twelve of them
//! took 0.5-1.2 s to remove, one after another, whatever thread closed them. A raw
//! tracepoint link goes in ~0.1 ms. Its price: it runs for every syscall of every process on
//! the host while recording, about 50 ns each here where the per-syscall tracepoints cost
//! about 28 ns (`cargo xtask bench` measures neither; see README, Performance).
use std::path::Path;

use aya::{
    Ebpf,
    maps::{HashMap, MapData, RingBuf},
    programs::{RawTracePoint, raw_trace_point::RawTracePointLink},
};
use iced_x86::{Code, Decoder, DecoderOptions, Mnemonic, OpKind, Register};
use tracer_common::SyscallEvent;

use super::libc;
use crate::symbolize::maps::ProcMaps;

/// glibc's wrappers for the traced syscalls (mmap64 is mmap's other name; `__brk` is
/// internal).
const WRAPPERS: [&str; 6] = ["mmap64", "munmap", "mremap", "brk", "madvise", "mprotect"];

#[derive(Debug, thiserror::Error)]
pub enum SyscallsError {
    #[error("attach {program} to the raw tracepoint {tracepoint}")]
    Attach {
        program: &'static str,
        tracepoint: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("BPF map {0}")]
    Map(&'static str, #[source] aya::maps::MapError),
}

/// Where, in each wrapper's first bytes, a `syscall` instruction is, and how far the stack
/// pointer is from the return address there: (offset just past `syscall`, sp offset).
/// Follows the straight-line path from the entry until the first return or jump.
pub fn syscall_sites(code: &[u8]) -> Vec<(u64, u64)> {
    let mut sites = Vec::new();
    let mut depth: u64 = 0;
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    while decoder.can_decode() {
        let insn = decoder.decode();
        if insn.is_invalid() {
            break;
        }
        match insn.mnemonic() {
            Mnemonic::Syscall => sites.push((insn.next_ip(), depth)),
            Mnemonic::Push => depth += 8,
            Mnemonic::Pop => depth = depth.saturating_sub(8),
            Mnemonic::Sub | Mnemonic::Add
                if insn.op0_register() == Register::RSP && insn.op1_kind() != OpKind::Register =>
            {
                let imm = insn.immediate(1);
                if insn.mnemonic() == Mnemonic::Sub {
                    depth += imm;
                } else {
                    depth = depth.saturating_sub(imm);
                }
            }
            Mnemonic::Ret | Mnemonic::Jmp => break,
            _ if insn.code() == Code::INVALID => break,
            _ => {}
        }
    }
    sites
}

/// Frameless libc functions that call the wrappers, whose own caller is the one worth naming.
const INTERMEDIARIES: [&str; 1] = ["sbrk"];

/// Calls in a function and its frame size at them: (offset just past the call, bytes pushed
/// or reserved by the prologue). The frame is taken as the prologue leaves it, which holds
/// for glibc's small functions that keep one frame throughout.
pub fn call_sites(code: &[u8]) -> Vec<(u64, u64)> {
    let mut sites = Vec::new();
    let mut frame: u64 = 0;
    let mut in_prologue = true;
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    while decoder.can_decode() {
        let insn = decoder.decode();
        if insn.is_invalid() {
            break;
        }
        match insn.mnemonic() {
            Mnemonic::Push if in_prologue => frame += 8,
            Mnemonic::Sub
                if in_prologue
                    && insn.op0_register() == Register::RSP
                    && insn.op1_kind() != OpKind::Register =>
            {
                frame += insn.immediate(1)
            }
            Mnemonic::Call => {
                in_prologue = false;
                sites.push((insn.next_ip(), frame));
            }
            m if insn.is_jcc_short_or_near() || m == Mnemonic::Jmp || m == Mnemonic::Ret => {
                in_prologue = false;
            }
            _ => {}
        }
    }
    sites
}

/// Syscall tracing attached to one process.
pub struct SyscallTracing {
    events: RingBuf<MapData>,
    /// The raw tracepoints' links; empty once detached.
    links: Vec<RawTracePointLink>,
}

/// (program, raw tracepoint). The exit sees every call whole; the entry sends munmap and
/// mremap early (see the BPF side). The exit is attached first, so no entry goes unanswered.
const PROGRAMS: [(&str, &str); 2] = [("tr_sys_exit", "sys_exit"), ("tr_sys_enter", "sys_enter")];

impl SyscallTracing {
    /// Fills the wrapper sites for the target's libc and attaches the program. The maps are
    /// created already, with TARGET_TGID set.
    pub fn attach(
        ebpf: &mut Ebpf,
        libc_host_path: &Path,
        libc_target_path: &str,
        maps: &ProcMaps,
    ) -> Result<SyscallTracing, SyscallsError> {
        // A missing wrapper or intermediary only costs the caller frame of its stacks.
        let target = LibcInTarget {
            host_path: libc_host_path,
            path: libc_target_path,
            maps,
        };
        target.fill(ebpf, "CALL_SITES", &INTERMEDIARIES, call_sites)?;
        target.fill(ebpf, "SYSCALL_SITES", &WRAPPERS, syscall_sites)?;
        let mut links = Vec::new();
        for (program, tracepoint) in PROGRAMS {
            let attach_err = |source| SyscallsError::Attach {
                program,
                tracepoint,
                source,
            };
            let prog: &mut RawTracePoint = ebpf
                .program_mut(program)
                .and_then(|p| p.try_into().ok())
                .ok_or_else(|| attach_err(aya::programs::ProgramError::NotLoaded))?;
            prog.load().map_err(attach_err)?;
            let id = prog.attach(tracepoint).map_err(attach_err)?;
            // Owned here, so that detaching is up to us (see `take_links`).
            links.push(prog.take_link(id).map_err(attach_err)?);
        }
        let events = RingBuf::try_from(ebpf.take_map("SYSCALL_EVENTS").ok_or(
            SyscallsError::Map("SYSCALL_EVENTS", aya::maps::MapError::InvalidName {
                name: "SYSCALL_EVENTS".into(),
            }),
        )?)
        .map_err(|e| SyscallsError::Map("SYSCALL_EVENTS", e))?;
        Ok(SyscallTracing { events, links })
    }

    /// The attachment, for the caller to close along with the others; events already in the
    /// ring stay readable.
    pub fn take_links(&mut self) -> Vec<Box<dyn Send>> {
        self.links
            .drain(..)
            .map(|l| Box::new(l) as Box<dyn Send>)
            .collect()
    }

    /// Every event produced since the last call, in order.
    pub fn drain(&mut self) -> Vec<SyscallEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            if item.len() >= size_of::<SyscallEvent>() {
                // SAFETY: the BPF side writes whole SyscallEvents; read unaligned to be safe.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<SyscallEvent>()) });
            }
        }
        out
    }
}

/// The target's C library: the file to read, and where the target maps it.
struct LibcInTarget<'a> {
    host_path: &'a Path,
    path: &'a str,
    maps: &'a ProcMaps,
}

impl LibcInTarget<'_> {
    /// Puts, for each of `functions` found, the sites `decode` finds in its first bytes into
    /// the BPF hash map `map`, keyed by their address in the target.
    fn fill(
        &self,
        ebpf: &mut Ebpf,
        map: &'static str,
        functions: &[&'static str],
        decode: fn(&[u8]) -> Vec<(u64, u64)>,
    ) -> Result<(), SyscallsError> {
        let Ok(found) = libc::functions(self.host_path, &[], functions) else {
            return Ok(());
        };
        let mut sites: HashMap<&mut MapData, u64, u64> = HashMap::try_from(
            ebpf.map_mut(map)
                .ok_or(SyscallsError::Map(map, aya::maps::MapError::InvalidName { name: map.into() }))?,
        )
        .map_err(|e| SyscallsError::Map(map, e))?;
        for f in found.values() {
            for (after, value) in decode(&f.prologue) {
                if let Some(addr) = address_of(self.maps, self.path, f.file_offset + after) {
                    sites.insert(addr, value, 0).map_err(|e| SyscallsError::Map(map, e))?;
                }
            }
        }
        Ok(())
    }
}

/// Address in the target of `file_offset` in the file mapped at `path`.
fn address_of(maps: &ProcMaps, path: &str, file_offset: u64) -> Option<u64> {
    maps.mappings().iter().find_map(|m| {
        let len = m.end - m.start;
        (m.path.as_deref() == Some(path) && m.offset <= file_offset && file_offset < m.offset + len)
            .then(|| m.start + (file_offset - m.offset))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_wrapper_has_its_return_address_on_top() {
        // glibc munmap: mov $0xb,%eax; syscall; cmp ...; jae; ret
        let code = [0xb8, 0x0b, 0, 0, 0, 0x0f, 0x05, 0x48, 0x3d, 0x01, 0xf0, 0xff, 0xff, 0xc3];
        assert_eq!(syscall_sites(&code), vec![(7, 0)]);
    }

    #[test]
    fn stack_frame_of_the_wrapper_is_counted() {
        // glibc mremap: sub $0x58,%rsp; mov %r8,0x40(%rsp); ...; mov $0x19,%eax; syscall
        let code = [
            0x48, 0x83, 0xec, 0x58, 0x4c, 0x89, 0x44, 0x24, 0x40, 0xb8, 0x19, 0, 0, 0, 0x0f, 0x05,
        ];
        assert_eq!(syscall_sites(&code), vec![(16, 0x58)]);
    }

    #[test]
    fn glibc_sbrk_calls_brk_with_three_registers_pushed() {
        let path = Path::new("/lib/x86_64-linux-gnu/libc.so.6");
        let functions = libc::functions(path, &[], &INTERMEDIARIES).unwrap();
        let sites = call_sites(&functions["sbrk"].prologue);
        // Two calls to brk within the first 128 bytes, both with push r12, rbp, rbx done.
        assert!(sites.len() >= 2, "{sites:?}");
        assert!(sites.iter().all(|&(_, frame)| frame == 24), "{sites:?}");
    }

    #[test]
    fn glibc_wrappers_all_have_a_site() {
        let path = Path::new("/lib/x86_64-linux-gnu/libc.so.6");
        let functions = libc::functions(path, &[], &WRAPPERS).unwrap();
        for name in WRAPPERS {
            let f = functions.get(name).unwrap_or_else(|| panic!("{name} not in libc"));
            assert!(!syscall_sites(&f.prologue).is_empty(), "{name}: no syscall found");
        }
    }
}
