//! Running one contender on one workload, once. Every workload starts with `--wait`: it
//! starts up, prints "ready" and waits for a line on stdin. Tools that attach (this tracer,
//! bpftrace, the counting uprobes) attach to it then; tools that must start the program
//! (heaptrack, valgrind) wrap it. Either way the workload is told to go only once the tool
//! is in place, and it times its own work, so start-up and reports are not in its figure.

use std::{
    ffi::OsString,
    fs,
    io::{BufRead as _, BufReader, Read, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{probes, table::OwnCost};
use crate::util;

/// How long a workload may take to start or to finish (valgrind runs node slowly).
pub(super) const TIMEOUT: Duration = Duration::from_secs(900);
/// How long a tool may take to attach.
pub(super) const ATTACH_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Debug)]
pub enum Tool {
    Untraced,
    /// This tracer in attach mode; `Some(n)` samples one allocation per n bytes on average.
    Tracer {
        sample_bytes: Option<&'static str>,
        /// `--unwind`; None leaves the default (auto).
        unwind: Option<&'static str>,
        /// `--backend`: None leaves the default. With sampling, `ebpf` decides in the kernel
        /// at every call rather than by the in-process sampler the tracer injects into a
        /// running process by default, and `ptrace` reads the in-process sampler's events
        /// from a ring instead of BPF probe sites.
        backend: Option<&'static str>,
    },
    /// A bpftrace script, run with `-p PID`; it gets the pid as `$1`. `probes` are the libc
    /// functions it puts uprobes on (to see when they are in place).
    Bpftrace {
        script: PathBuf,
        probes: &'static [&'static str],
    },
    /// Uprobes running an empty BPF program on malloc and on free's first emulated
    /// instruction: what any per-call uprobe tracer pays at least.
    Floor,
    Heaptrack,
    Massif,
}

/// A workload: the program and its arguments for a size, and the line with its figure.
#[derive(Clone, Debug)]
pub struct Workload {
    pub key: &'static str,
    pub title: String,
    /// Program and arguments; `--wait` and the size follow them.
    pub argv: Vec<OsString>,
    /// The figure's line prefix: `ns_per_pair=` or `elapsed_ms=`.
    pub metric: &'static str,
    pub size_name: &'static str,
    pub unit: &'static str,
}

impl Workload {
    fn command_line(&self, size: u64) -> Vec<OsString> {
        let mut argv = self.argv.clone();
        argv.push("--wait".into());
        argv.push(size.to_string().into());
        argv
    }
}

/// One run's result.
pub struct Outcome {
    pub value: f64,
    pub cost: Option<OwnCost>,
    /// What the tool itself counted, as a check that it traced the run.
    pub note: Option<String>,
}

/// Lines of a child's stream, read by a thread so that waiting can time out.
pub struct Lines {
    rx: Receiver<String>,
    seen: Vec<String>,
}

impl Lines {
    fn spawn<R: Read + Send + 'static>(stream: R) -> Self {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                match line {
                    Ok(line) => {
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        });
        Lines {
            rx,
            seen: Vec::new(),
        }
    }

    /// The first line for which `pick` gives a value.
    pub fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        pick: impl Fn(&str) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    let found = pick(&line);
                    self.seen.push(line);
                    if let Some(v) = found {
                        return Ok(v);
                    }
                }
                Err(RecvTimeoutError::Timeout) => bail!(
                    "no {what} within {timeout:?}; output so far:\n{}",
                    self.seen.join("\n")
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    bail!(
                        "the stream ended before {what}; output:\n{}",
                        self.seen.join("\n")
                    )
                }
            }
        }
    }

    pub fn rest(&mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        while let Ok(line) = self
            .rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(line);
        }
        self.seen.join("\n")
    }
}

/// A started process with its output being read.
pub struct Proc {
    pub child: Child,
    stdin: Option<ChildStdin>,
    pub stdout: Lines,
    pub stderr: Lines,
    label: String,
}

impl Proc {
    pub fn spawn(label: &str, cmd: &mut Command) -> Result<Proc> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("could not start `{}`", util::describe(cmd)))?;
        let stdin = child.stdin.take();
        let stdout = Lines::spawn(child.stdout.take().expect("piped"));
        let stderr = Lines::spawn(child.stderr.take().expect("piped"));
        Ok(Proc {
            child,
            stdin,
            stdout,
            stderr,
            label: label.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(super) fn go(&mut self) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin already closed")?;
        stdin
            .write_all(b"go\n")
            .and_then(|()| stdin.flush())
            .context("tell the workload to go")
    }

    /// Waits for the exit; fails on a non-zero status, with what the process said.
    pub(super) fn finish(&mut self) -> Result<(String, String)> {
        drop(self.stdin.take());
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                bail!("{} did not exit within {TIMEOUT:?}", self.label);
            }
            thread::sleep(Duration::from_millis(20));
        };
        let out = self.stdout.rest(Duration::from_secs(5));
        let err = self.stderr.rest(Duration::from_secs(5));
        if !status.success() {
            bail!(
                "{} failed: {status}\n--- stdout ---\n{out}\n--- stderr ---\n{err}",
                self.label
            );
        }
        Ok((out, err))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn parse_metric(line: &str, prefix: &str) -> Option<f64> {
    line.trim()
        .strip_prefix(prefix)?
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite())
}

/// utime + stime of a process, in seconds.
pub(super) fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).context("read /proc/PID/stat")?;
    let after = stat.rsplit_once(')').context("stat has no comm")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `after` starts at field 3.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz)
}

fn vm_hwm_kib(pid: u32) -> Result<u64> {
    let status =
        fs::read_to_string(format!("/proc/{pid}/status")).context("read /proc/PID/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/PID/status")
}

/// Reaps `child` and returns its peak RSS (KiB) from its own rusage: in attach mode the
/// tracer has no children of its own, so this is the tracer alone.
fn reap_with_rusage(child: &mut Child, label: &str) -> Result<u64> {
    let pid = child.id() as libc::pid_t;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let mut status = 0;
        // SAFETY: rusage is written by the kernel; an all-zero rusage is a valid initial value.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: pid is our unreaped child; status and usage are valid out-pointers.
        let rc = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if rc == pid {
            if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
                bail!("{label} exited with wait status {status:#x}");
            }
            return Ok(usage.ru_maxrss as u64);
        }
        if rc < 0 {
            return Err(std::io::Error::last_os_error()).context("wait4");
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            bail!("{label} did not exit within {TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until process `pid` has no thread named `name` (comm) left.
pub(super) fn wait_for_thread_exit(pid: u32, name: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let tasks = fs::read_dir(format!("/proc/{pid}/task"))
            .with_context(|| format!("list the threads of {pid}"))?;
        let running = tasks.flatten().any(|t| {
            fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name)
        });
        if !running {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("process {pid} still has its thread {name} after {timeout:?}");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Everything the runs share.
pub struct Env {
    pub tracer: PathBuf,
    pub scratch: PathBuf,
}

pub fn run_once(env: &Env, tool: &Tool, workload: &Workload, size: u64) -> Result<Outcome> {
    let argv = workload.command_line(size);
    let mut cmd = match tool {
        Tool::Heaptrack => {
            let mut c = util::command("heaptrack");
            c.arg("-o").arg(env.scratch.join("heaptrack")).args(&argv);
            c
        }
        Tool::Massif => {
            let mut c = util::command("valgrind");
            c.arg("--tool=massif")
                .arg(format!(
                    "--massif-out-file={}",
                    env.scratch.join("massif.out").display()
                ))
                .args(&argv);
            c
        }
        _ => {
            let mut c = util::command(&argv[0]);
            c.args(&argv[1..]);
            c
        }
    };
    let mut workload_proc = Proc::spawn(workload.key, &mut cmd)?;
    workload_proc
        .stdout
        .wait_for("\"ready\" from the workload", TIMEOUT, |l| {
            (l.trim() == "ready").then_some(())
        })?;
    let pid = workload_proc.pid();

    // Attach.
    let started = Instant::now();
    let mut tracer = None;
    let mut bpftrace = None;
    let mut floor = None;
    match tool {
        Tool::Tracer { sample_bytes, unwind, backend } => {
            let report = env.scratch.join("report.json");
            let mut c = util::command(&env.tracer);
            c.args(["record", "--format", "json", "-o"])
                .arg(&report)
                .args(["--pid", &pid.to_string()]);
            if let Some(n) = sample_bytes {
                c.args(["--sample-bytes", n]);
            }
            if let Some(b) = backend {
                c.args(["--backend", b]);
            }
            if let Some(u) = unwind {
                c.args(["--unwind", u]);
            }
            let mut p = Proc::spawn("tracer", &mut c)?;
            let wanted = format!("tracer: recording pid {pid}");
            p.stderr
                .wait_for("the tracer's recording line", ATTACH_TIMEOUT, |l| {
                    l.starts_with(&wanted).then_some(())
                })?;
            // The tracer loads symbol tables on a thread of its own once attached: a one-time
            // cost, counted with attaching rather than in the CPU while recording.
            wait_for_thread_exit(p.pid(), "tracer-symbols", ATTACH_TIMEOUT)?;
            tracer = Some((p, report));
        }
        Tool::Bpftrace {
            script,
            probes: names,
        } => {
            let mut c = util::command("bpftrace");
            // bpftrace's default of 4096 keys would overflow on the live blocks.
            c.env("BPFTRACE_MAP_KEYS_MAX", "65536")
                .args(["-p", &pid.to_string()])
                .arg(script)
                .arg(pid.to_string());
            let mut p = Proc::spawn("bpftrace", &mut c)?;
            // The scripts print "attached" from BEGIN, which bpftrace runs once every probe
            // is attached ("Attaching N probes..." comes before).
            p.stdout
                .wait_for("bpftrace's \"attached\" line", ATTACH_TIMEOUT, |l| {
                    (l.trim() == "attached").then_some(())
                })?;
            let libc = probes::libc_of(pid, names)?;
            let functions: Vec<&probes::LibcFunction> = libc.functions.iter().collect();
            probes::wait_for_breakpoints(pid, &functions, ATTACH_TIMEOUT)?;
            bpftrace = Some(p);
        }
        Tool::Floor => {
            let (probes, free) = probes::EmptyUprobes::attach_floor(pid, ATTACH_TIMEOUT)?;
            floor = Some((probes, free));
        }
        Tool::Untraced | Tool::Heaptrack | Tool::Massif => {}
    }

    // The tracer's CPU time from here to the end of the workload is its cost while recording.
    let recording_from = match &tracer {
        Some((p, _)) => Some((Instant::now(), cpu_seconds(p.pid())?)),
        None => None,
    };
    workload_proc.go()?;
    let value = workload_proc.stdout.wait_for(
        &format!("the workload's {}", workload.metric),
        TIMEOUT,
        |l| parse_metric(l, workload.metric),
    )?;
    // The tracer's own cost up to here, before the target exits and the report is made.
    let mut cost = None;
    if let (Some((p, _)), Some((from, cpu_from))) = (&tracer, recording_from) {
        let cpu = cpu_seconds(p.pid())?;
        cost = Some(OwnCost {
            cpu_percent: 100.0 * (cpu - cpu_from) / from.elapsed().as_secs_f64(),
            attach_cpu_seconds: cpu_from,
            attach_seconds: from.duration_since(started).as_secs_f64(),
            rss_before_report_kib: vm_hwm_kib(p.pid())?,
            rss_peak_kib: 0,
        });
    }
    let (workload_out, workload_err) = workload_proc.finish()?;

    let note = match tool {
        Tool::Tracer { .. } => {
            let (mut p, report) = tracer.take().expect("tracer started");
            let peak = reap_with_rusage(&mut p.child, "tracer")?;
            if let Some(c) = &mut cost {
                c.rss_peak_kib = peak;
            }
            let text = fs::read_to_string(&report).context("read the tracer's report")?;
            let json: serde_json::Value =
                serde_json::from_str(&text).context("parse the tracer's report")?;
            let allocs = json["totals"]["allocs"].as_u64().unwrap_or(0);
            Some(format!("{allocs} allocations in its report"))
        }
        Tool::Bpftrace { .. } => {
            let mut p = bpftrace.take().expect("bpftrace started");
            let (out, _) = p.finish()?;
            let counts: Vec<&str> = out.lines().filter(|l| l.starts_with('@')).collect();
            Some(counts.join(", "))
        }
        Tool::Floor => {
            let (probes, free) = floor.take().expect("probes attached");
            drop(probes);
            Some(format!("empty program on malloc and {free}"))
        }
        Tool::Heaptrack => {
            let all = format!("{workload_out}\n{workload_err}");
            all.lines()
                .find(|l| l.contains("calls to allocation functions"))
                .map(|l| l.trim().to_owned())
        }
        Tool::Massif | Tool::Untraced => None,
    };
    remove_outputs(&env.scratch);
    Ok(Outcome { value, cost, note })
}

fn remove_outputs(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let _ = fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_lines_parse_and_others_do_not() {
        assert_eq!(
            parse_metric("ns_per_pair=15.25", "ns_per_pair="),
            Some(15.25)
        );
        assert_eq!(
            parse_metric("elapsed_ms=1818.4\n", "elapsed_ms="),
            Some(1818.4)
        );
        assert_eq!(parse_metric("ns_per_pair=abc", "ns_per_pair="), None);
        assert_eq!(parse_metric("ready", "ns_per_pair="), None);
    }

    #[test]
    fn own_cpu_time_of_this_process_is_readable() {
        let cpu = cpu_seconds(std::process::id()).unwrap();
        assert!(cpu >= 0.0);
        assert!(vm_hwm_kib(std::process::id()).unwrap() > 0);
    }
}
