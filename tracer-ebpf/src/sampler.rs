//! The in-process sampler's probe sites (tracer-sampler, issue 13): the sampler decides in the
//! target which calls are sampled and calls `tracer_alloc_site` / `tracer_free_site` with a
//! `SampledCall` in `rdi` only for those. These programs record such an event as sampling mode
//! records a sampled call (allocator.rs), with the stack walked from the registers at the
//! original allocator's entry that the event carries, so that no frame of the sampler is seen.
//!
//! realloc, as the sampler reports it: a free event with `HOLD` for a sampled old block before
//! the real call (the block leaves the live map and waits in `PENDING` under the thread, as it
//! does between a realloc's entry and return in sampling mode), then an alloc event that
//! settles it (`OLD_RELEASED`: retired; `OLD_KEPT`: back in the live map), with `NOT_SAMPLED`
//! when the event only settles.
//!
//! Weights: the event's, computed by the sampler at its mean; the live map keeps only a block's
//! size and its retirement recomputes the weight at `SAMPLE_BYTES`, so user space sets that to
//! the sampler's mean.
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::uprobe,
    programs::ProbeContext,
};
use tracer_common::{
    AllocKind, Pending, STACK_LOST, counter,
    sampler::{KIND_FREE, flags},
};

use crate::{
    allocator::{add_stats, record_weighted, restore_old, retire},
    maps::{LIVE, PENDING, count},
    stack::{self, UserRegs},
};

/// Byte offsets in `SampledCall` (tracer_common::sampler, checked there to be 72 bytes).
const ADDR: u64 = 0;
const ENTRY: u64 = 32;
const KIND: u64 = 64;

#[uprobe]
pub fn tr_sampler_alloc(ctx: ProbeContext) -> u32 {
    match try_sampler_alloc(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

#[uprobe]
pub fn tr_sampler_free(ctx: ProbeContext) -> u32 {
    match try_sampler_free(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

/// The event's address: the site's first argument.
#[inline(always)]
fn event(ctx: &ProbeContext) -> u64 {
    // SAFETY: the program's context is the task's saved user registers.
    unsafe { (*ctx.regs).rdi }
}

/// Words of the event at `at` (the target's memory; may fault, then the event is ignored).
#[inline(always)]
fn read<T>(at: u64) -> Result<T, u32> {
    // SAFETY: a checked read of the target's memory.
    unsafe { bpf_probe_read_user(at as *const T) }.map_err(|_| 1)
}

fn try_sampler_alloc(ctx: &ProbeContext) -> Result<u32, u32> {
    let ev = event(ctx);
    let [kind, flag_bits] = read::<[u32; 2]>(ev + KIND)?;
    if kind == KIND_FREE {
        return Err(1);
    }
    if flag_bits & (flags::OLD_RELEASED | flags::OLD_KEPT) != 0 {
        settle(flag_bits);
    }
    if flag_bits & flags::NOT_SAMPLED != 0 {
        return Ok(0);
    }
    // The registers at the allocator's entry: the walk starts there, as at an entry probe on
    // the allocator, so frame 0 is the allocator and frame 1 its caller.
    let [entry, sp, bp, ret_addr] = read::<[u64; 4]>(ev + ENTRY)?;
    let key = stack::capture_from(&UserRegs { ip: entry, sp, bp }, ret_addr);
    let [addr, size, bytes, allocs] = read::<[u64; 4]>(ev + ADDR)?;
    if flag_bits & flags::UNTRACKED != 0 {
        // Allocated, and its free will not be reported: never live.
        count(counter::SAMPLER_UNTRACKED);
        add_stats(key, 0, 0, bytes, allocs);
    } else {
        record_weighted(addr, size, key, bytes, allocs);
    }
    Ok(0)
}

/// The fate of the block this thread's realloc held (see `try_sampler_free`). A subprogram of
/// its own: its copy of the held call stays off the stack of the walk that follows.
#[inline(never)]
fn settle(flag_bits: u32) {
    let tid = bpf_get_current_pid_tgid();
    let Some(p) = PENDING.get_ptr(tid) else {
        // Held before the free site's probe was in: nothing of it was live here.
        return;
    };
    // SAFETY: the thread's own entry; only this thread changes it.
    let held = unsafe { *p };
    let _ = PENDING.remove(tid);
    if held.had_old == 0 {
        return;
    }
    if flag_bits & flags::OLD_RELEASED != 0 {
        retire(held.old_stack, held.old_size);
        count(counter::FREES);
    } else if flag_bits & flags::OLD_UNTRACKED != 0 {
        // Still allocated, but out of the sampler's set: its free will not be reported.
        retire(held.old_stack, held.old_size);
        count(counter::SAMPLER_UNTRACKED);
    } else {
        restore_old(&held);
    }
}

fn try_sampler_free(ctx: &ProbeContext) -> Result<u32, u32> {
    let ev = event(ctx);
    let addr = read::<u64>(ev + ADDR)?;
    let [kind, flag_bits] = read::<[u32; 2]>(ev + KIND)?;
    if kind != KIND_FREE || addr == 0 {
        return Err(1);
    }
    if flag_bits & flags::HOLD != 0 {
        hold(addr);
        return Ok(0);
    }
    match LIVE.get_ptr(addr) {
        Some(live) => {
            // SAFETY: a map value, read once by value.
            let live = unsafe { *live };
            if LIVE.remove(addr).is_ok() {
                retire(live.stack, live.size);
                count(counter::FREES);
            }
        }
        // Sampled before the probes were in (or the live map was full).
        None => count(counter::UNMATCHED_FREES),
    }
    Ok(0)
}

/// A realloc of sampled block `addr` is about to run: the block leaves the live map now (once
/// realloc has released it another thread may get the address) and waits for the alloc
/// event that settles it, in `PENDING` under the thread, as sampling mode keeps a realloc in
/// flight.
#[inline(never)]
fn hold(addr: u64) {
    let tid = bpf_get_current_pid_tgid();
    if let Some(p) = PENDING.get_ptr(tid) {
        // A hold never settled (the alloc site's probe missed it): the block was live before.
        // SAFETY: the thread's own entry.
        let stale = unsafe { *p };
        let _ = PENDING.remove(tid);
        count(counter::STALE_PENDING);
        if stale.had_old == 1 {
            restore_old(&stale);
        }
    }
    let Some(live) = LIVE.get_ptr(addr) else {
        return;
    };
    // SAFETY: a map value, read once by value.
    let live = unsafe { *live };
    if LIVE.remove(addr).is_err() {
        return;
    }
    let held = Pending {
        size: 0,
        ptr_arg: addr,
        stack: STACK_LOST,
        old_size: live.size,
        old_stack: live.stack,
        depth: 0,
        kind: AllocKind::Realloc as u32,
        overflow: 0,
        had_old: 1,
        // No return address or slot: the stack walker then leaves every frame as it is.
        ret_addr: 0,
        sampled: 0,
        _pad: 0,
        sp: 0,
    };
    if PENDING.insert(tid, &held, 0).is_err() {
        count(counter::DROP_PENDING_FULL);
        restore_old(&held);
    }
}
