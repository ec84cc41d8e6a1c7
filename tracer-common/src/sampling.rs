//! Byte-based Poisson sampling (`--sample-bytes N`), in integer arithmetic that the BPF
//! programs and user space share: the exponential countdown drawn per thread, and the weight
//! that turns a sampled allocation back into an estimate.
//!
//! The allocated bytes of a thread are treated as a Poisson process with one sample point
//! every `mean` bytes on average; an allocation is sampled when a point falls inside it, which
//! happens with probability `p = 1 - exp(-size/mean)`. It then stands for `1/p` allocations
//! and `size/p` bytes (pprof's unsampling rule), which makes the per-stack sums unbiased.
//! BPF has no floating point, so both the logarithm of the draw and the weight come from
//! tables that the compiler computes (in `const fn`, with `f64`) when the crate is built.

/// Fixed-point scale of the tables: 24 fractional bits.
const Q: u32 = 24;
const ONE: f64 = (1u64 << Q) as f64;

/// Largest mean the arithmetic below handles without overflowing 64 bits (16 GiB).
pub const MAX_MEAN: u64 = 1 << 34;

/// Estimated counts are kept with this many fractional bits.
pub const COUNT_SHIFT: u32 = 16;

/// `ln 2` in Q24.
const LN2_Q: u64 = (core::f64::consts::LN_2 * ONE + 0.5) as u64;

/// Mantissa bits looked up in [`LN_MANTISSA`].
const MANTISSA_BITS: u32 = 10;
const MANTISSA_SLOTS: usize = 1 << MANTISSA_BITS;

/// `ln(1 + (i + 0.5) / 1024)` in Q24: the logarithm of a mantissa in `[1, 2)`, taken at the
/// middle of each of its 1024 slots.
pub static LN_MANTISSA: [u32; MANTISSA_SLOTS] = ln_mantissa_table();

/// Weight table: `g(x) = x / (1 - exp(-x))` in Q24 for `x = k / 128`, `k = 0..=4096`.
/// `g` is smooth (it goes from 1 at x = 0 to x at large x), so linear interpolation between
/// neighbours is accurate to about 1e-6.
pub static G: [u32; G_SLOTS + 1] = g_table();

/// Table steps per unit of `x`.
const G_STEPS_PER_UNIT: u64 = 128;
/// Beyond `x = 32`, `exp(-x)` is below 1.3e-14: the weight is 1 to double precision.
const G_X_MAX: u64 = 32;
const G_SLOTS: usize = (G_X_MAX * G_STEPS_PER_UNIT) as usize;
/// `x` is computed in Q16; this many of its low bits fall between two table entries.
const G_FRAC_BITS: u32 = 16 - 7;

/// Bytes until the next sample point, for a fresh countdown: `ceil(mean * -ln(U))` with
/// `U = (random + 1) / 2^32`, uniform on (0, 1]. The ceiling makes "sampled when
/// `size >= countdown`" exact: the point lands inside the allocation's bytes.
#[inline(always)]
pub fn next_countdown(random: u32, mean: u64) -> u64 {
    let v = random as u64 + 1;
    // floor(log2 v) by binary search: BPF has no count-leading-zeros instruction.
    let mut k: u64 = 0;
    let mut rest = v;
    if rest >= 1 << 32 {
        k += 32;
        rest >>= 32;
    }
    if rest >= 1 << 16 {
        k += 16;
        rest >>= 16;
    }
    if rest >= 1 << 8 {
        k += 8;
        rest >>= 8;
    }
    if rest >= 1 << 4 {
        k += 4;
        rest >>= 4;
    }
    if rest >= 1 << 2 {
        k += 2;
        rest >>= 2;
    }
    if rest >= 1 << 1 {
        k += 1;
    }
    // v / 2^k in [1, 2), with its leading one at bit 32; the next 10 bits pick the slot.
    let slot = (((v << (32 - k)) >> (32 - MANTISSA_BITS)) as usize) & (MANTISSA_SLOTS - 1);
    // -ln U = 32 ln 2 - ln v = (32 - k) ln 2 - ln(mantissa).
    let e = ((32 - k) * LN2_Q).saturating_sub(LN_MANTISSA[slot] as u64);
    let bytes = (mean * e + ((1 << Q) - 1)) >> Q;
    if bytes == 0 { 1 } else { bytes }
}

/// What one sampled allocation of `size` bytes stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Estimate {
    /// Estimated bytes: `size / p`.
    pub bytes: u64,
    /// Estimated allocations, `1 / p`, with [`COUNT_SHIFT`] fractional bits.
    pub count: u64,
}

/// The unsampling weight of a sampled allocation of `size` bytes at `mean` bytes per
/// sample: `1/p` allocations and `size/p` bytes, `p = 1 - exp(-size/mean)`. A zero size is
/// never sampled and weighs nothing. `mean` must be in `1..=MAX_MEAN`.
#[inline(always)]
pub fn estimate(size: u64, mean: u64) -> Estimate {
    if size == 0 || mean == 0 {
        return Estimate { bytes: 0, count: 0 };
    }
    if size >= G_X_MAX * mean {
        return Estimate {
            bytes: size,
            count: 1 << COUNT_SHIFT,
        };
    }
    // x = size / mean in Q16; size < 32 * 2^34, so the shift stays below 2^55.
    let x = (size << 16) / mean;
    let k = ((x >> G_FRAC_BITS) as usize) & (G_SLOTS - 1);
    let frac = x & ((1 << G_FRAC_BITS) - 1);
    let (lo, hi) = (G[k] as u64, G[k + 1] as u64);
    let g = lo + (((hi - lo) * frac) >> G_FRAC_BITS);
    // size / p = mean * g(x); 1 / p = mean * g(x) / size. mean * g < 2^34 * 2^29.
    let scaled = mean * g;
    Estimate {
        bytes: scaled >> Q,
        count: (scaled / size) >> (Q - COUNT_SHIFT),
    }
}

const fn ln_mantissa_table() -> [u32; MANTISSA_SLOTS] {
    let mut table = [0u32; MANTISSA_SLOTS];
    let mut i = 0;
    while i < MANTISSA_SLOTS {
        let m = (i as f64 + 0.5) / MANTISSA_SLOTS as f64;
        table[i] = (ln_1p(m) * ONE + 0.5) as u32;
        i += 1;
    }
    table
}

const fn g_table() -> [u32; G_SLOTS + 1] {
    let mut table = [0u32; G_SLOTS + 1];
    table[0] = 1 << Q;
    let mut k = 1;
    while k <= G_SLOTS {
        let x = k as f64 / G_STEPS_PER_UNIT as f64;
        table[k] = (x / (1.0 - exp_neg(x)) * ONE + 0.5) as u32;
        k += 1;
    }
    table
}

/// `ln(1 + m)` for `m` in [0, 1]: `2 atanh(m / (2 + m))`, whose series converges fast there.
const fn ln_1p(m: f64) -> f64 {
    let z = m / (2.0 + m);
    let z2 = z * z;
    let mut term = z;
    let mut sum = 0.0;
    let mut n = 0;
    while n < 40 {
        sum += term / (2 * n + 1) as f64;
        term *= z2;
        n += 1;
    }
    2.0 * sum
}

/// `exp(-x)` for `x` in [0, 64]: Taylor series at `x / 64`, squared six times.
const fn exp_neg(x: f64) -> f64 {
    let y = x / 64.0;
    let mut term = 1.0;
    let mut sum = 1.0;
    let mut n = 1;
    while n < 30 {
        term *= -y / n as f64;
        sum += term;
        n += 1;
    }
    let mut i = 0;
    while i < 6 {
        sum *= sum;
        i += 1;
    }
    sum
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    #[test]
    fn tables_match_the_functions_they_stand_for() {
        for (i, &v) in LN_MANTISSA.iter().enumerate() {
            let want = (1.0 + (i as f64 + 0.5) / 1024.0).ln() * ONE;
            assert!(
                (v as f64 - want).abs() <= 1.0,
                "LN_MANTISSA[{i}] = {v}, want {want}"
            );
        }
        for (k, &v) in G.iter().enumerate() {
            let x = k as f64 / 128.0;
            let want = if k == 0 { 1.0 } else { x / -(-x).exp_m1() } * ONE;
            assert!((v as f64 - want).abs() <= 1.0, "G[{k}] = {v}, want {want}");
        }
    }

    /// The relative error of the weights against the f64 formula, over sizes from 1 byte to
    /// far beyond the mean and over means from 1 byte to the maximum.
    #[test]
    fn weights_match_the_unsampling_rule() {
        for mean in [1u64, 64, 4096, 512 << 10, 3 << 20, 1 << 30, MAX_MEAN] {
            let mut size = 1u64;
            while size < 64 * mean {
                let p = -(-(size as f64) / mean as f64).exp_m1();
                let e = estimate(size, mean);
                let want_bytes = size as f64 / p;
                let want_count = 1.0 / p;
                let got_count = e.count as f64 / (1u64 << COUNT_SHIFT) as f64;
                let rel_b = (e.bytes as f64 - want_bytes).abs() / want_bytes;
                let rel_c = (got_count - want_count).abs() / want_count;
                // Bytes: table and Q16-x rounding; counts: also the 1/65536 count unit.
                assert!(
                    rel_b < 2e-5 || (e.bytes as f64 - want_bytes).abs() <= 1.0,
                    "mean {mean} size {size}: bytes {} want {want_bytes}",
                    e.bytes
                );
                assert!(
                    rel_c < 4e-5,
                    "mean {mean} size {size}: count {got_count} want {want_count}"
                );
                size = size * 5 / 4 + 1;
            }
        }
        assert_eq!(estimate(0, 512 << 10), Estimate { bytes: 0, count: 0 });
        assert_eq!(
            estimate(1 << 30, 512 << 10),
            Estimate {
                bytes: 1 << 30,
                count: 1 << 16
            }
        );
    }

    /// `U = (r + 1) / 2^32` over evenly spaced `r`: the draws must be exponential with the
    /// given mean (mean and tail probabilities to well under 0.1%).
    #[test]
    fn countdowns_are_exponential_with_the_given_mean() {
        let mean = 512u64 << 10;
        let n = 1u64 << 20;
        let draws: Vec<u64> = (0..n)
            .map(|j| next_countdown(((j << 12) + 2048) as u32, mean))
            .collect();
        let avg = draws.iter().map(|&d| d as f64).sum::<f64>() / n as f64;
        // Every draw is ceil(): on average half a byte above the continuous value.
        assert!(
            ((avg - 0.5) / mean as f64 - 1.0).abs() < 1e-3,
            "mean draw {avg}, want {mean}"
        );
        for t in [0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0] {
            let above = draws
                .iter()
                .filter(|&&d| d as f64 > t * mean as f64)
                .count();
            let got = above as f64 / n as f64;
            let want = (-t).exp();
            assert!(
                (got - want).abs() < 1e-3 * want.max(0.01),
                "P(draw > {t} mean) = {got}, want {want}"
            );
        }
        // The extremes: U = 1 gives the smallest countdown, U = 2^-32 the largest.
        assert_eq!(next_countdown(u32::MAX, mean), 1);
        let top = next_countdown(0, mean) as f64 / mean as f64;
        assert!((top - 32.0 * core::f64::consts::LN_2).abs() < 1e-3, "{top}");
        assert!(next_countdown(12345, MAX_MEAN) > 0);
    }
}
