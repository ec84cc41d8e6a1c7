//! What the BPF stack walker records of V8 frames, and what it needs to know to do so.
//!
//! A captured stack is a list of words: pcs, each one of a V8 frame the walker identified
//! followed by two words (`tracer_common::js_frame`): the function's lasting identity (its
//! Script's id and its literal id in that script, with the bytecode offset of an interpreted
//! frame) and the SharedFunctionInfo's address when captured; the pc of such a frame in JIT
//! code is marked as one the GC moves. [`split`] takes them apart;
//! [`walker_config`] gives the walker the layout it reads with.

use tracer_common::{V8_FRAME_WINDOW, V8_SFI_WINDOW, V8Config, js_frame};

use super::layout::V8Layout;

/// A function's identity for the life of the process: its Script's id and its function
/// literal id in that script, as wide as the walker keeps them
/// (`js_frame::SCRIPT_BITS`, `js_frame::LITERAL_BITS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub script: u32,
    pub literal: u32,
}

/// One V8 frame as the walker saw it at allocation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Captured {
    pub identity: Identity,
    /// Offset into its bytecode, for an interpreted frame.
    pub bytecode_offset: Option<u32>,
    /// The SharedFunctionInfo's address (untagged) when captured: where to read the names,
    /// if no GC has moved it since.
    pub sfi: u64,
}

/// A captured stack's pcs, leaf first, each with what the walker captured of its V8 frame.
/// Words that do not fit the format (an identity without its address) are dropped.
pub fn split(words: &[u64]) -> Vec<(u64, Option<Captured>)> {
    let mut out: Vec<(u64, Option<Captured>)> = Vec::with_capacity(words.len());
    let mut i = 0;
    while i < words.len() {
        let w = words[i];
        if js_frame::is_id(w) {
            if let (Some(&addr), Some(last)) = (words.get(i + 1), out.last_mut())
                && js_frame::is_addr(addr)
                && last.1.is_none()
            {
                let (script, literal, offset_plus_one) = js_frame::fields(w);
                last.1 = Some(Captured {
                    identity: Identity { script, literal },
                    bytecode_offset: offset_plus_one.checked_sub(1),
                    sfi: addr & !js_frame::ADDR_TAG,
                });
            }
            i += 2;
            continue;
        }
        if js_frame::is_addr(w) {
            // The pc of JIT code, kept out of the stack's key, when an identity follows.
            if words.get(i + 1).is_some_and(|&n| js_frame::is_id(n)) {
                out.push((w & !js_frame::ADDR_TAG, None));
            }
            i += 1;
            continue;
        }
        out.push((w, None));
        i += 1;
    }
    out
}

/// The pcs of a captured stack, without the V8 words.
pub fn pcs(words: &[u64]) -> Vec<u64> {
    split(words).into_iter().map(|(pc, _)| pc).collect()
}

/// V8's mark-compact collector, whose entry the walker's cache of SharedFunctionInfos is
/// dropped at (see `tracer_common::V8Config::cache`): the only collection that moves old-space
/// objects, where V8 allocates SharedFunctionInfos and Scripts.
pub const MARK_COMPACT: [&str; 2] = [
    "_ZN2v88internal4Heap11MarkCompactEv",
    "_ZN2v88internal20MarkCompactCollector14CollectGarbageEv",
];

/// Word index of a frame slot at `offset` from the frame pointer in the walker's window
/// (`V8_FRAME_WINDOW` bytes below it), or why it is not there.
fn frame_slot(name: &str, offset: i64) -> Result<u32, String> {
    let window = V8_FRAME_WINDOW as i64;
    if offset % 8 != 0 || !(-window..0).contains(&offset) {
        return Err(format!("V8 frame slot {name} at fp{offset:+} lies outside the {window} bytes the stack walker reads"));
    }
    Ok(((offset + window) / 8) as u32)
}

/// Word index of a SharedFunctionInfo field in the walker's window.
fn sfi_word(name: &str, offset: u64) -> Result<u32, String> {
    if offset % 8 != 0 || offset + 8 > V8_SFI_WINDOW as u64 {
        return Err(format!(
            "SharedFunctionInfo field {name} at +{offset} lies outside the {V8_SFI_WINDOW} bytes the stack walker reads"
        ));
    }
    Ok((offset / 8) as u32)
}

/// The walker's configuration for `l`'s binary, or one line saying why its V8 frames cannot
/// be read in the kernel (then they stay unnamed, as before).
pub fn walker_config(l: &V8Layout) -> Result<V8Config, String> {
    if l.heap_object_tag != 1 || l.smi_value_shift != 32 {
        return Err(format!(
            "V8 tags objects with {} and Smis by {} bits here; the stack walker reads the tag 1, 32-bit-shift layout only",
            l.heap_object_tag, l.smi_value_shift
        ));
    }
    let (blob_start, blob_end) = l
        .embedded_blob
        .ok_or("v8_Default_embedded_blob_code_ missing: V8's builtins cannot be told from other code")?;
    let script_id = l.script_id.ok_or(
        "Script's id cannot be placed (v8dbg_class_Script__line_ends__Object and \
         __eval_from_shared_or_wrapped_arguments__Object are not one field apart)",
    )?;
    Ok(V8Config {
        enabled: 1,
        blob_start,
        blob_end,
        js_function_shared: l.js_function_shared,
        script_id,
        bytecode_start: l.bytecode_array_data - l.heap_object_tag,
        context_slot: frame_slot("context", l.off_fp_context)?,
        function_slot: frame_slot("function", l.off_fp_function)?,
        bytecode_array_slot: frame_slot("bytecode array", l.off_fp_bytecode_array)?,
        bytecode_offset_slot: frame_slot("bytecode offset", l.off_fp_bytecode_offset)?,
        sfi_function_data_word: sfi_word("function_data", l.sfi_function_data)?,
        sfi_script_word: sfi_word("script_or_debug_info", l.sfi_script_or_debug_info)?,
        // The literal id is the high half of the flags word.
        sfi_literal_id_word: sfi_word("flags", l.sfi_flags)?,
        cache: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_attaches_v8_words_to_the_pc_before_them() {
        let words = [0x10, 0x20, js_frame::id(true, 7, 42, 7), js_frame::addr(0x7f00_0000_1000), 0x30];
        let got = split(&words);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], (0x10, None));
        assert_eq!(
            got[1],
            (
                0x20,
                Some(Captured {
                    identity: Identity { script: 7, literal: 42 },
                    bytecode_offset: Some(6),
                    sfi: 0x7f00_0000_1000
                })
            )
        );
        assert_eq!(got[2], (0x30, None));
        assert_eq!(pcs(&words), vec![0x10, 0x20, 0x30]);
    }

    #[test]
    fn a_jit_pc_kept_out_of_the_key_is_a_pc_again() {
        let words = [0x10, js_frame::addr(0x7f00_0000_2000), js_frame::id(true, 1, 2, 0), js_frame::addr(0x1000)];
        let got = split(&words);
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].0, 0x7f00_0000_2000);
        assert_eq!(got[1].1.unwrap().sfi, 0x1000);
    }

    #[test]
    fn identity_words_keep_their_fields_apart() {
        let w = js_frame::id(false, (1 << 24) - 1, (1 << 20) - 1, 0);
        assert_eq!(js_frame::fields(w), ((1 << 24) - 1, (1 << 20) - 1, 0));
        assert!(js_frame::is_id(w) && !js_frame::is_addr(w) && w & js_frame::JIT == 0);
        // An offset too large for its bits is dropped rather than wrapped.
        assert_eq!(js_frame::fields(js_frame::id(true, 1, 2, 1 << 17)).2, 0);
        // An address word is neither an identity, a pc nor a deferred token.
        let a = js_frame::addr(0x7fff_ffff_f000);
        assert!(js_frame::is_addr(a) && !js_frame::is_id(a) && a & tracer_common::DEFERRED_TOKEN == 0);
    }

    #[test]
    fn an_identity_without_its_address_is_dropped() {
        assert_eq!(split(&[0x10, js_frame::id(false, 1, 1, 0)]), vec![(0x10, None)]);
        // Nothing before it: it names no frame.
        assert_eq!(split(&[js_frame::id(false, 1, 1, 0), js_frame::addr(0x1000), 0x10]), vec![(0x10, None)]);
    }

    #[test]
    fn node_binary_gives_a_walker_config() {
        let data = std::fs::read("/usr/bin/node").expect("node 20 at /usr/bin/node");
        let l = V8Layout::from_elf(&data).expect("node's v8dbg constants");
        let c = walker_config(&l).expect("a walker config for node 20");
        assert_eq!(c.enabled, 1);
        assert!(c.blob_start < c.blob_end);
        // Context at fp-8 and function at fp-16: the window's last two words.
        assert_eq!((c.context_slot, c.function_slot), (5, 4));
        // node 20: Script's id between line_ends (56) and eval_from_shared (72).
        assert_eq!(c.script_id, 64);
        assert_eq!(l.mark_compact.len(), 2);
    }
}
