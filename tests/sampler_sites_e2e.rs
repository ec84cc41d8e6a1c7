//! The in-process sampler's probe sites on real BPF, without injection: a host process
//! (tracer/examples/sampler_host.rs) maps the embedded sampler from a memfd and calls its hooks
//! from named functions; `tracer record --pid` attaches the site programs to the memfd's inode
//! (hidden `--sampler-sites`). Checked: stacks start at the original allocator (the sampler's
//! `entry`, libc's malloc or realloc) with the hook's caller as frame 1 and no frame of the
//! sampler; the estimate of leak_a's live bytes within the bound sampling_e2e uses; exact
//! zeros for what was freed; each realloc case of the HOLD/settle protocol; blocks the full
//! set could not keep counted as allocated, never live; nothing else dropped or cut.
//!
//! The uprobe path is tried both ways the injection can give it: the target's
//! `/proc/PID/map_files/START-END` and the memfd's `/proc/PID/fd/N`.

mod support;

use std::{io::Write as _, process::Command, time::Duration};

use serde_json::Value;
use support::{
    LINE_TIMEOUT, Proc, describe_stacks, describe_top, frame_function, setup, start_recording,
    stop_recording, usage_where,
};

/// The host's mean (bytes between samples), and what it allocates (sampler_host.rs).
const MEAN: u64 = 4096;
const MIB: u64 = 1 << 20;
/// As sampling_e2e: a caller's live-byte estimate within 10%, and a test sized so that it
/// fails by chance less often than this, over every run.
const TOLERANCE: f64 = 0.10;
const MAX_FALSE_FAILURE: f64 = 1e-6;
const RUNS: usize = 2;

/// The host, built by cargo next to the tracer's release build.
fn host_binary() -> std::path::PathBuf {
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "-p",
            "tracer",
            "--example",
            "sampler_host",
        ])
        .status()
        .expect("run cargo to build the sampler host");
    assert!(
        status.success(),
        "cargo build of the sampler_host example failed: {status}"
    );
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    root.join("target/release/examples/sampler_host")
}

/// Chernoff bound on P(|X - T| >= tol * T) for a sum of blocks, each sampled independently with
/// p = 1 - exp(-size/mean) and then weighing size/p (as sampling_e2e bounds its checks).
fn false_failure_bound(mix: &[(u64, u64)], mean: f64, tol: f64) -> f64 {
    let terms: Vec<(f64, f64, f64)> = mix
        .iter()
        .map(|&(s, c)| (s as f64, -(-(s as f64) / mean).exp_m1(), c as f64))
        .collect();
    let total: f64 = terms.iter().map(|(w, _, c)| w * c).sum();
    let largest = terms.iter().map(|&(w, p, _)| w / p).fold(0.0, f64::max);
    let mut bound = 0.0;
    for sign in [1.0, -1.0] {
        let exponent = |lam: f64| {
            terms
                .iter()
                .map(|&(w, p, c)| {
                    let (hit, miss) = (sign * lam * (w / p - w), -sign * lam * w);
                    let m = hit.max(miss);
                    c * (m + (p * (hit - m).exp() + (1.0 - p) * (miss - m).exp()).ln())
                })
                .sum::<f64>()
                - lam * tol * total
        };
        let (mut lo, mut hi) = (0.0, 64.0 / largest);
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

/// A `word VALUE` line of the host's output, as a number.
fn host_value(lines: &[String], key: &str) -> u64 {
    let line = lines
        .iter()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("the host printed no {key:?} line: {lines:?}"));
    let word = line.rsplit(' ').next().expect("a value");
    u64::from_str_radix(word.trim_start_matches("0x"), 16)
        .unwrap_or_else(|_| panic!("{line:?} does not end in a hex number"))
}

fn frames(stack: &Value) -> Vec<&Value> {
    stack["frames"]
        .as_array()
        .map(|f| {
            f.iter()
                .filter(|f| f.get("inlined").and_then(Value::as_bool) != Some(true))
                .collect()
        })
        .unwrap_or_default()
}

/// Live and allocated bytes and blocks of the stacks whose first frames are `allocator` and
/// `caller`.
fn usage(report: &Value, allocator: &str, caller: &str) -> support::Usage {
    usage_where(report, |s| {
        frame_function(s, 0) == Some(allocator) && frame_function(s, 1) == Some(caller)
    })
}

/// `(start, end)` of every mapping of the sampler's memfd in `pid`.
fn memfd_mappings(pid: i32) -> Vec<(u64, u64, String)> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .expect("read the host's maps")
        .lines()
        .filter(|l| l.contains("/memfd:tracer-sampler"))
        .map(|l| {
            let range = l.split(' ').next().expect("a range");
            let (a, b) = range.split_once('-').expect("start-end");
            (
                u64::from_str_radix(a, 16).expect("hex"),
                u64::from_str_radix(b, 16).expect("hex"),
                range.to_owned(),
            )
        })
        .collect()
}

fn run(host: &std::path::Path, path_kind: &str) {
    let (mut proc, mut stdin) =
        Proc::spawn_with_stdin("sampler_host", Command::new(host).arg(MEAN.to_string()));
    let ready = proc
        .stdout
        .wait_for(LINE_TIMEOUT, |l| l.starts_with("ready "))
        .unwrap_or_else(|why| panic!("the host never said ready: {why}\n{}", proc.stderr.text()));
    let words: Vec<&str> = ready.split(' ').collect();
    let (fd, alloc_off, free_off) = (words[1], words[2], words[3]);
    let pid = proc.pid();
    let mappings = memfd_mappings(pid);
    assert!(
        !mappings.is_empty(),
        "the host maps no memfd:tracer-sampler"
    );
    let path = match path_kind {
        "map_files" => format!("/proc/{pid}/map_files/{}", mappings[0].2),
        _ => format!("/proc/{pid}/fd/{fd}"),
    };
    let sites = format!("{path}:{alloc_off}:{free_off}");
    let mut tracer = start_recording(
        pid,
        &[
            "--sample-bytes",
            &MEAN.to_string(),
            "--sampler-sites",
            &sites,
            "--format",
            "json",
            "--top",
            "0",
        ],
    );
    stdin.write_all(b"go\n").expect("tell the host to go");
    proc.expect_stdout_line("done", LINE_TIMEOUT);
    // Everything the host printed is in; the last events were reported before `done`.
    let (_, report) = stop_recording(&mut tracer);
    let lines = proc.stdout.seen().to_vec();
    drop(stdin);
    let _ = proc.wait_exit(Duration::from_secs(10));

    let how = format!("({path_kind} path {path})");
    let malloc = host_value(&lines, "entry malloc");
    let realloc = host_value(&lines, "entry realloc");
    let leak_ret = host_value(&lines, "ret leak_a");

    // No frame of any stack lies in the sampler.
    for s in support::stacks(&report) {
        for f in frames(s) {
            let addr = f["address"].as_u64().unwrap_or(0);
            assert!(
                !mappings.iter().any(|&(a, b, _)| (a..b).contains(&addr)),
                "{how}: a stack holds a frame in the sampler ({addr:#x}, mapped {mappings:?})\n{}",
                describe_stacks(&report, |x| std::ptr::eq(x, s))
            );
        }
    }
    // leak_a: frame 0 the sampler's `entry` (libc's malloc), frame 1 the return address the
    // sampler saw.
    let leak_stacks: Vec<&Value> = support::stacks(&report)
        .iter()
        .filter(|s| frame_function(s, 1) == Some("leak_a"))
        .collect();
    assert!(
        !leak_stacks.is_empty(),
        "{how}: no stack of leak_a\n{}",
        describe_top(&report, 10)
    );
    for s in &leak_stacks {
        let f = frames(s);
        let (f0, f1) = (f[0]["address"].as_u64(), f[1]["address"].as_u64());
        assert_eq!(
            (f0, f1),
            (Some(malloc), Some(leak_ret)),
            "{how}: leak_a's stacks should start at malloc ({malloc:#x}) then leak_a's return \
             address ({leak_ret:#x})\n{}",
            describe_stacks(&report, |x| std::ptr::eq(x, *s))
        );
        assert_eq!(frame_function(s, 0), Some("malloc"), "{how}");
        // And on through the host's own frames, as from an entry probe on malloc.
        assert_eq!(
            frame_function(s, 2),
            Some("sampler_host::main"),
            "{how}: leak_a's caller\n{}",
            describe_stacks(&report, |x| std::ptr::eq(x, *s))
        );
    }

    let mix = [(1000, 1000), (4000, 1000), (16000, 1000)];
    let truth: u64 = mix.iter().map(|(s, c)| s * c).sum();
    let bound = false_failure_bound(&mix, MEAN as f64, TOLERANCE);
    assert!(
        bound * (RUNS as f64) < MAX_FALSE_FAILURE,
        "leak_a is too small to check within {TOLERANCE}: false-failure bound {bound:.1e}"
    );
    let leak = usage(&report, "malloc", "leak_a");
    let error = (leak.live_bytes as f64 - truth as f64) / truth as f64;
    eprintln!(
        "sampler_sites_e2e {how}: leak_a live {} for {truth} ({:+.2}%; chance of a false \
         failure {bound:.1e} per run)",
        leak.live_bytes,
        error * 100.0
    );
    assert!(
        error.abs() <= TOLERANCE,
        "{how}: leak_a's live bytes are {truth}; the estimate {} is off by {:+.2}%\n{}",
        leak.live_bytes,
        error * 100.0,
        describe_top(&report, 10)
    );

    let expect = |allocator: &str, caller: &str, live: (u64, u64), what: &str| {
        let u = usage(&report, allocator, caller);
        assert_eq!(
            (u.live_bytes, u.live_allocs),
            live,
            "{how}: {what}: live (bytes, blocks) under {allocator} <- {caller}\n{}",
            describe_stacks(&report, |s| frame_function(s, 1) == Some(caller))
        );
        u
    };
    let churn = expect("malloc", "churn_b", (0, 0), "churn_b freed every block");
    assert!(churn.allocs > 0, "{how}: churn_b's blocks were sampled");
    // A sampled block grown: held, released; the new block live under realloc.
    expect(
        "malloc",
        "grow_c",
        (0, 0),
        "grow_c's first block was released by its realloc",
    );
    expect("realloc", "grow_c", (2 * MIB, 1), "grow_c's grown block");
    // An unsampled block realloc'd into a sampled one.
    expect("realloc", "grow_d", (MIB, 1), "grow_d's block from realloc");
    // realloc(p, 0) released the sampled block.
    expect(
        "malloc",
        "shrink_e",
        (0, 0),
        "shrink_e's block, released by realloc(p, 0)",
    );
    // A failed realloc kept it.
    expect(
        "malloc",
        "keep_f",
        (MIB, 1),
        "keep_f's block, kept by a failed realloc",
    );
    // The set full: allocated, never live, counted.
    let untracked = expect("malloc", "untracked_g", (0, 0), "untracked_g's blocks");
    assert_eq!(
        (untracked.alloc_bytes, untracked.allocs),
        (4 * MIB, 4),
        "{how}: untracked_g allocated 4 blocks of 1 MiB"
    );
    let realloc_frames = usage_where(&report, |s| {
        frames(s).first().and_then(|f| f["address"].as_u64()) == Some(realloc)
    });
    assert_eq!(
        realloc_frames.live_bytes,
        3 * MIB,
        "{how}: realloc's stacks start at its entry"
    );

    let dropped = report["totals"]["dropped"]
        .as_object()
        .expect("totals.dropped");
    for (reason, count) in dropped {
        let want = if reason == "sampler_untracked" { 4 } else { 0 };
        assert_eq!(
            count.as_u64(),
            Some(want),
            "{how}: dropped.{reason} should be {want}\n{}",
            describe_top(&report, 10)
        );
    }
}

#[test]
fn sampler_sites_record_sampled_calls_with_the_allocators_stacks() {
    setup();
    let host = host_binary();
    run(&host, "map_files");
    run(&host, "fd");
}
