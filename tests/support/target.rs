//! A running fixture for the in-process sampler's tests (inject_e2e, inject_refusals_e2e,
//! inject_kill_e2e): started with a pipe to its stdin, it prints "ready", then a progress line
//! every 200 ms that counts its work and says whether anything was damaged, and on "quit" it
//! prints a "done" line and exits 0 if nothing was. fixtures/inject_target.c and inject_spin.c
//! print "ready", "progress N bad=B ..." and "done ... bad=B ..."; fixtures/inject_http.js
//! prints "ready PORT", "ok N failed F" and "done ok N failed F".

use std::io::Write as _;
use std::path::Path;
use std::process::{ChildStdin, Command};
use std::time::{Duration, Instant};

use super::{LINE_TIMEOUT, Proc};

/// A started fixture and the pipe that tells it to quit.
pub struct Target {
    /// The process; its label names the target in every failure message, so a test may put
    /// the case it runs there.
    pub proc: Proc,
    stdin: Option<ChildStdin>,
    /// How the fixture's progress lines start: "progress", or "ok" for inject_http.js.
    progress: &'static str,
}

impl Target {
    /// Starts `cmd` and waits for its line that starts with "ready".
    pub fn start(label: &str, cmd: &mut Command) -> Target {
        let (mut proc, stdin) = Proc::spawn_with_stdin(label, cmd);
        proc.expect_stdout_prefix("ready", LINE_TIMEOUT);
        Target {
            proc,
            stdin: Some(stdin),
            progress: "progress",
        }
    }

    /// [`Target::start`] of fixtures/inject_target.c built as `exe`, in `mode` ("bench",
    /// "main-reads") if given.
    pub fn inject_target(exe: &Path, mode: Option<&str>) -> Target {
        let label = match mode {
            Some(mode) => format!("inject_target {mode}"),
            None => "inject_target".to_owned(),
        };
        Target::start(&label, Command::new(exe).args(mode))
    }

    /// This target's progress lines start with `key` instead of "progress".
    pub fn counting(mut self, key: &'static str) -> Target {
        self.progress = key;
        self
    }

    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }

    /// The next progress line's first number ("progress N", "ok N") and the whole line;
    /// panics with the fixture's output if none comes within 10 s.
    pub fn progress(&mut self) -> (u64, String) {
        let key = self.progress;
        let line = self
            .proc
            .stdout
            .wait_for(Duration::from_secs(10), |l| l.starts_with(key))
            .unwrap_or_else(|why| {
                let running = self.proc.running();
                panic!(
                    "{}: no {key:?} line: {why} (running: {running})\n--- stdout ---\n{}\
                     --- stderr ---\n{}",
                    self.proc.label,
                    tail(&self.proc.stdout.text()),
                    self.proc.stderr.text()
                )
            });
        let n = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("bad progress line {line:?}"));
        (n, line)
    }

    /// Progress over `secs` seconds: (first, last) counts; the last line must show no damage.
    pub fn runs_healthy(&mut self, secs: f64) -> (u64, u64) {
        let (first, _) = self.progress();
        let until = Instant::now() + Duration::from_secs_f64(secs);
        let mut last = (first, String::new());
        while Instant::now() < until {
            last = self.progress();
        }
        assert!(
            last.0 > first,
            "{}: no progress in {secs} s ({first} -> {})",
            self.proc.label,
            last.0
        );
        assert!(
            undamaged(&last.1),
            "{}: damage reported: {:?}",
            self.proc.label,
            last.1
        );
        (first, last.0)
    }

    /// Reads what the fixture printed so far, then checks it prints nothing for `quiet`: a
    /// stopped process makes no progress.
    pub fn prints_nothing(&mut self, quiet: Duration, when: &str) {
        let _ = self
            .proc
            .stdout
            .wait_for(Duration::from_millis(300), |_| false);
        if let Ok(line) = self.proc.stdout.wait_for(quiet, |_| true) {
            panic!(
                "{when}: the stopped {} printed {line:?}: it was resumed",
                self.proc.label
            );
        }
    }

    /// Whether the fixture still runs, and what it said: for a failure's message.
    pub fn describe(&mut self) -> String {
        let state = if self.proc.running() {
            "still running".to_owned()
        } else {
            format!("{:?}", self.proc.wait_exit(Duration::from_secs(1)))
        };
        format!(
            "\n{} {state}\n--- stdout (tail) ---\n{}--- stderr ---\n{}",
            self.proc.label,
            tail(&self.proc.stdout.text()),
            self.proc.stderr.text()
        )
    }

    /// Tells the fixture to finish; it must exit 0 with a "done" line showing no damage.
    pub fn quit(mut self) {
        let mut stdin = self.stdin.take().expect("stdin");
        let _ = stdin.write_all(b"quit\n");
        drop(stdin);
        let status = self.proc.wait_exit(Duration::from_secs(30));
        let out = self.proc.stdout.read_to_end(Duration::from_secs(2));
        let last = out.last().cloned().unwrap_or_default();
        assert!(
            status.success() && last.starts_with("done") && undamaged(&last),
            "{} exited with {status:?}, last line {last:?}\n--- stdout (tail) ---\n{}\
             --- stderr ---\n{}",
            self.proc.label,
            tail(&out.join("\n")),
            self.proc.stderr.text()
        );
    }
}

/// Whether a progress or done line says nothing was damaged.
fn undamaged(line: &str) -> bool {
    line.contains("bad=0") || line.contains("failed 0")
}

/// The last 15 lines of `text`.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(15);
    lines[from..].join("\n") + "\n"
}
