//! A real node HTTP service under continuous load, attached to and detached from again and
//! again: 40 cycles of about a second of full tracing, kernel sampling and the in-process
//! sampler in turn, then 10 with the ptrace backend. Every request must be answered within 5 s, byte for byte as before any
//! tracer came; afterwards none of the tracer's BPF programs or links may be left, and the
//! service's code pages must read back exactly as before.

mod support;

use std::time::{Duration, Instant};

use support::live::{
    HeldBpf, attach_cycle, code_snapshot, endless_load, leftovers, stop_service, warm_service,
};
use support::load::Outcome;
use support::{eventually, num, setup};

/// Cycles with the eBPF backend: full, kernel sampling (`--backend ebpf --sample-bytes`), full,
/// and the in-process sampler (`--sample-bytes` alone), in turn; then ptrace ones.
const EBPF_CYCLES: usize = 40;
const PTRACE_CYCLES: usize = 10;
/// How long each cycle records.
const HOLD: Duration = Duration::from_secs(1);
/// Every request must be answered within this.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);
const CONNECTIONS: usize = 8;

#[test]
fn a_node_service_under_load_is_attached_fifty_times_and_answers_unchanged() {
    setup();
    // Warmed up untraced (V8 compiles the handler), then the code pages as they are.
    let (mut service, paths, reference) = warm_service(CONNECTIONS);
    let pid = service.pid() as i32;
    let code_before = code_snapshot(pid);
    let load = endless_load(&service, &paths, &reference, CONNECTIONS);

    let mut plan: Vec<&[&str]> = Vec::new();
    for i in 0..EBPF_CYCLES {
        plan.push(match i % 4 {
            0 | 2 => &["--backend", "ebpf"],
            1 => &["--backend", "ebpf", "--sample-bytes", "512KiB"],
            // The default on a running process: the in-process sampler.
            _ => &["--sample-bytes", "512KiB"],
        });
    }
    plan.extend(std::iter::repeat_n(
        &["--backend", "ptrace"][..],
        PTRACE_CYCLES,
    ));

    let mut failures = Vec::new();
    let mut held = HeldBpf::default();
    let mut walls = Vec::new();
    let started = Instant::now();
    for (i, args) in plan.iter().enumerate() {
        let answered_before = load.answered();
        match attach_cycle(pid, args, HOLD) {
            Ok(cycle) => {
                let ebpf = !args.contains(&"ptrace");
                if ebpf && (cycle.held.programs.is_empty() || cycle.held.links.is_empty()) {
                    failures.push(format!(
                        "cycle {i} ({}): while recording, the tracer held no BPF program or no \
                         link ({:?})",
                        args.join(" "),
                        cycle.held
                    ));
                }
                held.programs.extend(&cycle.held.programs);
                held.links.extend(&cycle.held.links);
                let allocs = num(&cycle.report["totals"], "allocs");
                if allocs == 0 {
                    failures.push(format!(
                        "cycle {i} ({}): a service answering requests made no allocation the \
                         tracer saw in {HOLD:?}: {}",
                        args.join(" "),
                        cycle.report["totals"]
                    ));
                }
                // node leaves no allocator call by longjmp: a stale call here would be one
                // whose return probe closed before its entry probe as the tracer stopped.
                // Returns without their entry come only from calls already running when the
                // entry probe went in and still running once every probe was in (a thread
                // preempted inside malloc): at most two per thread (realloc's inner malloc,
                // then realloc), not the hundreds that returns of calls begun while the links
                // went in one by one, or of calls begun while stopping, would add.
                let dropped = &cycle.report["totals"]["dropped"];
                let stale = num(dropped, "stale_pending");
                let orphans = num(dropped, "orphan_returns");
                let threads =
                    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count()) as u64;
                if ebpf && (stale != 0 || orphans > 2 * threads) {
                    failures.push(format!(
                        "cycle {i} ({}): {stale} calls counted stale_pending and {orphans} \
                         orphan_returns ({threads} threads): {dropped}",
                        args.join(" "),
                    ));
                }
                walls.push((cycle.attach, cycle.wall));
                eprintln!(
                    "live_e2e: cycle {i:2} ({}): attached after {:?}, done after {:?}, allocs \
                     {allocs}, orphan returns {}",
                    args.join(" "),
                    cycle.attach,
                    cycle.wall,
                    num(&cycle.report["totals"]["dropped"], "orphan_returns")
                );
            }
            Err(e) => failures.push(format!("cycle {i} ({}): {e}", args.join(" "))),
        }
        if load.answered() == answered_before {
            failures.push(format!(
                "cycle {i} ({}): the service answered no request while it ran",
                args.join(" ")
            ));
        }
        if !service.running() {
            failures.push(format!(
                "the service died during cycle {i} ({})",
                args.join(" ")
            ));
            break;
        }
    }
    let cycles_time = started.elapsed();
    // Some load after the last detach, too.
    std::thread::sleep(Duration::from_millis(500));
    let traffic = load.stop();
    eprintln!(
        "live_e2e: {} cycles in {:.0} s ({} failed); attach times {:?}..{:?}, cycle times \
         {:?}..{:?}; load: {}",
        plan.len(),
        cycles_time.as_secs_f64(),
        failures.len(),
        walls.iter().map(|w| w.0).min().unwrap_or_default(),
        walls.iter().map(|w| w.0).max().unwrap_or_default(),
        walls.iter().map(|w| w.1).min().unwrap_or_default(),
        walls.iter().map(|w| w.1).max().unwrap_or_default(),
        traffic.summary()
    );

    assert!(
        failures.is_empty(),
        "{} of {} attach/detach cycles failed:\n{}",
        failures.len(),
        plan.len(),
        failures.join("\n\n")
    );

    let late = traffic.slower_than(ANSWER_WITHIN);
    assert!(
        traffic.count(Outcome::Changed) == 0 && late.is_empty() && traffic.errors.is_empty(),
        "every request must be answered within {ANSWER_WITHIN:?} with the bytes it got before \
         tracing: {}\nlate or unanswered (first 10): {:?}\nerrors (first 10):\n{}",
        traffic.summary(),
        &late[..late.len().min(10)],
        traffic.errors[..traffic.errors.len().min(10)].join("\n")
    );

    // Nothing of ours is left in the kernel: every program the tracers held, and every link
    // to one, is gone (closing is asynchronous in the kernel: give it a moment).
    let left = eventually(Duration::from_secs(5), || {
        let (progs, links) = leftovers(&held);
        if progs.is_empty() && links.is_empty() {
            Ok(())
        } else {
            Err(format!("{progs:?} {links:?}"))
        }
    });
    if let Err(left) = left {
        panic!(
            "after the tracers exited, BPF objects of theirs are still loaded: {left} (they held \
             {} programs and {} links in all)",
            held.programs.len(),
            held.links.len()
        );
    }

    code_before.reads_back_in(pid);
    assert!(
        support::tracer_pids(pid).iter().all(|(_, t)| t == "0"),
        "no thread of the service may stay traced: {:?}",
        support::tracer_pids(pid)
    );

    stop_service(service);
}
