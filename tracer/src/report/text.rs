//! Text rendering of a report, for a person at a terminal.
use std::io::Write;

use super::{AllocatorView, Frame, Report};
use crate::{aggregate::Source, memmap::ClassTotals, symbolize::FrameKind};

/// `1536` -> `1.5 KiB`; exact bytes are printed next to it where they matter.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn frame_name(f: &Frame) -> String {
    let module = f
        .module
        .as_deref()
        .map(|m| m.rsplit('/').next().unwrap_or(m))
        .unwrap_or("[unknown]");
    let place = match (&f.file, f.line) {
        (Some(file), Some(line)) => format!(", {file}:{line}"),
        (Some(file), None) => format!(", {file}"),
        _ => String::new(),
    };
    let inlined = if f.inlined { "[inlined] " } else { "" };
    match (&f.function, f.kind) {
        // For JIT code the line is where the function starts: V8 records nothing finer.
        (Some(function), FrameKind::Jit) => format!("{function}  (jit{place})"),
        // Named from V8's objects: where the function starts, and for the interpreter the
        // line it was running.
        (Some(function), FrameKind::Js) => match f.current_line {
            Some(now) => format!("{function}  (js{place}, at line {now})"),
            None => format!("{function}  (js{place})"),
        },
        (Some(function), _) => format!("{inlined}{function}  ({module}+{:#x}{place})", f.offset),
        (None, FrameKind::Jit) => format!("[jit] {:#x}", f.address),
        (None, _) => format!("{module}+{:#x}", f.offset),
    }
}

/// `1536` -> `1.5K`: compact, for series.
fn short_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["", "K", "M", "G", "T"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes}") } else { format!("{value:.1}{}", UNITS[unit]) }
}

fn signed_bytes(delta: i64) -> String {
    format!("{}{}", if delta < 0 { "-" } else { "+" }, human_bytes(delta.unsigned_abs()))
}

/// The memory model: what owns the address space, and how the allocator's view fits in.
pub fn write_memory_map(
    classes: &[ClassTotals],
    allocator: Option<&AllocatorView>,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    writeln!(out, "\nmemory map:        mappings     reserved          rss   rss change")?;
    for c in classes {
        writeln!(
            out,
            "  {:<15} {:>10} {:>12} {:>12} {:>12}",
            c.class,
            c.mappings,
            human_bytes(c.reserved_bytes),
            human_bytes(c.rss_bytes),
            signed_bytes(c.rss_delta_bytes)
        )?;
    }
    if let Some(a) = allocator {
        write!(out, "  malloc's live bytes: {}", human_bytes(a.live_malloc_bytes))?;
        if let Some(ab) = a.node_array_buffer_bytes {
            write!(out, ", of which node ArrayBuffers (external): {}", human_bytes(ab))?;
        }
        writeln!(out)?;
        if let Some(g) = &a.glibc {
            writeln!(
                out,
                "  glibc (mallinfo2): in use {}, free retained {} (fastbins {}, bins {}, top {}), \
                 mmapped {}, {} arenas",
                human_bytes(g.in_use_bytes),
                human_bytes(g.free_bytes),
                human_bytes(g.fastbin_bytes),
                human_bytes(g.bin_bytes),
                human_bytes(g.top_bytes),
                human_bytes(g.mmapped_bytes),
                g.arenas
            )?;
            writeln!(
                out,
                "  => {} of RSS is free memory glibc keeps; MALLOC_ARENA_MAX or malloc_trim would return it",
                human_bytes(g.retained_in_rss())
            )?;
        }
    }
    let delta = |name: &str| classes.iter().find(|c| c.class == name).map(|c| c.rss_delta_bytes);
    // The V8-or-not question only arises where there is a V8 heap.
    let has_v8 = classes.iter().any(|c| c.class == "v8-heap" && c.mappings > 0);
    if let (true, Some(v8), Some(malloc)) = (has_v8, delta("v8-heap"), delta("malloc")) {
        let trend = |d: i64| match d {
            d if d > 1 << 20 => "growing",
            d if d < -(1 << 20) => "shrinking",
            _ => "flat",
        };
        writeln!(
            out,
            "  V8 heap {} ({}), malloc {} ({})",
            trend(v8),
            signed_bytes(v8),
            trend(malloc),
            signed_bytes(malloc)
        )?;
    }
    Ok(())
}

pub fn write(report: &Report, out: &mut dyn Write) -> std::io::Result<()> {
    let t = &report.totals;
    writeln!(
        out,
        "pid {} ({}), recorded {:.1} s",
        report.pid,
        report.command,
        report.duration_ms as f64 / 1000.0
    )?;
    writeln!(
        out,
        "live:      {} ({} B) in {} allocations",
        human_bytes(t.live_bytes),
        t.live_bytes,
        t.live_allocs
    )?;
    writeln!(
        out,
        "allocated: {} ({} B) in {} allocations; {} frees, {} unmatched frees, {} failed allocations",
        human_bytes(t.alloc_bytes),
        t.alloc_bytes,
        t.allocs,
        t.frees,
        t.unmatched_frees,
        t.failed_allocs
    )?;
    let losses: Vec<String> = t
        .dropped
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if losses.is_empty() {
        writeln!(out, "dropped:   none")?;
    } else {
        writeln!(out, "dropped:   {}", losses.join(", "))?;
    }
    if let Some(min_age) = report.min_age_ms {
        writeln!(out, "live counts only blocks at least {:.1} s old (--min-age)", min_age as f64 / 1000.0)?;
    }
    if let Some(sampling) = report.sampling {
        writeln!(
            out,
            "sampled:   one allocation per {} allocated, on average: allocation figures are \
             estimated (unmatched frees are not counted)",
            human_bytes(sampling.sample_bytes)
        )?;
    }
    if let Some(classes) = &report.memory_map {
        write_memory_map(classes, report.allocator.as_ref(), out)?;
    }
    if report.peak_fallback {
        writeln!(
            out,
            "\nthe command exited holding {} of a {} peak: stacks ranked by peak (--metric held \
             ranks by what is held at the end)",
            human_bytes(t.live_bytes),
            human_bytes(t.peak_live_bytes)
        )?;
    }
    writeln!(
        out,
        "\ntop {} of {} stacks by {} (leaf first):",
        report.stacks.len(),
        report.stacks_total,
        report.metric.describe()
    )?;
    for (i, s) in report.stacks.iter().enumerate() {
        let what = match s.source {
            Source::Malloc => "allocations",
            Source::Mmap => "mappings",
            Source::Brk => "heap extensions",
        };
        let source = match s.source {
            Source::Malloc if report.sampling.is_some() => "estimated ".to_owned(),
            Source::Malloc => String::new(),
            Source::Mmap | Source::Brk => {
                let name = if s.source == Source::Mmap { "mmap" } else { "brk" };
                match &s.class {
                    Some(class) => format!("[{name} {class}] "),
                    None => format!("[{name}] "),
                }
            }
        };
        // What a mapping holds in RAM first: committed address space may never be touched.
        let resident = match s.resident_bytes {
            Some(r) => format!("resident {} ({r} B) of ", human_bytes(r)),
            None => String::new(),
        };
        let live = if s.source == Source::Malloc { "live" } else { "committed" };
        write!(
            out,
            "\n#{:<3} {source}{resident}{live} {} ({} B) in {} {what}; {} {} in {}",
            i + 1,
            human_bytes(s.live_bytes),
            s.live_bytes,
            s.live_allocs,
            if s.source == Source::Malloc { "allocated" } else { "mapped" },
            human_bytes(s.alloc_bytes),
            s.allocs
        )?;
        if let Some(reserved) = s.reserved_bytes {
            write!(out, "; {} reserved", human_bytes(reserved))?;
        }
        if s.peak_bytes > s.live_bytes {
            write!(out, "; peak {}", human_bytes(s.peak_bytes))?;
        }
        if s.variants > 1 {
            write!(out, "; merged from {} stacks", s.variants)?;
        }
        writeln!(out)?;
        if !s.series.is_empty() {
            let points: Vec<String> = s.series.iter().map(|b| short_bytes(*b)).collect();
            writeln!(
                out,
                "      growth {}{}: {}",
                if s.growth_bytes >= 0 { "+" } else { "-" },
                human_bytes(s.growth_bytes.unsigned_abs()),
                points.join(" ")
            )?;
        }
        if s.frames.is_empty() {
            writeln!(out, "      [stack not captured: see dropped]")?;
        }
        for f in &s.frames {
            writeln!(out, "      {}", frame_name(f))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        report::{Stack, Totals},
        symbolize::FrameKind,
    };

    #[test]
    fn human_bytes_uses_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(32 << 20), "32.0 MiB");
    }

    #[test]
    fn renders_totals_losses_and_named_frames() {
        let report = Report {
            pid: 42,
            command: "app".into(),
            duration_ms: 2500,
            totals: Totals {
                live_bytes: 2048,
                live_allocs: 2,
                alloc_bytes: 4096,
                allocs: 4,
                frees: 2,
                unmatched_frees: 1,
                failed_allocs: 0,
                peak_live_bytes: 0,
                unnamed_js_frames: 0,
                dropped: BTreeMap::from([("stack_map_full".into(), 3), ("live_map_full".into(), 0)]),
            },
            stacks: vec![Stack {
                source: Source::Malloc,
                reserved_bytes: None,
                resident_bytes: None,
                class: None,
                peak_bytes: 2048,
                variants: 1,
                growth_bytes: 0,
                series: Vec::new(),
                live_bytes: 2048,
                live_allocs: 2,
                alloc_bytes: 4096,
                allocs: 4,
                frames: vec![
                    Frame {
                        address: 0x7f00_0000_1000,
                        module: Some("/usr/lib/x86_64-linux-gnu/libc.so.6".into()),
                        offset: 0x98930,
                        function: Some("malloc".into()),
                        file: None,
                        line: None,
                        inlined: false,
                        kind: FrameKind::Native,
                        column: None,
                        current_line: None,
                    },
                    Frame {
                        address: 0x401000,
                        module: Some("/app".into()),
                        offset: 0x1000,
                        function: None,
                        file: None,
                        line: None,
                        inlined: false,
                        kind: FrameKind::Native,
                        column: None,
                        current_line: None,
                    },
                ],
            }],
            stacks_total: 7,
            memory_map: None,
            allocator: None,
            interval_ms: None,
            min_age_ms: None,
            sampling: None,
            metric: crate::report::folded::Metric::Held,
            peak_fallback: false,
        };
        let mut out = Vec::new();
        write(&report, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let expected = "\
pid 42 (app), recorded 2.5 s
live:      2.0 KiB (2048 B) in 2 allocations
allocated: 4.0 KiB (4096 B) in 4 allocations; 2 frees, 1 unmatched frees, 0 failed allocations
dropped:   stack_map_full=3

top 1 of 7 stacks by bytes held (leaf first):

#1   live 2.0 KiB (2048 B) in 2 allocations; allocated 4.0 KiB in 4
      malloc  (libc.so.6+0x98930)
      app+0x1000
";
        assert_eq!(text, expected);
    }

    #[test]
    fn merged_stacks_peaks_and_a_peak_ranking_are_said() {
        let report: Report = serde_json::from_str(
            r#"{"pid": 7, "command": "node", "duration_ms": 1000,
                "totals": {"live_bytes": 895000, "live_allocs": 2, "alloc_bytes": 41943040,
                           "allocs": 2, "frees": 0, "unmatched_frees": 0, "failed_allocs": 0,
                           "peak_live_bytes": 41943040, "dropped": {}},
                "stacks": [{"live_bytes": 1024, "live_allocs": 1, "alloc_bytes": 41943040,
                            "allocs": 2, "peak_bytes": 41943040, "variants": 3, "frames": []},
                           {"live_bytes": 64, "live_allocs": 1, "alloc_bytes": 64,
                            "allocs": 1, "peak_bytes": 64, "frames": []}],
                "stacks_total": 2, "metric": "peak", "peak_fallback": true}"#,
        )
        .unwrap();
        let mut out = Vec::new();
        write(&report, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains(
                "\nthe command exited holding 874.0 KiB of a 40.0 MiB peak: stacks ranked by peak \
                 (--metric held ranks by what is held at the end)\n\ntop 2 of 2 stacks by peak live bytes"
            ),
            "{text}"
        );
        assert!(
            text.contains("#1   live 1.0 KiB (1024 B) in 1 allocations; allocated 40.0 MiB in 2; peak 40.0 MiB; merged from 3 stacks\n"),
            "{text}"
        );
        // Nothing extra where peak and live agree and nothing was merged.
        assert!(text.contains("#2   live 64 B (64 B) in 1 allocations; allocated 64 B in 1\n"), "{text}");
    }

    #[test]
    fn mapped_stacks_show_resident_committed_reserved_and_class() {
        let report: Report = serde_json::from_str(
            r#"{"pid": 7, "command": "node", "duration_ms": 1000,
                "totals": {"live_bytes": 0, "live_allocs": 0, "alloc_bytes": 0,
                           "allocs": 0, "frees": 0, "unmatched_frees": 0, "failed_allocs": 0,
                           "dropped": {}},
                "stacks": [{"source": "mmap", "live_bytes": 41877504, "live_allocs": 5,
                            "alloc_bytes": 41943040, "allocs": 5, "reserved_bytes": 41943040,
                            "resident_bytes": 163840, "class": "thread-stacks", "frames": []},
                           {"source": "brk", "live_bytes": 20480, "live_allocs": 1,
                            "alloc_bytes": 20480, "allocs": 1, "reserved_bytes": 20480,
                            "frames": []}],
                "stacks_total": 2}"#,
        )
        .unwrap();
        let mut out = Vec::new();
        write(&report, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains(
                "#1   [mmap thread-stacks] resident 160.0 KiB (163840 B) of committed 39.9 MiB (41877504 B) \
                 in 5 mappings; mapped 40.0 MiB in 5; 40.0 MiB reserved\n"
            ),
            "{text}"
        );
        // Not measured (the process was gone): no resident figure, no class.
        assert!(
            text.contains("#2   [brk] committed 20.0 KiB (20480 B) in 1 heap extensions; mapped 20.0 KiB in 1; 20.0 KiB reserved\n"),
            "{text}"
        );
    }

    #[test]
    fn sampled_reports_say_their_figures_are_estimated() {
        let report: Report = serde_json::from_str(
            r#"{"pid": 7, "command": "app", "duration_ms": 1000,
                "totals": {"live_bytes": 1048576, "live_allocs": 2, "alloc_bytes": 1048576,
                           "allocs": 2, "frees": 0, "unmatched_frees": 0, "failed_allocs": 0,
                           "dropped": {}},
                "stacks": [{"live_bytes": 1048576, "live_allocs": 2, "alloc_bytes": 1048576,
                            "allocs": 2, "frames": []}],
                "stacks_total": 1, "sampling": {"sample_bytes": 524288}}"#,
        )
        .unwrap();
        let mut out = Vec::new();
        write(&report, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("sampled:   one allocation per 512.0 KiB allocated, on average: allocation figures are estimated"),
            "{text}"
        );
        assert!(text.contains("#1   estimated live 1.0 MiB (1048576 B) in 2 allocations"), "{text}");
    }
}
