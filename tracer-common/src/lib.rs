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
    /// Stack pointer at the call's entry, where its return address lies. A later entry on
    /// the thread at or above it cannot be nested in this call: its frame is gone (longjmp,
    /// or a return probe that never fired), and the entry is stale.
    pub sp: u64,
}

/// A live block. Key: its address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
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
    /// Every scratch stack buffer of the CPU was in use (programs preempted on it): the
    /// allocation is counted under the lost-stack key.
    pub const DROP_SCRATCH_BUSY: u32 = 10;
    /// A call in flight whose return was never seen (its frame was left by longjmp, or its
    /// return probe could not be armed), found stale by a later call on the same thread.
    pub const STALE_PENDING: u32 = 11;
    /// Two different stacks with the same key: the later one is counted under the
    /// lost-stack key rather than merged into the other.
    pub const STACK_COLLISION: u32 = 12;
    /// The stack map refused a new stack for a reason other than being full.
    pub const STACK_INSERT_FAILED: u32 = 13;
    /// A stack's peak could not be raised after several tries (other CPUs kept raising it):
    /// that peak may be short of the true one.
    pub const PEAK_CONTENDED: u32 = 14;
    /// Not a loss: live malloc-family bytes (two's complement sum over CPUs), so that user
    /// space reads the total with one lookup.
    pub const LIVE_BYTES: u32 = 15;
    /// CFI walk (`--unwind dwarf|auto`): stacks cut short, by why. The allocation is counted
    /// in full under the frames found so far.
    /// The pc lies in code without unwind rows, and frame pointers are not allowed (dwarf).
    pub const UNWIND_NO_ROWS: u32 = 16;
    /// A stack slot or saved register could not be read, or the frame went the wrong way
    /// (the stack pointer must grow from frame to frame).
    pub const UNWIND_BAD_FRAME: u32 = 17;
    /// A return address outside every executable mapping of the process: not a frame.
    pub const UNWIND_OUTSIDE_MAPPINGS: u32 = 18;
    /// The rows say the CFA or the return address is found in a way the walker cannot do.
    pub const UNWIND_UNSUPPORTED: u32 = 19;
    /// The stack was deeper than `MAX_FRAMES` (not a failure of the walk).
    pub const UNWIND_DEPTH_CAP: u32 = 20;
    /// A new stack with V8 frames could not be announced to user space (its ring was full):
    /// its frames are named when a snapshot meets it, later than the GC-safe second.
    pub const JS_NOTICE_LOST: u32 = 21;
    /// The in-process sampler sampled an allocation but could not keep its address (its set
    /// was full), so the block's free will not be reported: counted as allocated, not as live.
    /// Also a failed realloc's block that could not go back into the set.
    pub const SAMPLER_UNTRACKED: u32 = 22;
    /// The in-process sampler's ring (the ptrace fallback, `sampler::RingHeader`) was full
    /// when a sampled event came: that allocation, or that free, was not seen.
    pub const SAMPLER_RING_FULL: u32 = 23;
    pub const COUNT: u32 = 24;
}

/// Where a recording stands, in the allocator programs' `PHASE` map (set by user space).
pub mod recording_phase {
    /// The probes are going in: a return probe may see a call that began before them.
    pub const ATTACHING: u32 = 0;
    pub const RECORDING: u32 = 1;
    /// The probes are about to close: entries start no call.
    pub const STOPPING: u32 = 2;
}

/// How a stack is walked in the kernel; a value of the `UNWIND_MODE` global.
pub mod unwind_mode {
    /// `bpf_get_stack` (frame pointers), with the allocator's caller read at the probe.
    pub const FP: u64 = 0;
    /// Unwind rows only: a frame without rows ends the stack (counted).
    pub const DWARF: u64 = 1;
    /// Unwind rows where a module has them, frame pointers elsewhere.
    pub const AUTO: u64 = 2;
}

/// How to find the caller's frame, for the addresses from a row's `pc` to the next row's.
/// Values of [`UnwindRow::kind`].
pub mod row_kind {
    /// CFA = rsp + `cfa_off`; return address at CFA - 8.
    pub const CFA_RSP: u8 = 0;
    /// CFA = rbp + `cfa_off`; return address at CFA - 8.
    pub const CFA_RBP: u8 = 1;
    /// A PLT entry: CFA = rsp + `cfa_off`, plus 8 when (pc & 15) >= `rbp` (the shape every
    /// linker writes for its .plt section).
    pub const PLT: u8 = 2;
    /// A signal frame (`__restore_rt`): the interrupted registers are in the ucontext at rsp.
    pub const SIGNAL: u8 = 3;
    /// The return address is undefined here (`_start`, a thread's start): the stack ends.
    pub const END: u8 = 4;
    /// No rows cover these addresses (between functions).
    pub const NONE: u8 = 5;
    /// Rows exist, in a form the walker does not follow.
    pub const UNSUPPORTED: u8 = 6;
}

/// Where `__restore_rt`'s ucontext keeps the interrupted registers, from rsp at its first
/// instruction (x86-64 `struct rt_sigframe` minus the return address slot already popped).
pub mod sigframe {
    pub const RBP: u64 = 120;
    pub const RSP: u64 = 160;
    pub const RIP: u64 = 168;
}

/// One unwind row of a module: from `pc` (the module's ELF virtual address) up to the next
/// row's, the CFA rule (`kind`, `cfa_off`) and where rbp was saved: `rbp` * 8 bytes from the
/// CFA, or 0 when rbp still holds the caller's value. Sorted by `pc` within a module.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindRow {
    pub pc: u32,
    pub cfa_off: i16,
    pub kind: u8,
    pub rbp: i8,
}

/// One executable mapping of the traced process: `start..end`, `bias` (pc - bias is the
/// module's ELF address), and its rows in the rows array (`rows_len` 0: none, walk by frame
/// pointer). Sorted by `start` in its table.
///
/// The module's page index narrows a row search: entry `p` of its `pages_len` entries (from
/// `pages_first` in the pages array) is the index, from `rows_first`, of the last row that
/// starts at or below ELF address `page_base + p * UNWIND_PAGE`, so the row of an address in
/// that page lies between entries `p` and `p + 1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindMapping {
    pub start: u64,
    pub end: u64,
    pub bias: u64,
    pub page_base: u64,
    pub rows_first: u32,
    pub rows_len: u32,
    pub pages_first: u32,
    pub pages_len: u32,
    /// [`mapping_flag`] bits: what kind of code the mapping holds, for the V8 frame reader.
    pub flags: u64,
}

/// Bits of [`UnwindMapping::flags`].
pub mod mapping_flag {
    /// A run of anonymous executable memory (JIT code).
    pub const ANON_CODE: u64 = 1;
    /// A mapping of the binary that holds V8's embedded builtins (see [`super::V8Config`]).
    pub const V8_BINARY: u64 = 2;
}

/// Bytes of module address space per entry of a page index.
pub const UNWIND_PAGE_SHIFT: u32 = 8;

/// Mapping table slots: two halves of `MAX_UNWIND_MAPPINGS` (user space fills the one not in
/// use, then flips [`UnwindHeader::active`]).
pub const MAX_UNWIND_MAPPINGS: u32 = 512;

/// Slot 0 of the `UNWIND_HEADER` array: which half of the mapping table is in use, and how
/// many entries each half holds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindHeader {
    pub active: u32,
    pub _pad: u32,
    pub len: [u32; 2],
}

/// Bytes of the user stack copied for a walk that user space finishes.
pub const DEFERRED_STACK_BYTES: usize = 8192;

/// Marks the last frame of a stack whose walk met code the kernel's tables did not hold yet
/// (a library mapped moments ago): the frame is this bit with a token that names the
/// [`DeferredStack`] from which user space finishes the walk. No user address has it.
pub const DEFERRED_TOKEN: u64 = 1 << 63;

/// The rest of a walk, for user space: the frame the kernel could not place, and a copy of the
/// stack from its stack pointer up.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DeferredStack {
    pub token: u64,
    pub pc: u64,
    pub sp: u64,
    pub bp: u64,
    /// 1 when `pc` is exact rather than a return address.
    pub exact: u32,
    /// Bytes of `bytes` that hold the stack from `sp`.
    pub copied: u32,
    pub bytes: [u8; DEFERRED_STACK_BYTES],
}

/// What the stack walker needs to read a V8 frame (slot 0 of `V8_CONFIG`), written by user
/// space from the node binary's `v8dbg_*` metadata; `enabled` 0 leaves V8 frames unread.
///
/// A frame whose pc lies in anonymous executable memory, or in the embedded builtins of a
/// mapping flagged [`mapping_flag::V8_BINARY`] (ELF addresses `blob_start..blob_end`), is read
/// at its frame pointer: a window of [`V8_FRAME_WINDOW`] bytes below it holds the context,
/// JSFunction, BytecodeArray and bytecode offset slots (`*_slot` are word indices into that
/// window). The JSFunction's `shared` field is followed to the SharedFunctionInfo, of which
/// [`V8_SFI_WINDOW`] bytes are read (`sfi_*_word` index that window): its function data, its
/// Script and, in the high half of its flags word, its function literal id. The Script's id
/// (a Smi at `script_id`) and the literal id name the function for as long as the process
/// lives, wherever a GC moves it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V8Config {
    pub enabled: u64,
    pub blob_start: u64,
    pub blob_end: u64,
    /// Offset of JSFunction's `shared` field from the (untagged) object start.
    pub js_function_shared: u64,
    /// Offset of Script's `id` from the (untagged) object start.
    pub script_id: u64,
    /// Where a BytecodeArray's bytecodes start, from its tagged pointer: the offset slot's Smi
    /// less this is the offset into the bytecodes.
    pub bytecode_start: u64,
    pub context_slot: u32,
    pub function_slot: u32,
    pub bytecode_array_slot: u32,
    pub bytecode_offset_slot: u32,
    pub sfi_function_data_word: u32,
    pub sfi_script_word: u32,
    pub sfi_literal_id_word: u32,
    /// 1 once the probe on V8's mark-compact collector is in place: what the walker read of
    /// a SharedFunctionInfo is then kept until the next one (which may move it).
    pub cache: u32,
}

/// Entries of the walker's SharedFunctionInfo cache, per scratch slot (per CPU).
pub const V8_CACHE_ENTRIES: u32 = 256;

/// What the walker keeps of a SharedFunctionInfo it read (see [`V8Config::cache`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct V8CacheEntry {
    /// Its address (0: empty), and the mark-compact count when it was read.
    pub sfi: u64,
    pub epoch: u64,
    pub script_id: u64,
    pub literal: u64,
    pub function_data: u64,
}

/// Bytes below a V8 frame's frame pointer that the walker reads in one go.
pub const V8_FRAME_WINDOW: usize = 48;
/// Bytes of a SharedFunctionInfo that the walker reads in one go.
pub const V8_SFI_WINDOW: usize = 56;

/// How a captured V8 frame sits in a [`StackBuf`]: right after the frame's pc come two words.
///
/// The identity word (bits 63-62 set) names the function for the life of the process:
/// bit 61 `JIT` (the pc is in JIT code), bits 60-37 the Script's id, bits 36-17 the function
/// literal id (its index in the script), bits 16-0 the bytecode offset plus one (0: none, or
/// too large). The address word (bits 63-61 = 011) is the SharedFunctionInfo's address when
/// captured, for user space to read the names from. What a compacting GC moves stays out of
/// the stack's key, which must not change when it does: the address word, and the pc of JIT
/// code, which is then stored as an address word too (the one before the identity word).
/// None of them can be taken for a pc (no user address has bit 62 set) or for a
/// [`DEFERRED_TOKEN`] (bit 63 and never bit 62).
pub mod js_frame {
    pub const ID_TAG: u64 = 3 << 62;
    pub const JIT: u64 = 1 << 61;
    pub const ADDR_TAG: u64 = 3 << 61;
    pub const SCRIPT_BITS: u32 = 24;
    pub const LITERAL_BITS: u32 = 20;
    pub const OFFSET_BITS: u32 = 17;

    /// Whether `word` is an identity word.
    #[inline(always)]
    pub fn is_id(word: u64) -> bool {
        word & ID_TAG == ID_TAG
    }

    /// Whether `word` is an address word.
    #[inline(always)]
    pub fn is_addr(word: u64) -> bool {
        word >> 61 == 3
    }

    /// The identity word.
    #[inline(always)]
    pub fn id(jit: bool, script: u64, literal: u64, offset_plus_one: u64) -> u64 {
        let offset = if offset_plus_one < 1 << OFFSET_BITS { offset_plus_one } else { 0 };
        ID_TAG
            | if jit { JIT } else { 0 }
            | (script & ((1 << SCRIPT_BITS) - 1)) << (LITERAL_BITS + OFFSET_BITS)
            | (literal & ((1 << LITERAL_BITS) - 1)) << OFFSET_BITS
            | offset
    }

    /// The address word for a SharedFunctionInfo at untagged address `sfi`.
    #[inline(always)]
    pub fn addr(sfi: u64) -> u64 {
        ADDR_TAG | (sfi & ((1 << 61) - 1))
    }

    /// (script id, literal id, bytecode offset plus one) of an identity word, each as wide as
    /// the word keeps it.
    #[inline(always)]
    pub fn fields(id: u64) -> (u32, u32, u32) {
        (
            ((id >> (LITERAL_BITS + OFFSET_BITS)) & ((1 << SCRIPT_BITS) - 1)) as u32,
            ((id >> OFFSET_BITS) & ((1 << LITERAL_BITS) - 1)) as u32,
            (id & ((1 << OFFSET_BITS) - 1)) as u32,
        )
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are repr(C), made only of u64/i64/u32 fields laid out without padding.
    unsafe impl aya::Pod for super::UnwindRow {}
    unsafe impl aya::Pod for super::UnwindMapping {}
    unsafe impl aya::Pod for super::UnwindHeader {}
    unsafe impl aya::Pod for super::V8Config {}
    unsafe impl aya::Pod for super::V8CacheEntry {}
    unsafe impl aya::Pod for super::DeferredStack {}
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

/// One mmap-family syscall of the target, streamed to user space (they are rare, and their
/// address-range bookkeeping needs every one, in order). Every call is sent as it returns;
/// munmap and mremap are also sent as they enter, since the range they free can be handed
/// to another thread's mmap before they return.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SyscallEvent {
    pub args: [u64; 6],
    /// The syscall's return value (negative errno on failure); 0 at entry.
    pub ret: i64,
    pub stack: u64,
    pub timestamp_ns: u64,
    pub tid: u32,
    pub sys: u32,
    pub in_allocator: u32,
    /// [`phase::ENTRY`] or [`phase::EXIT`].
    pub phase: u32,
}

/// Values of `SyscallEvent::phase`.
pub mod phase {
    pub const EXIT: u32 = 0;
    pub const ENTRY: u32 = 1;
}

/// Indices into the per-CPU `SYSCALL_COUNTERS` array.
pub mod syscall_counter {
    /// Events lost because the ring buffer was full: the address-range bookkeeping missed them.
    pub const EVENTS_LOST: u32 = 0;
    /// Pending-syscall map full. Never counted since syscalls are read whole at their exit
    /// (no map holds them in flight); kept because reports name every reason they ever had.
    pub const PENDING_FULL: u32 = 1;
    pub const COUNT: u32 = 2;
}

#[cfg(feature = "user")]
mod user_syscalls {
    // SAFETY: repr(C), u64/i64/u32 fields only, no padding (SyscallEvent pads explicitly).
    unsafe impl aya::Pod for super::SyscallEvent {}
}

pub mod sampler;
pub mod sampling;
