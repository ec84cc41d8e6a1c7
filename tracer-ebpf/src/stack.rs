//! User stack capture with the direct caller recovered.
//!
//! An entry uprobe on glibc's malloc fires before malloc has pushed anything that a
//! frame-pointer walk understands, so the kernel's walk (regs->ip, then the saved frame
//! pointers) never sees the return address into the caller: the function that called malloc
//! would be missing. The return address is still at a known offset from the stack pointer, so
//! we read it and put it in slot 1. Stacks are kept by a 64-bit hash of their frames; a hash
//! hit is checked frame by frame, so two stacks that share a hash are never merged.
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::generated::bpf_get_stack,
};
use tracer_common::{MAX_FRAMES, STACK_LOST, StackBuf, counter};

use crate::maps::{STACKS, claim_scratch, count, release_scratch};

const BPF_F_USER_STACK: u64 = 1 << 8;
const E2BIG: i32 = -7;
const EEXIST: i32 = -17;

/// The bits of the stack hash kept as the key: all of them, except in tests that narrow it
/// on purpose so that distinct stacks collide (set by user space before load).
#[unsafe(no_mangle)]
static STACK_HASH_MASK: u64 = u64::MAX;

/// Captures the user stack of the current task with `caller` (0 when unknown; user space
/// drops it) in slot 1, from any program type that `bpf_get_stack` accepts.
#[inline(always)]
pub fn capture_with_caller(ctx: *mut core::ffi::c_void, caller: u64) -> u64 {
    let Some((slot, buf)) = claim_scratch() else {
        return STACK_LOST;
    };
    // SAFETY: `buf` is a scratch value of this CPU that we own until it is released.
    let key = capture_into(ctx, caller, unsafe { &mut *buf });
    release_scratch(slot);
    key
}

#[inline(always)]
fn capture_into(ctx: *mut core::ffi::c_void, caller: u64, buf: &mut StackBuf) -> u64 {
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
    // SAFETY: a plain read of our own global; volatile so that the build-time value is not
    // folded in (user space sets it at load).
    hash &= unsafe { core::ptr::read_volatile(&STACK_HASH_MASK) };
    if hash == STACK_LOST {
        hash = 1;
    }
    if let Some(stored) = STACKS.get_ptr(hash) {
        return same_or_lost(hash, stored, buf);
    }
    match STACKS.insert(hash, &*buf, BPF_NOEXIST as u64) {
        Ok(()) => hash,
        Err(err) if err as i32 == EEXIST => {
            // Another CPU stored a stack under this key first: the same one, or not.
            match STACKS.get_ptr(hash) {
                Some(stored) => same_or_lost(hash, stored, buf),
                None => {
                    count(counter::STACK_INSERT_FAILED);
                    STACK_LOST
                }
            }
        }
        Err(err) if err as i32 == E2BIG => {
            count(counter::DROP_STACK_MAP_FULL);
            STACK_LOST
        }
        Err(_) => {
            // No memory for the entry, or the bucket busy: the frames would be lost.
            count(counter::STACK_INSERT_FAILED);
            STACK_LOST
        }
    }
}

/// `key` if the stack stored under it is `buf`'s, else [`STACK_LOST`] (a collision,
/// counted): two stacks under one key would merge their totals.
#[inline(always)]
fn same_or_lost(key: u64, stored: *const StackBuf, buf: &StackBuf) -> u64 {
    // SAFETY: a map value; stacks are never deleted while the programs run.
    let stored = unsafe { &*stored };
    if stored.len != buf.len {
        count(counter::STACK_COLLISION);
        return STACK_LOST;
    }
    let len = buf.len as usize;
    for i in 0..MAX_FRAMES {
        if i >= len {
            break;
        }
        if stored.frames[i] != buf.frames[i] {
            count(counter::STACK_COLLISION);
            return STACK_LOST;
        }
    }
    key
}

/// Keeps `StackBuf` in use from this module so the layout check below stays next to its user.
const _: () = assert!(core::mem::size_of::<StackBuf>() == 8 + MAX_FRAMES * 8);
