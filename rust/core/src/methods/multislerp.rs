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
//! Emulating a dtype (`arith`) keeps mergekit's four statistics stages (the norms, the mean's
//! norm, the dots with the mean, the tangent's norm), each a sum of the rounded elements: there
//! the rounding errors are the result (bf16's tangent is not negligible).
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
        let norms = st.sums(0, 0).iter().map(|&s| Self::norm(r, s)).collect();
        Known {
            norms,
            weights,
            mean_norm: (st.stages.len() > 1).then(|| Self::norm(r, st.sums(1, 0)[0])),
            dots: (st.stages.len() > 2)
                .then(|| st.sums(2, 0).iter().map(|&s| r(s as f32)).collect()),
            tangent_norm: (st.stages.len() > 3).then(|| Self::norm(r, st.sums(3, 0)[0])),
        }
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
        if st.stages.is_empty() {
            for (a, d) in acc.iter_mut().zip(v) {
                let d = &d[..x.n];
                *a += reduce::sum(
                    x.n,
                    #[inline(always)]
                    |i| (r(d[i]) as f64) * (r(d[i]) as f64),
                );
            }
            return;
        }
        let k = self.known(r, x, st);
        crate::pipeline::grow(s.a, x.n);
        crate::pipeline::grow(s.b, x.n);
        let (mean, tangent) = (&mut s.a[..x.n], &mut s.b[..x.n]);
        match st.stages.len() {
            1 => {
                self.mean_into(r, &k, v, mean);
                acc[0] += reduce::sum_sq(mean);
            }
            2 => {
                self.mean_into(r, &k, v, mean);
                let mn = k.mean_norm.expect("norm");
                mean.iter_mut().for_each(|m| *m = r(*m / mn));
                let mean: &[f32] = mean;
                for ((a, d), &n) in acc.iter_mut().zip(v).zip(&k.norms) {
                    let (e, d) = (r(n + self.eps()), &d[..x.n]);
                    *a += reduce::sum(
                        x.n,
                        #[inline(always)]
                        |i| r(r(r(d[i]) / e) * mean[i]) as f64,
                    );
                }
            }
            _ => {
                self.tangent_into(r, &k, v, mean, tangent);
                acc[0] += reduce::sum_sq(tangent);
            }
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
            Some(_) => 4,
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

    fn next_stage(&self, _t: &TensorPlan, tasks: usize, done: &TensorStats) -> Option<Stage> {
        let sums = |slots| {
            Some(Stage::Sums {
                unit: Unit::Tensor,
                slots,
            })
        };
        match done.stages.len() {
            _ if tasks == 1 => None,
            0 if self.arith.is_none() => sums(tasks * (tasks + 1) / 2),
            0 => sums(tasks),
            _ if self.arith.is_none() => None,
            1 => sums(1),
            // The linear fallback needs no more (checked in `merge`).
            2 if with_round!(self.arith, |r| self
                .cancelled(Self::norm(r, done.sums(1, 0)[0]))) =>
            {
                None
            }
            2 => sums(tasks),
            3 => sums(1),
            _ => None,
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
