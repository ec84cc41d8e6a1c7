//! The malloc family: entry and return probes on every allocating function, and an entry
//! probe on free. Per-stack totals are updated here, in the kernel; user space only reads them.
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user,
        generated::bpf_get_attach_cookie,
    },
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use tracer_common::{
    AllocKind, LiveAlloc, Pending, STACK_LOST, StackStats, cookie_kind, cookie_sp_offset, counter,
};

use crate::{
    maps::{LIVE, PENDING, STATS, count},
    stack,
};

const PAGE_SIZE: u64 = 4096;

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

fn try_alloc_enter(ctx: &ProbeContext) -> Result<u32, u32> {
    let tid = bpf_get_current_pid_tgid();
    if let Some(p) = PENDING.get_ptr_mut(tid) {
        // realloc -> malloc, reallocarray -> realloc, posix_memalign -> malloc: the outer
        // call is the one the program made; the inner one is glibc's business.
        unsafe { (*p).depth += 1 };
        return Ok(0);
    }
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let kind = cookie_kind(cookie);
    let Some(kind) = AllocKind::from_u32(kind) else {
        return Err(1);
    };
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

    let mut pending = Pending {
        size,
        ptr_arg,
        stack: STACK_LOST,
        old_size: 0,
        old_stack: 0,
        depth: 0,
        kind: kind as u32,
        overflow,
        had_old: 0,
    };
    let resizes = matches!(kind, AllocKind::Realloc | AllocKind::Reallocarray);
    if resizes && ptr_arg != 0 {
        // Take the old block out now: once realloc has released it, another thread may be
        // handed the same address before our return probe runs.
        if let Some(old) = LIVE.get_ptr(ptr_arg) {
            let old = unsafe { *old };
            if LIVE.remove(ptr_arg).is_ok() {
                pending.had_old = 1;
                pending.old_size = old.size;
                pending.old_stack = old.stack;
            }
        }
    }
    pending.stack = stack::capture(ctx, cookie_sp_offset(cookie));
    if PENDING.insert(tid, &pending, 0).is_err() {
        count(counter::DROP_PENDING_FULL);
        if pending.had_old == 1 {
            restore_old(&pending);
        }
    }
    Ok(0)
}

fn try_alloc_exit(ctx: &RetProbeContext) -> Result<u32, u32> {
    let tid = bpf_get_current_pid_tgid();
    let Some(p) = PENDING.get_ptr_mut(tid) else {
        count(counter::ORPHAN_RETURNS);
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
    let ret: u64 = ctx.ret();

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
                restore_old(&pending);
            }
        } else if pending.had_old == 1 {
            add_stats(pending.old_stack, -(pending.old_size as i64), -1, 0, 0);
            count(counter::FREES);
        } else {
            count(counter::UNMATCHED_FREES);
        }
    }

    if ok {
        record_alloc(addr, pending.size, pending.stack);
    } else if !(pending.size == 0 && pending.ptr_arg != 0 && pending.overflow == 0) {
        // A NULL from realloc(p, 0) is its success, not a failure.
        count(counter::FAILED_ALLOCS);
    }
    Ok(0)
}

fn try_free(ctx: &ProbeContext) -> Result<u32, u32> {
    let ptr = arg(ctx, 0);
    if ptr == 0 {
        return Ok(0);
    }
    let tid = bpf_get_current_pid_tgid();
    if PENDING.get_ptr(tid).is_some() {
        // A free inside realloc; the realloc return probe accounts for it.
        return Ok(0);
    }
    match LIVE.get_ptr(ptr) {
        Some(live) => {
            let live = unsafe { *live };
            if LIVE.remove(ptr).is_ok() {
                add_stats(live.stack, -(live.size as i64), -1, 0, 0);
                count(counter::FREES);
            }
        }
        None => count(counter::UNMATCHED_FREES),
    }
    Ok(0)
}

fn restore_old(pending: &Pending) {
    let old = LiveAlloc {
        size: pending.old_size,
        stack: pending.old_stack,
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
    };
    if LIVE.insert(pending.ptr_arg, &old, 0).is_err() {
        count(counter::DROP_LIVE_FULL);
        add_stats(pending.old_stack, -(pending.old_size as i64), -1, 0, 0);
    }
}

fn record_alloc(addr: u64, size: u64, stack: u64) {
    if let Some(stale) = LIVE.get_ptr(addr) {
        // We hold this address as live, yet the allocator handed it out again: its free
        // went by unseen. Retire it from its stack before reusing the slot.
        let stale = unsafe { *stale };
        add_stats(stale.stack, -(stale.size as i64), -1, 0, 0);
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
    if LIVE.insert(addr, &live, 0).is_ok() {
        add(stats, size as i64, 1, size, 1);
    } else {
        // Not tracked as live (its free could not be matched), but still allocated.
        count(counter::DROP_LIVE_FULL);
        add(stats, 0, 0, size, 1);
    }
}

fn add_stats(stack: u64, live_bytes: i64, live_allocs: i64, alloc_bytes: u64, allocs: u64) {
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

fn add(s: *mut StackStats, live_bytes: i64, live_allocs: i64, alloc_bytes: u64, allocs: u64) {
    // Several CPUs update one stack's totals at once. core has no atomic read-modify-write
    // for the BPF target, but LLVM lowers this intrinsic to the BPF atomic add instruction.
    // Signed deltas are added as their two's complement.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
            (&raw mut (*s).live_bytes).cast(),
            live_bytes as u64,
        );
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
