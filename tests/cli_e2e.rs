//! Bad input: each case must end with exit status 2 and a single error line on stderr, never a
//! panic or a hang. Also: launch mode passes the command's exit status through.

mod support;

use std::ffi::OsString;
use std::process::Command;
use std::time::Duration;

use support::{
    Finished, Proc, TempDir, build_static_pause, describe_status, eventually, pids_running,
    proc_state, run_tracer, setup, show_args,
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
