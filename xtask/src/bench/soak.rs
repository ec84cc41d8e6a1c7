//! `cargo xtask bench soak`: the tracer attached with sampling to a node HTTP service under
//! continuous load for a long while (the live-harness crate's: bench/live_service/server.js,
//! warmed up and loaded by the byte-for-byte client the live-service tests use),
//! sampling the tracer's RSS every few seconds and its loss counters at every `--interval`
//! snapshot. It fails if the tracer's RSS grows by 10% or more after the first minute, if a
//! loss counter grows, or if the service answers a request late (5 s), wrongly or not at all.
//! Writes target/bench/soak.md.
//!
//! Environment (defaults in brackets):
//!   SOAK_SECONDS [600]   how long the tracer stays attached (at least 60)

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs, thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use live_harness::{load, rss_kib};

use crate::{build, util};

const SAMPLE_BYTES: &str = "512KiB";
/// Snapshots (with their loss counters) this often.
const INTERVAL_S: u64 = 30;
/// RSS samples this often.
const RSS_EVERY: Duration = Duration::from_secs(5);
/// The baseline: the tracer's RSS once it has run this long.
const WARM: Duration = Duration::from_secs(60);
const MAX_GROWTH: f64 = 0.10;
const ANSWER_WITHIN: Duration = Duration::from_secs(5);
const CONNECTIONS: usize = 8;

pub fn soak() -> Result<()> {
    let seconds: u64 = match std::env::var("SOAK_SECONDS") {
        Ok(v) => v
            .trim()
            .parse()
            .ok()
            .filter(|&n| n >= WARM.as_secs())
            .with_context(|| format!("SOAK_SECONDS={v}: expected a number of seconds >= 60"))?,
        Err(_) => 600,
    };
    let duration = Duration::from_secs(seconds);
    let tracer = build::build()?;

    // The service, warmed up untraced and under load.
    let warmed = live_harness::warm_service(live_harness::item_paths(64), CONNECTIONS)?;
    let server_pid = warmed.service.pid();
    let load = warmed.load(CONNECTIONS, duration + Duration::from_secs(300));
    thread::sleep(Duration::from_secs(2));

    // The tracer.
    let report_path = util::target_dir().join("bench/soak-report.json");
    fs::create_dir_all(report_path.parent().expect("a parent"))?;
    let started = Instant::now();
    let interval = format!("{INTERVAL_S}s");
    let mut tracer_proc = live_harness::Tracer::attach(
        &tracer,
        server_pid,
        &["--sample-bytes", SAMPLE_BYTES, "--interval", &interval, "--top", "10"],
        Duration::from_secs(60),
    )?;
    let tracer_pid = tracer_proc.pid();
    let attached = started.elapsed();
    eprintln!(
        "xtask: soak: tracer {tracer_pid} attached to node {server_pid} after {attached:?}; \
         {seconds} s to go"
    );

    let mut rss: Vec<(Duration, u64)> = Vec::new();
    let until = Instant::now() + duration;
    let mut next_note = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        if !tracer_proc.running() {
            bail!("the tracer exited while attached");
        }
        if let Some(kib) = rss_kib(tracer_pid) {
            rss.push((started.elapsed() - attached, kib));
        }
        if Instant::now() >= next_note {
            eprintln!(
                "xtask: soak: {:.0} s, tracer RSS {} KiB, {} requests answered",
                (started.elapsed() - attached).as_secs_f64(),
                rss.last().map_or(0, |r| r.1),
                load.answered()
            );
            next_note += Duration::from_secs(60);
        }
        thread::sleep(RSS_EVERY.min(until.saturating_duration_since(Instant::now())));
    }
    let detached = tracer_proc.detach(Duration::from_secs(120));
    let traffic = load.stop();
    drop(warmed);
    let (report, stderr, detach_problem) = match detached {
        Ok(d) => (d.report, d.stderr, None),
        Err(e) => (serde_json::Value::Null, String::new(), Some(e.to_string())),
    };
    if !report.is_null() {
        fs::write(&report_path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("write {}", report_path.display()))?;
    }

    // Loss counters at each snapshot: the text snapshots' "dropped:" lines.
    let snapshots: Vec<BTreeMap<String, u64>> = stderr
        .lines()
        .filter_map(|l| {
            let rest = l.trim_start().strip_prefix("dropped:")?.trim();
            let counters = if rest == "none" {
                BTreeMap::new()
            } else {
                rest.split(", ")
                    .filter_map(|kv| {
                        let (k, v) = kv.split_once('=')?;
                        Some((k.to_owned(), v.parse().ok()?))
                    })
                    .collect()
            };
            Some(counters)
        })
        .collect();

    let at = |t: Duration| rss.iter().find(|(s, _)| *s >= t).or(rss.last()).map_or(0, |r| r.1);
    let (warm_kib, end_kib) = (at(WARM), rss.last().map_or(0, |r| r.1));
    let peak_kib = rss.iter().map(|r| r.1).max().unwrap_or(0);
    let growth = end_kib as f64 / warm_kib.max(1) as f64 - 1.0;
    let first_losses = snapshots.first().cloned().unwrap_or_default();
    let last_losses = snapshots.last().cloned().unwrap_or_default();
    let final_dropped = report["totals"]["dropped"].clone();

    let mut problems = Vec::new();
    if let Some(why) = detach_problem {
        problems.push(format!("the tracer did not detach cleanly: {why}"));
    }
    if growth >= MAX_GROWTH {
        problems.push(format!(
            "the tracer's RSS grew {:.1}% after minute 1 ({warm_kib} -> {end_kib} KiB)",
            growth * 100.0
        ));
    }
    if snapshots.len() < 2 {
        problems.push(format!("only {} snapshots with loss counters were printed", snapshots.len()));
    }
    if first_losses != last_losses {
        problems.push(format!("loss counters grew: {first_losses:?} at the first snapshot, {last_losses:?} at the last"));
    }
    if final_dropped.as_object().is_some_and(|o| o.values().any(|v| v.as_u64() != Some(0))) {
        problems.push(format!("the final report counts losses: {final_dropped}"));
    }
    let late = traffic.slower_than(ANSWER_WITHIN);
    if !late.is_empty() || traffic.count(load::Outcome::Changed) > 0 {
        problems.push(format!(
            "the service answered {} requests late or not at all and {} wrongly",
            late.len(),
            traffic.count(load::Outcome::Changed)
        ));
    }

    let mut md = format!(
        "# Soak (cargo xtask bench soak)\n\n\
         `tracer record --pid <node bench/live_service/server.js> --sample-bytes {SAMPLE_BYTES} --interval {INTERVAL_S}s` \
         for {seconds} s, {CONNECTIONS} keep-alive connections of load.\n\n\
         | figure | value |\n|---|---|\n\
         | tracer RSS at minute 1 | {warm_kib} KiB |\n\
         | tracer RSS at the end ({:.0} s) | {end_kib} KiB |\n\
         | growth after minute 1 | {:+.1}% (limit {:.0}%) |\n\
         | peak RSS | {peak_kib} KiB |\n\
         | snapshots | {} |\n\
         | losses at the first / last snapshot | {first_losses:?} / {last_losses:?} |\n\
         | losses in the final report | {final_dropped} |\n\
         | load | {} |\n\n",
        rss.last().map_or(0.0, |r| r.0.as_secs_f64()),
        growth * 100.0,
        MAX_GROWTH * 100.0,
        snapshots.len(),
        traffic.summary()
    );
    md.push_str("Tracer RSS by minute (KiB):");
    for minute in 0..=seconds / 60 {
        let _ = write!(md, " {}", at(Duration::from_secs(minute * 60)));
    }
    md.push('\n');
    if problems.is_empty() {
        md.push_str("\nResult: pass\n");
    } else {
        let _ = write!(md, "\nResult: FAIL\n- {}\n", problems.join("\n- "));
    }
    let path = util::target_dir().join("bench/soak.md");
    fs::write(&path, &md).with_context(|| format!("write {}", path.display()))?;
    print!("{md}");
    eprintln!("xtask: wrote {}", path.display());
    if !problems.is_empty() {
        bail!("soak failed: {}", problems.join("; "));
    }
    Ok(())
}
