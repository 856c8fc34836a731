//! mergekit's `karcher`: the Karcher (Riemannian) mean of the models' directions on the unit
//! hypersphere (equal weights), scaled by their mean norm, per tensor, with mergekit's
//! iteration: start at the normalised mean direction, step along the mean tangent
//! θ/sin θ·(u − cos θ·mean) until its norm drops below `tol`, at most `max_iter` times.
//!
//! Every iterate is a combination of the unit vectors u_t = θ_t/‖θ_t‖, so the iteration runs on
//! T coefficients given the Gram matrix of the models, gathered in one statistics pass (in f64):
//! the whole iteration then costs no pass at all, where mergekit's touches every element two or
//! three times per iteration. The output pass forms Σ_t a_t·u_t per element. Results agree with
//! mergekit's element-wise iteration to rounding (its f32 reductions over a tensor are the larger
//! error); a convergence test that falls within rounding of `tol` may take one step more or less.
//! With `arith` (mergekit's bf16/f16 `dtype`) the iteration runs as mergekit's does, element by
//! element and rounded at every step (`karcher_dtype.rs`).

use super::kernel::{ChunkIn, Inputs, Kernel, Output, Scratch, Stage, TensorStats, Unit};
use super::mergekit::parse_arith;
use super::Reader;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::plan::TensorPlan;

#[derive(Clone, Debug, PartialEq)]
pub struct Karcher {
    pub max_iter: usize,
    pub tol: f64,
    /// The base model is one of the points (mergekit's entries include a base_model).
    pub with_base: bool,
    /// mergekit's dtype when its arithmetic is emulated.
    pub arith: Option<DType>,
}

/// The result of the iteration for one tensor: per point its norm (f32, as mergekit's) and its
/// coefficient in the output, scale·a_t.
struct Solved {
    norms: Vec<f32>,
    coef: Vec<f32>,
}

impl Karcher {
    pub fn parse(r: &mut Reader) -> Result<Karcher> {
        // Solved once per chunk on T coefficients: a cap keeps a hostile recipe from making
        // that the bulk of the work (mergekit's default is 10; convergence takes a handful).
        // The iteration runs on T coefficients, no pass over the tensor: mergekit sets no bound, and
        // 10^5 steps cost milliseconds per tensor. (Emulated in bf16/f16, each step is three
        // passes, as mergekit's own run makes three sweeps of the tensor per step.)
        let max_iter = r.num("max_iter", 10.0, 0.0, 100_000.0, false)?;
        if max_iter.fract() != 0.0 {
            return Err(Error::param(
                "max_iter",
                format!("{max_iter} is not an integer"),
            ));
        }
        Ok(Karcher {
            max_iter: max_iter as usize,
            tol: r.num("tol", 1e-5, 0.0, f64::MAX, false)?,
            with_base: r.flag("with_base", false)?,
            arith: parse_arith(r)?,
        })
    }

    fn points<'a>(&self, x: &'a ChunkIn) -> Vec<&'a [f32]> {
        let mut v = Vec::with_capacity(x.values.len() + 1);
        if self.with_base {
            v.push(x.base);
        }
        v.extend(x.values.iter().copied());
        v
    }

    /// Runs mergekit's iteration on coefficients over the unit vectors, from the Gram matrix of
    /// the points (upper triangle, row by row).
    fn solve(&self, points: usize, gram: &[f64]) -> Solved {
        let tol = self.tol;
        let at = |s: usize, t: usize| {
            let (a, b) = if s <= t { (s, t) } else { (t, s) };
            gram[a * points - a * (a + 1) / 2 + b]
        };
        let norms: Vec<f32> = (0..points).map(|t| at(t, t).sqrt() as f32).collect();
        let valid: Vec<usize> = (0..points).filter(|&t| norms[t] as f64 > tol).collect();
        if valid.is_empty() {
            return Solved {
                norms,
                coef: vec![0.0; points],
            };
        }
        // Inner products of the unit vectors (zero vectors stay zero).
        let unit = |s: usize, t: usize| {
            let d = norms[s] as f64 * norms[t] as f64;
            if d == 0.0 {
                0.0
            } else {
                at(s, t) / d
            }
        };
        let dot = |a: &[f64], b: &[f64]| -> f64 {
            let mut v = 0.0;
            for (s, &x) in a.iter().enumerate() {
                for (t, &y) in b.iter().enumerate() {
                    v += x * y * unit(s, t);
                }
            }
            v
        };
        let alpha = 1.0 / points as f64;
        let alpha_sum: f64 = valid.iter().map(|_| alpha).sum();
        let mut mean = vec![0.0f64; points];
        for &t in &valid {
            mean[t] = alpha / alpha_sum;
        }
        let weights = mean.clone();
        let mn = dot(&mean, &mean).sqrt();
        if mn < tol {
            mean = vec![0.0; points];
            mean[valid[0]] = 1.0;
        } else {
            mean.iter_mut().for_each(|a| *a /= mn);
        }
        for _ in 0..self.max_iter {
            let mut tangent = vec![0.0f64; points];
            for &t in &valid {
                let mut e = vec![0.0; points];
                e[t] = 1.0;
                let c = dot(&mean, &e).clamp(-1.0, 1.0);
                let theta = c.acos();
                if theta < tol {
                    continue;
                }
                let k = weights[t] * theta / theta.sin();
                for s in 0..points {
                    tangent[s] += k * (e[s] - c * mean[s]);
                }
            }
            let tn = dot(&tangent, &tangent).sqrt();
            if tn < tol {
                break;
            }
            for s in 0..points {
                mean[s] = tn.cos() * mean[s] + tn.sin() * tangent[s] / tn;
            }
            let un = dot(&mean, &mean).sqrt();
            if un > tol {
                mean.iter_mut().for_each(|a| *a /= un);
            }
        }
        let scale: f64 = norms.iter().map(|&n| alpha * n as f64).sum();
        Solved {
            coef: mean.iter().map(|&a| (scale * a) as f32).collect(),
            norms,
        }
    }
}

impl Kernel for Karcher {
    fn takes_weights(&self) -> bool {
        false
    }

    fn name(&self) -> &'static str {
        "karcher"
    }

    fn params_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({"compat": "mergekit", "max_iter": self.max_iter,
            "tol": self.tol, "with_base": self.with_base});
        if let Some(d) = self.arith {
            v["arith"] = serde_json::json!(d.name());
        }
        v
    }

    fn inputs(&self) -> Inputs {
        Inputs::Values
    }

    fn reads_deltas(&self) -> bool {
        false
    }

    fn output(&self) -> Output {
        Output::Value
    }

    fn stats_key(&self) -> String {
        match self.arith {
            None => format!("karcher {}", self.with_base),
            // The iteration's own passes: they depend on every parameter.
            Some(_) => self.params_json().to_string(),
        }
    }

    fn passes(&self) -> u64 {
        match self.arith {
            None => 1,
            Some(_) => 2 + 3 * self.max_iter as u64,
        }
    }

    fn next_stage(&self, _t: &TensorPlan, tasks: usize, done: &TensorStats) -> Option<Stage> {
        let points = tasks + usize::from(self.with_base);
        if points < 2 {
            return None;
        }
        if self.arith.is_some() {
            return self.dtype_stage(points, done);
        }
        done.stages.is_empty().then_some(Stage::Sums {
            unit: Unit::Tensor,
            slots: points * (points + 1) / 2,
        })
    }

    /// The Gram matrix of the points (exact products, summed in f64).
    fn accumulate(&self, x: &ChunkIn, st: &TensorStats, s: Scratch, acc: &mut [f64]) {
        crate::simd!({
            let p = self.points(x);
            if let Some(d) = self.arith {
                return self.dtype_accumulate(d, x, &p, st, s, acc);
            }
            let mut k = 0;
            for s in 0..p.len() {
                for t in s..p.len() {
                    acc[k] += super::reduce::dot(p[s], p[t]);
                    k += 1;
                }
            }
        })
    }

    fn merge(&self, x: &ChunkIn, st: &TensorStats, s: Scratch, m: &mut [f32]) {
        crate::simd!({
            let p = self.points(x);
            if p.len() == 1 {
                m.copy_from_slice(p[0]);
                return;
            }
            if let Some(d) = self.arith {
                return self.dtype_merge(d, x, &p, st, s, m);
            }
            let solved = self.solve(p.len(), st.sums(0, 0));
            m.fill(0.0);
            for ((v, &n), &c) in p.iter().zip(&solved.norms).zip(&solved.coef) {
                if n == 0.0 || c == 0.0 {
                    continue;
                }
                for (o, &y) in m.iter_mut().zip(v.iter()) {
                    *o += c * (y / n);
                }
            }
        })
    }
}
