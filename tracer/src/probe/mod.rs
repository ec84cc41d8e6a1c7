//! Probe backends. A backend attaches to a process and hands out [`Snapshot`]s: plain values
//! that everything downstream (aggregate, symbolize, report) works on without knowing which
//! backend produced them.
pub mod ebpf;
pub mod libc;
pub mod placement;

/// Loss and event counters, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub frees: u64,
    pub unmatched_frees: u64,
    pub failed_allocs: u64,
    /// Every way an event or a stack can be lost, by reason; zero counts included so that a
    /// report always names every reason it checks.
    pub dropped: Vec<(&'static str, u64)>,
}

/// One stack's totals at the time of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StackSample {
    /// Backend's key for the stack; stable for the life of a recording.
    pub id: u64,
    /// Absolute addresses in the target, leaf first: frame 0 in the allocator, frame 1 its
    /// caller. Empty when the stack could not be captured.
    pub frames: Vec<u64>,
    pub live_bytes: i64,
    pub live_allocs: i64,
    pub alloc_bytes: u64,
    pub allocs: u64,
}

#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub stacks: Vec<StackSample>,
    pub counters: Counters,
}
