//! A process that hosts the in-process sampler itself, for tests of the tracer's probe sites
//! without injection (tests/sampler_sites_e2e.rs): the embedded sampler is written to a memfd
//! and mapped from it, its real functions and reported entries are this process's libc, and
//! named functions call its hooks through their addresses in a known call tree.
//!
//! `sampler_host [MEAN]` (default 4096 bytes) prints `ready FD ALLOC_OFFSET FREE_OFFSET`, waits
//! for a line on stdin, runs the workload, prints what each caller allocated and keeps, then
//! `done`, and waits for stdin to close. Lines:
//! - `caller NAME SIZExCOUNT...`: blocks NAME allocated through the malloc hook and keeps;
//! - `ret NAME ADDR`: the return address of NAME's call of a hook (from the sampler's own copy
//!   of its last event);
//! - `entry NAME ADDR`: libc's address of a hooked function.
use std::{
    ffi::c_void,
    hint::black_box,
    io::{BufRead as _, Write as _},
    mem::offset_of,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::atomic::{AtomicU64, Ordering::SeqCst},
};

use tracer::inject::sampler::{LocalSampler, file_offset, libc_function, sampler_so};
use tracer_common::sampler::{
    BUCKET_SLOTS, BUCKETS, Control, Hook, SET_CAPACITY, SampledCall, counter,
};

type MallocFn = unsafe extern "C" fn(usize) -> *mut c_void;
type ReallocFn = unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void;
type FreeFn = unsafe extern "C" fn(*mut c_void);

/// The hooks, and the control block's words.
struct Host {
    sampler: LocalSampler,
    malloc: MallocFn,
    realloc: ReallocFn,
    free: FreeFn,
}

const MIB: usize = 1 << 20;
/// leak_a's blocks: sizes around the mean, so that many are sampled.
const LEAK_SIZES: [usize; 3] = [1000, 4000, 16000];
const LEAK_BLOCKS: usize = 3000;
const CHURN_BLOCKS: usize = 20000;
const UNTRACKED_BLOCKS: usize = 4;

impl Host {
    fn word(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: an aligned word of the control block, which lives as long as the host.
        unsafe { AtomicU64::from_ptr((self.sampler.control() as *mut u8).add(offset).cast()) }
    }

    fn alloc_hits(&self) -> u64 {
        self.word(offset_of!(Control, counters) + 8 * counter::ALLOC_SITE)
            .load(SeqCst)
    }

    fn last_alloc_ret(&self) -> u64 {
        self.word(offset_of!(Control, last_alloc) + offset_of!(SampledCall, ret_addr))
            .load(SeqCst)
    }
}

/// Blocks of known sizes, kept. Prints the return address of its malloc call, as the sampler
/// saw it at the first sampled call.
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn leak_a(h: &Host, kept: &mut Vec<usize>) {
    let mut ret = None;
    for i in 0..LEAK_BLOCKS {
        let before = h.alloc_hits();
        // SAFETY: the malloc hook, called as malloc.
        let p = unsafe { (h.malloc)(black_box(LEAK_SIZES[i % LEAK_SIZES.len()])) };
        assert!(!p.is_null());
        if ret.is_none() && h.alloc_hits() != before {
            ret = Some(h.last_alloc_ret());
        }
        kept.push(p as usize);
    }
    println!(
        "ret leak_a {:#x}",
        ret.expect("some block of leak_a was sampled")
    );
}

/// Blocks allocated and freed at once: nothing live.
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn churn_b(h: &Host) {
    for i in 0..CHURN_BLOCKS {
        // SAFETY: the hooks, called as malloc and free.
        unsafe {
            let p = (h.malloc)(black_box(LEAK_SIZES[i % LEAK_SIZES.len()]));
            assert!(!p.is_null());
            p.cast::<u8>().write(1);
            (h.free)(black_box(p));
        }
    }
}

/// A sampled block (1 MiB is sampled for sure at a mean of a few KiB) grown by realloc: the
/// old block is held, then released; the new one, sampled too, is live under realloc.
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn grow_c(h: &Host, kept: &mut Vec<usize>) {
    // SAFETY: the hooks, called as malloc and realloc.
    let q = unsafe {
        let p = (h.malloc)(black_box(MIB));
        (h.realloc)(black_box(p), black_box(2 * MIB))
    };
    assert!(!q.is_null());
    kept.push(q as usize);
}

/// A block the sampler never saw (from libc directly) realloc'd into a sampled one.
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn grow_d(h: &Host, kept: &mut Vec<usize>) {
    // SAFETY: libc's malloc, then the realloc hook on its block.
    let q = unsafe {
        let p = libc::malloc(black_box(16));
        (h.realloc)(black_box(p), black_box(MIB))
    };
    assert!(!q.is_null());
    kept.push(q as usize);
}

/// realloc(p, 0) of a sampled block: released, nothing live.
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn shrink_e(h: &Host) {
    // SAFETY: the hooks, called as malloc and realloc.
    let r = unsafe {
        let p = (h.malloc)(black_box(MIB));
        (h.realloc)(black_box(p), black_box(0))
    };
    assert!(black_box(r).is_null(), "glibc's realloc(p, 0) frees p");
}

/// A realloc that fails on a sampled block: the block is kept, live under malloc.
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn keep_f(h: &Host, kept: &mut Vec<usize>) {
    // SAFETY: the hooks, called as malloc and realloc.
    let (p, r) = unsafe {
        let p = (h.malloc)(black_box(MIB));
        (p, (h.realloc)(black_box(p), black_box(1 << 62)))
    };
    assert!(r.is_null(), "realloc of 2^62 bytes fails");
    kept.push(black_box(p) as usize);
}

/// Sampled blocks allocated while the sampler's set is full: allocated, never live.
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn untracked_g(h: &Host, kept: &mut Vec<usize>) {
    for _ in 0..UNTRACKED_BLOCKS {
        // SAFETY: the malloc hook.
        let p = unsafe { (h.malloc)(black_box(MIB)) };
        assert!(!p.is_null());
        kept.push(p as usize);
    }
}

/// Fills every bucket of the sampler's set with addresses no block has (odd ones).
fn fill_set(h: &Host) {
    let c = h.sampler.control();
    // SAFETY: the set and its counts, which no other thread touches here.
    unsafe {
        for b in 0..BUCKETS {
            (*c).set_counts[b] = BUCKET_SLOTS as u8;
        }
        for i in 0..SET_CAPACITY {
            (*c).set[i] = 2 * i as u64 + 1;
        }
    }
}

fn memfd_with_sampler() -> OwnedFd {
    // SAFETY: memfd_create with a NUL-terminated name; the fd is new and ours (not
    // close-on-exec: nothing is executed, and its /proc/PID/fd entry is what tests open).
    let fd = unsafe { libc::memfd_create(c"tracer-sampler".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: as above.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(sampler_so())
        .expect("write the sampler to its memfd");
    file.into()
}

fn main() {
    let mean: u64 = std::env::args()
        .nth(1)
        .map_or(4096, |m| m.parse().expect("MEAN is a byte count"));
    let fd = memfd_with_sampler();
    let sampler = LocalSampler::load_from_file(fd.as_fd()).expect("map the sampler from its memfd");
    sampler.use_libc().expect("find libc's allocator");
    // SAFETY: each address is the hook of that libc function, with its signature.
    let h = unsafe {
        Host {
            malloc: std::mem::transmute::<u64, MallocFn>(sampler.hook(Hook::Malloc)),
            realloc: std::mem::transmute::<u64, ReallocFn>(sampler.hook(Hook::Realloc)),
            free: std::mem::transmute::<u64, FreeFn>(sampler.hook(Hook::Free)),
            sampler,
        }
    };
    // A fresh seed each run, as the kernel sampler's draws are: the tests' statistical bounds
    // are about runs with independent draws.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    h.word(offset_of!(Control, rng)).store(seed, SeqCst);
    h.word(offset_of!(Control, mean)).store(mean, SeqCst);
    h.word(offset_of!(Control, active)).store(1, SeqCst);
    let image = h.sampler.image();
    let offset = |vaddr| file_offset(image, vaddr).expect("a site lies in the file");
    println!(
        "ready {} {:#x} {:#x}",
        fd.as_raw_fd(),
        offset(image.alloc_site),
        offset(image.free_site)
    );
    for hook in [Hook::Malloc, Hook::Realloc] {
        println!(
            "entry {} {:#x}",
            hook.libc_name(),
            libc_function(hook).expect("libc has it")
        );
    }
    let mut stdin = std::io::stdin().lock();
    let mut line = String::new();
    stdin.read_line(&mut line).expect("read stdin");

    let mut kept = Vec::with_capacity(LEAK_BLOCKS + 16);
    leak_a(&h, &mut kept);
    let counts: Vec<String> = LEAK_SIZES
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n = (LEAK_BLOCKS - i).div_ceil(LEAK_SIZES.len());
            format!("{s}x{n}")
        })
        .collect();
    println!("caller leak_a {}", counts.join(" "));
    churn_b(&h);
    grow_c(&h, &mut kept);
    grow_d(&h, &mut kept);
    shrink_e(&h);
    keep_f(&h, &mut kept);
    fill_set(&h);
    untracked_g(&h, &mut kept);
    println!("done");
    std::io::stdout().flush().expect("flush stdout");
    // Until the test has its report: the blocks stay live.
    while stdin.read_line(&mut line).is_ok_and(|n| n > 0) {}
    black_box(&kept);
}
