//! The memory model of a process seen from outside: every mapping of /proc/PID/smaps put
//! in one owner class (V8 heap, malloc, thread stacks, code, JIT, files, other anonymous
//! memory), with its reserved size and resident set; and what the mmap/brk stacks hold of
//! it (bytes in RAM from pagemap, class of the mappings they fall in).
use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::{
    pagemap::{PagemapError, Present},
    regions::{Origin, Regions},
};

/// glibc's non-main arenas are heaps of at most this size, aligned to it (64-bit).
const ARENA_HEAP_MAX: u64 = 64 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    V8Heap,
    Malloc,
    ThreadStacks,
    Code,
    Jit,
    File,
    AnonOther,
}

impl Class {
    pub const ALL: [Class; 7] = [
        Class::V8Heap,
        Class::Malloc,
        Class::ThreadStacks,
        Class::Code,
        Class::Jit,
        Class::File,
        Class::AnonOther,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Class::V8Heap => "v8-heap",
            Class::Malloc => "malloc",
            Class::ThreadStacks => "thread-stacks",
            Class::Code => "code",
            Class::Jit => "jit",
            Class::File => "file",
            Class::AnonOther => "anon-other",
        }
    }
}

/// One mapping of smaps, with what classification needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmapsEntry {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    pub path: Option<String>,
    pub rss: u64,
    pub vm_flags: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SmapsError {
    #[error("read /proc/{pid}/smaps")]
    Read {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("smaps line {line}: {text:?}")]
    Parse { line: usize, text: String },
    /// smaps listed no mapping at all: a live process always has some (its stack, at least),
    /// so the memory is gone, the task having exited between its check and the read (a
    /// process's main thread reads empty from its exit on, before it shows as a zombie).
    #[error("smaps lists no mapping: the memory is gone (the task has exited)")]
    NoMemory,
    #[error(transparent)]
    Pagemap(#[from] PagemapError),
}

fn parse_range(s: &str) -> Option<(u64, u64)> {
    let (a, b) = s.split_once('-')?;
    Some((u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?))
}

pub fn parse_smaps(text: &str) -> Result<Vec<SmapsEntry>, SmapsError> {
    let mut entries: Vec<SmapsEntry> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let bad = || SmapsError::Parse {
            line: i + 1,
            text: line.to_owned(),
        };
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((start, end)) = parse_range(first).filter(|_| !first.ends_with(':')) {
            // The kernel never lists an empty mapping. (It may list one twice, overlapping,
            // when the mapping grew while smaps was read: the sums below saturate.)
            if end <= start {
                return Err(bad());
            }
            let mut fields = line.split_whitespace();
            let _range = fields.next();
            let perms = fields.next().ok_or_else(bad)?.to_owned();
            // offset, dev, inode, then the path (which may contain spaces).
            let rest: Vec<&str> = fields.collect();
            let path = if rest.len() > 3 {
                let joined = rest[3..].join(" ");
                Some(joined.trim_end_matches(" (deleted)").to_owned())
            } else {
                None
            };
            entries.push(SmapsEntry {
                start,
                end,
                perms,
                path,
                rss: 0,
                vm_flags: Vec::new(),
            });
        } else if let Some(value) = line.strip_prefix("Rss:") {
            let kb: u64 = value.trim().trim_end_matches("kB").trim().parse().map_err(|_| bad())?;
            let rss = kb.checked_mul(1024).ok_or_else(bad)?;
            entries.last_mut().ok_or_else(bad)?.rss = rss;
        } else if let Some(flags) = line.strip_prefix("VmFlags:") {
            entries.last_mut().ok_or_else(bad)?.vm_flags =
                flags.split_whitespace().map(str::to_owned).collect();
        }
    }
    Ok(entries)
}

pub fn read_smaps(pid: u32) -> Result<Vec<SmapsEntry>, SmapsError> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .map_err(|source| SmapsError::Read { pid, source })?;
    mappings_of(&text)
}

/// The mappings of smaps read from a process: none at all is no reading (see
/// [`SmapsError::NoMemory`]), never a process whose memory is all zero.
fn mappings_of(text: &str) -> Result<Vec<SmapsEntry>, SmapsError> {
    let entries = parse_smaps(text)?;
    if entries.is_empty() {
        return Err(SmapsError::NoMemory);
    }
    Ok(entries)
}

/// Stack pointers of the threads of `pid` that are blocked in a system call (running
/// threads show none), from /proc/PID/task/TID/syscall.
pub fn thread_stack_pointers(pid: u32) -> Vec<u64> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .filter_map(|t| {
            let text = std::fs::read_to_string(t.ok()?.path().join("syscall")).ok()?;
            // "nr arg1 .. arg6 sp pc"
            let fields: Vec<&str> = text.split_whitespace().collect();
            (fields.len() == 9).then(|| u64::from_str_radix(fields[7].trim_start_matches("0x"), 16).ok())?
        })
        .collect()
}

/// What besides smaps decides a class: the thread stack pointers we could read, and the
/// ranges glibc mapped for malloc while we watched.
#[derive(Clone, Debug, Default)]
pub struct Hints {
    pub stack_pointers: Vec<u64>,
    /// Starts of ranges known to be malloc's (from the mmap-family tracing).
    pub malloc_ranges: Vec<(u64, u64)>,
}

impl Hints {
    pub fn from_regions(regions: &Regions, stack_pointers: Vec<u64>) -> Hints {
        Hints {
            stack_pointers,
            malloc_ranges: regions
                .ranges()
                .filter(|(_, r)| r.for_malloc)
                .map(|(s, r)| (s, r.end))
                .collect(),
        }
    }
}

/// Puts every mapping in its class.
pub fn classify(entries: &[SmapsEntry], hints: &Hints) -> Vec<Class> {
    // glibc arena heaps: glibc maps each as one 64 MiB-aligned, 64 MiB reservation and makes
    // the used part read-write, so contiguous anonymous mappings cover exactly the block.
    let mut arena_blocks = HashSet::new();
    for (i, e) in entries.iter().enumerate() {
        if e.path.is_some() || e.start % ARENA_HEAP_MAX != 0 {
            continue;
        }
        let mut end = e.end;
        for next in &entries[i + 1..] {
            if next.start != end || next.path.is_some() || end >= e.start.saturating_add(ARENA_HEAP_MAX) {
                break;
            }
            end = next.end;
        }
        if Some(end) == e.start.checked_add(ARENA_HEAP_MAX) {
            arena_blocks.insert(e.start);
        }
    }
    let stack_hit = |e: &SmapsEntry| hints.stack_pointers.iter().any(|&sp| e.start <= sp && sp < e.end);
    let malloc_hit = |e: &SmapsEntry| {
        hints.malloc_ranges.iter().any(|&(s, end)| s < e.end && e.start < end)
    };
    entries
        .iter()
        .map(|e| {
            let anon = e.path.is_none();
            let exec = e.perms.contains('x');
            if e.path.as_deref() == Some("[stack]") || (anon && stack_hit(e)) {
                Class::ThreadStacks
            } else if anon && e.vm_flags.iter().any(|f| f == "dc") {
                // V8 marks its heap MADV_DONTFORK; glibc never does.
                Class::V8Heap
            } else if e.path.as_deref() == Some("[heap]")
                || (anon && !exec && (malloc_hit(e) || is_arena(e, &arena_blocks)))
            {
                Class::Malloc
            } else if anon && exec {
                Class::Jit
            } else if exec && e.path.as_deref().is_some_and(|p| p.starts_with('/')) {
                Class::Code
            } else if e.path.as_deref().is_some_and(|p| p.starts_with('/')) {
                Class::File
            } else {
                Class::AnonOther
            }
        })
        .collect()
}

fn is_arena(e: &SmapsEntry, arena_blocks: &HashSet<u64>) -> bool {
    let block = e.start - e.start % ARENA_HEAP_MAX;
    arena_blocks.contains(&block) && e.end <= block.saturating_add(ARENA_HEAP_MAX)
}

/// One class's share of the address space.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassTotals {
    pub class: String,
    pub mappings: u64,
    pub reserved_bytes: u64,
    pub rss_bytes: u64,
    pub rss_delta_bytes: i64,
}

/// Totals per class, in [`Class::ALL`] order, with the RSS change against `before` (the
/// same view taken when recording started) when given.
pub fn totals(entries: &[SmapsEntry], classes: &[Class], before: Option<&[ClassTotals]>) -> Vec<ClassTotals> {
    Class::ALL
        .iter()
        .map(|&c| {
            let mut t = ClassTotals {
                class: c.name().to_owned(),
                ..ClassTotals::default()
            };
            for (e, _) in entries.iter().zip(classes).filter(|(_, k)| **k == c) {
                t.mappings += 1;
                t.reserved_bytes = t.reserved_bytes.saturating_add(e.end - e.start);
                t.rss_bytes = t.rss_bytes.saturating_add(e.rss);
            }
            if let Some(b) = before.and_then(|b| b.iter().find(|b| b.class == t.class)) {
                let signed = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
                t.rss_delta_bytes = signed(t.rss_bytes).saturating_sub(signed(b.rss_bytes));
            }
            t
        })
        .collect()
}

/// The memory map of `pid` now.
pub fn memory_map(pid: u32, regions: &Regions, before: Option<&[ClassTotals]>) -> Result<Vec<ClassTotals>, SmapsError> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .map_err(|source| SmapsError::Read { pid, source })?;
    memory_map_of(&text, regions, thread_stack_pointers(pid), before)
}

/// The memory map from smaps text read earlier (at a process's exit stop, say).
pub fn memory_map_of(
    smaps: &str,
    regions: &Regions,
    stack_pointers: Vec<u64>,
    before: Option<&[ClassTotals]>,
) -> Result<Vec<ClassTotals>, SmapsError> {
    let entries = mappings_of(smaps)?;
    let classes = classify(&entries, &Hints::from_regions(regions, stack_pointers));
    Ok(totals(&entries, &classes, before))
}

/// What the mmap/brk stacks hold at one moment, per (stack, origin): the bytes of their
/// ranges in RAM, and the class of the mappings their ranges fall in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StackMemory {
    pub resident: HashMap<(u64, Origin), u64>,
    pub class: HashMap<(u64, Origin), Class>,
}

impl StackMemory {
    /// Measures `pid` now: smaps for the classes and for which mappings hold any page at
    /// all, then pagemap over the stacks' ranges within those. Reservations that were never
    /// touched (node's gigabytes of PROT_NONE address space) hold no page and are not read.
    pub fn measure(pid: u32, regions: &Regions) -> Result<StackMemory, SmapsError> {
        let entries = read_smaps(pid)?;
        let classes = classify(&entries, &Hints::from_regions(regions, thread_stack_pointers(pid)));
        let present = Present::read(pid, pagemap_ranges(&entries, regions))?;
        Ok(StackMemory::of(&entries, &classes, regions, &present))
    }

    /// From smaps and pagemap read at a process's exit stop (see [`present_at_exit`]); the
    /// thread stack pointers are gone by then.
    pub fn at_exit(smaps: &str, present: &Present, regions: &Regions) -> Result<StackMemory, SmapsError> {
        let entries = mappings_of(smaps)?;
        let classes = classify(&entries, &Hints::from_regions(regions, Vec::new()));
        Ok(StackMemory::of(&entries, &classes, regions, present))
    }

    fn of(entries: &[SmapsEntry], classes: &[Class], regions: &Regions, present: &Present) -> StackMemory {
        let mut out = StackMemory::default();
        // Per stack and class: (accessible bytes, all bytes) of the stack's ranges in it.
        let mut shares: HashMap<(u64, Origin), HashMap<Class, (u64, u64)>> = HashMap::new();
        for (key, start, r) in regions.stack_ranges() {
            *out.resident.entry(key).or_default() += present.bytes(start, r.end);
            let share = shares.entry(key).or_default();
            for (e, class) in overlapping(entries, start, r.end).map(|i| (&entries[i], classes[i])) {
                let bytes = r.end.min(e.end) - start.max(e.start);
                let s = share.entry(class).or_default();
                if !e.perms.starts_with("---") {
                    s.0 += bytes;
                }
                s.1 += bytes;
            }
        }
        for (key, share) in shares {
            // The class holding most of the stack's accessible bytes (guard pages and
            // reservations decide only when nothing is accessible).
            if let Some((class, _)) = share.into_iter().max_by_key(|&(class, bytes)| (bytes, std::cmp::Reverse(class))) {
                out.class.insert(key, class);
            }
        }
        out
    }
}

/// Indices of the smaps entries (sorted by address) that overlap `[start, end)`.
fn overlapping(entries: &[SmapsEntry], start: u64, end: u64) -> impl Iterator<Item = usize> + '_ {
    let from = entries.partition_point(|e| e.end <= start);
    (from..entries.len()).take_while(move |&i| entries[i].start < end)
}

/// The parts of the stacks' ranges that lie in mappings holding any page: the only parts
/// whose pagemap entries can say "present".
fn pagemap_ranges(entries: &[SmapsEntry], regions: &Regions) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for (_, start, r) in regions.stack_ranges() {
        for i in overlapping(entries, start, r.end) {
            let e = &entries[i];
            if e.rss > 0 {
                out.push((start.max(e.start), r.end.min(e.end)));
            }
        }
    }
    out
}

/// At a process's exit stop, while its memory is still there: which pages of its mappings
/// holding any page are in RAM (a few hundred KiB of pagemap for a node process), so that
/// [`StackMemory::at_exit`] can split them by stack afterwards.
pub fn present_at_exit(pid: u32, smaps: &str) -> Present {
    let entries = parse_smaps(smaps).unwrap_or_default();
    Present::read(pid, entries.iter().filter(|e| e.rss > 0).map(|e| (e.start, e.end))).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
00400000-00452000 r-xp 00000000 08:02 173521 /usr/bin/node
Size:                328 kB
Rss:                 300 kB
VmFlags: rd ex mr mw me dw
01000000-01021000 rw-p 00000000 00:00 0 [heap]
Rss:                 132 kB
VmFlags: rd wr mr mw me ac
7f0000000000-7f0000021000 rw-p 00000000 00:00 0
Rss:                 100 kB
VmFlags: rd wr mr mw me nr
7f0000021000-7f0004000000 ---p 00000000 00:00 0
Rss:                   0 kB
VmFlags: mr mw me nr
7f1000000000-7f1000040000 rw-p 00000000 00:00 0
Rss:                 256 kB
VmFlags: rd wr mr mw me ac dc
7f2000000000-7f2000001000 rwxp 00000000 00:00 0
Rss:                   4 kB
VmFlags: rd wr ex mr mw me ac
7f3000000000-7f3000800000 rw-p 00000000 00:00 0
Rss:                  16 kB
VmFlags: rd wr mr mw me ac
7f4000000000-7f4000100000 r--p 00000000 08:02 99 /usr/share/data file.bin
Rss:                  40 kB
VmFlags: rd mr mw me
7f5000001000-7f5000002000 rw-p 00000000 00:00 0
Rss:                   8 kB
VmFlags: rd wr mr mw me ac
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
Rss:                  24 kB
VmFlags: rd wr mr mw me gd ac
";

    /// Regression (found by `cargo xtask fuzz`, input in fuzz/corpus/smaps): an inverted
    /// range, an Rss beyond 64 bits and ranges at the top of the address space panicked with
    /// an arithmetic overflow.
    #[test]
    fn hostile_smaps_is_refused_or_summed_without_overflow() {
        let inverted = "00b6f000-00400000 r--p 00000000 fe:00 1 /bin/x\nRss: 4 kB\n";
        assert!(parse_smaps(inverted).is_err());
        let huge = "00400000-00b6f000 r--p 00000000 fe:00 1 /bin/x\nRss: 18446744073709551 kB\n";
        assert!(parse_smaps(huge).is_err());
        let top = "fffffffffc000000-ffffffffffffffff rw-p 00000000 00:00 0\nRss: 4 kB\n\
                   fffffffffc000000-ffffffffffffffff rw-p 00000000 00:00 0\nRss: 4 kB\n";
        let map = memory_map_of(top, &Regions::default(), vec![], None).unwrap();
        let reserved: u64 = map.iter().map(|c| c.reserved_bytes).sum();
        assert_eq!(reserved, 2 * 0x3ff_ffff);
        // The same huge mapping listed twice (as when a mapping grows while smaps is read):
        // the sum saturates instead of wrapping.
        let twice = "1000-fffffffffffff000 rw-p 00000000 00:00 0\nRss: 4 kB\n\
                     1000-fffffffffffff000 rw-p 00000000 00:00 0\nRss: 4 kB\n";
        let map = memory_map_of(twice, &Regions::default(), vec![], Some(&map)).unwrap();
        let anon = map.iter().find(|c| c.class == "anon-other").unwrap();
        assert_eq!((anon.reserved_bytes, anon.rss_bytes), (u64::MAX, 8192));
    }

    /// Regression (mmap_e2e flaked: every class of a launched node's map read 0): smaps of a
    /// task that has exited reads empty, and that became a map of zeros which replaced the one
    /// read at the exit stop. No mapping at all is no reading.
    #[test]
    fn smaps_without_mappings_is_no_reading() {
        let before = memory_map_of(SAMPLE, &Regions::default(), vec![], None).unwrap();
        assert!(matches!(
            memory_map_of("", &Regions::default(), vec![], Some(&before)),
            Err(SmapsError::NoMemory)
        ));
        assert!(matches!(
            StackMemory::at_exit("", &Present::default(), &Regions::default()),
            Err(SmapsError::NoMemory)
        ));
    }

    #[test]
    fn every_owner_class_is_recognized() {
        let entries = parse_smaps(SAMPLE).unwrap();
        assert_eq!(entries.len(), 10);
        assert_eq!(entries[7].path.as_deref(), Some("/usr/share/data file.bin"));
        let hints = Hints {
            stack_pointers: vec![0x7f30007fff00],
            malloc_ranges: vec![],
        };
        let classes = classify(&entries, &hints);
        assert_eq!(
            classes,
            vec![
                Class::Code,
                Class::Malloc,       // [heap]
                Class::Malloc,       // arena heap at a 64 MiB boundary
                Class::Malloc,       // its reserved rest
                Class::V8Heap,       // dc
                Class::Jit,          // anonymous, executable
                Class::ThreadStacks, // a thread's sp is in it
                Class::File,
                Class::AnonOther,
                Class::ThreadStacks, // [stack]
            ]
        );
        let t = totals(&entries, &classes, None);
        let malloc = t.iter().find(|c| c.class == "malloc").unwrap();
        assert_eq!(malloc.mappings, 3);
        assert_eq!(malloc.rss_bytes, (132 + 100) * 1024);
        assert_eq!(malloc.reserved_bytes, 0x21000 + 0x4000000);
    }

    #[test]
    fn a_lone_mapping_on_a_64_mib_boundary_is_not_an_arena() {
        let text = "7f0000000000-7f0000021000 rw-p 00000000 00:00 0\nRss: 4 kB\n";
        let entries = parse_smaps(text).unwrap();
        assert_eq!(classify(&entries, &Hints::default()), vec![Class::AnonOther]);
    }

    #[test]
    fn ranges_glibc_mapped_for_malloc_are_malloc() {
        let entries = parse_smaps(SAMPLE).unwrap();
        let hints = Hints {
            stack_pointers: vec![],
            malloc_ranges: vec![(0x7f5000001000, 0x7f5000002000)],
        };
        assert_eq!(classify(&entries, &hints)[8], Class::Malloc);
    }

    #[test]
    fn rss_delta_is_against_the_first_view() {
        let entries = parse_smaps(SAMPLE).unwrap();
        let classes = classify(&entries, &Hints::default());
        let before = totals(&entries, &classes, None);
        let mut grown = entries.clone();
        grown[1].rss += 4096;
        let after = totals(&grown, &classes, Some(&before));
        assert_eq!(after.iter().find(|c| c.class == "malloc").unwrap().rss_delta_bytes, 4096);
    }

    fn mapped(regions: &mut Regions, stack: u64, start: u64, len: u64, prot: u64) {
        regions.apply(&tracer_common::SyscallEvent {
            args: [0, len, prot, 0x22, 0, 0],
            ret: start as i64,
            stack,
            timestamp_ns: 0,
            tid: 1,
            sys: tracer_common::sys::MMAP,
            in_allocator: 0,
            phase: tracer_common::phase::EXIT,
        });
    }

    #[test]
    fn a_stack_takes_the_class_of_its_accessible_bytes() {
        // A thread stack as glibc maps it: a PROT_NONE guard page below the stack proper.
        let smaps = "\
7f3000000000-7f3000001000 ---p 00000000 00:00 0
Rss:                   0 kB
7f3000001000-7f3000800000 rw-p 00000000 00:00 0
Rss:                  16 kB
";
        let mut regions = Regions::default();
        mapped(&mut regions, 7, 0x7f3000000000, 0x800000, 0);
        let entries = parse_smaps(smaps).unwrap();
        let hints = Hints { stack_pointers: vec![0x7f30007fff00], malloc_ranges: vec![] };
        let held = StackMemory::of(&entries, &classify(&entries, &hints), &regions, &Present::default());
        assert_eq!(held.class[&(7, Origin::Mmap)], Class::ThreadStacks);
        assert_eq!(held.resident[&(7, Origin::Mmap)], 0);
        // Only the mapping with pages in it is worth reading.
        assert_eq!(pagemap_ranges(&entries, &regions), vec![(0x7f3000001000, 0x7f3000800000)]);
    }

    #[test]
    fn adjacent_mappings_of_two_stacks_are_split_by_page() {
        const PAGE: u64 = crate::pagemap::PAGE;
        let len = 8 * PAGE;
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let base = p as u64;
        // One kernel VMA, as two stacks' adjacent mappings would be: 1 page touched in the
        // first half, 3 in the second.
        for page in [1u64, 4, 6, 7] {
            // SAFETY: within the mapping.
            unsafe { *((base + page * PAGE) as *mut u8) = 1 };
        }
        let mut regions = Regions::default();
        mapped(&mut regions, 1, base, 4 * PAGE, 3);
        mapped(&mut regions, 2, base + 4 * PAGE, 4 * PAGE, 3);
        let held = StackMemory::measure(std::process::id(), &regions);
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(p, len as usize) };
        let held = held.unwrap();
        assert_eq!(
            (held.resident[&(1, Origin::Mmap)], held.resident[&(2, Origin::Mmap)]),
            (PAGE, 3 * PAGE)
        );
        assert_eq!(held.class[&(1, Origin::Mmap)], Class::AnonOther);
    }

    #[test]
    fn reads_own_smaps() {
        let entries = read_smaps(std::process::id()).unwrap();
        assert!(entries.iter().any(|e| e.rss > 0));
        assert!(thread_stack_pointers(std::process::id()).len() <= 64);
    }
}
