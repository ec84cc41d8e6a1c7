//! `tracer record`: attach (or launch), poll the probes until told to stop, detach, report.
use std::{
    io::Write,
    num::NonZeroU32,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

use crate::{
    aggregate::{History, Profile, add_mapped, aggregate},
    diag,
    output::Output,
    memmap::{self, ClassTotals, StackMemory},
    regions::Regions,
    options::{BackendChoice, Format, RecordOptions, TargetSpec},
    probe::{
        Backend,
        ebpf::{EbpfProbes, SyscallTarget},
        ptrace::{PtraceOptions, PtraceProbes},
    },
    probe::Snapshot,
    report::{self, AllocatorView, Meta},
    symbolize::{Symbolizer, maps::ProcMaps, perfmap},
    target::{self, LaunchEvent, Launched},
    diff::DiffOptions,
    report::folded::Metric,
};

/// How often the loop wakes to look at signals, the target and the clock.
const TICK: Duration = Duration::from_millis(50);
/// How often the target's memory map is read again (libraries loaded since).
const MAPS_REFRESH: Duration = Duration::from_secs(1);

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn install_signal_handlers() -> anyhow::Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_stop_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(sig, &action) }.with_context(|| format!("install {sig} handler"))?;
    }
    // Started with SIGCHLD ignored, the kernel would reap a launched command by itself and
    // its exit status would be lost.
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    // SAFETY: restores the default disposition; no handler runs.
    unsafe { sigaction(Signal::SIGCHLD, &default) }.context("reset the SIGCHLD handler")?;
    Ok(())
}

/// Capability bits in /proc/self/status CapEff.
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

fn check_privileges() -> anyhow::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| caps & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        Ok(())
    } else {
        bail!("loading BPF programs and uprobes needs root (CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN)")
    }
}

/// What recording ended with, for the caller's exit status.
pub struct Outcome {
    /// Exit status of a launched command, when it exited while we watched.
    pub exit_code: Option<i32>,
}

pub fn record(opts: &RecordOptions) -> anyhow::Result<Outcome> {
    // A report that cannot be written is found out now, not after the recording.
    let output = Output::open(opts.output.as_deref())?;
    // Without BPF privileges, auto goes straight to ptrace (and says why once, below).
    let bpf_refused = match opts.backend {
        BackendChoice::Ebpf => {
            check_privileges()?;
            None
        }
        BackendChoice::Ptrace => None,
        BackendChoice::Auto => check_privileges().err(),
    };
    install_signal_handlers()?;

    // Whether node was started with the perf-map flags by us (see the end).
    let mut added_jit_flags = false;
    let (info, libc, mut maps, launched) = match &opts.target {
        TargetSpec::Pid(pid) => {
            let info = target::inspect(*pid)?;
            let maps = ProcMaps::read(info.task)?;
            let libc = target::libc_of(info.task, &maps, &info.command)?;
            (info, libc, maps, None)
        }
        TargetSpec::Launch(argv) => {
            // node names its JIT frames only when started with these flags.
            let jit_argv = opts
                .jit_symbols
                .then(|| perfmap::with_node_jit_flags(argv))
                .flatten();
            added_jit_flags = jit_argv.is_some();
            let launched = Launched::start(jit_argv.as_deref().unwrap_or(argv))?;
            (
                launched.info.clone(),
                launched.libc.clone(),
                launched.maps.clone(),
                Some(launched),
            )
        }
    };
    let pid = info.pid;
    // The process's memory as /proc shows it, through a thread that is alive.
    let task = info.task;
    let nz_pid = NonZeroU32::new(pid).context("pid 0")?;
    let libc_host = target::mapped_file_path(task, &maps, &libc)?;
    let in_other_mount_ns = {
        let ns = |p: &str| std::fs::read_link(p).ok();
        ns("/proc/self/ns/mnt") != ns(&format!("/proc/{task}/ns/mnt"))
    };
    // Module paths are as the target sees them. In our own mount namespace "/" serves, and
    // outlives the target; in a container only /proc/PID/root does, and it goes with the
    // process, so modules are then read while it is alive (see `warm`).
    let mut symbolizer = Symbolizer::new(if in_other_mount_ns {
        PathBuf::from(format!("/proc/{task}/root"))
    } else {
        PathBuf::from("/")
    })
    .with_debug_dirs(opts.debug_dirs.clone());
    symbolizer.set_jit_pid(task);
    let warm = |symbolizer: &mut Symbolizer, maps: &ProcMaps| {
        // JIT code regions and perf-map entries, while the process is there to read them.
        symbolizer.refresh(maps);
        if in_other_mount_ns {
            for m in maps.mappings() {
                if let (Some(path), true) = (&m.path, m.perms.contains('x')) {
                    let _ = symbolizer.function(path, m.offset);
                }
            }
        }
    };
    warm(&mut symbolizer, &maps);

    let nz_task = NonZeroU32::new(task).context("task 0")?;
    let mut probes = attach_backend(opts, bpf_refused, nz_pid, nz_task, &libc_host, &libc, &maps, launched.as_ref())
        .with_context(|| format!("attach to pid {pid} ({})", info.command))?;
    // The tables every report names frames in load on another thread while recording, not
    // when the report needs them.
    symbolizer.preload(main_modules(pid, &libc));
    let slow: Vec<String> = probes
        .sites()
        .iter()
        .filter(|s| !s.emulated)
        .map(|s| format!("{}+{:#x}", s.function, s.offset))
        .collect();
    diag::warn(format_args!(
        "recording pid {pid} ({}): {} probes on {libc}{}",
        info.command,
        probes.sites().len(),
        if slow.is_empty() {
            String::new()
        } else {
            format!("; single-stepped (slower): {}", slow.join(", "))
        }
    ));
    // The mappings that exist now are shown as such; the ones made from here on get stacks.
    // A launched command is still held here, so this is exactly the state the probes met.
    let mut regions = Regions::from_maps(&maps);
    if let Some(brk) = target::start_brk(task) {
        regions.set_initial_break(brk);
    }
    let memory_start = memmap::memory_map(task, &regions, None).ok();
    let mut memory_last = memory_start.clone();
    let mut history = History::default();
    let sampling = opts.limits.sample_bytes.map(|sample_bytes| report::Sampling { sample_bytes });
    if let Some(l) = &launched {
        l.release();
    }

    let start = Instant::now();
    let mut last_maps = Instant::now();
    let mut next_interval = opts.interval.map(|i| start + i);
    let mut exit_code = None;
    let mut peak = PeakTracker::default();
    // A launched command's smaps and resident pages at its exit stop.
    let mut at_exit = None;
    loop {
        std::thread::sleep(TICK);
        peak.observe(probes.as_mut());
        for event in probes.drain_syscalls() {
            regions.apply(&event);
        }
        if STOP.load(Ordering::Relaxed) {
            break;
        }
        if opts.duration.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
        if let Some(l) = &launched {
            let mut exited = false;
            while let Ok(event) = l.events.try_recv() {
                match event {
                    LaunchEvent::Exiting { maps: text, smaps, present } => {
                        if let Ok(m) = ProcMaps::parse(&text) {
                            maps.update(m);
                        }
                        at_exit = Some((smaps.clone(), present));
                        // The last view of the process, at its very end.
                        if !smaps.is_empty() {
                            if let Ok(m) = memmap::memory_map_of(
                                &smaps,
                                &regions,
                                Vec::new(),
                                memory_start.as_deref(),
                            ) {
                                memory_last = Some(m);
                            }
                        }
                    }
                    LaunchEvent::Exited(code) => {
                        exit_code = Some(code);
                        exited = true;
                    }
                }
            }
            if exited {
                break;
            }
        } else if !target::is_alive(pid) {
            break;
        }
        if let Some(thread) = probes.bound_thread()
            && !target::task_alive(pid, thread)
        {
            // Not the process's exit (all its threads go at once, some a moment later):
            // one thread ended while others run on.
            std::thread::sleep(Duration::from_millis(100));
            if target::is_alive(pid) {
                diag::warn(format_args!(
                    "thread {thread} of pid {pid} exited while other threads run on; the kernel \
                     removes uprobes with the thread they were opened on, so recording ends here \
                     (attach again to go on)"
                ));
            }
            break;
        }
        if last_maps.elapsed() >= MAPS_REFRESH {
            if let Ok(m) = ProcMaps::read(task) {
                maps.update(m);
                warm(&mut symbolizer, &maps);
            }
            // Kept fresh in case the process exits: its smaps go with it.
            if let Ok(m) = memmap::memory_map(task, &regions, memory_start.as_deref()) {
                memory_last = Some(m);
            }
            last_maps = Instant::now();
        }
        if let Some(due) = next_interval {
            if Instant::now() >= due {
                let snapshot = probes.snapshot().map_err(|e| anyhow::anyhow!(e))?;
                let held = StackMemory::measure(pid, &regions).ok();
                let profile = profile_of(&snapshot, &regions, held.as_ref(), &maps, probes.as_mut());
                history.push(&profile);
                let meta = Meta {
                    pid,
                    command: info.command.clone(),
                    duration_ms: start.elapsed().as_millis() as u64,
                    sampling,
                };
                symbolizer.refresh(&maps);
                // Snapshots have no series yet: they rank by the metric asked for, else held.
                let metric = opts.metric.unwrap_or(Metric::Held);
                let ranking = report::Ranking { metric, top: opts.top, peak_fallback: false };
                let rep = report::build(&profile, &meta, ranking, &mut symbolizer);
                let mut err = std::io::stderr().lock();
                let _ = writeln!(err, "--- snapshot at {:.1} s", start.elapsed().as_secs_f64());
                let _ = report::text::write(&rep, &mut err);
                next_interval = opts.interval.map(|i| due + i);
            }
        }
    }
    let duration_ms = start.elapsed().as_millis() as u64;

    // Let the target go first; the final numbers stay readable, and naming comes last.
    probes.detach();
    for event in probes.drain_syscalls() {
        regions.apply(&event);
    }
    peak.observe(probes.as_mut());
    let mut snapshot = probes.snapshot().map_err(|e| anyhow::anyhow!(e))?;
    if let Some(min_age) = opts.min_age {
        let old = probes.live_older_than(min_age).map_err(|e| anyhow::anyhow!(e))?;
        for s in &mut snapshot.stacks {
            let (bytes, count) = old.get(&s.id).copied().unwrap_or((0, 0));
            s.live_bytes = bytes as i64;
            s.live_allocs = count as i64;
        }
    }
    if exit_code.is_none() {
        if let Ok(m) = ProcMaps::read(task) {
            maps.update(m);
        }
        if let Ok(m) = memmap::memory_map(task, &regions, memory_start.as_deref()) {
            memory_last = Some(m);
        }
    }
    // What the mmap/brk stacks hold in RAM: now, or at the launched command's exit stop.
    let held = match &at_exit {
        Some((smaps, present)) if exit_code.is_some() => StackMemory::at_exit(smaps, present, &regions).ok(),
        _ => StackMemory::measure(pid, &regions).ok(),
    };
    let mut profile = profile_of(&snapshot, &regions, held.as_ref(), &maps, probes.as_mut());
    peak.apply(&mut profile.totals);
    if opts.interval.is_some() {
        history.push(&profile);
        history.apply(&mut profile);
    }
    drop(probes);
    if let Some(l) = &launched {
        if exit_code.is_none() {
            l.detach();
        }
    }
    // glibc's own figures, asked once every probe is out: the call needs the threads to itself.
    let glibc = match (opts.malloc_stats, &opts.target) {
        (true, TargetSpec::Pid(_)) if target::is_alive(pid) => {
            match crate::mallocstats::inspect(pid, Duration::from_secs(2)) {
                Ok(stats) => Some(stats),
                Err(e) => {
                    diag::warn(format_args!("malloc-stats: {e:#}"));
                    None
                }
            }
        }
        _ => None,
    };

    let meta = Meta {
        pid,
        command: info.command.clone(),
        duration_ms,
        sampling,
    };
    // The perf map as the process left it (it stays in /tmp after an exit).
    symbolizer.refresh(&maps);
    let (metric, peak_fallback) = report::choose_metric(
        opts.metric,
        opts.interval.is_some(),
        exit_code.is_some(),
        &profile.totals,
    );
    let ranking = report::Ranking { metric, top: opts.top, peak_fallback };
    let mut rep = report::build(&profile, &meta, ranking, &mut symbolizer);
    rep.memory_map = memory_last;
    rep.allocator = Some(AllocatorView {
        live_malloc_bytes: profile.totals.live_bytes,
        node_array_buffer_bytes: (info.command == "node").then(|| {
            report::live_bytes_through(&profile, "node::NodeArrayBufferAllocator::", &mut symbolizer)
        }),
        glibc,
    });
    rep.interval_ms = opts.interval.map(|i| i.as_millis() as u64);
    rep.min_age_ms = opts.min_age.map(|a| a.as_millis() as u64);
    output.write(|out| write_as(&rep, opts.format, rep.metric, &mut |m| symbolizer.build_id(m), out))?;
    if let Some(hint) = symbolizer.jit_hint() {
        diag::warn(hint);
    }
    for note in symbolizer.take_notes() {
        diag::warn(note);
    }

    if let Some(l) = launched {
        // The command runs on after recording stops; its status is ours.
        while exit_code.is_none() {
            match l.events.recv() {
                Ok(LaunchEvent::Exited(code)) => exit_code = Some(code),
                Ok(LaunchEvent::Exiting { .. }) => {}
                // Nobody can tell any more: unknown, which is not success.
                Err(_) => exit_code = Some(-1),
            }
        }
    }
    if added_jit_flags && exit_code.is_some() {
        // The perf map exists only because we asked node for it, it has been read, and its
        // writer is gone: leave no file behind.
        symbolizer.remove_perf_map();
    }
    Ok(Outcome { exit_code })
}

/// `totals.peak_live_bytes`: the most live malloc-family bytes seen in all, from the
/// backend's running total looked at every tick (TICK, 20 times a second). Summing every
/// stack's counter on each call would need one counter shared by every CPU; sampled, a peak
/// shorter than a tick can be missed (the per-stack peaks are exact).
#[derive(Default)]
struct PeakTracker {
    peak: i64,
}

impl PeakTracker {
    fn observe(&mut self, probes: &mut dyn Backend) {
        if let Some(total) = probes.live_total_peak() {
            self.peak = self.peak.max(total);
        }
    }

    /// Sets the peak of `totals`, which is at least what is live at the end.
    fn apply(&self, totals: &mut crate::aggregate::Totals) {
        totals.peak_live_bytes = (self.peak.max(0) as u64).max(totals.live_bytes);
    }
}

/// The program's executable and its C library (frame 0 of every malloc stack), named as the
/// target's memory map names them. Other modules are usually smaller, and often not in any
/// stack: they are read only when a report needs them.
fn main_modules(pid: u32, libc: &str) -> Vec<String> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    exe.map(|p| p.to_string_lossy().into_owned())
        .into_iter()
        .chain([libc.to_owned()])
        .collect()
}

/// The backend `opts.backend` asks for: eBPF, ptrace, or eBPF with ptrace as the fallback
/// when BPF programs or uprobes cannot be loaded or attached (`bpf_refused`: the privilege
/// check already said no). The fallback says why, once.
#[expect(clippy::too_many_arguments, reason = "one call site, each argument a different fact")]
fn attach_backend(
    opts: &RecordOptions,
    bpf_refused: Option<anyhow::Error>,
    pid: NonZeroU32,
    task: NonZeroU32,
    libc_host: &Path,
    libc: &str,
    maps: &ProcMaps,
    launched: Option<&Launched>,
) -> anyhow::Result<Box<dyn Backend>> {
    let why_not_bpf = match (opts.backend, bpf_refused) {
        (BackendChoice::Ptrace, _) => None,
        (_, Some(refused)) => Some(format!("{refused:#}")),
        (choice, None) => {
            let attached = EbpfProbes::attach(
                pid,
                task,
                libc_host,
                opts.limits,
                Some(SyscallTarget { libc, maps }),
            );
            match attached {
                Ok(ebpf) => {
                    for warning in &ebpf.warnings {
                        diag::warn(warning);
                    }
                    return Ok(Box::new(ebpf));
                }
                // A C library the tracer cannot read fails ptrace just the same.
                Err(e @ crate::probe::ebpf::EbpfError::Libc(_)) => return Err(e.into()),
                Err(e) if choice == BackendChoice::Auto => Some(format!("{:#}", anyhow::Error::from(e))),
                Err(e) => return Err(e.into()),
            }
        }
    };
    if opts.limits.sample_bytes.is_some() {
        bail!(
            "--sample-bytes needs the eBPF backend{}",
            why_not_bpf.map(|w| format!(", which is unavailable: {w}")).unwrap_or_default()
        );
    }
    let ptrace = || -> anyhow::Result<PtraceProbes> {
        if task != pid {
            bail!("the ptrace backend cannot trace a process whose main thread has exited (pthread_exit)");
        }
        let handover = match launched {
            Some(l) => Some(l.hand_over()?),
            None => None,
        };
        Ok(PtraceProbes::attach(PtraceOptions {
            pid: pid.get(),
            libc_host: libc_host.to_owned(),
            libc: libc.to_owned(),
            limits: opts.limits,
            handover,
        })?)
    };
    // One line either way: why eBPF was not used goes with the outcome of ptrace.
    match (ptrace(), why_not_bpf) {
        (Ok(probes), why) => {
            if let Some(why) = why {
                diag::warn(format_args!("eBPF unavailable ({why}); using the ptrace backend, which is much slower"));
            }
            Ok(Box::new(probes))
        }
        (Err(e), Some(why)) => Err(e.context(format!("eBPF unavailable ({why}), and the ptrace backend failed too"))),
        (Err(e), None) => Err(e),
    }
}

/// The malloc stacks of a snapshot and the stacks that mapped memory themselves.
fn profile_of(
    snapshot: &Snapshot,
    regions: &Regions,
    held: Option<&StackMemory>,
    maps: &ProcMaps,
    probes: &mut dyn Backend,
) -> Profile {
    let mut profile = aggregate(snapshot, maps);
    add_mapped(
        &mut profile,
        &regions.by_stack(),
        held,
        |id| probes.stack_frames(id).unwrap_or_default(),
        maps,
    );
    profile
}

/// The memory map of a process right now, for `tracer map`.
pub fn map(pid: u32) -> anyhow::Result<Vec<ClassTotals>> {
    let info = target::inspect(pid)?;
    let maps = ProcMaps::read(pid)?;
    let regions = Regions::from_maps(&maps);
    memmap::memory_map(pid, &regions, None).with_context(|| format!("pid {pid} ({})", info.command))
}

/// Renders `rep` in `format`; `build_id` names modules' build ids for pprof.
pub fn write_as(
    rep: &report::Report,
    format: Format,
    metric: Metric,
    build_id: &mut dyn FnMut(&str) -> Option<String>,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    match format {
        Format::Text => report::text::write(rep, out),
        Format::Json => report::json::write(rep, out),
        Format::Folded => report::folded::write(rep, metric, out),
        Format::Svg => report::svg::write(rep, metric, out),
        Format::Pprof => report::pprof::write(rep, build_id, out),
    }
}

/// Runs `write` on `output` (stdout when None) and flushes.
pub fn write_to(
    output: Option<&Path>,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    Output::open(output)?.write(write)
}

/// `tracer report`: a saved JSON report in another format, its stacks merged by the one rule
/// and ranked by `metric` (default: what the report was ranked by). Its modules may no longer
/// be the files they were, so no build ids are read for pprof.
pub fn convert(
    input: &Path,
    format: Format,
    metric: Option<Metric>,
    output: Option<&Path>,
    resymbolize: Option<&[PathBuf]>,
) -> anyhow::Result<()> {
    let mut rep = crate::diff::read_report(input)?;
    if metric.is_some() {
        rep.peak_fallback = false;
    }
    let metric = metric.unwrap_or(rep.metric);
    let Some(debug_dirs) = resymbolize else {
        report::merge::remerge(&mut rep, metric);
        return write_to(output, |out| write_as(&rep, format, metric, &mut |_| None, out));
    };
    // Names from this host's files as they are now (e.g. after debug files were installed).
    let start = Instant::now();
    let mut symbolizer = Symbolizer::new("/").with_debug_dirs(debug_dirs.to_vec());
    let counts = crate::symbolize::resymbolize::resymbolize(&mut rep, &mut symbolizer);
    diag::warn(format_args!(
        "named {} of {} frames again in {} ms",
        counts.named,
        counts.frames,
        start.elapsed().as_millis()
    ));
    // New names can make stacks one code path that were not before.
    report::merge::remerge(&mut rep, metric);
    write_to(output, |out| {
        write_as(&rep, format, metric, &mut |m| symbolizer.build_id(m), out)
    })
}

/// `tracer diff`.
pub fn diff(opts: &DiffOptions) -> anyhow::Result<()> {
    let before = crate::diff::read_report(&opts.before)?;
    let after = crate::diff::read_report(&opts.after)?;
    let d = crate::diff::diff(&before, &after, opts.metric);
    write_to(opts.output.as_deref(), |out| crate::diff::write(&d, opts.format, out))
}
