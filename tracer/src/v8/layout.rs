//! The V8 object and frame layout of one node binary, read from its own post-mortem metadata
//! (the `v8dbg_*` data symbols), so nothing about a particular V8 version is compiled in.

use object::{Object, ObjectSection, ObjectSymbol};

/// A `v8dbg_` constant the binary does not carry (or carries with a value that makes no sense
/// here). Printed as one line; the caller leaves JS frames unnamed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MissingConstant {
    #[error("{0} missing: JS frames stay unnamed")]
    Missing(&'static str),
    #[error("{name} is {value}, which this reader does not handle: JS frames stay unnamed")]
    Unsupported { name: &'static str, value: i64 },
    #[error("the binary is not a readable ELF file ({0}): JS frames stay unnamed")]
    NotElf(String),
    /// The v8dbg symbols say nothing of ScopeInfo's flag bits, which locate a function's name
    /// and positions; they are known per V8 version ([`ScopeInfoLayout::for_version`]).
    #[error(
        "ScopeInfo layout unknown for V8 {major}.{minor} (no v8dbg_ constants describe it): JS frames stay unnamed"
    )]
    UnknownScopeInfo { major: u32, minor: u32 },
}

/// How a BytecodeArray maps bytecode offsets to source positions; no v8dbg constant covers
/// it. Known per V8 version, read off node 20.20.2's own `AbstractCode::SourcePosition` and
/// `SourcePositionTableIterator::Advance` code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourcePositionLayout {
    /// The BytecodeArray field holding the table (a ByteArray, or not yet collected).
    pub bytecode_table: u64,
    /// A position word: bit 0 marks an external (non-JS) position, bits 1-30 the script
    /// offset plus one.
    pub script_offset_shift: u32,
    pub script_offset_mask: u64,
    pub external_bit: u64,
}

impl SourcePositionLayout {
    pub fn for_version(major: u32, minor: u32) -> Option<SourcePositionLayout> {
        (major == 11 && minor == 3).then_some(SourcePositionLayout {
            bytecode_table: 32,
            script_offset_shift: 1,
            script_offset_mask: 0x3fff_ffff,
            external_bit: 1,
        })
    }
}

/// Where a ScopeInfo keeps a function's source positions. The v8dbg metadata does not describe
/// ScopeInfo's flag bits, so this part is known per V8 version (see [`ScopeInfoLayout::for_version`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScopeInfoLayout {
    /// Context-local counts from this one on keep their names in a hash table (one slot).
    pub max_inlined_local_names: u64,
    pub scope_type_mask: u64,
    /// Scope types up to this one (class, eval, function, module, script) carry positions.
    pub last_positioned_scope_type: u64,
    pub has_saved_class_variable_bit: u32,
    /// Two bits; non-zero means a two-slot function variable entry (name, slot index).
    pub function_variable_shift: u32,
    pub has_inferred_name_bit: u32,
    pub is_empty_bit: u32,
}

impl ScopeInfoLayout {
    /// V8 11.3 (node 20). Read from this binary's own code: `ScopeInfo::StartPosition()`,
    /// `HasPositionInfo()` and `SetInferredFunctionName()` of node 20.20.2 test exactly these
    /// bits and the 75-name limit. Other versions moved fields (V8 12 gives positions a fixed
    /// slot), so they get `None` rather than a guess.
    pub fn for_version(major: u32, minor: u32) -> Option<ScopeInfoLayout> {
        (major == 11 && minor == 3).then_some(ScopeInfoLayout {
            max_inlined_local_names: 75,
            scope_type_mask: 0xf,
            last_positioned_scope_type: 4,
            has_saved_class_variable_bit: 10,
            function_variable_shift: 12,
            has_inferred_name_bit: 14,
            is_empty_bit: 29,
        })
    }
}

/// Everything the frame reader and the resolver need: frame slot offsets, type tags and field
/// offsets, all in bytes and all from the binary.
///
/// Pointer compression: the build declares `v8dbg_TaggedSize` and `v8dbg_SystemPointerSize`.
/// Node's official builds do not compress pointers (both are 8 here), so a tagged field is a
/// full 64-bit word holding the object's address + 1, and a Smi keeps its 32-bit value in the
/// upper half. A build with 4-byte tagged fields would need the isolate's cage base to widen
/// every pointer; it is refused with a one-line error instead of being read wrongly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V8Layout {
    /// V8's (major, minor) version, from `v8::internal::Version::major_`/`minor_`.
    pub version: (u32, u32),
    pub heap_object_tag: u64,
    pub heap_object_tag_mask: u64,
    pub smi_tag: u64,
    pub smi_tag_mask: u64,
    /// Bits to shift a Smi word right to get its value (tag size + shift size).
    pub smi_value_shift: u32,

    pub off_fp_function: i64,
    pub off_fp_context: i64,
    pub off_fp_bytecode_array: i64,
    pub off_fp_bytecode_offset: i64,

    pub heap_object_map: u64,
    pub map_instance_type: u64,

    /// Instance types of JSFunction objects: `v8dbg_type_JSFunction__JS_FUNCTION_TYPE` is the
    /// first; class constructors and builtin constructors take the next ones. The metadata has
    /// no last type, so it is decoded from the binary's own `IsJSFunction_NonInline`; if that
    /// code has another shape, only the first type counts (class constructors stay unnamed).
    pub js_function_types: std::ops::RangeInclusive<u16>,
    pub type_shared_function_info: u16,
    pub type_scope_info: u16,
    pub type_script: u16,
    pub type_fixed_array: u16,
    pub type_bytecode_array: u16,
    pub type_map: u16,
    pub type_byte_array: u16,
    pub type_oddball: u16,

    pub js_function_shared: u64,
    pub sfi_function_data: u64,
    pub sfi_name_or_scope_info: u64,
    /// SharedFunctionInfo's `flags`: its function literal id is the next 4 bytes (no v8dbg
    /// constant names it; V8 has kept it there since 8.x).
    pub sfi_flags: u64,
    /// Script's `id`, a Smi: no v8dbg constant names it either; it is the one field between
    /// `line_ends` and `eval_from_shared_or_wrapped_arguments`, found only when those two
    /// lie exactly one word apart.
    pub script_id: Option<u64>,
    pub sfi_script_or_debug_info: u64,
    pub script_name: u64,
    pub script_source: u64,
    pub script_line_ends: u64,
    pub fixed_array_length: u64,
    pub fixed_array_data: u64,
    /// Where a BytecodeArray's bytecodes start; the frame's offset slot counts from the
    /// (tagged) object start, so this also converts it.
    pub bytecode_array_data: u64,

    pub first_nonstring_type: u16,
    pub string_encoding_mask: u16,
    pub string_representation_mask: u16,
    pub one_byte_string_tag: u16,
    pub two_byte_string_tag: u16,
    pub seq_string_tag: u16,
    pub cons_string_tag: u16,
    pub sliced_string_tag: u16,
    pub thin_string_tag: u16,
    pub external_string_tag: u16,
    pub string_length: u64,
    pub seq_one_byte_chars: u64,
    pub seq_two_byte_chars: u64,
    pub cons_first: u64,
    pub cons_second: u64,
    pub sliced_parent: u64,
    pub sliced_offset: u64,
    pub thin_actual: u64,
    /// Where an external string keeps its `v8::String::External*StringResource*`.
    pub external_resource: u64,

    pub scope_info_first_vars: u64,
    pub scope_info_context_local_count: u64,
    pub scope_info: ScopeInfoLayout,
    pub source_positions: SourcePositionLayout,
    /// ELF address range of the embedded builtins (`v8_Default_embedded_blob_code_` and its
    /// size), where the interpreter's and baseline code's builtins are; None when the binary
    /// does not say.
    pub embedded_blob: Option<(u64, u64)>,
    /// File offsets of V8's mark-compact entry points (`capture::MARK_COMPACT`), empty when
    /// the binary lacks one.
    pub mark_compact: Vec<u64>,
}

/// V8's out-of-line `IsJSFunction(HeapObject)`, whose code gives the JSFunction type range.
const IS_JS_FUNCTION: &str = "_ZN2v88internal22IsJSFunction_NonInlineENS0_10HeapObjectE";

/// The embedded builtins' code and its size (a 4-byte constant).
const BLOB_CODE: &str = "v8_Default_embedded_blob_code_";
const BLOB_CODE_SIZE: &str = "v8_Default_embedded_blob_code_size_";

/// Reads the `v8dbg_*` int constants (and V8's version numbers) from an ELF's symbol table.
struct Constants<'f, 'a> {
    file: &'f object::File<'a>,
    /// Symbol name -> (section, address).
    by_name: std::collections::HashMap<&'a str, (Option<object::SectionIndex>, u64)>,
}

impl<'f, 'a> Constants<'f, 'a> {
    fn int(&self, name: &'static str) -> Result<i64, MissingConstant> {
        let sym = self
            .by_name
            .get(name)
            .ok_or(MissingConstant::Missing(name))?;
        let value = self.read_i32(sym).ok_or(MissingConstant::Missing(name))?;
        Ok(value as i64)
    }

    /// The 4 bytes at the symbol's address, from the section that holds it (zero for .bss).
    fn read_i32(&self, sym: &(Option<object::SectionIndex>, u64)) -> Option<i32> {
        let section = self.file.section_by_index(sym.0?).ok()?;
        let bytes = section.data_range(sym.1, 4).ok()?;
        match bytes {
            Some(b) => Some(i32::from_le_bytes(b.try_into().ok()?)),
            // A .bss symbol (no file data) holds zero.
            None if section.kind() == object::SectionKind::UninitializedData => Some(0),
            None => None,
        }
    }

    /// The last JSFunction instance type, from V8's out-of-line type check, which compiles to
    /// `movzwl instance_type; sub $FIRST, %ax; cmp $(LAST - FIRST), %ax; setbe`. The `sub`
    /// must subtract the metadata's first type, or the code is not what this expects.
    fn last_js_function_type(&self, first: u16) -> Option<u16> {
        use iced_x86::{Decoder, DecoderOptions, Mnemonic};
        let &(index, address) = self.by_name.get(IS_JS_FUNCTION)?;
        let section = self.file.section_by_index(index?).ok()?;
        let code = section.data_range(address, 32).ok()??;
        let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
        let mut subtracted = false;
        for ins in decoder.iter().take(8) {
            match ins.mnemonic() {
                Mnemonic::Sub if ins.op_count() == 2 => {
                    subtracted = ins.immediate(1) == u64::from(first);
                    if !subtracted {
                        return None;
                    }
                }
                Mnemonic::Cmp if subtracted && ins.op_count() == 2 => {
                    let width = u16::try_from(ins.immediate(1)).ok()?;
                    return first.checked_add(width);
                }
                Mnemonic::Ret => return None,
                _ => {}
            }
        }
        None
    }

    fn offset(&self, name: &'static str) -> Result<u64, MissingConstant> {
        let v = self.int(name)?;
        u64::try_from(v).map_err(|_| MissingConstant::Unsupported { name, value: v })
    }

    fn type_tag(&self, name: &'static str) -> Result<u16, MissingConstant> {
        let v = self.int(name)?;
        u16::try_from(v).map_err(|_| MissingConstant::Unsupported { name, value: v })
    }
}

impl V8Layout {
    /// Reads the layout from a node (or other V8 embedder) binary's bytes.
    pub fn from_elf(data: &[u8]) -> Result<V8Layout, MissingConstant> {
        let file = object::File::parse(data).map_err(|e| MissingConstant::NotElf(e.to_string()))?;
        let mut by_name = std::collections::HashMap::new();
        for sym in file.symbols() {
            if let Ok(name) = sym.name()
                && (name.starts_with("v8dbg_")
                    || name.starts_with("_ZN2v88internal7Version")
                    || name == IS_JS_FUNCTION
                    || name == BLOB_CODE
                    || name == BLOB_CODE_SIZE
                    || super::capture::MARK_COMPACT.contains(&name))
            {
                by_name.insert(name, (sym.section_index(), sym.address()));
            }
        }
        let c = Constants {
            file: &file,
            by_name,
        };

        let tagged = c.int("v8dbg_TaggedSize")?;
        let pointer = c.int("v8dbg_SystemPointerSize")?;
        if pointer != 8 {
            return Err(MissingConstant::Unsupported {
                name: "v8dbg_SystemPointerSize",
                value: pointer,
            });
        }
        if tagged != pointer {
            // Compressed pointers: see the type's doc.
            return Err(MissingConstant::Unsupported {
                name: "v8dbg_TaggedSize",
                value: tagged,
            });
        }

        let version_part = |name: &'static str, what: &'static str| {
            c.by_name
                .get(name)
                .and_then(|sym| c.read_i32(sym))
                .and_then(|v| u32::try_from(v).ok())
                .ok_or(MissingConstant::Missing(what))
        };
        let version = (
            version_part(
                "_ZN2v88internal7Version6major_E",
                "v8::internal::Version::major_",
            )?,
            version_part(
                "_ZN2v88internal7Version6minor_E",
                "v8::internal::Version::minor_",
            )?,
        );
        let scope_info = ScopeInfoLayout::for_version(version.0, version.1).ok_or(
            MissingConstant::UnknownScopeInfo {
                major: version.0,
                minor: version.1,
            },
        )?;

        let shift_size = c.int("v8dbg_SmiShiftSize")?;
        let smi_tag_size = c.int("v8dbg_SmiValueShift")?;
        let smi_value_shift = u32::try_from(shift_size + smi_tag_size)
            .ok()
            .filter(|s| *s == 32)
            .ok_or(MissingConstant::Unsupported {
                name: "v8dbg_SmiShiftSize",
                value: shift_size,
            })?;

        Ok(V8Layout {
            version,
            heap_object_tag: c.offset("v8dbg_HeapObjectTag")?,
            heap_object_tag_mask: c.offset("v8dbg_HeapObjectTagMask")?,
            smi_tag: c.offset("v8dbg_SmiTag")?,
            smi_tag_mask: c.offset("v8dbg_SmiTagMask")?,
            smi_value_shift,
            off_fp_function: c.int("v8dbg_off_fp_function")?,
            off_fp_context: c.int("v8dbg_off_fp_context")?,
            off_fp_bytecode_array: c.int("v8dbg_off_fp_bytecode_array")?,
            off_fp_bytecode_offset: c.int("v8dbg_off_fp_bytecode_offset")?,
            heap_object_map: c.offset("v8dbg_class_HeapObject__map__Map")?,
            map_instance_type: c.offset("v8dbg_class_Map__instance_type__uint16_t")?,
            js_function_types: {
                let first = c.type_tag("v8dbg_type_JSFunction__JS_FUNCTION_TYPE")?;
                first..=c.last_js_function_type(first).unwrap_or(first)
            },
            type_shared_function_info: c
                .type_tag("v8dbg_type_SharedFunctionInfo__SHARED_FUNCTION_INFO_TYPE")?,
            type_scope_info: c.type_tag("v8dbg_type_ScopeInfo__SCOPE_INFO_TYPE")?,
            type_script: c.type_tag("v8dbg_type_Script__SCRIPT_TYPE")?,
            type_fixed_array: c.type_tag("v8dbg_type_FixedArray__FIXED_ARRAY_TYPE")?,
            type_bytecode_array: c.type_tag("v8dbg_type_BytecodeArray__BYTECODE_ARRAY_TYPE")?,
            type_map: c.type_tag("v8dbg_type_Map__MAP_TYPE")?,
            type_byte_array: c.type_tag("v8dbg_type_ByteArray__BYTE_ARRAY_TYPE")?,
            type_oddball: c.type_tag("v8dbg_type_Oddball__ODDBALL_TYPE")?,
            js_function_shared: c.offset("v8dbg_class_JSFunction__shared__SharedFunctionInfo")?,
            sfi_function_data: c.offset("v8dbg_class_SharedFunctionInfo__function_data__Object")?,
            sfi_flags: c.offset("v8dbg_class_SharedFunctionInfo__flags__int")?,
            script_id: {
                let line_ends = c.offset("v8dbg_class_Script__line_ends__Object")?;
                let eval_from = c.offset("v8dbg_class_Script__eval_from_shared_or_wrapped_arguments__Object")?;
                (eval_from == line_ends + 16).then_some(line_ends + 8)
            },
            sfi_name_or_scope_info: c
                .offset("v8dbg_class_SharedFunctionInfo__name_or_scope_info__Object")?,
            sfi_script_or_debug_info: c
                .offset("v8dbg_class_SharedFunctionInfo__script_or_debug_info__HeapObject")?,
            script_name: c.offset("v8dbg_class_Script__name__Object")?,
            script_source: c.offset("v8dbg_class_Script__source__Object")?,
            script_line_ends: c.offset("v8dbg_class_Script__line_ends__Object")?,
            fixed_array_length: c.offset("v8dbg_class_FixedArrayBase__length__SMI")?,
            fixed_array_data: c.offset("v8dbg_class_FixedArray__data__uintptr_t")?,
            bytecode_array_data: c.offset("v8dbg_class_BytecodeArray__data__uintptr_t")?,
            first_nonstring_type: c.type_tag("v8dbg_FirstNonstringType")?,
            string_encoding_mask: c.type_tag("v8dbg_StringEncodingMask")?,
            string_representation_mask: c.type_tag("v8dbg_StringRepresentationMask")?,
            one_byte_string_tag: c.type_tag("v8dbg_OneByteStringTag")?,
            two_byte_string_tag: c.type_tag("v8dbg_TwoByteStringTag")?,
            seq_string_tag: c.type_tag("v8dbg_SeqStringTag")?,
            cons_string_tag: c.type_tag("v8dbg_ConsStringTag")?,
            sliced_string_tag: c.type_tag("v8dbg_SlicedStringTag")?,
            thin_string_tag: c.type_tag("v8dbg_ThinStringTag")?,
            external_string_tag: c.type_tag("v8dbg_ExternalStringTag")?,
            string_length: c.offset("v8dbg_class_String__length__int32_t")?,
            seq_one_byte_chars: c.offset("v8dbg_class_SeqOneByteString__chars__char")?,
            seq_two_byte_chars: c.offset("v8dbg_class_SeqTwoByteString__chars__char")?,
            cons_first: c.offset("v8dbg_class_ConsString__first__String")?,
            cons_second: c.offset("v8dbg_class_ConsString__second__String")?,
            sliced_parent: c.offset("v8dbg_class_SlicedString__parent__String")?,
            sliced_offset: c.offset("v8dbg_class_SlicedString__offset__SMI")?,
            thin_actual: c.offset("v8dbg_class_ThinString__actual__String")?,
            external_resource: c.offset("v8dbg_class_ExternalString__resource__Object")?,
            scope_info_first_vars: c.offset("v8dbg_scopeinfo_idx_first_vars")?,
            scope_info_context_local_count: c.offset("v8dbg_scopeinfo_idx_ncontextlocals")?,
            scope_info,
            // Known for the same versions as the ScopeInfo layout.
            source_positions: SourcePositionLayout::for_version(version.0, version.1).ok_or(
                MissingConstant::UnknownScopeInfo {
                    major: version.0,
                    minor: version.1,
                },
            )?,
            mark_compact: {
                use object::ObjectSegment as _;
                let offset = |addr: u64| {
                    file.segments().find_map(|seg| {
                        let (file_off, file_len) = seg.file_range();
                        (seg.address() <= addr && addr < seg.address() + file_len).then(|| addr - seg.address() + file_off)
                    })
                };
                super::capture::MARK_COMPACT
                    .iter()
                    .map(|name| c.by_name.get(name).and_then(|&(_, addr)| offset(addr)))
                    .collect::<Option<Vec<u64>>>()
                    .unwrap_or_default()
            },
            embedded_blob: {
                let start = c.by_name.get(BLOB_CODE).map(|&(_, address)| address);
                let size = c.by_name.get(BLOB_CODE_SIZE).and_then(|sym| c.read_i32(sym));
                match (start, size) {
                    (Some(start), Some(size)) if size > 0 => Some((start, start + size as u64)),
                    _ => None,
                }
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: &str = "/usr/bin/node";

    fn node_layout() -> V8Layout {
        let data = std::fs::read(NODE)
            .unwrap_or_else(|e| panic!("{NODE}: {e}; the v8 tests expect node 20 there"));
        V8Layout::from_elf(&data).unwrap_or_else(|e| panic!("{NODE}: {e}"))
    }

    /// Figures checked with `gdb -batch -ex 'p (int)v8dbg_NAME' /usr/bin/node` (node 20.20.2).
    #[test]
    fn v8_layout_of_node_20_matches_its_metadata() {
        let l = node_layout();
        assert_eq!(l.version, (11, 3));
        assert_eq!((l.heap_object_tag, l.heap_object_tag_mask), (1, 3));
        assert_eq!((l.smi_tag, l.smi_tag_mask, l.smi_value_shift), (0, 1, 32));
        assert_eq!(
            (
                l.off_fp_function,
                l.off_fp_context,
                l.off_fp_bytecode_array,
                l.off_fp_bytecode_offset
            ),
            (-16, -8, -32, -40)
        );
        assert_eq!((l.heap_object_map, l.map_instance_type), (0, 12));
        // IsJSFunction_NonInline: `sub $0x812,%ax; cmp $0xf,%ax; setbe` (gdb disassembly).
        assert_eq!(l.js_function_types, 2066..=2081);
        assert_eq!(
            (
                l.type_shared_function_info,
                l.type_scope_info,
                l.type_script
            ),
            (262, 261, 167)
        );
        assert_eq!((l.type_fixed_array, l.type_bytecode_array), (175, 191));
        assert_eq!((l.type_map, l.type_oddball), (255, 131));
        assert_eq!(
            (
                l.js_function_shared,
                l.sfi_name_or_scope_info,
                l.sfi_script_or_debug_info
            ),
            (24, 16, 32)
        );
        assert_eq!(
            (l.script_name, l.script_source, l.script_line_ends),
            (16, 8, 56)
        );
        assert_eq!((l.fixed_array_length, l.fixed_array_data), (8, 16));
        assert_eq!(l.first_nonstring_type, 128);
        assert_eq!(
            (l.string_encoding_mask, l.string_representation_mask),
            (8, 7)
        );
        assert_eq!(
            (
                l.seq_string_tag,
                l.cons_string_tag,
                l.sliced_string_tag,
                l.thin_string_tag
            ),
            (0, 1, 3, 5)
        );
        assert_eq!((l.one_byte_string_tag, l.two_byte_string_tag), (8, 0));
        assert_eq!(
            (l.string_length, l.seq_one_byte_chars, l.seq_two_byte_chars),
            (12, 16, 16)
        );
        assert_eq!((l.cons_first, l.cons_second, l.thin_actual), (16, 24, 16));
        assert_eq!((l.sliced_parent, l.sliced_offset), (16, 24));
        assert_eq!((l.external_resource, l.external_string_tag), (16, 2));
        assert_eq!(
            (l.scope_info_first_vars, l.scope_info_context_local_count),
            (3, 2)
        );
        assert_eq!(l.scope_info, ScopeInfoLayout::for_version(11, 3).unwrap());
    }

    #[test]
    fn v8_layout_names_the_missing_constant_in_one_line() {
        // Renaming one symbol in a copy of the binary makes it absent.
        let mut data = std::fs::read(NODE).unwrap();
        let needle = b"v8dbg_off_fp_function\0";
        let at: Vec<usize> = data
            .windows(needle.len())
            .enumerate()
            .filter_map(|(i, w)| (w == needle).then_some(i))
            .collect();
        assert!(!at.is_empty(), "the symbol name is in the string table");
        for i in at {
            data[i] = b'X';
        }
        let err = V8Layout::from_elf(&data).unwrap_err();
        assert_eq!(err, MissingConstant::Missing("v8dbg_off_fp_function"));
        assert_eq!(
            err.to_string(),
            "v8dbg_off_fp_function missing: JS frames stay unnamed"
        );
    }

    #[test]
    fn v8_layout_of_another_v8_version_is_refused_in_one_line() {
        // node 20's binary with Version::minor_ changed from 3 to 9.
        let mut data = std::fs::read(NODE).unwrap();
        let at = {
            let file = object::File::parse(&*data).unwrap();
            let sym = file
                .symbols()
                .find(|s| s.name() == Ok("_ZN2v88internal7Version6minor_E"))
                .expect("node has V8's version");
            let section = file.section_by_index(sym.section_index().unwrap()).unwrap();
            let (offset, _) = section.file_range().unwrap();
            (offset + sym.address() - section.address()) as usize
        };
        assert_eq!(&data[at..at + 4], &3i32.to_le_bytes());
        data[at..at + 4].copy_from_slice(&9i32.to_le_bytes());
        let err = V8Layout::from_elf(&data).unwrap_err();
        assert_eq!(
            err,
            MissingConstant::UnknownScopeInfo {
                major: 11,
                minor: 9
            }
        );
        assert_eq!(
            err.to_string(),
            "ScopeInfo layout unknown for V8 11.9 (no v8dbg_ constants describe it): JS frames stay unnamed"
        );
    }

    #[test]
    fn v8_layout_of_an_elf_without_metadata_is_refused() {
        let me = std::fs::read("/proc/self/exe").unwrap();
        let err = V8Layout::from_elf(&me).unwrap_err();
        assert!(matches!(err, MissingConstant::Missing(_)), "{err}");
    }

    #[test]
    fn v8_scope_info_layout_is_known_only_for_11_3() {
        assert!(ScopeInfoLayout::for_version(11, 3).is_some());
        assert!(ScopeInfoLayout::for_version(12, 4).is_none());
        assert!(ScopeInfoLayout::for_version(10, 2).is_none());
    }
}
