//! The in-process sampler (tracer-sampler), built from source by tracer's build script and
//! embedded here as a shared object, and a loader that maps it into this process (for tests
//! and benchmarks: nothing is patched, callers call the hooks through their addresses).
//!
//! The design, which tracer-sampler/src/lib.rs spells out:
//! - Each hook replaces one function of glibc's malloc family (and free). It calls the real
//!   function through `Control::real`, then counts the bytes down on its thread's countdown
//!   and, at a sample point, reports the block to the **alloc probe site**, where the tracer's
//!   uprobe captures the stack. The free of a block the sampled set holds is reported to the
//!   **free probe site** first. Everything else costs a few instructions and no trap: the
//!   probe sites exist so that only sampled events enter the kernel.
//! - Countdowns live in a fixed table indexed by a hash of the thread pointer, since the
//!   sampler has no TLS of its own in the target. Threads that share a slot share one byte
//!   stream; the countdown is memoryless and each update one compare-and-swap, so estimates
//!   stay unbiased (`threads_sharing_one_countdown_sample_like_one_thread` checks it).
//! - A call whose return address lies in `Control::internal` (glibc's allocator code) or in
//!   the sampler itself (a real function that tail-jumps to another hooked one returns into
//!   the hook that called it) is glibc calling itself: it passes straight through.
//! - `Control::active == 0` makes every hook a plain call of the real function: that is how
//!   the object is built, and how a tracer leaves it on detach or by dying.

use std::{ffi::CStr, ptr::NonNull};

use tracer_common::sampler::{Control, HOOKS, Hook};

use super::image::{ImageError, PAGE, SamplerImage};

#[repr(C, align(4096))]
struct Aligned<T: ?Sized>(T);

/// The sampler's shared object, as built (page-aligned, so it can be parsed in place).
static SAMPLER_SO: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(
    env!("OUT_DIR"),
    "/tracer_sampler.so"
)));

/// The bytes of the sampler's shared object: what a loader maps (from a memfd, say).
pub fn sampler_so() -> &'static [u8] {
    &SAMPLER_SO.0
}

/// Segments and symbols of the embedded sampler (checked when tracer was built).
pub fn image() -> Result<SamplerImage, ImageError> {
    SamplerImage::parse(sampler_so())
}

/// Why the sampler could not be loaded into this process.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("map {0} bytes for the sampler")]
    Map(usize, #[source] std::io::Error),
    #[error("set the protection of the sampler's segment at {0:#x}")]
    Protect(u64, #[source] std::io::Error),
    #[error("this process's libc has no {0}")]
    NoLibcSymbol(&'static str),
}

/// The embedded sampler mapped into this process as a loader would map it into a target: its
/// PT_LOAD segments at a fresh base with their own protections, relative relocations applied
/// (there are none today), nothing patched. Unmapped on drop: no thread may still be inside
/// a hook then.
pub struct LocalSampler {
    base: NonNull<u8>,
    image: SamplerImage,
}

impl LocalSampler {
    pub fn load() -> Result<LocalSampler, LoadError> {
        let image = image()?;
        let bytes = sampler_so();
        let span = image.span as usize;
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(LoadError::Map(span, std::io::Error::last_os_error()));
        }
        let sampler = LocalSampler {
            base: NonNull::new(base.cast()).expect("mmap returned a mapping"),
            image,
        };
        let base = sampler.base.as_ptr();
        for s in &sampler.image.segments {
            // SAFETY: parse checked that the segment lies in the file and within the span.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    bytes[s.offset as usize..][..s.file_size as usize].as_ptr(),
                    base.add(s.vaddr as usize),
                    s.file_size as usize,
                );
            }
        }
        for &(offset, addend) in &sampler.image.relative {
            // SAFETY: parse checked that the word lies in a writable segment.
            unsafe {
                base.add(offset as usize)
                    .cast::<u64>()
                    .write_unaligned(base as u64 + addend)
            };
        }
        // Each page gets the union of the protections of the segments on it.
        let pages = span / PAGE as usize;
        let mut prot = vec![libc::PROT_NONE; pages];
        for s in &sampler.image.segments {
            let first = (s.vaddr / PAGE) as usize;
            let last = (s.vaddr + s.mem_size).div_ceil(PAGE) as usize;
            for p in &mut prot[first..last] {
                *p |= (if s.read { libc::PROT_READ } else { 0 })
                    | (if s.write { libc::PROT_WRITE } else { 0 })
                    | (if s.exec { libc::PROT_EXEC } else { 0 });
            }
        }
        let mut start = 0;
        while start < pages {
            let mut end = start + 1;
            while end < pages && prot[end] == prot[start] {
                end += 1;
            }
            let at = start * PAGE as usize;
            // SAFETY: pages of our own mapping.
            if unsafe {
                libc::mprotect(
                    base.add(at).cast(),
                    (end - start) * PAGE as usize,
                    prot[start],
                )
            } != 0
            {
                return Err(LoadError::Protect(
                    at as u64,
                    std::io::Error::last_os_error(),
                ));
            }
            start = end;
        }
        Ok(sampler)
    }

    /// The embedded sampler mapped from `file`, which holds [`sampler_so`]'s bytes (a memfd,
    /// say): each segment a private mapping of the file, as a dynamic loader maps a library,
    /// so that uprobes placed on the file's inode (the probe sites) fire in this process.
    /// Segments must not share a page of the address space (the build's do not).
    pub fn load_from_file(file: std::os::fd::BorrowedFd<'_>) -> Result<LocalSampler, LoadError> {
        use std::os::fd::AsRawFd as _;
        let image = image()?;
        let span = image.span as usize;
        // The whole span first, inaccessible: the segments go in at their offsets from it.
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(LoadError::Map(span, std::io::Error::last_os_error()));
        }
        let sampler = LocalSampler {
            base: NonNull::new(base.cast()).expect("mmap returned a mapping"),
            image,
        };
        let base = sampler.base.as_ptr();
        let mut taken_until = 0;
        for s in &sampler.image.segments {
            let start = s.vaddr / PAGE * PAGE;
            let file_end = (s.vaddr + s.file_size).div_ceil(PAGE) * PAGE;
            let mem_end = (s.vaddr + s.mem_size).div_ceil(PAGE) * PAGE;
            if start < taken_until {
                return Err(LoadError::Image(ImageError::Malformed(
                    "two segments share a page",
                )));
            }
            taken_until = mem_end;
            let prot = (if s.read { libc::PROT_READ } else { 0 })
                | (if s.write { libc::PROT_WRITE } else { 0 })
                | (if s.exec { libc::PROT_EXEC } else { 0 });
            if file_end > start {
                // SAFETY: pages of our own reservation, replaced by the file's.
                let at = unsafe {
                    libc::mmap(
                        base.add(start as usize).cast(),
                        (file_end - start) as usize,
                        prot,
                        libc::MAP_PRIVATE | libc::MAP_FIXED,
                        file.as_raw_fd(),
                        (s.offset - (s.vaddr - start)) as libc::off_t,
                    )
                };
                if at == libc::MAP_FAILED {
                    return Err(LoadError::Map(
                        (file_end - start) as usize,
                        std::io::Error::last_os_error(),
                    ));
                }
            }
            if s.mem_size > s.file_size {
                // The file's page past the segment's bytes holds other data: zero it, and
                // give the pages after it anonymous zeros.
                let zero_end = (s.vaddr + s.mem_size).min(file_end);
                if zero_end > s.vaddr + s.file_size {
                    if !s.write {
                        return Err(LoadError::Image(ImageError::Malformed(
                            "a read-only segment is longer in memory than in the file",
                        )));
                    }
                    // SAFETY: writable pages of the segment just mapped.
                    unsafe {
                        std::ptr::write_bytes(
                            base.add((s.vaddr + s.file_size) as usize),
                            0,
                            (zero_end - s.vaddr - s.file_size) as usize,
                        )
                    };
                }
                if mem_end > file_end {
                    // SAFETY: pages of our own reservation.
                    let at = unsafe {
                        libc::mmap(
                            base.add(file_end as usize).cast(),
                            (mem_end - file_end) as usize,
                            prot,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                            -1,
                            0,
                        )
                    };
                    if at == libc::MAP_FAILED {
                        return Err(LoadError::Map(
                            (mem_end - file_end) as usize,
                            std::io::Error::last_os_error(),
                        ));
                    }
                }
            }
        }
        for &(offset, addend) in &sampler.image.relative {
            // SAFETY: parse checked that the word lies in a writable segment.
            unsafe {
                base.add(offset as usize)
                    .cast::<u64>()
                    .write_unaligned(base as u64 + addend)
            };
        }
        Ok(sampler)
    }

    /// The load base: every address of the image is an offset from it.
    pub fn base(&self) -> u64 {
        self.base.as_ptr() as u64
    }

    pub fn image(&self) -> &SamplerImage {
        &self.image
    }

    /// The control block. Threads in the hooks change it at any time: access shared words
    /// atomically.
    pub fn control(&self) -> *mut Control {
        (self.base() + self.image.control) as *mut Control
    }

    /// The address of a hook, to be called as the libc function it replaces.
    pub fn hook(&self, hook: Hook) -> u64 {
        self.base() + self.image.hooks[hook as usize]
    }

    pub fn alloc_site(&self) -> u64 {
        self.base() + self.image.alloc_site
    }

    pub fn free_site(&self) -> u64 {
        self.base() + self.image.free_site
    }

    /// Points every hook's real function and reported entry at this process's libc
    /// (looked up as the program's own calls resolve them).
    pub fn use_libc(&self) -> Result<(), LoadError> {
        let mut addrs = [0u64; HOOKS];
        for h in Hook::ALL {
            addrs[h as usize] = libc_function(h)?;
        }
        let c = self.control();
        // SAFETY: the block is ours; no thread calls a hook before the caller activates it.
        unsafe {
            (*c).real = addrs;
            (*c).entry = addrs;
        }
        Ok(())
    }
}

/// The file offset of `image`'s address `vaddr` (an offset from the load base), if a segment
/// holds it in the file: where a uprobe on that address is placed.
pub fn file_offset(image: &SamplerImage, vaddr: u64) -> Option<u64> {
    image
        .segments
        .iter()
        .find(|s| (s.vaddr..s.vaddr + s.file_size).contains(&vaddr))
        .map(|s| vaddr - s.vaddr + s.offset)
}

/// The address of `hook`'s libc function in this process.
pub fn libc_function(hook: Hook) -> Result<u64, LoadError> {
    let name = hook.libc_name();
    let mut cname = Vec::with_capacity(name.len() + 1);
    cname.extend_from_slice(name.as_bytes());
    cname.push(0);
    let cname = CStr::from_bytes_with_nul(&cname).expect("a name without NUL");
    // SAFETY: dlsym with a NUL-terminated name.
    let addr = unsafe { libc::dlsym(libc::RTLD_DEFAULT, cname.as_ptr()) };
    if addr.is_null() {
        return Err(LoadError::NoLibcSymbol(name));
    }
    Ok(addr as u64)
}

// SAFETY: the sampler is a mapping of code and a control block that its hooks share between
// threads through atomics; nothing about it belongs to one thread.
unsafe impl Send for LocalSampler {}
unsafe impl Sync for LocalSampler {}

impl Drop for LocalSampler {
    fn drop(&mut self) {
        // SAFETY: our own mapping, which nothing uses any more (see the type's doc).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.image.span as usize) };
    }
}

#[cfg(test)]
mod tests;
