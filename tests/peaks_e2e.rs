//! Peaks: per stack, the most live bytes it held at any moment (exact, kept with the live
//! figures), and in the totals the most live malloc bytes seen at once (sampled).

mod support;

use serde_json::Value;
use support::{
    TempDir, build_fixture, describe_top, fixtures_dir, frame_function, num, record_launch_ok,
    setup, stacks,
};

const NODE: &str = "/usr/bin/node";
const MIB: u64 = 1024 * 1024;

fn stack_of<'a>(report: &'a Value, caller: &str) -> &'a Value {
    let found: Vec<&Value> =
        stacks(report).iter().filter(|s| frame_function(s, 1) == Some(caller)).collect();
    assert_eq!(found.len(), 1, "one stack should have {caller} as the caller\n{}", describe_top(report, 8));
    found[0]
}

fn exact_peaks(backend: &[&str]) {
    setup();
    let dir = TempDir::new(&format!("peaks{}", backend.len()));
    let fixture = build_fixture(&dir, "peaks");
    let hold = "300";
    let report = record_launch_ok(&dir, backend, &[fixture.to_str().unwrap(), hold]).report;
    let grab = stack_of(&report, "grab");
    assert_eq!(
        (num(grab, "peak_bytes"), num(grab, "live_bytes"), num(grab, "alloc_bytes")),
        (10_000, 5000, 15_000),
        "grab() held 10 x 1000 bytes, freed them, then 5 x 1000 (backend {backend:?})\n{}",
        describe_top(&report, 5)
    );
    let totals = &report["totals"];
    let (peak, live) = (num(totals, "peak_live_bytes"), num(totals, "live_bytes"));
    assert!(
        peak >= 10_000 && peak >= live,
        "the program held 10000 bytes for {hold} ms: totals.peak_live_bytes {peak} should be at \
         least that and at least the {live} live at the end (backend {backend:?})"
    );
    assert_eq!(totals["dropped"]["peak_contended"].as_u64(), Some(0), "{totals}");
}

#[test]
fn peaks_are_exact_per_stack() {
    exact_peaks(&[]);
}

#[test]
fn peaks_are_exact_per_stack_with_ptrace() {
    exact_peaks(&["--backend", "ptrace"]);
}

#[test]
fn node_buffers_held_then_collected_rank_first_by_peak() {
    setup();
    let dir = TempDir::new("peaks_node");
    let script = fixtures_dir().join("peak_buffers.js");
    // Without the optimizing tiers: see the fixture.
    let node = [NODE, "--expose-gc", "--no-opt", "--no-sparkplug", script.to_str().unwrap()];
    let launch = record_launch_ok(&dir, &[], &node);
    let report = &launch.report;
    let stdout = &launch.finished.stdout;
    let after: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("after "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("the script printed no `after` line: {stdout}"));
    // Near 0: the script waits for the collector until at most 2 of its 38 MiB are left.
    assert!(after <= 2 * MIB, "the script's Buffers were not collected ({after} bytes left)");

    let mut by_peak: Vec<&Value> = stacks(report).iter().collect();
    by_peak.sort_by_key(|s| std::cmp::Reverse(num(s, "peak_bytes")));
    let first = by_peak[0];
    let held = 38 * MIB;
    assert!(
        frame_function(first, 1)
            .is_some_and(|f| f.starts_with("node::NodeArrayBufferAllocator::Allocate"))
            && num(first, "peak_bytes") >= held
            && num(first, "live_bytes") <= 2 * MIB,
        "the stack that held the 38 Buffers of 1 MiB should come first by peak_bytes, with a \
         peak of at least {held} and (collected) at most 2 MiB live\n{}",
        by_peak
            .iter()
            .take(3)
            .map(|s| format!(
                "peak {} live {} caller {:?}",
                num(s, "peak_bytes"),
                num(s, "live_bytes"),
                frame_function(s, 1)
            ))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let peak = num(&report["totals"], "peak_live_bytes");
    assert!(peak >= held, "totals.peak_live_bytes {peak} < the {held} bytes the script held");
}
