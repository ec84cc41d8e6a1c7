//! The malloc family: entry and return probes on every allocating function, and an entry
//! probe on free. Per-stack totals are updated here, in the kernel; user space only reads them.
//!
//! Two modes, chosen by user space before load through `SAMPLE_BYTES` (read-only data, so the
//! verifier prunes the other mode's branches):
//! - full (`SAMPLE_BYTES == 0`): `tr_alloc_enter` + `tr_alloc_exit` record every call;
//! - sampling: `tr_alloc_sample`, a uprobe *session* program run at the entry and, only when
//!   the entry asks for it, at the return of a call. Unsampled malloc/calloc calls end at the
//!   entry: no stack, no map insert and no return probe. Sampled blocks are weighted
//!   (`tracer_common::sampling`), so per-stack totals hold estimates; counts are then kept in
//!   units of 2^-16 allocation.
use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd};

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_probe_read_user,
        generated::bpf_get_attach_cookie,
    },
    macros::{map, uprobe, uretprobe},
    maps::{Array, LruHashMap},
    programs::{ProbeContext, RetProbeContext},
};
use tracer_common::{
    AllocKind, LiveAlloc, Pending, STACK_LOST, StackStats, cookie_kind, cookie_sp_offset, counter,
    sampling,
};

use crate::{
    maps::{LIVE, PENDING, STATS, add_counter, count},
    stack,
};

const PAGE_SIZE: u64 = 4096;

/// Mean bytes between samples; 0 records every call. Set by user space before load.
#[unsafe(no_mangle)]
static SAMPLE_BYTES: u64 = 0;

/// Sampling mode, per thread (pid_tgid).
#[repr(C)]
#[derive(Clone, Copy)]
struct ThreadState {
    /// Bytes left before the thread's next sample point.
    left: u64,
    /// 1 while a call we track (in PENDING) runs on the thread: only then can an entry be
    /// nested in it or be its return, so only then is PENDING looked at.
    tracked: u64,
}

/// Least recently used threads are evicted first. An evicted thread draws a fresh countdown,
/// which changes nothing statistically (the exponential distribution has no memory); a
/// thread without an entry is checked against PENDING, so losing `tracked` is harmless too.
/// Where the recording stands, as user space sets it: `ATTACHING` until every probe is in,
/// [`RECORDING`], then [`STOPPING`] just before the probes close. Full mode's entry and return
/// probes are separate links, which go in one after the other and close together:
/// - while attaching, a return without its entry belongs to a call that began before the entry
///   probe existed, and is not an anomaly worth counting;
/// - while stopping, a return link gone a moment before its entry link would leave each call
///   of that moment pending, for the thread's next call to count as stale though nothing was
///   left by longjmp. So entries then start no call; calls in flight finish while their
///   return probe lasts, as at any stop.
#[map]
static PHASE: Array<u32> = Array::with_max_entries(1, 0);
const RECORDING: u32 = tracer_common::recording_phase::RECORDING;
const STOPPING: u32 = tracer_common::recording_phase::STOPPING;

#[inline(always)]
fn phase() -> u32 {
    PHASE.get(0).map_or(RECORDING, |v| *v)
}

#[inline(always)]
pub(crate) fn stopping() -> bool {
    phase() == STOPPING
}

#[map]
static SAMPLER: LruHashMap<u64, ThreadState> = LruHashMap::with_max_entries(8192, 0);

/// Session program return values: run the return probe for this call, or do not.
const RUN_RETURN: u32 = 0;
const NO_RETURN: u32 = 1;

#[inline(always)]
fn sample_bytes() -> u64 {
    // SAFETY: a plain read of our own global; volatile so that the compiler does not fold
    // the value it had at build time (user space sets it at load).
    unsafe { core::ptr::read_volatile(&SAMPLE_BYTES) }
}

#[uprobe]
pub fn tr_alloc_enter(ctx: ProbeContext) -> u32 {
    match try_alloc_enter(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

#[uretprobe]
pub fn tr_alloc_exit(ctx: RetProbeContext) -> u32 {
    match try_alloc_exit(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

/// Sampling mode. Loaded by user space as a uprobe-multi session program (expected attach
/// type `BPF_TRACE_UPROBE_SESSION`), which aya cannot do; the `uprobe` section is only how
/// the program gets into the object file. Written out rather than with `#[uprobe]`, whose
/// wrapper always returns 0: here the return value decides whether the return probe runs.
#[unsafe(no_mangle)]
#[unsafe(link_section = "uprobe")]
pub fn tr_alloc_sample(ctx: *mut core::ffi::c_void) -> u32 {
    match try_alloc_sample(&ProbeContext::new(ctx)) {
        Ok(ret) | Err(ret) => ret,
    }
}

#[uprobe]
pub fn tr_free(ctx: ProbeContext) -> u32 {
    match try_free(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

/// `a * b`, or None on overflow. `checked_mul` needs a 128-bit multiply, which BPF lacks, and
/// LLVM rewrites a division-based test into one too; 32-bit halves keep it in 64 bits.
fn mul(a: u64, b: u64) -> Option<u64> {
    let (ah, al, bh, bl) = (a >> 32, a & 0xffff_ffff, b >> 32, b & 0xffff_ffff);
    if ah != 0 && bh != 0 {
        return None;
    }
    // At most one of the two terms is non-zero.
    let cross = ah * bl + al * bh;
    if cross > 0xffff_ffff {
        return None;
    }
    let low = al * bl;
    let product = low.wrapping_add(cross << 32);
    if product < low { None } else { Some(product) }
}

fn arg(ctx: &ProbeContext, n: usize) -> u64 {
    ctx.arg::<u64>(n).unwrap_or(0)
}

/// The call at an allocator's entry, from its arguments: what it will allocate if it
/// succeeds, and which block it gets (realloc) or where it writes its result (posix_memalign).
#[inline(always)]
fn decode_call(ctx: &ProbeContext, kind: AllocKind) -> Pending {
    let (a0, a1, a2) = (arg(ctx, 0), arg(ctx, 1), arg(ctx, 2));
    let mut overflow = 0;
    let mut ptr_arg = 0;
    let size = match kind {
        AllocKind::Malloc | AllocKind::Valloc => a0,
        AllocKind::Pvalloc => {
            // glibc returns a whole number of pages (one page for 0).
            let pages = a0.div_ceil(PAGE_SIZE).max(1);
            match mul(pages, PAGE_SIZE) {
                Some(v) => v,
                None => {
                    overflow = 1;
                    0
                }
            }
        }
        AllocKind::Calloc => match mul(a0, a1) {
            Some(v) => v,
            None => {
                overflow = 1;
                0
            }
        },
        AllocKind::Realloc => {
            ptr_arg = a0;
            a1
        }
        AllocKind::Reallocarray => {
            ptr_arg = a0;
            match mul(a1, a2) {
                Some(v) => v,
                None => {
                    overflow = 1;
                    0
                }
            }
        }
        AllocKind::PosixMemalign => {
            ptr_arg = a0;
            a2
        }
        AllocKind::Memalign => a1,
    };
    Pending {
        size,
        ptr_arg,
        stack: STACK_LOST,
        old_size: 0,
        old_stack: 0,
        depth: 0,
        kind: kind as u32,
        overflow,
        had_old: 0,
        ret_addr: 0,
        sampled: 1,
        _pad: 0,
        sp: 0,
    }
}

/// realloc/reallocarray: takes the old block out of the live map now. Once realloc has
/// released it, another thread may be handed the same address before our return probe runs.
#[inline(always)]
fn take_old_block(pending: &mut Pending) {
    let resizes =
        pending.kind == AllocKind::Realloc as u32 || pending.kind == AllocKind::Reallocarray as u32;
    if resizes && pending.ptr_arg != 0 {
        if let Some(old) = LIVE.get_ptr(pending.ptr_arg) {
            let old = unsafe { *old };
            if LIVE.remove(pending.ptr_arg).is_ok() {
                pending.had_old = 1;
                pending.old_size = old.size;
                pending.old_stack = old.stack;
            }
        }
    }
}

fn try_alloc_enter(ctx: &ProbeContext) -> Result<u32, u32> {
    let tid = bpf_get_current_pid_tgid();
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let (slot, ret_addr) = return_slot(ctx, cookie_sp_offset(cookie));
    if let Some(p) = call_in_flight(tid, slot, ret_addr) {
        // realloc -> malloc, reallocarray -> realloc, posix_memalign -> malloc: the outer
        // call is the one the program made; the inner one is glibc's business.
        unsafe { (*p).depth += 1 };
        return Ok(0);
    }
    if stopping() {
        return Ok(0);
    }
    let Some(kind) = AllocKind::from_u32(cookie_kind(cookie)) else {
        return Err(1);
    };
    let mut pending = decode_call(ctx, kind);
    pending.sp = slot;
    pending.ret_addr = ret_addr;
    take_old_block(&mut pending);
    pending.stack = stack::capture_with_caller(ctx.as_ptr(), &probe_regs(ctx), ret_addr);
    if PENDING.insert(tid, &pending, 0).is_err() {
        count(counter::DROP_PENDING_FULL);
        if pending.had_old == 1 {
            restore_old(&pending);
        }
    }
    Ok(0)
}

/// The user registers at the probe, where a stack walk starts.
#[inline(always)]
fn probe_regs(ctx: &ProbeContext) -> stack::UserRegs {
    // SAFETY: the program's context is the task's saved user registers.
    unsafe {
        stack::UserRegs { ip: (*ctx.regs).rip, sp: (*ctx.regs).rsp, bp: (*ctx.regs).rbp }
    }
}

/// Where the return address of the call being entered lies (its slot), and what it is (0
/// when unreadable). `sp_offset`: from the stack pointer at the probe to that slot.
#[inline(always)]
fn return_slot(ctx: &ProbeContext, sp_offset: u64) -> (u64, u64) {
    let slot = unsafe { (*ctx.regs).rsp } + sp_offset;
    let ret_addr = unsafe { bpf_probe_read_user(slot as *const u64) }.unwrap_or(0);
    (slot, ret_addr)
}

/// The call in flight on thread `tid` that an entry with return-address slot `slot`
/// (holding `ret_addr`) is nested in, if any. A recorded call whose frame the stack has
/// left is stale: it is counted, its realloc'd block put back, and it goes.
///
/// The stack grows down, so a call made inside the recorded one has its slot below the
/// recorded slot, and an entry above it comes after the recorded frame was unwound (longjmp,
/// or a return probe that never fired). At the very slot it is a new call from the same
/// depth, unless it is a tail call: glibc's reallocarray -> realloc and realloc(NULL, n) ->
/// malloc jump to the inner function in the outer one's frame, whose return address the
/// kernel has by then replaced with its return trampoline. Only realloc and reallocarray make
/// such calls, and a new call from the same call site finds the program's own return address
/// there, as the recorded call did. (A new call from another call site at the same depth,
/// after a realloc left by longjmp, is still taken for nested: it cannot be told from a
/// tail call without knowing where the trampoline is; the next call from elsewhere tells.)
#[inline(always)]
fn call_in_flight(tid: u64, slot: u64, ret_addr: u64) -> Option<*mut Pending> {
    let p = PENDING.get_ptr_mut(tid)?;
    // SAFETY: the thread's own entry; only this thread changes it.
    let pending = unsafe { *p };
    let resizes =
        pending.kind == AllocKind::Realloc as u32 || pending.kind == AllocKind::Reallocarray as u32;
    let tail_call = slot == pending.sp && resizes && ret_addr != pending.ret_addr;
    if slot < pending.sp || tail_call {
        return Some(p);
    }
    // While the probes close, a call left pending most likely lost its return probe first:
    // that is the stop, not a longjmp.
    if !stopping() {
        count(counter::STALE_PENDING);
    }
    if PENDING.remove(tid).is_ok() && pending.had_old == 1 {
        // Whether the abandoned realloc released the block is unknown; it was live before.
        restore_old(&pending);
    }
    None
}

fn try_alloc_exit(ctx: &RetProbeContext) -> Result<u32, u32> {
    let tid = bpf_get_current_pid_tgid();
    let Some(p) = PENDING.get_ptr_mut(tid) else {
        // While attaching, the call began before its entry probe existed; while stopping, it
        // began after entries stopped starting calls. Neither is a lost call.
        if phase() == RECORDING {
            count(counter::ORPHAN_RETURNS);
        }
        return Ok(0);
    };
    let pending = unsafe {
        if (*p).depth > 0 {
            (*p).depth -= 1;
            return Ok(0);
        }
        *p
    };
    let _ = PENDING.remove(tid);
    finish_call(&pending, ctx.ret());
    Ok(0)
}

/// Only these allocators never call another public allocator function in glibc, so in
/// sampling mode only they may skip the return probe: for the others (realloc(NULL, n) and
/// realloc of an mmapped block call malloc; reallocarray calls realloc; posix_memalign and
/// memalign call malloc for small alignments) the call stays in PENDING while it runs, so
/// that the inner call is recognized as glibc's and neither counted nor sampled twice.
fn is_leaf(kind: AllocKind) -> bool {
    matches!(
        kind,
        AllocKind::Malloc | AllocKind::Calloc | AllocKind::Valloc | AllocKind::Pvalloc
    )
}

fn try_alloc_sample(ctx: &ProbeContext) -> Result<u32, u32> {
    let tid = bpf_get_current_pid_tgid();
    let regs = ctx.regs;
    let ip = unsafe { (*regs).rip };
    let state = SAMPLER.get_ptr_mut(tid);
    // SAFETY (all uses of `state`): only this thread touches its own entry.
    let may_be_tracked = state.is_none_or(|s| unsafe { (*s).tracked } != 0);
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let sp_offset = cookie_sp_offset(cookie);
    if may_be_tracked {
        if let Some(p) = PENDING.get_ptr(tid) {
            let pending = unsafe { *p };
            if pending.ret_addr != ip {
                // An entry, not the return: nested in the call we track (glibc's business),
                // unless that call is stale.
                let (slot, ret_addr) = return_slot(ctx, sp_offset);
                if call_in_flight(tid, slot, ret_addr).is_some() {
                    return Ok(NO_RETURN);
                }
                if let Some(s) = state {
                    unsafe { (*s).tracked = 0 };
                }
                return start_sampled_call(ctx, tid, state, cookie, sp_offset);
            }
            // The return of a call we track: the kernel set the instruction pointer to the
            // address the call returns to.
            let _ = PENDING.remove(tid);
            if let Some(s) = state {
                unsafe { (*s).tracked = 0 };
            }
            finish_call(&pending, unsafe { (*regs).rax });
            return Ok(NO_RETURN);
        }
        if let Some(s) = state {
            unsafe { (*s).tracked = 0 };
        }
    }
    start_sampled_call(ctx, tid, state, cookie, sp_offset)
}

/// Sampling mode: the entry of a call with nothing in flight on the thread.
#[inline(always)]
fn start_sampled_call(
    ctx: &ProbeContext,
    tid: u64,
    state: Option<*mut ThreadState>,
    cookie: u64,
    sp_offset: u64,
) -> Result<u32, u32> {
    let Some(kind) = AllocKind::from_u32(cookie_kind(cookie)) else {
        return Err(NO_RETURN);
    };
    let mut pending = decode_call(ctx, kind);
    let sampled = pending.overflow == 0 && take_sample(state, tid, pending.size);
    if !sampled && is_leaf(kind) {
        return Ok(NO_RETURN);
    }
    let slot = unsafe { (*ctx.regs).rsp } + sp_offset;
    let Ok(ret_addr) = (unsafe { bpf_probe_read_user(slot as *const u64) }) else {
        // Without it the return cannot be told from an entry: leave this call alone.
        return Ok(NO_RETURN);
    };
    pending.ret_addr = ret_addr;
    pending.sp = slot;
    pending.sampled = sampled as u32;
    take_old_block(&mut pending);
    if PENDING.insert(tid, &pending, 0).is_err() {
        count(counter::DROP_PENDING_FULL);
        if pending.had_old == 1 {
            restore_old(&pending);
        }
        return Ok(NO_RETURN);
    }
    // The stack is taken once the call is in PENDING, through its entry there: the call's
    // record is then off this program's stack while the walk runs, whose frames must fit
    // under it (BPF's 512 bytes for all of them).
    if sampled {
        let key = stack::capture_with_caller(ctx.as_ptr(), &probe_regs(ctx), ret_addr);
        if let Some(p) = PENDING.get_ptr_mut(tid) {
            // SAFETY: this thread's own entry.
            unsafe { (*p).stack = key };
        }
    }
    // A thread's first call has its entry only now (take_sample made it).
    if let Some(s) = state.or_else(|| SAMPLER.get_ptr_mut(tid)) {
        unsafe { (*s).tracked = 1 };
    }
    Ok(RUN_RETURN)
}

/// Sampling mode: whether a call of `size` bytes on thread `tid` (whose entry is `state`,
/// if it has one yet) holds a sample point, as tcmalloc and jemalloc decide it: each thread
/// counts down the bytes to its next point, drawn from an exponential distribution with mean
/// `SAMPLE_BYTES`.
#[inline(always)]
fn take_sample(state: Option<*mut ThreadState>, tid: u64, size: u64) -> bool {
    if size == 0 {
        return false;
    }
    let mean = sample_bytes();
    if let Some(s) = state {
        // SAFETY: only this thread uses its own entry.
        unsafe {
            if size < (*s).left {
                (*s).left -= size;
                return false;
            }
            (*s).left = sampling::next_countdown(bpf_get_prandom_u32(), mean);
        }
        return true;
    }
    let first = sampling::next_countdown(unsafe { bpf_get_prandom_u32() }, mean);
    let (sampled, left) = if size < first {
        (false, first - size)
    } else {
        (
            true,
            sampling::next_countdown(unsafe { bpf_get_prandom_u32() }, mean),
        )
    };
    let _ = SAMPLER.insert(tid, &ThreadState { left, tracked: 0 }, 0);
    sampled
}

/// What a block of `size` bytes adds to its stack's totals: (bytes, allocations). In full
/// mode the block itself; in sampling mode the estimate it stands for, allocations in units
/// of 2^-16.
#[inline(always)]
fn weight(size: u64) -> (u64, u64) {
    let mean = sample_bytes();
    if mean == 0 {
        (size, 1)
    } else {
        let e = sampling::estimate(size, mean);
        (e.bytes, e.count)
    }
}

/// Accounts for a finished allocator call: `ret` is its return value.
#[inline(always)]
fn finish_call(pending: &Pending, ret: u64) {
    let (ok, addr) = if pending.kind == AllocKind::PosixMemalign as u32 {
        // posix_memalign returns 0 or an error number; the block is in *memptr.
        if ret as u32 == 0 {
            match unsafe { bpf_probe_read_user(pending.ptr_arg as *const u64) } {
                Ok(addr) => (addr != 0, addr),
                Err(_) => (false, 0),
            }
        } else {
            (false, 0)
        }
    } else {
        (ret != 0, ret)
    };

    if pending.ptr_arg != 0
        && (pending.kind == AllocKind::Realloc as u32
            || pending.kind == AllocKind::Reallocarray as u32)
    {
        // realloc(p, 0) frees p and returns NULL; any other NULL leaves p untouched.
        let released = pending.overflow == 0 && (ok || pending.size == 0);
        if !released {
            if pending.had_old == 1 {
                restore_old(pending);
            }
        } else if pending.had_old == 1 {
            retire(pending.old_stack, pending.old_size);
            count(counter::FREES);
        } else if sample_bytes() == 0 {
            // (In sampling mode most blocks were never sampled: no news.)
            count(counter::UNMATCHED_FREES);
        }
    }

    if pending.sampled == 0 {
        return;
    }
    if ok {
        record_alloc(addr, pending.size, pending.stack);
    } else if !(pending.size == 0 && pending.ptr_arg != 0 && pending.overflow == 0) {
        // A NULL from realloc(p, 0) is its success, not a failure.
        count(counter::FAILED_ALLOCS);
    }
}

fn try_free(ctx: &ProbeContext) -> Result<u32, u32> {
    let ptr = arg(ctx, 0);
    if ptr == 0 {
        return Ok(0);
    }
    let sampling = sample_bytes() != 0;
    let tid = bpf_get_current_pid_tgid();
    // Nothing has moved the stack pointer before free's probe (see `placement`): the
    // return address is at its top.
    let (slot, ret_addr) = return_slot(ctx, 0);
    // A free inside realloc: the realloc's return accounts for it. In sampling mode nearly
    // every free misses the live map, so that lookup goes first.
    if !sampling && call_in_flight(tid, slot, ret_addr).is_some() {
        return Ok(0);
    }
    match LIVE.get_ptr(ptr) {
        Some(live) => {
            if sampling && call_in_flight(tid, slot, ret_addr).is_some() {
                return Ok(0);
            }
            let live = unsafe { *live };
            if LIVE.remove(ptr).is_ok() {
                retire(live.stack, live.size);
                count(counter::FREES);
            }
        }
        None => {
            if !sampling {
                count(counter::UNMATCHED_FREES);
            }
        }
    }
    Ok(0)
}

pub(crate) fn restore_old(pending: &Pending) {
    let old = LiveAlloc {
        size: pending.old_size,
        stack: pending.old_stack,
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
    };
    if LIVE.insert(pending.ptr_arg, &old, 0).is_err() {
        count(counter::DROP_LIVE_FULL);
        retire(pending.old_stack, pending.old_size);
    }
}

/// A block of `size` bytes of `stack` is no longer live.
#[inline(always)]
pub(crate) fn retire(stack: u64, size: u64) {
    let (bytes, allocs) = weight(size);
    add_stats(stack, -(bytes as i64), -(allocs as i64), 0, 0);
}

fn record_alloc(addr: u64, size: u64, stack: u64) {
    let (bytes, allocs) = weight(size);
    record_weighted(addr, size, stack, bytes, allocs);
}

/// [`record_alloc`] of a block that adds `bytes` and `allocs` to its stack's totals (the
/// in-process sampler's event says what: see sampler.rs). Inlined, so that sampling mode's
/// program stays as it was.
#[inline(always)]
pub(crate) fn record_weighted(addr: u64, size: u64, stack: u64, bytes: u64, allocs: u64) {
    if let Some(stale) = LIVE.get_ptr(addr) {
        // We hold this address as live, yet the allocator handed it out again: its free
        // went by unseen. Retire it from its stack before reusing the slot.
        let stale = unsafe { *stale };
        retire(stale.stack, stale.size);
        count(counter::STALE_LIVE);
    }
    let Some((stack, stats)) = stats_entry(stack) else {
        return;
    };
    let live = LiveAlloc {
        size,
        stack,
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
    };
    // Counted live before it is findable by a free on another thread, so that the stack's
    // running total never misses a block that is live (which its peak would then miss too).
    add(stats, bytes as i64, allocs as i64, bytes, allocs);
    if LIVE.insert(addr, &live, 0).is_err() {
        // Not tracked as live (its free could not be matched), but still allocated: it was
        // live at this moment, so the peak may keep it.
        count(counter::DROP_LIVE_FULL);
        add(stats, -(bytes as i64), -(allocs as i64), 0, 0);
    }
}

pub(crate) fn add_stats(stack: u64, live_bytes: i64, live_allocs: i64, alloc_bytes: u64, allocs: u64) {
    if let Some((_, stats)) = stats_entry(stack) {
        add(stats, live_bytes, live_allocs, alloc_bytes, allocs);
    }
}

/// The totals entry of `stack`, created on first use, and the key it is kept under: when
/// the stats map is full that is the lost-stack entry, which user space creates before
/// attaching, so that every byte is still counted somewhere.
fn stats_entry(stack: u64) -> Option<(u64, *mut StackStats)> {
    if let Some(s) = STATS.get_ptr_mut(stack) {
        return Some((stack, s));
    }
    let zero = StackStats::default();
    if let Err(err) = STATS.insert(stack, &zero, BPF_NOEXIST as u64) {
        if err != -17 {
            // Not -EEXIST (another CPU created it first): the map is full.
            count(counter::DROP_STATS_FULL);
            return STATS.get_ptr_mut(STACK_LOST).map(|s| (STACK_LOST, s));
        }
    }
    STATS.get_ptr_mut(stack).map(|s| (stack, s))
}

/// Tries at raising a stack's peak before giving up (and counting it).
const PEAK_TRIES: u32 = 8;

fn add(s: *mut StackStats, live_bytes: i64, live_allocs: i64, alloc_bytes: u64, allocs: u64) {
    // Several CPUs update one stack's totals at once. core has no atomic read-modify-write
    // for the BPF target, but LLVM lowers this intrinsic to the BPF atomic add instruction.
    // Signed deltas are added as their two's complement.
    // SeqCst, not Relaxed: for a relaxed add LLVM's BPF backend emits the plain atomic add,
    // which returns nothing, even when the result is used (seen with LLVM 22).
    let before = unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(
            (&raw mut (*s).live_bytes).cast(),
            live_bytes as u64,
        )
    };
    add_counter(counter::LIVE_BYTES, live_bytes as u64);
    if live_bytes > 0 {
        raise_peak(s, (before as i64).wrapping_add(live_bytes));
    }
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
            (&raw mut (*s).live_allocs).cast(),
            live_allocs as u64,
        );
        if allocs != 0 {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                &raw mut (*s).alloc_bytes,
                alloc_bytes,
            );
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*s).allocs, allocs);
        }
    }
}

/// Raises the peak of `s` to `live` if it is lower. BPF has no atomic max, so: compare and
/// swap from the value read. Why the peak is exact: the fetch-add in `add` returns the value
/// it replaced, so `live` is exactly one value the stack's counter took, and every value it
/// takes upwards comes from such an add; each add then leaves the peak at least at its own
/// value. The swap only fails when another CPU changed the peak in between, and peaks only
/// go up, so a retry either succeeds or finds the peak already as high. Only after
/// `PEAK_TRIES` lost races in a row (other CPUs raising this stack's peak all that time) is
/// an update given up, and that is counted.
#[inline(always)]
fn raise_peak(s: *mut StackStats, live: i64) {
    let peak = unsafe { &raw mut (*s).peak_bytes };
    let mut seen = unsafe { core::ptr::read_volatile(peak) };
    for _ in 0..PEAK_TRIES {
        if live <= seen {
            return;
        }
        let (was, swapped) = unsafe {
            atomic_cxchg::<i64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
                peak, seen, live,
            )
        };
        if swapped {
            return;
        }
        seen = was;
    }
    if live > seen {
        count(counter::PEAK_CONTENDED);
    }
}
