//! The samples that place a select's windows: evenly spaced runs of each scope's values, their
//! keys sorted per row. Many scopes (one per tensor in a per-tensor select) are sampled
//! in one shared pass: a pass of its own per tensor cost more in its start, its join and its
//! residency probes (about 0.45 ms each) than the few thousand values it read, 39 of them a
//! tenth of an `arcee_fusion` run on a hidden-512 model. The keys are the same whichever pass
//! reads them, and sorted, so nothing changes but the number of passes.

use std::collections::HashMap;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::Engine;
use crate::error::Result;
use crate::plan::Chunk;
use crate::select::SampleRow;
use crate::stats::Rows;

/// Length of one run of a sample.
const RUN: u64 = 64;

/// The longest run of a sample read from disk. On inputs bigger than memory each run is a
/// random read from disk, whatever its length up to a page: with runs of 64, each select
/// stage of a cold 0.1 B-parameter PCB (its sample, then its pass) took 1.36–1.42 s for 1 GB,
/// against 0.48 s for a cold `cat`; 16× fewer runs took the stages to 0.88 and 1.01 s
/// (`benches/results/cold.md`).
/// Neighbours are not independent draws; the windows widen by the design effect the runs
/// show ([`SampleRow`]).
const LONG_RUN: u64 = 1024;

/// A sample read from disk takes runs as long as leave it this many (between [`RUN`] and
/// [`LONG_RUN`]): enough to estimate their design effect (its variance's relative error is
/// about sqrt(2 / runs), 12 % here). Only from disk ([`Engine::sample_many`]): on a warm page
/// cache a run costs no read, and short runs' smaller design effect keeps the windows
/// narrower.
const DISK_RUNS: u64 = 128;

/// The keys that the samples of one shared pass may hold together (32 MiB); a scope larger
/// than that alone still takes its pass (a sample holds at most 2^21 values per row).
pub(crate) const SAMPLE_BUDGET: usize = 1 << 23;

/// One scope to sample: its chunks, its rows and how to score a chunk into them.
pub(crate) type Scope<'a> = (&'a [Chunk], usize, Rows<'a>);

/// The fewest values a sample takes (everything when the scope is smaller).
pub(crate) const FLOOR: u64 = 1 << 15;

/// [`FLOOR`] for the trim thresholds of one tensor (TIES at scope=tensor: [`trim_floor`]).
/// Why more: the tensor's statistics pass is exact whatever the sample, but each element with
/// a task inside the window takes a slow path there (`SignTally::undecided`: 22.7 % of a warm
/// run's `perf` samples at 2^15, 0.5 B bf16, 2.8 % of the task-values inside). At 2^18 that
/// run took 3.10-3.33 s against 3.72-3.87 s (user 4.6 s against 6.0 s), the same bytes. With
/// the floor on every scope (tried first): 2^19 took 3.12-3.48 s (less CPU, no less time),
/// 2^20 4.47-4.66 s (the sort); mergekit's per-tensor selects (one shared sample pass for many
/// tensors) gained nothing and `breadcrumbs_ties` lost 10 %, so they keep [`FLOOR`]. Since the
/// windowed count packs the keys inside in AVX-512 (`select/keep_avx512.rs`) and takes the
/// magnitudes itself, a wider window costs less and the sample's draws and sort more: on a
/// 2-core Xeon VM, 2^18 took 2.62-2.80 s, 2^17 2.62-2.78, 2^16 2.51-2.55 and 2^15 2.74-2.78
/// (`dare_ties`: 2^18 3.36-3.53 s, 2^16 3.19-3.23; with the portable count,
/// `WEIGHTWEAVE_SIMD=avx2`: 2^18 2.96-3.13 s, 2^16 2.79-2.90), the same bytes.
pub(crate) const TENSOR_FLOOR: u64 = 1 << 16;

/// The sample floor for trim thresholds over `chunks`: [`TENSOR_FLOOR`] where they are one
/// tensor's, else [`FLOOR`].
pub(crate) fn trim_floor(chunks: &[Chunk]) -> u64 {
    match chunks.windows(2).all(|w| w[0].tensor == w[1].tensor) {
        true => TENSOR_FLOOR,
        false => FLOOR,
    }
}

/// The runs of a scope's sample: about 1/256 of its values, capped to `floor`..2^21 so that
/// neither the sample nor the windows it implies grow with the model (everything when the
/// scope is small); `long` (from disk): runs as long as leave [`DISK_RUNS`] of them.
pub(crate) fn picks(chunks: &[Chunk], long: bool, floor: u64) -> Vec<Chunk> {
    let total: u64 = chunks.iter().map(|c| c.len as u64).sum();
    let want = (total / 256).clamp(floor, 1 << 21);
    let run = match long {
        true => (want / DISK_RUNS).clamp(RUN, LONG_RUN),
        false => RUN,
    };
    let runs = (want / run).max(1);
    let step = (total / runs).max(run);
    let mut picks = Vec::new();
    let mut offset = 0u64; // global position of the current chunk's start
    let mut next = 0u64;
    for c in chunks {
        let end = offset + c.len as u64;
        while next < end {
            let at = next - offset;
            let len = run.min(end - next) as usize;
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

/// The keys a scope's sample holds (each of its rows') at `floor`: an upper bound, for the
/// budget.
pub(crate) fn sample_keys(chunks: &[Chunk], n_rows: usize, floor: u64) -> usize {
    let keys = |long| {
        picks(chunks, long, floor)
            .iter()
            .map(|c| c.len)
            .sum::<usize>()
    };
    keys(false).max(keys(true)) * n_rows
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
        floor: u64,
    ) -> Result<Option<(Vec<SampleRow>, u64)>> {
        if forced_radix() {
            return Ok(None);
        }
        let total: u64 = chunks.iter().map(|c| c.len as u64).sum();
        let samples = self.random_access(|| self.sample(chunks, n_rows, rows, floor))?;
        Ok(Some((samples, total)))
    }

    /// One scope's sample, per row.
    pub(crate) fn sample(
        &self,
        chunks: &[Chunk],
        n_rows: usize,
        rows: Rows,
        floor: u64,
    ) -> Result<Vec<SampleRow>> {
        let mut one = self.sample_many(&[(chunks, n_rows, rows)], floor)?;
        Ok(one.pop().expect("one scope"))
    }

    /// [`Engine::sample_many`] with random-access advice while it reads (none for no scope):
    /// the samples in the scopes' order.
    pub(crate) fn sample_scopes(
        &self,
        scopes: &[Scope],
        floor: u64,
    ) -> Result<std::vec::IntoIter<Vec<SampleRow>>> {
        let samples = match scopes.is_empty() {
            true => Vec::new(),
            false => self.random_access(|| self.sample_many(scopes, floor))?,
        };
        Ok(samples.into_iter())
    }

    /// Each scope's sample, per row, in one pass. Scopes share no chunk (each run is found
    /// again by its tensor and start).
    pub(crate) fn sample_many(&self, scopes: &[Scope], floor: u64) -> Result<Vec<Vec<SampleRow>>> {
        let mut of_run: HashMap<(usize, usize), usize> = HashMap::new();
        let mut runs = Vec::new();
        let long = self.on_disk();
        for (s, &(chunks, _, _)) in scopes.iter().enumerate() {
            for c in picks(chunks, long, floor) {
                let prev = of_run.insert((c.tensor, c.start), s);
                debug_assert!(prev.is_none(), "scopes share a chunk");
                runs.push(c);
            }
        }
        let init =
            || -> Vec<Vec<Drawn>> { scopes.iter().map(|s| vec![Drawn::default(); s.1]).collect() };
        let drawn = self.pass_shared(
            &runs,
            init,
            |w, c, acc| {
                let s = match scopes.len() {
                    1 => 0,
                    _ => of_run[&(c.tensor, c.start)],
                };
                let acc = &mut acc[s];
                // Each row's run of this chunk: its keys' start, then (below) their count.
                for d in acc.iter_mut() {
                    d.runs.push(d.keys.len() as u32);
                }
                (scopes[s].2)(w, c, None, &mut |row, v, score, _| {
                    acc[row].keys.extend(v.iter().map(|&x| score.key(x)))
                });
                for d in acc.iter_mut() {
                    let start = d.runs.pop().expect("pushed above");
                    let m = d.keys.len() as u32 - start;
                    if m > 0 {
                        d.runs.push(m);
                    }
                }
                Ok(())
            },
            |mut a, b| {
                for (x, y) in a.iter_mut().flatten().zip(b.into_iter().flatten()) {
                    x.keys.extend(y.keys);
                    x.runs.extend(y.runs);
                }
                a
            },
            true,
        )?;
        // Every scope's rows sorted together: a tensor's three rows on two cores left one idle
        // a third of the time.
        Ok(drawn
            .into_par_iter()
            .map(|rows| {
                rows.into_par_iter()
                    .map(|d| SampleRow::from_runs(d.keys, &d.runs))
                    .collect()
            })
            .collect())
    }
}

/// A row's sample keys in the order drawn, and the length of each run (a cluster's units
/// send theirs to the driver).
#[derive(Clone, Default, Serialize, Deserialize)]
struct Drawn {
    keys: Vec<u32>,
    runs: Vec<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(len: usize) -> Vec<Chunk> {
        vec![Chunk {
            tensor: 0,
            start: 0,
            len,
        }]
    }

    #[test]
    fn samples_from_disk_take_long_runs_of_the_same_share() {
        // A small scope: 2^15 values in 128 runs of 256.
        let small = picks(&one(1 << 20), true, FLOOR);
        assert!(small.iter().all(|c| c.len == 256));
        assert_eq!(small.len(), DISK_RUNS as usize);
        // A large one: runs of at most 1024, then more of them.
        let large = picks(&one(1 << 26), true, FLOOR);
        assert!(large.iter().all(|c| c.len == LONG_RUN as usize));
        assert_eq!(large.len(), (1 << 18) / LONG_RUN as usize);
        assert!(large.windows(2).all(|w| w[1].start - w[0].start == 1 << 18));
        // A scope sampled whole stays whole.
        let whole = picks(&one(5000), true, FLOOR);
        assert_eq!(whole.iter().map(|c| c.len).sum::<usize>(), 5000);
        assert!(whole
            .windows(2)
            .all(|w| w[1].start == w[0].start + w[0].len));
        // From memory, short runs whatever the size.
        let warm = picks(&one(1 << 26), false, FLOOR);
        assert!(warm.iter().all(|c| c.len == RUN as usize));
        assert_eq!(warm.len(), (1 << 18) / RUN as usize);
    }

    #[test]
    fn one_tensors_trim_samples_at_least_its_floor() {
        let two = [
            one(1 << 20),
            vec![Chunk {
                tensor: 1,
                start: 0,
                len: 1 << 20,
            }],
        ]
        .concat();
        assert_eq!(trim_floor(&two), FLOOR);
        let split = [
            one(1 << 19),
            vec![Chunk {
                tensor: 0,
                start: 1 << 19,
                len: 1 << 19,
            }],
        ]
        .concat();
        assert_eq!(trim_floor(&split), TENSOR_FLOOR);
        let got = picks(&split, false, trim_floor(&split));
        assert_eq!(got.iter().map(|c| c.len as u64).sum::<u64>(), TENSOR_FLOOR);
        // Under the floor, the tensor is its own sample.
        let below = picks(&one((1 << 16) - 1), false, TENSOR_FLOOR);
        assert_eq!(below.iter().map(|c| c.len).sum::<usize>(), (1 << 16) - 1);
    }
}
