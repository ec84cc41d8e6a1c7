//! `cargo xtask symbench`: how long naming a node report's frames takes and how much memory
//! it needs, cold (page cache dropped) and warm, against the targets of 2 s and 500 MB cold.
//! The report is recorded from a real node workload; `tracer report --resymbolize` then names
//! every native frame again from /usr/bin/node (98 MB) and the libraries, in a fresh process.

use std::{
    fs,
    io::Read,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{build, util};

/// Runs of each kind.
const RUNS: usize = 3;
/// The targets of issue 4, for the cold runs.
const MAX_COLD: Duration = Duration::from_secs(2);
const MAX_RSS_BYTES: u64 = 500 * 1024 * 1024;

/// A workload that allocates through many of node's native paths (Buffers, zlib, crypto,
/// JSON, strings), then exits holding what it made (a natural exit would free it all).
const WORKLOAD: &str = r#"
const zlib = require('zlib');
const crypto = require('crypto');
const kept = [];
for (let i = 0; i < 64; i++) kept.push(Buffer.alloc(64 * 1024 + i));
for (let i = 0; i < 64; i++) kept.push(Buffer.allocUnsafe(8192 + i));
const text = JSON.stringify(Array.from({ length: 20000 }, (_, i) => ({ i, s: 'x'.repeat(i % 50) })));
kept.push(JSON.parse(text));
for (let i = 0; i < 20; i++) kept.push(zlib.gzipSync(Buffer.from(text.slice(i * 1000))));
for (let i = 0; i < 20; i++) kept.push(crypto.createHash('sha256').update(text).digest());
kept.push(crypto.randomBytes(1 << 20));
globalThis.kept = kept;
process.exit(0);
"#;

struct Run {
    wall: Duration,
    /// The tracer's own timing of the naming, without reading and writing JSON.
    symbolize_ms: u64,
    max_rss: u64,
    frames: String,
}

pub fn symbench() -> Result<()> {
    let tracer = build::build()?;
    let dir = util::target_dir().join("bench");
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let script = dir.join("symbench.js");
    fs::write(&script, WORKLOAD).with_context(|| format!("write {}", script.display()))?;
    // The whole report (every stack), and the top stack alone, whose naming is almost all
    // loading node's tables: the fixed cost every report pays once.
    let mut text = format!(
        "# Naming a node report: `tracer report --resymbolize`\n\
         \n\
         Reports recorded from node running a Buffer/zlib/crypto/JSON workload. Each run is a \
         fresh process that reads the report, names every native frame from /usr/bin/node \
         (98 MB, .symtab and partial DWARF) and the libraries (and their debug files where \
         installed), and writes the report. Cold runs drop the page cache first. Targets \
         (cold): under {} s and {} MB.\n\
         \n\
         | report | run | wall ms | naming ms | max RSS MB |\n\
         |---|---|---:|---:|---:|\n",
        MAX_COLD.as_secs(),
        MAX_RSS_BYTES / (1024 * 1024),
    );
    let mut all_runs = Vec::new();
    for (top, name) in [
        ("0", "symbench-node-all.json"),
        ("1", "symbench-node-top1.json"),
    ] {
        let report = dir.join(name);
        eprintln!(
            "xtask: recording node running {} (--top {top})",
            script.display()
        );
        util::run(
            util::command(&tracer)
                .args(["record", "--top", top, "--format", "json", "-o"])
                .arg(&report)
                .args(["--", "/usr/bin/node"])
                .arg(&script),
        )?;
        remove_perf_map(&report);
        let size = fs::metadata(&report).map(|m| m.len()).unwrap_or(0);
        for cold in [true, false] {
            for run in 1..=RUNS {
                if cold {
                    drop_caches()?;
                }
                let r = resolve(&tracer, &report)?;
                let kind = if cold { "cold" } else { "warm" };
                eprintln!(
                    "xtask: {name} {kind} run {run}/{RUNS}: {:.0} ms wall, {} ms naming, {:.0} MB max RSS",
                    r.wall.as_secs_f64() * 1000.0,
                    r.symbolize_ms,
                    r.max_rss as f64 / 1e6
                );
                text.push_str(&format!(
                    "| {name} ({:.1} MB, {}) | {kind} | {:.0} | {} | {:.0} |\n",
                    size as f64 / 1e6,
                    r.frames,
                    r.wall.as_secs_f64() * 1000.0,
                    r.symbolize_ms,
                    r.max_rss as f64 / 1e6
                ));
                all_runs.push((cold, r));
            }
        }
    }
    let out = dir.join("symbolize.md");
    fs::write(&out, &text).with_context(|| format!("write {}", out.display()))?;
    print!("{text}");
    eprintln!("xtask: wrote {}", out.display());

    let worst_wall = all_runs
        .iter()
        .filter(|(c, _)| *c)
        .map(|(_, r)| r.wall)
        .max()
        .unwrap_or_default();
    let worst_rss = all_runs.iter().map(|(_, r)| r.max_rss).max().unwrap_or(0);
    if worst_wall > MAX_COLD || worst_rss > MAX_RSS_BYTES {
        bail!(
            "symbolization misses its target: cold wall up to {:.0} ms (target {} ms), max RSS \
             {:.0} MB (target {} MB)",
            worst_wall.as_secs_f64() * 1000.0,
            MAX_COLD.as_millis(),
            worst_rss as f64 / 1e6,
            MAX_RSS_BYTES / (1024 * 1024)
        );
    }
    Ok(())
}

/// Runs `tracer report REPORT --resymbolize` and measures it from outside (wall clock, peak
/// RSS from wait4) and from inside (the line it prints).
fn resolve(tracer: &Path, report: &Path) -> Result<Run> {
    let mut cmd = util::command(tracer);
    cmd.args([
        "report",
        "--resymbolize",
        "--format",
        "json",
        "-o",
        "/dev/null",
    ])
    .arg(report)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("start `{}`", util::describe(&cmd)))?;
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        pipe.read_to_string(&mut stderr)?;
    }
    let pid = i32::try_from(child.id()).context("pid")?;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, which std has not reaped; both pointers are valid.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = start.elapsed();
    if rc != pid {
        bail!(
            "wait4 for `{}`: {}",
            util::describe(&cmd),
            std::io::Error::last_os_error()
        );
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!(
            "`{}` failed (wait status {status:#x}): {stderr}",
            util::describe(&cmd)
        );
    }
    // "tracer: named X of Y frames again in Z ms"
    let line = stderr
        .lines()
        .find(|l| l.contains("frames again in"))
        .with_context(|| {
            format!(
                "`{}` did not say how long naming took: {stderr}",
                util::describe(&cmd)
            )
        })?;
    let symbolize_ms = line
        .rsplit(" in ")
        .next()
        .and_then(|t| t.trim_end_matches(" ms").parse().ok())
        .with_context(|| format!("no time in {line:?}"))?;
    let frames = format!(
        "{} frames named",
        line.trim_start_matches("tracer: named ")
            .split(" frames")
            .next()
            .unwrap_or("?")
    );
    Ok(Run {
        wall,
        symbolize_ms,
        // ru_maxrss is in KiB on Linux.
        max_rss: u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024,
        frames,
    })
}

/// Drops clean page-cache pages so that the next run reads node from disk.
fn drop_caches() -> Result<()> {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", "3")
        .context("write /proc/sys/vm/drop_caches (needs root)")
}

/// The perf map node wrote while recording (`tracer record -- node` turns it on).
fn remove_perf_map(report: &Path) {
    // "pid" is the report's first field: reading the head keeps this process small, and so
    // the peak RSS its children inherit until they exec.
    let mut head = vec![0; 4096];
    let Ok(n) = fs::File::open(report).and_then(|mut f| f.read(&mut head)) else {
        return;
    };
    let text = String::from_utf8_lossy(&head[..n]);
    let pid = text
        .split("\"pid\":")
        .nth(1)
        .and_then(|rest| {
            rest.trim_start()
                .split(|c: char| !c.is_ascii_digit())
                .next()
        })
        .and_then(|n| n.parse::<u32>().ok());
    if let Some(pid) = pid {
        let _ = fs::remove_file(format!("/tmp/perf-{pid}.map"));
    }
}
