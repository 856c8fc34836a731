//! mergekit's `della` and `della_linear` (Deep et al. 2024): generalized task arithmetic whose
//! sparsification (`della_magprune`) keeps each delta with a probability that grows with its
//! magnitude rank within its row, from density − ε (smallest) to density + ε (largest); kept
//! deltas are rescaled to the tensor's former L1 norm (`rescale`, one statistics stage), then
//! weighted and mixed as mergekit mixes (`della` with TIES's sign consensus). Ranks run along
//! dimension 1 as mergekit's (rows of a matrix; a vector is one row), so chunks hold whole
//! rows or slabs; equal magnitudes rank by position; the masks come from this crate's
//! counter-based generator.

use super::kernel::{ChunkIn, Kernel, Scratch, Stage, TensorStats, Unit};
use super::mergekit::{mix, Gta, Sparsify};
use super::{PerTask, Reader};
use crate::error::{Error, Result};
use crate::plan::TensorPlan;
use crate::rng::Stream;

#[derive(Clone, Debug, PartialEq)]
pub struct Della {
    pub consensus: bool,
    pub normalize: bool,
    pub rescale: bool,
    pub density: PerTask,
    pub epsilon: PerTask,
}

impl Della {
    pub fn parse(r: &mut Reader, consensus: bool) -> Result<Della> {
        let normalize = r.flag("normalize", consensus)?;
        let rescale = r.flag("rescale", true)?;
        r.flag("int8_mask", false)?;
        let density = super::registry::per_model(r, "density", 1.0, f64::MIN, f64::MAX)?;
        let epsilon = super::registry::per_model(r, "epsilon", 0.15, f64::MIN, f64::MAX)?;
        Ok(Della {
            consensus,
            normalize,
            rescale,
            density,
            epsilon,
        })
    }

    /// Whether task `t` is sparsified (mergekit returns it as it is at density ≥ 1).
    fn prunes(&self, t: usize) -> bool {
        self.density.get(t) < 1.0
    }

    fn gta(&self) -> Gta {
        let mut g = Gta::named("ties").expect("a GTA method");
        g.sparsify = Sparsify::None;
        g.consensus = self.consensus;
        g.normalize = self.normalize;
        g
    }

    /// Task `t`'s pruned delta of one chunk of whole rows into `out` (unscaled). Inlined into
    /// the callers' wide copies (`simd!`), where its per-row loops vectorize.
    #[inline(always)]
    fn prune(&self, x: &ChunkIn, t: usize, out: &mut [f32]) {
        let d = x.deltas[t];
        let density = self.density.get(t);
        if !self.prunes(t) {
            out.copy_from_slice(d);
            return;
        }
        if density <= 0.0 {
            out.fill(0.0);
            return;
        }
        let eps = self.epsilon.get(t);
        let (low, eps32) = ((density - eps) as f32, eps as f32);
        let stream = Stream::new(x.seed, t as u64, &x.tensor.name);
        // Vectors along dimension 1 (of the tensor as mergekit sees it: 1-D is one row): `len`
        // elements `stride` apart, `inner` of them per slab.
        let shape = &x.tensor.shape;
        let (len, stride) = if shape.len() > 2 {
            (shape[1], shape[2..].iter().product::<usize>())
        } else {
            (x.tensor.row_len(), 1)
        };
        let slab = len * stride;
        let span = (len - 1) as f32;
        // The keep probability of each rank (mergekit's f32 arithmetic, once per row length).
        let probs: Vec<f32> = (0..len)
            .map(|rank| low + (rank as f32 / span).clamp(0.0, 1.0) * 2.0 * eps32)
            .collect();
        let mut row = RowKeep::new(len);
        let mut units = vec![0.0f32; len];
        for s0 in (0..x.n).step_by(slab) {
            if stride == 1 {
                // Rows of a matrix: contiguous, so each loop below vectorizes.
                let (d, out) = (&d[s0..s0 + len], &mut out[s0..s0 + len]);
                for (key, &v) in row.keys.iter_mut().zip(d) {
                    *key = v.abs().to_bits();
                }
                // The draws of consecutive indices: the counter carried, an add per element
                // for a 64-bit multiply (`Stream::draw_at`).
                let mut z = stream.counter((x.start + s0) as u64);
                for u in units.iter_mut() {
                    let (draw, next) = Stream::draw_at(z);
                    z = next;
                    *u = crate::rng::unit_of(draw);
                }
                row.decide(&probs, &units);
                for ((o, &v), &keep) in out.iter_mut().zip(d).zip(&row.keep) {
                    // τ × mask, as mergekit masks (a dropped negative delta is −0).
                    *o = v * f32::from(u8::from(keep));
                }
                continue;
            }
            for k in 0..stride {
                let at = |j: usize| s0 + j * stride + k;
                for (j, key) in row.keys.iter_mut().enumerate() {
                    *key = d[at(j)].abs().to_bits();
                }
                for (j, u) in units.iter_mut().enumerate() {
                    *u = stream.unit((x.start + at(j)) as u64);
                }
                row.decide(&probs, &units);
                for (j, &keep) in row.keep.iter().enumerate() {
                    let i = at(j);
                    out[i] = d[i] * f32::from(u8::from(keep));
                }
            }
        }
    }
}

/// The keep decisions of one vector: element j is kept when its uniform draw u_j is below the
/// probability of its rank, `probs[rank_j]` (ascending |τ|, equal magnitudes by position).
///
/// Sorting every vector to learn the ranks was most of DELLA's time, yet a rank matters only
/// when u_j falls between the probabilities of the ranks the element could have. One counting
/// pass spreads the magnitudes over about `len` buckets of equal width from 0 to the largest;
/// an element of bucket b has a rank in `cum_b .. cum_b + c_b`, and since the probabilities are
/// monotone in the rank, u_j below both ends keeps it and u_j at or above both drops it. Only
/// between them is the rank counted exactly (one walk of the vector): a few elements per vector,
/// as about one element shares a bucket. Vectors where that would happen too often (many equal
/// magnitudes at a cut, non-finite values) are ranked by the radix sort. The decisions are the
/// same either way.
/// Elements per bucket, on average.
const BUCKET: usize = 8;

struct RowKeep {
    keys: Vec<u32>,
    keep: Vec<bool>,
    /// Each element's bucket.
    bucket: Vec<u32>,
    /// Per bucket, where its ranks start (then, one past the last bucket, the length).
    start: Vec<u32>,
    vals: Vec<u64>,
    tmp: Vec<u64>,
}

impl RowKeep {
    fn new(len: usize) -> RowKeep {
        RowKeep {
            keys: vec![0; len],
            keep: vec![false; len],
            bucket: vec![0; len],
            start: vec![0; Self::buckets(len) + 1],
            vals: Vec::new(),
            tmp: Vec::new(),
        }
    }

    /// Buckets for a vector of `len`: about 8 elements each (see `decide`).
    fn buckets(len: usize) -> usize {
        (len / BUCKET).max(1)
    }

    /// Fills `keep` from `keys` (the magnitudes' bits), `probs` (per rank) and the draws
    /// `units` (per element).
    #[inline(always)]
    fn decide(&mut self, probs: &[f32], units: &[f32]) {
        let n = self.keys.len();
        let nb = self.start.len() - 1;
        let hi = self.keys.iter().fold(0u32, |hi, &k| hi.max(k));
        if hi == 0 || hi > f32::MAX.to_bits() {
            return self.by_sort(probs, units);
        }
        // Monotone in the key and free of branches (so vectorized): the value times a positive
        // constant, rounded to an integer by adding 2^23, clamped.
        let scale = (nb - 1) as f32 / f32::from_bits(hi);
        const MAGIC: f32 = 8_388_608.0;
        for (b, &k) in self.bucket.iter_mut().zip(&self.keys) {
            let v = f32::from_bits(k) * scale + MAGIC;
            *b = (v.to_bits() - MAGIC.to_bits()).min(nb as u32 - 1);
        }
        self.start.fill(0);
        for &b in &self.bucket {
            self.start[b as usize + 1] += 1;
        }
        // The running sum stays in a register (read back from memory, each step waited on
        // the store before it).
        let (mut pairs, mut sum) = (0u64, 0u32);
        for s in &mut self.start[1..] {
            let c = u64::from(*s);
            pairs += c * c.saturating_sub(1);
            sum += *s;
            *s = sum;
        }
        // The expected number of exact ranks to count (each a scan of the vector): the draws
        // that fall between the probabilities of a bucket's first and last rank.
        let step = (probs[n - 1] - probs[0]).abs() / (n - 1) as f32;
        if pairs as f32 * step > 48.0 {
            return self.by_sort(probs, units);
        }
        // Probabilities are positive floats, so their bits order as they do, and one unsigned
        // comparison says lo ≤ u < lo + width. Every probability lies between those of the
        // first and the last rank (they are monotone in the rank): a draw below both keeps its
        // element and one at or above both drops it, whatever its rank. Only the draws between
        // them (a fraction 2ε) look up their bucket's range; a loop over every bucket and a
        // lookup per element were a fifth of DELLA's time, in scalar code (the lookups are
        // gathers, which the compiler does not vectorise for a generic x86-64).
        let last = n - 1;
        let (pa, pb) = (probs[0].to_bits(), probs[last].to_bits());
        let (all_lo, all_width) = (pa.min(pb), pa.max(pb) - pa.min(pb));
        const BLOCK: usize = 64;
        for b0 in (0..n).step_by(BLOCK) {
            let end = (b0 + BLOCK).min(n);
            let mut open = 0u64;
            let draws = units[b0..end].iter().zip(&mut self.keep[b0..end]);
            for (k, (u, keep)) in draws.enumerate() {
                let u = u.to_bits();
                *keep = u < all_lo;
                open |= u64::from(u.wrapping_sub(all_lo) < all_width) << k;
            }
            while open != 0 {
                let j = b0 + open.trailing_zeros() as usize;
                open &= open - 1;
                self.settle(j, probs, units[j].to_bits());
            }
        }
    }

    /// The decision of element `j`, whose draw `u` (as bits) lies within the row's range of
    /// probabilities: its bucket's ranks bound its probability; only a draw inside that
    /// bound (the rare case) counts the rank exactly.
    #[inline(always)]
    fn settle(&mut self, j: usize, probs: &[f32], u: u32) {
        let last = self.keys.len() - 1;
        let b = self.bucket[j] as usize;
        let first = (self.start[b] as usize).min(last);
        let end = ((self.start[b + 1] as usize).max(1) - 1).min(last);
        let (p0, p1) = (probs[first].to_bits(), probs[end].to_bits());
        let lo = p0.min(p1);
        self.keep[j] = u < lo;
        if u.wrapping_sub(lo) < p0.max(p1) - lo {
            let kj = self.keys[j];
            let (head, tail) = self.keys.split_at(j);
            // k ≤ kj before j, k < kj from j on: one walk of the vector for both counts (a walk
            // for each, the first of the whole vector, was a third of DELLA's time on bf16).
            let rank = head.iter().map(|&k| u32::from(k <= kj)).sum::<u32>()
                + tail.iter().map(|&k| u32::from(k < kj)).sum::<u32>();
            self.keep[j] = u < probs[rank as usize].to_bits();
        }
    }

    /// Every rank from a stable sort of the vector.
    fn by_sort(&mut self, probs: &[f32], units: &[f32]) {
        let keys = &self.keys;
        super::reduce::radix_order(keys.len(), |j| keys[j], &mut self.vals, &mut self.tmp);
        for (rank, &v) in self.vals.iter().enumerate() {
            let j = v as u32 as usize;
            self.keep[j] = units[j] < probs[rank];
        }
    }
}

impl Kernel for Della {
    fn name(&self) -> &'static str {
        if self.consensus {
            "della"
        } else {
            "della_linear"
        }
    }

    fn params_json(&self) -> serde_json::Value {
        serde_json::json!({"compat": "mergekit", "normalize": self.normalize, "rescale": self.rescale,
            "density": self.density.json(), "epsilon": self.epsilon.json()})
    }

    fn rows(&self) -> super::Rows {
        super::Rows::Slab
    }

    fn check_tasks(&self, tasks: usize) -> Result<()> {
        self.density.check_len("density", tasks)?;
        self.epsilon.check_len("epsilon", tasks)?;
        for t in 0..tasks {
            let (d, e) = (self.density.get(t), self.epsilon.get(t));
            if d > 0.0 && d < 1.0 && (d + e >= 1.0 || d - e <= 0.0) {
                return Err(Error::param(
                    "epsilon",
                    format!("model {t}: density ± epsilon ({d} ± {e}) must lie in (0, 1)"),
                ));
            }
        }
        Ok(())
    }

    fn check_tensor(&self, t: &TensorPlan) -> Result<()> {
        let prunes = match &self.density {
            PerTask::All(d) => *d > 0.0 && *d < 1.0,
            PerTask::Each(v) => v.iter().any(|&d| d > 0.0 && d < 1.0),
        };
        if !t.mergeable || t.numel == 0 || !prunes {
            return Ok(());
        }
        let len = match t.shape.len() {
            0 => 0,
            1 | 2 => t.row_len(),
            _ => t.shape[1],
        };
        let why = match len {
            0 => "is 0-d (mergekit's della_magprune fails on it)",
            1 => "has vectors of one element along dimension 1 (della's rank normalisation divides by zero there)",
            _ => return Ok(()),
        };
        Err(Error::param(
            "method",
            format!("{}: tensor '{}' {why}", self.name(), t.name),
        ))
    }

    fn needs_statistics(&self) -> bool {
        self.rescale
    }

    fn next_stage(&self, _t: &TensorPlan, tasks: usize, done: &TensorStats) -> Option<Stage> {
        (self.rescale && done.stages.is_empty()).then_some(Stage::Sums {
            unit: Unit::Tensor,
            slots: 2 * tasks,
        })
    }

    /// Σ|τ_t| and Σ|pruned τ_t| per task.
    fn accumulate(&self, x: &ChunkIn, _st: &TensorStats, s: Scratch, acc: &mut [f64]) {
        crate::simd!({
            let tasks = x.tasks();
            crate::pipeline::grow(s.a, x.n);
            for t in 0..tasks {
                let out = &mut s.a[..x.n];
                self.prune(x, t, out);
                acc[2 * t] += super::reduce::sum_abs(x.deltas[t]);
                acc[2 * t + 1] += super::reduce::sum_abs(out);
            }
        })
    }

    fn merge(&self, x: &ChunkIn, st: &TensorStats, s: Scratch, m: &mut [f32]) {
        crate::simd!({
            let tasks = x.tasks();
            s.per_task.resize_with(tasks, Vec::new);
            for t in 0..tasks {
                let out = &mut s.per_task[t];
                crate::pipeline::grow(out, x.n);
                let out = &mut out[..x.n];
                self.prune(x, t, out);
                if self.rescale && self.prunes(t) && self.density.get(t) > 0.0 {
                    let sums = st.sums(0, 0);
                    let (before, after) = (sums[2 * t] as f32, sums[2 * t + 1] as f32);
                    if before >= 1e-7 && after >= 1e-7 {
                        let f = before / after;
                        for v in out.iter_mut() {
                            *v *= f;
                        }
                    }
                }
            }
            crate::pipeline::grow(s.a, x.n);
            crate::pipeline::grow(s.b, x.n);
            let g = self.gta();
            mix(
                &g,
                s.per_task,
                x.weights,
                x.n,
                m,
                (&mut s.a[..], &mut s.b[..]),
            );
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bucketed decisions equal those from every rank of a sort, on vectors of spread,
    /// tied, zero, crowded and non-finite magnitudes, with increasing and decreasing
    /// probabilities.
    #[test]
    fn bucketed_decisions_equal_sorted_ones() {
        let mut seed = 11u64;
        let mut next = || {
            seed = crate::rng::mix(seed.wrapping_add(0x9E37_79B9_7F4A_7C15));
            seed
        };
        for n in [2usize, 3, 17, 512, 1365] {
            for kind in 0..6 {
                for (low, eps) in [(0.4f32, 0.1f32), (0.2, 0.15), (0.7, -0.2), (0.5, 0.0)] {
                    let span = (n - 1) as f32;
                    let probs: Vec<f32> = (0..n)
                        .map(|r| low + (r as f32 / span).clamp(0.0, 1.0) * 2.0 * eps)
                        .collect();
                    let keys: Vec<u32> = (0..n)
                        .map(|_| {
                            let z = next();
                            let g = ((z >> 40) as f32 / 16_777_216.0 - 0.5) * 1e-3;
                            match kind {
                                0 => g.abs().to_bits(),
                                1 => ((z % 9) as f32 * 1e-4).to_bits(), // bf16-like ties
                                2 if z % 3 == 0 => 0,                   // zeros
                                2 => g.abs().to_bits(),
                                3 => (1e-3 + (z % 4) as f32 * 1e-9).to_bits(), // crowded
                                4 if z % 50 == 0 => f32::NAN.to_bits(),
                                4 => g.abs().to_bits(),
                                _ => 0,
                            }
                        })
                        .collect();
                    let draws: Vec<f32> = (0..n)
                        .map(|_| (next() >> 40) as f32 / 16_777_216.0)
                        .collect();
                    let mut row = RowKeep::new(n);
                    row.keys.copy_from_slice(&keys);
                    row.decide(&probs, &draws);
                    let fast = row.keep.clone();
                    row.by_sort(&probs, &draws);
                    assert_eq!(fast, row.keep, "n {n}, kind {kind}, eps {eps}");
                    // And by_sort against ranks written out by hand (a comparison sort).
                    let mut order: Vec<usize> = (0..n).collect();
                    order.sort_by_key(|&j| keys[j]);
                    for (rank, &j) in order.iter().enumerate() {
                        assert_eq!(row.keep[j], draws[j] < probs[rank]);
                    }
                }
            }
        }
    }
}
