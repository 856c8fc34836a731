//! The select stages of the methods' statistics: every group's exact selects at one stage,
//! the tensors' sharing their windowed passes ([`Engine::select_many`]). A group's rows are its
//! representatives' scores; representatives whose deltas and [`Kernel::select_key`] agree
//! share rows.

use super::kernel::Round;
use super::select_many::Job;
use super::{grow, Engine, Work};
use crate::error::Result;
use crate::methods::kernel::{Found, Stage, TensorStats};
use crate::plan::Chunk;
use crate::select::{Request, Score};

/// Rows shared by representatives in a select: (key, first row, rows, the representative
/// scoring them).
type Block = (String, usize, usize, usize);

/// What one group asks to select at a stage.
struct Ask {
    g: usize,
    blocks: Vec<Block>,
    n_rows: usize,
    /// Requests ranked from the bottom, and those from the top of the nonzero scores: (row,
    /// fraction).
    requests: Vec<Request>,
    tops: Vec<(usize, f32)>,
    /// Per asking representative (r, rows): how many values it gets.
    counts: Vec<usize>,
    asking: Vec<(usize, usize)>,
}

impl Engine<'_> {
    /// The exact selects asked for at this stage: one per group, every representative's
    /// scores as rows of it (representatives whose deltas and [`Kernel::select_key`] agree
    /// share their rows). The tensors' selects share their windowed passes
    /// ([`Engine::select_many`]); the model's (global statistics) is one of its own.
    pub(super) fn select_stage(&self, round: &Round, found: &mut [Vec<TensorStats>]) -> Result<()> {
        let (merge, groups, reps, _) = round.parts();
        let asks: Vec<Ask> = (0..=groups.n)
            .filter_map(|g| self.ask(round, found, g))
            .collect();
        if asks.is_empty() {
            return Ok(());
        }
        let found_ro: &[Vec<TensorStats>] = found;
        let scorers: Vec<_> = asks
            .iter()
            .map(|a| self.scorer(&a.blocks, a.g, found_ro, reps))
            .collect();
        let chunks: Vec<Vec<Chunk>> = asks.iter().map(|a| groups.chunks(merge, a.g)).collect();
        // Per ask: (values, top values, nonzero counts).
        let mut got: Vec<(Vec<f32>, Vec<f32>, Vec<u64>)> = vec![Default::default(); asks.len()];
        // The tensors' selects together, where a tensor asks one kind; the model's alone (its
        // chunks are every tensor's), and a tensor asking both kinds (rare: sce beside another
        // select in one weave) in two passes of its own.
        let mut jobs = Vec::new();
        for (i, a) in asks.iter().enumerate() {
            let (req, top) = (!a.requests.is_empty(), !a.tops.is_empty());
            if a.g == groups.n || (req && top) {
                if req {
                    got[i].0 =
                        self.select(&chunks[i], a.n_rows, a.requests.clone(), &*scorers[i])?;
                }
                if top {
                    (got[i].1, got[i].2) =
                        self.select_top_nonzero(&chunks[i], a.n_rows, &a.tops, &*scorers[i])?;
                }
                continue;
            }
            jobs.push((
                i,
                Job {
                    chunks: chunks[i].clone(),
                    n_rows: a.n_rows,
                    requests: a.requests.clone(),
                    tops: a.tops.clone(),
                    rows: &*scorers[i],
                },
            ));
        }
        let (at, jobs): (Vec<usize>, Vec<Job>) = jobs.into_iter().unzip();
        for (i, sel) in at.into_iter().zip(self.select_many(&jobs, false)?) {
            got[i] = match asks[i].tops.is_empty() {
                true => (sel.values, Vec::new(), Vec::new()),
                false => (Vec::new(), sel.values, sel.nonzero),
            };
        }
        drop(scorers);
        for (a, (values, top_values, nonzero)) in asks.iter().zip(got) {
            let g = a.g;
            let (mut at, mut at_top) = (0, 0);
            for (&(r, _), &n) in a.asking.iter().zip(&a.counts) {
                if self
                    .kernel_of(reps[r])
                    .top_of_nonzero(&found[r][g])
                    .is_some()
                {
                    let range = at_top..at_top + n;
                    found[r][g].stages.push(Found::Sums {
                        slots: 1,
                        sums: nonzero[range.clone()].iter().map(|&c| c as f64).collect(),
                        before: Default::default(),
                    });
                    found[r][g]
                        .stages
                        .push(Found::Select(top_values[range].to_vec()));
                    at_top += n;
                    continue;
                }
                found[r][g]
                    .stages
                    .push(Found::Select(values[at..at + n].to_vec()));
                at += n;
            }
        }
        Ok(())
    }

    /// What group `g` asks to select at this stage, if anything.
    fn ask(&self, round: &Round, found: &[Vec<TensorStats>], g: usize) -> Option<Ask> {
        let (_, groups, reps, wants) = round.parts();
        let asking: Vec<(usize, usize)> = (0..reps.len())
            .filter_map(|r| match wants[r][g] {
                Some(Stage::Select { rows }) => Some((r, rows)),
                _ => None,
            })
            .collect();
        if asking.is_empty() {
            return None;
        }
        let mut a = Ask {
            g,
            blocks: Vec::new(),
            n_rows: 0,
            requests: Vec::new(),
            counts: Vec::new(),
            tops: Vec::new(),
            asking: Vec::new(),
        };
        for &(r, rows) in &asking {
            let k = self.kernel_of(reps[r]);
            let key = format!(
                "{} {} {rows}",
                self.deltas_key(reps[r]),
                k.select_key(&found[r][g])
            );
            let base = match a.blocks.iter().find(|b| b.0 == key) {
                Some(b) => b.1,
                None => {
                    a.blocks.push((key, a.n_rows, rows, r));
                    a.n_rows += rows;
                    a.n_rows - rows
                }
            };
            if let Some(f) = k.top_of_nonzero(&found[r][g]) {
                a.counts.push(rows);
                a.tops.extend((0..rows).map(|row| (base + row, f)));
                continue;
            }
            let ranks = k.ranks(groups.plan(g), self.tasks(), &found[r][g]);
            a.counts.push(ranks.len());
            a.requests
                .extend(ranks.into_iter().map(|(row, rank)| Request {
                    row: base + row,
                    rank,
                }));
        }
        a.asking = asking;
        Some(a)
    }

    /// Scores a chunk of group `g` as the rows of its select: each block's representative's
    /// [`Kernel::score`].
    fn scorer<'s>(
        &'s self,
        blocks: &'s [Block],
        g: usize,
        found: &'s [Vec<TensorStats>],
        reps: &'s [usize],
    ) -> Box<crate::stats::RowsFn<'s>> {
        Box::new(
            move |w: &mut Work,
                  c: &Chunk,
                  floor: crate::stats::Floor,
                  emit: &mut crate::stats::Emit| {
                for &(_, base, rows, r) in blocks {
                    let floor = floor.map(|f| &f[base..base + rows]);
                    let mut out = std::mem::take(&mut w.sel);
                    out.resize_with(out.len().max(rows), Vec::new);
                    for o in &mut out[..rows] {
                        grow(o, c.len);
                    }
                    let kept = self.with_chunk(w, reps[r], c, |k, x, scratch| {
                        k.score(x, &found[r][g], scratch, floor, &mut out[..rows])
                    });
                    debug_assert!(kept == c.len || floor.is_some(), "left out without a floor");
                    for (row, o) in out[..rows].iter().enumerate() {
                        emit(base + row, &o[..kept], Score::Value, (c.len - kept) as u64);
                    }
                    w.sel = out;
                }
            },
        )
    }
}
