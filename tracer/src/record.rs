//! `tracer record`: attach (or launch), poll the probes until told to stop, detach, report.
use std::{
    fs::File,
    io::{BufWriter, Write},
    num::NonZeroU32,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

use crate::{
    aggregate::aggregate,
    options::{Format, RecordOptions, TargetSpec},
    probe::{
        Backend,
        ebpf::{EbpfProbes, SyscallTarget},
    },
    report::{self, Meta},
    symbolize::{Symbolizer, maps::ProcMaps},
    target::{self, LaunchEvent, Launched},
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
    check_privileges()?;
    install_signal_handlers()?;

    let (info, libc, mut maps, launched) = match &opts.target {
        TargetSpec::Pid(pid) => {
            let info = target::inspect(*pid)?;
            let maps = ProcMaps::read(*pid)?;
            let libc = target::libc_of(*pid, &maps, &info.command)?;
            (info, libc, maps, None)
        }
        TargetSpec::Launch(argv) => {
            let launched = Launched::start(argv)?;
            (
                launched.info.clone(),
                launched.libc.clone(),
                launched.maps.clone(),
                Some(launched),
            )
        }
    };
    let pid = info.pid;
    let nz_pid = NonZeroU32::new(pid).context("pid 0")?;
    let libc_host = PathBuf::from(format!("/proc/{pid}/root{libc}"));
    let in_other_mount_ns = {
        let ns = |p: &str| std::fs::read_link(p).ok();
        ns("/proc/self/ns/mnt") != ns(&format!("/proc/{pid}/ns/mnt"))
    };
    // Module paths are as the target sees them. In our own mount namespace "/" serves, and
    // outlives the target; in a container only /proc/PID/root does, and it goes with the
    // process, so modules are then read while it is alive (see `warm`).
    let mut symbolizer = Symbolizer::new(if in_other_mount_ns {
        PathBuf::from(format!("/proc/{pid}/root"))
    } else {
        PathBuf::from("/")
    });
    let warm = |symbolizer: &mut Symbolizer, maps: &ProcMaps| {
        if in_other_mount_ns {
            for m in maps.mappings() {
                if let (Some(path), true) = (&m.path, m.perms.contains('x')) {
                    let _ = symbolizer.function(path, m.offset);
                }
            }
        }
    };
    warm(&mut symbolizer, &maps);

    let ebpf = EbpfProbes::attach(
        nz_pid,
        &libc_host,
        opts.limits,
        Some(SyscallTarget {
            libc: &libc,
            maps: &maps,
        }),
    )
    .with_context(|| format!("attach to pid {pid} ({})", info.command))?;
    for warning in &ebpf.warnings {
        eprintln!("tracer: {warning}");
    }
    let mut probes: Box<dyn Backend> = Box::new(ebpf);
    let slow: Vec<String> = probes
        .sites()
        .iter()
        .filter(|s| !s.emulated)
        .map(|s| format!("{}+{:#x}", s.function, s.offset))
        .collect();
    eprintln!(
        "tracer: recording pid {pid} ({}): {} probes on {libc}{}",
        info.command,
        probes.sites().len(),
        if slow.is_empty() {
            String::new()
        } else {
            format!("; single-stepped (slower): {}", slow.join(", "))
        }
    );
    if let Some(l) = &launched {
        l.release();
    }

    let start = Instant::now();
    let mut last_maps = Instant::now();
    let mut next_interval = opts.interval.map(|i| start + i);
    let mut exit_code = None;
    loop {
        std::thread::sleep(TICK);
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
                    LaunchEvent::Exiting(text) => {
                        if let Ok(m) = ProcMaps::parse(&text) {
                            maps.update(m);
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
        if last_maps.elapsed() >= MAPS_REFRESH {
            if let Ok(m) = ProcMaps::read(pid) {
                maps.update(m);
                warm(&mut symbolizer, &maps);
            }
            last_maps = Instant::now();
        }
        if let Some(due) = next_interval {
            if Instant::now() >= due {
                let snapshot = probes.snapshot().map_err(|e| anyhow::anyhow!(e))?;
                let profile = aggregate(&snapshot, &maps);
                let meta = Meta {
                    pid,
                    command: info.command.clone(),
                    duration_ms: start.elapsed().as_millis() as u64,
                };
                let rep = report::build(&profile, &meta, opts.top, &mut symbolizer);
                let mut err = std::io::stderr().lock();
                let _ = writeln!(err, "--- snapshot at {:.1} s", start.elapsed().as_secs_f64());
                let _ = report::text::write(&rep, &mut err);
                next_interval = opts.interval.map(|i| due + i);
            }
        }
    }
    let duration_ms = start.elapsed().as_millis() as u64;

    // Final numbers first, then let the target go before the slower symbolization.
    let snapshot = probes.snapshot().map_err(|e| anyhow::anyhow!(e))?;
    if exit_code.is_none() {
        if let Ok(m) = ProcMaps::read(pid) {
            maps.update(m);
        }
    }
    drop(probes);
    if let Some(l) = &launched {
        if exit_code.is_none() {
            l.detach();
        }
    }

    let profile = aggregate(&snapshot, &maps);
    let meta = Meta {
        pid,
        command: info.command.clone(),
        duration_ms,
    };
    let rep = report::build(&profile, &meta, opts.top, &mut symbolizer);
    write_report(&rep, opts)?;

    if let Some(l) = launched {
        // The command runs on after recording stops; its status is ours.
        while exit_code.is_none() {
            match l.events.recv() {
                Ok(LaunchEvent::Exited(code)) => exit_code = Some(code),
                Ok(LaunchEvent::Exiting(_)) => {}
                Err(_) => break,
            }
        }
    }
    Ok(Outcome { exit_code })
}

fn write_report(rep: &report::Report, opts: &RecordOptions) -> anyhow::Result<()> {
    let mut out: Box<dyn Write> = match &opts.output {
        Some(path) => Box::new(BufWriter::new(
            File::create(path).with_context(|| format!("create {}", path.display()))?,
        )),
        None => Box::new(BufWriter::new(std::io::stdout().lock())),
    };
    let result = match opts.format {
        Format::Text => report::text::write(rep, &mut out),
        Format::Json => report::json::write(rep, &mut out),
    }
    .and_then(|()| out.flush());
    match result {
        // Piped into `head`: not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("write report"),
    }
}
