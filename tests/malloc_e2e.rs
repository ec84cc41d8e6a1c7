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

/// The C library is upgraded on disk under a running service (a package upgrade replaces
/// libc.so.6 by a new file). Uprobes placed by path would sit in the new file, which the
/// process does not run, and see nothing: the probes must go into the file it maps. Here the
/// fixture runs a copy of libc from its own directory, and the copy is replaced.
#[test]
fn allocations_are_counted_in_a_c_library_replaced_on_disk() {
    setup();
    let dir = TempDir::new("malloc-libc-replaced");
    let alloc = build_fixture(&dir, "alloc");
    let lib = dir.join("lib");
    std::fs::create_dir_all(&lib).expect("create lib dir");
    let system_libc = "/lib/x86_64-linux-gnu/libc.so.6";
    std::fs::copy(system_libc, lib.join("libc.so.6")).expect("copy libc");
    let mut fixture = Proc::spawn(
        "alloc --wait (own libc)",
        Command::new(&alloc).arg("--wait").env("LD_LIBRARY_PATH", &lib),
    );
    fixture.expect_stdout_line("ready", LINE_TIMEOUT);
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", fixture.pid())).expect("read maps");
    let own = lib.join("libc.so.6");
    assert!(
        maps.contains(own.to_str().expect("utf-8 path")),
        "the fixture should run {}:\n{maps}",
        own.display()
    );
    // The upgrade: a new file under the old name.
    std::fs::copy(system_libc, lib.join("libc.so.6.new")).expect("copy libc");
    std::fs::rename(lib.join("libc.so.6.new"), &own).expect("replace libc");

    let mut tracer = start_recording(fixture.pid(), &["--format", "json", "--top", "0", "--backend", "ebpf"]);
    fixture.signal(libc::SIGUSR1);
    fixture.expect_stdout_line("allocated", LINE_TIMEOUT);
    let (finished, report) = stop_recording(&mut tracer);
    check_alloc_report(&report, "attach mode, libc replaced on disk");
    let said = format!(
        "tracer: {} on disk is not the file pid {} maps (replaced since it was mapped); probing the mapped file",
        own.display(),
        fixture.pid()
    );
    assert!(
        finished.stderr.lines().any(|l| l == said),
        "the tracer should say {said:?}\n{}",
        finished.describe()
    );
    fixture.signal(libc::SIGUSR2);
    fixture.expect_stdout_line("ok", LINE_TIMEOUT);
}
