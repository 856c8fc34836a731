//! Sums over a chunk for the kernels' statistics, in f64 with eight independent lanes so that the
//! compiler vectorizes them (a single accumulator is a chain of dependent adds, four times
//! slower than the memory they read). The order of additions is fixed by the chunk, so a result
//! depends on nothing but the data and the chunking; between chunkings it differs at the 1e-16
//! level, far below the f32 rounding the statistics are used at.

const LANES: usize = 8;

/// Σ f(i) for i in 0..n, in eight lanes.
#[inline(always)]
pub fn sum(n: usize, f: impl Fn(usize) -> f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let full = n / LANES * LANES;
    for i in (0..full).step_by(LANES) {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += f(i + l);
        }
    }
    let mut total = acc.iter().sum::<f64>();
    for i in full..n {
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
    sum(n, |i| (a[i] as f64) * (b[i] as f64))
}

/// Σ |x|.
#[inline(always)]
pub fn sum_abs(x: &[f32]) -> f64 {
    sum(x.len(), |i| x[i].abs() as f64)
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
}
