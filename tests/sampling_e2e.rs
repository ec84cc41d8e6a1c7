//! Sampling mode (`--sample-bytes`): per-caller estimates of live bytes against the exact
//! numbers of fixtures/sampled.c, on real BPF, over repeated runs; exact zeros where every
//! sampled block was freed; and bad values refused.
//!
//! The tolerance is statistical. Before asserting, the test computes from the fixture's own
//! output a Chernoff bound on the chance that an estimate misses by more than the tolerance
//! (each block is sampled independently with p = 1 - exp(-size/mean) and weighs size/p), and
//! insists that the bound over every caller and run stays below `MAX_FALSE_FAILURE`: a
//! failure here is a bug, not bad luck.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::{
    EXIT_TIMEOUT, LINE_TIMEOUT, Proc, TempDir, build_fixture, describe_stacks, describe_top,
    eventually, frame_function, hex, libc_symbol, num, run_tracer, setup, show_args,
    start_recording, stop_recording, usage_by_caller, usage_where,
};

const SAMPLE_BYTES: u64 = 512 * 1024;
/// Recordings of the fixture, each checked on its own.
const RUNS: usize = 3;
/// Largest relative error allowed for a caller's estimated live bytes.
const TOLERANCE: f64 = 0.10;
/// Callers holding at least this share of the fixture's live bytes are checked.
const MIN_SHARE: f64 = 0.05;
/// The test must be sized so that it fails by chance less often than this, in all.
const MAX_FALSE_FAILURE: f64 = 1e-6;

/// What the fixture printed: the blocks each caller keeps, and the callers that free all.
struct FixtureOutput {
    kept: Vec<(String, Vec<(u64, u64)>)>,
    churn: Vec<String>,
}

fn parse_fixture_output(stdout: &str) -> FixtureOutput {
    let mut out = FixtureOutput {
        kept: Vec::new(),
        churn: Vec::new(),
    };
    let mut done = false;
    for line in stdout.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("caller") => {
                let name = words
                    .next()
                    .expect("caller line names the caller")
                    .to_owned();
                let mix = words
                    .map(|w| {
                        let (size, count) = w.split_once('x').expect("SIZExCOUNT");
                        (
                            size.parse().expect("size is a number"),
                            count.parse().expect("count is a number"),
                        )
                    })
                    .collect();
                out.kept.push((name, mix));
            }
            Some("churn") => out.churn.push(
                words
                    .next()
                    .expect("churn line names the caller")
                    .to_owned(),
            ),
            Some("done") => done = true,
            _ => {}
        }
    }
    assert!(
        done && !out.kept.is_empty(),
        "the sampled fixture did not finish its output:\n{stdout}"
    );
    out
}

/// Chernoff bound on P(|X - B| >= tol * B), where X = sum of I_i * s_i / p_i over the blocks
/// (I_i independent, P(I_i = 1) = p_i = 1 - exp(-s_i / mean)) and B = sum of s_i.
fn false_failure_bound(mix: &[(u64, u64)], mean: f64, tol: f64) -> f64 {
    let terms: Vec<(f64, f64, f64)> = mix
        .iter()
        .map(|&(s, c)| (s as f64, -(-(s as f64) / mean).exp_m1(), c as f64))
        .collect();
    let total: f64 = terms.iter().map(|(s, _, c)| s * c).sum();
    let t = tol * total;
    let mut bound = 0.0;
    for sign in [1.0, -1.0] {
        // log E[exp(sign * lam * (X - B))] - lam * t: convex in lam, so a ternary search
        // finds its minimum.
        let exponent = |lam: f64| {
            terms
                .iter()
                .map(|&(s, p, c)| {
                    let (hit, miss) = (sign * lam * (s / p - s), -sign * lam * s);
                    let m = hit.max(miss);
                    c * (m + (p * (hit - m).exp() + (1.0 - p) * (miss - m).exp()).ln())
                })
                .sum::<f64>()
                - lam * t
        };
        let (mut lo, mut hi) = (0.0, 64.0 / mean);
        for _ in 0..200 {
            let (a, b) = (lo + (hi - lo) / 3.0, hi - (hi - lo) / 3.0);
            if exponent(a) < exponent(b) {
                hi = b;
            } else {
                lo = a;
            }
        }
        bound += exponent((lo + hi) / 2.0).exp().min(1.0);
    }
    bound
}

fn record_sampled(dir: &TempDir, fixture: &std::path::Path) -> (support::Finished, Value) {
    let launch = support::record_launch_ok(dir, &["--sample-bytes", "512KiB"], &[fixture]);
    (launch.finished, launch.report)
}

#[test]
fn sampled_estimates_of_live_bytes_are_within_ten_percent_for_every_large_caller() {
    setup();
    let dir = TempDir::new("sampling");
    let fixture = build_fixture(&dir, "sampled");
    let mut bound_checked = false;

    for run in 1..=RUNS {
        let (finished, report) = record_sampled(&dir, &fixture);
        let out = parse_fixture_output(&finished.stdout);
        let total: u64 = out
            .kept
            .iter()
            .flat_map(|(_, mix)| mix.iter().map(|(s, c)| s * c))
            .sum();
        let checked: Vec<&(String, Vec<(u64, u64)>)> = out
            .kept
            .iter()
            .filter(|(_, mix)| {
                mix.iter().map(|(s, c)| s * c).sum::<u64>() as f64 >= MIN_SHARE * total as f64
            })
            .collect();
        assert_eq!(
            checked.len(),
            out.kept.len(),
            "every caller of the fixture should hold at least {MIN_SHARE} of its live bytes"
        );

        if !bound_checked {
            let per_run: f64 = checked
                .iter()
                .map(|(_, mix)| false_failure_bound(mix, SAMPLE_BYTES as f64, TOLERANCE))
                .sum();
            let bound = per_run * RUNS as f64;
            eprintln!(
                "sampling_e2e: chance of a false failure over {RUNS} runs of {} callers: at most {bound:.1e}",
                checked.len()
            );
            assert!(
                bound < MAX_FALSE_FAILURE,
                "the fixture is too small for a {TOLERANCE} tolerance: this test would fail by \
                 chance with probability up to {bound:.1e} (allowed {MAX_FALSE_FAILURE:.0e})"
            );
            bound_checked = true;
        }

        assert_eq!(
            report
                .pointer("/sampling/sample_bytes")
                .and_then(Value::as_u64),
            Some(SAMPLE_BYTES),
            "run {run}: the report should say it was sampled: \"sampling\": {{\"sample_bytes\": {SAMPLE_BYTES}}}; got {}",
            report.get("sampling").unwrap_or(&Value::Null)
        );
        for (reason, count) in report["totals"]["dropped"]
            .as_object()
            .expect("totals.dropped is an object")
        {
            assert_eq!(
                count.as_u64(),
                Some(0),
                "run {run}: nothing should be dropped, but {reason} = {count}\n{}",
                describe_top(&report, 10)
            );
        }

        let mut summary = Vec::new();
        for (caller, mix) in &checked {
            let expected: u64 = mix.iter().map(|(s, c)| s * c).sum();
            let estimate = usage_by_caller(&report, caller).live_bytes;
            let error = (estimate as f64 - expected as f64) / expected as f64;
            summary.push(format!(
                "{caller}: {estimate} for {expected} ({:+.2}%)",
                error * 100.0
            ));
            assert!(
                error.abs() <= TOLERANCE,
                "run {run}: {caller} holds {expected} bytes; the estimate {estimate} is off by \
                 {:+.2}% (allowed {}%)\nstacks of {caller}:\n{}",
                error * 100.0,
                TOLERANCE * 100.0,
                describe_stacks(&report, |s| frame_function(s, 1) == Some(caller.as_str()))
            );
        }
        eprintln!("sampling_e2e: run {run}/{RUNS}: {}", summary.join(", "));

        // Whatever was sampled and then freed cancels exactly: live estimates of zero.
        for caller in &out.churn {
            let live = usage_by_caller(&report, caller);
            assert_eq!(
                (live.live_bytes, live.live_allocs),
                (0, 0),
                "run {run}: {caller} freed everything it allocated, so its estimated live \
                 bytes and blocks should be exactly 0\n{}",
                describe_stacks(&report, |s| frame_function(s, 1) == Some(caller.as_str()))
            );
            assert!(
                live.allocs > 0,
                "run {run}: {caller} made 400000 calls: some should have been sampled\n{}",
                describe_top(&report, 10)
            );
        }
        // keep_grown's malloc'd blocks were all freed: their stack holds nothing.
        let grown_mallocs = usage_where(&report, |s| {
            frame_function(s, 0) == Some("malloc") && frame_function(s, 1) == Some("keep_grown")
        });
        assert_eq!(
            grown_mallocs.live_bytes,
            0,
            "run {run}: every block keep_grown got from malloc was freed\n{}",
            describe_stacks(&report, |s| frame_function(s, 1) == Some("keep_grown"))
        );
        assert!(
            num(&report["totals"], "live_bytes") >= total * 9 / 10,
            "run {run}: totals should hold at least the callers' estimates"
        );
    }
}

#[test]
fn bad_sample_sizes_are_refused_with_one_line() {
    setup();
    for bad in ["0", "0KiB", "17GiB", "lots", "1.5MiB", "-4"] {
        let args = ["record", "--sample-bytes", bad, "--", "/bin/true"];
        let finished = run_tracer(&args, EXIT_TIMEOUT);
        let lines: Vec<&str> = finished.stderr.lines().collect();
        assert!(
            finished.status.code() == Some(2)
                && lines.len() == 1
                && lines[0].starts_with("tracer: ")
                && lines[0].contains(bad),
            "`tracer {}` should exit 2 with one line on stderr naming the value\n{}",
            show_args(&args),
            finished.describe()
        );
    }
}

/// x86 int3, which a uprobe writes over the probed instruction.
const BREAKPOINT: u8 = 0xcc;

#[test]
fn sampling_mode_detaches_and_leaves_the_target_working() {
    setup();
    let dir = TempDir::new("sampling-detach");
    let alloc = build_fixture(&dir, "alloc");
    let mut fixture = Proc::spawn("alloc --wait", Command::new(&alloc).arg("--wait"));
    fixture.expect_stdout_line("ready", LINE_TIMEOUT);
    let pid = fixture.pid();
    let (malloc, free) = (libc_symbol(pid, "malloc"), libc_symbol(pid, "free"));

    // 4 KiB: nearly every block of the fixture (1000 to 70000 bytes) holds a sample point.
    let mut tracer = start_recording(
        pid,
        &["--sample-bytes", "4KiB", "--format", "json", "--top", "0"],
    );
    let in_malloc = malloc.process_bytes(pid, 1)[0];
    let in_free = free.process_bytes(pid, 16);
    assert!(
        in_malloc == BREAKPOINT && in_free.contains(&BREAKPOINT),
        "while sampling, malloc should start with a breakpoint and free hold one near its \
         start; malloc starts with {in_malloc:#04x}, free is {}",
        hex(&in_free)
    );
    fixture.signal(libc::SIGUSR1);
    fixture.expect_stdout_line("allocated", LINE_TIMEOUT);
    let (_, report) = stop_recording(&mut tracer);

    assert_eq!(
        report
            .pointer("/sampling/sample_bytes")
            .and_then(Value::as_u64),
        Some(4096),
        "the report should say it was sampled at 4096 bytes"
    );
    // realloc_grow's block of 70000 bytes holds a sample point but with probability
    // exp(-70000/4096) = 4e-8, and then weighs 1/p: 70000 bytes to the byte. Its first block
    // (malloc(100)) was released by the realloc, whether or not it was sampled.
    let grown = usage_by_caller(&report, "realloc_grow");
    assert_eq!(
        (grown.live_bytes, grown.live_allocs),
        (70000, 1),
        "realloc_grow holds one block of 70000 bytes\n{}",
        describe_stacks(&report, |s| frame_function(s, 1) == Some("realloc_grow"))
    );

    for sym in [&malloc, &free] {
        let restored = eventually(Duration::from_secs(5), || {
            let (mem, file) = (sym.process_bytes(pid, 16), sym.file_bytes(16));
            if mem == file {
                Ok(())
            } else {
                Err(format!(
                    "{} is {} in the process, {} in the file",
                    sym.name,
                    hex(&mem),
                    hex(&file)
                ))
            }
        });
        if let Err(e) = restored {
            panic!(
                "5 s after the sampling tracer exited, its breakpoints are still in the target: {e}"
            );
        }
    }
    fixture.signal(libc::SIGUSR2);
    fixture.expect_stdout_line("ok", LINE_TIMEOUT);
    let status = fixture.wait_exit(EXIT_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(0),
        "the fixture should exit 0 after the tracer detached, got {status}\nstderr:\n{}",
        fixture.stderr.text()
    );
}
