//! Probe backends. A backend attaches to a process and hands out [`Snapshot`]s: plain values
//! that everything downstream (aggregate, symbolize, report) works on without knowing which
//! backend produced them.
pub mod anchor;
pub mod batch;
pub mod btf;
pub mod ebpf;
pub mod libc;
pub mod placement;
pub mod ptrace;
pub mod sampled;
pub mod session;
pub mod syscalls;

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
    /// caller; a V8 frame the walker identified is followed by its two capture words
    /// (`crate::v8::capture::split` takes them apart). Empty when the stack could not be
    /// captured.
    pub frames: Vec<u64>,
    pub live_bytes: i64,
    pub live_allocs: i64,
    pub alloc_bytes: u64,
    pub allocs: u64,
    /// The most live bytes the stack held at any moment so far.
    pub peak_bytes: i64,
}

#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub stacks: Vec<StackSample>,
    pub counters: Counters,
}

/// The allocator losses every backend counts, by the counter indices of tracer-common,
/// named as reports show them.
pub fn allocator_losses(c: impl Fn(u32) -> u64) -> Vec<(&'static str, u64)> {
    use tracer_common::counter;
    vec![
        ("pending_map_full", c(counter::DROP_PENDING_FULL)),
        ("live_map_full", c(counter::DROP_LIVE_FULL)),
        ("stats_map_full", c(counter::DROP_STATS_FULL)),
        ("stack_map_full", c(counter::DROP_STACK_MAP_FULL)),
        ("stack_unavailable", c(counter::DROP_STACK_UNAVAILABLE)),
        ("missed_frees", c(counter::STALE_LIVE)),
        ("orphan_returns", c(counter::ORPHAN_RETURNS)),
        ("scratch_busy", c(counter::DROP_SCRATCH_BUSY)),
        ("stale_pending", c(counter::STALE_PENDING)),
        ("stack_collision", c(counter::STACK_COLLISION)),
        ("stack_insert_failed", c(counter::STACK_INSERT_FAILED)),
        ("peak_contended", c(counter::PEAK_CONTENDED)),
        // Stacks the walker cut short (the allocation itself is counted, under the frames
        // found): why each stopped.
        ("stack_cut_no_unwind_rows", c(counter::UNWIND_NO_ROWS)),
        ("stack_cut_bad_frame", c(counter::UNWIND_BAD_FRAME)),
        ("stack_cut_outside_mappings", c(counter::UNWIND_OUTSIDE_MAPPINGS)),
        ("stack_cut_unsupported_rule", c(counter::UNWIND_UNSUPPORTED)),
        // Not a failure: deeper than the frames kept.
        ("stack_depth_cap", c(counter::UNWIND_DEPTH_CAP)),
        // New stacks with V8 frames not announced to user space in time (its ring was full):
        // named later, when a snapshot meets them.
        ("js_stack_notices_lost", c(counter::JS_NOTICE_LOST)),
        // Sampled by the in-process sampler, whose set of sampled addresses was full: counted
        // as allocated, never as live (its free would not be seen).
        ("sampler_untracked", c(counter::SAMPLER_UNTRACKED)),
        // The ptrace fallback's ring in the target was full: sampled events not seen.
        ("sampler_ring_full", c(counter::SAMPLER_RING_FULL)),
    ]
}

/// Where a probe sits, for the line the tracer prints when it starts.
#[derive(Clone, Debug)]
pub struct ProbeSite {
    pub function: &'static str,
    /// Bytes from the function's start.
    pub offset: u64,
    /// Whether a hit is cheap (emulated by the kernel) or single-stepped.
    pub emulated: bool,
    /// Whether the function's return is probed too.
    pub returns: bool,
}

pub type ProbeError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A probe backend attached to one process. Dropping it detaches every probe and leaves the
/// process as it was.
pub trait Backend {
    /// Short name for messages: "ebpf", "ptrace".
    fn name(&self) -> &'static str;
    fn sites(&self) -> &[ProbeSite];
    /// The totals so far.
    fn snapshot(&mut self) -> Result<Snapshot, ProbeError>;

    /// Removes every probe, so that the target runs as before, and keeps what was recorded:
    /// snapshots after it give the final figures. A backend that cannot keep its figures
    /// apart from its probes leaves this to `drop`.
    fn detach(&mut self) {}

    /// Whether the mmap family is traced (else `drain_syscalls` stays empty).
    fn traces_syscalls(&self) -> bool {
        false
    }

    /// mmap-family syscalls completed since the last call, in order.
    fn drain_syscalls(&mut self) -> Vec<tracer_common::SyscallEvent> {
        Vec::new()
    }

    /// Live malloc-family bytes of all stacks together: the most since the last call where
    /// the backend sees every change (ptrace), else the total now (a sample). None when the
    /// backend cannot tell.
    /// The target is exiting and its memory map as it was read at the exit stop: what a
    /// backend that still has work about the process (walks to finish) needs of it.
    fn exiting(&mut self, _maps: &crate::symbolize::maps::ProcMaps) {}

    fn live_total_peak(&mut self) -> Option<i64> {
        None
    }

    /// Stacks first stored since the last call that hold V8 frames the walker captured, with
    /// their words (pcs and capture words, see `v8::capture`): to be named while the objects
    /// they point at are still in place.
    fn new_js_stacks(&mut self) -> Vec<(u64, Vec<u64>)> {
        Vec::new()
    }

    /// Frames of a stack by id (leaf first), for stacks that reach us outside snapshots.
    fn stack_frames(&mut self, _id: u64) -> Option<Vec<u64>> {
        None
    }

    /// Per stack id, the (bytes, count) of live blocks that were at least `min_age` old at
    /// the moment `at` (in the past).
    fn live_older_than(
        &mut self,
        _min_age: std::time::Duration,
        _at: std::time::Instant,
    ) -> Result<std::collections::HashMap<u64, (u64, u64)>, ProbeError> {
        Err(format!("--min-age is not supported by the {} backend", self.name()).into())
    }
}
