//! The live-service harness, one for the bench and the tests: the node HTTP service of
//! bench/live_service (server.js) started untraced and killed when dropped ([`Service`]), a
//! load client that checks every answer byte for byte against the service's answers taken
//! before any tracer came ([`load`], [`warm_service`]), and this tracer attached to the
//! running service by pid and detached again ([`Tracer`], [`attach_cycle`]).
//!
//! `cargo xtask bench` (the `live` workload and `bench soak`) and the live-service tests
//! (tests/live_e2e.rs, tests/sampler_live_e2e.rs) are built on it. The bench measures with
//! its own node client (bench/live_service/client.js), which counts CPU and wall time; the
//! tests and the soak load the service with [`load`], which judges every answer.
//!
//! Only std, libc and serde_json. Every process started here gets SIGKILL when the thread
//! that started it ends (PR_SET_PDEATHSIG), and is killed when its handle is dropped.

use std::collections::HashMap;
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod load;

use load::{Load, LoadConfig, Outcome, RawResponse, fetch_reference};

/// Where the live service is: the tests expect node 20 there.
pub const NODE: &str = "/usr/bin/node";
/// How long node may take to start the service and print its port.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// What went wrong, in words (with what the process said, when there is a process).
#[derive(Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

fn err<T>(message: impl Into<String>) -> Result<T> {
    Err(Error(message.into()))
}

/// bench/live_service, where the service's scripts are.
pub fn service_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("live-harness sits inside the workspace")
        .join("bench/live_service")
}

/// `n` item paths spread over the service's 1024 items (257 is odd, so `i * 257 + 3` modulo
/// 1024 never repeats), so bodies of every size, deflated ones included, are asked for.
pub fn item_paths(n: u32) -> Vec<String> {
    assert!(n <= 1024, "the service has 1024 items");
    (0..n)
        .map(|i| format!("/item/{}", (i * 257 + 3) % 1024))
        .collect()
}

/// The resident memory of `pid` now (VmRSS), in KiB; None once it is gone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => format!("{status}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

/// Makes the child get SIGKILL when the thread that spawns it ends (the bench or a test
/// exiting, or killed), so that no service, client or tracer outlives its harness. Spawn from
/// a thread that outlives the child.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
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

/// The lines of a child's stdout or stderr, read by a thread so that waiting can time out.
struct Lines {
    rx: Receiver<String>,
    seen: Vec<String>,
    eof: bool,
}

impl Lines {
    fn spawn<R: Read + Send + 'static>(stream: R) -> Self {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        if tx
                            .send(line.trim_end_matches(['\n', '\r']).to_owned())
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
        });
        Lines {
            rx,
            seen: Vec::new(),
            eof: false,
        }
    }

    /// The first line for which `pick` gives a value; Err says why none came.
    fn wait_for<T>(
        &mut self,
        timeout: Duration,
        pick: impl Fn(&str) -> Option<T>,
    ) -> std::result::Result<T, &'static str> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.eof {
                return Err("the stream ended");
            }
            match self
                .rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => {
                    let found = pick(&line);
                    self.seen.push(line);
                    if let Some(v) = found {
                        return Ok(v);
                    }
                }
                Err(RecvTimeoutError::Timeout) => return Err("timed out"),
                Err(RecvTimeoutError::Disconnected) => self.eof = true,
            }
        }
    }

    /// Every line until the stream ends or `timeout` passes, as one text.
    fn rest(&mut self, timeout: Duration) -> String {
        let _ = self.wait_for(timeout, |_| None::<()>);
        let mut text = self.seen.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        text
    }
}

/// A child with piped stdout and stderr, killed when dropped.
struct Proc {
    label: String,
    child: Child,
    exited: Option<ExitStatus>,
    stdout: Lines,
    stderr: Lines,
}

impl Proc {
    /// Starts `cmd` with stdin from /dev/null, to die with the calling thread
    /// ([`die_with_parent`]).
    fn spawn(label: &str, cmd: &mut Command) -> Result<Proc> {
        die_with_parent(cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| Error(format!("start {label} (`{cmd:?}`): {e}")))?;
        let stdout = Lines::spawn(child.stdout.take().expect("stdout is piped"));
        let stderr = Lines::spawn(child.stderr.take().expect("stderr is piped"));
        Ok(Proc {
            label: label.to_owned(),
            child,
            exited: None,
            stdout,
            stderr,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it still runs (reaps it once it has exited).
    fn running(&mut self) -> bool {
        if self.exited.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.exited = Some(status);
                false
            }
            Ok(None) => true,
            Err(_) => false,
        }
    }

    fn signal(&mut self, sig: libc::c_int) -> Result<()> {
        if !self.running() {
            return err(format!(
                "{} had already exited ({}) when it was to get signal {sig}",
                self.label,
                describe_status(self.exited.expect("exited"))
            ));
        }
        // SAFETY: kill(2) on our own unreaped child.
        if unsafe { libc::kill(self.pid() as libc::pid_t, sig) } != 0 {
            return err(format!(
                "send signal {sig} to {}: {}",
                self.label,
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    /// Waits for the exit, killing it after `timeout`; then everything it said.
    fn finish(&mut self, timeout: Duration) -> Result<Finished> {
        let deadline = Instant::now() + timeout;
        while self.running() {
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return err(format!(
                    "{} did not exit within {timeout:?}; killed it\n--- stderr ---\n{}",
                    self.label,
                    self.stderr.rest(Duration::from_secs(1))
                ));
            }
            thread::sleep(Duration::from_millis(10));
        }
        // Something it started could keep the pipes open: don't hang on them.
        Ok(Finished {
            status: self.exited.expect("exited"),
            stdout: self.stdout.rest(Duration::from_secs(10)),
            stderr: self.stderr.rest(Duration::from_secs(10)),
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What a process that exited left.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn describe(&self) -> String {
        let cut = self
            .stdout
            .char_indices()
            .nth(3000)
            .map_or(self.stdout.len(), |(i, _)| i);
        format!(
            "exit: {}\n--- stderr ---\n{}--- stdout ({} bytes, first 3000) ---\n{}",
            describe_status(self.status),
            self.stderr,
            self.stdout.len(),
            &self.stdout[..cut]
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The service

/// The running service, `node bench/live_service/server.js`: plain node, no flags, on
/// 127.0.0.1 and the ephemeral port it printed. Killed when dropped.
pub struct Service {
    proc: Proc,
    port: u16,
}

impl Service {
    /// Starts the service and waits (up to [`START_TIMEOUT`]) for its `listening PORT` line.
    pub fn start() -> Result<Service> {
        if !Path::new(NODE).is_file() {
            return err(format!(
                "{NODE} is missing; the live service expects node 20 there"
            ));
        }
        let script = service_dir().join("server.js");
        let mut proc = Proc::spawn("the live service", Command::new(NODE).arg(&script))?;
        let port = proc
            .stdout
            .wait_for(START_TIMEOUT, |l| {
                l.trim().strip_prefix("listening ")?.parse::<u16>().ok()
            })
            .or_else(|why| {
                err(format!(
                    "`node {}` never said `listening PORT` ({why})\n--- stderr ---\n{}",
                    script.display(),
                    proc.stderr.rest(Duration::from_millis(200))
                ))
            })?;
        Ok(Service { proc, port })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        self.proc.running()
    }

    /// Its resident memory now (VmRSS), in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        rss_kib(self.pid()).ok_or_else(|| Error(format!("no VmRSS for pid {}", self.pid())))
    }

    /// SIGTERM, as an init system stops it: Ok once it has exited with status 0 within
    /// `timeout`, as it does untraced.
    pub fn stop(mut self, timeout: Duration) -> Result<()> {
        self.proc.signal(libc::SIGTERM)?;
        let finished = self.proc.finish(timeout)?;
        if !finished.status.success() {
            return err(format!(
                "the live service ended with {} after SIGTERM\n--- stderr ---\n{}",
                describe_status(finished.status),
                finished.stderr
            ));
        }
        Ok(())
    }
}

/// The service, warmed up untraced by the load client, with what it answered.
pub struct Warmed {
    pub service: Service,
    /// The paths the load asks for.
    pub paths: Vec<String>,
    /// The service's answer to each, byte for byte, before any tracer came.
    pub reference: Arc<HashMap<String, RawResponse>>,
    /// What the warm-up saw.
    pub warm_up: String,
}

impl Warmed {
    /// Load on `connections` keep-alive connections over every path, until stopped (or
    /// after `max_duration`).
    pub fn load(&self, connections: usize, max_duration: Duration) -> Load {
        Load::start(
            LoadConfig {
                addr: self.service.addr(),
                connections,
                paths: self.paths.clone(),
                max_requests: u64::MAX,
                max_duration,
            },
            self.reference.clone(),
        )
    }
}

/// Requests of the untraced warm-up in [`warm_service`].
pub const WARM_UP_REQUESTS: u64 = 2_000;

/// Starts the service, takes its answer to every path of `paths` (each asked twice: the two
/// must be the same bytes) and warms it up untraced with [`WARM_UP_REQUESTS`] requests on
/// `connections` connections (V8 compiles the handler). Fails unless every warm-up answer
/// is the reference one.
pub fn warm_service(paths: Vec<String>, connections: usize) -> Result<Warmed> {
    let service = Service::start()?;
    let reference = Arc::new(
        fetch_reference(service.addr(), &paths)
            .map_err(|e| Error(format!("reference answers from the service: {e}")))?,
    );
    let warm = Load::start(
        LoadConfig {
            addr: service.addr(),
            connections,
            paths: paths.clone(),
            max_requests: WARM_UP_REQUESTS,
            max_duration: Duration::from_secs(20),
        },
        reference.clone(),
    );
    while !warm.finished() {
        thread::sleep(Duration::from_millis(50));
    }
    let warm = warm.stop();
    if !warm.errors.is_empty() || warm.count(Outcome::Same) != warm.requests.len() {
        return err(format!(
            "the service misbehaves untraced: {}\n{}",
            warm.summary(),
            warm.errors.join("\n")
        ));
    }
    Ok(Warmed {
        service,
        paths,
        reference,
        warm_up: warm.summary(),
    })
}

// ---------------------------------------------------------------------------------------------
// The tracer, attached by pid

/// `tracer record --pid TARGET --format json ARGS..` attached to a running process (its
/// report goes to stdout), killed when dropped.
pub struct Tracer {
    proc: Proc,
    label: String,
    target: u32,
    started: Instant,
    attached: Duration,
    recording: String,
}

/// What a tracer that exited left: its report of the target, what it said on stderr.
#[derive(Debug)]
pub struct Detached {
    pub report: Value,
    pub stderr: String,
    /// From the tracer's start to its exit.
    pub wall: Duration,
}

impl Tracer {
    /// Starts the tracer and returns once it has said "tracer: recording pid TARGET" (which
    /// it does once its probes are in), within `timeout`.
    pub fn attach(bin: &Path, target: u32, args: &[&str], timeout: Duration) -> Result<Tracer> {
        let started = Instant::now();
        let mut cmd = Command::new(bin);
        cmd.args(["record", "--pid", &target.to_string(), "--format", "json"])
            .args(args);
        let label = format!("tracer record --pid {target} {}", args.join(" "));
        let mut proc = Proc::spawn(&label, &mut cmd)?;
        let wanted = format!("tracer: recording pid {target}");
        match proc
            .stderr
            .wait_for(timeout, |l| l.contains(&wanted).then(|| l.to_owned()))
        {
            Ok(recording) => Ok(Tracer {
                proc,
                label,
                target,
                started,
                attached: started.elapsed(),
                recording,
            }),
            Err(why) => {
                let _ = proc.child.kill();
                let said = proc.finish(Duration::from_secs(10));
                err(format!(
                    "`{label}` never said {wanted:?} ({why})\n{}",
                    said.map_or_else(|e| e.0, |f| f.describe())
                ))
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The "recording" line (it says how it samples, e.g. "in-process").
    pub fn recording_line(&self) -> &str {
        &self.recording
    }

    /// From the tracer's start to its "recording" line.
    pub fn attach_time(&self) -> Duration {
        self.attached
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        self.proc.running()
    }

    /// SIGINT, as a user stops it; then as [`Tracer::finish`].
    pub fn detach(mut self, timeout: Duration) -> Result<Detached> {
        self.proc.signal(libc::SIGINT)?;
        self.finish(timeout)
    }

    /// Waits for it to exit by itself (at the end of `--duration`) within `timeout`: Ok with
    /// its report if it exited 0 with a JSON report of the target on stdout.
    pub fn finish(mut self, timeout: Duration) -> Result<Detached> {
        let finished = self.proc.finish(timeout)?;
        let wall = self.started.elapsed();
        let label = &self.label;
        if !finished.status.success() {
            return err(format!(
                "`{label}` ended with {}\n{}",
                describe_status(finished.status),
                finished.describe()
            ));
        }
        let report: Value = serde_json::from_str(&finished.stdout).map_err(|e| {
            Error(format!(
                "`{label}` printed no JSON report ({e})\n{}",
                finished.describe()
            ))
        })?;
        if report["pid"].as_u64() != Some(u64::from(self.target)) {
            return err(format!("`{label}`: the report is of pid {}", report["pid"]));
        }
        Ok(Detached {
            report,
            stderr: finished.stderr,
            wall,
        })
    }
}

/// The BPF programs and links a process holds, by id, from its file descriptors' fdinfo
/// (bpftool cannot tell which process holds what).
#[derive(Clone, Debug, Default)]
pub struct HeldBpf {
    pub programs: Vec<u64>,
    pub links: Vec<u64>,
}

pub fn bpf_held_by(holder: u32) -> HeldBpf {
    let mut held = HeldBpf::default();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{holder}/fd")) else {
        return held;
    };
    for fd in fds.filter_map(std::result::Result::ok) {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let key = match &*target.to_string_lossy() {
            "anon_inode:bpf-prog" => "prog_id:",
            "anon_inode:bpf_link" => "link_id:",
            _ => continue,
        };
        let info = format!("/proc/{holder}/fdinfo/{}", fd.file_name().to_string_lossy());
        let id = std::fs::read_to_string(&info).ok().and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse::<u64>().ok())
        });
        match (key, id) {
            ("prog_id:", Some(id)) => held.programs.push(id),
            (_, Some(id)) => held.links.push(id),
            _ => {}
        }
    }
    held.programs.sort_unstable();
    held.programs.dedup();
    held.links.sort_unstable();
    held
}

/// One attach/detach cycle that went as it should: `tracer record --pid PID --format json
/// --top 5 --duration HOLD ARGS..`, left to detach by itself.
#[derive(Debug)]
pub struct Cycle {
    pub args: Vec<String>,
    /// From the tracer's start to its exit.
    pub wall: Duration,
    /// From the tracer's start to its "recording" line.
    pub attach: Duration,
    pub report: Value,
    /// BPF programs and links it held while recording (none for the ptrace backend).
    pub held: HeldBpf,
    /// What the tracer said on stderr.
    pub stderr: String,
}

/// Attaches to `pid` with `args` for `hold` and checks what every cycle must hold: the
/// "recording" line within `recording_timeout`, exit status 0 within `exit_timeout`, a JSON
/// report of this pid. Err says what went wrong, with the tracer's output.
pub fn attach_cycle(
    bin: &Path,
    pid: u32,
    args: &[&str],
    hold: Duration,
    recording_timeout: Duration,
    exit_timeout: Duration,
) -> Result<Cycle> {
    let hold_arg = format!("{}ms", hold.as_millis());
    let mut all = vec!["--top", "5", "--duration", &hold_arg];
    all.extend_from_slice(args);
    let tracer = Tracer::attach(bin, pid, &all, recording_timeout)?;
    let attach = tracer.attach_time();
    let held = bpf_held_by(tracer.pid());
    let detached = tracer.finish(exit_timeout)?;
    Ok(Cycle {
        args: args.iter().map(|s| (*s).to_owned()).collect(),
        wall: detached.wall,
        attach,
        report: detached.report,
        held,
        stderr: detached.stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_paths_are_distinct_items_of_the_service() {
        let paths = item_paths(64);
        let mut items: Vec<u32> = paths
            .iter()
            .map(|p| p["/item/".len()..].parse().unwrap())
            .collect();
        assert!(items.iter().all(|&k| k < 1024));
        // Every 8th item is deflated: the load asks for some.
        assert_eq!(items.iter().filter(|&&k| k % 8 == 0).count(), 8);
        items.sort_unstable();
        items.dedup();
        assert_eq!(items.len(), 64);
        assert_eq!(item_paths(1024).len(), 1024);
    }

    /// The service starts, answers the same bytes twice and every warm-up request with them,
    /// and stops with status 0 on SIGTERM. A few seconds of node.
    #[test]
    #[ignore = "runs node: cargo test -p live-harness -- --ignored"]
    fn the_service_warms_up_and_stops_cleanly() {
        let warmed = warm_service(item_paths(64), 4).unwrap();
        assert_eq!(warmed.reference.len(), 64);
        let load = warmed.load(4, Duration::from_secs(60));
        thread::sleep(Duration::from_millis(500));
        let seen = load.stop();
        assert!(
            seen.count(Outcome::Same) > 0 && seen.errors.is_empty(),
            "{}",
            seen.summary()
        );
        warmed.service.stop(Duration::from_secs(10)).unwrap();
    }
}
