//! How long the tracer takes to start and to stop: `tracer record -o /dev/null -- /bin/true`
//! from start to exit, and on a node process attached by pid (bench/node_hold.js): from the
//! tracer's start to its "recording" line, and from SIGINT to the target being released (no
//! breakpoint left in its C library, and for ptrace TracerPid 0) and to the tracer's exit.

use std::{
    fs,
    os::unix::fs::FileExt as _,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{
    probes::{self, LibcFunction},
    run::{Env, Proc},
    table::{median, min_max, num},
};
use crate::util;

/// Every function the tracer probes in glibc (free a few bytes in, see `cheap_free_offset`).
const PROBED: [&str; 9] = [
    "malloc",
    "calloc",
    "realloc",
    "reallocarray",
    "posix_memalign",
    "aligned_alloc",
    "valloc",
    "pvalloc",
    "free",
];
/// How long the tracer records node before it is stopped.
pub const RECORD_FOR: Duration = Duration::from_secs(2);
const TIMEOUT: Duration = Duration::from_secs(60);
/// Poll interval while waiting for the release and the exit.
const POLL: Duration = Duration::from_millis(1);

/// One measured span, in milliseconds per run.
pub struct Row {
    pub what: String,
    pub ms: Vec<f64>,
    /// The goal, in ms, when there is one.
    pub target_ms: Option<f64>,
}

/// The tracer modes the node measurement runs in: (name, extra arguments, ptrace).
const MODES: [(&str, &[&str], bool); 3] = [
    ("eBPF, full", &[], false),
    ("eBPF, --sample-bytes 512KiB", &["--sample-bytes", "512KiB"], false),
    ("ptrace backend", &["--backend", "ptrace"], true),
];

pub fn measure(env: &Env, runs: usize, bench_dir: &Path) -> Result<Vec<Row>> {
    let mut launch = Row {
        what: "`tracer record -o /dev/null -- /bin/true`: start to exit".into(),
        ms: Vec::new(),
        target_ms: Some(500.0),
    };
    for run in 0..runs {
        let ms = launch_true(&env.tracer)?;
        eprintln!("xtask: bench latency {}/{runs} /bin/true: {} ms", run + 1, num(ms));
        launch.ms.push(ms);
    }
    let mut rows = vec![launch];
    for (mode, args, ptrace) in MODES {
        let mut attach = Vec::new();
        let mut released = Vec::new();
        let mut exited = Vec::new();
        for run in 0..runs {
            let m = node_stop(env, bench_dir, args, ptrace)
                .with_context(|| format!("node, {mode}"))?;
            eprintln!(
                "xtask: bench latency {}/{runs} node, {mode}: attach {} ms, SIGINT -> released {} ms, -> exit {} ms",
                run + 1,
                num(m.attach_ms),
                num(m.released_ms),
                num(m.exit_ms)
            );
            attach.push(m.attach_ms);
            released.push(m.released_ms);
            exited.push(m.exit_ms);
        }
        let full = mode == "eBPF, full";
        rows.push(Row {
            what: format!("node by pid, {mode}: start to \"recording\""),
            ms: attach,
            target_ms: None,
        });
        rows.push(Row {
            what: format!("node by pid, {mode}: SIGINT to the target released"),
            ms: released,
            target_ms: None,
        });
        rows.push(Row {
            what: format!("node by pid, {mode}: SIGINT to the tracer's exit"),
            ms: exited,
            target_ms: full.then_some(300.0),
        });
    }
    Ok(rows)
}

/// Wall time of one launch of /bin/true under the tracer, in ms.
fn launch_true(tracer: &Path) -> Result<f64> {
    let mut cmd = util::command(tracer);
    cmd.args(["record", "-o", "/dev/null", "--", "/bin/true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("run `{}`", util::describe(&cmd)))?;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}\n{}",
            util::describe(&cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(ms)
}

struct Stop {
    attach_ms: f64,
    released_ms: f64,
    exit_ms: f64,
}

/// Attaches to a fresh node_hold.js, records it for a while, sends SIGINT, and times the
/// release of the target and the tracer's exit.
fn node_stop(env: &Env, bench_dir: &Path, args: &[&str], ptrace: bool) -> Result<Stop> {
    let mut node = Proc::spawn(
        "node_hold.js",
        Command::new("/usr/bin/node").arg(bench_dir.join("node_hold.js")),
    )?;
    node.stdout
        .wait_for("\"ready\" from node_hold.js", TIMEOUT, |l| (l.trim() == "ready").then_some(()))?;
    let pid = node.pid();
    let libc = probes::libc_of(pid, &PROBED)?;
    // Every function's first byte, and free's cheap probe place: eBPF probes free there, the
    // ptrace backend at its first byte.
    let mut probed: Vec<LibcFunction> = libc.functions.clone();
    let free = libc.function("free")?;
    let at = probes::cheap_free_offset(free);
    if at != 0 {
        let mut later = free.clone();
        later.address += at;
        later.file_offset += at;
        later.name = format!("free+{at}");
        probed.push(later);
    }
    let mem = fs::File::open(format!("/proc/{pid}/mem"))
        .with_context(|| format!("open /proc/{pid}/mem"))?;

    let mut cmd = util::command(&env.tracer);
    cmd.args(["record", "-o", "/dev/null", "--pid", &pid.to_string()])
        .args(args);
    let started = Instant::now();
    let mut tracer = Proc::spawn("tracer", &mut cmd)?;
    let wanted = format!("tracer: recording pid {pid}");
    tracer.stderr.wait_for("the tracer's recording line", TIMEOUT, |l| {
        l.starts_with(&wanted).then_some(())
    })?;
    let attach_ms = started.elapsed().as_secs_f64() * 1e3;
    // What is in place once attached: with at == 0 both backends probe free's first byte.
    let not_probed = match (ptrace, at) {
        (_, 0) => String::new(),
        (true, at) => format!("free+{at}"),
        (false, _) => "free".to_owned(),
    };
    let refs: Vec<&LibcFunction> = probed.iter().filter(|f| f.name != not_probed).collect();
    probes::wait_for_breakpoints(pid, &refs, TIMEOUT)?;
    if ptrace && tracer_pid(pid)? == 0 {
        bail!("the ptrace backend said it was recording, but node has no tracer");
    }
    thread::sleep(RECORD_FOR);

    // SAFETY: kill(2) on our own child.
    if unsafe { libc::kill(tracer.pid() as libc::pid_t, libc::SIGINT) } != 0 {
        return Err(std::io::Error::last_os_error()).context("send SIGINT to the tracer");
    }
    let stopped = Instant::now();
    let mut released_ms = None;
    let mut exit_ms = None;
    while released_ms.is_none() || exit_ms.is_none() {
        if stopped.elapsed() > TIMEOUT {
            bail!(
                "{TIMEOUT:?} after SIGINT: target released {}, tracer exited {}",
                released_ms.is_some(),
                exit_ms.is_some()
            );
        }
        if released_ms.is_none() && is_released(&mem, &probed, pid, ptrace)? {
            released_ms = Some(stopped.elapsed().as_secs_f64() * 1e3);
        }
        if exit_ms.is_none() {
            if let Some(status) = tracer.child.try_wait()? {
                exit_ms = Some(stopped.elapsed().as_secs_f64() * 1e3);
                if !status.success() {
                    let err = tracer.stderr.rest(Duration::from_secs(1));
                    bail!("the tracer exited with {status} after SIGINT\n{err}");
                }
            }
        }
        thread::sleep(POLL);
    }
    // The target runs on untraced; it is only a workload.
    drop(node);
    Ok(Stop {
        attach_ms,
        released_ms: released_ms.expect("loop ends with both"),
        exit_ms: exit_ms.expect("loop ends with both"),
    })
}

/// No breakpoint left at any probed place (and, for ptrace, no tracer).
fn is_released(mem: &fs::File, probed: &[LibcFunction], pid: u32, ptrace: bool) -> Result<bool> {
    for f in probed {
        let mut byte = [0u8; 1];
        mem.read_exact_at(&mut byte, f.address)
            .with_context(|| format!("read {} of process {pid}", f.name))?;
        if byte[0] == probes::BREAKPOINT {
            return Ok(false);
        }
    }
    Ok(!ptrace || tracer_pid(pid)? == 0)
}

fn tracer_pid(pid: u32) -> Result<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no TracerPid in /proc/PID/status")
}

/// The Markdown table of the rows.
pub fn table(rows: &[Row]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    out.push_str("| span | runs | ms, median | min–max | target |\n|---|---:|---:|---:|---|\n");
    for r in rows {
        let (lo, hi) = min_max(&r.ms);
        let m = median(&r.ms);
        let target = match r.target_ms {
            Some(t) if m < t => format!("under {} ms: met", num(t)),
            Some(t) => format!("under {} ms: NOT met", num(t)),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {}–{} | {target} |",
            r.what,
            r.ms.len(),
            num(m),
            num(lo),
            num(hi)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_show_median_range_and_verdict() {
        let rows = [
            Row { what: "a".into(), ms: vec![120.0, 100.0, 140.0], target_ms: Some(300.0) },
            Row { what: "b".into(), ms: vec![2700.0, 2600.0], target_ms: Some(500.0) },
            Row { what: "c".into(), ms: vec![5.0], target_ms: None },
        ];
        let t = table(&rows);
        assert!(t.contains("| a | 3 | 120 | 100–140 | under 300 ms: met |"), "{t}");
        assert!(t.contains("| b | 2 | 2650 | 2600–2700 | under 500 ms: NOT met |"), "{t}");
        assert!(t.contains("| c | 1 | 5.0 | 5.0–5.0 |  |"), "{t}");
    }
}
