//! Sums over a chunk for the kernels' statistics, in f64 with eight independent lanes (lane `l`
//! adds the elements `l, l + 8, …` in order; then the lanes and the tail are added in order).
//! The order of additions is fixed by the chunk, so a result depends on nothing but the data
//! and the chunking; between chunkings it differs at the 1e-16 level, far below the f32
//! rounding the statistics are used at.
//!
//! The eight lanes are one vector register, so the loop vectorizes, but only when LLVM can see
//! that the closure's indexing is in bounds: [`sum`] tells it that each block of eight lies
//! below `n` (`assert_unchecked`), and callers index slices cut to exactly `n` elements
//! (`&x[..n]`). Without both, every index keeps its bounds check and the loop stays scalar,
//! one element at a time (a Gram matrix of three models ran 6× slower).

const LANES: usize = 8;

/// Σ f(i) for i in 0..n, in eight lanes. Index slices of exactly `n` elements in `f`.
#[inline(always)]
pub fn sum(n: usize, f: impl Fn(usize) -> f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let blocks = n / LANES;
    for b in 0..blocks {
        let i = b * LANES;
        // SAFETY: b < n / LANES, so i + LANES <= n: a fact LLVM cannot derive from the
        // division, which lets it drop the bounds checks of slices of length n in `f`.
        unsafe { std::hint::assert_unchecked(i + LANES <= n) };
        // A block of terms, then the adds: this shape vectorizes wherever the sum is inlined
        // (adding each term as it comes did not inside the Gram matrix's double loop).
        let terms: [f64; LANES] = std::array::from_fn(|l| f(i + l));
        for (a, t) in acc.iter_mut().zip(terms) {
            *a += t;
        }
    }
    let mut total = acc.iter().sum::<f64>();
    for i in blocks * LANES..n {
        total += f(i);
    }
    total
}

/// Σ x² (exact products in f64).
#[inline(always)]
pub fn sum_sq(x: &[f32]) -> f64 {
    sum(x.len(), |i| (x[i] as f64) * (x[i] as f64))
}

/// Σ a·b (exact products in f64).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    sum(n, |i| (a[i] as f64) * (b[i] as f64))
}

/// Σ |x|.
#[inline(always)]
pub fn sum_abs(x: &[f32]) -> f64 {
    sum(x.len(), |i| x[i].abs() as f64)
}

/// Sorts the positions 0..n by `key` ascending, equal keys by position: a stable LSD radix sort
/// by bytes of (key, position) pairs packed in u64 (reads sequential, no gather), skipping the
/// bytes every key shares (magnitudes of one row share their top bits). On return `vals` holds
/// the pairs in order (the position in the low 32 bits). Linear in n, where a comparison sort of
/// every row of a model was most of DELLA's time.
pub fn radix_order(n: usize, key: impl Fn(usize) -> u32, vals: &mut Vec<u64>, tmp: &mut Vec<u64>) {
    vals.clear();
    vals.extend((0..n).map(|i| (u64::from(key(i)) << 32) | i as u64));
    tmp.clear();
    tmp.resize(n, 0);
    let (all_or, all_and) = vals
        .iter()
        .fold((0u64, u64::MAX), |(o, a), &v| (o | v, a & v));
    for shift in (32..64).step_by(8) {
        if (all_or ^ all_and) >> shift & 0xff == 0 {
            continue; // every key has the same byte here
        }
        let digit = |v: u64| (v >> shift & 0xff) as usize;
        let mut count = [0u32; 257];
        for &v in vals.iter() {
            count[digit(v) + 1] += 1;
        }
        for b in 0..256 {
            count[b + 1] += count[b];
        }
        for &v in vals.iter() {
            let b = digit(v);
            tmp[count[b] as usize] = v;
            count[b] += 1;
        }
        std::mem::swap(vals, tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_sum_everything_once() {
        let x: Vec<f32> = (0..37).map(|i| i as f32).collect();
        assert_eq!(sum(x.len(), |i| x[i] as f64), (0..37).sum::<i32>() as f64);
        assert_eq!(sum_sq(&[3.0, 4.0]), 25.0);
        assert_eq!(dot(&[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0]), 32.0);
        assert_eq!(sum_abs(&[-1.5, 2.5]), 4.0);
    }

    /// The bits of the sum are those of its definition written out element by element: lane
    /// `l` adds elements l, l + 8, … in order from 0, then the lanes in order, then the tail.
    /// Magnitudes 1e16 apart make any other order round differently.
    #[test]
    fn sum_adds_in_lane_order() {
        let mut seed = 11u64;
        for n in (0..40).chain([1000, 1003]) {
            let x: Vec<f32> = (0..n)
                .map(|i| {
                    seed = crate::rng::mix(seed);
                    let v = (seed >> 40) as f32 / 16_777_216.0 - 0.5;
                    if i % 5 == 0 {
                        v * 1e16
                    } else {
                        v
                    }
                })
                .collect();
            let mut lanes = [0.0f64; 8];
            let full = n / 8 * 8;
            for i in 0..full {
                lanes[i % 8] += x[i] as f64 * 3.0;
            }
            let mut want = 0.0f64;
            for l in lanes {
                want += l;
            }
            for &v in &x[full..] {
                want += v as f64 * 3.0;
            }
            let got = sum(n, |i| x[i] as f64 * 3.0);
            assert_eq!(got.to_bits(), want.to_bits(), "n = {n}");
            let got = crate::simd!(sum(n, |i| x[i] as f64 * 3.0));
            assert_eq!(got.to_bits(), want.to_bits(), "n = {n}, wide copy");
        }
    }

    #[test]
    fn radix_order_is_a_stable_sort() {
        let mut seed = 7u64;
        for n in [0usize, 1, 2, 5, 300, 1000] {
            let keys: Vec<u32> = (0..n)
                .map(|_| {
                    seed = crate::rng::mix(seed);
                    // Few distinct values: plenty of ties.
                    (seed % 17) as u32 * 0x0101_0001
                })
                .collect();
            let (mut vals, mut tmp) = (Vec::new(), Vec::new());
            radix_order(n, |i| keys[i], &mut vals, &mut tmp);
            let order: Vec<u32> = vals.iter().map(|&v| v as u32).collect();
            let mut want: Vec<u32> = (0..n as u32).collect();
            want.sort_by_key(|&i| keys[i as usize]);
            assert_eq!(order, want, "n = {n}");
        }
    }
}
