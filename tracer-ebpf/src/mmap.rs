//! The mmap family at the syscall level: mmap, munmap, mremap, brk, madvise, mprotect, seen
//! whatever wrapper made them (glibc's, or V8 calling the kernel itself). Syscall
//! tracepoints fire for every process, so each program first checks that the caller is the
//! target. Events go to user space in order, where address ranges are kept: each call as
//! it returns, and munmap and mremap also as they enter (before the range they free can be
//! given to anyone else).
use aya_ebpf::{
    EbpfContext,
    bindings::pt_regs,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user,
        generated::{bpf_get_current_task_btf, bpf_task_pt_regs},
    },
    macros::{map, tracepoint},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use tracer_common::{SyscallEvent, SyscallPending, phase, sys, syscall_counter};

use crate::{maps::PENDING, stack};

/// The process traced; set by user space before load.
#[unsafe(no_mangle)]
static TARGET_TGID: u32 = 0;

#[map]
static SYSCALL_PENDING: HashMap<u64, SyscallPending> = HashMap::with_max_entries(4096, 0);

#[map]
static SYSCALL_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

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

/// Tracepoint layout: 8 bytes of common fields, `int __syscall_nr`, then 8-byte arguments
/// from offset 16 (sys_enter_*) or the 8-byte return value at offset 16 (sys_exit_*).
const NR_OFFSET: usize = 8;
const ARGS_OFFSET: usize = 16;

fn count(index: u32) {
    if let Some(slot) = SYSCALL_COUNTERS.get_ptr_mut(index) {
        unsafe { *slot += 1 };
    }
}

fn is_target() -> Option<u64> {
    let tid = bpf_get_current_pid_tgid();
    let target = unsafe { core::ptr::read_volatile(&TARGET_TGID) };
    ((tid >> 32) as u32 == target).then_some(tid)
}

#[tracepoint]
pub fn tr_sys_enter(ctx: TracePointContext) -> u32 {
    match try_sys_enter(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

#[tracepoint]
pub fn tr_sys_exit(ctx: TracePointContext) -> u32 {
    match try_sys_exit(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

/// The return address into whoever called the libc wrapper that is making this syscall.
fn wrapper_caller() -> u64 {
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const pt_regs;
    if regs.is_null() {
        return 0;
    }
    let (Ok(ip), Ok(sp)) = (unsafe { bpf_probe_read_kernel(&raw const (*regs).rip) }, unsafe {
        bpf_probe_read_kernel(&raw const (*regs).rsp)
    }) else {
        return 0;
    };
    let Some(offset) = SYSCALL_SITES.get_ptr(ip) else { return 0 };
    let at = sp + unsafe { *offset };
    let caller = unsafe { bpf_probe_read_user(at as *const u64) }.unwrap_or(0);
    match CALL_SITES.get_ptr(caller) {
        // Past the return address itself, then the intermediary's frame.
        Some(frame) => unsafe { bpf_probe_read_user((at + 8 + *frame) as *const u64) }.unwrap_or(caller),
        None => caller,
    }
}

fn try_sys_enter(ctx: &TracePointContext) -> Result<u32, u32> {
    let Some(tid) = is_target() else { return Ok(0) };
    let nr: i32 = unsafe { ctx.read_at(NR_OFFSET) }.map_err(|_| 1u32)?;
    let mut pending = SyscallPending {
        args: [0; 6],
        stack: 0,
        sys: nr as u32,
        in_allocator: PENDING.get_ptr(tid).is_some() as u32,
    };
    for i in 0..6 {
        pending.args[i] = unsafe { ctx.read_at::<u64>(ARGS_OFFSET + 8 * i) }.unwrap_or(0);
    }
    pending.stack = stack::capture_with_caller(ctx.as_ptr(), wrapper_caller());
    if SYSCALL_PENDING.insert(tid, &pending, 0).is_err() {
        count(syscall_counter::PENDING_FULL);
    }
    if pending.sys == sys::MUNMAP || pending.sys == sys::MREMAP {
        // Sent before the kernel frees the range: another thread's mmap may be given it, and
        // return, before this call does.
        send(&pending, 0, tid, phase::ENTRY);
    }
    Ok(0)
}

fn send(pending: &SyscallPending, ret: i64, tid: u64, phase: u32) {
    let event = SyscallEvent {
        args: pending.args,
        ret,
        stack: pending.stack,
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        tid: tid as u32,
        sys: pending.sys,
        in_allocator: pending.in_allocator,
        phase,
    };
    if SYSCALL_EVENTS.output::<SyscallEvent>(&event, 0).is_err() {
        count(syscall_counter::EVENTS_LOST);
    }
}

fn try_sys_exit(ctx: &TracePointContext) -> Result<u32, u32> {
    let Some(tid) = is_target() else { return Ok(0) };
    let Some(pending) = SYSCALL_PENDING.get_ptr(tid) else { return Ok(0) };
    let pending = unsafe { *pending };
    let _ = SYSCALL_PENDING.remove(tid);
    let ret: i64 = unsafe { ctx.read_at(ARGS_OFFSET) }.map_err(|_| 1u32)?;
    send(&pending, ret, tid, phase::EXIT);
    Ok(0)
}
