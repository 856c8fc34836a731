//! TIES (trim, elect sign, disjoint mean). The threshold of the trim step and the majority sign
//! are statistics over the whole scope (the model, or one tensor), gathered by the pipeline:
//! the threshold exactly, by radix select over |τ|.

use super::{int_frac, TiesParams};

/// Statistics of one scope.
#[derive(Clone, Debug, PartialEq)]
pub struct TiesStats {
    /// Per task: entries with |τ| ≥ thr survive the trim.
    pub thr: Vec<f32>,
    /// sign of Σ over the scope of sign(Σ_t trimmed_t): used where an element's own sign is 0.
    pub majority: f32,
}

/// The 0-based rank of the threshold in |τ| sorted ascending, or None when nothing is trimmed.
/// SPEC: kk = d − int(k·d), thr = the kk-th smallest (1-based).
pub fn threshold_rank(d: usize, p: &TiesParams) -> Option<u64> {
    let kk = d - int_frac(d, p.density).min(d);
    (kk > 0).then(|| kk as u64 - 1)
}

#[inline]
fn trim(x: f32, thr: f32) -> f32 {
    x * f32::from(u8::from(x.abs() >= thr))
}

/// Σ_t trimmed_t into `s`.
#[inline(always)]
fn trimmed_sum(deltas: &[Vec<f32>], thr: &[f32], n: usize, s: &mut [f32]) {
    s[..n].fill(0.0);
    for (d, &t) in deltas.iter().zip(thr) {
        for (acc, &x) in s[..n].iter_mut().zip(&d[..n]) {
            *acc += trim(x, t);
        }
    }
}

/// torch.sign, branch-free: data signs are random, so a branch would mispredict half the time.
#[inline]
fn sign(x: f32) -> f32 {
    f32::from(u8::from(x > 0.0)) - f32::from(u8::from(x < 0.0))
}

/// Σ over the chunk of sign(Σ_t trimmed_t), for the majority sign.
#[inline(always)]
pub fn sign_count(deltas: &[Vec<f32>], thr: &[f32], n: usize, scratch: &mut [f32]) -> i64 {
    trimmed_sum(deltas, thr, n, scratch);
    scratch[..n].iter().map(|&v| sign(v) as i64).sum()
}

/// The merged task vector of one chunk; `count` and `total` are chunk-sized scratch.
#[inline(always)]
pub fn merge(
    deltas: &[Vec<f32>],
    stats: &TiesStats,
    n: usize,
    m: &mut [f32],
    count: &mut [f32],
    total: &mut [f32],
) {
    // m holds the elected sign first, then the disjoint mean. Loops are task-outer, zipped and
    // branch-free (selects), so they vectorize.
    trimmed_sum(deltas, &stats.thr, n, m);
    let majority = stats.majority;
    for s in &mut m[..n] {
        let v = sign(*s);
        *s = v + majority * f32::from(u8::from(v == 0.0));
    }
    let (count, total) = (&mut count[..n], &mut total[..n]);
    count.fill(0.0);
    total.fill(0.0);
    for (d, &t) in deltas.iter().zip(&stats.thr) {
        for (((c, acc), &s), &x) in count
            .iter_mut()
            .zip(total.iter_mut())
            .zip(&m[..n])
            .zip(&d[..n])
        {
            let x = trim(x, t);
            // Non-short-circuit operators and arithmetic selects: no data-dependent branches.
            let keep = f32::from(u8::from(((s > 0.0) & (x > 0.0)) | ((s < 0.0) & (x < 0.0))));
            *acc += keep * x;
            *c += keep;
        }
    }
    for ((v, &acc), &c) in m[..n].iter_mut().zip(total.iter()).zip(count.iter()) {
        *v = acc / c.max(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::Scope;

    #[test]
    fn ranks() {
        let p = TiesParams {
            density: 0.2,
            scope: Scope::Global,
        };
        assert_eq!(threshold_rank(10, &p), Some(7)); // kk = 8
        let all = TiesParams {
            density: 1.0,
            scope: Scope::Global,
        };
        assert_eq!(threshold_rank(10, &all), None);
    }

    #[test]
    fn hand_case() {
        // Two tasks, thresholds keep |x| ≥ 2.
        let d = vec![vec![3.0, -1.0, 2.0, -2.0], vec![-4.0, 5.0, 2.0, 2.0]];
        let stats = TiesStats {
            thr: vec![2.0, 2.0],
            majority: 1.0,
        };
        let (mut m, mut c, mut t) = ([0.0; 4], [0.0; 4], [0.0; 4]);
        merge(&d, &stats, 4, &mut m, &mut c, &mut t);
        // [3,-4] → sign −1 → −4; [0,5] → 5; [2,2] → 2; [−2,2] → sum 0 → majority +1 → 2.
        assert_eq!(m, [-4.0, 5.0, 2.0, 2.0]);
    }
}
