//! mergekit's `multislerp`: barycentric interpolation of T models (of their deltas from the
//! base when there is one) on the hypersphere, per tensor: project onto the tangent space at the
//! weighted mean direction, average there, map back, and scale by the weighted mean norm.
//! Four statistics stages: the norms, the mean's norm, the dots with the mean, the tangent's
//! norm. One model is returned as it is.

use super::kernel::{ChunkIn, Inputs, Kernel, Output, Scratch, Stage, TensorStats, Unit};
use super::{reduce, Reader};
use crate::error::{Error, Result};
use crate::plan::TensorPlan;

#[derive(Clone, Debug, PartialEq)]
pub struct MultiSlerp {
    pub normalize_weights: bool,
    pub eps: f64,
    pub relative: bool,
}

/// What the kernel knows of a tensor at a point in its stages.
struct Known {
    norms: Vec<f32>,
    weights: Vec<f32>,
    mean_norm: Option<f32>,
    dots: Option<Vec<f32>>,
}

impl MultiSlerp {
    pub fn parse(r: &mut Reader) -> Result<MultiSlerp> {
        Ok(MultiSlerp {
            normalize_weights: r.flag("normalize_weights", true)?,
            eps: r.num("eps", 1e-8, 0.0, 1.0, false)?,
            relative: r.flag("relative", true)?,
        })
    }

    fn eps(&self) -> f32 {
        self.eps as f32
    }

    fn inputs_of<'a>(&self, x: &'a ChunkIn) -> &'a [&'a [f32]] {
        if self.relative {
            x.deltas
        } else {
            x.values
        }
    }

    fn known(&self, x: &ChunkIn, st: &TensorStats) -> Known {
        let mut weights = x.weights.to_vec();
        if self.normalize_weights {
            let total = weights.iter().fold(0.0f32, |a, &b| a + b);
            for w in &mut weights {
                *w /= total;
            }
        }
        let norms = st.sums(0, 0).iter().map(|&s| s.sqrt() as f32).collect();
        Known {
            norms,
            weights,
            mean_norm: (st.stages.len() > 1).then(|| st.sums(1, 0)[0].sqrt() as f32),
            dots: (st.stages.len() > 2).then(|| st.sums(2, 0).iter().map(|&s| s as f32).collect()),
        }
    }

    /// The weighted mean of the unit vectors over the chunk, into `out` (task by task, as
    /// torch's sum over the stacked tensors adds them).
    fn mean_into(&self, k: &Known, v: &[&[f32]], out: &mut [f32]) {
        out.fill(0.0);
        for ((x, &n), &w) in v.iter().zip(&k.norms).zip(&k.weights) {
            let d = n + self.eps();
            for (o, &y) in out.iter_mut().zip(x.iter()) {
                *o += y / d * w;
            }
        }
    }

    /// The normalised mean into `mean` and the tangent-space result into `tangent`.
    fn tangent_into(&self, k: &Known, v: &[&[f32]], mean: &mut [f32], tangent: &mut [f32]) {
        self.mean_into(k, v, mean);
        let mn = k.mean_norm.expect("the mean's norm");
        mean.iter_mut().for_each(|m| *m /= mn);
        let dots = k.dots.as_ref().expect("the dots");
        tangent.fill(0.0);
        for (((x, &n), &w), &d) in v.iter().zip(&k.norms).zip(&k.weights).zip(dots) {
            let e = n + self.eps();
            for ((o, &y), &m) in tangent.iter_mut().zip(x.iter()).zip(mean.iter()) {
                *o += (y / e - d * m) * w;
            }
        }
    }

    fn fallback(&self, k: &Known) -> bool {
        k.mean_norm.is_some_and(|n| n < self.eps())
    }
}

impl Kernel for MultiSlerp {
    fn name(&self) -> &'static str {
        "multislerp"
    }

    fn params_json(&self) -> serde_json::Value {
        serde_json::json!({"compat": "mergekit", "normalize_weights": self.normalize_weights,
            "eps": self.eps, "relative": self.relative})
    }

    fn inputs(&self) -> Inputs {
        Inputs::relative(self.relative)
    }

    fn output(&self) -> Output {
        Output::relative(self.relative)
    }

    fn passes(&self) -> u64 {
        4
    }

    fn check_stats(&self, t: &TensorPlan, tasks: usize, st: &TensorStats) -> Result<()> {
        let cancelled = st.stages.len() > 1 && (st.sums(1, 0)[0].sqrt() as f32) < self.eps();
        if tasks > 2 && cancelled {
            return Err(Error::param(
                "weights",
                format!("multislerp: tensor '{}': the weighted sum of the models' directions is zero (antipodal models with balancing weights); use other weights", t.name),
            ));
        }
        Ok(())
    }

    fn next_stage(&self, t: &TensorPlan, tasks: usize, done: &TensorStats) -> Option<Stage> {
        let sums = |slots| {
            Some(Stage::Sums {
                unit: Unit::Tensor,
                slots,
            })
        };
        let _ = t;
        match done.stages.len() {
            _ if tasks == 1 => None,
            0 => sums(tasks),
            1 => sums(1),
            // The linear fallback needs no more (checked in `merge`).
            2 if (done.sums(1, 0)[0].sqrt() as f32) < self.eps() => None,
            2 => sums(tasks),
            3 => sums(1),
            _ => None,
        }
    }

    fn accumulate(&self, x: &ChunkIn, st: &TensorStats, s: Scratch, acc: &mut [f64]) {
        let v = self.inputs_of(x);
        if st.stages.is_empty() {
            for (a, d) in acc.iter_mut().zip(v) {
                *a += reduce::sum_sq(d);
            }
            return;
        }
        let k = self.known(x, st);
        crate::pipeline::grow(s.a, x.n);
        crate::pipeline::grow(s.b, x.n);
        let (mean, tangent) = (&mut s.a[..x.n], &mut s.b[..x.n]);
        match st.stages.len() {
            1 => {
                self.mean_into(&k, v, mean);
                acc[0] += reduce::sum_sq(mean);
            }
            2 => {
                self.mean_into(&k, v, mean);
                let mn = k.mean_norm.expect("norm");
                mean.iter_mut().for_each(|m| *m /= mn);
                for ((a, d), &n) in acc.iter_mut().zip(v).zip(&k.norms) {
                    let e = n + self.eps();
                    *a += reduce::sum(x.n, |i| ((d[i] / e) * mean[i]) as f64);
                }
            }
            _ => {
                self.tangent_into(&k, v, mean, tangent);
                acc[0] += reduce::sum_sq(tangent);
            }
        }
    }

    fn merge(&self, x: &ChunkIn, st: &TensorStats, s: Scratch, m: &mut [f32]) {
        let v = self.inputs_of(x);
        if x.tasks() == 1 {
            m.copy_from_slice(v[0]);
            return;
        }
        let k = self.known(x, st);
        if self.fallback(&k) {
            // Two models: their weighted sum (the caller refused more before any work).
            for (i, o) in m.iter_mut().enumerate() {
                *o = v[0][i] * k.weights[0] + v[1][i] * k.weights[1];
            }
            return;
        }
        let tn = (st.sums(3, 0)[0].sqrt() as f32) + self.eps();
        let (c, sn) = (tn.cos(), tn.sin() / tn);
        let avg = k
            .norms
            .iter()
            .zip(&k.weights)
            .fold(0.0f32, |a, (&n, &w)| a + n * w);
        crate::pipeline::grow(s.a, x.n);
        crate::pipeline::grow(s.b, x.n);
        let (mean, tangent) = (&mut s.a[..x.n], &mut s.b[..x.n]);
        self.tangent_into(&k, v, mean, tangent);
        for ((o, &mean), &t) in m.iter_mut().zip(mean.iter()).zip(tangent.iter()) {
            *o = (mean * c + t * sn) * avg;
        }
    }
}
