//! The frame reader and resolver against objects laid out by hand in fake memory, with node
//! 20's real layout: string shapes, names, positions, and objects that do not check out.

use super::heap::{Heap, MAX_NAME_UNITS};
use super::layout::V8Layout;
use super::memory::FakeMemory;
use super::resolve::{line_in_units, position_at};
use super::{V8Error, read_frame, resolve_frame, resolve_function};

fn node_layout() -> V8Layout {
    let data =
        std::fs::read("/usr/bin/node").expect("the v8 tests expect node 20 at /usr/bin/node");
    V8Layout::from_elf(&data).unwrap()
}

fn smi(v: i64) -> u64 {
    (v << 32) as u64
}

/// A bump allocator of V8-shaped objects in fake memory. Addresses returned are tagged.
struct FakeHeap {
    mem: FakeMemory,
    l: V8Layout,
    next: u64,
    meta_map: u64,
    maps: std::collections::HashMap<u16, u64>,
}

impl FakeHeap {
    fn new() -> FakeHeap {
        let l = node_layout();
        let mut h = FakeHeap {
            mem: FakeMemory::new(),
            l,
            next: 0x10_0000,
            meta_map: 0,
            maps: Default::default(),
        };
        // The map of maps is its own map.
        let meta = h.alloc(16);
        h.mem.write_u64(meta - 1, meta);
        let ty = h.l.type_map;
        h.mem
            .write(meta - 1 + h.l.map_instance_type, &ty.to_le_bytes());
        h.meta_map = meta;
        h
    }

    /// Zeroed bytes; returns the tagged address.
    fn alloc(&mut self, size: usize) -> u64 {
        let addr = self.next;
        self.mem.put(addr, vec![0; size]);
        self.next += (size as u64).div_ceil(16) * 16 + 16;
        addr + 1
    }

    fn map(&mut self, ty: u16) -> u64 {
        if let Some(m) = self.maps.get(&ty) {
            return *m;
        }
        let m = self.alloc(16);
        self.mem.write_u64(m - 1, self.meta_map);
        self.mem
            .write(m - 1 + self.l.map_instance_type, &ty.to_le_bytes());
        self.maps.insert(ty, m);
        m
    }

    fn object(&mut self, ty: u16, size: usize) -> u64 {
        let map = self.map(ty);
        let o = self.alloc(size);
        self.mem.write_u64(o - 1, map);
        o
    }

    fn set(&mut self, obj: u64, offset: u64, word: u64) {
        self.mem.write_u64(obj - 1 + offset, word);
    }

    fn set_len(&mut self, s: u64, len: usize) {
        let off = self.l.string_length;
        self.mem.write(s - 1 + off, &(len as u32).to_le_bytes());
    }

    fn one_byte(&mut self, text: &str) -> u64 {
        let bytes: Vec<u8> = text
            .chars()
            .map(|c| u8::try_from(u32::from(c)).unwrap())
            .collect();
        let s = self.object(8, 16 + bytes.len());
        self.set_len(s, bytes.len());
        self.mem.write(s - 1 + self.l.seq_one_byte_chars, &bytes);
        s
    }

    fn two_byte(&mut self, text: &str) -> u64 {
        let units: Vec<u16> = text.encode_utf16().collect();
        let s = self.object(0, 16 + 2 * units.len());
        self.set_len(s, units.len());
        let bytes: Vec<u8> = units.iter().flat_map(|u| u.to_le_bytes()).collect();
        self.mem.write(s - 1 + self.l.seq_two_byte_chars, &bytes);
        s
    }

    fn cons(&mut self, first: u64, second: u64, len: usize) -> u64 {
        let s = self.object(9, 32);
        self.set_len(s, len);
        let (a, b) = (self.l.cons_first, self.l.cons_second);
        self.set(s, a, first);
        self.set(s, b, second);
        s
    }

    fn thin(&mut self, actual: u64, len: usize) -> u64 {
        let s = self.object(13, 24);
        self.set_len(s, len);
        let off = self.l.thin_actual;
        self.set(s, off, actual);
        s
    }

    fn sliced(&mut self, parent: u64, offset: i64, len: usize) -> u64 {
        let s = self.object(11, 32);
        self.set_len(s, len);
        let (p, o) = (self.l.sliced_parent, self.l.sliced_offset);
        self.set(s, p, parent);
        self.set(s, o, smi(offset));
        s
    }

    /// A one-byte external string whose resource has a vtable whose data() is `code`, and
    /// keeps its characters' address at offset 0x10.
    fn external(&mut self, text: &str, code: &[u8]) -> u64 {
        let chars = self.alloc(text.len().max(1)) - 1;
        self.mem.write(chars, text.as_bytes());
        let code_at = self.alloc(32) - 1;
        self.mem.write(code_at, code);
        let vtable = self.alloc(64) - 1;
        self.mem.write_u64(vtable + 0x30, code_at);
        let resource = self.alloc(32) - 1;
        self.mem.write_u64(resource, vtable);
        self.mem.write_u64(resource + 0x10, chars);
        let s = self.object(10, 32);
        self.set_len(s, text.len());
        let off = self.l.external_resource;
        self.set(s, off, resource);
        s
    }

    fn heap(&self) -> Heap<'_, FakeMemory> {
        Heap::new(&self.mem, &self.l)
    }

    fn read(&self, s: u64) -> Result<String, V8Error> {
        self.heap().string("test string", s, MAX_NAME_UNITS)
    }

    fn undefined(&mut self) -> u64 {
        let ty = self.l.type_oddball;
        self.object(ty, 48)
    }

    /// A ScopeInfo with `flags`, `locals` context locals and the given trailing slots
    /// (function variable, inferred name, positions...).
    fn scope_info(&mut self, flags: i64, locals: usize, tail: &[u64]) -> u64 {
        let ty = self.l.type_scope_info;
        let slots = 3 + 2 * locals + tail.len();
        let si = self.object(ty, 8 + 8 * slots);
        self.set(si, 8, smi(flags));
        self.set(
            si,
            8 + 8 * self.l.scope_info_context_local_count,
            smi(locals as i64),
        );
        for i in 0..locals {
            let name = self.one_byte(&format!("local{i}"));
            self.set(si, 8 + 8 * (3 + i as u64), name);
            self.set(si, 8 + 8 * (3 + (locals + i) as u64), smi(0));
        }
        for (i, w) in tail.iter().enumerate() {
            self.set(si, 8 + 8 * (3 + 2 * locals + i) as u64, *w);
        }
        si
    }

    fn script(&mut self, name: u64, source: u64, line_ends: u64) -> u64 {
        let ty = self.l.type_script;
        let s = self.object(ty, 96);
        let (n, src, le) = (
            self.l.script_name,
            self.l.script_source,
            self.l.script_line_ends,
        );
        self.set(s, n, name);
        self.set(s, src, source);
        self.set(s, le, line_ends);
        s
    }

    fn fixed_array(&mut self, words: &[u64]) -> u64 {
        let ty = self.l.type_fixed_array;
        let a = self.object(ty, 16 + 8 * words.len());
        let len = self.l.fixed_array_length;
        self.set(a, len, smi(words.len() as i64));
        for (i, w) in words.iter().enumerate() {
            let off = self.l.fixed_array_data + 8 * i as u64;
            self.set(a, off, *w);
        }
        a
    }

    fn sfi(&mut self, name_or_scope_info: u64, script: u64) -> u64 {
        let ty = self.l.type_shared_function_info;
        let s = self.object(ty, 64);
        let (n, sc) = (
            self.l.sfi_name_or_scope_info,
            self.l.sfi_script_or_debug_info,
        );
        self.set(s, n, name_or_scope_info);
        self.set(s, sc, script);
        s
    }
}

const FUNCTION_SCOPE: i64 = 2;
/// function_variable = UNUSED (3): the name is kept, no variable.
const FVAR_NAME_ONLY: i64 = 3 << 12;
const HAS_INFERRED: i64 = 1 << 14;

#[test]
fn v8_strings_of_every_shape_decode() {
    let mut h = FakeHeap::new();
    let s = h.one_byte("spinForever");
    assert_eq!(h.read(s).unwrap(), "spinForever");
    let latin = h.one_byte("caf\u{e9}");
    assert_eq!(
        h.read(latin).unwrap(),
        "caf\u{e9}",
        "one-byte strings are Latin-1"
    );
    let wide = h.two_byte("na\u{ef}ve\u{2192}\u{1f600}");
    assert_eq!(h.read(wide).unwrap(), "na\u{ef}ve\u{2192}\u{1f600}");

    // (("obj" + ".") + thin("assigned")): V8 builds names from pieces like this.
    let obj = h.one_byte("obj");
    let dot = h.one_byte(".");
    let left = h.cons(obj, dot, 4);
    let assigned = h.one_byte("assigned");
    let thin = h.thin(assigned, 8);
    let whole = h.cons(left, thin, 12);
    assert_eq!(h.read(whole).unwrap(), "obj.assigned");

    let parent = h.two_byte("Module._extensions..js");
    let slice = h.sliced(parent, 7, 11);
    assert_eq!(h.read(slice).unwrap(), "_extensions");
    // A prefix of a cons string reads only what it needs.
    assert_eq!(
        h.heap().prefix_units("p", whole, 5).unwrap(),
        "obj.a".encode_utf16().collect::<Vec<_>>()
    );
    // External strings (node's own module sources): data() is `return this->data_;`, with
    // the frame setup node's -fno-omit-frame-pointer build gives it.
    let getter = [0x55, 0x48, 0x89, 0xe5, 0x48, 0x8b, 0x47, 0x10, 0x5d, 0xc3];
    let ext = h.external("'use strict';\nfunction f() {}", &getter);
    assert_eq!(h.read(ext).unwrap(), "'use strict';\nfunction f() {}");
    let lean = [0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x8b, 0x47, 0x10, 0xc3];
    let ext = h.external("abc", &lean);
    assert_eq!(h.heap().prefix_units("p", ext, 2).unwrap(), vec![97, 98]);
    let empty = h.one_byte("");
    assert_eq!(h.read(empty).unwrap(), "");
}

#[test]
fn v8_strings_that_do_not_check_out_are_errors() {
    let mut h = FakeHeap::new();
    // An external string whose resource's data() computes its pointer: refused.
    let ext = h.external(
        "text",
        &[0x48, 0x8b, 0x47, 0x10, 0x48, 0x83, 0xc0, 0x01, 0xc3],
    );
    assert!(
        matches!(h.read(ext), Err(V8Error::Invalid { .. })),
        "{:?}",
        h.read(ext)
    );
    // ... or has no resource.
    let ext = h.object(10, 32);
    h.set_len(ext, 4);
    assert!(h.read(ext).is_err());
    // Not a string type.
    let sfi = h.object(h.l.type_shared_function_info, 64);
    assert!(matches!(h.read(sfi), Err(V8Error::WrongType { .. })));
    // A Smi, or a pointer to nowhere.
    assert!(matches!(h.read(smi(5)), Err(V8Error::NotHeapObject { .. })));
    assert!(matches!(h.read(0xdead_0001), Err(V8Error::Read(_))));
    // An object whose map is not a Map.
    let bogus_map = h.object(8, 16);
    let o = h.alloc(16);
    h.mem.write_u64(o - 1, bogus_map);
    assert!(matches!(h.read(o), Err(V8Error::BadMap { .. })));
    // Longer than a name may be.
    let long = h.one_byte(&"x".repeat(MAX_NAME_UNITS + 1));
    assert!(matches!(h.read(long), Err(V8Error::Invalid { .. })));
    // A negative length.
    let neg = h.one_byte("abc");
    h.mem
        .write(neg - 1 + h.l.string_length, &(-3i32).to_le_bytes());
    assert!(h.read(neg).is_err());
    // A cons string that contains itself ends in an error, not a hang.
    let a = h.one_byte("a");
    let cyc = h.cons(a, a, 2);
    h.set(cyc, h.l.cons_first, cyc);
    assert!(h.read(cyc).is_err());
    // A cons whose parts are shorter than it claims.
    let short = h.cons(a, a, 5);
    assert!(h.read(short).is_err());
    // A slice past its parent's end.
    let parent = h.one_byte("abc");
    let slice = h.sliced(parent, 2, 4);
    assert!(h.read(slice).is_err());
    // An unpaired surrogate.
    let s = h.object(0, 24);
    h.set_len(s, 1);
    h.mem
        .write(s - 1 + h.l.seq_two_byte_chars, &0xd800u16.to_le_bytes());
    assert!(h.read(s).is_err());
}

#[test]
fn v8_line_and_column_count_like_v8() {
    let at_end = |s: &str| {
        let u: Vec<u16> = s.encode_utf16().collect();
        line_in_units(&u, u.len())
    };
    assert_eq!(at_end(""), (1, 1));
    assert_eq!(at_end("function f"), (1, 11));
    assert_eq!(at_end("a\nb\n  "), (3, 3));
    // A lone CR and U+2028/9 end lines too; CR LF is one end.
    assert_eq!(at_end("a\r\nb\rc\u{2028}d\u{2029}  "), (5, 3));
    // V8 counts CR LF at the LF: a position on that LF is still on the CR's line.
    let u: Vec<u16> = "ab\r\ncd".encode_utf16().collect();
    assert_eq!(line_in_units(&u, 3), (1, 4));
    assert_eq!(line_in_units(&u, 4), (2, 1));
    // A CR at the very end of what was read ends its line.
    assert_eq!(at_end("ab\r"), (2, 1));
}

/// A function `name` at `start` in a three-line script, its line ends cached or not.
fn named_function(h: &mut FakeHeap, scope_info: u64, cached_line_ends: bool) -> u64 {
    let source = h.two_byte("// one\n// two\nfunction spinForever(n) {}\n");
    let line_ends = if cached_line_ends {
        h.fixed_array(&[smi(6), smi(13), smi(39)])
    } else {
        h.undefined()
    };
    let name = h.one_byte("/work/x/v8_frames.js");
    let script = h.script(name, source, line_ends);
    h.sfi(scope_info, script)
}

#[test]
fn v8_functions_resolve_to_name_script_and_start_line() {
    let mut h = FakeHeap::new();
    // `function spinForever(n)` on line 3: the parameter list starts at column 21, offset 34.
    let name = h.one_byte("spinForever");
    let si = h.scope_info(
        FUNCTION_SCOPE | FVAR_NAME_ONLY,
        2,
        &[name, smi(0), smi(34), smi(40)],
    );
    for cached in [true, false] {
        let sfi = named_function(&mut h, si, cached);
        let f = resolve_function(&h.mem, &h.l, sfi - 1).unwrap();
        assert_eq!(f.name, "spinForever");
        assert_eq!(f.script, "/work/x/v8_frames.js");
        assert_eq!(
            (f.start_position, f.line, f.column),
            (34, 3, 21),
            "line ends cached: {cached}"
        );
        assert_eq!(f.identity().start_position, 34);
    }

    // No own name: the inferred one (`obj.assigned = function () {}`).
    let inferred = h.one_byte("obj.assigned");
    let si = h.scope_info(
        FUNCTION_SCOPE | HAS_INFERRED,
        0,
        &[inferred, smi(14), smi(20)],
    );
    let sfi = named_function(&mut h, si, true);
    let f = resolve_function(&h.mem, &h.l, sfi - 1).unwrap();
    assert_eq!((f.name.as_str(), f.line, f.column), ("obj.assigned", 3, 1));

    // Anonymous: no name, inferred name undefined.
    let undefined = h.undefined();
    let si = h.scope_info(
        FUNCTION_SCOPE | HAS_INFERRED,
        1,
        &[undefined, smi(7), smi(9)],
    );
    let sfi = named_function(&mut h, si, false);
    let f = resolve_function(&h.mem, &h.l, sfi - 1).unwrap();
    assert_eq!((f.name.as_str(), f.line, f.column), ("", 2, 1));
}

#[test]
fn v8_functions_that_do_not_check_out_are_errors() {
    let mut h = FakeHeap::new();
    let name = h.one_byte("f");
    // Positions that are not Smis (the layout would be wrong for this object).
    let si = h.scope_info(
        FUNCTION_SCOPE | FVAR_NAME_ONLY,
        0,
        &[name, smi(0), name, smi(9)],
    );
    let sfi = named_function(&mut h, si, true);
    assert!(matches!(
        resolve_function(&h.mem, &h.l, sfi - 1),
        Err(V8Error::NotSmi { .. })
    ));
    // End before start.
    let si = h.scope_info(
        FUNCTION_SCOPE | FVAR_NAME_ONLY,
        0,
        &[name, smi(0), smi(9), smi(3)],
    );
    let sfi = named_function(&mut h, si, true);
    assert!(resolve_function(&h.mem, &h.l, sfi - 1).is_err());
    // A start past the source's end.
    let si = h.scope_info(
        FUNCTION_SCOPE | FVAR_NAME_ONLY,
        0,
        &[name, smi(0), smi(500), smi(600)],
    );
    let sfi = named_function(&mut h, si, false);
    assert!(resolve_function(&h.mem, &h.l, sfi - 1).is_err());
    // A block scope carries no positions.
    let si = h.scope_info(6, 0, &[smi(1), smi(2)]);
    let sfi = named_function(&mut h, si, true);
    assert!(resolve_function(&h.mem, &h.l, sfi - 1).is_err());
    // Not a SharedFunctionInfo at all.
    let s = h.one_byte("not an sfi");
    assert!(matches!(
        resolve_function(&h.mem, &h.l, s - 1),
        Err(V8Error::WrongType { .. })
    ));
    // Debug info instead of a script.
    let si = h.scope_info(
        FUNCTION_SCOPE | FVAR_NAME_ONLY,
        0,
        &[name, smi(0), smi(1), smi(2)],
    );
    let not_script = h.fixed_array(&[]);
    let sfi = h.sfi(si, not_script);
    assert!(matches!(
        resolve_function(&h.mem, &h.l, sfi - 1),
        Err(V8Error::WrongType { .. })
    ));
}

/// A stack frame at `fp` with the given slot words below it.
fn frame(h: &mut FakeHeap, context: u64, function: u64, array: u64, offset: u64) -> u64 {
    let base = h.alloc(64) - 1;
    let fp = base + 48;
    h.mem
        .write_u64(fp.wrapping_add_signed(h.l.off_fp_context), context);
    h.mem
        .write_u64(fp.wrapping_add_signed(h.l.off_fp_function), function);
    h.mem
        .write_u64(fp.wrapping_add_signed(h.l.off_fp_bytecode_array), array);
    h.mem
        .write_u64(fp.wrapping_add_signed(h.l.off_fp_bytecode_offset), offset);
    fp
}

#[test]
fn v8_frames_give_function_shared_info_and_bytecode_offset() {
    let mut h = FakeHeap::new();
    let name = h.one_byte("f");
    let si = h.scope_info(
        FUNCTION_SCOPE | FVAR_NAME_ONLY,
        0,
        &[name, smi(0), smi(1), smi(2)],
    );
    let sfi = named_function(&mut h, si, true);
    let js_function = *h.l.js_function_types.start();
    let function = h.object(js_function, 64);
    h.set(function, h.l.js_function_shared, sfi);
    let context = h.object(h.l.type_fixed_array, 16);
    let array = h.object(h.l.type_bytecode_array, 64);
    h.set(array, h.l.fixed_array_length, smi(20));
    let first = (h.l.bytecode_array_data - 1) as i64;

    let fp = frame(&mut h, context, function, array, smi(first + 7));
    let f = read_frame(&h.mem, &h.l, fp).unwrap();
    assert_eq!(
        (f.function, f.shared, f.bytecode_offset),
        (function - 1, sfi - 1, Some(7))
    );
    assert_eq!(resolve_frame(&h.mem, &h.l, &f).unwrap().name, "f");
    // The function now points elsewhere (moved, or its address reused): refused.
    let other = h.sfi(si, h.l.heap_object_tag);
    h.set(function, h.l.js_function_shared, other);
    assert!(matches!(
        resolve_frame(&h.mem, &h.l, &f),
        Err(V8Error::Invalid { .. })
    ));
    h.set(function, h.l.js_function_shared, sfi);

    // A class constructor's type lies in the JSFunction range too.
    let ctor = h.object(*h.l.js_function_types.end(), 64);
    h.set(ctor, h.l.js_function_shared, sfi);
    // Baseline frames keep the feedback vector where the offset would be.
    let fp = frame(&mut h, context, ctor, array, context);
    assert_eq!(read_frame(&h.mem, &h.l, fp).unwrap().bytecode_offset, None);
    // An offset outside the bytecode is not an offset.
    let fp = frame(&mut h, context, function, array, smi(first + 20));
    assert_eq!(read_frame(&h.mem, &h.l, fp).unwrap().bytecode_offset, None);

    // A typed frame's marker in the context slot.
    let fp = frame(&mut h, 0x22, function, array, smi(first));
    assert_eq!(read_frame(&h.mem, &h.l, fp), Err(V8Error::TypedFrame(0x22)));
    // Something else in the function slot.
    let fp = frame(&mut h, context, array, array, smi(first));
    assert!(matches!(
        read_frame(&h.mem, &h.l, fp),
        Err(V8Error::WrongType { .. })
    ));
    // A JSFunction whose shared is not a SharedFunctionInfo.
    let broken = h.object(js_function, 64);
    h.set(broken, h.l.js_function_shared, name);
    let fp = frame(&mut h, context, broken, array, smi(first));
    assert!(matches!(
        read_frame(&h.mem, &h.l, fp),
        Err(V8Error::WrongType { .. })
    ));
    // An unmapped frame.
    assert!(matches!(
        read_frame(&h.mem, &h.l, 0x40),
        Err(V8Error::Read(_))
    ));
}

/// A zigzag varint as V8's source position tables hold them.
fn zigzag(v: i64, out: &mut Vec<u8>) {
    let mut x = ((v << 1) ^ (v >> 63)) as u64;
    loop {
        let b = (x & 0x7f) as u8;
        x >>= 7;
        if x == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

#[test]
fn v8_source_position_tables_decode_like_v8() {
    // (bytecode offset, script offset, statement?, external?) entries, from offset -1.
    let entries = [
        (-1, 10, true, false),
        (0, 12, true, false),
        (3, 20, false, false),
        (3, 300, false, true),
        (9, 700, true, false),
        (200, 1000, false, false),
    ];
    let mut table = Vec::new();
    let (mut code, mut pos) = (-1i64, 0i64);
    for (c, p, statement, external) in entries {
        let delta = c - code;
        zigzag(if statement { delta } else { -delta - 1 }, &mut table);
        let raw = ((p + 1) << 1) | i64::from(external);
        zigzag(raw - pos, &mut table);
        (code, pos) = (c, raw);
    }
    let at = |offset| position_at(&table, offset).map(|raw| (raw >> 1) - 1);
    assert_eq!(at(0), Some(12));
    assert_eq!(at(2), Some(12));
    // The external entry at 3 is skipped; the JS one at 3 counts.
    assert_eq!(at(3), Some(20));
    assert_eq!(at(8), Some(20));
    assert_eq!(at(9), Some(700));
    assert_eq!(at(5000), Some(1000), "multi-byte varints");
    // A table cut inside an entry is refused.
    assert_eq!(position_at(&table[..table.len() - 1], 5000), None);
    let mut endless = table.clone();
    endless.extend([0xff; 12]);
    assert_eq!(position_at(&endless, 5000), None);
}

#[test]
fn v8_interpreted_frames_give_the_position_being_executed() {
    let mut h = FakeHeap::new();
    // `function spinForever(n) {}` spans offsets 34..40 of the script (line 3).
    let name = h.one_byte("spinForever");
    let si = h.scope_info(
        FUNCTION_SCOPE | FVAR_NAME_ONLY,
        0,
        &[name, smi(0), smi(34), smi(40)],
    );
    let sfi = named_function(&mut h, si, false);
    let function = h.object(*h.l.js_function_types.start(), 64);
    h.set(function, h.l.js_function_shared, sfi);
    let context = h.object(h.l.type_fixed_array, 16);

    // Entries: bytecode 0 at offset 34, bytecode 5 at offset 38.
    let mut table = Vec::new();
    for (delta, pos_delta) in [(1i64, 35 * 2), (5, 4 * 2)] {
        zigzag(delta, &mut table);
        zigzag(pos_delta, &mut table);
    }
    let byte_array = h.object(h.l.type_byte_array, 16 + table.len());
    h.set(byte_array, h.l.fixed_array_length, smi(table.len() as i64));
    h.mem.write(byte_array - 1 + h.l.fixed_array_data, &table);
    let array = h.object(h.l.type_bytecode_array, 64);
    h.set(array, h.l.fixed_array_length, smi(20));
    h.set(array, h.l.source_positions.bytecode_table, byte_array);
    let first = (h.l.bytecode_array_data - 1) as i64;

    let at = |h: &mut FakeHeap, offset: i64| {
        let fp = frame(h, context, function, array, smi(first + offset));
        let f = read_frame(&h.mem, &h.l, fp).unwrap();
        super::current_position(&h.mem, &h.l, &f)
    };
    assert_eq!(at(&mut h, 2), Ok(Some((3, 21))));
    assert_eq!(at(&mut h, 7), Ok(Some((3, 25))));

    // No table collected yet: no position, not an error.
    let undefined = h.undefined();
    h.set(array, h.l.source_positions.bytecode_table, undefined);
    assert_eq!(at(&mut h, 7), Ok(None));
    // A table whose positions fall outside the function is another function's: refused.
    let mut far = Vec::new();
    zigzag(1, &mut far);
    zigzag(3 * 2, &mut far);
    let other = h.object(h.l.type_byte_array, 16 + far.len());
    h.set(other, h.l.fixed_array_length, smi(far.len() as i64));
    h.mem.write(other - 1 + h.l.fixed_array_data, &far);
    h.set(array, h.l.source_positions.bytecode_table, other);
    assert!(matches!(at(&mut h, 7), Err(V8Error::Invalid { .. })));
}
