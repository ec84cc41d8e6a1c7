//! V8 frames: which JavaScript function runs in a frame of V8 code, read at allocation time
//! while the objects are where the frame says (a compacting GC moves them later).
//!
//! The walker (`stack.rs`) asks for frames whose pc lies in JIT code or in the embedded
//! builtins of node's binary; for those, `capture` reads the context and JSFunction slots
//! below the frame pointer, follows the JSFunction's `shared` field to the SharedFunctionInfo
//! and its Script, and records the function's lasting identity (Script id, literal id) with
//! the address to name it from (layout in `tracer_common::V8Config`, written by user space
//! from the binary's `v8dbg_*` metadata). Only tag bits are checked here; user space checks
//! type words, and that the address still holds that identity, when it names the function.
//!
//! New stacks holding such frames are announced on `NEW_JS_STACKS`, so that user space names
//! them within a tick rather than at the end of a recording.
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    helpers::bpf_probe_read_user,
    macros::{map, uprobe},
    maps::{Array, PerCpuArray, RingBuf},
    programs::ProbeContext,
};
use tracer_common::{V8_CACHE_ENTRIES, V8_FRAME_WINDOW, V8_SFI_WINDOW, V8CacheEntry, V8Config, counter, js_frame};

use crate::maps::{SCRATCH_SLOTS, count};

#[map]
static V8_CONFIG: Array<V8Config> = Array::with_max_entries(1, 0);

/// Keys of new stacks that hold captured V8 frames.
#[map]
static NEW_JS_STACKS: RingBuf = RingBuf::with_byte_size(256 << 10, 0);

/// What `capture` reads of the target, per scratch slot (the walker's stack has no room).
#[repr(C)]
pub struct Reads {
    /// The frame pointer `frame` was read at (0: none): its last two words are the saved rbp
    /// and the return address, which the walk's next step takes from here instead of reading
    /// them again (see `take_pair`).
    fp: u64,
    frame: [u64; FRAME_WORDS + 2],
    sfi: [u64; SFI_WORDS],
}

#[map]
static V8_READS: PerCpuArray<Reads> = PerCpuArray::with_max_entries(SCRATCH_SLOTS, 0);

/// Mark-compact collections seen since attach (`tr_v8_gc`): the only ones that move a
/// SharedFunctionInfo or a Script, which live in V8's old space.
#[map]
static V8_GC_EPOCH: Array<u64> = Array::with_max_entries(1, 0);

/// What was read of SharedFunctionInfos, `V8_CACHE_ENTRIES` direct-mapped entries per scratch
/// slot (a slot is owned by one walk at a time, so an entry is never read half-written).
#[map]
static V8_SFI_CACHE: PerCpuArray<V8CacheEntry> =
    PerCpuArray::with_max_entries(SCRATCH_SLOTS * V8_CACHE_ENTRIES, 0);

/// On entry to V8's mark-compact collector: every SharedFunctionInfo read so far may move.
/// JavaScript does not run in that isolate until the collection is over.
#[uprobe]
pub fn tr_v8_gc(_ctx: ProbeContext) -> u32 {
    if let Some(epoch) = V8_GC_EPOCH.get_ptr_mut(0) {
        // SAFETY: an atomic add on our own map value.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(epoch, 1) };
    }
    0
}

/// V8's heap object tag (low bits 01); a Smi has bit 0 clear.
const TAG_MASK: u64 = 3;
const HEAP_OBJECT: u64 = 1;

const FRAME_WORDS: usize = V8_FRAME_WINDOW / 8;
const SFI_WORDS: usize = V8_SFI_WINDOW / 8;

/// Where a frame's pc lies, for the reader.
pub const NOT_V8: u32 = 0;
/// JIT code (anonymous executable memory): baseline and optimized frames.
pub const JIT: u32 = 1;
/// Node's embedded builtins: the interpreter's frames among others.
pub const BUILTIN: u32 = 2;

/// Whether user space turned the reader on (and the builtins' ELF range), read once a walk.
#[inline(always)]
pub fn config() -> Option<(u64, u64)> {
    let c = V8_CONFIG.get(0)?;
    (c.enabled != 0).then_some((c.blob_start, c.blob_end))
}

#[inline(always)]
fn is_object(word: u64) -> bool {
    word & TAG_MASK == HEAP_OBJECT && word > 0x1000
}

/// The two words that stand for the JS function of the frame whose frame pointer is `fp`
/// (see `tracer_common::js_frame`), or None when the frame does not hold one: a typed frame
/// (a Smi marker where a JS frame keeps its context), slots that do not hold heap objects, or
/// a function without a Script (V8's own builtins, which their symbols name already).
/// `code`: JIT or BUILTIN; in the builtins (the interpreter) the bytecode offset is current.
/// `slot`: the walk's scratch slot, whose read buffers it owns.
#[inline(always)]
pub fn capture(fp: u64, code: u32, slot: u32) -> Option<(u64, u64)> {
    let c = V8_CONFIG.get(0)?;
    let reads = V8_READS.get_ptr_mut(slot)?;
    // SAFETY: this CPU's buffers of the slot the walk owns.
    let (slots, words) = unsafe { (&mut (*reads).frame, &mut (*reads).sfi) };
    // SAFETY: checked reads of the target's memory; a fault is an error.
    let read = |dst: *mut u64, len: usize, src: u64| unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_user(dst.cast(), len as u32, src as *const core::ffi::c_void) == 0
    };
    // SAFETY: as above.
    unsafe { (*reads).fp = 0 };
    if !read(slots.as_mut_ptr(), V8_FRAME_WINDOW + 16, fp.wrapping_sub(V8_FRAME_WINDOW as u64)) {
        return None;
    }
    // SAFETY: as above.
    unsafe { (*reads).fp = fp };
    let context = *slots.get(c.context_slot as usize)?;
    let function = *slots.get(c.function_slot as usize)?;
    if !is_object(context) || !is_object(function) {
        return None;
    }
    let shared_at = function - HEAP_OBJECT + c.js_function_shared;
    // SAFETY: as above.
    let shared = unsafe { bpf_probe_read_user(shared_at as *const u64) }.ok()?;
    if !is_object(shared) {
        return None;
    }
    let sfi = shared - HEAP_OBJECT;
    let (script_id, literal, function_data) = match sfi_fields(c, sfi, slot, words.as_mut_ptr()) {
        Some(fields) => fields,
        None => return None,
    };
    let mut offset_plus_one = 0;
    if code == BUILTIN {
        // The offset is into the function's own bytecode only when the frame's BytecodeArray
        // slot holds the array the SharedFunctionInfo has (else: a frame of another kind).
        let array = *slots.get(c.bytecode_array_slot as usize)?;
        let smi = *slots.get(c.bytecode_offset_slot as usize)?;
        if array == function_data && is_object(array) && smi & 0xffff_ffff == 0 {
            let offset = ((smi as i64) >> 32).wrapping_sub(c.bytecode_start as i64);
            if (0..(1 << js_frame::OFFSET_BITS) - 1).contains(&offset) {
                offset_plus_one = offset as u64 + 1;
            }
        }
    }
    Some((
        js_frame::id(code == JIT, script_id, literal, offset_plus_one),
        js_frame::addr(sfi),
    ))
}

/// The Script id, literal id and function data of the SharedFunctionInfo at `sfi`: from the
/// slot's cache when it was read since the last mark-compact collection, else read (into
/// `words`, the slot's buffer) and kept. None when its Script slot holds no Script with an id
/// (V8's own builtins).
#[inline(always)]
fn sfi_fields(c: &V8Config, sfi: u64, slot: u32, words: *mut u64) -> Option<(u64, u64, u64)> {
    let epoch = match V8_GC_EPOCH.get(0) {
        Some(&e) if c.cache != 0 => e,
        _ => u64::MAX,
    };
    let at = slot * V8_CACHE_ENTRIES + ((sfi >> 3) as u32 & (V8_CACHE_ENTRIES - 1));
    let entry = V8_SFI_CACHE.get_ptr_mut(at)?;
    // SAFETY: this CPU's entry, in the part of the cache of the slot the walk owns.
    unsafe {
        if epoch != u64::MAX && (*entry).sfi == sfi && (*entry).epoch == epoch {
            return Some(((*entry).script_id, (*entry).literal, (*entry).function_data));
        }
    }
    // SAFETY: a checked read of the target's memory into the slot's buffer.
    let ok = unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_user(words.cast(), V8_SFI_WINDOW as u32, sfi as *const core::ffi::c_void) == 0
    };
    if !ok {
        return None;
    }
    // SAFETY: the buffer just read, SFI_WORDS long; indices checked.
    let word = |i: u32| (i < SFI_WORDS as u32).then(|| unsafe { *words.add(i as usize) });
    let script = word(c.sfi_script_word)?;
    let literal = word(c.sfi_literal_id_word)? >> 32;
    let function_data = word(c.sfi_function_data_word)?;
    if !is_object(script) {
        return None;
    }
    // SAFETY: as above.
    let id = unsafe { bpf_probe_read_user((script - HEAP_OBJECT + c.script_id) as *const u64) }.ok()?;
    if id & 0xffff_ffff != 0 {
        // Not a Smi: the Script slot held something else (undefined for a builtin).
        return None;
    }
    let script_id = id >> 32;
    if epoch != u64::MAX {
        // SAFETY: as above.
        unsafe { *entry = V8CacheEntry { sfi, epoch, script_id, literal, function_data } };
    }
    Some((script_id, literal, function_data))
}

/// The saved rbp and return address at `fp` when `capture` read them with the frame (one read
/// for both), for the walk's step to its caller; None otherwise. Taken once.
#[inline(always)]
pub fn take_pair(slot: u32, fp: u64) -> Option<[u64; 2]> {
    let reads = V8_READS.get_ptr_mut(slot)?;
    // SAFETY: this CPU's buffers of the slot the walk owns.
    unsafe {
        if (*reads).fp != fp || fp == 0 {
            return None;
        }
        (*reads).fp = 0;
        Some([(*reads).frame[FRAME_WORDS], (*reads).frame[FRAME_WORDS + 1]])
    }
}

/// Forgets a pair read by an earlier walk on this slot.
#[inline(always)]
pub fn forget(slot: u32) {
    if let Some(reads) = V8_READS.get_ptr_mut(slot) {
        // SAFETY: as above.
        unsafe { (*reads).fp = 0 };
    }
}

/// Tells user space about stack `key`, new and holding V8 frames.
#[inline(always)]
pub fn announce(key: u64) {
    if NEW_JS_STACKS.output::<u64>(&key, 0).is_err() {
        count(counter::JS_NOTICE_LOST);
    }
}
