//! The statistics passes: the exact order statistics TIES and PCB need (a windowed pass guided
//! by a sample, falling back to a two-pass radix select), and TIES's majority sign, tallied in
//! the same windowed pass where the sampled windows allow.

use std::collections::BTreeMap;

use crate::error::Result;
use crate::methods::breadcrumbs::Piece;
use crate::methods::sign_tally::SignTally;
use crate::pipeline::sample::{trim_floor, FLOOR};
use crate::pipeline::{Engine, Stats, Work};
use crate::plan::Chunk;
use crate::select::{key, unkey, Buckets, Hist, Request, SampleRow, Score, Windowed, Windows};

/// How much of the model a select's window covers, which sets what a missed window costs and
/// so how wide the windows are placed ([`Reach::sigmas`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reach {
    /// A statistic of the whole model (the global TIES's thresholds): a miss reads every input
    /// again, twice (the radix select) and once more for a sign count.
    Model,
    /// One tensor's (a per-tensor trim, mergekit's cuts): a miss reads that tensor alone again.
    Tensor,
}

impl Reach {
    /// The window widths a select tries, in binomial standard deviations of the sample's count
    /// below the rank (times its design effect), widest first ([`Engine::guess_from`]).
    ///
    /// Why narrower for a tensor: the windowed pass keeps every key inside a window, and the
    /// sign tally handles each element with a task inside apart, so a window's width is paid
    /// on every pass, while a miss there costs a few passes over one tensor, about a hundredth
    /// of the model on the 0.5 B bench set (101 tensors). At 3σ a rank misses with probability
    /// 3e-3 per request (about one tensor in a hundred, its radix select and sign count: three
    /// passes over it); the 6σ windows
    /// it had made TIES at scope=tensor's statistics 1.43-1.63 s against 1.05-1.15 s at 3σ on
    /// that set, with no miss at either (bf16 deltas: the threshold's key is shared by ~1 %
    /// of a tensor's values, and narrower windows cover fewer of its neighbours).
    fn sigmas(self) -> &'static [f64] {
        match self {
            Reach::Model => &[6.0, 4.0, 3.0],
            Reach::Tensor => &[3.0],
        }
    }
}

/// What a sample tells about the wanted order statistics.
pub(crate) enum Guess {
    Exact(Vec<f32>),
    Window(Windows),
}

/// A scope's sorted sample, per row, and its count of values.
pub(crate) type ScopeSample = (Vec<SampleRow>, u64);

/// A scope's sorted sample (per row) and its count of values, kept by the one-read path when
/// it declines a run (its windows would hold too much) so that the statistics passes need not
/// read it again: on inputs bigger than memory a sample is thousands of random reads.
pub(crate) struct SpareSample {
    key: (usize, usize, usize, Vec<usize>),
    samples: Vec<SampleRow>,
    total: u64,
}

impl SpareSample {
    pub(crate) fn new(
        chunks: &[Chunk],
        n_rows: usize,
        variants: &[usize],
        (samples, total): (Vec<SampleRow>, u64),
    ) -> SpareSample {
        SpareSample {
            key: Self::key(chunks, n_rows, variants),
            samples,
            total,
        }
    }

    /// The same chunk list, row count and variants: the same rows sampled at the same places.
    fn key(
        chunks: &[Chunk],
        n_rows: usize,
        variants: &[usize],
    ) -> (usize, usize, usize, Vec<usize>) {
        (
            chunks.as_ptr() as usize,
            chunks.len(),
            n_rows,
            variants.to_vec(),
        )
    }
}

impl Engine<'_> {
    /// The statistics of every parameter set, gathered in shared passes (the methods' requests,
    /// scheduled by `pipeline/kernel.rs`).
    pub(crate) fn statistics(&self, merge: &[Chunk], chunk_size: usize) -> Result<Vec<Stats>> {
        let mut stats: Vec<Stats> = (0..self.recipe.sets.len())
            .map(|_| Stats::default())
            .collect();
        self.kernel_stats(merge, chunk_size, &mut stats)?;
        Ok(stats)
    }

    /// Groups sets whose deltas are the same (same weights and DARE; mergekit's methods all
    /// read the unweighted deltas): (variant of each set, a representative set per variant).
    pub(crate) fn variants(&self, sets: &[usize]) -> (Vec<usize>, Vec<usize>) {
        let key = |j: usize| {
            let s = &self.recipe.sets[j];
            match &s.method {
                m if m.unweighted() => (None, None),
                m => (
                    self.own_weights[j].then(|| self.weights[j].clone()),
                    m.dare().cloned(),
                ),
            }
        };
        let mut reps: Vec<usize> = Vec::new();
        let of = sets
            .iter()
            .map(|&j| match reps.iter().position(|&r| key(r) == key(j)) {
                Some(v) => v,
                None => {
                    reps.push(j);
                    reps.len() - 1
                }
            })
            .collect();
        (of, reps)
    }

    /// The rows of [`Engine::ties_stats`]' select for `sets`: |deltas| of each variant
    /// ([`Engine::variants`]), task by task; and how many there are.
    pub(crate) fn trim_rows(&self, sets: &[usize]) -> (Vec<usize>, usize) {
        let (_, reps) = self.variants(sets);
        let n_rows = reps.len() * self.tasks();
        (reps, n_rows)
    }

    /// Emits |deltas| of every variant, task by task, as rows `v·T + t`: the deltas, scored by
    /// magnitude ([`Score`]).
    pub(crate) fn emit_abs(
        &self,
        w: &mut Work,
        c: &Chunk,
        reps: &[usize],
        emit: &mut crate::stats::Emit,
    ) {
        let (n, tasks) = (c.len, self.tasks());
        for (v, &j) in reps.iter().enumerate() {
            let src = self.set_deltas(w, j, c);
            for (t, x) in w.src(src).iter().enumerate() {
                emit(v * tasks + t, &x[..n], Score::Magnitude, 0);
            }
        }
    }

    /// Trim thresholds (per set, task `t`'s at the rank `ranks` gives it; 0 where none) and
    /// majority-sign tallies of every set over one scope, in shared passes: one windowed pass
    /// finds the thresholds and tallies the signs together where the sampled windows allow.
    /// `drawn`: the scope's sample of [`Engine::trim_rows`]' rows and its count of values,
    /// where the caller drew it (with other scopes' in a shared pass); else it is drawn here.
    pub(crate) fn ties_stats(
        &self,
        chunks: &[Chunk],
        sets: &[usize],
        ranks: &[Vec<(usize, u64)>],
        (drawn, reach): (Option<ScopeSample>, Reach),
    ) -> Result<Vec<(Vec<f32>, i64)>> {
        let tasks = self.tasks();
        let (of, reps) = self.variants(sets);
        let mut requests = Vec::new();
        let mut slot: Vec<Vec<Option<usize>>> = vec![vec![None; tasks]; sets.len()];
        for (k, ranks) in ranks.iter().enumerate() {
            for &(t, rank) in ranks {
                slot[k][t] = Some(requests.len());
                requests.push(Request {
                    row: of[k] * tasks + t,
                    rank,
                });
            }
        }
        let thresholds = |v: &[f32]| -> Vec<Vec<f32>> {
            slot.iter()
                .map(|s| s.iter().map(|o| o.map_or(0.0, |i| v[i])).collect())
                .collect()
        };
        let finish = |thr: Vec<Vec<f32>>, counts: Vec<i64>| -> Vec<(Vec<f32>, i64)> {
            thr.into_iter().zip(counts).collect()
        };
        let n_rows = reps.len() * tasks;
        let rows = &|w: &mut Work, c: &Chunk, _floor: Floor, emit: &mut crate::stats::Emit| {
            self.emit_abs(w, c, &reps, emit)
        };
        if requests.is_empty() {
            let thr = thresholds(&[]);
            let counts = self.sign_counts(chunks, &of, &reps, &thr)?;
            return Ok(finish(thr, counts));
        }
        let guess = match drawn {
            Some((s, total)) => Self::guess_counting(&s, total, requests.clone(), reach),
            None => self.guess_trim(chunks, n_rows, requests.clone(), rows, (&reps, reach))?,
        };
        let windows = match guess {
            Some(Guess::Exact(v)) => {
                let thr = thresholds(&v);
                let counts = self.sign_counts(chunks, &of, &reps, &thr)?;
                return Ok(finish(thr, counts));
            }
            Some(Guess::Window(windows)) => windows,
            None => {
                let thr = thresholds(&self.radix_select(chunks, n_rows, requests, rows)?);
                let counts = self.sign_counts(chunks, &of, &reps, &thr)?;
                return Ok(finish(thr, counts));
            }
        };
        // Per set, the window bounds of each task (one key wide at 0 where nothing is trimmed).
        let zero = key(0.0);
        let bounds: Vec<Vec<(u32, u32)>> = slot
            .iter()
            .map(|s| {
                s.iter()
                    .map(|o| o.map_or((zero, zero), |i| windows.bounds[i]))
                    .collect()
            })
            .collect();
        // One pass finds the thresholds and tallies the majority signs together.
        let (acc, tallies) = self.pass_shared(
            chunks,
            || {
                let tallies = (slot.iter())
                    .map(|s| {
                        let dense = |i: usize| windows.dense[i].then_some(windows.bounds[i]);
                        let counted = s.iter().map(|o| o.and_then(dense)).collect();
                        SignTally::new(windows.tally_cap() * tasks).counting(counted)
                    })
                    .collect::<Vec<_>>();
                (windows.acc(), tallies)
            },
            #[inline(always)]
            |w, c, (acc, tallies)| {
                let n = c.len;
                for (v, &j) in reps.iter().enumerate() {
                    let src = self.set_deltas(w, j, c);
                    let p = w.parts(src);
                    for (t, x) in p.deltas.iter().enumerate() {
                        crate::simd!(acc.count_abs(&windows, v * tasks + t, &x[..n]));
                    }
                    for (k, tally) in tallies.iter_mut().enumerate() {
                        if of[k] == v {
                            let (d, sum, undecided) = (p.deltas, &mut *p.scratch, &mut *p.m);
                            crate::simd!(tally.observe(d, &bounds[k], n, sum, undecided));
                        }
                    }
                }
                Ok(())
            },
            |(a, x), (b, y)| {
                let t = x.into_iter().zip(y).map(|(p, q)| p.merge(q)).collect();
                (a.merge(b), t)
            },
            false,
        )?;
        self.debug_windows(&windows, &acc);
        let Some(v) = acc.finish(&windows) else {
            // A threshold outside its window: the tallies decided elements on a wrong premise.
            let thr = thresholds(&self.radix_select(chunks, n_rows, requests, rows)?);
            let counts = self.sign_counts(chunks, &of, &reps, &thr)?;
            return Ok(finish(thr, counts));
        };
        let thr = thresholds(&v);
        let resolved: Option<Vec<i64>> = tallies
            .iter()
            .zip(&thr)
            .map(|(t, thr)| t.resolve(thr))
            .collect();
        let counts = match resolved {
            Some(c) => c,
            None => self.sign_counts(chunks, &of, &reps, &thr)?,
        };
        Ok(finish(thr, counts))
    }

    /// Σ over the scope of sign(Σ_t trimmed_t), for every set: a pass of its own.
    pub(crate) fn sign_counts(
        &self,
        chunks: &[Chunk],
        of: &[usize],
        reps: &[usize],
        thr: &[Vec<f32>],
    ) -> Result<Vec<i64>> {
        self.pass_shared(
            chunks,
            || vec![0i64; thr.len()],
            #[inline(always)]
            |w, c, acc| {
                for (v, &j) in reps.iter().enumerate() {
                    let src = self.set_deltas(w, j, c);
                    let p = w.parts(src);
                    for (k, a) in acc.iter_mut().enumerate() {
                        if of[k] == v {
                            *a += crate::methods::ties::sign_count(
                                p.deltas, &thr[k], c.len, p.scratch,
                            );
                        }
                    }
                }
                Ok(())
            },
            |a, b| a.into_iter().zip(b).map(|(x, y)| x + y).collect(),
            false,
        )
    }

    /// Exact order statistics of per-task rows produced by `rows`: one windowed pass guided by
    /// a sample, or (when the guess misses) the two-pass radix select.
    pub(crate) fn select(
        &self,
        chunks: &[Chunk],
        n_rows: usize,
        requests: Vec<Request>,
        rows: Rows,
    ) -> Result<Vec<f32>> {
        let guess = self.guess(
            chunks,
            n_rows,
            requests.clone(),
            rows,
            (FLOOR, Reach::Model),
        )?;
        let windows = match guess {
            Some(Guess::Exact(v)) => return Ok(v),
            Some(Guess::Window(windows)) => windows,
            None => return self.radix_select(chunks, n_rows, requests, rows),
        };
        let floors = windows.floors(n_rows);
        let acc = self.rows_pass(
            chunks,
            rows,
            Some(&floors),
            || windows.acc(),
            #[inline(always)]
            |a, row, v, s, out| {
                a.count_scored(&windows, row, v, s);
                a.count_below(&windows, row, out);
            },
            |a, b| a.merge_capped(b, &windows),
        )?;
        self.debug_windows(&windows, &acc);
        match acc.finish(&windows) {
            Some(v) => Ok(v),
            None => self.radix_select(chunks, n_rows, requests, rows),
        }
    }

    /// A sample's guess at the requested order statistics: exact when the scope is small
    /// enough to be sampled whole, else windows for a one-pass select; None when the radix
    /// select is forced (tests set WEIGHTWEAVE_FORCE_RADIX to exercise the fallback, which
    /// small models would otherwise never reach).
    pub(crate) fn guess(
        &self,
        chunks: &[Chunk],
        n_rows: usize,
        requests: Vec<Request>,
        rows: Rows,
        (floor, reach): (u64, Reach),
    ) -> Result<Option<Guess>> {
        let sample = self.sample_scope(chunks, n_rows, rows, floor)?;
        Ok(sample.and_then(|(s, total)| Self::guess_counting(&s, total, requests, reach)))
    }

    /// [`Self::guess`] for TIES's trim thresholds over the deltas of `variants`: from the
    /// sample the one-read path left ([`SpareSample`]) where it is of these chunks and rows,
    /// else from a new one.
    pub(crate) fn guess_trim(
        &self,
        chunks: &[Chunk],
        n_rows: usize,
        requests: Vec<Request>,
        rows: Rows,
        (variants, reach): (&[usize], Reach),
    ) -> Result<Option<Guess>> {
        let key = SpareSample::key(chunks, n_rows, variants);
        let spare = self.spare_sample.lock().expect("not poisoned").take();
        match spare.filter(|s| s.key == key) {
            Some(s) => Ok(Self::guess_counting(&s.samples, s.total, requests, reach)),
            None => self.guess(chunks, n_rows, requests, rows, (trim_floor(chunks), reach)),
        }
    }

    /// [`Self::guess_from`], and where no windows fit the budget, the widest windows that count each
    /// key of their span instead of keeping the keys ([`Windows::densified`]): what a
    /// [`Windowed`] pass can take (the per-chunk counts of `select_many` and the one-read path
    /// cannot), so that the statistics stay one pass at any model size.
    pub(crate) fn guess_counting(
        samples: &[SampleRow],
        total: u64,
        requests: Vec<Request>,
        reach: Reach,
    ) -> Option<Guess> {
        // Tests set WEIGHTWEAVE_FORCE_DENSE to count every window that can be (small models
        // never need it).
        let forced = std::env::var_os("WEIGHTWEAVE_FORCE_DENSE").is_some();
        let fit = (!forced).then(|| Self::guess_from(samples, total, requests.clone(), reach));
        fit.flatten().or_else(|| {
            if samples.iter().map(|s| s.len() as u64).max() == Some(total) {
                return Self::guess_from(samples, total, requests, reach);
            }
            let sigmas = reach.sigmas()[0];
            let mut windows = Windows::from_sample(requests, samples, total, sigmas);
            if forced {
                windows.expected.iter_mut().for_each(|e| *e = f64::INFINITY);
            }
            let windows = windows.densified();
            windows.viable.then_some(Guess::Window(windows))
        })
    }

    /// [`Self::guess`] from the scope's sorted sample ([`Self::sample`]) of its `total`
    /// values.
    pub(crate) fn guess_from(
        samples: &[SampleRow],
        total: u64,
        requests: Vec<Request>,
        reach: Reach,
    ) -> Option<Guess> {
        if samples.iter().map(|s| s.len() as u64).max() == Some(total) {
            // The sorted sample is the data.
            return Some(Guess::Exact(
                requests
                    .iter()
                    .map(|r| unkey(samples[r.row][r.rank as usize]))
                    .collect(),
            ));
        }
        // Over the model, six binomial standard deviations each side, so a rank practically
        // never misses its window. From ~0.8 B values per row (the sample is capped, so a
        // window holds a fixed fraction of the row) those windows would hold more keys than
        // the memory budget, and narrower ones are taken: a rank misses a 4σ window with
        // probability 6e-5, a 3σ one 3e-3, and a miss costs one pass more than the radix
        // select's (the windowed pass), where a hit saves two. Windows that fit at none go
        // straight to radix. One tensor's select: [`Reach::sigmas`].
        reach.sigmas().iter().find_map(|&sigmas| {
            let windows = Windows::from_sample(requests.clone(), samples, total, sigmas);
            windows.viable.then_some(Guess::Window(windows))
        })
    }

    fn debug_windows(&self, windows: &Windows, acc: &Windowed) {
        if std::env::var_os("WEIGHTWEAVE_DEBUG").is_some() {
            eprintln!(
                "select: windows {:?} caps {:?} dense {:?} {}",
                windows.bounds,
                windows.caps,
                windows.dense,
                acc.describe()
            );
        }
    }

    /// The two-pass radix select: exact whatever the data.
    pub(crate) fn radix_select(
        &self,
        chunks: &[Chunk],
        n_rows: usize,
        requests: Vec<Request>,
        rows: Rows,
    ) -> Result<Vec<f32>> {
        let high = self.rows_pass(
            chunks,
            rows,
            None,
            || Hist::new(n_rows),
            #[inline(always)]
            |h, row, v, s, _| h.count_high(row, v, s),
            Hist::merge,
        )?;
        let found = Buckets::resolve(&high, requests);
        drop(high);
        let low = self.rows_pass(
            chunks,
            rows,
            None,
            || found.low_hist(),
            #[inline(always)]
            |h, row, v, s, _| h.count_low(&found, row, v, s),
            Hist::merge,
        )?;
        Ok(found.finish(&low))
    }

    /// A statistics pass: every row `rows` produces for a chunk goes to `count` on the worker's
    /// accumulator (in the wide copies when the CPU has them), with the count of its values
    /// left out ([`Emit`]). `floor` is passed on to `rows`: `count` must count a value below
    /// its row's floor the same whatever the value, and as many as were left out.
    pub(crate) fn rows_pass<A, I, C, M>(
        &self,
        chunks: &[Chunk],
        rows: Rows,
        floor: Floor,
        init: I,
        count: C,
        merge: M,
    ) -> Result<A>
    where
        A: Send + serde::Serialize + serde::de::DeserializeOwned,
        I: Fn() -> A + Sync + Send,
        C: Fn(&mut A, usize, &[f32], Score, u64) + Sync + Send,
        M: Fn(A, A) -> A + Sync + Send,
    {
        self.pass_shared(
            chunks,
            init,
            #[inline(always)]
            |w, c, a| {
                rows(w, c, floor, &mut |row, v, s, out| {
                    debug_assert!(out == 0 || floor.is_some(), "left out without a floor");
                    crate::simd!(count(a, row, v, s, out))
                });
                Ok(())
            },
            merge,
            false,
        )
    }
}

/// Per task, the cuts of the piece of a long row starting at each chunk start.
pub(crate) type Cuts = BTreeMap<usize, Vec<Option<Piece>>>;

/// Produces a chunk's rows (one per task, or per requested statistic's task) for a select.
pub(crate) type Rows<'r> = &'r RowsFn<'r>;

/// What a [`Rows`] refers to.
pub(crate) type RowsFn<'r> = dyn Fn(&mut Work, &Chunk, Floor, &mut Emit) + Sync + 'r;

/// Takes a row of a chunk: (row, values, what their keys are taken of, left out). With a
/// [`Floor`], a producer may leave out values it can show are below the row's floor, and only
/// count them: the pass counting the rows counts them below every window of the row, the same
/// as −∞. Without one, nothing is left out (0).
pub(crate) type Emit<'e> = dyn FnMut(usize, &[f32], Score, u64) + 'e;

/// Per row, a value below which the pass counting the rows does not tell values apart (a
/// windowed select only counts them): a row may emit −∞ for a value it can show is below its
/// floor without computing it. None: every value exact (a sample, a radix select).
pub(crate) type Floor<'f> = Option<&'f [f32]>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::{key, Request};

    /// Three rows (a TIES trim's three tasks) with the same sorted sample of `n` distinct keys
    /// spread evenly over (1, 2), and the windows of their 0.8-quantiles among `total` values.
    fn guess(n: usize, total: u64) -> Option<Guess> {
        let sample: Vec<u32> = (0..n)
            .map(|i| key(1.0 + (i as f32 + 0.5) / n as f32))
            .collect();
        let rank = total / 5 * 4;
        let requests = (0..3).map(|row| Request { row, rank }).collect();
        Engine::guess_from(
            &[sample.clone().into(), sample.clone().into(), sample.into()],
            total,
            requests,
            Reach::Model,
        )
    }

    /// The σ the windows were placed at, from their width in sample positions
    /// (2·σ·sqrt(n p (1 − p)) + 16).
    fn sigmas_of(g: Option<Guess>, n: usize) -> Option<f64> {
        let Some(Guess::Window(w)) = g else {
            return None;
        };
        let (lo, hi) = w.bounds[0];
        let at = |k: u32| ((unkey(k) - 1.0) * n as f32) as f64;
        Some(((at(hi) - at(lo)) - 16.0) / (2.0 * (n as f64 * 0.16).sqrt()))
    }

    /// One tensor's windows are narrower than the model's, and still hold the rank about as
    /// often as 3σ promises: 2,000 samples of 65,536 values drawn independently from a uniform
    /// row of 10^8, each with its 0.8-quantile's window; a rank outside its window is a miss.
    #[test]
    fn a_tensors_windows_miss_as_rarely_as_three_sigmas() {
        let (n, total, trials) = (65_536usize, 100_000_000u64, 2_000);
        let rank = total / 5 * 4;
        // The value at `rank` of a row whose values are 1 + (i + 0.5) / total, i < total.
        let at_rank = 1.0 + (rank as f64 + 0.5) / total as f64;
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let (mut missed, mut widths) = (0, [0.0f64; 2]);
        for _ in 0..trials {
            let sample: Vec<u32> = (0..n)
                .map(|_| {
                    state = crate::rng::mix(state.wrapping_add(1));
                    let i = state % total;
                    key((1.0 + (i as f64 + 0.5) / total as f64) as f32)
                })
                .collect();
            let rows = [sample.into()];
            for (w, reach) in widths.iter_mut().zip([Reach::Model, Reach::Tensor]) {
                let requests = vec![Request { row: 0, rank }];
                let Some(Guess::Window(win)) = Engine::guess_from(&rows, total, requests, reach)
                else {
                    panic!("no window");
                };
                let (lo, hi) = win.bounds[0];
                *w += f64::from(unkey(hi) - unkey(lo));
                if reach == Reach::Tensor {
                    let k = key(at_rank as f32);
                    missed += usize::from(k < lo || k > hi);
                }
            }
        }
        // 3σ each side (and 8 positions): 0.27 % of ranks miss, about 5 of 2,000 expected.
        assert!(missed <= 15, "{missed} of {trials} missed");
        // Half as wide as the model's 6σ, give or take the fixed margin.
        let ratio = widths[1] / widths[0];
        assert!((0.45..0.56).contains(&ratio), "{ratio}");
    }

    #[test]
    fn narrower_windows_where_wide_ones_would_not_fit() {
        let n = 1 << 21;
        let sigmas = |total| sigmas_of(guess(n, total), n).map(|s| s.round());
        // 0.5 B values per row: 6σ windows fit the budget.
        assert_eq!(sigmas(500_000_000), Some(6.0));
        // 0.7 B: 6σ windows would hold more than the budget's share; 4σ ones fit.
        assert_eq!(sigmas(700_000_000), Some(4.0));
        assert_eq!(sigmas(1_000_000_000), Some(3.0));
        // 2 B: none fits; windows counting each key of their spans (a few ten thousand keys
        // each) take the pass instead of the radix select.
        assert_eq!(sigmas(2_000_000_000), None);
        let requests = (0..3)
            .map(|row| Request {
                row,
                rank: 1_600_000_000,
            })
            .collect();
        let sample: Vec<u32> = (0..n)
            .map(|i| key(1.0 + (i as f32 + 0.5) / n as f32))
            .collect();
        let samples = [sample.clone().into(), sample.clone().into(), sample.into()];
        let Some(Guess::Window(w)) =
            Engine::guess_counting(&samples, 2_000_000_000, requests, Reach::Model)
        else {
            panic!("no windows at 2 B");
        };
        assert_eq!(w.dense, vec![true; 3]);
        assert_eq!(
            sigmas_of(Some(Guess::Window(w)), n).map(|s| s.round()),
            Some(6.0)
        );
    }
}
