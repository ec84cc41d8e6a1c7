//! Typed access to V8 heap objects through [`Memory`]: tag checks, the type word behind every
//! pointer, Smis and strings, each read bounded.

use super::V8Error;
use super::layout::V8Layout;
use super::memory::Memory;

/// Longest string read as a name (function, script): longer is refused, not truncated.
pub const MAX_NAME_UNITS: usize = 4096;
/// Longest source prefix scanned for line ends.
pub const MAX_SOURCE_UNITS: usize = 64 << 20;
/// Nesting of cons/sliced/thin strings followed before giving up.
const MAX_STRING_DEPTH: u32 = 64;
/// String pieces visited for one string.
const MAX_STRING_PIECES: u32 = 100_000;

/// Byte offset of `data()` in the vtable of `v8::String::ExternalOneByteStringResource` and
/// `ExternalStringResource`: the 7th virtual function in v8-primitive.h's order (two
/// destructors, IsCacheable, Dispose, Lock, Unlock, data). Node 20's
/// `ExternalOneByteString::GetChars` calls `*(vtable + 0x30)` for it.
const EXTERNAL_DATA_SLOT: u64 = 0x30;

/// If `code` is a function returning a field of its `this` (`rdi`), the field's offset:
/// `mov rax, [rdi + disp]` with only frame setup and `ret` around it.
fn getter_offset(code: &[u8], ip: u64) -> Option<u64> {
    use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind, Register};
    let mut offset = None;
    for ins in Decoder::with_ip(64, code, ip, DecoderOptions::NONE)
        .iter()
        .take(8)
    {
        match ins.mnemonic() {
            Mnemonic::Endbr64 | Mnemonic::Leave | Mnemonic::Nop => {}
            Mnemonic::Push | Mnemonic::Pop if ins.op0_register() == Register::RBP => {}
            Mnemonic::Mov
                if ins.op0_register() == Register::RBP && ins.op1_register() == Register::RSP => {}
            Mnemonic::Mov
                if offset.is_none()
                    && ins.op0_register() == Register::RAX
                    && ins.op1_kind() == OpKind::Memory
                    && ins.memory_base() == Register::RDI
                    && ins.memory_index() == Register::None =>
            {
                offset = Some(ins.memory_displacement64());
            }
            Mnemonic::Ret => return offset,
            _ => return None,
        }
    }
    None
}

pub struct Heap<'a, M: Memory + ?Sized> {
    pub mem: &'a M,
    pub l: &'a V8Layout,
}

impl<'a, M: Memory + ?Sized> Heap<'a, M> {
    pub fn new(mem: &'a M, l: &'a V8Layout) -> Self {
        Heap { mem, l }
    }

    pub fn is_heap_object(&self, word: u64) -> bool {
        word & self.l.heap_object_tag_mask == self.l.heap_object_tag
    }

    pub fn is_smi(&self, word: u64) -> bool {
        word & self.l.smi_tag_mask == self.l.smi_tag
    }

    /// A Smi's value; with 64-bit tagged words the low 32 bits are all zero.
    pub fn smi(&self, what: &'static str, word: u64) -> Result<i64, V8Error> {
        let low = (1u64 << self.l.smi_value_shift) - 1;
        if !self.is_smi(word) || word & low != 0 {
            return Err(V8Error::NotSmi { what, value: word });
        }
        Ok((word as i64) >> self.l.smi_value_shift)
    }

    /// A tagged word that must point at a heap object: its untagged address and instance type,
    /// after checking that its map is itself an object whose map is a Map.
    pub fn object(&self, what: &'static str, word: u64) -> Result<(u64, u16), V8Error> {
        if !self.is_heap_object(word) || word < 0x1000 {
            return Err(V8Error::NotHeapObject { what, value: word });
        }
        let addr = word - self.l.heap_object_tag;
        let map = self.mem.read_u64(addr + self.l.heap_object_map)?;
        if !self.is_heap_object(map) {
            return Err(V8Error::BadMap { what, addr });
        }
        let map_addr = map - self.l.heap_object_tag;
        let meta = self.mem.read_u64(map_addr + self.l.heap_object_map)?;
        if !self.is_heap_object(meta)
            || self
                .mem
                .read_u16(meta - self.l.heap_object_tag + self.l.map_instance_type)?
                != self.l.type_map
        {
            return Err(V8Error::BadMap { what, addr });
        }
        let ty = self.mem.read_u16(map_addr + self.l.map_instance_type)?;
        Ok((addr, ty))
    }

    /// Like [`object`](Self::object), and the type must be `expected`.
    pub fn typed(
        &self,
        what: &'static str,
        word: u64,
        expected: u16,
        expected_name: &'static str,
    ) -> Result<u64, V8Error> {
        let (addr, found) = self.object(what, word)?;
        if found != expected {
            return Err(V8Error::WrongType {
                what,
                addr,
                found,
                expected: expected_name,
            });
        }
        Ok(addr)
    }

    pub fn field(&self, addr: u64, offset: u64) -> Result<u64, V8Error> {
        Ok(self.mem.read_u64(addr + offset)?)
    }

    pub fn is_string_type(&self, ty: u16) -> bool {
        ty < self.l.first_nonstring_type
    }

    /// A string's length in UTF-16 units (type already checked).
    fn string_length(&self, addr: u64) -> Result<usize, V8Error> {
        let len = self.mem.read_u32(addr + self.l.string_length)? as i32;
        usize::try_from(len).map_err(|_| V8Error::Invalid {
            what: "string length",
            detail: format!("{len} at {addr:#x}"),
        })
    }

    /// The length of the string `word` points at.
    pub fn length_of(&self, what: &'static str, word: u64) -> Result<usize, V8Error> {
        let (addr, _) = self.string_object(what, word)?;
        self.string_length(addr)
    }

    /// The string `word` points at: its address and instance type, refused when it is no
    /// string.
    fn string_object(&self, what: &'static str, word: u64) -> Result<(u64, u16), V8Error> {
        let (addr, ty) = self.object(what, word)?;
        if !self.is_string_type(ty) {
            return Err(V8Error::WrongType {
                what,
                addr,
                found: ty,
                expected: "a string",
            });
        }
        Ok((addr, ty))
    }

    /// The whole string `word` points at as UTF-16 units, refused beyond `max` units.
    pub fn string_units(
        &self,
        what: &'static str,
        word: u64,
        max: usize,
    ) -> Result<Vec<u16>, V8Error> {
        let len = self.length_of(what, word)?;
        if len > max {
            return Err(V8Error::Invalid {
                what,
                detail: format!("string of {len} units, more than the {max} read"),
            });
        }
        self.prefix_units(what, word, len)
    }

    /// The first `count` units of the string `word` points at (count <= its length).
    pub fn prefix_units(
        &self,
        what: &'static str,
        word: u64,
        count: usize,
    ) -> Result<Vec<u16>, V8Error> {
        let mut out = Vec::with_capacity(count);
        let mut pieces = 0;
        self.append(what, word, 0, count, 0, &mut pieces, &mut out)?;
        Ok(out)
    }

    /// The string as Rust text; an unpaired surrogate is an error, not a replacement.
    pub fn string(&self, what: &'static str, word: u64, max: usize) -> Result<String, V8Error> {
        let units = self.string_units(what, word, max)?;
        String::from_utf16(&units).map_err(|_| V8Error::Invalid {
            what,
            detail: "not valid UTF-16".to_string(),
        })
    }

    /// Where an external string's characters are. They sit in embedder memory, returned by
    /// the resource's virtual `data()`; this follows that call only when `data()` is a plain
    /// getter (`return this->field;`, decoded from the target's own code), and reads the field.
    /// Anything else (a computed pointer, a lock) is refused.
    fn external_chars(&self, what: &'static str, addr: u64) -> Result<u64, V8Error> {
        let refuse = |detail: String| V8Error::Invalid { what, detail };
        let resource = self.field(addr, self.l.external_resource)?;
        if resource == 0 || resource % 8 != 0 {
            return Err(refuse(format!("external resource pointer {resource:#x}")));
        }
        let vtable = self.mem.read_u64(resource)?;
        let data_fn = self.mem.read_u64(vtable + EXTERNAL_DATA_SLOT)?;
        let mut code = [0u8; 24];
        self.mem.read(data_fn, &mut code)?;
        let offset = getter_offset(&code, data_fn)
            .ok_or_else(|| refuse(format!("data() at {data_fn:#x} is not a plain getter")))?;
        let chars = self.mem.read_u64(resource + offset)?;
        if chars == 0 {
            return Err(refuse("external resource with no data".to_string()));
        }
        Ok(chars)
    }

    /// Appends units [start, start + count) of the string at `word` to `out`.
    #[expect(clippy::too_many_arguments, reason = "one recursive walk's state")]
    fn append(
        &self,
        what: &'static str,
        word: u64,
        start: usize,
        count: usize,
        depth: u32,
        pieces: &mut u32,
        out: &mut Vec<u16>,
    ) -> Result<(), V8Error> {
        *pieces += 1;
        if depth > MAX_STRING_DEPTH || *pieces > MAX_STRING_PIECES {
            return Err(V8Error::Invalid {
                what,
                detail: "string nested too deep or in too many pieces".to_string(),
            });
        }
        let (addr, ty) = self.string_object(what, word)?;
        let len = self.string_length(addr)?;
        let end = start
            .checked_add(count)
            .filter(|e| *e <= len)
            .ok_or_else(|| V8Error::Invalid {
                what,
                detail: format!("range {start}+{count} beyond a string of {len} units"),
            })?;
        if count == 0 {
            return Ok(());
        }
        let l = self.l;
        let repr = ty & l.string_representation_mask;
        let one_byte = ty & l.string_encoding_mask == l.one_byte_string_tag;
        if repr == l.seq_string_tag {
            if one_byte {
                let mut buf = vec![0u8; count];
                self.mem
                    .read(addr + l.seq_one_byte_chars + start as u64, &mut buf)?;
                out.extend(buf.iter().map(|b| u16::from(*b)));
            } else {
                debug_assert_eq!(ty & l.string_encoding_mask, l.two_byte_string_tag);
                let mut buf = vec![0u8; count * 2];
                self.mem
                    .read(addr + l.seq_two_byte_chars + 2 * start as u64, &mut buf)?;
                out.extend(
                    buf.chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]])),
                );
            }
            Ok(())
        } else if repr == l.cons_string_tag {
            let first = self.field(addr, l.cons_first)?;
            let second = self.field(addr, l.cons_second)?;
            let first_len = self.length_of(what, first)?;
            if first_len > len {
                return Err(V8Error::Invalid {
                    what,
                    detail: format!(
                        "cons string's first part ({first_len}) longer than it ({len})"
                    ),
                });
            }
            if start < first_len {
                let n = count.min(first_len - start);
                self.append(what, first, start, n, depth + 1, pieces, out)?;
            }
            if end > first_len {
                let from = start.max(first_len) - first_len;
                self.append(
                    what,
                    second,
                    from,
                    end - first_len - from,
                    depth + 1,
                    pieces,
                    out,
                )?;
            }
            Ok(())
        } else if repr == l.thin_string_tag {
            let actual = self.field(addr, l.thin_actual)?;
            self.append(what, actual, start, count, depth + 1, pieces, out)
        } else if repr == l.sliced_string_tag {
            let parent = self.field(addr, l.sliced_parent)?;
            let offset = self.smi(what, self.field(addr, l.sliced_offset)?)?;
            let offset = usize::try_from(offset).map_err(|_| V8Error::Invalid {
                what,
                detail: format!("sliced string offset {offset}"),
            })?;
            self.append(what, parent, offset + start, count, depth + 1, pieces, out)
        } else if repr == l.external_string_tag {
            let chars = self.external_chars(what, addr)?;
            let width = if one_byte { 1 } else { 2 };
            let mut buf = vec![0u8; count * width];
            self.mem.read(chars + (start * width) as u64, &mut buf)?;
            if one_byte {
                out.extend(buf.iter().map(|b| u16::from(*b)));
            } else {
                out.extend(
                    buf.chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]])),
                );
            }
            Ok(())
        } else {
            Err(V8Error::Unsupported(format!(
                "{what}: string representation {repr} is not read"
            )))
        }
    }
}
