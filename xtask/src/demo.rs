//! `cargo xtask demo`: the case the tracer exists for. A node HTTP service
//! (examples/node-service/server.js, plain `node`, no flags) grows outside the V8 heap under a
//! bounded loopback load; the tracer attaches to it by pid while it runs, records 10 s with a
//! snapshot every 2 s (so stacks are ranked by growth) and prints its report. Then load and
//! service are stopped. `cargo xtask demo c` traces the small C program examples/leaky.c.

use std::{
    fs,
    io::{BufRead, BufReader, Read},
    path::Path,
    process::{Child, ChildStdout, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::{build, util};

/// Which demo to run.
pub enum Demo {
    Node,
    C,
}

/// Returns the tracer's exit code, which is passed through.
pub fn demo(which: Demo) -> Result<u8> {
    let tracer = build::build()?;
    match which {
        Demo::Node => node(&tracer),
        Demo::C => c(&tracer),
    }
}

fn c(tracer: &Path) -> Result<u8> {
    let out_dir = util::target_dir().join("xtask");
    fs::create_dir_all(&out_dir).with_context(|| format!("create {}", out_dir.display()))?;
    let leaky = out_dir.join("leaky");
    util::run(
        util::command("cc")
            .args(["-O1", "-g", "-fno-omit-frame-pointer", "-o"])
            .arg(&leaky)
            .arg("examples/leaky.c"),
    )?;
    let status = util::status(util::command(tracer).args(["record", "--top", "10", "--"]).arg(&leaky))?;
    Ok(util::exit_code(status))
}

/// How long the tracer records, and how often it takes a snapshot.
const DURATION: &str = "10s";
const INTERVAL: &str = "2s";
/// Requests the load sends at most, and for how long (it is stopped once the report is out).
const LOAD_REQUESTS: &str = "6000";
const LOAD_SECONDS: &str = "40";

fn node(tracer: &Path) -> Result<u8> {
    let dir = util::workspace_root().join("examples/node-service");
    let out_dir = util::target_dir().join("xtask");
    fs::create_dir_all(&out_dir).with_context(|| format!("create {}", out_dir.display()))?;

    // As it would run in production: no flags, so no perf map for JavaScript frames.
    let mut service = Running::start(
        "service",
        util::command("node").arg(dir.join("server.js")).stdout(Stdio::piped()),
    )?;
    let service_out = lines(service.stdout()?);
    let listening = service_out
        .recv_timeout(Duration::from_secs(15))
        .context("the service did not say where it listens within 15 s")?;
    let port = listening
        .strip_prefix("listening on 127.0.0.1:")
        .context(format!("the service said {listening:?}, not where it listens"))?
        .to_owned();
    eprintln!("demo: node service pid {} {listening}; starting the load", service.pid());

    let mut load = Running::start(
        "load",
        util::command("node")
            .arg(dir.join("load.js"))
            .args([&port, LOAD_REQUESTS, LOAD_SECONDS])
            .stdout(Stdio::piped()),
    )?;
    let load_out = lines(load.stdout()?);
    // Let the service warm up under load before the tracer arrives.
    thread::sleep(Duration::from_secs(2));
    eprintln!(
        "demo: tracer record --pid {} --duration {DURATION} --interval {INTERVAL} --top 6",
        service.pid()
    );

    // The snapshots every 2 s go to stderr: kept in a file, only the tracer's own lines shown.
    let snapshots = out_dir.join("demo-snapshots.txt");
    let mut tracer = Running::start(
        "tracer",
        util::command(tracer)
            .args(["record", "--pid", &service.pid().to_string()])
            .args(["--duration", DURATION, "--interval", INTERVAL, "--top", "6"])
            .stderr(Stdio::piped()),
    )?;
    let mut stderr = String::new();
    tracer
        .child
        .stderr
        .take()
        .context("tracer stderr")?
        .read_to_string(&mut stderr)
        .context("read the tracer's stderr")?;
    let status = tracer.child.wait().context("wait for the tracer")?;
    fs::write(&snapshots, &stderr).with_context(|| format!("write {}", snapshots.display()))?;
    for line in stderr.lines().filter(|l| l.starts_with("tracer:")) {
        eprintln!("{line}");
    }
    eprintln!("demo: the snapshots the tracer printed every {INTERVAL} are in {}", snapshots.display());

    load.stop();
    service.stop();
    // What each said as it stopped (their pipes are closed now: no waiting).
    for line in load_out.try_iter().chain(service_out.try_iter()) {
        eprintln!("demo: {line}");
    }
    Ok(util::exit_code(status))
}

/// A child that is stopped (SIGTERM, then SIGKILL after 5 s) and reaped when dropped, so that
/// an error anywhere leaves neither the service nor the load running.
struct Running {
    name: &'static str,
    child: Child,
}

impl Running {
    fn start(name: &'static str, cmd: &mut Command) -> Result<Running> {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("start the {name}: `{}`", util::describe(cmd)))?;
        Ok(Running { name, child })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stdout(&mut self) -> Result<ChildStdout> {
        self.child.stdout.take().with_context(|| format!("{} stdout", self.name))
    }

    /// SIGTERM, then SIGKILL if it has not exited within 5 s; reaps it.
    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The lines `out` gives, as they come, read by a thread of their own.
fn lines(out: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}
