//! Reading the target's memory: a small trait, `process_vm_readv` for a live process and an
//! in-memory fake for tests. Every read may fail (unmapped, the process gone).

use std::collections::BTreeMap;
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
    fn v8_process_memory_reads_this_process() {
        let value: u64 = 0x1122_3344_5566_7788;
        let me = ProcessMemory::new(std::process::id() as i32);
        assert_eq!(me.read_u64(&value as *const u64 as u64), Ok(value));
        assert!(me.read_u64(8).is_err(), "page zero is unmapped");
    }
}
