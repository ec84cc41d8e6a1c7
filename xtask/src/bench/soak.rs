//! `cargo xtask bench soak`: the tracer attached with sampling to a node HTTP service under
//! continuous load (the service and load client of the live-service tests) for a long while,
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
    fs,
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

#[path = "../../../tests/support/load.rs"]
#[expect(dead_code, reason = "the test suite uses more of the load client than the soak does")]
mod load;

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

/// A child killed when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Reads a child's stream line by line into a shared list, with the time each line came.
fn collect_lines(
    stream: impl std::io::Read + Send + 'static,
    started: Instant,
) -> Arc<Mutex<Vec<(Duration, String)>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            sink.lock().expect("lines lock").push((started.elapsed(), line));
        }
    });
    lines
}

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
    let root = util::workspace_root();

    // The service.
    let mut server = Guard(
        util::command("/usr/bin/node")
            .arg(root.join("tests/fixtures/http_server.js"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start node tests/fixtures/http_server.js")?,
    );
    let server_pid = server.0.id();
    let mut first = String::new();
    BufReader::new(server.0.stdout.take().expect("piped"))
        .read_line(&mut first)
        .context("read the service's port")?;
    let port: u16 = first
        .trim()
        .strip_prefix("listening ")
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("the service said {first:?}, not `listening PORT`"))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let paths: Vec<String> = (0..64).map(|i| format!("/item/{}", i * 257 + 3)).collect();
    let reference = Arc::new(
        load::fetch_reference(addr, &paths).map_err(|e| anyhow::anyhow!("reference answers: {e}"))?,
    );
    let load = load::Load::start(
        load::LoadConfig {
            addr,
            connections: CONNECTIONS,
            paths,
            max_requests: u64::MAX,
            max_duration: duration + Duration::from_secs(300),
        },
        reference,
    );
    thread::sleep(Duration::from_secs(2));

    // The tracer.
    let report_path = util::target_dir().join("bench/soak-report.json");
    fs::create_dir_all(report_path.parent().expect("a parent"))?;
    let started = Instant::now();
    let mut child = Command::new(&tracer)
        .args(["record", "--pid", &server_pid.to_string(), "--sample-bytes", SAMPLE_BYTES])
        .args(["--interval", &format!("{INTERVAL_S}s"), "--top", "10", "--format", "json", "-o"])
        .arg(&report_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {}", tracer.display()))?;
    let stderr = collect_lines(child.stderr.take().expect("piped"), started);
    let tracer_pid = child.id();
    let mut tracer_proc = Guard(child);
    let recording = format!("recording pid {server_pid}");
    while !stderr.lock().expect("lock").iter().any(|(_, l)| l.contains(&recording)) {
        if started.elapsed() > Duration::from_secs(60) || tracer_proc.0.try_wait()?.is_some() {
            bail!(
                "the tracer did not start recording:\n{}",
                stderr.lock().expect("lock").iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>().join("\n")
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    let attached = started.elapsed();
    eprintln!("xtask: soak: tracer {tracer_pid} attached to node {server_pid} after {attached:?}; {seconds} s to go");

    let mut rss: Vec<(Duration, u64)> = Vec::new();
    let until = Instant::now() + duration;
    let mut next_note = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        if tracer_proc.0.try_wait()?.is_some() {
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
    // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
    unsafe { libc::kill(tracer_pid as i32, libc::SIGINT) };
    let status = tracer_proc.0.wait()?;
    let traffic = load.stop();
    drop(server);

    // Loss counters at each snapshot: the text snapshots' "dropped:" lines.
    let lines = stderr.lock().expect("lock").clone();
    let snapshots: Vec<(Duration, BTreeMap<String, u64>)> = lines
        .iter()
        .filter_map(|(t, l)| {
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
            Some((*t, counters))
        })
        .collect();
    let report: serde_json::Value = fs::read_to_string(&report_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .with_context(|| format!("the tracer wrote no report to {}", report_path.display()))?;

    let at = |t: Duration| rss.iter().find(|(s, _)| *s >= t).or(rss.last()).map_or(0, |r| r.1);
    let (warm_kib, end_kib) = (at(WARM), rss.last().map_or(0, |r| r.1));
    let peak_kib = rss.iter().map(|r| r.1).max().unwrap_or(0);
    let growth = end_kib as f64 / warm_kib.max(1) as f64 - 1.0;
    let first_losses = snapshots.first().map(|s| s.1.clone()).unwrap_or_default();
    let last_losses = snapshots.last().map(|s| s.1.clone()).unwrap_or_default();
    let final_dropped = report["totals"]["dropped"].clone();

    let mut problems = Vec::new();
    if !status.success() {
        problems.push(format!("the tracer ended with {status}"));
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
         `tracer record --pid <node http_server.js> --sample-bytes {SAMPLE_BYTES} --interval {INTERVAL_S}s` \
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
