//! Reports: the profile with names put on its frames, rendered as text or JSON. The JSON
//! shape is documented in the README and kept stable.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    aggregate::Profile,
    symbolize::{FrameKind, Symbolizer},
};

pub mod json;
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
    pub dropped: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stack {
    pub live_bytes: u64,
    pub live_allocs: u64,
    pub alloc_bytes: u64,
    pub allocs: u64,
    pub frames: Vec<Frame>,
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
}

/// Names the frames of the top `top` stacks (0: all) and builds the report.
pub fn build(profile: &Profile, meta: &Meta, top: usize, symbolizer: &mut Symbolizer) -> Report {
    let shown = if top == 0 { profile.stacks.len() } else { top.min(profile.stacks.len()) };
    let stacks = profile.stacks[..shown]
        .iter()
        .map(|s| Stack {
            live_bytes: s.live_bytes,
            live_allocs: s.live_allocs,
            alloc_bytes: s.alloc_bytes,
            allocs: s.allocs,
            frames: s
                .frames
                .iter()
                .flat_map(|f| {
                    symbolizer
                        .symbolize(f.module.as_deref(), f.offset)
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
            dropped: t
                .counters
                .dropped
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
        },
        stacks,
        stacks_total: profile.stacks.len(),
    }
}
