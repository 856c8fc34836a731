//! mergekit's `karcher` in its `dtype` (bf16/f16): every torch operation of mergekit's
//! iteration rounded as its CPU run rounds it. There the iterate is rounded to the dtype at every
//! step, so it is no longer a combination of the models' unit vectors (the f32 path's trick,
//! `karcher.rs`) and no statistic rebuilds it: the iterate is held, one `u16` per element
//! ([`Held`](super::kernel::Held)), and each iteration takes three statistics passes, as each of its reductions
//! feeds the next: the dots of the mean with every unit vector, the tangent's norm, the new
//! mean's norm.
//!
//! Stages (`L` = stages done): 0 the points' squared norms; 1 the first mean's (the mean is
//! held from here); then per iteration k: 2+3k the dots, 3+3k the tangent's, 4+3k the stepped
//! mean's (held again). The held mean's normaliser is the latest stage ≡ 1 (mod 3).
//!
//! A tensor that is one chunk (every tensor of a small model, the norm vectors of any) runs
//! the whole iteration in stage 0's pass instead: the same stages, in the same order, over the
//! chunk it already holds, each stage's sums taken as the engine would take them (`0 + sum`).
//! So the result is the passes' bit for bit, without a pass per reduction (a published config
//! asks for 1200 iterations). Stage 0's last slot says so (1), and the final mean is held
//! normalised.
//!
//! torch's rounding rules, as mergekit's expressions meet them: a 0-d tensor as the first
//! operand of a product is rounded to the dtype first (`cos(tn) * mean`, `scale * mean`), a
//! divisor or a Python float is not (`tensor / norm`, `alpha * unit`); norms are f32 (mergekit
//! casts to f32 first); `torch.dot` accumulates the exact products in f32 and rounds once.

use std::sync::atomic::{AtomicU16, Ordering::Relaxed};

use half::f16;

use super::karcher::Karcher;
use super::kernel::{ChunkIn, Found, Scratch, Stage, TensorStats, Unit};
use super::reduce;
use crate::dtype::{bf16_bits, DType};
use crate::pipeline::grow;

/// Rounding to the emulated dtype, one type per dtype so that the element loops are compiled
/// (and vectorised) for each, without a branch per operation.
trait Round: Copy {
    fn r(self, v: f32) -> f32;
    fn bits(self, v: f32) -> u16;
    fn value(self, b: u16) -> f32;
}

#[derive(Clone, Copy)]
struct Bf16;

impl Round for Bf16 {
    #[inline(always)]
    fn r(self, v: f32) -> f32 {
        self.value(bf16_bits(v))
    }
    #[inline(always)]
    fn bits(self, v: f32) -> u16 {
        bf16_bits(v)
    }
    #[inline(always)]
    fn value(self, b: u16) -> f32 {
        f32::from_bits(u32::from(b) << 16)
    }
}

#[derive(Clone, Copy)]
struct F16;

impl Round for F16 {
    #[inline(always)]
    fn r(self, v: f32) -> f32 {
        f16::from_f32(v).to_f32()
    }
    #[inline(always)]
    fn bits(self, v: f32) -> u16 {
        f16::from_f32(v).to_bits()
    }
    #[inline(always)]
    fn value(self, b: u16) -> f32 {
        f16::from_bits(b).to_f32()
    }
}

/// What a chunk needs of the finished stages.
struct Ctx {
    /// Per point, its f32 norm.
    norms: Vec<f32>,
    /// The points whose norm exceeds `tol`, each with its normalised weight as torch takes a
    /// Python float (f32).
    valid: Vec<(usize, f32)>,
}

/// The scratch buffers of a chunk: the mean, a unit vector, the tangent.
struct Bufs<'s> {
    mean: &'s mut [f32],
    unit: &'s mut [f32],
    tan: &'s mut [f32],
}

fn bufs<'s>(s: Scratch<'s>, n: usize) -> Bufs<'s> {
    grow(s.a, n);
    grow(s.b, n);
    s.per_task.resize_with(1, Vec::new);
    grow(&mut s.per_task[0], n);
    Bufs {
        mean: &mut s.a[..n],
        unit: &mut s.per_task[0][..n],
        tan: &mut s.b[..n],
    }
}

impl Karcher {
    #[inline(always)]
    fn ctx(&self, points: usize, st: &TensorStats) -> Ctx {
        let norms: Vec<f32> = st.sums(0, 0)[..points]
            .iter()
            .map(|&s| s.sqrt() as f32)
            .collect();
        let valid: Vec<usize> = (0..points)
            .filter(|&t| norms[t] as f64 > self.tol)
            .collect();
        // mergekit: alphas = [1/P]·P, summed over the valid points in Python (f64).
        let alpha = 1.0 / points as f64;
        let total: f64 = valid.iter().map(|_| alpha).sum();
        Ctx {
            valid: valid.iter().map(|&t| (t, (alpha / total) as f32)).collect(),
            norms,
        }
    }

    /// Point `t`'s unit vector, `(x / norm).to(dtype)` (zero for a zero norm), into `out`.
    #[inline(always)]
    fn unit<R: Round>(r: R, c: &Ctx, p: &[&[f32]], t: usize, out: &mut [f32]) {
        let n = c.norms[t];
        if n == 0.0 {
            out.fill(0.0);
        } else {
            for (o, &x) in out.iter_mut().zip(p[t]) {
                *o = r.r(x / n);
            }
        }
    }

    /// The mean the held values stand for, normalised by stage `w`'s norm (`w` ≡ 1 mod 3),
    /// into `b.mean`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn mean<R: Round>(
        &self,
        r: R,
        c: &Ctx,
        p: &[&[f32]],
        held: &[AtomicU16],
        w: usize,
        st: &TensorStats,
        b: &mut Bufs,
    ) {
        let norm = Self::norm_of(st, w);
        if w == 1 && (norm as f64) < self.tol {
            return Self::unit(r, c, p, c.valid[0].0, b.mean);
        }
        for (m, h) in b.mean.iter_mut().zip(held) {
            *m = r.value(h.load(Relaxed));
        }
        if w == 1 || norm as f64 > self.tol {
            for m in b.mean.iter_mut() {
                *m = r.r(*m / norm);
            }
        }
    }

    /// The tangent at the mean in `b.mean`, from the dots of stage `s`, into `b.tan`: per valid
    /// point `α·(θ / sin θ)·(u − dot·mean)`, summed in the dtype (θ < tol skips the point).
    #[inline(always)]
    fn tangent<R: Round>(
        &self,
        r: R,
        c: &Ctx,
        p: &[&[f32]],
        st: &TensorStats,
        s: usize,
        b: &mut Bufs,
    ) {
        let dots = st.sums(s, 0);
        b.tan.fill(0.0);
        for &(t, a) in &c.valid {
            let dot = r.r(dots[t] as f32).clamp(-1.0, 1.0);
            let theta = r.r(dot.acos());
            if (theta as f64) < self.tol {
                continue;
            }
            let k = r.r(r.r(theta / r.r(theta.sin())) * a);
            Self::unit(r, c, p, t, b.unit);
            for ((o, &u), &m) in b.tan.iter_mut().zip(b.unit.iter()).zip(b.mean.iter()) {
                *o = r.r(*o + r.r(k * r.r(u - r.r(dot * m))));
            }
        }
    }

    #[inline(always)]
    fn norm_of(st: &TensorStats, s: usize) -> f32 {
        st.sums(s, 0)[0].sqrt() as f32
    }

    /// The latest stage (of `done`) whose norm normalises the held mean.
    #[inline(always)]
    fn writer(done: usize) -> usize {
        done - 1 - (done + 1) % 3
    }

    pub(super) fn dtype_stage(&self, points: usize, done: &TensorStats) -> Option<Stage> {
        let sums = |slots| Stage::Sums {
            unit: Unit::Tensor,
            slots,
        };
        let l = done.stages.len();
        match l {
            // The squared norms, and whether the tensor was iterated whole (see the module).
            0 => Some(sums(points + 1)),
            1 if Self::whole(points, done) => None,
            1 => done.sums(0, 0)[..points]
                .iter()
                .any(|&s| s.sqrt() as f32 as f64 > self.tol)
                .then_some(sums(1)),
            _ if l % 3 == 2 => ((l - 2) / 3 < self.max_iter).then_some(sums(points)),
            _ if l.is_multiple_of(3) => Some(sums(1)),
            // The tangent's norm below tol ends the iteration.
            _ => ((Self::norm_of(done, l - 1) as f64) >= self.tol).then_some(sums(1)),
        }
    }

    pub(super) fn dtype_accumulate(
        &self,
        d: DType,
        x: &ChunkIn,
        p: &[&[f32]],
        st: &TensorStats,
        s: Scratch,
        acc: &mut [f64],
    ) {
        match d {
            // The loops in the wide copies (`simd!`): every function below is inlined into it.
            DType::F16 => crate::simd!(self.accumulate_in(F16, x, p, st, s, acc)),
            _ => crate::simd!(self.accumulate_in(Bf16, x, p, st, s, acc)),
        }
    }

    #[inline(always)]
    fn accumulate_in<R: Round>(
        &self,
        r: R,
        x: &ChunkIn,
        p: &[&[f32]],
        st: &TensorStats,
        s: Scratch,
        acc: &mut [f64],
    ) {
        let l = st.stages.len();
        if l == 0 {
            for (a, v) in acc.iter_mut().zip(p) {
                *a += reduce::sum_sq(v);
            }
            if x.start == 0 && x.n == x.tensor.numel {
                self.iterate_whole(r, x, p, st, s, acc);
            }
            return;
        }
        self.stage_in(r, x, p, st, s, acc);
    }

    /// A stage after the norms (see [`Self::accumulate_in`]); apart from it, so that
    /// `iterate_whole` calls it without a recursion (which would keep these loops from being
    /// inlined into the wide copy).
    #[inline(always)]
    fn stage_in<R: Round>(
        &self,
        r: R,
        x: &ChunkIn,
        p: &[&[f32]],
        st: &TensorStats,
        s: Scratch,
        acc: &mut [f64],
    ) {
        let l = st.stages.len();
        let c = self.ctx(p.len(), st);
        let held = &st.held.of(x.tensor.numel)[x.start..x.start + x.n];
        let mut b = bufs(s, x.n);
        if l == 1 {
            // The first mean, before its normalisation: Σ α_t·u_t, each step rounded; held.
            b.mean.fill(0.0);
            for &(t, a) in &c.valid {
                Self::unit(r, &c, p, t, b.unit);
                for (m, &u) in b.mean.iter_mut().zip(b.unit.iter()) {
                    *m = r.r(*m + r.r(u * a));
                }
            }
            return Self::hold(r, b.mean, held, acc);
        }
        match l % 3 {
            // The dots, exact products summed (in f64 here, in f32 by torch) and rounded once.
            2 => {
                self.mean(r, &c, p, held, Self::writer(l), st, &mut b);
                for &(t, _) in &c.valid {
                    Self::unit(r, &c, p, t, b.unit);
                    acc[t] += reduce::dot(b.mean, b.unit);
                }
            }
            0 => {
                self.mean(r, &c, p, held, Self::writer(l), st, &mut b);
                self.tangent(r, &c, p, st, l - 1, &mut b);
                acc[0] += reduce::sum_sq(b.tan);
            }
            _ => {
                // The step along the tangent, as mergekit's `cos(tn)·mean + sin(tn)·(tangent / tn)`.
                self.mean(r, &c, p, held, Self::writer(l), st, &mut b);
                self.tangent(r, &c, p, st, l - 2, &mut b);
                let tn = Self::norm_of(st, l - 1);
                let (cos, sin) = (r.r(tn.cos()), r.r(tn.sin()));
                for (m, &t) in b.mean.iter_mut().zip(b.tan.iter()) {
                    *m = r.r(r.r(cos * *m) + r.r(sin * r.r(t / tn)));
                }
                Self::hold(r, b.mean, held, acc);
            }
        }
    }

    /// Holds `v` for the next pass, and adds its squared norm to `acc[0]`.
    #[inline(always)]
    fn hold<R: Round>(r: R, v: &[f32], held: &[AtomicU16], acc: &mut [f64]) {
        for (h, &x) in held.iter().zip(v) {
            h.store(r.bits(x), Relaxed);
        }
        acc[0] += reduce::sum_sq(v);
    }

    pub(super) fn dtype_merge(
        &self,
        d: DType,
        x: &ChunkIn,
        p: &[&[f32]],
        st: &TensorStats,
        s: Scratch,
        m: &mut [f32],
    ) {
        match d {
            DType::F16 => crate::simd!(self.merge_in(F16, x, p, st, s, m)),
            _ => crate::simd!(self.merge_in(Bf16, x, p, st, s, m)),
        }
    }

    #[inline(always)]
    fn merge_in<R: Round>(
        &self,
        r: R,
        x: &ChunkIn,
        p: &[&[f32]],
        st: &TensorStats,
        s: Scratch,
        m: &mut [f32],
    ) {
        let l = st.stages.len();
        let whole = Self::whole(p.len(), st);
        // No point's norm exceeds tol (no stage after the norms; iterated whole, no valid
        // point): mergekit returns Σ x·0.
        if l < 2 && !whole {
            m.fill(0.0);
            return;
        }
        let c = self.ctx(p.len(), st);
        if c.valid.is_empty() {
            m.fill(0.0);
            return;
        }
        // scale = Σ α·‖x_t‖ over every point, in f32 (a 0-d tensor times a Python float); as
        // the first factor of `scale * mean` it is rounded to the dtype.
        let alpha = (1.0 / p.len() as f64) as f32;
        let scale = r.r(c.norms.iter().fold(0.0f32, |s, &n| s + n * alpha));
        let held = &st.held.of(x.tensor.numel)[x.start..x.start + x.n];
        if whole {
            // Held normalised (`iterate_whole`).
            for (o, h) in m.iter_mut().zip(held) {
                *o = r.r(scale * r.value(h.load(Relaxed)));
            }
            return;
        }
        let mut b = bufs(s, x.n);
        self.mean(r, &c, p, held, Self::writer(l), st, &mut b);
        for (o, &v) in m.iter_mut().zip(b.mean.iter()) {
            *o = r.r(scale * v);
        }
    }

    /// Whether the tensor was iterated whole in stage 0's pass (its last slot).
    fn whole(points: usize, st: &TensorStats) -> bool {
        st.stages
            .first()
            .is_some_and(|_| st.sums(0, 0).get(points) == Some(&1.0))
    }

    /// The whole iteration over a tensor that is this one chunk: every later stage run here, in
    /// order, as the passes would run it (`acc` holds stage 0's sums of the chunk; the engine
    /// adds them to 0, and so does this), then the final mean held normalised and stage 0's
    /// last slot set.
    #[inline(always)]
    fn iterate_whole<R: Round>(
        &self,
        r: R,
        x: &ChunkIn,
        p: &[&[f32]],
        st: &TensorStats,
        mut s: Scratch,
        acc: &mut [f64],
    ) {
        let points = p.len();
        let taken = |a: &[f64]| a.iter().map(|&v| 0.0 + v).collect::<Vec<f64>>();
        let found = |sums: Vec<f64>| Found::Sums {
            slots: sums.len(),
            sums,
            before: Default::default(),
        };
        // Allocated before the clone: clones of an empty `Held` would not share it.
        st.held.of(x.tensor.numel);
        let mut run = TensorStats {
            held: st.held.clone(),
            ..Default::default()
        };
        run.stages.push(found(taken(acc)));
        while let Some(Stage::Sums { slots, .. }) = self.dtype_stage(points, &run) {
            let mut a = vec![0.0; slots];
            self.stage_in(r, x, p, &run, again(&mut s), &mut a);
            run.stages.push(found(taken(&a)));
        }
        let l = run.stages.len();
        let c = self.ctx(points, &run);
        if l >= 2 && !c.valid.is_empty() {
            let held = &run.held.of(x.tensor.numel)[..x.n];
            let mut b = bufs(s, x.n);
            self.mean(r, &c, p, held, Self::writer(l), &run, &mut b);
            for (h, &v) in held.iter().zip(b.mean.iter()) {
                h.store(r.bits(v), Relaxed);
            }
        }
        acc[points] = 1.0;
    }
}

/// `s` again, for one more call (its buffers lent, not given).
fn again<'b>(s: &'b mut Scratch) -> Scratch<'b> {
    Scratch {
        a: &mut *s.a,
        b: &mut *s.b,
        per_task: &mut *s.per_task,
        keys: &mut *s.keys,
        wide: &mut *s.wide,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::kernel::Held;
    use std::sync::atomic::Ordering::Relaxed;

    #[test]
    fn the_writer_is_the_latest_stage_that_held_the_mean() {
        // Stages done → the stage whose norm normalises the held mean.
        for (done, w) in [(2, 1), (3, 1), (4, 1), (5, 4), (6, 4), (7, 4), (8, 7)] {
            assert_eq!(Karcher::writer(done), w, "{done}");
        }
    }

    #[test]
    fn held_state_is_shared_by_clones() {
        let a = Held::default();
        a.of(3)[1].store(7, Relaxed);
        let b = a.clone();
        assert_eq!(b.of(3)[1].load(Relaxed), 7);
    }
}
