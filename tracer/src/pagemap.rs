//! Which pages of chosen address ranges of a process are in RAM, from /proc/PID/pagemap
//! (one 8-byte entry per page, bit 63 = present). smaps says the same per kernel VMA only,
//! and adjacent anonymous mappings made by different stacks merge into one VMA.
use std::{fs::File, os::unix::fs::FileExt};

pub const PAGE: u64 = 4096;
const PRESENT: u64 = 1 << 63;
/// Entries per read: 512 KiB of pagemap covers 256 MiB of address space.
const CHUNK_PAGES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PagemapError {
    #[error("open /proc/{pid}/pagemap")]
    Open {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("read /proc/{pid}/pagemap at {addr:#x}")]
    Read {
        pid: u32,
        addr: u64,
        #[source]
        source: std::io::Error,
    },
}

/// One range read: a bit per page, set when the page was in RAM.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Bits {
    start: u64,
    end: u64,
    words: Vec<u64>,
}

impl Bits {
    fn count(&self, start: u64, end: u64) -> u64 {
        let (start, end) = (start.max(self.start), end.min(self.end));
        if start >= end {
            return 0;
        }
        let first = (start - self.start) / PAGE;
        let last = (end - self.start).div_ceil(PAGE);
        (first..last).filter(|&p| self.words[(p / 64) as usize] & (1 << (p % 64)) != 0).count() as u64
    }
}

/// The pages in RAM within some address ranges of a process, read at one moment. Pages
/// outside the ranges read count as not present.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Present {
    /// Sorted by start, not overlapping.
    ranges: Vec<Bits>,
}

/// Sorts `ranges`, rounds them out to pages and merges those that touch or overlap.
fn merged(ranges: impl IntoIterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = ranges
        .into_iter()
        .map(|(s, e)| (s - s % PAGE, e.div_ceil(PAGE) * PAGE))
        .filter(|(s, e)| s < e)
        .collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

impl Present {
    /// Reads the pagemap entries of `ranges` in process `pid`.
    pub fn read(pid: u32, ranges: impl IntoIterator<Item = (u64, u64)>) -> Result<Present, PagemapError> {
        let file = File::open(format!("/proc/{pid}/pagemap")).map_err(|source| PagemapError::Open { pid, source })?;
        Present::read_from(&file, ranges).map_err(|(addr, source)| PagemapError::Read { pid, addr, source })
    }

    fn read_from(file: &File, ranges: impl IntoIterator<Item = (u64, u64)>) -> Result<Present, (u64, std::io::Error)> {
        let mut buf = vec![0u8; (CHUNK_PAGES * 8) as usize];
        let mut out = Vec::new();
        for (start, end) in merged(ranges) {
            let pages = (end - start) / PAGE;
            let mut words = vec![0u64; pages.div_ceil(64) as usize];
            let mut page = 0;
            while page < pages {
                let n = (pages - page).min(CHUNK_PAGES);
                let addr = start + page * PAGE;
                let want = &mut buf[..(n * 8) as usize];
                // Addresses beyond the user address space end the file early: not present.
                let got = read_full(file, want, addr / PAGE * 8).map_err(|e| (addr, e))? / 8;
                for (i, entry) in want[..got * 8].chunks_exact(8).enumerate() {
                    let entry = u64::from_ne_bytes(entry.try_into().expect("8 bytes"));
                    if entry & PRESENT != 0 {
                        let p = page + i as u64;
                        words[(p / 64) as usize] |= 1 << (p % 64);
                    }
                }
                page += n;
            }
            out.push(Bits { start, end, words });
        }
        Ok(Present { ranges: out })
    }

    /// Bytes of `[start, end)` in RAM.
    pub fn bytes(&self, start: u64, end: u64) -> u64 {
        let from = self.ranges.partition_point(|b| b.end <= start);
        self.ranges[from..]
            .iter()
            .take_while(|b| b.start < end)
            .map(|b| b.count(start, end) * PAGE)
            .sum()
    }

    /// Pagemap entries read (8 bytes each).
    pub fn pages_read(&self) -> u64 {
        self.ranges.iter().map(|b| (b.end - b.start) / PAGE).sum()
    }
}

fn read_full(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_rounded_to_pages_sorted_and_merged() {
        assert_eq!(
            merged([(0x5000, 0x6001), (0x1000, 0x2000), (0x2000, 0x3000), (0x7000, 0x7000), (0x5800, 0x5900)]),
            vec![(0x1000, 0x3000), (0x5000, 0x7000)]
        );
    }

    #[test]
    fn counts_only_the_pages_asked_for() {
        let p = Present {
            ranges: vec![
                Bits { start: 0x10000, end: 0x10000 + 70 * PAGE, words: vec![0b1011, 1 << 5] },
                Bits { start: 0x100000, end: 0x100000 + 2 * PAGE, words: vec![0b11] },
            ],
        };
        assert_eq!(p.bytes(0, u64::MAX), 6 * PAGE);
        assert_eq!(p.bytes(0x10000, 0x10000 + 2 * PAGE), 2 * PAGE);
        assert_eq!(p.bytes(0x10000 + PAGE, 0x10000 + 64 * PAGE), 2 * PAGE);
        assert_eq!(p.bytes(0x10000 + 69 * PAGE, 0x100000 + PAGE), 2 * PAGE);
        assert_eq!(p.bytes(0x20000000, 0x30000000), 0);
        assert_eq!(p.pages_read(), 72);
    }

    #[test]
    fn reads_which_pages_of_its_own_mapping_are_in_ram() {
        let pages = 200usize;
        let len = pages * PAGE as usize;
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let base = p as u64;
        // Touch every third page of the first 150: 50 pages.
        for i in (0..150).step_by(3) {
            // SAFETY: within the mapping.
            unsafe { *(p as *mut u8).add(i * PAGE as usize) = 1 };
        }
        let present = Present::read(std::process::id(), [(base, base + len as u64)]).unwrap();
        let whole = present.bytes(base, base + len as u64);
        let tail = present.bytes(base + 150 * PAGE, base + len as u64);
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(p, len) };
        assert_eq!((whole, tail), (50 * PAGE, 0));
    }
}
