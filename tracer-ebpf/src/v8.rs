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
use aya_ebpf::{
    helpers::bpf_probe_read_user,
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
};
use tracer_common::{V8_FRAME_WINDOW, V8_SFI_WINDOW, V8Config, counter, js_frame};

use crate::maps::{SCRATCH_SLOTS, count};

#[map]
static V8_CONFIG: Array<V8Config> = Array::with_max_entries(1, 0);

/// Keys of new stacks that hold captured V8 frames.
#[map]
static NEW_JS_STACKS: RingBuf = RingBuf::with_byte_size(256 << 10, 0);

/// What `capture` reads of the target, per scratch slot (the walker's stack has no room).
#[repr(C)]
pub struct Reads {
    frame: [u64; FRAME_WORDS],
    sfi: [u64; SFI_WORDS],
}

#[map]
static V8_READS: PerCpuArray<Reads> = PerCpuArray::with_max_entries(SCRATCH_SLOTS, 0);

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
    if !read(slots.as_mut_ptr(), V8_FRAME_WINDOW, fp.wrapping_sub(V8_FRAME_WINDOW as u64)) {
        return None;
    }
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
    if !read(words.as_mut_ptr(), V8_SFI_WINDOW, sfi) {
        return None;
    }
    let script = *words.get(c.sfi_script_word as usize)?;
    let literal = *words.get(c.sfi_literal_id_word as usize)? >> 32;
    if !is_object(script) {
        return None;
    }
    // SAFETY: as above.
    let script_id = unsafe { bpf_probe_read_user((script - HEAP_OBJECT + c.script_id) as *const u64) }.ok()?;
    if script_id & 0xffff_ffff != 0 {
        // Not a Smi: the Script slot held something else (undefined for a builtin).
        return None;
    }
    let mut offset_plus_one = 0;
    if code == BUILTIN {
        // The offset is into the function's own bytecode only when the frame's BytecodeArray
        // slot holds the array the SharedFunctionInfo has (else: a frame of another kind).
        let function_data = *words.get(c.sfi_function_data_word as usize)?;
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
        js_frame::id(code == JIT, script_id >> 32, literal & 0xffff_ffff, offset_plus_one),
        js_frame::addr(sfi),
    ))
}

/// Tells user space about stack `key`, new and holding V8 frames.
#[inline(always)]
pub fn announce(key: u64) {
    if NEW_JS_STACKS.output::<u64>(&key, 0).is_err() {
        count(counter::JS_NOTICE_LOST);
    }
}
