//! Address-range bookkeeping for the mmap family: which stack mapped each range of the
//! target's address space, and whether the range is committed (accessible, not given back)
//! or only reserved. Fed the syscalls in the order they completed, and munmap and mremap
//! also in the order they started: the range they free is taken out then, before another
//! thread's mmap can be given it and return first.
use std::collections::{BTreeMap, HashMap};

use tracer_common::{SyscallEvent, phase, sys};

use crate::symbolize::maps::ProcMaps;

const PAGE: u64 = 4096;
const PROT_NONE: u64 = 0;
const MAP_ANONYMOUS: u64 = 0x20;
const MAP_NORESERVE: u64 = 0x4000;
const MREMAP_DONTUNMAP: u64 = 4;
const MADV_DONTNEED: u64 = 4;
const MADV_FREE: u64 = 8;
const MADV_REMOVE: u64 = 9;

/// What made a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Origin {
    /// Mapped before recording started: no stack.
    BeforeAttach,
    /// mmap or mremap.
    Mmap,
    /// Growth of the program break.
    Brk,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    pub end: u64,
    /// Stack hash of the syscall that made it (0 before attach or when lost).
    pub stack: u64,
    pub origin: Origin,
    /// Accessible and not released with madvise since; otherwise only reserved.
    pub committed: bool,
    /// Made by glibc inside a malloc-family call: the allocator's own memory.
    pub for_malloc: bool,
    pub file_backed: bool,
}

/// Per-stack view of the ranges a stack made that are still mapped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StackRanges {
    pub committed_bytes: u64,
    pub reserved_bytes: u64,
    pub regions: u64,
    /// Everything this stack ever mapped while recording, and how many times.
    pub mapped_bytes: u64,
    pub maps: u64,
}

#[derive(Clone, Debug, Default)]
pub struct Regions {
    ranges: BTreeMap<u64, Region>,
    brk: Option<u64>,
    /// Cumulative mapped bytes and calls per (stack, origin, made for malloc).
    mapped: HashMap<(u64, Origin, bool), (u64, u64)>,
    /// Per thread: the ranges its munmap or mremap (the syscall number) took out at entry,
    /// put back if the call fails.
    unmapping: HashMap<u32, (u32, Vec<(u64, Region)>)>,
    /// Calls that failed, or that we could not make sense of.
    pub failed: u64,
}

fn page_up(len: u64) -> u64 {
    len.div_ceil(PAGE).saturating_mul(PAGE)
}

/// Syscall return values from -4095 to -1 are errors.
fn succeeded(ret: i64) -> bool {
    !(-4095..0).contains(&ret)
}

impl Regions {
    /// Starts from the mappings that exist when recording starts.
    pub fn from_maps(maps: &ProcMaps) -> Regions {
        let mut regions = Regions::default();
        for m in maps.mappings() {
            if m.path.as_deref() == Some("[vsyscall]") {
                continue;
            }
            regions.ranges.insert(
                m.start,
                Region {
                    end: m.end,
                    stack: 0,
                    origin: Origin::BeforeAttach,
                    committed: !m.perms.starts_with("---"),
                    for_malloc: m.path.as_deref() == Some("[heap]"),
                    file_backed: m.path.as_deref().is_some_and(|p| p.starts_with('/')),
                },
            );
            if m.path.as_deref() == Some("[heap]") {
                regions.brk = Some(m.end);
            }
        }
        regions
    }

    /// Where the program break is when recording starts, if no [heap] mapping said so:
    /// the heap's start, when it has not grown yet.
    pub fn set_initial_break(&mut self, brk: u64) {
        self.brk.get_or_insert(brk);
    }

    pub fn ranges(&self) -> impl Iterator<Item = (u64, &Region)> {
        self.ranges.iter().map(|(s, r)| (*s, r))
    }

    /// The ranges that count for a stack, in address order: (stack, origin), start, region.
    /// Mappings from before recording and glibc's own for malloc are left out.
    pub fn stack_ranges(&self) -> impl Iterator<Item = ((u64, Origin), u64, &Region)> {
        self.ranges()
            .filter(|(_, r)| r.origin != Origin::BeforeAttach && !r.for_malloc)
            .map(|(s, r)| ((r.stack, r.origin), s, r))
    }

    /// Splits the range containing `addr` so that a range starts there.
    fn split_at(&mut self, addr: u64) {
        let Some((&start, region)) = self.ranges.range(..addr).next_back() else { return };
        if region.end > addr {
            let mut tail = region.clone();
            tail.end = region.end;
            self.ranges.get_mut(&start).expect("present").end = addr;
            self.ranges.insert(addr, tail);
        }
    }

    /// Takes `[start, end)` out, returning the pieces of regions that were there.
    fn remove(&mut self, start: u64, end: u64) -> Vec<(u64, Region)> {
        if start >= end {
            return Vec::new();
        }
        self.split_at(start);
        self.split_at(end);
        let inside: Vec<u64> = self.ranges.range(start..end).map(|(s, _)| *s).collect();
        inside
            .into_iter()
            .filter_map(|s| self.ranges.remove(&s).map(|r| (s, r)))
            .collect()
    }

    /// Puts back what a failed unmap took out, where nothing was mapped since.
    fn put_back(&mut self, taken: Vec<(u64, Region)>) {
        for (start, region) in taken {
            let taken_since: Vec<(u64, u64)> = self
                .ranges
                .range(..region.end)
                .rev()
                .take_while(|(_, r)| r.end > start)
                .map(|(s, r)| (*s, r.end))
                .collect();
            let mut at = start;
            for (s, e) in taken_since.into_iter().rev().chain([(region.end, region.end)]) {
                if s > at {
                    self.ranges.insert(at, Region { end: s.min(region.end), ..region.clone() });
                }
                at = at.max(e);
            }
        }
    }

    /// munmap and mremap at entry: the range they free is gone before anyone can be given
    /// it again.
    fn enter(&mut self, ev: &SyscallEvent) {
        let a = ev.args;
        let taken = match ev.sys {
            sys::MUNMAP => self.remove(a[0], a[0].saturating_add(page_up(a[1]))),
            sys::MREMAP if a[3] & MREMAP_DONTUNMAP == 0 => self.remove(a[0], a[0].saturating_add(page_up(a[1]))),
            _ => return,
        };
        self.unmapping.insert(ev.tid, (ev.sys, taken));
    }

    fn insert(&mut self, start: u64, region: Region) {
        self.remove(start, region.end);
        self.ranges.insert(start, region);
    }

    fn set_committed(&mut self, start: u64, end: u64, committed: bool) {
        if start >= end {
            return;
        }
        self.split_at(start);
        self.split_at(end);
        for (_, r) in self.ranges.range_mut(start..end) {
            r.committed = committed;
        }
    }

    fn count_mapped(&mut self, stack: u64, origin: Origin, for_malloc: bool, bytes: u64) {
        let e = self.mapped.entry((stack, origin, for_malloc)).or_default();
        e.0 += bytes;
        e.1 += 1;
    }

    pub fn apply(&mut self, ev: &SyscallEvent) {
        if ev.phase == phase::ENTRY {
            self.enter(ev);
            return;
        }
        // What this call took out at its entry; None when its entry was not seen.
        let taken = self
            .unmapping
            .remove(&ev.tid)
            .and_then(|(sys, taken)| (sys == ev.sys).then_some(taken));
        if !succeeded(ev.ret) {
            self.failed += 1;
            if let Some(taken) = taken {
                self.put_back(taken);
            }
            return;
        }
        let a = ev.args;
        let for_malloc = ev.in_allocator != 0;
        match ev.sys {
            sys::MMAP => {
                let (start, len, prot, flags) = (ev.ret as u64, page_up(a[1]), a[2], a[3]);
                self.insert(
                    start,
                    Region {
                        end: start + len,
                        stack: ev.stack,
                        origin: Origin::Mmap,
                        committed: prot != PROT_NONE && flags & MAP_NORESERVE == 0,
                        for_malloc,
                        file_backed: flags & MAP_ANONYMOUS == 0,
                    },
                );
                self.count_mapped(ev.stack, Origin::Mmap, for_malloc, len);
            }
            sys::MUNMAP => {
                if taken.is_none() {
                    self.remove(a[0], a[0].saturating_add(page_up(a[1])));
                }
            }
            sys::MREMAP => {
                let (old, old_len, new_len, flags) = (a[0], page_up(a[1]), page_up(a[2]), a[3]);
                let new = ev.ret as u64;
                let template = match &taken {
                    Some(taken) => taken.iter().find(|(s, _)| *s == old).map(|(_, r)| r.clone()),
                    None => self
                        .ranges
                        .range(..=old)
                        .next_back()
                        .filter(|(_, r)| r.end > old)
                        .map(|(_, r)| r.clone()),
                };
                if flags & MREMAP_DONTUNMAP == 0 && taken.is_none() {
                    self.remove(old, old + old_len);
                }
                // The remapped range now belongs to the mremap's caller, as a realloc'd
                // block belongs to the realloc's.
                self.insert(
                    new,
                    Region {
                        end: new + new_len,
                        stack: ev.stack,
                        origin: Origin::Mmap,
                        committed: template.as_ref().is_none_or(|t| t.committed),
                        for_malloc: for_malloc || template.as_ref().is_some_and(|t| t.for_malloc),
                        file_backed: template.as_ref().is_some_and(|t| t.file_backed),
                    },
                );
                self.count_mapped(ev.stack, Origin::Mmap, for_malloc, new_len.saturating_sub(old_len));
            }
            sys::BRK => {
                let new = ev.ret as u64;
                if a[0] == 0 {
                    // brk(0) asks where the break is: the exact answer, no change.
                    self.brk = Some(new);
                    return;
                }
                let Some(old) = self.brk else {
                    // The first break we learn of: nothing grew yet.
                    self.brk = Some(new);
                    return;
                };
                if new > old {
                    self.insert(
                        old,
                        Region {
                            end: new,
                            stack: ev.stack,
                            origin: Origin::Brk,
                            committed: true,
                            for_malloc,
                            file_backed: false,
                        },
                    );
                    self.count_mapped(ev.stack, Origin::Brk, for_malloc, new - old);
                } else if new < old {
                    self.remove(new, old);
                }
                self.brk = Some(new);
            }
            sys::MADVISE => {
                if matches!(a[2], MADV_DONTNEED | MADV_FREE | MADV_REMOVE) {
                    self.set_committed(a[0], a[0] + page_up(a[1]), false);
                }
            }
            sys::MPROTECT => self.set_committed(a[0], a[0] + page_up(a[1]), a[2] != PROT_NONE),
            _ => self.failed += 1,
        }
    }

    /// What each (stack, origin) made while recording and still has mapped. Ranges glibc
    /// mapped for malloc are left out: the malloc stacks account for that memory.
    pub fn by_stack(&self) -> HashMap<(u64, Origin), StackRanges> {
        let mut out: HashMap<(u64, Origin), StackRanges> = HashMap::new();
        for (&(stack, origin, for_malloc), &(bytes, calls)) in &self.mapped {
            if for_malloc {
                continue;
            }
            let e = out.entry((stack, origin)).or_default();
            e.mapped_bytes = bytes;
            e.maps = calls;
        }
        for (key, start, r) in self.stack_ranges() {
            let e = out.entry(key).or_default();
            let len = r.end - start;
            e.reserved_bytes += len;
            if r.committed {
                e.committed_bytes += len;
            }
            e.regions += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(sys: u32, args: &[u64], ret: i64, stack: u64) -> SyscallEvent {
        let mut a = [0; 6];
        a[..args.len()].copy_from_slice(args);
        SyscallEvent {
            args: a,
            ret,
            stack,
            timestamp_ns: 0,
            tid: 1,
            sys,
            in_allocator: 0,
            phase: phase::EXIT,
        }
    }

    /// The entry event of a munmap or mremap on thread `tid`.
    fn entry(sys: u32, args: &[u64], tid: u32) -> SyscallEvent {
        SyscallEvent { tid, phase: phase::ENTRY, ..ev(sys, args, 0, 9) }
    }

    fn on(tid: u32, e: SyscallEvent) -> SyscallEvent {
        SyscallEvent { tid, ..e }
    }

    #[test]
    fn an_address_unmapped_and_given_to_another_thread_before_the_munmap_returns_stays_mapped() {
        let mut r = Regions::default();
        r.apply(&ev(sys::MMAP, &[0, 4 * PAGE, RW, PRIV_ANON], 0x10000, 7));
        // Thread 2 unmaps; thread 3's mmap is given the same range and returns first.
        r.apply(&entry(sys::MUNMAP, &[0x10000, 4 * PAGE], 2));
        r.apply(&on(3, ev(sys::MMAP, &[0, 4 * PAGE, RW, PRIV_ANON], 0x10000, 8)));
        r.apply(&on(2, ev(sys::MUNMAP, &[0x10000, 4 * PAGE], 0, 9)));
        assert_eq!(live(&r, 7), (0, 0, 0));
        assert_eq!(live(&r, 8), (4 * PAGE, 4 * PAGE, 1));
    }

    #[test]
    fn a_moving_mremap_frees_its_old_range_at_entry() {
        let mut r = Regions::default();
        r.apply(&ev(sys::MMAP, &[0, 4 * PAGE, RW, PRIV_ANON], 0x10000, 7));
        r.apply(&entry(sys::MREMAP, &[0x10000, 4 * PAGE, 8 * PAGE, 1], 2));
        r.apply(&on(3, ev(sys::MMAP, &[0, 4 * PAGE, RW, PRIV_ANON], 0x10000, 8)));
        r.apply(&on(2, ev(sys::MREMAP, &[0x10000, 4 * PAGE, 8 * PAGE, 1], 0x90000, 6)));
        assert_eq!(live(&r, 7), (0, 0, 0));
        assert_eq!(live(&r, 8), (4 * PAGE, 4 * PAGE, 1));
        assert_eq!(live(&r, 6), (8 * PAGE, 8 * PAGE, 1));
    }

    #[test]
    fn a_failed_munmap_puts_back_what_its_entry_took_out() {
        let mut r = Regions::default();
        r.apply(&ev(sys::MMAP, &[0, 4 * PAGE, PROT_NONE, PRIV_ANON], 0x10000, 7));
        r.apply(&ev(sys::MPROTECT, &[0x10000, PAGE, RW], 0, 7));
        r.apply(&entry(sys::MUNMAP, &[0x10000, 4 * PAGE], 2));
        assert_eq!(live(&r, 7), (0, 0, 0));
        r.apply(&on(2, ev(sys::MUNMAP, &[0x10000, 4 * PAGE], -22, 9)));
        assert_eq!(live(&r, 7), (PAGE, 4 * PAGE, 2));
        assert_eq!(r.failed, 1);
        // Put back around whatever was mapped there since (which a failed unmap cannot
        // really have freed, but the bookkeeping never overwrites a newer range).
        r.apply(&entry(sys::MUNMAP, &[0x10000, 4 * PAGE], 2));
        r.apply(&on(3, ev(sys::MMAP, &[0x11000, PAGE, RW, PRIV_ANON | 0x10], 0x11000, 8)));
        r.apply(&on(2, ev(sys::MUNMAP, &[0x10000, 4 * PAGE], -12, 9)));
        assert_eq!(live(&r, 7), (PAGE, 3 * PAGE, 2));
        assert_eq!(live(&r, 8), (PAGE, PAGE, 1));
    }

    const RW: u64 = 3;
    const PRIV_ANON: u64 = 0x22;

    fn live(r: &Regions, stack: u64) -> (u64, u64, u64) {
        let s = r.by_stack().get(&(stack, Origin::Mmap)).cloned().unwrap_or_default();
        (s.committed_bytes, s.reserved_bytes, s.regions)
    }

    #[test]
    fn partial_munmap_from_the_middle_splits_the_region() {
        let mut r = Regions::default();
        r.apply(&ev(sys::MMAP, &[0, 10 * PAGE, RW, PRIV_ANON], 0x10000, 7));
        r.apply(&ev(sys::MUNMAP, &[0x10000 + 3 * PAGE, 2 * PAGE], 0, 9));
        assert_eq!(live(&r, 7), (8 * PAGE, 8 * PAGE, 2));
        let s = r.by_stack()[&(7, Origin::Mmap)].clone();
        assert_eq!((s.mapped_bytes, s.maps), (10 * PAGE, 1));
    }

    #[test]
    fn mremap_that_grows_and_moves_belongs_to_its_caller() {
        let mut r = Regions::default();
        r.apply(&ev(sys::MMAP, &[0, 4 * PAGE, RW, PRIV_ANON], 0x10000, 7));
        r.apply(&ev(sys::MREMAP, &[0x10000, 4 * PAGE, 16 * PAGE, 1], 0x90000, 8));
        assert_eq!(live(&r, 7), (0, 0, 0));
        assert_eq!(live(&r, 8), (16 * PAGE, 16 * PAGE, 1));
    }

    #[test]
    fn map_fixed_over_a_range_replaces_it() {
        let mut r = Regions::default();
        r.apply(&ev(sys::MMAP, &[0, 8 * PAGE, RW, PRIV_ANON], 0x10000, 7));
        r.apply(&ev(sys::MMAP, &[0x12000, 2 * PAGE, RW, PRIV_ANON | 0x10], 0x12000, 8));
        assert_eq!(live(&r, 7), (6 * PAGE, 6 * PAGE, 2));
        assert_eq!(live(&r, 8), (2 * PAGE, 2 * PAGE, 1));
    }

    #[test]
    fn reservations_are_reserved_until_committed() {
        let mut r = Regions::default();
        // V8's pattern: PROT_NONE|MAP_NORESERVE reserve, mprotect part of it read-write.
        r.apply(&ev(sys::MMAP, &[0, 16 * PAGE, PROT_NONE, PRIV_ANON | MAP_NORESERVE], 0x100000, 7));
        assert_eq!(live(&r, 7), (0, 16 * PAGE, 1));
        r.apply(&ev(sys::MPROTECT, &[0x100000, 4 * PAGE, RW], 0, 7));
        assert_eq!(live(&r, 7), (4 * PAGE, 16 * PAGE, 2));
        r.apply(&ev(sys::MADVISE, &[0x100000, PAGE, MADV_DONTNEED], 0, 7));
        assert_eq!(live(&r, 7), (3 * PAGE, 16 * PAGE, 3));
        // Read-write but MAP_NORESERVE: reserved too.
        r.apply(&ev(sys::MMAP, &[0, PAGE, RW, PRIV_ANON | MAP_NORESERVE], 0x900000, 9));
        assert_eq!(live(&r, 9), (0, PAGE, 1));
    }

    #[test]
    fn brk_grows_and_shrinks_the_heap() {
        let mut r = Regions::default();
        r.apply(&ev(sys::BRK, &[0], 0x5000_0000, 1));
        r.apply(&ev(sys::BRK, &[0x5000_3000], 0x5000_3000, 7));
        r.apply(&ev(sys::BRK, &[0x5000_1000], 0x5000_1000, 8));
        let s = r.by_stack()[&(7, Origin::Brk)].clone();
        assert_eq!((s.committed_bytes, s.regions, s.mapped_bytes), (0x1000, 1, 0x3000));
    }

    #[test]
    fn brk_query_resyncs_the_break_without_growth() {
        let mut r = Regions::default();
        r.set_initial_break(0x5000_0000);
        r.apply(&ev(sys::BRK, &[0], 0x5000_0010, 1));
        r.apply(&ev(sys::BRK, &[0x5000_5010], 0x5000_5010, 7));
        let s = r.by_stack()[&(7, Origin::Brk)].clone();
        assert_eq!(s.committed_bytes, 0x5000);
        assert!(!r.by_stack().contains_key(&(1, Origin::Brk)));
    }

    #[test]
    fn failed_calls_change_nothing() {
        let mut r = Regions::default();
        r.apply(&ev(sys::MMAP, &[0, PAGE, RW, PRIV_ANON], -12, 7));
        assert!(r.by_stack().is_empty());
        assert_eq!(r.failed, 1);
    }

    #[test]
    fn map_unmap_loop_does_not_drift() {
        let mut r = Regions::default();
        for i in 0..10_000u64 {
            let addr = 0x7f00_0000_0000 + (i % 7) * 0x100000;
            r.apply(&ev(sys::MMAP, &[0, 3 * PAGE + 5, RW, PRIV_ANON], addr as i64, 7));
            r.apply(&ev(sys::MUNMAP, &[addr, 3 * PAGE + 5], 0, 8));
        }
        assert_eq!(live(&r, 7), (0, 0, 0));
        assert_eq!(r.ranges().count(), 0);
    }

    #[test]
    fn memory_glibc_maps_for_malloc_is_left_to_the_malloc_stacks() {
        let mut r = Regions::default();
        let mut e = ev(sys::MMAP, &[0, 32 * PAGE, RW, PRIV_ANON], 0x10000, 7);
        e.in_allocator = 1;
        r.apply(&e);
        assert!(r.by_stack().is_empty());
        assert!(r.ranges().all(|(_, reg)| reg.for_malloc));
    }
}
