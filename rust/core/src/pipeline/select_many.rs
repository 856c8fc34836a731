//! Exact selects of many tensors in shared passes. A per-tensor statistic (mergekit's
//! per-tensor TIES cuts, arcee_fusion's quantiles) is one select per tensor, and one after the
//! other those were a pass each: a tensor of one or two chunks kept one core busy and left the
//! others idle, and every pass paid its start and its join. Here each tensor's sample places
//! its windows as before, then one windowed pass over the tensors' chunks counts them all, each
//! chunk into its own tensor's windows; a tensor whose rank fell outside its window takes the
//! radix select alone, as before. Each result is the exact order statistic, so nothing changes
//! but the number of passes.
//!
//! Memory stays within one select's budget: the tensors go into a pass together only while the
//! keys their windows may keep ([`Windows::caps`], at most the tensor's own values) add up to no
//! more than [`WINDOW_BUDGET`]; more tensors take more passes.

use std::collections::HashMap;

use crate::error::Result;
use crate::pipeline::sample::{forced_radix, sample_keys, Scope, FLOOR, SAMPLE_BUDGET};
use crate::pipeline::top_nonzero::TopGuess;
use crate::pipeline::Engine;
use crate::plan::Chunk;
use crate::select::{
    PieceWindow, PieceWindows, Request, SampleRow, Windowed, Windows, WINDOW_BUDGET,
};
use crate::stats::{Guess, Reach, Rows};

/// One select: its chunks (no other job's), the rows its scores go to, the requested ranks,
/// and how to score a chunk.
pub(crate) struct Job<'j> {
    pub chunks: Vec<Chunk>,
    pub n_rows: usize,
    pub requests: Vec<Request>,
    /// Or ranks from the top of the nonzero values: (row, fraction), as
    /// [`Engine::select_top_nonzero`] (a job has requests or these, not both).
    pub tops: Vec<(usize, f32)>,
    pub rows: Rows<'j>,
}

/// A job's result: the selected values, each chunk's counts at them (when asked for and the
/// windowed pass found them), and for `tops` each row's nonzero count.
#[derive(Clone, Default)]
pub(crate) struct Selected {
    pub values: Vec<f32>,
    pub per_chunk: Option<PerChunk>,
    pub nonzero: Vec<u64>,
}

/// A job's counts from the shared pass: all its chunks' together, or each chunk's own.
enum Counted {
    All(Windowed),
    Pieces(PieceWindows),
}

impl Counted {
    /// Two pieces of the pass merged, within the windows' caps (else overflowed: the caps
    /// bound the memory, and the fallback must not depend on how the pass was split).
    fn merge(self, other: Counted, w: &Windows) -> Counted {
        match (self, other) {
            (Counted::All(a), Counted::All(b)) => Counted::All(a.merge_capped(b, w)),
            (Counted::Pieces(a), Counted::Pieces(b)) => Counted::Pieces(a.merge_capped(b, w)),
            _ => unreachable!("a job counts one way"),
        }
    }
}

/// A job's sorted sample: its keys per row.
type Sample = Vec<SampleRow>;

/// Jobs sampled in one pass: each job's index and its sample (None where none was taken).
type Group = Vec<(usize, Option<Sample>)>;

/// Per chunk (start), per request: (#above, #equal) the selected value.
pub(crate) type PerChunk = Vec<(usize, Vec<[u64; 2]>)>;

impl Engine<'_> {
    /// [`Engine::select`] (or [`Engine::select_top_nonzero`]) of every job, the windowed
    /// passes shared; with `per_chunk`, as [`Engine::select`] with each chunk's counts at the
    /// values.
    pub(crate) fn select_many(&self, jobs: &[Job], per_chunk: bool) -> Result<Vec<Selected>> {
        let mut out: Vec<Option<Selected>> = vec![None; jobs.len()];
        // The sampled windows of the jobs that need a pass, in batches within the budget.
        let mut batches: Vec<Vec<(usize, Windows)>> = vec![Vec::new()];
        let mut held = 0usize;
        let force = forced_radix();
        // What a job's sample costs: nothing when it asks nothing or the radix select is
        // forced (tests set WEIGHTWEAVE_FORCE_RADIX to exercise it).
        let sampled = |j: &Job| !force && (!j.requests.is_empty() || !j.tops.is_empty());
        let mut next = 0;
        while next < jobs.len() {
            let group;
            (next, group) = self.sample_group(jobs, next, &sampled)?;
            for (i, sample) in group {
                let j = &jobs[i];
                debug_assert!(j.requests.is_empty() || j.tops.is_empty());
                let guess = Self::guess_job(j, sample);
                match guess {
                    Err(done) => out[i] = Some(done),
                    Ok(Some(w)) => {
                        let values: usize = j.chunks.iter().map(|c| c.len).sum();
                        let keys: usize = w.caps.iter().map(|&c| c.min(values)).sum();
                        if held + keys > WINDOW_BUDGET && !batches.last().expect("one").is_empty() {
                            batches.push(Vec::new());
                            held = 0;
                        }
                        held += keys;
                        batches.last_mut().expect("one").push((i, w));
                    }
                    Ok(None) => {}
                }
            }
        }
        let debug = std::env::var_os("WEIGHTWEAVE_DEBUG").is_some();
        for batch in batches.iter().filter(|b| !b.is_empty()) {
            let t0 = std::time::Instant::now();
            let counted = self.count_batch(jobs, batch, per_chunk)?;
            if debug {
                let s = t0.elapsed().as_secs_f64();
                eprintln!("select (shared pass): {} selects, {s:.3}s", batch.len());
            }
            for ((i, w), counted) in batch.iter().zip(counted) {
                out[*i] = match counted {
                    Counted::All(acc) if !w.late.is_empty() => {
                        Self::top_finish(w, acc).map(|(values, nonzero)| Selected {
                            values,
                            nonzero,
                            per_chunk: None,
                        })
                    }
                    counted => Self::finish_counted(w, counted),
                };
            }
        }
        // Jobs the sample could not guess, or whose windows missed: exactly, alone.
        jobs.iter()
            .zip(out)
            .map(|(j, o)| match o {
                Some(done) => Ok(done),
                None if !j.tops.is_empty() => {
                    let (values, nonzero) = self.top_exact(&j.chunks, j.n_rows, &j.tops, j.rows)?;
                    Ok(Selected {
                        values,
                        nonzero,
                        per_chunk: None,
                    })
                }
                None => Ok(Selected {
                    values: self.radix_alone(&j.chunks, j.n_rows, j.requests.clone(), j.rows)?,
                    ..Default::default()
                }),
            })
            .collect()
    }

    /// The jobs from `from` on whose samples fit one shared pass (at least one job), each with
    /// its sample where `sampled` asks for one; and the first job left.
    fn sample_group(
        &self,
        jobs: &[Job],
        from: usize,
        sampled: &dyn Fn(&Job) -> bool,
    ) -> Result<(usize, Group)> {
        let (mut to, mut keys) = (from, 0usize);
        while let Some(j) = jobs.get(to) {
            let k = match sampled(j) {
                true => sample_keys(&j.chunks, j.n_rows, FLOOR),
                false => 0,
            };
            if to > from && keys + k > SAMPLE_BUDGET {
                break;
            }
            (keys, to) = (keys + k, to + 1);
        }
        let taken = from..to;
        let scopes: Vec<Scope> = jobs[taken.clone()]
            .iter()
            .filter(|j| sampled(j))
            .map(|j| (&j.chunks[..], j.n_rows, j.rows))
            .collect();
        let mut samples = self.sample_scopes(&scopes, FLOOR)?;
        let group = taken
            .map(|i| (i, sampled(&jobs[i]).then(|| samples.next()).flatten()))
            .collect();
        Ok((to, group))
    }

    /// A job's guess from its sample: done (exact from the sample, or nothing asked), windows
    /// for the shared pass, or None for the radix select (no sample: forced; or windows too
    /// wide).
    fn guess_job(
        j: &Job,
        sample: Option<Sample>,
    ) -> std::result::Result<Option<Windows>, Selected> {
        if j.requests.is_empty() && j.tops.is_empty() {
            return Err(Selected::default());
        }
        let Some(s) = sample else {
            return Ok(None);
        };
        let total: u64 = j.chunks.iter().map(|c| c.len as u64).sum();
        if !j.tops.is_empty() {
            return match Self::top_guess_from(&s, total, &j.tops) {
                TopGuess::Exact(values, nonzero) => Err(Selected {
                    values,
                    nonzero,
                    per_chunk: None,
                }),
                TopGuess::Window(w) => Ok(Some(w)),
                TopGuess::None => Ok(None),
            };
        }
        match Self::guess_from(&s, total, j.requests.clone(), Reach::Tensor) {
            Some(Guess::Exact(values)) => Err(Selected {
                values,
                ..Default::default()
            }),
            Some(Guess::Window(w)) => Ok(Some(w)),
            None => Ok(None),
        }
    }

    /// A job's radix select, where the sample could not guess or its windows missed.
    fn radix_alone(
        &self,
        chunks: &[Chunk],
        n_rows: usize,
        requests: Vec<Request>,
        rows: Rows,
    ) -> Result<Vec<f32>> {
        if std::env::var_os("WEIGHTWEAVE_DEBUG").is_some() {
            eprintln!("select: no window held the rank; radix select");
        }
        self.radix_select(chunks, n_rows, requests, rows)
    }

    /// One pass over every chunk of the batch's jobs, each counted into its job's windows.
    fn count_batch(
        &self,
        jobs: &[Job],
        batch: &[(usize, Windows)],
        per_chunk: bool,
    ) -> Result<Vec<Counted>> {
        // Each chunk's job, by (tensor, start): jobs share no chunk (a tensor's long rows may
        // be jobs of their own).
        let mut of_chunk: HashMap<(usize, usize), usize> = HashMap::new();
        let mut chunks = Vec::new();
        for (b, (i, _)) in batch.iter().enumerate() {
            for c in &jobs[*i].chunks {
                let prev = of_chunk.insert((c.tensor, c.start), b);
                debug_assert!(prev.is_none(), "jobs share a chunk");
            }
            chunks.extend_from_slice(&jobs[*i].chunks);
        }
        // A late rank's zeros are counted exactly: no value may be left undistinguished.
        let floors: Vec<Option<Vec<f32>>> = batch
            .iter()
            .map(|(i, w)| w.late.is_empty().then(|| w.floors(jobs[*i].n_rows)))
            .collect();
        let init = || -> Vec<Option<Counted>> { (0..batch.len()).map(|_| None).collect() };
        let counted = self.pass(
            &chunks,
            init,
            |w, c, acc: &mut Vec<Option<Counted>>| {
                let b = of_chunk[&(c.tensor, c.start)];
                let (i, windows) = (&batch[b].0, &batch[b].1);
                let rows = jobs[*i].rows;
                if per_chunk {
                    // Every value exact: the chunk's counts at the found values are read off.
                    let mut part = windows.acc();
                    rows(w, c, None, &mut |row, v, s, _| {
                        crate::simd!(part.count_scored(windows, row, v, s))
                    });
                    let slot = acc[b].get_or_insert_with(|| Counted::Pieces(Default::default()));
                    if let Counted::Pieces(p) = slot {
                        p.push(windows, PieceWindow::new(c.start, c.len as u64, part));
                    }
                } else {
                    let slot = acc[b].get_or_insert_with(|| Counted::All(windows.acc()));
                    if let Counted::All(a) = slot {
                        rows(w, c, floors[b].as_deref(), &mut |row, v, s, out| {
                            crate::simd!(a.count_scored(windows, row, v, s));
                            a.count_below(windows, row, out);
                        });
                    }
                }
                Ok(())
            },
            |a, b| {
                a.into_iter()
                    .zip(b)
                    .zip(batch)
                    .map(|((x, y), (_, w))| match (x, y) {
                        (Some(x), Some(y)) => Some(x.merge(y, w)),
                        (x, None) => x,
                        (None, y) => y,
                    })
                    .collect()
            },
        )?;
        Ok(batch
            .iter()
            .zip(counted)
            .map(|((_, w), c)| {
                c.unwrap_or_else(|| match per_chunk {
                    true => Counted::Pieces(Default::default()),
                    false => Counted::All(w.acc()),
                })
            })
            .collect())
    }

    /// The values (and per-chunk counts) a job's counts give, or None when a rank fell
    /// outside its window.
    fn finish_counted(w: &Windows, counted: Counted) -> Option<Selected> {
        match counted {
            Counted::All(all) => all.finish(w).map(|values| Selected {
                values,
                ..Default::default()
            }),
            Counted::Pieces(found) => {
                let v = found.merged(w)?.finish(w)?;
                let per_chunk = found
                    .pieces
                    .iter()
                    .map(|p| {
                        let at = (0..v.len()).map(|i| p.above_equal(w, i, v[i])).collect();
                        (p.start, at)
                    })
                    .collect();
                Some(Selected {
                    values: v,
                    per_chunk: Some(per_chunk),
                    nonzero: Vec::new(),
                })
            }
        }
    }
}
