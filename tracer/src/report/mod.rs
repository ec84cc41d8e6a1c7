//! Reports: the profile with names put on its frames, rendered as text or JSON. The JSON
//! shape is documented in the README and kept stable.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    aggregate::{Profile, Source},
    report::folded::Metric,
    memmap::ClassTotals,
    symbolize::{FrameKind, Symbolizer},
};

pub mod folded;
pub mod json;
pub mod pprof;
pub mod svg;
pub mod text;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub pid: u32,
    pub command: String,
    pub duration_ms: u64,
    pub totals: Totals,
    /// Stacks in the report (the top N by live bytes); `totals` covers all of them.
    pub stacks: Vec<Stack>,
    /// Stacks recorded in all, of which `stacks` shows the first.
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

/// Names the frames of the top `top` stacks (0: all) and builds the report.
pub fn build(profile: &Profile, meta: &Meta, top: usize, symbolizer: &mut Symbolizer) -> Report {
    let shown = if top == 0 { profile.stacks.len() } else { top.min(profile.stacks.len()) };
    let stacks = profile.stacks[..shown]
        .iter()
        .map(|s| Stack {
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
            frames: s
                .frames
                .iter()
                .enumerate()
                .flat_map(|(i, f)| {
                    // Every frame but the leaf is a return address.
                    symbolizer
                        .symbolize_frame(f.module.as_deref(), f.offset, f.address, i > 0)
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
                        })
                })
                .collect(),
        })
        .collect();
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
            dropped: t
                .counters
                .dropped
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
        },
        stacks,
        stacks_total: profile.stacks.len(),
        memory_map: None,
        allocator: None,
        interval_ms: None,
        min_age_ms: None,
        sampling: meta.sampling,
        metric: Metric::default(),
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
