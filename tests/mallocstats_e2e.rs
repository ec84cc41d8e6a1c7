//! `tracer malloc-stats` on real processes: on a fragmented heap its figures agree with what
//! the process gets from mallinfo2() itself, and on a process whose threads allocate
//! constantly it never deadlocks the target: it answers or says it found no safe moment. When
//! things go wrong inside the call (a call slowed past its deadline while it holds an arena
//! lock, a fault on a corrupt heap) the target keeps its locks free, gets its signals as they
//! were sent and never a fault of ours; with a libc whose lock check it cannot find, it
//! refuses.

mod support;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_json::Value;
use support::{
    EXIT_TIMEOUT, LINE_TIMEOUT, Proc, TempDir, build_fixture, libc_symbol, num, run_tracer, setup,
};

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

/// The target runs at a small fraction of a CPU while this lives: the cgroup cpu controller
/// (v1 or v2) caps it at about 1 ms per 500 ms. The target goes back to the root group on drop.
struct Throttle {
    group: PathBuf,
    root: PathBuf,
    pid: i32,
}

impl Throttle {
    fn new(pid: i32) -> Throttle {
        let v1 = Path::new("/sys/fs/cgroup/cpu");
        let v2 = Path::new("/sys/fs/cgroup");
        let name = format!("tracer-test-throttle-{}-{pid}", std::process::id());
        let write = |path: PathBuf, value: &str| {
            fs::write(&path, value)
                .unwrap_or_else(|e| panic!("write {value:?} to {}: {e}", path.display()))
        };
        let throttle = if v1.join("cpu.cfs_quota_us").exists() {
            let group = v1.join(&name);
            fs::create_dir(&group).unwrap_or_else(|e| panic!("mkdir {}: {e}", group.display()));
            write(group.join("cpu.cfs_period_us"), "500000");
            write(group.join("cpu.cfs_quota_us"), "1000");
            Throttle {
                group,
                root: v1.to_owned(),
                pid,
            }
        } else if fs::read_to_string(v2.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "cpu"))
        {
            write(v2.join("cgroup.subtree_control"), "+cpu");
            let group = v2.join(&name);
            fs::create_dir(&group).unwrap_or_else(|e| panic!("mkdir {}: {e}", group.display()));
            write(group.join("cpu.max"), "1000 500000");
            Throttle {
                group,
                root: v2.to_owned(),
                pid,
            }
        } else {
            panic!(
                "this test slows the target down with the cgroup cpu controller, and finds neither \
                 /sys/fs/cgroup/cpu (v1) nor cpu in /sys/fs/cgroup/cgroup.controllers (v2)"
            );
        };
        write(throttle.group.join("cgroup.procs"), &pid.to_string());
        throttle
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        let _ = fs::write(self.root.join("cgroup.procs"), self.pid.to_string());
        let _ = fs::remove_dir(&self.group);
    }
}

/// Sends `sig` to process `pid` with sigqueue(3) and the value `value`.
fn sigqueue(pid: i32, sig: i32, value: i32) {
    let value = libc::sigval {
        sival_ptr: value as usize as *mut libc::c_void,
    };
    // SAFETY: sigqueue has no memory-safety preconditions.
    let rc = unsafe { libc::sigqueue(pid, sig, value) };
    assert_eq!(
        rc,
        0,
        "sigqueue({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// The heapstate fixture answers SIGUSR1 with a malloc that must take the main arena's lock.
fn malloc_takes_the_lock(target: &mut Proc, what: &str) {
    target.signal(libc::SIGUSR1);
    if let Err(why) = target.stdout.wait_for(LINE_TIMEOUT, |l| l == "malloc ok") {
        panic!(
            "{what}: the target's next malloc did not return ({why}): an arena lock was left held \
             and the target is deadlocked\n--- target stdout ---\n{}",
            target.stdout.text()
        );
    }
}

fn untraced_and_ends_by_sigterm(target: &mut Proc, pid: i32) {
    let traced = tracer_pid_of(pid);
    assert!(
        traced.is_empty(),
        "after malloc-stats, no thread may stay traced: {traced:?}"
    );
    target.signal(libc::SIGTERM);
    let status = target.wait_exit(EXIT_TIMEOUT);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGTERM),
        "the target should end by the SIGTERM it was sent, as before: {status}"
    );
}

/// A call is given up at its deadline only where it holds no allocator lock. Here the target
/// is slowed to about 0.5% of a CPU while mallinfo2() walks a long fastbin (holding the main
/// arena's lock) and open_memstream()'s calloc consolidates it: both run well past 2 s inside
/// the allocator. Given up there (as before), the lock stayed held and the target's next
/// malloc never returned. A signal sent while the call runs must reach the target as sent.
#[test]
fn a_call_past_its_deadline_inside_the_allocator_runs_on_and_leaves_no_lock_held() {
    setup();
    let dir = TempDir::new("mallocstats-slow");
    let fixture = build_fixture(&dir, "heapstate");
    let mut target = Proc::spawn(
        "heapstate --slow 30",
        Command::new(&fixture).args(["--slow", "30"]),
    );
    let sized = target
        .stdout
        .wait_for(LINE_TIMEOUT, |l| l.starts_with("free="))
        .unwrap_or_else(|why| panic!("the heapstate fixture did not size its heap: {why}"));
    target.expect_stdout_line("ready", LINE_TIMEOUT);
    let walk_us = field(&sized, "walk_us");
    assert!(
        walk_us >= 20_000,
        "the fixture's fastbin walk takes {walk_us} us even with 2M free blocks ({sized}): too \
         fast for the throttle to push a call past its 2 s deadline"
    );
    let pid = target.pid();

    let throttle = Throttle::new(pid);
    let mut cmd = Command::new(support::tracer_bin());
    cmd.args([
        "malloc-stats",
        "--pid",
        &pid.to_string(),
        "--format",
        "json",
        "--wait",
        "60s",
    ]);
    let mut tracer = Proc::spawn("tracer malloc-stats (target throttled)", &mut cmd);
    let overran = tracer.stderr.wait_for(Duration::from_secs(60), |l| {
        l.contains("still inside the allocator")
    });
    // Sent while the call runs (once it overran), so that it arrives during the call.
    sigqueue(pid, libc::SIGUSR2, 4242);
    drop(throttle);
    let run = tracer.finish(EXIT_TIMEOUT);

    malloc_takes_the_lock(&mut target, "after a call past its deadline");
    assert!(
        overran.is_ok(),
        "no call overran its deadline inside the allocator, so nothing was tested (fixture: \
         {sized})\n{}",
        run.describe()
    );
    assert_eq!(
        run.status.code(),
        Some(0),
        "a call that overran inside the allocator should be waited for, and answer\n{}",
        run.describe()
    );
    let stats: Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("malloc-stats printed no JSON ({e})\n{}", run.describe()));
    assert!(
        num(&stats, "fastbin_bytes") > 0 || num(&stats, "free_bytes") > 0,
        "the figures should show the freed blocks\n{stats:#}"
    );
    let want = format!("usr2 code=-1 value=4242 pid={}", std::process::id());
    // It may have come before the "malloc ok" line, or still be on its way.
    let seen = target
        .stdout
        .seen()
        .iter()
        .find(|l| l.starts_with("usr2 "))
        .cloned();
    let got = seen
        .map_or_else(
            || {
                target
                    .stdout
                    .wait_for(LINE_TIMEOUT, |l| l.starts_with("usr2 "))
            },
            Ok,
        )
        .unwrap_or_else(|why| {
            panic!(
                "the SIGUSR2 sent during the call never reached the target ({why})\n--- target \
                 stdout ---\n{}",
                target.stdout.text()
            )
        });
    assert_eq!(
        got, want,
        "the SIGUSR2 sent during the call should reach the target with its own siginfo \
         (SI_QUEUE, the value, the sender's pid)"
    );
    untraced_and_ends_by_sigterm(&mut target, pid);
}

/// SIGTERM (or Ctrl-C) while a call runs in the target waits until the target is let go: acted
/// on at once, it would leave the thread to return from the call untraced, to address 0.
#[test]
fn sigterm_during_a_call_ends_the_tracer_only_once_the_target_is_let_go() {
    setup();
    let dir = TempDir::new("mallocstats-sigterm");
    let fixture = build_fixture(&dir, "heapstate");
    let mut target = Proc::spawn(
        "heapstate --slow 30",
        Command::new(&fixture).args(["--slow", "30"]),
    );
    target.expect_stdout_line("ready", LINE_TIMEOUT);
    let pid = target.pid();

    let throttle = Throttle::new(pid);
    let mut cmd = Command::new(support::tracer_bin());
    cmd.args(["malloc-stats", "--pid", &pid.to_string(), "--wait", "60s"]);
    let mut tracer = Proc::spawn("tracer malloc-stats (target throttled)", &mut cmd);
    let overran = tracer.stderr.wait_for(Duration::from_secs(60), |l| {
        l.contains("still inside the allocator")
    });
    if let Err(why) = overran {
        panic!(
            "no call overran its deadline inside the allocator ({why}), so there was no call to \
             interrupt\n{}",
            tracer.finish(EXIT_TIMEOUT).describe()
        );
    }
    tracer.signal(libc::SIGTERM);
    drop(throttle);
    let run = tracer.finish(EXIT_TIMEOUT);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&run.status),
        Some(libc::SIGTERM),
        "the tracer should end by the SIGTERM, once the target is let go\n{}",
        run.describe()
    );
    assert!(
        target.running(),
        "the target died: the tracer ended while its call ran\n{}",
        run.describe()
    );
    malloc_takes_the_lock(
        &mut target,
        "after the tracer was sent SIGTERM during a call",
    );
    untraced_and_ends_by_sigterm(&mut target, pid);
}

/// A fault raised by the injected call (mallinfo2() following a fastbin link broken by the
/// program into an unmapped page) is the call's failure: restore, release the arena lock the
/// call held, say so. Passed on (as before, after a 2 s timeout), it killed the target.
#[test]
fn a_fault_inside_the_call_never_reaches_the_target() {
    setup();
    let dir = TempDir::new("mallocstats-fault");
    let fixture = build_fixture(&dir, "heapstate");
    let mut target = Proc::spawn("heapstate --poison", Command::new(&fixture).arg("--poison"));
    target.expect_stdout_line("ready", LINE_TIMEOUT);
    let pid = target.pid();

    let run = run_tracer(&["malloc-stats", "--pid", &pid.to_string()], EXIT_TIMEOUT);
    assert!(
        target.running(),
        "the target died after malloc-stats met a fault in it\n{}",
        run.describe()
    );
    assert_eq!(run.status.code(), Some(2), "{}", run.describe());
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert!(
        lines.len() == 1
            && lines[0].contains("mallinfo2() faulted")
            && lines[0].contains("SIGSEGV")
            && lines[0].contains("not passed to the target"),
        "the failure should be one line saying mallinfo2() faulted and the fault was kept from \
         the target\n{}",
        run.describe()
    );
    malloc_takes_the_lock(
        &mut target,
        "after mallinfo2() faulted holding the arena lock",
    );
    untraced_and_ends_by_sigterm(&mut target, pid);
}

/// Where the lock check cannot be made (mallinfo2()'s code does not show the arena list), the
/// call is not made: one line, status 2. Before, the check was skipped silently. The libc here
/// is the system's, with the one instruction that follows the arena list replaced (mallinfo2()
/// then reads the main arena only), loaded by the fixture through LD_LIBRARY_PATH.
#[test]
fn a_libc_whose_lock_check_is_not_recognised_is_refused() {
    setup();
    let dir = TempDir::new("mallocstats-nolockcheck");
    let fixture = build_fixture(&dir, "heapstate");
    let mallinfo2 = libc_symbol(std::process::id() as i32, "mallinfo2");
    let mut libc = fs::read(&mallinfo2.path)
        .unwrap_or_else(|e| panic!("read {}: {e}", mallinfo2.path.display()));
    // glibc 2.36, x86-64: `mov 0x870(%rbx),%rbx` (next arena) becomes `mov %r12,%rbx` (back
    // to main_arena, held in r12) and a 4-byte nop.
    let (next, main) = (
        [0x48, 0x8b, 0x9b, 0x70, 0x08, 0x00, 0x00],
        [0x4c, 0x89, 0xe3, 0x0f, 0x1f, 0x40, 0x00],
    );
    let body = mallinfo2.file_offset as usize..mallinfo2.file_offset as usize + 0x120;
    let at = libc[body.clone()]
        .windows(next.len())
        .position(|w| w == next)
        .unwrap_or_else(|| {
            panic!(
                "mallinfo2() in {} has no `mov 0x870(%rbx),%rbx`: this test knows glibc 2.36's \
                 code; teach it this libc's",
                mallinfo2.path.display()
            )
        });
    libc[body.start + at..body.start + at + next.len()].copy_from_slice(&main);
    let lib = dir.join("lib");
    fs::create_dir(&lib).expect("mkdir lib");
    let name = mallinfo2.path.file_name().expect("libc has a file name");
    fs::write(lib.join(name), &libc).expect("write the patched libc");

    let mut target = Proc::spawn(
        "heapstate --slow 1 (patched libc)",
        Command::new(&fixture)
            .args(["--slow", "1"])
            .env("LD_LIBRARY_PATH", &lib),
    );
    target.expect_stdout_line("ready", LINE_TIMEOUT);
    let pid = target.pid();
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    assert!(
        maps.contains(lib.to_str().expect("utf-8 path")),
        "the fixture should run with the patched libc from {}:\n{maps}",
        lib.display()
    );

    let run = run_tracer(&["malloc-stats", "--pid", &pid.to_string()], EXIT_TIMEOUT);
    assert_eq!(run.status.code(), Some(2), "{}", run.describe());
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert!(
        lines.len() == 1
            && lines[0].contains("cannot check that no thread holds an allocator lock"),
        "the refusal should be one line saying the lock check cannot be made\n{}",
        run.describe()
    );
    malloc_takes_the_lock(&mut target, "after the refusal");
    untraced_and_ends_by_sigterm(&mut target, pid);
}
