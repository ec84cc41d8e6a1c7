//! `tracer diff`: what grew and what shrank between two saved JSON reports, stack by stack.
//! Stacks are matched by the reports' one rule for what a stack is ([`FrameKey`]: functions,
//! files, lines, module file names; never addresses or paths), so two runs of one program, or
//! two hosts, compare even though libraries were loaded elsewhere.
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::{
    aggregate::Source,
    report::{
        Frame, Report,
        folded::{Metric, frame_label, mixed_sources, stack_key},
        merge::FrameKey,
        svg,
        text::human_bytes,
    },
    symbolize::FrameKind,
};

#[derive(Debug, Error)]
pub enum DiffError {
    #[error("read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a tracer JSON report", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// How `tracer diff` shows its result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiffFormat {
    /// Stacks that grew and shrank, largest change first.
    Text,
    /// `stack BEFORE AFTER` lines.
    Folded,
    /// A differential flamegraph.
    Svg,
}

/// What `tracer diff` is asked to do.
#[derive(Clone, Debug)]
pub struct DiffOptions {
    pub before: PathBuf,
    pub after: PathBuf,
    pub format: DiffFormat,
    pub metric: Metric,
    /// stdout when None.
    pub output: Option<PathBuf>,
}

/// Renders a diff in `format`.
pub fn write(d: &Diff, format: DiffFormat, out: &mut dyn Write) -> std::io::Result<()> {
    match format {
        DiffFormat::Text => write_text(d, out),
        DiffFormat::Folded => write_folded(d, out),
        DiffFormat::Svg => write_svg(d, out),
    }
}

/// Reads a report written by `tracer record --format json`.
pub fn read_report(path: &Path) -> Result<Report, DiffError> {
    let bytes = std::fs::read(path).map_err(|source| DiffError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_report(&bytes).map_err(|source| DiffError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// Parses the bytes of a saved JSON report (what [`read_report`] read from its file).
pub fn parse_report(bytes: &[u8]) -> Result<Report, serde_json::Error> {
    serde_json::from_slice(bytes)
}

/// One stack (code path) in both reports.
#[derive(Debug, Clone)]
pub struct StackDiff {
    /// Folded form, root first (function names only, the flamegraph convention).
    pub key: String,
    /// Its frames, leaf first, as the later report has them (else the earlier).
    pub frames: Vec<Frame>,
    pub before: u64,
    pub after: u64,
}

impl StackDiff {
    pub fn change(&self) -> i128 {
        i128::from(self.after) - i128::from(self.before)
    }
}

#[derive(Debug, Clone)]
pub struct Diff {
    pub metric: Metric,
    pub before: Side,
    pub after: Side,
    /// Every stack present in either report, largest change first (growth before shrink at
    /// equal size), then by name.
    pub stacks: Vec<StackDiff>,
}

/// What is said about one report.
#[derive(Debug, Clone)]
pub struct Side {
    pub pid: u32,
    pub command: String,
    pub duration_ms: u64,
    /// The metric over every stack recorded (from the totals where they have it).
    pub total: u64,
    pub stacks_shown: usize,
    pub stacks_total: usize,
}

fn side(report: &Report, metric: Metric) -> Side {
    let total = match metric {
        Metric::Live => report.totals.live_bytes,
        Metric::Allocated => report.totals.alloc_bytes,
        // malloc stacks from the totals (every stack recorded), mappings from the stacks shown.
        Metric::Held | Metric::Resident => {
            report.totals.live_bytes
                + report
                    .stacks
                    .iter()
                    .filter(|s| s.source != Source::Malloc)
                    .map(|s| metric.of(s))
                    .sum::<u64>()
        }
        Metric::Growth | Metric::Peak => report.stacks.iter().map(|s| metric.of(s)).sum(),
    };
    Side {
        pid: report.pid,
        command: report.command.clone(),
        duration_ms: report.duration_ms,
        total,
        stacks_shown: report.stacks.len(),
        stacks_total: report.stacks_total,
    }
}

pub fn diff(before: &Report, after: &Report, metric: Metric) -> Diff {
    let with_source = mixed_sources(before) || mixed_sources(after);
    let mut index: HashMap<(Source, Vec<FrameKey>), usize> = HashMap::new();
    let mut stacks: Vec<StackDiff> = Vec::new();
    for (report, is_after) in [(before, false), (after, true)] {
        for s in &report.stacks {
            let key = (s.source, s.frames.iter().map(FrameKey::of).collect());
            let i = *index.entry(key).or_insert_with(|| {
                stacks.push(StackDiff {
                    key: stack_key(s, with_source),
                    frames: s.frames.clone(),
                    before: 0,
                    after: 0,
                });
                stacks.len() - 1
            });
            let d = &mut stacks[i];
            if is_after {
                if d.after == 0 && d.before > 0 {
                    d.frames = s.frames.clone();
                }
                d.after += metric.of(s);
            } else {
                d.before += metric.of(s);
            }
        }
    }
    stacks.retain(|d| d.before > 0 || d.after > 0);
    let labels: Vec<Vec<String>> = stacks.iter().map(|d| d.frames.iter().map(text_label).collect()).collect();
    let mut order: Vec<usize> = (0..stacks.len()).collect();
    order.sort_by(|&x, &y| {
        let (a, b) = (&stacks[x], &stacks[y]);
        (b.change().abs(), b.change() > 0, &a.key, &labels[x])
            .cmp(&(a.change().abs(), a.change() > 0, &b.key, &labels[y]))
    });
    let mut slots: Vec<Option<StackDiff>> = stacks.into_iter().map(Some).collect();
    Diff {
        metric,
        before: side(before, metric),
        after: side(after, metric),
        stacks: order.iter().map(|&i| slots[i].take().expect("each index once")).collect(),
    }
}

/// A frame as the diff text shows it: what matched it, nothing host-specific (no address,
/// no module path).
fn text_label(f: &Frame) -> String {
    let place = match (&f.file, f.line) {
        (Some(file), Some(line)) => format!("{file}:{line}"),
        (Some(file), None) => file.clone(),
        _ => String::new(),
    };
    match (&f.function, f.kind) {
        (Some(function), FrameKind::Jit) if place.is_empty() => format!("{function}  (jit)"),
        (Some(function), FrameKind::Jit) => format!("{function}  (jit, {place})"),
        (Some(function), FrameKind::Js) => format!("{function}  (js, {place})"),
        (Some(function), _) => {
            let inlined = if f.inlined { "[inlined] " } else { "" };
            if place.is_empty() {
                format!("{inlined}{function}")
            } else {
                format!("{inlined}{function}  ({place})")
            }
        }
        (None, _) => frame_label(f),
    }
}

fn signed_bytes(change: i128) -> String {
    let sign = if change < 0 { '-' } else { '+' };
    let abs = change.unsigned_abs();
    let abs64 = u64::try_from(abs).unwrap_or(u64::MAX);
    format!("{sign}{} ({sign}{abs} B)", human_bytes(abs64))
}

fn describe_side(label: &str, s: &Side, metric: Metric) -> String {
    format!(
        "{label} pid {} ({}), recorded {:.1} s: {} {} ({} B), {} of {} stacks in the report",
        s.pid,
        s.command,
        s.duration_ms as f64 / 1000.0,
        metric.describe(),
        human_bytes(s.total),
        s.total,
        s.stacks_shown,
        s.stacks_total
    )
}

pub fn write_text(d: &Diff, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(out, "{}", describe_side("before:", &d.before, d.metric))?;
    writeln!(out, "{}", describe_side("after: ", &d.after, d.metric))?;
    writeln!(
        out,
        "change: {}",
        signed_bytes(i128::from(d.after.total) - i128::from(d.before.total))
    )?;
    for (label, s) in [("before", &d.before), ("after", &d.after)] {
        if s.stacks_shown < s.stacks_total {
            writeln!(
                out,
                "note: the {label} report holds {} of its {} stacks; the others count as 0 here \
                 (record with --top 0 for a complete diff)",
                s.stacks_shown, s.stacks_total
            )?;
        }
    }
    let grew: Vec<&StackDiff> = d.stacks.iter().filter(|s| s.change() > 0).collect();
    let shrank: Vec<&StackDiff> = d.stacks.iter().filter(|s| s.change() < 0).collect();
    let unchanged = d.stacks.len() - grew.len() - shrank.len();
    for (title, list) in [("grew", &grew), ("shrank", &shrank)] {
        writeln!(
            out,
            "\n{title}: {} stack{} (leaf first)",
            list.len(),
            if list.len() == 1 { "" } else { "s" }
        )?;
        for s in list {
            writeln!(
                out,
                "\n{}: {} B -> {} B",
                signed_bytes(s.change()),
                s.before,
                s.after
            )?;
            if s.frames.is_empty() {
                writeln!(out, "      [stack lost]")?;
            }
            for frame in &s.frames {
                writeln!(out, "      {}", text_label(frame))?;
            }
        }
    }
    writeln!(
        out,
        "\nunchanged: {unchanged} stack{}",
        if unchanged == 1 { "" } else { "s" }
    )?;
    Ok(())
}

/// `stack BEFORE AFTER` lines, the differential folded format of difffolded.pl and inferno;
/// code paths whose function names are the same share a line, as in every folded output.
pub fn folded_lines(d: &Diff) -> Vec<String> {
    let mut lines: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for s in &d.stacks {
        let line = lines.entry(&s.key).or_default();
        line.0 += s.before;
        line.1 += s.after;
    }
    lines
        .into_iter()
        .map(|(key, (before, after))| format!("{key} {before} {after}"))
        .collect()
}

pub fn write_folded(d: &Diff, out: &mut dyn Write) -> std::io::Result<()> {
    for line in folded_lines(d) {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

pub fn write_svg(d: &Diff, out: &mut dyn Write) -> std::io::Result<()> {
    let title = format!(
        "{}: {}, pid {} -> pid {}",
        d.after.command,
        d.metric.describe(),
        d.before.pid,
        d.after.pid
    );
    let subtitle = format!(
        "widths: after ({} B); red grew, blue shrank; change {}",
        d.after.total,
        signed_bytes(i128::from(d.after.total) - i128::from(d.before.total))
    );
    svg::write_diff(&title, subtitle, &folded_lines(d), out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::folded::tests::{frame, report, stack};

    fn reports() -> (Report, Report) {
        let libc = Some("/lib/libc.so.6");
        let app = Some("/bin/app");
        let before = report(vec![
            stack(
                1000,
                1000,
                vec![
                    frame(Some("malloc"), libc, 1),
                    frame(Some("cache_put"), app, 2),
                ],
            ),
            stack(
                500,
                500,
                vec![
                    frame(Some("malloc"), libc, 1),
                    frame(Some("session_new"), app, 3),
                ],
            ),
            stack(
                64,
                64,
                vec![
                    frame(Some("malloc"), libc, 1),
                    frame(Some("steady"), app, 4),
                ],
            ),
        ]);
        // Other addresses (another run), same names.
        let mut after = report(vec![
            stack(
                3000,
                3000,
                vec![
                    frame(Some("malloc"), libc, 11),
                    frame(Some("cache_put"), app, 12),
                ],
            ),
            stack(
                64,
                64,
                vec![
                    frame(Some("malloc"), libc, 11),
                    frame(Some("steady"), app, 14),
                ],
            ),
            stack(
                200,
                200,
                vec![
                    frame(Some("malloc"), libc, 11),
                    frame(Some("new_path"), app, 15),
                ],
            ),
        ]);
        after.pid = 8;
        (before, after)
    }

    #[test]
    fn stacks_match_by_name_and_sort_by_change() {
        let (before, after) = reports();
        let d = diff(&before, &after, Metric::Live);
        let got: Vec<(&str, u64, u64)> = d
            .stacks
            .iter()
            .map(|s| (s.key.as_str(), s.before, s.after))
            .collect();
        assert_eq!(
            got,
            [
                ("cache_put;malloc", 1000, 3000),
                ("session_new;malloc", 500, 0),
                ("new_path;malloc", 0, 200),
                ("steady;malloc", 64, 64),
            ]
        );
        assert_eq!((d.before.total, d.after.total), (1564, 3264));
    }

    #[test]
    fn text_folded_and_svg() {
        let (before, after) = reports();
        let d = diff(&before, &after, Metric::Live);
        let mut text = Vec::new();
        write_text(&d, &mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        let expected = "\
before: pid 7 (app), recorded 1.0 s: live bytes 1.5 KiB (1564 B), 3 of 3 stacks in the report
after:  pid 8 (app), recorded 1.0 s: live bytes 3.2 KiB (3264 B), 3 of 3 stacks in the report
change: +1.7 KiB (+1700 B)

grew: 2 stacks (leaf first)

+2.0 KiB (+2000 B): 1000 B -> 3000 B
      malloc
      cache_put

+200 B (+200 B): 0 B -> 200 B
      malloc
      new_path

shrank: 1 stack (leaf first)

-500 B (-500 B): 500 B -> 0 B
      malloc
      session_new

unchanged: 1 stack
";
        assert_eq!(text, expected);

        let mut folded = Vec::new();
        write_folded(&d, &mut folded).unwrap();
        assert_eq!(
            String::from_utf8(folded).unwrap(),
            "cache_put;malloc 1000 3000\nnew_path;malloc 0 200\nsession_new;malloc 500 0\nsteady;malloc 64 64\n"
        );

        let mut svg = Vec::new();
        write_svg(&d, &mut svg).unwrap();
        let svg = String::from_utf8(svg).unwrap();
        assert!(
            svg.contains("app: live bytes, pid 7 -&gt; pid 8")
                || svg.contains("app: live bytes, pid 7 -> pid 8")
        );
        // inferno's differential tooltips carry the change in percent.
        assert!(svg.contains("cache_put (3,000 bytes"), "{svg}");
        assert!(svg.contains("+"), "growth is marked");
    }

    #[test]
    fn stacks_match_by_lines_and_merge_their_variants() {
        let libc = Some("/lib/libc.so.6");
        let at = |line: u32, offset: u64| {
            let mut f = frame(Some("fill"), Some("/bin/app"), offset);
            f.file = Some("/src/app.c".to_owned());
            f.line = Some(line);
            vec![frame(Some("malloc"), libc, 1), f]
        };
        // Before: line 10 in two variants (two call sites), line 20. After, on another host
        // (other paths and addresses): line 10 grew, line 20 went.
        let before = report(vec![stack(100, 100, at(10, 0x10)), stack(50, 50, at(10, 0x18)), stack(7, 7, at(20, 0x30))]);
        let mut after_frames = at(10, 0x99);
        after_frames[1].module = Some("/opt/app/bin/app".to_owned());
        let after = report(vec![stack(400, 400, after_frames)]);
        let d = diff(&before, &after, Metric::Held);
        let got: Vec<(Option<u32>, u64, u64)> = d
            .stacks
            .iter()
            .map(|s| (s.frames[1].line, s.before, s.after))
            .collect();
        assert_eq!(got, [(Some(10), 150, 400), (Some(20), 7, 0)]);
        // Folded lines keep function names only: both code paths are one line there.
        assert_eq!(folded_lines(&d), ["fill;malloc 157 400"]);
        let mut text = Vec::new();
        write_text(&d, &mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains("      fill  (/src/app.c:10)\n"), "{text}");
        assert!(text.contains("before: pid 7 (app), recorded 1.0 s: bytes held"), "{text}");
    }

    #[test]
    fn an_incomplete_report_is_said_to_be() {
        let (mut before, after) = reports();
        before.stacks_total = 10;
        let d = diff(&before, &after, Metric::Live);
        let mut text = Vec::new();
        write_text(&d, &mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.contains("note: the before report holds 3 of its 10 stacks"),
            "{text}"
        );
    }

    #[test]
    fn unreadable_and_non_report_files_are_errors_naming_the_file() {
        let err = read_report(Path::new("/nonexistent/before.json")).unwrap_err();
        assert_eq!(err.to_string(), "read /nonexistent/before.json");
        let path = std::env::temp_dir().join(format!("diff-test-{}.json", std::process::id()));
        std::fs::write(&path, "{\"not\": \"a report\"}").unwrap();
        let err = read_report(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{} is not a tracer JSON report", path.display())
        );
        std::fs::remove_file(&path).unwrap();
    }
}
