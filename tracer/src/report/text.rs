//! Text rendering of a report, for a person at a terminal.
use std::io::Write;

use super::{Frame, Report};

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
    match &f.function {
        Some(function) => format!("{function}  ({module}+{:#x})", f.offset),
        None => format!("{module}+{:#x}", f.offset),
    }
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
    writeln!(
        out,
        "\ntop {} of {} stacks by live bytes (leaf first):",
        report.stacks.len(),
        report.stacks_total
    )?;
    for (i, s) in report.stacks.iter().enumerate() {
        writeln!(
            out,
            "\n#{:<3} live {} ({} B) in {} allocations; allocated {} in {}",
            i + 1,
            human_bytes(s.live_bytes),
            s.live_bytes,
            s.live_allocs,
            human_bytes(s.alloc_bytes),
            s.allocs
        )?;
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
                dropped: BTreeMap::from([("stack_map_full".into(), 3), ("live_map_full".into(), 0)]),
            },
            stacks: vec![Stack {
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
                    },
                ],
            }],
            stacks_total: 7,
        };
        let mut out = Vec::new();
        write(&report, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let expected = "\
pid 42 (app), recorded 2.5 s
live:      2.0 KiB (2048 B) in 2 allocations
allocated: 4.0 KiB (4096 B) in 4 allocations; 2 frees, 1 unmatched frees, 0 failed allocations
dropped:   stack_map_full=3

top 1 of 7 stacks by live bytes (leaf first):

#1   live 2.0 KiB (2048 B) in 2 allocations; allocated 4.0 KiB in 4
      malloc  (libc.so.6+0x98930)
      app+0x1000
";
        assert_eq!(text, expected);
    }
}
