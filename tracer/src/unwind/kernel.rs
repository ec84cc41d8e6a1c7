//! The BPF walker's tables (tracer-ebpf/src/stack.rs): every module's rows in `UNWIND_ROWS`
//! and its page index in `UNWIND_PAGES`, arrays the tracer maps into its own memory and fills
//! once per module, and the table of executable mappings, written to the half of
//! `UNWIND_MAPPINGS` not in use before the header flips to it, so a walk running meanwhile sees
//! the old table or the new one, whole.
use std::{
    collections::HashMap,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
};

use aya::{
    Ebpf,
    maps::{Array, MapData},
};
use tracer_common::{MAX_UNWIND_MAPPINGS, UnwindHeader, UnwindMapping, UnwindRow};

use super::{ModuleUnwind, Placed, plan_mappings};
use crate::symbolize::maps::ProcMaps;

/// Rows beyond what the modules mapped at attach need, for libraries loaded later.
const HEADROOM_ROWS: u32 = 256 * 1024;
/// At most this many rows (8 bytes each): 24 MiB.
const MAX_ROWS: u32 = 3 * 1024 * 1024;
/// Page index entries beyond the modules mapped at attach (4 bytes each, one per 4 KiB of code).
const HEADROOM_PAGES: u32 = 64 * 1024;
const MAX_PAGES: u32 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TablesError {
    #[error("BPF map {0} missing")]
    Missing(&'static str),
    #[error("BPF map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("map {0} into memory")]
    Mmap(&'static str, #[source] std::io::Error),
}

/// One of the walker's arrays as the tracer fills it: staged in a Vec until the array
/// exists, then written straight into its memory.
struct Filled<T: Copy> {
    name: &'static str,
    staged: Vec<T>,
    used: u32,
    capacity: u32,
    memory: Option<ArrayMemory<T>>,
}

impl<T: Copy> Filled<T> {
    fn new(name: &'static str) -> Self {
        Filled { name, staged: Vec::new(), used: 0, capacity: 0, memory: None }
    }

    fn wanted(&self, headroom: u32, max: u32) -> u32 {
        self.used.saturating_add(self.used / 2).saturating_add(headroom).min(max).max(1)
    }

    /// Places `items`, returning their first index; None when the array is full.
    fn place(&mut self, items: &[T]) -> Option<u32> {
        let n = u32::try_from(items.len()).ok()?;
        match &mut self.memory {
            None => self.staged.extend_from_slice(items),
            Some(memory) if self.used.checked_add(n)? <= self.capacity => memory.write(self.used, items),
            Some(_) => return None,
        }
        let first = self.used;
        self.used += n;
        Some(first)
    }

    fn install(&mut self, ebpf: &Ebpf) -> Result<(), TablesError> {
        let name = self.name;
        let (fd, capacity) = match ebpf.map(name).ok_or(TablesError::Missing(name))? {
            aya::maps::Map::Array(data) => {
                let fd = data.fd().as_fd().try_clone_to_owned().map_err(|e| TablesError::Mmap(name, e))?;
                let info = data.info().map_err(|source| TablesError::Map { name, source })?;
                (fd, info.max_entries())
            }
            _ => return Err(TablesError::Missing(name)),
        };
        let mut memory = ArrayMemory::map(fd.as_fd(), capacity).map_err(|e| TablesError::Mmap(name, e))?;
        self.capacity = capacity;
        // Staged items fit: the capacity was sized from them.
        let staged = std::mem::take(&mut self.staged);
        memory.write(0, &staged[..staged.len().min(capacity as usize)]);
        self.memory = Some(memory);
        Ok(())
    }
}

/// The tables of one traced process, as user space keeps them.
pub struct KernelTables {
    pid: u32,
    /// (dev, inode) -> where the module's rows and pages lie (rows_len 0: none, as for a
    /// module without CFI or one that found no room), and its segments (to place each
    /// mapping of it); None: a file without usable CFI. The rows themselves live in the
    /// kernel's arrays only.
    placed: HashMap<(u64, u64), Option<(Placed, ModuleUnwind)>>,
    rows: Filled<UnwindRow>,
    /// Page index entries, one u64 each (an array's values are 8 bytes apart).
    pages: Filled<u64>,
    active: u32,
    /// Modules whose rows did not fit (walked by frame pointer), not said yet.
    full: Vec<String>,
    /// Executable mappings beyond the table's size, at the last refresh, and whether that
    /// was said.
    mappings_dropped: usize,
    dropped_said: bool,
    /// (dev, inode) of the binary with V8's embedded builtins, whose mappings the walker
    /// is told of (`mapping_flag::V8_BINARY`).
    v8_binary: Option<(u64, u64)>,
}

/// A BPF array, mapped shared into this process.
struct ArrayMemory<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: the memory is the kernel's array, written only by the thread that owns the tables.
unsafe impl<T> Send for ArrayMemory<T> {}

impl<T> Drop for ArrayMemory<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `ArrayMemory::map`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

impl<T: Copy> ArrayMemory<T> {
    fn map(fd: BorrowedFd<'_>, entries: u32) -> std::io::Result<ArrayMemory<T>> {
        // A BPF array lays its values out 8 bytes apart at least: only 8-byte multiples are
        // contiguous in its memory.
        assert!(std::mem::size_of::<T>().is_multiple_of(8), "array values of 8 bytes or a multiple");
        let bytes = entries as usize * std::mem::size_of::<T>();
        let len = bytes.div_ceil(4096) * 4096;
        // SAFETY: a fresh shared mapping of an mmapable BPF array; checked below.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd.as_raw_fd(), 0)
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(ArrayMemory { ptr: ptr.cast(), len })
    }

    fn write(&mut self, at: u32, items: &[T]) {
        let at = at as usize;
        assert!((at + items.len()) * std::mem::size_of::<T>() <= self.len);
        // SAFETY: within the mapping (checked above); no walk reads these entries until a
        // mapping table that points at them is published, after this copy.
        unsafe { std::ptr::copy_nonoverlapping(items.as_ptr(), self.ptr.add(at), items.len()) };
    }
}

impl KernelTables {
    /// Rows for every module `maps` shows (built now, before the programs load, so that the
    /// arrays can be sized).
    pub fn new(pid: u32, maps: &ProcMaps) -> KernelTables {
        let mut t = KernelTables {
            pid,
            placed: HashMap::new(),
            rows: Filled::new("UNWIND_ROWS"),
            pages: Filled::new("UNWIND_PAGES"),
            active: 0,
            full: Vec::new(),
            mappings_dropped: 0,
            dropped_said: false,
            v8_binary: None,
        };
        t.plan(maps);
        t
    }

    /// What the tables could not hold since last asked, one line each: modules whose rows
    /// found no room, and (once) executable mappings beyond the table's size.
    pub fn take_losses(&mut self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .full
            .drain(..)
            .map(|m| format!("no room for the unwind rows of {m}: its frames are walked by frame pointer"))
            .collect();
        if self.mappings_dropped > 0 && !self.dropped_said {
            self.dropped_said = true;
            lines.push(format!(
                "{} executable mappings beyond the stack walker's table of {MAX_UNWIND_MAPPINGS}: walks through them are handed to user space",
                self.mappings_dropped
            ));
        }
        lines
    }

    /// Flags the mappings of the file `(dev, inode)` as holding V8's builtins, from the next
    /// refresh (install included) on.
    pub fn set_v8_binary(&mut self, file: (u64, u64)) {
        self.v8_binary = Some(file);
    }

    /// How many rows `UNWIND_ROWS` should hold.
    pub fn capacity_wanted(&self) -> u32 {
        self.rows.wanted(HEADROOM_ROWS, MAX_ROWS)
    }

    /// How many entries `UNWIND_PAGES` should hold.
    pub fn pages_wanted(&self) -> u32 {
        self.pages.wanted(HEADROOM_PAGES, MAX_PAGES)
    }

    /// Maps the arrays of the loaded programs, writes what was built so far and publishes the
    /// mapping table.
    pub fn install(&mut self, ebpf: &mut Ebpf, maps: &ProcMaps) -> Result<(), TablesError> {
        self.rows.install(ebpf)?;
        self.pages.install(ebpf)?;
        self.refresh(ebpf, maps)
    }

    /// Loads the rows of modules new in `maps` and publishes its mapping table.
    pub fn refresh(&mut self, ebpf: &mut Ebpf, maps: &ProcMaps) -> Result<(), TablesError> {
        let mut table = self.plan(maps);
        self.mappings_dropped = table.len().saturating_sub(MAX_UNWIND_MAPPINGS as usize);
        table.truncate(MAX_UNWIND_MAPPINGS as usize);
        let next = self.active ^ 1;
        {
            let map = ebpf.map_mut("UNWIND_MAPPINGS").ok_or(TablesError::Missing("UNWIND_MAPPINGS"))?;
            let mut array: Array<&mut MapData, UnwindMapping> =
                Array::try_from(map).map_err(|source| TablesError::Map { name: "UNWIND_MAPPINGS", source })?;
            for (i, m) in table.iter().enumerate() {
                array
                    .set(next * MAX_UNWIND_MAPPINGS + i as u32, m, 0)
                    .map_err(|source| TablesError::Map { name: "UNWIND_MAPPINGS", source })?;
            }
        }
        let map = ebpf.map_mut("UNWIND_HEADER").ok_or(TablesError::Missing("UNWIND_HEADER"))?;
        let mut header: Array<&mut MapData, UnwindHeader> =
            Array::try_from(map).map_err(|source| TablesError::Map { name: "UNWIND_HEADER", source })?;
        let mut h = header.get(&0, 0).map_err(|source| TablesError::Map { name: "UNWIND_HEADER", source })?;
        h.len[next as usize] = table.len() as u32;
        h.active = next;
        // One update, seen by a walk whole or not at all.
        header.set(0, h, 0).map_err(|source| TablesError::Map { name: "UNWIND_HEADER", source })?;
        self.active = next;
        Ok(())
    }

    /// The mapping table for `maps`, placing the rows and pages of modules not yet placed.
    fn plan(&mut self, maps: &ProcMaps) -> Vec<UnwindMapping> {
        let (pid, v8_binary) = (self.pid, self.v8_binary);
        let (placed, rows, pages, full) = (&mut self.placed, &mut self.rows, &mut self.pages, &mut self.full);
        plan_mappings(maps, |m| {
            let path = m.path.as_deref()?;
            let (p, module) = placed
                .entry((m.dev, m.inode))
                .or_insert_with(|| {
                    let map = super::process::read_module(pid, m)?;
                    let mut module = ModuleUnwind::from_elf(map.as_slice()).ok()?;
                    let rows_first = match rows.place(&module.rows) {
                        Some(first) => first,
                        None => {
                            full.push(path.to_owned());
                            return Some((Placed::default(), module.without_rows()));
                        }
                    };
                    // Without room for its page index a module's rows are searched whole.
                    let wide: Vec<u64> = module.pages.iter().map(|&p| p as u64).collect();
                    let (pages_first, pages_len) = match pages.place(&wide) {
                        Some(first) => (first, module.pages.len() as u32),
                        None => (0, 0),
                    };
                    let p = Placed {
                        rows_first,
                        rows_len: module.rows.len() as u32,
                        bias: 0,
                        page_base: module.page_base,
                        pages_first,
                        pages_len,
                        flags: 0,
                    };
                    module = module.without_rows();
                    Some((p, module))
                })
                .as_ref()?;
            let bias = module.bias(m.start, m.offset)?;
            let flags = if v8_binary == Some((m.dev, m.inode)) { tracer_common::mapping_flag::V8_BINARY } else { 0 };
            (p.rows_len != 0 || flags != 0).then_some(Placed { bias, flags, ..*p })
        })
    }
}
