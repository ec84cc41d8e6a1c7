//! Two different stacks under one key must not be merged: with the kernel's stack hash
//! narrowed to one bit (a test-only environment variable), every stack after the first
//! shares its key; each is checked frame by frame, counted as a collision and kept under the
//! lost-stack key, so every named stack still holds exactly its own blocks.

mod support;

use std::process::Command;

use serde_json::Value;
use support::{TempDir, build_fixture, describe_top, frame_function, num, setup, stacks, tracer_bin};

#[test]
fn stacks_sharing_a_key_are_counted_as_collisions_not_merged() {
    setup();
    let dir = TempDir::new("collision");
    let fixture = build_fixture(&dir, "collide");
    let out = Command::new(tracer_bin())
        .args(["record", "--top", "0", "--format", "json", "--"])
        .arg(&fixture)
        .env("TRACER_TEST_STACK_HASH_BITS", "1")
        .output()
        .expect("run tracer");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tracer failed: {stderr}");
    assert!(stderr.contains("stack keys narrowed"), "no word of the narrowed keys: {stderr}");
    let text = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("report is not JSON ({e}): {text}\n{stderr}"));

    let expected = [("one", 100u64, 1u64), ("two", 400, 2), ("three", 900, 3)];
    let mut named = 0;
    for (caller, bytes, allocs) in expected {
        let found: Vec<&Value> =
            stacks(&report).iter().filter(|s| frame_function(s, 1) == Some(caller)).collect();
        for s in &found {
            named += 1;
            assert_eq!(
                (num(s, "alloc_bytes"), num(s, "allocs")),
                (bytes, allocs),
                "the stack named after {caller} holds other callers' blocks: merged\n{}",
                describe_top(&report, 8)
            );
        }
    }
    assert!(named <= 1, "one key, so at most one named stack\n{}", describe_top(&report, 8));
    let lost: Vec<&Value> = stacks(&report)
        .iter()
        .filter(|s| s["frames"].as_array().is_some_and(Vec::is_empty) && s["source"] == "malloc")
        .collect();
    let lost_allocs: u64 = lost.iter().map(|s| num(s, "allocs")).sum();
    let collisions = report["totals"]["dropped"]["stack_collision"].as_u64().unwrap_or(0);
    // The mmap-family syscalls' stacks share the keys too, and collide as well.
    let named_allocs: u64 = stacks(&report)
        .iter()
        .filter(|s| ["one", "two", "three"].iter().any(|c| frame_function(s, 1) == Some(c)))
        .map(|s| num(s, "allocs"))
        .sum();
    assert!(
        collisions > 0 && lost_allocs <= collisions && lost_allocs + named_allocs == 6,
        "every malloc whose stack met another under its key is a collision, counted under the \
         lost stack: {collisions} collisions, {lost_allocs} lost and {named_allocs} named of 6 \
         allocations\n{}",
        describe_top(&report, 8)
    );
}
