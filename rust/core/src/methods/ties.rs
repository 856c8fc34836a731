//! TIES (trim, elect sign, disjoint mean). The threshold of the trim step and the majority sign
//! are statistics over the whole scope (the model, or one tensor), gathered by the pipeline:
//! the threshold exactly, by radix select over |τ|.

use super::kernel::{ChunkIn, Kernel, Scratch, Stage, TensorStats};
use super::{int_frac, DareParams, PerTask, Reader, Scope};
use crate::error::Result;
use crate::plan::TensorPlan;

/// TIES (and DARE-TIES: DARE's drop and rescale first, by the engine), as SPEC.md writes it.
#[derive(Debug)]
pub struct Ties {
    /// Fraction of entries kept by the trim step, per task.
    pub density: PerTask,
    pub scope: Scope,
    pub dare: Option<DareParams>,
}

impl Ties {
    pub fn parse(r: &mut Reader) -> Result<Ties> {
        Ok(Ties {
            density: r.frac("density", 0.2, 0.0, 1.0, true)?,
            scope: r.scope()?,
            dare: None,
        })
    }

    /// DARE-TIES: `density` and `rescale` are DARE's, `ties_density` the trim's.
    pub fn parse_dare(r: &mut Reader) -> Result<Ties> {
        let dare = super::dare(r)?;
        Ok(Ties {
            density: r.frac("ties_density", 0.2, 0.0, 1.0, true)?,
            scope: r.scope()?,
            dare: Some(dare),
        })
    }
}

impl Kernel for Ties {
    fn name(&self) -> &'static str {
        if self.dare.is_some() {
            "dare_ties"
        } else {
            "ties"
        }
    }

    fn params_json(&self) -> serde_json::Value {
        let scope = match self.scope {
            Scope::Global => "global",
            Scope::Tensor => "tensor",
        };
        match &self.dare {
            Some(d) => serde_json::json!({"density": d.density.json(), "rescale": d.rescale,
                "ties_density": self.density.json(), "scope": scope}),
            None => serde_json::json!({"density": self.density.json(), "scope": scope}),
        }
    }

    fn weighted(&self) -> bool {
        true
    }

    fn dare(&self) -> Option<&DareParams> {
        self.dare.as_ref()
    }

    fn scope(&self) -> Scope {
        self.scope
    }

    fn speculates(&self) -> bool {
        self.scope == Scope::Global
    }

    fn check_tasks(&self, tasks: usize) -> Result<()> {
        match &self.dare {
            Some(d) => {
                d.density.check_len("density", tasks)?;
                self.density.check_len("ties_density", tasks)
            }
            None => self.density.check_len("density", tasks),
        }
    }

    fn next_stage(&self, _t: &TensorPlan, _tasks: usize, done: &TensorStats) -> Option<Stage> {
        done.stages.is_empty().then_some(Stage::Trim)
    }

    fn ranks(&self, t: &TensorPlan, tasks: usize, _st: &TensorStats) -> Vec<(usize, u64)> {
        (0..tasks)
            .filter_map(|k| threshold_rank(t.numel, self.density.get(k)).map(|r| (k, r)))
            .collect()
    }

    fn merge(&self, x: &ChunkIn, st: &TensorStats, s: Scratch, m: &mut [f32]) {
        let (thr, count) = st.trim(0);
        let stats = TiesStats::new(thr.to_vec(), count);
        crate::pipeline::grow(s.a, x.n);
        crate::pipeline::grow(s.b, x.n);
        crate::simd!(merge(x.deltas, &stats, x.n, m, s.a, s.b));
    }
}

/// Statistics of one scope.
#[derive(Clone, Debug, PartialEq)]
pub struct TiesStats {
    /// Per task: entries with |τ| ≥ thr survive the trim.
    pub thr: Vec<f32>,
    /// sign of Σ over the scope of sign(Σ_t trimmed_t): used where an element's own sign is 0.
    pub majority: f32,
}

impl TiesStats {
    /// `count`: Σ over the scope of sign(Σ_t trimmed_t).
    pub fn new(thr: Vec<f32>, count: i64) -> TiesStats {
        TiesStats {
            thr,
            majority: count.signum() as f32,
        }
    }
}

/// The 0-based rank of the threshold in |τ| sorted ascending, or None when nothing is trimmed.
/// SPEC: kk = d − int(k·d), thr = the kk-th smallest (1-based).
pub fn threshold_rank(d: usize, density: f64) -> Option<u64> {
    let kk = d - int_frac(d, density).min(d);
    (kk > 0).then(|| kk as u64 - 1)
}

#[inline]
pub(super) fn trim(x: f32, thr: f32) -> f32 {
    x * f32::from(u8::from(x.abs() >= thr))
}

/// Σ_t trimmed_t into `s`.
#[inline(always)]
fn trimmed_sum<D: AsRef<[f32]>>(deltas: &[D], thr: &[f32], n: usize, s: &mut [f32]) {
    s[..n].fill(0.0);
    for (d, &t) in deltas.iter().zip(thr) {
        for (acc, &x) in s[..n].iter_mut().zip(&d.as_ref()[..n]) {
            *acc += trim(x, t);
        }
    }
}

/// torch.sign, branch-free: data signs are random, so a branch would mispredict half the time.
#[inline]
pub(super) fn sign(x: f32) -> f32 {
    f32::from(u8::from(x > 0.0)) - f32::from(u8::from(x < 0.0))
}

/// Σ over the chunk of sign(Σ_t trimmed_t), for the majority sign.
#[inline(always)]
pub fn sign_count<D: AsRef<[f32]>>(
    deltas: &[D],
    thr: &[f32],
    n: usize,
    scratch: &mut [f32],
) -> i64 {
    trimmed_sum(deltas, thr, n, scratch);
    scratch[..n]
        .iter()
        .map(|&v| i64::from(v > 0.0) - i64::from(v < 0.0))
        .sum()
}

/// The merged task vector of one chunk; `count` and `total` are chunk-sized scratch.
#[inline(always)]
pub fn merge<D: AsRef<[f32]>>(
    deltas: &[D],
    stats: &TiesStats,
    n: usize,
    m: &mut [f32],
    count: &mut [f32],
    total: &mut [f32],
) {
    // m holds the elected sign first, then the disjoint mean. Loops are task-outer, zipped and
    // branch-free (selects), so they vectorize; blocks keep their working set in L1.
    for start in (0..n).step_by(BLOCK) {
        let r = start..(start + BLOCK).min(n);
        let m = &mut m[r.clone()];
        // Each sum starts at 0 in the first task's loop (`0 + y`, the bits of adding into
        // zeros, −0 included) rather than in a memset per block (3 % of TIES's time, `perf`).
        if deltas.len().min(stats.thr.len()) == 0 {
            m.fill(0.0);
        }
        for (k, (d, &t)) in deltas.iter().zip(&stats.thr).enumerate() {
            for (acc, &x) in m.iter_mut().zip(&d.as_ref()[r.clone()]) {
                *acc = if k == 0 { 0.0 } else { *acc } + trim(x, t);
            }
        }
        let majority = stats.majority;
        for s in m.iter_mut() {
            let v = sign(*s);
            *s = v + majority * f32::from(u8::from(v == 0.0));
        }
        let (count, total) = (&mut count[..r.len()], &mut total[..r.len()]);
        if deltas.len().min(stats.thr.len()) == 0 {
            count.fill(0.0);
            total.fill(0.0);
        }
        for (k, (d, &t)) in deltas.iter().zip(&stats.thr).enumerate() {
            for (((c, acc), &s), &x) in count
                .iter_mut()
                .zip(total.iter_mut())
                .zip(m.iter())
                .zip(&d.as_ref()[r.clone()])
            {
                let x = trim(x, t);
                // x agrees with the elected sign s ∈ {−1, 0, 1} where x·s > 0: the same answer
                // as testing both signs for every x (±0, ±∞ and NaN included), with one multiply
                // and compare and no data-dependent branches.
                let keep = f32::from(u8::from(x * s > 0.0));
                let (from_acc, from_c) = if k == 0 { (0.0, 0.0) } else { (*acc, *c) };
                *acc = from_acc + keep * x;
                *c = from_c + keep;
            }
        }
        for ((v, &acc), &c) in m.iter_mut().zip(total.iter()).zip(count.iter()) {
            *v = acc / c.max(1.0);
        }
    }
}

/// Elements per block of the per-element loops: a few 16 KiB buffers fit L1.
pub(super) const BLOCK: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks() {
        assert_eq!(threshold_rank(10, 0.2), Some(7)); // kk = 8
        assert_eq!(threshold_rank(10, 1.0), None);
    }

    #[test]
    fn hand_case() {
        // Two tasks, thresholds keep |x| ≥ 2.
        let d = vec![vec![3.0, -1.0, 2.0, -2.0], vec![-4.0, 5.0, 2.0, 2.0]];
        let stats = TiesStats {
            thr: vec![2.0, 2.0],
            majority: 1.0,
        };
        // Scratch as the pipeline leaves it: stale values, which the merge must not read.
        let (mut m, mut c, mut t) = ([f32::NAN; 4], [7.0; 4], [-2.0; 4]);
        merge(&d, &stats, 4, &mut m, &mut c, &mut t);
        // [3,-4] → sign −1 → −4; [0,5] → 5; [2,2] → 2; [−2,2] → sum 0 → majority +1 → 2.
        assert_eq!(m, [-4.0, 5.0, 2.0, 2.0]);
    }
}
