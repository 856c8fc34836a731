//! mergekit's `multislerp`: barycentric interpolation of T models (of their deltas from the
//! base when there is one) on the hypersphere, per tensor: project onto the tangent space at the
//! weighted mean direction, average there, map back, and scale by the weighted mean norm.
//! One model is returned as it is.
//!
//! In f32 every tensor-wide scalar comes from the Gram matrix of the inputs (exact products
//! summed in f64), gathered in one statistics pass: the norms are its diagonal, the mean is
//! `m = Σ c_i y_i` with `c_i = w_i / (‖y_i‖ + eps)`, so `‖m‖² = Σ c_i c_j G_ij` and the dots with
//! the mean are `Σ_j c_j G_ij / ((‖y_i‖ + eps) ‖m‖)`. mergekit's tangent is then zero (the weighted
//! sum of the projections of the unit vectors is `m − ‖m‖ m̂`); its norm in f64 is that difference,
//! where mergekit's is the norm of its f32 rounding errors. Either is far below the eps-sized
//! angles where cos and sin/x round to anything but 1 in f32, so the elements are mergekit's
//! arithmetic on these scalars. Four passes over the models become one, as in `karcher`.
//!
//! Emulating a dtype (`arith`) keeps mergekit's four statistics (the norms, the mean's norm, the
//! dots with the mean, the tangent's norm), each a sum of the rounded elements: there the
//! rounding errors are the result (bf16's tangent is not negligible). Each needs the ones before
//! it rounded to the dtype, but those roundings are predictable: the first pass also sums the
//! Gram matrix of the rounded deltas, from which the mean's norm and the dots follow to about
//! 1e-6, far inside a bf16 (f16) step. The second pass computes the last three statistics at
//! once, the later ones from the predicted values rounded; where the computed values round to
//! the predictions, the later sums are exactly what a pass of their own would give, so the
//! output has the same bits. Where a prediction misses (a value within 1e-6 of a rounding
//! boundary, a tiny tensor) the statistics after it take their own passes, as before: two
//! passes instead of four, and never a wrong bit.
//!
//! With `arith` (mergekit's bf16/f16 `dtype`) every torch operation of mergekit's code is
//! rounded to it as mergekit's run rounds it: the deltas, the weights and their normalisation,
//! each norm (reduced in f32, rounded once) and `+ eps`, each quotient and product, the sums over
//! the models, the dots (of rounded products), cos/sin of the tangent's norm and the result.

use super::kernel::{ChunkIn, Inputs, Kernel, Output, Scratch, Stage, TensorStats, Unit};
use super::mergekit::parse_arith;
use super::{reduce, Reader};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::plan::TensorPlan;

#[derive(Clone, Debug, PartialEq)]
pub struct MultiSlerp {
    pub normalize_weights: bool,
    pub eps: f64,
    pub relative: bool,
    /// mergekit's dtype when its arithmetic is emulated.
    pub arith: Option<DType>,
}

/// The rounded mean's norm and dots that the Gram matrix predicts (`arith` only).
struct Guess {
    mean_norm: f32,
    dots: Vec<f32>,
}

/// What the kernel knows of a tensor at a point in its stages.
struct Known {
    norms: Vec<f32>,
    weights: Vec<f32>,
    mean_norm: Option<f32>,
    dots: Option<Vec<f32>>,
    /// The tangent's norm (before `+ eps`).
    tangent_norm: Option<f32>,
}

impl MultiSlerp {
    pub fn parse(r: &mut Reader) -> Result<MultiSlerp> {
        Ok(MultiSlerp {
            normalize_weights: r.flag("normalize_weights", true)?,
            eps: r.num("eps", 1e-8, 0.0, 1.0, false)?,
            relative: r.flag("relative", true)?,
            arith: parse_arith(r)?,
        })
    }

    fn eps(&self) -> f32 {
        self.eps as f32
    }

    /// A norm as torch gives it in the dtype (reduced wider, rounded once).
    #[inline(always)]
    fn norm<R: Fn(f32) -> f32>(r: R, sum_sq: f64) -> f32 {
        r(sum_sq.sqrt() as f32)
    }

    /// `mean_norm < eps`, compared in the dtype (torch rounds the scalar to the tensor's dtype).
    fn cancelled(&self, mean_norm: f32) -> bool {
        with_round!(self.arith, |r| mean_norm < r(self.eps()))
    }

    fn inputs_of<'a>(&self, x: &'a ChunkIn) -> &'a [&'a [f32]] {
        if self.relative {
            x.deltas
        } else {
            x.values
        }
    }

    /// The weights as the kernel uses them (rounded, normalised when asked).
    fn weights<R: Fn(f32) -> f32 + Copy>(&self, r: R, given: &[f32]) -> Vec<f32> {
        let mut weights: Vec<f32> = given.iter().map(|&w| r(w)).collect();
        if self.normalize_weights {
            let total = r(weights.iter().fold(0.0f32, |a, &b| a + b));
            for w in &mut weights {
                *w = r(*w / total);
            }
        }
        weights
    }

    #[inline(always)]
    fn known<R: Fn(f32) -> f32 + Copy>(&self, r: R, x: &ChunkIn, st: &TensorStats) -> Known {
        self.known_at_end(r, x.weights, st)
    }

    /// What the stages done so far tell, given the set's weights.
    #[inline(always)]
    fn known_at_end<R: Fn(f32) -> f32 + Copy>(
        &self,
        r: R,
        given: &[f32],
        st: &TensorStats,
    ) -> Known {
        let weights = self.weights(r, given);
        if self.arith.is_none() {
            return self.known_from_gram(weights, st.sums(0, 0));
        }
        let tasks = weights.len();
        let first = st.sums(0, 0);
        let norms = first[..tasks].iter().map(|&s| Self::norm(r, s)).collect();
        let mut k = Known {
            norms,
            weights,
            mean_norm: None,
            dots: None,
            tangent_norm: None,
        };
        if st.stages.len() < 2 {
            return k;
        }
        // Stage 1: the mean's norm, then the dots and the tangent's norm from the guesses.
        let both = st.sums(1, 0);
        let mean_norm = Self::norm(r, both[0]);
        let guess = self.guess(r, &k, first);
        k.mean_norm = Some(mean_norm);
        let mut next = 2;
        if mean_norm.to_bits() == guess.mean_norm.to_bits() {
            let dots: Vec<f32> = both[1..1 + tasks].iter().map(|&s| r(s as f32)).collect();
            let held = dots
                .iter()
                .zip(&guess.dots)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            k.dots = Some(dots);
            if held {
                k.tangent_norm = Some(Self::norm(r, both[1 + tasks]));
                return k;
            }
        } else if st.stages.len() > next {
            k.dots = Some(st.sums(next, 0).iter().map(|&s| r(s as f32)).collect());
            next += 1;
        }
        if k.dots.is_some() && st.stages.len() > next {
            k.tangent_norm = Some(Self::norm(r, st.sums(next, 0)[0]));
        }
        k
    }

    /// The rounded mean's norm and dots as the Gram matrix of the rounded deltas predicts them
    /// (`first`: stage 0's sums, the T squares then the pairs s < t row by row), in f64 from the
    /// rounded norms and weights the elements use. A pure function of the sums, so every chunk
    /// and the check after the pass compute the same guesses.
    fn guess<R: Fn(f32) -> f32 + Copy>(&self, r: R, k: &Known, first: &[f64]) -> Guess {
        let tasks = k.weights.len();
        let mut gram = vec![0.0f64; tasks * tasks];
        let mut at = tasks;
        for a in 0..tasks {
            gram[a * tasks + a] = first[a];
            for b in a + 1..tasks {
                gram[a * tasks + b] = first[at];
                gram[b * tasks + a] = first[at];
                at += 1;
            }
        }
        let denom: Vec<f64> = k.norms.iter().map(|&n| r(n + self.eps()) as f64).collect();
        let coef: Vec<f64> = (0..tasks).map(|t| k.weights[t] as f64 / denom[t]).collect();
        let with_mean: Vec<f64> = (0..tasks)
            .map(|i| (0..tasks).map(|j| coef[j] * gram[i * tasks + j]).sum())
            .collect();
        let square: f64 = coef.iter().zip(&with_mean).map(|(c, g)| c * g).sum();
        let mean_norm = Self::norm(r, square.max(0.0));
        let mut dots: Vec<f32> = (0..tasks)
            .map(|i| r((with_mean[i] / (denom[i] * mean_norm as f64)) as f32))
            .collect();
        // The tests make a guess miss (WEIGHTWEAVE_FORCE_MISS), to reach the passes that follow
        // a miss: by 2^-7 of the value (8 f16 steps, one bf16 step), enough to change what is
        // computed from it, as a real miss does.
        let miss = |v: f32| f32::from_bits(v.to_bits() + (1 << 16));
        match std::env::var("WEIGHTWEAVE_FORCE_MISS").as_deref() {
            Ok("norm") => {
                return Guess {
                    mean_norm: miss(mean_norm),
                    dots,
                }
            }
            Ok("dots") => dots[tasks - 1] = miss(dots[tasks - 1]),
            _ => {}
        }
        Guess { mean_norm, dots }
    }

    /// The f32 scalars from the Gram matrix `gram` (upper triangle, row by row), in f64 from
    /// the f32 norms and weights the elements use.
    fn known_from_gram(&self, weights: Vec<f32>, gram: &[f64]) -> Known {
        let tasks = weights.len();
        let at = |a: usize, b: usize| {
            let (a, b) = (a.min(b), a.max(b));
            gram[a * tasks - a * (a + 1) / 2 + b]
        };
        let norms: Vec<f32> = (0..tasks).map(|t| Self::norm(|v| v, at(t, t))).collect();
        let denom: Vec<f64> = norms.iter().map(|&n| (n + self.eps()) as f64).collect();
        let coef: Vec<f64> = (0..tasks).map(|t| weights[t] as f64 / denom[t]).collect();
        // y_i · m for each model, and ‖m‖.
        let with_mean: Vec<f64> = (0..tasks)
            .map(|i| (0..tasks).map(|j| coef[j] * at(i, j)).sum())
            .collect();
        let mn = coef
            .iter()
            .zip(&with_mean)
            .map(|(c, g)| c * g)
            .sum::<f64>()
            .max(0.0)
            .sqrt();
        let dots: Vec<f64> = (0..tasks).map(|i| with_mean[i] / (denom[i] * mn)).collect();
        let along: f64 = dots.iter().zip(&weights).map(|(d, &w)| d * w as f64).sum();
        Known {
            norms,
            mean_norm: Some(mn as f32),
            dots: Some(dots.iter().map(|&d| d as f32).collect()),
            tangent_norm: Some((mn - along).abs() as f32),
            weights,
        }
    }

    /// The weighted mean of the unit vectors over the chunk, into `out` (task by task, as
    /// torch's sum over the stacked tensors adds them, rounded once). Inputs are rounded to the
    /// dtype first, as torch's `tensors -= base` leaves the deltas.
    #[inline(always)]
    fn mean_into<R: Fn(f32) -> f32 + Copy>(&self, r: R, k: &Known, v: &[&[f32]], out: &mut [f32]) {
        out.fill(0.0);
        for ((x, &n), &w) in v.iter().zip(&k.norms).zip(&k.weights) {
            let d = r(n + self.eps());
            for (o, &y) in out.iter_mut().zip(x.iter()) {
                *o += r(r(r(y) / d) * w);
            }
        }
        out.iter_mut().for_each(|o| *o = r(*o));
    }

    /// The normalised mean into `mean` and the tangent-space result into `tangent`.
    #[inline(always)]
    fn tangent_into<R: Fn(f32) -> f32 + Copy>(
        &self,
        r: R,
        k: &Known,
        v: &[&[f32]],
        mean: &mut [f32],
        tangent: &mut [f32],
    ) {
        self.mean_into(r, k, v, mean);
        let mn = k.mean_norm.expect("the mean's norm");
        mean.iter_mut().for_each(|m| *m = r(*m / mn));
        self.tangent_from(r, k, v, mean, tangent);
    }

    /// The tangent-space result into `tangent`, from the normalised mean.
    #[inline(always)]
    fn tangent_from<R: Fn(f32) -> f32 + Copy>(
        &self,
        r: R,
        k: &Known,
        v: &[&[f32]],
        mean: &[f32],
        tangent: &mut [f32],
    ) {
        let dots = k.dots.as_ref().expect("the dots");
        tangent.fill(0.0);
        for (((x, &n), &w), &d) in v.iter().zip(&k.norms).zip(&k.weights).zip(dots) {
            let e = r(n + self.eps());
            for ((o, &y), &m) in tangent.iter_mut().zip(x.iter()).zip(mean.iter()) {
                *o += r(r(r(r(y) / e) - r(d * m)) * w);
            }
        }
        tangent.iter_mut().for_each(|t| *t = r(*t));
    }

    fn fallback(&self, k: &Known) -> bool {
        k.mean_norm.is_some_and(|n| self.cancelled(n))
    }

    #[inline(always)]
    fn accumulate_in<R: Fn(f32) -> f32 + Copy>(
        &self,
        r: R,
        x: &ChunkIn,
        st: &TensorStats,
        s: Scratch,
        acc: &mut [f64],
    ) {
        let v = self.inputs_of(x);
        if self.arith.is_none() {
            let mut k = 0;
            for s in 0..v.len() {
                for t in s..v.len() {
                    acc[k] += reduce::dot(v[s], v[t]);
                    k += 1;
                }
            }
            return;
        }
        crate::pipeline::grow(s.a, x.n);
        crate::pipeline::grow(s.b, x.n);
        let (mean, tangent) = (&mut s.a[..x.n], &mut s.b[..x.n]);
        let tasks = v.len();
        if st.stages.is_empty() {
            // The squares (the norms), then the pairs of the Gram matrix, for the guesses only
            // (bf16 and f16 products are exact in f32). The rounded deltas go through the
            // scratch: rounded inside the f64 sums, they did not vectorize.
            let round = |d: &[f32], into: &mut [f32]| {
                for (o, &y) in into.iter_mut().zip(d) {
                    *o = r(y);
                }
            };
            let mut at = tasks;
            for (a, d) in v.iter().enumerate() {
                round(d, mean);
                acc[a] += reduce::sum_sq(mean);
                for e in &v[a + 1..] {
                    round(e, tangent);
                    acc[at] += reduce::dot(mean, tangent);
                    at += 1;
                }
            }
            return;
        }
        let mut k = self.known(r, x, st);
        if st.stages.len() == 1 {
            // The mean's norm, then the dots and the tangent's norm as if the guesses were it.
            self.mean_into(r, &k, v, mean);
            acc[0] += reduce::sum_sq(mean);
            let guess = self.guess(r, &k, st.sums(0, 0));
            k.mean_norm = Some(guess.mean_norm);
            self.dots_into(r, &k, v, mean, tangent, &mut acc[1..1 + tasks]);
            k.dots = Some(guess.dots);
            self.tangent_from(r, &k, v, mean, tangent);
            acc[1 + tasks] += reduce::sum_sq(tangent);
        } else if k.dots.is_none() {
            self.mean_into(r, &k, v, mean);
            self.dots_into(r, &k, v, mean, tangent, acc);
        } else {
            self.tangent_into(r, &k, v, mean, tangent);
            acc[0] += reduce::sum_sq(tangent);
        }
    }

    /// The dots of the unit vectors with the normalised mean, added to `acc`; `mean` holds the
    /// mean (normalised here). The rounded products go through `terms` before they are summed:
    /// computed inside the f64 sum, the roundings did not vectorize (3.5× the time).
    #[inline(always)]
    fn dots_into<R: Fn(f32) -> f32 + Copy>(
        &self,
        r: R,
        k: &Known,
        v: &[&[f32]],
        mean: &mut [f32],
        terms: &mut [f32],
        acc: &mut [f64],
    ) {
        let n = mean.len();
        let mn = k.mean_norm.expect("norm");
        mean.iter_mut().for_each(|m| *m = r(*m / mn));
        let (mean, terms): (&[f32], &mut [f32]) = (mean, &mut terms[..n]);
        for ((a, d), &norm) in acc.iter_mut().zip(v).zip(&k.norms) {
            let (e, d) = (r(norm + self.eps()), &d[..n]);
            for ((t, &y), &m) in terms.iter_mut().zip(d).zip(mean) {
                *t = r(r(r(y) / e) * m);
            }
            let terms: &[f32] = terms;
            *a += reduce::sum(
                n,
                #[inline(always)]
                |i| terms[i] as f64,
            );
        }
    }

    #[inline(always)]
    fn merge_in<R: Fn(f32) -> f32 + Copy>(
        &self,
        r: R,
        x: &ChunkIn,
        st: &TensorStats,
        s: Scratch,
        m: &mut [f32],
    ) {
        let v = self.inputs_of(x);
        let k = self.known(r, x, st);
        if self.fallback(&k) {
            // Two models: their weighted sum (the caller refused more before any work).
            for (i, o) in m.iter_mut().enumerate() {
                *o = r(r(r(v[0][i]) * k.weights[0]) + r(r(v[1][i]) * k.weights[1]));
            }
            return;
        }
        let tn = r(k.tangent_norm.expect("the tangent's norm") + self.eps());
        let (c, sn) = (r(tn.cos()), r(r(tn.sin()) / tn));
        let avg = r(k
            .norms
            .iter()
            .zip(&k.weights)
            .fold(0.0f32, |a, (&n, &w)| a + r(n * w)));
        crate::pipeline::grow(s.a, x.n);
        crate::pipeline::grow(s.b, x.n);
        let (mean, tangent) = (&mut s.a[..x.n], &mut s.b[..x.n]);
        self.tangent_into(r, &k, v, mean, tangent);
        for ((o, &mean), &t) in m.iter_mut().zip(mean.iter()).zip(tangent.iter()) {
            *o = r(r(r(mean * c) + r(t * sn)) * avg);
        }
    }
}

impl Kernel for MultiSlerp {
    fn name(&self) -> &'static str {
        "multislerp"
    }

    fn params_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({"compat": "mergekit",
            "normalize_weights": self.normalize_weights, "eps": self.eps, "relative": self.relative});
        if let Some(d) = self.arith {
            v["arith"] = serde_json::json!(d.name());
        }
        v
    }

    fn inputs(&self) -> Inputs {
        Inputs::relative(self.relative)
    }

    fn output(&self) -> Output {
        Output::relative(self.relative)
    }

    fn passes(&self) -> u64 {
        match self.arith {
            None => 1,
            // When the guesses hold (up to four when they miss).
            Some(_) => 2,
        }
    }

    fn check_stats(&self, t: &TensorPlan, weights: &[f32], st: &TensorStats) -> Result<()> {
        if st.stages.is_empty() {
            return Ok(()); // one model
        }
        let cancelled = with_round!(self.arith, |r| {
            let known = self.known_at_end(r, weights, st);
            self.fallback(&known)
        });
        if weights.len() > 2 && cancelled {
            return Err(Error::param(
                "weights",
                format!("multislerp: tensor '{}': the weighted sum of the models' directions is zero (antipodal models with balancing weights); use other weights", t.name),
            ));
        }
        Ok(())
    }

    fn next_stage_weighted(
        &self,
        _t: &TensorPlan,
        tasks: usize,
        weights: &[f32],
        done: &TensorStats,
        _whole_rows: bool,
    ) -> Option<Stage> {
        let sums = |slots| {
            Some(Stage::Sums {
                unit: Unit::Tensor,
                slots,
            })
        };
        if tasks == 1 {
            return None;
        }
        match done.stages.len() {
            // The Gram matrix (f32), or the squares and then the pairs (`arith`).
            0 => sums(tasks * (tasks + 1) / 2),
            _ if self.arith.is_none() => None,
            // The mean's norm, the guessed dots, the guessed tangent's norm.
            1 => sums(tasks + 2),
            _ => {
                let k = with_round!(self.arith, |r| self.known_at_end(r, weights, done));
                // The linear fallback needs no more (checked in `merge`).
                if self.fallback(&k) || k.tangent_norm.is_some() {
                    None
                } else if k.dots.is_none() {
                    sums(tasks)
                } else {
                    sums(1)
                }
            }
        }
    }

    fn accumulate(&self, x: &ChunkIn, st: &TensorStats, s: Scratch, acc: &mut [f64]) {
        // The loops in the wide copies (`simd!`): every function below is inlined into it.
        with_round!(self.arith, |r| crate::simd!(
            self.accumulate_in(r, x, st, s, acc)
        ))
    }

    fn merge(&self, x: &ChunkIn, st: &TensorStats, s: Scratch, m: &mut [f32]) {
        if x.tasks() == 1 {
            m.copy_from_slice(self.inputs_of(x)[0]);
            return;
        }
        with_round!(self.arith, |r| crate::simd!(self.merge_in(r, x, st, s, m)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::kernel::Found;

    fn sums(v: &[f64]) -> Found {
        Found::Sums {
            slots: v.len(),
            sums: v.to_vec(),
            before: Default::default(),
        }
    }

    fn stats(stages: &[&[f64]]) -> TensorStats {
        TensorStats {
            stages: stages.iter().map(|s| sums(s)).collect(),
            ..Default::default()
        }
    }

    /// The next bf16 value: a guess that misses by one step.
    fn step(v: f32) -> f32 {
        f32::from_bits(v.to_bits() + (1 << 16))
    }

    /// Under bf16 arithmetic, each statistic is taken from the pass that computed it from the
    /// right values: the second pass's guessed slots where the mean's norm and the dots it
    /// computed round to the guesses, the passes after it where they do not, and the stages
    /// asked for follow (two passes, three after a missed dot, four after a missed norm).
    #[test]
    fn each_statistic_comes_from_a_pass_with_the_right_inputs() {
        let m = MultiSlerp {
            normalize_weights: true,
            eps: 1e-8,
            relative: true,
            arith: Some(DType::BF16),
        };
        let r = |v: f32| crate::dtype::round_to(DType::BF16, v);
        let t = TensorPlan::vector("w", 10);
        let weights = [1.0f32, 0.5];
        let next = |st: &TensorStats| match m.next_stage_weighted(&t, 2, &weights, st, false) {
            Some(Stage::Sums { slots, .. }) => Some(slots),
            None => None,
            Some(other) => panic!("unexpected stage {other:?}"),
        };
        // Stage 0: the squares (norms 2 and 3) and the pair.
        let first = [4.0, 9.0, 1.5];
        assert_eq!(next(&stats(&[])), Some(3));
        assert_eq!(next(&stats(&[&first])), Some(4));
        let k0 = m.known_at_end(r, &weights, &stats(&[&first]));
        assert_eq!(k0.norms, vec![2.0, 3.0]);
        let g = m.guess(r, &k0, &first);
        let (mn, d0, d1) = (g.mean_norm as f64, g.dots[0] as f64, g.dots[1] as f64);
        // Both guesses hold: the guessed tangent's norm (0.5) is the one.
        let hit = [mn * mn, d0, d1, 0.25];
        let k = m.known_at_end(r, &weights, &stats(&[&first, &hit]));
        assert_eq!(
            (k.mean_norm, k.dots.clone()),
            (Some(g.mean_norm), Some(g.dots.clone()))
        );
        assert_eq!(k.tangent_norm, Some(0.5));
        assert_eq!(next(&stats(&[&first, &hit])), None);
        // A dot misses: the dots of that pass stand (its norm was right), the tangent's norm
        // takes a pass of its own (0.4), not the guessed slot.
        let miss_dot = [mn * mn, d0, step(g.dots[1]) as f64, 0.25];
        let k = m.known_at_end(r, &weights, &stats(&[&first, &miss_dot]));
        assert_eq!(k.dots, Some(vec![g.dots[0], step(g.dots[1])]));
        assert_eq!(k.tangent_norm, None);
        assert_eq!(next(&stats(&[&first, &miss_dot])), Some(1));
        let st = stats(&[&first, &miss_dot, &[0.16]]);
        assert_eq!(m.known_at_end(r, &weights, &st).tangent_norm, Some(r(0.4)));
        assert_eq!(next(&st), None);
        // The norm misses: that pass's dots and tangent are void; the dots take the third pass,
        // the tangent's norm the fourth.
        let other = step(g.mean_norm) as f64;
        let miss_norm = [other * other, d0, d1, 0.25];
        let k = m.known_at_end(r, &weights, &stats(&[&first, &miss_norm]));
        assert_eq!(
            (k.mean_norm, k.dots, k.tangent_norm),
            (Some(step(g.mean_norm)), None, None)
        );
        assert_eq!(next(&stats(&[&first, &miss_norm])), Some(2));
        let st = stats(&[&first, &miss_norm, &[0.75, 0.25]]);
        let k = m.known_at_end(r, &weights, &st);
        assert_eq!((k.dots, k.tangent_norm), (Some(vec![0.75, 0.25]), None));
        assert_eq!(next(&st), Some(1));
        let st = stats(&[&first, &miss_norm, &[0.75, 0.25], &[0.09]]);
        assert_eq!(m.known_at_end(r, &weights, &st).tangent_norm, Some(r(0.3)));
        assert_eq!(next(&st), None);
    }
}
