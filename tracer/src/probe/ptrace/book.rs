//! Allocation bookkeeping of the ptrace backend: the rules of the BPF programs
//! (tracer-ebpf/src/allocator.rs and stack.rs) as plain Rust, fed with what the breakpoints
//! saw, so that both backends count every call the same way.
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use tracer_common::{
    AllocKind, STACK_LOST, StackStats, counter,
    sampler::{KIND_FREE, SampledCall, flags},
};

use crate::probe::{Counters, Snapshot, StackSample, ebpf::Limits};

const PAGE_SIZE: u64 = 4096;

/// A live block: its requested size and the stack that allocated it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Live {
    size: u64,
    stack: u64,
    born: Instant,
}

/// An outermost allocator call between its entry and its return (per thread).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    pub kind: AllocKind,
    /// Bytes the call allocates if it succeeds.
    pub size: u64,
    /// realloc/reallocarray: the block passed in; posix_memalign: `memptr`.
    pub ptr_arg: u64,
    /// Stack key of the call, or [`STACK_LOST`].
    pub stack: u64,
    /// realloc: the old block, taken out of the live table at entry.
    old: Option<Live>,
    /// calloc/reallocarray/pvalloc whose size overflowed: the call must fail.
    overflow: bool,
}

/// Live blocks, per-stack totals, stacks and counters of one recording.
pub struct Book {
    limits: Limits,
    live: HashMap<u64, Live>,
    stats: HashMap<u64, StackStats>,
    stacks: HashMap<u64, Vec<u64>>,
    counters: [u64; counter::COUNT as usize],
    /// Live bytes of all stacks, and the most of it since [`Book::take_total_peak`].
    live_total: i64,
    total_peak: i64,
    /// In-process sampler events: per thread, the block its realloc in flight took out of the
    /// live table (None: the block was not live here).
    held: HashMap<u64, Option<(u64, Live)>>,
}

/// FNV-1a over the frames, as the BPF side keys its stacks.
fn stack_hash(frames: &[u64]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &f in frames {
        hash = (hash ^ f).wrapping_mul(0x0000_0100_0000_01b3);
    }
    if hash == STACK_LOST { 1 } else { hash }
}

/// What the BPF side keeps of a captured stack (see `clean_frames` in ebpf.rs): the caller in
/// slot 1 appears once, and an unreadable (zero) caller goes.
pub fn clean_frames(mut frames: Vec<u64>) -> Vec<u64> {
    if frames.len() > 2 && frames[1] == frames[2] {
        frames.remove(2);
    }
    if frames.len() > 1 && frames[1] == 0 {
        frames.remove(1);
    }
    frames
}

impl Book {
    /// How this recording walks stacks (`--unwind`).
    pub fn unwind_mode(&self) -> crate::unwind::UnwindMode {
        self.limits.unwind
    }

    pub fn new(limits: Limits) -> Book {
        let mut stats = HashMap::new();
        // As on the BPF side, allocations whose stack is lost are counted under this key,
        // which exists from the start and takes one slot of the stats table.
        stats.insert(STACK_LOST, StackStats::default());
        Book {
            limits,
            live: HashMap::new(),
            stats,
            stacks: HashMap::new(),
            counters: [0; counter::COUNT as usize],
            live_total: 0,
            total_peak: 0,
            held: HashMap::new(),
        }
    }

    fn count(&mut self, index: u32) {
        self.counters[index as usize] += 1;
    }

    /// Counts a reason a stack was lost (the stack could not be read at all).
    pub fn stack_unavailable(&mut self) {
        self.count(counter::DROP_STACK_UNAVAILABLE);
    }

    /// Stores `frames` (leaf first, raw as captured) and returns its key, or [`STACK_LOST`]
    /// when the stack table is full.
    pub fn intern_stack(&mut self, frames: &[u64]) -> u64 {
        let id = stack_hash(frames);
        if !self.stacks.contains_key(&id) {
            if self.stacks.len() >= self.limits.max_stacks as usize {
                self.count(counter::DROP_STACK_MAP_FULL);
                return STACK_LOST;
            }
            self.stacks.insert(id, clean_frames(frames.to_vec()));
        }
        id
    }

    /// An outermost allocator call entered with arguments `args`; `stack` is its key.
    pub fn enter(&mut self, kind: AllocKind, args: [u64; 3], stack: u64) -> Pending {
        let [a0, a1, a2] = args;
        let mut overflow = false;
        let mut ptr_arg = 0;
        let mut checked = |v: Option<u64>| {
            v.unwrap_or_else(|| {
                overflow = true;
                0
            })
        };
        let size = match kind {
            AllocKind::Malloc | AllocKind::Valloc => a0,
            // glibc returns a whole number of pages (one page for 0).
            AllocKind::Pvalloc => checked(a0.div_ceil(PAGE_SIZE).max(1).checked_mul(PAGE_SIZE)),
            AllocKind::Calloc => checked(a0.checked_mul(a1)),
            AllocKind::Realloc => {
                ptr_arg = a0;
                a1
            }
            AllocKind::Reallocarray => {
                ptr_arg = a0;
                checked(a1.checked_mul(a2))
            }
            AllocKind::PosixMemalign => {
                ptr_arg = a0;
                a2
            }
            AllocKind::Memalign => a1,
        };
        let mut old = None;
        if matches!(kind, AllocKind::Realloc | AllocKind::Reallocarray) && ptr_arg != 0 {
            // Taken out now, as on the BPF side, where another thread could be handed the
            // address once realloc released it and before its return was seen.
            old = self.live.remove(&ptr_arg);
        }
        Pending {
            kind,
            size,
            ptr_arg,
            stack,
            old,
            overflow,
        }
    }

    /// The outermost call returned `ret`. For posix_memalign, `memptr` is what `*memptr`
    /// held at the return (None if it could not be read).
    pub fn exit(&mut self, pending: Pending, ret: u64, memptr: Option<u64>) {
        let (ok, addr) = if pending.kind == AllocKind::PosixMemalign {
            // posix_memalign returns 0 or an error number; the block is in *memptr.
            match (ret as u32, memptr) {
                (0, Some(addr)) => (addr != 0, addr),
                _ => (false, 0),
            }
        } else {
            (ret != 0, ret)
        };

        if pending.ptr_arg != 0
            && matches!(pending.kind, AllocKind::Realloc | AllocKind::Reallocarray)
        {
            // realloc(p, 0) frees p and returns NULL; any other NULL leaves p untouched.
            let released = !pending.overflow && (ok || pending.size == 0);
            match (released, pending.old) {
                (false, Some(old)) => self.restore_old(pending.ptr_arg, old),
                (false, None) => {}
                (true, Some(old)) => {
                    self.retire(old);
                    self.count(counter::FREES);
                }
                (true, None) => self.count(counter::UNMATCHED_FREES),
            }
        }

        if ok {
            self.record_alloc(addr, pending.size, pending.stack);
        } else if !(pending.size == 0 && pending.ptr_arg != 0 && !pending.overflow) {
            // A NULL from realloc(p, 0) is its success, not a failure.
            self.count(counter::FAILED_ALLOCS);
        }
    }

    /// free(ptr) outside any allocator call of the same thread.
    pub fn free(&mut self, ptr: u64) {
        if ptr == 0 {
            return;
        }
        match self.live.remove(&ptr) {
            Some(live) => {
                self.retire(live);
                self.count(counter::FREES);
            }
            None => self.count(counter::UNMATCHED_FREES),
        }
    }

    /// A pending call that will never return where we can see it (its thread exited, or the
    /// process was detached mid-call): a realloc's old block goes back to being live.
    pub fn abandon(&mut self, pending: Pending) {
        if let Some(old) = pending.old {
            self.restore_old(pending.ptr_arg, old);
        }
    }

    fn restore_old(&mut self, ptr: u64, old: Live) {
        if self.live.len() >= self.limits.max_live as usize {
            self.count(counter::DROP_LIVE_FULL);
            self.retire(old);
        } else {
            self.live.insert(ptr, old);
        }
    }

    /// What a block of `size` bytes stands for in the totals: itself, or in sampling mode the
    /// sampler's unbiased estimate at the mean (bytes, and allocations in units of
    /// 2^-`COUNT_SHIFT`), as the BPF side retires a sampled block.
    fn weight(&self, size: u64) -> (u64, u64) {
        match self.limits.sample_bytes {
            Some(mean) if mean > 0 => {
                let e = tracer_common::sampling::estimate(size, mean);
                (e.bytes, e.count)
            }
            _ => (size, 1),
        }
    }

    /// A block is no longer live.
    fn retire(&mut self, live: Live) {
        let (bytes, allocs) = self.weight(live.size);
        self.add_stats(live.stack, -(bytes as i64), -(allocs as i64), 0, 0);
    }

    fn record_alloc(&mut self, addr: u64, size: u64, stack: u64) {
        let (bytes, allocs) = self.weight(size);
        self.record_weighted(addr, size, stack, bytes, allocs);
    }

    fn record_weighted(&mut self, addr: u64, size: u64, stack: u64, bytes: u64, allocs: u64) {
        if let Some(stale) = self.live.remove(&addr) {
            // We hold this address as live, yet the allocator handed it out again: its free
            // went by unseen. Retire it from its stack before reusing the slot.
            self.retire(stale);
            self.count(counter::STALE_LIVE);
        }
        let stack = self.stats_key(stack);
        if self.live.len() < self.limits.max_live as usize {
            self.live.insert(
                addr,
                Live {
                    size,
                    stack,
                    born: Instant::now(),
                },
            );
            self.add(stack, bytes as i64, allocs as i64, bytes, allocs);
        } else {
            // Not tracked as live (its free could not be matched), but still allocated.
            self.count(counter::DROP_LIVE_FULL);
            self.add(stack, 0, 0, bytes, allocs);
        }
    }

    /// An event of the in-process sampler (the ptrace fallback), by the rules of its BPF probe
    /// sites (tracer-ebpf/src/sampler.rs): `thread` tells whose realloc a held block belongs
    /// to, `stack` is the walked stack's key for an allocation that was sampled.
    pub fn sampled(&mut self, thread: u64, ev: &SampledCall, stack: Option<u64>) {
        if ev.kind == KIND_FREE {
            if ev.addr == 0 {
                return;
            }
            if ev.flags & flags::HOLD != 0 {
                // realloc of a sampled block, before the real call: out of the live table now
                // (once released, another thread may be handed the address), settled by the
                // thread's next alloc event.
                if let Some(stale) = self.held.remove(&thread) {
                    self.count(counter::STALE_PENDING);
                    if let Some((addr, old)) = stale {
                        self.restore_old(addr, old);
                    }
                }
                let old = self.live.remove(&ev.addr);
                self.held.insert(thread, old.map(|o| (ev.addr, o)));
                return;
            }
            self.free(ev.addr);
            return;
        }
        if ev.flags & (flags::OLD_RELEASED | flags::OLD_KEPT) != 0
            && let Some(Some((addr, old))) = self.held.remove(&thread)
        {
            if ev.flags & flags::OLD_RELEASED != 0 {
                self.retire(old);
                self.count(counter::FREES);
            } else if ev.flags & flags::OLD_UNTRACKED != 0 {
                // Still allocated, but out of the sampler's set: its free will not be seen.
                self.retire(old);
                self.count(counter::SAMPLER_UNTRACKED);
            } else {
                self.restore_old(addr, old);
            }
        }
        if ev.flags & flags::NOT_SAMPLED != 0 {
            return;
        }
        let stack = stack.unwrap_or(STACK_LOST);
        if ev.flags & flags::UNTRACKED != 0 {
            // Allocated, and its free will not be reported: never live.
            self.count(counter::SAMPLER_UNTRACKED);
            self.add_stats(stack, 0, 0, ev.weight_bytes, ev.weight_count);
        } else {
            self.record_weighted(ev.addr, ev.size, stack, ev.weight_bytes, ev.weight_count);
        }
    }

    /// Counts why a walk ended, when it ended short of the stack's end (the BPF walker's
    /// `stack_cut_*` reasons).
    pub fn walk_stopped(&mut self, stop: crate::unwind::Stop) {
        use crate::unwind::Stop;
        match stop {
            Stop::End => {}
            Stop::NoRows => self.count(counter::UNWIND_NO_ROWS),
            Stop::BadFrame => self.count(counter::UNWIND_BAD_FRAME),
            Stop::OutsideMappings => self.count(counter::UNWIND_OUTSIDE_MAPPINGS),
            Stop::Unsupported => self.count(counter::UNWIND_UNSUPPORTED),
            Stop::DepthCap => self.count(counter::UNWIND_DEPTH_CAP),
        }
    }

    /// Sets a counter the backend keeps elsewhere (the ring's dropped events, counted in the
    /// target).
    pub fn set_counter(&mut self, index: u32, value: u64) {
        self.counters[index as usize] = value;
    }

    /// The key `stack`'s totals are kept under: the lost-stack key when the table is full.
    fn stats_key(&mut self, stack: u64) -> u64 {
        if self.stats.contains_key(&stack) {
            return stack;
        }
        if self.stats.len() >= self.limits.max_stacks as usize {
            self.count(counter::DROP_STATS_FULL);
            return STACK_LOST;
        }
        self.stats.insert(stack, StackStats::default());
        stack
    }

    fn add_stats(
        &mut self,
        stack: u64,
        live_bytes: i64,
        live_allocs: i64,
        bytes: u64,
        allocs: u64,
    ) {
        let stack = self.stats_key(stack);
        self.add(stack, live_bytes, live_allocs, bytes, allocs);
    }

    fn add(&mut self, stack: u64, live_bytes: i64, live_allocs: i64, bytes: u64, allocs: u64) {
        if let Some(s) = self.stats.get_mut(&stack) {
            s.live_bytes += live_bytes;
            s.live_allocs += live_allocs;
            s.alloc_bytes += bytes;
            s.allocs += allocs;
            // Every change of a stack's live bytes passes here, one at a time: exact peaks.
            s.peak_bytes = s.peak_bytes.max(s.live_bytes);
        }
        self.live_total += live_bytes;
        self.total_peak = self.total_peak.max(self.live_total);
    }

    /// The most live bytes of all stacks together since the last call (exact: the book sees
    /// every change), which starts the next period at the total now.
    pub fn take_total_peak(&mut self) -> i64 {
        std::mem::replace(&mut self.total_peak, self.live_total)
    }

    pub fn snapshot(&self) -> Snapshot {
        let c = |i: u32| self.counters[i as usize];
        // Sampling keeps estimated counts in fixed point, as the BPF side does.
        let sampling = self.limits.sample_bytes.is_some();
        let count = |v: i64| if sampling { crate::probe::session::whole_count(v) } else { v };
        let mut stacks: Vec<StackSample> = self
            .stats
            .iter()
            .map(|(&id, s)| StackSample {
                id,
                frames: self.stacks.get(&id).cloned().unwrap_or_default(),
                live_bytes: s.live_bytes,
                live_allocs: count(s.live_allocs),
                alloc_bytes: s.alloc_bytes,
                allocs: count(s.allocs as i64) as u64,
                peak_bytes: s.peak_bytes,
            })
            .collect();
        stacks.sort_by_key(|s| s.id);
        // Sampling: a free of a sampled block stands for many; the estimate is what was
        // allocated and is no longer live (as the eBPF backend reports it).
        let frees = if sampling {
            stacks.iter().map(|s| s.allocs as i64 - s.live_allocs).sum::<i64>().max(0) as u64
        } else {
            c(counter::FREES)
        };
        Snapshot {
            stacks,
            counters: Counters {
                frees,
                unmatched_frees: c(counter::UNMATCHED_FREES),
                failed_allocs: c(counter::FAILED_ALLOCS),
                dropped: crate::probe::allocator_losses(c),
            },
        }
    }

    /// Frames of stack `id`, leaf first.
    pub fn stack_frames(&self, id: u64) -> Option<Vec<u64>> {
        self.stacks.get(&id).cloned()
    }

    /// Per stack, the bytes and number of live blocks that were at least `min_age` old at the
    /// moment `at`.
    pub fn live_older_than(&self, min_age: Duration, at: Instant) -> HashMap<u64, (u64, u64)> {
        let mut by_stack: HashMap<u64, (u64, u64)> = HashMap::new();
        for live in self.live.values() {
            if at.saturating_duration_since(live.born) >= min_age {
                // A sampled block stands for more: its estimate (count in fixed point).
                let (bytes, allocs) = self.weight(live.size);
                let e = by_stack.entry(live.stack).or_default();
                e.0 += bytes;
                e.1 += allocs;
            }
        }
        if self.limits.sample_bytes.is_some() {
            for v in by_stack.values_mut() {
                v.1 = crate::probe::session::whole_count(v.1 as i64) as u64;
            }
        }
        by_stack
    }

    /// A return seen for a call whose entry was not (it cannot happen once breakpoints are in
    /// before the threads run, but is counted rather than trusted).
    pub fn orphan_return(&mut self) {
        self.count(counter::ORPHAN_RETURNS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BIG: Limits = Limits {
        max_live: 1024,
        max_stacks: 1024,
        sample_bytes: None,
        unwind: crate::unwind::UnwindMode::Auto,
        v8: None,
        sampler_sites: None,
    };

    fn totals(book: &Book, stack: u64) -> (i64, i64, u64, u64) {
        let s = &book.stats[&stack];
        (s.live_bytes, s.live_allocs, s.alloc_bytes, s.allocs)
    }

    /// An event of the in-process sampler at mean 4096: an allocation of `size` at `addr`
    /// weighs its estimate; a free (`size` 0) carries the block.
    fn ev(addr: u64, size: u64, kind: u32, flag_bits: u32) -> SampledCall {
        let w = tracer_common::sampling::estimate(size, 4096);
        SampledCall { addr, size, weight_bytes: w.bytes, weight_count: w.count, kind, flags: flag_bits, ..SampledCall::ZERO }
    }

    #[test]
    fn sampler_events_follow_the_probe_sites_rules_for_realloc_and_untracked_blocks() {
        let mut book = Book::new(Limits { sample_bytes: Some(4096), ..BIG });
        let malloc = AllocKind::Malloc as u32;
        let realloc = AllocKind::Realloc as u32;
        let w = |size| tracer_common::sampling::estimate(size, 4096);
        let (a, b) = (w(1000), w(3000));
        // A sampled block is live with its estimate; its free takes the same estimate out.
        book.sampled(1, &ev(0x10, 1000, malloc, 0), Some(7));
        assert_eq!(totals(&book, 7), (a.bytes as i64, a.count as i64, a.bytes, a.count));
        book.sampled(1, &ev(0x10, 0, KIND_FREE, 0), None);
        assert_eq!(totals(&book, 7).0, 0);
        assert_eq!(totals(&book, 7).1, 0);

        // realloc of a sampled block that succeeds: held, then released when it returns.
        book.sampled(1, &ev(0x20, 1000, malloc, 0), Some(7));
        book.sampled(1, &ev(0x20, 0, KIND_FREE, flags::HOLD), None);
        assert_eq!(totals(&book, 7).0, a.bytes as i64, "a held block counts until it is settled");
        book.sampled(1, &ev(0x30, 3000, realloc, flags::OLD_RELEASED), Some(8));
        assert_eq!(totals(&book, 7).0, 0);
        assert_eq!(totals(&book, 8).0, b.bytes as i64);

        // realloc that fails: the held block goes back, and stays freeable.
        book.sampled(2, &ev(0x40, 1000, malloc, 0), Some(7));
        book.sampled(2, &ev(0x40, 0, KIND_FREE, flags::HOLD), None);
        book.sampled(2, &ev(0, 0, realloc, flags::OLD_KEPT | flags::NOT_SAMPLED), None);
        assert_eq!(totals(&book, 7).0, a.bytes as i64);
        book.sampled(2, &ev(0x40, 0, KIND_FREE, 0), None);
        assert_eq!(totals(&book, 7).0, 0);

        // Held blocks belong to their thread: another thread's settling leaves them alone.
        book.sampled(3, &ev(0x50, 1000, malloc, 0), Some(7));
        book.sampled(3, &ev(0x50, 0, KIND_FREE, flags::HOLD), None);
        book.sampled(4, &ev(0x60, 3000, realloc, flags::OLD_RELEASED), Some(8));
        book.sampled(3, &ev(0, 0, realloc, flags::OLD_KEPT | flags::NOT_SAMPLED), None);
        assert_eq!(totals(&book, 7).0, a.bytes as i64, "thread 3's block came back");

        // A block the set could not keep: allocated, never live, counted.
        book.sampled(5, &ev(0x70, 3000, malloc, flags::UNTRACKED), Some(9));
        assert_eq!(totals(&book, 9), (0, 0, b.bytes, b.count));
        assert_eq!(book.counters[counter::SAMPLER_UNTRACKED as usize], 1);

        // Counts come out whole in snapshots, frees as estimated.
        let snap = book.snapshot();
        let s8 = snap.stacks.iter().find(|s| s.id == 8).expect("stack 8");
        assert_eq!(s8.allocs, crate::probe::session::whole_count(2 * b.count as i64) as u64);
        assert_eq!(book.counters[counter::STALE_PENDING as usize], 0);
    }

    fn call(book: &mut Book, kind: AllocKind, args: [u64; 3], stack: u64, ret: u64) {
        let p = book.enter(kind, args, stack);
        book.exit(p, ret, None);
    }

    #[test]
    fn malloc_then_free_leaves_nothing_live() {
        let mut b = Book::new(BIG);
        let s = b.intern_stack(&[0x10, 0x20, 0x30]);
        call(&mut b, AllocKind::Malloc, [100, 0, 0], s, 0x1000);
        assert_eq!(totals(&b, s), (100, 1, 100, 1));
        b.free(0x1000);
        assert_eq!(totals(&b, s), (0, 0, 100, 1));
        b.free(0x2000);
        b.free(0);
        let snap = b.snapshot();
        assert_eq!((snap.counters.frees, snap.counters.unmatched_frees), (1, 1));
    }

    #[test]
    fn calloc_and_reallocarray_overflow_fail_and_count_nothing() {
        let mut b = Book::new(BIG);
        call(&mut b, AllocKind::Calloc, [u64::MAX / 2 + 1, 4, 0], 7, 0);
        call(&mut b, AllocKind::Reallocarray, [0, u64::MAX, 2], 7, 0);
        assert_eq!(b.snapshot().counters.failed_allocs, 2);
        assert!(!b.stats.contains_key(&7));
    }

    #[test]
    fn pvalloc_rounds_up_to_whole_pages() {
        let mut b = Book::new(BIG);
        call(&mut b, AllocKind::Pvalloc, [5000, 0, 0], 3, 0x5000);
        call(&mut b, AllocKind::Pvalloc, [0, 0, 0], 4, 0x9000);
        assert_eq!(totals(&b, 3), (8192, 1, 8192, 1));
        assert_eq!(totals(&b, 4), (4096, 1, 4096, 1));
    }

    #[test]
    fn realloc_moves_the_block_to_its_own_stack_and_failure_restores_it() {
        let mut b = Book::new(BIG);
        call(&mut b, AllocKind::Malloc, [100, 0, 0], 1, 0x1000);
        // A failing realloc: the old block stays live where it was.
        call(&mut b, AllocKind::Realloc, [0x1000, u64::MAX / 2, 0], 2, 0);
        assert_eq!(totals(&b, 1), (100, 1, 100, 1));
        assert!(!b.stats.contains_key(&2));
        // A moving realloc: the old block leaves stack 1, the new one counts under stack 2.
        call(&mut b, AllocKind::Realloc, [0x1000, 70_000, 0], 2, 0x8000);
        assert_eq!(totals(&b, 1), (0, 0, 100, 1));
        assert_eq!(totals(&b, 2), (70_000, 1, 70_000, 1));
        // realloc(p, 0) frees p and is not a failure.
        call(&mut b, AllocKind::Realloc, [0x8000, 0, 0], 3, 0);
        assert_eq!(totals(&b, 2), (0, 0, 70_000, 1));
        let c = b.snapshot().counters;
        assert_eq!((c.frees, c.failed_allocs), (2, 1));
    }

    #[test]
    fn realloc_from_null_is_an_allocation() {
        let mut b = Book::new(BIG);
        call(&mut b, AllocKind::Realloc, [0, 3000, 0], 5, 0x3000);
        assert_eq!(totals(&b, 5), (3000, 1, 3000, 1));
        assert_eq!(b.snapshot().counters.unmatched_frees, 0);
    }

    #[test]
    fn posix_memalign_counts_only_on_success_with_the_block_from_memptr() {
        let mut b = Book::new(BIG);
        let p = b.enter(AllocKind::PosixMemalign, [0x7ffd0000, 64, 4096], 6);
        b.exit(p, 0, Some(0x4000));
        let p = b.enter(AllocKind::PosixMemalign, [0x7ffd0000, 3, 4096], 6);
        b.exit(p, 22, Some(0x4000));
        assert_eq!(totals(&b, 6), (4096, 1, 4096, 1));
        assert_eq!(b.snapshot().counters.failed_allocs, 1);
        b.free(0x4000);
        assert_eq!(totals(&b, 6), (0, 0, 4096, 1));
    }

    #[test]
    fn an_address_handed_out_twice_retires_the_stale_block() {
        let mut b = Book::new(BIG);
        call(&mut b, AllocKind::Malloc, [10, 0, 0], 1, 0x1000);
        call(&mut b, AllocKind::Malloc, [20, 0, 0], 2, 0x1000);
        assert_eq!(totals(&b, 1), (0, 0, 10, 1));
        assert_eq!(totals(&b, 2), (20, 1, 20, 1));
        let dropped = b.snapshot().counters.dropped;
        assert!(dropped.contains(&("missed_frees", 1)), "{dropped:?}");
    }

    #[test]
    fn full_tables_count_their_losses_and_keep_totals_exact() {
        let mut b = Book::new(Limits {
            max_live: 1,
            max_stacks: 2,
            sample_bytes: None,
            unwind: crate::unwind::UnwindMode::Auto,
            v8: None,
            sampler_sites: None,
        });
        let s1 = b.intern_stack(&[1]);
        let s2 = b.intern_stack(&[2]);
        assert_eq!(b.intern_stack(&[3]), STACK_LOST);
        call(&mut b, AllocKind::Malloc, [10, 0, 0], s1, 0x1000);
        // The stats table holds the lost-stack key and s1: s2 is counted as lost.
        call(&mut b, AllocKind::Malloc, [20, 0, 0], s2, 0x2000);
        assert_eq!(totals(&b, STACK_LOST), (0, 0, 20, 1));
        let dropped = b.snapshot().counters.dropped;
        for reason in ["stack_map_full", "stats_map_full", "live_map_full"] {
            assert!(dropped.contains(&(reason, 1)), "{reason}: {dropped:?}");
        }
    }

    #[test]
    fn peaks_are_the_most_ever_live_per_stack_and_in_all() {
        let mut b = Book::new(BIG);
        for i in 0..10 {
            call(&mut b, AllocKind::Malloc, [1000, 0, 0], 1, 0x1000 * (i + 1));
        }
        call(&mut b, AllocKind::Malloc, [500, 0, 0], 2, 0x100_0000);
        for i in 0..10 {
            b.free(0x1000 * (i + 1));
        }
        for i in 0..5 {
            call(&mut b, AllocKind::Malloc, [1000, 0, 0], 1, 0x1000 * (i + 1));
        }
        let s = &b.stats[&1];
        assert_eq!((s.peak_bytes, s.live_bytes), (10_000, 5000));
        assert_eq!(b.stats[&2].peak_bytes, 500);
        assert_eq!(b.take_total_peak(), 10_500);
        // The next period starts at the total then, not at zero.
        assert_eq!(b.take_total_peak(), 5500);
        let snap = b.snapshot();
        let one = snap.stacks.iter().find(|s| s.id == 1).expect("stack 1");
        assert_eq!(one.peak_bytes, 10_000);
    }

    #[test]
    fn abandoned_realloc_puts_its_old_block_back() {
        let mut b = Book::new(BIG);
        call(&mut b, AllocKind::Malloc, [100, 0, 0], 1, 0x1000);
        let p = b.enter(AllocKind::Realloc, [0x1000, 200, 0], 2);
        b.abandon(p);
        b.free(0x1000);
        assert_eq!(totals(&b, 1), (0, 0, 100, 1));
    }

    #[test]
    fn stacks_are_cleaned_like_the_bpf_side() {
        assert_eq!(
            clean_frames(vec![0x10, 0x20, 0x20, 0x30]),
            vec![0x10, 0x20, 0x30]
        );
        assert_eq!(clean_frames(vec![0x10, 0, 0x30]), vec![0x10, 0x30]);
    }
}
