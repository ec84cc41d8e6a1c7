//! Thin wrappers around ptrace, waitpid and a tracee's memory, shared by the ptrace backend
//! and `malloc-stats`. Signals are raw numbers here: nix's `Signal` cannot hold real-time
//! signals, which tracees do receive (glibc's own SIGCANCEL and SIGSETXID among them), and a
//! wait status it cannot convert would be lost.
use std::{
    fs::File,
    io::{IoSlice, IoSliceMut},
    os::unix::fs::FileExt as _,
};

use nix::{
    errno::Errno,
    sys::{
        ptrace,
        uio::{RemoteIoVec, process_vm_readv, process_vm_writev},
    },
    unistd::Pid,
};

pub type Regs = libc::user_regs_struct;

/// What `waitpid` reported for one task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Signal-delivery-stop: this signal is about to be delivered.
    Signal(i32),
    /// A `PTRACE_EVENT_*` stop, with the stop signal (SIGTRAP, or the signal of a group-stop).
    Event(i32, i32),
    /// Exited with this status.
    Exited(i32),
    /// Killed by this signal.
    Killed(i32),
}

fn decode(status: i32) -> Option<Stop> {
    if libc::WIFEXITED(status) {
        Some(Stop::Exited(libc::WEXITSTATUS(status)))
    } else if libc::WIFSIGNALED(status) {
        Some(Stop::Killed(libc::WTERMSIG(status)))
    } else if libc::WIFSTOPPED(status) {
        let event = (status >> 16) & 0xff;
        let sig = libc::WSTOPSIG(status);
        Some(if event != 0 {
            Stop::Event(event, sig)
        } else {
            Stop::Signal(sig)
        })
    } else {
        None
    }
}

/// `waitpid(pid, __WALL | extra)`: `Ok(None)` when WNOHANG found nothing. EINTR is returned
/// to the caller, which uses it to be woken.
pub fn wait(pid: i32, nohang: bool) -> Result<Option<(i32, Stop)>, Errno> {
    let mut status = 0;
    let flags = libc::__WALL | if nohang { libc::WNOHANG } else { 0 };
    loop {
        // SAFETY: status is a valid out pointer.
        let got = unsafe { libc::waitpid(pid, &mut status, flags) };
        if got < 0 {
            return Err(Errno::last());
        }
        if got == 0 {
            return Ok(None);
        }
        if let Some(stop) = decode(status) {
            return Ok(Some((got, stop)));
        }
        // WIFCONTINUED is not asked for; anything else undecodable is skipped.
    }
}

fn request(req: libc::c_uint, tid: i32, data: usize) -> Result<(), Errno> {
    // SAFETY: requests without memory arguments.
    let rc = unsafe { libc::ptrace(req, tid, 0usize, data) };
    if rc < 0 { Err(Errno::last()) } else { Ok(()) }
}

/// Resumes a stopped tracee, delivering `sig` (0: none).
pub fn cont(tid: i32, sig: i32) -> Result<(), Errno> {
    request(libc::PTRACE_CONT, tid, sig as usize)
}

pub fn step(tid: i32, sig: i32) -> Result<(), Errno> {
    request(libc::PTRACE_SINGLESTEP, tid, sig as usize)
}

pub fn detach(tid: i32, sig: i32) -> Result<(), Errno> {
    request(libc::PTRACE_DETACH, tid, sig as usize)
}

/// Leaves a tracee in group-stop as if it were not traced, until SIGCONT.
pub fn listen(tid: i32) -> Result<(), Errno> {
    request(libc::PTRACE_LISTEN, tid, 0)
}

pub fn interrupt(tid: i32) -> Result<(), Errno> {
    ptrace::interrupt(Pid::from_raw(tid))
}

pub fn seize(tid: i32, options: ptrace::Options) -> Result<(), Errno> {
    ptrace::seize(Pid::from_raw(tid), options)
}

pub fn getregs(tid: i32) -> Result<Regs, Errno> {
    ptrace::getregs(Pid::from_raw(tid))
}

pub fn setregs(tid: i32, regs: &Regs) -> Result<(), Errno> {
    ptrace::setregs(Pid::from_raw(tid), *regs)
}

pub fn siginfo(tid: i32) -> Result<libc::siginfo_t, Errno> {
    ptrace::getsiginfo(Pid::from_raw(tid))
}

pub fn set_siginfo(tid: i32, info: &libc::siginfo_t) -> Result<(), Errno> {
    ptrace::setsiginfo(Pid::from_raw(tid), info)
}

/// The message of the last `PTRACE_EVENT_*` stop (a new task's id, an exit status).
pub fn event_message(tid: i32) -> Result<u64, Errno> {
    ptrace::getevent(Pid::from_raw(tid)).map(|m| m as u64)
}

pub fn tgkill(tgid: i32, tid: i32, sig: i32) {
    // SAFETY: plain syscall.
    unsafe { libc::syscall(libc::SYS_tgkill, tgid, tid, sig) };
}

pub fn gettid() -> i32 {
    // SAFETY: plain syscall.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// Whether signal `sig` is pending for task `tid` itself (not for its whole thread group):
/// where the kernel queues a trap it raised.
pub fn signal_pending(tid: i32, sig: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()
        .and_then(|s| {
            let mask = s.lines().find_map(|l| l.strip_prefix("SigPnd:"))?;
            u64::from_str_radix(mask.trim(), 16).ok()
        })
        .is_some_and(|mask| mask & (1 << (sig - 1)) != 0)
}

/// `si_code` of the kernel's own traps (int3 among them).
pub const SI_KERNEL: i32 = 0x80;

/// One process's memory: data through process_vm_readv/writev, code through /proc/PID/mem,
/// whose writes go through read-only mappings the way a debugger's do.
pub struct Mem {
    pub pid: i32,
    file: File,
}

impl Mem {
    pub fn open(pid: i32) -> std::io::Result<Mem> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))?;
        Ok(Mem { pid, file })
    }

    /// Reads as much of `buf` as is mapped from `addr` on; returns the bytes read.
    pub fn read_some(&self, addr: u64, buf: &mut [u8]) -> usize {
        let remote = [RemoteIoVec {
            base: addr as usize,
            len: buf.len(),
        }];
        let mut local = [IoSliceMut::new(buf)];
        process_vm_readv(Pid::from_raw(self.pid), &mut local, &remote).unwrap_or(0)
    }

    pub fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        self.read_some(addr, buf) == buf.len()
    }

    pub fn read_u64(&self, addr: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b).then(|| u64::from_le_bytes(b))
    }

    /// Writes writable memory (a stack slot).
    pub fn write_data(&self, addr: u64, data: &[u8]) -> bool {
        let remote = [RemoteIoVec {
            base: addr as usize,
            len: data.len(),
        }];
        let local = [IoSlice::new(data)];
        process_vm_writev(Pid::from_raw(self.pid), &local, &remote) == Ok(data.len())
    }

    /// Writes any mapped memory, read-only code included (breakpoints).
    pub fn write_code(&self, addr: u64, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(data, addr)
    }

    pub fn read_code(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, addr)
    }
}

/// How a run of code inside a stopped tracee ended.
#[derive(Debug)]
pub enum Ended {
    /// `done` accepted a stop: the registers at that stop.
    Done(Regs),
    /// The code raised a fault of its own (see [`Fault`]) and was stopped there.
    Fault(Fault),
    /// The deadline passed and the caller's check allowed giving the run up where it stood.
    Abandoned,
}

/// A signal the code run in the tracee brought on itself: a fault the CPU or the kernel
/// raised for an instruction it executed (si_code > 0), or an abort() it called. Such a signal
/// is never passed on to the tracee, which was not running its own code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub sig: i32,
    pub code: i32,
    /// The faulting address (si_addr), where the signal has one.
    pub addr: u64,
    pub pc: u64,
}

/// The outcome of [`run_in`].
#[derive(Debug)]
pub struct Run {
    pub ended: Ended,
    /// Signals meant for the tracee that arrived meanwhile, in order, each with its siginfo.
    /// They were held back (the run must not be interrupted by the tracee's handlers); the
    /// caller delivers them when it lets the task go.
    pub held: Vec<(i32, libc::siginfo_t)>,
    /// The task now sits in a signal-delivery-stop, where a signal can be delivered with a
    /// siginfo of the caller's choosing (else in an event stop).
    pub signal_stop: bool,
}

/// When a run in the tracee may be given up.
pub struct Deadline<'a> {
    /// Before this, the run goes on undisturbed.
    pub at: std::time::Instant,
    /// How often, after `at`, the task is stopped and `may_abandon` asked again.
    pub every: std::time::Duration,
    /// Asked with the task stopped, from `at` on: whether the run may be given up where it
    /// stands. A run that is refused goes on.
    pub may_abandon: &'a mut dyn FnMut(&Regs) -> bool,
}

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("task {0} exited while the tracer ran code in it")]
    Exited(i32),
    #[error("ptrace on task {tid}")]
    Ptrace {
        tid: i32,
        #[source]
        source: Errno,
    },
    #[error("the code the tracer ran in task {tid} faulted (signal {}, pc {:#x})", .fault.sig, .fault.pc)]
    Fault { tid: i32, fault: Fault },
}

/// Whether signal `sig`, with `info`, stopping task `tid` of process `tgid` while it runs the
/// tracer's code, was brought on by that code.
pub(crate) fn is_own_fault(sig: i32, info: &libc::siginfo_t, tgid: i32) -> bool {
    const SI_TKILL: i32 = -6;
    let raised_by_cpu = matches!(
        sig,
        libc::SIGSEGV | libc::SIGBUS | libc::SIGILL | libc::SIGFPE | libc::SIGTRAP | libc::SIGSYS
    ) && info.si_code > 0;
    // SAFETY: si_pid is valid for SI_TKILL, which the check reads first.
    let aborted =
        sig == libc::SIGABRT && info.si_code == SI_TKILL && unsafe { info.si_pid() } == tgid;
    raised_by_cpu || aborted
}

/// Resumes stopped task `tid` with `regs` (single-stepping when `single_step` is set) and
/// waits until `done` says a stop is the end, the code faults, or `deadline` allows giving it
/// up; then puts `saved` back. Signals meant for the tracee that arrive meanwhile are held
/// back and returned. The task must be in a ptrace-stop that ignores the resume signal.
pub fn run_in(
    tid: i32,
    saved: &Regs,
    regs: &Regs,
    single_step: bool,
    mut deadline: Option<Deadline<'_>>,
    done: impl Fn(Stop, &Regs) -> bool,
) -> Result<Run, InjectError> {
    let pt = |source| InjectError::Ptrace { tid, source };
    let tgid = tid_tgid(tid);
    setregs(tid, regs).map_err(pt)?;
    let resume = |tid| {
        if single_step {
            step(tid, 0)
        } else {
            cont(tid, 0)
        }
    };
    resume(tid).map_err(pt)?;
    let mut held: Vec<(i32, libc::siginfo_t)> = Vec::new();
    let mut next_look = deadline.as_ref().map(|d| d.at);
    let mut asked_stop = false;
    let (ended, signal_stop) = loop {
        let got = match next_look {
            None => wait(tid, false),
            Some(at) => match wait(tid, true) {
                Ok(None) => {
                    if !asked_stop && std::time::Instant::now() >= at {
                        interrupt(tid).map_err(pt)?;
                        asked_stop = true;
                    }
                    std::thread::sleep(std::time::Duration::from_micros(200));
                    continue;
                }
                other => other,
            },
        };
        let (_, stop) = match got {
            Ok(Some(s)) => s,
            Ok(None) | Err(Errno::EINTR) => continue,
            Err(source) => return Err(pt(source)),
        };
        if let Stop::Exited(_) | Stop::Killed(_) = stop {
            return Err(InjectError::Exited(tid));
        }
        let now_regs = getregs(tid).map_err(pt)?;
        if done(stop, &now_regs) {
            break (Ended::Done(now_regs), matches!(stop, Stop::Signal(_)));
        }
        if let Stop::Signal(sig) = stop
            && let Ok(info) = siginfo(tid)
        {
            // A single step's own SIGTRAP is how stepping reports; any other fault ends it.
            if is_own_fault(sig, &info, tgid) && !(single_step && sig == libc::SIGTRAP) {
                // SAFETY: si_addr is defined for every fault signal (0 where it means nothing).
                let addr = unsafe { info.si_addr() } as u64;
                let fault = Fault {
                    sig,
                    code: info.si_code,
                    addr,
                    pc: now_regs.rip,
                };
                break (Ended::Fault(fault), true);
            }
            held.push((sig, info));
        }
        if let (Some(at), Some(d)) = (next_look, deadline.as_mut())
            && std::time::Instant::now() >= at
        {
            asked_stop = false;
            if (d.may_abandon)(&now_regs) {
                break (Ended::Abandoned, matches!(stop, Stop::Signal(_)));
            }
            next_look = Some(std::time::Instant::now() + d.every);
        }
        resume(tid).map_err(pt)?;
    };
    setregs(tid, saved).map_err(pt)?;
    Ok(Run {
        ended,
        held,
        signal_stop,
    })
}

/// The thread group of task `tid` (from /proc).
pub fn tid_tgid(tid: i32) -> i32 {
    std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Tgid:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(tid)
}

/// `saved` set up to run system call `nr` with `args` from a `syscall` instruction at `rip`.
pub fn syscall_regs(saved: &Regs, rip: u64, nr: i64, args: [u64; 6]) -> Regs {
    let mut regs = *saved;
    regs.rax = nr as u64;
    regs.rdi = args[0];
    regs.rsi = args[1];
    regs.rdx = args[2];
    regs.r10 = args[3];
    regs.r8 = args[4];
    regs.r9 = args[5];
    regs.rip = rip;
    // Not inside a system call: the kernel must not restart anything when it resumes.
    regs.orig_rax = u64::MAX;
    regs
}

/// Runs one system call in stopped task `tid`, through a `syscall` instruction at
/// `syscall_insn`, and restores its registers. Returns the call's result and the signal the
/// task must be resumed with.
pub fn inject_syscall(
    tid: i32,
    syscall_insn: u64,
    nr: i64,
    args: [u64; 6],
) -> Result<(i64, i32), InjectError> {
    let saved = getregs(tid).map_err(|source| InjectError::Ptrace { tid, source })?;
    let regs = syscall_regs(&saved, syscall_insn, nr, args);
    let after = syscall_insn + 2;
    let run = run_in(tid, &saved, &regs, true, None, |stop, r| {
        stop == Stop::Signal(libc::SIGTRAP) && r.rip == after
    })?;
    let done = match run.ended {
        Ended::Done(regs) => regs,
        Ended::Fault(fault) => return Err(InjectError::Fault { tid, fault }),
        Ended::Abandoned => unreachable!("no deadline, so never abandoned"),
    };
    // The task sits in the step's SIGTRAP stop: the first held signal is delivered from there
    // with its own siginfo, any others are sent again.
    let mut resume_sig = 0;
    let mut rest = run.held.into_iter();
    if let Some((sig, info)) = rest.next() {
        if set_siginfo(tid, &info).is_ok() {
            resume_sig = sig;
        } else {
            tgkill(tid_tgid(tid), tid, sig);
        }
    }
    for (sig, _) in rest {
        tgkill(tid_tgid(tid), tid, sig);
    }
    Ok((done.rax as i64, resume_sig))
}

/// Bytes per page.
const PAGE: u64 = 4096;

/// How far code placed for a process may lie from any byte of its libc: rel32 jumps and
/// RIP-relative operands reach ±2 GiB; the rest is margin.
pub const REACH: u64 = (2 << 30) - (16 << 20);

/// Region starts for `size` bytes in the gaps between the mappings `used` (start, end; any
/// order), nearest to libc's span `libc` first, such that every byte of the region and of
/// libc lie within [`REACH`] of each other: the ptrace backend's out-of-line page and the
/// in-process sampler's region. A process like node fills the space just below libc with its
/// own reservations, so a region may have to go far below, or above it.
pub fn region_candidates(used: &[(u64, u64)], libc: (u64, u64), size: u64) -> Vec<u64> {
    let (lo, hi) = libc;
    let mut used = used.to_vec();
    used.sort_unstable();
    // Never the first MiB (mmap_min_addr), never the top of the user address space.
    let floor = 1u64 << 20;
    let ceiling = 0x7fff_ffff_f000u64;
    let mut gaps = Vec::new();
    let mut at = floor;
    for &(start, end) in &used {
        if start > at {
            gaps.push((at, start));
        }
        at = at.max(end);
    }
    if ceiling > at {
        gaps.push((at, ceiling));
    }
    let mut out: Vec<(u64, u64)> = gaps
        .into_iter()
        .filter_map(|(start, end)| {
            let first = start.div_ceil(PAGE) * PAGE;
            let last = end.checked_sub(size)? & !(PAGE - 1);
            if first > last {
                return None;
            }
            let place = if last + size <= lo {
                last
            } else if first >= hi {
                first
            } else {
                return None;
            };
            let far = (place + size).max(hi) - place.min(lo);
            (far <= REACH).then_some((far, place))
        })
        .collect();
    out.sort_unstable();
    out.into_iter().map(|(_, p)| p).collect()
}
