//! Putting the in-process sampler into a live process and taking it out again: every thread
//! stopped with ptrace, the sampler mapped from a memfd by system calls run in one stopped
//! thread, the allocator entries redirected to its hooks, then every thread let go.
//!
//! Order of an install, chosen so that the target survives the tracer dying (SIGKILL) at any
//! point: a seized thread is released by the kernel when its tracer dies and goes on with the
//! signal it was stopped with.
//! 1. All planning is pure and done before a thread is stopped (entry plans from libc's file,
//!    glibc's internal code ranges from its symbols).
//! 2. Every thread is seized and interrupted, /proc/PID/task re-listed until no new thread
//!    appears. No thread's pc (nor a word of the top of its stack, where a signal frame keeps
//!    an interrupted pc) may lie strictly inside bytes about to be patched; if one does, the
//!    threads run a little and the stop is tried again.
//! 3. The live bytes of every entry must equal libc's file (or, for a sampler of ours left
//!    behind, our own patch to it). Nothing has been written yet when this refuses.
//! 4. A region within ±2 GiB of libc is reserved, readable and executable (the sampler's
//!    PT_LOAD segments at one base, then one page of trampolines, whose tail holds the system
//!    call stub of [`super::stub`]); a memfd named [`MEMFD_NAME`] is made in the target, filled
//!    by the tracer through /proc/PID/fd, and its segments mapped `MAP_PRIVATE|MAP_FIXED`.
//!    Unreferenced memory: dying here leaks it (and the memfd's descriptor, until its close),
//!    nothing else.
//! 5. The control block (inert) and the trampolines are written; then each entry's patch is
//!    written whole, with every thread stopped, so no thread ever runs half a jump. A patched
//!    entry leads to a hook that, inert, calls the trampoline: dying between two patches
//!    leaves a working allocator.
//! 6. `active = 1` last (for a recording, once its probes are on the sites:
//!    [`Injected::start`]), then every thread is detached. Dying after that leaves the sampler
//!    sampling into probe sites without probes: counting, calling the real allocator.
//!
//! System calls run in one stopped thread, whose registers are the call's meanwhile. They run
//! through a stub: until the region exists, a bootstrap stub written into the tail of libc's
//! executable mapping (past its code segment's last byte, where nothing runs; its bytes are put
//! back once the region's stub takes over), then the stub in the region's trampoline page
//! (also for a reused sampler, and for the ring's three calls). A tracer killed at any moment
//! of one leaves the thread to finish the call, put its own registers back and go on where it
//! was, restarting a system call it was stopped in as the kernel would have (see
//! [`super::stub`]). Every stop the thread is held in delivers nothing of ours if the tracer
//! dies there.
//!
//! The windows that are not safe: a libc whose executable mapping has no room left after its
//! code (the first calls then run through libc's own `syscall` instruction), and a call in a
//! thread whose interrupted system call was not made by a `syscall` instruction (`int 0x80`):
//! a tracer killed while one of those runs leaves the thread running with the call's
//! registers. A tracer killed during the bootstrap leaves the stub's bytes in libc's code
//! tail (run by nothing) and, once the `mmap` is done, an empty region. A signal
//! that arrives for the thread during a call, or that it was stopped with, is held by the
//! tracer and sent again when the call ends: a tracer killed in between loses it, and a thread
//! that had a signal to take when the tracer died mid-call restarts its interrupted system
//! call after the handler where the kernel might have failed it with EINTR.
//!
//! The control block is mapped `MAP_PRIVATE` like the rest: the memfd keeps the pristine image
//! (what uprobes attach to, and what a reuse compares against), and the tracer reads the live
//! block through /proc/PID/mem, which costs a system call per read but needs no descriptor
//! kept in the tracer and no zero-fill written into the file.
//!
//! Removal restores the original bytes with every thread stopped and leaves the sampler mapped
//! and inert: a thread may be inside a hook or a trampoline at that moment, and returns through
//! it (a trampoline jumps back to the original code after the displaced bytes, which are the
//! same bytes as before).

use std::{
    ffi::CString,
    fs::OpenOptions,
    io::Write as _,
    mem::offset_of,
    path::Path,
    time::{Duration, Instant},
};

use iced_x86::{Code, Decoder, DecoderOptions};
use nix::{errno::Errno, sys::ptrace::Options};
use object::{Object as _, ObjectSegment as _, ObjectSymbol as _, SymbolKind};
use tracer_common::sampler::{
    BUCKETS, CodeRange, Control, Countdown, HOOKS, Hook, MAGIC, RANGES, SET_CAPACITY, SLOTS,
    VERSION, counter,
};

use super::{
    entry::{self, EntryError, Jump, Plan},
    image::{ImageError, PAGE, SamplerImage},
    ring::{self, SharedRing},
    sampler,
    stub::{self, STUB_LEN, STUB_OFFSET, Stub},
};
use crate::{
    probe::{
        libc as libc_file,
        ptrace::sys::{self, Mem},
    },
    symbolize::maps::ProcMaps,
};

/// The memfd's name: /proc/PID/maps shows the sampler as `/memfd:tracer-sampler (deleted)`.
pub const MEMFD_NAME: &str = "tracer-sampler";
/// How /proc/PID/maps names the ring's memfd.
const RING_MAPS_PATH: &str = "/memfd:tracer-ring";
const MAPS_PATH: &str = "/memfd:tracer-sampler";
const MAP_FIXED_NOREPLACE: u64 = 0x10_0000;
const MFD_CLOEXEC: u64 = 1;
/// Bytes per trampoline in the trampoline page.
const TRAMPOLINE_SLOT: u64 = 64;
const _: () = assert!(TRAMPOLINE_SLOT * HOOKS as u64 <= STUB_OFFSET);
/// Stops tried before a thread inside bytes to patch refuses the install or removal.
const TRIES: u32 = 20;
/// Bytes above a thread's stack pointer searched for a signal frame's interrupted pc.
const STACK_SCAN: usize = 32 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("pid {pid}: {step}: the process is gone")]
    Gone { pid: i32, step: &'static str },
    #[error("pid {pid}: seize thread {tid}")]
    Seize {
        pid: i32,
        tid: i32,
        #[source]
        source: Errno,
    },
    #[error("pid {pid}: {step}: ptrace on thread {tid}")]
    Ptrace {
        pid: i32,
        step: &'static str,
        tid: i32,
        #[source]
        source: Errno,
    },
    #[error("pid {pid}: {step}: refused: {message}")]
    Refused {
        pid: i32,
        step: &'static str,
        message: String,
    },
    #[error("pid {pid}: {step}: run a system call in the target")]
    Syscall {
        pid: i32,
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {pid}: {step}: the system call failed in the target")]
    SyscallFailed {
        pid: i32,
        step: &'static str,
        #[source]
        source: Errno,
    },
    #[error("pid {pid}: {step} at {addr:#x}")]
    Mem {
        pid: i32,
        step: &'static str,
        addr: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {pid}: plan the redirect of {function}")]
    Plan {
        pid: i32,
        function: String,
        #[source]
        source: EntryError,
    },
    #[error("pid {pid}: read the target's libc")]
    Libc {
        pid: i32,
        #[source]
        source: libc_file::LibcError,
    },
    #[error("pid {pid}: the embedded sampler")]
    Image {
        pid: i32,
        #[source]
        source: ImageError,
    },
    #[error("pid {pid}: write the sampler into the target's memfd")]
    Memfd {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {pid}: share the sampler's ring with the tracer")]
    Ring {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "pid {pid}: {step}: thread {tid} stood inside the bytes to patch ({what}) at each of {TRIES} stops"
    )]
    Busy {
        pid: i32,
        step: &'static str,
        tid: i32,
        what: String,
    },
}

/// What an install chose and found, for messages and tests.
#[derive(Clone, Debug, Default)]
pub struct InstallReport {
    /// A sampler of ours was already mapped and was reused.
    pub reused: bool,
    /// Threads stopped (at the last, successful stop).
    pub threads: usize,
    /// Stops that found a thread inside bytes to patch and were retried.
    pub retries: u32,
    /// glibc's own allocator code, as given to the sampler.
    pub internal: Vec<CodeRange>,
    /// Internal functions the symbols did not have (no debug file): calls from them are
    /// counted and sampled like the program's own.
    pub missing_internal: Vec<String>,
    /// The whole install, planning included.
    pub elapsed: Duration,
    /// How long the target's threads were held stopped by the last, successful stop.
    pub stopped: Duration,
}

/// One redirected entry.
#[derive(Clone, Debug)]
pub struct Patched {
    pub function: String,
    pub start: u64,
    pub original: Vec<u8>,
    pub patch: Vec<u8>,
}

/// The sampler, mapped and sampling in process `pid`.
#[derive(Debug)]
pub struct Injected {
    pid: i32,
    base: u64,
    image: SamplerImage,
    trampolines: u64,
    patched: Vec<Patched>,
    /// Taken over from another build of the tracer: its control block is not ours to write,
    /// only the entries are given back.
    foreign: bool,
    pub report: InstallReport,
}

/// A sampler of ours found mapped in a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leftover {
    pub base: u64,
    /// The control block's address.
    pub control: u64,
    pub active: u64,
    pub mean: u64,
    /// Whether its code is byte for byte this build's (else it can only be left alone).
    pub same_build: bool,
}

// ---------------------------------------------------------------------------------------------
// Stopping threads

#[derive(Clone, Copy, Debug)]
struct Stopped {
    tid: i32,
    /// Signal to deliver on detach (the stop was a signal-delivery-stop).
    sig: i32,
}

/// Every thread of a process, stopped under ptrace; released (detached, each with the signal
/// it was stopped with) on drop.
struct Threads {
    pid: i32,
    stopped: Vec<Stopped>,
}

fn list_tasks(pid: i32, step: &'static str) -> Result<Vec<i32>, InjectError> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|_| InjectError::Gone { pid, step })?;
    Ok(dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect())
}

/// Whether a task is a zombie (a thread group leader that exited before its threads): it
/// never stops, and runs no code.
fn is_zombie(pid: i32, tid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1;
            after
                .split_whitespace()
                .next()
                .map(|st| st == "Z" || st == "X")
        })
        .unwrap_or(false)
}

impl Threads {
    fn stop(pid: i32, step: &'static str) -> Result<Threads, InjectError> {
        let mut threads = Threads {
            pid,
            stopped: Vec::new(),
        };
        let mut skipped: Vec<i32> = Vec::new();
        loop {
            let new: Vec<i32> = list_tasks(pid, step)?
                .into_iter()
                .filter(|t| !threads.stopped.iter().any(|s| s.tid == *t) && !skipped.contains(t))
                .collect();
            if new.is_empty() {
                if threads.stopped.is_empty() {
                    return Err(InjectError::Gone { pid, step });
                }
                return Ok(threads);
            }
            let mut seized = Vec::new();
            for tid in new {
                if is_zombie(pid, tid) {
                    skipped.push(tid);
                    continue;
                }
                match sys::seize(tid, Options::empty()) {
                    Ok(()) => {}
                    Err(Errno::ESRCH) => continue,
                    Err(source) => return Err(InjectError::Seize { pid, tid, source }),
                }
                let _ = sys::interrupt(tid);
                seized.push(tid);
            }
            // A thread created meanwhile shows in the next listing; the loop ends once a
            // listing has nothing new, when every thread that could create one is stopped.
            for tid in seized {
                loop {
                    match sys::wait(tid, false) {
                        Ok(Some((_, sys::Stop::Exited(_) | sys::Stop::Killed(_)))) => break,
                        Ok(Some((_, sys::Stop::Signal(sig)))) => {
                            threads.stopped.push(Stopped { tid, sig });
                            break;
                        }
                        Ok(Some((_, sys::Stop::Event(..)))) => {
                            threads.stopped.push(Stopped { tid, sig: 0 });
                            break;
                        }
                        Ok(None) | Err(Errno::EINTR) => continue,
                        Err(Errno::ECHILD) => break,
                        Err(source) => {
                            return Err(InjectError::Ptrace {
                                pid,
                                step,
                                tid,
                                source,
                            });
                        }
                    }
                }
            }
        }
    }

    /// A thread to run system calls in: one stopped without a signal to deliver, if any.
    fn worker(&self) -> Stopped {
        *self
            .stopped
            .iter()
            .find(|s| s.sig == 0)
            .unwrap_or(&self.stopped[0])
    }

    fn release(&mut self) {
        for s in self.stopped.drain(..) {
            let _ = sys::detach(s.tid, s.sig);
        }
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.release();
    }
}

/// A thread standing where rewriting `ranges` (start, len) would hurt it: its pc strictly
/// inside one, or a word of the top of its stack pointing strictly inside one (a signal frame
/// that interrupted it there; a return address never does, as no displaced instruction is a
/// call). Returns the thread and what was found.
fn thread_inside(
    threads: &Threads,
    mem: &Mem,
    ranges: &[(u64, usize)],
) -> Result<Option<(i32, String)>, InjectError> {
    let inside = |a: u64| {
        ranges
            .iter()
            .any(|&(start, len)| a > start && a < start + len as u64)
    };
    let mut stack = vec![0u8; STACK_SCAN];
    for s in &threads.stopped {
        let regs = sys::getregs(s.tid).map_err(|source| InjectError::Ptrace {
            pid: threads.pid,
            step: "read a thread's registers",
            tid: s.tid,
            source,
        })?;
        if inside(regs.rip) {
            return Ok(Some((s.tid, format!("pc {:#x}", regs.rip))));
        }
        let n = mem.read_some(regs.rsp, &mut stack);
        for w in stack[..n & !7].chunks_exact(8) {
            let word = u64::from_le_bytes(w.try_into().expect("8 bytes"));
            if inside(word) {
                return Ok(Some((s.tid, format!("a saved pc {word:#x} on its stack"))));
            }
        }
    }
    Ok(None)
}

/// Stops every thread, retrying while one stands inside `ranges`.
fn stop_clear_of(
    pid: i32,
    mem: &Mem,
    ranges: &[(u64, usize)],
    step: &'static str,
) -> Result<(Threads, u32), InjectError> {
    let mut last = None;
    for attempt in 0..TRIES {
        let mut threads = Threads::stop(pid, step)?;
        match thread_inside(&threads, mem, ranges)? {
            None => return Ok((threads, attempt)),
            Some(found) => {
                threads.release();
                last = Some(found);
                std::thread::sleep(Duration::from_millis(1 + attempt as u64));
            }
        }
    }
    let (tid, what) = last.expect("TRIES > 0");
    Err(InjectError::Busy {
        pid,
        step,
        tid,
        what,
    })
}

// ---------------------------------------------------------------------------------------------
// The target's libc

/// The C library as the target maps it.
struct TargetLibc {
    path: String,
    /// (start, end) of all its mappings.
    span: (u64, u64),
    /// PT_LOAD (vaddr, file offset, file size).
    segments: Vec<(u64, u64, u64)>,
    /// Its mappings: (start, end, file offset).
    maps: Vec<(u64, u64, u64)>,
    /// A `syscall` instruction in it.
    syscall_insn: u64,
    /// Where the bootstrap stub can go: the tail of libc's executable mapping past the end of
    /// its code segment's bytes, which nothing runs or reads there (see [`boot_stub`]).
    code_tail: Option<u64>,
}

impl TargetLibc {
    fn find(pid: i32, maps: &ProcMaps) -> Result<TargetLibc, InjectError> {
        let refuse = |message: String| InjectError::Refused {
            pid,
            step: "find libc",
            message,
        };
        let path = libc_file::find_libc(maps)
            .ok_or_else(|| refuse("it maps no C library (a static binary?)".into()))?;
        let data = std::fs::read(&path).map_err(|e| refuse(format!("read {path}: {e}")))?;
        let file = object::File::parse(&*data).map_err(|e| refuse(format!("parse {path}: {e}")))?;
        let segments: Vec<(u64, u64, u64)> = file
            .segments()
            .map(|s| {
                let (offset, size) = s.file_range();
                (s.address(), offset, size)
            })
            .collect();
        let own: Vec<_> = maps
            .mappings()
            .iter()
            .filter(|m| m.path.as_deref() == Some(path.as_str()))
            .collect();
        let span = (
            own.iter().map(|m| m.start).min().unwrap_or(0),
            own.iter().map(|m| m.end).max().unwrap_or(0),
        );
        let code_tail = own
            .iter()
            .filter(|m| m.perms.contains('x'))
            .find_map(|m| code_tail(&segments, m.start, m.end, m.offset));
        let mut libc = TargetLibc {
            maps: own.iter().map(|m| (m.start, m.end, m.offset)).collect(),
            path,
            span,
            segments,
            syscall_insn: 0,
            code_tail,
        };
        let functions = libc_file::functions(Path::new(&libc.path), &["syscall"], &[])
            .map_err(|source| InjectError::Libc { pid, source })?;
        let sc = &functions["syscall"];
        let at = libc
            .at_offset(sc.file_offset)
            .ok_or_else(|| refuse("libc's syscall() is not mapped".into()))?;
        libc.syscall_insn = Decoder::with_ip(64, &sc.prologue, at, DecoderOptions::NONE)
            .iter()
            .find(|i| i.code() == Code::Syscall)
            .map(|i| i.ip())
            .ok_or_else(|| refuse("no syscall instruction in libc's syscall()".into()))?;
        Ok(libc)
    }

    fn at_offset(&self, file_offset: u64) -> Option<u64> {
        self.maps.iter().find_map(|&(start, end, offset)| {
            let within = file_offset.checked_sub(offset)?;
            (within < end - start).then_some(start + within)
        })
    }

    /// The address in the target of the file's virtual address `vaddr`.
    fn address(&self, vaddr: u64) -> Option<u64> {
        let offset = self.segments.iter().find_map(|&(va, off, size)| {
            let within = vaddr.checked_sub(va)?;
            (within < size).then_some(off + within)
        })?;
        self.at_offset(offset)
    }
}

/// Where the bootstrap stub fits in the executable mapping `start..end` at file `offset`: past
/// the last byte of the PT_LOAD segment (`segments`: vaddr, file offset, file size) it maps,
/// when [`BOOT_LEN`] bytes remain before the mapping ends. Those bytes are the segment's page
/// padding (or the next segment's first bytes, which the program reads through that
/// segment's own mapping): mapped executable, never run.
fn code_tail(segments: &[(u64, u64, u64)], start: u64, end: u64, offset: u64) -> Option<u64> {
    let (_, seg_off, seg_size) = segments
        .iter()
        .find(|&&(_, off, size)| off <= offset && offset < off + size)?;
    let past = start + (seg_off + seg_size - offset);
    let at = past.next_multiple_of(16);
    (at + BOOT_LEN as u64 <= end).then_some(at)
}

/// Bytes the bootstrap stub and its context block take.
const BOOT_LEN: usize = STUB_LEN.next_multiple_of(8) + 8 * stub::CONTEXT_WORDS;

/// The bootstrap stub at `at` (see [`code_tail`]): the stub's code, its context block after it.
fn boot_stub(at: u64) -> Stub {
    Stub {
        code: at,
        context: at + STUB_LEN.next_multiple_of(8) as u64,
    }
}

/// One entry to patch, planned against libc's file at its address in the target.
struct EntryPlan {
    plan: Plan,
    /// The hook its jump leads to.
    hook: Hook,
}

/// Plans every hooked entry: `(entries to patch, per hook the index of its entry)`. A function
/// another hook already covers (aligned_alloc is memalign in glibc 2.36) is patched once,
/// with the first hook's jump.
fn plan_entries(
    pid: i32,
    libc: &TargetLibc,
) -> Result<(Vec<EntryPlan>, [Option<usize>; HOOKS]), InjectError> {
    let mut plans: Vec<EntryPlan> = Vec::new();
    let mut of_hook = [None; HOOKS];
    let library = entry::Library::open(Path::new(&libc.path)).map_err(|source| InjectError::Plan {
        pid,
        function: "malloc".into(),
        source,
    })?;
    for hook in Hook::ALL {
        let name = hook.libc_name();
        let f = match library.function(name) {
            Ok(f) => f,
            Err(EntryError::NoSymbol { .. })
                if !libc_file::REQUIRED.contains(&name) && hook != Hook::Free =>
            {
                continue;
            }
            Err(source) => {
                return Err(InjectError::Plan {
                    pid,
                    function: name.into(),
                    source,
                });
            }
        };
        let at = libc
            .address(f.address)
            .ok_or_else(|| InjectError::Refused {
                pid,
                step: "plan the entries",
                message: format!("{name} at file address {:#x} is not mapped", f.address),
            })?;
        if let Some(i) = plans.iter().position(|p| p.plan.start == at) {
            of_hook[hook as usize] = Some(i);
            continue;
        }
        let plan = entry::plan(&f.at(at), Jump::Rel32).map_err(|source| InjectError::Plan {
            pid,
            function: name.into(),
            source,
        })?;
        of_hook[hook as usize] = Some(plans.len());
        plans.push(EntryPlan { plan, hook });
    }
    Ok((plans, of_hook))
}

/// Functions of glibc's malloc.c that call the public allocator entries (directly, not by a
/// tail jump, whose return lands in the hook that called it): a call from them is glibc
/// calling itself. By the names `.symtab` gives them; a name with a `.` suffix
/// (`_mid_memalign.constprop.0`) matches its base.
const INTERNAL: &[&[&str]] = &[
    &["__libc_malloc", "malloc"],
    &["__libc_free", "free"],
    &["__libc_realloc", "realloc"],
    &["__libc_calloc", "calloc"],
    &["__libc_memalign", "memalign"],
    &["__libc_valloc", "valloc"],
    &["__libc_pvalloc", "pvalloc"],
    &["__posix_memalign", "posix_memalign"],
    &["__libc_reallocarray", "reallocarray"],
    // memalign, valloc, pvalloc and posix_memalign's common part; it calls malloc.
    &["_mid_memalign"],
    // A thread's exit frees its tcache through free.
    &["__malloc_arena_thread_freeres"],
];

/// glibc's allocator code as at most [`RANGES`] ranges of the target's addresses: the
/// functions of [`INTERNAL`], neighbours merged when no other function lies between them.
/// Returns the ranges and the names that were not found.
fn internal_ranges(libc: &TargetLibc) -> (Vec<CodeRange>, Vec<String>) {
    let Ok(data) = std::fs::read(&libc.path) else {
        return (Vec::new(), vec!["(libc unreadable)".into()]);
    };
    let Ok(file) = object::File::parse(&*data) else {
        return (Vec::new(), vec!["(libc unparsable)".into()]);
    };
    let debug_data = if file.symbols().next().is_none() {
        entry::debug_file(&file).and_then(|p| std::fs::read(p).ok())
    } else {
        None
    };
    let debug = debug_data
        .as_deref()
        .and_then(|d| object::File::parse(d).ok());
    // Sized functions: (name, vaddr, size).
    let mut functions: Vec<(String, u64, u64)> = Vec::new();
    let mut collect = |f: &object::File| {
        for s in f.dynamic_symbols().chain(f.symbols()) {
            if s.kind() == SymbolKind::Text
                && s.size() > 0
                && let Ok(name) = s.name()
            {
                functions.push((name.to_owned(), s.address(), s.size()));
            }
        }
    };
    collect(&file);
    if let Some(d) = &debug {
        collect(d);
    }
    let base_name = |n: &str| n.split(['.', '@']).next().unwrap_or(n).to_owned();
    let mut wanted: Vec<(u64, u64)> = Vec::new();
    let mut missing = Vec::new();
    for names in INTERNAL {
        let found = functions
            .iter()
            .find(|(n, _, _)| names.contains(&base_name(n).as_str()));
        match found {
            Some(&(_, addr, size)) => {
                if !wanted.contains(&(addr, addr + size)) {
                    wanted.push((addr, addr + size));
                }
            }
            None => missing.push(names[0].to_owned()),
        }
    }
    wanted.sort_unstable();
    let others: Vec<u64> = functions
        .iter()
        .map(|f| f.1)
        .filter(|a| !wanted.iter().any(|w| w.0 == *a))
        .collect();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (start, end) in wanted {
        if let Some(last) = merged.last_mut()
            && !others.iter().any(|&a| a >= last.1 && a < start)
        {
            last.1 = last.1.max(end);
            continue;
        }
        merged.push((start, end));
    }
    // Too many pieces: join the closest neighbours (covering a little more of malloc.c).
    while merged.len() > RANGES {
        let i = (0..merged.len() - 1)
            .min_by_key(|&i| merged[i + 1].0 - merged[i].1)
            .expect("two or more");
        merged[i].1 = merged[i + 1].1;
        merged.remove(i + 1);
    }
    let ranges = merged
        .into_iter()
        .filter_map(|(s, e)| {
            let start = libc.address(s)?;
            Some(CodeRange {
                start,
                end: start + (e - s),
            })
        })
        .collect();
    (ranges, missing)
}

// ---------------------------------------------------------------------------------------------
// Placing the region

// ---------------------------------------------------------------------------------------------
// A session: threads stopped, system calls and memory

struct Session {
    pid: i32,
    mem: Mem,
    threads: Threads,
    syscall_insn: u64,
    /// Where system calls run once the region exists.
    stub: Option<Stub>,
}

impl Session {
    /// Runs a system call in the worker thread: through our stub once the region exists
    /// (see [`stub`]), else through libc's `syscall` instruction.
    fn syscall(&mut self, step: &'static str, nr: i64, args: [u64; 6]) -> Result<u64, InjectError> {
        let pid = self.pid;
        let worker = self.threads.worker();
        let tid = worker.tid;
        // A signal-delivery-stop's signal would be lost on the run: keep its siginfo.
        let info = (worker.sig != 0).then(|| sys::siginfo(tid).ok()).flatten();
        let failed = |e: stub::RunError| InjectError::Syscall {
            pid,
            step,
            source: std::io::Error::other(e.to_string()),
        };
        let ran = stub::run(
            &self.mem,
            tid,
            pid,
            self.syscall_insn,
            self.stub,
            nr,
            args,
            (worker.sig, info),
            step,
        )
        .map_err(failed)?;
        if let Some(s) = self.threads.stopped.iter_mut().find(|s| s.tid == tid) {
            s.sig = ran.stop_sig;
        }
        let ret = ran.result.map_err(failed)?;
        if (-4095..0).contains(&ret) {
            return Err(InjectError::SyscallFailed {
                pid,
                step,
                source: Errno::from_raw(-ret as i32),
            });
        }
        Ok(ret as u64)
    }

    /// Puts the system call stub into the trampoline page at `page` (ours, executable) and
    /// runs every later system call through it.
    fn use_stub(&mut self, page: u64) -> Result<(), InjectError> {
        self.use_stub_at(Stub::in_page(page))
    }

    fn use_stub_at(&mut self, at: Stub) -> Result<(), InjectError> {
        self.write(
            "write the system call stub",
            at.code,
            &stub::code(at.code, at.context),
        )?;
        self.stub = Some(at);
        Ok(())
    }

    fn write(&self, step: &'static str, addr: u64, bytes: &[u8]) -> Result<(), InjectError> {
        self.mem
            .write_code(addr, bytes)
            .map_err(|source| InjectError::Mem {
                pid: self.pid,
                step,
                addr,
                source,
            })
    }

    fn read(&self, step: &'static str, addr: u64, len: usize) -> Result<Vec<u8>, InjectError> {
        let mut buf = vec![0; len];
        self.mem
            .read_code(addr, &mut buf)
            .map_err(|source| InjectError::Mem {
                pid: self.pid,
                step,
                addr,
                source,
            })?;
        Ok(buf)
    }

    fn write_u64(&self, step: &'static str, addr: u64, v: u64) -> Result<(), InjectError> {
        self.write(step, addr, &v.to_le_bytes())
    }
}

fn prot(read: bool, write: bool, exec: bool) -> u64 {
    (if read { libc::PROT_READ } else { 0 }
        | if write { libc::PROT_WRITE } else { 0 }
        | if exec { libc::PROT_EXEC } else { 0 }) as u64
}

/// Maps the sampler in the target, within reach of libc: returns its base. The trampoline page
/// follows the image at `base + span`; every later system call runs through its stub.
fn map_sampler(
    s: &mut Session,
    image: &SamplerImage,
    maps: &ProcMaps,
    libc: &TargetLibc,
) -> Result<u64, InjectError> {
    // Until the region exists, system calls run through a stub in libc's code tail, whose
    // bytes are put back once the region's own stub takes over.
    let boot = match libc.code_tail {
        Some(at) => {
            let saved = s.read("read libc's code tail", at, BOOT_LEN)?;
            s.use_stub_at(boot_stub(at))?;
            Some((at, saved))
        }
        None => None,
    };
    let mapped = map_region(s, image, maps, libc);
    if let Some((at, saved)) = boot {
        if mapped.is_err() {
            s.stub = None;
        }
        s.write("put back libc's code tail", at, &saved)?;
    }
    mapped
}

/// [`map_sampler`] once system calls can run.
fn map_region(
    s: &mut Session,
    image: &SamplerImage,
    maps: &ProcMaps,
    libc: &TargetLibc,
) -> Result<u64, InjectError> {
    let pid = s.pid;
    let size = image.span + PAGE;
    let used: Vec<(u64, u64)> = maps.mappings().iter().map(|m| (m.start, m.end)).collect();
    // Executable from the start, for the stub in the trampoline page; the tracer writes it
    // through /proc/PID/mem.
    let rx = prot(true, false, true);
    let anon = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
    let mut base = None;
    for hint in sys::region_candidates(&used, libc.span, size)
        .into_iter()
        .take(64)
    {
        match s.syscall(
            "reserve the sampler's region",
            libc::SYS_mmap,
            [hint, size, rx, anon | MAP_FIXED_NOREPLACE, u64::MAX, 0],
        ) {
            Ok(got) if got == hint => {
                base = Some(got);
                break;
            }
            // A kernel without MAP_FIXED_NOREPLACE takes it as a hint: give it back.
            Ok(got) => {
                s.syscall(
                    "unmap a misplaced region",
                    libc::SYS_munmap,
                    [got, size, 0, 0, 0, 0],
                )?;
            }
            Err(InjectError::SyscallFailed {
                source: Errno::EEXIST,
                ..
            }) => {}
            Err(e) => return Err(e),
        }
    }
    let base = base.ok_or_else(|| InjectError::Refused {
        pid,
        step: "reserve the sampler's region",
        message: format!(
            "no free {} KiB within {} MiB of libc",
            size >> 10,
            sys::REACH >> 20
        ),
    })?;
    let trampolines = base + image.span;
    s.use_stub(trampolines)?;
    let name = CString::new(MEMFD_NAME).expect("no NUL");
    s.write(
        "write the memfd's name",
        trampolines,
        name.as_bytes_with_nul(),
    )?;
    let fd = s.syscall(
        "create the sampler's memfd",
        libc::SYS_memfd_create,
        [trampolines, MFD_CLOEXEC, 0, 0, 0, 0],
    )?;
    let filled = OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/fd/{fd}"))
        .and_then(|mut f| f.write_all(sampler::sampler_so()));
    if let Err(source) = filled {
        let _ = s.syscall("close the memfd", libc::SYS_close, [fd, 0, 0, 0, 0, 0]);
        return Err(InjectError::Memfd { pid, source });
    }
    let mapped = map_segments(s, image, base, fd);
    s.syscall("close the memfd", libc::SYS_close, [fd, 0, 0, 0, 0, 0])?;
    mapped?;
    s.write("clear the trampoline page", trampolines, &[0u8; 64])?;
    Ok(base)
}

/// Refuses a process under a seccomp filter for the ring: the sampler's stack copy is a
/// `process_vm_readv` of itself, which a filter may forbid, or answer by killing the process.
fn refuse_seccomp(pid: i32) -> Result<(), InjectError> {
    let step = "read the target's status";
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|_| InjectError::Gone { pid, step })?;
    let mode = status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .map(str::trim);
    if mode == Some("2") {
        return Err(InjectError::Refused {
            pid,
            step: "check the target's system call filter",
            message: "it runs under a seccomp filter, which may refuse (or kill it for) the \
                      sampler's copy of its own stack (process_vm_readv)"
                .into(),
        });
    }
    Ok(())
}

/// The ring the sampler hands sampled events to, shared with this process: one of ours left in
/// the target and read to the end, or a new memfd mapped shared in the target (3 system calls
/// run in it) and here.
fn open_ring(
    s: &mut Session,
    image: &SamplerImage,
    base: u64,
    maps: &ProcMaps,
) -> Result<SharedRing, InjectError> {
    let pid = s.pid;
    let len = ring::ring_bytes(ring::SLOTS, ring::SLOT_BYTES);
    let open = |path: &Path| OpenOptions::new().read(true).write(true).open(path);
    for m in maps
        .mappings()
        .iter()
        .filter(|m| m.offset == 0 && m.path.as_deref() == Some(RING_MAPS_PATH) && m.end - m.start == len)
    {
        let reused = open(&m.file().map_files_path(pid as u32))
            .and_then(|f| SharedRing::map(&f, len, m.start));
        if let Ok(r) = reused
            && r.reusable()
        {
            r.clear_full();
            r.beat();
            return Ok(r);
        }
    }
    let fd = s.syscall(
        "create the ring's memfd",
        libc::SYS_memfd_create,
        [base + image.ring_name, MFD_CLOEXEC, 0, 0, 0, 0],
    )?;
    let sized = open(Path::new(&format!("/proc/{pid}/fd/{fd}"))).and_then(|f| f.set_len(len).map(|()| f));
    let file = match sized {
        Ok(f) => f,
        Err(source) => {
            let _ = s.syscall("close the ring's memfd", libc::SYS_close, [fd, 0, 0, 0, 0, 0]);
            return Err(InjectError::Ring { pid, source });
        }
    };
    let shared = libc::MAP_SHARED as u64;
    let mapped = s.syscall(
        "map the ring",
        libc::SYS_mmap,
        [0, len, prot(true, true, false), shared, fd, 0],
    );
    s.syscall("close the ring's memfd", libc::SYS_close, [fd, 0, 0, 0, 0, 0])?;
    let mut ring = SharedRing::map(&file, len, mapped?).map_err(|source| InjectError::Ring { pid, source })?;
    ring.reset(ring::SLOTS, ring::SLOT_BYTES);
    ring.beat();
    Ok(ring)
}

fn map_segments(
    s: &mut Session,
    image: &SamplerImage,
    base: u64,
    fd: u64,
) -> Result<(), InjectError> {
    let mut pages: Vec<(u64, u64)> = Vec::new();
    for seg in &image.segments {
        let first = seg.vaddr & !(PAGE - 1);
        let file_end = (seg.vaddr + seg.file_size).div_ceil(PAGE) * PAGE;
        let mem_end = (seg.vaddr + seg.mem_size).div_ceil(PAGE) * PAGE;
        if pages.iter().any(|&(a, b)| first < b && a < mem_end) {
            return Err(InjectError::Refused {
                pid: s.pid,
                step: "map the sampler",
                message: format!("its segment at {:#x} shares a page with another", seg.vaddr),
            });
        }
        pages.push((first, mem_end));
        let p = prot(seg.read, seg.write, seg.exec);
        s.syscall(
            "map a sampler segment",
            libc::SYS_mmap,
            [
                base + first,
                file_end - first,
                p,
                (libc::MAP_PRIVATE | libc::MAP_FIXED) as u64,
                fd,
                seg.offset & !(PAGE - 1),
            ],
        )?;
        if seg.mem_size > seg.file_size {
            // Zero-fill after the file's bytes, as a loader does for .bss.
            let from = seg.vaddr + seg.file_size;
            let to = (seg.vaddr + seg.mem_size).min(file_end);
            s.write(
                "zero a segment's tail",
                base + from,
                &vec![0; (to - from) as usize],
            )?;
            if mem_end > file_end {
                s.syscall(
                    "map a segment's zero pages",
                    libc::SYS_mmap,
                    [
                        base + file_end,
                        mem_end - file_end,
                        p,
                        (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED) as u64,
                        u64::MAX,
                        0,
                    ],
                )?;
            }
        }
    }
    for &(offset, addend) in &image.relative {
        s.write_u64("relocate the sampler", base + offset, base + addend)?;
    }
    // Holes between segments become inaccessible, as a loader leaves them.
    pages.sort_unstable();
    let mut at = 0;
    for (start, end) in pages.iter().copied().chain([(image.span, image.span)]) {
        if start > at {
            s.syscall(
                "protect a hole in the sampler",
                libc::SYS_mprotect,
                [base + at, start - at, 0, 0, 0, 0],
            )?;
        }
        at = at.max(end);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Finding a sampler of ours

/// The base of each mapping of our memfd at file offset 0.
fn memfd_bases(maps: &ProcMaps) -> Vec<u64> {
    maps.mappings()
        .iter()
        .filter(|m| m.offset == 0 && m.path.as_deref() == Some(MAPS_PATH))
        .map(|m| m.start)
        .collect()
}

fn read_leftover(mem: &Mem, image: &SamplerImage, base: u64) -> Option<Leftover> {
    let control = base + image.control;
    let mut head = [0u8; 40];
    if !mem.read(control, &mut head) {
        return None;
    }
    let word = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().expect("8 bytes"));
    let version = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    let size = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes"));
    if word(0) != MAGIC || version != VERSION || size as usize != size_of::<Control>() {
        return None;
    }
    let same_build = image.segments.iter().filter(|s| s.exec).all(|seg| {
        let mut live = vec![0u8; seg.file_size as usize];
        mem.read(base + seg.vaddr, &mut live)
            && live[..] == sampler::sampler_so()[seg.offset as usize..][..seg.file_size as usize]
    });
    Some(Leftover {
        base,
        control,
        active: word(offset_of!(Control, active)),
        mean: word(offset_of!(Control, mean)),
        same_build,
    })
}

/// A sampler of ours mapped in process `pid` (by its memfd's name and its control block's
/// magic, version and size), if there is one; the one of this build first.
pub fn find_leftover(pid: i32) -> Result<Option<Leftover>, InjectError> {
    let step = "look for a sampler left behind";
    let image = sampler::image().map_err(|source| InjectError::Image { pid, source })?;
    let maps = ProcMaps::read(pid as u32).map_err(|_| InjectError::Gone { pid, step })?;
    let mem = Mem::open(pid).map_err(|_| InjectError::Gone { pid, step })?;
    Ok(find_in(&mem, &image, &maps))
}

fn find_in(mem: &Mem, image: &SamplerImage, maps: &ProcMaps) -> Option<Leftover> {
    let mut found: Vec<Leftover> = memfd_bases(maps)
        .into_iter()
        .filter_map(|b| read_leftover(mem, image, b))
        .collect();
    found.sort_by_key(|l| !l.same_build);
    found.into_iter().next()
}

// ---------------------------------------------------------------------------------------------
// Install and remove

fn control_field(control: u64, offset: usize) -> u64 {
    control + offset as u64
}

fn random_seed() -> u64 {
    let mut seed = [0u8; 8];
    // SAFETY: writes at most 8 bytes into the buffer.
    let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), 8, 0) };
    if n == 8 {
        u64::from_le_bytes(seed)
    } else {
        Instant::now().elapsed().as_nanos() as u64 ^ 0x9e37_79b9_7f4a_7c15
    }
}

impl Injected {
    /// Maps the sampler into process `pid` (or reuses one of ours left there), redirects the
    /// allocator's entries to it and starts it sampling every `mean_bytes` bytes on average.
    pub fn install(pid: i32, mean_bytes: u64) -> Result<Injected, InjectError> {
        Self::install_with(pid, mean_bytes, false, true).map(|(injected, _)| injected)
    }

    /// [`Self::install`], with the sampler left inert (every call goes to the real allocator)
    /// until [`Self::start`]: a recording attaches its probes to both sites first, so that no
    /// sampled block's allocation is seen without its free (which would later be counted as
    /// a missed free when the address comes back).
    pub fn install_idle(pid: i32, mean_bytes: u64) -> Result<Injected, InjectError> {
        Self::install_with(pid, mean_bytes, false, false).map(|(injected, _)| injected)
    }

    /// Starts an inert sampler sampling: one word of its control block, written while the
    /// threads run (a hook reads it once per call, and sees 0 or 1).
    pub fn start(&self) -> Result<(), InjectError> {
        let step = "start the sampler";
        let pid = self.pid;
        let mem = Mem::open(pid).map_err(|_| InjectError::Gone { pid, step })?;
        let addr = control_field(self.control(), offset_of!(Control, active));
        mem.write_code(addr, &1u64.to_le_bytes())
            .map_err(|source| InjectError::Mem { pid, step, addr, source })
    }

    /// [`Self::install`], with every sampled event also put in a ring shared with this process
    /// (the ptrace fallback: no probe sites needed). The ring is one left by an earlier attach
    /// that read it to the end, or a new one.
    pub fn install_ring(pid: i32, mean_bytes: u64) -> Result<(Injected, SharedRing), InjectError> {
        let (injected, ring) = Self::install_with(pid, mean_bytes, true, true)?;
        Ok((injected, ring.expect("asked for a ring")))
    }

    fn install_with(
        pid: i32,
        mean_bytes: u64,
        want_ring: bool,
        start: bool,
    ) -> Result<(Injected, Option<SharedRing>), InjectError> {
        let started = Instant::now();
        if want_ring {
            refuse_seccomp(pid)?;
        }
        if mean_bytes == 0 || mean_bytes > tracer_common::sampling::MAX_MEAN {
            return Err(InjectError::Refused {
                pid,
                step: "install",
                message: format!(
                    "mean {mean_bytes} is outside 1..={}",
                    tracer_common::sampling::MAX_MEAN
                ),
            });
        }
        let image = sampler::image().map_err(|source| InjectError::Image { pid, source })?;
        let step = "read the target's maps";
        let maps = ProcMaps::read(pid as u32).map_err(|_| InjectError::Gone { pid, step })?;
        let libc = TargetLibc::find(pid, &maps)?;
        let (plans, of_hook) = plan_entries(pid, &libc)?;
        let (internal, missing_internal) = internal_ranges(&libc);
        let mem = Mem::open(pid).map_err(|_| InjectError::Gone { pid, step })?;
        let mut ranges: Vec<(u64, usize)> = plans
            .iter()
            .map(|p| (p.plan.start, p.plan.displaced_len))
            .collect();
        // A sampler left behind by a tracer that died while a thread was in its stub: that
        // thread must be out of the stub before the context block is written again.
        if let Some(l) = find_in(&mem, &image, &maps).filter(|l| l.same_build) {
            ranges.push((Stub::in_page(l.base + image.span).code - 1, STUB_LEN + 1));
        }
        // The same for the bootstrap stub, written again over a thread still inside it.
        if let Some(at) = libc.code_tail {
            ranges.push((at - 1, STUB_LEN + 1));
        }

        let (threads, retries) = stop_clear_of(pid, &mem, &ranges, "stop the threads to install")?;
        let stopped_at = Instant::now();
        let mut s = Session {
            pid,
            mem,
            threads,
            syscall_insn: libc.syscall_insn,
            stub: None,
        };
        // Re-read: a thread may have mapped or unmapped before it stopped.
        let maps = ProcMaps::read(pid as u32).map_err(|_| InjectError::Gone { pid, step })?;
        let leftover = find_in(&s.mem, &image, &maps).filter(|l| l.same_build);

        // The live entries: libc's own bytes, or our patch into the sampler we reuse.
        let mut to_write = Vec::new();
        for p in &plans {
            let live = s.read(
                "read an allocator entry",
                p.plan.start,
                p.plan.displaced_len,
            )?;
            if live == p.plan.original {
                to_write.push(true);
                continue;
            }
            let ours = leftover
                .as_ref()
                .and_then(|l| p.plan.patch(l.base + image.hooks[p.hook as usize]).ok());
            if ours.as_deref() == Some(&live[..]) {
                to_write.push(false);
                continue;
            }
            return Err(InjectError::Refused {
                pid,
                step: "check the allocator entries",
                message: format!(
                    "{} at {:#x} reads {} but libc's file has {} (a uprobe, a debugger or another tool's patch)",
                    p.plan.function,
                    p.plan.start,
                    hex(&live),
                    hex(&p.plan.original)
                ),
            });
        }

        let reused = leftover.is_some();
        let base = match &leftover {
            Some(l) => {
                let tramp = l.base + image.span;
                let mapped = maps
                    .mappings()
                    .iter()
                    .any(|m| m.start <= tramp && tramp + PAGE <= m.end && m.perms.contains('x'));
                if !mapped {
                    return Err(InjectError::Refused {
                        pid,
                        step: "reuse the sampler left behind",
                        message: format!("its trampoline page at {tramp:#x} is not mapped"),
                    });
                }
                s.use_stub(tramp)?;
                l.base
            }
            None => map_sampler(&mut s, &image, &maps, &libc)?,
        };
        let control = base + image.control;
        let trampolines = base + image.span;
        let field = |offset: usize| control_field(control, offset);

        // Inert before anything changes; a reused block is emptied while inert.
        s.write_u64("stop the sampler", field(offset_of!(Control, active)), 0)?;
        if reused {
            let zero_from = offset_of!(Control, slots);
            let zero_len = size_of::<Countdown>() * SLOTS + BUCKETS + 8 * SET_CAPACITY;
            s.write(
                "clear the sampler's countdowns and set",
                field(zero_from),
                &vec![0u8; zero_len],
            )?;
        }
        s.write(
            "clear the sampler's counters",
            field(offset_of!(Control, counters)),
            &[0u8; 96],
        )?;
        s.write_u64(
            "set the sampler's slot mask",
            field(offset_of!(Control, slot_mask)),
            (SLOTS - 1) as u64,
        )?;

        // Trampolines, then the control block's pointers to them.
        let mut code_page = vec![entry::INT3; PAGE as usize];
        let mut real = [0u64; HOOKS];
        let mut entries = [0u64; HOOKS];
        for (i, p) in plans.iter().enumerate() {
            let at = trampolines + TRAMPOLINE_SLOT * i as u64;
            let code = entry::trampoline(&p.plan, at).map_err(|source| InjectError::Plan {
                pid,
                function: p.plan.function.clone(),
                source,
            })?;
            if code.len() as u64 > TRAMPOLINE_SLOT {
                return Err(InjectError::Refused {
                    pid,
                    step: "write the trampolines",
                    message: format!(
                        "{}'s trampoline takes {} bytes",
                        p.plan.function,
                        code.len()
                    ),
                });
            }
            let off = (at - trampolines) as usize;
            code_page[off..off + code.len()].copy_from_slice(&code);
        }
        for hook in Hook::ALL {
            if let Some(i) = of_hook[hook as usize] {
                real[hook as usize] = trampolines + TRAMPOLINE_SLOT * i as u64;
                entries[hook as usize] = plans[i].plan.start;
            }
        }
        // Not the stub and its context block at the end of the page.
        s.write(
            "write the trampolines",
            trampolines,
            &code_page[..STUB_OFFSET as usize],
        )?;
        let words = |a: &[u64]| a.iter().flat_map(|w| w.to_le_bytes()).collect::<Vec<u8>>();
        s.write(
            "fill the sampler's real functions",
            field(offset_of!(Control, real)),
            &words(&real),
        )?;
        s.write(
            "fill the sampler's entries",
            field(offset_of!(Control, entry)),
            &words(&entries),
        )?;
        let mut internal_words = [0u64; 2 * RANGES];
        for (i, r) in internal.iter().take(RANGES).enumerate() {
            internal_words[2 * i] = r.start;
            internal_words[2 * i + 1] = r.end;
        }
        s.write(
            "fill the sampler's internal ranges",
            field(offset_of!(Control, internal)),
            &words(&internal_words),
        )?;
        s.write_u64(
            "seed the sampler",
            field(offset_of!(Control, rng)),
            random_seed(),
        )?;
        s.write_u64(
            "set the sampler's mean",
            field(offset_of!(Control, mean)),
            mean_bytes,
        )?;

        let ring = if want_ring {
            Some(open_ring(&mut s, &image, base, &maps)?)
        } else {
            None
        };
        s.write_u64(
            "point the sampler at its ring",
            field(offset_of!(Control, ring)),
            ring.as_ref().map_or(0, SharedRing::target),
        )?;

        // The entries, each whole while every thread is stopped.
        let mut patched = Vec::new();
        for (p, write) in plans.iter().zip(to_write) {
            let hook = base + image.hooks[p.hook as usize];
            let bytes = p.plan.patch(hook).map_err(|source| InjectError::Plan {
                pid,
                function: p.plan.function.clone(),
                source,
            })?;
            if write {
                s.write("patch an allocator entry", p.plan.start, &bytes)?;
            }
            patched.push(Patched {
                function: p.plan.function.clone(),
                start: p.plan.start,
                original: p.plan.original.clone(),
                patch: bytes,
            });
        }
        if start {
            s.write_u64("start the sampler", field(offset_of!(Control, active)), 1)?;
        }
        let threads = s.threads.stopped.len();
        s.threads.release();
        let injected = Injected {
            pid,
            base,
            image,
            trampolines,
            patched,
            foreign: false,
            report: InstallReport {
                reused,
                threads,
                retries,
                internal,
                missing_internal,
                elapsed: started.elapsed(),
                stopped: stopped_at.elapsed(),
            },
        };
        Ok((injected, ring))
    }

    /// The sampler of ours left in process `pid` with the entries patched to it, taken over
    /// so that it can be removed (or read). None if there is none. An entry counts as patched
    /// when it starts with a `jmp rel32` into a mapping of a sampler's memfd, whichever build
    /// of the tracer left it: a sampler of another build (its control block laid out
    /// otherwise) is taken over only to give the entries back ([`Self::remove`] then writes
    /// nothing else), since uprobes placed over such a jump never fire.
    pub fn take_over(pid: i32) -> Result<Option<Injected>, InjectError> {
        let step = "take over a sampler left behind";
        let image = sampler::image().map_err(|source| InjectError::Image { pid, source })?;
        let maps = ProcMaps::read(pid as u32).map_err(|_| InjectError::Gone { pid, step })?;
        let bases = memfd_bases(&maps);
        let Some(&first) = bases.first() else {
            return Ok(None);
        };
        let mem = Mem::open(pid).map_err(|_| InjectError::Gone { pid, step })?;
        let ours = find_in(&mem, &image, &maps).filter(|l| l.same_build);
        let samplers: Vec<(u64, u64)> = maps
            .mappings()
            .iter()
            .filter(|m| m.path.as_deref() == Some(MAPS_PATH))
            .map(|m| (m.start, m.end))
            .collect();
        let libc = TargetLibc::find(pid, &maps)?;
        let (plans, _) = plan_entries(pid, &libc)?;
        let mut patched = Vec::new();
        for p in &plans {
            let mut live = vec![0u8; p.plan.displaced_len];
            if !mem.read(p.plan.start, &mut live) || live == p.plan.original || live.len() < 5 {
                continue;
            }
            let rel = i32::from_le_bytes(live[1..5].try_into().expect("4 bytes"));
            let target = (p.plan.start + 5).wrapping_add_signed(i64::from(rel));
            if live[0] != entry::JMP_REL32 || !samplers.iter().any(|&(s, e)| (s..e).contains(&target)) {
                continue;
            }
            patched.push(Patched {
                function: p.plan.function.clone(),
                start: p.plan.start,
                original: p.plan.original.clone(),
                patch: live,
            });
        }
        let (base, foreign) = match ours {
            Some(l) => (l.base, false),
            None => (first, true),
        };
        Ok(Some(Injected {
            pid,
            base,
            trampolines: base + image.span,
            image,
            patched,
            foreign,
            report: InstallReport {
                reused: true,
                ..InstallReport::default()
            },
        }))
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The sampler's load base in the target.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The control block's address in the target.
    pub fn control(&self) -> u64 {
        self.base + self.image.control
    }

    pub fn trampolines(&self) -> u64 {
        self.trampolines
    }

    /// The probe sites' addresses in the target (where uprobes go).
    pub fn sites(&self) -> (u64, u64) {
        (
            self.base + self.image.alloc_site,
            self.base + self.image.free_site,
        )
    }

    pub fn patched(&self) -> &[Patched] {
        &self.patched
    }

    /// The control block's [`counter`]s, read from the target.
    pub fn counters(&self) -> Result<[u64; counter::COUNT], InjectError> {
        let pid = self.pid;
        let step = "read the sampler's counters";
        let mem = Mem::open(pid).map_err(|_| InjectError::Gone { pid, step })?;
        let addr = control_field(self.control(), offset_of!(Control, counters));
        let mut buf = [0u8; 8 * counter::COUNT];
        if !mem.read(addr, &mut buf) {
            return Err(InjectError::Gone { pid, step });
        }
        let mut out = [0u64; counter::COUNT];
        for (o, w) in out.iter_mut().zip(buf.chunks_exact(8)) {
            *o = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        }
        Ok(out)
    }

    /// Stops every thread, makes the sampler inert, puts libc's bytes back at every entry and
    /// lets the threads go. The sampler stays mapped (see the module's comment).
    ///
    /// A process that has exited has nothing to give back: that is Ok.
    pub fn remove(self) -> Result<Duration, InjectError> {
        let started = Instant::now();
        match self.remove_from_live() {
            Err(InjectError::Gone { .. }) => Ok(started.elapsed()),
            other => other.map(|_| started.elapsed()),
        }
    }

    fn remove_from_live(self) -> Result<Duration, InjectError> {
        let started = Instant::now();
        let pid = self.pid;
        let step = "stop the threads to remove";
        let mem = Mem::open(pid).map_err(|_| InjectError::Gone { pid, step })?;
        let ranges: Vec<(u64, usize)> = self
            .patched
            .iter()
            .map(|p| (p.start, p.patch.len()))
            .collect();
        let (threads, _) = stop_clear_of(pid, &mem, &ranges, step)?;
        let mut s = Session {
            pid,
            mem,
            threads,
            syscall_insn: 0,
            stub: None,
        };
        if !self.foreign {
            s.write_u64(
                "stop the sampler",
                control_field(self.control(), offset_of!(Control, active)),
                0,
            )?;
            // A ring stays mapped (a thread may be filling a slot) and is no longer fed.
            s.write_u64(
                "detach the sampler's ring",
                control_field(self.control(), offset_of!(Control, ring)),
                0,
            )?;
        }
        for p in &self.patched {
            let live = s.read("read an allocator entry", p.start, p.patch.len())?;
            if live == p.original {
                continue;
            }
            if live != p.patch {
                return Err(InjectError::Refused {
                    pid,
                    step: "restore the allocator entries",
                    message: format!(
                        "{} at {:#x} reads {}, neither our patch nor libc's bytes: left as it is",
                        p.function,
                        p.start,
                        hex(&live)
                    ),
                });
            }
            s.write("restore an allocator entry", p.start, &p.original)?;
        }
        s.threads.release();
        Ok(started.elapsed())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_goes_next_to_libc_and_within_reach() {
        let libc = (0x7f00_0000_0000, 0x7f00_0020_0000);
        let used = [
            (0x7eff_ff00_0000, 0x7f00_0000_0000),
            libc,
            (0x7f00_0020_0000, 0x7f00_0040_0000),
        ];
        let c = sys::region_candidates(&used, libc, 0x10_0000);
        assert_eq!(
            c[0], 0x7f00_0040_0000,
            "right above the last mapping after libc"
        );
        assert!(c.contains(&(0x7eff_ff00_0000 - 0x10_0000)));
        for p in c {
            let far = (p + 0x10_0000).max(libc.1) - p.min(libc.0);
            assert!(far <= sys::REACH, "{p:#x} is {far:#x} from libc");
        }
    }

    #[test]
    fn bootstrap_stub_goes_past_the_code_segment_in_its_last_page() {
        // glibc 2.41 here: code at vaddr/offset 0x26000, 0x1550fc bytes; its mapping ends on
        // the page boundary 0x17c000.
        let segments = [(0, 0, 0x25388), (0x26000, 0x26000, 0x1550fc), (0x17c000, 0x17c000, 0x52c31)];
        let base = 0x7f00_0000_0000;
        let at = code_tail(&segments, base + 0x26000, base + 0x17c000, 0x26000);
        assert_eq!(at, Some(base + 0x17b100), "16-aligned, right after the last code byte");
        let stub = boot_stub(base + 0x17b100);
        assert!(stub.context >= stub.code + STUB_LEN as u64 && stub.context % 8 == 0);
        assert!(stub.context + 8 * stub::CONTEXT_WORDS as u64 <= base + 0x17c000);
        // Code that ends less than BOOT_LEN bytes before the page does: no room.
        let full = [(0x1000, 0x1000, 0x1000 - 0x20)];
        assert_eq!(code_tail(&full, base + 0x1000, base + 0x2000, 0x1000), None);
        // A mapping of no segment's bytes: none.
        assert_eq!(code_tail(&segments, base, base + 0x1000, 0x300000), None);
    }

    #[test]
    fn nothing_within_reach_gives_no_region() {
        let libc = (0x7f00_0000_0000, 0x7f00_0020_0000);
        let used = [(0x10_0000, 0x7fff_ffff_f000)];
        assert!(sys::region_candidates(&used, libc, PAGE).is_empty());
    }

    #[test]
    fn glibc_internal_ranges_cover_malloc_c_and_not_strdup() {
        let maps = ProcMaps::read(std::process::id()).expect("own maps");
        let libc = TargetLibc::find(std::process::id() as i32, &maps).expect("own libc");
        let (ranges, missing) = internal_ranges(&libc);
        assert!(!ranges.is_empty() && ranges.len() <= RANGES, "{ranges:?}");
        let inside = |a: u64| ranges.iter().any(|r| a >= r.start && a < r.end);
        for name in [
            "malloc",
            "free",
            "realloc",
            "calloc",
            "posix_memalign",
            "memalign",
        ] {
            let a = sampler::libc_function(
                *Hook::ALL
                    .iter()
                    .find(|h| h.libc_name() == name)
                    .expect("hook"),
            )
            .expect("dlsym");
            assert!(inside(a), "{name} at {a:#x} is outside {ranges:x?}");
        }
        // SAFETY: dlsym with a NUL-terminated name.
        let strdup = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"strdup".as_ptr()) } as u64;
        assert!(
            !inside(strdup),
            "strdup at {strdup:#x} is inside {ranges:x?}"
        );
        eprintln!("internal {ranges:x?}, missing {missing:?}");
    }
}
