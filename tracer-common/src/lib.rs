//! Types shared by the BPF programs (tracer-ebpf) and user space (tracer): map keys and
//! values, counter indices and the allocator kinds. All `#[repr(C)]`, fixed width, no padding.
#![no_std]

/// Deepest user stack we keep, frames. The kernel's default `perf_event_max_stack` is 127;
/// one slot more holds the direct caller that an entry probe would otherwise lose.
pub const MAX_FRAMES: usize = 128;

/// Stack hash for allocations whose stack could not be captured: they are still counted,
/// under this key, so that totals stay exact.
pub const STACK_LOST: u64 = 0;

/// The allocator function an entry probe sits on, passed to the BPF program as the low
/// byte of the attach cookie.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocKind {
    Malloc = 0,
    Calloc = 1,
    Realloc = 2,
    Reallocarray = 3,
    PosixMemalign = 4,
    /// memalign and aligned_alloc (one function in glibc).
    Memalign = 5,
    Valloc = 6,
    Pvalloc = 7,
}

impl AllocKind {
    pub const ALL: [AllocKind; 8] = [
        AllocKind::Malloc,
        AllocKind::Calloc,
        AllocKind::Realloc,
        AllocKind::Reallocarray,
        AllocKind::PosixMemalign,
        AllocKind::Memalign,
        AllocKind::Valloc,
        AllocKind::Pvalloc,
    ];

    pub const fn from_u32(v: u32) -> Option<AllocKind> {
        match v {
            0 => Some(AllocKind::Malloc),
            1 => Some(AllocKind::Calloc),
            2 => Some(AllocKind::Realloc),
            3 => Some(AllocKind::Reallocarray),
            4 => Some(AllocKind::PosixMemalign),
            5 => Some(AllocKind::Memalign),
            6 => Some(AllocKind::Valloc),
            7 => Some(AllocKind::Pvalloc),
            _ => None,
        }
    }
}

/// Attach cookie layout: bits 0..8 the [`AllocKind`], bits 16..32 the offset from the
/// stack pointer at the probed instruction to the return address (bytes).
pub const fn cookie(kind: AllocKind, ret_sp_offset: u16) -> u64 {
    (kind as u64) | ((ret_sp_offset as u64) << 16)
}
pub const fn cookie_kind(cookie: u64) -> u32 {
    (cookie & 0xff) as u32
}
pub const fn cookie_sp_offset(cookie: u64) -> u64 {
    (cookie >> 16) & 0xffff
}

/// Per-thread state between an allocator's entry and its return. Key: pid_tgid.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Pending {
    /// Bytes the call will allocate if it succeeds.
    pub size: u64,
    /// realloc/reallocarray: the block passed in; posix_memalign: `memptr`.
    pub ptr_arg: u64,
    /// Stack hash of the outermost call (see [`StackBuf`]), or [`STACK_LOST`].
    pub stack: u64,
    /// realloc: size of the old block if it was live (removed at entry, put back on failure).
    pub old_size: u64,
    /// realloc: stack of the old block if it was live.
    pub old_stack: u64,
    /// Allocator calls nested on this thread (realloc -> malloc); only the outermost counts.
    pub depth: u32,
    pub kind: u32,
    /// 1 when `size` overflowed (calloc, reallocarray): the call must fail.
    pub overflow: u32,
    /// 1 when `old_*` hold a live block taken out at entry.
    pub had_old: u32,
    /// The address the call returns to: in sampling mode, one program sees both the entry
    /// and the return of a call, and tells them apart by the instruction pointer.
    pub ret_addr: u64,
    /// 1 when the call is recorded (always in full mode; when sampled in sampling mode).
    pub sampled: u32,
    pub _pad: u32,
}

/// A live block. Key: its address.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LiveAlloc {
    pub size: u64,
    pub stack: u64,
    /// bpf_ktime_get_ns() at allocation.
    pub timestamp_ns: u64,
}

/// Per-stack totals, kept in the kernel. Key: stack hash. Updated with atomic adds, so the
/// live fields are signed: a snapshot may catch a free before its alloc is added.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackStats {
    pub live_bytes: i64,
    pub live_allocs: i64,
    pub alloc_bytes: u64,
    pub allocs: u64,
    /// The most live bytes this stack held at any moment of the recording (an atomic max,
    /// updated after each allocation's add).
    pub peak_bytes: i64,
}

/// One captured user stack: addresses, leaf first, with the direct caller in slot 1.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StackBuf {
    pub len: u64,
    pub frames: [u64; MAX_FRAMES],
}

/// Indices into the per-CPU `COUNTERS` array.
pub mod counter {
    /// Successful frees of a block we saw allocated.
    pub const FREES: u32 = 0;
    /// Frees of blocks we never saw allocated (allocated before attach, or dropped).
    pub const UNMATCHED_FREES: u32 = 1;
    /// Pending-call map full: the allocation was not seen.
    pub const DROP_PENDING_FULL: u32 = 2;
    /// Live-block map full: the block is counted in its stack's totals but its free will not be.
    pub const DROP_LIVE_FULL: u32 = 3;
    /// Per-stack stats map full: the allocation is counted under the lost-stack key.
    pub const DROP_STATS_FULL: u32 = 4;
    /// Stack map full: the allocation is counted under the lost-stack key.
    pub const DROP_STACK_MAP_FULL: u32 = 5;
    /// The kernel could not walk the user stack.
    pub const DROP_STACK_UNAVAILABLE: u32 = 6;
    /// An allocation returned an address we still held as live: its free was missed.
    pub const STALE_LIVE: u32 = 7;
    /// A return probe fired with no entry recorded (attached mid-call).
    pub const ORPHAN_RETURNS: u32 = 8;
    /// Allocator calls that failed (returned NULL or an error).
    pub const FAILED_ALLOCS: u32 = 9;
    pub const COUNT: u32 = 10;
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are repr(C), made only of u64/i64/u32 fields laid out without padding.
    unsafe impl aya::Pod for super::Pending {}
    unsafe impl aya::Pod for super::LiveAlloc {}
    unsafe impl aya::Pod for super::StackStats {}
    unsafe impl aya::Pod for super::StackBuf {}
}

/// The mmap family, traced at the syscall level. Values of `SyscallEvent::sys`.
pub mod sys {
    pub const MMAP: u32 = 9;
    pub const MPROTECT: u32 = 10;
    pub const MUNMAP: u32 = 11;
    pub const BRK: u32 = 12;
    pub const MREMAP: u32 = 25;
    pub const MADVISE: u32 = 28;
}

/// A mmap-family syscall between its entry and exit. Key: pid_tgid.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SyscallPending {
    pub args: [u64; 6],
    pub stack: u64,
    pub sys: u32,
    /// 1 when the thread was inside a malloc-family call (glibc mapping memory for malloc).
    pub in_allocator: u32,
}

/// One completed mmap-family syscall of the target, streamed to user space (they are rare,
/// and their address-range bookkeeping needs every one, in order).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SyscallEvent {
    pub args: [u64; 6],
    /// The syscall's return value (negative errno on failure).
    pub ret: i64,
    pub stack: u64,
    pub timestamp_ns: u64,
    pub tid: u32,
    pub sys: u32,
    pub in_allocator: u32,
    pub _pad: u32,
}

/// Indices into the per-CPU `SYSCALL_COUNTERS` array.
pub mod syscall_counter {
    /// Events lost because the ring buffer was full: the address-range bookkeeping missed them.
    pub const EVENTS_LOST: u32 = 0;
    /// Pending-syscall map full: the syscall was not seen.
    pub const PENDING_FULL: u32 = 1;
    pub const COUNT: u32 = 2;
}

#[cfg(feature = "user")]
mod user_syscalls {
    // SAFETY: repr(C), u64/i64/u32 fields only, no padding (SyscallEvent pads explicitly).
    unsafe impl aya::Pod for super::SyscallPending {}
    unsafe impl aya::Pod for super::SyscallEvent {}
}

pub mod sampling;
