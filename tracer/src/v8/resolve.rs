//! From a SharedFunctionInfo to what a person reads: function name, script, and the line and
//! column where the function starts, computed the way V8's own perf map computes them.

use super::V8Error;
use super::frame::JsFrame;
use super::heap::{Heap, MAX_NAME_UNITS, MAX_SOURCE_UNITS};
use super::layout::{ScopeInfoLayout, V8Layout};
use super::memory::Memory;

/// Line ends binary-searched in a Script's cached table, at most this many entries.
const MAX_LINE_ENDS: i64 = 1 << 24;
/// Longest source position table read.
const MAX_POSITION_TABLE: i64 = 1 << 20;
/// Context locals a ScopeInfo may declare before it is taken as garbage.
const MAX_CONTEXT_LOCALS: i64 = 1 << 16;

/// One JavaScript function, named. `line`/`column` are 1-based and count UTF-16 units, as in
/// node's perf map (`JS:~name script:line:column`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JsFunction {
    /// V8's debug name: the function's own name, else the name V8 inferred for it (`obj.f`
    /// for `obj.f = function () {}`), else empty (anonymous).
    pub name: String,
    /// The Script's name: the file's path for node's CommonJS and ES modules.
    pub script: String,
    /// Offset of the function's start (its parameter list) in the script's source, in UTF-16 units.
    pub start_position: u32,
    pub line: u32,
    pub column: u32,
}

/// What stays the same for a function across GCs, tiers and address reuse.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JsIdentity {
    pub script: String,
    pub start_position: u32,
}

impl JsFunction {
    pub fn identity(&self) -> JsIdentity {
        JsIdentity {
            script: self.script.clone(),
            start_position: self.start_position,
        }
    }
}

/// Names the function of a frame captured earlier, after checking that the JSFunction it
/// recorded still points at the same SharedFunctionInfo: after a compacting GC both addresses
/// may hold other objects, and a lone SharedFunctionInfo address could name another function.
pub fn resolve_frame<M: Memory + ?Sized>(
    mem: &M,
    l: &V8Layout,
    frame: &JsFrame,
) -> Result<JsFunction, V8Error> {
    let h = Heap::new(mem, l);
    let (function, ty) = h.object("captured JSFunction", frame.function + l.heap_object_tag)?;
    if !l.js_function_types.contains(&ty) {
        return Err(V8Error::WrongType {
            what: "captured JSFunction",
            addr: function,
            found: ty,
            expected: "a JSFunction type",
        });
    }
    let shared = h.field(function, l.js_function_shared)?;
    if shared != frame.shared + l.heap_object_tag {
        return Err(V8Error::Invalid {
            what: "captured JSFunction",
            detail: format!(
                "now points at {shared:#x}, not the captured SharedFunctionInfo {:#x} (moved or reused)",
                frame.shared
            ),
        });
    }
    resolve_function(mem, l, frame.shared)
}

/// The line and column (1-based) being executed in an interpreted frame, from its bytecode
/// offset and the BytecodeArray's source position table, as V8's `AbstractCode::SourcePosition`
/// finds it: the position of the last JavaScript entry at or before the offset. `Ok(None)`
/// when the frame has no bytecode offset (optimized and baseline frames) or V8 has not
/// collected the table. The position must fall inside the function's own source range, or
/// the table is not this function's and the answer is an error.
pub fn current_position<M: Memory + ?Sized>(
    mem: &M,
    l: &V8Layout,
    frame: &JsFrame,
) -> Result<Option<(u32, u32)>, V8Error> {
    let (Some(array), Some(offset)) = (frame.bytecode_array, frame.bytecode_offset) else {
        return Ok(None);
    };
    let h = Heap::new(mem, l);
    let sp = l.source_positions;
    let array = h.typed(
        "BytecodeArray",
        array + l.heap_object_tag,
        l.type_bytecode_array,
        "BYTECODE_ARRAY_TYPE",
    )?;
    let table_word = h.field(array, sp.bytecode_table)?;
    let Ok(table) = h.typed(
        "source position table",
        table_word,
        l.type_byte_array,
        "BYTE_ARRAY_TYPE",
    ) else {
        // Not collected yet (undefined, or V8's marker for a pending collection).
        return Ok(None);
    };
    let len = h.smi(
        "source position table length",
        h.field(table, l.fixed_array_length)?,
    )?;
    if !(0..=MAX_POSITION_TABLE).contains(&len) {
        return Err(V8Error::Invalid {
            what: "source position table",
            detail: format!("{len} bytes"),
        });
    }
    let mut bytes = vec![0u8; len as usize];
    mem.read(table + l.fixed_array_data, &mut bytes)?;
    let raw = position_at(&bytes, i64::from(offset)).ok_or_else(|| V8Error::Invalid {
        what: "source position table",
        detail: "truncated entry".to_string(),
    })?;
    let script_offset = ((raw >> sp.script_offset_shift) as u64 & sp.script_offset_mask) as i64 - 1;

    // The function's own range and script, checked as resolve_function checks them.
    let sfi = h.typed(
        "SharedFunctionInfo",
        frame.shared + l.heap_object_tag,
        l.type_shared_function_info,
        "SHARED_FUNCTION_INFO_TYPE",
    )?;
    let si = scope_info(&h, h.field(sfi, l.sfi_name_or_scope_info)?)?.ok_or_else(|| {
        V8Error::Invalid {
            what: "SharedFunctionInfo",
            detail: "no ScopeInfo".to_string(),
        }
    })?;
    let (start, end) = si.start_position(&h, &l.scope_info)?;
    if script_offset < i64::from(start) || script_offset > i64::from(end) {
        return Err(V8Error::Invalid {
            what: "current source position",
            detail: format!("{script_offset} outside the function's {start}..{end}"),
        });
    }
    let script = h.typed(
        "SharedFunctionInfo's script",
        h.field(sfi, l.sfi_script_or_debug_info)?,
        l.type_script,
        "SCRIPT_TYPE",
    )?;
    Ok(Some(line_and_column(&h, script, script_offset as u32)?))
}

/// The raw position word of the last JavaScript entry whose bytecode offset is at or before
/// `offset` (0 if none), or `None` for a table that ends inside an entry. Entries are two
/// zigzag varints: the bytecode offset delta (negative, as `-delta - 1`, for expression
/// positions) and the position delta; bit 0 of a position marks it external (not JS).
pub(crate) fn position_at(table: &[u8], offset: i64) -> Option<i64> {
    fn varint(table: &[u8], at: &mut usize) -> Option<i64> {
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = *table.get(*at)?;
            *at += 1;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(((value >> 1) as i64) ^ -((value & 1) as i64));
            }
        }
        None
    }
    // Offsets count from -1, V8's offset for the function's entry (its iterator starts there).
    let (mut at, mut code_offset, mut position, mut found) = (0usize, -1i64, 0i64, 0i64);
    while at < table.len() {
        let delta = varint(table, &mut at)?;
        let delta = if delta < 0 { -delta - 1 } else { delta };
        code_offset += delta;
        position += varint(table, &mut at)?;
        if code_offset > offset {
            break;
        }
        if position & 1 == 0 {
            found = position;
        }
    }
    Some(found)
}

/// Names the function whose SharedFunctionInfo is at `shared` (an untagged address, as
/// [`JsFrame::shared`](super::JsFrame::shared) gives it).
pub fn resolve_function<M: Memory + ?Sized>(
    mem: &M,
    l: &V8Layout,
    shared: u64,
) -> Result<JsFunction, V8Error> {
    let h = Heap::new(mem, l);
    let sfi = h.typed(
        "SharedFunctionInfo",
        shared + l.heap_object_tag,
        l.type_shared_function_info,
        "SHARED_FUNCTION_INFO_TYPE",
    )?;

    let name_word = h.field(sfi, l.sfi_name_or_scope_info)?;
    let scope_info = scope_info(&h, name_word)?;
    let name = match &scope_info {
        Some(si) => si.debug_name(&h)?,
        None if h.is_smi(name_word) => {
            // The no-name sentinel is Smi zero; any other Smi is not a name.
            if h.smi("SharedFunctionInfo name", name_word)? != 0 {
                return Err(V8Error::Invalid {
                    what: "SharedFunctionInfo name",
                    detail: format!("Smi {name_word:#x}"),
                });
            }
            String::new()
        }
        None => h.string("SharedFunctionInfo name", name_word, MAX_NAME_UNITS)?,
    };

    let script_word = h.field(sfi, l.sfi_script_or_debug_info)?;
    let script = h.typed(
        "SharedFunctionInfo's script",
        script_word,
        l.type_script,
        "SCRIPT_TYPE",
    )?;
    let script_name = script_name(&h, script)?;

    // A compiled function always has a ScopeInfo; one without is not running JS code.
    let si = scope_info.ok_or_else(|| V8Error::Invalid {
        what: "SharedFunctionInfo",
        detail: "no ScopeInfo, so no start position".to_string(),
    })?;
    let (start_position, _) = si.start_position(&h, &l.scope_info)?;
    let (line, column) = line_and_column(&h, script, start_position)?;
    Ok(JsFunction {
        name,
        script: script_name,
        start_position,
        line,
        column,
    })
}

fn script_name<M: Memory + ?Sized>(h: &Heap<'_, M>, script: u64) -> Result<String, V8Error> {
    let word = h.field(script, h.l.script_name)?;
    let (_, ty) = h.object("Script name", word)?;
    if ty == h.l.type_oddball {
        // undefined: code from eval or `new Function` has no script name.
        return Ok(String::new());
    }
    h.string("Script name", word, MAX_NAME_UNITS)
}

/// A checked ScopeInfo: its address and the words of its fixed part.
struct ScopeInfo {
    addr: u64,
    flags: u64,
    context_locals: u64,
}

fn scope_info<M: Memory + ?Sized>(
    h: &Heap<'_, M>,
    word: u64,
) -> Result<Option<ScopeInfo>, V8Error> {
    if !h.is_heap_object(word) {
        return Ok(None);
    }
    let (addr, ty) = h.object("SharedFunctionInfo name_or_scope_info", word)?;
    if ty != h.l.type_scope_info {
        return Ok(None);
    }
    let mut si = ScopeInfo {
        addr,
        flags: 0,
        context_locals: 0,
    };
    let flags = h.smi("ScopeInfo flags", si.slot_word(h, 0)?)?;
    let locals = h.smi(
        "ScopeInfo context local count",
        si.slot_word(h, h.l.scope_info_context_local_count)?,
    )?;
    if !(0..=MAX_CONTEXT_LOCALS).contains(&locals) || flags < 0 {
        return Err(V8Error::Invalid {
            what: "ScopeInfo",
            detail: format!("flags {flags:#x}, {locals} context locals"),
        });
    }
    si.flags = flags as u64;
    si.context_locals = locals as u64;
    Ok(Some(si))
}

impl ScopeInfo {
    /// ScopeInfo is a HeapObject whose tagged slots follow its map word; the metadata's
    /// `scopeinfo_idx_*` count in those slots.
    fn slot_word<M: Memory + ?Sized>(&self, h: &Heap<'_, M>, index: u64) -> Result<u64, V8Error> {
        h.field(self.addr, h.l.heap_object_map + 8 + 8 * index)
    }

    fn bit(&self, bit: u32) -> bool {
        self.flags >> bit & 1 == 1
    }

    /// Index of the first slot after the context locals' names and infos and the saved class
    /// variable: where the function variable (name, slot) entry would be.
    fn function_variable_index(
        &self,
        h: &Heap<'_, impl Memory + ?Sized>,
        s: &ScopeInfoLayout,
    ) -> u64 {
        let n = self.context_locals;
        let names = if n < s.max_inlined_local_names { n } else { 1 };
        h.l.scope_info_first_vars + names + n + u64::from(self.bit(s.has_saved_class_variable_bit))
    }

    fn has_function_variable(&self, s: &ScopeInfoLayout) -> bool {
        self.flags >> s.function_variable_shift & 3 != 0
    }

    fn inferred_name_index(&self, h: &Heap<'_, impl Memory + ?Sized>, s: &ScopeInfoLayout) -> u64 {
        self.function_variable_index(h, s) + if self.has_function_variable(s) { 2 } else { 0 }
    }

    /// V8's SharedFunctionInfo::DebugName for a compiled function: the name in the function
    /// variable entry, else the inferred name, else empty.
    fn debug_name<M: Memory + ?Sized>(&self, h: &Heap<'_, M>) -> Result<String, V8Error> {
        let s = h.l.scope_info;
        if self.has_function_variable(&s) {
            let word = self.slot_word(h, self.function_variable_index(h, &s))?;
            if !(h.is_smi(word) && h.smi("function name", word)? == 0) {
                let name = h.string("function name", word, MAX_NAME_UNITS)?;
                if !name.is_empty() {
                    return Ok(name);
                }
            }
        }
        if self.bit(s.has_inferred_name_bit) {
            let word = self.slot_word(h, self.inferred_name_index(h, &s))?;
            let (_, ty) = h.object("inferred name", word)?;
            if ty != h.l.type_oddball {
                return h.string("inferred name", word, MAX_NAME_UNITS);
            }
        }
        Ok(String::new())
    }

    fn start_position<M: Memory + ?Sized>(
        &self,
        h: &Heap<'_, M>,
        s: &ScopeInfoLayout,
    ) -> Result<(u32, u32), V8Error> {
        let scope_type = self.flags & s.scope_type_mask;
        if self.bit(s.is_empty_bit) || scope_type > s.last_positioned_scope_type {
            return Err(V8Error::Invalid {
                what: "ScopeInfo",
                detail: format!("scope type {scope_type} carries no source position"),
            });
        }
        let index = self.inferred_name_index(h, s) + u64::from(self.bit(s.has_inferred_name_bit));
        let start = h.smi("ScopeInfo start position", self.slot_word(h, index)?)?;
        let end = h.smi("ScopeInfo end position", self.slot_word(h, index + 1)?)?;
        if start < 0 || end < start || end > i64::from(i32::MAX) {
            return Err(V8Error::Invalid {
                what: "ScopeInfo positions",
                detail: format!("start {start}, end {end}"),
            });
        }
        Ok((start as u32, end as u32))
    }
}

/// 1-based line and column of `position` in the script, as V8's Script::GetLineNumber and
/// GetColumnNumber count them (line terminators: LF, CR not before LF, U+2028, U+2029). Uses
/// the Script's cached line ends when V8 has computed them, else scans the source.
fn line_and_column<M: Memory + ?Sized>(
    h: &Heap<'_, M>,
    script: u64,
    position: u32,
) -> Result<(u32, u32), V8Error> {
    let l = h.l;
    let source = h.field(script, l.script_source)?;
    let source_len = h.length_of("Script source", source)?;
    if position as usize > source_len {
        return Err(V8Error::Invalid {
            what: "function start position",
            detail: format!("{position} beyond a source of {source_len} units"),
        });
    }
    let ends_word = h.field(script, l.script_line_ends)?;
    if let Ok(ends) = h.typed(
        "Script line ends",
        ends_word,
        l.type_fixed_array,
        "FIXED_ARRAY_TYPE",
    ) {
        return line_from_ends(h, ends, position);
    }
    if position as usize > MAX_SOURCE_UNITS {
        return Err(V8Error::Invalid {
            what: "function start position",
            detail: format!("{position} is past the {MAX_SOURCE_UNITS} source units scanned"),
        });
    }
    let position = position as usize;
    let mut units = h.prefix_units("Script source", source, position)?;
    // Only a CR just before the position needs the unit at the position (CR LF pairs).
    if units.last() == Some(&0x0d) && position < source_len {
        units = h.prefix_units("Script source", source, position + 1)?;
    }
    Ok(line_in_units(&units, position))
}

/// Line and column of `position` given the source's first units (at least `position` of them,
/// and the one at `position` when there is one: a CR there may pair with an LF after it).
pub(crate) fn line_in_units(units: &[u16], position: usize) -> (u32, u32) {
    let mut line = 0u32;
    let mut line_start = 0usize;
    for (i, &c) in units.iter().enumerate().take(position) {
        let ends_line = match c {
            0x0a | 0x2028 | 0x2029 => true,
            // CR LF is one line end, counted at the LF.
            0x0d => units.get(i + 1) != Some(&0x0a),
            _ => false,
        };
        if ends_line {
            line += 1;
            line_start = i + 1;
        }
    }
    (line + 1, (position - line_start) as u32 + 1)
}

fn line_from_ends<M: Memory + ?Sized>(
    h: &Heap<'_, M>,
    ends: u64,
    position: u32,
) -> Result<(u32, u32), V8Error> {
    let l = h.l;
    let count = h.smi("line ends length", h.field(ends, l.fixed_array_length)?)?;
    if !(1..=MAX_LINE_ENDS).contains(&count) {
        return Err(V8Error::Invalid {
            what: "Script line ends",
            detail: format!("{count} entries"),
        });
    }
    let end_at = |i: i64| -> Result<i64, V8Error> {
        h.smi(
            "line end",
            h.field(ends, l.fixed_array_data + 8 * i as u64)?,
        )
    };
    // First line whose end is at or after the position.
    let (mut lo, mut hi) = (0i64, count);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if end_at(mid)? < i64::from(position) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    if lo == count {
        return Err(V8Error::Invalid {
            what: "Script line ends",
            detail: format!("position {position} after the last line end"),
        });
    }
    let line_start = if lo == 0 {
        0
    } else {
        let prev = end_at(lo - 1)?;
        if prev >= end_at(lo)? || prev < 0 {
            return Err(V8Error::Invalid {
                what: "Script line ends",
                detail: "not increasing".to_string(),
            });
        }
        prev + 1
    };
    Ok((lo as u32 + 1, (i64::from(position) - line_start) as u32 + 1))
}
