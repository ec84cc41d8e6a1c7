//! Function names for (module, file offset) pairs, read from ELF `.symtab` and `.dynsym`, and
//! demangling of C++ and Rust names.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use object::elf;
use object::read::elf::{FileHeader, ProgramHeader, SectionHeader, Sym};
use object::{Endianness, FileKind};

/// Resolves file offsets in modules to function names, parsing each module once.
#[derive(Debug)]
pub struct Symbolizer {
    root: PathBuf,
    /// `None` caches a module that could not be opened or parsed, so it is not retried for every
    /// address.
    modules: HashMap<String, Option<SymbolTable>>,
}

impl Symbolizer {
    /// `root` is the directory the target's paths are relative to, e.g. `/proc/1234/root` so
    /// that a process in another mount namespace is read through its own view, or `/`.
    pub fn new(root: impl Into<PathBuf>) -> Symbolizer {
        Symbolizer {
            root: root.into(),
            modules: HashMap::new(),
        }
    }

    /// Function containing `file_offset` in module `module` (a path as the target sees it; it is
    /// opened as root.join(path without leading '/')), demangled. None when the module cannot be
    /// read or no symbol covers it.
    pub fn function(&mut self, module: &str, file_offset: u64) -> Option<String> {
        if !self.modules.contains_key(module) {
            let path = self.root.join(module.trim_start_matches('/'));
            self.modules
                .insert(module.to_owned(), SymbolTable::load(&path));
        }
        self.modules
            .get_mut(module)?
            .as_mut()?
            .function(file_offset)
    }

    /// Everything known of one normalized frame, outermost function last: inlined functions
    /// (when debug information says so) come first, each with `inlined` set.
    pub fn symbolize(&mut self, module: Option<&str>, file_offset: u64) -> Vec<SymFrame> {
        let function = module.and_then(|m| self.function(m, file_offset));
        let kind = if module.is_some() { FrameKind::Native } else { FrameKind::Unknown };
        vec![SymFrame {
            function,
            file: None,
            line: None,
            inlined: false,
            kind,
        }]
    }
}

/// Where a frame's code came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FrameKind {
    /// Code from a file: an executable or a shared library.
    Native,
    /// Code generated at run time (V8's JIT), named from a perf map when there is one.
    Jit,
    /// Neither: no mapping covers the address, or nothing names it.
    Unknown,
}

/// One function at a frame: a real call frame, or a function inlined into it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SymFrame {
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub inlined: bool,
    pub kind: FrameKind,
}

/// Demangles C++ (Itanium) and Rust (legacy and v0, without the hash) names; anything else is
/// returned unchanged.
pub fn demangle(name: &str) -> String {
    // Rust first: legacy Rust names use the `_ZN` prefix too, and cpp_demangle would keep their
    // hash element and `$LT$`-style escapes. rustc-demangle rejects real C++ names because they
    // carry a parameter list after the closing `E`.
    if let Ok(d) = rustc_demangle::try_demangle(name) {
        return format!("{d:#}");
    }
    if name.starts_with("_Z")
        && let Ok(sym) = cpp_demangle::Symbol::new(name)
        && let Ok(s) = sym.demangle(&cpp_demangle::DemangleOptions::default())
    {
        return s;
    }
    name.to_owned()
}

/// One function symbol, in ELF virtual addresses.
#[derive(Debug, Clone, Copy)]
struct Entry {
    start: u64,
    /// Exclusive; equal to `start` for a symbol of size 0.
    end: u64,
    /// Largest `end` of this and every earlier entry, so that a backwards search for an enclosing
    /// (overlapping) symbol knows when to stop.
    max_end: u64,
    name_start: u32,
    name_len: u32,
    /// Section index of the symbol, for the same-section rule of size-0 symbols.
    section: u32,
}

impl Entry {
    fn sized(&self) -> bool {
        self.end > self.start
    }
}

/// A `PT_LOAD` segment: how file offsets translate to virtual addresses.
#[derive(Debug, Clone, Copy)]
struct Load {
    offset: u64,
    filesz: u64,
    vaddr: u64,
}

/// Everything kept of one module after its file is unmapped.
#[derive(Debug, Default)]
struct SymbolTable {
    loads: Vec<Load>,
    /// Sorted by (start, size-0 before sized).
    entries: Vec<Entry>,
    /// Mangled names, concatenated; demangling is deferred to lookup because most of node's
    /// ~150k function symbols are never hit and cpp_demangle costs microseconds each.
    names: String,
    /// `[sh_addr, sh_addr + sh_size)` by section index.
    sections: Vec<(u64, u64)>,
    /// Demangled names by entry index, since stacks hit the same functions over and over.
    demangled: HashMap<u32, String>,
}

/// How far back a lookup walks for a symbol that encloses a later-starting one; bounds the cost
/// of a file with one absurdly large symbol.
const MAX_BACKWARD_SCAN: usize = 1024;

impl SymbolTable {
    fn load(path: &Path) -> Option<SymbolTable> {
        let map = Mmap::open(path)?;
        let data: &[u8] = map.as_slice();
        match FileKind::parse(data).ok()? {
            FileKind::Elf32 => build::<elf::FileHeader32<Endianness>>(data),
            FileKind::Elf64 => build::<elf::FileHeader64<Endianness>>(data),
            _ => None,
        }
        // `map` is dropped here: only the compact table outlives the parse.
    }

    fn function(&mut self, file_offset: u64) -> Option<String> {
        let vaddr = self.vaddr(file_offset)?;
        let idx = self.lookup(vaddr)?;
        let entry = self.entries[idx];
        let key = u32::try_from(idx).ok()?;
        let names = &self.names;
        let name = self.demangled.entry(key).or_insert_with(|| {
            let start = entry.name_start as usize;
            demangle(&names[start..start + entry.name_len as usize])
        });
        Some(name.clone())
    }

    fn vaddr(&self, file_offset: u64) -> Option<u64> {
        self.loads
            .iter()
            .find(|l| l.offset <= file_offset && file_offset - l.offset < l.filesz)
            .map(|l| file_offset - l.offset + l.vaddr)
    }

    /// Index of the entry naming `vaddr`.
    fn lookup(&self, vaddr: u64) -> Option<usize> {
        let last = self
            .entries
            .partition_point(|e| e.start <= vaddr)
            .checked_sub(1)?;
        // The latest-starting sized symbol that covers the address is the most specific one.
        for i in (last.saturating_sub(MAX_BACKWARD_SCAN)..=last).rev() {
            let e = &self.entries[i];
            if e.max_end <= vaddr {
                break;
            }
            if e.sized() && vaddr < e.end {
                return Some(i);
            }
        }
        // No sized symbol covers it: a size-0 symbol (hand-written assembly without `.size`)
        // may, if it is the nearest preceding entry (so no sized symbol starts in between) and
        // the address is in its section.
        let e = &self.entries[last];
        if e.sized() {
            return None;
        }
        let (lo, hi) = *self.sections.get(e.section as usize)?;
        (lo <= vaddr && vaddr < hi).then_some(last)
    }
}

/// A symbol while the table is being built; `name` borrows from the mapped file.
struct Candidate<'data> {
    start: u64,
    size: u64,
    section: u32,
    global: bool,
    name: Cow<'data, str>,
}

impl Candidate<'_> {
    /// Among names at one address: global (including weak, which is how glibc exports calloc),
    /// then not starting with '_', then shortest, then alphabetical.
    fn preference(&self) -> (bool, bool, usize, &str) {
        (
            !self.global,
            self.name.starts_with('_'),
            self.name.len(),
            &self.name,
        )
    }
}

fn build<Elf: FileHeader<Endian = Endianness>>(data: &[u8]) -> Option<SymbolTable> {
    let header = Elf::parse(data).ok()?;
    let endian = header.endian().ok()?;

    let loads: Vec<Load> = header
        .program_headers(endian, data)
        .ok()?
        .iter()
        .filter(|ph| ph.p_type(endian) == elf::PT_LOAD)
        .map(|ph| Load {
            offset: ph.p_offset(endian).into(),
            filesz: ph.p_filesz(endian).into(),
            vaddr: ph.p_vaddr(endian).into(),
        })
        .collect();

    let section_table = header.sections(endian, data).ok()?;
    let sections: Vec<(u64, u64)> = section_table
        .iter()
        .map(|s| {
            let addr: u64 = s.sh_addr(endian).into();
            let size: u64 = s.sh_size(endian).into();
            (addr, addr.saturating_add(size))
        })
        .collect();
    let executable: Vec<bool> = section_table
        .iter()
        .map(|s| {
            let flags: u64 = s.sh_flags(endian).into();
            flags & u64::from(elf::SHF_EXECINSTR) != 0
        })
        .collect();

    let mut candidates: Vec<Candidate<'_>> = Vec::new();
    for sh_type in [elf::SHT_SYMTAB, elf::SHT_DYNSYM] {
        // A broken table of one kind should not hide the other.
        let Ok(symbols) = section_table.symbols(endian, data, sh_type) else {
            continue;
        };
        for (index, sym) in symbols.enumerate() {
            let Ok(Some(section)) = symbols.symbol_section(endian, sym, index) else {
                continue;
            };
            let Ok(section) = u32::try_from(section.0) else {
                continue;
            };
            let is_function = match sym.st_type() {
                elf::STT_FUNC | elf::STT_GNU_IFUNC => true,
                // Assembly labels without `.type`; only in code, or data labels would match.
                elf::STT_NOTYPE => executable.get(section as usize).copied().unwrap_or(false),
                _ => false,
            };
            if !is_function {
                continue;
            }
            let Ok(name) = symbols.symbol_name(endian, sym) else {
                continue;
            };
            // `$x`/`$d` are ARM and RISC-V mapping symbols, not functions.
            if name.is_empty() || name[0] == b'$' {
                continue;
            }
            candidates.push(Candidate {
                start: sym.st_value(endian).into(),
                size: sym.st_size(endian).into(),
                section,
                global: sym.st_bind() != elf::STB_LOCAL,
                name: String::from_utf8_lossy(name),
            });
        }
    }

    // Group by address, size-0 symbols before sized ones (see `lookup`), best name first.
    candidates.sort_unstable_by(|a, b| {
        (a.start, a.size != 0, a.preference()).cmp(&(b.start, b.size != 0, b.preference()))
    });

    let mut entries: Vec<Entry> = Vec::new();
    let mut names = String::new();
    let mut max_end = 0u64;
    let mut i = 0;
    while i < candidates.len() {
        let first = &candidates[i];
        let sized = first.size != 0;
        let mut end = first.start.saturating_add(first.size);
        let mut j = i + 1;
        while j < candidates.len()
            && candidates[j].start == first.start
            && (candidates[j].size != 0) == sized
        {
            // Aliases normally agree on size; if not, the group covers the largest.
            end = end.max(candidates[j].start.saturating_add(candidates[j].size));
            j += 1;
        }
        max_end = max_end.max(end);
        entries.push(Entry {
            start: first.start,
            end,
            max_end,
            name_start: u32::try_from(names.len()).ok()?,
            name_len: u32::try_from(first.name.len()).ok()?,
            section: first.section,
        });
        names.push_str(&first.name);
        i = j;
    }
    // Names are copied out; the mapped file goes away with `candidates`.
    drop(candidates);
    names.shrink_to_fit();

    Some(SymbolTable {
        loads,
        entries,
        names,
        sections,
        demangled: HashMap::new(),
    })
}

/// A read-only private mapping of a whole file. Mapping rather than reading means only the pages
/// of the headers and symbol tables are touched: a fraction of node's 98 MB.
struct Mmap {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mmap {
    fn open(path: &Path) -> Option<Mmap> {
        let file = File::open(path).ok()?;
        let len = usize::try_from(file.metadata().ok()?.len()).ok()?;
        if len == 0 {
            // mmap rejects a zero length, and an empty file has no symbols anyway.
            return None;
        }
        // SAFETY: a fresh read-only private mapping of a file we opened; no Rust object aliases
        // it. The descriptor may be closed afterwards: the mapping keeps its own reference.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        Some(Mmap { ptr, len })
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is a live PROT_READ mapping of `len` bytes until `drop`. A file
        // truncated by someone else while mapped would fault (SIGBUS) on access; the mapping is
        // only held for the duration of one table build, which keeps that window short.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len) }
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `open` mapped; no slice of it outlives `self`.
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::maps::ProcMaps;
    use super::*;
    use object::{Object, ObjectSegment, ObjectSymbol};
    use std::time::Instant;

    const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";
    const NODE: &str = "/usr/bin/node";

    /// File offset of the first defined symbol called `name`, found with object's high-level
    /// API rather than the code under test.
    fn file_offset_of(path: &str, name: &str) -> u64 {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        let file = object::File::parse(&*data).unwrap_or_else(|e| panic!("parse {path}: {e}"));
        let sym = file
            .symbols()
            .chain(file.dynamic_symbols())
            .find(|s| s.is_definition() && s.name() == Ok(name))
            .unwrap_or_else(|| panic!("{name} not defined in {path}"));
        let addr = sym.address();
        for seg in file.segments() {
            let (off, size) = seg.file_range();
            if seg.address() <= addr && addr < seg.address() + size {
                return addr - seg.address() + off;
            }
        }
        panic!("{name} at {addr:#x} is in no segment of {path}");
    }

    #[test]
    fn libc_allocator_entries_resolve_to_their_public_names() {
        let mut s = Symbolizer::new("/");
        for name in ["malloc", "free", "calloc", "realloc"] {
            let off = file_offset_of(LIBC, name);
            assert_eq!(
                s.function(LIBC, off).as_deref(),
                Some(name),
                "entry of {name} at offset {off:#x}"
            );
            assert_eq!(
                s.function(LIBC, off + 5).as_deref(),
                Some(name),
                "{name} entry + 5"
            );
        }
        // Beyond the end of the file, and in the ELF header (no function there).
        assert_eq!(s.function(LIBC, u64::MAX), None);
        assert_eq!(s.function(LIBC, 0), None);
    }

    #[test]
    fn node_array_buffer_allocator_resolves_by_file_offset() {
        // Node 20 is part of this project's machines (`cargo xtask prereqs` checks it).
        assert!(Path::new(NODE).exists(), "{NODE} is missing: run `cargo xtask prereqs`");
        let mangled = "_ZN4node24NodeArrayBufferAllocator8AllocateEm";
        let off = file_offset_of(NODE, mangled);
        let mut s = Symbolizer::new("/");

        // `file_offset_of` just read the whole file; drop it from the page cache again so the
        // timing below is of a cold parse (best effort, and unprivileged: it only evicts clean
        // pages nobody has mapped).
        if let Ok(f) = File::open(NODE) {
            // SAFETY: plain syscall on a descriptor we own.
            unsafe {
                libc::posix_fadvise(
                    std::os::fd::AsRawFd::as_raw_fd(&f),
                    0,
                    0,
                    libc::POSIX_FADV_DONTNEED,
                )
            };
        }
        let t = Instant::now();
        let first = s.function(NODE, off);
        let cold = t.elapsed();
        assert_eq!(
            first.as_deref(),
            Some("node::NodeArrayBufferAllocator::Allocate(unsigned long)")
        );

        // A few thousand warm lookups spread over the code segment.
        let text_start = 0x772000u64;
        let t = Instant::now();
        let mut found = 0;
        for k in 0..5000u64 {
            found += usize::from(s.function(NODE, text_start + k * 5557).is_some());
        }
        let warm = t.elapsed();
        eprintln!(
            "node: first lookup (parse + resolve) {cold:?}; 5000 further lookups {warm:?} ({found} named)"
        );
        assert_eq!(s.function(NODE, off + 5).as_deref(), first.as_deref());
    }

    #[inline(never)]
    fn marker_function_for_symbolize(x: u64) -> u64 {
        std::hint::black_box(x).wrapping_mul(31)
    }

    #[test]
    fn own_function_found_by_runtime_address() {
        let f: fn(u64) -> u64 = marker_function_for_symbolize;
        assert_eq!(f(1), 31);
        let addr = f as usize as u64;
        let maps = ProcMaps::read(std::process::id()).expect("read own maps");
        let n = maps.normalize(addr + 1);
        let module = n.module.expect("own code is file-backed");
        let mut s = Symbolizer::new("/proc/self/root");
        let name = s.function(&module, n.offset);
        assert!(
            name.as_deref()
                .is_some_and(|n| n.ends_with("elf::tests::marker_function_for_symbolize")),
            "address {addr:#x} in {module} at offset {:#x} resolved to {name:?}",
            n.offset
        );
    }

    #[test]
    fn unreadable_truncated_and_garbage_modules_give_none() {
        let dir = std::env::temp_dir().join(format!("symbolize-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let libc = std::fs::read(LIBC).unwrap();
        let off = file_offset_of(LIBC, "malloc");
        let cases: [(&str, Vec<u8>); 5] = [
            ("empty", Vec::new()),
            (
                "garbage",
                (0..4096u32)
                    .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                    .collect(),
            ),
            ("elf-header-only", libc[..64].to_vec()),
            ("first-page", libc[..4096].to_vec()),
            // Keeps the code, loses the section headers and symbol tables at the end.
            ("half", libc[..libc.len() / 2].to_vec()),
        ];
        let mut s = Symbolizer::new(&dir);
        for (name, bytes) in &cases {
            std::fs::write(dir.join(name), bytes).unwrap();
            assert_eq!(s.function(name, off), None, "module {name}");
            assert_eq!(s.function(name, off), None, "module {name}, cached");
        }
        assert_eq!(s.function("/does/not/exist", 0), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn size_zero_symbol_rules() {
        let name = |t: &SymbolTable, i: usize| {
            let e = t.entries[i];
            t.names[e.name_start as usize..(e.name_start + e.name_len) as usize].to_owned()
        };
        let mut names = String::new();
        let mut entry = |start: u64, end: u64, section: u32, n: &str| {
            let e = Entry {
                start,
                end,
                max_end: 0,
                name_start: names.len() as u32,
                name_len: n.len() as u32,
                section,
            };
            names.push_str(n);
            e
        };
        let mut entries = vec![
            entry(0x100, 0x100, 1, "label"),
            entry(0x200, 0x300, 1, "sized"),
            entry(0x400, 0x400, 1, "tail"),
            entry(0x500, 0x600, 1, "outer"),
            entry(0x520, 0x540, 1, "inner"),
        ];
        let mut max_end = 0;
        for e in &mut entries {
            max_end = max_end.max(e.end);
            e.max_end = max_end;
        }
        let t = SymbolTable {
            entries,
            names,
            sections: vec![(0, 0), (0x100, 0x480)],
            ..SymbolTable::default()
        };
        let at = |a| t.lookup(a).map(|i| name(&t, i));
        assert_eq!(at(0x150).as_deref(), Some("label"));
        assert_eq!(at(0x200).as_deref(), Some("sized"));
        assert_eq!(
            at(0x300),
            None,
            "past a sized symbol, no size-0 symbol after it"
        );
        assert_eq!(at(0x410).as_deref(), Some("tail"));
        assert_eq!(
            at(0x490),
            None,
            "size-0 symbol, but address outside its section"
        );
        assert_eq!(at(0x530).as_deref(), Some("inner"));
        assert_eq!(
            at(0x550).as_deref(),
            Some("outer"),
            "enclosing symbol found behind a nested one"
        );
        assert_eq!(at(0x50), None);
    }

    #[test]
    fn demangles_cpp_rust_and_leaves_c_alone() {
        assert_eq!(
            demangle("_ZN4node24NodeArrayBufferAllocator8AllocateEm"),
            "node::NodeArrayBufferAllocator::Allocate(unsigned long)"
        );
        assert_eq!(
            demangle("_ZNSt6vectorIiSaIiEE9push_backERKi"),
            "std::vector<int, std::allocator<int> >::push_back(int const&)"
        );
        assert_eq!(
            demangle("_ZN3std2rt10lang_start17h8f2d1a0a6a7b8c9dE"),
            "std::rt::lang_start"
        );
        assert_eq!(
            demangle("_ZN5alloc5alloc8box_free17h0123456789abcdefE.llvm.123"),
            "alloc::alloc::box_free"
        );
        assert_eq!(demangle("_RNvCs1234_7mycrate3foo"), "mycrate::foo");
        assert_eq!(
            demangle("_RNvNtCs1234_7mycrate5inner3bar"),
            "mycrate::inner::bar"
        );
        assert_eq!(demangle("malloc"), "malloc");
        assert_eq!(demangle("__libc_malloc"), "__libc_malloc");
        assert_eq!(demangle("_Zgarbage"), "_Zgarbage");
    }
}
