//! --min-age while the target frees at full speed: the live table shrinks and grows under the
//! read, and the kept blocks must be counted exactly once each (a walk by "next key"
//! restarts from the first entry when the key it stands on is freed, and counted them again).

mod support;

use std::{process::Command, thread::sleep, time::Duration};

use support::{
    LINE_TIMEOUT, Proc, TempDir, build_fixture, describe_top, setup, start_recording,
    stop_recording, usage_by_caller,
};

#[test]
fn min_age_counts_kept_blocks_once_while_the_target_frees_at_full_speed() {
    setup();
    let dir = TempDir::new("min_age_churn");
    let fixture = build_fixture(&dir, "churn");
    let mut target = Proc::spawn("churn", &mut Command::new(&fixture));
    target.expect_stdout_line("ready", LINE_TIMEOUT);
    let mut tracer =
        start_recording(target.pid(), &["--min-age", "300ms", "--top", "0", "--format", "json"]);
    target.signal(libc::SIGUSR1);
    target.expect_stdout_line("kept", LINE_TIMEOUT);
    // The kept blocks age past --min-age while the churn goes on.
    sleep(Duration::from_millis(1500));
    let (_, report) = stop_recording(&mut tracer);
    target.signal(libc::SIGKILL);

    let kept = usage_by_caller(&report, "keep_blocks");
    assert_eq!(
        (kept.live_bytes, kept.live_allocs),
        (1_000_000, 1000),
        "keep_blocks holds 1000 x 1000 bytes, older than --min-age, while two threads free \
         and allocate other blocks\n{}",
        describe_top(&report, 5)
    );
    let churn = usage_by_caller(&report, "churn");
    assert!(churn.allocs > 10_000, "the churn threads hardly ran: {churn:?}");
}
