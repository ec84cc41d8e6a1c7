//! The live-service harness: the node HTTP service of bench/live_service (server.js), runs of
//! its closed-loop client (client.js), a measured window of requests (the service's CPU, a
//! tracer's CPU, wall time), and this tracer attached to the running service and detached.
//! The bench's live workload is built on it; anything that needs a service under load and
//! attach cycles can use it too. Every process it starts is killed when its handle is dropped,
//! and with SIGKILL when xtask itself dies.

use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{
    probes::{self, LibcFunction},
    run::{self, ATTACH_TIMEOUT, Proc, TIMEOUT},
};
use crate::util;

const NODE: &str = "/usr/bin/node";
/// How long node may take to start the service or the client (the client renders every item
/// once first).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the service may take to exit after SIGTERM, and the target to lose its probes
/// after the tracer exits.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

fn script(name: &str) -> PathBuf {
    util::workspace_root().join("bench/live_service").join(name)
}

/// Makes the child get SIGKILL when the thread that spawns it ends (xtask exiting, or killed),
/// so that no service or tracer outlives the bench. Spawn from a thread that outlives it.
fn die_with_parent(cmd: &mut Command) -> &mut Command {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
    // functions (prctl, getppid, _exit); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the signal was asked for.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        })
    }
}

/// How much load a client run puts on the service.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    /// Requests in all; the run ends when every one is answered or has failed.
    pub requests: u64,
    /// Keep-alive connections, each with one request in flight (closed loop).
    pub concurrency: u32,
}

/// What a client run got back.
#[derive(Clone, Debug)]
pub struct Answered {
    pub requests: u64,
    /// A 200 with the item's body length.
    pub ok: u64,
    /// Anything else: another status, another length, a connection error, 30 s without answer.
    pub errors: u64,
    pub first_error: Option<String>,
    /// From the first request sent to the last answer read (the client's own clock).
    pub wall: Duration,
}

impl Answered {
    /// Fails unless every request was answered rightly.
    pub fn check(&self) -> Result<()> {
        if self.errors > 0 || self.ok != self.requests {
            bail!(
                "{} of {} requests failed (first: {})",
                self.requests - self.ok,
                self.requests,
                self.first_error.as_deref().unwrap_or("?")
            );
        }
        Ok(())
    }

    fn parse(line: &str) -> Option<Answered> {
        let v: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
        Some(Answered {
            requests: v["requests"].as_u64()?,
            ok: v["ok"].as_u64()?,
            errors: v["errors"].as_u64()?,
            first_error: v["first_error"].as_str().map(str::to_owned),
            wall: Duration::from_secs_f64(v["wall_ms"].as_f64()? / 1e3),
        })
    }
}

/// A measured client run: CPU times in seconds over the same window, from the line before the
/// first request to the client's result.
#[derive(Clone, Debug)]
pub struct Window {
    pub answered: Answered,
    /// The service's utime + stime (all its threads: /proc/PID/stat of the process).
    pub service_cpu: f64,
    /// The tracer's, when one was given; 0 otherwise.
    pub tracer_cpu: f64,
}

/// The running service (`node bench/live_service/server.js`), killed when dropped.
pub struct Service {
    proc: Proc,
    port: u16,
}

impl Service {
    /// Starts the service and waits for its port.
    pub fn start() -> Result<Service> {
        let mut cmd = util::command(NODE);
        cmd.arg(script("server.js"));
        let mut proc = Proc::spawn("the live service", die_with_parent(&mut cmd))?;
        let port =
            proc.stdout
                .wait_for("`listening PORT` from the service", START_TIMEOUT, |l| {
                    l.trim().strip_prefix("listening ")?.parse::<u16>().ok()
                })?;
        Ok(Service { proc, port })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    #[expect(
        dead_code,
        reason = "for tests that talk to the service themselves; the bench does not"
    )]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The service's resident memory now (VmRSS), in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        let pid = self.pid();
        fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("read /proc/{pid}/status"))?
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS in /proc/PID/status")
    }

    fn client(&self, load: Load, wait: bool) -> Result<Proc> {
        let mut cmd = util::command(NODE);
        cmd.arg(script("client.js")).args([
            self.port.to_string(),
            load.requests.to_string(),
            load.concurrency.to_string(),
        ]);
        if wait {
            cmd.arg("--wait");
        }
        Proc::spawn("the load client", die_with_parent(&mut cmd))
    }

    /// Runs the client to the end, unmeasured (a warm-up, or load next to something else).
    /// Fails if any request failed.
    pub fn load(&self, load: Load) -> Result<Answered> {
        let mut client = self.client(load, false)?;
        let answered = client
            .stdout
            .wait_for("the client's result", TIMEOUT, Answered::parse)?;
        client.finish()?;
        answered.check()?;
        Ok(answered)
    }

    /// Runs the client and measures the window of its requests: the service's CPU and, with
    /// `tracer` (a pid), that process's CPU too. Failed requests are counted in the result,
    /// not turned into an error: see [`Answered::check`].
    pub fn measure(&self, load: Load, tracer: Option<u32>) -> Result<Window> {
        let mut client = self.client(load, true)?;
        client
            .stdout
            .wait_for("\"ready\" from the client", START_TIMEOUT, |l| {
                (l.trim() == "ready").then_some(())
            })?;
        let service_from = run::cpu_seconds(self.pid())?;
        let tracer_from = tracer.map(run::cpu_seconds).transpose()?;
        client.go()?;
        let answered = client
            .stdout
            .wait_for("the client's result", TIMEOUT, Answered::parse)?;
        let service_cpu = run::cpu_seconds(self.pid())? - service_from;
        let tracer_cpu = match (tracer, tracer_from) {
            (Some(pid), Some(from)) => run::cpu_seconds(pid)? - from,
            _ => 0.0,
        };
        client.finish()?;
        Ok(Window {
            answered,
            service_cpu,
            tracer_cpu,
        })
    }

    /// SIGTERM, and waits for a clean exit.
    pub fn stop(mut self) -> Result<()> {
        let pid = self.pid();
        // SAFETY: kill(2) on our own unreaped child.
        if unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) } != 0 {
            return Err(std::io::Error::last_os_error()).context("send SIGTERM to the service");
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.proc.child.try_wait()? {
                if !status.success() {
                    let err = self.proc.stderr.rest(Duration::from_millis(200));
                    bail!("the live service ended with {status} after SIGTERM\n{err}");
                }
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("the live service was still running {STOP_TIMEOUT:?} after SIGTERM");
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// This tracer recording a running process by pid (`tracer record --pid`), killed when
/// dropped.
pub struct Tracer {
    proc: Proc,
    target: u32,
    report: PathBuf,
    sites: [LibcFunction; 2],
}

/// What a detached tracer left: its JSON report and what it said on stderr.
pub struct Detached {
    pub report: serde_json::Value,
    #[expect(
        dead_code,
        reason = "for attach-cycle tests that check what the tracer said; the bench does not"
    )]
    pub stderr: String,
}

impl Tracer {
    /// Starts `tracer record --format json -o REPORT --pid TARGET ARGS..` and returns once it
    /// is attached and settled: it has said "recording pid TARGET" (it does once its probes
    /// are attached), the probes' breakpoints are in the target's malloc and free, and its
    /// thread that loads symbol tables right after attaching (a one-time cost) is done.
    pub fn attach(tracer: &Path, target: u32, args: &[&str], report: &Path) -> Result<Tracer> {
        let (_, sites) = probes::cheap_sites(target)?;
        let mut cmd = util::command(tracer);
        cmd.args(["record", "--format", "json", "-o"])
            .arg(report)
            .args(["--pid", &target.to_string()])
            .args(args);
        let mut proc = Proc::spawn("the tracer", die_with_parent(&mut cmd))?;
        let wanted = format!("tracer: recording pid {target}");
        let line = proc
            .stderr
            .wait_for("the tracer's \"recording\" line", ATTACH_TIMEOUT, |l| {
                l.starts_with(&wanted).then(|| l.to_owned())
            })?;
        // The in-process sampler puts jumps, not breakpoints, on the allocators' entries, and
        // its uprobes on its own probe sites; the tracer says so on the recording line, once
        // both are in place.
        if !line.contains("in-process") {
            probes::wait_for_breakpoints(target, &[&sites[0], &sites[1]], ATTACH_TIMEOUT)?;
        }
        run::wait_for_thread_exit(proc.pid(), "tracer-symbols", ATTACH_TIMEOUT)?;
        Ok(Tracer {
            proc,
            target,
            report: report.to_owned(),
            sites,
        })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// SIGINT, as a user stops it: waits for a clean exit, checks that no breakpoint is left
    /// where the probes were, and reads the report.
    pub fn detach(mut self) -> Result<Detached> {
        // SAFETY: kill(2) on our own unreaped child.
        if unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGINT) } != 0 {
            return Err(std::io::Error::last_os_error()).context("send SIGINT to the tracer");
        }
        let (_, stderr) = self.proc.finish()?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        while self.sites.iter().any(|f| has_breakpoint(self.target, f)) {
            if Instant::now() >= deadline {
                bail!(
                    "the tracer exited, but {STOP_TIMEOUT:?} later process {} still has a \
                     breakpoint on malloc or free",
                    self.target
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
        let text = fs::read_to_string(&self.report)
            .with_context(|| format!("read the tracer's report {}", self.report.display()))?;
        let report = serde_json::from_str(&text).context("parse the tracer's report")?;
        Ok(Detached { report, stderr })
    }
}

/// Whether `f`'s first byte in `pid` is a breakpoint; a process that cannot be read has none.
fn has_breakpoint(pid: u32, f: &LibcFunction) -> bool {
    use std::os::unix::fs::FileExt as _;
    let mut byte = [0u8; 1];
    fs::File::open(format!("/proc/{pid}/mem"))
        .and_then(|mem| mem.read_exact_at(&mut byte, f.address))
        .is_ok_and(|()| byte[0] == probes::BREAKPOINT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_results_parse() {
        let a = Answered::parse(
            r#"{"requests":10,"ok":9,"errors":1,"wall_ms":1500.5,"first_error":"GET /item/3: status 500"}"#,
        )
        .unwrap();
        assert_eq!((a.requests, a.ok, a.errors), (10, 9, 1));
        assert_eq!(a.wall, Duration::from_micros(1_500_500));
        let err = a.check().unwrap_err().to_string();
        assert!(
            err.contains("1 of 10 requests failed (first: GET /item/3: status 500)"),
            "{err}"
        );
        let fine =
            Answered::parse(r#"{"requests":4,"ok":4,"errors":0,"wall_ms":2,"first_error":null}"#)
                .unwrap();
        assert!(fine.check().is_ok());
        assert!(Answered::parse("ready").is_none());
    }

    /// The service answers every request of repeated client runs, and its memory levels off:
    /// it keeps nothing per request beyond its bounded caches. About 30 s of node.
    #[test]
    #[ignore = "runs node for about 15 s: cargo test -p xtask -- --ignored"]
    fn live_service_answers_everything_and_its_memory_levels_off() {
        assert!(Path::new(NODE).is_file(), "{NODE} is missing");
        let service = Service::start().unwrap();
        let load = Load {
            requests: 4000,
            concurrency: 8,
        };
        let mut rss = Vec::new();
        for _ in 0..20 {
            service.load(load).unwrap();
            rss.push(service.rss_kib().unwrap());
        }
        let window = service.measure(load, None).unwrap();
        window.answered.check().unwrap();
        assert!(window.service_cpu > 0.0, "no CPU time measured: {window:?}");
        service.stop().unwrap();
        // V8's heap and glibc's arenas grow over the first ~50,000 requests (measured here:
        // 83 MiB after 8,000, 139 MiB after 48,000, then within 1%).
        let settled = rss[11];
        let later = rss[12..].iter().copied().max().unwrap_or(0);
        assert!(
            later as f64 <= settled as f64 * 1.05,
            "the service's RSS grew from {settled} KiB after 48,000 requests to {later} KiB \
             within the next 32,000 (all samples, every 4,000: {rss:?})"
        );
    }
}
