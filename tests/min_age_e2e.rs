//! --min-age: only blocks at least that old count as live, which separates a leak from a
//! working set. Allocation times come from the kernel's monotonic clock at each allocation.

mod support;

use support::{TempDir, build_fixture, describe_top, record_launch_ok, setup, usage_by_caller};

#[test]
fn min_age_counts_only_blocks_older_than_it() {
    setup();
    let dir = TempDir::new("min_age");
    let fixture = build_fixture(&dir, "ages");

    let plain = record_launch_ok(&dir, &[], &[&fixture]).report;
    let (old, new) = (usage_by_caller(&plain, "old_blocks"), usage_by_caller(&plain, "new_blocks"));
    assert_eq!((old.live_bytes, new.live_bytes), (10_000, 20_000), "{}", describe_top(&plain, 5));

    let launch = record_launch_ok(&dir, &["--min-age", "1s"], &[&fixture]).report;
    let (old, new) = (usage_by_caller(&launch, "old_blocks"), usage_by_caller(&launch, "new_blocks"));
    assert_eq!(
        (old.live_bytes, old.live_allocs, new.live_bytes, new.live_allocs),
        (10_000, 10, 0, 0),
        "with --min-age 1s only the blocks from 2 s before exit are live\n{}",
        describe_top(&launch, 5)
    );
    // Allocated totals do not depend on age.
    assert_eq!((new.alloc_bytes, new.allocs), (20_000, 10));
    assert_eq!(launch["min_age_ms"].as_u64(), Some(1000));
}
