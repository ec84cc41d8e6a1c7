//! The words of one V8 frame that say which JavaScript function runs in it.
//!
//! V8's standard frame, below the frame pointer (offsets from `v8dbg_off_fp_*`, 8 bytes each
//! on x86-64 node 20):
//!
//! ```text
//!   fp + 8    return address            fp - 16  JSFunction        (off_fp_function)
//!   fp + 0    caller's fp               fp - 32  BytecodeArray     (off_fp_bytecode_array)
//!   fp - 8    context, or a Smi marker  fp - 40  bytecode offset   (off_fp_bytecode_offset)
//!             in typed (stub, exit,                (interpreted frames only; baseline
//!             internal) frames                      frames keep other data there)
//! ```
//!
//! A capture at allocation time needs only these slots and the JSFunction's `shared` field:
//! [`JsFrame`] is that record, a few u64s. A capture in the kernel can afford the same checks
//! as [`read_frame`]: context slot not Smi-tagged, function slot tagged with its map's
//! instance type in the JSFunction range, `shared` tagged with the SharedFunctionInfo type
//! (two map reads each), and leave the rest to user space.
//!
//! Optimized code entered by on-stack replacement runs in the interpreted frame it replaced:
//! its bytecode slots still hold the BytecodeArray and the loop's offset, so
//! [`JsFrame::bytecode_offset`] is the current position only when the pc is in the
//! interpreter (its trampoline or bytecode handlers).

use super::V8Error;
use super::heap::Heap;
use super::layout::V8Layout;
use super::memory::Memory;

/// What identifies the JavaScript function running in one frame, valid only while the objects
/// stay put (resolve it soon: a compacting GC moves them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct JsFrame {
    /// The JSFunction object's address (untagged), from `fp + off_fp_function`.
    pub function: u64,
    /// Its SharedFunctionInfo's address (untagged), from `function + JSFunction::shared`.
    pub shared: u64,
    /// Offset into the bytecode being run, for interpreted frames: `fp + off_fp_bytecode_offset`
    /// when `fp + off_fp_bytecode_array` holds a BytecodeArray and the offset lies inside it.
    pub bytecode_offset: Option<u32>,
    /// The BytecodeArray (untagged) that offset is into, from `fp + off_fp_bytecode_array`.
    pub bytecode_array: Option<u64>,
}

fn slot(fp: u64, offset: i64) -> u64 {
    fp.wrapping_add_signed(offset)
}

/// Reads the frame whose frame pointer is `fp`, a frame whose pc lies in V8 code (JIT code or
/// an interpreter/baseline builtin). Every pointer's type word is checked: a typed frame, or a
/// slot holding anything but a JSFunction whose `shared` is a SharedFunctionInfo, is an error.
pub fn read_frame<M: Memory + ?Sized>(mem: &M, l: &V8Layout, fp: u64) -> Result<JsFrame, V8Error> {
    let h = Heap::new(mem, l);
    // Typed frames (stubs, exits, internal frames) put a Smi-tagged marker where JS frames keep
    // their context; their function slot holds something else.
    let context = mem.read_u64(slot(fp, l.off_fp_context))?;
    if h.is_smi(context) {
        return Err(V8Error::TypedFrame(context));
    }
    let function_word = mem.read_u64(slot(fp, l.off_fp_function))?;
    let (function, ty) = h.object("frame's function slot", function_word)?;
    if !l.js_function_types.contains(&ty) {
        return Err(V8Error::WrongType {
            what: "frame's function slot",
            addr: function,
            found: ty,
            expected: "a JSFunction type",
        });
    }
    let shared_word = h.field(function, l.js_function_shared)?;
    let shared = h.typed(
        "JSFunction's shared",
        shared_word,
        l.type_shared_function_info,
        "SHARED_FUNCTION_INFO_TYPE",
    )?;
    let bytecode = bytecode_offset(&h, fp).ok().flatten();
    Ok(JsFrame {
        function,
        shared,
        bytecode_offset: bytecode.map(|(_, offset)| offset),
        bytecode_array: bytecode.map(|(array, _)| array),
    })
}

/// The interpreted frame's offset into its bytecode, or `None` when the slots do not hold a
/// BytecodeArray and an in-range Smi (baseline and optimized frames).
fn bytecode_offset<M: Memory + ?Sized>(
    h: &Heap<'_, M>,
    fp: u64,
) -> Result<Option<(u64, u32)>, V8Error> {
    let l = h.l;
    let array_word = h.mem.read_u64(slot(fp, l.off_fp_bytecode_array))?;
    let offset_word = h.mem.read_u64(slot(fp, l.off_fp_bytecode_offset))?;
    let Ok(array) = h.typed(
        "bytecode array slot",
        array_word,
        l.type_bytecode_array,
        "BYTECODE_ARRAY_TYPE",
    ) else {
        return Ok(None);
    };
    let Ok(raw) = h.smi("bytecode offset slot", offset_word) else {
        return Ok(None);
    };
    let length = h.smi("bytecode length", h.field(array, l.fixed_array_length)?)?;
    // The slot counts from the tagged object pointer, not from the first bytecode.
    let first = (l.bytecode_array_data - l.heap_object_tag) as i64;
    let offset = raw - first;
    Ok((0..length)
        .contains(&offset)
        .then_some((array, offset as u32)))
}
