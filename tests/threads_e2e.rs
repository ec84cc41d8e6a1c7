//! Allocations from every thread of the target count: four threads malloc and free at the same
//! time, and the live numbers must equal exactly what the threads say they kept.

mod support;

use support::{
    TempDir, Usage, build_fixture, describe_stacks, describe_top, frame_function,
    record_launch_with, setup, usage_by_caller,
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
