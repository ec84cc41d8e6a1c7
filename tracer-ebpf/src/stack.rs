//! User stack capture with the direct caller recovered.
//!
//! An entry uprobe on glibc's malloc fires before malloc has pushed anything that a
//! frame-pointer walk understands, so the kernel's walk (regs->ip, then the saved frame
//! pointers) never sees the return address into the caller: the function that called malloc
//! would be missing. The return address is still at a known offset from the stack pointer, so
//! we read it and put it in slot 1. Stacks are kept by a 64-bit hash of their frames, so
//! distinct stacks do not collide the way `BPF_MAP_TYPE_STACK_TRACE` buckets do.
use aya_ebpf::{
    EbpfContext,
    bindings::BPF_NOEXIST,
    helpers::{bpf_probe_read_user, generated::bpf_get_stack},
    programs::ProbeContext,
};
use tracer_common::{MAX_FRAMES, STACK_LOST, StackBuf, counter};

use crate::maps::{SCRATCH, STACKS, count};

const BPF_F_USER_STACK: u64 = 1 << 8;
const E2BIG: i32 = -7;

/// Captures the user stack at an entry probe and returns its hash, or [`STACK_LOST`].
#[inline(always)]
pub fn capture(ctx: &ProbeContext, ret_sp_offset: u64) -> u64 {
    let sp = unsafe { (*ctx.regs).rsp };
    let caller = unsafe { bpf_probe_read_user((sp + ret_sp_offset) as *const u64) }.unwrap_or(0);
    capture_with_caller(ctx.as_ptr(), caller)
}

/// Captures the user stack of the current task with `caller` (0 when unknown; user space
/// drops it) in slot 1, from any program type that `bpf_get_stack` accepts.
#[inline(always)]
pub fn capture_with_caller(ctx: *mut core::ffi::c_void, caller: u64) -> u64 {
    let Some(buf) = SCRATCH.get_ptr_mut(0) else {
        return STACK_LOST;
    };
    // SAFETY: `buf` points at this CPU's scratch value, which nothing else uses meanwhile.
    let buf = unsafe { &mut *buf };
    let size = ((MAX_FRAMES - 1) * 8) as u32;
    // Frames go to slots 1.., so that slot 0 can take the ip and slot 1 the caller.
    let got = unsafe {
        bpf_get_stack(
            ctx,
            (&raw mut buf.frames[1]).cast(),
            size,
            BPF_F_USER_STACK,
        )
    };
    if got <= 0 {
        count(counter::DROP_STACK_UNAVAILABLE);
        return STACK_LOST;
    }
    let frames = (got as usize / 8).min(MAX_FRAMES - 1);
    buf.frames[0] = buf.frames[1];
    buf.frames[1] = caller;
    let len = frames + 1;
    buf.len = len as u64;

    // FNV-1a over the frames, one 64-bit word at a time.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for i in 0..MAX_FRAMES {
        if i >= len {
            break;
        }
        hash = (hash ^ buf.frames[i]).wrapping_mul(0x0000_0100_0000_01b3);
    }
    if hash == STACK_LOST {
        hash = 1;
    }
    if STACKS.get_ptr(hash).is_none() {
        if let Err(err) = STACKS.insert(hash, &*buf, BPF_NOEXIST as u64) {
            if err as i32 == E2BIG {
                count(counter::DROP_STACK_MAP_FULL);
                return STACK_LOST;
            }
            // -EEXIST: another CPU stored the same stack first.
        }
    }
    hash
}

/// Keeps `StackBuf` in use from this module so the layout check below stays next to its user.
const _: () = assert!(core::mem::size_of::<StackBuf>() == 8 + MAX_FRAMES * 8);
