//! Every glibc allocation path of fixtures/alloc.c, recorded in launch mode and in attach mode,
//! must add up to the exact per-caller numbers of `support::ALLOC_TABLE`.

mod support;

use std::process::Command;

use support::{
    EXIT_TIMEOUT, LINE_TIMEOUT, Proc, TempDir, build_fixture, check_alloc_report, num,
    record_launch, setup, start_recording, stop_recording,
};

#[test]
fn launch_mode_counts_every_allocator_path_exactly() {
    setup();
    let dir = TempDir::new("malloc-launch");
    let alloc = build_fixture(&dir, "alloc");

    let launch = record_launch(&dir, &[&alloc]);

    assert_eq!(
        launch.finished.status.code(),
        Some(0),
        "the tracer should exit with the fixture's status 0\n{}",
        launch.finished.describe()
    );
    check_alloc_report(&launch.report, "launch mode");
}

#[test]
fn attach_mode_counts_every_allocator_path_exactly_and_leaves_the_target_working() {
    setup();
    let dir = TempDir::new("malloc-attach");
    let alloc = build_fixture(&dir, "alloc");
    let mut fixture = Proc::spawn("alloc --wait", Command::new(&alloc).arg("--wait"));
    fixture.expect_stdout_line("ready", LINE_TIMEOUT);

    let mut tracer = start_recording(fixture.pid(), &["--format", "json", "--top", "0"]);
    fixture.signal(libc::SIGUSR1);
    fixture.expect_stdout_line("allocated", LINE_TIMEOUT);
    let (_, report) = stop_recording(&mut tracer);

    assert_eq!(
        num(&report, "pid"),
        u64::try_from(fixture.pid()).expect("pid is positive"),
        "the report's pid should be the attached process"
    );
    check_alloc_report(&report, "attach mode");

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
