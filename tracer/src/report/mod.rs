//! Reports: the profile with names put on its frames, merged into code paths and ranked
//! ([`build`]), rendered as text or JSON. The JSON shape is documented in the README and kept
//! stable.
use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::{
    aggregate::{Profile, Source},
    report::folded::Metric,
    memmap::ClassTotals,
    symbolize::{FrameKind, Symbolizer},
};

pub mod folded;
pub mod json;
pub mod merge;
pub mod pprof;
pub mod svg;
pub mod telling;
pub mod text;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub pid: u32,
    pub command: String,
    pub duration_ms: u64,
    pub totals: Totals,
    /// Stacks in the report: kernel stacks merged into code paths, the top N by `metric`;
    /// `totals` covers all of them.
    pub stacks: Vec<Stack>,
    /// Merged stacks in all, of which `stacks` shows the first.
    pub stacks_total: usize,
    /// The process's mappings by owner class (absent when the process was gone at the end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_map: Option<Vec<ClassTotals>>,
    /// The allocator's view next to the memory map.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocator: Option<AllocatorView>,
    /// Snapshot spacing when `series` were kept (--interval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    /// With --min-age: only blocks at least this old count as live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_age_ms: Option<u64>,
    /// With --sample-bytes: malloc-family figures (per stack and in totals) are estimates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<Sampling>,
    /// What ranked `stacks` (and what the top N was cut by).
    #[serde(default)]
    pub metric: Metric,
    /// The launched command exited holding under half of its peak live bytes, so the stacks
    /// were ranked by peak (no --metric was given).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub peak_fallback: bool,
}

/// How the malloc-family figures were sampled. Each sampled allocation of `s` bytes stands
/// for `1/(1 - exp(-s/sample_bytes))` allocations and their bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sampling {
    /// Mean bytes allocated between two samples (Poisson, per thread).
    pub sample_bytes: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AllocatorView {
    /// Live bytes of the malloc family (the same as totals.live_bytes).
    pub live_malloc_bytes: u64,
    /// For node: the part of them allocated under node's ArrayBuffer allocator, which node
    /// itself reports as `arrayBuffers` (and within `external`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_array_buffer_bytes: Option<u64>,
    /// glibc's own figures for the `malloc` class (`record --malloc-stats`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub glibc: Option<crate::mallocstats::MallocStats>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Totals {
    pub live_bytes: u64,
    pub live_allocs: u64,
    pub alloc_bytes: u64,
    pub allocs: u64,
    pub frees: u64,
    pub unmatched_frees: u64,
    pub failed_allocs: u64,
    /// The most live malloc-family bytes seen at once while recording (sampled from the
    /// kernel's counters several times a second).
    #[serde(default)]
    pub peak_live_bytes: u64,
    pub dropped: BTreeMap<String, u64>,
    /// JavaScript frames the stack walker captured but that could not be named from the
    /// process's memory (the object moved or died first): left unnamed, never guessed.
    #[serde(default)]
    pub unnamed_js_frames: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stack {
    #[serde(default = "malloc_source")]
    pub source: Source,
    pub live_bytes: u64,
    pub live_allocs: u64,
    pub alloc_bytes: u64,
    pub allocs: u64,
    /// mmap/brk stacks: bytes still mapped, committed or only reserved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved_bytes: Option<u64>,
    /// mmap/brk stacks: bytes of their committed ranges in RAM at the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resident_bytes: Option<u64>,
    /// mmap/brk stacks: the memory-map class of their ranges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// The most live bytes the stack held at any moment (for a merged stack, the sum of its
    /// variants' peaks: an upper bound when there are several).
    #[serde(default)]
    pub peak_bytes: u64,
    /// Kernel stacks merged into this one (same functions, files and lines).
    #[serde(default = "one")]
    pub variants: u64,
    /// Live bytes at the last snapshot less at the first (0 without --interval).
    #[serde(default)]
    pub growth_bytes: i64,
    /// Live bytes at each snapshot (--interval), the last at the end of recording.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub series: Vec<u64>,
    pub frames: Vec<Frame>,
}

fn malloc_source() -> Source {
    Source::Malloc
}

fn one() -> u64 {
    1
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Frame {
    pub address: u64,
    pub module: Option<String>,
    pub offset: u64,
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    /// An inlined function: it shares `address` with the frame that follows it.
    pub inlined: bool,
    pub kind: FrameKind,
    /// JavaScript frames (kind `js`): the column where the function starts (`line` is its
    /// first line, as node's perf map gives it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<u32>,
    /// JavaScript frames run by the interpreter: the line being executed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_line: Option<u32>,
}

/// Who was recorded, and for how long.
#[derive(Clone, Debug)]
pub struct Meta {
    pub pid: u32,
    pub command: String,
    pub duration_ms: u64,
    /// How the malloc-family figures were sampled, if they were.
    pub sampling: Option<Sampling>,
}

/// What a report's stacks are ranked by, and how many it keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ranking {
    pub metric: Metric,
    /// Stacks kept after merging and ranking; 0 keeps all.
    pub top: usize,
    /// The ranking fell back to peak (see [`choose_metric`]).
    pub peak_fallback: bool,
}

/// The metric a report ranks by: the one asked for, else growth when there is a series
/// (--interval), else what stacks hold, except that a launched command which exited holding
/// under half of its peak live bytes is ranked by peak (its teardown freed what it held, and
/// the holder should stay #1). Returns the metric and whether that fallback was taken.
pub fn choose_metric(asked: Option<Metric>, series: bool, exited: bool, totals: &crate::aggregate::Totals) -> (Metric, bool) {
    if let Some(metric) = asked {
        return (metric, false);
    }
    if exited && totals.live_bytes < totals.peak_live_bytes / 2 {
        return (Metric::Peak, true);
    }
    (if series { Metric::Growth } else { Metric::Held }, false)
}

/// Names every stack's frames (each distinct frame once), merges stacks that are one code
/// path ([`merge::FrameKey`]), ranks them by `ranking.metric`, keeps the top
/// `ranking.top`, and builds the report. `stacks_total` counts merged stacks.
pub fn build(profile: &Profile, meta: &Meta, ranking: Ranking, symbolizer: &mut Symbolizer) -> Report {
    let (stacks, stacks_total) = ranked_stacks(profile, ranking, symbolizer);
    let t = &profile.totals;
    Report {
        pid: meta.pid,
        command: meta.command.clone(),
        duration_ms: meta.duration_ms,
        totals: Totals {
            live_bytes: t.live_bytes,
            live_allocs: t.live_allocs,
            alloc_bytes: t.alloc_bytes,
            allocs: t.allocs,
            frees: t.counters.frees,
            unmatched_frees: t.counters.unmatched_frees,
            failed_allocs: t.counters.failed_allocs,
            peak_live_bytes: t.peak_live_bytes,
            unnamed_js_frames: t.unnamed_js_frames,
            dropped: t
                .counters
                .dropped
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
        },
        stacks,
        stacks_total,
        memory_map: None,
        allocator: None,
        interval_ms: None,
        min_age_ms: None,
        sampling: meta.sampling,
        metric: ranking.metric,
        peak_fallback: ranking.peak_fallback,
    }
}

/// The merged, ranked and cut stacks of `profile` with their frames named, and how many
/// merged stacks there were in all. Frames are named once per distinct (module, offset,
/// address) and the merged stacks' frames are built only for those kept; a merged stack
/// shows the frames (addresses, offsets) of its largest kernel stack.
pub fn ranked_stacks(profile: &Profile, ranking: Ranking, symbolizer: &mut Symbolizer) -> (Vec<Stack>, usize) {
    let mut names = Names::default();
    let mut stacks: Vec<Stack> = Vec::new();
    // Per merged stack: the raw frames it shows, and the size of the kernel stack they are from.
    let mut shown: Vec<(Vec<u32>, (u64, u64, u64))> = Vec::new();
    let mut index: HashMap<(Source, Vec<u32>), usize> = HashMap::new();
    for s in &profile.stacks {
        // Every frame but the leaf is a return address.
        let raw: Vec<u32> = s
            .frames
            .iter()
            .enumerate()
            .map(|(i, f)| names.id(f, i > 0, symbolizer))
            .collect();
        let key: Vec<u32> = raw.iter().map(|&r| names.key[r as usize]).collect();
        let stack = unnamed_stack(s);
        let size = (Metric::Held.of(&stack), stack.alloc_bytes, stack.allocs);
        match index.entry((s.source, key)) {
            std::collections::hash_map::Entry::Occupied(e) => {
                let i = *e.get();
                merge::absorb(&mut stacks[i], &stack);
                if size > shown[i].1 {
                    shown[i] = (raw, size);
                }
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(stacks.len());
                stacks.push(stack);
                shown.push((raw, size));
            }
        }
    }
    let total = stacks.len();
    let order = merge::rank_order(&stacks, ranking.metric);
    let keep = if ranking.top == 0 { total } else { ranking.top.min(total) };
    let kept = order[..keep]
        .iter()
        .map(|&i| {
            let mut s = stacks[i].clone();
            s.frames = shown[i]
                .0
                .iter()
                .flat_map(|&r| names.frames[r as usize].iter().cloned())
                .collect();
            s
        })
        .collect();
    (kept, total)
}

/// Each distinct normalized frame of a profile, named once.
#[derive(Default)]
struct Names<'p> {
    ids: HashMap<(Option<&'p str>, u64, u64, bool, Option<&'p crate::v8::JsName>), u32>,
    /// By id: the named frames (inlined ones first).
    frames: Vec<Vec<Frame>>,
    /// By id: the merge key of those frames, interned.
    key: Vec<u32>,
    keys: merge::Interner<Vec<merge::FrameKey>>,
}

impl<'p> Names<'p> {
    /// The id of frame `f`; `return_address` for every frame but the leaf.
    fn id(&mut self, f: &'p crate::aggregate::Frame, return_address: bool, symbolizer: &mut Symbolizer) -> u32 {
        let raw = (f.module.as_deref(), f.offset, f.address, return_address, f.js.as_deref());
        if let Some(&id) = self.ids.get(&raw) {
            return id;
        }
        let frames: Vec<Frame> = match &f.js {
            // Named from V8's objects: what the frame runs, whatever code runs it.
            Some(js) => vec![Frame {
                address: f.address,
                module: f.module.clone(),
                offset: f.offset,
                function: Some(js.function.clone()),
                file: Some(js.script.clone()),
                line: Some(js.line),
                inlined: false,
                kind: FrameKind::Js,
                column: Some(js.column),
                current_line: js.current_line,
            }],
            None => symbolizer
            .symbolize_frame(f.module.as_deref(), f.offset, f.address, return_address)
            .into_iter()
            .map(|sym| Frame {
                address: f.address,
                module: f.module.clone(),
                offset: f.offset,
                function: sym.function,
                file: sym.file,
                line: sym.line,
                inlined: sym.inlined,
                kind: sym.kind,
                column: None,
                current_line: None,
            })
            .collect(),
        };
        self.key.push(self.keys.id(frames.iter().map(merge::FrameKey::of).collect()));
        self.frames.push(frames);
        let id = (self.frames.len() - 1) as u32;
        self.ids.insert(raw, id);
        id
    }
}

/// A kernel stack's figures, without frames.
fn unnamed_stack(s: &crate::aggregate::StackProfile) -> Stack {
    Stack {
        source: s.source,
        reserved_bytes: s.reserved_bytes,
        resident_bytes: s.resident_bytes,
        class: s.class.clone(),
        peak_bytes: s.peak_bytes,
        variants: 1,
        growth_bytes: s.growth_bytes,
        series: s.series.clone(),
        live_bytes: s.live_bytes,
        live_allocs: s.live_allocs,
        alloc_bytes: s.alloc_bytes,
        allocs: s.allocs,
        frames: Vec::new(),
    }
}

/// Live malloc-family bytes whose stacks pass through a function whose name contains
/// `needle`: names every frame of every live stack, so it costs a full symbolization.
pub fn live_bytes_through(profile: &Profile, needle: &str, symbolizer: &mut Symbolizer) -> u64 {
    profile
        .stacks
        .iter()
        .filter(|s| s.source == Source::Malloc && s.live_bytes > 0)
        .filter(|s| {
            s.frames.iter().any(|f| {
                f.module.as_deref().is_some_and(|m| {
                    symbolizer
                        .function(m, f.offset)
                        .is_some_and(|name| name.contains(needle))
                })
            })
        })
        .map(|s| s.live_bytes)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{Frame as RawFrame, StackProfile};

    fn kernel_stack(id: u64, addresses: &[u64], live: u64, alloc: u64, peak: u64) -> StackProfile {
        StackProfile {
            id,
            source: Source::Malloc,
            frames: addresses
                .iter()
                .map(|&address| RawFrame { address, module: None, offset: address, js: None })
                .collect(),
            live_bytes: live,
            live_allocs: 1,
            alloc_bytes: alloc,
            allocs: 1,
            reserved_bytes: None,
            resident_bytes: None,
            class: None,
            peak_bytes: peak,
            series: Vec::new(),
            growth_bytes: 0,
        }
    }

    /// A symbolizer whose process has a perf map: `retain` interpreted at 0x1000 and optimized
    /// at 0x9000 (one function, two copies), `other` at 0x5000.
    fn symbolizer(dir: &std::path::Path) -> Symbolizer {
        let pid = u32::MAX - 7;
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        std::fs::write(
            dir.join(format!("tmp/perf-{pid}.map")),
            "1000 100 JS:~retain /srv/a.js:3:10\n9000 100 JS:*retain /srv/a.js:3:10\n5000 100 JS:~other /srv/a.js:9:1\n",
        )
        .unwrap();
        let mut s = Symbolizer::new(dir);
        s.set_jit_pid(pid);
        s
    }

    fn totals(live: u64, peak: u64) -> crate::aggregate::Totals {
        crate::aggregate::Totals { live_bytes: live, peak_live_bytes: peak, ..Default::default() }
    }

    #[test]
    fn build_names_every_stack_then_merges_ranks_and_cuts() {
        let dir = std::env::temp_dir().join(format!("report-build-{}", std::process::id()));
        let mut sym = symbolizer(&dir);
        // The leaf (an unnamed allocator frame at 0x77) is shared; the callers are JIT code.
        let profile = Profile {
            totals: totals(0, 0),
            stacks: vec![
                kernel_stack(1, &[0x77, 0x1010], 100, 1000, 900),
                kernel_stack(2, &[0x77, 0x5010], 400, 400, 400),
                kernel_stack(3, &[0x77, 0x9020], 250, 250, 250),
            ],
        };
        let meta = Meta { pid: 1, command: "node".into(), duration_ms: 1, sampling: None };
        let mut by = |metric, top| {
            let r = build(&profile, &meta, Ranking { metric, top, peak_fallback: false }, &mut sym);
            assert_eq!(r.stacks_total, 2, "two code paths: {:#?}", r.stacks);
            assert_eq!(r.metric, metric);
            r.stacks
        };
        let all = by(Metric::Peak, 0);
        let retain = &all[0];
        assert_eq!(retain.frames[1].function.as_deref(), Some("retain"));
        assert_eq!(
            (retain.live_bytes, retain.alloc_bytes, retain.allocs, retain.peak_bytes, retain.variants),
            (350, 1250, 2, 1150, 2)
        );
        // The frames shown are the larger variant's (the optimized copy holds more).
        assert_eq!(retain.frames[1].address, 0x9020);
        assert_eq!(all[1].frames[1].function.as_deref(), Some("other"));
        // Held: `other` holds more than both copies of `retain`; the cut comes after merging.
        let held = by(Metric::Held, 1);
        assert_eq!(held.len(), 1);
        assert_eq!((held[0].frames[1].function.as_deref(), held[0].variants), (Some("other"), 1));
        assert_eq!(by(Metric::Allocated, 1)[0].frames[1].function.as_deref(), Some("retain"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_exit_holding_under_half_the_peak_ranks_by_peak_unless_asked() {
        let exited = |live, peak| choose_metric(None, false, true, &totals(live, peak));
        assert_eq!(exited(874, 40_000), (Metric::Peak, true));
        assert_eq!(exited(20_000, 40_000), (Metric::Held, false), "half is not under half");
        assert_eq!(exited(0, 0), (Metric::Held, false));
        // Still running at the end (attached, or --duration): what it holds.
        assert_eq!(choose_metric(None, false, false, &totals(1, 40_000)), (Metric::Held, false));
        assert_eq!(choose_metric(None, true, false, &totals(1, 2)), (Metric::Growth, false));
        assert_eq!(
            choose_metric(Some(Metric::Live), false, true, &totals(1, 40_000)),
            (Metric::Live, false),
            "an explicit --metric wins"
        );
    }
}
