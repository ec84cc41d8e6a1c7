//! A node process: Buffers must be attributed to node's ArrayBuffer allocator, the function that
//! called calloc, which a plain frame-pointer walk from calloc's entry would skip.

mod support;

use std::ffi::OsString;
use std::path::Path;

use serde_json::Value;
use support::{
    EXIT_TIMEOUT, describe_stacks, describe_top, fixtures_dir, frame_function, num, parse_report,
    run_tracer, setup, stacks,
};

const NODE: &str = "/usr/bin/node";
const ALLOCATOR: &str = "node::NodeArrayBufferAllocator::Allocate";
const RETAINED: u64 = 32 * 1024 * 1024;

#[test]
fn node_buffers_are_attributed_to_the_array_buffer_allocator() {
    setup();
    assert!(
        Path::new(NODE).is_file(),
        "{NODE} is missing; these tests expect node 20 there"
    );
    let script = fixtures_dir().join("buffers.js");
    // All stacks: the buffers' backing stores come through a few JavaScript paths (the
    // interpreter's, then optimized code's), each its own stack.
    let mut args: Vec<OsString> = ["record", "--top", "0", "--format", "json", "--", NODE]
        .iter()
        .map(OsString::from)
        .collect();
    args.push(script.into_os_string());

    let finished = run_tracer(&args, EXIT_TIMEOUT);

    assert_eq!(
        finished.status.code(),
        Some(0),
        "the tracer should exit with node's status 0\n{}",
        finished.describe()
    );
    let report = parse_report(&finished.stdout, &finished);
    let all = stacks(&report);
    assert_eq!(
        all.len() as u64,
        num(&report, "stacks_total"),
        "--top 0 should give every stack\n{}",
        describe_top(&report, 10)
    );
    let top = all
        .iter()
        .max_by_key(|s| num(s, "live_bytes"))
        .expect("not empty");
    assert!(
        frame_function(top, 1).is_some_and(|f| f.contains(ALLOCATOR)),
        "the stack with the most live bytes should have frame 1 {ALLOCATOR}, got {:?}\n{}",
        frame_function(top, 1),
        describe_top(&report, 5)
    );
    let by_allocator = |s: &Value| frame_function(s, 1).is_some_and(|f| f.contains(ALLOCATOR));
    let live: u64 = all
        .iter()
        .filter(|s| by_allocator(s))
        .map(|s| num(s, "live_bytes"))
        .sum();
    assert!(
        live >= RETAINED,
        "stacks with frame 1 {ALLOCATOR} should hold at least the {RETAINED} bytes of the 32 \
         retained Buffers, got {live}:\n{}",
        describe_stacks(&report, by_allocator)
    );
}
