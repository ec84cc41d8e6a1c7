//! Every glibc allocation path of fixtures/alloc.c, recorded in launch mode and in attach mode,
//! must add up to the exact per-caller numbers of `support::ALLOC_TABLE`, with either backend.

mod support;

use std::process::Command;

use support::{
    EXIT_TIMEOUT, LINE_TIMEOUT, Proc, TempDir, build_fixture, check_alloc_report, num,
    record_launch_with, setup, start_recording, stop_recording,
};

#[test]
fn launch_mode_counts_every_allocator_path_exactly() {
    launch_mode(&["--backend", "ebpf"]);
}

#[test]
fn launch_mode_counts_every_allocator_path_exactly_with_ptrace() {
    launch_mode(&["--backend", "ptrace"]);
}

#[test]
fn attach_mode_counts_every_allocator_path_exactly_and_leaves_the_target_working() {
    attach_mode(&["--backend", "ebpf"]);
}

#[test]
fn attach_mode_counts_every_allocator_path_exactly_with_ptrace() {
    attach_mode(&["--backend", "ptrace"]);
}

fn launch_mode(backend: &[&str]) {
    setup();
    let dir = TempDir::new("malloc-launch");
    let alloc = build_fixture(&dir, "alloc");

    let launch = record_launch_with(&dir, backend, &[&alloc]);

    assert_eq!(
        launch.finished.status.code(),
        Some(0),
        "the tracer should exit with the fixture's status 0\n{}",
        launch.finished.describe()
    );
    check_alloc_report(&launch.report, &format!("launch mode, {}", backend.join(" ")));
}

fn attach_mode(backend: &[&str]) {
    setup();
    let dir = TempDir::new("malloc-attach");
    let alloc = build_fixture(&dir, "alloc");
    let mut fixture = Proc::spawn("alloc --wait", Command::new(&alloc).arg("--wait"));
    fixture.expect_stdout_line("ready", LINE_TIMEOUT);

    let mut extra = vec!["--format", "json", "--top", "0"];
    extra.extend(backend);
    let mut tracer = start_recording(fixture.pid(), &extra);
    fixture.signal(libc::SIGUSR1);
    fixture.expect_stdout_line("allocated", LINE_TIMEOUT);
    let (_, report) = stop_recording(&mut tracer);

    assert_eq!(
        num(&report, "pid"),
        u64::try_from(fixture.pid()).expect("pid is positive"),
        "the report's pid should be the attached process"
    );
    check_alloc_report(&report, &format!("attach mode, {}", backend.join(" ")));

    fixture.signal(libc::SIGUSR2);
    fixture.expect_stdout_line("ok", LINE_TIMEOUT);
    let status = fixture.wait_exit(EXIT_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(0),
        "the fixture should exit 0 after the tracer detached, got {status}\nstderr:\n{}",
        fixture.stderr.text()
    );
}
