//! `tracer malloc-stats` on real processes: on a fragmented heap its figures agree with what
//! the process gets from mallinfo2() itself, and on a process whose threads allocate
//! constantly it never deadlocks the target: it answers or says it found no safe moment.

mod support;

use std::{process::Command, time::Duration};

use serde_json::Value;
use support::{EXIT_TIMEOUT, LINE_TIMEOUT, Proc, TempDir, build_fixture, num, run_tracer, setup};

/// Threads of `pid` that some process still traces.
fn tracer_pid_of(pid: i32) -> Vec<String> {
    support::tracer_pids(pid)
        .into_iter()
        .filter(|(_, tracer)| tracer != "0")
        .map(|(tid, tracer)| format!("thread {tid} traced by {tracer}"))
        .collect()
}

fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}=N in the fixture's line {line:?}"))
}

fn within_one_percent(got: u64, want: u64) -> bool {
    got.abs_diff(want) * 100 <= want
}

#[test]
fn figures_of_a_fragmented_heap_agree_with_mallinfo2_in_the_process() {
    setup();
    let dir = TempDir::new("mallocstats-fragment");
    let fixture = build_fixture(&dir, "fragment");
    let mut target = Proc::spawn("fragment", &mut Command::new(&fixture));
    let line = target
        .stdout
        .wait_for(LINE_TIMEOUT, |l| l.starts_with("uordblks="))
        .unwrap_or_else(|why| panic!("the fragment fixture printed no figures: {why}"));
    let pid = target.pid();

    let json = run_tracer(
        &[
            "malloc-stats",
            "--pid",
            &pid.to_string(),
            "--format",
            "json",
        ],
        EXIT_TIMEOUT,
    );
    assert_eq!(json.status.code(), Some(0), "{}", json.describe());
    let stats: Value = serde_json::from_str(&json.stdout)
        .unwrap_or_else(|e| panic!("malloc-stats printed no JSON ({e})\n{}", json.describe()));

    let (in_use, free) = (num(&stats, "in_use_bytes"), num(&stats, "free_bytes"));
    let (want_in_use, want_free) = (field(&line, "uordblks"), field(&line, "fordblks"));
    assert!(
        within_one_percent(in_use, want_in_use) && within_one_percent(free, want_free),
        "in use {in_use} and free {free} should be within 1% of what the process's own mallinfo2() \
         said ({line})\n{stats:#}"
    );
    // 100 MiB allocated, 90% freed in holes that cannot coalesce: most of it stays with glibc.
    assert!(
        free > 50 << 20,
        "free-retained should be tens of MiB after the fragmenting frees: {free}"
    );
    let parts = num(&stats, "fastbin_bytes") + num(&stats, "bin_bytes") + num(&stats, "top_bytes");
    assert_eq!(
        parts, free,
        "fastbins + bins + top chunks should make up the free bytes\n{stats:#}"
    );
    assert!(
        num(&stats, "arenas") >= 2,
        "eight threads use more than the main arena\n{stats:#}"
    );
    assert_eq!(
        num(&stats, "mmapped_bytes"),
        field(&line, "hblkhd"),
        "{stats:#}"
    );

    let text = run_tracer(&["malloc-stats", "--pid", &pid.to_string()], EXIT_TIMEOUT);
    assert_eq!(text.status.code(), Some(0), "{}", text.describe());
    for want in [
        "in use:",
        "free, retained:",
        "fastbins",
        "top chunks",
        "mmapped:",
        "RSS:",
        "MiB of RSS is free memory glibc keeps; MALLOC_ARENA_MAX or malloc_trim would return it",
    ] {
        assert!(
            text.stdout.contains(want),
            "the text output lacks {want:?}\n{}",
            text.describe()
        );
    }

    let traced = tracer_pid_of(pid);
    assert!(
        traced.is_empty(),
        "after malloc-stats, no thread may stay traced: {traced:?}"
    );
    assert!(
        target.running(),
        "the target must run on after malloc-stats"
    );
    target.signal(libc::SIGTERM);
    let status = target.wait_exit(EXIT_TIMEOUT);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGTERM),
        "the target should end by the SIGTERM it was sent, as before: {status}"
    );
}

/// Runs of malloc-stats against the churning fixture.
const BUSY_RUNS: u32 = 10;
/// How long each run may wait for a safe moment.
const BUSY_WAIT: &str = "2s";
/// Runs that must answer. Each try stops all 8 churning threads at a random moment, and only
/// a try that finds all of them outside the allocator can answer. Measured on this 2-core
/// machine under load: 6 of 10 runs answered within 500 ms at about 30 tries each, so a try
/// succeeds with p = 1 - 0.4^(1/30) = 3%. A 2 s wait makes about 120 tries, missing with
/// probability 0.97^120 = 2.6% per run; five or more refusals in ten runs: below 1e-7 (and
/// below 2e-3 even if a busier machine allowed only half as many tries).
const BUSY_MIN_ANSWERS: u32 = 5;
/// The fixture's 8 threads each hold 64 blocks of at least 128 bytes once they have run.
const CHURN_MIN_HELD: u64 = 8 * 64 * 128;

#[test]
fn busy_threads_are_never_deadlocked_and_get_an_answer_or_a_clear_refusal() {
    setup();
    let dir = TempDir::new("mallocstats-churn");
    let fixture = build_fixture(&dir, "fragment");
    let mut target = Proc::spawn("fragment --churn", Command::new(&fixture).arg("--churn"));
    target.expect_stdout_line("churning", LINE_TIMEOUT);
    let pid = target.pid();

    let mut answered = 0;
    let mut refusals = Vec::new();
    for _ in 0..BUSY_RUNS {
        let run = run_tracer(
            &[
                "malloc-stats",
                "--pid",
                &pid.to_string(),
                "--format",
                "json",
                "--wait",
                BUSY_WAIT,
            ],
            EXIT_TIMEOUT,
        );
        match run.status.code() {
            Some(0) => {
                let stats: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| {
                    panic!("malloc-stats printed no JSON ({e})\n{}", run.describe())
                });
                // What glibc said must be a coherent mallinfo2(): in use and free make up the
                // arenas' memory exactly, the fixture's blocks are in use, and its threads have
                // arenas of their own.
                let (in_use, free, arena) = (
                    num(&stats, "in_use_bytes"),
                    num(&stats, "free_bytes"),
                    num(&stats, "arena_bytes"),
                );
                assert_eq!(
                    in_use + free,
                    arena,
                    "in use + free should be exactly the arenas' bytes, as mallinfo2 computes \
                     them\n{stats:#}"
                );
                assert!(
                    in_use >= CHURN_MIN_HELD && num(&stats, "arenas") >= 2,
                    "the 8 churning threads hold at least {CHURN_MIN_HELD} bytes in arenas of \
                     their own\n{stats:#}"
                );
                answered += 1;
            }
            Some(2) => {
                let lines: Vec<&str> = run.stderr.lines().collect();
                assert!(
                    lines.len() == 1 && lines[0].contains("no safe moment"),
                    "a refusal should be one line saying no safe moment was found\n{}",
                    run.describe()
                );
                refusals.push(lines[0].to_owned());
            }
            _ => panic!(
                "malloc-stats should answer (0) or refuse (2)\n{}",
                run.describe()
            ),
        }
    }
    assert!(
        answered >= BUSY_MIN_ANSWERS,
        "malloc-stats answered {answered} of {BUSY_RUNS} runs (--wait {BUSY_WAIT}); at least \
         {BUSY_MIN_ANSWERS} should find a safe moment on this fixture. Refusals:\n{}",
        refusals.join("\n")
    );

    // Still making progress: its threads were not left stuck on an allocator lock.
    let ops = |target: &mut Proc| {
        target.signal(libc::SIGUSR1);
        let line = target
            .stdout
            .wait_for(LINE_TIMEOUT, |l| l.starts_with("ops="))
            .unwrap_or_else(|why| panic!("the churning fixture stopped answering SIGUSR1: {why}"));
        field(&line, "ops")
    };
    let before = ops(&mut target);
    std::thread::sleep(Duration::from_millis(300));
    let after = ops(&mut target);
    assert!(
        after > before,
        "the churning threads made no progress after malloc-stats ran ({answered} of {BUSY_RUNS} \
         answered): \
         ops {before} then {after}"
    );
    let traced = tracer_pid_of(pid);
    assert!(
        traced.is_empty(),
        "after malloc-stats, no thread may stay traced: {traced:?}"
    );
}

#[test]
fn bad_pid_is_one_line_and_status_2() {
    setup();
    let run = run_tracer(&["malloc-stats", "--pid", "999999999"], EXIT_TIMEOUT);
    assert_eq!(run.status.code(), Some(2), "{}", run.describe());
    assert!(
        run.stderr.lines().count() == 1 && run.stderr.starts_with("tracer: "),
        "{}",
        run.describe()
    );
}

#[test]
fn record_with_malloc_stats_puts_glibc_figures_next_to_the_malloc_class() {
    setup();
    let dir = TempDir::new("mallocstats-record");
    let fixture = build_fixture(&dir, "fragment");
    let mut target = Proc::spawn("fragment", &mut Command::new(&fixture));
    let line = target
        .stdout
        .wait_for(LINE_TIMEOUT, |l| l.starts_with("uordblks="))
        .unwrap_or_else(|why| panic!("the fragment fixture printed no figures: {why}"));
    let pid = target.pid().to_string();
    for backend in ["ptrace", "ebpf"] {
        let run = run_tracer(
            &[
                "record",
                "--pid",
                &pid,
                "--backend",
                backend,
                "--duration",
                "300ms",
                "--malloc-stats",
                "--format",
                "json",
            ],
            EXIT_TIMEOUT,
        );
        assert_eq!(run.status.code(), Some(0), "{}", run.describe());
        let report: Value = serde_json::from_str(&run.stdout)
            .unwrap_or_else(|e| panic!("no JSON report ({e})\n{}", run.describe()));
        let glibc = &report["allocator"]["glibc"];
        let (in_use, free) = (num(glibc, "in_use_bytes"), num(glibc, "free_bytes"));
        assert!(
            within_one_percent(in_use, field(&line, "uordblks"))
                && within_one_percent(free, field(&line, "fordblks")),
            "{backend}: allocator.glibc should agree with the process's own mallinfo2() ({line}): {glibc:#}"
        );
    }
    let refused = run_tracer(
        &["record", "--malloc-stats", "--", "/bin/true"],
        EXIT_TIMEOUT,
    );
    assert_eq!(refused.status.code(), Some(2), "{}", refused.describe());
    assert!(
        refused.stderr.contains("--malloc-stats needs --pid"),
        "{}",
        refused.describe()
    );
}
