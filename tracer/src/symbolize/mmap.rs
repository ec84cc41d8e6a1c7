//! Read-only mappings of module and debug files: only the pages a lookup touches are read, a
//! fraction of a 98 MB node binary.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// A read-only private mapping of a whole file.
#[derive(Debug)]
pub(crate) struct Mmap {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value; sharing or moving it between threads
// is no different from sharing a `&[u8]`.
unsafe impl Send for Mmap {}
// SAFETY: as above: nothing ever writes through `ptr`.
unsafe impl Sync for Mmap {}

impl Mmap {
    pub(crate) fn open(path: &Path) -> Option<Mmap> {
        Mmap::open_with_meta(path).map(|(map, _)| map)
    }

    /// [`Mmap::open`], with what the opened file is (so that a check of its identity and the
    /// mapping are of one and the same file).
    pub(crate) fn open_with_meta(path: &Path) -> Option<(Mmap, std::fs::Metadata)> {
        // Non-blocking, so that a FIFO named as a module (a saved report's path, a debuglink
        // name) is refused below instead of blocking the open until a writer comes.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .ok()?;
        let meta = file.metadata().ok()?;
        if !meta.is_file() {
            // A directory or a device: nothing to symbolize from, and mmap would fail or block.
            return None;
        }
        let len = usize::try_from(meta.len()).ok()?;
        if len == 0 {
            // mmap rejects a zero length, and an empty file has no symbols anyway.
            return None;
        }
        // SAFETY: a fresh read-only private mapping of a file we opened; no Rust object aliases
        // it. The descriptor may be closed afterwards: the mapping keeps its own reference.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        Some((Mmap { ptr, len }, meta))
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is a live PROT_READ mapping of `len` bytes until `drop`. A file
        // truncated by someone else while mapped would fault (SIGBUS) on access; module files
        // are executables and libraries in use, which are not truncated in place.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len) }
    }

    /// The mapped bytes with a lifetime the caller vouches for.
    ///
    /// # Safety
    /// The caller must drop every borrow of the returned slice before this `Mmap` is dropped
    /// (e.g. by declaring the borrowing field before the `Mmap` in the same struct).
    pub(crate) unsafe fn as_static_slice(&self) -> &'static [u8] {
        // SAFETY: as in `as_slice`; the lifetime is the caller's promise.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len) }
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `open` mapped; no slice of it outlives `self`.
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: a saved report naming a FIFO as a module made `tracer report --resymbolize`
    /// block forever in open(2).
    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = std::env::temp_dir().join(format!("mmap-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("module.so");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let (tx, rx) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send(Mmap::open(&path).is_none());
        });
        let refused = rx.recv_timeout(std::time::Duration::from_secs(10));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(refused, Ok(true), "Mmap::open on a FIFO should return None at once");
    }
}
