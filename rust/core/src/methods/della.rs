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

    /// Task `t`'s pruned delta of one chunk of whole rows into `out` (unscaled).
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
        let (mut vals, mut tmp) = (Vec::with_capacity(len), Vec::with_capacity(len));
        let mut rank_of = vec![0u32; len];
        for s0 in (0..x.n).step_by(slab) {
            for k in 0..stride {
                let at = |j: usize| s0 + j * stride + k;
                // Ascending |τ|, equal magnitudes by position (the sort is stable).
                let mag = |j: usize| d[at(j)].abs().to_bits();
                super::reduce::radix_order(len, mag, &mut vals, &mut tmp);
                for (rank, &v) in vals.iter().enumerate() {
                    rank_of[v as u32 as usize] = rank as u32;
                }
                for (j, &rank) in rank_of.iter().enumerate() {
                    let i = at(j);
                    let keep = stream.keep((x.start + i) as u64, probs[rank as usize]);
                    // τ × mask, as mergekit masks (a dropped negative delta is −0).
                    out[i] = d[i] * f32::from(u8::from(keep));
                }
            }
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
        let tasks = x.tasks();
        crate::pipeline::grow(s.a, x.n);
        for t in 0..tasks {
            let out = &mut s.a[..x.n];
            self.prune(x, t, out);
            acc[2 * t] += super::reduce::sum_abs(x.deltas[t]);
            acc[2 * t + 1] += super::reduce::sum_abs(out);
        }
    }

    fn merge(&self, x: &ChunkIn, st: &TensorStats, s: Scratch, m: &mut [f32]) {
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
    }
}
