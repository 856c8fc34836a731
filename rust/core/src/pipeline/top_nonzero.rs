//! Selects ranked from the top of a row's nonzero values: the ⌊nonzero · f⌋-th largest, where
//! the count of nonzero values is itself a statistic of the data (mergekit's `sce` keeps the
//! top `select_topk` fraction of the nonzero variances). Counting first and selecting after
//! took a pass of its own; here one windowed pass does both. The sample that places the
//! windows also estimates each row's zeros, so the estimated rank, widened by that estimate's
//! own uncertainty, places the window; the pass counts the zeros exactly, and the rank they
//! give is then looked up among the window's keys. When it falls outside (or the sample
//! could not guess), the zeros are counted in a pass of their own and an exact select
//! follows, as before: the result is the same either way.

use crate::error::Result;
use crate::pipeline::sample::FLOOR;
use crate::pipeline::Engine;
use crate::plan::Chunk;
use crate::select::{key, top_rank, unkey, Request, SampleRow, Windowed, Windows};
use crate::stats::Rows;

/// Binomial standard deviations of a sample's estimate that a window allows for.
const SIGMAS: f64 = 6.0;

/// What a sample tells about a select from the top of the nonzero values.
pub(crate) enum TopGuess {
    /// The sample was the data: each value and its row's nonzero count.
    Exact(Vec<f32>, Vec<u64>),
    /// Windows for one pass that counts the zeros too ([`Windows::late`] set).
    Window(Windows),
    /// No guess: count the zeros first ([`Engine::top_exact`]).
    None,
}

impl Engine<'_> {
    /// For each `(row, f)` of `tops`, the ⌊nonzero · f⌋-th largest value of the row (+∞ when
    /// that is none: nothing is kept) and the row's count of nonzero values.
    pub(crate) fn select_top_nonzero(
        &self,
        chunks: &[Chunk],
        n_rows: usize,
        tops: &[(usize, f32)],
        rows: Rows,
    ) -> Result<(Vec<f32>, Vec<u64>)> {
        match self.top_guess(chunks, n_rows, tops, rows)? {
            TopGuess::Exact(values, nonzero) => return Ok((values, nonzero)),
            TopGuess::Window(windows) => {
                let windows = &windows;
                let acc = self.rows_pass(
                    chunks,
                    rows,
                    // Zeros are counted exactly: no value may be left undistinguished.
                    None,
                    || windows.acc(),
                    #[inline(always)]
                    |a, row, v, s, _| a.count_scored(windows, row, v, s),
                    |a, b| a.merge_capped(b, windows),
                )?;
                if let Some(found) = Self::top_finish(windows, acc) {
                    return Ok(found);
                }
            }
            TopGuess::None => {}
        }
        self.top_exact(chunks, n_rows, tops, rows)
    }

    /// The sample's guess for [`Self::select_top_nonzero`].
    pub(crate) fn top_guess(
        &self,
        chunks: &[Chunk],
        n_rows: usize,
        tops: &[(usize, f32)],
        rows: Rows,
    ) -> Result<TopGuess> {
        let sample = self.sample_scope(chunks, n_rows, rows, FLOOR)?;
        Ok(sample.map_or(TopGuess::None, |(s, total)| {
            Self::top_guess_from(&s, total, tops)
        }))
    }

    /// [`Self::top_guess`] from the scope's sorted sample of its `total` values.
    pub(crate) fn top_guess_from(
        samples: &[SampleRow],
        total: u64,
        tops: &[(usize, f32)],
    ) -> TopGuess {
        let is_zero = |k: u32| k == key(0.0) || k == key(-0.0);
        let zeros = |row: usize| samples[row].iter().filter(|&&k| is_zero(k)).count();
        if samples.iter().map(|s| s.len() as u64).max() == Some(total) {
            // The sorted sample is the data.
            let nonzero: Vec<u64> = tops
                .iter()
                .map(|&(row, _)| total - zeros(row) as u64)
                .collect();
            let values = tops
                .iter()
                .zip(&nonzero)
                .map(|(&(row, f), &nz)| match top_rank(total, nz, f) {
                    Some(rank) => unkey(samples[row][rank as usize]),
                    None => f32::INFINITY,
                })
                .collect();
            return TopGuess::Exact(values, nonzero);
        }
        let mut requests = Vec::with_capacity(tops.len());
        let mut extra = Vec::with_capacity(tops.len());
        for &(row, f) in tops {
            let n = samples[row].len().max(1) as f64;
            let q = zeros(row) as f64 / n;
            let guess = ((1.0 - q) * total as f64) as u64;
            // A guess of nothing kept still places the window at the top.
            let rank = top_rank(total, guess, f).unwrap_or(total.saturating_sub(1));
            requests.push(Request { row, rank });
            // The zeros' share moves the rank by f times its own sampling error (the runs'
            // design effect there too: zeros come in runs where a tensor was left alone).
            let effect = samples[row].effect_at(q);
            extra.push(f64::from(f) * SIGMAS * (n * q * (1.0 - q) * effect).sqrt());
        }
        let mut windows = Windows::from_sample_spread(requests, samples, total, SIGMAS, &extra);
        if !windows.viable {
            return TopGuess::None;
        }
        windows.late = tops.iter().map(|&(_, f)| Some(f)).collect();
        TopGuess::Window(windows)
    }

    /// The values and nonzero counts a windowed pass's counts give, or None when a rank fell
    /// outside its window.
    pub(crate) fn top_finish(windows: &Windows, acc: Windowed) -> Option<(Vec<f32>, Vec<u64>)> {
        let nonzero = acc.nonzero(windows);
        if std::env::var_os("WEIGHTWEAVE_DEBUG").is_some() {
            eprintln!(
                "select (top of nonzero): windows {:?} caps {:?} {}",
                windows.bounds,
                windows.caps,
                acc.describe()
            );
        }
        acc.finish(windows).map(|values| (values, nonzero))
    }

    /// [`Self::select_top_nonzero`] without a guess: the zeros in a pass of their own, then an
    /// exact select at the ranks they give.
    pub(crate) fn top_exact(
        &self,
        chunks: &[Chunk],
        n_rows: usize,
        tops: &[(usize, f32)],
        rows: Rows,
    ) -> Result<(Vec<f32>, Vec<u64>)> {
        let total: u64 = chunks.iter().map(|c| c.len as u64).sum();
        if std::env::var_os("WEIGHTWEAVE_DEBUG").is_some() {
            eprintln!("select (top of nonzero): no window held the rank; zeros counted first");
        }
        let zeros = self.rows_pass(
            chunks,
            rows,
            None,
            || vec![0u64; n_rows],
            #[inline(always)]
            // |x| = 0 exactly where x = 0: the same count whatever the score.
            |z, row, v, _, _| z[row] += v.iter().map(|&x| u64::from(x == 0.0)).sum::<u64>(),
            |a, b| a.into_iter().zip(b).map(|(x, y)| x + y).collect(),
        )?;
        let nonzero: Vec<u64> = tops.iter().map(|&(row, _)| total - zeros[row]).collect();
        let mut values = vec![f32::INFINITY; tops.len()];
        let (mut which, mut requests) = (Vec::new(), Vec::new());
        for (i, (&(row, f), &nz)) in tops.iter().zip(&nonzero).enumerate() {
            if let Some(rank) = top_rank(total, nz, f) {
                which.push(i);
                requests.push(Request { row, rank });
            }
        }
        if !requests.is_empty() {
            let found = self.select(chunks, n_rows, requests, rows)?;
            for (i, v) in which.into_iter().zip(found) {
                values[i] = v;
            }
        }
        Ok((values, nonzero))
    }
}
