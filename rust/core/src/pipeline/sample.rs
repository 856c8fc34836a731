//! The samples that place a select's windows: short evenly spaced runs of each scope's values,
//! their keys sorted per row. Many scopes (one per tensor in a per-tensor select) are sampled
//! in one shared pass: a pass of its own per tensor cost more in its start, its join and its
//! residency probes (about 0.45 ms each) than the few thousand values it read, 39 of them a
//! tenth of an `arcee_fusion` run on a hidden-512 model. The keys are the same whichever pass
//! reads them, and sorted, so nothing changes but the number of passes.

use std::collections::HashMap;

use rayon::prelude::*;

use super::Engine;
use crate::error::Result;
use crate::plan::Chunk;
use crate::select::key;
use crate::stats::Rows;

/// Length of one run of a sample.
const RUN: u64 = 64;

/// The keys that the samples of one shared pass may hold together (32 MiB); a scope larger
/// than that alone still takes its pass (a sample holds at most 2^21 values per row).
pub(crate) const SAMPLE_BUDGET: usize = 1 << 23;

/// One scope to sample: its chunks, its rows and how to score a chunk into them.
pub(crate) type Scope<'a> = (&'a [Chunk], usize, Rows<'a>);

/// The runs of a scope's sample: about 1/256 of its values, capped to 2^15..2^21 so that
/// neither the sample nor the windows it implies grow with the model (everything when the
/// scope is small).
pub(crate) fn picks(chunks: &[Chunk]) -> Vec<Chunk> {
    let total: u64 = chunks.iter().map(|c| c.len as u64).sum();
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
    picks
}

/// The keys a scope's sample holds (each of its rows'): an upper bound, for the budget.
pub(crate) fn sample_keys(chunks: &[Chunk], n_rows: usize) -> usize {
    picks(chunks).iter().map(|c| c.len).sum::<usize>() * n_rows
}

/// Whether the tests force the radix select (WEIGHTWEAVE_FORCE_RADIX), which small models would
/// otherwise never reach: no sample is taken then.
pub(crate) fn forced_radix() -> bool {
    std::env::var_os("WEIGHTWEAVE_FORCE_RADIX").is_some()
}

impl Engine<'_> {
    /// One scope's sorted sample (random-access advice while it is read) and its count of
    /// values; None where the radix select is forced.
    pub(crate) fn sample_scope(
        &self,
        chunks: &[Chunk],
        n_rows: usize,
        rows: Rows,
    ) -> Result<Option<(Vec<Vec<u32>>, u64)>> {
        if forced_radix() {
            return Ok(None);
        }
        let total: u64 = chunks.iter().map(|c| c.len as u64).sum();
        let samples = self.random_access(|| self.sample(chunks, n_rows, rows))?;
        Ok(Some((samples, total)))
    }

    /// Sorted keys per row of one scope's sample.
    pub(crate) fn sample(
        &self,
        chunks: &[Chunk],
        n_rows: usize,
        rows: Rows,
    ) -> Result<Vec<Vec<u32>>> {
        let mut one = self.sample_many(&[(chunks, n_rows, rows)])?;
        Ok(one.pop().expect("one scope"))
    }

    /// Sorted keys per row of each scope's sample, in one pass. Scopes share no chunk (each
    /// run is found again by its tensor and start).
    pub(crate) fn sample_many(&self, scopes: &[Scope]) -> Result<Vec<Vec<Vec<u32>>>> {
        let mut of_run: HashMap<(usize, usize), usize> = HashMap::new();
        let mut runs = Vec::new();
        for (s, &(chunks, _, _)) in scopes.iter().enumerate() {
            for c in picks(chunks) {
                let prev = of_run.insert((c.tensor, c.start), s);
                debug_assert!(prev.is_none(), "scopes share a chunk");
                runs.push(c);
            }
        }
        let init =
            || -> Vec<Vec<Vec<u32>>> { scopes.iter().map(|s| vec![Vec::new(); s.1]).collect() };
        let mut samples = self.pass_shared(
            &runs,
            init,
            |w, c, acc| {
                let s = match scopes.len() {
                    1 => 0,
                    _ => of_run[&(c.tensor, c.start)],
                };
                let acc = &mut acc[s];
                (scopes[s].2)(w, c, None, &mut |row, v, _| {
                    acc[row].extend(v.iter().map(|&x| key(x)))
                });
                Ok(())
            },
            |mut a, b| {
                for (x, y) in a.iter_mut().flatten().zip(b.into_iter().flatten()) {
                    x.extend(y);
                }
                a
            },
            true,
        )?;
        samples
            .par_iter_mut()
            .flat_map_iter(|s| s.iter_mut())
            .for_each(|row| row.sort_unstable());
        Ok(samples)
    }
}
