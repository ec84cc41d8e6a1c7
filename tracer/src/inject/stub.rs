//! A system call run in a stopped thread of the target so that the target survives the tracer
//! dying (SIGKILL) at any moment of it.
//!
//! The call runs through a small stub of ours in the target (in the tail of the sampler's
//! trampoline page, never a trampoline slot; before that page exists, in the unused tail of
//! libc's executable mapping): `syscall`, then every register the injection
//! changed loaded back from a context block next to it, then `jmp [resume]`. The tracer
//! catches the thread at its syscall-exit-stop, right after the `syscall` instruction, reads
//! the result and puts the thread's own registers back itself, so the stub's restore runs
//! only when the tracer died while the thread was in the stub's hands: the thread then
//! finishes the call, restores itself and goes on where it was stopped.
//!
//! Every stop the thread sits in while its registers are the call's is one that delivers no
//! signal when the tracer dies: a syscall-entry or syscall-exit-stop with
//! `PTRACE_O_TRACESYSGOOD` (the kernel then "sends" signal `SIGTRAP | 0x80`, which is no
//! signal and is refused), or a `PTRACE_EVENT_STOP`. A single step's SIGTRAP stop would not
//! do: a tracer dying there hands the SIGTRAP to the target, whose default action kills it.
//!
//! The call ends with the thread back inside `get_signal`, where it was seized (an event stop,
//! or the signal-delivery-stop of a signal it is owed), with its own registers: from there
//! the kernel restarts an interrupted system call exactly as it would have without us.
//!
//! Registers the stub does not restore are the ones neither the injection nor the kernel's
//! system call path changes: rbx, rbp, rsp, r12..r15, the segment bases, the vector and x87
//! state, and rflags (`syscall` saves it in r11 and `sysret`/`iret` put it back; the loads and
//! the jump change no flag).

use std::{
    io::Write as _,
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
    time::Duration,
};

use nix::{errno::Errno, sys::ptrace, unistd::Pid};

use crate::probe::ptrace::sys::{self, Mem, Regs, Stop};

/// Where the stub starts in the trampoline page: after every trampoline slot.
pub const STUB_OFFSET: u64 = 0xf00;
/// Where its context block starts in the trampoline page.
pub const CONTEXT_OFFSET: u64 = 0xf80;
/// The stub's bytes: `syscall`, nine 7-byte loads, a 6-byte `jmp`.
pub const STUB_LEN: usize = 2 + 9 * 7 + 6;
/// The context block's words: rax, rdi, rsi, rdx, r10, r8, r9, rcx, r11, then the resume rip.
pub const CONTEXT_WORDS: usize = 10;

const _: () = assert!(STUB_OFFSET + STUB_LEN as u64 <= CONTEXT_OFFSET);
const _: () = assert!(CONTEXT_OFFSET + 8 * CONTEXT_WORDS as u64 <= 4096);

/// `mov reg, [rip + disp32]` without its displacement, in the context block's order.
const LOADS: [[u8; 3]; 9] = [
    [0x48, 0x8b, 0x05], // rax
    [0x48, 0x8b, 0x3d], // rdi
    [0x48, 0x8b, 0x35], // rsi
    [0x48, 0x8b, 0x15], // rdx
    [0x4c, 0x8b, 0x15], // r10
    [0x4c, 0x8b, 0x05], // r8
    [0x4c, 0x8b, 0x0d], // r9
    [0x48, 0x8b, 0x0d], // rcx
    [0x4c, 0x8b, 0x1d], // r11
];
const SYSCALL: [u8; 2] = [0x0f, 0x05];
const JMP_RIP: [u8; 2] = [0xff, 0x25];

/// The stub's code placed at `stub`, its context block at `context` (within 2 GiB).
pub fn code(stub: u64, context: u64) -> Vec<u8> {
    let rel = |target: u64, next: u64| -> [u8; 4] {
        let disp = target.wrapping_sub(next) as i64;
        i32::try_from(disp)
            .expect("the context block lies next to the stub")
            .to_le_bytes()
    };
    let mut out = SYSCALL.to_vec();
    for (i, load) in LOADS.iter().enumerate() {
        let next = stub + out.len() as u64 + 7;
        out.extend_from_slice(load);
        out.extend_from_slice(&rel(context + 8 * i as u64, next));
    }
    let next = stub + out.len() as u64 + 6;
    out.extend_from_slice(&JMP_RIP);
    out.extend_from_slice(&rel(context + 8 * (CONTEXT_WORDS as u64 - 1), next));
    debug_assert_eq!(out.len(), STUB_LEN);
    out
}

/// The stub and its context block in the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stub {
    pub code: u64,
    pub context: u64,
}

impl Stub {
    /// The stub in the trampoline page at `page`.
    pub fn in_page(page: u64) -> Stub {
        Stub {
            code: page + STUB_OFFSET,
            context: page + CONTEXT_OFFSET,
        }
    }
}

const ERESTARTSYS: i64 = -512;
const ERESTARTNOINTR: i64 = -513;
const ERESTARTNOHAND: i64 = -514;
const ERESTART_RESTARTBLOCK: i64 = -516;
const NR_RESTART_SYSCALL: u64 = libc::SYS_restart_syscall as u64;
const X32_SYSCALL_BIT: u64 = 0x4000_0000;

fn restarting(rax: u64) -> bool {
    matches!(
        rax as i64,
        ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND | ERESTART_RESTARTBLOCK
    )
}

/// The rax and rip a thread stopped with registers `saved` goes on with when the kernel lets
/// it go and no signal handler runs; `before` is the 2 bytes before its rip, if readable.
/// None when user space cannot do the same (the call was not made by a `syscall`
/// instruction).
///
/// A thread we stopped sits in `get_signal` on its way back to user space. Resumed with no
/// signal to deliver, `arch_do_signal_or_restart` (arch/x86/kernel/signal.c) finds no handler
/// to run and, if it came from a system call (orig_rax >= 0), restarts it:
/// -ERESTARTNOHAND, -ERESTARTSYS and -ERESTARTNOINTR with rax = orig_rax and rip -= 2 (back
/// onto the `syscall` instruction), -ERESTART_RESTARTBLOCK with rax = __NR_restart_syscall
/// (with the x32 bit of orig_rax) and rip -= 2, which resumes the call from the thread's
/// restart block (a relative nanosleep's remaining time; no system call we run touches it).
/// Only `handle_signal`, when a handler runs, turns -ERESTARTNOHAND and
/// -ERESTART_RESTARTBLOCK (and -ERESTARTSYS without SA_RESTART) into -EINTR; with no handler
/// all four restart. Any other rax is the call's result and is kept.
pub fn resume(saved: &Regs, before: Option<[u8; 2]>) -> Option<(u64, u64)> {
    if (saved.orig_rax as i64) < 0 || !restarting(saved.rax) {
        return Some((saved.rax, saved.rip));
    }
    let rax = if saved.rax as i64 == ERESTART_RESTARTBLOCK {
        NR_RESTART_SYSCALL | (saved.orig_rax & X32_SYSCALL_BIT)
    } else {
        saved.orig_rax
    };
    (before == Some(SYSCALL)).then_some((rax, saved.rip - 2))
}

/// The context block for a thread whose registers are `saved`, resuming with `rax` at `rip`.
pub fn context(saved: &Regs, rax: u64, rip: u64) -> [u64; CONTEXT_WORDS] {
    [
        rax, saved.rdi, saved.rsi, saved.rdx, saved.r10, saved.r8, saved.r9, saved.rcx, saved.r11,
        rip,
    ]
}

// ---------------------------------------------------------------------------------------------
// The test hook

/// Injected system calls run by this process so far.
static COUNT: AtomicU32 = AtomicU32::new(0);
/// Which call to pause in: its number (from 1), times two, plus one to pause at its entry.
static PAUSE: AtomicU64 = AtomicU64::new(0);

/// For tests only (`tracer inject-test`, `TRACER_INJECT_PAUSE_AT`): the `n`th system call this
/// process injects stops at its syscall-exit-stop (its entry with `at_entry`), says so on
/// stderr and waits there for ever, for a test to kill the tracer at that moment.
pub fn pause_at(n: u32, at_entry: bool) {
    PAUSE.store(u64::from(n) * 2 + u64::from(at_entry), Ordering::Relaxed);
}

fn pause_here(line: String) -> ! {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
    let _ = err.flush();
    drop(err);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

// ---------------------------------------------------------------------------------------------
// The run

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("task {0} exited while the tracer ran a system call in it")]
    Exited(i32),
    #[error("ptrace on task {tid}")]
    Ptrace {
        tid: i32,
        #[source]
        source: Errno,
    },
    #[error("write the stub's context block at {addr:#x}")]
    Context {
        addr: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("the system call run in task {tid} faulted (signal {sig}, pc {pc:#x})")]
    Fault { tid: i32, sig: i32, pc: u64 },
    #[error("task {tid} stopped at {rip:#x} in a system call, not after ours at {after:#x}")]
    Elsewhere { tid: i32, rip: u64, after: u64 },
}

/// How a run ended.
#[derive(Debug)]
pub struct Ran {
    /// The call's rax, or why it could not be had.
    pub result: Result<i64, RunError>,
    /// The thread now sits in the signal-delivery-stop of this signal (its siginfo set), to
    /// deliver when it is let go; 0: in a stop that delivers nothing.
    pub stop_sig: i32,
}

/// A signal the thread is owed: its number, and its siginfo if it could be read.
type Owed = (i32, Option<libc::siginfo_t>);

/// Runs system call `nr` with `args` in task `tid` of process `tgid`, stopped inside
/// `get_signal` (seized and interrupted, or in a signal-delivery-stop of signal `stopped_with`
/// whose siginfo is `info`), through `stub` when there is one (and the thread's resume can
/// be done from user space), else through the `syscall` instruction of libc at `libc_insn`,
/// which a tracer dying mid-call leaves running with the call's registers. `label` names the
/// call for the test hook.
///
/// Signals that arrive for the thread meanwhile are held and sent again at the end, the first
/// one delivered from a signal-delivery-stop with its own siginfo. An `Err` says the thread's
/// state is unknown (it exited, or ptrace failed on it).
#[expect(clippy::too_many_arguments, reason = "one call's whole description")]
pub fn run(
    mem: &Mem,
    tid: i32,
    tgid: i32,
    libc_insn: u64,
    stub: Option<Stub>,
    nr: i64,
    args: [u64; 6],
    (stopped_with, info): Owed,
    label: &str,
) -> Result<Ran, RunError> {
    let pt = |source| RunError::Ptrace { tid, source };
    let unrun = |e| {
        Ok(Ran {
            result: Err(e),
            stop_sig: stopped_with,
        })
    };
    let saved = sys::getregs(tid).map_err(pt)?;
    if let Err(source) =
        ptrace::setoptions(Pid::from_raw(tid), ptrace::Options::PTRACE_O_TRACESYSGOOD)
    {
        return unrun(pt(source));
    }
    let mut before = [0u8; 2];
    let readable = mem.read(saved.rip.wrapping_sub(2), &mut before);
    let through = stub.and_then(|s| Some((s, resume(&saved, readable.then_some(before))?)));
    let entry = match through {
        Some((s, (rax, rip))) => {
            let words: Vec<u8> = context(&saved, rax, rip)
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect();
            if let Err(source) = mem.write_code(s.context, &words) {
                return unrun(RunError::Context {
                    addr: s.context,
                    source,
                });
            }
            s.code
        }
        None => libc_insn,
    };
    let after = entry + 2;
    let regs = sys::syscall_regs(&saved, entry, nr, args);
    if let Err(source) = sys::setregs(tid, &regs) {
        return unrun(pt(source));
    }
    let n = COUNT.fetch_add(1, Ordering::Relaxed) + 1;
    let pause = PAUSE.load(Ordering::Relaxed);
    let pause_at = (pause >> 1 == u64::from(n)).then_some(pause & 1 == 1);
    let describe = |at: &str| {
        let via = match through {
            Some((s, (rax, rip))) => {
                format!(
                    "via the stub at {:#x}, resume rip {rip:#x} rax {}",
                    s.code, rax as i64
                )
            }
            None => format!("via libc's syscall at {libc_insn:#x}"),
        };
        format!(
            "paused in syscall {n} ({label}) at its {at}: task {tid}, {via}; saved rip {:#x} \
             orig_rax {} rax {}",
            saved.rip, saved.orig_rax as i64, saved.rax as i64
        )
    };

    let mut held: Vec<Owed> = Vec::new();
    let result = (|| {
        let mut in_call = false;
        ptrace::syscall(Pid::from_raw(tid), None).map_err(pt)?;
        loop {
            let stop = match sys::wait(tid, false) {
                Ok(Some((_, stop))) => stop,
                Ok(None) | Err(Errno::EINTR) => continue,
                Err(source) => return Err(pt(source)),
            };
            match stop {
                Stop::Exited(_) | Stop::Killed(_) => return Err(RunError::Exited(tid)),
                Stop::Signal(sig) if sig == libc::SIGTRAP | 0x80 => {
                    let r = sys::getregs(tid).map_err(pt)?;
                    if r.rip != after {
                        return Err(RunError::Elsewhere {
                            tid,
                            rip: r.rip,
                            after,
                        });
                    }
                    in_call = !in_call;
                    if pause_at == Some(in_call) {
                        pause_here(describe(if in_call { "entry" } else { "exit" }));
                    }
                    // An exit that will restart (a signal came) is followed by a new entry.
                    if !in_call && !restarting(r.rax) {
                        return Ok(r.rax as i64);
                    }
                }
                Stop::Signal(sig) => {
                    let info = sys::siginfo(tid).ok();
                    if let Some(i) = &info
                        && sys::is_own_fault(sig, i, tgid)
                    {
                        let pc = sys::getregs(tid).map_or(0, |r| r.rip);
                        return Err(RunError::Fault { tid, sig, pc });
                    }
                    held.push((sig, info));
                }
                // A group-stop: go on.
                Stop::Event(..) => {}
            }
            ptrace::syscall(Pid::from_raw(tid), None).map_err(pt)?;
        }
    })();
    if let Err(RunError::Exited(_)) = result {
        return Err(result.expect_err("matched"));
    }
    let mut owed: Vec<Owed> = Vec::new();
    if stopped_with != 0 {
        owed.push((stopped_with, info));
    }
    owed.extend(held);
    let stop_sig = finish(tid, tgid, &saved, &owed)?;
    Ok(Ran { result, stop_sig })
}

/// Signals blocked by task `tid` (from /proc).
fn blocked(tid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()
        .and_then(|s| {
            let mask = s.lines().find_map(|l| l.strip_prefix("SigBlk:"))?;
            u64::from_str_radix(mask.trim(), 16).ok()
        })
        .unwrap_or(u64::MAX)
}

/// Brings task `tid`, stopped anywhere in a run with the call's registers, back inside
/// `get_signal` with its `saved` registers, every `owed` signal pending again. Returns the
/// signal whose delivery-stop it now sits in (0: an event stop).
///
/// Each owed signal is sent again with tgkill. If the first is not blocked the thread is let
/// go to take it, and stops at its signal-delivery-stop (or another pending signal's), whose
/// siginfo is put back; else it is interrupted and stops at a `PTRACE_EVENT_STOP`, which
/// `get_signal` reports before it takes any signal. Until the thread stops there, its
/// registers are the stub's (a dying tracer leaves it to the stub), and no stop on the way
/// delivers a signal of ours.
fn finish(tid: i32, tgid: i32, saved: &Regs, owed: &[Owed]) -> Result<i32, RunError> {
    let pt = |source| RunError::Ptrace { tid, source };
    let take_first = owed
        .first()
        .is_some_and(|&(sig, _)| blocked(tid) & (1u64 << (sig - 1)) == 0);
    for &(sig, _) in owed {
        sys::tgkill(tgid, tid, sig);
    }
    if !take_first {
        sys::interrupt(tid).map_err(pt)?;
    }
    sys::cont(tid, 0).map_err(pt)?;
    let me = std::process::id() as i32;
    loop {
        let stop = match sys::wait(tid, false) {
            Ok(Some((_, stop))) => stop,
            Ok(None) | Err(Errno::EINTR) => continue,
            Err(source) => return Err(pt(source)),
        };
        let sig = match stop {
            Stop::Exited(_) | Stop::Killed(_) => return Err(RunError::Exited(tid)),
            Stop::Event(..) => 0,
            Stop::Signal(sig) => {
                const SI_TKILL: i32 = -6;
                let ours = sys::siginfo(tid).is_ok_and(|i| {
                    // SAFETY: si_pid is valid for SI_TKILL, which the check reads first.
                    i.si_code == SI_TKILL && unsafe { i.si_pid() } == me
                });
                if ours
                    && let Some(info) = owed.iter().find(|o| o.0 == sig).and_then(|o| o.1.as_ref())
                {
                    let _ = sys::set_siginfo(tid, info);
                }
                sig
            }
        };
        sys::setregs(tid, saved).map_err(pt)?;
        return Ok(sig);
    }
}

#[cfg(test)]
mod tests {
    use iced_x86::{Code, Decoder, DecoderOptions, Register};

    use super::*;

    #[test]
    fn stub_decodes_to_syscall_loads_and_jump() {
        let page = 0x7f12_3456_7000u64;
        let s = Stub::in_page(page);
        let bytes = code(s.code, s.context);
        assert_eq!(bytes.len(), STUB_LEN);
        let insns: Vec<_> = Decoder::with_ip(64, &bytes, s.code, DecoderOptions::NONE)
            .iter()
            .collect();
        assert_eq!(insns.len(), 11, "{insns:?}");
        assert_eq!(insns[0].code(), Code::Syscall);
        let names = [
            Register::RAX,
            Register::RDI,
            Register::RSI,
            Register::RDX,
            Register::R10,
            Register::R8,
            Register::R9,
            Register::RCX,
            Register::R11,
        ];
        for (k, reg) in names.iter().enumerate() {
            let i = &insns[1 + k];
            assert_eq!(i.code(), Code::Mov_r64_rm64, "{i:?}");
            assert_eq!(i.op0_register(), *reg);
            assert!(i.is_ip_rel_memory_operand());
            assert_eq!(i.ip_rel_memory_address(), s.context + 8 * k as u64);
        }
        let jmp = &insns[10];
        assert_eq!(jmp.code(), Code::Jmp_rm64);
        assert!(jmp.is_ip_rel_memory_operand());
        assert_eq!(jmp.ip_rel_memory_address(), s.context + 8 * 9);
        assert_eq!(jmp.next_ip(), s.code + STUB_LEN as u64);
    }

    fn regs(orig_rax: i64, rax: i64, rip: u64) -> Regs {
        // SAFETY: user_regs_struct is plain integers.
        let mut r: Regs = unsafe { std::mem::zeroed() };
        r.orig_rax = orig_rax as u64;
        r.rax = rax as u64;
        r.rip = rip;
        r
    }

    #[test]
    fn resume_restarts_as_the_kernel_does_without_a_handler() {
        let at = 0x1000;
        let sc = Some(SYSCALL);
        // Not in a system call, or one that returned: as it stands.
        assert_eq!(resume(&regs(-1, -512, at), sc), Some((-512i64 as u64, at)));
        assert_eq!(resume(&regs(0, 5, at), sc), Some((5, at)));
        assert_eq!(resume(&regs(0, -4, at), sc), Some((-4i64 as u64, at)));
        // Interrupted: restarted from the syscall instruction.
        for code in [-512, -513, -514] {
            assert_eq!(resume(&regs(0, code, at), sc), Some((0, at - 2)));
        }
        assert_eq!(resume(&regs(230, -516, at), sc), Some((219, at - 2)));
        let x32 = 0x4000_0000 | 230;
        assert_eq!(
            resume(&regs(x32, -516, at), sc),
            Some((0x4000_0000 | 219, at - 2))
        );
        // Not entered by `syscall` (int 0x80) or unreadable: not done from user space.
        assert_eq!(resume(&regs(3, -512, at), Some([0xcd, 0x80])), None);
        assert_eq!(resume(&regs(3, -512, at), None), None);
    }
}
