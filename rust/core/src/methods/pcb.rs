//! PCB (parameter competition balancing) as SPEC.md writes it. Each task row needs four exact
//! order statistics — the clamp bounds of |X| and of the balancing score B — gathered by the
//! pipeline's radix-select passes; everything else is per element.

use super::int_frac;

/// clamp(x, lo, hi) followed by norm(): SPEC's a = sorted[int(d·lo)], b = sorted[int(d·(1−hi)−1)].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Clamp {
    pub a: f32,
    pub b: f32,
}

impl Clamp {
    #[inline]
    pub fn clip(&self, x: f32) -> f32 {
        x.max(self.a).min(self.b)
    }

    /// (clipped − min)/(max − min) over the clipped row, whose min is min(a, b) and max is b;
    /// 0 where the row is flat.
    #[inline]
    pub fn norm(&self, clipped: f32) -> f32 {
        let lo = self.a.min(self.b);
        let den = self.b - lo;
        if den > 0.0 {
            (clipped - lo) / den
        } else {
            0.0
        }
    }
}

/// The clamp ranks (0-based, ascending) of a row of length d.
pub fn clamp_ranks(d: usize, lo: f64, hi: f64) -> (u64, u64) {
    let a = int_frac(d, lo).min(d - 1);
    let b = (d as f64 * (1.0 - hi) - 1.0).max(0.0) as usize;
    (a as u64, b.min(d - 1) as u64)
}

/// |X| is clamped at the 1st and 99th percentiles.
pub const ABS_CLAMP: (f64, f64) = (0.01, 0.01);

#[inline]
fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// B_t = exp(T·norm(A_t)²) · Σ_j tanh(N_t N_j) for every element of the chunk, into `b`.
pub fn scores(
    deltas: &[Vec<f32>],
    n: usize,
    abs: &[Clamp],
    b: &mut [Vec<f32>],
    signed: &mut Vec<f32>,
) {
    let t_count = deltas.len();
    // N_t = sign(x)·norm(A_t), laid out t-major.
    signed.clear();
    signed.resize(t_count * n, 0.0);
    for (t, d) in deltas.iter().enumerate() {
        let c = abs[t];
        for i in 0..n {
            let x = d[i];
            signed[t * n + i] = sign(x) * c.norm(c.clip(x.abs()));
        }
    }
    let tf = t_count as f32;
    for t in 0..t_count {
        let bt = &mut b[t][..n];
        for (i, out) in bt.iter_mut().enumerate() {
            let nt = signed[t * n + i];
            let na = nt.abs();
            let intra = (tf * (na * na)).exp();
            let mut inter = 0.0f32;
            for j in 0..t_count {
                inter += (nt * signed[j * n + i]).tanh();
            }
            *out = intra * inter;
        }
    }
}

/// M = Σ_t S_t ⊙ Xc_t / max(Σ_t S_t, 1e-12), with S_t = norm(clamp(B_t)).
pub fn merge(
    deltas: &[Vec<f32>],
    n: usize,
    abs: &[Clamp],
    score: &[Clamp],
    b: &mut [Vec<f32>],
    signed: &mut Vec<f32>,
    m: &mut [f32],
) {
    scores(deltas, n, abs, b, signed);
    let mut den = vec![0.0f32; n];
    m[..n].fill(0.0);
    for (t, d) in deltas.iter().enumerate() {
        let (ca, cb) = (abs[t], score[t]);
        for i in 0..n {
            let x = d[i];
            let xc = sign(x) * ca.clip(x.abs());
            let s = cb.norm(cb.clip(b[t][i]));
            m[i] += s * xc;
            den[i] += s;
        }
    }
    for (v, d) in m[..n].iter_mut().zip(den) {
        *v /= d.max(1e-12);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamp_ranks_follow_python_int() {
        assert_eq!(clamp_ranks(1000, 0.01, 0.01), (10, 989));
        assert_eq!(clamp_ranks(1, 0.01, 0.01), (0, 0));
        assert_eq!(clamp_ranks(100, 0.95, 0.0), (95, 99));
    }

    #[test]
    fn flat_row_normalizes_to_zero() {
        let c = Clamp { a: 2.0, b: 2.0 };
        assert_eq!(c.norm(c.clip(5.0)), 0.0);
    }
}
