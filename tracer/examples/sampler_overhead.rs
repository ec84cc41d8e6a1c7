//! What the in-process sampler adds to an unsampled malloc+free pair: the embedded sampler is
//! loaded into this process (nothing patched), and pairs go through its hooks or straight to
//! libc, both through function pointers, for sizes from 16 to 4096 bytes. Issue 13's target is
//! under 30 ns added per pair.
//!
//! `cargo run --release -p tracer --example sampler_overhead [PAIRS]` (default 2,000,000 per
//! run; each figure is the median of 7 runs, alternating with the direct runs).
use std::{ffi::c_void, hint::black_box, mem::offset_of, time::Instant};

use tracer::inject::sampler::{LocalSampler, libc_function};
use tracer_common::{
    sampler::{Control, Hook},
    sampling::MAX_MEAN,
};

type MallocFn = unsafe extern "C" fn(usize) -> *mut c_void;
type FreeFn = unsafe extern "C" fn(*mut c_void);

const SIZES: [usize; 9] = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096];
const RUNS: usize = 7;

/// ns per pair over `pairs` pairs of `size` bytes.
fn pairs_ns(malloc: MallocFn, free: FreeFn, size: usize, pairs: u64) -> f64 {
    let start = Instant::now();
    for i in 0..pairs {
        // SAFETY: malloc and free (or their hooks), used as libc documents them.
        unsafe {
            let p = malloc(black_box(size));
            assert!(!p.is_null(), "malloc({size}) failed");
            p.cast::<u8>().write(i as u8);
            free(black_box(p));
        }
    }
    start.elapsed().as_nanos() as f64 / pairs as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn set(sampler: &LocalSampler, offset: usize, value: u64) {
    // SAFETY: an aligned word of the control block; no hook runs while it is written.
    unsafe {
        (sampler.control() as *mut u8)
            .add(offset)
            .cast::<u64>()
            .write_volatile(value)
    };
}

fn main() {
    let pairs: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("PAIRS is a number"))
        .unwrap_or(2_000_000);
    let sampler = LocalSampler::load().expect("load the embedded sampler");
    sampler.use_libc().expect("find libc's allocator");
    set(&sampler, offset_of!(Control, rng), 0x1234_5678);
    // SAFETY (transmutes): libc's malloc and free, and the hooks with their signatures.
    let (direct_malloc, direct_free, hook_malloc, hook_free) = unsafe {
        (
            std::mem::transmute::<u64, MallocFn>(libc_function(Hook::Malloc).expect("malloc")),
            std::mem::transmute::<u64, FreeFn>(libc_function(Hook::Free).expect("free")),
            std::mem::transmute::<u64, MallocFn>(sampler.hook(Hook::Malloc)),
            std::mem::transmute::<u64, FreeFn>(sampler.hook(Hook::Free)),
        )
    };
    // (label, active, mean)
    let modes = [
        ("inert", 0, 0),
        ("unsampled", 1, MAX_MEAN),
        ("at 512 KiB", 1, 512 << 10),
    ];
    println!(
        "ns per malloc+free pair, median of {RUNS} runs of {pairs} pairs; hooks: added to direct"
    );
    print!("{:>6} {:>8}", "size", "direct");
    for (label, _, _) in modes {
        print!(" {label:>12}");
    }
    println!();
    let mut added_sum = vec![0.0; modes.len()];
    for size in SIZES {
        pairs_ns(direct_malloc, direct_free, size, pairs / 10);
        let mut direct = Vec::new();
        let mut hooked = vec![Vec::new(); modes.len()];
        for _ in 0..RUNS {
            direct.push(pairs_ns(direct_malloc, direct_free, size, pairs));
            for (m, &(_, active, mean)) in modes.iter().enumerate() {
                set(&sampler, offset_of!(Control, active), active);
                set(&sampler, offset_of!(Control, mean), mean);
                hooked[m].push(pairs_ns(hook_malloc, hook_free, size, pairs));
            }
        }
        let direct = median(direct);
        print!("{size:>6} {direct:>8.1}");
        for (m, runs) in hooked.into_iter().enumerate() {
            let added = median(runs) - direct;
            added_sum[m] += added;
            print!(" {added:>+12.1}");
        }
        println!();
    }
    print!("{:>6} {:>8}", "mean", "");
    for sum in added_sum {
        print!(" {:>+12.1}", sum / SIZES.len() as f64);
    }
    println!();
}
