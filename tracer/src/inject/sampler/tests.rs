//! The sampler loaded into the test process (no root, nothing patched): its hooks called
//! through their addresses, with this process's libc as the real allocator. Each test loads
//! its own copy, so that tests running in parallel do not share a control block.

use std::{
    ffi::c_void,
    mem::{offset_of, size_of},
    sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering::SeqCst},
};

use tracer_common::{
    AllocKind,
    sampler::{
        BUCKET_SLOTS, BUCKETS, Control, Countdown, Hook, KIND_FREE, RANGES, SET_CAPACITY, SLOTS,
        SampledCall, bucket_of, counter, flags,
    },
    sampling::{self, COUNT_SHIFT, MAX_MEAN},
};

use super::*;
use crate::symbolize::maps::ProcMaps;

type MallocFn = unsafe extern "C" fn(usize) -> *mut c_void;
type CallocFn = unsafe extern "C" fn(usize, usize) -> *mut c_void;
type ReallocFn = unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void;
type ReallocarrayFn = unsafe extern "C" fn(*mut c_void, usize, usize) -> *mut c_void;
type FreeFn = unsafe extern "C" fn(*mut c_void);
type PosixMemalignFn = unsafe extern "C" fn(*mut *mut c_void, usize, usize) -> i32;
type MemalignFn = unsafe extern "C" fn(usize, usize) -> *mut c_void;

/// The hooks, typed as the functions they replace.
#[derive(Clone, Copy)]
struct Hooks {
    malloc: MallocFn,
    calloc: CallocFn,
    realloc: ReallocFn,
    reallocarray: ReallocarrayFn,
    free: FreeFn,
    posix_memalign: PosixMemalignFn,
    memalign: MemalignFn,
    aligned_alloc: MemalignFn,
    valloc: MallocFn,
    pvalloc: MallocFn,
}

/// Mean of the sampling statistics tests.
const MEAN: u64 = 64 << 10;

struct Fixture {
    sampler: LocalSampler,
    h: Hooks,
}

impl Fixture {
    /// A fresh sampler over this process's libc, seeded, sampling at `mean`.
    fn new(mean: u64) -> Fixture {
        let sampler = LocalSampler::load().expect("load the embedded sampler");
        sampler.use_libc().expect("find libc's allocator");
        // SAFETY (all transmutes): each address is the hook of that libc function, with its
        // signature.
        let f = |h: Hook| sampler.hook(h) as usize;
        let h = unsafe {
            Hooks {
                malloc: std::mem::transmute::<usize, MallocFn>(f(Hook::Malloc)),
                calloc: std::mem::transmute::<usize, CallocFn>(f(Hook::Calloc)),
                realloc: std::mem::transmute::<usize, ReallocFn>(f(Hook::Realloc)),
                reallocarray: std::mem::transmute::<usize, ReallocarrayFn>(f(Hook::Reallocarray)),
                free: std::mem::transmute::<usize, FreeFn>(f(Hook::Free)),
                posix_memalign: std::mem::transmute::<usize, PosixMemalignFn>(f(
                    Hook::PosixMemalign,
                )),
                memalign: std::mem::transmute::<usize, MemalignFn>(f(Hook::Memalign)),
                aligned_alloc: std::mem::transmute::<usize, MemalignFn>(f(Hook::AlignedAlloc)),
                valloc: std::mem::transmute::<usize, MallocFn>(f(Hook::Valloc)),
                pvalloc: std::mem::transmute::<usize, MallocFn>(f(Hook::Pvalloc)),
            }
        };
        let fx = Fixture { sampler, h };
        fx.set(offset_of!(Control, rng), 0x5eed_0000_0000_0001);
        fx.set(offset_of!(Control, mean), mean);
        fx.set(offset_of!(Control, active), 1);
        fx
    }

    /// The control block's word at `offset`.
    fn at(&self, offset: usize) -> &AtomicU64 {
        assert!(offset.is_multiple_of(8) && offset < size_of::<Control>());
        // SAFETY: an aligned word of the block, which lives as long as the fixture.
        unsafe { AtomicU64::from_ptr((self.sampler.control() as *mut u8).add(offset).cast()) }
    }

    fn get(&self, offset: usize) -> u64 {
        self.at(offset).load(SeqCst)
    }

    fn set(&self, offset: usize, value: u64) {
        self.at(offset).store(value, SeqCst)
    }

    fn counter(&self, which: usize) -> u64 {
        self.get(offset_of!(Control, counters) + 8 * which)
    }

    fn alloc_hits(&self) -> u64 {
        self.counter(counter::ALLOC_SITE)
    }

    fn free_hits(&self) -> u64 {
        self.counter(counter::FREE_SITE)
    }

    /// An event copy, read word by word as the sites write it.
    fn read_event(&self, offset: usize) -> SampledCall {
        let mut words = [0u64; 9];
        for (i, w) in words.iter_mut().enumerate() {
            *w = self.get(offset + 8 * i);
        }
        // SAFETY: SampledCall is nine u64-sized words of plain integers.
        unsafe { std::mem::transmute::<[u64; 9], SampledCall>(words) }
    }

    fn last_alloc(&self) -> SampledCall {
        self.read_event(offset_of!(Control, last_alloc))
    }

    fn last_free(&self) -> SampledCall {
        self.read_event(offset_of!(Control, last_free))
    }

    fn slot_left(&self, i: usize) -> u64 {
        assert!(i < SLOTS);
        self.get(offset_of!(Control, slots) + size_of::<Countdown>() * i)
    }

    fn reset_slots(&self) {
        for i in 0..SLOTS {
            self.set(offset_of!(Control, slots) + size_of::<Countdown>() * i, 0);
        }
    }

    fn bucket_count(&self, b: usize) -> u8 {
        assert!(b < BUCKETS);
        // SAFETY: the bucket's count byte in the block.
        unsafe {
            AtomicU8::from_ptr(
                (self.sampler.control() as *mut u8).add(offset_of!(Control, set_counts) + b),
            )
        }
        .load(SeqCst)
    }

    fn set_word(&self, i: usize) -> u64 {
        self.get(offset_of!(Control, set) + 8 * i)
    }

    fn in_set(&self, addr: u64) -> bool {
        let b = bucket_of(addr);
        (0..BUCKET_SLOTS).any(|i| self.set_word(b * BUCKET_SLOTS + i) == addr)
    }

    /// Addresses in the set, counted by the buckets' counts and by their slots.
    fn population(&self) -> (u64, u64) {
        let counted = (0..BUCKETS).map(|b| self.bucket_count(b) as u64).sum();
        let held = (0..SET_CAPACITY).filter(|&i| self.set_word(i) != 0).count() as u64;
        (counted, held)
    }

    fn set_snapshot(&self) -> Vec<u64> {
        (0..BUCKETS)
            .map(|b| self.bucket_count(b) as u64)
            .chain((0..SET_CAPACITY).map(|i| self.set_word(i)))
            .collect()
    }

    fn set_internal(&self, i: usize, start: u64, end: u64) {
        assert!(i < RANGES);
        self.set(offset_of!(Control, internal) + 16 * i, start);
        self.set(offset_of!(Control, internal) + 16 * i + 8, end);
    }

    fn real_at(hook: Hook) -> usize {
        offset_of!(Control, real) + 8 * hook as usize
    }

    fn entry(&self, hook: Hook) -> u64 {
        self.get(offset_of!(Control, entry) + 8 * hook as usize)
    }
}

/// A small deterministic generator for the tests' own choices (sizes, orders).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i as u64 + 1) as usize);
        }
    }
}

fn fill(p: *mut c_void, len: usize, byte: u8) {
    // SAFETY: callers pass a block of at least `len` bytes.
    unsafe { std::ptr::write_bytes(p.cast::<u8>(), byte, len) };
}

fn all_equal(p: *const c_void, len: usize, byte: u8) -> bool {
    // SAFETY: callers pass a block of at least `len` bytes.
    unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) }
        .iter()
        .all(|&b| b == byte)
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Every hook's memory works: written, read back, aligned as asked, resized with its contents,
/// and freed through the free hook; failures fail as glibc's do. Run inert, at a mean that
/// samples every call, and at one that samples none.
fn exercise_every_hook(fx: &Fixture) {
    let h = fx.h;
    // SAFETY: libc's own contracts, through hooks with the same signatures.
    unsafe {
        let p = (h.malloc)(100);
        assert!(!p.is_null(), "malloc(100) returned NULL");
        fill(p, 100, 0xa5);
        let p = (h.realloc)(p, 5000);
        assert!(
            !p.is_null() && all_equal(p, 100, 0xa5),
            "realloc lost the block's bytes"
        );
        let p = (h.reallocarray)(p, 3, 4000);
        assert!(
            !p.is_null() && all_equal(p, 100, 0xa5),
            "reallocarray lost the block's bytes"
        );
        let huge = (h.reallocarray)(p, usize::MAX / 2, 3);
        assert!(
            huge.is_null() && errno() == libc::ENOMEM,
            "reallocarray overflow: {huge:?}"
        );
        assert!(
            all_equal(p, 100, 0xa5),
            "a failed reallocarray touched the block"
        );
        let huge = (h.realloc)(p, 1 << 62);
        assert!(
            huge.is_null() && all_equal(p, 100, 0xa5),
            "a failed realloc lost the block"
        );
        assert!(
            (h.realloc)(p, 0).is_null(),
            "realloc(p, 0) frees p and returns NULL"
        );

        let q = (h.realloc)(std::ptr::null_mut(), 48);
        assert!(!q.is_null(), "realloc(NULL, 48) is malloc(48)");
        (h.free)(q);

        let z = (h.calloc)(300, 7);
        assert!(
            !z.is_null() && all_equal(z, 2100, 0),
            "calloc's block is not zeroed"
        );
        (h.free)(z);
        let over = (h.calloc)(usize::MAX / 2, 3);
        assert!(
            over.is_null() && errno() == libc::ENOMEM,
            "calloc overflow: {over:?}"
        );

        let mut m: *mut c_void = std::ptr::null_mut();
        assert_eq!(
            (h.posix_memalign)(&mut m, 256, 1000),
            0,
            "posix_memalign(256, 1000)"
        );
        assert!(
            !m.is_null() && (m as usize).is_multiple_of(256),
            "posix_memalign gave {m:?}"
        );
        fill(m, 1000, 1);
        (h.free)(m);
        let mut bad: *mut c_void = std::ptr::null_mut();
        assert_eq!(
            (h.posix_memalign)(&mut bad, 24, 10),
            libc::EINVAL,
            "alignment 24"
        );
        assert!(bad.is_null(), "a failed posix_memalign wrote its result");

        for (name, f, align) in [
            ("memalign", h.memalign, 128),
            ("aligned_alloc", h.aligned_alloc, 64),
        ] {
            let a = f(align, 640);
            assert!(
                !a.is_null() && (a as usize).is_multiple_of(align),
                "{name}({align}) gave {a:?}"
            );
            fill(a, 640, 2);
            (h.free)(a);
        }
        for (name, f) in [("valloc", h.valloc), ("pvalloc", h.pvalloc)] {
            let a = f(5000);
            assert!(
                !a.is_null() && (a as usize).is_multiple_of(4096),
                "{name} gave {a:?}"
            );
            fill(a, 5000, 3);
            (h.free)(a);
        }
        (h.free)(std::ptr::null_mut());
    }
}

#[test]
fn memory_from_every_hook_is_usable_inert_sampling_everything_and_sampling_nothing() {
    let fx = Fixture::new(1);
    fx.set(offset_of!(Control, active), 0);
    exercise_every_hook(&fx);
    assert_eq!(
        (
            fx.alloc_hits(),
            fx.free_hits(),
            fx.slot_left(0),
            fx.population()
        ),
        (0, 0, 0, (0, 0)),
        "an inert sampler counted, sampled or kept something"
    );
    assert!(
        (0..SLOTS).all(|i| fx.slot_left(i) == 0),
        "an inert sampler drew a countdown"
    );

    fx.set(offset_of!(Control, active), 1);
    exercise_every_hook(&fx);
    assert!(
        fx.alloc_hits() >= 10,
        "mean 1 sampled only {} calls",
        fx.alloc_hits()
    );
    assert_eq!(
        fx.population(),
        (0, 0),
        "every block was freed, yet the set holds some"
    );
    assert_eq!(fx.counter(counter::SET_FULL), 0);

    let fx = Fixture::new(MAX_MEAN);
    exercise_every_hook(&fx);
    assert_eq!(
        fx.population(),
        (0, 0),
        "every block was freed, yet the set holds some"
    );
}

/// At a mean of one byte every call is sampled, and each event says exactly what happened:
/// the block, the bytes it was asked for (calloc: the product; pvalloc: whole pages), its
/// weight, the function's entry and the caller.
#[test]
fn each_sampled_call_reports_its_block_size_weight_and_caller() {
    let fx = Fixture::new(1);
    let h = fx.h;
    let maps = ProcMaps::read(std::process::id()).expect("read /proc/self/maps");
    let here = maps
        .find(each_sampled_call_reports_its_block_size_weight_and_caller as *const () as u64)
        .expect("this test's code is mapped")
        .clone();
    let local = 0u64;
    let stack = &local as *const u64 as u64;
    let check = |what: &str, hook: Hook, addr: *mut c_void, size: u64, hits_before: u64| {
        assert_eq!(
            fx.alloc_hits(),
            hits_before + 1,
            "{what}: not one alloc event"
        );
        let ev = fx.last_alloc();
        let kind = hook.alloc_kind().expect("an allocating hook") as u32;
        let w = sampling::estimate(size, 1);
        assert_eq!(
            (
                ev.addr,
                ev.size,
                ev.kind,
                ev.flags,
                ev.weight_bytes,
                ev.weight_count
            ),
            (addr as u64, size, kind, 0, w.bytes, w.count),
            "{what}: event {ev:?}"
        );
        assert_eq!(ev.entry, fx.entry(hook), "{what}: entry");
        assert!(
            here.start <= ev.ret_addr && ev.ret_addr < here.end,
            "{what}: return address {:#x} is not in this test's code {:#x}..{:#x}",
            ev.ret_addr,
            here.start,
            here.end
        );
        assert!(
            ev.entry_sp < stack && stack - ev.entry_sp < 1 << 20,
            "{what}: entry sp {:#x} is not just below this frame ({stack:#x})",
            ev.entry_sp
        );
        assert!(
            fx.in_set(addr as u64),
            "{what}: the block is not in the set"
        );
    };
    // SAFETY: libc's contracts, through the hooks.
    unsafe {
        let hits = fx.alloc_hits();
        let p = (h.malloc)(100);
        check("malloc", Hook::Malloc, p, 100, hits);
        let hits = fx.alloc_hits();
        let c = (h.calloc)(30, 7);
        check("calloc", Hook::Calloc, c, 210, hits);
        let hits = fx.alloc_hits();
        let v = (h.pvalloc)(5000);
        check("pvalloc", Hook::Pvalloc, v, 8192, hits);
        let hits = fx.alloc_hits();
        let mut m: *mut c_void = std::ptr::null_mut();
        assert_eq!((h.posix_memalign)(&mut m, 64, 333), 0);
        check("posix_memalign", Hook::PosixMemalign, m, 333, hits);
        let hits = fx.alloc_hits();
        let a = (h.aligned_alloc)(64, 128);
        check("aligned_alloc", Hook::AlignedAlloc, a, 128, hits);

        for (what, block) in [
            ("malloc", p),
            ("calloc", c),
            ("pvalloc", v),
            ("posix_memalign", m),
            ("aligned_alloc", a),
        ] {
            let frees = fx.free_hits();
            (h.free)(block);
            let ev = fx.last_free();
            assert_eq!(
                fx.free_hits(),
                frees + 1,
                "free of {what}'s block: not one free event"
            );
            assert_eq!(
                (ev.addr, ev.kind, ev.flags, ev.entry),
                (block as u64, KIND_FREE, 0, fx.entry(Hook::Free)),
                "free of {what}'s block: {ev:?}"
            );
            assert!(
                !fx.in_set(block as u64),
                "{what}'s block is still in the set"
            );
        }
        // A failed allocation is sampled (the countdown does not know) but not reported.
        let hits = fx.alloc_hits();
        assert!((h.malloc)(1 << 62).is_null());
        assert_eq!(fx.alloc_hits(), hits, "a failed malloc was reported");
        assert_eq!(fx.counter(counter::FAILED_ALLOCS), 1);
    }
}

/// realloc as the kernel sampler treats it: the old block (if sampled) is taken out and held
/// before the real call, then released or kept by the alloc event after it.
#[test]
fn realloc_holds_the_sampled_block_then_releases_or_keeps_it() {
    let fx = Fixture::new(1);
    let h = fx.h;
    // SAFETY: libc's contracts, through the hooks.
    unsafe {
        let p = (h.malloc)(64);
        assert!(fx.in_set(p as u64));
        let (allocs, frees) = (fx.alloc_hits(), fx.free_hits());
        let q = (h.realloc)(p, 10_000);
        assert!(!q.is_null());
        assert_eq!((fx.alloc_hits(), fx.free_hits()), (allocs + 1, frees + 1));
        let held = fx.last_free();
        assert_eq!(
            (held.addr, held.kind, held.flags),
            (p as u64, KIND_FREE, flags::HOLD)
        );
        let ev = fx.last_alloc();
        assert_eq!(
            (ev.addr, ev.size, ev.kind, ev.flags),
            (
                q as u64,
                10_000,
                AllocKind::Realloc as u32,
                flags::OLD_RELEASED
            )
        );
        assert!(fx.in_set(q as u64) && (p == q || !fx.in_set(p as u64)));

        // A realloc that fails keeps the block: back in the set, and said so.
        let r = (h.realloc)(q, 1 << 62);
        assert!(r.is_null());
        let ev = fx.last_alloc();
        assert_eq!(fx.last_free().flags, flags::HOLD);
        assert_eq!(ev.flags, flags::OLD_KEPT | flags::NOT_SAMPLED, "{ev:?}");
        assert!(fx.in_set(q as u64), "the kept block left the set");

        // Unsampled now (a mean no call reaches): the block still settles.
        fx.set(offset_of!(Control, mean), MAX_MEAN);
        fx.reset_slots();
        let allocs = fx.alloc_hits();
        let s = (h.reallocarray)(q, 10, 3000);
        assert!(!s.is_null());
        assert_eq!(fx.alloc_hits(), allocs + 1);
        let ev = fx.last_alloc();
        assert_eq!(
            (ev.kind, ev.flags),
            (
                AllocKind::Reallocarray as u32,
                flags::OLD_RELEASED | flags::NOT_SAMPLED
            )
        );
        assert_eq!(fx.population(), (0, 0));
        (h.free)(s);

        // realloc(p, 0) releases p and returns NULL.
        fx.set(offset_of!(Control, mean), 1);
        let t = (h.malloc)(64);
        assert!((h.realloc)(t, 0).is_null());
        assert_eq!(
            fx.last_alloc().flags,
            flags::OLD_RELEASED | flags::NOT_SAMPLED
        );
        assert_eq!(fx.population(), (0, 0));
    }
}

/// Chernoff bound on P(|X - T| >= tol * T), X the estimate of a total T from a mix of
/// (size, count) calls, each sampled independently with p = 1 - exp(-size/mean) and then
/// standing for w/p (w: its size for bytes, 1 for calls).
fn chernoff(mix: &[(u64, u64)], count_calls: bool, mean: f64, tol: f64) -> f64 {
    let terms: Vec<(f64, f64, f64)> = mix
        .iter()
        .map(|&(s, c)| {
            let w = if count_calls { 1.0 } else { s as f64 };
            (w, -(-(s as f64) / mean).exp_m1(), c as f64)
        })
        .collect();
    let total: f64 = terms.iter().map(|(w, _, c)| w * c).sum();
    let largest = terms.iter().map(|&(w, p, _)| w / p).fold(0.0, f64::max);
    let mut bound = 0.0;
    for sign in [1.0, -1.0] {
        // log E[exp(sign * lam * (X - T))] - lam * tol * T is convex in lam.
        let exponent = |lam: f64| {
            terms
                .iter()
                .map(|&(w, p, c)| {
                    let (hit, miss) = (sign * lam * (w / p - w), -sign * lam * w);
                    let m = hit.max(miss);
                    c * (m + (p * (hit - m).exp() + (1.0 - p) * (miss - m).exp()).ln())
                })
                .sum::<f64>()
                - lam * tol * total
        };
        let (mut lo, mut hi) = (0.0, 64.0 / largest);
        for _ in 0..200 {
            let (a, b) = (lo + (hi - lo) / 3.0, hi - (hi - lo) / 3.0);
            if exponent(a) < exponent(b) {
                hi = b;
            } else {
                lo = a;
            }
        }
        bound += exponent((lo + hi) / 2.0).exp().min(1.0);
    }
    bound
}

/// The smallest relative tolerance whose false-failure bound is at most `budget`.
fn tolerance(mix: &[(u64, u64)], count_calls: bool, mean: f64, budget: f64) -> f64 {
    let (mut lo, mut hi) = (0.0, 4.0);
    for _ in 0..40 {
        let mid = (lo + hi) / 2.0;
        if chernoff(mix, count_calls, mean, mid) <= budget {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

/// The calls of the statistics tests: (size, calls), a million in all, from 16 bytes to four
/// times the mean (which glibc serves from mmap at first).
const MIX: [(u64, u64); 8] = [
    (16, 400_000),
    (64, 250_000),
    (256, 150_000),
    (1024, 100_000),
    (4096, 60_000),
    (16 << 10, 30_000),
    (64 << 10, 8_000),
    (256 << 10, 2_000),
];

/// Each statistics test checks every class and the total, bytes and calls: the chance that
/// either test fails by bad luck stays below 1e-6 in all.
const BUDGET: f64 = 1e-6 / (2.0 * 2.0 * (MIX.len() as f64 + 1.0));

/// What a statistics run saw per class: sampled calls and the sum of their weights.
#[derive(Clone, Copy, Default, Debug)]
struct Tally {
    sampled: u64,
    bytes: u64,
    count: u64,
}

fn shuffled_sizes(mix: &[(u64, u64)], seed: u64) -> Vec<u64> {
    let mut sizes: Vec<u64> = mix
        .iter()
        .flat_map(|&(s, c)| std::iter::repeat_n(s, c as usize))
        .collect();
    Rng(seed).shuffle(&mut sizes);
    sizes
}

/// Compares the estimates with the truth, class by class and in total.
fn check_estimates(what: &str, mix: &[(u64, u64)], tallies: &[Tally]) {
    let mean = MEAN as f64;
    let unit = (1u64 << COUNT_SHIFT) as f64;
    let mut report = Vec::new();
    let mut failed = false;
    for (&(size, calls), t) in mix.iter().zip(tallies) {
        let class = [(size, calls)];
        let (tol_b, tol_c) = (
            tolerance(&class, false, mean, BUDGET),
            tolerance(&class, true, mean, BUDGET),
        );
        let truth_b = (size * calls) as f64;
        let err_b = t.bytes as f64 / truth_b - 1.0;
        let err_c = t.count as f64 / unit / calls as f64 - 1.0;
        let p = -(-(size as f64) / mean).exp_m1();
        // The weights' tables are exact to 4e-5; the bound is on the sampling alone.
        let bad = err_b.abs() > tol_b + 1e-4 || err_c.abs() > tol_c + 1e-4;
        failed |= bad;
        report.push(format!(
            "{size:>7} B x {calls:>6}: sampled {:>5} (expected {:>8.1}), bytes {:+.4} (allowed \
             {tol_b:.4}), calls {:+.4} (allowed {tol_c:.4}){}",
            t.sampled,
            calls as f64 * p,
            err_b,
            err_c,
            if bad { "  <-- outside" } else { "" }
        ));
    }
    let truth_b: f64 = mix.iter().map(|&(s, c)| (s * c) as f64).sum();
    let truth_c: f64 = mix.iter().map(|&(_, c)| c as f64).sum();
    let (tol_b, tol_c) = (
        tolerance(mix, false, mean, BUDGET),
        tolerance(mix, true, mean, BUDGET),
    );
    let err_b = tallies.iter().map(|t| t.bytes as f64).sum::<f64>() / truth_b - 1.0;
    let err_c = tallies.iter().map(|t| t.count as f64).sum::<f64>() / unit / truth_c - 1.0;
    let bad = err_b.abs() > tol_b + 1e-4 || err_c.abs() > tol_c + 1e-4;
    failed |= bad;
    report.push(format!(
        "all: bytes {err_b:+.4} (allowed {tol_b:.4}), calls {err_c:+.4} (allowed {tol_c:.4}){}",
        if bad { "  <-- outside" } else { "" }
    ));
    assert!(
        !failed,
        "{what}: estimates outside their bounds\n{}",
        report.join("\n")
    );
    eprintln!("{what}:\n{}", report.join("\n"));
}

/// A million malloc+free pairs of mixed sizes at a 64 KiB mean on one thread: per size class,
/// the number of sampled calls and the sums of their weights (bytes and calls) estimate the
/// truth within bounds that fail by chance less than once in a million runs, and every event
/// weighs exactly what `sampling::estimate` says.
#[test]
fn sampled_counts_and_weights_estimate_every_size_class() {
    let fx = Fixture::new(MEAN);
    let h = fx.h;
    let sizes = shuffled_sizes(&MIX, 0x1234_5678_9abc_def1);
    let mut tallies = [Tally::default(); MIX.len()];
    for &size in &sizes {
        let class = MIX
            .iter()
            .position(|&(s, _)| s == size)
            .expect("a size of the mix");
        let hits = fx.alloc_hits();
        // SAFETY: libc's contracts, through the hooks.
        let p = unsafe { (h.malloc)(size as usize) };
        assert!(!p.is_null());
        let sampled = fx.alloc_hits() != hits;
        assert_eq!(
            fx.in_set(p as u64),
            sampled,
            "set membership differs from the event"
        );
        if sampled {
            let ev = fx.last_alloc();
            let w = sampling::estimate(size, MEAN);
            assert_eq!(
                (ev.addr, ev.size, ev.weight_bytes, ev.weight_count),
                (p as u64, size, w.bytes, w.count)
            );
            let t = &mut tallies[class];
            t.sampled += 1;
            t.bytes += ev.weight_bytes;
            t.count += ev.weight_count;
        }
        let frees = fx.free_hits();
        // SAFETY: as above.
        unsafe { (h.free)(p) };
        assert_eq!(
            fx.free_hits(),
            frees + sampled as u64,
            "free events differ from samples"
        );
    }
    assert_eq!(fx.population(), (0, 0));
    check_estimates("one thread", &MIX, &tallies);
}

/// The same mix from four threads that all share one countdown slot (slot mask 0): their
/// merged byte stream must sample as one thread's does, so the estimates keep the same bounds.
/// Whether a call was sampled is read from the set, which holds the block until its free.
#[test]
fn threads_sharing_one_countdown_sample_like_one_thread() {
    const THREADS: u64 = 4;
    let fx = Fixture::new(MEAN);
    fx.set(offset_of!(Control, slot_mask), 0);
    let h = fx.h;
    let quarter: Vec<(u64, u64)> = MIX.iter().map(|&(s, c)| (s, c / THREADS)).collect();
    let per_thread: Vec<Vec<Tally>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let (fx, quarter) = (&fx, &quarter);
                scope.spawn(move || {
                    let mut tallies = vec![Tally::default(); MIX.len()];
                    for size in shuffled_sizes(quarter, 0x9e37_79b9 + t) {
                        let class = MIX.iter().position(|&(s, _)| s == size).expect("a size");
                        // SAFETY: libc's contracts, through the hooks.
                        let p = unsafe { (h.malloc)(size as usize) };
                        assert!(!p.is_null());
                        if fx.in_set(p as u64) {
                            let w = sampling::estimate(size, MEAN);
                            let t = &mut tallies[class];
                            t.sampled += 1;
                            t.bytes += w.bytes;
                            t.count += w.count;
                        }
                        // SAFETY: as above.
                        unsafe { (h.free)(p) };
                    }
                    tallies
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("worker"))
            .collect()
    });
    let mut tallies = [Tally::default(); MIX.len()];
    for t in per_thread {
        for (sum, t) in tallies.iter_mut().zip(t) {
            sum.sampled += t.sampled;
            sum.bytes += t.bytes;
            sum.count += t.count;
        }
    }
    let sampled: u64 = tallies.iter().map(|t| t.sampled).sum();
    assert_eq!(
        fx.alloc_hits(),
        sampled,
        "alloc events differ from blocks found in the set"
    );
    assert_eq!(
        fx.free_hits(),
        sampled,
        "free events differ from sampled blocks"
    );
    assert!(fx.slot_left(0) != 0, "the shared slot was never drawn");
    assert!(
        (1..SLOTS).all(|i| fx.slot_left(i) == 0),
        "a thread used a slot of its own"
    );
    assert_eq!(fx.population(), (0, 0));
    let all: Vec<(u64, u64)> = quarter.iter().map(|&(s, c)| (s, c * THREADS)).collect();
    check_estimates("four threads on one slot", &all, &tallies);
}

/// The set holds exactly the sampled blocks that are live: frees of unsampled blocks leave it
/// byte for byte as it was and call no probe site; each sampled block's free finds it, takes
/// it out and calls the free site once. (About 3,000 sampled blocks in 4,096 buckets of 8: a
/// bucket may still overflow, and such a block must then be reported untracked.)
#[test]
fn the_set_holds_exactly_the_live_sampled_blocks() {
    let fx = Fixture::new(4096);
    let h = fx.h;
    let mut rng = Rng(77);
    let mut blocks = Vec::new();
    let mut untracked = 0;
    for _ in 0..10_000 {
        let size = 16 + rng.below(4096) as usize;
        let hits = fx.alloc_hits();
        // SAFETY: libc's contracts, through the hooks.
        let p = unsafe { (h.malloc)(size) };
        let tracked = fx.in_set(p as u64);
        let reported = fx.alloc_hits() - hits;
        let ev = fx.last_alloc();
        let lost = reported == 1 && ev.addr == p as u64 && ev.flags == flags::UNTRACKED;
        untracked += lost as u64;
        assert_eq!(
            reported,
            (tracked || lost) as u64,
            "the alloc site missed or added an event"
        );
        blocks.push((p, tracked));
    }
    assert_eq!(fx.counter(counter::SET_FULL), untracked);
    let sampled = blocks.iter().filter(|b| b.1).count() as u64;
    assert!(
        sampled > 1000,
        "only {sampled} of 10000 blocks sampled at a 4 KiB mean"
    );
    assert_eq!(fx.population(), (sampled, sampled));
    rng.shuffle(&mut blocks);

    let before = fx.set_snapshot();
    let frees = fx.free_hits();
    for &(p, _) in blocks.iter().filter(|b| !b.1) {
        // SAFETY: as above.
        unsafe { (h.free)(p) };
    }
    assert_eq!(
        fx.free_hits(),
        frees,
        "a free of an unsampled block reached the free site"
    );
    assert!(
        fx.set_snapshot() == before,
        "a free of an unsampled block changed the set"
    );

    for &(p, _) in blocks.iter().filter(|b| b.1) {
        let frees = fx.free_hits();
        // SAFETY: as above.
        unsafe { (h.free)(p) };
        assert_eq!(fx.free_hits(), frees + 1);
        assert_eq!(fx.last_free().addr, p as u64);
        assert!(!fx.in_set(p as u64));
    }
    assert_eq!(fx.population(), (0, 0));
}

/// More sampled live blocks than the set holds: the ones that do not fit are reported as
/// untracked and counted, the set stays consistent, and every tracked one is found on free.
#[test]
fn a_full_set_counts_its_losses_and_still_finds_what_it_holds() {
    let fx = Fixture::new(1);
    let h = fx.h;
    let n = SET_CAPACITY + SET_CAPACITY / 4;
    let mut untracked = 0u64;
    let mut blocks = Vec::with_capacity(n);
    for _ in 0..n {
        // SAFETY: libc's contracts, through the hooks.
        let p = unsafe { (h.malloc)(64) };
        let ev = fx.last_alloc();
        assert_eq!(
            ev.addr, p as u64,
            "64 bytes at a 1-byte mean must be sampled"
        );
        untracked += (ev.flags & flags::UNTRACKED != 0) as u64;
        assert_eq!(ev.flags & flags::UNTRACKED == 0, fx.in_set(p as u64));
        blocks.push(p);
    }
    let (counted, held) = fx.population();
    assert_eq!(fx.counter(counter::SET_FULL), untracked);
    assert!(
        untracked >= (n - SET_CAPACITY) as u64,
        "{untracked} losses for {n} blocks"
    );
    assert_eq!(
        (counted, held),
        (n as u64 - untracked, n as u64 - untracked)
    );
    for p in blocks {
        // SAFETY: as above.
        unsafe { (h.free)(p) };
    }
    assert_eq!(fx.free_hits(), n as u64 - untracked);
    assert_eq!(fx.population(), (0, 0));
}

/// Calls from the allocator's own code pass through: with `internal` covering this test's code
/// nothing is counted, sampled or drawn. Blocks already sampled still leave the set when such a
/// call frees or resizes them.
#[test]
fn calls_from_the_allocators_own_code_pass_through() {
    let fx = Fixture::new(1);
    let h = fx.h;
    let maps = ProcMaps::read(std::process::id()).expect("read /proc/self/maps");
    let here = maps
        .find(calls_from_the_allocators_own_code_pass_through as *const () as u64)
        .expect("this test's code is mapped")
        .clone();
    // SAFETY: libc's contracts, through the hooks.
    let (p, q) = unsafe { ((h.malloc)(64), (h.malloc)(64)) };
    assert!(fx.in_set(p as u64) && fx.in_set(q as u64));
    let (allocs, frees) = (fx.alloc_hits(), fx.free_hits());
    let slots: Vec<u64> = (0..SLOTS).map(|i| fx.slot_left(i)).collect();

    fx.set_internal(RANGES - 1, here.start, here.end);
    // SAFETY: as above.
    let r = unsafe {
        (h.free)(p);
        (h.realloc)(q, 1000)
    };
    assert_eq!((fx.free_hits(), fx.last_free().addr), (frees + 2, q as u64));
    let ev = fx.last_alloc();
    assert_eq!(fx.alloc_hits(), allocs + 1, "not one settling event");
    assert_eq!(ev.flags, flags::OLD_RELEASED | flags::NOT_SAMPLED);
    assert_eq!(
        fx.population(),
        (0, 0),
        "internal calls left sampled blocks in the set"
    );
    // SAFETY: as above.
    unsafe { (h.free)(r) };

    let (allocs, frees) = (fx.alloc_hits(), fx.free_hits());
    exercise_every_hook(&fx);
    assert_eq!(
        (fx.alloc_hits(), fx.free_hits(), fx.population()),
        (allocs, frees, (0, 0)),
        "an internal call was counted"
    );
    assert!(
        (0..SLOTS).all(|i| fx.slot_left(i) == slots[i]),
        "an internal call moved a countdown"
    );
    fx.set_internal(RANGES - 1, 0, 0);
    // SAFETY: as above.
    unsafe { (h.free)((h.malloc)(64)) };
    assert_eq!(
        (fx.alloc_hits(), fx.free_hits()),
        (allocs + 1, frees + 1),
        "an empty range still matched"
    );
}

/// The malloc hook of `a_tail_call_from_a_real_function_into_another_hook_counts_once`.
static MALLOC_HOOK: AtomicUsize = AtomicUsize::new(0);
std::arch::global_asm!(
    ".pushsection .text.tracer_test_tail_realloc,\"ax\",@progbits",
    ".globl tracer_test_tail_realloc",
    "tracer_test_tail_realloc:",
    // realloc(NULL, n) -> malloc(n): the size moves to the first argument.
    "mov rdi, rsi",
    "jmp qword ptr [rip + {hook}]",
    ".popsection",
    hook = sym MALLOC_HOOK,
);
unsafe extern "C" {
    fn tracer_test_tail_realloc(p: *mut c_void, n: usize) -> *mut c_void;
}

/// Where a real function tail-jumps to another hooked one: realloc(NULL, n) -> malloc in
/// glibc. Simulated: realloc's "real" function jumps to the malloc hook, which then sees a
/// return address inside the sampler and must pass through, so the call counts once.
#[test]
fn a_tail_call_from_a_real_function_into_another_hook_counts_once() {
    let fx = Fixture::new(1);
    MALLOC_HOOK.store(fx.sampler.hook(Hook::Malloc) as usize, SeqCst);
    fx.set(
        Fixture::real_at(Hook::Realloc),
        tracer_test_tail_realloc as *const () as u64,
    );
    // SAFETY: libc's contracts, through the hooks (realloc(NULL, n) is malloc(n)).
    let p = unsafe { (fx.h.realloc)(std::ptr::null_mut(), 64) };
    assert!(!p.is_null());
    assert_eq!(fx.alloc_hits(), 1, "the nested malloc was counted too");
    let ev = fx.last_alloc();
    assert_eq!((ev.addr, ev.kind), (p as u64, AllocKind::Realloc as u32));
    // SAFETY: as above.
    unsafe { (fx.h.free)(p) };
    assert_eq!(fx.free_hits(), 1);
}

/// What the loader relies on: the object has no relocations to apply, its probe sites are
/// distinct functions, and the control block it maps starts identified and inert.
#[test]
fn the_embedded_object_is_self_contained_and_starts_inert() {
    let image = image().expect("the embedded sampler parses");
    assert!(
        image.relative.is_empty(),
        "relocations appeared: {:?}",
        image.relative
    );
    assert_ne!(image.alloc_site, image.free_site);
    let s = LocalSampler::load().expect("load");
    // SAFETY: a freshly loaded block, which no thread uses but this one.
    let c = unsafe { std::ptr::read_volatile(s.control()) };
    assert_eq!(
        (c.magic, c.version, c.active),
        (
            tracer_common::sampler::MAGIC,
            tracer_common::sampler::VERSION,
            0
        )
    );
    assert_eq!(c.control_size as usize, std::mem::size_of::<Control>());
    assert_eq!(c.slot_mask, SLOTS as u64 - 1);
    // Each probe site is a function of its own that only counts its calls.
    let ev = SampledCall {
        addr: 42,
        ..SampledCall::ZERO
    };
    // SAFETY: the probe sites' signature.
    unsafe {
        std::mem::transmute::<u64, extern "C" fn(*const SampledCall)>(s.alloc_site())(&ev);
        std::mem::transmute::<u64, extern "C" fn(*const SampledCall)>(s.free_site())(&ev);
        std::mem::transmute::<u64, extern "C" fn(*const SampledCall)>(s.free_site())(&ev);
    }
    // SAFETY: as above.
    let c = unsafe { std::ptr::read_volatile(s.control()) };
    assert_eq!(
        (
            c.counters[counter::ALLOC_SITE],
            c.counters[counter::FREE_SITE],
            c.last_alloc.addr
        ),
        (1, 2, 42)
    );
}

/// A memfd holding the embedded sampler.
fn sampler_memfd() -> std::os::fd::OwnedFd {
    use std::{io::Write as _, os::fd::FromRawFd as _};
    // SAFETY: memfd_create with a NUL-terminated name; the fd is new and ours.
    let fd = unsafe { libc::memfd_create(c"tracer-sampler-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(sampler_so()).expect("write the sampler to its memfd");
    file.into()
}

#[test]
fn sampler_mapped_from_a_file_samples_like_the_copied_one() {
    use std::os::fd::AsFd as _;
    let fd = sampler_memfd();
    let sampler = LocalSampler::load_from_file(fd.as_fd()).expect("map the sampler from its memfd");
    // SAFETY: the control block of the mapping just made.
    let (magic, size) = unsafe { ((*sampler.control()).magic, (*sampler.control()).control_size) };
    assert_eq!((magic, size as usize), (tracer_common::sampler::MAGIC, size_of::<Control>()));
    // Its code pages are the memfd's (a uprobe on the file fires there).
    let maps = std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
    let code = sampler.base() + sampler.image().alloc_site;
    let line = maps
        .lines()
        .find(|l| {
            let (range, _) = l.split_once(' ').unwrap_or_default();
            let (start, end) = range.split_once('-').unwrap_or_default();
            let (start, end) = (u64::from_str_radix(start, 16).unwrap_or(0), u64::from_str_radix(end, 16).unwrap_or(0));
            (start..end).contains(&code)
        })
        .expect("the alloc site is mapped");
    assert!(line.contains("r-xp") && line.contains("memfd:tracer-sampler-test"), "{line}");
    let file_offset = super::file_offset(sampler.image(), sampler.image().alloc_site).expect("in the file");
    assert_eq!(sampler_so()[file_offset as usize], 0x55, "the site starts with push %rbp in the file");

    sampler.use_libc().expect("find libc's allocator");
    // SAFETY: words of the block; no hook runs yet.
    unsafe {
        (*sampler.control()).mean = 1;
        (*sampler.control()).active = 1;
    }
    // SAFETY: the hooks of malloc and free, with their signatures.
    let (malloc, free) = unsafe {
        (
            std::mem::transmute::<u64, MallocFn>(sampler.hook(Hook::Malloc)),
            std::mem::transmute::<u64, FreeFn>(sampler.hook(Hook::Free)),
        )
    };
    // SAFETY: malloc and free as libc documents them.
    unsafe {
        let p = malloc(4096);
        assert!(!p.is_null());
        free(p);
    }
    // A mean of one byte samples a 4 KiB block for sure.
    let c = unsafe { (*sampler.control()).counters };
    assert_eq!((c[counter::ALLOC_SITE], c[counter::FREE_SITE]), (1, 1), "counters {c:?}");
}
