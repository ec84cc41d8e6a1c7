//! One rule for what a stack is: kernel stacks that are one code path become one stack in the
//! report, with `variants` saying how many were merged and their figures summed exactly.

mod support;

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;
use support::{
    EXIT_TIMEOUT, TempDir, build_fixture, describe_stacks, describe_top, fixtures_dir,
    frame_function, num, record_launch_ok, run_tracer, setup, show_args, stacks,
};

const NODE: &str = "/usr/bin/node";

/// tests/fixtures/one_line.c: 7 blocks of 1000 B and 5 of 3000 B from two calls on one line.
const ONE_LINE_BYTES: u64 = 7 * 1000 + 5 * 3000;
const ONE_LINE_BLOCKS: u64 = 12;

#[test]
fn two_call_sites_on_one_line_are_one_stack_with_the_summed_bytes() {
    setup();
    let dir = TempDir::new("merge-one-line");
    let program = build_fixture(&dir, "one_line");
    let launch = record_launch_ok(&dir, &[], &[&program]);
    let report = &launch.report;
    let by_pick = |s: &Value| frame_function(s, 1) == Some("pick");
    let picked: Vec<&Value> = stacks(report).iter().filter(|s| by_pick(s)).collect();
    assert_eq!(
        picked.len(),
        1,
        "pick's two malloc calls on one line should make one stack:\n{}",
        describe_stacks(report, by_pick)
    );
    let s = picked[0];
    assert_eq!(
        num(s, "variants"),
        2,
        "the kernel saw two stacks (two call instructions): variants should say so\n{s}"
    );
    assert_eq!(
        (num(s, "live_bytes"), num(s, "live_allocs"), num(s, "alloc_bytes"), num(s, "allocs")),
        (ONE_LINE_BYTES, ONE_LINE_BLOCKS, ONE_LINE_BYTES, ONE_LINE_BLOCKS),
        "(live bytes, live blocks, allocated bytes, allocations) of the merged stack\n{s}"
    );
    assert_eq!(report.get("metric").and_then(Value::as_str), Some("held"), "default metric");
    assert_eq!(
        num(report, "stacks_total"),
        stacks(report).len() as u64,
        "--top 0: stacks_total counts the merged stacks"
    );
}

/// The frames of each stack as the text report prints them (the lines under each `#N`).
fn printed_stacks(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') {
            out.push((line.to_owned(), Vec::new()));
        } else if let (Some(last), Some(frame)) = (out.last_mut(), line.strip_prefix("      ")) {
            if !frame.starts_with("growth ") {
                last.1.push(frame.to_owned());
            }
        }
    }
    out
}

#[test]
fn a_node_function_run_in_two_tiers_merges_its_copies_and_no_two_stacks_print_alike() {
    setup();
    assert!(Path::new(NODE).is_file(), "{NODE} is missing; these tests expect node 20 there");
    let dir = TempDir::new("merge-node-tiers");
    let script = fixtures_dir().join("tiers.js");
    let json = dir.join("top.json");
    // Frame pointers and the perf map: JIT copies are then distinct kernel stacks, which the
    // report must merge. (With the default walker, V8 frames are keyed by their function's
    // identity and the copies share one kernel stack: tests/js_names_e2e.rs.)
    let args = [
        "record".as_ref(),
        "--unwind".as_ref(),
        "fp".as_ref(),
        "--top".as_ref(),
        "0".as_ref(),
        "--format".as_ref(),
        "json".as_ref(),
        "-o".as_ref(),
        json.as_os_str(),
        "--".as_ref(),
        NODE.as_ref(),
        "--allow-natives-syntax".as_ref(),
        script.as_os_str(),
    ];
    let finished = run_tracer(&args, EXIT_TIMEOUT);
    assert_eq!(
        finished.status.code(),
        Some(0),
        "`tracer {}` should exit with node's status 0\n{}",
        show_args(&args),
        finished.describe()
    );
    let text = std::fs::read_to_string(&json).expect("the report was written");
    let report: Value = serde_json::from_str(&text).expect("a JSON report");
    let all = stacks(&report);
    assert_eq!(
        num(&report, "stacks_total"),
        all.len() as u64,
        "--top 0: every merged stack\n{}",
        describe_top(&report, 10)
    );

    // The script's function: every 64 KiB backing store through it is in merged stacks.
    let through = |s: &Value| {
        s["frames"].as_array().is_some_and(|frames| {
            frames.iter().any(|f| f["function"].as_str() == Some("keepBuffers"))
        }) && num(s, "live_bytes") >= 65536
    };
    let kept: Vec<&Value> = all.iter().filter(|s| through(s)).collect();
    let live: u64 = kept.iter().map(|s| num(s, "live_bytes")).sum();
    assert_eq!(
        live,
        48 * 65536,
        "the stacks through keepBuffers should hold its 48 Buffers of 64 KiB exactly:\n{}",
        describe_stacks(&report, through)
    );
    let most = kept.iter().map(|s| num(s, "variants")).max().unwrap_or(0);
    assert!(
        most >= 2,
        "keepBuffers's Buffers come from JIT code at several addresses: some stack through it \
         should merge two kernel stacks or more (variants {most}):\n{}",
        describe_stacks(&report, through)
    );

    // What a user reads: the text report of the same stacks, every one of them (the top 20
    // of the default report are its first 20).
    let rendered = run_tracer(&["report".as_ref(), json.as_os_str()], EXIT_TIMEOUT);
    assert!(rendered.status.success(), "tracer report failed\n{}", rendered.describe());
    let printed = printed_stacks(&rendered.stdout);
    assert_eq!(printed.len(), all.len(), "one text block per stack");
    let mut seen: HashMap<(bool, bool, &Vec<String>), &str> = HashMap::new();
    for (header, frames) in &printed {
        let source = (header.contains("[mmap]"), header.contains("[brk]"));
        if let Some(first) = seen.insert((source.0, source.1, frames), header) {
            panic!(
                "two stacks of the report print the same frames:\n{first}\n{header}\n{}",
                frames.join("\n")
            );
        }
    }
}
