//! A call whose return never comes (a signal handler longjmps out of calloc) must not leave
//! its thread silenced: the next allocator call from the frame it returned to finds the
//! recorded call stale, counts it, and is recorded itself.

mod support;

use support::{TempDir, build_fixture, describe_top, record_launch_ok, setup, usage_by_caller};

#[test]
fn a_call_left_by_longjmp_does_not_silence_its_thread() {
    setup();
    let dir = TempDir::new("stale_pending");
    let fixture = build_fixture(&dir, "escapes");
    let launch = record_launch_ok(&dir, &[], &[&fixture]);
    let stdout = &launch.finished.stdout;
    let escapes: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("escapes "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("the fixture printed no `escapes` line: {stdout:?}"));
    assert!(
        escapes > 0,
        "no signal landed inside calloc in 5 tries, so nothing was left pending and this test \
         proves nothing; the fixture's timing needs a look"
    );
    let report = &launch.report;
    let after = usage_by_caller(report, "kept_after");
    assert_eq!(
        (after.live_bytes, after.live_allocs),
        (10_000, 10),
        "kept_after's 10 x 1000 bytes come after {escapes} calls left by longjmp\n{}",
        describe_top(report, 5)
    );
    // Each escape is found stale by the thread's next call from main.
    assert_eq!(
        report["totals"]["dropped"]["stale_pending"].as_u64(),
        Some(escapes),
        "{}",
        report["totals"]
    );
}
