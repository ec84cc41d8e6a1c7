//! A tracer SIGKILLed while a system call it runs in the target is in flight leaves the target
//! healthy: every call runs through a stub, which finishes the call, puts the thread's
//! registers back and resumes it where it was, restarting the system call it was stopped in.
//! The first calls (the `mmap` that reserves the sampler's region) run through the bootstrap
//! stub in the tail of libc's executable mapping; every later one through the stub in the
//! region's trampoline page.
//!
//! `tracer inject-test` with `TRACER_INJECT_PAUSE_AT=N` (or `N:entry`) stops the Nth call it
//! runs at its syscall-exit-stop (entry-stop), says `paused in syscall N ...` on stderr and
//! waits; the test kills it there. The thread the calls run in is the target's main thread,
//! blocked in a system call: in read() (`main-reads`, restarted after -ERESTARTSYS) or in the
//! sleep between its progress lines (restarted through restart_syscall after
//! -ERESTART_RESTARTBLOCK). Each case takes a fresh target, which must then go on checking its
//! blocks with none damaged, and quit when told (through that same read, in `main-reads`).

mod support;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use support::target::Target;
use support::{LINE_TIMEOUT, Proc, TempDir, build_fixture, require_root, tracer_bin};

/// A fresh target in `mode`, seen printing its first progress line.
fn start_target(exe: &std::path::Path, mode: Option<&str>) -> Target {
    let mut t = Target::inject_target(exe, mode);
    t.progress();
    t
}

/// What the tracer said where it paused.
struct Paused {
    line: String,
    /// The thread the call ran in.
    task: i32,
}

impl Paused {
    /// A number after `key` in the saved registers' part of the line.
    fn field(&self, key: &str) -> i64 {
        let saved = self.line.split_once("saved rip").map_or("", |s| s.1);
        let after = saved
            .split_once(key)
            .unwrap_or_else(|| panic!("no {key:?} in {:?}", self.line))
            .1;
        let word: String = after
            .trim_start()
            .chars()
            .take_while(|c| *c == '-' || c.is_ascii_digit())
            .collect();
        word.parse()
            .unwrap_or_else(|_| panic!("bad {key:?} in {:?}", self.line))
    }
}

/// Starts `tracer inject-test` on `pid` paused at its `n`th call (`:entry` if `at_entry`).
/// None if the install finished in fewer calls.
fn pause_tracer(pid: i32, n: u32, at_entry: bool, ring: bool) -> (Proc, Option<Paused>) {
    let at = format!("{n}{}", if at_entry { ":entry" } else { "" });
    let pid_arg = pid.to_string();
    let mut args = vec!["inject-test", "--pid", &pid_arg, "--hold", "600"];
    if ring {
        args.push("--ring");
    }
    let mut tracer = Proc::spawn(
        "tracer inject-test",
        Command::new(tracer_bin())
            .args(&args)
            .env("TRACER_INJECT_PAUSE_AT", &at),
    );
    let deadline = Instant::now() + LINE_TIMEOUT;
    while Instant::now() < deadline {
        let step = Duration::from_millis(50);
        if let Ok(line) = tracer
            .stderr
            .wait_for(step, |l| l.starts_with("paused in syscall"))
        {
            let task = line
                .split_once("task ")
                .and_then(|(_, t)| t.split(',').next()?.parse().ok())
                .unwrap_or_else(|| panic!("no task in {line:?}"));
            return (tracer, Some(Paused { line, task }));
        }
        if tracer
            .stdout
            .wait_for(Duration::from_millis(1), |l| l.starts_with("installed"))
            .is_ok()
        {
            return (tracer, None);
        }
        if !tracer.running() {
            break;
        }
    }
    panic!(
        "tracer inject-test (pause at {at}) neither paused nor installed\n--- stdout ---\n{}\
         --- stderr ---\n{}",
        tracer.stdout.text(),
        tracer.stderr.text()
    );
}

/// The system call task `tid` of `pid` is blocked in (from /proc), if any.
fn blocked_in(pid: i32, tid: i32) -> Option<i64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// One case: a fresh target, the tracer paused in its `n`th call and killed there. None when
/// the install had fewer calls; else whether the paused thread was in an interrupted system
/// call (its restart code).
fn kill_in_call(
    exe: &std::path::Path,
    mode: Option<&str>,
    n: u32,
    at_entry: bool,
    ring: bool,
) -> Option<i64> {
    let mut t = start_target(exe, mode);
    let pid = t.pid();
    let (mut tracer, paused) = pause_tracer(pid, n, at_entry, ring);
    let Some(paused) = paused else {
        tracer.signal(libc::SIGKILL);
        tracer.wait_exit(Duration::from_secs(10));
        t.proc.label = format!("{} after a whole install", t.proc.label);
        t.quit();
        return None;
    };
    let case = format!(
        "{} with the tracer killed in: {}",
        t.proc.label, paused.line
    );
    eprintln!("{case}");
    // Every failure from here on names the case.
    t.proc.label = case.clone();
    assert!(
        paused.line.contains("via the stub"),
        "{case}: the call ran without a stub"
    );
    assert_eq!(
        paused.task, pid,
        "{case}: the calls were expected in the main thread"
    );
    let (orig_rax, rax) = (paused.field("orig_rax"), paused.field(" rax"));
    if mode == Some("main-reads") {
        assert_eq!(
            (orig_rax, rax),
            (0, -512),
            "{case}: the main thread was expected stopped in read() (-ERESTARTSYS)"
        );
    }
    tracer.signal(libc::SIGKILL);
    tracer.wait_exit(Duration::from_secs(10));
    t.runs_healthy(2.0);
    if mode == Some("main-reads") {
        assert_eq!(
            blocked_in(pid, pid),
            Some(libc::SYS_read),
            "{case}: the main thread is no longer blocked in read()"
        );
    }
    t.quit();
    Some(if orig_rax >= 0 { rax } else { 0 })
}

#[test]
fn a_tracer_killed_in_any_system_call_leaves_the_target_healthy() {
    require_root();
    let dir = TempDir::new("inject-kill-calls");
    let exe = build_fixture(&dir, "inject_target");
    let mut restarts = Vec::new();
    // Every call of an install without a ring, at its exit, with the main thread in read()
    // and in its sleep; the first and the last at their entry too.
    let mut calls = 0;
    for n in 1..40 {
        let Some(a) = kill_in_call(&exe, Some("main-reads"), n, false, false) else {
            break;
        };
        let b = kill_in_call(&exe, None, n, false, false).expect("the same number of calls");
        restarts.extend([a, b]);
        calls = n;
    }
    assert!(
        calls >= 4,
        "an install ran only {calls} system calls in the target"
    );
    for n in [1, calls] {
        restarts.push(kill_in_call(&exe, Some("main-reads"), n, true, false).expect("a call"));
    }
    // The ring's calls, which come after the sampler's.
    let mut ring_calls = 0;
    for n in calls + 1..calls + 20 {
        let Some(a) = kill_in_call(&exe, Some("main-reads"), n, false, true) else {
            break;
        };
        restarts.push(a);
        ring_calls += 1;
    }
    assert!(ring_calls >= 1, "an install with a ring ran no more calls");
    restarts.push(kill_in_call(&exe, None, calls + 1, false, true).expect("a ring call"));
    eprintln!(
        "{calls} calls without a ring, {ring_calls} more with one; restart codes seen {restarts:?}"
    );
    assert!(
        restarts.contains(&-516),
        "no case had the main thread in its sleep (-ERESTART_RESTARTBLOCK): {restarts:?}"
    );
}
