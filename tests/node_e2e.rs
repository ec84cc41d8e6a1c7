//! A node process: Buffers must be attributed to node's ArrayBuffer allocator, the function that
//! called calloc, which a plain frame-pointer walk from calloc's entry would skip; and what the
//! tracer finds under that allocator must be exactly what node itself counts.

mod support;

use std::ffi::OsStr;
use std::path::Path;

use serde_json::Value;
use support::{
    TempDir, Usage, describe_stacks, describe_top, fixtures_dir, frame_function, num,
    record_launch_ok, setup, stacks, usage_where,
};

const NODE: &str = "/usr/bin/node";
const ALLOCATOR: &str = "node::NodeArrayBufferAllocator::";
const ALLOCATE: &str = "node::NodeArrayBufferAllocator::Allocate(";
/// The JavaScript function of fixtures/buffers.js that keeps the Buffers (named in stacks
/// through node's perf map, which `tracer record -- node` turns on).
const KEEPER: &str = "keepBuffers";

fn any_frame_named(stack: &Value, name: &str) -> bool {
    stack["frames"]
        .as_array()
        .is_some_and(|frames| frames.iter().any(|f| f["function"].as_str() == Some(name)))
}

#[test]
fn node_buffers_are_attributed_to_the_array_buffer_allocator() {
    setup();
    assert!(
        Path::new(NODE).is_file(),
        "{NODE} is missing; these tests expect node 20 there"
    );
    let dir = TempDir::new("node-buffers");
    let script = fixtures_dir().join("buffers.js");
    // All stacks: the buffers' backing stores come through a few JavaScript paths (the
    // interpreter's, then optimized code's), each its own stack.
    let launch = record_launch_ok(
        &dir,
        &[],
        &[OsStr::new(NODE), OsStr::new("--expose-gc"), script.as_os_str()],
    );
    let own: Value = launch
        .finished
        .stdout
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "the fixture printed no JSON line of node's own figures\n{}",
                launch.finished.describe()
            )
        });
    let (node_says, count, size) = (
        num(&own, "arrayBuffers"),
        num(&own, "buffers"),
        num(&own, "size"),
    );
    let report = &launch.report;
    let all = stacks(report);
    assert_eq!(
        all.len() as u64,
        num(report, "stacks_total"),
        "--top 0 should give every stack\n{}",
        describe_top(report, 10)
    );

    let top = all
        .iter()
        .max_by_key(|s| num(s, "live_bytes"))
        .expect("not empty");
    assert!(
        frame_function(top, 1).is_some_and(|f| f.starts_with(ALLOCATE)),
        "the stack with the most live bytes should have frame 1 {ALLOCATE}..., got {:?}\n{}",
        frame_function(top, 1),
        describe_top(report, 5)
    );

    // The fixture's own Buffers: exactly its 32 blocks of 1 MiB, calloc'd by Allocate under
    // keepBuffers.
    let kept = |s: &Value| {
        frame_function(s, 0) == Some("calloc")
            && frame_function(s, 1).is_some_and(|f| f.starts_with(ALLOCATE))
            && any_frame_named(s, KEEPER)
    };
    let got = usage_where(report, kept);
    assert_eq!(
        (got.live_bytes, got.live_allocs),
        (count * size, count),
        "stacks calloc <- {ALLOCATE}...) <- ... {KEEPER} should hold the fixture's {count} \
         Buffers of {size} bytes exactly\n{}",
        describe_stacks(report, kept)
    );

    // Everything under node's ArrayBuffer allocator, against node's own counter of what that
    // allocator holds (taken after a full GC, with nothing allocated until the exit): the same
    // blocks, so the same bytes.
    let by_allocator = |s: &Value| frame_function(s, 1).is_some_and(|f| f.starts_with(ALLOCATOR));
    let under: Usage = usage_where(report, by_allocator);
    assert_eq!(
        under.live_bytes,
        node_says,
        "stacks with frame 1 in {ALLOCATOR}* should hold exactly what node counts as \
         arrayBuffers ({own})\n{}",
        describe_stacks(report, by_allocator)
    );
    assert_eq!(
        report["allocator"]["node_array_buffer_bytes"].as_u64(),
        Some(node_says),
        "the report's allocator.node_array_buffer_bytes should be node's own arrayBuffers: {}",
        report["allocator"]
    );
}
