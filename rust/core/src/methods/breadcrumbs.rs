//! Model Breadcrumbs: per task and per row along the last dimension, drop the γ fraction of
//! largest-magnitude entries (outliers), then keep only the β fraction of largest of the rest.
//! Ranking is by |x| descending with ties broken by position (earlier first), so the mask is a
//! well-defined function of the row and matches a stable descending sort.
//!
//! A row that fits a chunk is ranked in place ([`add_row`]). A longer row is streamed in
//! pieces: statistics passes find, per task, the magnitudes at the two cut ranks and how many
//! elements of equal magnitude fall on each side of each cut ([`Cut`]), and every piece then
//! decides its elements alone, given how many equal magnitudes came before it ([`Piece`]).

use super::kernel::{ChunkIn, Kernel, Scratch, TensorStats};
use super::row_cut::{cut_keys_hinted, rank_key, Hint};
use super::{int_frac, PerTask, Reader, Rows};
use crate::error::{Error, Result};

/// Breadcrumbs as SPEC.md writes it: per task and row along the last dimension.
#[derive(Debug)]
pub struct Breadcrumbs {
    pub density: PerTask,
    pub gamma: PerTask,
}

impl Breadcrumbs {
    pub fn parse(r: &mut Reader) -> Result<Breadcrumbs> {
        let density = r.frac("density", 0.15, 0.0, 1.0, false)?;
        let gamma = r.frac("gamma", 0.006, 0.0, 1.0, false)?;
        let tasks = match (&density, &gamma) {
            (PerTask::Each(v), _) | (_, PerTask::Each(v)) => v.len(),
            _ => 1,
        };
        for t in 0..tasks {
            let (d, g) = (density.get(t), gamma.get(t));
            if d + g > 1.0 {
                return Err(Error::param(
                    "density",
                    format!("density + gamma = {} exceeds 1", d + g),
                ));
            }
        }
        Ok(Breadcrumbs { density, gamma })
    }
}

impl Kernel for Breadcrumbs {
    fn name(&self) -> &'static str {
        "breadcrumbs"
    }

    fn params_json(&self) -> serde_json::Value {
        serde_json::json!({"density": self.density.json(), "gamma": self.gamma.json()})
    }

    fn weighted(&self) -> bool {
        true
    }

    fn rows(&self) -> Rows {
        Rows::Last
    }

    fn kept_ranks(&self, n: usize, t: usize) -> Option<(u64, u64)> {
        kept_ranks(n, self.density.get(t), self.gamma.get(t))
    }

    fn check_tasks(&self, tasks: usize) -> Result<()> {
        self.density.check_len("density", tasks)?;
        self.gamma.check_len("gamma", tasks)
    }

    fn needs_statistics(&self) -> bool {
        false
    }

    fn merge(&self, x: &ChunkIn, st: &TensorStats, s: Scratch, m: &mut [f32]) {
        // The loops run in their wide copies (`simd!`): the rank keys' 64-bit compares vectorize
        // there, not in baseline x86-64.
        match st.cuts.get(&x.start) {
            Some(cuts) => crate::simd!(merge_pieces(x.deltas, x.n, cuts, m)),
            None => {
                let t = x.tensor;
                let ranks = |len, k| self.kept_ranks(len, k);
                crate::simd!(merge(
                    x.deltas,
                    x.n,
                    (t.row_len(), t.shape.is_empty()),
                    &ranks,
                    s.keys,
                    m,
                ))
            }
        }
    }
}

/// The descending ranks [g, g + k) a row of `n` keeps, or `None` when it keeps nothing.
pub fn kept_ranks(n: usize, density: f64, gamma: f64) -> Option<(u64, u64)> {
    let (g, k) = (int_frac(n, gamma), int_frac(n, density));
    (g < n && k > 0).then_some((g as u64, k as u64))
}

/// One task's cuts in one long row: `top` is |x| at descending rank g (the largest kept
/// magnitude; +∞ where g = 0), of which the first `top_skip` (in position order) rank above g and are dropped;
/// `low` is |x| at rank g + k and how many of that magnitude are still kept (`None`: the row
/// keeps everything from rank g on).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Cut {
    pub top: f32,
    pub top_skip: u64,
    pub low: Option<(f32, u64)>,
}

/// A cut as one piece of the row sees it: how many elements of magnitude `top` and `low`
/// precede the piece in the row.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Piece {
    pub cut: Cut,
    pub top_before: u64,
    pub low_before: u64,
}

/// Per piece, for the statistics: (#|x| > top, #|x| = top, #|x| > low, #|x| = low).
pub fn count_piece(piece: &[f32], top: f32, low: Option<f32>) -> [u64; 4] {
    let low = low.unwrap_or(f32::INFINITY);
    let mut c = [0u64; 4];
    for &x in piece {
        let v = x.abs();
        c[0] += u64::from(v > top);
        c[1] += u64::from(v == top);
        c[2] += u64::from(v > low);
        c[3] += u64::from(v == low);
    }
    c
}

/// Adds crumbs(piece) into `acc`, the piece being part of a long row cut by `p`.
///
/// Which elements equal to a cut are kept depends on how many came before: the first
/// `top_skip` at `top` are dropped and the rest kept, the first `keep` at `low` kept and the
/// rest dropped. So in a block of elements where neither count crosses its bound, every element
/// at a cut shares one decision, and the block is decided branch-free (vectorized); only the
/// block where a count crosses (one per cut and piece) takes the counting loop. Cuts are often
/// shared by many elements (deltas of bf16 weights take few distinct values).
#[inline(always)]
pub fn add_piece(piece: &[f32], p: &Piece, acc: &mut [f32]) {
    piece_into::<false>(piece, p, acc)
}

/// crumbs(piece) into `out`, as [`add_piece`] into zeros (`0 + x`: a kept −0 is +0, as there)
/// without zeroing `out` first: mergekit's sparsified deltas, where the memset of every task's
/// chunk was 3 % of a per-tensor TIES.
#[inline(always)]
pub fn set_piece(piece: &[f32], p: &Piece, out: &mut [f32]) {
    piece_into::<true>(piece, p, out)
}

/// [`add_piece`] (`SET`: [`set_piece`]).
#[inline(always)]
fn piece_into<const SET: bool>(piece: &[f32], p: &Piece, acc: &mut [f32]) {
    const BLOCK: usize = 32;
    let Cut { top, top_skip, low } = p.cut;
    // NaN equals nothing; every non-NaN magnitude exceeds −∞ (no low cut: all above it).
    let (low_at, low_above, low_keep) =
        low.map_or((f32::NAN, f32::NEG_INFINITY, 0), |(l, k)| (l, l, k));
    let (mut seen_top, mut seen_low) = (p.top_before, p.low_before);
    let n = piece.len().min(acc.len());
    let mut i = 0;
    while i < n {
        let end = (i + BLOCK).min(n);
        let (a, d) = (&mut acc[i..end], &piece[i..end]);
        let (at_top, at_low) = d.iter().fold((0u32, 0u32), |(t, l), &x| {
            let v = x.abs();
            (t + u32::from(v == top), l + u32::from(v == low_at))
        });
        let (at_top, at_low) = (u64::from(at_top), u64::from(at_low));
        // The block's shared decision for elements at each cut, if it has one.
        let top_kept = if seen_top >= top_skip {
            Some(true)
        } else {
            (seen_top + at_top <= top_skip).then_some(false)
        };
        let low_kept = if seen_low + at_low <= low_keep {
            Some(true)
        } else {
            (seen_low >= low_keep).then_some(false)
        };
        match (top_kept, low_kept) {
            (Some(tk), Some(lk)) => {
                for (a, &x) in a.iter_mut().zip(d) {
                    let v = x.abs();
                    let below_top = if v == top { tk } else { v < top };
                    let above_low = if v == low_at { lk } else { v > low_above };
                    let from = if SET { 0.0 } else { *a };
                    *a = if below_top & above_low {
                        from + x
                    } else {
                        from
                    };
                }
                seen_top += at_top;
                seen_low += at_low;
            }
            _ => {
                for (a, &x) in a.iter_mut().zip(d) {
                    let v = x.abs();
                    let below_top = if v == top {
                        seen_top += 1;
                        seen_top > top_skip
                    } else {
                        v < top
                    };
                    let above_low = match low {
                        None => true,
                        Some((l, keep)) if v == l => {
                            seen_low += 1;
                            seen_low <= keep
                        }
                        Some((l, _)) => v > l,
                    };
                    let from = if SET { 0.0 } else { *a };
                    *a = if below_top && above_low {
                        from + x
                    } else {
                        from
                    };
                }
            }
        }
        i = end;
    }
}

/// M of one piece of long rows: per task, its cut (`None`: the row keeps nothing).
#[inline(always)]
pub fn merge_pieces<D: AsRef<[f32]>>(
    deltas: &[D],
    n: usize,
    cuts: &[Option<Piece>],
    m: &mut [f32],
) {
    m[..n].fill(0.0);
    for (d, cut) in deltas.iter().zip(cuts) {
        if let Some(p) = cut {
            add_piece(&d.as_ref()[..n], p, &mut m[..n]);
        }
    }
}

/// Adds crumbs(row) into `acc`, keeping the descending ranks `ranks` = [g, g + k) (`None`:
/// nothing). `keys` is scratch; `hint` carries the cuts from one row to the next.
#[inline(always)]
pub fn add_row(
    row: &[f32],
    ranks: Option<(u64, u64)>,
    keys: &mut Vec<u64>,
    hint: &mut Hint,
    acc: &mut [f32],
) {
    let n = row.len();
    let Some((drop_top, keep)) = ranks else {
        return;
    };
    if drop_top == 0 && keep as usize >= n {
        for (a, &x) in acc.iter_mut().zip(row) {
            *a += x;
        }
        return;
    }
    let (drop_top, keep) = (drop_top as usize, keep as usize);
    // The key at rank `drop_top` is the smallest kept; the one at `drop_top + keep` the first cut.
    let far = (drop_top + keep < n).then_some(drop_top + keep);
    let (lo, hi) = cut_keys_hinted(row, drop_top, far, keys, hint);
    for (i, (a, &x)) in acc.iter_mut().zip(row).enumerate() {
        let k = rank_key(x, i);
        if k >= lo && k < hi {
            *a += x;
        }
    }
}

/// M of one chunk: `row_len` divides the chunk (the pipeline aligns chunks to rows); task t
/// keeps the ranks `ranks(row_len, t)`. A 0-d tensor (`scalar`) is left as it is.
#[inline(always)]
pub fn merge<D: AsRef<[f32]>>(
    deltas: &[D],
    n: usize,
    (row_len, scalar): (usize, bool),
    ranks: &dyn Fn(usize, usize) -> Option<(u64, u64)>,
    keys: &mut Vec<u64>,
    m: &mut [f32],
) {
    m[..n].fill(0.0);
    for (t, d) in deltas.iter().enumerate() {
        add_task(
            &d.as_ref()[..n],
            (row_len, scalar),
            ranks(row_len, t),
            keys,
            &mut m[..n],
        );
    }
}

/// Adds crumbs of one task's chunk (whole rows) into `acc`.
#[inline(always)]
pub fn add_task(
    d: &[f32],
    (row_len, scalar): (usize, bool),
    ranks: Option<(u64, u64)>,
    keys: &mut Vec<u64>,
    acc: &mut [f32],
) {
    if scalar {
        for (a, &x) in acc.iter_mut().zip(d) {
            *a += x;
        }
        return;
    }
    let mut hint = Hint::default();
    for (row, acc) in d.chunks(row_len).zip(acc.chunks_mut(row_len)) {
        add_row(row, ranks, keys, &mut hint, acc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule literally, element by element: an element at a cut is the o-th of the row at
    /// that cut (o counted from the row's start, the piece's predecessors included); at `top`
    /// the first `top_skip` are dropped, at `low` the first `keep` kept.
    fn add_piece_by_ordinals(piece: &[f32], p: &Piece, acc: &mut [f32]) {
        let mut ordinal = (p.cut.top, p.top_before);
        let mut low_ordinal = p.cut.low.map(|(l, _)| (l, p.low_before));
        for (i, &x) in piece.iter().enumerate() {
            let v = x.abs();
            let o_top = (v == ordinal.0).then(|| {
                ordinal.1 += 1;
                ordinal.1
            });
            let o_low = low_ordinal.as_mut().and_then(|(l, o)| {
                (v == *l).then(|| {
                    *o += 1;
                    *o
                })
            });
            let under = o_top.map_or(v < p.cut.top, |o| o > p.cut.top_skip);
            let over = match (p.cut.low, o_low) {
                (None, _) => true,
                (Some((_, keep)), Some(o)) => o <= keep,
                (Some((l, _)), None) => v > l,
            };
            if under && over {
                acc[i] += x;
            }
        }
    }

    #[test]
    fn blocks_decide_as_the_ordinals_rule() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move |m: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % m
        };
        for round in 0..400 {
            let n = 1 + next(90) as usize;
            // Magnitudes on a grid of 9 values, so that runs of elements at a cut are common;
            // some blocks (and whole pieces) with none, a NaN now and then.
            let grid = if round % 3 == 0 { 40 } else { 9 };
            // And −0 now and then: `set_piece` must keep it as adding it to zeros does (+0).
            let piece: Vec<f32> = (0..n)
                .map(|_| match next(50) {
                    0 => f32::NAN,
                    1 => -0.0,
                    _ => (next(grid) as f32 - grid as f32 / 2.0) * 0.25,
                })
                .collect();
            let top = next(5) as f32 * 0.25;
            let low = match next(3) {
                0 => None,
                _ => Some((top * 0.5, next(6))),
            };
            let p = Piece {
                cut: Cut {
                    top,
                    top_skip: next(6),
                    low,
                },
                top_before: next(4),
                low_before: next(4),
            };
            let start: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let (mut want, mut got) = (start.clone(), start);
            add_piece_by_ordinals(&piece, &p, &mut want);
            add_piece(&piece, &p, &mut got);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "round {round}: {p:?}");
            // Into zeros, and set over whatever the buffer held.
            let mut zeros = vec![0.0f32; n];
            add_piece_by_ordinals(&piece, &p, &mut zeros);
            let mut set = vec![f32::NAN; n];
            set_piece(&piece, &p, &mut set);
            assert_eq!(bits(&set), bits(&zeros), "round {round}: {p:?}");
        }
    }

    /// crumbs(row) of one row on its own, keeping the descending ranks `ranks`.
    fn crumbs(row: &[f32], ranks: Option<(u64, u64)>) -> Vec<f32> {
        let mut acc = vec![0.0; row.len()];
        add_row(row, ranks, &mut Vec::new(), &mut Hint::default(), &mut acc);
        acc
    }

    #[test]
    fn drops_top_then_keeps_next() {
        // n = 10, γ = 0.1 → drop 1; β = 0.3 → keep 3.
        let row = [1.0, -9.0, 3.0, 0.5, -4.0, 2.0, 0.0, 5.0, -0.1, 0.2];
        let acc = crumbs(&row, kept_ranks(10, 0.3, 0.1));
        assert_eq!(acc, [0.0, 0.0, 3.0, 0.0, -4.0, 0.0, 0.0, 5.0, 0.0, 0.0]);
    }

    #[test]
    fn ties_go_to_earlier_positions() {
        let row = [1.0, 1.0, 1.0, 1.0];
        let acc = crumbs(&row, kept_ranks(4, 0.5, 0.25));
        assert_eq!(acc, [0.0, 1.0, 1.0, 0.0]);
    }

    /// Against ranks written out by a full stable sort (descending |x|, then position), on rows
    /// with many equal magnitudes and every drop/keep split, the far cut past the end included.
    #[test]
    fn kept_elements_are_the_sorted_ranks() {
        let mut z = 5u64;
        for n in [1usize, 2, 7, 64, 300] {
            let row: Vec<f32> = (0..n)
                .map(|_| {
                    z = crate::rng::mix(z.wrapping_add(0x9E37_79B9_7F4A_7C15));
                    ((z % 13) as f32 - 6.0) * if z & 64 == 0 { 1.0 } else { 0.37 }
                })
                .collect();
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| row[b].abs().total_cmp(&row[a].abs()));
            for g in 0..n {
                for k in 1..=n + 1 {
                    let mut want = vec![0.0f32; n];
                    for &i in order.iter().skip(g).take(k) {
                        want[i] = row[i];
                    }
                    let acc = crumbs(&row, Some((g as u64, k as u64)));
                    assert_eq!(acc, want, "n {n}, g {g}, k {k}");
                }
            }
        }
    }
}
