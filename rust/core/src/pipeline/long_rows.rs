//! The cuts of rows longer than a chunk (Breadcrumbs' long rows; mergekit's per-tensor TIES
//! and Breadcrumbs, whose "row" is the whole tensor): each row's two cut values by an exact
//! select, the rows' selects sharing their passes, then each piece's counts above and at the
//! cuts, so that ties at a cut are ranked by position across the pieces.

use std::collections::BTreeMap;

use crate::error::Result;
use crate::methods::breadcrumbs;
use crate::pipeline::select_many::{Job, PerChunk};
use crate::pipeline::{Engine, Work};
use crate::plan::Chunk;
use crate::select::Request;
use crate::stats::{Cuts, Floor};

/// Per (set, task) that keeps something: the kept ranks [g, g + k) and the indices of its
/// requests for the two cuts ([`Slot`]).
type Slots = Vec<Vec<Option<Slot>>>;

/// One (set, task)'s kept ranks [g, g + k) and its requests: the top cut's at rank g (none
/// where g = 0: nothing is dropped from the top, the cut is +∞) and the low cut's at g + k
/// (none where that is past the row: the rest is kept). mergekit's TIES drops nothing from the
/// top, and selecting each row's maximum there anyway counted every value a second time: its
/// statistics on 0.5 B bf16 took 1.14-1.15 s with that request, 1.05-1.08 s without.
#[derive(Clone, Copy)]
struct Slot {
    g: u64,
    k: u64,
    top: Option<usize>,
    low: Option<usize>,
}

/// One long row's pieces and what its cuts are read with.
struct Pieces<'p> {
    pieces: &'p [Chunk],
    slots: &'p Slots,
    of: &'p [usize],
    reps: &'p [usize],
}

/// A long row's magnitudes at its two cut ranks (the lower one absent when it keeps the rest).
type RowCuts = (f32, Option<f32>);

impl Engine<'_> {
    /// Cuts for every piece of each of `tensors`' long rows, for each of `sets`, by the
    /// piece's start (per tensor, per set): an exact select of the magnitudes at the two cut
    /// ranks of each row (the rows' selects sharing their passes), then a count, per piece, of
    /// the elements above and equal to each cut (the ties are ranked by position), read off
    /// the select's own pass where its windows held the cuts.
    pub(crate) fn crumbs_stats(
        &self,
        merge: &[Chunk],
        tensors: &[usize],
        all: &[usize],
    ) -> Result<Vec<Vec<Cuts>>> {
        let tasks = self.tasks();
        let (of, reps) = self.variants(all);
        let rows = &|w: &mut Work, c: &Chunk, _floor: Floor, emit: &mut crate::stats::Emit| {
            self.emit_abs(w, c, &reps, emit)
        };
        let mut asks = Vec::with_capacity(tensors.len());
        let mut jobs = Vec::new();
        for (ti, &i) in tensors.iter().enumerate() {
            let row = self.plan[i].unit(self.rows);
            let ask = self.crumbs_ask(row as u64, all, &of);
            let chunks: Vec<Chunk> = merge.iter().filter(|c| c.tensor == i).copied().collect();
            for pieces in chunks.chunk_by(|a, b| a.start / row == b.start / row) {
                jobs.push((
                    ti,
                    Job {
                        chunks: pieces.to_vec(),
                        n_rows: reps.len() * tasks,
                        requests: ask.0.clone(),
                        tops: Vec::new(),
                        rows,
                    },
                ));
            }
            asks.push(ask);
        }
        let (owner, jobs): (Vec<usize>, Vec<Job>) = jobs.into_iter().unzip();
        let found = self.select_many(&jobs, true)?;
        let mut stats: Vec<Vec<Cuts>> = vec![vec![BTreeMap::new(); all.len()]; tensors.len()];
        for ((job, ti), sel) in jobs.iter().zip(owner).zip(found) {
            let slots = &asks[ti].1;
            let piece = Pieces {
                pieces: &job.chunks,
                slots,
                of: &of,
                reps: &reps,
            };
            self.piece_cuts(&piece, &sel.values, sel.per_chunk, &mut stats[ti])?;
        }
        Ok(stats)
    }

    /// A long row's requests (up to two per (set, task) that keeps something: [`Slot`]), and
    /// per (set, task) its slot.
    fn crumbs_ask(&self, n: u64, all: &[usize], of: &[usize]) -> (Vec<Request>, Slots) {
        let tasks = self.tasks();
        let mut requests = Vec::new();
        let mut slots: Slots = vec![vec![None; tasks]; all.len()];
        for (k, &j) in all.iter().enumerate() {
            for (t, slot) in slots[k].iter_mut().enumerate() {
                if let Some((g, kk)) = self.kernel_of(j).kept_ranks(n as usize, t) {
                    let row = of[k] * tasks + t;
                    let mut ask = |rank: u64| {
                        requests.push(Request { row, rank });
                        requests.len() - 1
                    };
                    let top = (g > 0).then(|| ask(n - 1 - g));
                    let low = (g + kk < n).then(|| ask(n - 1 - (g + kk)));
                    *slot = Some(Slot { g, k: kk, top, low });
                }
            }
        }
        (requests, slots)
    }

    /// One long row's cuts into `stats` (per set, by piece start), from its selected values
    /// `v` and, when the windowed pass found them, each piece's counts at them (else a pass
    /// counts them).
    fn piece_cuts(
        &self,
        p: &Pieces,
        v: &[f32],
        fused: Option<PerChunk>,
        stats: &mut [Cuts],
    ) -> Result<()> {
        let (tasks, slots, of, reps) = (self.tasks(), p.slots, p.of, p.reps);
        // cuts[k][t] = (top, low) for the sets and tasks that keep something.
        let cuts: Vec<Vec<Option<RowCuts>>> = slots
            .iter()
            .map(|s| {
                s.iter()
                    .map(|o| {
                        o.map(|s| (s.top.map_or(f32::INFINITY, |r| v[r]), s.low.map(|r| v[r])))
                    })
                    .collect()
            })
            .collect();
        let asked = slots
            .iter()
            .flatten()
            .flatten()
            .any(|s| s.top.or(s.low).is_some());
        let counts = match fused {
            // Nothing selected (every cut +∞ or absent): nothing above or at a cut, no pass.
            _ if !asked => Ok((p.pieces.iter())
                .map(|c| (c.start, vec![vec![[0; 4]; tasks]; slots.len()]))
                .collect()),
            Some(per_chunk) => Ok(per_chunk
                .iter()
                .map(|(start, at)| {
                    let at = |r: Option<usize>| r.map_or([0, 0], |r| at[r]);
                    let cells = slots
                        .iter()
                        .map(|s| {
                            s.iter()
                                .map(|o| match *o {
                                    Some(s) => {
                                        let (top, low) = (at(s.top), at(s.low));
                                        [top[0], top[1], low[0], low[1]]
                                    }
                                    None => [0; 4],
                                })
                                .collect()
                        })
                        .collect();
                    (*start, cells)
                })
                .collect()),
            None => self.pass(
                p.pieces,
                Vec::new,
                |w, c, acc: &mut Vec<(usize, Vec<Vec<[u64; 4]>>)>| {
                    let mut per_set = vec![Vec::new(); slots.len()];
                    for (v, &j) in reps.iter().enumerate() {
                        let src = self.set_deltas(w, j, c);
                        let d = w.src(src);
                        for (k, cs) in cuts.iter().enumerate() {
                            if of[k] != v {
                                continue;
                            }
                            per_set[k] = (0..tasks)
                                .map(|t| match cs[t] {
                                    Some((top, low)) => {
                                        breadcrumbs::count_piece(&d[t][..c.len], top, low)
                                    }
                                    None => [0; 4],
                                })
                                .collect();
                        }
                    }
                    acc.push((c.start, per_set));
                    Ok(())
                },
                |mut a, b| {
                    a.extend(b);
                    a
                },
            ),
        };
        let mut counts = counts?;
        counts.sort_unstable_by_key(|(start, _)| *start);
        for (k, cs) in cuts.iter().enumerate() {
            for t in 0..tasks {
                let Some((top, low)) = cs[t] else {
                    for (start, _) in &counts {
                        stats[k].entry(*start).or_insert_with(|| vec![None; tasks]);
                    }
                    continue;
                };
                let Slot { g, k: kk, .. } = slots[k][t].expect("a cut has ranks");
                let above_top: u64 = counts.iter().map(|(_, c)| c[k][t][0]).sum();
                let above_low: u64 = counts.iter().map(|(_, c)| c[k][t][2]).sum();
                let cut = breadcrumbs::Cut {
                    top,
                    top_skip: g - above_top,
                    low: low.map(|l| (l, g + kk - above_low)),
                };
                let (mut top_before, mut low_before) = (0, 0);
                for (start, c) in &counts {
                    let cell = stats[k].entry(*start).or_insert_with(|| vec![None; tasks]);
                    cell[t] = Some(breadcrumbs::Piece {
                        cut,
                        top_before,
                        low_before,
                    });
                    top_before += c[k][t][1];
                    low_before += c[k][t][3];
                }
            }
        }
        Ok(())
    }
}
