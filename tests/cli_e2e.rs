//! Bad input: each case must end with exit status 2 and a single error line on stderr, never a
//! panic or a hang. Also: launch mode passes the command's exit status through.

mod support;

use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{
    Finished, LINE_TIMEOUT, Proc, TempDir, build_static_pause, describe_status, eventually,
    pids_running, proc_state, run_tracer, setup, show_args, tracer_bin,
};

const TIMEOUT: Duration = Duration::from_secs(60);

fn os_args(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// Runs the tracer and checks: exit status 2, exactly one non-empty stderr line, no panic.
fn expect_rejected(args: &[OsString], case: &str) -> Finished {
    let finished = run_tracer(args, TIMEOUT);
    let lines: Vec<&str> = finished
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    let mut problems = Vec::new();
    if finished.status.code() != Some(2) {
        problems.push(format!(
            "expected exit status 2, got {}",
            describe_status(finished.status)
        ));
    }
    if lines.len() != 1 {
        problems.push(format!(
            "expected exactly one non-empty line on stderr, got {}",
            lines.len()
        ));
    }
    if finished.stderr.contains("panicked") {
        problems.push("stderr shows a panic".to_owned());
    }
    assert!(
        problems.is_empty(),
        "`tracer {}` ({case}): {}\n{}",
        show_args(args),
        problems.join("; "),
        finished.describe()
    );
    finished
}

#[test]
fn pid_that_does_not_exist_is_rejected() {
    setup();
    expect_rejected(
        &os_args(&["record", "--pid", "999999999"]),
        "no such process",
    );
}

#[test]
fn kernel_thread_is_rejected() {
    setup();
    expect_rejected(
        &os_args(&["record", "--pid", "2"]),
        "kthreadd, a kernel thread",
    );
}

#[test]
fn zero_duration_is_rejected() {
    setup();
    let own = std::process::id().to_string();
    expect_rejected(
        &os_args(&["record", "--duration", "0", "--pid", &own]),
        "--duration 0",
    );
}

#[test]
fn unparsable_duration_is_rejected() {
    setup();
    expect_rejected(
        &os_args(&["record", "--duration", "abc", "--", "/bin/true"]),
        "--duration abc",
    );
}

#[test]
fn static_binary_is_rejected_in_attach_mode() {
    setup();
    let dir = TempDir::new("cli-static-attach");
    let bin = build_static_pause(&dir);
    let mut target = Proc::spawn("static_pause", &mut Command::new(&bin));
    let pid = target.pid().to_string();
    expect_rejected(
        &os_args(&["record", "--pid", &pid]),
        "a static binary has no libc to probe",
    );
    assert!(
        target.running(),
        "the static target should survive the tracer's refusal"
    );
}

#[test]
fn static_binary_is_rejected_in_launch_mode() {
    setup();
    let dir = TempDir::new("cli-static-launch");
    let bin = build_static_pause(&dir);
    let mut args = os_args(&["record", "--"]);
    args.push(bin.clone().into_os_string());
    // Clean up the launched command even when the tracer hung or failed.
    let result = std::panic::catch_unwind(|| {
        expect_rejected(&args, "launching a static binary");
    });
    let left = pids_running(&bin);
    for pid in &left {
        // SAFETY: kill has no memory-safety preconditions; these run our own temp binary.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    assert!(
        left.is_empty(),
        "the tracer refused the static binary but left it running (pids {left:?}, killed now)"
    );
}

#[test]
fn zombie_process_is_rejected() {
    setup();
    let mut child = Command::new("/bin/true").spawn().expect("start /bin/true");
    let pid = i32::try_from(child.id()).expect("pid fits in i32");
    let became_zombie = eventually(Duration::from_secs(10), || match proc_state(pid) {
        Some('Z') => Ok(()),
        state => Err(format!("state {state:?}")),
    });
    if let Err(state) = became_zombie {
        let _ = child.wait();
        panic!("/bin/true (pid {pid}) did not become a zombie within 10 s: {state}");
    }
    let result = std::panic::catch_unwind(|| {
        expect_rejected(
            &os_args(&["record", "--pid", &pid.to_string()]),
            "a zombie process",
        );
    });
    let _ = child.wait();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn launch_mode_exits_with_the_command_status() {
    setup();
    let finished = run_tracer(
        &os_args(&[
            "record", "--top", "0", "--format", "json", "--", "/bin/sh", "-c", "exit 7",
        ]),
        TIMEOUT,
    );
    assert_eq!(
        finished.status.code(),
        Some(7),
        "`tracer record -- /bin/sh -c 'exit 7'` should exit with the command's status 7\n{}",
        finished.describe()
    );
}

#[test]
fn an_output_that_cannot_be_written_is_refused_before_the_command_runs() {
    setup();
    let dir = TempDir::new("cli-output");
    let ran = dir.join("command-ran");
    let finished = expect_rejected(
        &os_args(&[
            "record",
            "-o",
            "/nonexistent/r.json",
            "--",
            "/bin/sh",
            "-c",
            &format!("touch {}", ran.display()),
        ]),
        "-o in a directory that does not exist",
    );
    assert!(
        finished.stderr.contains("/nonexistent/r.json"),
        "the error should name the file\n{}",
        finished.describe()
    );
    assert!(
        !ran.exists(),
        "the command ran (and a recording was made, to be lost) before the tracer found that it \
         cannot write /nonexistent/r.json"
    );
}

/// A target both backends refuse: eBPF cannot create a live table of 4e9 entries, and ptrace
/// cannot seize a process another tracer (this test) holds.
#[test]
fn failing_both_backends_is_one_line() {
    setup();
    let mut target = Proc::spawn("sleep 60", Command::new("/bin/sleep").arg("60"));
    let pid = target.pid();
    // Until its loader has mapped the C library, `sleep` is rightly refused for that alone.
    eventually(Duration::from_secs(10), || {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        if maps.contains("libc.so") { Ok(()) } else { Err("libc not mapped yet".to_owned()) }
    })
    .unwrap_or_else(|why| panic!("sleep never mapped its C library: {why}"));
    // SAFETY: plain syscall; the seize ends when this test's thread exits or the child dies.
    let seized = unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0, 0) };
    assert_eq!(seized, 0, "PTRACE_SEIZE {pid}: {}", std::io::Error::last_os_error());
    let finished = expect_rejected(
        &os_args(&["record", "--max-live", "4000000000", "--pid", &pid.to_string()]),
        "eBPF fails to load, ptrace fails to seize",
    );
    let line = finished.stderr.trim();
    assert!(
        line.contains("eBPF unavailable") && line.contains("ptrace"),
        "the one line should say why each backend failed: {line:?}"
    );
    assert!(target.running(), "the target should survive");
}

/// Runs the tracer with its stderr on /dev/full (every write fails) or closed.
fn run_with_stderr(args: &[&str], stderr: &str) -> std::process::Output {
    let mut cmd = Command::new(tracer_bin());
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped());
    match stderr {
        "full" => {
            cmd.stderr(std::fs::File::create("/dev/full").expect("open /dev/full"));
        }
        "closed" => {
            // SAFETY: close is async-signal-safe; it only affects the child.
            unsafe {
                cmd.pre_exec(|| {
                    libc::close(2);
                    Ok(())
                });
            }
        }
        other => unreachable!("{other}"),
    }
    cmd.output().expect("run the tracer")
}

#[test]
fn a_stderr_that_cannot_be_written_does_not_make_the_tracer_panic() {
    setup();
    for stderr in ["full", "closed"] {
        let out = run_with_stderr(&["record", "--pid", "999999999"], stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "bad input with stderr {stderr}: expected exit status 2, got {}",
            describe_status(out.status)
        );
        let out = run_with_stderr(&["record", "--top", "1", "--", "/bin/sh", "-c", "exit 3"], stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(3),
            "recording with stderr {stderr}: expected the command's status 3, got {}; stdout:\n{stdout}",
            describe_status(out.status)
        );
        assert!(
            stdout.starts_with("pid ") && stdout.contains("(sh), recorded"),
            "the report should still be on stdout with stderr {stderr}:\n{stdout}"
        );
    }
}

#[test]
fn launch_mode_exits_with_128_plus_the_signal_that_killed_the_command() {
    setup();
    for backend in ["ebpf", "ptrace"] {
        let finished = run_tracer(
            &os_args(&["record", "--backend", backend, "--", "/bin/sh", "-c", "kill -TERM $$"]),
            TIMEOUT,
        );
        assert_eq!(
            finished.status.code(),
            Some(128 + libc::SIGTERM),
            "--backend {backend}: a command killed by SIGTERM\n{}",
            finished.describe()
        );
    }
}

/// Started with SIGCHLD ignored (inherited from a parent that ignores it), the kernel would
/// reap the command by itself once the tracer stops tracing it, and its status would be lost:
/// the tracer used to report that unknown status as 0.
#[test]
fn launch_mode_learns_the_exit_status_even_when_started_with_sigchld_ignored() {
    setup();
    for backend in ["ebpf", "ptrace"] {
        let mut cmd = Command::new(tracer_bin());
        cmd.args(["record", "--backend", backend, "--duration", "1s", "--top", "1", "--"])
            .args(["/bin/sh", "-c", "sleep 2; exit 7"]);
        // SAFETY: signal is async-signal-safe; the disposition is inherited through exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::signal(libc::SIGCHLD, libc::SIG_IGN);
                Ok(())
            });
        }
        let mut tracer = Proc::spawn(&format!("tracer --backend {backend} (SIGCHLD ignored)"), &mut cmd);
        let finished = tracer.finish(LINE_TIMEOUT);
        assert_eq!(
            finished.status.code(),
            Some(7),
            "--backend {backend}: the command exited 7 after recording stopped\n{}",
            finished.describe()
        );
    }
}
