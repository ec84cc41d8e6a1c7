//! The mmap family at the syscall level: mmap, munmap, mremap, brk, madvise, mprotect, seen
//! whatever wrapper made them (glibc's, or V8 calling the kernel itself). One raw tracepoint
//! on `sys_exit` sees each whole: at a syscall's exit its arguments are still in the saved
//! user registers, its number in `orig_ax`, the user stack is as it was at entry, and an
//! allocator call that made it is still in flight. It fires for every syscall of every
//! process, so it first checks that the caller is the target, then the number. Events go to
//! user space in order, where address ranges are kept. munmap and mremap are also sent from
//! `sys_enter`: the range they free can be handed to another thread's mmap, which may return
//! before they do, so the range must be gone from the books first.
use aya_ebpf::{
    EbpfContext,
    bindings::pt_regs,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user},
    macros::{map, raw_tracepoint},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::RawTracePointContext,
};
use tracer_common::{SyscallEvent, phase, sys, syscall_counter};

use crate::{maps::PENDING, stack};

/// The process traced; set by user space before load.
#[unsafe(no_mangle)]
static TARGET_TGID: u32 = 0;

/// 4 MiB: about 40,000 events, what a program mapping and unmapping in a loop (some 230,000
/// events a second here) makes between two of the tracer's 50 ms drains, with room to spare.
#[map]
static SYSCALL_EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Syscall sites of the libc wrappers: user ip just after the `syscall` instruction ->
/// bytes from the stack pointer there to the return address into the wrapper's caller.
/// Filled by user space from the target's libc; a site not listed gets no caller frame.
#[map]
static SYSCALL_SITES: HashMap<u64, u64> = HashMap::with_max_entries(64, 0);

/// Return addresses inside frameless libc functions that call a wrapper (sbrk calls brk) ->
/// that function's frame size there, so the return address into *its* caller is read
/// instead: the program's function, not libc's intermediary.
#[map]
static CALL_SITES: HashMap<u64, u64> = HashMap::with_max_entries(64, 0);

#[map]
static SYSCALL_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(syscall_counter::COUNT, 0);

fn count(index: u32) {
    if let Some(slot) = SYSCALL_COUNTERS.get_ptr_mut(index) {
        // SAFETY: a valid map value. Atomic, as in `maps::add_counter`: a preempting program
        // on this CPU must not lose an update.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(slot, 1)
        };
    }
}

fn is_target() -> Option<u64> {
    let tid = bpf_get_current_pid_tgid();
    let target = unsafe { core::ptr::read_volatile(&TARGET_TGID) };
    ((tid >> 32) as u32 == target).then_some(tid)
}

/// `sys_exit(struct pt_regs *regs, long ret)`: `regs` are the task's saved user registers.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn tr_sys_exit(ctx: RawTracePointContext) -> u32 {
    match try_sys_exit(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

fn try_sys_exit(ctx: &RawTracePointContext) -> Result<u32, u32> {
    let Some(tid) = is_target() else { return Ok(0) };
    let regs: *const pt_regs = ctx.arg(0);
    let read = |field: *const u64| unsafe { bpf_probe_read_kernel(field) }.map_err(|_| 1u32);
    let nr = read(unsafe { &raw const (*regs).orig_rax })?;
    let Ok(nr) = u32::try_from(nr) else { return Ok(0) };
    if !matches!(nr, sys::MMAP | sys::MUNMAP | sys::MREMAP | sys::BRK | sys::MADVISE | sys::MPROTECT) {
        return Ok(0);
    }
    let ret: i64 = ctx.arg(1);
    let args = syscall_args(regs)?;
    let ip = read(unsafe { &raw const (*regs).rip })?;
    let sp = read(unsafe { &raw const (*regs).rsp })?;
    let bp = read(unsafe { &raw const (*regs).rbp })?;
    let event = SyscallEvent {
        args,
        ret,
        stack: stack::capture_with_caller(ctx.as_ptr(), &stack::UserRegs { ip, sp, bp }, wrapper_caller(ip, sp)),
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        tid: tid as u32,
        sys: nr,
        in_allocator: PENDING.get_ptr(tid).is_some() as u32,
        phase: phase::EXIT,
    };
    if SYSCALL_EVENTS.output::<SyscallEvent>(&event, 0).is_err() {
        count(syscall_counter::EVENTS_LOST);
    }
    Ok(0)
}

/// `sys_enter(struct pt_regs *regs, long id)`.
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn tr_sys_enter(ctx: RawTracePointContext) -> u32 {
    match try_sys_enter(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

fn try_sys_enter(ctx: &RawTracePointContext) -> Result<u32, u32> {
    let Some(tid) = is_target() else { return Ok(0) };
    let nr: i64 = ctx.arg(1);
    let Ok(nr) = u32::try_from(nr) else { return Ok(0) };
    if nr != sys::MUNMAP && nr != sys::MREMAP {
        return Ok(0);
    }
    let regs: *const pt_regs = ctx.arg(0);
    let args = syscall_args(regs)?;
    // Only the range matters here; the exit event carries the stack.
    let event = SyscallEvent {
        args,
        ret: 0,
        stack: 0,
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        tid: tid as u32,
        sys: nr,
        in_allocator: PENDING.get_ptr(tid).is_some() as u32,
        phase: phase::ENTRY,
    };
    if SYSCALL_EVENTS.output::<SyscallEvent>(&event, 0).is_err() {
        count(syscall_counter::EVENTS_LOST);
    }
    Ok(0)
}

/// The six syscall arguments from the task's saved user registers: x86-64's argument
/// registers in order (r10, not rcx, holds the fourth).
fn syscall_args(regs: *const pt_regs) -> Result<[u64; 6], u32> {
    let read = |field: *const u64| unsafe { bpf_probe_read_kernel(field) }.map_err(|_| 1u32);
    // SAFETY: only field addresses are taken; the kernel reads them with a checked helper.
    unsafe {
        Ok([
            read(&raw const (*regs).rdi)?,
            read(&raw const (*regs).rsi)?,
            read(&raw const (*regs).rdx)?,
            read(&raw const (*regs).r10)?,
            read(&raw const (*regs).r8)?,
            read(&raw const (*regs).r9)?,
        ])
    }
}

/// The return address into whoever called the libc wrapper that is making this syscall.
fn wrapper_caller(ip: u64, sp: u64) -> u64 {
    let Some(offset) = SYSCALL_SITES.get_ptr(ip) else { return 0 };
    let at = sp + unsafe { *offset };
    let caller = unsafe { bpf_probe_read_user(at as *const u64) }.unwrap_or(0);
    match CALL_SITES.get_ptr(caller) {
        // Past the return address itself, then the intermediary's frame.
        Some(frame) => unsafe { bpf_probe_read_user((at + 8 + *frame) as *const u64) }.unwrap_or(caller),
        None => caller,
    }
}
