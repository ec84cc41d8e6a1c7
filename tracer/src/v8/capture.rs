//! What the BPF stack walker records of V8 frames, and what it needs to know to do so.
//!
//! A captured stack is a list of words: pcs, each one of a V8 frame the walker identified
//! followed by two words (`tracer_common::js_frame`): the SharedFunctionInfo's address and a
//! detail word with a fingerprint of it and the bytecode offset of an interpreted frame.
//! [`split`] takes them apart; [`walker_config`] gives the walker the layout it reads with.

use tracer_common::{V8_FRAME_WINDOW, V8_SFI_WINDOW, V8Config, js_frame};

use super::layout::V8Layout;

/// One V8 frame as the walker saw it at allocation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Captured {
    /// The SharedFunctionInfo's address (untagged) at that time.
    pub sfi: u64,
    /// [`js_frame::fingerprint`] of it at that time.
    pub fingerprint: u32,
    /// Offset into its bytecode, for an interpreted frame.
    pub bytecode_offset: Option<u32>,
}

/// A captured stack's pcs, leaf first, each with what the walker captured of its V8 frame.
/// Words that do not fit the format (a tag without its detail word) are dropped.
pub fn split(words: &[u64]) -> Vec<(u64, Option<Captured>)> {
    let mut out: Vec<(u64, Option<Captured>)> = Vec::with_capacity(words.len());
    let mut i = 0;
    while i < words.len() {
        let w = words[i];
        if js_frame::is_tagged(w) {
            if let (Some(&detail), Some(last)) = (words.get(i + 1), out.last_mut())
                && detail & js_frame::DETAIL != 0
                && last.1.is_none()
            {
                let offset_plus_one = detail as u32;
                last.1 = Some(Captured {
                    sfi: w & !js_frame::TAG,
                    fingerprint: ((detail >> 32) as u32) & ((1 << js_frame::FINGERPRINT_BITS) - 1),
                    bytecode_offset: offset_plus_one.checked_sub(1),
                });
            }
            i += 2;
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

/// Word index of a frame slot at `offset` from the frame pointer in the walker's window
/// (`V8_FRAME_WINDOW` bytes below it), or why it is not there.
fn frame_slot(name: &str, offset: i64) -> Result<u32, String> {
    let window = V8_FRAME_WINDOW as i64;
    if offset % 8 != 0 || !(-window..0).contains(&offset) {
        return Err(format!("V8 frame slot {name} at fp{offset:+} lies outside the {window} bytes the stack walker reads"));
    }
    Ok(((offset + window) / 8) as u32)
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
    let sfi_word = |name: &str, offset: u64, words: u64| {
        if offset % 8 != 0 || offset + 8 * words > V8_SFI_WINDOW as u64 {
            return Err(format!(
                "SharedFunctionInfo field {name} at +{offset} lies outside the {V8_SFI_WINDOW} bytes the stack walker reads"
            ));
        }
        Ok((offset / 8) as u32)
    };
    if l.sfi_flags != l.sfi_length + 8 {
        return Err(format!(
            "SharedFunctionInfo's flags at +{} do not follow its length at +{}: its fingerprint words are not known here",
            l.sfi_flags, l.sfi_length
        ));
    }
    Ok(V8Config {
        enabled: 1,
        blob_start,
        blob_end,
        js_function_shared: l.js_function_shared,
        bytecode_start: l.bytecode_array_data - l.heap_object_tag,
        context_slot: frame_slot("context", l.off_fp_context)?,
        function_slot: frame_slot("function", l.off_fp_function)?,
        bytecode_array_slot: frame_slot("bytecode array", l.off_fp_bytecode_array)?,
        bytecode_offset_slot: frame_slot("bytecode offset", l.off_fp_bytecode_offset)?,
        sfi_function_data_word: sfi_word("function_data", l.sfi_function_data, 1)?,
        sfi_fingerprint_word: sfi_word("length", l.sfi_length, 2)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_attaches_v8_words_to_the_pc_before_them() {
        let detail = js_frame::detail(0x1234, 7);
        let words = [0x10, 0x20, js_frame::word(0x7f00_0000_1000), detail, 0x30];
        let got = split(&words);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], (0x10, None));
        assert_eq!(
            got[1],
            (0x20, Some(Captured { sfi: 0x7f00_0000_1000, fingerprint: 0x1234, bytecode_offset: Some(6) }))
        );
        assert_eq!(got[2], (0x30, None));
        assert_eq!(pcs(&words), vec![0x10, 0x20, 0x30]);
    }

    #[test]
    fn a_frame_without_bytecode_offset_has_none() {
        let words = [0x10, js_frame::word(0x1000), js_frame::detail(5, 0)];
        assert_eq!(split(&words)[0].1.unwrap().bytecode_offset, None);
    }

    #[test]
    fn a_tag_without_its_detail_word_is_dropped() {
        assert_eq!(split(&[0x10, js_frame::word(0x1000)]), vec![(0x10, None)]);
        // A tag with nothing before it names no frame.
        assert_eq!(split(&[js_frame::word(0x1000), js_frame::detail(1, 0), 0x10]), vec![(0x10, None)]);
    }

    #[test]
    fn fingerprint_ignores_the_fields_that_change_and_keeps_the_literal_id() {
        let a = 0x0000_0000_0003_0002u64; // length 2, 3 parameters
        let b = 0x0000_0009_0000_0000u64; // literal id 9
        let f = js_frame::fingerprint(a, b);
        // expected_nof_properties and flags2 (top 16 bits of a), flags (low half of b) change.
        assert_eq!(js_frame::fingerprint(a | 0xffff_0000_0000_0000, b | 0xffff_ffff), f);
        assert_ne!(js_frame::fingerprint(a, 0x0000_000a_0000_0000), f);
        assert_ne!(js_frame::fingerprint(a + 1, b), f);
        assert!(f < 1 << js_frame::FINGERPRINT_BITS);
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
    }
}
