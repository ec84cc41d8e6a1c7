//! The BPF walker's tables (tracer-ebpf/src/stack.rs): every module's rows in `UNWIND_ROWS`,
//! an array the tracer maps into its own memory and fills once per module, and the table of
//! executable mappings, written to the half of `UNWIND_MAPPINGS` not in use before the
//! header flips to it, so a walk running meanwhile sees the old table or the new one, whole.
use std::{
    collections::HashMap,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
};

use aya::{
    Ebpf,
    maps::{Array, MapData},
};
use tracer_common::{MAX_UNWIND_MAPPINGS, UnwindHeader, UnwindMapping, UnwindRow};

use super::{ModuleCache, plan_mappings};
use crate::symbolize::maps::ProcMaps;

/// Rows beyond what the modules mapped at attach need, for libraries loaded later.
const HEADROOM_ROWS: u32 = 256 * 1024;
/// At most this many rows (8 bytes each): 24 MiB.
const MAX_ROWS: u32 = 3 * 1024 * 1024;

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
    #[error("map the unwind rows into memory")]
    Mmap(#[source] std::io::Error),
}

/// The tables of one traced process, as user space keeps them.
pub struct KernelTables {
    pid: u32,
    cache: ModuleCache,
    /// (dev, inode) -> (first row, row count) in the rows array; count 0: none (no CFI, or
    /// no room left).
    placed: HashMap<(u64, u64), (u32, u32)>,
    /// Rows of modules seen before the array existed, in placement order.
    staged: Vec<UnwindRow>,
    used: u32,
    capacity: u32,
    rows: Option<RowsMemory>,
    active: u32,
    /// Modules whose rows did not fit (walked by frame pointer), said once each.
    pub full: Vec<String>,
    /// Executable mappings beyond the table's size, at the last refresh.
    pub mappings_dropped: usize,
}

/// `UNWIND_ROWS`, mapped shared into this process.
struct RowsMemory {
    ptr: *mut UnwindRow,
    len: usize,
}

// SAFETY: the memory is the kernel's array, written only by the thread that owns the tables.
unsafe impl Send for RowsMemory {}

impl Drop for RowsMemory {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `RowsMemory::map`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

impl RowsMemory {
    fn map(fd: BorrowedFd<'_>, entries: u32) -> std::io::Result<RowsMemory> {
        let bytes = entries as usize * std::mem::size_of::<UnwindRow>();
        let len = bytes.div_ceil(4096) * 4096;
        // SAFETY: a fresh shared mapping of an mmapable BPF array; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(RowsMemory { ptr: ptr.cast(), len })
    }

    fn write(&mut self, at: u32, rows: &[UnwindRow]) {
        let at = at as usize;
        assert!((at + rows.len()) * std::mem::size_of::<UnwindRow>() <= self.len);
        // SAFETY: within the mapping (checked above); no walk reads these rows until a
        // mapping table that points at them is published, after this copy.
        unsafe { std::ptr::copy_nonoverlapping(rows.as_ptr(), self.ptr.add(at), rows.len()) };
    }
}

impl KernelTables {
    /// Rows for every module `maps` shows (built now, before the programs load, so that the
    /// rows array can be sized).
    pub fn new(pid: u32, maps: &ProcMaps) -> KernelTables {
        let mut t = KernelTables {
            pid,
            cache: ModuleCache::default(),
            placed: HashMap::new(),
            staged: Vec::new(),
            used: 0,
            capacity: 0,
            rows: None,
            active: 0,
            full: Vec::new(),
            mappings_dropped: 0,
        };
        t.plan(maps);
        t
    }

    /// How many rows `UNWIND_ROWS` should hold.
    pub fn capacity_wanted(&self) -> u32 {
        self.used.saturating_add(self.used / 2).saturating_add(HEADROOM_ROWS).min(MAX_ROWS)
    }

    /// Maps the rows array of the loaded programs, writes the rows built so far and
    /// publishes the mapping table.
    pub fn install(&mut self, ebpf: &mut Ebpf, maps: &ProcMaps) -> Result<(), TablesError> {
        let (fd, capacity) = match ebpf.map("UNWIND_ROWS").ok_or(TablesError::Missing("UNWIND_ROWS"))? {
            aya::maps::Map::Array(data) => {
                let fd = data.fd().as_fd().try_clone_to_owned().map_err(TablesError::Mmap)?;
                let info = data.info().map_err(|source| TablesError::Map { name: "UNWIND_ROWS", source })?;
                (fd, info.max_entries())
            }
            _ => return Err(TablesError::Missing("UNWIND_ROWS")),
        };
        let mut memory = RowsMemory::map(fd.as_fd(), capacity).map_err(TablesError::Mmap)?;
        self.capacity = capacity;
        // Staged rows fit: the capacity was sized from them.
        let staged = std::mem::take(&mut self.staged);
        let fit = staged.len().min(capacity as usize);
        memory.write(0, &staged[..fit]);
        self.rows = Some(memory);
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

    /// The mapping table for `maps`, placing the rows of modules not yet placed (in the rows
    /// array once it exists, staged before).
    fn plan(&mut self, maps: &ProcMaps) -> Vec<UnwindMapping> {
        let pid = self.pid;
        let (cache, placed, staged, used, capacity, rows, full) = (
            &mut self.cache,
            &mut self.placed,
            &mut self.staged,
            &mut self.used,
            self.capacity,
            &mut self.rows,
            &mut self.full,
        );
        plan_mappings(maps, |m| {
            let path = m.path.as_deref()?;
            let module = cache.get(m, || super::process::read_module(pid, m))?;
            let bias = module.bias(m.start, m.offset)?;
            let &mut (first, len) = placed.entry((m.dev, m.inode)).or_insert_with(|| {
                let n = module.rows.len() as u32;
                match rows {
                    None => {
                        staged.extend_from_slice(&module.rows);
                    }
                    Some(memory) if used.saturating_add(n) <= capacity => memory.write(*used, &module.rows),
                    Some(_) => {
                        full.push(path.to_owned());
                        return (0, 0);
                    }
                }
                let first = *used;
                *used += n;
                (first, n)
            });
            (len != 0).then_some((first, len, bias))
        })
    }
}
