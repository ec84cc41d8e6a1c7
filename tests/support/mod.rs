//! Shared helpers for the tracer's end-to-end tests: build fixtures, run the tracer in launch and
//! attach mode, read its JSON report, and look into a target's memory and the kernel's BPF state.
#![allow(
    dead_code,
    reason = "each test binary uses a different subset of these helpers"
)]

use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

pub mod gdb;
pub mod live;
pub mod target;
pub use live_harness::load;

/// How long the tracer may take to print its "recording" line after it was started.
pub const RECORDING_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a process may take to exit once it has been told to (symbolizing node is not instant).
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a fixture may take to print a line it was asked for.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Preconditions

/// Checks what every test needs (root, a built tracer) and returns the tracer's path.
pub fn setup() -> PathBuf {
    require_root();
    tracer_bin()
}

pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "these tests load BPF programs and must run as root; run `cargo xtask test` as root"
        );
    }
}

/// `$TRACER_BIN` (set by `cargo xtask test`), else the workspace's release build.
pub fn tracer_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("TRACER_BIN") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "TRACER_BIN={} does not exist; run `cargo xtask test`, which builds the tracer and sets it",
            path.display()
        );
        return path;
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/tracer");
    assert!(
        path.is_file(),
        "the tracer binary is not built: TRACER_BIN is unset and {} does not exist; \
         run `cargo xtask test`, which builds the tracer and sets TRACER_BIN",
        path.display()
    );
    path
}

// ---------------------------------------------------------------------------------------------
// Temporary directories and fixtures

/// A fresh directory under the system temp dir, removed on drop unless the test is failing
/// (then it is kept, and its path printed, so the fixture binaries can be inspected).
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(test: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "tracer-tests-{test}-{}-{nanos}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("create temp dir {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "test failed: keeping {} for inspection",
                self.path.display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Compiles `fixtures/<name>.c` into `dir/<name>` with frame pointers and no inlining, so that
/// each fixture function is its own frame, and without builtins: gcc otherwise folds
/// `realloc(NULL, n)` into `malloc(n)` even at -O0, and the fixture would not call what it says.
pub fn build_fixture(dir: &TempDir, name: &str) -> PathBuf {
    build_fixture_as(dir, name, name, &[])
}

/// [`build_fixture`] into `dir/<out>`, with `extra` compiler arguments (e.g. `-DNEW_BUILD`).
pub fn build_fixture_as(dir: &TempDir, name: &str, out: &str, extra: &[&str]) -> PathBuf {
    let source = fixtures_dir().join(format!("{name}.c"));
    let out = dir.join(out);
    let mut cmd = Command::new("cc");
    cmd.args(extra);
    cmd.args([
        "-O0",
        "-g",
        "-fno-omit-frame-pointer",
        "-fno-inline",
        "-fno-builtin",
        "-pthread",
        "-o",
    ])
    .arg(&out)
    .arg(&source);
    run_cc(
        &mut cmd,
        &format!("compile fixture {}", source.display()),
        "",
    );
    out
}

/// Compiles `int main(){pause();}` statically into `dir/static_pause`.
pub fn build_static_pause(dir: &TempDir) -> PathBuf {
    let source = dir.join("static_pause.c");
    fs::write(
        &source,
        "#include <unistd.h>\nint main(void) { pause(); return 0; }\n",
    )
    .unwrap_or_else(|e| panic!("write {}: {e}", source.display()));
    let out = dir.join("static_pause");
    let mut cmd = Command::new("cc");
    cmd.args(["-static", "-O0", "-o"]).arg(&out).arg(&source);
    run_cc(
        &mut cmd,
        "compile a static binary",
        "static linking needs libc.a, which Debian ships in libc6-dev (apt-get install libc6-dev)",
    );
    out
}

fn run_cc(cmd: &mut Command, what: &str, hint: &str) {
    let output = match cmd.output() {
        Ok(output) => output,
        Err(e) => panic!("{what}: cannot run cc ({e}); install gcc (`cargo xtask prereqs`)"),
    };
    assert!(
        output.status.success(),
        "{what}: `{cmd:?}` failed with {}\n{}{}{hint}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// Processes and their output

/// The lines of a child's stdout or stderr, read by a background thread so that neither side
/// blocks and so that waiting for a line can time out.
pub struct LineReader {
    rx: Receiver<String>,
    seen: Vec<String>,
    eof: bool,
}

impl LineReader {
    pub fn spawn<R: Read + Send + 'static>(stream: R) -> Self {
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
                        let line = line.trim_end_matches(['\n', '\r']).to_owned();
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        LineReader {
            rx,
            seen: Vec::new(),
            eof: false,
        }
    }

    /// Waits for the next line matching `pred`; `Err` says whether the stream ended or the
    /// wait timed out.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String, &'static str> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.eof {
                return Err("the stream ended");
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => return Err("timed out"),
                Err(RecvTimeoutError::Disconnected) => self.eof = true,
            }
        }
    }

    /// Reads until the stream ends (or `timeout` passes) and returns every line seen so far.
    pub fn read_to_end(&mut self, timeout: Duration) -> Vec<String> {
        let _ = self.wait_for(timeout, |_| false);
        self.seen.clone()
    }

    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    pub fn text(&self) -> String {
        let mut text = self.seen.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        text
    }
}

/// What a finished process left behind.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn describe(&self) -> String {
        format!(
            "exit: {}\n--- stderr ---\n{}--- stdout ({} bytes, first 3000) ---\n{}",
            describe_status(self.status),
            self.stderr,
            self.stdout.len(),
            truncate(&self.stdout, 3000)
        )
    }
}

pub fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => format!("{status}"),
    }
}

/// A child process with piped stdout and stderr. Dropping it kills the process if it is still
/// running, so a failing test leaves neither a tracer nor a fixture behind.
pub struct Proc {
    pub label: String,
    child: Child,
    exited: Option<ExitStatus>,
    pub stdout: LineReader,
    pub stderr: LineReader,
}

impl Proc {
    pub fn spawn(label: &str, cmd: &mut Command) -> Proc {
        cmd.stdin(Stdio::null());
        Self::spawn_piped(label, cmd)
    }

    /// [`Proc::spawn`] with a pipe to the process's stdin, for fixtures told when to go on.
    pub fn spawn_with_stdin(label: &str, cmd: &mut Command) -> (Proc, std::process::ChildStdin) {
        cmd.stdin(Stdio::piped());
        let mut proc = Self::spawn_piped(label, cmd);
        let stdin = proc.child.stdin.take().expect("stdin is piped");
        (proc, stdin)
    }

    fn spawn_piped(label: &str, cmd: &mut Command) -> Proc {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {label} (`{cmd:?}`): {e}"));
        let stdout = LineReader::spawn(child.stdout.take().expect("stdout is piped"));
        let stderr = LineReader::spawn(child.stderr.take().expect("stderr is piped"));
        Proc {
            label: label.to_owned(),
            child,
            exited: None,
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits in i32")
    }

    /// Whether the process is still running (reaps it if it has exited).
    pub fn running(&mut self) -> bool {
        if self.exited.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.exited = Some(status);
                false
            }
            Ok(None) => true,
            Err(e) => panic!("wait for {}: {e}", self.label),
        }
    }

    /// Sends `sig`; panics if the process already exited, since the signal was meant for it.
    pub fn signal(&mut self, sig: libc::c_int) {
        if !self.running() {
            panic!(
                "{} exited ({}) before it could be sent signal {sig}\n--- stdout ---\n{}--- stderr ---\n{}",
                self.label,
                describe_status(self.exited.expect("exited")),
                self.stdout.text(),
                self.stderr.text()
            );
        }
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig}) for {}", self.pid(), self.label);
    }

    /// Waits for the stdout line `want` (exactly), panicking with everything the process said.
    pub fn expect_stdout_line(&mut self, want: &str, timeout: Duration) {
        self.expect_stdout(&format!("the line {want:?}"), timeout, |line| line == want);
    }

    /// Waits for a stdout line starting with `prefix` and returns it, panicking with everything
    /// the process said.
    pub fn expect_stdout_prefix(&mut self, prefix: &str, timeout: Duration) -> String {
        self.expect_stdout(
            &format!("a line starting with {prefix:?}"),
            timeout,
            |line| line.starts_with(prefix),
        )
    }

    /// Waits for the stdout line `pred` accepts; `what` names it in the panic.
    fn expect_stdout(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        match self.stdout.wait_for(timeout, pred) {
            Ok(line) => line,
            Err(why) => {
                let state = if self.running() {
                    "still running".to_owned()
                } else {
                    describe_status(self.exited.expect("exited"))
                };
                let stderr = self
                    .stderr
                    .read_to_end(Duration::from_millis(200))
                    .join("\n");
                panic!(
                    "{}: expected {what} on stdout, but {why} (process {state})\n\
                     --- stdout so far ---\n{}--- stderr so far ---\n{stderr}",
                    self.label,
                    self.stdout.text(),
                );
            }
        }
    }

    /// Waits until the process exits, or kills it and panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        while self.running() {
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let stdout = self.stdout.read_to_end(Duration::from_secs(1)).join("\n");
                let stderr = self.stderr.read_to_end(Duration::from_secs(1)).join("\n");
                panic!(
                    "{} did not exit within {timeout:?}; killed it\n--- stderr ---\n{stderr}\n\
                     --- stdout (first 3000 bytes) ---\n{}",
                    self.label,
                    truncate(&stdout, 3000)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.exited.expect("exited")
    }

    /// Waits for exit, then collects all of stdout and stderr.
    pub fn finish(&mut self, timeout: Duration) -> Finished {
        let status = self.wait_exit(timeout);
        // A launched command that outlived the tracer could keep the pipes open: don't hang.
        self.stdout.read_to_end(Duration::from_secs(10));
        self.stderr.read_to_end(Duration::from_secs(10));
        Finished {
            status,
            stdout: self.stdout.text(),
            stderr: self.stderr.text(),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs the tracer with `args` to completion (killing it after `timeout`).
pub fn run_tracer<S: AsRef<OsStr>>(args: &[S], timeout: Duration) -> Finished {
    let mut cmd = Command::new(tracer_bin());
    cmd.args(args);
    let mut proc = Proc::spawn(&format!("tracer {}", show_args(args)), &mut cmd);
    proc.finish(timeout)
}

pub fn show_args<S: AsRef<OsStr>>(args: &[S]) -> String {
    args.iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The result of `tracer record --top 0 --format json -o FILE -- CMD...`.
pub struct Launch {
    pub finished: Finished,
    pub report: Value,
}

/// Runs `tracer record --top 0 --format json -o <dir>/report.json -- cmd...`, so stdout holds
/// only what the command printed. Panics if the report cannot be read; the exit status is
/// left to the caller.
pub fn record_launch<S: AsRef<OsStr>>(dir: &TempDir, cmd: &[S]) -> Launch {
    record_launch_with(dir, &[], cmd)
}

/// [`record_launch`] with `extra` record options (e.g. `["--backend", "ptrace"]`). A report
/// left in `dir` by an earlier call is removed first, so it can never be read for this one.
pub fn record_launch_with<S: AsRef<OsStr>>(dir: &TempDir, extra: &[&str], cmd: &[S]) -> Launch {
    let report_path = dir.join("report.json");
    let _ = fs::remove_file(&report_path);
    let mut args: Vec<OsString> = ["record", "--top", "0", "--format", "json", "-o"]
        .iter()
        .map(OsString::from)
        .collect();
    args.push(report_path.clone().into_os_string());
    args.extend(extra.iter().map(OsString::from));
    args.push("--".into());
    args.extend(cmd.iter().map(|a| a.as_ref().to_owned()));
    let finished = run_tracer(&args, EXIT_TIMEOUT);
    let text = fs::read_to_string(&report_path).unwrap_or_else(|e| {
        panic!(
            "`tracer {}` wrote no report to {} ({e})\n{}",
            show_args(&args),
            report_path.display(),
            finished.describe()
        )
    });
    let report = parse_report(&text, &finished);
    Launch { finished, report }
}

/// [`record_launch_with`] for a command that must exit 0: the tracer passes its status on.
pub fn record_launch_ok<S: AsRef<OsStr>>(dir: &TempDir, extra: &[&str], cmd: &[S]) -> Launch {
    let launch = record_launch_with(dir, extra, cmd);
    assert_eq!(
        launch.finished.status.code(),
        Some(0),
        "`tracer record {}` should exit with the command's status 0\n{}",
        show_args(extra),
        launch.finished.describe()
    );
    launch
}

/// Starts `tracer record --pid PID <extra>` and waits until it says it is recording that pid.
pub fn start_recording(target: i32, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(tracer_bin());
    cmd.args(["record", "--pid", &target.to_string()])
        .args(extra);
    let mut tracer = Proc::spawn(&format!("tracer record --pid {target}"), &mut cmd);
    let wanted = format!("tracer: recording pid {target}");
    let found = tracer
        .stderr
        .wait_for(RECORDING_TIMEOUT, |line| mentions_pid(line, &wanted));
    if let Err(why) = found {
        let state = if tracer.running() {
            "still running".to_owned()
        } else {
            describe_status(tracer.exited.expect("exited"))
        };
        panic!(
            "the tracer never printed {wanted:?} on stderr: {why} after up to {RECORDING_TIMEOUT:?} \
             (tracer {state})\n--- stderr ---\n{}--- stdout ---\n{}",
            tracer.stderr.text(),
            tracer
                .stdout
                .read_to_end(Duration::from_millis(200))
                .join("\n")
        );
    }
    tracer
}

/// `line` contains `wanted` ("... pid 12") not followed by another digit (so 12 != 123).
fn mentions_pid(line: &str, wanted: &str) -> bool {
    line.match_indices(wanted)
        .any(|(at, _)| !line[at + wanted.len()..].starts_with(|c: char| c.is_ascii_digit()))
}

/// Sends SIGINT to an attached tracer, expects exit status 0 and returns its parsed JSON stdout.
pub fn stop_recording(tracer: &mut Proc) -> (Finished, Value) {
    tracer.signal(libc::SIGINT);
    let finished = tracer.finish(EXIT_TIMEOUT);
    assert!(
        finished.status.success(),
        "the tracer should exit with status 0 after SIGINT in attach mode\n{}",
        finished.describe()
    );
    let report = parse_report(&finished.stdout, &finished);
    (finished, report)
}

pub fn parse_report(text: &str, finished: &Finished) -> Value {
    let report: Value = serde_json::from_str(text).unwrap_or_else(|e| {
        panic!(
            "the report is not valid JSON ({e})\n--- report (first 3000 bytes) ---\n{}\n{}",
            truncate(text, 3000),
            finished.describe()
        )
    });
    check_report_shape(&report);
    report
}

/// Checks the fields and types that the report's JSON contract promises.
pub fn check_report_shape(report: &Value) {
    let ctx = |what: &str| format!("{what} in report with totals {}", describe_totals(report));
    for key in ["pid", "duration_ms"] {
        num(report, key);
    }
    assert!(report.get("command").is_some(), "{}", ctx("no \"command\""));
    let totals = report
        .get("totals")
        .unwrap_or_else(|| panic!("{}", ctx("no \"totals\"")));
    for key in [
        "live_bytes",
        "live_allocs",
        "alloc_bytes",
        "allocs",
        "frees",
        "unmatched_frees",
    ] {
        num(totals, key);
    }
    let dropped = totals
        .get("dropped")
        .and_then(Value::as_object)
        .unwrap_or_else(|| panic!("{}", ctx("totals.dropped is not an object")));
    for (reason, count) in dropped {
        assert!(
            count.as_u64().is_some(),
            "{}",
            ctx(&format!("totals.dropped.{reason} = {count}"))
        );
    }
    for (i, stack) in stacks(report).iter().enumerate() {
        for key in ["live_bytes", "live_allocs", "alloc_bytes", "allocs"] {
            num(stack, key);
        }
        let frames = stack
            .get("frames")
            .and_then(Value::as_array)
            .unwrap_or_else(|| panic!("stack {i} has no \"frames\" array: {stack}"));
        for frame in frames {
            num(frame, "address");
            for key in ["module", "function", "file"] {
                let v = frame
                    .get(key)
                    .unwrap_or_else(|| panic!("frame without {key:?}: {frame}"));
                assert!(
                    v.is_null() || v.is_string(),
                    "frame {key} is neither string nor null: {frame}"
                );
            }
            let line = frame
                .get("line")
                .unwrap_or_else(|| panic!("frame without \"line\": {frame}"));
            assert!(
                line.is_null() || line.is_u64(),
                "frame line is neither integer nor null: {frame}"
            );
            assert!(
                frame.get("inlined").is_some_and(Value::is_boolean),
                "frame \"inlined\" is not a bool: {frame}"
            );
            let kind = frame.get("kind").and_then(Value::as_str);
            assert!(
                matches!(kind, Some("native" | "jit" | "js" | "unknown")),
                "frame \"kind\" is not native, jit, js or unknown: {frame}"
            );
            // A JS frame named from V8's own objects also says where its function starts
            // (column) and, when interpreted, which line it was running (current_line).
            if kind == Some("js") {
                assert!(
                    frame
                        .get("column")
                        .is_some_and(|c| c.is_null() || c.is_u64()),
                    "js frame \"column\" is missing or not an integer: {frame}"
                );
                assert!(
                    frame
                        .get("current_line")
                        .is_none_or(|c| c.is_null() || c.is_u64()),
                    "js frame \"current_line\" is not an integer: {frame}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading reports

/// An unsigned integer field; panics if it is missing or not a JSON integer.
pub fn num(v: &Value, key: &str) -> u64 {
    match v.get(key) {
        Some(n) => n.as_u64().unwrap_or_else(|| {
            panic!(
                "field {key:?} should be a non-negative JSON integer, got {n} in {}",
                truncate(&v.to_string(), 500)
            )
        }),
        None => panic!(
            "field {key:?} is missing in {}",
            truncate(&v.to_string(), 500)
        ),
    }
}

pub fn stacks(report: &Value) -> &[Value] {
    report
        .get("stacks")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_else(|| {
            panic!(
                "report has no \"stacks\" array: {}",
                truncate(&report.to_string(), 2000)
            )
        })
}

/// Function of real frame `i` (leaf first). Inlined functions are listed as extra entries
/// (`"inlined": true`) before the frame they were inlined into; they do not count here, so
/// frame 0 is the allocator (or syscall wrapper) and frame 1 its caller whatever debug
/// information the machine has.
pub fn frame_function(stack: &Value, i: usize) -> Option<&str> {
    stack
        .get("frames")?
        .as_array()?
        .iter()
        .filter(|f| f.get("inlined").and_then(Value::as_bool) != Some(true))
        .nth(i)?
        .get("function")?
        .as_str()
}

/// The four numbers of a stack, or their sum over several stacks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub live_bytes: u64,
    pub live_allocs: u64,
    pub alloc_bytes: u64,
    pub allocs: u64,
}

impl Usage {
    pub const fn new(live_bytes: u64, live_allocs: u64, alloc_bytes: u64, allocs: u64) -> Self {
        Usage {
            live_bytes,
            live_allocs,
            alloc_bytes,
            allocs,
        }
    }

    fn add(&mut self, stack: &Value) {
        self.live_bytes += num(stack, "live_bytes");
        self.live_allocs += num(stack, "live_allocs");
        self.alloc_bytes += num(stack, "alloc_bytes");
        self.allocs += num(stack, "allocs");
    }
}

/// Sums the stacks for which `pred` holds.
pub fn usage_where(report: &Value, pred: impl Fn(&Value) -> bool) -> Usage {
    let mut usage = Usage::default();
    for stack in stacks(report).iter().filter(|s| pred(s)) {
        usage.add(stack);
    }
    usage
}

/// Sums the stacks whose frame 1 (the allocator's caller) is `caller`.
pub fn usage_by_caller(report: &Value, caller: &str) -> Usage {
    usage_where(report, |s| frame_function(s, 1) == Some(caller))
}

/// (live_bytes, live_allocs, alloc_bytes, allocs) summed over stacks whose frame 1 is `func`.
pub fn live_by_caller(report: &Value, func: &str) -> (u64, u64, u64, u64) {
    let u = usage_by_caller(report, func);
    (u.live_bytes, u.live_allocs, u.alloc_bytes, u.allocs)
}

pub fn describe_totals(report: &Value) -> String {
    report
        .get("totals")
        .map_or_else(|| "<no totals>".to_owned(), Value::to_string)
}

/// One line per stack for which `pred` holds: its numbers and its first frames.
pub fn describe_stacks(report: &Value, pred: impl Fn(&Value) -> bool) -> String {
    let chosen: Vec<&Value> = stacks(report).iter().filter(|s| pred(s)).collect();
    describe_list(&chosen)
}

/// The fixture's `realloc_grow` (malloc(100) grown to 70000 bytes by realloc) holds exactly
/// one block of 70000 bytes: sampled at 4 KiB, its block is sampled almost surely and weighs
/// exactly itself, and the first block was released by the realloc.
pub fn assert_realloc_grow_holds_its_block(report: &Value) {
    let grown = usage_by_caller(report, "realloc_grow");
    assert_eq!(
        (grown.live_bytes, grown.live_allocs),
        (70000, 1),
        "realloc_grow holds one block of 70000 bytes\n{}",
        describe_stacks(report, |s| frame_function(s, 1) == Some("realloc_grow"))
    );
}

/// The largest stacks of the report by live bytes, with the totals, for failure messages.
pub fn describe_top(report: &Value, n: usize) -> String {
    let mut by_live: Vec<&Value> = stacks(report).iter().collect();
    by_live.sort_by_key(|s| std::cmp::Reverse(s.get("live_bytes").and_then(Value::as_u64)));
    by_live.truncate(n);
    format!(
        "totals: {}\n{} stacks; the largest by live bytes:\n{}",
        describe_totals(report),
        stacks(report).len(),
        describe_list(&by_live)
    )
}

fn describe_list(chosen: &[&Value]) -> String {
    const MAX: usize = 40;
    let mut out = String::new();
    for stack in chosen.iter().take(MAX) {
        let frames: Vec<String> = stack
            .get("frames")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .take(6)
            .map(|f| match f.get("function").and_then(Value::as_str) {
                Some(name) => name.to_owned(),
                None => format!(
                    "{}+{:#x}",
                    f.get("module").and_then(Value::as_str).unwrap_or("?"),
                    f.get("offset").and_then(Value::as_u64).unwrap_or(0)
                ),
            })
            .collect();
        let field = |key| stack.get(key).unwrap_or(&Value::Null);
        let _ = writeln!(
            out,
            "  live_bytes={} live_allocs={} alloc_bytes={} allocs={}  {}",
            field("live_bytes"),
            field("live_allocs"),
            field("alloc_bytes"),
            field("allocs"),
            frames.join(" <- ")
        );
    }
    if chosen.len() > MAX {
        let _ = writeln!(out, "  ... and {} more", chosen.len() - MAX);
    }
    if chosen.is_empty() {
        out.push_str("  (no such stacks)\n");
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The alloc fixture's expected numbers

/// Every name a stack's frame 0 may carry for glibc's allocation functions.
pub const ALLOCATOR_NAMES: &[&str] = &[
    "malloc",
    "calloc",
    "realloc",
    "reallocarray",
    "posix_memalign",
    "memalign",
    "aligned_alloc",
    "valloc",
    "pvalloc",
];

/// What the stacks whose frame 1 is `caller` must add up to after fixtures/alloc.c ran once.
pub struct Expected {
    pub caller: &'static str,
    /// The names frame 0 may have on those stacks.
    pub allocators: &'static [&'static str],
    pub usage: Usage,
}

const fn row(caller: &'static str, allocators: &'static [&'static str], usage: Usage) -> Expected {
    Expected {
        caller,
        allocators,
        usage,
    }
}

const MEMALIGN: &[&str] = &["memalign", "aligned_alloc"];

/// fixtures/alloc.c, per caller: (live_bytes, live_allocs, alloc_bytes, allocs).
pub const ALLOC_TABLE: &[Expected] = &[
    // kept until exit
    row(
        "malloc_kept",
        &["malloc"],
        Usage::new(10_000, 10, 10_000, 10),
    ), // 10 x malloc(1000)
    row("calloc_kept", &["calloc"], Usage::new(5_000, 5, 5_000, 5)), // 5 x calloc(10, 100)
    row(
        "realloc_from_null",
        &["realloc"],
        Usage::new(3_000, 1, 3_000, 1),
    ),
    // malloc(100), then realloc to 70000: the malloc'd block is gone, the realloc'd one is live
    row(
        "realloc_grow",
        &["malloc", "realloc"],
        Usage::new(70_000, 1, 70_100, 2),
    ),
    row(
        "reallocarray_kept",
        &["reallocarray"],
        Usage::new(1_000, 1, 1_000, 1),
    ), // (NULL, 20, 50)
    // 3 x posix_memalign(64, 4096); the one with alignment 3 fails with EINVAL
    row(
        "posix_memalign_kept",
        &["posix_memalign"],
        Usage::new(12_288, 3, 12_288, 3),
    ),
    row(
        "aligned_alloc_kept",
        MEMALIGN,
        Usage::new(4_096, 2, 4_096, 2),
    ), // 2 x (256, 2048)
    row("memalign_kept", MEMALIGN, Usage::new(640, 1, 640, 1)), // (128, 640)
    row("valloc_kept", &["valloc"], Usage::new(5_000, 1, 5_000, 1)), // valloc(5000)
    row("pvalloc_kept", &["pvalloc"], Usage::new(8_192, 1, 8_192, 1)), // pvalloc(5000): 2 pages
    // malloc(300) kept, then realloc(p, SIZE_MAX/2) fails and counts nothing
    row("realloc_fail", &["malloc"], Usage::new(300, 1, 300, 1)),
    // freed again
    row("malloc_freed", &["malloc"], Usage::new(0, 0, 7_770, 10)), // 10 x malloc(777) + free
    row("calloc_freed", &["calloc"], Usage::new(0, 0, 3_996, 4)),  // 4 x calloc(3, 333) + free
    // malloc(200), realloc to 400, free
    row(
        "realloc_freed",
        &["malloc", "realloc"],
        Usage::new(0, 0, 600, 2),
    ),
    // malloc(500), realloc(p, 0) frees it
    row("realloc_to_zero", &["malloc"], Usage::new(0, 0, 500, 1)),
    row("churn", &["malloc"], Usage::new(0, 0, 640_000, 10_000)), // 10000 x malloc(64) + free
    // failing or no-op calls
    row("calloc_overflow", &[], Usage::new(0, 0, 0, 0)), // calloc(SIZE_MAX/2+1, 4)
    row("free_null", &[], Usage::new(0, 0, 0, 0)),       // 3 x free(NULL)
];

/// The realloc paths split by frame 0: (allocator, caller, usage).
pub const ALLOC_SPLIT_TABLE: &[(&str, &str, Usage)] = &[
    ("malloc", "realloc_grow", Usage::new(0, 0, 100, 1)),
    ("realloc", "realloc_grow", Usage::new(70_000, 1, 70_000, 1)),
    ("malloc", "realloc_fail", Usage::new(300, 1, 300, 1)),
    ("realloc", "realloc_fail", Usage::new(0, 0, 0, 0)),
    ("malloc", "realloc_freed", Usage::new(0, 0, 200, 1)),
    ("realloc", "realloc_freed", Usage::new(0, 0, 400, 1)),
    ("malloc", "realloc_to_zero", Usage::new(0, 0, 500, 1)),
    ("realloc", "realloc_to_zero", Usage::new(0, 0, 0, 0)),
];

/// free() calls the alloc fixture makes itself on non-NULL pointers (malloc_freed 10,
/// calloc_freed 4, realloc_freed 1, churn 10000); realloc(p, 0) is not counted here.
pub const ALLOC_FIXTURE_FREES: u64 = 10_015;

/// Blocks the alloc fixture hands back to realloc, which count as frees: realloc_grow's and
/// realloc_freed's first blocks, and realloc_to_zero's realloc(p, 0). realloc_fail's failing
/// realloc releases nothing.
pub const ALLOC_FIXTURE_REALLOC_RELEASES: u64 = 3;

/// Calls of the alloc fixture that fail: calloc_overflow's calloc, realloc_fail's realloc and
/// posix_memalign_kept's call with alignment 3 (EINVAL).
pub const ALLOC_FIXTURE_FAILED: u64 = 3;

/// Checks a report of one run of fixtures/alloc.c against ALLOC_TABLE and ALLOC_SPLIT_TABLE,
/// listing every difference at once.
pub fn check_alloc_report(report: &Value, how: &str) {
    let mut problems = Vec::new();
    for want in ALLOC_TABLE {
        let got = usage_by_caller(report, want.caller);
        if got != want.usage {
            problems.push(format!(
                "caller {}: expected {:?}\n                got {:?}\n{}",
                want.caller,
                want.usage,
                got,
                describe_stacks(report, |s| frame_function(s, 1) == Some(want.caller))
            ));
        }
        let wrong_frame0: Vec<&Value> = stacks(report)
            .iter()
            .filter(|s| frame_function(s, 1) == Some(want.caller) && num(s, "allocs") > 0)
            .filter(|s| !frame_function(s, 0).is_some_and(|f| want.allocators.contains(&f)))
            .collect();
        if !wrong_frame0.is_empty() {
            problems.push(format!(
                "caller {}: frame 0 should be one of {:?}, got {:?}",
                want.caller,
                want.allocators,
                wrong_frame0
                    .iter()
                    .map(|s| frame_function(s, 0))
                    .collect::<Vec<_>>()
            ));
        }
    }
    for &(allocator, caller, want) in ALLOC_SPLIT_TABLE {
        let got = usage_where(report, |s| {
            frame_function(s, 0) == Some(allocator) && frame_function(s, 1) == Some(caller)
        });
        if got != want {
            problems.push(format!(
                "{allocator} called from {caller}: expected {want:?}\n                got {got:?}\n{}",
                describe_stacks(report, |s| frame_function(s, 1) == Some(caller))
            ));
        }
    }
    // glibc calls itself (realloc(NULL) -> malloc, reallocarray -> realloc): those inner calls
    // must not be counted as allocations of their own.
    let nested = |s: &Value| {
        num(s, "allocs") > 0
            && frame_function(s, 1)
                .is_some_and(|f| ALLOCATOR_NAMES.contains(&f.trim_start_matches("__libc_")))
    };
    if stacks(report).iter().any(nested) {
        problems.push(format!(
            "allocations whose frame 1 is itself an allocator (a glibc-internal call counted twice):\n{}",
            describe_stacks(report, nested)
        ));
    }

    // The fixture is the whole program in launch mode, and all that runs while attached in
    // attach mode (stdout's buffer is allocated before "ready"): the totals are the table's
    // sums exactly, and every stack together makes up the totals.
    let totals = report.get("totals").expect("checked by check_report_shape");
    let sum = |f: fn(&Usage) -> u64| ALLOC_TABLE.iter().map(|e| f(&e.usage)).sum::<u64>();
    let want_totals = [
        ("live_bytes", sum(|u| u.live_bytes)),
        ("live_allocs", sum(|u| u.live_allocs)),
        ("alloc_bytes", sum(|u| u.alloc_bytes)),
        ("allocs", sum(|u| u.allocs)),
        (
            "frees",
            ALLOC_FIXTURE_FREES + ALLOC_FIXTURE_REALLOC_RELEASES,
        ),
        ("unmatched_frees", 0),
        ("failed_allocs", ALLOC_FIXTURE_FAILED),
    ];
    for (key, want) in want_totals {
        let got = num(totals, key);
        if got != want {
            problems.push(format!("totals.{key} = {got}, expected exactly {want}"));
        }
    }
    if let Some(dropped) = totals.get("dropped").and_then(Value::as_object) {
        for (reason, count) in dropped {
            if count.as_u64() != Some(0) {
                problems.push(format!("totals.dropped.{reason} = {count}, expected 0"));
            }
        }
    }
    if stacks(report).len() as u64 == num(report, "stacks_total") {
        let all = usage_where(report, |_| true);
        let from_totals = Usage::new(
            num(totals, "live_bytes"),
            num(totals, "live_allocs"),
            num(totals, "alloc_bytes"),
            num(totals, "allocs"),
        );
        if all != from_totals {
            problems.push(format!(
                "the stacks add up to {all:?}, the totals say {from_totals:?}"
            ));
        }
    }
    if !problems.is_empty() {
        panic!(
            "{how}: the report of fixtures/alloc.c differs from the expected table \
             (Usage = live_bytes, live_allocs, alloc_bytes, allocs):\n\n{}\n\n{}",
            problems.join("\n\n"),
            describe_top(report, 15)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Target memory and libc

/// Reads `len` bytes at `addr` of process `pid` through /proc/PID/mem.
pub fn read_mem(pid: i32, addr: u64, len: usize) -> Vec<u8> {
    let path = format!("/proc/{pid}/mem");
    let file = fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, addr)
        .unwrap_or_else(|e| panic!("read {len} bytes at {addr:#x} from {path}: {e}"));
    buf
}

/// Reads `len` bytes at file offset `offset` of `path`.
pub fn file_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let file = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, offset).unwrap_or_else(|e| {
        panic!(
            "read {len} bytes at {offset:#x} from {}: {e}",
            path.display()
        )
    });
    buf
}

/// Where a libc function is, both in a running process and in the file it was mapped from.
#[derive(Debug, Clone)]
pub struct LibcSymbol {
    pub name: String,
    /// Its address in the process.
    pub address: u64,
    /// The libc file the process mapped.
    pub path: PathBuf,
    pub file_offset: u64,
}

impl LibcSymbol {
    pub fn file_bytes(&self, len: usize) -> Vec<u8> {
        file_bytes(&self.path, self.file_offset, len)
    }

    pub fn process_bytes(&self, pid: i32, len: usize) -> Vec<u8> {
        read_mem(pid, self.address, len)
    }
}

struct Mapping {
    start: u64,
    end: u64,
    /// "r-xp" and the like.
    perms: String,
    offset: u64,
    path: String,
}

fn maps(pid: i32) -> Vec<Mapping> {
    let path = format!("/proc/{pid}/maps");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    text.lines()
        .filter_map(|line| {
            // start-end perms offset dev inode [path]
            let mut fields = line.splitn(6, ' ');
            let range = fields.next()?;
            let perms = fields.next()?.to_owned();
            let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
            let _dev = fields.next()?;
            let _inode = fields.next()?;
            let path = fields.next().unwrap_or("").trim().to_owned();
            let (start, end) = range.split_once('-')?;
            Some(Mapping {
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
                perms,
                offset,
                path,
            })
        })
        .collect()
}

fn is_libc(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.starts_with("libc.so") || (name.starts_with("libc-") && name.ends_with(".so"))
}

/// Finds `name` (a dynamic symbol of libc, e.g. "malloc") in process `pid`: the libc file from
/// /proc/PID/maps, the symbol's virtual address from the ELF, its file offset through the
/// PT_LOAD segment holding it, and the address through the mapping holding that file offset.
pub fn libc_symbol(pid: i32, name: &str) -> LibcSymbol {
    use object::{Object, ObjectSegment, ObjectSymbol};

    let maps = maps(pid);
    let libc = maps
        .iter()
        .find(|m| is_libc(&m.path))
        .unwrap_or_else(|| panic!("process {pid} has no libc mapped (is it a static binary?)"))
        .path
        .clone();
    let data = fs::read(&libc).unwrap_or_else(|e| panic!("read {libc}: {e}"));
    let elf = object::File::parse(&*data).unwrap_or_else(|e| panic!("parse {libc}: {e}"));
    let vaddr = elf
        .dynamic_symbols()
        .chain(elf.symbols())
        .find(|s| s.is_definition() && s.address() != 0 && s.name() == Ok(name))
        .unwrap_or_else(|| panic!("{libc} defines no symbol {name:?}"))
        .address();
    let file_offset = elf
        .segments()
        .find_map(|seg| {
            let (off, filesz) = seg.file_range();
            let delta = vaddr.checked_sub(seg.address())?;
            (delta < filesz).then_some(off + delta)
        })
        .unwrap_or_else(|| panic!("{name} at {vaddr:#x} lies in no PT_LOAD segment of {libc}"));
    let mapping = maps
        .iter()
        .find(|m| {
            m.path == libc && m.offset <= file_offset && file_offset < m.offset + (m.end - m.start)
        })
        .unwrap_or_else(|| {
            panic!(
                "no mapping of {libc} in process {pid} covers file offset {file_offset:#x} ({name})"
            )
        });
    LibcSymbol {
        name: name.to_owned(),
        address: mapping.start + (file_offset - mapping.offset),
        path: PathBuf::from(libc),
        file_offset,
    }
}

/// The executable mapping of libc in process `pid`.
fn libc_text(pid: i32) -> Mapping {
    maps(pid)
        .into_iter()
        .find(|m| is_libc(&m.path) && m.perms.contains('x'))
        .unwrap_or_else(|| panic!("pid {pid} maps no executable libc"))
}

/// libc's whole executable mapping as process `pid` has it now.
pub fn live_libc_text(pid: i32) -> Vec<u8> {
    let text = libc_text(pid);
    read_mem(pid, text.start, (text.end - text.start) as usize)
}

/// Panics at the first byte where `live` (libc's code in `pid`) differs from `want`.
pub fn assert_same_code(pid: i32, live: &[u8], want: &[u8], against: &str, when: &str) {
    let start = libc_text(pid).start;
    assert_eq!(live.len(), want.len(), "{when}: libc's code changed size");
    if let Some(i) = live.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{when}: libc's code in pid {pid} differs from {against} at {:#x} (byte {i:#x} of \
             the mapping): live {:02x?}, want {:02x?}",
            start + i as u64,
            &live[i..(i + 16).min(live.len())],
            &want[i..(i + 16).min(want.len())]
        );
    }
}

/// libc's whole executable mapping in process `pid` reads back as the file, byte for byte.
pub fn assert_libc_text_pristine(pid: i32, when: &str) {
    let text = libc_text(pid);
    let file = fs::read(&text.path).unwrap_or_else(|e| panic!("read {}: {e}", text.path));
    let want = &file[text.offset as usize..][..(text.end - text.start) as usize];
    let against = format!("{} (mapped from file offset {:#x})", text.path, text.offset);
    assert_same_code(pid, &live_libc_text(pid), want, &against, when);
}

// ---------------------------------------------------------------------------------------------
// Kernel state

/// A loaded BPF program as `bpftool prog show --json` lists it.
#[derive(Debug, Clone)]
pub struct BpfProg {
    pub id: u64,
    pub name: String,
    /// Processes holding it, "comm(pid)", if bpftool knows.
    pub holders: Vec<String>,
}

/// What `bpftool OBJECT show --json` lists.
fn bpftool_list(object: &str) -> Value {
    let output = ["bpftool", "/usr/sbin/bpftool"]
        .iter()
        .find_map(|bin| {
            Command::new(bin)
                .args([object, "show", "--json"])
                .output()
                .ok()
        })
        .unwrap_or_else(|| {
            panic!("bpftool is not installed; run `cargo xtask prereqs` (Debian package bpftool)")
        });
    assert!(
        output.status.success(),
        "`bpftool {object} show --json` failed with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "`bpftool {object} show --json` printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// A BPF link (an attachment of a program) that a process holds, from its fdinfo.
#[derive(Debug, Clone)]
pub struct BpfLink {
    pub id: u64,
    /// The kernel's name of the link type: "uprobe_multi", "uretprobe_multi",
    /// "raw_tracepoint", "perf_event", ...
    pub kind: String,
}

/// What process `pid` holds open of BPF: its links, the ids of its programs, and how many
/// perf events (the other way to attach a uprobe or tracepoint program), from its fds.
pub struct Attachments {
    pub links: Vec<BpfLink>,
    pub programs: Vec<u64>,
    pub perf_events: usize,
}

pub fn attachments_of(pid: i32) -> Attachments {
    let fds = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("list /proc/{pid}/fd: {e}"));
    let mut held = Attachments {
        links: Vec::new(),
        programs: Vec::new(),
        perf_events: 0,
    };
    for fd in fds.flatten() {
        let target = fs::read_link(fd.path()).unwrap_or_default();
        let info = || {
            fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .unwrap_or_default()
        };
        let field = |info: &str, name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        match target.to_string_lossy().as_ref() {
            "anon_inode:bpf_link" => {
                let info = info();
                held.links.push(BpfLink {
                    id: field(&info, "link_id").parse().unwrap_or(0),
                    kind: field(&info, "link_type"),
                });
            }
            "anon_inode:bpf-prog" => {
                if let Ok(id) = field(&info(), "prog_id").parse() {
                    held.programs.push(id);
                }
            }
            "anon_inode:[perf_event]" => held.perf_events += 1,
            _ => {}
        }
    }
    held
}

/// Ids of every BPF link on the host, as `bpftool link show --json` lists them.
pub fn bpf_link_ids() -> Vec<u64> {
    bpftool_list("link")
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|l| l.get("id").and_then(Value::as_u64))
        .collect()
}

/// All loaded BPF programs.
pub fn bpf_programs() -> Vec<BpfProg> {
    let list = bpftool_list("prog");
    list.as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|p| BpfProg {
            id: p.get("id").and_then(Value::as_u64).unwrap_or(0),
            name: p
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
            holders: p
                .get("pids")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|h| {
                    format!(
                        "{}({})",
                        h.get("comm").and_then(Value::as_str).unwrap_or("?"),
                        h.get("pid").unwrap_or(&Value::Null)
                    )
                })
                .collect(),
        })
        .collect()
}

/// Loaded BPF programs whose names mark them as the tracer's (`tr_` prefix).
pub fn tracer_programs() -> Vec<BpfProg> {
    bpf_programs()
        .into_iter()
        .filter(|p| p.name.starts_with("tr_"))
        .collect()
}

/// Polls `check` every 50 ms until it returns Ok or `timeout` passes; returns the last result.
pub fn eventually<T>(
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let result = check();
        if result.is_ok() || Instant::now() >= deadline {
            return result;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The state letter of /proc/PID/stat (R, S, Z, ...), or None if there is no such process.
pub fn proc_state(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Pids of processes whose executable is `exe`.
pub fn pids_running(exe: &Path) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == exe))
        .collect()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// TracerPid of every thread of `pid`, by thread id.
pub fn tracer_pids(pid: i32) -> Vec<(String, String)> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| {
            let tid = t.ok()?.file_name().to_string_lossy().into_owned();
            let status = fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
            let tracer = status
                .lines()
                .find_map(|l| l.strip_prefix("TracerPid:"))?
                .trim()
                .to_owned();
            Some((tid, tracer))
        })
        .collect()
}
