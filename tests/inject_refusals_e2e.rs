//! What the in-process sampler's install does when the target is not simply running: an
//! allocator entry already carrying someone else's int3 (a debugger's breakpoint, a uprobe) is
//! refused with one line and nothing written; threads standing inside the bytes to patch make
//! the stop retry until they are clear; a process the user stopped (group-stop) is patched and
//! restored without being resumed.
//!
//! On the kernel these tests were written on (6.18), a uprobe IS visible to a read of
//! /proc/PID/mem: the kernel installs it by replacing the page in the process's own mm with a
//! copy carrying 0xcc, so the install's check of the live bytes against libc's file sees it.
//! `a_uprobe_on_malloc_is_refused_and_nothing_is_written` asserts that first, so a kernel that
//! hid uprobes from such reads would fail it loudly instead of passing for the wrong reason.

mod support;

use std::{
    fs::OpenOptions,
    os::unix::fs::FileExt as _,
    process::Command,
    time::{Duration, Instant},
};

use support::target::Target;
use support::{
    Finished, LibcSymbol, TempDir, assert_libc_text_pristine, assert_same_code, build_fixture,
    libc_symbol, live_libc_text, read_mem, require_root, run_tracer, setup, start_recording,
    stop_recording,
};
use tracer::inject::inject::{Injected, MEMFD_NAME, find_leftover};
use tracer_common::sampler::counter;

/// The CLI's exit status for bad input and failures, refusals included (main.rs's EXIT_ERROR).
const EXIT_ERROR: i32 = 2;

/// A fresh fixtures/inject_target.c in `dir`, started and seen running healthy for 0.5 s.
fn healthy_target(dir: &TempDir) -> Target {
    let mut t = Target::inject_target(&build_fixture(dir, "inject_target"), None);
    t.runs_healthy(0.5);
    t
}

/// malloc's entry in `pid` and its first 8 bytes, which must be libc's before a test plants
/// anything there.
fn malloc_entry(pid: i32) -> (LibcSymbol, Vec<u8>) {
    let malloc = libc_symbol(pid, "malloc");
    let original = malloc.process_bytes(pid, 8);
    assert_eq!(
        original,
        malloc.file_bytes(8),
        "malloc's entry is not libc's before the test"
    );
    (malloc, original)
}

/// Whether `pid` maps a sampler of ours (the memfd's name in /proc/PID/maps).
fn maps_sampler(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .expect("maps")
        .contains(MEMFD_NAME)
}

/// Each thread of `pid` and its state letter from /proc/PID/task/TID/stat.
fn thread_states(pid: i32) -> Vec<(i32, char)> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).expect("task dir");
    dir.filter_map(|e| {
        let tid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
        let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
        Some((tid, state))
    })
    .collect()
}

/// Waits up to 5 s until every thread of `pid` is in job-control stop ('T', not 't', which
/// is a ptrace stop: a tracer that left would see it go back to 'T' at once).
fn wait_all_stopped(pid: i32, when: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let states = thread_states(pid);
        if states.len() > 1 && states.iter().all(|&(_, s)| s == 'T') {
            return;
        }
        if Instant::now() > deadline {
            panic!("{when}: pid {pid}'s threads are not all stopped: {states:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions; pid is our own child.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
}

/// Writes `bytes` at `addr` of `pid` through /proc/PID/mem, as a debugger plants a breakpoint
/// in code it cannot otherwise write.
fn write_mem(pid: i32, addr: u64, bytes: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .expect("open mem for writing");
    f.write_all_at(bytes, addr)
        .unwrap_or_else(|e| panic!("write {bytes:02x?} at {addr:#x} in pid {pid}: {e}"));
}

/// The tracer refused malloc's entry with exactly one stderr line and exit status
/// [`EXIT_ERROR`], naming malloc's address, its live bytes (an int3, then libc's) and libc's,
/// and never said it installed.
fn assert_refused_malloc(done: &Finished, pid: i32, malloc: &LibcSymbol) {
    let lines: Vec<&str> = done.stderr.lines().collect();
    assert_eq!(
        (done.status.code(), lines.len()),
        (Some(EXIT_ERROR), 1),
        "a foreign patch on malloc must be refused with exit status {EXIT_ERROR} and one line\n{}",
        done.describe()
    );
    let line = lines[0];
    let head = format!(
        "tracer: pid {pid}: check the allocator entries: refused: malloc at {:#x} reads ",
        malloc.address
    );
    let parsed = line.strip_prefix(&head).and_then(|rest| {
        let (live, rest) = rest.split_once(" but libc's file has ")?;
        let file = rest.strip_suffix(" (a uprobe, a debugger or another tool's patch)")?;
        let bytes = |s: &str| -> Option<Vec<u8>> {
            s.split(' ')
                .map(|b| u8::from_str_radix(b, 16).ok())
                .collect()
        };
        Some((bytes(live)?, bytes(file)?))
    });
    let Some((live, file)) = parsed else {
        panic!(
            "refusal line\n  {line:?}\nis not\n  {head:?}<live bytes> but libc's file has \
             <bytes> (a uprobe, a debugger or another tool's patch)"
        );
    };
    let original = malloc.file_bytes(file.len());
    let mut planted = original.clone();
    planted[0] = 0xcc;
    assert!(
        file.len() >= 5 && file == original && live == planted,
        "refusal line {line:?}: want live {planted:02x?} and file {original:02x?}"
    );
    assert!(
        done.stdout.trim().is_empty(),
        "a refused install printed on stdout: {:?}",
        done.stdout
    );
}

/// `tracer inject-test --pid PID --hold 0` is refused (see [`assert_refused_malloc`]) and
/// leaves libc's code in `pid` as it was.
fn assert_install_refused(pid: i32, malloc: &LibcSymbol) {
    let code_before = live_libc_text(pid);
    let done = run_tracer(
        &["inject-test", "--pid", &pid.to_string(), "--hold", "0"],
        Duration::from_secs(60),
    );
    assert_refused_malloc(&done, pid, malloc);
    assert_same_code(
        pid,
        &live_libc_text(pid),
        &code_before,
        "its code before the attempt",
        "after the refusal",
    );
}

#[test]
fn a_debugger_breakpoint_on_malloc_is_refused_and_nothing_is_written() {
    setup();
    let dir = TempDir::new("inject-refuse-int3");
    let mut t = healthy_target(&dir);
    let pid = t.pid();

    // Stopped, the process cannot run into the int3 (it would die of SIGTRAP with no
    // debugger attached); a debugger holds it the same way while its breakpoint is planted.
    signal(pid, libc::SIGSTOP);
    wait_all_stopped(pid, "after SIGSTOP");
    let (malloc, original) = malloc_entry(pid);
    assert_ne!(original[0], 0xcc);
    write_mem(pid, malloc.address, &[0xcc]);
    let mut planted = original.clone();
    planted[0] = 0xcc;
    assert_eq!(
        malloc.process_bytes(pid, 8),
        planted,
        "the int3 did not land"
    );
    let maps_before = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");

    assert_install_refused(pid, &malloc);

    let maps_after = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    assert_eq!(
        maps_after, maps_before,
        "the refused install changed the stopped target's mappings"
    );
    assert!(find_leftover(pid).expect("find").is_none());
    wait_all_stopped(pid, "after the refused install");
    t.prints_nothing(Duration::from_millis(700), "after the refused install");

    write_mem(pid, malloc.address, &original[..1]);
    assert_libc_text_pristine(pid, "after taking the breakpoint out");
    signal(pid, libc::SIGCONT);
    t.runs_healthy(1.0);
    t.quit();
}

/// A uprobe on `offset` of the file `path`, for process `pid` only, made the way perf and
/// bpftrace make one without tracefs: a perf event of the kernel's "uprobe" PMU. The probe is
/// in the process's code while the returned descriptor is open.
fn open_uprobe(pid: i32, path: &std::path::Path, offset: u64) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd as _;
    let kind: u32 = std::fs::read_to_string("/sys/bus/event_source/devices/uprobe/type")
        .expect("this kernel has no uprobe PMU (CONFIG_UPROBE_EVENTS)")
        .trim()
        .parse()
        .expect("uprobe PMU type");
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL");
    // struct perf_event_attr, PERF_ATTR_SIZE_VER7 (128 bytes): type at 0, size at 4, the
    // flags word at 40 (0: enabled), config1 (uprobe_path) at 56, config2 (probe_offset) at 64.
    const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
    let mut attr = [0u64; 16];
    attr[0] = kind as u64 | (128u64 << 32);
    attr[7] = path.as_ptr() as u64;
    attr[8] = offset;
    // SAFETY: perf_event_open reads 128 bytes of attr and the NUL-terminated path it points to.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            attr.as_ptr(),
            pid,
            -1,
            -1,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    assert!(
        fd >= 0,
        "perf_event_open of a uprobe on {path:?}+{offset:#x}: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a descriptor perf_event_open just returned, owned by nobody else.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }
}

#[test]
fn a_uprobe_on_malloc_is_refused_and_nothing_is_written() {
    setup();
    let dir = TempDir::new("inject-refuse-uprobe");
    let mut t = healthy_target(&dir);
    let pid = t.pid();
    let (malloc, original) = malloc_entry(pid);

    let probe = open_uprobe(pid, &malloc.path, malloc.file_offset);
    let live = malloc.process_bytes(pid, 8);
    let mut planted = original.clone();
    planted[0] = 0xcc;
    assert_eq!(
        live, planted,
        "this kernel does not show the uprobe's int3 to a read of /proc/PID/mem: the install \
         cannot see a uprobe this way"
    );
    // The target keeps running (each malloc now traps into the kernel and back).
    t.runs_healthy(0.5);

    assert_install_refused(pid, &malloc);

    assert!(!maps_sampler(pid), "the refused install mapped the sampler");
    t.runs_healthy(1.0);

    drop(probe);
    assert_eq!(
        malloc.process_bytes(pid, 8),
        original,
        "the kernel left its int3 after the uprobe went"
    );
    assert_libc_text_pristine(pid, "after the uprobe went");
    t.runs_healthy(0.5);
    t.quit();
}

/// Waits up to 5 s for malloc's entry in `pid` to read as libc's file again (a uprobe goes when
/// the kernel releases its last reference, which may come a little after its holder exits).
fn wait_malloc_restored(pid: i32, malloc: &LibcSymbol, when: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while malloc.process_bytes(pid, 8) != malloc.file_bytes(8) {
        if Instant::now() > deadline {
            panic!(
                "{when}: malloc in pid {pid} still reads {:02x?}, libc's file {:02x?}",
                malloc.process_bytes(pid, 8),
                malloc.file_bytes(8)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The tracer's own eBPF recording puts uprobes on malloc's entry: an install into the process
/// it records must be refused, and the recording must go on and end well.
#[test]
fn an_ebpf_recording_of_the_target_makes_the_install_refuse() {
    setup();
    let dir = TempDir::new("inject-refuse-recording");
    let mut t = healthy_target(&dir);
    let pid = t.pid();
    let (malloc, _) = malloc_entry(pid);

    let mut recording = start_recording(
        pid,
        &["--format", "json", "--top", "0", "--backend", "ebpf"],
    );
    assert_eq!(
        malloc.process_bytes(pid, 1),
        [0xcc],
        "the eBPF recording's uprobe on malloc is not visible in /proc/PID/mem"
    );
    assert_install_refused(pid, &malloc);
    assert!(!maps_sampler(pid), "the refused install mapped the sampler");
    t.runs_healthy(1.0);

    let (_, report) = stop_recording(&mut recording);
    assert!(
        support::num(&report["totals"], "allocs") > 0,
        "the recording saw no allocation: {}",
        support::describe_totals(&report)
    );
    wait_malloc_restored(pid, &malloc, "after the recording ended");
    assert_libc_text_pristine(pid, "after the recording ended");
    t.runs_healthy(0.5);
    t.quit();
}

/// The "held=H" count of the fixture's last progress or done line.
fn held(line: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("held="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no held= in {line:?}"))
}

#[test]
fn threads_inside_malloc_make_the_stop_retry_and_thirty_cycles_succeed() {
    require_root();
    let dir = TempDir::new("inject-retry");
    let exe = build_fixture(&dir, "inject_spin");
    // Four threads spinning on malloc+free, one stepping into malloc and holding there.
    let mut t = Target::start("inject_spin", Command::new(&exe).arg("4"));
    let pid = t.pid();
    t.runs_healthy(0.5);

    const CYCLES: usize = 30;
    let mut retries = Vec::new();
    let started = Instant::now();
    for cycle in 0..CYCLES {
        let i = Injected::install(pid, 4096)
            .unwrap_or_else(|e| panic!("cycle {cycle}: install: {e:#}"));
        assert_eq!(
            i.report.threads, 7,
            "cycle {cycle}: threads stopped (main, reader, stepper, four spinning)"
        );
        retries.push(i.report.retries);
        std::thread::sleep(Duration::from_millis(20));
        let c = i
            .counters()
            .unwrap_or_else(|e| panic!("cycle {cycle}: counters: {e:#}{}", t.describe()));
        assert!(
            c[counter::ALLOC_SITE] > 0,
            "cycle {cycle}: the patched entries led nowhere: counters {c:?}"
        );
        i.remove()
            .unwrap_or_else(|e| panic!("cycle {cycle}: remove: {e:#}{}", t.describe()));
        assert_libc_text_pristine(pid, &format!("after cycle {cycle}"));
    }
    let total: u32 = retries.iter().sum();
    let (_, line) = t.progress();
    eprintln!(
        "{CYCLES} install/remove cycles in {:?}; retried stops per install: {retries:?} \
         ({total} in all); fixture: {line}",
        started.elapsed()
    );
    assert!(
        held(&line) > 0,
        "the fixture's stepper never stood inside malloc's first bytes: {line:?}"
    );
    assert!(
        total > 0,
        "no install found a thread inside the bytes to patch in {CYCLES} cycles although the \
         fixture held one there half the time: the retry path was never taken ({line:?})"
    );
    t.runs_healthy(0.5);
    t.quit();
}

#[test]
fn a_stopped_process_is_patched_and_restored_and_stays_stopped() {
    require_root();
    let dir = TempDir::new("inject-group-stop");
    let mut t = healthy_target(&dir);
    let pid = t.pid();
    signal(pid, libc::SIGSTOP);
    wait_all_stopped(pid, "after SIGSTOP");
    t.prints_nothing(Duration::from_millis(500), "after SIGSTOP");

    let i = Injected::install(pid, 4096)
        .unwrap_or_else(|e| panic!("install into a stopped process: {e:#}"));
    wait_all_stopped(pid, "after install");
    t.prints_nothing(Duration::from_millis(700), "after install");
    assert!(maps_sampler(pid), "no sampler mapped after the install");
    for p in i.patched() {
        assert_eq!(
            read_mem(pid, p.start, p.patch.len()),
            p.patch,
            "{} is not patched in the stopped process",
            p.function
        );
    }
    let c = i.counters().expect("counters");
    assert_eq!(
        c[counter::ALLOC_SITE],
        0,
        "a stopped process allocated through the sampler: {c:?}"
    );

    i.remove()
        .unwrap_or_else(|e| panic!("remove from a stopped process: {e:#}"));
    wait_all_stopped(pid, "after remove");
    t.prints_nothing(Duration::from_millis(700), "after remove");
    assert_libc_text_pristine(pid, "after remove, still stopped");

    signal(pid, libc::SIGCONT);
    t.runs_healthy(1.0);
    assert_libc_text_pristine(pid, "after SIGCONT");
    let left = find_leftover(pid)
        .expect("find")
        .expect("sampler stays mapped");
    assert_eq!(left.active, 0, "the sampler left behind must be inert");
    t.quit();
}
