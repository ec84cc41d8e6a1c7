//! Maps shared by the probe families, and the per-CPU loss and event counters.
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

/// Scratch space for one stack: too large for the 512-byte BPF stack.
#[map]
pub static SCRATCH: PerCpuArray<StackBuf> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, and BPF programs do not preempt each other on one CPU.
        unsafe { *slot += 1 };
    }
}
