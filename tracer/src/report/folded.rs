//! The collapsed-stack ("folded") format of flamegraph.pl and inferno: one line per stack,
//! `root;...;leaf BYTES`, the input of every flamegraph tool.
use std::collections::BTreeMap;
use std::io::Write;

use serde::{Deserialize, Serialize};

use super::{Frame, Report, Stack};
use crate::{aggregate::Source, symbolize::FrameKind};

/// What the width of a stack in a flamegraph stands for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// Bytes allocated and not freed when recording ended.
    #[default]
    Live,
    /// Bytes allocated while recording, freed or not.
    Allocated,
    /// Live bytes at the last snapshot less at the first (`--interval`); stacks that shrank
    /// weigh nothing.
    Growth,
    /// What a stack holds: live bytes for malloc stacks, resident bytes for mmap/brk stacks.
    Held,
    /// Bytes in RAM: resident bytes for mmap/brk stacks, live bytes for malloc stacks.
    Resident,
    /// The most live bytes a stack held at any moment of the recording (at least its live
    /// bytes at the end).
    Peak,
}

impl Metric {
    /// Bytes of one stack under this metric.
    pub fn of(self, stack: &Stack) -> u64 {
        match self {
            Metric::Live => stack.live_bytes,
            Metric::Allocated => stack.alloc_bytes,
            Metric::Growth => u64::try_from(stack.growth_bytes).unwrap_or(0),
            Metric::Held | Metric::Resident => match stack.source {
                Source::Malloc => stack.live_bytes,
                Source::Mmap | Source::Brk => stack.resident_bytes.unwrap_or(stack.live_bytes),
            },
            // A stack has held at least what it holds now; mappings have no recorded peak.
            Metric::Peak => stack.peak_bytes.max(stack.live_bytes),
        }
    }

    /// For titles: "live bytes".
    pub fn describe(self) -> &'static str {
        match self {
            Metric::Live => "live bytes",
            Metric::Allocated => "allocated bytes",
            Metric::Growth => "growth in live bytes",
            Metric::Held => "bytes held",
            Metric::Resident => "resident bytes",
            Metric::Peak => "peak live bytes",
        }
    }
}

/// How a frame is shown in a folded stack. Inlined functions carry `_[i]` and JIT frames
/// `_[j]`, the flamegraph annotations that inferno and flamegraph.pl color by and strip from
/// the picture; frames without a name show where they are.
pub fn frame_label(frame: &Frame) -> String {
    let name = match (&frame.function, frame.kind) {
        (Some(function), FrameKind::Jit | FrameKind::Js) => format!("{function}_[j]"),
        (Some(function), _) if frame.inlined => format!("{function}_[i]"),
        (Some(function), _) => function.clone(),
        (None, FrameKind::Jit) => format!("[jit] {:#x}", frame.address),
        (None, _) => match &frame.module {
            Some(module) => {
                let base = module.rsplit('/').next().unwrap_or(module);
                format!("{base}+{:#x}", frame.offset)
            }
            None => format!("[unknown] {:#x}", frame.address),
        },
    };
    // ';' separates frames and a newline ends the line: neither may appear in a name.
    name.replace(';', ":").replace(['\n', '\r'], " ")
}

fn source_root(source: Source) -> &'static str {
    match source {
        Source::Malloc => "[malloc]",
        Source::Mmap => "[mmap]",
        Source::Brk => "[brk]",
    }
}

/// The folded stack of `stack`, root first. When a report mixes sources (malloc and the mmap
/// family) each stack starts with its source, so the two never add up in one tower.
pub fn stack_key(stack: &Stack, with_source: bool) -> String {
    let mut parts: Vec<String> = Vec::with_capacity(stack.frames.len() + 1);
    if with_source {
        parts.push(source_root(stack.source).to_owned());
    }
    if stack.frames.is_empty() {
        parts.push("[stack lost]".to_owned());
    }
    parts.extend(stack.frames.iter().rev().map(frame_label));
    parts.join(";")
}

/// Whether the report's stacks come from more than one source.
pub fn mixed_sources(report: &Report) -> bool {
    report
        .stacks
        .first()
        .is_some_and(|first| report.stacks.iter().any(|s| s.source != first.source))
}

/// Folded stacks with their bytes under `metric`: identical stacks merged, sorted, zero weights
/// left out.
pub fn folded(report: &Report, metric: Metric) -> Vec<(String, u64)> {
    let with_source = mixed_sources(report);
    let mut merged: BTreeMap<String, u64> = BTreeMap::new();
    for stack in &report.stacks {
        let bytes = metric.of(stack);
        if bytes > 0 {
            *merged.entry(stack_key(stack, with_source)).or_default() += bytes;
        }
    }
    merged.into_iter().collect()
}

pub fn write(report: &Report, metric: Metric, out: &mut dyn Write) -> std::io::Result<()> {
    for (stack, bytes) in folded(report, metric) {
        writeln!(out, "{stack} {bytes}")?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn frame(function: Option<&str>, module: Option<&str>, offset: u64) -> Frame {
        Frame {
            address: 0x1000 + offset,
            module: module.map(str::to_owned),
            offset,
            function: function.map(str::to_owned),
            file: None,
            line: None,
            inlined: false,
            kind: if module.is_some() {
                FrameKind::Native
            } else {
                FrameKind::Unknown
            },
            column: None,
            current_line: None,
        }
    }

    pub(crate) fn stack(live: u64, alloc: u64, frames: Vec<Frame>) -> Stack {
        let mut s: Stack = serde_json::from_value(serde_json::json!({
            "live_bytes": live, "live_allocs": 1, "alloc_bytes": alloc, "allocs": 2, "frames": []
        }))
        .expect("a minimal stack deserializes");
        s.frames = frames;
        s
    }

    /// A report made the way a saved one is read back, so that fields added to the report
    /// later keep their defaults here.
    pub(crate) fn report(stacks: Vec<Stack>) -> Report {
        let mut r: Report = serde_json::from_value(serde_json::json!({
            "pid": 7, "command": "app", "duration_ms": 1000, "stacks_total": 0, "stacks": [],
            "totals": {"live_bytes": 0, "live_allocs": 0, "alloc_bytes": 0, "allocs": 0,
                       "frees": 0, "unmatched_frees": 0, "failed_allocs": 0, "dropped": {}}
        }))
        .expect("a minimal report deserializes");
        r.totals.live_bytes = stacks.iter().map(|s| s.live_bytes).sum();
        r.totals.alloc_bytes = stacks.iter().map(|s| s.alloc_bytes).sum();
        r.stacks_total = stacks.len();
        r.stacks = stacks;
        r
    }

    #[test]
    fn labels_name_inlined_jit_and_unnamed_frames() {
        let mut inlined = frame(Some("helper"), Some("/bin/app"), 0x10);
        inlined.inlined = true;
        let mut jit = frame(Some("retain"), None, 0);
        jit.kind = FrameKind::Jit;
        let mut jit_unnamed = frame(None, None, 0);
        jit_unnamed.kind = FrameKind::Jit;
        jit_unnamed.address = 0x7f00_0000_1234;
        assert_eq!(frame_label(&inlined), "helper_[i]");
        assert_eq!(frame_label(&jit), "retain_[j]");
        assert_eq!(frame_label(&jit_unnamed), "[jit] 0x7f0000001234");
        assert_eq!(
            frame_label(&frame(None, Some("/lib/libc.so.6"), 0x2724a)),
            "libc.so.6+0x2724a"
        );
        assert_eq!(frame_label(&frame(None, None, 0x5)), "[unknown] 0x1005");
        assert_eq!(
            frame_label(&frame(Some("f<a;b>\nx"), Some("/a"), 0)),
            "f<a:b> x"
        );
    }

    #[test]
    fn stacks_are_root_first_merged_sorted_and_weighed_by_the_metric() {
        let libc = Some("/lib/libc.so.6");
        let r = report(vec![
            stack(
                100,
                300,
                vec![
                    frame(Some("malloc"), libc, 1),
                    frame(Some("b"), Some("/a"), 2),
                    frame(Some("main"), Some("/a"), 3),
                ],
            ),
            stack(
                0,
                50,
                vec![
                    frame(Some("malloc"), libc, 1),
                    frame(Some("a"), Some("/a"), 4),
                    frame(Some("main"), Some("/a"), 3),
                ],
            ),
            // The same names at other addresses: merged with the first.
            stack(
                20,
                20,
                vec![
                    frame(Some("malloc"), libc, 9),
                    frame(Some("b"), Some("/a"), 8),
                    frame(Some("main"), Some("/a"), 7),
                ],
            ),
            stack(5, 5, vec![]),
        ]);
        let mut out = Vec::new();
        write(&r, Metric::Live, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "[stack lost] 5\nmain;b;malloc 120\n"
        );
        assert_eq!(
            folded(&r, Metric::Allocated),
            vec![
                ("[stack lost]".to_owned(), 5),
                ("main;a;malloc".to_owned(), 50),
                ("main;b;malloc".to_owned(), 320)
            ]
        );
    }

    #[test]
    fn mixed_sources_get_a_root_frame_each() {
        let mut mapped = stack(
            4096,
            4096,
            vec![frame(Some("mmap"), Some("/lib/libc.so.6"), 1)],
        );
        mapped.source = Source::Mmap;
        let r = report(vec![
            stack(
                10,
                10,
                vec![frame(Some("malloc"), Some("/lib/libc.so.6"), 2)],
            ),
            mapped,
        ]);
        assert_eq!(
            folded(&r, Metric::Live),
            vec![
                ("[malloc];malloc".to_owned(), 10),
                ("[mmap];mmap".to_owned(), 4096)
            ]
        );
    }

    #[test]
    fn growth_counts_only_what_grew() {
        let mut grew = stack(100, 100, vec![frame(Some("g"), Some("/a"), 1)]);
        grew.growth_bytes = 64;
        let mut shrank = stack(100, 100, vec![frame(Some("s"), Some("/a"), 2)]);
        shrank.growth_bytes = -64;
        let r = report(vec![grew, shrank]);
        assert_eq!(folded(&r, Metric::Growth), vec![("g".to_owned(), 64)]);
    }
}
