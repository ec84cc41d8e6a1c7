//! A watchdog for the case the tracer cannot clean up after itself: killed with SIGKILL (or
//! by the OOM killer) while its breakpoints are in the target. The kernel then detaches the
//! target's threads, but leaves the int3s and the swapped return addresses in place, and the
//! next allocator call would kill the target with SIGTRAP. The guard is a forked child that
//! shares a small table with the tracer (original bytes of every breakpoint, every swapped
//! return address) and blocks on a pipe. If the pipe closes without the tracer having said
//! "detached", it writes the original bytes and return addresses back through /proc/PID/mem
//! (opened by the tracer before the fork, while it was allowed to) and exits. It only reads
//! and writes memory: no allocation, no locks (it is forked from a threaded process).
use std::{
    ffi::CString,
    sync::atomic::{AtomicU64, Ordering},
};

use super::engine::RETURN_JUMP;

/// Breakpoint sites the table holds.
const MAX_SITES: usize = 16;
/// Swapped return addresses the table holds at once (one per thread inside an allocator).
const MAX_CALLS: usize = 8192;
const DONE: u8 = b'd';

#[repr(C)]
struct Table {
    /// The out-of-line page: the value a swapped return address holds.
    page: AtomicU64,
    sites: [[AtomicU64; 4]; MAX_SITES],
    /// (slot, original return address); slot 0 marks a free entry.
    calls: [[AtomicU64; 2]; MAX_CALLS],
}

pub struct Guard {
    table: *mut Table,
    pipe: libc::c_int,
    pid: libc::pid_t,
    free: Vec<u32>,
}

// SAFETY: the table is only touched through atomics, and the guard lives on one thread.
unsafe impl Send for Guard {}

impl Guard {
    /// Forks the guard for process `target`, whose breakpoints are `sites` (address, original
    /// bytes, at most 16 bytes each) and whose trap page is `page`. None if it cannot be made
    /// (the tracer then runs without one).
    pub fn start(target: i32, sites: &[(u64, Vec<u8>)], page: u64) -> Option<Guard> {
        let size = std::mem::size_of::<Table>();
        // SAFETY: a fresh shared anonymous mapping, zero-filled, which both processes keep.
        let table = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if table == libc::MAP_FAILED {
            return None;
        }
        let table = table.cast::<Table>();
        // SAFETY: the mapping is as large as Table and zeroed, a valid all-zero Table.
        let t = unsafe { &*table };
        t.page.store(page, Ordering::Relaxed);
        for (i, (addr, bytes)) in sites.iter().take(MAX_SITES).enumerate() {
            let mut packed = [0u8; 16];
            packed[..bytes.len().min(16)].copy_from_slice(&bytes[..bytes.len().min(16)]);
            t.sites[i][0].store(*addr, Ordering::Relaxed);
            t.sites[i][1].store(bytes.len().min(16) as u64, Ordering::Relaxed);
            t.sites[i][2].store(
                u64::from_le_bytes(packed[..8].try_into().ok()?),
                Ordering::Relaxed,
            );
            t.sites[i][3].store(
                u64::from_le_bytes(packed[8..].try_into().ok()?),
                Ordering::Relaxed,
            );
        }
        // Opened now, while this process traces the target: once it is dead the guard may not
        // be allowed to open it (a non-root tracer under Yama's ptrace_scope 1, which admits
        // only ancestors; a target that made itself non-dumpable). An open descriptor keeps
        // the access it was opened with.
        let mem_path = CString::new(format!("/proc/{target}/mem")).ok()?;
        // SAFETY: plain syscall with a valid path.
        let mem = unsafe { libc::open(mem_path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if mem < 0 {
            return None;
        }
        let mut fds = [0; 2];
        // SAFETY: plain syscall with a valid array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            // SAFETY: our own descriptor.
            unsafe { libc::close(mem) };
            return None;
        }
        // SAFETY: the child only makes async-signal-safe system calls (see `watch`).
        let child = unsafe { libc::fork() };
        match child {
            -1 => {
                // SAFETY: closing our own descriptors.
                unsafe {
                    libc::close(fds[0]);
                    libc::close(fds[1]);
                    libc::close(mem);
                }
                None
            }
            0 => {
                // SAFETY: in the forked child; never returns.
                unsafe { watch(fds, table, mem) }
            }
            pid => {
                // SAFETY: closing our copies of the read end and of the guard's descriptor.
                unsafe {
                    libc::close(fds[0]);
                    libc::close(mem);
                }
                Some(Guard {
                    table,
                    pipe: fds[1],
                    pid,
                    free: (0..MAX_CALLS as u32).rev().collect(),
                })
            }
        }
    }

    /// A return address swapped at `slot`; the index to drop it by, if the table had room.
    pub fn track(&mut self, slot: u64, orig: u64) -> Option<u32> {
        let i = self.free.pop()?;
        // SAFETY: the table stays mapped as long as the guard.
        let e = unsafe { &(*self.table).calls[i as usize] };
        e[1].store(orig, Ordering::Relaxed);
        e[0].store(slot, Ordering::Release);
        Some(i)
    }

    pub fn untrack(&mut self, i: u32) {
        // SAFETY: as above.
        let e = unsafe { &(*self.table).calls[i as usize] };
        e[0].store(0, Ordering::Release);
        self.free.push(i);
    }

    /// Everything is back in place: the guard may go without touching anything.
    pub fn done(self) {
        // SAFETY: writing one byte to our pipe; the descriptor is closed on drop.
        unsafe { libc::write(self.pipe, [DONE].as_ptr().cast(), 1) };
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // SAFETY: our descriptor, our mapping, our child (reaped if it is done already; else
        // whoever waits for children reaps it).
        unsafe {
            libc::close(self.pipe);
            libc::munmap(self.table.cast(), std::mem::size_of::<Table>());
            libc::waitpid(self.pid, std::ptr::null_mut(), libc::WNOHANG | libc::__WALL);
        }
    }
}

/// The guard process: waits for the tracer to say it is done, or to die.
unsafe fn watch(fds: [libc::c_int; 2], table: *const Table, fd: libc::c_int) -> ! {
    unsafe {
        libc::close(fds[1]);
        // Ctrl-C and kills aimed at the tracer's process group must not take the guard first.
        for sig in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGPIPE,
            libc::SIGQUIT,
        ] {
            libc::signal(sig, libc::SIG_IGN);
        }
        let mut byte = 0u8;
        let n = loop {
            let n = libc::read(fds[0], (&raw mut byte).cast(), 1);
            if n >= 0 || *libc::__errno_location() != libc::EINTR {
                break n;
            }
        };
        if n == 1 && byte == DONE {
            libc::_exit(0);
        }
        // The tracer is gone with its breakpoints in: put the target back.
        let t = &*table;
        let page = t.page.load(Ordering::Relaxed);
        // First the return trap becomes a jump to the return address just below the stack
        // pointer: a thread that returns into the page before its slot is written back below
        // loops there until it is, instead of trapping. Its last three bytes go in first (never
        // executed while the first is still the int3), then the first byte.
        let jump = RETURN_JUMP;
        libc::pwrite(
            fd,
            jump[1..].as_ptr().cast(),
            jump.len() - 1,
            (page + 1) as libc::off_t,
        );
        libc::pwrite(fd, jump.as_ptr().cast(), 1, page as libc::off_t);
        // New calls next (every caller of the allocator), then calls in flight.
        for s in &t.sites {
            let addr = s[0].load(Ordering::Relaxed);
            if addr == 0 {
                continue;
            }
            let len = s[1].load(Ordering::Relaxed) as usize;
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&s[2].load(Ordering::Relaxed).to_le_bytes());
            bytes[8..].copy_from_slice(&s[3].load(Ordering::Relaxed).to_le_bytes());
            libc::pwrite(fd, bytes.as_ptr().cast(), len, addr as libc::off_t);
        }
        for e in &t.calls {
            let slot = e[0].load(Ordering::Acquire);
            if slot == 0 {
                continue;
            }
            let orig = e[1].load(Ordering::Relaxed);
            let mut now = 0u64;
            let got = libc::pread(fd, (&raw mut now).cast(), 8, slot as libc::off_t);
            if got == 8 && now == page {
                libc::pwrite(fd, (&raw const orig).cast(), 8, slot as libc::off_t);
            }
        }
        libc::close(fd);
        libc::_exit(0)
    }
}
