//! The tracer's end of the in-process sampler's ring (the ptrace fallback, issue 13): the same
//! memfd the target maps shared, mapped shared here too, so that sampled events and their copies
//! of the stack reach the tracer without a trap or a system call in the target beyond the
//! sampler's own stack copy. The protocol is `tracer_common::sampler::RingHeader`'s; this side
//! is its one consumer.
use std::{
    fs::File,
    os::fd::AsRawFd as _,
    sync::atomic::{AtomicU64, Ordering},
};

use tracer_common::sampler::{
    RING_HEADER_BYTES, RING_STACK_OFFSET, RingHeader, RingSlot, SampledCall,
};

/// Slots of a ring this tracer makes, and their size: 4 MiB in all, room for 128 events
/// between two drains, each with up to 32 KiB of stack (deep V8 stacks take 10-20 KiB).
pub const SLOTS: u64 = 256;
pub const SLOT_BYTES: u64 = 32 << 10;

/// Bytes of a ring of `slots` slots of `slot_bytes` (the memfd's size), whole pages.
pub const fn ring_bytes(slots: u64, slot_bytes: u64) -> u64 {
    (RING_HEADER_BYTES as u64 + slots * slot_bytes).div_ceil(4096) * 4096
}

/// One event read from the ring, with the stack bytes the sampler copied above its
/// `entry_sp`.
pub struct RingEvent<'a> {
    pub thread: u64,
    pub pid: u64,
    pub event: SampledCall,
    pub stack: &'a [u8],
}

pub struct SharedRing {
    ptr: *mut u8,
    len: usize,
    slots: u64,
    slot_bytes: u64,
    /// The next position to read.
    pos: u64,
    /// The ring's address in the target.
    target: u64,
}

// SAFETY: the mapping is owned by this value and read through atomics or after an acquire.
unsafe impl Send for SharedRing {}

impl SharedRing {
    /// Maps `file` (the ring's memfd, opened through /proc) shared, `len` bytes. The target
    /// has it at `target`.
    pub fn map(file: &File, len: u64, target: u64) -> std::io::Result<SharedRing> {
        // SAFETY: a fresh shared mapping of a file we hold; unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let mut ring = SharedRing {
            ptr: ptr.cast(),
            len: len as usize,
            slots: 0,
            slot_bytes: 0,
            pos: 0,
            target,
        };
        ring.slots = ring
            .header_word(std::mem::offset_of!(RingHeader, slots))
            .load(Ordering::Relaxed);
        ring.slot_bytes = ring
            .header_word(std::mem::offset_of!(RingHeader, slot_bytes))
            .load(Ordering::Relaxed);
        ring.pos = ring
            .header_word(std::mem::offset_of!(RingHeader, head))
            .load(Ordering::Relaxed);
        Ok(ring)
    }

    fn header_word(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: the header's words are 8-aligned, inside the mapping, shared with the target.
        unsafe { AtomicU64::from_ptr(self.ptr.add(offset).cast()) }
    }

    fn seq(&self, slot: u64) -> &AtomicU64 {
        // SAFETY: a slot's first word, inside the mapping (checked by `fits`).
        unsafe {
            AtomicU64::from_ptr(
                self.ptr
                    .add(RING_HEADER_BYTES + (slot * self.slot_bytes) as usize)
                    .cast(),
            )
        }
    }

    fn fits(len: usize, slots: u64, slot_bytes: u64) -> bool {
        slots.is_power_of_two()
            && slot_bytes.is_multiple_of(64)
            && slot_bytes > RING_STACK_OFFSET as u64
            && (RING_HEADER_BYTES as u64).saturating_add(slots.saturating_mul(slot_bytes))
                <= len as u64
    }

    /// Makes the ring empty with `slots` slots of `slot_bytes`. Only while no thread of the
    /// target can reach it: before `Control::ring` points at it, with every thread stopped.
    pub fn reset(&mut self, slots: u64, slot_bytes: u64) -> bool {
        if !Self::fits(self.len, slots, slot_bytes) {
            return false;
        }
        self.slots = slots;
        self.slot_bytes = slot_bytes;
        for i in 0..slots {
            self.seq(i).store(i, Ordering::Relaxed);
        }
        for (field, v) in [
            (std::mem::offset_of!(RingHeader, full), 0),
            (std::mem::offset_of!(RingHeader, head), 0),
            (std::mem::offset_of!(RingHeader, tail), 0),
            (std::mem::offset_of!(RingHeader, slot_bytes), slot_bytes),
            (std::mem::offset_of!(RingHeader, slots), slots),
        ] {
            self.header_word(field).store(v, Ordering::Release);
        }
        self.pos = 0;
        true
    }

    /// Whether a ring left in the target can be used again as it is: a shape this side reads,
    /// and every event claimed in it read (a tracer that let go cleanly; one that died leaves
    /// events unread, and a thread may still be filling a slot it claimed then).
    pub fn reusable(&self) -> bool {
        let head = self
            .header_word(std::mem::offset_of!(RingHeader, head))
            .load(Ordering::Acquire);
        let tail = self
            .header_word(std::mem::offset_of!(RingHeader, tail))
            .load(Ordering::Acquire);
        Self::fits(self.len, self.slots, self.slot_bytes) && head == tail
    }

    /// Starts the count of events dropped on a full ring again, for a ring used again (with
    /// every thread of the target stopped, or before it is published).
    pub fn clear_full(&self) {
        self.header_word(std::mem::offset_of!(RingHeader, full)).store(0, Ordering::Release);
    }

    /// Says in the ring that its reader is at it (see `RingHeader::heartbeat`): when it is
    /// mapped, and at every look at it.
    pub fn beat(&self) {
        let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: writes the struct it is given.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now) };
        let ns = (now.tv_sec as u64) * 1_000_000_000 + now.tv_nsec as u64;
        self.header_word(std::mem::offset_of!(RingHeader, heartbeat)).store(ns, Ordering::Release);
    }

    /// The ring's address in the target.
    pub fn target(&self) -> u64 {
        self.target
    }

    /// Events the sampler dropped because the ring was full.
    pub fn full(&self) -> u64 {
        self.header_word(std::mem::offset_of!(RingHeader, full))
            .load(Ordering::Relaxed)
    }

    /// Sleeps until a producer finds the ring a quarter full, or `timeout` passes, unless events
    /// are already waiting.
    pub fn wait(&self, timeout: std::time::Duration) {
        let waiting = self.header_word(std::mem::offset_of!(RingHeader, waiting));
        waiting.store(1, Ordering::SeqCst);
        if self.slots != 0 {
            let slot = self.pos & (self.slots - 1);
            if self.seq(slot).load(Ordering::SeqCst) == self.pos.wrapping_add(1) {
                waiting.store(0, Ordering::Relaxed);
                return;
            }
        }
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: a futex wait on a word of our shared mapping (its low half, little-endian),
        // shared with the target: not FUTEX_PRIVATE_FLAG.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                waiting.as_ptr(),
                libc::FUTEX_WAIT,
                1u32,
                &raw const ts,
            );
        }
        waiting.store(0, Ordering::Relaxed);
    }

    /// Reads up to `max` events in order, each handed to `f`; returns how many. Stops at the
    /// first slot not yet filled.
    pub fn drain(&mut self, max: usize, mut f: impl FnMut(RingEvent<'_>)) -> usize {
        if self.slots == 0 {
            return 0;
        }
        self.beat();
        let mut n = 0;
        while n < max {
            let slot = self.pos & (self.slots - 1);
            if self.seq(slot).load(Ordering::Acquire) != self.pos.wrapping_add(1) {
                break;
            }
            let base = RING_HEADER_BYTES + (slot * self.slot_bytes) as usize;
            // SAFETY: the slot is filled (its sequence word, read with acquire, says so) and
            // no producer writes it until it is handed back below; the struct is plain words.
            let head: RingSlot = unsafe { std::ptr::read_volatile(self.ptr.add(base).cast()) };
            let room = self.slot_bytes as usize - RING_STACK_OFFSET;
            let len = (head.stack_len as usize).min(room);
            // SAFETY: as above, `len` bytes inside the slot.
            let stack =
                unsafe { std::slice::from_raw_parts(self.ptr.add(base + RING_STACK_OFFSET), len) };
            f(RingEvent {
                thread: head.thread,
                pid: head.pid,
                event: head.event,
                stack,
            });
            self.seq(slot)
                .store(self.pos.wrapping_add(self.slots), Ordering::Release);
            self.pos = self.pos.wrapping_add(1);
            self.header_word(std::mem::offset_of!(RingHeader, head))
                .store(self.pos, Ordering::Release);
            n += 1;
        }
        n
    }
}

impl Drop for SharedRing {
    fn drop(&mut self) {
        self.header_word(std::mem::offset_of!(RingHeader, heartbeat))
            .store(0, Ordering::Release);
        // SAFETY: our own mapping, made in `map`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anon_ring() -> SharedRing {
        let f = tempfile_memfd();
        let len = ring_bytes(4, 256);
        f.set_len(len).expect("size the memfd");
        let mut r = SharedRing::map(&f, len, 0x1000).expect("map");
        assert!(r.reset(4, 256));
        r
    }

    fn tempfile_memfd() -> File {
        use std::os::fd::FromRawFd as _;
        // SAFETY: a new descriptor we own.
        let fd = unsafe { libc::memfd_create(c"ring-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: as above.
        unsafe { File::from_raw_fd(fd) }
    }

    /// A producer as the sampler is one (`ring_push` in tracer-sampler), for the protocol.
    fn push(r: &SharedRing, addr: u64) -> bool {
        let tail = r.header_word(std::mem::offset_of!(RingHeader, tail));
        let pos = tail.load(Ordering::Relaxed);
        let slot = pos & (r.slots - 1);
        if r.seq(slot).load(Ordering::Acquire) != pos {
            r.header_word(std::mem::offset_of!(RingHeader, full))
                .fetch_add(1, Ordering::Relaxed);
            return false;
        }
        tail.store(pos + 1, Ordering::Relaxed);
        let base = RING_HEADER_BYTES + (slot * r.slot_bytes) as usize;
        let s = RingSlot {
            seq: 0,
            thread: 7,
            pid: 9,
            stack_len: 16,
            event: SampledCall {
                addr,
                ..SampledCall::ZERO
            },
        };
        // SAFETY: the claimed slot, inside the mapping.
        unsafe {
            std::ptr::write(
                r.ptr.add(base + 8).cast::<[u64; 3]>(),
                [s.thread, s.pid, s.stack_len],
            );
            std::ptr::write(r.ptr.add(base + 32).cast::<SampledCall>(), s.event);
            std::ptr::write(
                r.ptr.add(base + RING_STACK_OFFSET).cast::<[u64; 2]>(),
                [addr, addr + 1],
            );
        }
        r.seq(slot).store(pos + 1, Ordering::Release);
        true
    }

    #[test]
    fn events_come_out_in_order_a_full_ring_drops_and_counts_and_a_read_ring_is_reusable() {
        let mut r = anon_ring();
        assert!(r.reusable());
        for a in 1..=4 {
            assert!(push(&r, a));
        }
        assert!(!push(&r, 5), "a fifth event in four slots");
        assert_eq!(r.full(), 1);
        assert!(!r.reusable(), "events unread");
        let mut got = Vec::new();
        assert_eq!(
            r.drain(3, |e| got.push((
                e.event.addr,
                e.thread,
                e.pid,
                e.stack.to_vec()
            ))),
            3
        );
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(got[0].3, [1u64.to_le_bytes(), 2u64.to_le_bytes()].concat());
        assert_eq!((got[0].1, got[0].2), (7, 9));
        // The slots read are free again, and wrap around.
        for a in 6..=8 {
            assert!(push(&r, a));
        }
        got.clear();
        assert_eq!(
            r.drain(100, |e| got.push((e.event.addr, 0, 0, Vec::new()))),
            4
        );
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), [4, 6, 7, 8]);
        assert_eq!(r.drain(100, |_| {}), 0);
        assert!(r.reusable());
    }

    #[test]
    fn a_second_mapping_continues_where_the_first_stopped() {
        let f = tempfile_memfd();
        let len = ring_bytes(4, 256);
        f.set_len(len).expect("size");
        let mut a = SharedRing::map(&f, len, 0).expect("map");
        assert!(a.reset(4, 256));
        push(&a, 1);
        push(&a, 2);
        assert_eq!(a.drain(100, |_| {}), 2);
        drop(a);
        let mut b = SharedRing::map(&f, len, 0).expect("map again");
        assert!(b.reusable());
        push(&b, 3);
        let mut got = Vec::new();
        b.drain(100, |e| got.push(e.event.addr));
        assert_eq!(got, [3]);
    }

    #[test]
    fn a_shape_that_does_not_fit_the_mapping_is_refused() {
        let f = tempfile_memfd();
        let len = ring_bytes(4, 256);
        f.set_len(len).expect("size");
        let mut r = SharedRing::map(&f, len, 0).expect("map");
        assert!(!r.reset(32, 256), "more than the mapping holds");
        assert!(!r.reset(3, 256));
        assert!(!r.reset(4, 100));
        assert!(!r.reusable(), "an all-zero header is no ring");
    }
}
