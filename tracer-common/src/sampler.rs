//! The in-process sampler's interface (tracer-sampler, mapped into a traced process): the
//! control block at its exported symbol [`CONTROL_SYMBOL`], the event its probe sites receive,
//! and the hash functions both sides use to find a thread's countdown and an address's bucket.
//!
//! Everything is `#[repr(C)]`, fixed width and free of implicit padding, so the tracer can read
//! and write the block byte for byte in another process. The sampler updates the words it
//! shares between threads atomically; the tracer writes `real`, `entry`, `internal`, `mean`,
//! `rng` and `slot_mask` before it sets `active`, and clears `active` before it restores the
//! allocator's entries.

use crate::AllocKind;

/// `Control::magic`: "TRSAMPLR" read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"TRSAMPLR");
/// `Control::version`: raised whenever the layout or the meaning of a field changes, so that an
/// attach that finds a sampler left in a process by another build does not misread it.
pub const VERSION: u32 = 2;

/// The dynamic symbol of the control block.
pub const CONTROL_SYMBOL: &str = "TRACER_SAMPLER";
/// The alloc probe site: `extern "C" fn(*const SampledCall)`, called once per sampled
/// allocation (and per realloc that settles a held block). A uprobe on its entry reads `rdi`.
pub const ALLOC_SITE_SYMBOL: &str = "tracer_alloc_site";
/// The free probe site, same signature: called before the real free of a sampled block (and
/// before a realloc of one, with [`flags::HOLD`]).
pub const FREE_SITE_SYMBOL: &str = "tracer_free_site";

/// Countdown slots: threads are spread over them by a hash of their thread pointer.
pub const SLOT_BITS: u32 = 8;
pub const SLOTS: usize = 1 << SLOT_BITS;

/// Sampled-address set: buckets of [`BUCKET_SLOTS`] addresses, one cache line each, picked by
/// a hash of the address; a byte per bucket counts its addresses.
pub const BUCKET_BITS: u32 = 12;
pub const BUCKETS: usize = 1 << BUCKET_BITS;
pub const BUCKET_SLOTS: usize = 8;
pub const SET_CAPACITY: usize = BUCKETS * BUCKET_SLOTS;

/// Code ranges whose calls into a hook are the allocator calling itself.
pub const RANGES: usize = 4;

/// Fibonacci hashing's multiplier (2^64 / golden ratio, odd).
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// The functions a sampler hooks, in the order of `Control::real` and `Control::entry`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Malloc = 0,
    Calloc = 1,
    Realloc = 2,
    Reallocarray = 3,
    Free = 4,
    PosixMemalign = 5,
    Memalign = 6,
    /// glibc 2.36 makes aligned_alloc an alias of memalign (one entry, patched once); later
    /// versions give it its own body and checks.
    AlignedAlloc = 7,
    Valloc = 8,
    Pvalloc = 9,
}

pub const HOOKS: usize = 10;

impl Hook {
    pub const ALL: [Hook; HOOKS] = [
        Hook::Malloc,
        Hook::Calloc,
        Hook::Realloc,
        Hook::Reallocarray,
        Hook::Free,
        Hook::PosixMemalign,
        Hook::Memalign,
        Hook::AlignedAlloc,
        Hook::Valloc,
        Hook::Pvalloc,
    ];

    /// The libc function the hook stands in for.
    pub const fn libc_name(self) -> &'static str {
        match self {
            Hook::Malloc => "malloc",
            Hook::Calloc => "calloc",
            Hook::Realloc => "realloc",
            Hook::Reallocarray => "reallocarray",
            Hook::Free => "free",
            Hook::PosixMemalign => "posix_memalign",
            Hook::Memalign => "memalign",
            Hook::AlignedAlloc => "aligned_alloc",
            Hook::Valloc => "valloc",
            Hook::Pvalloc => "pvalloc",
        }
    }

    /// The hook's dynamic symbol in the sampler: `extern "C"`, with the libc function's exact
    /// signature.
    pub const fn symbol(self) -> &'static str {
        match self {
            Hook::Malloc => "tracer_malloc",
            Hook::Calloc => "tracer_calloc",
            Hook::Realloc => "tracer_realloc",
            Hook::Reallocarray => "tracer_reallocarray",
            Hook::Free => "tracer_free",
            Hook::PosixMemalign => "tracer_posix_memalign",
            Hook::Memalign => "tracer_memalign",
            Hook::AlignedAlloc => "tracer_aligned_alloc",
            Hook::Valloc => "tracer_valloc",
            Hook::Pvalloc => "tracer_pvalloc",
        }
    }

    /// The kind an allocation event of this hook carries; None for free.
    pub const fn alloc_kind(self) -> Option<AllocKind> {
        match self {
            Hook::Malloc => Some(AllocKind::Malloc),
            Hook::Calloc => Some(AllocKind::Calloc),
            Hook::Realloc => Some(AllocKind::Realloc),
            Hook::Reallocarray => Some(AllocKind::Reallocarray),
            Hook::Free => None,
            Hook::PosixMemalign => Some(AllocKind::PosixMemalign),
            Hook::Memalign | Hook::AlignedAlloc => Some(AllocKind::Memalign),
            Hook::Valloc => Some(AllocKind::Valloc),
            Hook::Pvalloc => Some(AllocKind::Pvalloc),
        }
    }
}

/// `SampledCall::kind` of a free event (allocation events carry their [`AllocKind`]).
pub const KIND_FREE: u32 = 0xff;

/// Bits of `SampledCall::flags`.
pub mod flags {
    /// Alloc event: the block was sampled but the set was full, so its free will not be seen.
    /// Count it as allocated, not as live.
    pub const UNTRACKED: u32 = 1;
    /// Free event of realloc's old block, sent before the real realloc runs (once it has run,
    /// another thread may be handed the same address). Take the block out of the live table
    /// and hold it for the thread: its next alloc event settles it with `OLD_RELEASED` or
    /// `OLD_KEPT`, as the kernel sampler does between a realloc's entry and return.
    pub const HOLD: u32 = 2;
    /// Alloc event of a realloc whose old block was held: realloc released it (it succeeded,
    /// or it was realloc(p, 0)). Retire the held block.
    pub const OLD_RELEASED: u32 = 4;
    /// Alloc event of a realloc whose old block was held: realloc failed and the block is still
    /// allocated. Put the held block back.
    pub const OLD_KEPT: u32 = 8;
    /// With `OLD_KEPT`: the block could not go back into the set (full), so its free will not
    /// be seen.
    pub const OLD_UNTRACKED: u32 = 16;
    /// Alloc event that only settles a held block: the new block was not sampled (or the
    /// realloc failed), and `addr`, `size` and the weights mean nothing.
    pub const NOT_SAMPLED: u32 = 32;
}

/// Indices into `Control::counters`.
pub mod counter {
    /// Calls of the alloc probe site (the site counts them itself).
    pub const ALLOC_SITE: usize = 0;
    /// Calls of the free probe site (the site counts them itself).
    pub const FREE_SITE: usize = 1;
    /// Sampled allocations that found their bucket of the set full (reported `UNTRACKED`).
    pub const SET_FULL: usize = 2;
    /// Sampled allocations that failed (NULL, or an error from posix_memalign): no event.
    pub const FAILED_ALLOCS: usize = 3;
    /// Reallocs that failed on a sampled block which then could not go back into the set.
    pub const RESTORE_FULL: usize = 4;
    pub const COUNT: usize = 5;
}

/// What a probe site receives (a pointer to it, in `rdi`), on the hook's stack.
///
/// `entry`, `entry_sp` and `entry_bp` are the registers at the allocator's entry as the caller
/// made the call, before the hook ran: a stack walk from them yields exactly the stack an entry
/// uprobe on the unpatched allocator would have seen, with no frame of the sampler in it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SampledCall {
    /// Alloc: the new block. Free: the block being freed.
    pub addr: u64,
    /// Alloc: the bytes asked for (calloc: n * size; pvalloc: rounded up to pages). Free: 0.
    pub size: u64,
    /// [`crate::sampling::estimate`] of `size` at the mean in force: estimated bytes.
    pub weight_bytes: u64,
    /// The same estimate's allocation count, in units of 2^-[`crate::sampling::COUNT_SHIFT`].
    pub weight_count: u64,
    /// The original entry address of the function the caller called (`Control::entry`).
    pub entry: u64,
    /// The stack pointer at that entry: the address of the caller's return address.
    pub entry_sp: u64,
    /// The frame pointer at that entry (the caller's).
    pub entry_bp: u64,
    /// The caller's return address (`*entry_sp`).
    pub ret_addr: u64,
    /// The [`AllocKind`] of an alloc event, [`KIND_FREE`] for a free event.
    pub kind: u32,
    /// [`flags`].
    pub flags: u32,
}

// ---------------------------------------------------------------------------------------------
// The ring: the ptrace fallback's way out of the process

/// The ring's memfd: /proc/PID/maps shows it as `/memfd:tracer-ring (deleted)`.
pub const RING_MEMFD_NAME: &str = "tracer-ring";
/// The sampler's copy of [`RING_MEMFD_NAME`], NUL-terminated.
pub const RING_NAME_SYMBOL: &str = "TRACER_RING_NAME";

/// The head of the ring, followed by `slots` slots of `slot_bytes` bytes each (each a
/// [`RingSlot`] and then the stack bytes it copied).
///
/// Many producers (the process's threads, in the sampler's hooks) and one consumer (the
/// tracer) in the manner of a bounded queue with a sequence word per slot: slot `i` starts
/// with `seq == i`. A producer reads `tail`, and finding `seq == tail` in the slot at `tail %
/// slots` claims it by moving `tail` on with a compare-and-swap, fills it and stores `seq =
/// tail + 1`. A slot whose `seq` is behind `tail` has not been read yet: the ring is full; the
/// producer waits a few milliseconds at most for a reader that is running (see `heartbeat`),
/// then drops the event and counts it in `full`. The consumer reads the slot at its
/// own position `pos` once `seq == pos + 1`, then hands the slot back with `seq = pos + slots`.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default)]
pub struct RingHeader {
    /// A power of two.
    pub slots: u64,
    /// A multiple of 64, more than [`RING_STACK_OFFSET`].
    pub slot_bytes: u64,
    /// Events dropped because the ring was full.
    pub full: u64,
    /// The consumer's position: every event before it has been read. Equal to `tail` when the
    /// tracer let go of a ring it had read to the end, which a later attach may then reuse.
    pub head: u64,
    /// 1 while the consumer sleeps on it (a futex, its low 32 bits): a producer that leaves
    /// the ring a quarter full or more wakes it (`FUTEX_WAKE`, shared) and clears it, so that a
    /// burst does not outrun a consumer that polls slowly while the ring stays quiet.
    pub waiting: u64,
    /// When the reader last looked at the ring (CLOCK_MONOTONIC, ns; it looks at least every
    /// 10 ms while it reads, and sets 0 when it lets go). A producer that finds the ring full
    /// waits a little for a reader seen lately (a burst that outran it), and not at all for
    /// one that is gone, stopped or stuck.
    pub heartbeat: u64,
    pub _reserved: [u64; 2],
    /// The next position a producer claims (its own cache line).
    pub tail: u64,
    pub _reserved1: [u64; 7],
}

/// One event in the ring. The stack bytes follow at [`RING_STACK_OFFSET`] from the slot's start.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RingSlot {
    pub seq: u64,
    /// The producing thread's thread pointer (`%fs:0`): which thread a realloc's held block
    /// belongs to.
    pub thread: u64,
    /// The producing process (`getpid`): a forked child shares the ring and its events are
    /// not the traced process's.
    pub pid: u64,
    /// Bytes of the stack copied from `event.entry_sp` upwards (whole pages after the first,
    /// up to the first unreadable one, at most `slot_bytes - RING_STACK_OFFSET`).
    pub stack_len: u64,
    pub event: SampledCall,
}

pub const RING_HEADER_BYTES: usize = 128;
pub const RING_STACK_OFFSET: usize = 128;

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<RingHeader>() == RING_HEADER_BYTES);
    assert!(offset_of!(RingHeader, tail) == 64);
    assert!(size_of::<RingSlot>() <= RING_STACK_OFFSET);
    assert!(offset_of!(RingSlot, event) == 32);
};

/// `[start, end)` of code. An empty range (`start == end`) matches nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CodeRange {
    pub start: u64,
    pub end: u64,
}

/// One thread slot's countdown, alone in its cache line so that threads on different slots do
/// not contend.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default)]
pub struct Countdown {
    /// Bytes left before the slot's next sample point; 0 before the slot's first draw.
    pub left: u64,
    pub _reserved: [u64; 7],
}

/// The control block.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct Control {
    /// [`MAGIC`].
    pub magic: u64,
    /// [`VERSION`].
    pub version: u32,
    /// `size_of::<Control>()` of the sampler's build.
    pub control_size: u32,
    /// 0: inert, every hook calls the real function and nothing else. Otherwise sampling.
    pub active: u64,
    /// Mean bytes between samples, `1..=sampling::MAX_MEAN`; any other value leaves the hooks
    /// passing through as when inert.
    pub mean: u64,
    /// Random state: a Weyl sequence, stepped atomically once per draw. Seed it.
    pub rng: u64,
    /// Which countdown slots are in use: `slot_index` masks its hash with it. `SLOTS - 1`
    /// normally; 0 puts every thread on slot 0.
    pub slot_mask: u64,
    /// The ptrace fallback: address of a [`RingHeader`] in the process, where every sampled
    /// event also goes with a copy of the stack (the tracer reads it from its own mapping of
    /// the same memory). 0: no ring, events only reach the probe sites.
    pub ring: u64,
    pub _reserved0: u64,
    /// What each hook calls as the real function, by [`Hook`]: the allocator's function, or a
    /// trampoline holding its displaced entry instructions once the entry is patched.
    pub real: [u64; HOOKS],
    /// The original entry of each hooked function, by [`Hook`]: reported as the allocator's
    /// frame (`SampledCall::entry`).
    pub entry: [u64; HOOKS],
    /// The allocator's own code: a call from there is glibc calling itself (realloc(p, 0) ->
    /// free, memalign -> malloc) and passes through, neither counted nor sampled (a block of
    /// the set that such a call frees or resizes still leaves the set). The
    /// sampler's own image is always treated so (a real function that tail-calls another
    /// hooked one, as realloc(NULL, n) -> malloc does, returns into the hook that called it).
    pub internal: [CodeRange; RANGES],
    /// [`counter`]s.
    pub counters: [u64; 12],
    /// Copies of the last alloc and free events, written by the probe sites (for tests and
    /// post-mortems; another thread's event may overwrite one while it is read).
    pub last_alloc: SampledCall,
    pub last_free: SampledCall,
    pub _reserved1: [u64; 6],
    /// Countdowns, by [`slot_index`].
    pub slots: [Countdown; SLOTS],
    /// Addresses in each bucket of the set, by [`bucket_of`].
    pub set_counts: [u8; BUCKETS],
    /// The set: bucket `b` is `set[b * BUCKET_SLOTS..][..BUCKET_SLOTS]`, 0 marks a free slot.
    pub set: [u64; SET_CAPACITY],
}

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<SampledCall>() == 72);
    assert!(size_of::<Countdown>() == 64);
    assert!(offset_of!(Control, real) == 64);
    assert!(offset_of!(Control, entry) == 64 + 8 * HOOKS);
    assert!(offset_of!(Control, internal) == 64 + 16 * HOOKS);
    assert!(offset_of!(Control, counters) == 64 + 16 * HOOKS + 16 * RANGES);
    assert!(counter::COUNT <= 12);
    assert!(offset_of!(Control, last_alloc) == offset_of!(Control, counters) + 96);
    assert!(offset_of!(Control, _reserved1) == offset_of!(Control, last_alloc) + 144);
    assert!(offset_of!(Control, slots) == offset_of!(Control, _reserved1) + 48);
    assert!(offset_of!(Control, slots) % 64 == 0);
    assert!(offset_of!(Control, set_counts) == offset_of!(Control, slots) + 64 * SLOTS);
    assert!(offset_of!(Control, set) == offset_of!(Control, set_counts) + BUCKETS);
    assert!(offset_of!(Control, set) % 64 == 0);
    assert!(size_of::<Control>() == offset_of!(Control, set) + 8 * SET_CAPACITY);
    assert!(size_of::<Control>() <= u32::MAX as usize);
};

impl Control {
    /// The block as built into the sampler: inert, identified, everything else zero.
    pub const INITIAL: Control = Control {
        magic: MAGIC,
        version: VERSION,
        control_size: core::mem::size_of::<Control>() as u32,
        active: 0,
        mean: 0,
        rng: 0,
        slot_mask: (SLOTS - 1) as u64,
        ring: 0,
        _reserved0: 0,
        real: [0; HOOKS],
        entry: [0; HOOKS],
        internal: [CodeRange { start: 0, end: 0 }; RANGES],
        counters: [0; 12],
        last_alloc: SampledCall::ZERO,
        last_free: SampledCall::ZERO,
        _reserved1: [0; 6],
        slots: [Countdown {
            left: 0,
            _reserved: [0; 7],
        }; SLOTS],
        set_counts: [0; BUCKETS],
        set: [0; SET_CAPACITY],
    };
}

impl SampledCall {
    pub const ZERO: SampledCall = SampledCall {
        addr: 0,
        size: 0,
        weight_bytes: 0,
        weight_count: 0,
        entry: 0,
        entry_sp: 0,
        entry_bp: 0,
        ret_addr: 0,
        kind: 0,
        flags: 0,
    };
}

/// The countdown slot of the thread whose thread pointer (`%fs:0`) is `thread_pointer`.
/// glibc places thread control blocks at page-aligned offsets in their stacks; the product's
/// high bits mix every bit of the pointer in.
#[inline(always)]
pub fn slot_index(thread_pointer: u64, slot_mask: u64) -> usize {
    ((thread_pointer.wrapping_mul(GOLDEN) >> (64 - SLOT_BITS)) & slot_mask) as usize
}

/// The bucket of the set that holds `addr` if it is sampled.
#[inline(always)]
pub fn bucket_of(addr: u64) -> usize {
    (addr.wrapping_mul(GOLDEN) >> (64 - BUCKET_BITS)) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_stay_in_their_tables_and_spread_nearby_addresses() {
        let mut hit = [0u32; BUCKETS];
        // 16-byte aligned blocks in one heap arena, as malloc hands them out.
        for i in 0..(BUCKETS as u64 * 4) {
            hit[bucket_of(0x5555_5555_0000 + 16 * i)] += 1;
        }
        let busiest = *hit.iter().max().expect("buckets");
        assert!(
            busiest <= 12,
            "one bucket got {busiest} of 4 per bucket on average"
        );
        // Thread pointers 8 MiB + 4 KiB apart (glibc's default stacks).
        let mut slots = [0u32; SLOTS];
        for i in 0..SLOTS as u64 {
            let tp = 0x7fff_f000_0640 - i * (8 << 20) - i * 4096;
            let s = slot_index(tp, (SLOTS - 1) as u64);
            assert!(s < SLOTS);
            slots[s] += 1;
        }
        let busiest = *slots.iter().max().expect("slots");
        assert!(busiest <= 6, "one slot got {busiest} of 256 threads");
        assert_eq!(slot_index(0x7fff_f000_0640, 0), 0);
    }

    #[test]
    fn hooks_and_kinds_line_up() {
        for (i, h) in Hook::ALL.iter().enumerate() {
            assert_eq!(*h as usize, i);
            assert!(h.symbol().ends_with(h.libc_name()));
        }
        assert_eq!(Hook::Free.alloc_kind(), None);
        assert_eq!(Hook::AlignedAlloc.alloc_kind(), Some(AllocKind::Memalign));
        assert!(KIND_FREE > AllocKind::Pvalloc as u32);
    }
}
