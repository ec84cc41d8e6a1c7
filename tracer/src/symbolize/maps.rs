//! `/proc/PID/maps` parsing, and normalization of runtime addresses into (module, file offset)
//! pairs that stay meaningful after the target process has exited.

use std::path::PathBuf;

use thiserror::Error;

/// Errors from reading or parsing a maps file.
#[derive(Debug, Error)]
pub enum MapsError {
    /// The maps file could not be read (process gone, or not permitted).
    #[error("read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A line did not have the kernel's `start-end perms offset dev inode [path]` shape.
    #[error("maps line {line_no}: {reason}: {line:?}")]
    BadLine {
        /// 1-based line number.
        line_no: usize,
        line: String,
        reason: &'static str,
    },
    /// Two mappings of one reading overlap, which the kernel never produces.
    #[error("maps line {line_no}: mapping {start:#x}-{end:#x} overlaps the one before it")]
    Overlap {
        line_no: usize,
        start: u64,
        end: u64,
    },
}

/// One line of a maps file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    /// Exclusive.
    pub end: u64,
    /// As the kernel prints it, e.g. `"r-xp"`.
    pub perms: String,
    /// File offset of `start`.
    pub offset: u64,
    /// Device of the mapped file, encoded as `stat`'s `st_dev` is (0 for anonymous memory).
    pub dev: u64,
    pub inode: u64,
    /// `None` for anonymous memory; pseudo-paths such as `"[heap]"` or `"[vdso]"` are kept as-is;
    /// a trailing `" (deleted)"` is stripped.
    pub path: Option<String>,
}

impl Mapping {
    /// Whether the mapping is backed by a file whose offsets mean something: the kernel prints
    /// real files (and memfds) with an absolute path, while pseudo-mappings such as `[heap]` or
    /// `anon_inode:...` have no file offset of their own.
    fn is_file_backed(&self) -> bool {
        self.path.as_deref().is_some_and(|p| p.starts_with('/'))
    }

    /// Which file this mapping shows, and where.
    pub fn file(&self) -> MappedFile {
        MappedFile {
            dev: self.dev,
            inode: self.inode,
            start: self.start,
            end: self.end,
        }
    }
}

/// The file a mapping shows: enough to tell whether a path still names it, and to reach it
/// through the process when it does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappedFile {
    pub dev: u64,
    pub inode: u64,
    pub start: u64,
    pub end: u64,
}

impl MappedFile {
    /// Whether `meta` (of a file opened by the mapping's path) is the very file mapped: same
    /// device and inode. A file replaced on disk since it was mapped (a deploy, a package
    /// upgrade) has the path but not the inode.
    pub fn is(&self, meta: &std::fs::Metadata) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        meta.dev() == self.dev && meta.ino() == self.inode
    }

    /// The kernel's handle on the mapped file in process `pid`: it opens that very file even
    /// after its path was replaced or deleted, for as long as the process lives (it needs
    /// CAP_SYS_ADMIN).
    pub fn map_files_path(&self, pid: u32) -> PathBuf {
        PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", self.start, self.end))
    }
}

/// An address reduced to something that can be symbolized later without the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalizedAddr {
    /// The runtime address it came from.
    pub address: u64,
    /// File path as the target sees it, or a pseudo-path such as `"[vdso]"`; `None` when no
    /// mapping (or only an anonymous one) covers the address.
    pub module: Option<String>,
    /// File offset for file-backed mappings; offset from the mapping start for pseudo and
    /// anonymous mappings; the address itself when nothing is mapped there.
    pub offset: u64,
}

/// The mappings of one process, sorted by start and non-overlapping.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcMaps {
    mappings: Vec<Mapping>,
}

impl ProcMaps {
    /// Parses the text of a maps file. Blank lines are ignored; a malformed line, or two
    /// overlapping mappings, is an error naming the line.
    pub fn parse(text: &str) -> Result<ProcMaps, MapsError> {
        let mut mappings: Vec<(usize, Mapping)> = numbered_lines(text).collect::<Result<_, _>>()?;
        // The kernel already prints in address order; sorting keeps hand-written or
        // concatenated input usable too.
        mappings.sort_by_key(|(_, m)| m.start);
        for pair in mappings.windows(2) {
            let (_, prev) = &pair[0];
            let (line_no, next) = &pair[1];
            if next.start < prev.end {
                return Err(MapsError::Overlap {
                    line_no: *line_no,
                    start: next.start,
                    end: next.end,
                });
            }
        }
        Ok(ProcMaps {
            mappings: mappings.into_iter().map(|(_, m)| m).collect(),
        })
    }

    /// Reads and parses `/proc/PID/maps`; fails if the process is gone or not readable.
    ///
    /// The kernel does not print the file atomically: while the process maps and unmaps (any
    /// live, multi-threaded target), one reading can show a mapping twice or two that overlap.
    /// A torn reading is read again a few times; if every reading is torn, the last one is
    /// mended by [`ProcMaps::parse_torn`], since refusing the maps of a busy process would
    /// refuse the normal case.
    pub fn read(pid: u32) -> Result<ProcMaps, MapsError> {
        const READINGS: usize = 4;
        let path = PathBuf::from(format!("/proc/{pid}/maps"));
        let mut text = String::new();
        for _ in 0..READINGS {
            text = std::fs::read_to_string(&path).map_err(|source| MapsError::Read {
                path: path.clone(),
                source,
            })?;
            match ProcMaps::parse(&text) {
                Err(MapsError::Overlap { .. }) => continue,
                done => return done,
            }
        }
        ProcMaps::parse_torn(&text)
    }

    /// Parses a reading that may be torn by concurrent changes: where mappings overlap, the one
    /// printed later wins (the kernel prints in address order, so a later line was read later
    /// and is the newer view of that range). Malformed lines are still an error.
    pub fn parse_torn(text: &str) -> Result<ProcMaps, MapsError> {
        let mut by_start: std::collections::BTreeMap<u64, Mapping> = Default::default();
        for numbered in numbered_lines(text) {
            let (_, m) = numbered?;
            // Drop every earlier mapping that overlaps this one: those starting inside it, and
            // the one starting before it if it reaches past its start.
            let inside: Vec<u64> = by_start.range(m.start..m.end).map(|(&s, _)| s).collect();
            for s in inside {
                by_start.remove(&s);
            }
            if let Some((&s, prev)) = by_start.range(..m.start).next_back()
                && prev.end > m.start
            {
                by_start.remove(&s);
            }
            by_start.insert(m.start, m);
        }
        Ok(ProcMaps {
            mappings: by_start.into_values().collect(),
        })
    }

    /// The mapping containing `addr` (start inclusive, end exclusive).
    pub fn find(&self, addr: u64) -> Option<&Mapping> {
        let idx = self.mappings.partition_point(|m| m.start <= addr);
        let m = self.mappings.get(idx.checked_sub(1)?)?;
        (addr < m.end).then_some(m)
    }

    /// All mappings, sorted by start.
    pub fn mappings(&self) -> &[Mapping] {
        &self.mappings
    }

    /// Fold a newer reading into this one: newer mappings replace every older mapping they
    /// overlap; older mappings that nothing newer overlaps are kept (a library dlclose'd since,
    /// or the process has exited and its last reading is all we have).
    pub fn update(&mut self, newer: ProcMaps) {
        let old = std::mem::take(&mut self.mappings);
        let mut merged = newer.mappings;
        let newer_len = merged.len();
        for m in old {
            // First newer mapping that ends after `m` starts; it overlaps `m` iff it also starts
            // before `m` ends (newer is sorted and non-overlapping, so ends are sorted too).
            let idx = merged[..newer_len].partition_point(|n| n.end <= m.start);
            let overlaps = merged[..newer_len]
                .get(idx)
                .is_some_and(|n| n.start < m.end);
            if !overlaps {
                merged.push(m);
            }
        }
        merged.sort_by_key(|m| m.start);
        self.mappings = merged;
    }

    /// Reduces a runtime address to (module, offset); see [`NormalizedAddr`].
    pub fn normalize(&self, addr: u64) -> NormalizedAddr {
        match self.find(addr) {
            None => NormalizedAddr {
                address: addr,
                module: None,
                offset: addr,
            },
            Some(m) => {
                let delta = addr - m.start;
                let offset = if m.is_file_backed() {
                    delta.wrapping_add(m.offset)
                } else {
                    delta
                };
                NormalizedAddr {
                    address: addr,
                    module: m.path.clone(),
                    offset,
                }
            }
        }
    }
}

/// Splits off the next whitespace-delimited field, skipping leading blanks.
fn next_field<'a>(rest: &mut &'a str) -> Option<&'a str> {
    let s = rest.trim_start_matches([' ', '\t']);
    if s.is_empty() {
        return None;
    }
    let end = s.find([' ', '\t']).unwrap_or(s.len());
    let (field, tail) = s.split_at(end);
    *rest = tail;
    Some(field)
}

/// The mappings of a maps file's non-blank lines, each with its 1-based line number; a
/// malformed line is an error naming it.
fn numbered_lines(text: &str) -> impl Iterator<Item = Result<(usize, Mapping), MapsError>> + '_ {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            parse_line(line)
                .map(|m| (i + 1, m))
                .map_err(|reason| MapsError::BadLine {
                    line_no: i + 1,
                    line: line.to_owned(),
                    reason,
                })
        })
}

fn parse_line(line: &str) -> Result<Mapping, &'static str> {
    let mut rest = line;
    let range = next_field(&mut rest).ok_or("missing address range")?;
    let perms = next_field(&mut rest).ok_or("missing permissions")?;
    let offset = next_field(&mut rest).ok_or("missing offset")?;
    let dev = next_field(&mut rest).ok_or("missing device")?;
    let inode = next_field(&mut rest).ok_or("missing inode")?;

    let (start, end) = range.split_once('-').ok_or("address range without '-'")?;
    let start = u64::from_str_radix(start, 16).map_err(|_| "bad start address")?;
    let end = u64::from_str_radix(end, 16).map_err(|_| "bad end address")?;
    if end <= start {
        return Err("end address not above start");
    }
    if perms.len() != 4 {
        return Err("permissions not 4 characters");
    }
    let offset = u64::from_str_radix(offset, 16).map_err(|_| "bad offset")?;
    let (major, minor) = dev.split_once(':').ok_or("device without ':'")?;
    let (Ok(major), Ok(minor)) = (u32::from_str_radix(major, 16), u32::from_str_radix(minor, 16))
    else {
        return Err("bad device");
    };
    let dev = libc::makedev(major, minor);
    let inode: u64 = inode.parse().map_err(|_| "bad inode")?;

    // The path is everything after the padding, and may itself contain spaces; only the leading
    // padding is removed so that a name ending in a space survives.
    let path = rest.trim_start_matches([' ', '\t']);
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    let path = (!path.is_empty()).then(|| path.to_owned());

    Ok(Mapping {
        start,
        end,
        perms: perms.to_owned(),
        offset,
        dev,
        inode,
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
55d0c8a00000-55d0c8a02000 r--p 00000000 fe:00 247282                     /usr/bin/head
55d0c8a02000-55d0c8a08000 r-xp 00002000 fe:00 247282                     /usr/bin/head
55d0c9b6f000-55d0c9b90000 rw-p 00000000 00:00 0                          [heap]
7f1c2a000000-7f1c2a021000 rw-p 00000000 00:00 0 
7f1c2a200000-7f1c2a226000 r--p 00000000 fe:00 262311                     /usr/lib/x86_64-linux-gnu/libc.so.6
7f1c2a226000-7f1c2a37b000 r-xp 00026000 fe:00 262311                     /usr/lib/x86_64-linux-gnu/libc.so.6
7f1c2a400000-7f1c2a401000 r-xp 00001000 fe:00 99                         /tmp/my dir/lib foo.so (deleted)
7ffd5a1f0000-7ffd5a211000 rw-p 00000000 00:00 0                          [stack]
7ffd5a3e5000-7ffd5a3e7000 r-xp 00000000 00:00 0                          [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";

    fn sample() -> ProcMaps {
        ProcMaps::parse(SAMPLE).expect("sample maps parse")
    }

    fn mapping(start: u64, end: u64, path: &str) -> Mapping {
        Mapping {
            start,
            end,
            perms: "r-xp".into(),
            offset: 0,
            dev: 0,
            inode: 1,
            path: Some(path.into()),
        }
    }

    #[test]
    fn parses_every_kind_of_line() {
        let maps = sample();
        let m = maps.mappings();
        assert_eq!(m.len(), 10);
        assert_eq!(
            m[1],
            Mapping {
                start: 0x55d0c8a02000,
                end: 0x55d0c8a08000,
                perms: "r-xp".into(),
                offset: 0x2000,
                dev: libc::makedev(0xfe, 0),
                inode: 247282,
                path: Some("/usr/bin/head".into()),
            }
        );
        assert_eq!(m[2].path.as_deref(), Some("[heap]"));
        assert_eq!(m[3].path, None, "anonymous line with trailing blank");
        assert_eq!(m[3].perms, "rw-p");
        assert_eq!(m[5].offset, 0x26000);
        assert_eq!(m[6].path.as_deref(), Some("/tmp/my dir/lib foo.so"));
        assert_eq!(m[6].inode, 99);
        assert_eq!(m[8].path.as_deref(), Some("[vdso]"));
        assert_eq!(m[9].start, 0xffffffffff600000);
    }

    #[test]
    fn parses_real_self_maps() {
        let maps = ProcMaps::read(std::process::id()).expect("read own maps");
        assert!(
            maps.mappings()
                .iter()
                .any(|m| m.path.as_deref() == Some("[stack]"))
        );
    }

    #[test]
    fn own_executable_is_the_file_its_mapping_shows_and_another_is_not() {
        let maps = ProcMaps::read(std::process::id()).expect("read own maps");
        let exe = std::fs::read_link("/proc/self/exe").expect("own exe");
        let m = maps
            .mappings()
            .iter()
            .find(|m| m.path.as_deref().map(std::path::Path::new) == Some(exe.as_path()))
            .unwrap_or_else(|| panic!("{} is not in own maps", exe.display()));
        let meta = std::fs::metadata(&exe).expect("stat own exe");
        assert!(m.file().is(&meta), "{m:?} should be the file {} ({meta:?})", exe.display());
        let other = std::fs::metadata("/proc/self/maps").expect("stat another file");
        assert!(!m.file().is(&other), "{m:?} should not match another file");
        assert_eq!(
            m.file().map_files_path(42),
            PathBuf::from(format!("/proc/42/map_files/{:x}-{:x}", m.start, m.end))
        );
    }

    #[test]
    fn malformed_line_is_an_error_naming_the_line() {
        let text =
            "00400000-00401000 r-xp 00000000 08:01 12 /bin/x\nzz-00401000 r-xp 0 08:01 1 /bin/y\n";
        let err = ProcMaps::parse(text).expect_err("bad start must fail");
        let msg = err.to_string();
        assert!(
            msg.contains("line 2") && msg.contains("zz-00401000"),
            "message was {msg:?}"
        );

        for bad in [
            "00400000 r-xp 00000000 08:01 12 /bin/x",
            "00400000-00401000 r-xp 00000000 08:01",
            "00400000-00401000 r-xp 00000000 0801 12",
            "00400000-00401000 r-xp 00000000 08:01 twelve",
            "00401000-00400000 r-xp 00000000 08:01 12",
            "00400000-00401000 rx 00000000 08:01 12",
        ] {
            assert!(
                ProcMaps::parse(bad).is_err(),
                "accepted malformed line {bad:?}"
            );
        }
    }

    #[test]
    fn overlapping_lines_are_an_error() {
        let text = "1000-3000 r-xp 0 08:01 1 /a\n2000-4000 r-xp 0 08:01 1 /b\n";
        assert!(matches!(
            ProcMaps::parse(text),
            Err(MapsError::Overlap { line_no: 2, .. })
        ));
    }

    #[test]
    fn a_torn_reading_keeps_the_later_of_overlapping_lines() {
        // As a reading taken while the process remaps can look: 2000-4000 was read first, then
        // the range was remapped as 1000-3000 and 3000-5000, printed after it; 6000-7000 twice.
        let text = "\
            2000-4000 rw-p 0 00:00 0\n\
            6000-7000 r--p 0 08:01 5 /c\n\
            1000-3000 r-xp 0 08:01 1 /a\n\
            3000-5000 r-xp 0 08:01 1 /b\n\
            6000-7000 r--p 0 08:01 5 /c\n\
            9000-a000 rw-p 0 00:00 0\n";
        assert!(ProcMaps::parse(text).is_err(), "the strict parser sees the tear");
        let maps = ProcMaps::parse_torn(text).expect("mended");
        let spans: Vec<(u64, u64, Option<&str>)> = maps
            .mappings()
            .iter()
            .map(|m| (m.start, m.end, m.path.as_deref()))
            .collect();
        assert_eq!(
            spans,
            vec![
                (0x1000, 0x3000, Some("/a")),
                (0x3000, 0x5000, Some("/b")),
                (0x6000, 0x7000, Some("/c")),
                (0x9000, 0xa000, None),
            ]
        );
        assert!(ProcMaps::parse_torn("1000-2000 rw-p nonsense").is_err());
    }

    #[test]
    fn the_maps_of_a_process_that_maps_and_unmaps_all_the_time_are_read() {
        // Threads that keep mapping and unmapping while this thread reads its own maps: the
        // condition under which the kernel prints overlapping lines (seen in CI).
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let churners: Vec<_> = (0..2)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    const LEN: usize = 64 * 4096;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        // SAFETY: a fresh anonymous mapping of our own, split by mprotect and
                        // unmapped again; nothing else refers to it.
                        unsafe {
                            let p = libc::mmap(
                                std::ptr::null_mut(),
                                LEN,
                                libc::PROT_READ | libc::PROT_WRITE,
                                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                                -1,
                                0,
                            );
                            assert_ne!(p, libc::MAP_FAILED);
                            for page in (0..64).step_by(2) {
                                libc::mprotect(p.cast::<u8>().add(page * 4096).cast(), 4096, libc::PROT_READ);
                            }
                            libc::munmap(p, LEN);
                        }
                    }
                })
            })
            .collect();
        for _ in 0..500 {
            let maps = ProcMaps::read(std::process::id()).expect("read own maps while they change");
            assert!(maps.mappings().windows(2).all(|w| w[0].end <= w[1].start));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in churners {
            t.join().unwrap();
        }
    }

    #[test]
    fn find_is_start_inclusive_end_exclusive() {
        let maps = sample();
        let heap = maps.find(0x55d0c9b6f000).expect("heap start");
        assert_eq!(heap.path.as_deref(), Some("[heap]"));
        assert_eq!(
            maps.find(0x55d0c9b8ffff).map(|m| m.start),
            Some(0x55d0c9b6f000)
        );
        assert!(maps.find(0x55d0c9b90000).is_none(), "end is exclusive");
        assert!(maps.find(0x55d0c8a00000 - 1).is_none());
        assert!(maps.find(0).is_none());
        // Adjacent mappings: the end of one is the start of the next.
        assert_eq!(maps.find(0x55d0c8a02000).map(|m| m.offset), Some(0x2000));
        assert_eq!(maps.find(0x55d0c8a01fff).map(|m| m.offset), Some(0));
        assert!(maps.find(u64::MAX).is_none());
    }

    #[test]
    fn update_replaces_overlapped_and_keeps_the_rest() {
        let mut maps = ProcMaps {
            mappings: vec![
                mapping(0x1000, 0x2000, "/kept-a"),
                mapping(0x3000, 0x5000, "/replaced-1"),
                mapping(0x5000, 0x6000, "/replaced-2"),
                mapping(0x8000, 0x9000, "/kept-b"),
            ],
        };
        let newer = ProcMaps {
            mappings: vec![
                mapping(0x2000, 0x3000, "/new-adjacent"),
                mapping(0x4000, 0x5800, "/new"),
            ],
        };
        maps.update(newer);
        let paths: Vec<_> = maps
            .mappings()
            .iter()
            .map(|m| m.path.clone().unwrap())
            .collect();
        assert_eq!(paths, ["/kept-a", "/new-adjacent", "/new", "/kept-b"]);
        assert!(
            maps.find(0x3000).is_none(),
            "replaced mapping's uncovered part is gone"
        );
        assert_eq!(
            maps.find(0x8800).and_then(|m| m.path.as_deref()),
            Some("/kept-b")
        );

        // An empty newer reading (process exited) keeps everything.
        let before = maps.clone();
        maps.update(ProcMaps::default());
        assert_eq!(maps, before);
    }

    #[test]
    fn normalize_file_backed_anonymous_and_unmapped() {
        let maps = sample();
        let n = maps.normalize(0x7f1c2a226000 + 0x1234);
        assert_eq!(
            n.module.as_deref(),
            Some("/usr/lib/x86_64-linux-gnu/libc.so.6")
        );
        assert_eq!(n.offset, 0x26000 + 0x1234, "mapping offset is added");
        assert_eq!(n.address, 0x7f1c2a226000 + 0x1234);

        let n = maps.normalize(0x7f1c2a000010);
        assert_eq!((n.module, n.offset), (None, 0x10), "anonymous");

        let n = maps.normalize(0x7ffd5a3e5000 + 0x9a0);
        assert_eq!((n.module.as_deref(), n.offset), (Some("[vdso]"), 0x9a0));

        let n = maps.normalize(0x55d0c9b6f000 + 8);
        assert_eq!((n.module.as_deref(), n.offset), (Some("[heap]"), 8));

        let n = maps.normalize(0x1234);
        assert_eq!(
            n,
            NormalizedAddr {
                address: 0x1234,
                module: None,
                offset: 0x1234
            }
        );
    }
}
