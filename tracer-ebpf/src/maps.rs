//! Maps shared by the probe families, and the per-CPU loss and event counters.
//!
//! Uprobe programs run with migration disabled but, on a kernel with full preemption, not
//! with preemption disabled: another task may run a program on the same CPU while one is
//! stopped half-way. So nothing per-CPU here is updated with a plain read-modify-write:
//! counters take atomic adds, and stack scratch slots are claimed with a compare-and-swap.
use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd};

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use tracer_common::{LiveAlloc, Pending, StackBuf, StackStats, counter};

/// `BPF_F_NO_PREALLOC`: entries are allocated on insert, so an unused stack map costs nothing.
const NO_PREALLOC: u32 = 1;

/// Allocator calls in flight, by thread (pid_tgid).
#[map]
pub static PENDING: HashMap<u64, Pending> = HashMap::with_max_entries(16 * 1024, 0);

/// Live blocks by address. User space may resize it before load (`--max-live`).
#[map]
pub static LIVE: HashMap<u64, LiveAlloc> = HashMap::with_max_entries(512 * 1024, 0);

/// Per-stack totals by stack hash.
#[map]
pub static STATS: HashMap<u64, StackStats> = HashMap::with_max_entries(64 * 1024, 0);

/// Stack frames by stack hash.
#[map]
pub static STACKS: HashMap<u64, StackBuf> = HashMap::with_max_entries(64 * 1024, NO_PREALLOC);

/// Scratch stacks (too large for the 512-byte BPF stack): `SCRATCH_SLOTS` per CPU, each
/// owned by whoever set its flag in `SCRATCH_BUSY` from 0 to 1. One slot would do without
/// preemption; each program stopped half-way on a CPU holds at most one more.
pub const SCRATCH_SLOTS: u32 = 4;
#[map]
pub static SCRATCH: PerCpuArray<StackBuf> = PerCpuArray::with_max_entries(SCRATCH_SLOTS, 0);
#[map]
static SCRATCH_BUSY: PerCpuArray<u64> = PerCpuArray::with_max_entries(SCRATCH_SLOTS, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Adds `delta` (two's complement for a negative one) to this CPU's counter `index`.
#[inline(always)]
pub fn add_counter(index: u32, delta: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a valid map value; the add is one atomic instruction, so a program that
        // preempted another on this CPU cannot lose either's update.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, delta) };
    }
}

#[inline(always)]
pub fn count(index: u32) {
    add_counter(index, 1);
}

/// A scratch stack buffer of this CPU that nobody else uses until [`release_scratch`].
///
/// Why this is exclusive: migration is disabled while a uprobe program runs, so the CPU,
/// and with it the per-CPU `SCRATCH_BUSY` and `SCRATCH` values, stay the same from claim to
/// release; the flag goes from 0 to 1 by compare-and-swap, which exactly one claimant wins
/// even when one program preempted another in between its load and its store.
#[inline(always)]
pub fn claim_scratch() -> Option<(u32, *mut StackBuf)> {
    for i in 0..SCRATCH_SLOTS {
        let Some(flag) = SCRATCH_BUSY.get_ptr_mut(i) else {
            continue;
        };
        // SAFETY: a valid map value, touched only atomically.
        let (_, won) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(flag, 0, 1)
        };
        if won {
            match SCRATCH.get_ptr_mut(i) {
                Some(buf) => return Some((i, buf)),
                None => {
                    release_scratch(i);
                    return None;
                }
            }
        }
    }
    count(counter::DROP_SCRATCH_BUSY);
    None
}

#[inline(always)]
pub fn release_scratch(slot: u32) {
    if let Some(flag) = SCRATCH_BUSY.get_ptr_mut(slot) {
        // SAFETY: a valid map value; we own the slot, so a store gives it back. An aligned
        // 64-bit store is one instruction (LLVM cannot select an atomic store for BPF v1).
        unsafe { core::ptr::write_volatile(flag, 0) };
    }
}
