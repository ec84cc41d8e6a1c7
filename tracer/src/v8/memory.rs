//! Reading the target's memory: a small trait, `process_vm_readv` for a live process and an
//! in-memory fake for tests. Every read may fail (unmapped, the process gone).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io::IoSliceMut;

use nix::sys::uio::{RemoteIoVec, process_vm_readv};
use nix::unistd::Pid;

/// A read that did not return all the bytes asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot read {len} bytes at {addr:#x}")]
pub struct ReadError {
    pub addr: u64,
    pub len: usize,
}

/// Bytes at addresses of one address space.
pub trait Memory {
    /// Fills all of `buf` from `addr`, or fails.
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), ReadError>;

    fn read_u64(&self, addr: u64) -> Result<u64, ReadError> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn read_u32(&self, addr: u64) -> Result<u32, ReadError> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn read_u16(&self, addr: u64) -> Result<u16, ReadError> {
        let mut b = [0u8; 2];
        self.read(addr, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }
}

/// Another process's memory, through `process_vm_readv` (needs ptrace access to it, never
/// writes, never stops it).
#[derive(Debug, Clone, Copy)]
pub struct ProcessMemory {
    pid: Pid,
}

impl ProcessMemory {
    pub fn new(pid: i32) -> ProcessMemory {
        ProcessMemory {
            pid: Pid::from_raw(pid),
        }
    }
}

impl Memory for ProcessMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        let err = ReadError {
            addr,
            len: buf.len(),
        };
        if buf.is_empty() {
            return Ok(());
        }
        let remote = [RemoteIoVec {
            base: usize::try_from(addr).map_err(|_| err)?,
            len: buf.len(),
        }];
        let len = buf.len();
        let mut local = [IoSliceMut::new(buf)];
        match process_vm_readv(self.pid, &mut local, &remote) {
            Ok(n) if n == len => Ok(()),
            _ => Err(err),
        }
    }
}

const PAGE: u64 = 4096;
/// Reads longer than this go straight to the inner memory (a script's source).
const MAX_CACHED_READ: usize = 2 * PAGE as usize;
/// Pages kept before the cache is emptied and starts over.
const MAX_PAGES: usize = 1024;

/// Whole pages read once and served from then on: naming one frame touches a few dozen words
/// in a handful of pages, and each `process_vm_readv` costs a system call. The target keeps
/// running, so a cache must live no longer than one batch of resolutions (one stack, or the
/// stacks of one poll); a page that cannot be read whole is read directly, as asked.
pub struct CachedMemory<'a, M: Memory + ?Sized> {
    inner: &'a M,
    pages: RefCell<HashMap<u64, Option<Box<[u8]>>>>,
}

impl<'a, M: Memory + ?Sized> CachedMemory<'a, M> {
    pub fn new(inner: &'a M) -> Self {
        CachedMemory {
            inner,
            pages: RefCell::new(HashMap::new()),
        }
    }

    /// Copies what the cache holds of [addr, addr + buf.len()) within one page, or `None`.
    fn copy_from_page(&self, page: u64, addr: u64, buf: &mut [u8]) -> Option<()> {
        let mut pages = self.pages.borrow_mut();
        if pages.len() >= MAX_PAGES && !pages.contains_key(&page) {
            pages.clear();
        }
        let bytes = pages.entry(page).or_insert_with(|| {
            let mut b = vec![0u8; PAGE as usize].into_boxed_slice();
            self.inner.read(page, &mut b).ok().map(|()| b)
        });
        let bytes = bytes.as_ref()?;
        let at = (addr - page) as usize;
        buf.copy_from_slice(bytes.get(at..at + buf.len())?);
        Some(())
    }
}

impl<M: Memory + ?Sized> Memory for CachedMemory<'_, M> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        if buf.len() > MAX_CACHED_READ {
            return self.inner.read(addr, buf);
        }
        let mut done = 0;
        while done < buf.len() {
            let at = addr.wrapping_add(done as u64);
            let page = at & !(PAGE - 1);
            let n = ((page + PAGE - at) as usize).min(buf.len() - done);
            if self
                .copy_from_page(page, at, &mut buf[done..done + n])
                .is_none()
            {
                // An unreadable page (a guard page next to a readable object): ask for
                // exactly the bytes wanted.
                return self.inner.read(addr, buf);
            }
            done += n;
        }
        Ok(())
    }
}

/// Memory made of byte blocks placed at addresses, for tests: a read must fall inside one block.
#[derive(Debug, Default, Clone)]
pub struct FakeMemory {
    blocks: BTreeMap<u64, Vec<u8>>,
}

impl FakeMemory {
    pub fn new() -> FakeMemory {
        FakeMemory::default()
    }

    /// Places `bytes` at `addr` (blocks must not overlap).
    pub fn put(&mut self, addr: u64, bytes: Vec<u8>) {
        self.blocks.insert(addr, bytes);
    }

    /// Writes into an existing block.
    pub fn write(&mut self, addr: u64, bytes: &[u8]) {
        let (start, block) = self
            .blocks
            .range_mut(..=addr)
            .next_back()
            .expect("write inside a block");
        let at = (addr - start) as usize;
        block[at..at + bytes.len()].copy_from_slice(bytes);
    }

    pub fn write_u64(&mut self, addr: u64, v: u64) {
        self.write(addr, &v.to_le_bytes());
    }
}

impl Memory for FakeMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        let err = ReadError {
            addr,
            len: buf.len(),
        };
        let (start, block) = self.blocks.range(..=addr).next_back().ok_or(err)?;
        let at = usize::try_from(addr - start).map_err(|_| err)?;
        let end = at.checked_add(buf.len()).ok_or(err)?;
        buf.copy_from_slice(block.get(at..end).ok_or(err)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v8_fake_memory_reads_only_inside_blocks() {
        let mut m = FakeMemory::new();
        m.put(0x1000, vec![1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(m.read_u32(0x1000), Ok(0x0403_0201));
        assert_eq!(m.read_u16(0x1006), Ok(0x0807));
        assert!(m.read_u64(0x1004).is_err(), "crosses the block's end");
        assert!(m.read_u16(0xfff).is_err(), "before the block");
    }

    #[test]
    fn v8_cached_memory_reads_what_the_inner_memory_holds() {
        let mut m = FakeMemory::new();
        // A page and a half of counting bytes, starting mid-page.
        let bytes: Vec<u8> = (0..6144u32).map(|i| (i % 251) as u8).collect();
        m.put(0x10800, bytes.clone());
        let c = CachedMemory::new(&m);
        // Whole pages of the fake do not exist, so every read falls back to the exact range.
        assert_eq!(c.read_u64(0x10800), m.read_u64(0x10800));
        let mut b = [0u8; 100];
        c.read(0x10fd0, &mut b).unwrap();
        assert_eq!(&b[..], &bytes[0x7d0..0x7d0 + 100]);
        assert!(c.read_u64(0x10000).is_err());
        // Process memory, where pages are whole: a read spanning a page boundary.
        let big: Vec<u8> = (0..3 * PAGE as u32).map(|i| (i % 253) as u8).collect();
        let me = ProcessMemory::new(std::process::id() as i32);
        let cached = CachedMemory::new(&me);
        let base = big.as_ptr() as u64;
        let cross = (base & !(PAGE - 1)) + PAGE - 3;
        let mut b = [0u8; 8];
        cached.read(cross, &mut b).unwrap();
        let at = (cross - base) as usize;
        assert_eq!(&b[..], &big[at..at + 8]);
        assert!(cached.read_u64(8).is_err());
    }

    #[test]
    fn v8_process_memory_reads_this_process() {
        let value: u64 = 0x1122_3344_5566_7788;
        let me = ProcessMemory::new(std::process::id() as i32);
        assert_eq!(me.read_u64(&value as *const u64 as u64), Ok(value));
        assert!(me.read_u64(8).is_err(), "page zero is unmapped");
    }
}
