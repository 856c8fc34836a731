//! mergekit's `model_stock` (Jang et al. 2024): per tensor (or per row with `filter_wise`), the
//! mean pairwise cosine of the fine-tunes' offsets from the base sets an interpolation ratio
//! t = T·cos / (1 + (T − 1)·cos) between the base and the fine-tunes' average. A singular
//! denominator (|·| < 1e-6) keeps the base. Norms and dots are one statistics stage.
//!
//! With `arith` (mergekit's `dtype`, bf16 or f16) every torch operation of mergekit's code is
//! rounded to that dtype as it is there: the values as loaded, each offset and product, each
//! reduced norm, dot and mean (summed wider, rounded once, as torch reduces), and every step of
//! t and of `t·average + (1 − t)·w₀`.

use super::kernel::{ChunkIn, Inputs, Kernel, Output, Scratch, Stage, TensorStats, Unit};
use super::mergekit::{parse_arith, round_in};
use super::{reduce, Reader};
use crate::dtype::DType;
use crate::error::Result;
use crate::plan::TensorPlan;

#[derive(Clone, Debug, PartialEq)]
pub struct ModelStock {
    pub filter_wise: bool,
    /// mergekit's dtype when its arithmetic is emulated.
    pub arith: Option<DType>,
}

impl ModelStock {
    pub fn parse(r: &mut Reader) -> Result<ModelStock> {
        Ok(ModelStock {
            filter_wise: r.flag("filter_wise", false)?,
            arith: parse_arith(r)?,
        })
    }

    /// t as mergekit computes it in `d`.
    fn ratio_in(d: DType, tasks: usize, s: &[f64]) -> f32 {
        let r = |v: f32| round_in(d, v);
        let norms: Vec<f32> = s[..tasks].iter().map(|&x| r(x.sqrt() as f32)).collect();
        let mut cos_sum = 0.0f64;
        let mut k = tasks;
        for a in 0..tasks {
            for b in a + 1..tasks {
                let prod = r(norms[a] * norms[b]).max(r(1e-6));
                cos_sum += r(r(s[k] as f32) / prod).clamp(-1.0, 1.0) as f64;
                k += 1;
            }
        }
        let pairs = tasks * (tasks - 1) / 2;
        let cos = r((cos_sum / pairs as f64) as f32);
        let den = r(1.0 + r((tasks - 1) as f32 * cos));
        if den.abs() < 1e-6 {
            0.0
        } else {
            r(r(tasks as f32 * cos) / den)
        }
    }

    fn unit(&self) -> Unit {
        if self.filter_wise {
            Unit::Row
        } else {
            Unit::Tensor
        }
    }

    /// t of one unit from its sums (T squared norms, then the pairs' dots in (a, b > a) order).
    fn ratio(tasks: usize, s: &[f64]) -> f32 {
        let norms: Vec<f32> = s[..tasks].iter().map(|&x| x.sqrt() as f32).collect();
        let mut cos_sum = 0.0f32;
        let mut k = tasks;
        for a in 0..tasks {
            for b in a + 1..tasks {
                let prod = (norms[a] * norms[b]).max(1e-6);
                cos_sum += ((s[k] as f32) / prod).clamp(-1.0, 1.0);
                k += 1;
            }
        }
        let pairs = tasks * (tasks - 1) / 2;
        let cos = cos_sum / pairs as f32;
        let den = 1.0 + (tasks - 1) as f32 * cos;
        if den.abs() < 1e-6 {
            0.0
        } else {
            (tasks as f32 * cos) / den
        }
    }
}

impl Kernel for ModelStock {
    fn takes_weights(&self) -> bool {
        false
    }

    fn name(&self) -> &'static str {
        "model_stock"
    }

    fn params_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({"compat": "mergekit", "filter_wise": self.filter_wise});
        if let Some(d) = self.arith {
            v["arith"] = serde_json::json!(d.name());
        }
        v
    }

    fn inputs(&self) -> Inputs {
        Inputs::Values
    }

    fn output(&self) -> Output {
        Output::Value
    }

    fn check_tasks(&self, tasks: usize) -> Result<()> {
        super::registry::tasks_at_least("model_stock", tasks, 2)
    }

    fn next_stage(&self, _t: &TensorPlan, tasks: usize, done: &TensorStats) -> Option<Stage> {
        done.stages.is_empty().then_some(Stage::Sums {
            unit: self.unit(),
            slots: slots(tasks),
        })
    }

    fn accumulate(&self, x: &ChunkIn, _st: &TensorStats, s: Scratch, acc: &mut [f64]) {
        crate::pipeline::grow(s.a, x.n);
        crate::pipeline::grow(s.b, x.n);
        crate::simd!({
            let tasks = x.tasks();
            let slots = slots(tasks);
            // Segments of the chunk within one unit: the whole chunk, or its pieces of rows.
            let len = match self.unit() {
                Unit::Tensor => x.n,
                _ => x.tensor.row_len(),
            };
            let first = x.row_of(0);
            let mut at = 0;
            while at < x.n {
                let end = match self.unit() {
                    Unit::Tensor => x.n,
                    _ => ((x.start + at) / len + 1) * len - x.start,
                }
                .min(x.n);
                let u = match self.unit() {
                    Unit::Tensor => 0,
                    _ => (x.start + at) / len - first,
                };
                let a = &mut acc[u * slots..(u + 1) * slots];
                if self.arith.is_some() {
                    let scratch = (&mut s.a[..], &mut s.b[..]);
                    with_round!(self.arith, |r| Self::accumulate_in(
                        r,
                        x,
                        (at, end),
                        scratch,
                        a
                    ));
                    at = end;
                    continue;
                }
                let mut k = tasks;
                for p in 0..tasks {
                    let dp = &x.deltas[p][at..end];
                    a[p] += reduce::sum_sq(dp);
                    for q in p + 1..tasks {
                        // (a·b).sum(): the product rounded to f32, as torch forms it.
                        let dq = &x.deltas[q][at..end][..dp.len()];
                        a[k] += reduce::sum(
                            dp.len(),
                            #[inline(always)]
                            |i| (dp[i] * dq[i]) as f64,
                        );
                        k += 1;
                    }
                }
                at = end;
            }
        })
    }

    fn merge(&self, x: &ChunkIn, st: &TensorStats, _s: Scratch, m: &mut [f32]) {
        crate::simd!({
            let (n, tasks) = (x.n, x.tasks());
            let count = tasks as f32;
            // The models' sum task by task over the chunk (each element still adds them in
            // order), so that the loops vectorize.
            let Some(d) = self.arith else {
                // sum(ws) / count, starting from 0 as Python's sum does.
                m.fill(0.0);
                for v in x.values {
                    for (o, &y) in m.iter_mut().zip(&v[..n]) {
                        *o += y;
                    }
                }
                return self.per_unit(
                    x,
                    st,
                    m,
                    |s| ModelStock::ratio(tasks, s),
                    |t, m, base| {
                        for (o, &b) in m.iter_mut().zip(base) {
                            *o = t * (*o / count) + (1.0 - t) * b;
                        }
                    },
                );
            };
            // The rounding chosen once, not per element (`round_in` matches the dtype).
            with_round!(Some(d), |r| {
                // Python's sum from 0: the first value as it is, then each addition rounded.
                for (o, &y) in m.iter_mut().zip(&x.values[0][..n]) {
                    *o = r(y);
                }
                for v in &x.values[1..] {
                    for (o, &y) in m.iter_mut().zip(&v[..n]) {
                        *o = r(*o + r(y));
                    }
                }
                self.per_unit(
                    x,
                    st,
                    m,
                    |s| ModelStock::ratio_in(d, tasks, s),
                    |t, m, base| {
                        for (o, &b) in m.iter_mut().zip(base) {
                            let average = r(*o / count);
                            *o = r(r(t * average) + r(r(1.0 - t) * r(b)));
                        }
                    },
                )
            })
        })
    }
}

impl ModelStock {
    /// The sums of elements `at..end` rounded by `r` (the dtype's rounding): offsets `w − w₀` of
    /// the rounded values, rounded; squared norms (torch squares and sums them wider); dots of
    /// rounded products. Offsets and products go through the scratch `sp`, `sq` before the f64
    /// sums: computed inside them, with the dtype matched per element, the loops stayed scalar
    /// (the statistics pass took 15× the f32 one).
    #[inline(always)]
    fn accumulate_in<R: Fn(f32) -> f32 + Copy>(
        r: R,
        x: &ChunkIn,
        (at, end): (usize, usize),
        (sp, sq): (&mut [f32], &mut [f32]),
        a: &mut [f64],
    ) {
        let tasks = x.tasks();
        let n = end - at;
        let (sp, sq) = (&mut sp[..n], &mut sq[..n]);
        let base = &x.base[at..end];
        let offsets = |p: usize, into: &mut [f32]| {
            for ((o, &v), &b) in into.iter_mut().zip(&x.values[p][at..end]).zip(base) {
                *o = r(r(v) - r(b));
            }
        };
        let mut k = tasks;
        for p in 0..tasks {
            offsets(p, sp);
            a[p] += reduce::sum_sq(sp);
            for q in p + 1..tasks {
                offsets(q, sq);
                for (t, &u) in sq.iter_mut().zip(sp.iter()) {
                    *t = r(u * *t);
                }
                let terms: &[f32] = sq;
                a[k] += reduce::sum(
                    n,
                    #[inline(always)]
                    |i| terms[i] as f64,
                );
                k += 1;
            }
        }
    }

    /// Applies `finish(t, m, base)` to each unit's part of the chunk (the whole chunk, or each
    /// row's piece), t from the unit's sums.
    #[inline(always)]
    fn per_unit(
        &self,
        x: &ChunkIn,
        st: &TensorStats,
        m: &mut [f32],
        ratio: impl Fn(&[f64]) -> f32,
        finish: impl Fn(f32, &mut [f32], &[f32]),
    ) {
        match self.unit() {
            Unit::Tensor => finish(ratio(st.sums(0, 0)), m, &x.base[..x.n]),
            _ => {
                for (u, span) in x.row_spans() {
                    finish(ratio(st.sums(0, u)), &mut m[span.clone()], &x.base[span]);
                }
            }
        }
    }
}

/// Accumulators per unit for T fine-tunes.
pub fn slots(tasks: usize) -> usize {
    tasks + tasks * (tasks - 1) / 2
}
