//! The statistics passes: the exact order statistics TIES and PCB need (a windowed pass guided
//! by a sample, falling back to a two-pass radix select), and TIES's majority sign, tallied in
//! the same windowed pass where the sampled windows allow.

use std::collections::BTreeMap;

use crate::error::Result;
use crate::methods::pcb::{self, Clamp};
use crate::methods::ties::{self, SignTally, TiesStats};
use crate::methods::{breadcrumbs, int_frac, Method, Scope};
use crate::pipeline::{grow, Engine, Stats, Work};
use crate::plan::Chunk;
use crate::select::{key, unkey, Buckets, Hist, Request, Windowed, Windows};

/// What a sample tells about the wanted order statistics.
enum Guess {
    Exact(Vec<f32>),
    Window(Windows),
}

impl Engine<'_> {
    pub(crate) fn statistics(&self, merge: &[Chunk], chunk_size: usize) -> Result<Stats> {
        let mut stats = Stats::default();
        if let Some(p) = self.recipe.method.ties() {
            let scopes: Vec<(usize, Vec<Chunk>)> = match p.scope {
                Scope::Global => vec![(0, merge.to_vec())],
                Scope::Tensor => (0..self.plan.len())
                    .map(|i| (i, merge.iter().filter(|c| c.tensor == i).copied().collect()))
                    .collect(),
            };
            let n_scopes = if p.scope == Scope::Global {
                1
            } else {
                self.plan.len()
            };
            stats.ties = vec![None; n_scopes];
            for (scope, chunks) in scopes {
                let d: usize = chunks.iter().map(|c| c.len).sum();
                if d == 0 {
                    continue;
                }
                stats.ties[scope] = Some(self.ties_stats(&chunks, d, &p)?);
            }
        }
        if let Method::Pcb { ratio } = self.recipe.method {
            stats.pcb = self.pcb_stats(merge, ratio)?;
        }
        if let Method::Breadcrumbs { density, gamma } = self.recipe.method {
            for (i, t) in self.plan.iter().enumerate() {
                if t.has_long_rows(chunk_size) {
                    self.crumbs_stats(merge, i, (density, gamma), &mut stats.crumbs)?;
                }
            }
        }
        Ok(stats)
    }

    /// Breadcrumbs' cuts for every piece of tensor `i`'s rows, one row at a time: an exact
    /// select of the magnitudes at the two cut ranks, then a pass counting, per piece, the
    /// elements above and equal to each cut (the ties are ranked by position).
    fn crumbs_stats(
        &self,
        merge: &[Chunk],
        i: usize,
        (density, gamma): (f64, f64),
        out: &mut BTreeMap<(usize, usize), Vec<Option<breadcrumbs::Piece>>>,
    ) -> Result<()> {
        let row = self.plan[i].row_len();
        let tasks = self.tasks();
        let chunks: Vec<Chunk> = merge.iter().filter(|c| c.tensor == i).copied().collect();
        let Some((g, k)) = breadcrumbs::kept_ranks(row, density, gamma) else {
            for c in &chunks {
                out.insert((i, c.start), vec![None; tasks]);
            }
            return Ok(());
        };
        let n = row as u64;
        let has_low = g + k < n;
        let abs_rows = &|w: &mut Work, len: usize, emit: &mut dyn FnMut(usize, &[f32])| {
            for (t, d) in w.raw.iter().enumerate() {
                crate::simd!(abs_into(&d[..len], &mut w.scratch[..len]));
                emit(t, &w.scratch[..len]);
            }
        };
        for pieces in chunks.chunk_by(|a, b| a.start / row == b.start / row) {
            let requests: Vec<Request> = (0..tasks)
                .flat_map(|t| {
                    let top = Request {
                        row: t,
                        rank: n - 1 - g,
                    };
                    let low = Request {
                        row: t,
                        rank: n - 1 - (g + k).min(n - 1),
                    };
                    [top, low]
                })
                .collect();
            let v = self.select(pieces, tasks, requests, abs_rows)?;
            let cuts: Vec<(f32, Option<f32>)> = v
                .chunks(2)
                .map(|p| (p[0], has_low.then_some(p[1])))
                .collect();
            let counts = self.pass(
                pieces,
                Vec::new,
                |w, c, acc: &mut Vec<(usize, Vec<[u64; 4]>)>| {
                    let per_task = (0..tasks)
                        .map(|t| breadcrumbs::count_piece(&w.raw[t][..c.len], cuts[t].0, cuts[t].1))
                        .collect();
                    acc.push((c.start, per_task));
                    Ok(())
                },
                |mut a, b| {
                    a.extend(b);
                    a
                },
            )?;
            let mut counts = counts;
            counts.sort_unstable_by_key(|(start, _)| *start);
            for t in 0..tasks {
                let above_top: u64 = counts.iter().map(|(_, c)| c[t][0]).sum();
                let above_low: u64 = counts.iter().map(|(_, c)| c[t][2]).sum();
                let cut = breadcrumbs::Cut {
                    top: cuts[t].0,
                    top_skip: g - above_top,
                    low: cuts[t].1.map(|l| (l, g + k - above_low)),
                };
                let (mut top_before, mut low_before) = (0, 0);
                for (start, c) in &counts {
                    let cell = out.entry((i, *start)).or_insert_with(|| vec![None; tasks]);
                    cell[t] = Some(breadcrumbs::Piece {
                        cut,
                        top_before,
                        low_before,
                    });
                    top_before += c[t][1];
                    low_before += c[t][3];
                }
            }
        }
        Ok(())
    }

    fn ties_stats(
        &self,
        chunks: &[Chunk],
        d: usize,
        p: &crate::methods::TiesParams,
    ) -> Result<TiesStats> {
        let tasks = self.tasks();
        let Some(rank) = ties::threshold_rank(d, p) else {
            let thr = vec![0.0; tasks];
            let count = self.sign_count(chunks, &thr)?;
            return Ok(TiesStats::new(thr, count));
        };
        let requests: Vec<Request> = (0..tasks).map(|row| Request { row, rank }).collect();
        let rows = &|w: &mut Work, n: usize, emit: &mut dyn FnMut(usize, &[f32])| {
            let deltas = if w.dared.is_empty() { &w.raw } else { &w.dared };
            for (t, d) in deltas.iter().enumerate() {
                crate::simd!(abs_into(&d[..n], &mut w.scratch[..n]));
                emit(t, &w.scratch[..n]);
            }
        };
        let windows = match self.guess(chunks, tasks, requests.clone(), rows)? {
            Some(Guess::Exact(thr)) => {
                let count = self.sign_count(chunks, &thr)?;
                return Ok(TiesStats::new(thr, count));
            }
            Some(Guess::Window(windows)) => windows,
            None => {
                let thr = self.radix_select(chunks, tasks, requests, rows)?;
                let count = self.sign_count(chunks, &thr)?;
                return Ok(TiesStats::new(thr, count));
            }
        };
        // One pass finds the thresholds and tallies the majority sign together.
        let (acc, tally) = self.pass(
            chunks,
            || (windows.acc(), SignTally::new(windows.cap * tasks)),
            #[inline(always)]
            |w, c, (acc, tally)| {
                rows(w, c.len, &mut |row, v| {
                    crate::simd!(acc.count(&windows, row, v))
                });
                let deltas = if w.dared.is_empty() { &w.raw } else { &w.dared };
                let (sum, undecided) = (&mut w.scratch, &mut w.m);
                crate::simd!(tally.observe(deltas, &windows.bounds, c.len, sum, undecided));
                Ok(())
            },
            |(a, x), (b, y)| (a.merge(b), x.merge(y)),
        )?;
        self.debug_windows(&windows, &acc);
        let thr = match acc.finish(&windows) {
            Some(thr) => thr,
            None => self.radix_select(chunks, tasks, requests, rows)?,
        };
        let count = match tally.resolve(&thr) {
            Some(count) => count,
            None => self.sign_count(chunks, &thr)?,
        };
        Ok(TiesStats::new(thr, count))
    }

    /// Σ over the scope of sign(Σ_t trimmed_t): a pass of its own.
    fn sign_count(&self, chunks: &[Chunk], thr: &[f32]) -> Result<i64> {
        self.pass(
            chunks,
            || 0i64,
            #[inline(always)]
            |w, c, acc| {
                let deltas = if w.dared.is_empty() { &w.raw } else { &w.dared };
                *acc += ties::sign_count(deltas, thr, c.len, &mut w.scratch);
                Ok(())
            },
            |a, b| a + b,
        )
    }

    fn pcb_stats(&self, chunks: &[Chunk], ratio: f64) -> Result<Option<(Vec<Clamp>, Vec<Clamp>)>> {
        let d: usize = chunks.iter().map(|c| c.len).sum();
        let tasks = self.tasks();
        if d == 0 || tasks == 0 {
            return Ok(None);
        }
        let pairs = |(a, b): (u64, u64)| -> Vec<Request> {
            (0..tasks)
                .flat_map(|row| [Request { row, rank: a }, Request { row, rank: b }])
                .collect()
        };
        let to_clamps = |v: Vec<f32>| -> Vec<Clamp> {
            v.chunks(2).map(|p| Clamp { a: p[0], b: p[1] }).collect()
        };
        let (lo, hi) = pcb::ABS_CLAMP;
        let abs = to_clamps(self.select(
            chunks,
            tasks,
            pairs(pcb::clamp_ranks(d, lo, hi)),
            &|w: &mut Work, n, emit| {
                for (t, x) in w.raw.iter().enumerate() {
                    crate::simd!(abs_into(&x[..n], &mut w.scratch[..n]));
                    emit(t, &w.scratch[..n]);
                }
            },
        )?);
        let score_ranks = (int_frac(d, 1.0 - ratio).min(d - 1) as u64, d as u64 - 1);
        let score = to_clamps(self.select(
            chunks,
            tasks,
            pairs(score_ranks),
            &|w: &mut Work, n, emit| {
                w.scores.resize_with(tasks, Vec::new);
                for s in &mut w.scores {
                    grow(s, n);
                }
                crate::simd!(pcb::scores(&w.raw, n, &abs, &mut w.scores, &mut w.signed));
                for (t, s) in w.scores.iter().enumerate() {
                    emit(t, &s[..n]);
                }
            },
        )?);
        Ok(Some((abs, score)))
    }

    /// Exact order statistics of per-task rows produced by `rows`: one windowed pass guided by
    /// a sample, or (when the guess misses) the two-pass radix select.
    fn select(
        &self,
        chunks: &[Chunk],
        n_rows: usize,
        requests: Vec<Request>,
        rows: Rows,
    ) -> Result<Vec<f32>> {
        let windows = match self.guess(chunks, n_rows, requests.clone(), rows)? {
            Some(Guess::Exact(v)) => return Ok(v),
            Some(Guess::Window(windows)) => windows,
            None => return self.radix_select(chunks, n_rows, requests, rows),
        };
        let acc = self.rows_pass(
            chunks,
            rows,
            || windows.acc(),
            #[inline(always)]
            |a, row, v| a.count(&windows, row, v),
            Windowed::merge,
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
    fn guess(
        &self,
        chunks: &[Chunk],
        n_rows: usize,
        requests: Vec<Request>,
        rows: Rows,
    ) -> Result<Option<Guess>> {
        if std::env::var_os("WEIGHTWEAVE_FORCE_RADIX").is_some() {
            return Ok(None);
        }
        let total: u64 = chunks.iter().map(|c| c.len as u64).sum();
        let t0 = std::time::Instant::now();
        let samples = self.sample(chunks, n_rows, total, rows)?;
        if std::env::var_os("WEIGHTWEAVE_DEBUG").is_some() {
            eprintln!("sample: {:.2}s", t0.elapsed().as_secs_f64());
        }
        if samples.iter().map(|s| s.len() as u64).max() == Some(total) {
            // The sorted sample is the data.
            return Ok(Some(Guess::Exact(
                requests
                    .iter()
                    .map(|r| unkey(samples[r.row][r.rank as usize]))
                    .collect(),
            )));
        }
        let windows = Windows::from_sample(requests, &samples, total, 6.0);
        // Windows that would hold more keys than the memory budget go straight to radix.
        Ok(windows.viable.then_some(Guess::Window(windows)))
    }

    fn debug_windows(&self, windows: &Windows, acc: &Windowed) {
        if std::env::var_os("WEIGHTWEAVE_DEBUG").is_some() {
            eprintln!(
                "select: windows {:?} cap {} {}",
                windows.bounds,
                windows.cap,
                acc.describe()
            );
        }
    }

    /// Sorted keys per row from short evenly spaced runs covering about 1/256 of the scope
    /// (2^15 to 2^21 elements; everything when the scope is small).
    fn sample(
        &self,
        chunks: &[Chunk],
        n_rows: usize,
        total: u64,
        rows: Rows,
    ) -> Result<Vec<Vec<u32>>> {
        const RUN: u64 = 64;
        // Capped, so that neither the sample nor the windows it implies grow with the model.
        let want = (total / 256).clamp(1 << 15, 1 << 21);
        let runs = (want / RUN).max(1);
        let step = (total / runs).max(RUN);
        let mut picks = Vec::new();
        let mut offset = 0u64; // global position of the current chunk's start
        let mut next = 0u64;
        for c in chunks {
            let end = offset + c.len as u64;
            while next < end {
                let at = next - offset;
                let len = RUN.min(end - next) as usize;
                picks.push(Chunk {
                    tensor: c.tensor,
                    start: c.start + at as usize,
                    len,
                });
                next += step;
            }
            offset = end;
        }
        let mut samples = self.pass_quiet(
            &picks,
            || vec![Vec::new(); n_rows],
            |w, c, acc: &mut Vec<Vec<u32>>| {
                rows(w, c.len, &mut |row, v| {
                    acc[row].extend(v.iter().map(|&x| key(x)))
                });
                Ok(())
            },
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(b) {
                    x.extend(y);
                }
                a
            },
        )?;
        for s in &mut samples {
            s.sort_unstable();
        }
        Ok(samples)
    }

    /// The two-pass radix select: exact whatever the data.
    fn radix_select(
        &self,
        chunks: &[Chunk],
        n_rows: usize,
        requests: Vec<Request>,
        rows: Rows,
    ) -> Result<Vec<f32>> {
        let high = self.rows_pass(
            chunks,
            rows,
            || Hist::new(n_rows),
            #[inline(always)]
            |h, row, v| h.count_high(row, v),
            Hist::merge,
        )?;
        let found = Buckets::resolve(&high, requests);
        drop(high);
        let low = self.rows_pass(
            chunks,
            rows,
            || found.low_hist(),
            #[inline(always)]
            |h, row, v| h.count_low(&found, row, v),
            Hist::merge,
        )?;
        Ok(found.finish(&low))
    }

    /// A statistics pass: every row `rows` produces for a chunk goes to `count` on the worker's
    /// accumulator (in the AVX2 copy when the CPU has it).
    fn rows_pass<A, I, C, M>(
        &self,
        chunks: &[Chunk],
        rows: Rows,
        init: I,
        count: C,
        merge: M,
    ) -> Result<A>
    where
        A: Send,
        I: Fn() -> A + Sync + Send,
        C: Fn(&mut A, usize, &[f32]) + Sync + Send,
        M: Fn(A, A) -> A + Sync + Send,
    {
        self.pass(
            chunks,
            init,
            #[inline(always)]
            |w, c, a| {
                rows(w, c.len, &mut |row, v| crate::simd!(count(a, row, v)));
                Ok(())
            },
            merge,
        )
    }
}

/// Produces a chunk's rows (one per task, or per requested statistic's task) for a select.
type Rows<'r> = &'r (dyn Fn(&mut Work, usize, &mut dyn FnMut(usize, &[f32])) + Sync);

#[inline(always)]
fn abs_into(src: &[f32], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.abs();
    }
}
