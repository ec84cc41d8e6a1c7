//! The in-process sampler on a live node HTTP service under continuous load, with the same
//! service, load and attach cycles as `live_e2e`: fifty `--sample-bytes` attaches in a row,
//! and a tracer SIGKILLed while its sampler is in the service, followed by a minute of load,
//! a full-mode attach that must first give the allocator entries back, and an in-process
//! attach that takes the sampler over. Every request must be answered within 5 s,
//! byte for byte as before any tracer came, and the service's code pages must read back
//! exactly as before once the last tracer is gone.

mod support;

use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use support::live::{
    Service, attach_cycle, code_snapshot, endless_load, stop_service, warm_service,
};
use support::load::{LoadReport, Outcome};
use support::{EXIT_TIMEOUT, Proc, RECORDING_TIMEOUT, num, setup, tracer_bin};

const CYCLES: usize = 50;
/// How long each cycle records.
const HOLD: Duration = Duration::from_millis(500);
/// How long the service runs on after its tracer was killed.
const AFTER_KILL: Duration = Duration::from_secs(60);
/// Every request must be answered within this.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);
const CONNECTIONS: usize = 8;
const SAMPLE: [&str; 2] = ["--sample-bytes", "512KiB"];

/// Each test runs node under load and tracers: one at a time, so that on a small machine
/// neither starves the other's service past the answer deadline.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every request answered in time with the bytes it got untraced.
fn check_traffic(traffic: &LoadReport, when: &str) {
    let late = traffic.slower_than(ANSWER_WITHIN);
    assert!(
        traffic.count(Outcome::Changed) == 0 && late.is_empty() && traffic.errors.is_empty(),
        "{when}: every request must be answered within {ANSWER_WITHIN:?} with the bytes it got \
         before tracing: {}\nlate or unanswered (first 10): {:?}\nerrors (first 10):\n{}",
        traffic.summary(),
        &late[..late.len().min(10)],
        traffic.errors[..traffic.errors.len().min(10)].join("\n")
    );
}

/// The service's code reads back as before, no thread is traced, and it ends as it does
/// untraced.
fn check_left_as_found(service: Service, code_before: &support::live::CodeSnapshot) {
    let pid = service.pid() as i32;
    code_before.reads_back_in(pid);
    assert!(
        support::tracer_pids(pid).iter().all(|(_, t)| t == "0"),
        "no thread of the service may stay traced: {:?}",
        support::tracer_pids(pid)
    );
    stop_service(service);
}

#[test]
fn fifty_in_process_sampler_attaches_on_a_live_service_answer_every_request_unchanged() {
    setup();
    let _serial = serial();
    let (mut service, paths, reference) = warm_service(CONNECTIONS);
    let pid = service.pid() as i32;
    let code_before = code_snapshot(pid);
    let load = endless_load(&service, &paths, &reference, CONNECTIONS);

    let mut failures = Vec::new();
    let started = Instant::now();
    for i in 0..CYCLES {
        let answered_before = load.answered();
        match attach_cycle(pid, &SAMPLE, HOLD) {
            Ok(cycle) => check_sampled_cycle(&cycle, i, "in-process", &mut failures),
            Err(e) => failures.push(format!("cycle {i}: {e}")),
        }
        if load.answered() == answered_before {
            failures.push(format!(
                "cycle {i}: the service answered no request while it ran"
            ));
        }
        if !service.running() {
            failures.push(format!("the service died during cycle {i}"));
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let traffic = load.stop();
    eprintln!(
        "sampler_live_e2e: {CYCLES} cycles in {:.0} s ({} failed); load: {}",
        started.elapsed().as_secs_f64(),
        failures.len(),
        traffic.summary()
    );
    assert!(
        failures.is_empty(),
        "{} of {CYCLES} attach/detach cycles failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    check_traffic(&traffic, "through fifty attaches");
    check_left_as_found(service, &code_before);
}

#[test]
fn a_tracer_killed_while_sampling_in_process_leaves_the_service_healthy() {
    setup();
    let _serial = serial();
    let (mut service, paths, reference) = warm_service(CONNECTIONS);
    let pid = service.pid() as i32;
    let code_before = code_snapshot(pid);
    let load = endless_load(&service, &paths, &reference, CONNECTIONS);

    let mut cmd = Command::new(tracer_bin());
    cmd.args(["record", "--pid", &pid.to_string(), "--format", "json"])
        .args(SAMPLE);
    let mut tracer = Proc::spawn(
        &format!("tracer record --pid {pid} --sample-bytes 512KiB"),
        &mut cmd,
    );
    let wanted = format!("tracer: recording pid {pid}");
    let line = tracer
        .stderr
        .wait_for(RECORDING_TIMEOUT, |l| l.contains(&wanted))
        .unwrap_or_else(|e| panic!("the tracer never said {wanted:?}: {e}"));
    assert!(
        line.contains("in-process"),
        "the tracer should sample in-process: {line}"
    );
    std::thread::sleep(Duration::from_secs(1));
    tracer.signal(libc::SIGKILL);
    let _ = tracer.finish(EXIT_TIMEOUT);
    let killed_at = load.answered();

    // A minute of load with the sampler left in the service, active, and nobody listening.
    std::thread::sleep(AFTER_KILL);
    assert!(
        service.running(),
        "the service died after its tracer was killed"
    );
    let answered = load.answered() - killed_at;
    assert!(
        answered > 0,
        "the service answered nothing in the {AFTER_KILL:?} after the kill"
    );

    // A tracer that does not sample in-process (here full mode) must not put its uprobes on
    // the jumps the killed tracer left: it gives the entries back first.
    let full = attach_cycle(pid, &["--backend", "ebpf"], HOLD)
        .unwrap_or_else(|e| panic!("full-mode attach after the kill: {e}"));
    assert!(
        full.stderr.contains("gave back") && num(&full.report["totals"], "allocs") > 0,
        "a full-mode attach should give the allocator entries back, say so, and record:\n{}\n{}",
        full.stderr,
        full.report["totals"]
    );
    assert!(
        service.running(),
        "the service died at the full-mode attach after the kill"
    );

    // The next in-process tracer finds the sampler (inert now), takes it over and gives the
    // entries back when it leaves.
    let cycle = attach_cycle(pid, &SAMPLE, HOLD)
        .unwrap_or_else(|e| panic!("attaching again after the kill: {e}"));
    assert!(
        cycle.stderr.contains("in-process") && num(&cycle.report["totals"], "allocs") > 0,
        "the next attach should sample in-process again and see allocations:\n{}\n{}",
        cycle.stderr,
        cycle.report["totals"]
    );
    std::thread::sleep(Duration::from_millis(500));
    let traffic = load.stop();
    eprintln!(
        "sampler_live_e2e: {answered} requests answered in the {AFTER_KILL:?} after the kill; \
         load: {}",
        traffic.summary()
    );
    check_traffic(&traffic, "after the tracer was killed");
    check_left_as_found(service, &code_before);
}

/// Mappings of the sampler's ring in process `pid`.
fn rings_mapped(pid: i32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("/memfd:tracer-ring"))
        .count()
}

/// What each sampling cycle must show: the stderr saying how it sampled (`said`), allocations
/// seen, nothing dropped (the kernel sampler's counters, the sampler's own and its ring's).
fn check_sampled_cycle(cycle: &support::live::Cycle, i: usize, said: &str, failures: &mut Vec<String>) {
    if !cycle.stderr.contains(said) {
        failures.push(format!("cycle {i}: the tracer did not say {said:?}:\n{}", cycle.stderr));
    }
    if num(&cycle.report["totals"], "allocs") == 0 {
        failures.push(format!(
            "cycle {i}: no allocation seen in {HOLD:?}: {}",
            cycle.report["totals"]
        ));
    }
    let lost: Vec<String> = cycle.report["totals"]["dropped"]
        .as_object()
        .expect("totals.dropped is an object")
        .iter()
        .filter(|(_, v)| v.as_u64() != Some(0))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if !lost.is_empty() {
        failures.push(format!("cycle {i}: dropped {}", lost.join(", ")));
    }
}

#[test]
fn without_bpf_the_sampler_ring_serves_twenty_attaches_and_outlives_a_killed_tracer() {
    const PTRACE_CYCLES: usize = 20;
    const AFTER_RING_KILL: Duration = Duration::from_secs(20);
    let ptrace_sample = ["--backend", "ptrace", "--sample-bytes", "512KiB"];
    setup();
    let _serial = serial();
    let (mut service, paths, reference) = warm_service(CONNECTIONS);
    let pid = service.pid() as i32;
    let code_before = code_snapshot(pid);
    let load = endless_load(&service, &paths, &reference, CONNECTIONS);

    let mut failures = Vec::new();
    for i in 0..PTRACE_CYCLES {
        let answered_before = load.answered();
        match attach_cycle(pid, &ptrace_sample, HOLD) {
            Ok(cycle) => check_sampled_cycle(&cycle, i, "memory shared with the tracer", &mut failures),
            Err(e) => failures.push(format!("cycle {i}: {e}")),
        }
        if load.answered() == answered_before {
            failures.push(format!("cycle {i}: the service answered no request while it ran"));
        }
        if !service.running() {
            failures.push(format!("the service died during cycle {i}"));
            break;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {PTRACE_CYCLES} attach/detach cycles without BPF failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    // A ring read to the end is used again: twenty clean attaches leave one.
    assert_eq!(
        rings_mapped(pid),
        1,
        "after {PTRACE_CYCLES} clean attaches the service should map one ring"
    );

    // A tracer killed while it reads: the ring fills, and the sampler drops its events
    // without waiting for a reader that is gone.
    let mut cmd = Command::new(tracer_bin());
    cmd.args(["record", "--pid", &pid.to_string(), "--format", "json"])
        .args(ptrace_sample);
    let mut tracer = Proc::spawn(
        &format!("tracer record --pid {pid} --backend ptrace --sample-bytes 512KiB"),
        &mut cmd,
    );
    let wanted = format!("tracer: recording pid {pid}");
    tracer
        .stderr
        .wait_for(RECORDING_TIMEOUT, |l| l.contains(&wanted))
        .unwrap_or_else(|e| panic!("the tracer never said {wanted:?}: {e}"));
    std::thread::sleep(Duration::from_secs(1));
    tracer.signal(libc::SIGKILL);
    let _ = tracer.finish(EXIT_TIMEOUT);
    let killed_at = load.answered();
    std::thread::sleep(AFTER_RING_KILL);
    assert!(service.running(), "the service died after its ring's reader was killed");
    let answered = load.answered() - killed_at;
    assert!(answered > 0, "the service answered nothing in the {AFTER_RING_KILL:?} after the kill");

    // The next tracer takes the sampler over; the ring left full is not reused.
    let mut failures = Vec::new();
    match attach_cycle(pid, &ptrace_sample, HOLD) {
        Ok(cycle) => check_sampled_cycle(&cycle, PTRACE_CYCLES, "memory shared with the tracer", &mut failures),
        Err(e) => failures.push(format!("attaching again after the kill: {e}")),
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(rings_mapped(pid), 2, "the killed tracer's ring stays, unused; one new ring");

    std::thread::sleep(Duration::from_millis(500));
    let traffic = load.stop();
    eprintln!(
        "sampler_live_e2e: without BPF, {PTRACE_CYCLES} cycles, then {answered} requests answered \
         in the {AFTER_RING_KILL:?} after a kill; load: {}",
        traffic.summary()
    );
    check_traffic(&traffic, "through attaches without BPF and a killed tracer");
    check_left_as_found(service, &code_before);
}

/// The check the tests above end with sees a GOT slot changed: a bound `.got.plt` slot of a
/// sleeping process (not the service) rewritten through /proc/PID/mem is reported, and one
/// written back is not.
#[test]
fn the_left_as_found_check_sees_a_rebound_got_slot() {
    use std::os::unix::fs::FileExt as _;
    setup();
    let mut cmd = Command::new("sleep");
    cmd.arg("60");
    let sleeper = Proc::spawn("sleep 60", &mut cmd);
    let pid = sleeper.pid();
    std::thread::sleep(Duration::from_millis(200));
    let before = code_snapshot(pid);
    let (got, i, value) = before
        .gots
        .iter()
        .find_map(|g| {
            // The last bound one: the first three are the loader's, at the end of RELRO.
            let i = g.slots.iter().rposition(|&v| !g.stubs.iter().any(|&(s, e)| (s..e).contains(&v)))?;
            (i >= 3).then_some(())?;
            Some((g, i, g.slots[i]))
        })
        .unwrap_or_else(|| panic!("sleep has no bound writable GOT slot: {:?}", before.gots));
    let at = got.addr + 8 * i as u64;
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .expect("open the sleeper's memory");
    mem.write_all_at(&(value ^ 0x10).to_le_bytes(), at).expect("rewrite a GOT slot");
    let seen = before.differences(&code_snapshot(pid));
    mem.write_all_at(&value.to_le_bytes(), at).expect("put the GOT slot back");
    assert!(
        seen.len() == 1 && seen[0].contains(".got.plt slot") && seen[0].contains(&format!("{at:#x}")),
        "a rebound slot of {} at {at:#x} should be the one difference, found {seen:?}",
        got.path
    );
    let after = before.differences(&code_snapshot(pid));
    assert!(after.is_empty(), "with the slot put back nothing should differ: {after:?}");
    before.reads_back_in(pid);
}
