//! Allocations from every thread of the target count: four threads malloc and free at the same
//! time, and the live numbers must equal exactly what the threads say they kept.

mod support;

use std::process::Command;
use std::time::Duration;

use support::{
    EXIT_TIMEOUT, LINE_TIMEOUT, Proc, TempDir, Usage, build_fixture, describe_stacks,
    describe_top, eventually, frame_function, proc_state, record_launch_with,
    run_tracer, setup, start_recording, stop_recording, usage_by_caller,
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

/// Signals the worker `rounds` times, waiting for each round's "allocated".
fn worker_allocates(fixture: &mut Proc, rounds: u64) {
    for _ in 0..rounds {
        fixture.signal(libc::SIGUSR1);
        fixture.expect_stdout_line("allocated", LINE_TIMEOUT);
    }
}

/// Ends the fixture: the worker prints "ok" and the process exits 0.
fn fixture_ends_well(mut fixture: Proc) {
    fixture.signal(libc::SIGUSR2);
    fixture.expect_stdout_line("ok", LINE_TIMEOUT);
    let status = fixture.wait_exit(EXIT_TIMEOUT);
    assert_eq!(status.code(), Some(0), "the fixture should run on and exit 0 after the tracer");
}

/// A process whose main thread called pthread_exit while another thread runs on is alive,
/// not a zombie: the eBPF backend traces its other threads exactly (the uprobe-multi links
/// are tied to the exited main thread, so the tracer anchors them on a live one).
#[test]
fn a_process_whose_main_thread_exited_is_traced_exactly() {
    setup();
    let dir = TempDir::new("leader-exited");
    let mut fixture = leader_already_exited(&dir);
    let pid = fixture.pid();

    let mut tracer = start_recording(pid, &["--format", "json", "--top", "0"]);
    worker_allocates(&mut fixture, 3);
    let (_, report) = stop_recording(&mut tracer);
    assert_eq!(
        kept_by_worker(&report),
        (3 * WORKER_KEEPS.0, 3 * WORKER_KEEPS.1),
        "what the worker kept in three rounds after the main thread had exited\n{}",
        describe_top(&report, 5)
    );
    fixture_ends_well(fixture);
}

/// The ptrace backend cannot seize an exited main thread: it refuses in one line that says
/// why, not calling the process a zombie, and leaves it running.
#[test]
fn ptrace_refuses_a_process_whose_main_thread_exited_in_one_line() {
    setup();
    let dir = TempDir::new("leader-exited-ptrace");
    let mut fixture = leader_already_exited(&dir);
    let pid = fixture.pid();
    let args = ["record", "--backend", "ptrace", "--pid", &pid.to_string(), "--duration", "1s"];
    let finished = run_tracer(&args, EXIT_TIMEOUT);
    let lines: Vec<&str> = finished.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(finished.status.code(), Some(2), "{}", finished.describe());
    assert_eq!(lines.len(), 1, "one line expected\n{}", finished.describe());
    assert!(lines[0].contains("pthread_exit") && !lines[0].contains("zombie"), "{}", finished.describe());
    worker_allocates(&mut fixture, 1);
    fixture_ends_well(fixture);
}

/// The main thread exits while the tracer records: recording goes on, and what the worker
/// keeps before and after is counted exactly.
#[test]
fn the_main_thread_exiting_while_recorded_leaves_the_recording_going() {
    setup();
    let dir = TempDir::new("leader-exits");
    let bin = build_fixture(&dir, "leader_exit");
    let mut fixture = Proc::spawn("leader_exit later", Command::new(&bin).arg("later"));
    fixture.expect_stdout_line("ready", LINE_TIMEOUT);
    let pid = fixture.pid();

    let mut tracer = start_recording(pid, &["--format", "json", "--top", "0", "--backend", "ebpf"]);
    worker_allocates(&mut fixture, 1);
    fixture.signal(libc::SIGHUP);
    fixture.expect_stdout_line("leaving", LINE_TIMEOUT);
    eventually(Duration::from_secs(10), || match proc_state(pid) {
        Some('Z') => Ok(()),
        state => Err(format!("main thread state {state:?}")),
    })
    .unwrap_or_else(|why| panic!("the fixture's main thread did not exit: {why}"));
    worker_allocates(&mut fixture, 2);
    let (_, report) = stop_recording(&mut tracer);
    assert_eq!(
        kept_by_worker(&report),
        (3 * WORKER_KEEPS.0, 3 * WORKER_KEEPS.1),
        "what the worker kept, one round before the main thread exited and two after\n{}",
        describe_top(&report, 5)
    );
    fixture_ends_well(fixture);
}

/// Sampling too: every allocation here comes after the main thread exited, and the estimate
/// is within the sampler's bounds.
#[test]
fn sampling_traces_a_process_whose_main_thread_exited() {
    setup();
    let dir = TempDir::new("leader-exited-sampling");
    let mut fixture = leader_already_exited(&dir);
    let pid = fixture.pid();
    let mut tracer = start_recording(pid, &["--format", "json", "--top", "0", "--sample-bytes", "4KiB"]);
    let rounds = 10;
    worker_allocates(&mut fixture, rounds);
    let (_, report) = stop_recording(&mut tracer);
    // 300,000 bytes at one sample per 4 KiB on average: ~73 samples, so the estimate's
    // relative standard deviation is ~12%; +-50% is four of them.
    let truth = rounds * WORKER_KEEPS.0;
    let (estimate, _) = kept_by_worker(&report);
    assert!(
        estimate as f64 > truth as f64 * 0.5 && (estimate as f64) < truth as f64 * 1.5,
        "sampled estimate of the worker's {truth} live bytes: {estimate}\n{}",
        describe_top(&report, 5)
    );
    fixture_ends_well(fixture);
}
