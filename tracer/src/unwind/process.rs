//! One process's unwind table in user space (the ptrace backend's): rows of every module it
//! maps, loaded once per file, and its executable mappings, read again when a walk meets an
//! address the last reading did not know (a library dlopen'ed since).
use std::{collections::HashMap, time::{Duration, Instant}};

use tracer_common::{UnwindMapping, UnwindRow};

use super::{ModuleCache, Regs, Stop, Table, UnwindMode, plan_mappings, walk_from};
use crate::symbolize::maps::ProcMaps;

/// Code without rows re-reads the maps at most this often.
const REFRESH_EVERY: Duration = Duration::from_millis(100);

pub struct ProcessTables {
    pid: u32,
    cache: ModuleCache,
    rows: Vec<UnwindRow>,
    /// (dev, inode) -> (first row, row count) in `rows`.
    placed: HashMap<(u64, u64), (u32, u32)>,
    mappings: Vec<UnwindMapping>,
    last_read: Option<Instant>,
    pub mode: UnwindMode,
}

impl ProcessTables {
    pub fn new(pid: u32, mode: UnwindMode) -> ProcessTables {
        let mut t = ProcessTables::from_maps(pid, mode, &ProcMaps::default());
        t.refresh();
        t
    }

    /// Tables of `maps`, a reading made elsewhere (the process may be gone since).
    pub fn from_maps(pid: u32, mode: UnwindMode, maps: &ProcMaps) -> ProcessTables {
        let mut t = ProcessTables {
            pid,
            cache: ModuleCache::default(),
            rows: Vec::new(),
            placed: HashMap::new(),
            mappings: Vec::new(),
            last_read: Some(Instant::now()),
            mode,
        };
        t.refresh_from(maps);
        t
    }

    /// Reads the process's maps again and loads the rows of modules new to it.
    pub fn refresh(&mut self) {
        self.last_read = Some(Instant::now());
        let Ok(maps) = ProcMaps::read(self.pid) else { return };
        self.refresh_from(&maps);
    }

    /// Takes `maps` as the process's mappings (a reading made elsewhere, or at its exit).
    pub fn refresh_from(&mut self, maps: &ProcMaps) {
        let pid = self.pid;
        let (cache, rows, placed) = (&mut self.cache, &mut self.rows, &mut self.placed);
        self.mappings = plan_mappings(maps, |m| {
            m.path.as_deref()?;
            let module = cache.get(m, || read_module(pid, m))?;
            let bias = module.bias(m.start, m.offset)?;
            let &mut (first, len) = placed.entry((m.dev, m.inode)).or_insert_with(|| {
                let first = rows.len() as u32;
                rows.extend_from_slice(&module.rows);
                (first, module.rows.len() as u32)
            });
            Some(super::Placed { rows_first: first, rows_len: len, bias, ..Default::default() })
        });
    }

    pub fn table(&self) -> Table<'_> {
        Table { mappings: &self.mappings, rows: &self.rows }
    }

    /// The stack's pcs from `regs`, leaf first; the maps are read again once when the walk
    /// meets an address they did not know.
    pub fn pcs(&mut self, regs: Regs, max: usize, read: impl Fn(u64) -> Option<u64>) -> (Vec<u64>, Stop) {
        self.pcs_from(regs, true, max, read)
    }

    /// [`Self::pcs`] from a frame whose pc is a return address unless `exact`.
    pub fn pcs_from(&mut self, regs: Regs, exact: bool, max: usize, read: impl Fn(u64) -> Option<u64>) -> (Vec<u64>, Stop) {
        let (frames, stop) = walk_from(regs, exact, &self.table(), self.mode, max, &read);
        // A return address in no mapping may be in a library mapped since (dlopen, whose code
        // can allocate microseconds after it is mapped): the maps are read again at once.
        // Code without rows is read again only now and then.
        let stale = self.last_read.is_none_or(|t| t.elapsed() >= REFRESH_EVERY);
        let (frames, stop) = if stop == Stop::OutsideMappings || (stop == Stop::NoRows && stale) {
            self.refresh();
            walk_from(regs, exact, &self.table(), self.mode, max, &read)
        } else {
            (frames, stop)
        };
        (frames.iter().map(|f| f.pc).collect(), stop)
    }
}

/// The file `m` maps, mapped into this process, as the process sees it (through its root, or
/// the mapping itself when the path no longer leads to it). Mapped rather than read: only the
/// pages the CFI reader touches come in (node's binary is 98 MB, its `.eh_frame` a few).
pub(crate) fn read_module(pid: u32, m: &crate::symbolize::maps::Mapping) -> Option<crate::symbolize::mmap::Mmap> {
    use crate::symbolize::mmap::Mmap;
    use std::os::unix::fs::MetadataExt as _;
    let path = m.path.as_deref()?;
    let same = |(map, meta): (Mmap, std::fs::Metadata)| (meta.ino() == m.inode).then_some(map);
    Mmap::open_with_meta(std::path::Path::new(&format!("/proc/{pid}/root{path}")))
        .and_then(same)
        .or_else(|| Mmap::open(&m.file().map_files_path(pid)))
        // A process gone (its walks finished after its exit) has no /proc entry: the file as
        // this process sees it, if it is the same one.
        .or_else(|| Mmap::open_with_meta(std::path::Path::new(path)).and_then(same))
}
