//! TIES's majority sign, tallied in the threshold's own windowed pass, before the thresholds
//! are known, so that the statistics take one pass over the inputs, not two.
//!
//! With the key window [lo, hi] around task t's threshold, |τ_t| above the window survives the
//! trim for certain and below it is trimmed for certain, so an element whose tasks all fall
//! outside their windows is counted at once. An element with one task inside its window (nearly
//! every undecided one: windows are narrow) has two possible signs, trimmed or kept; it is
//! counted as trimmed, and where keeping would change its sign, that change is set aside under
//! the task's key (4 bytes), to be added once the threshold says whether the key is kept. Only
//! elements with several tasks inside their windows keep all T values. Without the flips, an
//! element held T values, and on DARE-TIES's wide windows (its dropped zeros make the sample's
//! quantile coarse) the tally overflowed and cost a third pass over the inputs.

use super::ties::{sign, trim, BLOCK};
use crate::select::key;

/// The sign changes a flip can record, in the order of [`SignTally::flips`]' lists.
const CHANGES: [i64; 4] = [-2, -1, 1, 2];

/// The majority-sign count of one parameter set: what is decided, the flips of elements with
/// one task inside its window, and the values of those with several. Past `cap` held values
/// and flips together the tally gives up, and the caller runs the separate count pass.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct SignTally {
    count: i64,
    /// Per task, per sign change in [`CHANGES`] order: the keys of |τ_t| whose element changes
    /// sign by that much if τ_t survives the trim (the element is counted trimmed in `count`).
    flips: Vec<[Vec<u32>; 4]>,
    /// All T values of each element with several tasks inside their windows.
    pending: Vec<f32>,
    /// Flips and pending values held, against `cap`.
    held: usize,
    /// Per task, its window [lo, hi] where the select counts that window's keys instead of
    /// keeping them ([`crate::select::Windows::densified`]: the model is too large for them);
    /// the task's flips are then summed per key in `counts`, not kept.
    #[serde(default)]
    counted: Vec<Option<(u32, u32)>>,
    /// Per counted task, the sign changes summed per key of [lo, hi] (allocated on first use).
    #[serde(default)]
    counts: Vec<Vec<i64>>,
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

    /// This tally, summing per key the flips of the tasks whose windows are given (see
    /// `counted`): memory by the windows' spans, not by the elements in them.
    pub fn counting(mut self, windows: Vec<Option<(u32, u32)>>) -> SignTally {
        self.counts = vec![Vec::new(); windows.len()];
        self.counted = windows;
        self
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
        if narrow(bounds) {
            self.tally::<D, false, true>(deltas, bounds, n, sum, undecided, &mut []);
        } else {
            self.tally::<D, false, false>(deltas, bounds, n, sum, undecided, &mut []);
        }
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
        if narrow(bounds) {
            self.tally::<D, true, true>(deltas, bounds, n, sum, undecided, marks);
        } else {
            self.tally::<D, true, false>(deltas, bounds, n, sum, undecided, marks);
        }
    }

    /// `NARROW`: every window is one key wide ([`narrow`]), so no element is undecided and the
    /// loop carries no count of them (bf16 fine-tunes' coarse deltas give such windows).
    #[inline(always)]
    fn tally<D: AsRef<[f32]>, const MARK: bool, const NARROW: bool>(
        &mut self,
        deltas: &[D],
        bounds: &[(u32, u32)],
        n: usize,
        sum: &mut [f32],
        undecided: &mut [f32],
        marks: &mut [u8],
    ) {
        let mut nonzero = [0f32; BLOCK];
        // The sum with the values inside their windows kept (not NARROW).
        let mut kept_sum = [0f32; BLOCK];
        for start in (0..n).step_by(BLOCK) {
            let r = start..(start + BLOCK).min(n);
            let (sum, undecided) = (&mut sum[..r.len()], &mut undecided[..r.len()]);
            let (nonzero, kept_sum) = (&mut nonzero[..r.len()], &mut kept_sum[..r.len()]);
            if deltas.len().min(bounds.len()) == 0 {
                sum.fill(0.0);
                undecided.fill(0.0);
                nonzero.fill(0.0);
                kept_sum.fill(0.0);
            }
            for (k, (d, &(lo, hi))) in deltas.iter().zip(bounds).enumerate() {
                let (proper, width) = (lo != hi, hi.wrapping_sub(lo));
                let d = &d.as_ref()[r.clone()];
                // Each sum starts at 0 in the first task's loop (`0 + y`, the bits of adding
                // into zeros) rather than in a memset per block.
                let first = k == 0;
                let from = |v: &f32| if first { 0.0 } else { *v };
                if !NARROW && !proper {
                    // This task's window is one key wide: none of its values is undecided, so
                    // it adds the same kept value to both sums and nothing to the count of
                    // tasks inside (per-tensor windows are often so for some tasks).
                    if first {
                        undecided.fill(0.0);
                    }
                    let step = |s: &mut f32, ks: &mut f32, x: f32| {
                        let kept = key(x.abs()) >= lo;
                        let v = x * f32::from(u8::from(kept));
                        *s = from(s) + v;
                        *ks = from(ks) + v;
                        kept & (x != 0.0)
                    };
                    let cells = sum.iter_mut().zip(kept_sum.iter_mut());
                    if MARK {
                        for (((s, ks), z), &x) in cells.zip(nonzero.iter_mut()).zip(d) {
                            *z = from(z) + f32::from(u8::from(step(s, ks, x)));
                        }
                    } else {
                        for ((s, ks), &x) in cells.zip(d) {
                            step(s, ks, x);
                        }
                    }
                    continue;
                }
                let step = |s: &mut f32, u: &mut f32, ks: &mut f32, x: f32| {
                    let k = key(x.abs());
                    // One key wide (lo = hi): kept from that key up.
                    let kept = if NARROW {
                        k >= lo
                    } else {
                        (k > hi) | (!proper & (k == lo))
                    };
                    // Multiplying by 0/1 reproduces trim() bit for bit, zeros' signs included.
                    *s = from(s) + x * f32::from(u8::from(kept));
                    if !NARROW {
                        let within = proper & (k.wrapping_sub(lo) <= width) & (x != 0.0);
                        *u = from(u) + f32::from(u8::from(within));
                        *ks = from(ks) + x * f32::from(u8::from(kept | within));
                    }
                    kept & (x != 0.0)
                };
                let cells = (sum.iter_mut().zip(undecided.iter_mut())).zip(kept_sum.iter_mut());
                if MARK {
                    for ((((s, u), ks), z), &x) in cells.zip(nonzero.iter_mut()).zip(d) {
                        *z = from(z) + f32::from(u8::from(step(s, u, ks, x)));
                    }
                } else {
                    for (((s, u), ks), &x) in cells.zip(d) {
                        step(s, u, ks, x);
                    }
                }
            }
            // Signs of decided elements, summed as integers (a float sum would not vectorize).
            let signum = |s: f32| i32::from(s > 0.0) - i32::from(s < 0.0);
            // An element with one task inside counts its trimmed sum's sign here; where keeping
            // that task changes the sign, the change is set aside below.
            let decided: i32 = if NARROW {
                sum.iter().map(|&s| signum(s)).sum()
            } else {
                (sum.iter().zip(undecided.iter()))
                    .map(|(&s, &u)| signum(s) * i32::from(u <= 1.0))
                    .sum()
            };
            self.count += i64::from(decided);
            if MARK && NARROW {
                for ((m, &s), &z) in marks[r.clone()]
                    .iter_mut()
                    .zip(sum.iter())
                    .zip(nonzero.iter())
                {
                    *m |= u8::from((s == 0.0) & (z != 0.0));
                }
            } else if MARK {
                for (((m, &s), &u), &z) in marks[r.clone()]
                    .iter_mut()
                    .zip(sum.iter())
                    .zip(undecided.iter())
                    .zip(nonzero.iter())
                {
                    *m |= u8::from((u != 0.0) | ((s == 0.0) & (z != 0.0)));
                }
            }
            if NARROW || undecided.iter().fold(0u32, |a, u| a | u.to_bits()) == 0 {
                continue;
            }
            // A mask per 16 elements, its set bits visited: a branch per element whose sign its
            // one inside task changes or with several inside, not one per element (they are a
            // few percent, at random places). Elements with one task inside that keep their
            // sign either way are settled by the count above.
            let visit =
                |u: f32, s: f32, ks: f32| (u > 1.0) | ((u == 1.0) & (signum(ks) != signum(s)));
            let groups = (undecided.chunks(16).zip(sum.chunks(16))).zip(kept_sum.chunks(16));
            for (g, ((us, ss), ks)) in groups.enumerate() {
                let mut mask = (us.iter().zip(ss).zip(ks))
                    .enumerate()
                    .fold(0u32, |m, (j, ((&u, &s), &k))| {
                        m | (u32::from(visit(u, s, k)) << j)
                    });
                while mask != 0 {
                    let i = g * 16 + mask.trailing_zeros() as usize;
                    mask &= mask - 1;
                    let change = i64::from(signum(kept_sum[i]) - signum(sum[i]));
                    self.undecided(deltas, bounds, start + i, undecided[i] == 1.0, change);
                }
            }
        }
    }

    /// One element with some task inside its window, from its values again (such elements are
    /// few, so the vectorized loop above does not carry what only they need): with `one` task
    /// inside, its sign's `change` if that task survives the trim is set aside under the task's
    /// key; with several, all T values are held.
    #[cold]
    fn undecided<D: AsRef<[f32]>>(
        &mut self,
        deltas: &[D],
        bounds: &[(u32, u32)],
        i: usize,
        one: bool,
        change: i64,
    ) {
        if self.overflow {
            return;
        }
        if !one {
            self.pending.extend(deltas.iter().map(|d| d.as_ref()[i]));
            self.hold(deltas.len());
            return;
        }
        let inside = deltas
            .iter()
            .zip(bounds)
            .enumerate()
            .find_map(|(t, (d, &(lo, hi)))| {
                let x = d.as_ref()[i];
                let k = key(x.abs());
                let within = (lo != hi) & (k.wrapping_sub(lo) <= hi.wrapping_sub(lo)) & (x != 0.0);
                within.then_some((t, k))
            });
        let Some((t, k)) = inside else { return };
        if let Some(&Some((lo, hi))) = self.counted.get(t) {
            let c = &mut self.counts[t];
            if c.is_empty() {
                *c = vec![0; (hi - lo) as usize + 1];
            }
            c[(k - lo) as usize] += change;
        } else if let Some(j) = CHANGES.iter().position(|&c| c == change) {
            if self.flips.len() < deltas.len() {
                self.flips.resize_with(deltas.len(), Default::default);
            }
            self.flips[t][j].push(k);
            self.hold(1);
        }
    }

    fn hold(&mut self, n: usize) {
        self.held += n;
        if self.held > self.cap {
            self.overflow = true;
            self.pending = Vec::new();
            self.flips = Vec::new();
        }
    }

    pub fn merge(mut self, mut other: SignTally) -> SignTally {
        self.count += other.count;
        self.held += other.held;
        self.overflow |= other.overflow || self.held > self.cap;
        if self.overflow {
            self.pending = Vec::new();
            self.flips = Vec::new();
        } else {
            self.pending.append(&mut other.pending);
            if self.flips.len() < other.flips.len() {
                self.flips.resize_with(other.flips.len(), Default::default);
            }
            for (mine, theirs) in self.flips.iter_mut().zip(&mut other.flips) {
                for (a, b) in mine.iter_mut().zip(theirs) {
                    a.append(b);
                }
            }
            if self.counted.is_empty() {
                self.counted = other.counted;
                self.counts = vec![Vec::new(); self.counted.len()];
            }
            for (a, b) in self.counts.iter_mut().zip(other.counts) {
                if a.is_empty() {
                    *a = b;
                } else {
                    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                }
            }
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
        // A flip's key is kept where |τ| >= thr, i.e. where its key is at least thr's.
        let flips: i64 = self
            .flips
            .iter()
            .zip(thr)
            .map(|(lists, &t)| {
                let at = key(t);
                lists
                    .iter()
                    .zip(CHANGES)
                    .map(|(keys, c)| c * keys.iter().filter(|&&k| k >= at).count() as i64)
                    .sum::<i64>()
            })
            .sum();
        // A counted task's keys from thr's key up are kept.
        let counted: i64 = (self.counted.iter().zip(&self.counts).zip(thr))
            .map(|((w, c), &t)| match w {
                Some((lo, _)) if !c.is_empty() => {
                    let from = key(t).saturating_sub(*lo) as usize;
                    c.iter().skip(from).sum::<i64>()
                }
                _ => 0,
            })
            .sum();
        Some(self.count + flips + counted + late)
    }
}

/// Whether every window is one key wide.
fn narrow(bounds: &[(u32, u32)]) -> bool {
    bounds.iter().all(|&(lo, hi)| lo == hi)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::ties::{merge, TiesStats};
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
        tally_counting(deltas, bounds, chunk, cap, &[])
    }

    /// [`tally`], the flips of the tasks `counted` names summed per key.
    fn tally_counting(
        deltas: &[Vec<f32>],
        bounds: &[(u32, u32)],
        chunk: usize,
        cap: usize,
        counted: &[bool],
    ) -> SignTally {
        let n = deltas[0].len();
        let new = || {
            let windows = (counted.iter().zip(bounds))
                .map(|(&c, &b)| c.then_some(b))
                .collect();
            SignTally::new(cap).counting(windows)
        };
        let mut total = new();
        for start in (0..n).step_by(chunk) {
            let len = chunk.min(n - start);
            let part: Vec<Vec<f32>> = deltas
                .iter()
                .map(|d| d[start..start + len].to_vec())
                .collect();
            let mut t = new();
            // Scratch as the pipeline leaves it: stale values, which the tally must not read.
            let (mut s, mut u) = (vec![f32::NAN; len], vec![-3.0; len]);
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
            narrow in any::<bool>(),
        ) {
            // Half the cases with every window one key wide (the loop's narrow copy).
            let picks: Vec<_> = picks.into_iter().map(|p| if narrow { (p.0, 0, 0, 0) } else { p }).collect();
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
                let (mut s, mut u) = (vec![f32::NAN; len], vec![-3.0; len]);
                SignTally::new(usize::MAX).observe_marking(&part, &bounds, len, (&mut s, &mut u), &mut marks[start..start + len]);
            }
            let m = |thr: &[f32], majority: f32| {
                let stats = TiesStats { thr: thr.to_vec(), majority };
                let (mut m, mut c, mut t) = (vec![f32::NAN; n], vec![7.0; n], vec![-2.0; n]);
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

    #[test]
    fn one_task_inside_holds_one_key() {
        // Task 0 inside its window everywhere, task 1 decided (kept): each element's sign hangs
        // on task 0 alone, so it holds one key, not both values. 100 elements fit a cap of 100
        // (two values each would not).
        let deltas = vec![vec![-3.0f32; 100], vec![2.0; 100]];
        let bounds = vec![(key(2.5), key(4.0)), (key(1.0), key(1.0))];
        let t = tally(&deltas, &bounds, 7, 100);
        assert_eq!(t.resolve(&[3.0, 1.0]), Some(-100)); // kept: −3 + 2 < 0
        assert_eq!(t.resolve(&[3.5, 1.0]), Some(100)); // trimmed: 0 + 2 > 0
        assert_eq!(tally(&deltas, &bounds, 7, 99).resolve(&[3.0, 1.0]), None);
    }

    proptest! {
        // Values of far apart magnitudes, so the trimmed sums round (1e8 + 1 − 1e8 is 0 in f32):
        // the sign must be the rounded sum's, in task order, as the merge pass computes it.
        #[test]
        fn rounding_sums_match_the_definition(
            picks in prop::collection::vec(0usize..9, 3..600),
            thr_pick in prop::collection::vec(0usize..9, 3),
            chunk in 1usize..100,
            counted in prop::collection::vec(any::<bool>(), 3),
        ) {
            const V: [f32; 9] = [0.0, 1.0, -1.0, 3.0, -3.0, 1e8, -1e8, 2e8, -1.5e8];
            let n = picks.len() / 3;
            let deltas: Vec<Vec<f32>> = (0..3).map(|t| picks[t * n..(t + 1) * n].iter().map(|&p| V[p]).collect()).collect();
            let thr: Vec<f32> = thr_pick.iter().map(|&p| V[p].abs()).collect();
            // Windows from half to twice the threshold: values of other magnitudes decided.
            let bounds: Vec<(u32, u32)> = thr.iter().map(|&t| (key(t * 0.5), key(t * 2.0 + 1.0))).collect();
            let t = tally(&deltas, &bounds, chunk, usize::MAX);
            prop_assert_eq!(t.resolve(&thr), Some(direct(&deltas, &thr)));
            // Flips summed per key where the select counts a window's keys (at scale; only
            // windows of a few keys here: the sums are allocated by the span).
            let counted: Vec<bool> = counted.iter().zip(&bounds).map(|(&c, &(lo, hi))| c & (hi - lo < 1 << 16)).collect();
            let t = tally_counting(&deltas, &bounds, chunk, usize::MAX, &counted);
            prop_assert_eq!(t.resolve(&thr), Some(direct(&deltas, &thr)));
        }
    }

    proptest! {
        // Values 1 + level · 2^-20 of either sign (or 0), windows a few levels wide: spans of
        // a few hundred keys, so every task's flips may be summed per key.
        #[test]
        fn counted_flips_match_the_definition(
            picks in prop::collection::vec((0u16..40, 0u8..3), 3..600),
            windows in prop::collection::vec((0u16..40, 0u16..6, 0u16..6, 0u16..12), 3),
            chunk in 1usize..100,
            counted in prop::collection::vec(any::<bool>(), 3),
        ) {
            let level = |l: u16| 1.0 + f32::from(l) * (1.0 / 1_048_576.0);
            let n = picks.len() / 3;
            let deltas: Vec<Vec<f32>> = (0..3)
                .map(|t| picks[t * n..(t + 1) * n].iter().map(|&(l, s)| [0.0, level(l), -level(l)][s as usize]).collect())
                .collect();
            // Per task a window [c − a, c + b] and a threshold inside it.
            let bounds: Vec<(u32, u32)> = windows.iter().map(|&(c, a, b, _)| (key(level(c.saturating_sub(a))), key(level(c + b)))).collect();
            let thr: Vec<f32> = windows.iter().map(|&(c, a, b, p)| {
                let lo = c.saturating_sub(a);
                level(lo + p % (c + b - lo + 1))
            }).collect();
            let t = tally_counting(&deltas, &bounds, chunk, usize::MAX, &counted);
            prop_assert_eq!(t.resolve(&thr), Some(direct(&deltas, &thr)));
        }
    }

    #[test]
    fn counted_flips_hold_nothing() {
        // As one_task_inside_holds_one_key, task 0's flips summed per key: a cap of 0 holds.
        let deltas = vec![vec![-3.0f32; 100], vec![2.0; 100]];
        let bounds = vec![(key(2.5), key(4.0)), (key(1.0), key(1.0))];
        let t = tally_counting(&deltas, &bounds, 7, 0, &[true, false]);
        assert_eq!(t.resolve(&[3.0, 1.0]), Some(-100));
        assert_eq!(t.resolve(&[3.5, 1.0]), Some(100));
    }
}
