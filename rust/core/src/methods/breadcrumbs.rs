//! Model Breadcrumbs: per task and per row along the last dimension, drop the γ fraction of
//! largest-magnitude entries (outliers), then keep only the β fraction of largest of the rest.
//! Ranking is by |x| descending with ties broken by position (earlier first), so the mask is a
//! well-defined function of the row and matches a stable descending sort.

use super::int_frac;

/// Sort key: ascending key order = descending |x|, then ascending position.
#[inline]
fn rank_key(x: f32, pos: usize) -> u64 {
    (((!x.abs().to_bits()) as u64) << 32) | pos as u64
}

/// Adds crumbs(row) into `acc`. `keys` is scratch.
pub fn add_row(row: &[f32], density: f64, gamma: f64, keys: &mut Vec<u64>, acc: &mut [f32]) {
    let n = row.len();
    let drop_top = int_frac(n, gamma);
    let keep = int_frac(n, density);
    if drop_top >= n || keep == 0 {
        return;
    }
    keys.clear();
    keys.extend(row.iter().enumerate().map(|(i, &x)| rank_key(x, i)));
    // The key at rank `drop_top` is the smallest kept; the one at `drop_top + keep` the first cut.
    let (_, &mut lo, rest) = keys.select_nth_unstable(drop_top);
    let hi = if drop_top + keep < n {
        let (_, &mut hi, _) = rest.select_nth_unstable(keep - 1);
        hi
    } else {
        u64::MAX
    };
    for (i, (a, &x)) in acc.iter_mut().zip(row).enumerate() {
        let k = rank_key(x, i);
        if k >= lo && k < hi {
            *a += x;
        }
    }
}

/// M of one chunk: `row_len` divides the chunk (the pipeline aligns chunks to rows).
/// A 0-d tensor (`scalar`) is left as it is: crumbs(τ) = τ.
pub fn merge(
    deltas: &[Vec<f32>],
    n: usize,
    row_len: usize,
    scalar: bool,
    (density, gamma): (f64, f64),
    keys: &mut Vec<u64>,
    m: &mut [f32],
) {
    m[..n].fill(0.0);
    for d in deltas {
        if scalar {
            for (a, &x) in m[..n].iter_mut().zip(&d[..n]) {
                *a += x;
            }
            continue;
        }
        for (row, acc) in d[..n].chunks(row_len).zip(m[..n].chunks_mut(row_len)) {
            add_row(row, density, gamma, keys, acc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_top_then_keeps_next() {
        // n = 10, γ = 0.1 → drop 1; β = 0.3 → keep 3.
        let row = [1.0, -9.0, 3.0, 0.5, -4.0, 2.0, 0.0, 5.0, -0.1, 0.2];
        let mut acc = [0.0; 10];
        add_row(&row, 0.3, 0.1, &mut Vec::new(), &mut acc);
        assert_eq!(acc, [0.0, 0.0, 3.0, 0.0, -4.0, 0.0, 0.0, 5.0, 0.0, 0.0]);
    }

    #[test]
    fn ties_go_to_earlier_positions() {
        let row = [1.0, 1.0, 1.0, 1.0];
        let mut acc = [0.0; 4];
        add_row(&row, 0.5, 0.25, &mut Vec::new(), &mut acc);
        assert_eq!(acc, [0.0, 1.0, 1.0, 0.0]);
    }
}
