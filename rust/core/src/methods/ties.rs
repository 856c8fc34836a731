//! TIES (trim, elect sign, disjoint mean). The threshold of the trim step and the majority sign
//! are statistics over the whole scope (the model, or one tensor), gathered by the pipeline:
//! the threshold exactly, by radix select over |τ|.

use super::kernel::{ChunkIn, Kernel, Scratch, Stage, TensorStats};
use super::{int_frac, DareParams, PerTask, Reader, Scope};
use crate::error::Result;
use crate::plan::TensorPlan;
use crate::select::key;

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
fn trim(x: f32, thr: f32) -> f32 {
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
fn sign(x: f32) -> f32 {
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
        m.fill(0.0);
        for (d, &t) in deltas.iter().zip(&stats.thr) {
            for (acc, &x) in m.iter_mut().zip(&d.as_ref()[r.clone()]) {
                *acc += trim(x, t);
            }
        }
        let majority = stats.majority;
        for s in m.iter_mut() {
            let v = sign(*s);
            *s = v + majority * f32::from(u8::from(v == 0.0));
        }
        let (count, total) = (&mut count[..r.len()], &mut total[..r.len()]);
        count.fill(0.0);
        total.fill(0.0);
        for (d, &t) in deltas.iter().zip(&stats.thr) {
            for (((c, acc), &s), &x) in count
                .iter_mut()
                .zip(total.iter_mut())
                .zip(m.iter())
                .zip(&d.as_ref()[r.clone()])
            {
                let x = trim(x, t);
                // Non-short-circuit operators and arithmetic selects: no data-dependent branches.
                let keep = f32::from(u8::from(((s > 0.0) & (x > 0.0)) | ((s < 0.0) & (x < 0.0))));
                *acc += keep * x;
                *c += keep;
            }
        }
        for ((v, &acc), &c) in m.iter_mut().zip(total.iter()).zip(count.iter()) {
            *v = acc / c.max(1.0);
        }
    }
}

/// Elements per block of the per-element loops: a few 16 KiB buffers fit L1.
const BLOCK: usize = 4096;

/// The majority-sign count, tallied during the threshold's windowed pass (before the thresholds
/// are known). With the key window [lo, hi] around task t's threshold, |τ_t| above the window
/// survives the trim for certain and below it is trimmed for certain, so every element whose
/// tasks all fall outside their windows is counted at once; the few with a task inside one are
/// kept (all T values) and counted by [`SignTally::resolve`] once the thresholds are known.
/// Past `cap` kept elements the tally gives up, and the caller runs the separate count pass.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct SignTally {
    count: i64,
    pending: Vec<f32>,
    cap: usize,
    overflow: bool,
}

impl SignTally {
    pub fn new(cap: usize) -> SignTally {
        SignTally {
            cap,
            ..SignTally::default()
        }
    }

    /// Tallies one chunk; `bounds` are the windows' inclusive key bounds per task (a window one
    /// key wide decides alone: the threshold is then that key). `sum` and `undecided` are
    /// chunk-sized scratch. A zero is decided wherever its key falls: trimmed or kept, it adds
    /// a zero of its own sign.
    #[inline(always)]
    pub fn observe<D: AsRef<[f32]>>(
        &mut self,
        deltas: &[D],
        bounds: &[(u32, u32)],
        n: usize,
        sum: &mut [f32],
        undecided: &mut [f32],
    ) {
        self.tally::<D, false>(deltas, bounds, n, sum, undecided, &mut []);
    }

    /// [`Self::observe`], and sets `marks[i]` to 1 where the chunk's M may still change with
    /// the exact statistics: a task's |τ| inside its window, or trimmed values that cancel to a
    /// zero sum (the element then takes the majority sign). Elsewhere M is the same for every
    /// threshold inside the windows and every majority sign.
    #[inline(always)]
    pub fn observe_marking<D: AsRef<[f32]>>(
        &mut self,
        deltas: &[D],
        bounds: &[(u32, u32)],
        n: usize,
        (sum, undecided): (&mut [f32], &mut [f32]),
        marks: &mut [u8],
    ) {
        self.tally::<D, true>(deltas, bounds, n, sum, undecided, marks);
    }

    #[inline(always)]
    fn tally<D: AsRef<[f32]>, const MARK: bool>(
        &mut self,
        deltas: &[D],
        bounds: &[(u32, u32)],
        n: usize,
        sum: &mut [f32],
        undecided: &mut [f32],
        marks: &mut [u8],
    ) {
        let mut nonzero = [0f32; BLOCK];
        for start in (0..n).step_by(BLOCK) {
            let r = start..(start + BLOCK).min(n);
            let (sum, undecided) = (&mut sum[..r.len()], &mut undecided[..r.len()]);
            sum.fill(0.0);
            undecided.fill(0.0);
            let nonzero = &mut nonzero[..r.len()];
            if MARK {
                nonzero.fill(0.0);
            }
            for (d, &(lo, hi)) in deltas.iter().zip(bounds) {
                let (proper, width) = (lo != hi, hi.wrapping_sub(lo));
                let d = &d.as_ref()[r.clone()];
                let step = |s: &mut f32, u: &mut f32, x: f32| {
                    let k = key(x.abs());
                    let kept = (k > hi) | (!proper & (k == lo));
                    // Multiplying by 0/1 reproduces trim() bit for bit, zeros' signs included.
                    *s += x * f32::from(u8::from(kept));
                    *u += f32::from(u8::from(
                        proper & (k.wrapping_sub(lo) <= width) & (x != 0.0),
                    ));
                    kept & (x != 0.0)
                };
                if MARK {
                    let cells = sum
                        .iter_mut()
                        .zip(undecided.iter_mut())
                        .zip(nonzero.iter_mut());
                    for (((s, u), z), &x) in cells.zip(d) {
                        *z += f32::from(u8::from(step(s, u, x)));
                    }
                } else {
                    for ((s, u), &x) in sum.iter_mut().zip(undecided.iter_mut()).zip(d) {
                        step(s, u, x);
                    }
                }
            }
            // Signs of decided elements, summed as integers (a float sum would not vectorize).
            let decided: i32 = sum
                .iter()
                .zip(undecided.iter())
                .map(|(&s, &u)| (i32::from(s > 0.0) - i32::from(s < 0.0)) * i32::from(u == 0.0))
                .sum();
            self.count += i64::from(decided);
            if MARK {
                for (((m, &s), &u), &z) in marks[r.clone()]
                    .iter_mut()
                    .zip(sum.iter())
                    .zip(undecided.iter())
                    .zip(nonzero.iter())
                {
                    *m |= u8::from((u != 0.0) | ((s == 0.0) & (z != 0.0)));
                }
            }
            if undecided.iter().fold(0u32, |a, u| a | u.to_bits()) == 0 {
                continue;
            }
            for (i, &u) in undecided.iter().enumerate() {
                if u != 0.0 {
                    self.keep(deltas.iter().map(|d| d.as_ref()[start + i]));
                }
            }
        }
    }

    fn keep(&mut self, values: impl Iterator<Item = f32>) {
        if self.overflow {
            return;
        }
        self.pending.extend(values);
        if self.pending.len() > self.cap {
            self.overflow = true;
            self.pending = Vec::new();
        }
    }

    pub fn merge(mut self, mut other: SignTally) -> SignTally {
        self.count += other.count;
        self.overflow |= other.overflow || self.pending.len() + other.pending.len() > self.cap;
        if self.overflow {
            self.pending = Vec::new();
        } else {
            self.pending.append(&mut other.pending);
        }
        self
    }

    /// The full count, given the thresholds; None when the tally overflowed.
    pub fn resolve(&self, thr: &[f32]) -> Option<i64> {
        if self.overflow || thr.is_empty() {
            return None;
        }
        let late: i64 = self
            .pending
            .chunks(thr.len())
            .map(|xs| {
                let s = xs
                    .iter()
                    .zip(thr)
                    .fold(0.0f32, |s, (&x, &t)| s + trim(x, t));
                sign(s) as i64
            })
            .sum();
        Some(self.count + late)
    }
}

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
        let (mut m, mut c, mut t) = ([0.0; 4], [0.0; 4], [0.0; 4]);
        merge(&d, &stats, 4, &mut m, &mut c, &mut t);
        // [3,-4] → sign −1 → −4; [0,5] → 5; [2,2] → 2; [−2,2] → sum 0 → majority +1 → 2.
        assert_eq!(m, [-4.0, 5.0, 2.0, 2.0]);
    }
}

#[cfg(test)]
mod tally_tests {
    use super::*;
    use proptest::prelude::*;

    /// Σ sign(Σ_t trim(x_t, thr_t)) straight from the definition.
    fn direct(deltas: &[Vec<f32>], thr: &[f32]) -> i64 {
        (0..deltas[0].len())
            .map(|i| {
                let s = deltas
                    .iter()
                    .zip(thr)
                    .fold(0.0f32, |s, (d, &t)| s + trim(d[i], t));
                sign(s) as i64
            })
            .sum()
    }

    fn tally(deltas: &[Vec<f32>], bounds: &[(u32, u32)], chunk: usize, cap: usize) -> SignTally {
        let n = deltas[0].len();
        let mut total = SignTally::new(cap);
        for start in (0..n).step_by(chunk) {
            let len = chunk.min(n - start);
            let part: Vec<Vec<f32>> = deltas
                .iter()
                .map(|d| d[start..start + len].to_vec())
                .collect();
            let mut t = SignTally::new(cap);
            let (mut s, mut u) = (vec![0.0; len], vec![0.0; len]);
            t.observe(&part, bounds, len, &mut s, &mut u);
            total = total.merge(t);
        }
        total
    }

    proptest! {
        // Small integers make exact cancellations (sum 0 → majority) and ties at thr common.
        #[test]
        fn matches_the_definition(
            values in prop::collection::vec(-6i8..=6, 3..600),
            thr_pick in prop::collection::vec(0u8..=6, 3),
            widen in 0u8..3,
            chunk in 1usize..100,
        ) {
            let n = values.len() / 3;
            let deltas: Vec<Vec<f32>> = (0..3).map(|t| values[t * n..(t + 1) * n].iter().map(|&v| v as f32 * 0.25).collect()).collect();
            let thr: Vec<f32> = thr_pick.iter().map(|&p| p as f32 * 0.25).collect();
            // Windows that contain each threshold, from one key wide to a few values wide.
            let bounds: Vec<(u32, u32)> = thr.iter().map(|&t| {
                let w = widen as f32 * 0.25;
                (key((t - w).max(0.0)), key(t + w))
            }).collect();
            let t = tally(&deltas, &bounds, chunk, usize::MAX);
            prop_assert_eq!(t.resolve(&thr), Some(direct(&deltas, &thr)));
        }
    }

    proptest! {
        // The fused pass writes unmarked elements once, with guessed statistics: their M must
        // be the same under any thresholds inside the windows and any majority sign.
        #[test]
        fn unmarked_elements_are_settled(
            values in prop::collection::vec(-6i8..=6, 3..600),
            picks in prop::collection::vec((0u8..=6, 0u8..3, 0u8..3, 0u8..3), 3),
            chunk in 1usize..100,
        ) {
            let n = values.len() / 3;
            let deltas: Vec<Vec<f32>> = (0..3).map(|t| values[t * n..(t + 1) * n].iter().map(|&v| v as f32 * 0.25).collect()).collect();
            // Per task a window [c − lo, c + hi] and two thresholds inside it.
            let q = |x: u8| x as f32 * 0.25;
            let lo: Vec<f32> = picks.iter().map(|p| (q(p.0) - q(p.1)).max(0.0)).collect();
            let hi: Vec<f32> = picks.iter().map(|p| q(p.0) + q(p.2)).collect();
            let bounds: Vec<(u32, u32)> = lo.iter().zip(&hi).map(|(&l, &h)| (key(l), key(h))).collect();
            let thr_a: Vec<f32> = lo.clone();
            let thr_b: Vec<f32> = lo.iter().zip(&hi).zip(&picks).map(|((&l, &h), p)| (l + q(p.3)).min(h)).collect();
            let mut marks = vec![0u8; n];
            for start in (0..n).step_by(chunk) {
                let len = chunk.min(n - start);
                let part: Vec<&[f32]> = deltas.iter().map(|d| &d[start..start + len]).collect();
                let (mut s, mut u) = (vec![0.0; len], vec![0.0; len]);
                SignTally::new(usize::MAX).observe_marking(&part, &bounds, len, (&mut s, &mut u), &mut marks[start..start + len]);
            }
            let m = |thr: &[f32], majority: f32| {
                let stats = TiesStats { thr: thr.to_vec(), majority };
                let (mut m, mut c, mut t) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
                merge(&deltas, &stats, n, &mut m, &mut c, &mut t);
                m
            };
            let (a, b) = (m(&thr_a, 1.0), m(&thr_b, -1.0));
            for i in 0..n {
                if marks[i] == 0 {
                    prop_assert_eq!(a[i].to_bits(), b[i].to_bits(), "element {}", i);
                }
            }
        }
    }

    #[test]
    fn overflow_declines() {
        let deltas = vec![vec![1.0f32; 100], vec![-1.0; 100]];
        let bounds = vec![(key(0.5), key(2.0)); 2];
        let t = tally(&deltas, &bounds, 7, 10);
        assert_eq!(t.resolve(&[1.0, 1.0]), None);
        let t = tally(&deltas, &bounds, 7, 1000);
        assert_eq!(t.resolve(&[1.0, 1.0]), Some(0));
        assert_eq!(t.resolve(&[1.0, 1.5]), Some(100));
    }
}
