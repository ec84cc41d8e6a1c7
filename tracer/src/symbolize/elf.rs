//! Names for (module, file offset) pairs: function names from ELF `.symtab`/`.dynsym`, file,
//! line and inlined functions from DWARF (in the module or its separate debug file), JIT names
//! from perf maps; and demangling of C++ and Rust names. [`Symbolizer::symbolize_frame`] is the
//! one entry point reports use.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use object::elf;
use object::read::elf::{FileHeader, ProgramHeader, SectionHeader, Sym};
use object::{Endianness, FileKind};

use super::debuglink::{DebugRefs, DebugSearch, hex};
use super::dwarf::Dwarf;
use super::maps::{MappedFile, ProcMaps};
use super::mmap::Mmap;
use super::perfmap::{PerfMapFile, split_jit_name};

/// Resolves frames to names, parsing each module once.
#[derive(Debug)]
pub struct Symbolizer {
    root: PathBuf,
    search: DebugSearch,
    /// `None` caches a module that could not be opened or parsed, so it is not retried for every
    /// address.
    modules: HashMap<String, Option<Module>>,
    /// Named frames of modules by (file offset, return address?): a view that names the same
    /// stacks every second (`tracer top`) pays for each frame once.
    frames: HashMap<String, HashMap<(u64, bool), Vec<SymFrame>>>,
    jit: Jit,
    /// The process the module paths are from, while it may still be alive: a file it maps
    /// can then be read through it even when the path names another file by now.
    pid: Option<u32>,
    /// Per module path, the file the process maps there (as its maps showed last).
    mapped: HashMap<String, MappedFile>,
    /// What the user should hear about modules, once each: a path that names another file
    /// than the one mapped.
    notes: Vec<String>,
    /// Modules being loaded on another thread (see [`Symbolizer::preload`]).
    preload: Option<Preload>,
}

/// Modules loading on a thread of their own, handed over as each is done.
#[derive(Debug)]
struct Preload {
    /// Asked for and not received yet.
    pending: HashSet<String>,
    loaded: mpsc::Receiver<(String, Option<Module>)>,
}

/// Everything kept of one module.
#[derive(Debug)]
struct Module {
    /// Program headers and symbols of the module file itself.
    table: SymbolTable,
    /// Symbols of its separate debug file, for a stripped module.
    debug_table: Option<SymbolTable>,
    /// From the separate debug file when there is one, else from the module.
    dwarf: Option<Dwarf>,
    build_id: Option<Vec<u8>>,
}

impl Module {
    /// The module `module` (a path as the target sees it) from `map`, the file's contents.
    fn load(map: Mmap, root: &Path, module: &str, search: &DebugSearch) -> Option<Module> {
        let table = SymbolTable::build_from(map.as_slice())?;
        let refs = object::File::parse(map.as_slice())
            .map(|f| DebugRefs::of(&f))
            .unwrap_or_default();
        let (dwarf, debug_table) = match search.find(root, module, &refs) {
            Some(debug) => {
                let debug_table = SymbolTable::build_from(debug.map.as_slice());
                // A debug file without DWARF (symbols only) still names functions; the
                // module's own DWARF, if any, is then the better source of lines.
                match Dwarf::load(debug.map) {
                    Some(dwarf) => (Some(dwarf), debug_table),
                    None if refs.has_dwarf => (Dwarf::load(map), debug_table),
                    None => (None, debug_table),
                }
            }
            None if refs.has_dwarf => (Dwarf::load(map), None),
            None => (None, None),
        };
        Some(Module {
            table,
            debug_table,
            dwarf,
            build_id: refs.build_id,
        })
    }

    /// Everything known at file offset `offset`; `return_address` says the offset is where a
    /// call returns to, so the call itself (one byte before) is what gets named.
    fn frames(&mut self, offset: u64, return_address: bool) -> Vec<SymFrame> {
        let Some(vaddr) = self.table.vaddr(offset) else {
            return vec![SymFrame::native(None)];
        };
        let probe = if return_address {
            vaddr.saturating_sub(1)
        } else {
            vaddr
        };
        let symbol = self
            .table
            .function_at(probe)
            .or_else(|| self.debug_table.as_mut().and_then(|t| t.function_at(probe)));
        let dwarf = self
            .dwarf
            .as_ref()
            .map(|d| d.frames(probe))
            .unwrap_or_default();
        if dwarf.is_empty() {
            return vec![SymFrame::native(symbol)];
        }
        let last = dwarf.len() - 1;
        dwarf
            .into_iter()
            .enumerate()
            .map(|(i, d)| SymFrame {
                // The symbol table's name is the one the rest of the report uses for the real
                // frame (DWARF may only have a short name); DWARF names the inlined ones.
                function: if i == last {
                    symbol.clone().or(d.function)
                } else {
                    d.function
                },
                file: d.file,
                line: d.line,
                inlined: i != last,
                kind: FrameKind::Native,
            })
            .collect()
    }
}

/// JIT code of the one process being recorded.
#[derive(Debug, Default)]
struct Jit {
    perf_map: Option<PerfMapFile>,
    /// Anonymous executable memory ever seen in the process, sorted and merged: code that no
    /// file backs, which is what a JIT writes.
    exec_ranges: Vec<(u64, u64)>,
    /// Frames in such memory that no perf map named.
    unnamed: u64,
}

impl Jit {
    fn in_exec_range(&self, addr: u64) -> bool {
        let i = self.exec_ranges.partition_point(|&(s, _)| s <= addr);
        i > 0 && addr < self.exec_ranges[i - 1].1
    }

    fn add_exec_ranges(&mut self, maps: &ProcMaps) {
        let before = self.exec_ranges.len();
        for m in maps.mappings() {
            let anonymous = m.path.as_deref().is_none_or(|p| p.starts_with("[anon"));
            if anonymous && m.perms.contains('x') {
                self.exec_ranges.push((m.start, m.end));
            }
        }
        if self.exec_ranges.len() == before {
            return;
        }
        self.exec_ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.exec_ranges.len());
        for &(s, e) in &self.exec_ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        self.exec_ranges = merged;
    }
}

impl Symbolizer {
    /// `root` is the directory the target's paths are relative to, e.g. `/proc/1234/root` so
    /// that a process in another mount namespace is read through its own view, or `/`.
    /// Separate debug files are looked for under `ROOT/usr/lib/debug`.
    pub fn new(root: impl Into<PathBuf>) -> Symbolizer {
        Symbolizer {
            root: root.into(),
            search: DebugSearch::default(),
            modules: HashMap::new(),
            frames: HashMap::new(),
            jit: Jit::default(),
            pid: None,
            mapped: HashMap::new(),
            notes: Vec::new(),
            preload: None,
        }
    }

    /// Starts loading `modules` (paths as the target sees them) on a thread of their own, so
    /// that naming frames at the end finds them ready instead of reading them then (node's
    /// tables and libc's debug file take 100-250 ms). A module still on its way when needed
    /// is waited for; any other is loaded when first needed. One preload at a time.
    pub fn preload(&mut self, modules: impl IntoIterator<Item = String>) {
        if self.preload.is_some() {
            return;
        }
        let mut names: Vec<String> = Vec::new();
        for module in modules {
            if !self.modules.contains_key(&module) && !names.contains(&module) {
                names.push(module);
            }
        }
        if names.is_empty() {
            return;
        }
        let (send, loaded) = mpsc::channel();
        // Files are opened here, by the same checks as `load` (the file the process maps);
        // only the parsing moves to the other thread.
        let todo: Vec<(String, Option<Mmap>)> =
            names.iter().map(|name| (name.clone(), self.open(name))).collect();
        let (root, search) = (self.root.clone(), self.search.clone());
        let spawned = std::thread::Builder::new()
            .name("tracer-symbols".into())
            .spawn(move || {
                for (name, map) in todo {
                    let module = map.and_then(|map| Module::load(map, &root, &name, &search));
                    if send.send((name, module)).is_err() {
                        break;
                    }
                }
            });
        // Without the thread, modules load when first needed, as they always could.
        if spawned.is_ok() {
            self.preload = Some(Preload {
                pending: names.into_iter().collect(),
                loaded,
            });
        }
    }

    /// Takes in the modules the preload thread has finished; waits while `wanted` is still
    /// on its way.
    fn take_preloaded(&mut self, wanted: &str) {
        let Some(preload) = &mut self.preload else {
            return;
        };
        loop {
            let waiting = preload.pending.contains(wanted);
            let next = if waiting {
                preload.loaded.recv().ok()
            } else {
                preload.loaded.try_recv().ok()
            };
            let Some((name, module)) = next else {
                if waiting {
                    // The thread is gone (it panicked): load the rest here when needed.
                    preload.pending.clear();
                }
                break;
            };
            preload.pending.remove(&name);
            self.modules.entry(name).or_insert(module);
        }
        if preload.pending.is_empty() {
            self.preload = None;
        }
    }

    /// Also looks for separate debug files (`.build-id/xx/yyyy.debug`, debuglink names) in these
    /// directories, given as paths of this host, before the standard one.
    pub fn with_debug_dirs(mut self, dirs: Vec<PathBuf>) -> Symbolizer {
        self.search.dirs = dirs;
        self
    }

    /// Names JIT frames of process `pid` (as this host sees it) from its perf map,
    /// `/tmp/perf-<pid in its own namespace>.map` under the root, and reads a module that was
    /// replaced on disk since `pid` mapped it through `pid` (see [`Symbolizer::refresh`]).
    /// Call while it is alive.
    pub fn set_jit_pid(&mut self, pid: u32) {
        self.pid = Some(pid);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).unwrap_or("");
        // The process's id in its own namespace (NStgid: `pid` may be one of its threads).
        let ns_pid = field("NStgid:")
            .split_whitespace()
            .last()
            .and_then(|id| id.parse::<u32>().ok())
            .unwrap_or(pid);
        // Real, effective, saved and filesystem uid: whichever wrote the map owns it.
        let uids = field("Uid:").split_whitespace().filter_map(|u| u.parse().ok()).collect();
        let path = self.root.join(format!("tmp/perf-{ns_pid}.map"));
        let mut file = PerfMapFile::new(path, uids);
        file.refresh();
        self.jit.perf_map = Some(file);
    }

    /// Takes in what changed in the process since the last call: JIT code regions from its
    /// memory map, and entries appended to its perf map. Call at each maps refresh and before
    /// each report; a perf map can only be read through the root while the process lives.
    ///
    /// It also notes which file each module path maps; a module whose path names another file
    /// by now (replaced under the running process) is read at once, through the process, while
    /// that is still possible.
    pub fn refresh(&mut self, maps: &ProcMaps) {
        self.jit.add_exec_ranges(maps);
        if let Some(file) = &mut self.jit.perf_map {
            file.refresh();
        }
        for m in maps.mappings() {
            let Some(path) = m.path.as_deref().filter(|p| p.starts_with('/')) else { continue };
            match self.mapped.get_mut(path) {
                Some(file) => *file = m.file(),
                None => {
                    self.mapped.insert(path.to_owned(), m.file());
                }
            }
        }
        if self.pid.is_none() {
            return;
        }
        let replaced: Vec<String> = self
            .mapped
            .iter()
            .filter(|(path, file)| {
                !self.modules.contains_key(*path)
                    && !std::fs::metadata(self.root.join(path.trim_start_matches('/')))
                        .is_ok_and(|meta| file.is(&meta))
            })
            .map(|(path, _)| path.clone())
            .collect();
        for path in replaced {
            let _ = self.module(&path);
        }
    }

    fn module(&mut self, module: &str) -> Option<&mut Module> {
        self.take_preloaded(module);
        if !self.modules.contains_key(module) {
            let loaded = self.load(module);
            self.modules.insert(module.to_owned(), loaded);
        }
        self.modules.get_mut(module)?.as_mut()
    }

    /// Opens the module's file: the one at its path when that is the file the process maps
    /// (or nothing is known of what it maps), else the mapped one through the process. When
    /// the path names another file and the mapped one cannot be had, nothing: frames left
    /// unnamed rather than named from the wrong file.
    fn load(&mut self, module: &str) -> Option<Module> {
        let map = self.open(module)?;
        Module::load(map, &self.root, module, &self.search)
    }

    /// The file behind `load`, opened and mapped (cheap); parsing it is what costs.
    fn open(&mut self, module: &str) -> Option<Mmap> {
        let at_path = Mmap::open_with_meta(&self.root.join(module.trim_start_matches('/')));
        let Some(mapped) = self.mapped.get(module).copied() else {
            return at_path.map(|(map, _)| map);
        };
        let replaced = match at_path {
            Some((map, meta)) if mapped.is(&meta) => return Some(map),
            Some(_) => true,
            // Deleted, or not a file at all (a memfd): nothing wrong to read.
            None => false,
        };
        let through_process = self
            .pid
            .and_then(|pid| Mmap::open_with_meta(&mapped.map_files_path(pid)))
            .filter(|(_, meta)| mapped.is(meta));
        if replaced {
            self.notes.push(format!(
                "{module} on disk is not the file the process maps (replaced since it was \
                 mapped); {}",
                if through_process.is_some() {
                    "its frames are named from the mapped file"
                } else {
                    "the mapped file could not be read (process gone), so its frames are left unnamed"
                }
            ));
        }
        through_process.map(|(map, _)| map)
    }

    /// Things the user should hear about the modules named so far, each once.
    pub fn take_notes(&mut self) -> Vec<String> {
        std::mem::take(&mut self.notes)
    }

    /// Function containing `file_offset` in module `module` (a path as the target sees it; it is
    /// opened as root.join(path without leading '/')), demangled. None when the module cannot be
    /// read or no symbol covers it.
    pub fn function(&mut self, module: &str, file_offset: u64) -> Option<String> {
        let m = self.module(module)?;
        let vaddr = m.table.vaddr(file_offset)?;
        m.table
            .function_at(vaddr)
            .or_else(|| m.debug_table.as_mut()?.function_at(vaddr))
    }

    /// Hex build id of a module, when it has one.
    pub fn build_id(&mut self, module: &str) -> Option<String> {
        self.module(module)?.build_id.as_deref().map(hex)
    }

    /// [`Symbolizer::symbolize_frame`] for an exact code address (not a return address), with
    /// the address unknown beyond the offset.
    pub fn symbolize(&mut self, module: Option<&str>, file_offset: u64) -> Vec<SymFrame> {
        self.symbolize_frame(module, file_offset, file_offset, false)
    }

    /// Everything known of one normalized frame, outermost function last: inlined functions
    /// (when DWARF says so) come first, each with `inlined` set. `address` is the runtime
    /// address (JIT code is named by it); `return_address` is true for every frame but the
    /// leaf, whose call instruction is what should be named.
    pub fn symbolize_frame(
        &mut self,
        module: Option<&str>,
        file_offset: u64,
        address: u64,
        return_address: bool,
    ) -> Vec<SymFrame> {
        let probe = if return_address {
            address.saturating_sub(1)
        } else {
            address
        };
        if let Some(m) = module {
            if let Some(cached) = self.frames.get(m).and_then(|c| c.get(&(file_offset, return_address))) {
                return cached.clone();
            }
            let frames = match self.module(m) {
                Some(loaded) => loaded.frames(file_offset, return_address),
                None => vec![SymFrame::native(None)],
            };
            let named = frames.iter().any(|f| f.function.is_some());
            if !named && let Some(jit) = self.jit_frame(probe) {
                // Code in a file mapping that a JIT wrote (a memfd) and its perf map names.
                return vec![jit];
            }
            if named {
                // Unnamed ones are not kept: a perf map may name them later.
                self.frames
                    .entry(m.to_owned())
                    .or_default()
                    .insert((file_offset, return_address), frames.clone());
            }
            return frames;
        }
        if let Some(jit) = self.jit_frame(probe) {
            return vec![jit];
        }
        if self.jit.in_exec_range(address) {
            self.jit.unnamed += 1;
            return vec![SymFrame {
                function: None,
                file: None,
                line: None,
                inlined: false,
                kind: FrameKind::Jit,
            }];
        }
        vec![SymFrame {
            function: None,
            file: None,
            line: None,
            inlined: false,
            kind: FrameKind::Unknown,
        }]
    }

    fn jit_frame(&self, probe: u64) -> Option<SymFrame> {
        let name = self.jit.perf_map.as_ref()?.map.lookup(probe)?;
        let split = split_jit_name(name);
        Some(SymFrame {
            function: Some(split.function),
            file: split.file,
            line: split.line,
            inlined: false,
            kind: FrameKind::Jit,
        })
    }

    /// Deletes the process's perf map (when the tracer made node write it and node is gone).
    pub fn remove_perf_map(&mut self) {
        if let Some(file) = &mut self.jit.perf_map {
            file.remove();
        }
    }

    /// One line for the user when JIT frames went unnamed because the process has no perf map.
    pub fn jit_hint(&self) -> Option<String> {
        let file = self.jit.perf_map.as_ref()?;
        if self.jit.unnamed == 0 || file.found {
            return None;
        }
        if let Some(why) = &file.refused {
            return Some(format!(
                "{} JIT frames are unnamed ([jit] 0x...): {} was not read: {why}",
                self.jit.unnamed,
                file.path().display()
            ));
        }
        Some(format!(
            "{} JIT frames are unnamed ([jit] 0x...): {} does not exist; for node, start it \
             with --perf-basic-prof-only-functions --interpreted-frames-native-stack \
             (`tracer record -- node ...` adds them)",
            self.jit.unnamed,
            file.path().display()
        ))
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
    /// A JavaScript function, named from V8's own objects in the process's memory (the
    /// frame's code is V8's: JIT code, or the interpreter's builtins running its bytecode).
    Js,
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

impl SymFrame {
    fn native(function: Option<String>) -> SymFrame {
        SymFrame {
            function,
            file: None,
            line: None,
            inlined: false,
            kind: FrameKind::Native,
        }
    }
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
    fn build_from(data: &[u8]) -> Option<SymbolTable> {
        match FileKind::parse(data).ok()? {
            FileKind::Elf32 => build::<elf::FileHeader32<Endianness>>(data),
            FileKind::Elf64 => build::<elf::FileHeader64<Endianness>>(data),
            _ => None,
        }
    }

    /// Demangled name of the function at virtual address `vaddr`.
    fn function_at(&mut self, vaddr: u64) -> Option<String> {
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
            // A segment placed so that the address would pass 2^64 names nothing.
            .and_then(|l| (file_offset - l.offset).checked_add(l.vaddr))
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

#[cfg(test)]
mod tests {
    use super::super::maps::ProcMaps;
    use super::*;
    use object::{Object, ObjectSegment, ObjectSymbol};
    use std::fs::File;
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
        assert!(
            Path::new(NODE).exists(),
            "{NODE} is missing: run `cargo xtask prereqs`"
        );
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
    fn a_module_replaced_on_disk_is_named_only_from_the_mapped_file() {
        use std::os::unix::fs::MetadataExt as _;
        let root = std::env::temp_dir().join(format!("symbolize-replaced-{}", std::process::id()));
        std::fs::create_dir_all(root.join("lib")).unwrap();
        let copy = root.join("lib/libc.so.6");
        std::fs::copy(LIBC, &copy).unwrap();
        let meta = std::fs::metadata(&copy).unwrap();
        let off = file_offset_of(LIBC, "malloc");
        let maps = |inode: u64| {
            ProcMaps::parse(&format!(
                "7f0000000000-7f0000100000 r-xp 00000000 {:x}:{:x} {inode} /lib/libc.so.6\n",
                libc::major(meta.dev()),
                libc::minor(meta.dev())
            ))
            .unwrap()
        };

        // The file at the path is the one mapped: named from it, nothing to say.
        let mut s = Symbolizer::new(&root);
        s.refresh(&maps(meta.ino()));
        assert_eq!(s.function("/lib/libc.so.6", off).as_deref(), Some("malloc"));
        assert!(s.take_notes().is_empty());

        // The process mapped another file there (inode + 1), and there is no process to read
        // that one through: unnamed, not named from the file that replaced it; said once.
        let mut s = Symbolizer::new(&root);
        s.refresh(&maps(meta.ino() + 1));
        let f = s.symbolize_frame(Some("/lib/libc.so.6"), off, 0x7f0000000000 + off, false);
        assert_eq!(f, vec![SymFrame::native(None)]);
        assert_eq!(s.function("/lib/libc.so.6", off), None);
        assert_eq!(
            s.take_notes(),
            ["/lib/libc.so.6 on disk is not the file the process maps (replaced since it was \
              mapped); the mapped file could not be read (process gone), so its frames are left \
              unnamed"]
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn jit_frames_are_named_from_the_perf_map_or_marked_as_jit() {
        let root = std::env::temp_dir().join(format!("symbolize-jit-{}", std::process::id()));
        std::fs::create_dir_all(root.join("tmp")).unwrap();
        let maps = ProcMaps::parse(
            "7f0000000000-7f0000100000 rwxp 00000000 00:00 0\n\
             7f0000200000-7f0000300000 rw-p 00000000 00:00 0\n",
        )
        .unwrap();

        // No perf map: JIT code is marked, unnamed, and the hint says how to get names.
        let mut s = Symbolizer::new(&root);
        s.set_jit_pid(std::process::id());
        s.refresh(&maps);
        let f = s.symbolize_frame(None, 0x10, 0x7f0000000010, true);
        assert_eq!(
            (f[0].kind, f[0].function.as_deref()),
            (FrameKind::Jit, None)
        );
        let hint = s.jit_hint().expect("a hint");
        assert!(
            hint.starts_with("1 JIT frames are unnamed") && hint.contains("perf-"),
            "{hint}"
        );
        // Anonymous memory that is not executable, and unmapped memory, are unknown.
        assert_eq!(
            s.symbolize_frame(None, 0x10, 0x7f0000200010, true)[0].kind,
            FrameKind::Unknown
        );
        assert_eq!(
            s.symbolize_frame(None, 0x1234, 0x1234, true)[0].kind,
            FrameKind::Unknown
        );

        // The perf map appears (the process wrote it later): the next refresh reads it.
        let map = root.join(format!("tmp/perf-{}.map", std::process::id()));
        std::fs::write(&map, "7f0000000000 10 JS:~retain /srv/a.js:3:1\n").unwrap();
        let mut s = Symbolizer::new(&root);
        s.set_jit_pid(std::process::id());
        s.refresh(&maps);
        // A return address just past the entry's end names the call inside it.
        let f = s.symbolize_frame(None, 0x10, 0x7f0000000010, true);
        assert_eq!(
            f,
            vec![SymFrame {
                function: Some("retain".into()),
                file: Some("/srv/a.js".into()),
                line: Some(3),
                inlined: false,
                kind: FrameKind::Jit
            }]
        );
        // As an exact address it is past the entry: JIT code without a name.
        let f = s.symbolize_frame(None, 0x10, 0x7f0000000010, false);
        assert_eq!(
            (f[0].kind, f[0].function.as_deref()),
            (FrameKind::Jit, None)
        );
        assert_eq!(s.jit_hint(), None, "the map exists: no hint");
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// Regression (found by `cargo xtask fuzz`, input in fuzz/corpus/symbolizer): a PT_LOAD
    /// segment whose virtual address is near 2^64 made the offset-to-address translation
    /// overflow (a panic with overflow checks, a wrapped address naming some other function
    /// without).
    #[test]
    fn a_segment_that_would_pass_two_to_the_64_translates_nothing() {
        let t = SymbolTable {
            loads: vec![Load {
                offset: 0,
                filesz: 0x1000,
                vaddr: u64::MAX - 0x10,
            }],
            ..SymbolTable::default()
        };
        assert_eq!(t.vaddr(0x8), Some(u64::MAX - 0x8));
        assert_eq!(t.vaddr(0x100), None);
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
