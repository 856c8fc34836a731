//! mergekit's `ram` and `ramplus_tl` (Reinforced Agent Merging): per element, a delta that only
//! one fine-tune changes (|τ| > epsilon) is kept whole, one that several change is averaged
//! over them. `ramplus_tl` scales each model's unique deltas by 1 + r·clamp(ρ, 0, α), where ρ
//! is its count of shared over unique changed elements in the tensor (one statistics stage).
//! With `arith` (mergekit's bf16/f16 `dtype`) the deltas, the epsilon they are compared with,
//! each averaged delta and (`ram`) the sum over the models and `base + merged` are rounded to it
//! as mergekit's run rounds them; `ramplus_tl`'s λ makes the rest f32 there (a bf16 tensor times
//! an f32 one), and so here.

use super::kernel::{ChunkIn, Kernel, Output, Scratch, Stage, TensorStats, Unit};
use super::mergekit::parse_arith;
use super::Reader;
use crate::dtype::DType;
use crate::error::Result;
use crate::plan::TensorPlan;

#[derive(Clone, Debug, PartialEq)]
pub struct Ram {
    pub plus: bool,
    pub epsilon: f64,
    pub r: f64,
    pub alpha: f64,
    /// mergekit's dtype when its arithmetic is emulated.
    pub arith: Option<DType>,
}

impl Ram {
    pub fn parse(r: &mut Reader, plus: bool) -> Result<Ram> {
        let epsilon = r.num("epsilon", 1e-5, 0.0, f64::MAX, false)?;
        let (rr, alpha) = if plus {
            (
                r.num("r", 0.1, f64::MIN, f64::MAX, false)?,
                r.num("alpha", 0.2, f64::MIN, f64::MAX, false)?,
            )
        } else {
            (0.1, 0.2)
        };
        Ok(Ram {
            plus,
            epsilon,
            r: rr,
            alpha,
            arith: parse_arith(r)?,
        })
    }

    /// Per element of the chunk: how many fine-tunes change it (|τ| > eps, τ as the dtype
    /// holds it), into `out`.
    #[inline(always)]
    fn counts<R: Fn(f32) -> f32 + Copy>(r: R, eps: f32, x: &ChunkIn, out: &mut [f32]) {
        out.fill(0.0);
        for d in x.deltas {
            for (c, &v) in out.iter_mut().zip(d.iter()) {
                *c += f32::from(u8::from(r(v).abs() > eps));
            }
        }
    }

    /// Per task: elements it changes that others change too, and that only it changes.
    #[inline(always)]
    fn accumulate_in<R: Fn(f32) -> f32 + Copy>(
        &self,
        r: R,
        x: &ChunkIn,
        s: Scratch,
        acc: &mut [f64],
    ) {
        // torch compares a bf16 tensor with the scalar rounded to bf16.
        let eps = r(self.epsilon as f32);
        let tasks = x.tasks();
        crate::pipeline::grow(s.a, x.n);
        let counts = &mut s.a[..x.n];
        Ram::counts(r, eps, x, counts);
        for (t, d) in x.deltas.iter().enumerate() {
            let (mut shared, mut unique) = (0u64, 0u64);
            for (&v, &c) in d.iter().zip(counts.iter()) {
                let on = r(v).abs() > eps;
                shared += u64::from(on & (c > 1.0));
                unique += u64::from(on & (c == 1.0));
            }
            acc[t] += shared as f64;
            acc[tasks + t] += unique as f64;
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
        let eps = r(self.epsilon as f32);
        let tasks = x.tasks();
        let lambdas: Vec<f32> = (0..tasks)
            .map(|t| {
                if !self.plus {
                    return 1.0;
                }
                let s = st.sums(0, 0);
                let rho = s[t] as f32 / (s[tasks + t] as f32).max(self.epsilon as f32);
                1.0 + self.r as f32 * rho.clamp(0.0, self.alpha as f32)
            })
            .collect();
        crate::pipeline::grow(s.a, x.n);
        let counts = &mut s.a[..x.n];
        Ram::counts(r, eps, x, counts);
        m.fill(0.0);
        // Task by task, as torch sums the stacked terms: z·unique(·λ) + z·overlap / count (in
        // the dtype: only one of the two is nonzero, so their sum is exact; ramplus_tl's λ makes
        // it f32).
        for (d, &lam) in x.deltas.iter().zip(&lambdas) {
            for ((o, &v), &c) in m.iter_mut().zip(d.iter()).zip(counts.iter()) {
                let v = r(v);
                let z = v * f32::from(u8::from(v.abs() > eps));
                let (unique, overlap) =
                    (f32::from(u8::from(c == 1.0)), f32::from(u8::from(c > 1.0)));
                let kept = if self.plus {
                    z * unique * lam
                } else {
                    z * unique
                };
                *o += kept + r(z * overlap / c.max(1.0));
            }
        }
        if let (Some(_), false) = (self.arith, self.plus) {
            // torch's sum over the models, accumulated in f32 and rounded once; then the base.
            for (o, &b) in m.iter_mut().zip(x.base) {
                *o = r(b + r(*o));
            }
        }
    }
}

impl Kernel for Ram {
    fn takes_weights(&self) -> bool {
        false
    }

    fn name(&self) -> &'static str {
        if self.plus {
            "ramplus_tl"
        } else {
            "ram"
        }
    }

    fn params_json(&self) -> serde_json::Value {
        let mut v = if self.plus {
            serde_json::json!({"compat": "mergekit", "epsilon": self.epsilon, "r": self.r, "alpha": self.alpha})
        } else {
            serde_json::json!({"compat": "mergekit", "epsilon": self.epsilon})
        };
        if let Some(d) = self.arith {
            v["arith"] = serde_json::json!(d.name());
        }
        v
    }

    /// `ram` in a dtype rounds `base + merged`: it writes the values.
    fn output(&self) -> Output {
        if self.arith.is_some() && !self.plus {
            Output::Value
        } else {
            Output::Delta
        }
    }

    fn needs_statistics(&self) -> bool {
        self.plus
    }

    fn stats_key(&self) -> String {
        format!("ram {} {:?}", self.epsilon, self.arith)
    }

    fn next_stage(&self, _t: &TensorPlan, tasks: usize, done: &TensorStats) -> Option<Stage> {
        (self.plus && done.stages.is_empty()).then_some(Stage::Sums {
            unit: Unit::Tensor,
            slots: 2 * tasks,
        })
    }

    /// Per task: elements it changes that others change too, and that only it changes.
    fn accumulate(&self, x: &ChunkIn, _st: &TensorStats, s: Scratch, acc: &mut [f64]) {
        crate::simd!({ with_round!(self.arith, |r| self.accumulate_in(r, x, s, acc)) })
    }

    fn merge(&self, x: &ChunkIn, st: &TensorStats, s: Scratch, m: &mut [f32]) {
        crate::simd!({ with_round!(self.arith, |r| self.merge_in(r, x, st, s, m)) })
    }
}
