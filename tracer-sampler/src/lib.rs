//! The in-process sampler: hooks that stand in for glibc's malloc family and free inside a
//! traced process, built into a small position-independent shared object that the tracer
//! maps into the process and jumps to from the allocator's patched entries.
//!
//! Each hook calls the real function (through `Control::real`) and decides in-process, with
//! the kernel sampler's Poisson byte countdown (`tracer_common::sampling`: same draws, same
//! unbiased weights), whether the call is sampled. Only a sampled allocation, and the free of a
//! sampled block, reach a probe site ([`tracer_alloc_site`], [`tracer_free_site`]): functions
//! that do nothing but count, where the tracer's uprobes sit and capture the stack. An
//! unsampled call costs the countdown and no trap.
//!
//! - **Countdowns per thread, without thread-local storage.** The sampler cannot use the
//!   target's TLS (it is not loaded by the target's dynamic linker), so each thread's countdown
//!   lives in a fixed table indexed by a hash of its thread pointer (`%fs:0`). Two threads that
//!   share a slot merge their byte streams into one countdown. That keeps every estimate
//!   unbiased: each update is one compare-and-swap, so the slot sees the calls one at a time in
//!   some order, exactly as if one thread had made them all; and the countdown at any moment is
//!   exponential whatever came before (a fresh draw, or what is left of one that has been
//!   found to exceed the bytes counted so far, which is memoryless), so each call is sampled
//!   with probability `1 - exp(-size/mean)` independently of which thread made the calls
//!   before it. Sharing only makes the slot's line bounce between cores.
//! - **Nested calls.** glibc's allocator calls itself: realloc(p, 0) calls free,
//!   memalign calls malloc, realloc(NULL, n) and reallocarray tail-jump to malloc and realloc.
//!   A hook reads the return address the caller pushed (the patched entry jumps, so the
//!   hook's stack starts exactly as the real function's would); when that address lies in
//!   one of `Control::internal` (the allocator's code, filled in by the tracer) or in this
//!   object (where a tail-jumping real function returns to the hook that called it), the call
//!   is glibc's own business and passes straight through, neither counted nor sampled. Only
//!   the set is kept right whoever calls: a block of the set that is freed or resized leaves
//!   it (a stale address would be taken for a later block's).
//! - **Inert.** With `Control::active == 0` (as built, and after the tracer detaches or dies)
//!   every hook only calls the real function; the probe sites, without uprobes, only count.
//! - **Sampled set.** A fixed open-addressing set of sampled addresses, one cache line per
//!   bucket and a byte per bucket counting its addresses, decides on free: the free of an
//!   unsampled block reads that byte (in a 4 KiB table that stays in the L1 cache), finds 0
//!   nearly always, and calls the real free.
//!
//! Every entry point is a naked stub that passes the stack pointer and frame pointer it was
//! entered with to the hook's body, so that the event can name the caller's frame exactly: a
//! stack walk from `SampledCall::{entry, entry_sp, entry_bp}` is the walk an entry uprobe on
//! the unpatched allocator would have made. The bodies keep frame pointers and `.eh_frame`, so
//! a walker started inside them can pass through too.
//!
//! No code path can panic (the build of the shared object checks that no panic handler is
//! linked in); the handler below only exists because `no_std` needs one.
#![cfg_attr(not(test), no_std)]

use core::{
    cell::UnsafeCell,
    ffi::{c_int, c_void},
    sync::atomic::{
        AtomicU8, AtomicU64,
        Ordering::{Acquire, Relaxed, Release},
    },
};

use tracer_common::{
    AllocKind,
    sampler::{
        BUCKET_SLOTS, Control, Hook, KIND_FREE, RANGES, RING_HEADER_BYTES, RING_STACK_OFFSET,
        RingHeader, RingSlot, SampledCall, bucket_of, counter, flags, slot_index,
    },
    sampling,
};

/// The control block, at the symbol the tracer looks for.
#[repr(transparent)]
pub struct Shared(UnsafeCell<Control>);

// SAFETY: every field that threads share is accessed through atomics (see `word`).
unsafe impl Sync for Shared {}

#[unsafe(no_mangle)]
pub static TRACER_SAMPLER: Shared = Shared(UnsafeCell::new(Control::INITIAL));

/// The ring's memfd name, NUL-terminated, for the tracer's `memfd_create` run in the process
/// (it needs the name in the process's memory, and this page never changes).
#[unsafe(no_mangle)]
pub static TRACER_RING_NAME: [u8; 12] = *b"tracer-ring\0";

/// The address of a symbol of this object, taken relative to the instruction pointer: the
/// compiler would load an exported symbol's address from the GOT (it may be preempted by
/// another object's, as far as it knows), which needs a dynamic relocation with a symbol; the
/// build links with -Bsymbolic, so the linker resolves this reference itself.
macro_rules! here {
    ($sym:path) => {{
        let addr: u64;
        // SAFETY: computes an address; reads nothing.
        unsafe {
            core::arch::asm!(
                "lea {}, [rip + {}]",
                out(reg) addr,
                sym $sym,
                options(nomem, nostack, preserves_flags, pure)
            );
        }
        addr
    }};
}

#[inline(always)]
fn ctl() -> *mut Control {
    here!(TRACER_SAMPLER) as *mut Control
}

/// The lowest address of this object: its ELF header, which the linker labels.
#[inline(always)]
fn image_start() -> u64 {
    let addr: u64;
    // SAFETY: computes an address; reads nothing.
    unsafe {
        core::arch::asm!(
            "lea {}, [rip + __ehdr_start]",
            out(reg) addr,
            options(nomem, nostack, preserves_flags, pure)
        );
    }
    addr
}

/// A word of the control block, as an atomic: other threads, and the tracer from outside the
/// process, change them at any time.
#[inline(always)]
fn word(p: *mut u64) -> &'static AtomicU64 {
    // SAFETY: `p` points into the control block, which is 'static and 8-aligned throughout.
    unsafe { AtomicU64::from_ptr(p) }
}

#[inline(always)]
fn load(p: *mut u64) -> u64 {
    word(p).load(Relaxed)
}

#[inline(always)]
fn count(c: *mut Control, which: usize) {
    // SAFETY: the index is one of the `counter` constants, all below the array's length.
    word(unsafe { (&raw mut (*c).counters).cast::<u64>().add(which) }).fetch_add(1, Relaxed);
}

type MallocFn = unsafe extern "C" fn(usize) -> *mut c_void;
type CallocFn = unsafe extern "C" fn(usize, usize) -> *mut c_void;
type ReallocFn = unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void;
type ReallocarrayFn = unsafe extern "C" fn(*mut c_void, usize, usize) -> *mut c_void;
type FreeFn = unsafe extern "C" fn(*mut c_void);
type PosixMemalignFn = unsafe extern "C" fn(*mut *mut c_void, usize, usize) -> c_int;
type MemalignFn = unsafe extern "C" fn(usize, usize) -> *mut c_void;

/// The real function of `hook`, or None while the tracer has not filled it in.
#[inline(always)]
fn real<F: Copy>(c: *mut Control, hook: Hook) -> Option<F> {
    const { assert!(core::mem::size_of::<F>() == 8) };
    // SAFETY: `hook` indexes `real`; a function pointer is a non-null address, so Option<F>
    // has the layout of a u64 with None at 0.
    unsafe {
        let addr = load((&raw mut (*c).real).cast::<u64>().add(hook as usize));
        core::mem::transmute_copy::<u64, Option<F>>(&addr)
    }
}

/// The mean to sample this call at, or None when it passes straight through: the sampler is
/// inert (or has no valid mean), or the call comes from the allocator itself.
#[inline(always)]
fn sampling_mean(c: *mut Control, sp: *const u64) -> Option<u64> {
    let mean = active_mean(c)?;
    // SAFETY: `sp` is the stack pointer at the hook's entry, where the caller's `call` left
    // its return address.
    if is_internal(c, unsafe { *sp }) {
        None
    } else {
        Some(mean)
    }
}

/// The mean in force, or None while the sampler is inert (or has no valid mean).
#[inline(always)]
fn active_mean(c: *mut Control) -> Option<u64> {
    // SAFETY: `c` is the control block.
    let (active, mean) = unsafe { (load(&raw mut (*c).active), load(&raw mut (*c).mean)) };
    if active == 0 || mean.wrapping_sub(1) >= sampling::MAX_MEAN {
        None
    } else {
        Some(mean)
    }
}

/// Whether a call returning to `ret` is the allocator calling itself.
#[inline(always)]
fn is_internal(c: *mut Control, ret: u64) -> bool {
    // This object's code and read-only data lie between its ELF header and its writable data,
    // which starts with (or before) the control block.
    let image = image_start();
    if ret.wrapping_sub(image) < (c as u64).wrapping_sub(image) {
        return true;
    }
    let mut i = 0;
    while i < RANGES {
        // SAFETY: i < RANGES indexes `internal`; each range is two u64 words.
        let (start, end) = unsafe {
            let r = (&raw mut (*c).internal).cast::<u64>().add(2 * i);
            (load(r), load(r.add(1)))
        };
        if ret.wrapping_sub(start) < end.wrapping_sub(start) {
            return true;
        }
        i += 1;
    }
    false
}

/// The calling thread's thread pointer. glibc keeps the TCB's own address at `%fs:0`.
#[inline(always)]
fn thread_pointer() -> u64 {
    let tp: u64;
    // SAFETY: every thread of a glibc process has %fs set up before it can call malloc.
    unsafe {
        core::arch::asm!(
            "mov {}, qword ptr fs:[0]",
            out(reg) tp,
            options(nostack, readonly, preserves_flags, pure)
        );
    }
    tp
}

/// The calling thread's countdown.
#[inline(always)]
fn countdown(c: *mut Control) -> &'static AtomicU64 {
    // SAFETY: slot_index is below SLOTS whatever the mask; each slot starts with its word.
    unsafe {
        let mask = load(&raw mut (*c).slot_mask);
        let slot = (&raw mut (*c).slots)
            .cast::<tracer_common::sampler::Countdown>()
            .add(slot_index(thread_pointer(), mask));
        word(&raw mut (*slot).left)
    }
}

/// Whether a call of `size` bytes holds a sample point, as the kernel sampler decides it
/// (`take_sample` in tracer-ebpf/src/allocator.rs): the slot counts down the bytes to its next
/// point and a call is sampled when `size >= left`, after which a fresh countdown is drawn.
#[inline(always)]
fn take_sample(c: *mut Control, size: u64, mean: u64) -> bool {
    if size == 0 {
        return false;
    }
    let slot = countdown(c);
    let mut left = slot.load(Relaxed);
    // Nearly every call: subtract and go. `left` is 0 only before the slot's first draw.
    while size < left {
        match slot.compare_exchange_weak(left, left - size, Relaxed, Relaxed) {
            Ok(_) => return false,
            Err(now) => left = now,
        }
    }
    sample_point(c, slot, left, size, mean)
}

/// `take_sample` when the countdown runs out within this call (or was never drawn).
#[cold]
#[inline(never)]
fn sample_point(c: *mut Control, slot: &AtomicU64, mut left: u64, size: u64, mean: u64) -> bool {
    loop {
        let (sampled, next) = if left == 0 {
            // The slot's first call: a fresh countdown decides it, as for a thread the kernel
            // sampler has not seen yet.
            let first = draw(c, mean);
            if size < first {
                (false, first - size)
            } else {
                (true, draw(c, mean))
            }
        } else if size < left {
            // Another thread's call changed the slot since it was read.
            (false, left - size)
        } else {
            (true, draw(c, mean))
        };
        // A draw lost to a race is dropped whatever its value: no bias.
        match slot.compare_exchange(left, next, Relaxed, Relaxed) {
            Ok(_) => return sampled,
            Err(now) => left = now,
        }
    }
}

/// A fresh countdown: `sampling::next_countdown` of a uniform 32-bit draw, taken from the
/// control block's Weyl sequence through splitmix64's finalizer (one atomic add per draw, and
/// draws happen only at sample points).
fn draw(c: *mut Control, mean: u64) -> u64 {
    const STEP: u64 = 0x9e37_79b9_7f4a_7c15;
    // SAFETY: `c` is the control block.
    let x = word(unsafe { &raw mut (*c).rng })
        .fetch_add(STEP, Relaxed)
        .wrapping_add(STEP);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    sampling::next_countdown((z >> 32) as u32, mean)
}

/// The bucket's address count and its first slot.
#[inline(always)]
fn bucket(c: *mut Control, addr: u64) -> (&'static AtomicU8, *mut u64) {
    let b = bucket_of(addr);
    // SAFETY: bucket_of is below BUCKETS; bucket b owns set[b * BUCKET_SLOTS..][..BUCKET_SLOTS].
    unsafe {
        (
            AtomicU8::from_ptr((&raw mut (*c).set_counts).cast::<u8>().add(b)),
            (&raw mut (*c).set).cast::<u64>().add(b * BUCKET_SLOTS),
        )
    }
}

/// Adds a sampled block's address; false if its bucket is full. An address is never in the
/// set twice: it is added after the allocator returned it and taken out before the block is
/// released, and the allocator does not hand out an address that is in use.
fn set_insert(c: *mut Control, addr: u64) -> bool {
    let (n, slots) = bucket(c, addr);
    // Counted before it is findable, so a lookup that finds the count at 0 is right to stop.
    n.fetch_add(1, Relaxed);
    for i in 0..BUCKET_SLOTS {
        // SAFETY: i < BUCKET_SLOTS, within the bucket.
        let s = word(unsafe { slots.add(i) });
        if s.load(Relaxed) == 0 && s.compare_exchange(0, addr, Relaxed, Relaxed).is_ok() {
            return true;
        }
    }
    n.fetch_sub(1, Relaxed);
    false
}

/// Whether the set may hold `addr`: false for nearly every unsampled block, after one byte read.
#[inline(always)]
fn set_may_hold(c: *mut Control, addr: u64) -> bool {
    bucket(c, addr).0.load(Relaxed) != 0
}

/// Takes `addr` out of the set; false if it was not there.
fn set_remove(c: *mut Control, addr: u64) -> bool {
    let (n, slots) = bucket(c, addr);
    if n.load(Relaxed) == 0 {
        return false;
    }
    for i in 0..BUCKET_SLOTS {
        // SAFETY: i < BUCKET_SLOTS, within the bucket.
        let s = word(unsafe { slots.add(i) });
        if s.load(Relaxed) == addr && s.compare_exchange(addr, 0, Relaxed, Relaxed).is_ok() {
            n.fetch_sub(1, Relaxed);
            return true;
        }
    }
    false
}

/// Where an event's call came from: the registers at the allocator's entry.
#[derive(Clone, Copy)]
struct Caller {
    sp: *const u64,
    bp: u64,
}

/// Hands `ev` to a probe site. The site is called through an address the compiler cannot see
/// through, so that it stays one function at one address, called with the event in `rdi`
/// (not inlined, cloned or specialised: the uprobe sits on that address).
#[inline(always)]
fn report(site: u64, ev: &SampledCall) {
    // SAFETY: a word of the control block.
    let ring = load(unsafe { &raw mut (*ctl()).ring });
    if ring != 0 {
        ring_push(ring, ev);
    }
    // SAFETY: `site` is the address of one of the two probe sites, which have this type and
    // read the event it is given.
    unsafe {
        let site: unsafe extern "C" fn(*const SampledCall) = core::mem::transmute(site);
        site(ev);
    }
}

fn event(c: *mut Control, hook: Hook, caller: Caller, kind: u32) -> SampledCall {
    // SAFETY: `hook` indexes `entry`; `caller.sp` holds the caller's return address.
    let (entry, ret_addr) = unsafe {
        (
            load((&raw mut (*c).entry).cast::<u64>().add(hook as usize)),
            *caller.sp,
        )
    };
    SampledCall {
        entry,
        entry_sp: caller.sp as u64,
        entry_bp: caller.bp,
        ret_addr,
        kind,
        ..SampledCall::ZERO
    }
}

/// A sampled allocation of `size` bytes that returned `addr` (0: it failed).
#[cold]
#[inline(never)]
fn sampled_alloc(
    c: *mut Control,
    hook: Hook,
    caller: Caller,
    addr: u64,
    size: u64,
    mean: u64,
    mut extra_flags: u32,
) {
    if addr == 0 {
        count(c, counter::FAILED_ALLOCS);
        return;
    }
    if !set_insert(c, addr) {
        count(c, counter::SET_FULL);
        extra_flags |= flags::UNTRACKED;
    }
    let kind = match hook.alloc_kind() {
        Some(kind) => kind as u32,
        None => AllocKind::Malloc as u32,
    };
    let w = sampling::estimate(size, mean);
    let ev = SampledCall {
        addr,
        size,
        weight_bytes: w.bytes,
        weight_count: w.count,
        flags: extra_flags,
        ..event(c, hook, caller, kind)
    };
    report(here!(tracer_alloc_site), &ev);
}

/// The free (or, with `flags::HOLD`, the realloc) of a block that was in the set.
#[cold]
#[inline(never)]
fn sampled_free(c: *mut Control, hook: Hook, caller: Caller, addr: u64, extra_flags: u32) {
    let ev = SampledCall {
        addr,
        flags: extra_flags,
        ..event(c, hook, caller, KIND_FREE)
    };
    report(here!(tracer_free_site), &ev);
}

/// Puts `ev` in the ring at `ring` with a copy of the stack above the caller's return address,
/// or counts it as dropped when the ring is full (see `RingHeader` for the protocol). Nothing
/// here waits for the tracer.
#[cold]
#[inline(never)]
fn ring_push(ring: u64, ev: &SampledCall) {
    let head = ring as *mut RingHeader;
    // SAFETY: the tracer mapped the ring, shared with itself, before it stored its address;
    // the header's words are 8-aligned and only ever read or changed atomically here.
    let (slots, slot_bytes, tail, full) = unsafe {
        (
            load(&raw mut (*head).slots),
            load(&raw mut (*head).slot_bytes),
            word(&raw mut (*head).tail),
            word(&raw mut (*head).full),
        )
    };
    if !slots.is_power_of_two() || slot_bytes <= RING_STACK_OFFSET as u64 || slot_bytes % 64 != 0 {
        return;
    }
    let mut pos = tail.load(Relaxed);
    let mut waits = 0;
    let slot = loop {
        let slot = ring + RING_HEADER_BYTES as u64 + (pos & (slots - 1)) * slot_bytes;
        let seq = word(slot as *mut u64).load(Acquire);
        let ahead = seq.wrapping_sub(pos) as i64;
        if ahead == 0 {
            match tail.compare_exchange_weak(pos, pos.wrapping_add(1), Relaxed, Relaxed) {
                Ok(_) => break slot,
                Err(now) => pos = now,
            }
        } else if ahead < 0 {
            // Not read yet: the ring is full. A burst can outrun the reader for a moment:
            // wake it and give it a little time, as long as it is there to read.
            if waits < RING_FULL_WAITS && consumer_alive(head) {
                waits += 1;
                wake_consumer(head);
                syscall6(SYS_NANOSLEEP, [&raw const RING_FULL_PAUSE as u64, 0, 0, 0, 0, 0]);
                pos = tail.load(Relaxed);
                continue;
            }
            full.fetch_add(1, Relaxed);
            return;
        } else {
            // Another thread claimed this position first.
            pos = tail.load(Relaxed);
        }
    };
    let s = slot as *mut RingSlot;
    let stack = slot + RING_STACK_OFFSET as u64;
    let copied = copy_stack(ev.entry_sp, stack, slot_bytes - RING_STACK_OFFSET as u64);
    // SAFETY: the slot is ours until its sequence word says it is filled.
    unsafe {
        (*s).thread = thread_pointer();
        (*s).pid = syscall6(SYS_GETPID, [0; 6]) as u64;
        (*s).stack_len = copied;
        copy_event(ev, &raw mut (*s).event);
    }
    word(slot as *mut u64).store(pos.wrapping_add(1), Release);
    // SAFETY: a header word, as above.
    let read = unsafe { word(&raw mut (*head).head) }.load(Relaxed);
    if pos.wrapping_add(1).wrapping_sub(read) >= slots / 16 {
        wake_consumer(head);
    }
}

/// Wakes the tracer's reader if it sleeps on the ring (one system call, made by one thread).
#[inline(always)]
fn wake_consumer(head: *mut RingHeader) {
    // SAFETY: a header word, as in ring_push.
    let waiting = word(unsafe { &raw mut (*head).waiting });
    if waiting.load(Relaxed) != 0 && waiting.compare_exchange(1, 0, Relaxed, Relaxed).is_ok() {
        syscall6(SYS_FUTEX, [waiting.as_ptr() as u64, FUTEX_WAKE, 1, 0, 0, 0]);
    }
}

/// Whether the tracer that reads the ring is still at it: it beat within [`HEARTBEAT_AGE`].
/// A tracer that was killed or stopped leaves the ring to fill, and events then go as soon
/// as they find it full.
#[inline(always)]
fn consumer_alive(head: *mut RingHeader) -> bool {
    // SAFETY: a header word, as in ring_push.
    let beat = word(unsafe { &raw mut (*head).heartbeat }).load(Relaxed);
    let mut now = Timespec { sec: 0, nsec: 0 };
    if beat == 0 || syscall6(SYS_CLOCK_GETTIME, [CLOCK_MONOTONIC, &raw mut now as u64, 0, 0, 0, 0]) != 0 {
        return false;
    }
    let now = (now.sec as u64).wrapping_mul(1_000_000_000).wrapping_add(now.nsec as u64);
    now.wrapping_sub(beat) < HEARTBEAT_AGE
}

const SYS_NANOSLEEP: u64 = 35;
const SYS_CLOCK_GETTIME: u64 = 228;
const CLOCK_MONOTONIC: u64 = 1;
/// A reader that looked at the ring within this long (ns) is taken to be reading it.
const HEARTBEAT_AGE: u64 = 100_000_000;
/// A full ring makes a sampled call wait at most this many pauses (about 100 ms in all with the
/// kernel's default timer slack, the heartbeat's age) for a live reader to make room: a reader
/// the scheduler keeps off the CPU on a busy machine must not cost events. 200 pauses (about
/// 15 ms) lost one event in one CI run of sampling_e2e on the C fixture's bursts.
const RING_FULL_WAITS: u32 = 1500;
#[repr(C)]
struct Timespec {
    sec: i64,
    nsec: i64,
}
static RING_FULL_PAUSE: Timespec = Timespec { sec: 0, nsec: 20_000 };

const SYS_FUTEX: u64 = 202;
/// Not `FUTEX_PRIVATE_FLAG`: the sleeper is another process.
const FUTEX_WAKE: u64 = 1;

const SYS_GETPID: u64 = 39;
const SYS_PROCESS_VM_READV: u64 = 310;
const PAGE: u64 = 4096;
/// Pages of stack a slot can hold, plus the partial first one.
const MAX_IOV: usize = 18;

#[repr(C)]
#[derive(Clone, Copy)]
struct Iovec {
    base: u64,
    len: u64,
}

/// A raw system call (no errno, no libc): returns the kernel's result, negative on error.
#[inline(always)]
fn syscall6(nr: u64, args: [u64; 6]) -> i64 {
    let ret: i64;
    // SAFETY: the calls made with it (getpid, process_vm_readv) touch only memory given to
    // them, which the kernel checks.
    unsafe {
        core::arch::asm!(
            "syscall",
            inlateout("rax") nr as i64 => ret,
            in("rdi") args[0],
            in("rsi") args[1],
            in("rdx") args[2],
            in("r10") args[3],
            in("r8") args[4],
            in("r9") args[5],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    ret
}

/// Copies up to `max` bytes from `from` (a stack pointer) to `to`, stopping at the first page
/// that cannot be read (the top of the stack): the kernel copies for us and reports a fault
/// as a short count instead of a signal. One iovec per page, so that the copy ends on the last
/// readable one (a short transfer never splits an iovec). Returns the bytes copied.
fn copy_stack(from: u64, to: u64, max: u64) -> u64 {
    // Left uninitialised beyond `n` (zeroing it would call memset, which this object has not).
    let mut remote = [const { core::mem::MaybeUninit::<Iovec>::uninit() }; MAX_IOV];
    let end = from.saturating_add(max);
    let (mut at, mut n) = (from, 0);
    while at < end && n < MAX_IOV {
        let stop = ((at / PAGE + 1) * PAGE).min(end);
        remote[n].write(Iovec { base: at, len: stop - at });
        n += 1;
        at = stop;
    }
    let local = Iovec { base: to, len: at - from };
    let pid = syscall6(SYS_GETPID, [0; 6]) as u64;
    let got = syscall6(
        SYS_PROCESS_VM_READV,
        [
            pid,
            &raw const local as u64,
            1,
            remote.as_ptr() as u64,
            n as u64,
            0,
        ],
    );
    if got < 0 { 0 } else { got as u64 }
}

/// The alloc probe site. A uprobe on its first instruction reads the event at `rdi`. Without
/// one it only counts its calls and keeps a copy of the last event (for tests and
/// post-mortems).
#[unsafe(no_mangle)]
#[inline(never)]
///
/// # Safety
/// `ev` must point to a readable event.
pub unsafe extern "C" fn tracer_alloc_site(ev: *const SampledCall) {
    let c = ctl();
    count(c, counter::ALLOC_SITE);
    // SAFETY: `ev` is the caller's event; the copy's target is in the control block.
    unsafe { copy_event(ev, &raw mut (*c).last_alloc) };
}

/// The free probe site: as [`tracer_alloc_site`], for frees of sampled blocks.
#[unsafe(no_mangle)]
#[inline(never)]
///
/// # Safety
/// As for [`tracer_alloc_site`].
pub unsafe extern "C" fn tracer_free_site(ev: *const SampledCall) {
    let c = ctl();
    count(c, counter::FREE_SITE);
    // SAFETY: as in tracer_alloc_site.
    unsafe { copy_event(ev, &raw mut (*c).last_free) };
}

/// Copies an event word by word with atomic stores: threads may write the copy at once.
///
/// # Safety
/// `from` must be readable and `to` 8-aligned and writable (the control block, a ring slot).
#[inline(always)]
unsafe fn copy_event(from: *const SampledCall, to: *mut SampledCall) {
    const WORDS: usize = core::mem::size_of::<SampledCall>() / 8;
    for i in 0..WORDS {
        // SAFETY: SampledCall is WORDS 8-byte words, both 8-aligned.
        unsafe { word(to.cast::<u64>().add(i)).store(*from.cast::<u64>().add(i), Relaxed) };
    }
}

/// `a * b` as glibc's calloc and reallocarray check it: None (ENOMEM) on overflow.
#[inline(always)]
fn product(a: usize, b: usize) -> Option<u64> {
    a.checked_mul(b).map(|v| v as u64)
}

// The entry points. Each is jumped to from the allocator's patched entry with the caller's
// registers and stack untouched; it passes its stack pointer (the caller's return-address slot)
// and frame pointer on as extra arguments, in registers that no hooked function uses for its
// own (all take at most three), and jumps to the body, which returns to the caller itself.

macro_rules! entry {
    ($(#[$doc:meta])* $name:ident => $body:ident ($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// As for the libc function it replaces.
        #[unsafe(naked)]
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name($($arg: $ty),*) $(-> $ret)? {
            core::arch::naked_asm!(
                ".cfi_startproc",
                "mov rcx, rsp",
                "mov r8, rbp",
                "jmp {body}",
                ".cfi_endproc",
                body = sym $body,
            )
        }
    };
}

entry!(
    /// malloc.
    tracer_malloc => malloc_body(size: usize) -> *mut c_void
);
entry!(
    /// calloc.
    tracer_calloc => calloc_body(n: usize, size: usize) -> *mut c_void
);
entry!(
    /// realloc.
    tracer_realloc => realloc_body(ptr: *mut c_void, size: usize) -> *mut c_void
);
entry!(
    /// reallocarray.
    tracer_reallocarray => reallocarray_body(ptr: *mut c_void, n: usize, size: usize) -> *mut c_void
);
entry!(
    /// free.
    tracer_free => free_body(ptr: *mut c_void)
);
entry!(
    /// posix_memalign.
    tracer_posix_memalign => posix_memalign_body(memptr: *mut *mut c_void, align: usize, size: usize) -> c_int
);
entry!(
    /// memalign.
    tracer_memalign => memalign_body(align: usize, size: usize) -> *mut c_void
);
entry!(
    /// aligned_alloc.
    tracer_aligned_alloc => aligned_alloc_body(align: usize, size: usize) -> *mut c_void
);
entry!(
    /// valloc.
    tracer_valloc => valloc_body(size: usize) -> *mut c_void
);
entry!(
    /// pvalloc.
    tracer_pvalloc => pvalloc_body(size: usize) -> *mut c_void
);

/// The hooks that return a block, after the real call: the countdown, and the event if
/// sampled. `size` is what the call allocates when it succeeds.
#[inline(always)]
fn after_alloc(c: *mut Control, hook: Hook, caller: Caller, p: *mut c_void, size: u64, mean: u64) {
    if take_sample(c, size, mean) {
        sampled_alloc(c, hook, caller, p as u64, size, mean, 0);
    }
}

/// The body of the hooks that take one size and return a block (malloc, valloc).
#[inline(always)]
fn one_size(hook: Hook, size: usize, sp: *const u64, bp: u64) -> *mut c_void {
    let c = ctl();
    let Some(real) = real::<MallocFn>(c, hook) else {
        return core::ptr::null_mut();
    };
    let Some(mean) = sampling_mean(c, sp) else {
        // SAFETY: the caller's own call, passed on.
        return unsafe { real(size) };
    };
    // SAFETY: as above.
    let p = unsafe { real(size) };
    after_alloc(c, hook, Caller { sp, bp }, p, size as u64, mean);
    p
}

extern "C" fn malloc_body(size: usize, _: usize, _: usize, sp: *const u64, bp: u64) -> *mut c_void {
    one_size(Hook::Malloc, size, sp, bp)
}

extern "C" fn valloc_body(size: usize, _: usize, _: usize, sp: *const u64, bp: u64) -> *mut c_void {
    one_size(Hook::Valloc, size, sp, bp)
}

extern "C" fn pvalloc_body(
    size: usize,
    _: usize,
    _: usize,
    sp: *const u64,
    bp: u64,
) -> *mut c_void {
    let c = ctl();
    let Some(real) = real::<MallocFn>(c, Hook::Pvalloc) else {
        return core::ptr::null_mut();
    };
    // glibc hands out whole pages, one for 0 bytes; a size that overflows when rounded up
    // fails there (and is not sampled, as in the kernel sampler).
    const PAGE: u64 = 4096;
    let rounded = (size as u64)
        .checked_add(PAGE - 1)
        .map(|v| (v / PAGE).max(1) * PAGE);
    let (Some(mean), Some(rounded)) = (sampling_mean(c, sp), rounded) else {
        // SAFETY: the caller's own call, passed on.
        return unsafe { real(size) };
    };
    // SAFETY: as above.
    let p = unsafe { real(size) };
    after_alloc(c, Hook::Pvalloc, Caller { sp, bp }, p, rounded, mean);
    p
}

/// The body of memalign and aligned_alloc: (alignment, size).
#[inline(always)]
fn aligned(hook: Hook, align: usize, size: usize, sp: *const u64, bp: u64) -> *mut c_void {
    let c = ctl();
    let Some(real) = real::<MemalignFn>(c, hook) else {
        return core::ptr::null_mut();
    };
    let Some(mean) = sampling_mean(c, sp) else {
        // SAFETY: the caller's own call, passed on.
        return unsafe { real(align, size) };
    };
    // SAFETY: as above.
    let p = unsafe { real(align, size) };
    after_alloc(c, hook, Caller { sp, bp }, p, size as u64, mean);
    p
}

extern "C" fn memalign_body(
    align: usize,
    size: usize,
    _: usize,
    sp: *const u64,
    bp: u64,
) -> *mut c_void {
    aligned(Hook::Memalign, align, size, sp, bp)
}

extern "C" fn aligned_alloc_body(
    align: usize,
    size: usize,
    _: usize,
    sp: *const u64,
    bp: u64,
) -> *mut c_void {
    aligned(Hook::AlignedAlloc, align, size, sp, bp)
}

extern "C" fn calloc_body(n: usize, size: usize, _: usize, sp: *const u64, bp: u64) -> *mut c_void {
    let c = ctl();
    let Some(real) = real::<CallocFn>(c, Hook::Calloc) else {
        return core::ptr::null_mut();
    };
    // An overflowing n * size fails in glibc with ENOMEM: nothing to sample.
    let (Some(mean), Some(bytes)) = (sampling_mean(c, sp), product(n, size)) else {
        // SAFETY: the caller's own call, passed on.
        return unsafe { real(n, size) };
    };
    // SAFETY: as above.
    let p = unsafe { real(n, size) };
    after_alloc(c, Hook::Calloc, Caller { sp, bp }, p, bytes, mean);
    p
}

extern "C" fn posix_memalign_body(
    memptr: *mut *mut c_void,
    align: usize,
    size: usize,
    sp: *const u64,
    bp: u64,
) -> c_int {
    let c = ctl();
    let Some(real) = real::<PosixMemalignFn>(c, Hook::PosixMemalign) else {
        return 12; // ENOMEM
    };
    let Some(mean) = sampling_mean(c, sp) else {
        // SAFETY: the caller's own call, passed on.
        return unsafe { real(memptr, align, size) };
    };
    // SAFETY: as above.
    let ret = unsafe { real(memptr, align, size) };
    if take_sample(c, size as u64, mean) {
        // The block is in *memptr only on success; on failure it is left alone.
        // SAFETY: posix_memalign wrote *memptr, which the caller passed for that.
        let addr = if ret == 0 {
            unsafe { *memptr as u64 }
        } else {
            0
        };
        sampled_alloc(
            c,
            Hook::PosixMemalign,
            Caller { sp, bp },
            addr,
            size as u64,
            mean,
            0,
        );
    }
    ret
}

extern "C" fn free_body(ptr: *mut c_void, _: usize, _: usize, sp: *const u64, bp: u64) {
    let c = ctl();
    let Some(real) = real::<FreeFn>(c, Hook::Free) else {
        return;
    };
    // The path of nearly every free: one byte of the set's counts says "not sampled".
    // SAFETY: `c` is the control block.
    if !ptr.is_null() && unsafe { load(&raw mut (*c).active) } != 0 && set_may_hold(c, ptr as u64) {
        free_maybe_sampled(c, ptr as u64, Caller { sp, bp });
    }
    // SAFETY: the caller's own call, passed on.
    unsafe { real(ptr) }
}

/// A free whose bucket holds addresses. Whoever frees a block of the set, even glibc from
/// inside its allocator, the block is gone and must leave the set: a stale address would be
/// taken for a later block's. (A realloc's own free of the old block never gets here: the
/// realloc's hook took the block out before calling the real realloc.)
#[cold]
#[inline(never)]
fn free_maybe_sampled(c: *mut Control, addr: u64, caller: Caller) {
    if set_remove(c, addr) {
        // Reported while the block is still allocated: once free has run, another thread may
        // be handed the same address and report it as sampled.
        sampled_free(c, Hook::Free, caller, addr, 0);
    }
}

extern "C" fn realloc_body(
    ptr: *mut c_void,
    size: usize,
    _: usize,
    sp: *const u64,
    bp: u64,
) -> *mut c_void {
    let c = ctl();
    let Some(real) = real::<ReallocFn>(c, Hook::Realloc) else {
        return core::ptr::null_mut();
    };
    let Some(counting) = resize_mean(c, ptr, sp) else {
        // SAFETY: the caller's own call, passed on.
        return unsafe { real(ptr, size) };
    };
    // SAFETY: as above.
    resize(
        c,
        Hook::Realloc,
        Caller { sp, bp },
        ptr,
        size as u64,
        counting,
        || unsafe { real(ptr, size) },
    )
}

extern "C" fn reallocarray_body(
    ptr: *mut c_void,
    n: usize,
    size: usize,
    sp: *const u64,
    bp: u64,
) -> *mut c_void {
    let c = ctl();
    let Some(real) = real::<ReallocarrayFn>(c, Hook::Reallocarray) else {
        return core::ptr::null_mut();
    };
    // An overflowing n * size fails with ENOMEM and leaves the block alone.
    let (Some(counting), Some(bytes)) = (resize_mean(c, ptr, sp), product(n, size)) else {
        // SAFETY: the caller's own call, passed on.
        return unsafe { real(ptr, n, size) };
    };
    // SAFETY: as above.
    resize(
        c,
        Hook::Reallocarray,
        Caller { sp, bp },
        ptr,
        bytes,
        counting,
        || unsafe { real(ptr, n, size) },
    )
}

/// Whether a realloc passes straight through (None), or what it does: `Some(Some(mean))`
/// counts its bytes at `mean`; `Some(None)`, a call from the allocator itself on a block
/// that may be sampled, only settles the old block (it leaves the set whoever resizes it).
#[inline(always)]
fn resize_mean(c: *mut Control, ptr: *mut c_void, sp: *const u64) -> Option<Option<u64>> {
    let mean = active_mean(c)?;
    // SAFETY: `sp` holds the caller's return address.
    if !is_internal(c, unsafe { *sp }) {
        Some(Some(mean))
    } else if !ptr.is_null() && set_may_hold(c, ptr as u64) {
        Some(None)
    } else {
        None
    }
}

/// realloc and reallocarray, as the kernel sampler treats them: a free of the old block (if it
/// was sampled) and an allocation of `size` bytes. The old block is taken out of the set and
/// reported held before the real call (which may release it to another thread), and settled by
/// the alloc event after it: released if realloc succeeded or was realloc(p, 0), else kept.
#[inline(always)]
fn resize(
    c: *mut Control,
    hook: Hook,
    caller: Caller,
    old: *mut c_void,
    size: u64,
    counting: Option<u64>,
    call: impl FnOnce() -> *mut c_void,
) -> *mut c_void {
    let old = old as u64;
    let held = old != 0 && set_may_hold(c, old) && hold_old(c, hook, caller, old);
    let new = call();
    let sampled = match counting {
        Some(mean) => take_sample(c, size, mean),
        None => false,
    };
    if held {
        settle(c, hook, caller, old, new as u64, size, counting, sampled);
    } else if let (true, Some(mean)) = (sampled, counting) {
        sampled_alloc(c, hook, caller, new as u64, size, mean, 0);
    }
    new
}

#[cold]
#[inline(never)]
fn hold_old(c: *mut Control, hook: Hook, caller: Caller, old: u64) -> bool {
    if !set_remove(c, old) {
        return false;
    }
    sampled_free(c, hook, caller, old, flags::HOLD);
    true
}

/// After a realloc of a held block: its fate, with the new block's event if that was sampled.
#[cold]
#[inline(never)]
#[expect(
    clippy::too_many_arguments,
    reason = "one call site, the state of one realloc"
)]
fn settle(
    c: *mut Control,
    hook: Hook,
    caller: Caller,
    old: u64,
    new: u64,
    size: u64,
    counting: Option<u64>,
    sampled: bool,
) {
    // realloc(p, 0) frees p and returns NULL; any other NULL leaves p allocated.
    let fate = if new != 0 || size == 0 {
        flags::OLD_RELEASED
    } else if set_insert(c, old) {
        flags::OLD_KEPT
    } else {
        count(c, counter::RESTORE_FULL);
        flags::OLD_KEPT | flags::OLD_UNTRACKED
    };
    if let (true, Some(mean), true) = (sampled, counting, new != 0) {
        sampled_alloc(c, hook, caller, new, size, mean, fate);
        return;
    }
    if sampled {
        count(c, counter::FAILED_ALLOCS);
    }
    let kind = match hook.alloc_kind() {
        Some(kind) => kind as u32,
        None => AllocKind::Realloc as u32,
    };
    let ev = SampledCall {
        flags: fate | flags::NOT_SAMPLED,
        ..event(c, hook, caller, kind)
    };
    report(here!(tracer_alloc_site), &ev);
}

/// Only in the shared object: the workspace's own builds of this library may link it next to
/// std (through tracer-common's `user` feature), which has its handler.
#[cfg(tracer_sampler_so)]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // Unreachable: the shared object's build fails if anything links this in. Were it ever
    // reached, stopping the process beats returning garbage from its allocator.
    // SAFETY: ud2 raises SIGILL and never returns.
    unsafe { core::arch::asm!("ud2", options(noreturn, nomem, nostack)) }
}
