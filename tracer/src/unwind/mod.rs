//! Stack unwinding from CFI (issue 11): rows built in user space from each module's
//! `.eh_frame`, the table of executable mappings that says which rows serve which addresses,
//! and the walk itself in plain Rust (the ptrace backend's, and the model of the BPF walker in
//! tracer-ebpf/src/stack.rs). Nothing here touches the kernel.
pub mod kernel;
pub mod process;
pub mod rows;

use std::collections::HashMap;

use object::{Object as _, ObjectSegment as _};
use tracer_common::{UnwindMapping, UnwindRow, row_kind, sigframe};

use crate::symbolize::maps::{Mapping, ProcMaps};

/// How stacks are walked (`--unwind`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnwindMode {
    /// Frame pointers only (the kernel's `bpf_get_stack`), the allocator's caller read at the probe.
    Fp,
    /// Unwind rows only: a frame in code without rows ends the stack.
    Dwarf,
    /// Rows where a module has them, frame pointers elsewhere.
    #[default]
    Auto,
}

impl UnwindMode {
    pub fn bpf_value(self) -> u64 {
        match self {
            UnwindMode::Fp => tracer_common::unwind_mode::FP,
            UnwindMode::Dwarf => tracer_common::unwind_mode::DWARF,
            UnwindMode::Auto => tracer_common::unwind_mode::AUTO,
        }
    }
}

/// A module's rows, its page index (see [`UnwindMapping`]) and the file-offset-to-address
/// relation of its loadable segments.
#[derive(Clone, Debug, Default)]
pub struct ModuleUnwind {
    pub rows: Vec<UnwindRow>,
    pub page_base: u64,
    pub pages: Vec<u32>,
    /// (file offset, ELF address, size in the file) of each PT_LOAD segment.
    loads: Vec<(u64, u64, u64)>,
}

impl ModuleUnwind {
    pub fn from_elf(data: &[u8]) -> Result<ModuleUnwind, rows::RowsError> {
        let file = object::File::parse(data).map_err(rows::RowsError::Elf)?;
        let loads = file
            .segments()
            .map(|s| {
                let (offset, size) = s.file_range();
                (offset, s.address(), size)
            })
            .collect();
        let rows = rows::rows_from_elf(data)?;
        let (page_base, pages) = page_index(&rows);
        Ok(ModuleUnwind { rows, page_base, pages, loads })
    }

    /// The module with its rows and page index dropped (once they are in the kernel's
    /// arrays), its segments kept.
    pub fn without_rows(&self) -> ModuleUnwind {
        ModuleUnwind { rows: Vec::new(), page_base: self.page_base, pages: Vec::new(), loads: self.loads.clone() }
    }

    /// pc - bias is the ELF address, for a mapping of this file at `start` from file offset
    /// `offset`.
    ///
    /// A segment is mapped from its offset rounded down to a page, so a mapping's offset may
    /// lie before its segment's, on a page it shares with the end of the segment before (lld
    /// lays binaries out so: a Rust binary's code follows its read-only data on one page of
    /// the file, and its text mapping starts at the page's offset). The segment that starts
    /// on that page is the mapping's; one that merely covers it is an earlier segment's tail,
    /// whose addresses differ by a page or more.
    pub fn bias(&self, start: u64, offset: u64) -> Option<u64> {
        const PAGE: u64 = 4096;
        let first_page = |o: u64| o / PAGE * PAGE;
        let &(seg_off, vaddr, _) = self
            .loads
            .iter()
            .find(|&&(o, _, _)| first_page(o) == offset)
            .or_else(|| {
                self.loads
                    .iter()
                    .find(|&&(o, _, size)| offset >= first_page(o) && offset < o + size.max(1))
            })?;
        Some(start.wrapping_sub(vaddr.wrapping_add(offset).wrapping_sub(seg_off)))
    }
}

/// The page index of sorted `rows`: the first page's ELF address, and for each page the
/// index of the last row starting at or below the page's start (0 before the first row).
pub fn page_index(rows: &[UnwindRow]) -> (u64, Vec<u32>) {
    let (Some(first), Some(last)) = (rows.first(), rows.last()) else { return (0, Vec::new()) };
    let shift = tracer_common::UNWIND_PAGE_SHIFT;
    let base = (first.pc as u64 >> shift) << shift;
    let count = ((last.pc as u64 - base) >> shift) + 1;
    let mut pages = Vec::with_capacity(count as usize);
    let mut i = 0usize;
    for p in 0..count {
        let page_start = base + (p << shift);
        while i + 1 < rows.len() && rows[i + 1].pc as u64 <= page_start {
            i += 1;
        }
        pages.push(i as u32);
    }
    (base, pages)
}

/// Where a module's rows and page index lie in the kernel's arrays, for one mapping of it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Placed {
    pub rows_first: u32,
    pub rows_len: u32,
    pub bias: u64,
    pub page_base: u64,
    pub pages_first: u32,
    pub pages_len: u32,
    /// `tracer_common::mapping_flag` bits for the mapping.
    pub flags: u64,
}

/// The mappings a walk may find a return address in, sorted: each executable file mapping
/// (with its module's rows, if it has any), and each run of adjacent anonymous mappings that
/// holds executable code (JIT code spaces: their pages turn executable after any reading of
/// the maps file, so the whole reservation counts).
///
/// `rows_of(mapping)` says where the rows of a file mapping's module are, if they are loaded.
pub fn plan_mappings(maps: &ProcMaps, mut rows_of: impl FnMut(&Mapping) -> Option<Placed>) -> Vec<UnwindMapping> {
    let mut out: Vec<UnwindMapping> = Vec::new();
    let all = maps.mappings();
    let mut i = 0;
    while i < all.len() {
        let m = &all[i];
        let anonymous = m.path.is_none();
        if anonymous {
            // A run of adjacent anonymous mappings.
            let mut j = i;
            let mut exec = false;
            while j < all.len() && all[j].path.is_none() && (j == i || all[j].start == all[j - 1].end) {
                exec |= all[j].perms.as_bytes().get(2) == Some(&b'x');
                j += 1;
            }
            if exec {
                out.push(UnwindMapping {
                    start: m.start,
                    end: all[j - 1].end,
                    flags: tracer_common::mapping_flag::ANON_CODE,
                    ..UnwindMapping::default()
                });
            }
            i = j;
            continue;
        }
        // The kernel's uprobe trampolines: a return address there stands for another one.
        if m.perms.as_bytes().get(2) == Some(&b'x') && m.path.as_deref() != Some("[uprobes]") {
            let p = rows_of(m).unwrap_or_default();
            out.push(UnwindMapping {
                start: m.start,
                end: m.end,
                bias: p.bias,
                page_base: p.page_base,
                rows_first: p.rows_first,
                rows_len: p.rows_len,
                pages_first: p.pages_first,
                pages_len: p.pages_len,
                flags: p.flags,
            });
        }
        i += 1;
    }
    out
}

/// Registers at the start of a walk.
#[derive(Clone, Copy, Debug)]
pub struct Regs {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
}

/// Why a walk ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The outermost frame (undefined return address, or 0).
    End,
    NoRows,
    BadFrame,
    OutsideMappings,
    Unsupported,
    DepthCap,
}

/// One walked frame: its pc, and its stack and frame pointers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    pub pc: u64,
    pub sp: u64,
    pub bp: u64,
}

/// The table a user-space walk reads: sorted mappings and the rows they point into.
pub struct Table<'a> {
    pub mappings: &'a [UnwindMapping],
    pub rows: &'a [UnwindRow],
}

impl Table<'_> {
    fn mapping(&self, pc: u64) -> Option<&UnwindMapping> {
        let i = self.mappings.partition_point(|m| m.start <= pc);
        let m = self.mappings.get(i.checked_sub(1)?)?;
        (pc < m.end).then_some(m)
    }

    /// The row for `pc` in mapping `m`: Some(None) when the module has rows but none covers pc.
    fn row(&self, m: &UnwindMapping, pc: u64) -> Option<Option<UnwindRow>> {
        if m.rows_len == 0 {
            return None;
        }
        let first = m.rows_first as usize;
        let rows = self.rows.get(first..first + m.rows_len as usize)?;
        Some(rows::lookup(rows, pc.wrapping_sub(m.bias)))
    }
}

/// Walks a stack as the BPF walker does: rows where a module has them, frame pointers where
/// it has none (unless `mode` is [`UnwindMode::Dwarf`]). `read(addr)` reads a word of the
/// target's memory.
pub fn walk(regs: Regs, table: &Table<'_>, mode: UnwindMode, max: usize, read: impl Fn(u64) -> Option<u64>) -> (Vec<Frame>, Stop) {
    walk_from(regs, true, table, mode, max, read)
}

/// [`walk`] from a frame whose pc is `exact`, or a return address (the rest of a walk the
/// kernel began).
pub fn walk_from(
    regs: Regs,
    exact: bool,
    table: &Table<'_>,
    mode: UnwindMode,
    max: usize,
    read: impl Fn(u64) -> Option<u64>,
) -> (Vec<Frame>, Stop) {
    let mut frames = Vec::new();
    let (mut pc, mut sp, mut bp) = (regs.ip, regs.sp, regs.bp);
    // The first frame's pc and the pc of a frame a signal interrupted are exact; the others are
    // return addresses, which may lie past the end of their call's function.
    let mut exact = exact;
    loop {
        let lookup_pc = if exact { pc } else { pc - 1 };
        // Code in no known mapping has no frame pointer rule either: only a mapping known to
        // hold code without rows is walked by frame pointer. The first frame of a walk that
        // starts at a probe is kept whatever it is (its pc is where the probe fired); one that
        // starts at a return address (the rest of a walk the kernel began) must be code.
        let mapping = table.mapping(lookup_pc);
        if mapping.is_some() || (frames.is_empty() && exact) {
            frames.push(Frame { pc, sp, bp });
        }
        let Some(mapping) = mapping else {
            return (frames, Stop::OutsideMappings);
        };
        if frames.len() >= max {
            return (frames, Stop::DepthCap);
        }
        // Frame pointers only: the rows are not looked at.
        let row = if mode == UnwindMode::Fp { None } else { table.row(mapping, lookup_pc) };
        let (cfa, ra, next_bp, next_exact) = match row {
            Some(Some(r)) => match r.kind {
                row_kind::END => return (frames, Stop::End),
                row_kind::CFA_RSP | row_kind::CFA_RBP | row_kind::PLT => {
                    let base = if r.kind == row_kind::CFA_RBP { bp } else { sp };
                    let mut cfa = base.wrapping_add(r.cfa_off as i64 as u64);
                    if r.kind == row_kind::PLT && (pc & 15) >= r.rbp as u64 {
                        cfa += 8;
                    }
                    let Some(ra) = read(cfa - 8) else { return (frames, Stop::BadFrame) };
                    let next_bp = if r.kind != row_kind::PLT && r.rbp != 0 {
                        match read(cfa.wrapping_add((r.rbp as i64 * 8) as u64)) {
                            Some(v) => v,
                            None => return (frames, Stop::BadFrame),
                        }
                    } else {
                        bp
                    };
                    (cfa, ra, next_bp, false)
                }
                row_kind::SIGNAL => {
                    let (Some(ip), Some(nsp), Some(nbp)) =
                        (read(sp + sigframe::RIP), read(sp + sigframe::RSP), read(sp + sigframe::RBP))
                    else {
                        return (frames, Stop::BadFrame);
                    };
                    (nsp, ip, nbp, true)
                }
                _ => return (frames, Stop::Unsupported),
            },
            Some(None) | None if mode == UnwindMode::Dwarf => return (frames, Stop::NoRows),
            _ => {
                // Frame pointer: the caller's rbp at rbp, the return address above it.
                if bp == 0 {
                    return (frames, Stop::End);
                }
                let (Some(saved), Some(ra)) = (read(bp), read(bp + 8)) else {
                    return (frames, Stop::BadFrame);
                };
                (bp + 16, ra, saved, false)
            }
        };
        if ra == 0 {
            return (frames, Stop::End);
        }
        if cfa <= sp && !next_exact {
            return (frames, Stop::BadFrame);
        }
        // Whether the caller's code is known is the next step's first question.
        (pc, sp, bp, exact) = (ra, cfa, next_bp, next_exact);
    }
}

/// Rows of the modules a process maps, built once per file.
#[derive(Default)]
pub struct ModuleCache {
    by_file: HashMap<(u64, u64), Option<std::sync::Arc<ModuleUnwind>>>,
}

impl ModuleCache {
    /// The rows of the file `m` maps, from its bytes as `open` maps them.
    pub(crate) fn get(&mut self, m: &Mapping, open: impl FnOnce() -> Option<crate::symbolize::mmap::Mmap>) -> Option<std::sync::Arc<ModuleUnwind>> {
        self.by_file
            .entry((m.dev, m.inode))
            .or_insert_with(|| {
                let map = open()?;
                ModuleUnwind::from_elf(map.as_slice()).ok().map(std::sync::Arc::new)
            })
            .clone()
    }
}

#[cfg(test)]
mod tests;
