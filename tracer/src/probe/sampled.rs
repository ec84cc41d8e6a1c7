//! Sampling without BPF (issue 13's fallback): the in-process sampler decides in the target
//! which calls are sampled and puts each sampled event, with a copy of the stack above the
//! caller's return address, in a ring shared with the tracer (`inject::ring`). A thread here
//! drains it every millisecond or two, walks each stack from the copy with the same unwind rows
//! as the ptrace backend, and counts the events with the ptrace backend's book by the rules of
//! the BPF probe sites. Nothing traps: ptrace is used only to put the sampler in and take it
//! out, and the target runs untraced in between.
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tracer_common::{
    counter,
    sampler::{KIND_FREE, SampledCall, flags},
};

use super::{Backend, ProbeError, ProbeSite, Snapshot, ebpf::Limits, ptrace::book::Book};
use crate::{
    inject::{inject::Injected, ring::SharedRing},
    unwind::{Regs, Stop, UnwindMode, process::ProcessTables},
};

/// Frames kept per stack, as the ptrace backend keeps them.
const MAX_FRAMES: usize = 128;
/// How long the reader sleeps on an empty ring at most: the sampler wakes it sooner once the
/// ring is a quarter full.
const POLL: Duration = Duration::from_millis(10);
/// Events read in one go before the book's lock is let go.
const BATCH: usize = 64;

struct Shared {
    book: Mutex<Book>,
    stop: AtomicBool,
}

pub struct SampledProbes {
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    injected: Option<Injected>,
    sites: Vec<ProbeSite>,
}

impl SampledProbes {
    /// Puts the sampler into process `pid`, sampling every `limits.sample_bytes` bytes on
    /// average, and starts reading its ring.
    pub fn attach(pid: u32, limits: Limits) -> Result<SampledProbes, ProbeError> {
        let mean = limits
            .sample_bytes
            .ok_or("the in-process sampler needs --sample-bytes")?;
        // The unwind rows first (a node binary's take a good part of a second): once the
        // sampler is in, events come and must be read.
        let tables = ProcessTables::new(pid, limits.unwind);
        let (injected, ring) = Injected::install_ring(pid as i32, mean)?;
        let sites = injected
            .patched()
            .iter()
            .map(|p| ProbeSite {
                function: static_name(&p.function),
                offset: 0,
                emulated: true,
                returns: false,
            })
            .collect();
        let shared = Arc::new(Shared {
            book: Mutex::new(Book::new(limits.clone())),
            stop: AtomicBool::new(false),
        });
        let reader_shared = shared.clone();
        let reader = std::thread::Builder::new()
            .name("sampler-ring".into())
            .spawn(move || read_ring(pid, ring, tables, &reader_shared));
        let reader = match reader {
            Ok(r) => r,
            Err(e) => {
                let _ = injected.remove();
                return Err(e.into());
            }
        };
        Ok(SampledProbes {
            shared,
            reader: Some(reader),
            injected: Some(injected),
            sites,
        })
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.shared.book.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The patched functions' names, which the site list wants as `&'static str`: the malloc
/// family's names, matched to the constants rather than leaked.
fn static_name(function: &str) -> &'static str {
    tracer_common::sampler::Hook::ALL
        .iter()
        .map(|h| h.libc_name())
        .find(|n| *n == function)
        .unwrap_or("allocator")
}

/// The reading thread: drains the ring until told to stop, then once more until it is empty
/// (the sampler was taken out first, so nothing new comes, bar a call already under way).
fn read_ring(pid: u32, mut ring: SharedRing, mut tables: ProcessTables, shared: &Shared) {
    let own_pid = pid_in_own_namespace(pid);
    let mut stopping_since: Option<Instant> = None;
    loop {
        let mut n = 0;
        loop {
            let mut book = shared.book.lock().unwrap_or_else(|p| p.into_inner());
            let got = ring.drain(BATCH, |e| {
                if e.pid != own_pid {
                    // A forked child's, through the ring it inherited: not this process's.
                    return;
                }
                let stack = needs_stack(&e.event).then(|| {
                    let (frames, stop) = walk(&mut tables, &e.event, e.stack);
                    book.walk_stopped(stop);
                    book.intern_stack(&frames)
                });
                book.sampled(e.thread, &e.event, stack);
            });
            book.set_counter(counter::SAMPLER_RING_FULL, ring.full());
            drop(book);
            n += got;
            if got < BATCH {
                break;
            }
        }
        if shared.stop.load(Ordering::Acquire) {
            let since = *stopping_since.get_or_insert_with(Instant::now);
            if n == 0 && since.elapsed() >= Duration::from_millis(20) {
                return;
            }
        }
        if n == 0 {
            ring.wait(POLL);
        }
    }
}

/// The pid process `pid` has in its own pid namespace (what its `getpid` says, and so what the
/// sampler writes in each event): the last of /proc/PID/status's `NSpid`, or `pid` itself.
fn pid_in_own_namespace(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .and_then(|ids| ids.split_whitespace().last()?.parse().ok())
        })
        .unwrap_or(u64::from(pid))
}

/// Whether the event is an allocation whose stack is counted (not a free, nor a realloc's
/// settling of a block it held).
fn needs_stack(ev: &SampledCall) -> bool {
    ev.kind != KIND_FREE && ev.flags & flags::NOT_SAMPLED == 0
}

/// The stack of a sampled call, walked from the registers at the allocator's entry through the
/// copy of the stack the sampler made: frame 0 the allocator, frame 1 its caller, no frame of
/// the sampler. A walk that needs a word beyond the copy ends there.
fn walk(tables: &mut ProcessTables, ev: &SampledCall, stack: &[u8]) -> (Vec<u64>, Stop) {
    let sp = ev.entry_sp;
    let read = |addr: u64| {
        let off = addr.checked_sub(sp)? as usize;
        let word = stack.get(off..off.checked_add(8)?)?;
        Some(u64::from_le_bytes(word.try_into().ok()?))
    };
    let regs = Regs {
        ip: ev.entry,
        sp,
        bp: ev.entry_bp,
    };
    let (mut frames, stop) = tables.pcs(regs, MAX_FRAMES, read);
    // The caller is on top of the stack at the entry, whatever the rows say; a frame-pointer
    // walk from the entry skips it (as the ptrace backend's capture does).
    if frames.len() < 2 {
        frames.truncate(1);
        if frames.is_empty() {
            frames.push(ev.entry);
        }
        frames.push(ev.ret_addr);
    } else if tables.mode == UnwindMode::Fp && frames[1] != ev.ret_addr {
        frames.insert(1, ev.ret_addr);
        frames.truncate(MAX_FRAMES);
    }
    (frames, stop)
}

impl Backend for SampledProbes {
    fn name(&self) -> &'static str {
        "ptrace"
    }

    fn sites(&self) -> &[ProbeSite] {
        &self.sites
    }

    fn snapshot(&mut self) -> Result<Snapshot, ProbeError> {
        Ok(self.book().snapshot())
    }

    fn detach(&mut self) {
        if let Some(injected) = self.injected.take()
            && let Err(e) = injected.remove()
        {
            crate::diag::warn(format_args!(
                "{e}; the in-process sampler stays in the target, calling its allocator"
            ));
        }
        self.shared.stop.store(true, Ordering::Release);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }

    fn stack_frames(&mut self, id: u64) -> Option<Vec<u64>> {
        self.book().stack_frames(id)
    }

    fn live_total_peak(&mut self) -> Option<i64> {
        Some(self.book().take_total_peak())
    }

    fn live_older_than(
        &mut self,
        min_age: Duration,
        at: Instant,
    ) -> Result<HashMap<u64, (u64, u64)>, ProbeError> {
        Ok(self.book().live_older_than(min_age, at))
    }
}

impl Drop for SampledProbes {
    fn drop(&mut self) {
        self.detach();
    }
}
