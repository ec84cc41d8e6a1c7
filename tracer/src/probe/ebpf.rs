//! The eBPF backend: loads the programs of tracer-ebpf, attaches them to one process's C
//! library, and reads the in-kernel totals back as [`Snapshot`]s.
use std::{
    collections::HashMap as StdHashMap,
    os::fd::{AsFd as _, AsRawFd as _},
    num::NonZeroU32,
    path::Path,
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray},
};
use tracer_common::{
    AllocKind, LiveAlloc, STACK_LOST, StackBuf, StackStats, SyscallEvent, cookie, counter,
    syscall_counter,
};

use super::{
    Backend, Counters, ProbeError, ProbeSite, Snapshot, StackSample, allocator_losses, libc,
    placement,
    anchor,
    session::{self, LinkKind, UprobeLink},
    syscalls::SyscallTracing,
};
use crate::{
    symbolize::maps::ProcMaps,
    unwind::{UnwindMode, kernel::KernelTables},
};

/// With the walker's tables loaded and no mmap-family events to say when a library appears
/// (sampling mode), the maps are read again this often.
const UNWIND_POLL: Duration = Duration::from_millis(200);
/// With those events, the maps are read again at each library mapped, and this often for JIT
/// code regions (which the kernel side recognises meanwhile by asking the kernel: see
/// tracer-ebpf/src/stack.rs).
const UNWIND_POLL_JIT: Duration = Duration::from_secs(1);

static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("load BPF programs")]
    Load(#[source] aya::EbpfError),
    #[error("BPF map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(transparent)]
    Libc(#[from] libc::LibcError),
    #[error(transparent)]
    Session(#[from] super::session::SessionError),
    #[error("load the unwind tables")]
    Unwind(#[from] crate::unwind::kernel::TablesError),
    #[error(
        "the main thread of pid {pid} has exited (pthread_exit), and the uprobes that stand in \
         for it cannot be opened on its thread {thread}: {source}"
    )]
    Anchor {
        pid: u32,
        thread: u32,
        #[source]
        source: std::io::Error,
    },
}

/// Sizes of the kernel-side tables, and the sampling rate.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Live blocks tracked at once.
    pub max_live: u32,
    /// Distinct stacks kept.
    pub max_stacks: u32,
    /// Sampling mode: one sample per this many allocated bytes on average (Poisson), per-stack
    /// figures are estimates. None records every call.
    pub sample_bytes: Option<u64>,
    /// How stacks are walked (`--unwind`).
    pub unwind: UnwindMode,
    /// The target runs V8: the walker reads its frames (not with `--unwind fp`).
    pub v8: Option<V8Walker>,
    /// Sampling mode with the in-process sampler mapped in the target: the probes go on its
    /// probe sites instead of the C library's allocators, and only the calls it sampled (at
    /// `sample_bytes`, which must be its mean) reach them.
    pub sampler_sites: Option<SamplerSites>,
}

/// Where the in-process sampler's probe sites are (`tracer_alloc_site`, `tracer_free_site`).
///
/// A uprobe is placed on an inode, found from `path` when the link is made: any path that
/// resolves to the file the target mapped will do. For a sampler mapped from a memfd that is
/// the memfd's `/proc/TRACER_PID/fd/N` while the tracer holds it, or the target's
/// `/proc/PID/map_files/START-END` of any mapping of it (root, or CAP_SYS_ADMIN, may open
/// those); both are followed to the memfd's inode.
#[derive(Clone, Debug)]
pub struct SamplerSites {
    pub path: std::path::PathBuf,
    /// File offsets of the two sites.
    pub alloc_offset: u64,
    pub free_offset: u64,
}

/// What the walker needs to read a V8 process's JavaScript frames.
#[derive(Clone, Copy, Debug)]
pub struct V8Walker {
    pub config: tracer_common::V8Config,
    /// (dev, inode) of the binary holding V8's embedded builtins.
    pub binary: (u64, u64),
    /// File offsets in it of V8's mark-compact entry points (0: none), probed so that the
    /// walker may keep what it read of SharedFunctionInfos until the next collection.
    pub mark_compact: [u64; 2],
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_live: 512 * 1024,
            max_stacks: 64 * 1024,
            sample_bytes: None,
            unwind: UnwindMode::default(),
            v8: None,
            sampler_sites: None,
        }
    }
}

pub struct EbpfProbes {
    ebpf: Ebpf,
    /// Keys of new stacks with V8 frames, announced by the walker; and those announced whose
    /// handed-over walk was not finished yet.
    new_js_stacks: Option<aya::maps::RingBuf<MapData>>,
    js_waiting: Vec<u64>,
    stacks: StdHashMap<u64, Vec<u64>>,
    pub sites: Vec<ProbeSite>,
    /// mmap-family tracing, when tracefs and the tracepoints could be had.
    syscalls: Option<SyscallTracing>,
    /// Said once on stderr by the caller: what could not be traced, and why.
    pub warnings: Vec<String>,
    /// Stand-ins for an exited main thread (see `anchor`); empty for most processes.
    anchors: Vec<std::os::fd::OwnedFd>,
    /// Sampling mode: the mean bytes per sample.
    sampling: Option<u64>,
    /// The allocator and free probes; empty once detached.
    links: Vec<UprobeLink>,
    /// The BPF walker's tables (`--unwind dwarf|auto`), and when the maps were last read.
    unwind: Option<(KernelTables, std::time::Instant)>,
    /// Walks the kernel handed over (see `DeferredStack`), the tables that finish them (made
    /// at the first), and their frames by token.
    deferred: Option<aya::maps::RingBuf<MapData>>,
    finisher: Option<crate::unwind::process::ProcessTables>,
    finished: StdHashMap<u64, Vec<u64>>,
    /// The target's maps as last read (or as given at its exit, then `exit_maps`).
    last_maps: Option<ProcMaps>,
    exit_maps: bool,
    /// Handed-over walks not finished yet (their process gone before its exit was seen).
    unfinished: Vec<tracer_common::DeferredStack>,
    pid: u32,
    /// A live thread of the process (its leader, unless that has exited).
    thread: u32,
    unwind_mode: UnwindMode,
}

impl Drop for EbpfProbes {
    fn drop(&mut self) {
        Backend::detach(self);
    }
}

/// Drops every handle in `handles` on a thread of its own and waits for all: closing the last
/// descriptor of a uprobe or tracepoint attachment waits for an RCU grace period (70-115 ms
/// here), and waits that overlap end together. A thread that cannot be started drops its
/// handle on this one.
pub fn close_at_once(handles: Vec<Box<dyn Send>>) {
    std::thread::scope(|scope| {
        for handle in handles {
            // On failure the closure, and the handle in it, is dropped right here.
            let _ = std::thread::Builder::new()
                .name("tracer-detach".into())
                .spawn_scoped(scope, move || drop(handle));
        }
    });
}

/// What the mmap-family tracing needs to know of the target.
pub struct SyscallTarget<'a> {
    /// The C library's path as the target sees it.
    pub libc: &'a str,
    pub maps: &'a ProcMaps,
}

impl EbpfProbes {
    /// Tells the allocator programs where the recording stands (see `PHASE` in the BPF
    /// crate). When stopping this is best effort: if the map cannot be written, a stop may
    /// count a few calls as stale, as it did before the phase existed.
    fn set_phase(ebpf: &mut Ebpf, phase: u32) -> Result<(), EbpfError> {
        let map = ebpf.map_mut("PHASE").ok_or(EbpfError::Map {
            name: "PHASE",
            source: aya::maps::MapError::InvalidName { name: "PHASE".into() },
        })?;
        let mut flag = aya::maps::Array::<&mut MapData, u32>::try_from(map)
            .map_err(|source| EbpfError::Map { name: "PHASE", source })?;
        flag.set(0, phase, 0).map_err(|source| EbpfError::Map { name: "PHASE", source })
    }

    /// Loads the programs and attaches them to the C library at `libc_path` (a path this
    /// process can open, e.g. through /proc/PID/root) for process `pid` only, opening the
    /// uprobes on its live thread `thread` (the main thread, unless that has exited).
    pub fn attach(
        pid: NonZeroU32,
        thread: NonZeroU32,
        libc_path: &Path,
        limits: Limits,
        syscall_target: Option<SyscallTarget<'_>>,
    ) -> Result<Self, EbpfError> {
        let functions = libc::functions(libc_path, libc::REQUIRED, libc::OPTIONAL)?;
        let tgid = pid.get();
        // The walker's rows for every module mapped now, built before load to size the array.
        let walk_maps = match limits.unwind {
            UnwindMode::Fp => None,
            _ => Some(read_maps(tgid, thread.get()).unwrap_or_default()),
        };
        // Files are read through a live thread's /proc entry (an exited leader has none).
        let mut tables = walk_maps.as_ref().map(|maps| KernelTables::new(thread.get(), maps));
        if let (Some(t), Some(v8)) = (&mut tables, &limits.v8) {
            t.set_v8_binary(v8.binary);
        }
        // Lets the walker ask the kernel whether an address it has no table entry for is JIT
        // code mapped since; without the kernel's BTF it does not ask.
        let vma = super::btf::vma_offsets().unwrap_or((u64::MAX, u64::MAX));
        let mut ebpf = EbpfLoader::new()
            .override_global("TARGET_TGID", &tgid, true)
            .override_global("SAMPLE_BYTES", &limits.sample_bytes.unwrap_or(0), true)
            .override_global("STACK_HASH_MASK", &stack_hash_mask(), true)
            .override_global("UNWIND_MODE", &limits.unwind.bpf_value(), true)
            .override_global("VMA_FLAGS_OFFSET", &vma.0, true)
            .override_global("VMA_FILE_OFFSET", &vma.1, true)
            .map_max_entries("LIVE", limits.max_live)
            .map_max_entries("STATS", limits.max_stacks)
            .map_max_entries("STACKS", limits.max_stacks)
            .map_max_entries("UNWIND_ROWS", tables.as_ref().map_or(1, KernelTables::capacity_wanted))
            .map_max_entries("UNWIND_PAGES", tables.as_ref().map_or(1, KernelTables::pages_wanted))
            .load(PROGRAMS)
            .map_err(EbpfError::Load)?;
        let mut warnings = Vec::new();
        if let (Some(t), Some(maps)) = (&mut tables, &walk_maps) {
            t.install(&mut ebpf, maps)?;
            warnings.extend(t.take_losses());
        }
        // Before any probe fires: the walker reads V8 frames from the first allocation on.
        let v8_on = match (&tables, &limits.v8) {
            (Some(_), Some(v8)) => {
                let map = ebpf.map_mut("V8_CONFIG").ok_or(EbpfError::Map {
                    name: "V8_CONFIG",
                    source: aya::maps::MapError::InvalidName { name: "V8_CONFIG".into() },
                })?;
                let mut config: aya::maps::Array<&mut MapData, tracer_common::V8Config> =
                    aya::maps::Array::try_from(map).map_err(|source| EbpfError::Map { name: "V8_CONFIG", source })?;
                config.set(0, v8.config, 0).map_err(|source| EbpfError::Map { name: "V8_CONFIG", source })?;
                true
            }
            _ => false,
        };

        {
            // Allocations whose stack is lost still count, under this key; it must exist
            // before the first probe fires, since the kernel side cannot create it when the
            // stats map is full.
            let map = ebpf.map_mut("STATS").ok_or(EbpfError::Map {
                name: "STATS",
                source: aya::maps::MapError::InvalidName { name: "STATS".into() },
            })?;
            let mut stats: HashMap<&mut MapData, u64, StackStats> =
                HashMap::try_from(map).map_err(|source| EbpfError::Map { name: "STATS", source })?;
            stats
                .insert(STACK_LOST, StackStats::default(), 0)
                .map_err(|source| EbpfError::Map { name: "STATS", source })?;
        }

        // One probe per address: aligned_alloc and memalign are one function in glibc.
        let mut sites: Vec<(&'static str, AllocKind, u64)> = Vec::new();
        for &(name, kind) in libc::ALLOCATORS {
            if let Some(f) = functions.get(name) {
                if !sites.iter().any(|s| s.2 == f.file_offset) {
                    sites.push((name, kind, f.file_offset));
                }
            }
        }
        let free = &functions["free"];
        let free_at = placement::entry_placement(&free.prologue);
        let mut attached = vec![ProbeSite {
            function: "free",
            offset: free_at.offset,
            emulated: free_at.emulated,
            returns: false,
        }];
        attached.extend(sites.iter().map(|&(name, _, _)| ProbeSite {
            function: name,
            offset: 0,
            emulated: placement::is_emulated(&functions[name].prologue),
            returns: true,
        }));

        // Every probe goes through a uprobe-multi link (see `session`): a few links, each
        // placed and removed at once.
        let loader = session::Loader::new(&ebpf, PROGRAMS)?;
        // V8's mark-compact collections, before any allocation is walked: with them seen, the
        // walker keeps what it read of each function until the next one.
        let gc_link = match (&limits.v8, &walk_maps) {
            (Some(v8), Some(maps)) if v8_on && v8.mark_compact[0] != 0 => {
                match mark_compact_probe(&loader, &mut ebpf, v8, maps, thread.get(), pid.get()) {
                    Ok(link) => Some(link),
                    Err(e) => {
                        warnings.push(format!(
                            "JavaScript frames: V8's collections cannot be followed ({e}); each frame's function is read anew every time"
                        ));
                        None
                    }
                }
            }
            _ => None,
        };
        let offsets: Vec<u64> = sites.iter().map(|s| s.2).collect();
        let cookies: Vec<u64> = sites.iter().map(|s| cookie(s.1, 0)).collect();
        let free_offset = free.file_offset + free_at.offset;
        // A uprobe-multi link is tied to the thread group leader (a pid that is not a tgid is
        // refused with ESRCH), whose memory decides where its breakpoints go: a leader that
        // has exited needs a stand-in on a live thread, opened before the links.
        // With the in-process sampler, its probe sites stand in for the allocators and free.
        let sampler_sites = limits.sampler_sites.as_ref().filter(|_| limits.sample_bytes.is_some());
        let anchors = if thread == pid {
            Vec::new()
        } else if let Some(s) = sampler_sites {
            anchor::Anchors::open(&s.path, &[s.alloc_offset, s.free_offset], thread.get())
                .map_err(|source| EbpfError::Anchor { pid: pid.get(), thread: thread.get(), source })?
                .into_fds()
        } else {
            let mut at = offsets.clone();
            at.push(free_offset);
            anchor::Anchors::open(libc_path, &at, thread.get())
                .map_err(|source| EbpfError::Anchor { pid: pid.get(), thread: thread.get(), source })?
                .into_fds()
        };
        let link = |program, name, kind, offsets: &[u64], cookies: &[u64]| {
            loader.link(program, name, kind, libc_path, offsets, cookies, pid.get())
        };
        // Every program is loaded (verified: tens of milliseconds for the walker) before the
        // first link exists, so the links go in moments apart: a return link alone while the
        // entry program is verified would see every call of those moments as an orphan return.
        let links = match limits.sample_bytes {
            None => {
                let exit = loader.prepare("tr_alloc_exit", LinkKind::MultiReturn)?;
                let free = loader.prepare("tr_free", LinkKind::Multi)?;
                let enter = loader.prepare("tr_alloc_enter", LinkKind::Multi)?;
                // Return probes first: a return seen without its entry is harmless (counted as
                // an orphan), an entry without its return would leave a thread's call pending.
                // Entry and return probes share the function's first instruction, where the
                // return address is on top of the stack, so each call takes one trap, not two.
                let returns = link(exit, "tr_alloc_exit", LinkKind::MultiReturn, &offsets, &cookies)?;
                // free before the allocators: a block must not be seen allocated and then lose
                // its free.
                let free = link(free, "tr_free", LinkKind::Multi, &[free_offset], &[0])?;
                let entries = link(enter, "tr_alloc_enter", LinkKind::Multi, &offsets, &cookies)?;
                vec![returns, free, entries]
            }
            Some(_) if let Some(s) = sampler_sites => {
                let free = loader.prepare("tr_sampler_free", LinkKind::Multi)?;
                let alloc = loader.prepare("tr_sampler_alloc", LinkKind::Multi)?;
                let site = |program, name, offset| {
                    loader.link(program, name, LinkKind::Multi, &s.path, &[offset], &[0], pid.get())
                };
                // Frees first, as with the allocators: a block must not be seen allocated and
                // then lose its free.
                let free = site(free, "tr_sampler_free", s.free_offset)?;
                let alloc = site(alloc, "tr_sampler_alloc", s.alloc_offset)?;
                // Both sites begin with `push %rbp`, which the kernel emulates.
                attached = ["tracer_free_site", "tracer_alloc_site"]
                    .into_iter()
                    .map(|function| ProbeSite { function, offset: 0, emulated: true, returns: false })
                    .collect();
                vec![free, alloc]
            }
            Some(_) => {
                let free = loader.prepare("tr_free", LinkKind::Multi)?;
                let sample = loader.prepare("tr_alloc_sample", LinkKind::Session)?;
                // free first, as in full mode.
                let free = link(free, "tr_free", LinkKind::Multi, &[free_offset], &[0])?;
                let allocators = link(sample, "tr_alloc_sample", LinkKind::Session, &offsets, &cookies)?;
                vec![free, allocators]
            }
        };
        let mut links = links;
        links.extend(gc_link);
        // Every probe is in: from now on a return without its entry is an anomaly.
        Self::set_phase(&mut ebpf, tracer_common::recording_phase::RECORDING)?;
        let sampling = limits.sample_bytes;
        if stack_hash_mask() != u64::MAX {
            warnings.push(format!("stack keys narrowed by {HASH_BITS_VAR} (for tests only)"));
        }
        let syscalls = match syscall_target {
            None => None,
            // The mmap-family view needs to know which mmaps glibc makes inside malloc, which
            // only the allocator calls in PENDING tell; sampling leaves most calls out of it.
            Some(_) if limits.sample_bytes.is_some() => {
                warnings.push(
                    "sampling: the mmap family is not traced (unsampled allocator calls leave \
                     nothing in the kernel, so glibc's own mmaps could not be told from the \
                     program's)"
                        .to_owned(),
                );
                None
            }
            Some(t) => {
                match SyscallTracing::attach(&mut ebpf, libc_path, t.libc, t.maps) {
                    Ok(tracing) => Some(tracing),
                    Err(e) => {
                        let mut message = format!("cannot trace the mmap family ({e}");
                        let mut source = std::error::Error::source(&e);
                        while let Some(cause) = source {
                            message.push_str(&format!(": {cause}"));
                            source = cause.source();
                        }
                        message.push_str("); malloc tracing goes on without it");
                        warnings.push(message);
                        None
                    }
                }
            }
        };
        // Taken out of the object only now: the loaders above look up every map by name.
        let deferred = match limits.unwind {
            UnwindMode::Fp => None,
            _ => {
                let map = ebpf.take_map("DEFERRED_STACKS").ok_or(EbpfError::Map {
                    name: "DEFERRED_STACKS",
                    source: aya::maps::MapError::InvalidName { name: "DEFERRED_STACKS".into() },
                })?;
                Some(aya::maps::RingBuf::try_from(map).map_err(|source| EbpfError::Map { name: "DEFERRED_STACKS", source })?)
            }
        };
        let new_js_stacks = if v8_on {
            let map = ebpf.take_map("NEW_JS_STACKS").ok_or(EbpfError::Map {
                name: "NEW_JS_STACKS",
                source: aya::maps::MapError::InvalidName { name: "NEW_JS_STACKS".into() },
            })?;
            Some(aya::maps::RingBuf::try_from(map).map_err(|source| EbpfError::Map { name: "NEW_JS_STACKS", source })?)
        } else {
            None
        };
        Ok(EbpfProbes {
            ebpf,
            new_js_stacks,
            js_waiting: Vec::new(),
            stacks: StdHashMap::new(),
            sites: attached,
            links,
            syscalls,
            warnings,
            sampling,
            anchors,
            unwind: tables.map(|t| (t, std::time::Instant::now())),
            deferred,
            finisher: None,
            finished: StdHashMap::new(),
            last_maps: walk_maps.clone(),
            exit_maps: false,
            unfinished: Vec::new(),
            pid: tgid,
            thread: thread.get(),
            unwind_mode: limits.unwind,
        })
    }

    /// Finishes the walks the kernel handed over, from their stack copies, with tables of
    /// this process's current mappings (a walk is handed over when it meets a library the
    /// kernel's tables did not hold yet, which they hold now or soon: they are refreshed too).
    fn finish_deferred(&mut self, final_pass: bool) {
        let Some(ring) = &mut self.deferred else { return };
        while let Some(item) = ring.next() {
            if item.len() >= size_of::<tracer_common::DeferredStack>() {
                // SAFETY: the kernel wrote a whole DeferredStack (checked length); read unaligned.
                self.unfinished.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<tracer_common::DeferredStack>()) });
            }
        }
        if self.unfinished.is_empty() {
            return;
        }
        let maps = read_maps(self.pid, self.thread);
        if maps.is_none() && !self.exit_maps && !final_pass {
            // Gone before its exit stop was seen: the maps read there are the right ones.
            return;
        }
        let records = std::mem::take(&mut self.unfinished);
        if let Some(maps) = maps {
            self.apply_maps(maps);
        }
        let (pid, mode) = (self.thread, self.unwind_mode);
        // Made from the last reading of the maps: the process may be gone.
        let last = &self.last_maps;
        let finisher = self.finisher.get_or_insert_with(|| {
            crate::unwind::process::ProcessTables::from_maps(pid, mode, last.as_ref().unwrap_or(&ProcMaps::default()))
        });
        for d in records {
            let copied = (d.copied as usize).min(d.bytes.len());
            let read = |addr: u64| {
                let off = addr.checked_sub(d.sp)? as usize;
                let word = d.bytes.get(off..off.checked_add(8)?.min(copied))?;
                Some(u64::from_le_bytes(word.try_into().ok()?))
            };
            let regs = crate::unwind::Regs { ip: d.pc, sp: d.sp, bp: d.bp };
            let (pcs, _) = finisher.pcs_from(regs, d.exact != 0, tracer_common::MAX_FRAMES, read);
            self.finished.insert(d.token, pcs);
        }
    }

    /// A stack's frames with a handed-over walk's token replaced by its frames; None while
    /// they are not known yet.
    fn complete(&self, mut frames: Vec<u64>) -> Option<Vec<u64>> {
        match frames.last() {
            Some(&token) if token & tracer_common::DEFERRED_TOKEN != 0 => {
                let rest = self.finished.get(&token)?;
                frames.pop();
                frames.extend_from_slice(rest);
                frames.truncate(tracer_common::MAX_FRAMES);
                Some(frames)
            }
            _ => Some(frames),
        }
    }

    /// Loads the rows of libraries mapped since the walker's tables were last written.
    fn refresh_unwind(&mut self) {
        if let Some((_, at)) = &mut self.unwind {
            *at = std::time::Instant::now();
            if let Some(maps) = read_maps(self.pid, self.thread) {
                self.apply_maps(maps);
            }
        }
    }

    /// Takes `maps` as the target's mappings: the kernel's tables and the finisher's follow.
    fn apply_maps(&mut self, maps: ProcMaps) {
        let Some((tables, _)) = &mut self.unwind else { return };
        let _ = tables.refresh(&mut self.ebpf, &maps);
        // Said while recording: attach has printed its warnings already.
        for loss in tables.take_losses() {
            crate::diag::warn(loss);
        }
        if let Some(f) = &mut self.finisher {
            f.refresh_from(&maps);
        }
        self.last_maps = Some(maps);
    }

    /// Reads the current per-stack totals and counters.
    pub fn read(&mut self) -> Result<Snapshot, EbpfError> {
        let map_err = |name: &'static str| move |source| EbpfError::Map { name, source };
        let missing = |name: &'static str| EbpfError::Map {
            name,
            source: aya::maps::MapError::InvalidName { name: name.into() },
        };

        // Walks handed over are sent before their stacks are stored: finished first, every
        // stack read below that has one finds it.
        self.finish_deferred(true);
        let stats: HashMap<&MapData, u64, StackStats> =
            HashMap::try_from(self.ebpf.map("STATS").ok_or_else(|| missing("STATS"))?)
                .map_err(map_err("STATS"))?;
        let mut rows = Vec::new();
        for item in stats.iter() {
            let (id, s) = item.map_err(map_err("STATS"))?;
            rows.push((id, s));
        }

        let stack_map: HashMap<&MapData, u64, StackBuf> =
            HashMap::try_from(self.ebpf.map("STACKS").ok_or_else(|| missing("STACKS"))?)
                .map_err(map_err("STACKS"))?;
        let mut stacks = Vec::with_capacity(rows.len());
        for (id, s) in rows {
            if id != STACK_LOST
                && !self.stacks.contains_key(&id)
                && let Ok(buf) = stack_map.get(&id, 0)
                && let Some(frames) = self.complete(clean_frames(&buf, self.unwind_mode))
            {
                self.stacks.insert(id, frames);
            }
            // Sampling mode keeps estimated counts in fixed point.
            let count = |v: i64| if self.sampling.is_some() { session::whole_count(v) } else { v };
            stacks.push(StackSample {
                id,
                frames: self.stacks.get(&id).cloned().unwrap_or_default(),
                live_bytes: s.live_bytes,
                live_allocs: count(s.live_allocs),
                alloc_bytes: s.alloc_bytes,
                allocs: count(s.allocs as i64) as u64,
                peak_bytes: s.peak_bytes,
            });
        }
        // Sampling mode: frees of sampled blocks stand for many; the estimate is what was
        // allocated and is no longer live. Unmatched frees cannot be told from frees of
        // blocks that were not sampled, so they are not counted.
        let estimated_frees = stacks
            .iter()
            .map(|s| s.allocs as i64 - s.live_allocs)
            .sum::<i64>()
            .max(0) as u64;

        let counters: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map("COUNTERS").ok_or_else(|| missing("COUNTERS"))?)
                .map_err(map_err("COUNTERS"))?;
        let mut sums = [0u64; counter::COUNT as usize];
        for (i, sum) in sums.iter_mut().enumerate() {
            let per_cpu = counters.get(&(i as u32), 0).map_err(map_err("COUNTERS"))?;
            // Wrapping: the live-bytes slot holds signed changes in two's complement.
            *sum = per_cpu.iter().fold(0u64, |sum, &v| sum.wrapping_add(v));
        }
        let c = |i: u32| sums[i as usize];
        let mut syscall_sums = [0u64; syscall_counter::COUNT as usize];
        if let Some(map) = self.ebpf.map("SYSCALL_COUNTERS") {
            let per_cpu: PerCpuArray<&MapData, u64> =
                PerCpuArray::try_from(map).map_err(map_err("SYSCALL_COUNTERS"))?;
            for (i, sum) in syscall_sums.iter_mut().enumerate() {
                *sum = per_cpu
                    .get(&(i as u32), 0)
                    .map_err(map_err("SYSCALL_COUNTERS"))?
                    .iter()
                    .sum();
            }
        }
        Ok(Snapshot {
            stacks,
            counters: Counters {
                frees: if self.sampling.is_some() { estimated_frees } else { c(counter::FREES) },
                unmatched_frees: c(counter::UNMATCHED_FREES),
                failed_allocs: c(counter::FAILED_ALLOCS),
                dropped: allocator_losses(c)
                    .into_iter()
                    .chain([
                        (
                            "syscall_events_lost",
                            syscall_sums[syscall_counter::EVENTS_LOST as usize],
                        ),
                        (
                            "syscall_pending_full",
                            syscall_sums[syscall_counter::PENDING_FULL as usize],
                        ),
                    ])
                    .collect(),
            },
        })
    }
}

impl Backend for EbpfProbes {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn sites(&self) -> &[ProbeSite] {
        &self.sites
    }

    fn snapshot(&mut self) -> Result<Snapshot, ProbeError> {
        Ok(self.read()?)
    }

    fn traces_syscalls(&self) -> bool {
        self.syscalls.is_some()
    }

    /// Every probe at once: closing an attachment waits for the kernel's grace period, so
    /// they are all closed together (see [`close_at_once`]). The maps stay readable.
    fn detach(&mut self) {
        if !self.links.is_empty() {
            let _ = Self::set_phase(&mut self.ebpf, tracer_common::recording_phase::STOPPING);
        }
        let mut closing: Vec<Box<dyn Send>> = Vec::new();
        closing.extend(
            self.links
                .drain(..)
                .map(|l| Box::new(l.into_link()) as Box<dyn Send>),
        );
        if let Some(syscalls) = &mut self.syscalls {
            closing.extend(syscalls.take_links());
        }
        closing.extend(self.anchors.drain(..).map(|fd| Box::new(fd) as Box<dyn Send>));
        close_at_once(closing);
    }

    fn drain_syscalls(&mut self) -> Vec<SyscallEvent> {
        let events = self.syscalls.as_mut().map(SyscallTracing::drain).unwrap_or_default();
        // A library to walk through: an executable mapping of a file (dlopen). V8 makes its
        // code pages executable many times a second; those are anonymous, and wait for the
        // slower poll.
        let new_library = events.iter().any(|e| {
            e.phase == tracer_common::phase::EXIT
                && e.ret >= 0
                && e.sys == tracer_common::sys::MMAP
                && e.args[2] & ::libc::PROT_EXEC as u64 != 0
                && e.args[3] & ::libc::MAP_ANONYMOUS as u64 == 0
        });
        let every = if self.syscalls.is_some() { UNWIND_POLL_JIT } else { UNWIND_POLL };
        let poll_due = self.unwind.as_ref().is_some_and(|(_, at)| at.elapsed() >= every);
        if new_library || poll_due {
            self.refresh_unwind();
        }
        self.finish_deferred(false);
        events
    }

    fn exiting(&mut self, maps: &ProcMaps) {
        if self.deferred.is_none() {
            return;
        }
        if let Some(f) = &mut self.finisher {
            f.refresh_from(maps);
        }
        self.last_maps = Some(maps.clone());
        self.exit_maps = true;
        self.finish_deferred(true);
    }

    fn live_total_peak(&mut self) -> Option<i64> {
        // One lookup: each CPU's running sum of the live-byte changes its programs made
        // (two's complement), so the total is their wrapping sum.
        let counters: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map("COUNTERS")?).ok()?;
        let per_cpu = counters.get(&counter::LIVE_BYTES, 0).ok()?;
        Some(per_cpu.iter().fold(0u64, |sum, &v| sum.wrapping_add(v)) as i64)
    }

    fn new_js_stacks(&mut self) -> Vec<(u64, Vec<u64>)> {
        let Some(ring) = &mut self.new_js_stacks else { return Vec::new() };
        let mut ids = std::mem::take(&mut self.js_waiting);
        while let Some(item) = ring.next() {
            if let Ok(bytes) = <[u8; 8]>::try_from(&item[..item.len().min(8)]) {
                ids.push(u64::from_ne_bytes(bytes));
            }
        }
        if ids.is_empty() {
            return Vec::new();
        }
        self.finish_deferred(false);
        let Some(map) = self.ebpf.map("STACKS") else { return Vec::new() };
        let Ok(map) = HashMap::<&MapData, u64, StackBuf>::try_from(map) else { return Vec::new() };
        let mut out = Vec::new();
        for id in ids {
            if let Some(frames) = self.stacks.get(&id) {
                out.push((id, frames.clone()));
                continue;
            }
            let Ok(buf) = map.get(&id, 0) else { continue };
            match self.complete(clean_frames(&buf, self.unwind_mode)) {
                Some(frames) => {
                    self.stacks.insert(id, frames.clone());
                    out.push((id, frames));
                }
                // Its walk's rest is not back from user space yet: next time.
                None => self.js_waiting.push(id),
            }
        }
        out
    }

    fn stack_frames(&mut self, id: u64) -> Option<Vec<u64>> {
        if let Some(frames) = self.stacks.get(&id) {
            return Some(frames.clone());
        }
        let map: HashMap<&MapData, u64, StackBuf> =
            HashMap::try_from(self.ebpf.map("STACKS")?).ok()?;
        let raw = clean_frames(&map.get(&id, 0).ok()?, self.unwind_mode);
        let frames = match self.complete(raw.clone()) {
            Some(f) => f,
            None => {
                self.finish_deferred(true);
                self.complete(raw)?
            }
        };
        self.stacks.insert(id, frames.clone());
        Some(frames)
    }

    fn live_older_than(
        &mut self,
        min_age: Duration,
        at: std::time::Instant,
    ) -> Result<StdHashMap<u64, (u64, u64)>, ProbeError> {
        // `at` on the kernel's clock (timestamps are CLOCK_MONOTONIC, as Instant is).
        let now = monotonic_ns().saturating_sub(at.elapsed().as_nanos() as u64);
        let cutoff = now.saturating_sub(min_age.as_nanos() as u64);
        let fd = match self.ebpf.map("LIVE").ok_or("BPF map LIVE missing")? {
            aya::maps::Map::HashMap(d) => d.fd().as_fd().as_raw_fd(),
            _ => return Err("BPF map LIVE is not a hash map".into()),
        };
        let mut out: StdHashMap<u64, (u64, u64)> = StdHashMap::new();
        let mean = self.sampling;
        // The target keeps freeing while we read: a batch walk neither repeats nor skips a
        // block that stays live throughout (see `batch`).
        super::batch::for_each::<u64, LiveAlloc>(fd, |_, block| {
            if block.timestamp_ns <= cutoff {
                let e = out.entry(block.stack).or_default();
                match mean {
                    None => {
                        e.0 += block.size;
                        e.1 += 1;
                    }
                    // A sampled block stands for more: its estimate (count in fixed point).
                    Some(mean) => {
                        let w = tracer_common::sampling::estimate(block.size, mean);
                        e.0 += w.bytes;
                        e.1 += w.count;
                    }
                }
            }
        })
        .map_err(|e| format!("read BPF map LIVE: {e}"))?;
        if mean.is_some() {
            for v in out.values_mut() {
                v.1 = session::whole_count(v.1 as i64) as u64;
            }
        }
        Ok(out)
    }
}

/// For tests only: `TRACER_TEST_STACK_HASH_BITS=N` (1..=63) keeps N bits of the kernel's
/// stack hash, so that distinct stacks share keys and the collision check can be seen to work.
const HASH_BITS_VAR: &str = "TRACER_TEST_STACK_HASH_BITS";

fn stack_hash_mask() -> u64 {
    match std::env::var(HASH_BITS_VAR).ok().and_then(|v| v.parse::<u32>().ok()) {
        Some(bits @ 1..=63) => (1u64 << bits) - 1,
        _ => u64::MAX,
    }
}

/// The process's mappings, through its leader, or through `thread` when the leader has
/// exited (its own /proc entry then shows no mappings).
fn read_maps(pid: u32, thread: u32) -> Option<ProcMaps> {
    match ProcMaps::read(pid) {
        Ok(m) if !m.mappings().is_empty() => Some(m),
        _ => ProcMaps::read(thread).ok().filter(|m| !m.mappings().is_empty()),
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of bpf_ktime_get_ns.
fn monotonic_ns() -> u64 {
    let mut ts = ::libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { ::libc::clock_gettime(::libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Probes V8's mark-compact entry points in the binary of `v8` (as mapped in `maps`, read
/// through thread `thread`) for process `pid`, then tells the walker it may cache.
fn mark_compact_probe(
    loader: &session::Loader,
    ebpf: &mut Ebpf,
    v8: &V8Walker,
    maps: &ProcMaps,
    thread: u32,
    pid: u32,
) -> Result<UprobeLink, String> {
    let mapping = maps
        .mappings()
        .iter()
        .find(|m| (m.dev, m.inode) == v8.binary)
        .ok_or("its binary is not mapped")?;
    let path = mapping.path.as_deref().ok_or("its binary has no path")?;
    let host = std::path::PathBuf::from(format!("/proc/{thread}/root{path}"));
    let program = loader.prepare("tr_v8_gc", LinkKind::Multi).map_err(|e| e.to_string())?;
    let offsets: Vec<u64> = v8.mark_compact.iter().copied().filter(|&o| o != 0).collect();
    let cookies = vec![0; offsets.len()];
    let link = loader
        .link(program, "tr_v8_gc", LinkKind::Multi, &host, &offsets, &cookies, pid)
        .map_err(|e| e.to_string())?;
    let map = ebpf.map_mut("V8_CONFIG").ok_or("no V8_CONFIG map")?;
    let mut config: aya::maps::Array<&mut MapData, tracer_common::V8Config> =
        aya::maps::Array::try_from(map).map_err(|e| e.to_string())?;
    config.set(0, tracer_common::V8Config { cache: 1, ..v8.config }, 0).map_err(|e| e.to_string())?;
    Ok(link)
}

/// Frames of a kernel stack record, leaf first. With `--unwind fp`, slot 1 holds the return
/// address read at the probe; when the kernel's own walk already included it (probes on
/// `push %rbp` or `endbr64`), slot 2 repeats it and one copy goes. Our own walk records each
/// frame once (a function calling itself repeats a return address, which stays). Zero entries
/// go too.
fn clean_frames(buf: &StackBuf, mode: UnwindMode) -> Vec<u64> {
    let len = (buf.len as usize).min(buf.frames.len());
    let mut frames = buf.frames[..len].to_vec();
    if mode == UnwindMode::Fp && frames.len() > 2 && frames[1] == frames[2] {
        frames.remove(2);
    }
    // An unreadable caller in slot 1, or the end marker some walks leave: not frames.
    frames.retain(|&f| f != 0);
    frames
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracer_common::MAX_FRAMES;

    fn buf(frames: &[u64]) -> StackBuf {
        let mut b = StackBuf { len: frames.len() as u64, frames: [0; MAX_FRAMES] };
        b.frames[..frames.len()].copy_from_slice(frames);
        b
    }

    #[test]
    fn caller_recovered_by_the_probe_is_kept() {
        assert_eq!(clean_frames(&buf(&[0x10, 0x20, 0x30]), UnwindMode::Fp), vec![0x10, 0x20, 0x30]);
    }

    #[test]
    fn caller_also_found_by_the_kernel_appears_once() {
        assert_eq!(clean_frames(&buf(&[0x10, 0x20, 0x20, 0x30]), UnwindMode::Fp), vec![0x10, 0x20, 0x30]);
    }

    #[test]
    fn a_walked_stack_keeps_a_repeated_return_address() {
        // f calling itself: two frames with one return address.
        assert_eq!(clean_frames(&buf(&[0x10, 0x20, 0x20, 0x30]), UnwindMode::Auto), vec![0x10, 0x20, 0x20, 0x30]);
    }

    #[test]
    fn unreadable_caller_is_dropped() {
        assert_eq!(clean_frames(&buf(&[0x10, 0, 0x30]), UnwindMode::Fp), vec![0x10, 0x30]);
    }
}
