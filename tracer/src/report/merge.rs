//! One rule for what a stack is, used by every report, `diff` and the `--interval` series:
//! two kernel stacks are one code path when their named frames have the same [`FrameKey`]s.
//! Merging sums their figures; ranking orders stacks by a [`Metric`] before the top N is cut.
use std::collections::HashMap;
use std::hash::Hash;

use super::{Frame, Stack, folded::Metric};
use crate::symbolize::FrameKind;

/// What identifies one frame of a code path. Nothing in it depends on where a module was
/// loaded or on the host's paths to it, so two runs (or two hosts) of a program agree.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrameKey {
    /// A named frame of code from a file: the module's file name, function, source file,
    /// line and whether it was inlined. Two call sites on one line are one frame.
    Native {
        module: Option<String>,
        function: String,
        file: Option<String>,
        line: Option<u32>,
        inlined: bool,
    },
    /// A named JIT frame: function, script and the line where the function starts (what a
    /// perf map gives), never the address: a function's interpreted and optimized copies,
    /// or code regenerated elsewhere, are one frame.
    Jit {
        function: String,
        script: Option<String>,
        line: Option<u32>,
    },
    /// A JIT frame that nothing named: only its address tells it apart.
    JitAddress(u64),
    /// An unnamed frame: its module's file name and file offset (the address when no module
    /// covers it).
    Place { module: Option<String>, offset: u64 },
}

/// The file name of a module path: `/usr/lib/x86_64-linux-gnu/libc.so.6` -> `libc.so.6`.
pub fn module_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

impl FrameKey {
    pub fn of(f: &Frame) -> FrameKey {
        let module = || f.module.as_deref().map(|m| module_name(m).to_owned());
        match (&f.function, f.kind) {
            (Some(function), FrameKind::Jit | FrameKind::Js) => FrameKey::Jit {
                function: function.clone(),
                script: f.file.clone(),
                line: f.line,
            },
            (Some(function), _) => FrameKey::Native {
                module: module(),
                function: function.clone(),
                file: f.file.clone(),
                line: f.line,
                inlined: f.inlined,
            },
            (None, FrameKind::Jit) => FrameKey::JitAddress(f.address),
            (None, _) => FrameKey::Place {
                module: module(),
                offset: f.offset,
            },
        }
    }
}

/// Small integers for values seen many times (frame keys), so that a stack's key is a short
/// vector of numbers.
#[derive(Debug)]
pub struct Interner<K> {
    ids: HashMap<K, u32>,
}

impl<K> Default for Interner<K> {
    fn default() -> Self {
        Interner {
            ids: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq> Interner<K> {
    pub fn id(&mut self, key: K) -> u32 {
        let next = self.ids.len() as u32;
        *self.ids.entry(key).or_insert(next)
    }
}

/// How big a stack is when choosing whose frames a merged stack shows: what it holds, then
/// what it allocated.
fn size(s: &Stack) -> (u64, u64, u64) {
    (Metric::Held.of(s), s.alloc_bytes, s.allocs)
}

fn add_options(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    }
}

/// Adds `other`'s figures to `into` (frames stay `into`'s): counts and bytes summed, peaks
/// summed (an upper bound of the merged peak: the variants need not peak at once), series
/// added point by point and growth taken from the summed series.
pub fn absorb(into: &mut Stack, other: &Stack) {
    into.live_bytes += other.live_bytes;
    into.live_allocs += other.live_allocs;
    into.alloc_bytes += other.alloc_bytes;
    into.allocs += other.allocs;
    into.peak_bytes += other.peak_bytes;
    into.variants += other.variants;
    into.reserved_bytes = add_options(into.reserved_bytes, other.reserved_bytes);
    into.resident_bytes = add_options(into.resident_bytes, other.resident_bytes);
    into.class = match (into.class.take(), &other.class) {
        (Some(a), Some(b)) if a != *b => Some("mixed".to_owned()),
        (a, b) => a.or_else(|| b.clone()),
    };
    if into.series.len() < other.series.len() {
        into.series.resize(other.series.len(), 0);
    }
    for (sum, point) in into.series.iter_mut().zip(&other.series) {
        *sum += point;
    }
    into.growth_bytes = match (into.series.first(), into.series.last()) {
        (Some(&first), Some(&last)) => last as i64 - first as i64,
        _ => into.growth_bytes + other.growth_bytes,
    };
}

/// Groups stacks by key, summing each group into its first member; the frames shown are
/// those of the group's largest member (by what it holds, then what it allocated). The
/// result keeps the order in which groups were first seen.
pub fn merge_by<K: Hash + Eq>(stacks: Vec<Stack>, mut key: impl FnMut(&Stack) -> K) -> Vec<Stack> {
    let mut index: HashMap<K, usize> = HashMap::new();
    let mut merged: Vec<Stack> = Vec::with_capacity(stacks.len());
    // Size of the member whose frames each merged stack shows.
    let mut shown: Vec<(u64, u64, u64)> = Vec::with_capacity(stacks.len());
    for stack in stacks {
        match index.entry(key(&stack)) {
            std::collections::hash_map::Entry::Occupied(e) => {
                let i = *e.get();
                absorb(&mut merged[i], &stack);
                if size(&stack) > shown[i] {
                    shown[i] = size(&stack);
                    merged[i].frames = stack.frames;
                }
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(merged.len());
                shown.push(size(&stack));
                merged.push(stack);
            }
        }
    }
    merged
}

/// Merges stacks whose frames are already named: one stack per code path (source and frame
/// keys). Merging merged stacks again changes nothing.
pub fn merge(stacks: Vec<Stack>) -> Vec<Stack> {
    let mut frames: Interner<FrameKey> = Interner::default();
    merge_by(stacks, |s| {
        let ids: Vec<u32> = s
            .frames
            .iter()
            .map(|f| frames.id(FrameKey::of(f)))
            .collect();
        (s.source, ids)
    })
}

/// The order of `stacks` by `metric`, largest first; ties by what they hold, then what they
/// allocated, then their order in `stacks`.
pub fn rank_order(stacks: &[Stack], metric: Metric) -> Vec<usize> {
    let mut order: Vec<usize> = (0..stacks.len()).collect();
    order.sort_by_key(|&i| {
        let s = &stacks[i];
        std::cmp::Reverse((metric.of(s), Metric::Held.of(s), s.alloc_bytes, s.allocs))
    });
    order
}

/// `stacks` ranked by `metric`, the first `top` kept (0: all).
pub fn rank(stacks: Vec<Stack>, metric: Metric, top: usize) -> Vec<Stack> {
    let order = rank_order(&stacks, metric);
    let keep = if top == 0 {
        order.len()
    } else {
        top.min(order.len())
    };
    let mut slots: Vec<Option<Stack>> = stacks.into_iter().map(Some).collect();
    order[..keep]
        .iter()
        .map(|&i| slots[i].take().expect("each index once"))
        .collect()
}

/// The stacks of a saved report merged by the rule (reports written before it, or named
/// again with `--resymbolize`), ranked by `metric`. `stacks_total` loses the stacks merged
/// away; stacks the report left out stay counted as they were.
pub fn remerge(report: &mut super::Report, metric: Metric) {
    let before = report.stacks.len();
    let merged = merge(std::mem::take(&mut report.stacks));
    report.stacks_total = report.stacks_total.saturating_sub(before - merged.len());
    report.stacks = rank(merged, metric, 0);
    report.metric = metric;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::Source;
    use crate::report::folded::tests::{frame, stack};

    fn jit(function: Option<&str>, address: u64) -> Frame {
        let mut f = frame(function, None, 0);
        f.kind = FrameKind::Jit;
        f.address = address;
        f.file = function.map(|_| "/srv/app.js".to_owned());
        f.line = function.map(|_| 12);
        f
    }

    fn with_line(mut f: Frame, line: u32) -> Frame {
        f.file = Some("/src/app.c".to_owned());
        f.line = Some(line);
        f
    }

    #[test]
    fn one_line_two_call_sites_merge_with_exact_sums() {
        let libc = Some("/lib/libc.so.6");
        let mut a = stack(
            100,
            300,
            vec![
                frame(Some("malloc"), libc, 1),
                with_line(frame(Some("pick"), Some("/bin/app"), 0x20), 7),
            ],
        );
        a.peak_bytes = 150;
        let mut b = stack(
            1000,
            1000,
            vec![
                frame(Some("malloc"), libc, 1),
                // Another call instruction on the same line.
                with_line(frame(Some("pick"), Some("/bin/app"), 0x34), 7),
            ],
        );
        b.peak_bytes = 1000;
        let other_line = stack(
            5,
            5,
            vec![
                frame(Some("malloc"), libc, 1),
                with_line(frame(Some("pick"), Some("/bin/app"), 0x50), 9),
            ],
        );
        let merged = merge(vec![a, b, other_line]);
        assert_eq!(merged.len(), 2, "{merged:#?}");
        let m = &merged[0];
        assert_eq!(
            (
                m.live_bytes,
                m.alloc_bytes,
                m.allocs,
                m.live_allocs,
                m.peak_bytes,
                m.variants
            ),
            (1100, 1300, 4, 2, 1150, 2)
        );
        // The frames of the larger variant.
        assert_eq!(m.frames[1].offset, 0x34);
        assert_eq!(merged[1].variants, 1);
        // Merging again is a no-op.
        let again = merge(merged.clone());
        assert_eq!(again.len(), 2);
        assert_eq!(again[0].variants, 2);
    }

    #[test]
    fn jit_frames_merge_by_function_script_and_line_not_address() {
        let node = Some("/usr/bin/node");
        let interpreted = stack(
            10,
            10,
            vec![
                frame(Some("calloc"), node, 1),
                jit(Some("retain"), 0x7f00_0000_1000),
            ],
        );
        let optimized = stack(
            20,
            20,
            vec![
                frame(Some("calloc"), node, 1),
                jit(Some("retain"), 0x7f00_0009_0000),
            ],
        );
        let unnamed_a = stack(
            1,
            1,
            vec![frame(Some("calloc"), node, 1), jit(None, 0x7f00_0000_2000)],
        );
        let unnamed_b = stack(
            1,
            1,
            vec![frame(Some("calloc"), node, 1), jit(None, 0x7f00_0000_3000)],
        );
        let merged = merge(vec![interpreted, optimized, unnamed_a, unnamed_b]);
        assert_eq!(
            merged
                .iter()
                .map(|s| (s.live_bytes, s.variants))
                .collect::<Vec<_>>(),
            vec![(30, 2), (1, 1), (1, 1)],
            "unnamed JIT frames keep their addresses apart"
        );
    }

    #[test]
    fn unnamed_frames_merge_by_module_and_offset_and_sources_stay_apart() {
        let a = stack(1, 1, vec![frame(None, Some("/lib/a.so"), 0x10)]);
        let same_place = stack(2, 2, vec![frame(None, Some("/other/path/a.so"), 0x10)]);
        let elsewhere = stack(4, 4, vec![frame(None, Some("/lib/a.so"), 0x11)]);
        let mut mapped = stack(8, 8, vec![frame(None, Some("/lib/a.so"), 0x10)]);
        mapped.source = Source::Mmap;
        mapped.reserved_bytes = Some(16);
        let merged = merge(vec![a, same_place, elsewhere, mapped]);
        assert_eq!(
            merged
                .iter()
                .map(|s| (s.source, s.live_bytes))
                .collect::<Vec<_>>(),
            vec![(Source::Malloc, 3), (Source::Malloc, 4), (Source::Mmap, 8)]
        );
    }

    #[test]
    fn inlined_chains_must_match() {
        let app = Some("/bin/app");
        let mut inl = with_line(frame(Some("helper"), app, 0x10), 3);
        inl.inlined = true;
        let inlined = stack(
            1,
            1,
            vec![inl, with_line(frame(Some("main"), app, 0x10), 9)],
        );
        let plain = stack(1, 1, vec![with_line(frame(Some("main"), app, 0x10), 9)]);
        assert_eq!(merge(vec![inlined, plain]).len(), 2);
    }

    #[test]
    fn series_add_point_by_point_and_growth_follows_them() {
        let f = || vec![frame(Some("f"), Some("/bin/app"), 1)];
        let mut a = stack(300, 300, f());
        a.series = vec![100, 200, 300];
        a.growth_bytes = 200;
        let mut b = stack(0, 50, f());
        b.series = vec![50, 0, 0];
        b.growth_bytes = -50;
        let m = &merge(vec![a, b])[0];
        assert_eq!(
            (m.series.clone(), m.growth_bytes),
            (vec![150, 200, 300], 150)
        );
    }

    #[test]
    fn mapped_stacks_sum_reserved_resident_and_share_or_mix_classes() {
        let f = || vec![frame(Some("mmap"), Some("/lib/libc.so.6"), 1)];
        let mapped = |class: &str, resident: u64| {
            let mut s = stack(4096, 4096, f());
            s.source = Source::Mmap;
            s.reserved_bytes = Some(8192);
            s.resident_bytes = Some(resident);
            s.class = Some(class.to_owned());
            s
        };
        let m = &merge(vec![mapped("anon-other", 4096), mapped("anon-other", 0)])[0];
        assert_eq!(
            (m.reserved_bytes, m.resident_bytes, m.class.as_deref()),
            (Some(16384), Some(4096), Some("anon-other"))
        );
        let m = &merge(vec![mapped("anon-other", 1), mapped("v8-heap", 1)])[0];
        assert_eq!(m.class.as_deref(), Some("mixed"));
    }

    #[test]
    fn ranking_follows_the_metric_and_cuts_the_top() {
        let f = |name: &str| vec![frame(Some(name), Some("/bin/app"), 1)];
        let mut big_now = stack(1000, 1000, f("now"));
        big_now.peak_bytes = 1000;
        let mut big_then = stack(10, 5000, f("then"));
        big_then.peak_bytes = 4000;
        let mut mapped = stack(8192, 8192, f("mapped"));
        mapped.source = Source::Mmap;
        mapped.resident_bytes = Some(100);
        let stacks = vec![big_now, big_then, mapped];
        let names = |v: &[Stack]| {
            v.iter()
                .map(|s| s.frames[0].function.clone().unwrap())
                .collect::<Vec<_>>()
        };
        // Held: a mapping weighs what is resident of it.
        assert_eq!(
            names(&rank(stacks.clone(), Metric::Held, 0)),
            ["now", "mapped", "then"]
        );
        assert_eq!(
            names(&rank(stacks.clone(), Metric::Live, 0)),
            ["mapped", "now", "then"]
        );
        // Peak: never less than what is live now (mappings have no recorded peak).
        assert_eq!(
            names(&rank(stacks.clone(), Metric::Peak, 2)),
            ["mapped", "then"]
        );
        assert_eq!(names(&rank(stacks, Metric::Allocated, 1)), ["mapped"]);
    }
}
