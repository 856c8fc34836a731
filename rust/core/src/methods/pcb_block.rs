//! PCB's balancing scores of one block of elements: what its select pass and its output pass
//! share. Three steps: N_t of every element with the bound that settles most of them
//! ([`settle`]), the open ones packed ([`pack`]), and their exact B_t ([`pair_sums`]).

use super::fastmath;
use super::pcb::Clamp;
use std::ops::Range;

/// Elements per block: T rows of N, of exp factors and of scores stay in L1.
pub const BLOCK: usize = 1024;

/// torch.sign (0 for a NaN), branch-free: data signs are random, so a branch would mispredict
/// half the time. Two selects of constants: from the comparisons as integers (1 − 1, converted)
/// it took twice the instructions.
#[inline(always)]
pub fn sign(x: f32) -> f32 {
    let s = if x > 0.0 { 1.0 } else { 0.0 };
    if x < 0.0 {
        -1.0
    } else {
        s
    }
}

/// N = sign(x)·norm(clamp(|x|)).
#[inline(always)]
fn normalized(x: f32, c: Clamp) -> f32 {
    sign(x) * c.norm(c.clip(x.abs()))
}

/// A block's scratch, rows of `len` at t·len: N_t (packed to the open elements by [`pack`]),
/// their exp factors, their B_t and, for the output, their deltas; the open elements' indices.
pub struct Rows<'a> {
    pub signed: &'a mut [f32],
    pub e: &'a mut [f32],
    pub out: &'a mut [f32],
    pub xs: &'a mut [f32],
    pub idx: [u16; BLOCK],
    /// [`settle`]'s sums P and Q and open flags, written before they are read in every block.
    pos: [f32; BLOCK],
    neg: [f32; BLOCK],
    open: [u32; BLOCK],
}

impl<'a> Rows<'a> {
    /// Carves the rows of `t` tasks out of two scratch vectors, grown (never shrunk: they are
    /// the caller's chunk-sized buffers, used again after this).
    pub fn new(t: usize, signed: &'a mut Vec<f32>, work: &'a mut Vec<f32>) -> Rows<'a> {
        crate::pipeline::grow(signed, t * BLOCK);
        crate::pipeline::grow(work, 3 * t * BLOCK);
        let (e, rest) = work.split_at_mut(t * BLOCK);
        let (out, rest) = rest.split_at_mut(t * BLOCK);
        Rows {
            signed,
            e,
            out,
            xs: &mut rest[..t * BLOCK],
            idx: [0; BLOCK],
            pos: [0.0; BLOCK],
            neg: [0.0; BLOCK],
            open: [0; BLOCK],
        }
    }
}

/// The bound's roundings, as [`settle`] documents them: `slack` on V against P + Q, `margin`
/// on the other factors.
#[derive(Clone, Copy)]
struct Margins {
    slack: f32,
    margin: f32,
}

impl Margins {
    /// V = P_t − 0.76·Q_t is a difference, so the rounding of it, of the products N_t·N_j, of
    /// the T tanh and of B_t's sum is bounded against P + Q instead: 8(T + 2) units of 2^-24
    /// of it. The remaining factors are rounded a few times each, and the exponential's bound
    /// is (z + 1) units low at most (z ≤ T) and `exp` 2 ulp off: (2T + 5) units of 2^-24 in
    /// all, doubled, and a fixed 10^-5, cover them.
    fn new(t: usize) -> Margins {
        Margins {
            slack: (4 * (t + 2)) as f32 * f32::EPSILON,
            margin: 1.0 + 1e-5 + (2 * t + 5) as f32 * f32::EPSILON,
        }
    }

    /// Whether U_t < floor (false where either is NaN): the element's B_t is below its floor.
    /// `p`, `q`: the sums of the element's positive and negative N_j.
    #[inline(always)]
    fn settles(&self, n: f32, tf: f32, p: f32, q: f32, floor: f32) -> bool {
        let na = n.abs();
        let z = tf * (na * na);
        let (same, other) = if n > 0.0 { (p, q) } else { (q, p) };
        let v = same - 0.76 * other + self.slack * (same + other);
        // B_t ≤ |N_t|·V·e^z: an upper bound of e^z where V > 0, its lower bound 1 where V ≤ 0.
        let factor = if v > 0.0 {
            fastmath::exp_upper(z) * self.margin
        } else {
            1.0 / self.margin
        };
        na * v * factor < floor
    }
}

/// N_t of the block's elements (`deltas[t][r]`) into `rows.signed`, and the elements to
/// compute into `rows.idx`: all, or with a `floor` (per task) those whose bound U_t does not
/// settle B_t < floor_t for every task; returns their count.
///
/// The bound is cheap: every |N| ≤ 1, so each product y = N_t·N_j is in [−1, 1], where
/// tanh y ≤ y for y ≥ 0 and, tanh being convex below 0, tanh y ≤ tanh(1)·y ≤ 0.76·y for
/// y ≤ 0. With P_t the sum of |N_j| over the tasks of N_t's sign and Q_t over the others,
/// Σ_j tanh(N_t N_j) ≤ |N_t|·(P_t − 0.76·Q_t) =: |N_t|·V_t, so B_t ≤ |N_t|·V_t·e^(T·N_t²)
/// =: U_t, with an upper bound of the exponential where V_t > 0 and e^0 = 1 where V_t ≤ 0,
/// taken with margins over the roundings ([`Margins::new`]).
///
/// Every loop runs task by task over the whole block (a loop per task over 16-element groups
/// kept their sums in registers but paid its control and bounds checks per group: slower).
/// P and Q are summed as N is computed, and the open flags are 32-bit like the lanes: as
/// bytes, their conversions and read-modify-writes were an eighth of PCB's time.
#[inline(always)]
pub fn settle<D: AsRef<[f32]>>(
    deltas: &[D],
    r: Range<usize>,
    abs: &[Clamp],
    floor: Option<&[f32]>,
    rows: &mut Rows,
) -> usize {
    let len = r.len();
    let (pos, neg) = (&mut rows.pos[..len], &mut rows.neg[..len]);
    for (t, d) in deltas.iter().enumerate() {
        let c = abs[t];
        let nt = &mut rows.signed[t * len..(t + 1) * len];
        let x = &d.as_ref()[r.clone()];
        if floor.is_none() {
            for (s, &x) in nt.iter_mut().zip(x) {
                *s = normalized(x, c);
            }
            continue;
        }
        // P = Σ_j max(N_j, 0) and Q = Σ_j max(−N_j, 0), in task order from 0.
        for (((s, p), q), &x) in nt.iter_mut().zip(pos.iter_mut()).zip(neg.iter_mut()).zip(x) {
            let v = normalized(x, c);
            *s = v;
            let (p0, q0) = if t == 0 { (0.0, 0.0) } else { (*p, *q) };
            *p = p0 + v.max(0.0);
            *q = q0 + (-v).max(0.0);
        }
    }
    let Some(floor) = floor else {
        for (k, i) in rows.idx[..len].iter_mut().enumerate() {
            *i = k as u16;
        }
        return len;
    };
    let mg = Margins::new(deltas.len());
    let tf = deltas.len() as f32;
    let open = &mut rows.open[..len];
    for (t, &f) in floor.iter().enumerate() {
        let nt = &rows.signed[t * len..(t + 1) * len];
        for (((o, &n), &p), &q) in open.iter_mut().zip(nt).zip(pos.iter()).zip(neg.iter()) {
            let o0 = if t == 0 { 0 } else { *o };
            *o = if mg.settles(n, tf, p, q, f) { o0 } else { 1 };
        }
    }
    // The open ones' indices: a mask per 64 elements (a loop that vectorizes), its set bits
    // visited. A store per element with a count carried from one to the next (branch-free
    // compaction) took 7 % of PCB's time; open elements are a sixth of them.
    let mut m = 0;
    for (g, os) in open.chunks(64).enumerate() {
        let mut mask = os
            .iter()
            .enumerate()
            .fold(0u64, |a, (k, &o)| a | (u64::from(o != 0) << k));
        while mask != 0 {
            rows.idx[m] = (g * 64) as u16 + mask.trailing_zeros() as u16;
            mask &= mask - 1;
            m += 1;
        }
    }
    m
}

/// Packs the `m` open elements of a block of `len` to the front of every row: N_t in place
/// (idx[k] ≥ k), e^(T·N_t²) beside it, and with `want_x` their deltas `deltas[t][r]`.
#[inline(always)]
pub fn pack<D: AsRef<[f32]>>(
    deltas: &[D],
    r: Range<usize>,
    m: usize,
    want_x: bool,
    rows: &mut Rows,
) {
    let len = r.len();
    let tf = deltas.len() as f32;
    for (t, d) in deltas.iter().enumerate() {
        let nt = &mut rows.signed[t * len..(t + 1) * len];
        let d = &d.as_ref()[r.clone()];
        let xt = &mut rows.xs[t * len..(t + 1) * len];
        if m < len {
            for (k, &i) in rows.idx[..m].iter().enumerate() {
                nt[k] = nt[i as usize];
            }
            if want_x {
                for (x, &i) in xt.iter_mut().zip(&rows.idx[..m]) {
                    *x = d[i as usize];
                }
            }
        } else if want_x {
            xt.copy_from_slice(d);
        }
        for (e, &n) in rows.e[t * len..t * len + m].iter_mut().zip(&nt[..m]) {
            let na = n.abs();
            *e = fastmath::exp(tf * (na * na));
        }
    }
}

/// B_t = exp(T·norm(A_t)²) · Σ_j tanh(N_t N_j) of the `m` packed elements, into `rows.out`.
/// Each symmetric pair tanh(N_t N_j) is evaluated once and added to both sums, which still
/// accumulate in ascending j like the reference.
#[inline(always)]
pub fn pair_sums(t_count: usize, len: usize, m: usize, rows: &mut Rows) {
    let out = &mut rows.out[..t_count * len];
    for t in 0..t_count {
        out[t * len..t * len + m].fill(0.0);
    }
    for t in 0..t_count {
        for j in t..t_count {
            let nt = &rows.signed[t * len..t * len + m];
            let nj = &rows.signed[j * len..j * len + m];
            let (lo, hi) = out.split_at_mut(j * len);
            if j == t {
                fastmath::add_tanh(nt, nt, &mut hi[..m], None);
            } else {
                let bt = &mut lo[t * len..t * len + m];
                fastmath::add_tanh(nt, nj, bt, Some(&mut hi[..m]));
            }
        }
    }
    for t in 0..t_count {
        let (ot, et) = (
            &mut out[t * len..t * len + m],
            &rows.e[t * len..t * len + m],
        );
        for (o, &x) in ot.iter_mut().zip(et) {
            *o *= x;
        }
    }
}
