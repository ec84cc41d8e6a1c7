//! The bench's side of the live-service harness. The service itself (`node
//! bench/live_service/server.js`: start, port, warm state, stop, killed on drop) and the tracer
//! attached to it by pid are the live-harness crate's, shared with the live-service tests;
//! here are what only the bench needs: runs of the closed-loop node client (client.js), a
//! measured window of requests (the service's CPU, a tracer's CPU, wall time), and the tracer
//! attached until its breakpoints and symbol tables are in place, then detached with a check
//! that none of its breakpoints is left.

use std::{
    fs,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
pub use live_harness::Service;
use live_harness::{Detached, NODE, START_TIMEOUT, die_with_parent};

use super::{
    probes::{self, LibcFunction},
    run::{self, ATTACH_TIMEOUT, Proc, TIMEOUT},
};
use crate::util;

/// How long the service may take to exit after SIGTERM, and the target to lose its probes
/// after the tracer exits.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

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

fn client(service: &Service, load: Load, wait: bool) -> Result<Proc> {
    let mut cmd = util::command(NODE);
    cmd.arg(live_harness::service_dir().join("client.js")).args([
        service.port().to_string(),
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
pub fn load(service: &Service, load: Load) -> Result<Answered> {
    let mut client = client(service, load, false)?;
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
pub fn measure(service: &Service, load: Load, tracer: Option<u32>) -> Result<Window> {
    let mut client = client(service, load, true)?;
    client
        .stdout
        .wait_for("\"ready\" from the client", START_TIMEOUT, |l| {
            (l.trim() == "ready").then_some(())
        })?;
    let service_from = run::cpu_seconds(service.pid())?;
    let tracer_from = tracer.map(run::cpu_seconds).transpose()?;
    client.go()?;
    let answered = client
        .stdout
        .wait_for("the client's result", TIMEOUT, Answered::parse)?;
    let service_cpu = run::cpu_seconds(service.pid())? - service_from;
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

/// This tracer recording a running process by pid ([`live_harness::Tracer`]), settled before
/// anything is measured. Killed when dropped.
pub struct Tracer {
    tracer: live_harness::Tracer,
    target: u32,
    sites: [LibcFunction; 2],
}

impl Tracer {
    /// Starts `tracer record --pid TARGET --format json ARGS..` and returns once it is
    /// attached and settled: it has said "recording pid TARGET" (it does once its probes are
    /// attached), the probes' breakpoints are in the target's malloc and free, and its thread
    /// that loads symbol tables right after attaching (a one-time cost) is done.
    pub fn attach(tracer: &Path, target: u32, args: &[&str]) -> Result<Tracer> {
        let (_, sites) = probes::cheap_sites(target)?;
        let tracer = live_harness::Tracer::attach(tracer, target, args, ATTACH_TIMEOUT)?;
        // The in-process sampler puts jumps, not breakpoints, on the allocators' entries, and
        // its uprobes on its own probe sites; the tracer says so on the recording line, once
        // both are in place.
        if !tracer.recording_line().contains("in-process") {
            probes::wait_for_breakpoints(target, &[&sites[0], &sites[1]], ATTACH_TIMEOUT)?;
        }
        run::wait_for_thread_exit(tracer.pid(), "tracer-symbols", ATTACH_TIMEOUT)?;
        Ok(Tracer {
            tracer,
            target,
            sites,
        })
    }

    pub fn pid(&self) -> u32 {
        self.tracer.pid()
    }

    /// SIGINT, as a user stops it: waits for a clean exit with a report, and checks that no
    /// breakpoint is left where the probes were.
    pub fn detach(self) -> Result<Detached> {
        let detached = self.tracer.detach(TIMEOUT)?;
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
        Ok(detached)
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
        let requests = Load {
            requests: 4000,
            concurrency: 8,
        };
        let mut rss = Vec::new();
        for _ in 0..20 {
            load(&service, requests).unwrap();
            rss.push(service.rss_kib().unwrap());
        }
        let window = measure(&service, requests, None).unwrap();
        window.answered.check().unwrap();
        assert!(window.service_cpu > 0.0, "no CPU time measured: {window:?}");
        service.stop(STOP_TIMEOUT).unwrap();
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
