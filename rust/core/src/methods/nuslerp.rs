//! mergekit's `nuslerp`: spherical interpolation of two models at t = w_2 / (w_1 + w_2)
//! (0.5 when the weights sum to about 0), of their deltas from the base when there is one.
//! Vectors are the whole tensor (`nuslerp_flatten`, the default), its rows, or its columns
//! (`nuslerp_row_wise`); norms and the dot per vector are two statistics stages.
//!
//! With `arith` (mergekit's `dtype`, bf16 or f16) every torch operation of mergekit's code is
//! rounded to that dtype as it is there: each delta, each norm and the dot (reduced wider,
//! rounded once), each normalized element and product, the angle's steps and the blend.

use super::kernel::{ChunkIn, Inputs, Kernel, Output, Scratch, Stage, TensorStats, Unit};
use super::mergekit::{parse_arith, round_opt};
use super::{reduce, Reader};
use crate::dtype::DType;
use crate::error::Result;
use crate::plan::TensorPlan;

#[derive(Clone, Debug, PartialEq)]
pub struct NuSlerp {
    pub row_wise: bool,
    pub flatten: bool,
    /// Of the deltas from the base (mergekit with a base_model), else of the models' values.
    pub relative: bool,
    /// mergekit's dtype when its arithmetic is emulated.
    pub arith: Option<DType>,
}

impl NuSlerp {
    pub fn parse(r: &mut Reader) -> Result<NuSlerp> {
        Ok(NuSlerp {
            row_wise: r.flag("nuslerp_row_wise", false)?,
            flatten: r.flag("nuslerp_flatten", true)?,
            relative: r.flag("relative", true)?,
            arith: parse_arith(r)?,
        })
    }

    #[inline(always)]
    fn r(&self, v: f32) -> f32 {
        round_opt(self.arith, v)
    }

    /// Element `i` of the pair as mergekit holds it (a delta rounded as `t − base` is in `arith`;
    /// values are already loaded in it).
    #[inline(always)]
    fn at(&self, (a, b): (&[f32], &[f32]), i: usize) -> (f32, f32) {
        if self.relative {
            (self.r(a[i]), self.r(b[i]))
        } else {
            (a[i], b[i])
        }
    }

    fn unit(&self) -> Unit {
        match (self.flatten, self.row_wise) {
            (true, _) => Unit::Tensor,
            (false, false) => Unit::Row,
            (false, true) => Unit::Column,
        }
    }

    /// t as mergekit computes it (in f64, from the per-model weights).
    fn t(&self, x: &ChunkIn) -> f64 {
        let (a, b) = (x.weights[0] as f64, x.weights[1] as f64);
        let total = a + b;
        if total.abs() < 1e-6 {
            0.5
        } else {
            b / total
        }
    }

    #[inline(always)]
    fn pair<'a>(&self, x: &'a ChunkIn) -> (&'a [f32], &'a [f32]) {
        if self.relative {
            (x.deltas[0], x.deltas[1])
        } else {
            (x.values[0], x.values[1])
        }
    }

    /// A unit's sums in the dtype's arithmetic (stage 0 the squared norms, stage 1 the dot of
    /// the normalized pair), with `r` its rounding. The rounded terms go through `buf` before
    /// the f64 sums: rounded inside them, the loops stayed scalar.
    #[inline(always)]
    fn arith_sums<R: Fn(f32) -> f32 + Copy>(
        &self,
        r: R,
        st: &TensorStats,
        u: usize,
        (a, b): (&[f32], &[f32]),
        buf: &mut Vec<f32>,
        acc: &mut [f64],
    ) {
        let n = a.len();
        crate::pipeline::grow(buf, n);
        let (buf, b) = (&mut buf[..n], &b[..n]);
        // An element as mergekit holds it (a delta rounded as `t − base` is in the dtype;
        // values are already loaded in it).
        let load = |v: f32| if self.relative { r(v) } else { v };
        if st.stages.is_empty() {
            for (slot, v) in [a, b].into_iter().enumerate() {
                for (o, &x) in buf.iter_mut().zip(v) {
                    *o = load(x);
                }
                acc[slot] += reduce::sum_sq(buf);
            }
        } else {
            let (p, q) = self.norms(st, u);
            for ((o, &x), &y) in buf.iter_mut().zip(a).zip(b) {
                *o = r(r(load(x) / p) * r(load(y) / q));
            }
            let buf: &[f32] = buf;
            acc[0] += reduce::sum(n, |i| buf[i] as f64);
        }
    }

    /// The two norms of unit `u`, rounded and clamped (at 1e-7) as mergekit's `_normalize`.
    #[inline(always)]
    fn norms(&self, st: &TensorStats, u: usize) -> (f32, f32) {
        let s = st.sums(0, u);
        let floor = self.r(1e-7);
        let n = |v: f64| self.r(v.sqrt() as f32).max(floor);
        (n(s[0]), n(s[1]))
    }
}

impl Kernel for NuSlerp {
    fn name(&self) -> &'static str {
        "nuslerp"
    }

    fn params_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({"compat": "mergekit", "nuslerp_row_wise": self.row_wise,
            "nuslerp_flatten": self.flatten, "relative": self.relative});
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

    fn check_tasks(&self, tasks: usize) -> Result<()> {
        super::registry::tasks_exactly("nuslerp", tasks, 2)
    }

    fn stats_key(&self) -> String {
        format!(
            "nuslerp {:?} {} {} {:?}",
            self.unit(),
            self.relative,
            self.row_wise,
            self.arith
        )
    }

    fn passes(&self) -> u64 {
        2
    }

    fn next_stage(&self, _t: &TensorPlan, _tasks: usize, done: &TensorStats) -> Option<Stage> {
        (done.stages.len() < 2).then_some(Stage::Sums {
            unit: self.unit(),
            slots: if done.stages.is_empty() { 2 } else { 1 },
        })
    }

    fn accumulate(&self, x: &ChunkIn, st: &TensorStats, s: Scratch, acc: &mut [f64]) {
        crate::simd!({
            let buf = s.a;
            let (a, b) = self.pair(x);
            let unit = self.unit();
            let slots = if st.stages.is_empty() { 2 } else { 1 };
            if unit == Unit::Column {
                // Units interleave: element by element.
                for i in 0..x.n {
                    let u = unit.of(x.tensor, x.start + i);
                    let (ai, bi) = self.at((a, b), i);
                    if st.stages.is_empty() {
                        acc[2 * u] += (ai as f64) * (ai as f64);
                        acc[2 * u + 1] += (bi as f64) * (bi as f64);
                    } else {
                        let (p, q) = self.norms(st, u);
                        acc[u] += self.r(self.r(ai / p) * self.r(bi / q)) as f64;
                    }
                }
                return;
            }
            // The whole chunk, or its pieces of rows.
            let first = x.row_of(0);
            let mut at = 0;
            while at < x.n {
                let (u, end) = match unit {
                    Unit::Tensor => (0, x.n),
                    _ => {
                        let row = x.tensor.row_len();
                        let r = (x.start + at) / row;
                        (r, ((r + 1) * row - x.start).min(x.n))
                    }
                };
                // Both cut to the same length: the sums vectorize (see `reduce`).
                let (sa, sb) = (&a[at..end], &b[at..end]);
                let o = (u - if unit == Unit::Tensor { 0 } else { first }) * slots;
                if self.arith.is_some() {
                    with_round!(self.arith, |r| self.arith_sums(
                        r,
                        st,
                        u,
                        (sa, sb),
                        buf,
                        &mut acc[o..]
                    ));
                } else if st.stages.is_empty() {
                    acc[o] += reduce::sum_sq(sa);
                    acc[o + 1] += reduce::sum_sq(sb);
                } else {
                    let (p, q) = self.norms(st, u);
                    acc[o] += reduce::sum(
                        sa.len(),
                        #[inline(always)]
                        |i| ((sa[i] / p) * (sb[i] / q)) as f64,
                    );
                }
                at = end;
            }
        })
    }

    fn merge(&self, x: &ChunkIn, st: &TensorStats, _s: Scratch, m: &mut [f32]) {
        // The rounding picked once, outside the loops (a per-element match kept them scalar).
        with_round!(self.arith, |r| crate::simd!(self.merge_in(r, x, st, m)))
    }
}

/// A unit's blend: the coefficients of a and b, and the divisor (None when colinear).
type Coef = (f32, f32, Option<f32>);

impl NuSlerp {
    /// Unit `u`'s coefficients, from its cosine, as mergekit computes them in the dtype.
    #[inline(always)]
    fn coef<R: Fn(f32) -> f32 + Copy>(&self, r: R, st: &TensorStats, u: usize, t: f64) -> Coef {
        let (t32, rest32) = (t as f32, (1.0 - t) as f32);
        let cos = r(st.sums(1, u)[0] as f32).clamp(-1.0, 1.0);
        let colinear = r(1.0 - r(cos * cos)) <= r(1e-16f32);
        if colinear {
            (rest32, t32, None)
        } else {
            let theta = r(cos.acos());
            (
                r(r(rest32 * theta).sin()),
                r(r(t32 * theta).sin()),
                Some(r(theta.sin())),
            )
        }
    }

    /// One unit's elements: `load` gives an element as mergekit holds it.
    #[inline(always)]
    fn blend<R: Fn(f32) -> f32 + Copy, L: Fn(f32) -> f32 + Copy>(
        r: R,
        load: L,
        (ca, cb, div): Coef,
        m: &mut [f32],
        a: &[f32],
        b: &[f32],
    ) {
        // `for` loops, not `for_each`: its `fold` was compiled apart, outside the wide copy
        // (`simd!`), in 4-lane SSE.
        let n = m.len();
        let (a, b) = (&a[..n], &b[..n]);
        match div {
            None => {
                for ((o, &a), &b) in m.iter_mut().zip(a).zip(b) {
                    *o = r(r(ca * load(a)) + r(cb * load(b)));
                }
            }
            Some(s) => {
                for ((o, &a), &b) in m.iter_mut().zip(a).zip(b) {
                    *o = r(r(r(ca * load(a)) + r(cb * load(b))) / s);
                }
            }
        }
    }

    #[inline(always)]
    fn merge_in<R: Fn(f32) -> f32 + Copy>(
        &self,
        r: R,
        x: &ChunkIn,
        st: &TensorStats,
        m: &mut [f32],
    ) {
        let t = self.t(x);
        let (a, b) = self.pair(x);
        let unit = self.unit();
        if unit == Unit::Column {
            // Units interleave: element by element.
            let mut coef = (usize::MAX, (0.0, 0.0, None));
            for (i, o) in m.iter_mut().enumerate() {
                let u = unit.of(x.tensor, x.start + i);
                if coef.0 != u {
                    coef = (u, self.coef(r, st, u, t));
                }
                let (a, b) = self.at((a, b), i);
                Self::blend(r, |v| v, coef.1, std::slice::from_mut(o), &[a], &[b]);
            }
            return;
        }
        // The whole chunk, or its pieces of rows.
        let whole = [(0, 0..x.n)];
        let spans: Box<dyn Iterator<Item = (usize, std::ops::Range<usize>)>> = match unit {
            Unit::Tensor => Box::new(whole.into_iter()),
            _ => Box::new(x.row_spans()),
        };
        for (u, span) in spans {
            let c = self.coef(r, st, u, t);
            let (m, a, b) = (&mut m[span.clone()], &a[span.clone()], &b[span]);
            if self.relative {
                Self::blend(r, r, c, m, a, b);
            } else {
                Self::blend(r, |v| v, c, m, a, b);
            }
        }
    }
}
