//! User stack capture: the walker of issue 11, or the kernel's frame-pointer walk.
//!
//! `--unwind dwarf|auto` (UNWIND_MODE 1 or 2): our own walk, one frame per `bpf_loop`
//! iteration. Each frame's pc is looked up in the table of the target's executable mappings
//! (a binary search over one half of `UNWIND_MAPPINGS`, the half `UNWIND_HEADER` says is in
//! use), then in that module's unwind rows (a binary search over its slice of `UNWIND_ROWS`),
//! built in user space from `.eh_frame` (tracer/src/unwind). A mapping without rows (JIT code,
//! a module without CFI) is walked by frame pointer in auto mode and ends the stack in dwarf
//! mode. The walk is tracer/src/unwind/mod.rs's `walk`, step for step; a change to one is a
//! change to both. A frame of V8 code is followed by the two words that say which JavaScript
//! function runs in it, when `v8::capture` finds one (tracer_common::js_frame).
//!
//! `--unwind fp` (0): `bpf_get_stack`. An entry uprobe on glibc's malloc fires before malloc
//! has pushed anything that a frame-pointer walk understands, so the kernel's walk (regs->ip,
//! then the saved frame pointers) never sees the return address into the caller; it is read
//! at the probe and put in slot 1.
//!
//! Stacks are kept by a 64-bit hash of their frames; a hash hit is checked frame by frame, so
//! two stacks that share a hash are never merged.
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user,
        bpf_probe_read_kernel,
        generated::{
            bpf_find_vma, bpf_get_current_task_btf, bpf_get_smp_processor_id, bpf_get_stack, bpf_loop,
            bpf_probe_read_user as read_user_bytes,
        },
    },
    macros::map,
    maps::{Array, RingBuf},
};
use tracer_common::{
    DEFERRED_STACK_BYTES, DEFERRED_TOKEN, DeferredStack, MAX_FRAMES, MAX_UNWIND_MAPPINGS, STACK_LOST, UNWIND_PAGE_SHIFT, StackBuf, UnwindHeader, UnwindMapping,
    UnwindRow, counter, js_frame, mapping_flag, row_kind, sigframe, unwind_mode,
};

use crate::{
    maps::{PENDING, SCRATCH, SCRATCH_SLOTS, STACKS, claim_scratch, count, release_scratch},
    v8,
};

const BPF_F_USER_STACK: u64 = 1 << 8;
const E2BIG: i32 = -7;
const EEXIST: i32 = -17;

/// The bits of the stack hash kept as the key: all of them, except in tests that narrow it
/// on purpose so that distinct stacks collide (set by user space before load).
#[unsafe(no_mangle)]
static STACK_HASH_MASK: u64 = u64::MAX;

/// `MAX_FRAMES - 1`, as data (see its one use).
#[unsafe(no_mangle)]
static FRAME_INDEX_MASK: u64 = (MAX_FRAMES - 1) as u64;

/// How stacks are walked (`tracer_common::unwind_mode`); set by user space before load.
#[unsafe(no_mangle)]
static UNWIND_MODE: u64 = unwind_mode::FP;

/// Offsets of `vm_area_struct`'s `vm_flags` and `vm_file` in the running kernel (from its
/// BTF), set by user space before load; u64::MAX when unknown (then no address outside the
/// table is taken for code).
#[unsafe(no_mangle)]
static VMA_FLAGS_OFFSET: u64 = u64::MAX;
#[unsafe(no_mangle)]
static VMA_FILE_OFFSET: u64 = u64::MAX;

/// `VM_EXEC` and `VM_IO` in `vm_flags`. The kernel's uprobe trampoline page ([uprobes]) is
/// anonymous and executable too, but VM_IO, and no frame's code.
const VM_EXEC: u64 = 0x4;
const VM_IO: u64 = 0x4000;

/// `BPF_F_MMAPABLE`: user space writes the rows straight into the array's memory.
const MMAPABLE: u32 = 1 << 10;

/// Every loaded module's rows, each module a sorted slice; sized by user space before load.
#[map]
static UNWIND_ROWS: Array<UnwindRow> = Array::with_max_entries(1, MMAPABLE);

/// Every loaded module's page index (see `UnwindMapping`), one entry per 8-byte value.
#[map]
static UNWIND_PAGES: Array<u64> = Array::with_max_entries(1, MMAPABLE);

/// Two halves of sorted mappings: user space fills the half not in use, then flips
/// `UnwindHeader::active`, so a walk never sees a half-written table.
#[map]
static UNWIND_MAPPINGS: Array<UnwindMapping> = Array::with_max_entries(2 * MAX_UNWIND_MAPPINGS, 0);

#[map]
static UNWIND_HEADER: Array<UnwindHeader> = Array::with_max_entries(1, 0);

/// Walks that met code the tables do not hold yet, for user space to finish.
#[map]
static DEFERRED_STACKS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

/// The user registers a walk starts from.
#[derive(Clone, Copy)]
pub struct UserRegs {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
}

#[inline(always)]
fn unwind_mode() -> u64 {
    // SAFETY: a plain read of our own global, volatile so the build-time value is not folded.
    unsafe { core::ptr::read_volatile(&UNWIND_MODE) }
}

/// Captures the user stack of the current task, from any program type that `bpf_get_stack`
/// accepts: walked from `regs` (dwarf, auto), or by the kernel with `caller` (0 when unknown;
/// user space drops it) in slot 1 (fp).
#[inline(always)]
pub fn capture_with_caller(ctx: *mut core::ffi::c_void, regs: &UserRegs, caller: u64) -> u64 {
    let Some((slot, buf)) = claim_scratch() else {
        return STACK_LOST;
    };
    let got = if unwind_mode() == unwind_mode::FP {
        // SAFETY: `buf` is a scratch value of this CPU that we own until it is released.
        kernel_walk(ctx, caller, unsafe { &mut *buf })
    } else {
        // The walk writes the buffer through the map on each iteration.
        walk_stack(slot, regs.ip, regs.sp, regs.bp) != 0
    };
    let key = if got { store_stack(slot) } else { STACK_LOST };
    release_scratch(slot);
    key
}

/// Captures a user stack that starts at `regs` rather than where the program's probe fired:
/// the in-process sampler's probe sites (sampler.rs) hand over the registers at the
/// allocator's entry, and the walk must not see the sampler's own frames. `caller` is the
/// return address at `regs.sp`. Frames as [`capture_with_caller`] records them: the walker's
/// (dwarf, auto), or with `--unwind fp` `regs.ip`, `caller`, then the return addresses of the
/// frame-pointer chain from `regs.bp`, as the kernel's walk would give them at an entry probe.
#[inline(always)]
pub fn capture_from(regs: &UserRegs, caller: u64) -> u64 {
    let Some((slot, buf)) = claim_scratch() else {
        return STACK_LOST;
    };
    let got = if unwind_mode() == unwind_mode::FP {
        // SAFETY: `buf` is a scratch value of this CPU that we own until it is released.
        unsafe {
            (*buf).frames[0] = regs.ip;
            (*buf).frames[1] = caller;
            (*buf).len = 2;
        }
        fp_walk_stack(slot, regs.bp);
        true
    } else {
        walk_stack(slot, regs.ip, regs.sp, regs.bp) != 0
    };
    let key = if got { store_stack(slot) } else { STACK_LOST };
    release_scratch(slot);
    key
}

/// A frame-pointer walk's state, for each `bpf_loop` iteration of [`fp_step`].
#[repr(C)]
struct FpWalk {
    bp: u64,
    slot: u32,
    len: u32,
}

/// Appends to scratch slot `slot` (holding `len` frames) the return addresses of the
/// frame-pointer chain from `bp`. A global function, like [`walk_stack`].
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn fp_walk_stack(slot: u32, bp: u64) -> u64 {
    let Some(buf) = SCRATCH.get_ptr_mut(slot) else { return 0 };
    // SAFETY: this CPU's scratch value of a slot the caller owns.
    let len = unsafe { (*buf).len } as u32;
    let mut walk = FpWalk { bp, slot, len };
    // SAFETY: the callback is a static function of this object; `walk` outlives the call.
    unsafe {
        bpf_loop(
            MAX_FRAMES as u32,
            fp_step as *mut core::ffi::c_void,
            (&raw mut walk).cast(),
            0,
        )
    };
    if walk.len as usize >= MAX_FRAMES {
        count(counter::UNWIND_DEPTH_CAP);
    }
    // SAFETY: as above.
    unsafe { (*buf).len = walk.len.min(MAX_FRAMES as u32) as u64 };
    walk.len as u64
}

/// One frame of [`fp_walk_stack`], as the kernel's user walk takes it: the pair at the frame
/// pointer (saved rbp, return address), stored until a pair cannot be read.
#[inline(never)]
extern "C" fn fp_step(_index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `ctx` is the `FpWalk` on the stack of `fp_walk_stack`, which waits for the loop.
    let w = unsafe { &mut *(ctx as *mut FpWalk) };
    let at = w.len as usize;
    if at >= MAX_FRAMES {
        return 1;
    }
    let Ok([next_bp, ra]) = read_pair(w.bp) else { return 1 };
    let Some(buf) = SCRATCH.get_ptr_mut(w.slot) else { return 1 };
    // SAFETY: this CPU's scratch value of the slot we own; at < MAX_FRAMES.
    unsafe { (*buf).frames[at & (MAX_FRAMES - 1)] = ra };
    w.len = at as u32 + 1;
    w.bp = next_bp;
    0
}

/// [`store`] for the buffer of scratch slot `slot`. A global function, checked once by the
/// verifier (its loop over the frames, inlined into every path of the sampling program,
/// took that program past the verifier's budget).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn store_stack(slot: u32) -> u64 {
    match SCRATCH.get_ptr_mut(slot) {
        // SAFETY: this CPU's scratch value of a slot the caller owns.
        Some(buf) => store(unsafe { &mut *buf }),
        None => STACK_LOST,
    }
}

#[inline(always)]
fn kernel_walk(ctx: *mut core::ffi::c_void, caller: u64, buf: &mut StackBuf) -> bool {
    let size = ((MAX_FRAMES - 1) * 8) as u32;
    // Frames go to slots 1.., so that slot 0 can take the ip and slot 1 the caller.
    let got = unsafe {
        bpf_get_stack(
            ctx,
            (&raw mut buf.frames[1]).cast(),
            size,
            BPF_F_USER_STACK,
        )
    };
    if got <= 0 {
        count(counter::DROP_STACK_UNAVAILABLE);
        return false;
    }
    let frames = (got as usize / 8).min(MAX_FRAMES - 1);
    buf.frames[0] = buf.frames[1];
    buf.frames[1] = caller;
    buf.len = (frames + 1) as u64;
    true
}

/// Why a walk ended, as a counter index; `NO_STOP` while it goes on, `END` at the outermost
/// frame (no loss).
const NO_STOP: u32 = u32::MAX;
const END: u32 = u32::MAX - 1;

/// `Walk::flags`: code without rows ends the walk (`--unwind dwarf`); V8 frames are read.
const DWARF_ONLY: u32 = 1;
const READ_V8: u32 = 2;

/// The walk's state, on the program's stack, handed to each `bpf_loop` iteration.
#[repr(C)]
struct Walk {
    pc: u64,
    sp: u64,
    bp: u64,
    /// The slot of the return address of the allocator call in flight on this thread, and the
    /// real return address: a return probe put its trampoline's address in that slot.
    pending_slot: u64,
    pending_ret: u64,
    /// 1 when `pc` is exact (the first frame, or a frame a signal interrupted), 0 when it is a
    /// return address (looked up at pc - 1: a call may be the last instruction of a function).
    exact: u32,
    len: u32,
    stop: u32,
    slot: u32,
    /// Mappings in the half in use, and where that half starts.
    maps_len: u32,
    maps_base: u32,
    /// `DWARF_ONLY` and `READ_V8` bits (one word: the walk's state must stay small).
    flags: u32,
    /// The mapping found last: its index plus one (0: none yet). An index, not a copy: the
    /// walk's stack frames must stay small enough to fit under the sampling program's.
    last: u32,
}

/// Walks the current task's user stack from `ip`, `sp` and `bp` into scratch slot `slot`;
/// returns the frames recorded (0: none). A global function: the verifier checks it once, on
/// its own, rather than once for every way a program reaches it (the sampling program reaches
/// it along many paths, which would take it past the verifier's budget).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn walk_stack(slot: u32, ip: u64, sp: u64, bp: u64) -> u64 {
    let regs = UserRegs { ip, sp, bp };
    if own_walk(slot, &regs) {
        1
    } else {
        0
    }
}

#[inline(always)]
fn own_walk(slot: u32, regs: &UserRegs) -> bool {
    if slot >= SCRATCH_SLOTS {
        return false;
    }
    let Some(header) = UNWIND_HEADER.get(0) else { return false };
    let active = header.active & 1;
    let maps_len = header.len[active as usize].min(MAX_UNWIND_MAPPINGS);
    let tid = bpf_get_current_pid_tgid();
    let flags = if unwind_mode() == unwind_mode::DWARF { DWARF_ONLY } else { 0 }
        | if v8::config().is_some() { READ_V8 } else { 0 };
    if flags & READ_V8 != 0 {
        v8::forget(slot);
    }
    let (pending_slot, pending_ret) = match PENDING.get_ptr(tid) {
        // SAFETY: a map value; read once, by value.
        Some(p) => unsafe { ((*p).sp, (*p).ret_addr) },
        None => (0, 0),
    };
    let mut walk = Walk {
        pc: regs.ip,
        sp: regs.sp,
        bp: regs.bp,
        pending_slot,
        pending_ret,
        exact: 1,
        len: 0,
        stop: NO_STOP,
        slot,
        maps_len,
        maps_base: active * MAX_UNWIND_MAPPINGS,
        flags,
        last: 0,
    };
    // SAFETY: the callback is a static function of this object; `walk` outlives the call.
    unsafe {
        bpf_loop(
            MAX_FRAMES as u32,
            step as *mut core::ffi::c_void,
            (&raw mut walk).cast(),
            0,
        )
    };
    let Some(buf) = SCRATCH.get_ptr_mut(slot) else { return false };
    if walk.len == 0 {
        count(counter::DROP_STACK_UNAVAILABLE);
        return false;
    }
    let mut len = walk.len;
    match walk.stop {
        END => {}
        // bpf_loop ran out of iterations: the buffer is full.
        NO_STOP => count(counter::UNWIND_DEPTH_CAP),
        counter::UNWIND_OUTSIDE_MAPPINGS if len < MAX_FRAMES as u32 => match defer(&walk) {
            // The last frame names the rest, which user space walks.
            Some(token) => {
                // SAFETY: our scratch slot; len < MAX_FRAMES.
                unsafe { (*buf).frames[(len as usize) & (MAX_FRAMES - 1)] = token };
                len += 1;
            }
            None => count(counter::UNWIND_OUTSIDE_MAPPINGS),
        },
        reason => count(reason),
    }
    // SAFETY: our scratch slot, owned until released.
    unsafe { (*buf).len = len as u64 };
    true
}

/// Sends the rest of a walk that reached code the tables do not hold (a library mapped since
/// they were written: its first calls can come microseconds after the mmap) to user space,
/// with a copy of the stack; returns the token that stands for it, or None if it could not be
/// sent.
#[inline(never)]
fn defer(walk: &Walk) -> Option<u64> {
    // Unique: two walks on one CPU (one preempting the other included) read different
    // nanoseconds; 2^52 ns is 52 days.
    let cpu = unsafe { bpf_get_smp_processor_id() } as u64;
    let now = unsafe { bpf_ktime_get_ns() };
    let token = DEFERRED_TOKEN | ((cpu & 0x3ff) << 52) | (now & ((1 << 52) - 1));
    let mut entry = DEFERRED_STACKS.reserve::<DeferredStack>(0)?;
    let d = entry.as_mut_ptr();
    // SAFETY: the reserved record, ours until submitted or discarded.
    unsafe {
        (*d).token = token;
        (*d).pc = walk.pc;
        (*d).sp = walk.sp;
        (*d).bp = walk.bp;
        (*d).exact = walk.exact;
        (*d).copied = 0;
        // The stack's top may lie closer than the full copy to the end of its mapping.
        let dst = (&raw mut (*d).bytes).cast::<core::ffi::c_void>();
        let src = walk.sp as *const core::ffi::c_void;
        if read_user_bytes(dst, DEFERRED_STACK_BYTES as u32, src) == 0 {
            (*d).copied = DEFERRED_STACK_BYTES as u32;
        } else if read_user_bytes(dst, 2048, src) == 0 {
            (*d).copied = 2048;
        } else if read_user_bytes(dst, 256, src) == 0 {
            (*d).copied = 256;
        }
    }
    entry.submit(0);
    Some(token)
}

/// One frame: records it, then finds its caller. Returns 1 to end the walk.
#[inline(never)]
extern "C" fn step(index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `ctx` is the `Walk` on the stack of `own_walk`, which waits for the loop.
    let w = unsafe { &mut *(ctx as *mut Walk) };
    // The loop's index (iteration i records frame i), not a count kept in `w`: the verifier
    // sees it as any number, so it checks this body once rather than once per frame.
    let i = index as u32;
    if index >= MAX_FRAMES as u64 {
        w.stop = counter::UNWIND_DEPTH_CAP;
        return 1;
    }
    // Where this frame's code is: a mapping of the table (with rows or without), JIT code the
    // table does not hold yet (the kernel says so), or nowhere known. Nowhere known ends the
    // walk before the frame is recorded (a return address is then data, or code user space
    // places: see `defer`), except for the probe's own pc.
    let lookup_pc = if w.exact != 0 { w.pc } else { w.pc.wrapping_sub(1) };
    let mapping = find_mapping(w, lookup_pc);
    let known = mapping.is_some() || anonymous_code(lookup_pc);
    if !known && i != 0 {
        w.stop = counter::UNWIND_OUTSIDE_MAPPINGS;
        return 1;
    }
    let Some(buf) = SCRATCH.get_ptr_mut(w.slot) else {
        w.stop = counter::UNWIND_BAD_FRAME;
        return 1;
    };
    // Frames and the words of V8 frames share the buffer: the next free slot is `len`.
    let at = w.len as usize;
    if at >= MAX_FRAMES {
        w.stop = counter::UNWIND_DEPTH_CAP;
        return 1;
    }
    // SAFETY: this CPU's scratch value of the slot we own.
    unsafe { (*buf).frames[at & (MAX_FRAMES - 1)] = w.pc };
    w.len = at as u32 + 1;
    if !known {
        // The probe's pc in unknown code: nothing to go on from, nothing to hand over.
        w.stop = counter::UNWIND_BAD_FRAME;
        return 1;
    }
    if w.flags & READ_V8 != 0 && i != 0 && at + 3 <= MAX_FRAMES {
        let code = match mapping {
            Some(m) if m.flags & mapping_flag::ANON_CODE != 0 => v8::JIT,
            Some(m) if m.flags & mapping_flag::V8_BINARY != 0 => match v8::config() {
                Some((start, end)) if (start..end).contains(&lookup_pc.wrapping_sub(m.bias)) => v8::BUILTIN,
                _ => v8::NOT_V8,
            },
            Some(_) => v8::NOT_V8,
            // Not in the table, so anonymous code mapped since it was written.
            None => v8::JIT,
        };
        // This frame's own frame pointer: V8 code keeps one, and the walk has restored it.
        if code != v8::NOT_V8 && let Some((word, detail)) = v8::capture(w.bp, code, w.slot) {
            // The mask is read, not written as a constant: the compiler would drop it as
            // redundant after the bound above, which the verifier does not carry this far.
            // SAFETY: a plain read of our own global.
            let mask = unsafe { core::ptr::read_volatile(&FRAME_INDEX_MASK) } as usize;
            // SAFETY: as above; at + 2 < MAX_FRAMES.
            unsafe {
                if code == v8::JIT {
                    // JIT code moves with the GC: its pc is marked to stay out of the key.
                    (*buf).frames[at & mask] = js_frame::addr(w.pc);
                }
                (*buf).frames[(at + 1) & mask] = word;
                (*buf).frames[(at + 2) & mask] = detail;
            }
            w.len = at as u32 + 3;
        }
    }
    let row = match mapping {
        Some(m) if m.rows_len != 0 => find_row(m, lookup_pc),
        _ => None,
    };
    match caller(w, row) {
        Ok(()) => 0,
        Err(stop) => {
            w.stop = stop;
            1
        }
    }
}

#[inline(always)]
fn read(addr: u64) -> Result<u64, u32> {
    // SAFETY: a checked read of the target's memory; a fault is an error.
    unsafe { bpf_probe_read_user(addr as *const u64) }.map_err(|_| counter::UNWIND_BAD_FRAME)
}

/// Moves `w` to the caller's frame by `row` (None: by frame pointer), or says why there is
/// none. Whether the caller's code is known is the next step's question.
#[inline(always)]
fn caller(w: &mut Walk, row: Option<UnwindRow>) -> Result<(), u32> {
    let (cfa, ra_slot, next_bp, next_exact) = match row {
        Some(r) if r.kind == row_kind::END => return Err(END),
        Some(r) if r.kind == row_kind::CFA_RSP || r.kind == row_kind::CFA_RBP || r.kind == row_kind::PLT => {
            let base = if r.kind == row_kind::CFA_RBP { w.bp } else { w.sp };
            let mut cfa = base.wrapping_add(r.cfa_off as i64 as u64);
            if r.kind == row_kind::PLT && (w.pc & 15) >= r.rbp as u64 {
                cfa = cfa.wrapping_add(8);
            }
            if r.kind != row_kind::PLT && r.rbp == -2 {
                // The usual frame: rbp saved just below the return address, both in one read.
                let [saved_bp, ra] = read_pair(cfa.wrapping_sub(16))?;
                return next_frame(w, cfa, ra, cfa.wrapping_sub(8), saved_bp, 0);
            }
            let next_bp = if r.kind != row_kind::PLT && r.rbp != 0 {
                read(cfa.wrapping_add((r.rbp as i64 * 8) as u64))?
            } else {
                w.bp
            };
            (cfa, cfa.wrapping_sub(8), next_bp, 0)
        }
        Some(r) if r.kind == row_kind::SIGNAL => {
            let sp = w.sp;
            (read(sp + sigframe::RSP)?, sp + sigframe::RIP, read(sp + sigframe::RBP)?, 1)
        }
        Some(r) if r.kind != row_kind::NONE => return Err(counter::UNWIND_UNSUPPORTED),
        _ if w.flags & DWARF_ONLY != 0 => return Err(counter::UNWIND_NO_ROWS),
        _ => {
            // Frame pointer: the caller's rbp at rbp, the return address above it.
            if w.bp == 0 {
                return Err(END);
            }
            // A V8 frame's pair came with its slots (`v8::capture`).
            let [saved_bp, ra] = match v8::take_pair(w.slot, w.bp) {
                Some(pair) => pair,
                None => read_pair(w.bp)?,
            };
            return next_frame(w, w.bp.wrapping_add(16), ra, w.bp.wrapping_add(8), saved_bp, 0);
        }
    };
    let ra = read(ra_slot)?;
    next_frame(w, cfa, ra, ra_slot, next_bp, next_exact)
}

/// Two adjacent words of the target's stack, in one read.
#[inline(always)]
fn read_pair(addr: u64) -> Result<[u64; 2], u32> {
    // SAFETY: a checked read of the target's memory; a fault is an error.
    unsafe { bpf_probe_read_user(addr as *const [u64; 2]) }.map_err(|_| counter::UNWIND_BAD_FRAME)
}

/// Moves `w` to the caller: its CFA, the return address read from `ra_slot`, its rbp.
#[inline(always)]
fn next_frame(w: &mut Walk, cfa: u64, ra: u64, ra_slot: u64, next_bp: u64, next_exact: u32) -> Result<(), u32> {
    let mut ra = ra;
    if ra_slot == w.pending_slot && w.pending_slot != 0 {
        // The allocator call in flight: its return probe's trampoline stands in that slot.
        ra = w.pending_ret;
    }
    if ra == 0 {
        return Err(END);
    }
    if cfa <= w.sp && next_exact == 0 {
        return Err(counter::UNWIND_BAD_FRAME);
    }
    w.pc = ra;
    w.sp = cfa;
    w.bp = next_bp;
    w.exact = next_exact;
    Ok(())
}

/// What `vma_is_anonymous_code` found: 1 when the address lies in anonymous executable memory.
#[repr(C)]
struct VmaCheck {
    flags_offset: u64,
    file_offset: u64,
    anonymous_code: u64,
}

/// Whether `addr` lies in anonymous executable memory of the current task, as its memory map
/// says now (JIT code mapped since the walker's table was written).
#[inline(always)]
fn anonymous_code(addr: u64) -> bool {
    // SAFETY: plain reads of our own read-only globals.
    let (flags_offset, file_offset) =
        unsafe { (core::ptr::read_volatile(&VMA_FLAGS_OFFSET), core::ptr::read_volatile(&VMA_FILE_OFFSET)) };
    if flags_offset == u64::MAX || file_offset == u64::MAX {
        return false;
    }
    let mut check = VmaCheck { flags_offset, file_offset, anonymous_code: 0 };
    // SAFETY: the current task; a static callback; `check` outlives the call. The kernel takes
    // the memory map's lock only if it is free (else: not found).
    let found = unsafe {
        bpf_find_vma(
            bpf_get_current_task_btf(),
            addr,
            vma_is_anonymous_code as *mut core::ffi::c_void,
            (&raw mut check).cast(),
            0,
        )
    };
    found == 0 && check.anonymous_code != 0
}

#[inline(never)]
extern "C" fn vma_is_anonymous_code(
    _task: *mut core::ffi::c_void,
    vma: *mut core::ffi::c_void,
    ctx: *mut core::ffi::c_void,
) -> i64 {
    // SAFETY: `ctx` is the `VmaCheck` of `anonymous_code`, which waits for the call.
    let c = unsafe { &mut *(ctx as *mut VmaCheck) };
    let at = vma as u64;
    // SAFETY: checked reads of the kernel's vm_area_struct.
    let flags = unsafe { bpf_probe_read_kernel((at + c.flags_offset) as *const u64) };
    let file = unsafe { bpf_probe_read_kernel((at + c.file_offset) as *const u64) };
    if let (Ok(flags), Ok(file)) = (flags, file) {
        c.anonymous_code = (flags & (VM_EXEC | VM_IO) == VM_EXEC && file == 0) as u64;
    }
    0
}

/// A binary search's state: the first index of `lo..hi` whose entry starts above `pc`.
#[repr(C)]
struct Bisect {
    pc: u64,
    lo: u32,
    hi: u32,
}

/// One halving over the mapping table (each search is its own `bpf_loop`, so the verifier
/// checks one step, not every path through all of them).
#[inline(never)]
extern "C" fn map_bisect(_index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `ctx` is the `Bisect` of `find_mapping`, which waits for the loop.
    let b = unsafe { &mut *(ctx as *mut Bisect) };
    if b.lo >= b.hi {
        return 1;
    }
    let mid = b.lo + (b.hi - b.lo) / 2;
    let Some(m) = UNWIND_MAPPINGS.get(mid) else { return 1 };
    if m.start <= b.pc {
        b.lo = mid + 1;
    } else {
        b.hi = mid;
    }
    0
}

#[inline(never)]
extern "C" fn row_bisect(_index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `ctx` is the `Bisect` of `find_row`, which waits for the loop.
    let b = unsafe { &mut *(ctx as *mut Bisect) };
    if b.lo >= b.hi {
        return 1;
    }
    let mid = b.lo + (b.hi - b.lo) / 2;
    let Some(r) = UNWIND_ROWS.get(mid) else { return 1 };
    if r.pc as u64 <= b.pc {
        b.lo = mid + 1;
    } else {
        b.hi = mid;
    }
    0
}

/// The mapping holding `pc`: the last one found, when it holds it (a caller's code is often
/// in its callee's module), else a binary search over the half of the table in use.
#[inline(always)]
fn find_mapping(w: &mut Walk, pc: u64) -> Option<&'static UnwindMapping> {
    if w.last != 0
        && let Some(m) = UNWIND_MAPPINGS.get(w.last - 1)
        && m.start <= pc
        && pc < m.end
    {
        return Some(m);
    }
    let mut b = Bisect { pc, lo: w.maps_base, hi: w.maps_base + w.maps_len };
    // SAFETY: a static callback; `b` outlives the call. 2^10 > MAX_UNWIND_MAPPINGS.
    unsafe { bpf_loop(10, map_bisect as *mut core::ffi::c_void, (&raw mut b).cast(), 0) };
    if b.lo <= w.maps_base {
        return None;
    }
    let m = UNWIND_MAPPINGS.get(b.lo - 1)?;
    if pc < m.end {
        w.last = b.lo;
        Some(m)
    } else {
        None
    }
}

/// The row covering `pc` in mapping `m`'s rows: the last one that starts at or below it.
#[inline(always)]
fn find_row(m: &UnwindMapping, pc: u64) -> Option<UnwindRow> {
    let addr = pc.wrapping_sub(m.bias);
    if addr > u32::MAX as u64 {
        return None;
    }
    let first = m.rows_first;
    let (mut lo, mut hi) = (first, first.wrapping_add(m.rows_len));
    // The page index narrows the search to the rows of addr's page, a few as a rule.
    let page = addr.wrapping_sub(m.page_base) >> UNWIND_PAGE_SHIFT;
    if addr >= m.page_base && page < m.pages_len as u64 {
        let at = m.pages_first.wrapping_add(page as u32);
        if let Some(&from) = UNWIND_PAGES.get(at) {
            lo = first.wrapping_add(from as u32);
            if page + 1 < m.pages_len as u64 {
                if let Some(&to) = UNWIND_PAGES.get(at.wrapping_add(1)) {
                    hi = first.wrapping_add(to as u32).wrapping_add(1);
                }
            }
        }
    }
    // A page's few rows are scanned in place; more are searched in halves.
    if hi.wrapping_sub(lo) <= SCAN_ROWS {
        let mut found = lo;
        for k in 1..SCAN_ROWS {
            let at = lo.wrapping_add(k);
            if at >= hi {
                break;
            }
            match UNWIND_ROWS.get(at) {
                Some(r) if r.pc as u64 <= addr => found = at,
                _ => break,
            }
        }
        let r = UNWIND_ROWS.get(found).copied()?;
        return (r.pc as u64 <= addr && found >= first).then_some(r);
    }
    let mut b = Bisect { pc: addr, lo, hi };
    // SAFETY: as above. 2^24 rows is more than UNWIND_ROWS can hold.
    unsafe { bpf_loop(24, row_bisect as *mut core::ffi::c_void, (&raw mut b).cast(), 0) };
    if b.lo <= first {
        return None;
    }
    UNWIND_ROWS.get(b.lo - 1).copied()
}

/// Rows of a page range scanned one by one rather than searched in halves.
const SCAN_ROWS: u32 = 8;

/// The key of the stack in `buf` (stored if new), or [`STACK_LOST`].
#[inline(always)]
fn store(buf: &mut StackBuf) -> u64 {
    let len = buf.len as usize;
    // FNV-1a over the frames, one 64-bit word at a time.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut js = false;
    for i in 0..MAX_FRAMES {
        if i >= len {
            break;
        }
        // What a GC moves stays out of the key: V8 frames are known by their identity word.
        if !js_frame::is_addr(buf.frames[i]) {
            hash = (hash ^ buf.frames[i]).wrapping_mul(0x0000_0100_0000_01b3);
        }
        js |= js_frame::is_id(buf.frames[i]);
    }
    // SAFETY: a plain read of our own global; volatile so that the build-time value is not
    // folded in (user space sets it at load).
    hash &= unsafe { core::ptr::read_volatile(&STACK_HASH_MASK) };
    if hash == STACK_LOST {
        hash = 1;
    }
    if let Some(stored) = STACKS.get_ptr(hash) {
        return same_or_lost(hash, stored, buf);
    }
    match STACKS.insert(hash, &*buf, BPF_NOEXIST as u64) {
        Ok(()) => {
            if js {
                v8::announce(hash);
            }
            hash
        }
        Err(err) if err as i32 == EEXIST => {
            // Another CPU stored a stack under this key first: the same one, or not.
            match STACKS.get_ptr(hash) {
                Some(stored) => same_or_lost(hash, stored, buf),
                None => {
                    count(counter::STACK_INSERT_FAILED);
                    STACK_LOST
                }
            }
        }
        Err(err) if err as i32 == E2BIG => {
            count(counter::DROP_STACK_MAP_FULL);
            STACK_LOST
        }
        Err(_) => {
            // No memory for the entry, or the bucket busy: the frames would be lost.
            count(counter::STACK_INSERT_FAILED);
            STACK_LOST
        }
    }
}

/// `key` if the stack stored under it is `buf`'s, else [`STACK_LOST`] (a collision,
/// counted): two stacks under one key would merge their totals.
#[inline(always)]
fn same_or_lost(key: u64, stored: *const StackBuf, buf: &StackBuf) -> u64 {
    // SAFETY: a map value; stacks are never deleted while the programs run.
    let stored = unsafe { &*stored };
    if stored.len != buf.len {
        count(counter::STACK_COLLISION);
        return STACK_LOST;
    }
    let len = buf.len as usize;
    for i in 0..MAX_FRAMES {
        if i >= len {
            break;
        }
        if stored.frames[i] != buf.frames[i] && !js_frame::is_addr(buf.frames[i]) {
            count(counter::STACK_COLLISION);
            return STACK_LOST;
        }
    }
    key
}

/// Keeps `StackBuf` in use from this module so the layout check below stays next to its user.
const _: () = assert!(core::mem::size_of::<StackBuf>() == 8 + MAX_FRAMES * 8);
