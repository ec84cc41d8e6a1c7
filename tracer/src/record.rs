//! `tracer record`: a recording (attach or launch) polled until told to stop, then the
//! report; also `map`, `report` and `diff`, which only read.
use std::{
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{
    aggregate::Profile,
    diag,
    diff::DiffOptions,
    output::Output,
    memmap::{self, ClassTotals},
    options::{Format, RecordOptions, TargetSpec},
    recording::{Recording, Status, TICK, stop_requested},
    regions::Regions,
    report::{self, AllocatorView, folded::Metric},
    symbolize::{Symbolizer, maps::ProcMaps},
    target,
};

/// What recording ended with, for the caller's exit status.
pub struct Outcome {
    /// Exit status of a launched command, when it exited while we watched.
    pub exit_code: Option<i32>,
}

pub fn record(opts: &RecordOptions) -> anyhow::Result<Outcome> {
    // A report that cannot be written is found out now, not after the recording.
    let output = Output::open(opts.output.as_deref())?;
    let mut recording = Recording::start(opts)?;
    let mut next_interval = opts.interval.map(|i| Instant::now() + i);
    loop {
        std::thread::sleep(TICK);
        if recording.tick() == Status::Ended {
            break;
        }
        if stop_requested() || opts.duration.is_some_and(|d| recording.elapsed() >= d) {
            break;
        }
        if let Some(due) = next_interval.filter(|due| Instant::now() >= *due) {
            print_snapshot(&mut recording, opts)?;
            next_interval = opts.interval.map(|i| due + i);
        }
    }
    let profile = recording.finish(opts.min_age)?;
    let glibc = malloc_stats(opts, recording.pid());
    let rep = final_report(&mut recording, &profile, opts, glibc);
    output.write(|out| write_as(&rep, opts.format, rep.metric, &mut |m| recording.symbolizer().build_id(m), out))?;
    // With V8's frames read from its memory, the perf-map advice does not apply.
    let hint = match recording.js_frames() {
        Some((_, 0)) => None,
        Some((_, unnamed)) => Some(format!(
            "{unnamed} JavaScript functions stay unnamed (their frames: totals.unnamed_js_frames): {}",
            recording
                .js_failures()
                .iter()
                .map(|(why, n)| format!("{n} {why}"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        None => recording.symbolizer().jit_hint(),
    };
    if let Some(hint) = hint {
        diag::warn(hint);
    }
    for note in recording.symbolizer().take_notes() {
        diag::warn(note);
    }
    Ok(Outcome {
        exit_code: recording.end(true),
    })
}

/// `--interval`: the profile so far, remembered for the growth series, as text on stderr.
fn print_snapshot(recording: &mut Recording, opts: &RecordOptions) -> anyhow::Result<()> {
    let profile = recording.snapshot()?;
    // Snapshots have no series yet: they rank by the metric asked for, else held.
    let metric = opts.metric.unwrap_or(Metric::Held);
    let rep = recording.report(&profile, report::Ranking { metric, top: opts.top, peak_fallback: false });
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "--- snapshot at {:.1} s", recording.elapsed().as_secs_f64());
    let _ = report::text::write(&rep, &mut err);
    Ok(())
}

/// glibc's own figures, asked once every probe is out: the call needs the threads to itself.
fn malloc_stats(opts: &RecordOptions, pid: u32) -> Option<crate::mallocstats::MallocStats> {
    match (opts.malloc_stats, &opts.target) {
        (true, TargetSpec::Pid(_)) if target::is_alive(pid) => {
            match crate::mallocstats::inspect(pid, Duration::from_secs(2)) {
                Ok(stats) => Some(stats),
                Err(e) => {
                    diag::warn(format_args!("malloc-stats: {e:#}"));
                    None
                }
            }
        }
        _ => None,
    }
}

/// The report at the end: the profile with names, the memory map, the allocator's view.
fn final_report(
    recording: &mut Recording,
    profile: &Profile,
    opts: &RecordOptions,
    glibc: Option<crate::mallocstats::MallocStats>,
) -> report::Report {
    let (metric, peak_fallback) = report::choose_metric(
        opts.metric,
        opts.interval.is_some(),
        recording.exit_code().is_some(),
        &profile.totals,
    );
    let mut rep = recording.report(profile, report::Ranking { metric, top: opts.top, peak_fallback });
    rep.memory_map = recording.memory_map().map(<[_]>::to_vec);
    rep.allocator = Some(AllocatorView {
        live_malloc_bytes: profile.totals.live_bytes,
        node_array_buffer_bytes: (recording.command() == "node").then(|| {
            report::live_bytes_through(profile, "node::NodeArrayBufferAllocator::", recording.symbolizer())
        }),
        glibc,
    });
    rep.interval_ms = opts.interval.map(|i| i.as_millis() as u64);
    rep.min_age_ms = opts.min_age.map(|a| a.as_millis() as u64);
    rep
}

/// The memory map of a process right now, for `tracer map`.
pub fn map(pid: u32) -> anyhow::Result<Vec<ClassTotals>> {
    let info = target::inspect(pid)?;
    let maps = ProcMaps::read(pid)?;
    let regions = Regions::from_maps(&maps);
    memmap::memory_map(pid, &regions, None).with_context(|| format!("pid {pid} ({})", info.command))
}

/// Renders `rep` in `format`; `build_id` names modules' build ids for pprof.
pub fn write_as(
    rep: &report::Report,
    format: Format,
    metric: Metric,
    build_id: &mut dyn FnMut(&str) -> Option<String>,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    match format {
        Format::Text => report::text::write(rep, out),
        Format::Json => report::json::write(rep, out),
        Format::Folded => report::folded::write(rep, metric, out),
        Format::Svg => report::svg::write(rep, metric, out),
        Format::Pprof => report::pprof::write(rep, build_id, out),
    }
}

/// Runs `write` on `output` (stdout when None) and flushes.
pub fn write_to(
    output: Option<&Path>,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    Output::open(output)?.write(write)
}

/// `tracer report`: a saved JSON report in another format, its stacks merged by the one rule
/// and ranked by `metric` (default: what the report was ranked by). Its modules may no longer
/// be the files they were, so no build ids are read for pprof.
pub fn convert(
    input: &Path,
    format: Format,
    metric: Option<Metric>,
    output: Option<&Path>,
    resymbolize: Option<&[PathBuf]>,
) -> anyhow::Result<()> {
    let mut rep = crate::diff::read_report(input)?;
    if metric.is_some() {
        rep.peak_fallback = false;
    }
    let metric = metric.unwrap_or(rep.metric);
    let Some(debug_dirs) = resymbolize else {
        report::merge::remerge(&mut rep, metric);
        return write_to(output, |out| write_as(&rep, format, metric, &mut |_| None, out));
    };
    // Names from this host's files as they are now (e.g. after debug files were installed).
    let start = Instant::now();
    let mut symbolizer = Symbolizer::new("/").with_debug_dirs(debug_dirs.to_vec());
    let counts = crate::symbolize::resymbolize::resymbolize(&mut rep, &mut symbolizer);
    diag::warn(format_args!(
        "named {} of {} frames again in {} ms",
        counts.named,
        counts.frames,
        start.elapsed().as_millis()
    ));
    // New names can make stacks one code path that were not before.
    report::merge::remerge(&mut rep, metric);
    write_to(output, |out| {
        write_as(&rep, format, metric, &mut |m| symbolizer.build_id(m), out)
    })
}

/// `tracer diff`.
pub fn diff(opts: &DiffOptions) -> anyhow::Result<()> {
    let before = crate::diff::read_report(&opts.before)?;
    let after = crate::diff::read_report(&opts.after)?;
    let d = crate::diff::diff(&before, &after, opts.metric);
    write_to(opts.output.as_deref(), |out| crate::diff::write(&d, opts.format, out))
}
