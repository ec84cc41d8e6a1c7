//! Allocations from every thread of the target count: four threads malloc and free at the same
//! time, and the live numbers must equal exactly what the threads say they kept.

mod support;

use std::process::Command;
use std::time::Duration;

use support::{
    EXIT_TIMEOUT, LINE_TIMEOUT, Proc, TempDir, Usage, build_fixture, describe_stacks,
    describe_top, eventually, frame_function, parse_report, proc_state, record_launch_with,
    run_tracer, setup, start_recording, usage_by_caller,
};

/// The `key=value` pairs of the fixture's result line.
fn field(stdout: &str, key: &str) -> u64 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("kept_bytes="))
        .unwrap_or_else(|| panic!("the threads fixture printed no result line; stdout:\n{stdout}"));
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}=N in the fixture's line {line:?}"))
}

#[test]
fn live_bytes_of_all_threads_match_what_the_threads_kept() {
    all_threads_counted(&["--backend", "ebpf"]);
}

#[test]
fn live_bytes_of_all_threads_match_what_the_threads_kept_with_ptrace() {
    all_threads_counted(&["--backend", "ptrace"]);
}

fn all_threads_counted(backend: &[&str]) {
    setup();
    let dir = TempDir::new("threads");
    let threads = build_fixture(&dir, "threads");

    let launch = record_launch_with(&dir, backend, &[&threads]);

    assert_eq!(
        launch.finished.status.code(),
        Some(0),
        "the tracer should exit with the fixture's status 0\n{}",
        launch.finished.describe()
    );
    let stdout = &launch.finished.stdout;
    let expected = Usage {
        live_bytes: field(stdout, "kept_bytes"),
        live_allocs: field(stdout, "kept_count"),
        alloc_bytes: field(stdout, "alloc_bytes"),
        allocs: field(stdout, "allocs"),
    };
    assert_eq!(
        expected.allocs,
        4 * 50_000,
        "the fixture's own count of its mallocs"
    );

    let report = &launch.report;
    let got = usage_by_caller(report, "thread_worker");
    let worker = |s: &serde_json::Value| frame_function(s, 1) == Some("thread_worker");
    assert_eq!(
        got,
        expected,
        "{}: stacks with frame 1 == thread_worker (Usage = live_bytes, live_allocs, alloc_bytes, \
         allocs): expected what the fixture printed ({stdout:?}), got the sum of\n{}\n{}",
        backend.join(" "),
        describe_stacks(report, worker),
        describe_top(report, 10)
    );
    let not_malloc: Vec<_> = support::stacks(report)
        .iter()
        .filter(|s| worker(s) && frame_function(s, 0) != Some("malloc"))
        .map(|s| frame_function(s, 0))
        .collect();
    assert!(
        not_malloc.is_empty(),
        "thread_worker only calls malloc, but frame 0 of some of its stacks is {not_malloc:?}"
    );
}

/// What fixtures/leader_exit.c's worker keeps per SIGUSR1.
const WORKER_KEEPS: (u64, u64) = (10 * 3000, 10);

fn kept_by_worker(report: &serde_json::Value) -> (u64, u64) {
    let u = usage_by_caller(report, "keep_in_worker");
    (u.live_bytes, u.live_allocs)
}

/// The leader_exit fixture, its main thread already gone (a zombie in /proc) while a worker
/// runs on.
fn leader_already_exited(dir: &TempDir) -> Proc {
    let bin = build_fixture(dir, "leader_exit");
    let mut fixture = Proc::spawn("leader_exit now", Command::new(&bin).arg("now"));
    fixture.expect_stdout_line("ready", LINE_TIMEOUT);
    let pid = fixture.pid();
    eventually(Duration::from_secs(10), || match proc_state(pid) {
        Some('Z') => Ok(()),
        state => Err(format!("main thread state {state:?}")),
    })
    .unwrap_or_else(|why| panic!("the fixture's main thread did not exit: {why}"));
    fixture
}

/// A process whose main thread called pthread_exit while another thread runs on is alive,
/// not a zombie; both backends need that thread, so the tracer refuses it, saying why.
#[test]
fn a_process_whose_main_thread_exited_is_refused_in_one_line_and_left_running() {
    setup();
    let dir = TempDir::new("leader-exited");
    let mut fixture = leader_already_exited(&dir);
    let pid = fixture.pid();

    // Both backends are tied to the main thread (uprobe-multi links are checked against
    // its memory; ptrace refuses it): the refusal must say so, not call the process a zombie.
    let finished = run_tracer(&["record", "--pid", &pid.to_string(), "--duration", "1s"], EXIT_TIMEOUT);
    let lines: Vec<&str> = finished.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(finished.status.code(), Some(2), "{}", finished.describe());
    assert_eq!(lines.len(), 1, "one line expected\n{}", finished.describe());
    assert!(lines[0].contains("pthread_exit") && !lines[0].contains("zombie"), "{}", finished.describe());
    fixture.signal(libc::SIGUSR1);
    fixture.expect_stdout_line("allocated", LINE_TIMEOUT);
    fixture.signal(libc::SIGUSR2);
    fixture.expect_stdout_line("ok", LINE_TIMEOUT);
    let status = fixture.wait_exit(EXIT_TIMEOUT);
    assert_eq!(status.code(), Some(0), "the fixture should run on and exit 0 after the refusal");
}

/// The main thread exits while the tracer records. The kernel drops the eBPF uprobes with
/// the thread they were opened on, so recording cannot go on unseen: it ends at once, with the
/// report of what was seen and one line saying why, not as if the process had exited.
#[test]
fn the_main_thread_exiting_while_recorded_ends_the_recording_saying_why() {
    main_thread_exits_while_recorded(&[], true);
}

/// Sampling's uprobe-multi links are checked against the main thread too (measured: samples
/// stopped the moment it exited).
#[test]
fn the_main_thread_exiting_while_recorded_with_sampling_ends_the_recording_saying_why() {
    main_thread_exits_while_recorded(&["--sample-bytes", "4KiB"], false);
}

/// `exact`: the worker's blocks are counted exactly (not sampled).
fn main_thread_exits_while_recorded(extra: &[&str], exact: bool) {
    setup();
    let dir = TempDir::new("leader-exits");
    let bin = build_fixture(&dir, "leader_exit");
    let mut fixture = Proc::spawn("leader_exit later", Command::new(&bin).arg("later"));
    fixture.expect_stdout_line("ready", LINE_TIMEOUT);
    let pid = fixture.pid();

    let mut args = vec!["--format", "json", "--top", "0", "--backend", "ebpf"];
    args.extend(extra);
    let mut tracer = start_recording(pid, &args);
    fixture.signal(libc::SIGUSR1);
    fixture.expect_stdout_line("allocated", LINE_TIMEOUT);
    fixture.signal(libc::SIGHUP);
    fixture.expect_stdout_line("leaving", LINE_TIMEOUT);
    let finished = tracer.finish(EXIT_TIMEOUT);
    assert_eq!(finished.status.code(), Some(0), "{}", finished.describe());
    let report = parse_report(&finished.stdout, &finished);
    if exact {
        assert_eq!(
            kept_by_worker(&report),
            WORKER_KEEPS,
            "what the worker kept before the main thread exited\n{}",
            describe_top(&report, 5)
        );
    }
    let said = format!(
        "tracer: thread {pid} of pid {pid} exited while other threads run on; the kernel removes \
         uprobes with the thread they were opened on, so recording ends here (attach again to go on)"
    );
    assert!(
        finished.stderr.lines().any(|l| l == said),
        "the tracer should say {said:?}\n{}",
        finished.describe()
    );
    assert!(fixture.running(), "the worker should run on");
    fixture.signal(libc::SIGUSR2);
    fixture.expect_stdout_line("ok", LINE_TIMEOUT);
}

#[test]
fn sampling_refuses_a_process_whose_main_thread_exited() {
    setup();
    let dir = TempDir::new("leader-exited-sampling");
    let mut fixture = leader_already_exited(&dir);
    let pid = fixture.pid();
    let args = ["record", "--sample-bytes", "4KiB", "--duration", "1s", "--pid", &pid.to_string()];
    let finished = run_tracer(&args, EXIT_TIMEOUT);
    let lines: Vec<&str> = finished.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        finished.status.code() == Some(2)
            && lines.len() == 1
            && lines[0].contains("main thread of pid")
            && lines[0].contains("pthread_exit"),
        "sampling would record nothing here (its probes are checked against the exited main \
         thread): expected one line saying so and exit status 2\n{}",
        finished.describe()
    );
    assert!(fixture.running(), "the fixture should run on");
}
