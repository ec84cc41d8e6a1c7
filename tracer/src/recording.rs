//! One recording session: attach to a process (or launch one), keep the probes' view of it
//! fresh tick by tick, take profiles, detach. `record` and `top` are its two consumers.
use std::{
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
    inject::inject::Injected,
    memmap::{self, ClassTotals, StackMemory},
    options::{BackendChoice, RecordOptions, TargetSpec},
    probe::{
        Backend, Snapshot,
        ebpf::{EbpfProbes, SamplerSites, SyscallTarget},
        ptrace::{PtraceOptions, PtraceProbes},
        sampled::SampledProbes,
    },
    regions::Regions,
    report::{self, Meta, Ranking, Report},
    symbolize::{Symbolizer, maps::ProcMaps, perfmap},
    target::{self, LaunchEvent, Launched, ProcessInfo},
    v8::{self, JsNamer},
};

/// How often a consumer should call [`Recording::tick`]: the loop wakes this often to look
/// at signals, the target and the clock.
pub const TICK: Duration = Duration::from_millis(50);
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

/// Whether SIGINT or SIGTERM arrived since the recording started.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::Relaxed)
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

/// What a tick found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Running,
    /// The target has exited (a launched command's status is in [`Recording::exit_code`]).
    Ended,
}

/// A process being recorded: the probes on it and everything read of it so far.
pub struct Recording {
    info: ProcessInfo,
    /// A thread of the process that is alive: /proc shows its memory through it.
    task: u32,
    peak: PeakTracker,
    maps: ProcMaps,
    symbolizer: Symbolizer,
    /// Names the JavaScript frames the walker captures (a V8 process, walked in the kernel).
    js: Option<JsNamer>,
    /// The target lives in another mount namespace: its modules are read while it is alive.
    in_other_mount_ns: bool,
    /// None once detached.
    probes: Option<Box<dyn Backend>>,
    /// The in-process sampler, while its entries are patched into the target (see `inject`).
    sampler: Option<Injected>,
    regions: Regions,
    memory: MemoryView,
    history: History,
    sampling: Option<report::Sampling>,
    launched: Option<Launched>,
    /// A launched command's smaps and resident pages at its exit stop.
    at_exit: Option<(String, crate::pagemap::Present)>,
    /// When a launched command stopped to exit: the moment `--min-age` measures ages at.
    exit_seen: Option<Instant>,
    /// Whether node was started with the perf-map flags by us (see [`Recording::end`]).
    added_jit_flags: bool,
    start: Instant,
    last_maps: Instant,
    /// When recording ended (its length is fixed from then on).
    ended_at: Option<Instant>,
    exit_code: Option<i32>,
    exited: bool,
}

impl Recording {
    /// Attaches to (or launches) the target of `opts`, places the probes, and lets a
    /// launched command run. Prints one line on stderr saying what is recorded.
    pub fn start(opts: &RecordOptions) -> anyhow::Result<Recording> {
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

        let mut added_jit_flags = false;
        let (info, libc, maps, launched) = match &opts.target {
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
                let launched =
                    Launched::start(jit_argv.as_deref().unwrap_or(argv), opts.command_output.as_deref())?;
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
        warm(&mut symbolizer, &maps, in_other_mount_ns);

        let nz_task = NonZeroU32::new(task).context("task 0")?;
        // A V8 process (node): the walker reads its JavaScript frames, named here as they come.
        let v8 = match opts.limits.unwind {
            crate::unwind::UnwindMode::Fp => None,
            _ => v8_walker(task, &maps),
        };
        // Sampling a running process: only sampled calls should trap.
        let mut sampler = match &opts.target {
            TargetSpec::Pid(_) if bpf_refused.is_none() => in_process_sampler(opts, pid),
            _ => None,
        };
        if sampler.is_none() && matches!(opts.target, TargetSpec::Pid(_)) {
            // Through a live thread: the main one may have exited.
            give_back_entries(task)?;
        }
        let mut limits = opts.limits.clone();
        if let Some((_, sites)) = &sampler {
            limits.sampler_sites = Some(sites.clone());
        }
        let attached = attach_backend(opts, &limits, bpf_refused, nz_pid, nz_task, &libc_host, &libc, &maps, launched.as_ref(), v8.as_ref().map(|v| v.0));
        let probes = match (attached, sampler.take()) {
            (Ok(probes), sampler_now) => {
                sampler = sampler_now;
                probes
            }
            (Err(e), Some((injected, _))) => {
                // Back to the kernel's sampling, and the target as it was.
                remove_sampler(injected);
                diag::warn(format_args!("in-process sampler not used: its probe sites could not be attached ({e:#}); sampling in the kernel"));
                limits.sampler_sites = opts.limits.sampler_sites.clone();
                attach_backend(opts, &limits, None, nz_pid, nz_task, &libc_host, &libc, &maps, launched.as_ref(), v8.as_ref().map(|v| v.0))
                    .with_context(|| format!("attach to pid {pid} ({})", info.command))?
            }
            (Err(e), None) => return Err(e.context(format!("attach to pid {pid} ({})", info.command))),
        };
        // Sampling starts once both sites have their probes (see `Injected::install_idle`).
        let sampler = match sampler.map(|(injected, _)| injected) {
            Some(injected) => match injected.start() {
                Ok(()) => Some(injected),
                Err(e) => {
                    remove_sampler(injected);
                    bail!("{e}: the in-process sampler could not be started in pid {pid}");
                }
            },
            None => None,
        };
        let js = v8.filter(|_| probes.name() == "ebpf").map(|(_, layout)| JsNamer::new(layout, task as i32));
        // The tables every report names frames in load on another thread while recording, not
        // when the report needs them.
        symbolizer.preload(main_modules(pid, &libc));
        let slow: Vec<String> = probes
            .sites()
            .iter()
            .filter(|s| !s.emulated)
            .map(|s| format!("{}+{:#x}", s.function, s.offset))
            .collect();
        let on = match &limits.sampler_sites {
            Some(_) if sampler.is_some() => format!(
                "the sampler it runs in-process at {:#x} (sampled calls only; unsampled ones go \
                 straight to {libc})",
                sampler.as_ref().map_or(0, Injected::base)
            ),
            Some(s) if limits.sample_bytes.is_some() && probes.name() == "ebpf" => {
                format!("the in-process sampler's sites ({})", s.path.display())
            }
            _ => libc.clone(),
        };
        if probes.name() == "ptrace" && limits.sample_bytes.is_some() {
            // Sampling without BPF (probe::sampled): no probe at all, the entries jump.
            diag::warn(format_args!(
                "recording pid {pid} ({}): {} allocator entries jump to the sampler it runs \
                 in-process (sampled calls only; unsampled ones go straight to {libc}), its \
                 events read from memory shared with the tracer",
                info.command,
                probes.sites().len(),
            ));
        } else {
            diag::warn(format_args!(
                "recording pid {pid} ({}): {} probes on {on}{}",
                info.command,
                probes.sites().len(),
                if slow.is_empty() {
                    String::new()
                } else {
                    format!("; single-stepped (slower): {}", slow.join(", "))
                }
            ));
        }
        // The mappings that exist now are shown as such; the ones made from here on get stacks.
        // A launched command is still held here, so this is exactly the state the probes met.
        let mut regions = Regions::from_maps(&maps);
        if let Some(brk) = target::start_brk(task) {
            regions.set_initial_break(brk);
        }
        let memory = MemoryView::new(memmap::memory_map(task, &regions, None).ok());
        let sampling = opts.limits.sample_bytes.map(|sample_bytes| report::Sampling { sample_bytes });
        if let Some(l) = &launched {
            l.release();
        }
        Ok(Recording {
            info,
            task,
            peak: PeakTracker::default(),
            maps,
            symbolizer,
            js,
            in_other_mount_ns,
            probes: Some(probes),
            sampler,
            regions,
            memory,
            history: History::default(),
            sampling,
            launched,
            at_exit: None,
            exit_seen: None,
            added_jit_flags,
            start: Instant::now(),
            last_maps: Instant::now(),
            ended_at: None,
            exit_code: None,
            exited: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.info.pid
    }

    pub fn command(&self) -> &str {
        &self.info.command
    }

    /// Time since the probes were in place (until recording ended).
    pub fn elapsed(&self) -> Duration {
        self.ended_at.unwrap_or_else(Instant::now) - self.start
    }

    /// A launched command's exit status, once it has exited.
    pub fn exit_code(&self) -> Option<i32> {
        self.exit_code
    }

    /// The memory map by owner class as last read (at most a second old; at a
    /// launched command's exit, its very end), with changes since the start.
    pub fn memory_map(&self) -> Option<&[ClassTotals]> {
        self.memory.last()
    }

    /// Whether JavaScript frames are named from V8's memory: (functions named, functions left
    /// unnamed); None when they are not read (not V8, `--unwind fp`, ptrace).
    pub fn js_frames(&self) -> Option<(usize, u64)> {
        self.js.as_ref().map(|js| (js.functions_named(), js.failures().iter().map(|(_, n)| n).sum()))
    }

    /// Why captured JavaScript frames stayed unnamed, by kind, most frequent first.
    pub fn js_failures(&self) -> Vec<(&'static str, u64)> {
        self.js.as_ref().map(JsNamer::failures).unwrap_or_default()
    }

    /// Names for frames, kept warm while the target lives.
    pub fn symbolizer(&mut self) -> &mut Symbolizer {
        &mut self.symbolizer
    }

    /// Takes in what happened since the last tick: the mmap family's events, a launched
    /// command's exit, and (each second) the memory map. Call every [`TICK`].
    pub fn tick(&mut self) -> Status {
        if self.exited {
            return Status::Ended;
        }
        if let Some(probes) = &mut self.probes {
            self.peak.observe(probes.as_mut());
        }
        self.drain_syscalls();
        self.name_js_frames();
        let pid = self.info.pid;
        if let Some(l) = &self.launched {
            while let Ok(event) = l.events.try_recv() {
                match event {
                    LaunchEvent::Exiting { at, maps: text, smaps, present } => {
                        self.exit_seen = Some(at);
                        // The last moment its heap can be read: stacks new since the tick.
                        if let (Some(js), Some(probes)) = (&mut self.js, &mut self.probes) {
                            let new = probes.new_js_stacks();
                            js.name_stacks(new.iter().map(|(id, words)| (*id, words.as_slice())));
                        }
                        // One reading, taken while other threads may still map: mended if torn.
                        if let Ok(m) = ProcMaps::parse_torn(&text) {
                            if let Some(probes) = &mut self.probes {
                                probes.exiting(&m);
                            }
                            self.maps.update(m);
                        }
                        self.at_exit = Some((smaps.clone(), present));
                        // The last view of the process, at its very end.
                        let reading =
                            memmap::memory_map_of(&smaps, &self.regions, Vec::new(), self.memory.start());
                        self.memory.at_exit(reading);
                    }
                    LaunchEvent::Exited(code) => {
                        self.exit_code = Some(code);
                        self.exited = true;
                    }
                }
            }
        } else if !target::is_alive(pid) {
            self.exited = true;
        }
        if self.exited {
            return Status::Ended;
        }
        if !target::task_alive(pid, self.task) {
            // The thread /proc shows the process through has exited (the main thread called
            // pthread_exit, say): another live one takes its place. None left is the
            // process's exit; a launched command's status comes from the launcher on a later
            // tick (`top` shows it, and does not wait for it after).
            match target::live_task(pid) {
                Some(task) => {
                    self.task = task;
                    self.symbolizer.set_jit_pid(task);
                    if let Some(js) = &mut self.js {
                        js.set_pid(task as i32);
                    }
                }
                None if self.launched.is_none() => {
                    self.exited = true;
                    return Status::Ended;
                }
                None => {}
            }
        }
        if self.last_maps.elapsed() >= MAPS_REFRESH {
            self.refresh_maps();
            self.last_maps = Instant::now();
        }
        Status::Running
    }

    /// Names the JavaScript frames of stacks new since the last call, while the objects the
    /// walker captured are where it found them (a compacting GC moves them).
    fn name_js_frames(&mut self) {
        if let (Some(js), Some(probes)) = (&mut self.js, &mut self.probes) {
            let new = probes.new_js_stacks();
            js.name_stacks(new.iter().map(|(id, words)| (*id, words.as_slice())));
        }
    }

    fn drain_syscalls(&mut self) {
        if let Some(probes) = &mut self.probes {
            for event in probes.drain_syscalls() {
                self.regions.apply(&event);
            }
        }
    }

    fn refresh_maps(&mut self) {
        let pid = self.task;
        if let Ok(m) = ProcMaps::read(pid) {
            self.maps.update(m);
            warm(&mut self.symbolizer, &self.maps, self.in_other_mount_ns);
        }
        // Kept fresh in case the process exits: its smaps go with it.
        if !self.memory.is_final() {
            self.memory.refreshed(memmap::memory_map(pid, &self.regions, self.memory.start()));
        }
    }

    /// The profile as it stands, without remembering it.
    pub fn profile(&mut self) -> anyhow::Result<Profile> {
        let probes = self.probes.as_mut().context("the probes are detached")?;
        self.peak.observe(probes.as_mut());
        let snapshot = probes.snapshot().map_err(|e| anyhow::anyhow!(e))?;
        let held = StackMemory::measure(self.task, &self.regions).ok();
        let mut profile = profile_of(&snapshot, &self.regions, held.as_ref(), &self.maps, probes.as_mut(), self.js.as_mut());
        self.peak.apply(&mut profile.totals);
        Ok(profile)
    }

    /// The profile as it stands, remembered as a point of every stack's series (`--interval`).
    pub fn snapshot(&mut self) -> anyhow::Result<Profile> {
        let profile = self.profile()?;
        self.history.push(&profile);
        Ok(profile)
    }

    /// The final profile (blocks younger than `min_age` not counted as live); then the
    /// probes come off and a launched command runs on by itself.
    pub fn finish(&mut self, min_age: Option<Duration>) -> anyhow::Result<Profile> {
        let ended_at = *self.ended_at.get_or_insert_with(Instant::now);
        // Let the target go first; the final numbers stay readable, and naming comes last.
        // The in-process sampler's entries before the probes: its sampled calls would
        // otherwise go on while the two sites' links close, and a block whose allocation was
        // seen and whose free was not would count as a missed free when its address came back.
        if let Some(injected) = self.sampler.take() {
            remove_sampler(injected);
        }
        if let Some(probes) = &mut self.probes {
            probes.detach();
        }
        self.drain_syscalls();
        let pid = self.task;
        let probes = self.probes.as_mut().context("the probes are detached")?;
        self.peak.observe(probes.as_mut());
        let mut snapshot = probes.snapshot().map_err(|e| anyhow::anyhow!(e))?;
        if let Some(min_age) = min_age {
            // A block's age is taken when the recording ended (a launched command: at its exit
            // stop), not now: reading and naming may come seconds later on a loaded machine.
            let at = self.exit_seen.unwrap_or(ended_at);
            let old = probes.live_older_than(min_age, at).map_err(|e| anyhow::anyhow!(e))?;
            for s in &mut snapshot.stacks {
                let (bytes, count) = old.get(&s.id).copied().unwrap_or((0, 0));
                s.live_bytes = bytes as i64;
                s.live_allocs = count as i64;
            }
        }
        if self.exit_code.is_none() {
            if let Ok(m) = ProcMaps::read(pid) {
                self.maps.update(m);
            }
            if !self.memory.is_final() {
                self.memory.refreshed(memmap::memory_map(pid, &self.regions, self.memory.start()));
            }
        } else if self.launched.is_some() && !self.memory.is_final() {
            // Its memory could not be read at its exit stop: the map is the last good reading.
            diag::warn(format_args!(
                "memory map: {} could not be read at its exit stop; the map shown was read {:.1} s before its exit was seen",
                self.info.command,
                self.memory.age(ended_at).as_secs_f64()
            ));
        }
        // What the mmap/brk stacks hold in RAM: now, or at the launched command's exit stop.
        let held = match &self.at_exit {
            Some((smaps, present)) if self.exit_code.is_some() => {
                StackMemory::at_exit(smaps, present, &self.regions).ok()
            }
            _ => StackMemory::measure(self.task, &self.regions).ok(),
        };
        let probes = self.probes.as_mut().context("the probes are detached")?;
        let mut profile = profile_of(&snapshot, &self.regions, held.as_ref(), &self.maps, probes.as_mut(), self.js.as_mut());
        self.peak.apply(&mut profile.totals);
        if !self.history.is_empty() {
            self.history.push(&profile);
            self.history.apply(&mut profile);
        }
        self.detach();
        Ok(profile)
    }

    /// Takes the probes off; a launched command runs on by itself.
    pub fn detach(&mut self) {
        self.ended_at.get_or_insert_with(Instant::now);
        // The entries first, so that no new sampled call comes; a call already in the sampler
        // reaches its probe site while the probes are still there.
        if let Some(injected) = self.sampler.take() {
            remove_sampler(injected);
        }
        drop(self.probes.take());
        if let Some(l) = &self.launched {
            if self.exit_code.is_none() {
                l.detach();
            }
        }
    }

    /// Who was recorded, and for how long so far.
    pub fn meta(&self) -> Meta {
        Meta {
            pid: self.info.pid,
            command: self.info.command.clone(),
            duration_ms: self.elapsed().as_millis() as u64,
            sampling: self.sampling,
        }
    }

    /// A report of `profile`: stacks named, merged, ranked and cut as `ranking` says.
    pub fn report(&mut self, profile: &Profile, ranking: Ranking) -> Report {
        let meta = self.meta();
        // The perf map as the process has written it so far (it stays in /tmp after an exit).
        self.symbolizer.refresh(&self.maps);
        report::build(profile, &meta, ranking, &mut self.symbolizer)
    }

    /// Ends the session: detaches if still attached; with `wait_for_command`, waits for a
    /// launched command to exit and returns its status. The perf map the tracer made node
    /// write is removed once node is gone.
    pub fn end(mut self, wait_for_command: bool) -> Option<i32> {
        self.detach();
        if let Some(l) = &self.launched {
            // The command runs on after recording stops; its status is ours.
            while wait_for_command && self.exit_code.is_none() {
                match l.events.recv() {
                    Ok(LaunchEvent::Exited(code)) => self.exit_code = Some(code),
                    Ok(LaunchEvent::Exiting { .. }) => {}
                    // Nobody can tell any more: unknown, which is not success.
                    Err(_) => self.exit_code = Some(-1),
                }
            }
        }
        if self.added_jit_flags && self.exit_code.is_some() {
            // The perf map exists only because we asked node for it, it has been read, and its
            // writer is gone: leave no file behind.
            self.symbolizer.remove_perf_map();
        }
        self.exit_code
    }
}

impl Drop for Recording {
    /// A recording dropped on an error path still gives the target its allocator entries back.
    fn drop(&mut self) {
        if let Some(injected) = self.sampler.take() {
            remove_sampler(injected);
        }
    }
}

/// Reads what only the living process can give: JIT code regions and perf-map entries, and,
/// for a process in another mount namespace, its executable modules.
fn warm(symbolizer: &mut Symbolizer, maps: &ProcMaps, in_other_mount_ns: bool) {
    symbolizer.refresh(maps);
    if in_other_mount_ns {
        for m in maps.mappings() {
            if let (Some(path), true) = (&m.path, m.perms.contains('x')) {
                let _ = symbolizer.function(path, m.offset);
            }
        }
    }
}

/// The memory map by owner class: as read when the probes went on, and the last good
/// reading since. A reading that failed (the process gone, its smaps empty) leaves the last
/// one in place: the report shows that one rather than zeros. A launched command's reading at
/// its exit stop is its very end: nothing read after it (a process going away) replaces it.
struct MemoryView {
    start: Option<Vec<ClassTotals>>,
    last: Option<Vec<ClassTotals>>,
    /// When `last` was read.
    read_at: Instant,
    /// `last` was read at the exit stop.
    at_exit: bool,
}

impl MemoryView {
    fn new(start: Option<Vec<ClassTotals>>) -> MemoryView {
        MemoryView {
            last: start.clone(),
            start,
            read_at: Instant::now(),
            at_exit: false,
        }
    }

    /// The first view, which changes are measured against.
    fn start(&self) -> Option<&[ClassTotals]> {
        self.start.as_deref()
    }

    fn last(&self) -> Option<&[ClassTotals]> {
        self.last.as_deref()
    }

    /// Whether the map is the one read at the exit stop.
    fn is_final(&self) -> bool {
        self.at_exit
    }

    /// How long before `then` the map shown was read.
    fn age(&self, then: Instant) -> Duration {
        then.saturating_duration_since(self.read_at)
    }

    /// A reading taken while the process runs.
    fn refreshed(&mut self, reading: Result<Vec<ClassTotals>, memmap::SmapsError>) {
        if let (Ok(map), false) = (reading, self.at_exit) {
            self.last = Some(map);
            self.read_at = Instant::now();
        }
    }

    /// The reading taken at a launched command's exit stop.
    fn at_exit(&mut self, reading: Result<Vec<ClassTotals>, memmap::SmapsError>) {
        if let Ok(map) = reading {
            self.last = Some(map);
            self.read_at = Instant::now();
            self.at_exit = true;
        }
    }
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
    limits: &crate::probe::ebpf::Limits,
    bpf_refused: Option<anyhow::Error>,
    pid: NonZeroU32,
    task: NonZeroU32,
    libc_host: &Path,
    libc: &str,
    maps: &ProcMaps,
    launched: Option<&Launched>,
    v8: Option<crate::probe::ebpf::V8Walker>,
) -> anyhow::Result<Box<dyn Backend>> {
    let why_not_bpf = match (opts.backend, bpf_refused) {
        (BackendChoice::Ptrace, _) => None,
        (_, Some(refused)) => Some(format!("{refused:#}")),
        (choice, None) => {
            let attached = EbpfProbes::attach(
                pid,
                task,
                libc_host,
                crate::probe::ebpf::Limits { v8, ..limits.clone() },
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
    if limits.sample_bytes.is_some() {
        return sampled_without_bpf(pid, limits, launched, why_not_bpf);
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
            limits: limits.clone(),
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

/// `--sample-bytes` without eBPF: the in-process sampler with its events read from a ring
/// shared with it (no trap per call, see `probe::sampled`). A running process only: a
/// launched command would have to be stopped once its C library is loaded.
fn sampled_without_bpf(
    pid: NonZeroU32,
    limits: &crate::probe::ebpf::Limits,
    launched: Option<&Launched>,
    why_not_bpf: Option<String>,
) -> anyhow::Result<Box<dyn Backend>> {
    let why = why_not_bpf.map(|w| format!("eBPF unavailable ({w}); ")).unwrap_or_default();
    if launched.is_some() {
        bail!("{why}--sample-bytes with the ptrace backend samples a running process: start the command, then attach with --pid");
    }
    let probes = SampledProbes::attach(pid.get(), limits.clone())
        .map_err(|e| anyhow::anyhow!("{why}the in-process sampler could not be put in: {e}"))?;
    if !why.is_empty() {
        // Asked for by `auto`: say why, once; the recording line says how it samples.
        diag::warn(format_args!("{why}sampling through the in-process sampler's shared memory instead"));
    }
    Ok(Box::new(probes))
}

/// `--sample-bytes` on a running process with the default backend: the in-process sampler
/// (`inject`), so that unsampled calls cost nanoseconds instead of two traps; and where its
/// probe sites are, for the eBPF backend. None, said in one line, where it cannot be had (the
/// kernel then samples, as `--backend ebpf` always does).
fn in_process_sampler(opts: &RecordOptions, pid: u32) -> Option<(Injected, SamplerSites)> {
    let mean = opts.limits.sample_bytes?;
    if opts.backend != BackendChoice::Auto || opts.limits.sampler_sites.is_some() {
        return None;
    }
    let injected = match Injected::install_idle(pid as i32, mean) {
        Ok(injected) => injected,
        Err(e) => {
            diag::warn(format_args!("in-process sampler not used ({e}); sampling in the kernel"));
            return None;
        }
    };
    if !injected.report.missing_internal.is_empty() {
        // Without them a call glibc makes to malloc from inside those functions would be
        // taken for the program's own, and counted twice.
        diag::warn(format_args!(
            "in-process sampler: glibc's {} not found (is its debug file, libc6-dbg, installed?): \
             allocations glibc makes inside them may be counted twice",
            injected.report.missing_internal.join(", ")
        ));
    }
    match sites_of(&injected) {
        Some(sites) => Some((injected, sites)),
        None => {
            remove_sampler(injected);
            diag::warn("in-process sampler not used (its probe sites are not in a mapping of its file); sampling in the kernel");
            None
        }
    }
}

/// The sampler's probe sites as a uprobe needs them: a path to the file it was mapped from (the
/// target's `map_files` entry of the mapping, which leads to the memfd) and file offsets.
fn sites_of(injected: &Injected) -> Option<SamplerSites> {
    let pid = injected.pid();
    let maps = ProcMaps::read(pid as u32).ok()?;
    let (alloc, free) = injected.sites();
    let m = maps.find(alloc)?;
    let f = maps.find(free)?;
    if (f.start, f.end) != (m.start, m.end) {
        return None;
    }
    Some(SamplerSites {
        path: PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end)),
        alloc_offset: m.offset + (alloc - m.start),
        free_offset: m.offset + (free - m.start),
    })
}

/// A tracer that was killed leaves its in-process sampler in the target, the allocator entries
/// still jumping to it. A breakpoint written over such a jump (a uprobe, or the ptrace
/// backend's) would resume the target in the middle of it: so before any probe goes on the
/// allocators, the entries are given back. Refused in one line if that cannot be done.
fn give_back_entries(pid: u32) -> anyhow::Result<()> {
    let left = match Injected::take_over(pid as i32) {
        Ok(Some(left)) => left,
        Ok(None) => return Ok(()),
        Err(e) => bail!("{e}: an in-process sampler left by an earlier tracer could not be taken over, and probes on its jumps would break the process"),
    };
    let patched = left.patched().len();
    if patched == 0 {
        return Ok(());
    }
    left.remove().map_err(|e| {
        anyhow::anyhow!("{e}: the allocator entries still jump to an in-process sampler left by an earlier tracer, and probes on them would break the process")
    })?;
    diag::warn(format_args!(
        "gave back {patched} allocator entries that an earlier tracer's in-process sampler had kept"
    ));
    Ok(())
}

/// Puts the target's allocator entries back; the sampler stays mapped and inert. A failure is
/// said: the sampler then stays active in the target, which runs on as before (see `inject`).
fn remove_sampler(injected: Injected) {
    if let Err(e) = injected.remove() {
        diag::warn(format_args!("{e}; the in-process sampler stays in the target, calling its allocator"));
    }
}

/// The malloc stacks of a snapshot and the stacks that mapped memory themselves, with their
/// JavaScript frames named by `js`: the stacks it was not told of in time are named now.
fn profile_of(
    snapshot: &Snapshot,
    regions: &Regions,
    held: Option<&StackMemory>,
    maps: &ProcMaps,
    probes: &mut dyn Backend,
    mut js: Option<&mut JsNamer>,
) -> Profile {
    let by_stack = regions.by_stack();
    let mut mapped_words: Vec<(u64, Vec<u64>)> = Vec::new();
    if let Some(js) = js.as_deref_mut() {
        js.name_stacks(snapshot.stacks.iter().map(|s| (s.id, s.frames.as_slice())));
        mapped_words = by_stack.keys().map(|&(id, _)| (id, probes.stack_frames(id).unwrap_or_default())).collect();
        js.name_stacks(mapped_words.iter().map(|(id, words)| (*id, words.as_slice())));
    }
    let js = js.as_deref();
    let mut profile = aggregate(snapshot, maps, js);
    add_mapped(&mut profile, &by_stack, held, |id| probes.stack_frames(id).unwrap_or_default(), maps, js);
    profile.totals.unnamed_js_frames = js.map_or(0, |js| {
        snapshot.stacks.iter().map(|s| js.unnamed_in(&s.frames)).sum::<u64>()
            + mapped_words.iter().map(|(_, words)| js.unnamed_in(words)).sum::<u64>()
    });
    profile
}

/// The walker's view of the target's V8, when its executable is a V8 embedder (node) whose
/// metadata the walker can read; else None, said in one line when the binary is one but
/// cannot be read (its JavaScript frames then stay unnamed, as without this).
fn v8_walker(task: u32, maps: &ProcMaps) -> Option<(crate::probe::ebpf::V8Walker, v8::V8Layout)> {
    use std::os::unix::fs::MetadataExt as _;
    let exe = std::fs::metadata(format!("/proc/{task}/exe")).ok()?;
    let mapping = maps
        .mappings()
        .iter()
        .find(|m| m.inode == exe.ino() && m.dev == exe.dev() && m.perms.as_bytes().get(2) == Some(&b'x'))?;
    let file = crate::unwind::process::read_module(task, mapping)?;
    let layout = match v8::V8Layout::from_elf(file.as_slice()) {
        Ok(layout) => layout,
        // Not V8 at all: nothing to say.
        Err(v8::MissingConstant::Missing("v8dbg_TaggedSize")) | Err(v8::MissingConstant::NotElf(_)) => return None,
        Err(e) => {
            diag::warn(format_args!("JavaScript frames: {e}"));
            return None;
        }
    };
    let mut mark_compact = [0; 2];
    for (slot, &offset) in mark_compact.iter_mut().zip(&layout.mark_compact) {
        *slot = offset;
    }
    match v8::capture::walker_config(&layout) {
        Ok(config) => Some((
            crate::probe::ebpf::V8Walker { config, binary: (mapping.dev, mapping.inode), mark_compact },
            layout,
        )),
        Err(why) => {
            diag::warn(format_args!("JavaScript frames stay unnamed: {why}"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(rss: u64) -> Vec<ClassTotals> {
        vec![ClassTotals { class: "malloc".into(), mappings: 1, reserved_bytes: rss, rss_bytes: rss, rss_delta_bytes: 0 }]
    }

    fn gone() -> Result<Vec<ClassTotals>, memmap::SmapsError> {
        Err(memmap::SmapsError::NoMemory)
    }

    /// Regression (mmap_e2e flaked): the once-a-second refresh came after the exit stop's
    /// reading and before the exit status, read the exited main thread's empty smaps, and the
    /// report showed every class at 0.
    #[test]
    fn nothing_read_after_the_exit_stop_replaces_its_map() {
        let mut view = MemoryView::new(Some(map(1)));
        view.refreshed(Ok(map(2)));
        view.at_exit(Ok(map(3)));
        assert!(view.is_final());
        view.refreshed(gone());
        view.refreshed(Ok(map(0)));
        assert_eq!(view.last(), Some(&map(3)[..]));
        assert_eq!(view.start(), Some(&map(1)[..]));
    }

    /// A reading that fails, at the exit stop or before, leaves the last good one in place.
    #[test]
    fn a_failed_reading_keeps_the_last_good_one() {
        let mut view = MemoryView::new(Some(map(1)));
        view.refreshed(Ok(map(2)));
        view.refreshed(gone());
        assert_eq!(view.last(), Some(&map(2)[..]));
        view.at_exit(gone());
        assert!(!view.is_final());
        assert_eq!(view.last(), Some(&map(2)[..]));
    }
}
