//! mergekit's task-arithmetic family (`compat = "mergekit"`), reproducing mergekit's own
//! computation (`generalized_task_arithmetic.py`, `sparsify.py`) where it differs from the
//! papers' code the rest of this crate follows: sparsification is per tensor, the weights apply
//! after it, the majority sign is + where the weighted sum is ≥ 0, only deltas of that sign are
//! kept, and `normalize` divides by Σ w_t over the kept ones. Keeping the family in one
//! parameterised kernel mirrors mergekit, where the methods are the same code with switches.

use super::breadcrumbs::{add_task, set_piece};
use super::elementwise;
use super::kernel::{ChunkIn, Inputs, Kernel, Output, Scratch, Stage, TensorStats, Unit};
use super::mergekit_arith::mix_in;
use super::{int_frac, PerTask, Reader, Rows};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::pipeline::grow;
use crate::plan::TensorPlan;
use crate::rng::Stream;

/// mergekit's method names this crate reproduces.
pub const NAMES: &str =
    "linear, task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties";

/// How each delta is sparsified before weighting (mergekit's `SparsificationMethod`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sparsify {
    None,
    /// Keep the max(1, int(density·n)) largest |τ| of the tensor.
    Magnitude,
    /// Keep each element with probability density (DARE).
    Random,
    /// Drop the int(gamma·n) largest, keep the next int(density·n) (Breadcrumbs).
    Outliers,
}

/// One configuration of mergekit's generalized task arithmetic.
#[derive(Clone, Debug, PartialEq)]
pub struct Gta {
    pub name: &'static str,
    pub sparsify: Sparsify,
    /// Sign consensus ("sum"): keep only deltas whose sign matches the weighted majority.
    pub consensus: bool,
    pub normalize: bool,
    /// Rescale each sparsified delta to the L1 norm it had before.
    pub rescale: bool,
    pub density: PerTask,
    pub gamma: PerTask,
    /// mergekit's `dtype` when it is bf16 or f16: its arithmetic in that dtype, rounded after
    /// every torch operation as mergekit's CPU run does (`None`: f32 throughout).
    pub arith: Option<DType>,
    /// mergekit's `lambda`, applied here (in `arith`) when the arithmetic is emulated.
    pub lambda: f32,
}

impl Gta {
    /// mergekit's registry: each name with its defaults.
    pub fn named(name: &str) -> Option<Gta> {
        let (name, sparsify, consensus, normalize, rescale) = match name {
            "task_arithmetic" => ("task_arithmetic", Sparsify::None, false, false, false),
            "ties" => ("ties", Sparsify::Magnitude, true, true, false),
            "dare_ties" => ("dare_ties", Sparsify::Random, true, false, true),
            "dare_linear" => ("dare_linear", Sparsify::Random, false, false, true),
            "breadcrumbs" => ("breadcrumbs", Sparsify::Outliers, false, false, false),
            "breadcrumbs_ties" => ("breadcrumbs_ties", Sparsify::Outliers, true, false, false),
            _ => return None,
        };
        Some(Gta {
            name,
            sparsify,
            consensus,
            normalize,
            rescale,
            density: PerTask::All(1.0),
            gamma: PerTask::All(0.01),
            arith: None,
            lambda: 1.0,
        })
    }

    /// Builds method `name` of the family with mergekit's parameters and defaults.
    pub fn parse(name: &str, r: &mut Reader) -> Result<Gta> {
        let mut g = Gta::named(name).expect("a GTA method");
        g.normalize = r.flag("normalize", g.normalize)?;
        g.rescale = r.flag("rescale", g.rescale)?;
        // An int8 mask changes the mask's dtype, never its values.
        r.flag("int8_mask", false)?;
        if g.sparsify != Sparsify::None {
            g.density = r.frac("density", 1.0, 0.0, 1.0, false)?;
        }
        if g.sparsify == Sparsify::Outliers {
            g.gamma = r.frac("gamma", 0.01, 0.0, 1.0, false)?;
        }
        g.arith = parse_arith(r)?;
        if r.params.contains_key("lambda") && g.arith.is_none() {
            return Err(Error::param(
                "lambda",
                "is the kernel's λ only with arith (bf16 or f16); otherwise give lam",
            ));
        }
        g.lambda = r.num("lambda", 1.0, f32::MIN as f64, f32::MAX as f64, false)? as f32;
        Ok(g)
    }

    /// Whether the L1 rescale's statistics stage runs.
    fn rescales(&self) -> bool {
        self.rescale && self.sparsify != Sparsify::None
    }

    /// Sparsifies task `k`'s chunk of `src` into `out` as mergekit would (unweighted).
    fn sparsify_into(
        &self,
        x: &ChunkIn,
        st: &TensorStats,
        k: usize,
        keys: &mut Vec<u64>,
        out: &mut [f32],
    ) {
        let src = x.deltas[k];
        match self.sparsify {
            Sparsify::None => out.copy_from_slice(src),
            Sparsify::Random => {
                if self.sparsifies(k) {
                    let stream = Stream::new(x.seed, k as u64, &x.tensor.name);
                    let (first, density) = (x.start as u64, self.density.get(k));
                    // In the widest copy (`simd!`): the draws' 64-bit products vectorise there.
                    crate::simd!(elementwise::dare_into(
                        src, out, &stream, first, density, false
                    ));
                } else {
                    out.copy_from_slice(src);
                }
            }
            Sparsify::Magnitude | Sparsify::Outliers => match st.cuts.get(&x.start) {
                Some(cuts) => match &cuts[k] {
                    Some(p) => crate::simd!(set_piece(src, p, out)),
                    None => out.fill(0.0),
                },
                None => {
                    out.fill(0.0);
                    let unit = x.tensor.numel.max(1);
                    crate::simd!(add_task(
                        src,
                        (unit, false),
                        self.kept_ranks(unit, k),
                        keys,
                        out
                    ));
                }
            },
        }
    }

    /// Whether sparsification ranks magnitudes over the tensor.
    pub fn ranks(&self) -> bool {
        matches!(self.sparsify, Sparsify::Magnitude | Sparsify::Outliers)
    }

    /// Whether task `t`'s delta is sparsified at all (mergekit returns it as it is at
    /// density ≥ 1).
    pub fn sparsifies(&self, t: usize) -> bool {
        self.sparsify != Sparsify::None && self.density.get(t) < 1.0
    }

    /// The descending ranks [g, g + k) that task `t` keeps of a tensor of `n` elements.
    pub fn kept_ranks(&self, n: usize, t: usize) -> Option<(u64, u64)> {
        if !self.sparsifies(t) {
            return Some((0, n as u64));
        }
        let density = self.density.get(t);
        let (g, k) = match self.sparsify {
            Sparsify::Magnitude => {
                if density <= 0.0 || n == 0 {
                    return None;
                }
                (0, int_frac(n, density).max(1))
            }
            Sparsify::Outliers => {
                // mergekit: n_bot = max(0, n − target − n_top) from the bottom, keeping target;
                // from the top that drops min(n_top, n − target).
                let target = int_frac(n, density);
                let top = int_frac(n, self.gamma.get(t)).min(n - target);
                (top, target)
            }
            Sparsify::None | Sparsify::Random => (0, n),
        };
        (k > 0).then_some((g as u64, k as u64))
    }

    pub fn params_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "compat": "mergekit",
            "normalize": self.normalize,
            "rescale": self.rescale,
        });
        if self.sparsify != Sparsify::None {
            v["density"] = self.density.json();
        }
        if self.sparsify == Sparsify::Outliers {
            v["gamma"] = self.gamma.json();
        }
        if let Some(d) = self.arith {
            v["arith"] = serde_json::json!(d.name());
            v["lambda"] = serde_json::json!(self.lambda);
        }
        v
    }
}

/// `arith`: mergekit's `dtype` when its arithmetic is emulated (bf16 or f16; f32 is none).
pub(super) fn parse_arith(r: &mut super::Reader) -> Result<Option<DType>> {
    r.used.push("arith");
    match r.params.get("arith") {
        None => Ok(None),
        Some(super::Param::Str(s)) => match DType::parse(s) {
            Some(DType::F32) => Ok(None),
            Some(d @ (DType::BF16 | DType::F16)) => Ok(Some(d)),
            _ => Err(Error::param(
                "arith",
                format!("'{s}' is not one of f32, bf16, f16 (mergekit's dtype)"),
            )),
        },
        Some(other) => Err(Error::param(
            "arith",
            format!("expected a dtype name, got {other:?}"),
        )),
    }
}

/// `v` as an emulated arithmetic leaves it: rounded to `arith` when there is one, else as is.
#[inline(always)]
pub(super) fn round_opt(arith: Option<DType>, v: f32) -> f32 {
    match arith {
        Some(d) => round_in(d, v),
        None => v,
    }
}

/// `v` rounded to `d` (nearest even) and back: the value a torch operation in `d` leaves.
#[inline]
pub(super) fn round_in(d: DType, v: f32) -> f32 {
    crate::dtype::round_to(d, v)
}

impl Kernel for Gta {
    fn name(&self) -> &'static str {
        self.name
    }

    /// The emulated arithmetic ends with mergekit's `base + mixed_delta` in its dtype (the base
    /// rounded to it too), so it gives the merged values.
    fn output(&self) -> Output {
        if self.arith.is_some() {
            Output::Value
        } else {
            Output::Delta
        }
    }

    /// The emulated arithmetic forms the deltas from the values rounded to its dtype.
    fn inputs(&self) -> Inputs {
        if self.arith.is_some() {
            Inputs::Values
        } else {
            Inputs::Deltas
        }
    }

    fn params_json(&self) -> serde_json::Value {
        Gta::params_json(self)
    }

    fn rows(&self) -> Rows {
        if self.ranks() {
            Rows::Tensor
        } else {
            Rows::None
        }
    }

    fn kept_ranks(&self, n: usize, t: usize) -> Option<(u64, u64)> {
        Gta::kept_ranks(self, n, t)
    }

    fn check_tasks(&self, tasks: usize) -> Result<()> {
        self.density.check_len("density", tasks)?;
        self.gamma.check_len("gamma", tasks)
    }

    fn needs_statistics(&self) -> bool {
        self.sparsify != Sparsify::None
    }

    fn passes(&self) -> u64 {
        u64::from(self.rescales())
    }

    /// The L1 rescale: per task Σ|τ| and Σ|sparsified τ| over the tensor.
    fn next_stage(&self, _t: &TensorPlan, tasks: usize, done: &TensorStats) -> Option<Stage> {
        (self.rescales() && done.stages.is_empty()).then_some(Stage::Sums {
            unit: Unit::Tensor,
            slots: 2 * tasks,
        })
    }

    /// The L1 sums in eight lanes (`reduce`), in the wide copies: one f64 chain per sum was most
    /// of this pass (a dependent add per element).
    fn accumulate(&self, x: &ChunkIn, st: &TensorStats, s: Scratch, acc: &mut [f64]) {
        grow(s.a, x.n);
        for (k, d) in x.deltas.iter().enumerate() {
            let o = &mut s.a[..x.n];
            self.sparsify_into(x, st, k, s.keys, o);
            acc[2 * k] += crate::simd!(super::reduce::sum_abs(d));
            acc[2 * k + 1] += crate::simd!(super::reduce::sum_abs(o));
        }
    }

    /// Sparsified, the emulated arithmetic reads both; loaded in its own dtype, a value
    /// rounded to it is itself, so r(r(θ_t) − r(θ_base)) is r(τ_t) bit for bit (`mix_in`),
    /// and each chunk is decoded once, into the deltas. mergekit's TIES on 0.5 B bf16 under
    /// `dtype: bfloat16` spent 37 % of its `perf` samples decoding values and forming deltas
    /// from them; the run took 3.17-3.24 s, now 2.68-2.69 s (the same bytes).
    fn values_from_deltas(&self, loaded: DType) -> bool {
        self.arith == Some(loaded) && self.reads_deltas()
    }

    /// Without sparsification the emulated arithmetic reads only the values and the base.
    fn reads_deltas(&self) -> bool {
        !(self.arith.is_some() && self.sparsify == Sparsify::None)
    }

    fn merge(&self, x: &ChunkIn, st: &TensorStats, s: Scratch, m: &mut [f32]) {
        let tasks = x.tasks();
        if let (Some(d), Sparsify::None) = (self.arith, self.sparsify) {
            // Every element kept: `mix_in` reads the values alone (`reads_deltas`).
            s.per_task.resize_with(tasks, Vec::new);
            for o in s.per_task.iter_mut() {
                grow(o, x.n);
            }
            grow(s.a, x.n);
            grow(s.b, x.n);
            let factors = vec![None; tasks];
            let sums = (&mut s.a[..], &mut s.b[..]);
            return mix_in(self, d, x, (&mut s.per_task[..tasks], &factors), m, sums);
        }
        if self.sparsify == Sparsify::None && self.arith.is_none() {
            // Nothing sparsified, so nothing rescaled: mix the deltas in place, no copies.
            grow(s.a, x.n);
            grow(s.b, x.n);
            crate::simd!(mix(self, x.deltas, x.weights, x.n, m, (s.a, s.b)));
            return;
        }
        s.per_task.resize_with(tasks, Vec::new);
        let mut factors = vec![None; tasks];
        for k in 0..tasks {
            grow(&mut s.per_task[k], x.n);
            let o = &mut s.per_task[k][..x.n];
            self.sparsify_into(x, st, k, s.keys, o);
            if !st.stages.is_empty() {
                // mergekit: no rescale where either L1 norm is below 1e-7; in `arith` the norms,
                // the bound and the ratio are values of that dtype.
                let l1 = st.sums(0, 0);
                let (before, after) = (l1[2 * k], l1[2 * k + 1]);
                factors[k] = match self.arith {
                    None => (before >= 1e-7 && after >= 1e-7).then(|| (before / after) as f32),
                    Some(d) => {
                        let r = |v: f32| round_in(d, v);
                        let (b, a, eps) = (r(before as f32), r(after as f32), r(1e-7));
                        (b >= eps && a >= eps).then(|| r(b / a))
                    }
                };
            }
            if let (Some(f), None) = (factors[k], self.arith) {
                if f != 1.0 {
                    for v in o.iter_mut() {
                        *v *= f;
                    }
                }
            }
        }
        grow(s.a, x.n);
        grow(s.b, x.n);
        if let Some(d) = self.arith {
            let sums = (&mut s.a[..], &mut s.b[..]);
            return mix_in(self, d, x, (&mut s.per_task[..tasks], &factors), m, sums);
        }
        crate::simd!(mix(self, s.per_task, x.weights, x.n, m, (s.a, s.b)));
    }
}

/// M of one chunk from the sparsified (unweighted) deltas and the weights, as mergekit mixes
/// them: weighted deltas, then sign consensus and normalization. `sums` and `div` are
/// chunk-sized scratch.
#[inline(always)]
pub fn mix<D: AsRef<[f32]>>(
    g: &Gta,
    deltas: &[D],
    weights: &[f32],
    n: usize,
    m: &mut [f32],
    (sums, div): (&mut [f32], &mut [f32]),
) {
    let (m, sums, div) = (&mut m[..n], &mut sums[..n], &mut div[..n]);
    // Each sum starts at 0 in the first model's loop (`0 + y`, as adding into zeros) rather
    // than in a memset of the chunk.
    if deltas.is_empty() {
        m.fill(0.0);
        sums.fill(0.0);
        div.fill(0.0);
    }
    let weighted_sum = |m: &mut [f32]| {
        for (k, (d, &w)) in deltas.iter().zip(weights).enumerate() {
            for (acc, &x) in m.iter_mut().zip(&d.as_ref()[..n]) {
                *acc = if k == 0 { 0.0 } else { *acc } + x * w;
            }
        }
    };
    if !g.consensus {
        weighted_sum(m);
        if g.normalize {
            let mut total = weights.iter().fold(0.0f32, |s, &w| s + w);
            if total.abs() < 1e-8 {
                total = 1.0;
            }
            for v in m.iter_mut() {
                *v /= total;
            }
        }
        return;
    }
    // m holds Σ_t w_t·τ_t first, then becomes the majority sign (+1 where the sum is ≥ 0).
    weighted_sum(m);
    for v in m.iter_mut() {
        *v = if *v >= 0.0 { 1.0 } else { -1.0 };
    }
    for (k, (d, &w)) in deltas.iter().zip(weights).enumerate() {
        for ((s, (q, &maj)), &x) in sums
            .iter_mut()
            .zip(div.iter_mut().zip(m.iter()))
            .zip(&d.as_ref()[..n])
        {
            let y = x * w;
            let sign = f32::from(u8::from(y > 0.0)) - f32::from(u8::from(y < 0.0));
            let keep = f32::from(u8::from(sign == maj));
            let (from_s, from_q) = if k == 0 { (0.0, 0.0) } else { (*s, *q) };
            *s = from_s + y * keep;
            *q = from_q + w * keep;
        }
    }
    for ((v, &s), &q) in m.iter_mut().zip(sums.iter()).zip(div.iter()) {
        let q = if q == 0.0 { 1.0 } else { q };
        *v = if g.normalize { s / q } else { s };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_follow_mergekit() {
        let mut g = Gta::named("ties").unwrap();
        g.density = PerTask::All(0.25);
        assert_eq!(g.kept_ranks(10, 0), Some((0, 2)));
        g.density = PerTask::All(0.01);
        assert_eq!(g.kept_ranks(10, 0), Some((0, 1))); // at least one
        let mut b = Gta::named("breadcrumbs").unwrap();
        b.density = PerTask::All(0.5);
        b.gamma = PerTask::All(0.1);
        assert_eq!(b.kept_ranks(100, 0), Some((10, 50)));
        b.gamma = PerTask::All(0.6);
        assert_eq!(b.kept_ranks(100, 0), Some((50, 50))); // outlier removal reduced
        b.density = PerTask::All(1.0);
        assert_eq!(b.kept_ranks(100, 0), Some((0, 100))); // not sparsified
    }

    /// mergekit's mixing element by element (the sums from 0, the models in order), against
    /// `mix` over scratch holding garbage: the sums must not depend on what it held.
    #[test]
    fn mix_matches_the_rule_over_garbage_scratch() {
        let mut z = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            z ^= z << 13;
            z ^= z >> 7;
            z ^= z << 17;
            z
        };
        let n = 1000;
        for name in ["ties", "task_arithmetic"] {
            for normalize in [false, true] {
                let mut g = Gta::named(name).unwrap();
                g.normalize = normalize;
                // A grid with zeros, −0 and sums that cancel.
                let d: Vec<Vec<f32>> = (0..3)
                    .map(|_| {
                        (0..n)
                            .map(|_| match next() % 9 {
                                0 => -0.0,
                                v => (v as f32 - 5.0) * 0.25,
                            })
                            .collect()
                    })
                    .collect();
                let w = [1.0f32, -0.5, 0.5];
                let mut want = vec![0.0f32; n];
                for (i, o) in want.iter_mut().enumerate() {
                    let sum = (0..3).fold(0.0f32, |s, t| s + d[t][i] * w[t]);
                    if !g.consensus {
                        let total = w.iter().fold(0.0f32, |s, &w| s + w);
                        *o = if normalize { sum / total } else { sum };
                        continue;
                    }
                    let maj = if sum >= 0.0 { 1.0 } else { -1.0 };
                    let (mut s, mut q) = (0.0f32, 0.0f32);
                    for t in 0..3 {
                        let y = d[t][i] * w[t];
                        let sign = if y > 0.0 {
                            1.0
                        } else if y < 0.0 {
                            -1.0
                        } else {
                            0.0
                        };
                        let keep = if sign == maj { 1.0 } else { 0.0 };
                        s += y * keep;
                        q += w[t] * keep;
                    }
                    *o = if normalize {
                        s / if q == 0.0 { 1.0 } else { q }
                    } else {
                        s
                    };
                }
                let (mut m, mut a, mut b) =
                    (vec![f32::NAN; n], vec![f32::NAN; n], vec![f32::NAN; n]);
                mix(&g, &d, &w, n, &mut m, (&mut a, &mut b));
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&m), bits(&want), "{name} normalize {normalize}");
            }
        }
    }

    #[test]
    fn ties_mix_hand_case() {
        // τ_1 = [1, −2, 3, 0], τ_2 = [2, 2, −1, 0], weights 1 and 0.5.
        let g = Gta::named("ties").unwrap();
        let d = vec![vec![1.0, -2.0, 3.0, 0.0], vec![2.0, 2.0, -1.0, 0.0]];
        let (mut m, mut s, mut div) = ([0.0; 4], [0.0; 4], [0.0; 4]);
        mix(&g, &d, &[1.0, 0.5], 4, &mut m, (&mut s, &mut div));
        // Weighted sums [2, −1, 2.5, 0] → majority [+, −, +, +]; kept: [1+1, −2, 3, none].
        assert_eq!(m, [2.0 / 1.5, -2.0, 3.0, 0.0]);
    }
}
