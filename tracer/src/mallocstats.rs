//! `tracer malloc-stats`: glibc's own view of a running process's heap, got the way a gdb user
//! gets it, by calling `mallinfo2()` and `malloc_info()` inside the stopped process, but only
//! at a moment when no thread is inside the allocator or holds one of its locks, never giving a
//! call up while it is inside the allocator (where it may hold a lock), and never letting a
//! fault of the call reach the target. It tells how much of RSS is live and how much is free
//! memory glibc keeps (fragmentation, one arena per thread).
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind, Register};
use nix::{errno::Errno, sys::ptrace::Options};
use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};
use serde::{Deserialize, Serialize};

use crate::{
    probe::{
        libc::find_libc,
        ptrace::sys::{self, Mem, Regs, Stop},
    },
    symbolize::maps::ProcMaps,
};

/// Functions of malloc.c that glibc exports; the code between its neighbours in other files
/// is the allocator's (its static helpers sit in between).
const MALLOC_FUNCTIONS: &[&str] = &[
    "malloc",
    "free",
    "cfree",
    "calloc",
    "realloc",
    "reallocarray",
    "memalign",
    "aligned_alloc",
    "valloc",
    "pvalloc",
    "posix_memalign",
    "malloc_trim",
    "malloc_usable_size",
    "mallinfo",
    "mallinfo2",
    "malloc_stats",
    "mallopt",
    "malloc_info",
    "__default_morecore",
];
/// Bytes above a thread's stack pointer searched for a return address into the allocator: a
/// thread in memcpy, a system call or a lock wait called from malloc has one there.
const STACK_SCAN: usize = 512;
/// `mallinfo2()`'s result: ten size_t.
const MALLINFO2_FIELDS: usize = 10;
/// Arenas followed along their list at most (a corrupt list must not loop us forever).
const LOCK_WAIT_LIMIT: usize = 4096;
/// How long one call into the target may take before it is given up, provided it is then
/// outside the allocator; inside it, it runs on.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a call past its deadline is stopped to see whether it left the allocator.
const OVERRUN_LOOK: Duration = Duration::from_millis(20);
/// Stack bytes of the calling thread searched for a return address into the allocator, from
/// its stack pointer up to the frame the call started in.
const CALL_STACK_MAX: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("no process with pid {0}")]
    NoProcess(u32),
    #[error("read the memory map of pid {pid} (malloc-stats needs ptrace access to it)")]
    Maps {
        pid: u32,
        #[source]
        source: crate::symbolize::maps::MapsError,
    },
    #[error("pid {0} maps no C library")]
    NoLibc(u32),
    #[error("{path}: {message}")]
    Libc { path: PathBuf, message: String },
    #[error("{path} has no {symbol}: malloc-stats needs glibc 2.33 or later")]
    Missing { path: PathBuf, symbol: &'static str },
    #[error(
        "{path}: the code of mallinfo2() does not show where glibc's arena list is, so malloc-stats \
         cannot check that no thread holds an allocator lock, and does not call into the process"
    )]
    NoLockCheck { path: PathBuf },
    #[error(
        "ptrace seize thread {tid} of pid {pid}{}",
        if *source == Errno::EPERM { " (already traced by a debugger or tracer, or not permitted)" } else { "" }
    )]
    Seize {
        pid: u32,
        tid: i32,
        #[source]
        source: Errno,
    },
    #[error("pid {0} exited")]
    Gone(u32),
    #[error(
        "no safe moment within {waited:?}: {why} (tried {tries} times; the target ran on untouched)"
    )]
    Busy {
        waited: Duration,
        tries: u32,
        why: String,
    },
    #[error(
        "{function}() in pid {pid} did not return within {timeout:?}; it was given up outside the \
         allocator, holding none of its locks, its thread's registers restored and the target resumed"
    )]
    Timeout {
        pid: u32,
        function: &'static str,
        timeout: Duration,
    },
    #[error(
        "{function}() faulted in pid {pid} ({signal} at pc {pc:#x}, address {addr:#x}): glibc's heap \
         looks corrupt; the fault was not passed to the target, the thread's registers were \
         restored{}",
        if *released > 0 { " and the arena lock the call held released" } else { "" }
    )]
    Fault {
        pid: u32,
        function: &'static str,
        signal: String,
        pc: u64,
        addr: u64,
        released: usize,
    },
    #[error("call {function}() in pid {pid}")]
    Call {
        pid: u32,
        function: &'static str,
        #[source]
        source: crate::probe::ptrace::sys::InjectError,
    },
    #[error("read the result of {0}() from the target")]
    Read(&'static str),
}

/// One arena as `malloc_info()` describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Arena {
    pub index: u32,
    /// Memory the arena got from the system.
    pub system_bytes: u64,
    pub fastbin_bytes: u64,
    /// Free chunks in the bins (unsorted, small, large).
    pub bin_bytes: u64,
    /// The top chunk: free space at the end of the arena.
    pub top_bytes: u64,
}

/// glibc's figures for one process.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MallocStats {
    pub pid: u32,
    pub arenas: u64,
    /// Bytes in chunks handed out and not freed (`uordblks`; tcache'd chunks count as in use,
    /// as glibc counts them).
    pub in_use_bytes: u64,
    /// Free bytes glibc keeps in its arenas (`fordblks`): fastbins + bins + top chunks.
    pub free_bytes: u64,
    pub fastbin_bytes: u64,
    pub bin_bytes: u64,
    pub top_bytes: u64,
    /// Memory the arenas got from the system (`arena`).
    pub arena_bytes: u64,
    /// Chunks glibc mmapped on their own (`hblks`, `hblkhd`).
    pub mmapped_chunks: u64,
    pub mmapped_bytes: u64,
    /// VmRSS of the process at the time.
    pub rss_bytes: u64,
    pub per_arena: Vec<Arena>,
}

impl MallocStats {
    /// Free memory glibc keeps that may count in RSS: never more than RSS itself.
    pub fn retained_in_rss(&self) -> u64 {
        self.free_bytes.min(self.rss_bytes)
    }
}

/// Where the allocator lives in the target.
struct Allocator {
    /// [start, end) of malloc.c's code, at runtime.
    code: (u64, u64),
    mallinfo2: u64,
    malloc_info: Option<u64>,
    open_memstream: Option<u64>,
    fclose: Option<u64>,
    free: u64,
    /// `main_arena` and the offset of `next` in `struct malloc_state`, as mallinfo2's code
    /// shows them: where the arena locks are.
    arenas: (u64, u64),
    /// Bytes of libc's text, for telling return addresses from other numbers.
    text: Vec<u8>,
    /// Runtime address of `text[0]`.
    text_at: u64,
}

fn libc_err(path: &Path, message: impl ToString) -> StatsError {
    StatsError::Libc {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

impl Allocator {
    fn find(pid: u32, maps: &ProcMaps, libc: &str) -> Result<Allocator, StatsError> {
        let host = PathBuf::from(format!("/proc/{pid}/root{libc}"));
        let data = std::fs::read(&host).map_err(|e| libc_err(&host, e))?;
        let elf = object::File::parse(&*data).map_err(|e| libc_err(&host, e))?;
        let mut symbols: Vec<(u64, u64, String)> = elf
            .dynamic_symbols()
            .filter(|s| {
                s.is_definition() && s.kind() == object::SymbolKind::Text && s.address() != 0
            })
            .filter_map(|s| Some((s.address(), s.size(), s.name().ok()?.to_owned())))
            .collect();
        symbols.sort();
        let by_name: HashMap<&str, u64> =
            symbols.iter().map(|(a, _, n)| (n.as_str(), *a)).collect();
        // Load bias: where the executable segment holding malloc is mapped.
        let vaddr_of = |name: &'static str| {
            by_name.get(name).copied().ok_or(StatsError::Missing {
                path: host.clone(),
                symbol: name,
            })
        };
        let malloc_vaddr = vaddr_of("malloc")?;
        let segment = elf
            .segments()
            .find(|s| s.address() <= malloc_vaddr && malloc_vaddr < s.address() + s.size())
            .ok_or_else(|| libc_err(&host, "malloc lies in no segment"))?;
        let (seg_off, seg_size) = segment.file_range();
        let file_off = seg_off + (malloc_vaddr - segment.address());
        let mapping = maps
            .mappings()
            .iter()
            .find(|m| {
                m.path.as_deref() == Some(libc)
                    && m.offset <= file_off
                    && file_off < m.offset + (m.end - m.start)
            })
            .ok_or(StatsError::NoLibc(pid))?;
        let bias = (mapping.start + (file_off - mapping.offset)).wrapping_sub(malloc_vaddr);
        let at = |vaddr: u64| vaddr.wrapping_add(bias);

        let is_malloc = |name: &str| {
            MALLOC_FUNCTIONS.contains(&name)
                || name.starts_with("__libc_") && MALLOC_FUNCTIONS.contains(&&name[7..])
        };
        let malloc_syms: Vec<&(u64, u64, String)> =
            symbols.iter().filter(|(_, _, n)| is_malloc(n)).collect();
        let lo = malloc_syms
            .iter()
            .map(|s| s.0)
            .min()
            .unwrap_or(malloc_vaddr);
        let hi = malloc_syms
            .iter()
            .map(|s| s.0 + s.1)
            .max()
            .unwrap_or(malloc_vaddr);
        let start = symbols
            .iter()
            .filter(|(a, s, n)| !is_malloc(n) && a + s <= lo)
            .map(|(a, s, _)| a + s)
            .max()
            .unwrap_or(lo);
        let end = symbols
            .iter()
            .filter(|(a, _, n)| !is_malloc(n) && *a >= hi)
            .map(|(a, _, _)| *a)
            .min()
            .unwrap_or(hi);

        let mallinfo2 = vaddr_of("mallinfo2")?;
        let mallinfo2_size = symbols.iter().find(|s| s.0 == mallinfo2).map_or(0, |s| s.1);
        let code_of = |vaddr: u64, len: u64| {
            let off = (seg_off + (vaddr - segment.address())) as usize;
            data.get(off..off + len as usize)
        };
        // Without the arena list the locks cannot be checked: refuse rather than call blind.
        let arenas = code_of(mallinfo2, mallinfo2_size)
            .and_then(|code| arenas_from_mallinfo2(code, mallinfo2))
            .map(|(a, next)| (at(a), next))
            .ok_or_else(|| StatsError::NoLockCheck { path: host.clone() })?;
        let text = code_of(segment.address(), seg_size.min(segment.size()))
            .unwrap_or_default()
            .to_vec();
        let optional = |name| by_name.get(name).map(|&v| at(v));
        Ok(Allocator {
            code: (at(start), at(end)),
            mallinfo2: at(mallinfo2),
            malloc_info: optional("malloc_info"),
            open_memstream: optional("open_memstream"),
            fclose: optional("fclose"),
            free: at(vaddr_of("free")?),
            arenas,
            text_at: at(segment.address()),
            text,
        })
    }

    fn in_code(&self, addr: u64) -> bool {
        self.code.0 <= addr && addr < self.code.1
    }

    /// Whether `addr` is a return address into the allocator: in its code, after a call.
    fn returns_into(&self, addr: u64) -> bool {
        if !self.in_code(addr) {
            return false;
        }
        let Some(off) = addr.checked_sub(self.text_at + 5) else {
            return false;
        };
        let off = off as usize;
        // call rel32 (e8), or an indirect call through a register or memory (ff /2).
        self.text.get(off) == Some(&0xe8)
            || (2..=7).any(|back| {
                let i = off + 5 - back;
                self.text.get(i) == Some(&0xff)
                    && self.text.get(i + 1).is_some_and(|m| (m >> 3) & 7 == 2)
            })
    }

    /// Whether a thread making our call, stopped with `regs`, may be inside the allocator: its
    /// pc is in it, or a return address into it lies anywhere between its stack pointer and
    /// `frame_top`, where the call began. Whatever cannot be read counts as inside.
    fn call_inside(&self, mem: &Mem, regs: &Regs, frame_top: u64) -> bool {
        if self.in_code(regs.rip) {
            return true;
        }
        let Some(len) = frame_top.checked_sub(regs.rsp) else {
            return true;
        };
        if len > CALL_STACK_MAX {
            return true;
        }
        let mut stack = vec![0u8; len as usize];
        if !mem.read(regs.rsp, &mut stack) {
            return true;
        }
        stack
            .chunks_exact(8)
            .any(|word| self.returns_into(u64::from_le_bytes(word.try_into().expect("8 bytes"))))
    }

    /// The arenas whose lock is held, following the arena list; Err if the list cannot be
    /// read to its end.
    fn locked_arenas(&self, mem: &Mem) -> Result<Vec<u64>, u64> {
        let (main_arena, next_off) = self.arenas;
        let mut locked = Vec::new();
        let mut arena = main_arena;
        for _ in 0..LOCK_WAIT_LIMIT {
            match mem.read_u64(arena) {
                Some(word) if word as u32 != 0 => locked.push(arena),
                Some(_) => {}
                None => return Err(arena),
            }
            match mem.read_u64(arena + next_off) {
                Some(next) if next == main_arena => return Ok(locked),
                Some(next) if next != 0 => arena = next,
                _ => return Err(arena),
            }
        }
        Err(arena)
    }
}

/// `main_arena` and the offset of `next` in its struct, from mallinfo2's loop over the
/// arenas: `lea main_arena(%rip), %reg` ... `mov off(%reg2), %reg2`.
fn arenas_from_mallinfo2(code: &[u8], ip: u64) -> Option<(u64, u64)> {
    let insns: Vec<_> = Decoder::with_ip(64, code, ip, DecoderOptions::NONE)
        .into_iter()
        .collect();
    let arena = insns
        .iter()
        .find(|i| i.mnemonic() == Mnemonic::Lea && i.is_ip_rel_memory_operand())?
        .ip_rel_memory_address();
    let next = insns.iter().find_map(|i| {
        (i.mnemonic() == Mnemonic::Mov
            && i.op_count() == 2
            && i.op0_kind() == OpKind::Register
            && i.op1_kind() == OpKind::Memory
            && i.memory_base() == i.op0_register()
            && i.memory_base() != Register::RIP
            && i.memory_displacement64() >= 0x400
            && i.memory_displacement64() < 0x2000)
            .then(|| i.memory_displacement64())
    })?;
    Some((arena, next))
}

/// A stopped task and what it must be resumed with.
struct Held {
    tid: i32,
    sig: i32,
    group: bool,
    /// Signals meant for the target that arrived while calls ran in this task, to deliver as
    /// it is let go.
    deliver: Vec<(i32, libc::siginfo_t)>,
    /// The task sits in a signal-delivery-stop, where the first of them can be delivered with
    /// its own siginfo.
    signal_stop: bool,
}

impl Held {
    fn new(tid: i32, sig: i32, group: bool) -> Held {
        Held {
            tid,
            sig,
            group,
            deliver: Vec::new(),
            signal_stop: sig != 0,
        }
    }
}

/// Every thread of the target, seized and stopped.
struct Stopped {
    pid: u32,
    tasks: Vec<Held>,
}

impl Stopped {
    fn seize(pid: u32) -> Result<Stopped, StatsError> {
        let mut s = Stopped {
            pid,
            tasks: Vec::new(),
        };
        let mut seized: Vec<i32> = Vec::new();
        loop {
            let tids = tasks_of(pid)?;
            let new: Vec<i32> = tids.into_iter().filter(|t| !seized.contains(t)).collect();
            if new.is_empty() {
                break;
            }
            for tid in new {
                match sys::seize(tid, Options::PTRACE_O_TRACECLONE) {
                    Ok(()) => {}
                    Err(Errno::ESRCH) => continue,
                    Err(source) => {
                        s.release();
                        return Err(StatsError::Seize { pid, tid, source });
                    }
                }
                let _ = sys::interrupt(tid);
                seized.push(tid);
            }
            s.collect_stops(&mut seized)?;
        }
        Ok(s)
    }

    /// Waits until every task in `waiting` reports a stop.
    fn collect_stops(&mut self, waiting: &mut Vec<i32>) -> Result<(), StatsError> {
        let mut pending: Vec<i32> = waiting
            .iter()
            .copied()
            .filter(|t| !self.tasks.iter().any(|h| h.tid == *t))
            .collect();
        while !pending.is_empty() {
            let (tid, stop) = match sys::wait(-1, false) {
                Ok(Some(got)) => got,
                Ok(None) | Err(Errno::EINTR) => continue,
                Err(_) => return Err(StatsError::Gone(self.pid)),
            };
            pending.retain(|t| *t != tid);
            match stop {
                Stop::Exited(_) | Stop::Killed(_) => {
                    waiting.retain(|t| *t != tid);
                    if tid == self.pid as i32 {
                        self.release();
                        return Err(StatsError::Gone(self.pid));
                    }
                }
                Stop::Signal(sig) => self.tasks.push(Held::new(tid, sig, false)),
                Stop::Event(libc::PTRACE_EVENT_STOP, sig) => self.tasks.push(Held::new(
                    tid,
                    0,
                    matches!(
                        sig,
                        libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
                    ),
                )),
                Stop::Event(libc::PTRACE_EVENT_CLONE, _) => {
                    if let Ok(child) = sys::event_message(tid) {
                        let child = child as i32;
                        let reported = self.tasks.iter().any(|h| h.tid == child);
                        if !reported && !waiting.contains(&child) {
                            waiting.push(child);
                            pending.push(child);
                        }
                    }
                    self.tasks.push(Held::new(tid, 0, false));
                }
                Stop::Event(..) => self.tasks.push(Held::new(tid, 0, false)),
            }
            if !waiting.contains(&tid) && !self.tasks.iter().any(|h| h.tid == tid) {
                // A new thread's first stop before its parent's clone event.
                waiting.push(tid);
            }
        }
        Ok(())
    }

    /// Lets every thread run again (still seized), then stops them all anew.
    fn resume_and_stop_again(&mut self, pause: Duration) -> Result<(), StatsError> {
        let mut tids: Vec<i32> = Vec::new();
        for h in self.tasks.drain(..) {
            let _ = if h.group {
                sys::listen(h.tid)
            } else {
                sys::cont(h.tid, h.sig)
            };
            tids.push(h.tid);
        }
        std::thread::sleep(pause);
        for &tid in &tids {
            let _ = sys::interrupt(tid);
        }
        self.collect_stops(&mut tids)?;
        // Threads created meanwhile by threads not yet stopped.
        let more: Vec<i32> = tasks_of(self.pid)?
            .into_iter()
            .filter(|t| !tids.contains(t))
            .collect();
        for tid in more {
            if sys::seize(tid, Options::PTRACE_O_TRACECLONE).is_ok() {
                let _ = sys::interrupt(tid);
                tids.push(tid);
            }
        }
        self.collect_stops(&mut tids)
    }

    /// Lets every task go with the signal it was stopped with, and a task that ran calls with
    /// the signals that arrived meanwhile: the first with its own siginfo where the task's stop
    /// allows it, the others sent again (same signal, sent by the tracer).
    fn release(&mut self) {
        for h in self.tasks.drain(..) {
            let mut rest = h.deliver.into_iter();
            let sig = match rest.next() {
                Some((sig, info)) if h.signal_stop && sys::set_siginfo(h.tid, &info).is_ok() => sig,
                Some((sig, _)) => {
                    sys::tgkill(self.pid as i32, h.tid, sig);
                    h.sig
                }
                None => h.sig,
            };
            let _ = sys::detach(h.tid, sig);
            for (sig, _) in rest {
                sys::tgkill(self.pid as i32, h.tid, sig);
            }
        }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        self.release();
    }
}

fn tasks_of(pid: u32) -> Result<Vec<i32>, StatsError> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|_| StatsError::Gone(pid))?;
    Ok(dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect())
}

/// Why now is not a safe moment to call into the allocator, if it is not.
fn unsafe_because(stopped: &Stopped, alloc: &Allocator, mem: &Mem) -> Option<String> {
    for h in &stopped.tasks {
        let Ok(regs) = sys::getregs(h.tid) else {
            continue;
        };
        if alloc.in_code(regs.rip) {
            return Some(format!(
                "thread {} is inside the allocator (pc {:#x})",
                h.tid, regs.rip
            ));
        }
        let mut stack = [0u8; STACK_SCAN];
        let got = mem.read_some(regs.rsp, &mut stack);
        for word in stack[..got - got % 8].chunks_exact(8) {
            let v = u64::from_le_bytes(word.try_into().expect("8 bytes"));
            if alloc.returns_into(v) {
                return Some(format!(
                    "thread {} is in a function the allocator called (return address {v:#x} on its stack)",
                    h.tid
                ));
            }
        }
    }
    match alloc.locked_arenas(mem) {
        Ok(locked) if locked.is_empty() => None,
        Ok(locked) => Some(format!("the lock of arena {:#x} is held", locked[0])),
        Err(at) => Some(format!("the arena list cannot be read at {at:#x}")),
    }
}

/// The stopped thread the calls are made in, on a stack frame below its own.
struct Caller<'a> {
    pid: u32,
    tid: i32,
    /// Top of the calls' stack frames.
    frame_top: u64,
    alloc: &'a Allocator,
    mem: &'a Mem,
    /// Signals meant for the target that arrived during the calls, to deliver after.
    held: Vec<(i32, libc::siginfo_t)>,
    /// Whether the thread now sits in a signal-delivery-stop.
    signal_stop: bool,
}

impl Caller<'_> {
    /// Calls `function(args)`, returning to address 0 so that the return shows as a fault we
    /// catch; the registers are restored after. Past CALL_TIMEOUT the call is given up only
    /// where it holds no allocator lock: outside the allocator's code and frames, every arena
    /// lock free (all were free when it started and the other threads are stopped, so a held
    /// one would be the call's). Inside, it runs on, however long: a call given up there
    /// could leave a lock held and the target deadlocked on its next malloc. A fault of the
    /// call's own is not passed on: the call ends there, and the arena locks it held (no other
    /// thread can be waiting for them) are released.
    fn call(&mut self, function: (&'static str, u64), args: &[u64]) -> Result<u64, StatsError> {
        let (pid, tid) = (self.pid, self.tid);
        let ptrace_err = |source| StatsError::Call {
            pid,
            function: function.0,
            source: sys::InjectError::Ptrace { tid, source },
        };
        let saved = sys::getregs(tid).map_err(ptrace_err)?;
        let mut regs: Regs = saved;
        let sp = (self.frame_top & !0xf) - 8;
        if !self.mem.write_data(sp, &0u64.to_le_bytes()) {
            return Err(StatsError::Read("stack"));
        }
        regs.rsp = sp;
        regs.rip = function.1;
        regs.rax = 0;
        regs.orig_rax = u64::MAX;
        let slots = [&mut regs.rdi, &mut regs.rsi, &mut regs.rdx, &mut regs.rcx];
        for (slot, &arg) in slots.into_iter().zip(args) {
            *slot = arg;
        }
        let (alloc, mem, frame_top) = (self.alloc, self.mem, self.frame_top);
        let mut said = false;
        let mut may_abandon = |r: &Regs| {
            let free = alloc.locked_arenas(mem).is_ok_and(|l| l.is_empty());
            let outside = free && !alloc.call_inside(mem, r, frame_top);
            if !outside && !said {
                said = true;
                eprintln!(
                    "tracer: {}() in pid {pid} is still inside the allocator after {CALL_TIMEOUT:?}; \
                     waiting for it to leave (given up there it could leave a lock held)",
                    function.0
                );
            }
            outside
        };
        let run = sys::run_in(
            tid,
            &saved,
            &regs,
            false,
            Some(sys::Deadline {
                at: Instant::now() + CALL_TIMEOUT,
                every: OVERRUN_LOOK,
                may_abandon: &mut may_abandon,
            }),
            |stop, r| stop == Stop::Signal(libc::SIGSEGV) && r.rip == 0 && r.rsp == sp + 8,
        )
        .map_err(|source| StatsError::Call {
            pid,
            function: function.0,
            source,
        })?;
        self.held.extend(run.held);
        self.signal_stop = run.signal_stop;
        match run.ended {
            sys::Ended::Done(end) => Ok(end.rax),
            sys::Ended::Abandoned => Err(StatsError::Timeout {
                pid,
                function: function.0,
                timeout: CALL_TIMEOUT,
            }),
            sys::Ended::Fault(fault) => {
                let mut released = 0;
                for arena in alloc.locked_arenas(mem).unwrap_or_default() {
                    if mem.write_data(arena, &0u32.to_le_bytes()) {
                        released += 1;
                    }
                }
                Err(StatsError::Fault {
                    pid,
                    function: function.0,
                    signal: nix::sys::signal::Signal::try_from(fault.sig)
                        .map_or_else(|_| format!("signal {}", fault.sig), |s| s.to_string()),
                    pc: fault.pc,
                    addr: fault.addr,
                    released,
                })
            }
        }
    }
}

/// Holds back, for as long as it lives, the signals that would end this process by default
/// (Ctrl-C, kill): ended while a call runs in the target, the tracer would let the thread
/// return to address 0 untraced, and the target would die. They act once it is dropped,
/// when every thread of the target has been let go.
struct HoldTermination {
    old: libc::sigset_t,
}

impl HoldTermination {
    fn new() -> HoldTermination {
        // SAFETY: sigset operations on local sets; pthread_sigmask on the calling thread.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
                libc::sigaddset(&mut set, sig);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            HoldTermination { old }
        }
    }
}

impl Drop for HoldTermination {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in new().
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}

/// Stops `pid` at a safe moment (waiting up to `wait` for one), calls mallinfo2() and
/// malloc_info() in it, and lets it go.
pub fn inspect(pid: u32, wait: Duration) -> Result<MallocStats, StatsError> {
    if !Path::new(&format!("/proc/{pid}")).exists() {
        return Err(StatsError::NoProcess(pid));
    }
    let maps = ProcMaps::read(pid).map_err(|e| StatsError::Maps { pid, source: e })?;
    let libc = find_libc(&maps).ok_or(StatsError::NoLibc(pid))?;
    let alloc = Allocator::find(pid, &maps, &libc)?;
    let mem = Mem::open(pid as i32).map_err(|_| StatsError::Gone(pid))?;

    // Declared before `stopped`, so dropped after it: the target is let go first.
    let _hold = HoldTermination::new();
    let started = Instant::now();
    let mut stopped = Stopped::seize(pid)?;
    let mut tries = 1;
    while let Some(why) = unsafe_because(&stopped, &alloc, &mem) {
        if started.elapsed() >= wait {
            stopped.release();
            return Err(StatsError::Busy {
                waited: wait,
                tries,
                why,
            });
        }
        tries += 1;
        stopped.resume_and_stop_again(Duration::from_millis(2 + tries as u64 % 7))?;
    }

    // A thread stopped quietly (not in a signal-delivery-stop), the main one if it is.
    let tid = stopped
        .tasks
        .iter()
        .filter(|h| h.sig == 0)
        .min_by_key(|h| (h.tid != pid as i32, h.group))
        .map(|h| h.tid)
        .ok_or(StatsError::Busy {
            waited: wait,
            tries,
            why: "every thread is taking a signal".into(),
        })?;
    let regs = sys::getregs(tid).map_err(|_| StatsError::Gone(pid))?;
    // Below the thread's own stack and its red zone: our scratch space, then the call frames.
    let scratch = (regs.rsp - 128 - 256) & !0xf;
    let mut caller = Caller {
        pid,
        tid,
        frame_top: scratch - 64,
        alloc: &alloc,
        mem: &mem,
        held: Vec::new(),
        signal_stop: false,
    };
    let stats = ask_glibc(&mut caller, scratch);
    // Whatever happened, the signals that arrived for the target go with the thread.
    if let Some(h) = stopped.tasks.iter_mut().find(|h| h.tid == tid) {
        h.deliver = std::mem::take(&mut caller.held);
        h.signal_stop = caller.signal_stop;
    }
    stopped.release();
    let mut stats = stats?;

    stats.arenas = stats.per_arena.len() as u64;
    if !stats.per_arena.is_empty() {
        stats.top_bytes = stats.per_arena.iter().map(|a| a.top_bytes).sum();
    }
    stats.bin_bytes = stats
        .free_bytes
        .saturating_sub(stats.fastbin_bytes + stats.top_bytes);
    stats.rss_bytes = rss_of(pid).unwrap_or(0);
    Ok(stats)
}

/// The calls: mallinfo2(), then malloc_info() into an open_memstream buffer, freed after.
fn ask_glibc(caller: &mut Caller<'_>, scratch: u64) -> Result<MallocStats, StatsError> {
    let (alloc, mem) = (caller.alloc, caller.mem);
    let info_addr = scratch;
    caller.call(("mallinfo2", alloc.mallinfo2), &[info_addr])?;
    let mut raw = [0u8; MALLINFO2_FIELDS * 8];
    if !mem.read(info_addr, &mut raw) {
        return Err(StatsError::Read("mallinfo2"));
    }
    let f = |i: usize| u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    // struct mallinfo2: arena, ordblks, smblks, hblks, hblkhd, usmblks, fsmblks, uordblks,
    // fordblks, keepcost.
    let mut stats = MallocStats {
        pid: caller.pid,
        arena_bytes: f(0),
        mmapped_chunks: f(3),
        mmapped_bytes: f(4),
        fastbin_bytes: f(6),
        in_use_bytes: f(7),
        free_bytes: f(8),
        top_bytes: f(9),
        ..MallocStats::default()
    };

    if let (Some(info), Some(open), Some(close)) =
        (alloc.malloc_info, alloc.open_memstream, alloc.fclose)
    {
        // open_memstream(&buf, &size); malloc_info(0, fp); fclose(fp); read buf; free(buf).
        let (buf_slot, size_slot) = (scratch + 96, scratch + 104);
        let fp = caller.call(("open_memstream", open), &[buf_slot, size_slot])?;
        if fp != 0 {
            caller.call(("malloc_info", info), &[0, fp])?;
            caller.call(("fclose", close), &[fp])?;
            let buf = mem.read_u64(buf_slot).unwrap_or(0);
            let size = mem.read_u64(size_slot).unwrap_or(0).min(64 << 20);
            if buf != 0 {
                let mut xml = vec![0u8; size as usize];
                let ok = mem.read(buf, &mut xml);
                caller.call(("free", alloc.free), &[buf])?;
                if ok {
                    stats.per_arena = parse_malloc_info(&String::from_utf8_lossy(&xml));
                }
            }
        }
    }
    Ok(stats)
}

fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The value of `name="..."` in one XML element.
fn attr(element: &str, name: &str) -> Option<u64> {
    let key = format!("{name}=\"");
    let at = element.find(&key)? + key.len();
    element[at..].split('"').next()?.parse().ok()
}

/// Per-arena figures from malloc_info()'s XML. Each `<heap>` lists its free chunks by size
/// (`<size>` and `<unsorted>`, fastbins first, `total` bytes each), then `<total type="fast">`
/// and `<total type="rest">`, whose size is the bins plus the top chunk: the top chunk is what
/// `rest` has beyond the bins.
pub fn parse_malloc_info(xml: &str) -> Vec<Arena> {
    let mut arenas = Vec::new();
    for heap in xml.split("<heap nr=\"").skip(1) {
        let heap = heap.split("</heap>").next().unwrap_or(heap);
        let index = heap
            .split('"')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(arenas.len() as u32);
        let elements: Vec<&str> = heap.split('<').collect();
        let sized: u64 = elements
            .iter()
            .filter(|e| e.starts_with("size ") || e.starts_with("unsorted "))
            .filter_map(|e| attr(e, "total"))
            .sum();
        let total = |kind: &str| {
            elements
                .iter()
                .find(|e| e.starts_with("total ") && e.contains(&format!("type=\"{kind}\"")))
                .and_then(|e| attr(e, "size"))
                .unwrap_or(0)
        };
        let (fast, rest) = (total("fast"), total("rest"));
        let system = elements
            .iter()
            .find(|e| e.starts_with("system ") && e.contains("type=\"current\""))
            .and_then(|e| attr(e, "size"))
            .unwrap_or(0);
        // The fastbin <size> entries are part of `sized` and of `fast`, not of `rest`.
        let bins = sized.saturating_sub(fast);
        arenas.push(Arena {
            index,
            system_bytes: system,
            fastbin_bytes: fast,
            bin_bytes: bins.min(rest),
            top_bytes: rest.saturating_sub(bins),
        });
    }
    arenas
}

fn size(bytes: u64) -> String {
    let mib = bytes as f64 / (1024.0 * 1024.0);
    if mib >= 1.0 {
        format!("{mib:.1} MiB ({bytes} B)")
    } else {
        format!("{:.1} KiB ({bytes} B)", bytes as f64 / 1024.0)
    }
}

/// The text form: what glibc holds, and what that means next to RSS.
pub fn write_text(
    stats: &MallocStats,
    command: &str,
    out: &mut dyn std::io::Write,
) -> std::io::Result<()> {
    writeln!(
        out,
        "pid {} ({command}): glibc malloc, {} arenas",
        stats.pid, stats.arenas
    )?;
    writeln!(out, "in use:         {}", size(stats.in_use_bytes))?;
    writeln!(
        out,
        "free, retained: {}: fastbins {}, bins {}, top chunks {}",
        size(stats.free_bytes),
        size(stats.fastbin_bytes),
        size(stats.bin_bytes),
        size(stats.top_bytes)
    )?;
    writeln!(
        out,
        "mmapped:        {} in {} chunks",
        size(stats.mmapped_bytes),
        stats.mmapped_chunks
    )?;
    writeln!(
        out,
        "from the system: {} (arenas) + {} (mmapped)",
        size(stats.arena_bytes),
        size(stats.mmapped_bytes)
    )?;
    writeln!(out, "RSS:            {}", size(stats.rss_bytes))?;
    let mib = stats.retained_in_rss() as f64 / (1024.0 * 1024.0);
    writeln!(
        out,
        "=> {mib:.1} MiB of RSS is free memory glibc keeps; MALLOC_ARENA_MAX or malloc_trim would return it."
    )?;
    if !stats.per_arena.is_empty() {
        writeln!(out, "\nper arena:")?;
        for a in &stats.per_arena {
            writeln!(
                out,
                "  #{:<3} system {:>12}  fastbins {:>10}  bins {:>12}  top {:>12}",
                a.index, a.system_bytes, a.fastbin_bytes, a.bin_bytes, a.top_bytes
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = r#"<malloc version="1">
<heap nr="0">
<sizes>
  <size from="17" to="32" total="64" count="2"/>
  <size from="1041" to="1041" total="1041" count="1"/>
  <unsorted from="2000" to="2000" total="2000" count="1"/>
</sizes>
<total type="fast" count="2" size="64"/>
<total type="rest" count="3" size="13041"/>
<system type="current" size="135168"/>
<system type="max" size="135168"/>
<aspace type="total" size="135168"/>
<aspace type="mprotect" size="135168"/>
</heap>
<heap nr="1">
<sizes>
</sizes>
<total type="fast" count="0" size="0"/>
<total type="rest" count="1" size="5000"/>
<system type="current" size="200000"/>
<system type="max" size="200000"/>
</heap>
<total type="fast" count="2" size="64"/>
</malloc>
"#;

    #[test]
    fn malloc_info_per_arena_with_the_top_chunk_separated() {
        let arenas = parse_malloc_info(XML);
        assert_eq!(
            arenas,
            vec![
                Arena {
                    index: 0,
                    system_bytes: 135168,
                    fastbin_bytes: 64,
                    bin_bytes: 3041,
                    top_bytes: 10000
                },
                Arena {
                    index: 1,
                    system_bytes: 200000,
                    fastbin_bytes: 0,
                    bin_bytes: 0,
                    top_bytes: 5000
                },
            ]
        );
    }

    #[test]
    fn mallinfo2_loop_shows_main_arena_and_next() {
        // glibc 2.36 mallinfo2: lea 0x139ea9(%rip),%r12 ... mov 0x870(%rbx),%rbx
        let mut code = vec![0x4c, 0x8d, 0x25, 0xa9, 0x9e, 0x13, 0x00];
        code.extend([0x48, 0x8b, 0x9b, 0x70, 0x08, 0x00, 0x00]);
        assert_eq!(
            arenas_from_mallinfo2(&code, 0x99db0),
            Some((0x1d3c60, 0x870))
        );
    }

    #[test]
    fn rss_line_never_claims_more_than_rss() {
        let s = MallocStats {
            free_bytes: 90 << 20,
            rss_bytes: 50 << 20,
            ..MallocStats::default()
        };
        assert_eq!(s.retained_in_rss(), 50 << 20);
        let mut out = Vec::new();
        write_text(&s, "x", &mut out).unwrap();
        assert!(
            String::from_utf8(out)
                .unwrap()
                .contains("=> 50.0 MiB of RSS is free memory glibc keeps")
        );
    }
}
