//! The engine side of [`Kernel`]: statistics scheduled from the methods' requests, and M of a
//! chunk from them. Stage k of every tensor and parameter set runs in one shared pass (a select
//! takes a pass per tensor, as TIES's per-tensor scope does); parameter sets whose statistics
//! agree ([`Kernel::stats_key`]) share them.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{grow, Engine, Src, Stats, Work};
use crate::error::Result;
use crate::methods::kernel::{ChunkIn, Found, Kernel, Scratch, Stage, TensorStats, Unit};
use crate::methods::Method;
use crate::plan::Chunk;
use crate::select::Request;

/// A chunk's sums: (representative, tensor, chunk start, first unit, `units × slots` values).
type Partial = (usize, usize, usize, usize, Vec<f64>);

static EMPTY: std::sync::OnceLock<TensorStats> = std::sync::OnceLock::new();

impl Engine<'_> {
    fn kernel_of(&self, j: usize) -> &Arc<dyn Kernel> {
        match &self.recipe.sets[j].method {
            Method::Kernel(k) => &k.0,
            other => unreachable!("{} is not a kernel method", other.name()),
        }
    }

    /// Every set's per-tensor statistics, stage by stage, in shared passes.
    pub(crate) fn kernel_stats(&self, merge: &[Chunk], stats: &mut [Stats]) -> Result<()> {
        let sets = self.recipe.sets.len();
        // Representatives: one set per distinct statistics key.
        let mut reps: Vec<usize> = Vec::new();
        let mut of = Vec::with_capacity(sets);
        let mut keys: Vec<String> = Vec::new();
        for j in 0..sets {
            let key = self.kernel_of(j).stats_key();
            match keys.iter().position(|k| *k == key) {
                Some(r) => of.push(r),
                None => {
                    keys.push(key);
                    reps.push(j);
                    of.push(reps.len() - 1);
                }
            }
        }
        let n_tensors = self.plan.len();
        let mut found: Vec<Vec<TensorStats>> =
            vec![vec![TensorStats::default(); n_tensors]; reps.len()];
        let mut open: Vec<Vec<bool>> = vec![vec![true; n_tensors]; reps.len()];
        loop {
            // This stage's requests per (representative, tensor).
            let mut wants: Vec<Vec<Option<Stage>>> = vec![vec![None; n_tensors]; reps.len()];
            let mut any = false;
            for (r, &j) in reps.iter().enumerate() {
                let k = self.kernel_of(j);
                for i in 0..n_tensors {
                    if !open[r][i] || !self.plan[i].mergeable || self.plan[i].numel == 0 {
                        continue;
                    }
                    match k.next_stage(&self.plan[i], self.tasks(), &found[r][i]) {
                        Some(s) => {
                            wants[r][i] = Some(s);
                            any = true;
                        }
                        None => open[r][i] = false,
                    }
                }
            }
            if !any {
                break;
            }
            self.sums_stage(merge, &reps, &wants, &mut found)?;
            self.select_stage(merge, &reps, &wants, &mut found)?;
        }
        for (r, &j) in reps.iter().enumerate() {
            let k = self.kernel_of(j);
            for (i, st) in found[r].iter().enumerate() {
                if self.plan[i].mergeable && self.plan[i].numel > 0 {
                    k.check_stats(&self.plan[i], self.tasks(), st)?;
                }
            }
        }
        for (j, s) in stats.iter_mut().enumerate() {
            s.kernel = found[of[j]]
                .iter()
                .enumerate()
                .filter(|(_, t)| !t.stages.is_empty())
                .map(|(i, t)| (i, t.clone()))
                .collect();
        }
        Ok(())
    }

    /// One pass for every [`Stage::Sums`] asked for at this stage.
    fn sums_stage(
        &self,
        merge: &[Chunk],
        reps: &[usize],
        wants: &[Vec<Option<Stage>>],
        found: &mut [Vec<TensorStats>],
    ) -> Result<()> {
        let is_sums = |r: usize, i: usize| {
            matches!(wants[r][i], Some(Stage::Sums { .. } | Stage::Maxes { .. }))
        };
        let chunks: Vec<Chunk> = merge
            .iter()
            .filter(|c| (0..reps.len()).any(|r| is_sums(r, c.tensor)))
            .copied()
            .collect();
        if chunks.is_empty() {
            return Ok(());
        }
        let found_ro: &[Vec<TensorStats>] = found;
        let mut partials: Vec<Partial> = self.pass(
            &chunks,
            Vec::new,
            |w, c, acc: &mut Vec<Partial>| {
                let t = &self.plan[c.tensor];
                for (r, &j) in reps.iter().enumerate() {
                    let (unit, slots, init) = match wants[r][c.tensor] {
                        Some(Stage::Sums { unit, slots }) => (unit, slots, 0.0),
                        Some(Stage::Maxes { unit, slots }) => (unit, slots, f64::NEG_INFINITY),
                        _ => continue,
                    };
                    let (first, units) = match unit {
                        Unit::Tensor => (0, 1),
                        Unit::Row => {
                            let row = t.row_len();
                            (
                                c.start / row,
                                (c.start + c.len - 1) / row - c.start / row + 1,
                            )
                        }
                        Unit::Column => (0, unit.count(t)),
                    };
                    let mut sums = vec![init; units * slots];
                    self.with_chunk(w, j, c, |k, x, scratch| {
                        k.accumulate(x, &found_ro[r][c.tensor], scratch, &mut sums)
                    });
                    acc.push((r, c.tensor, c.start, first, sums));
                }
                Ok(())
            },
            |mut a, b| {
                a.extend(b);
                a
            },
        )?;
        partials.sort_unstable_by_key(|p| (p.0, p.1, p.2));
        for group in partials.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
            let (r, i) = (group[0].0, group[0].1);
            let (unit, slots, max) = match wants[r][i] {
                Some(Stage::Sums { unit, slots }) => (unit, slots, false),
                Some(Stage::Maxes { unit, slots }) => (unit, slots, true),
                _ => unreachable!("a sums stage"),
            };
            let units = unit.count(&self.plan[i]);
            let init = if max { f64::NEG_INFINITY } else { 0.0 };
            let mut sums = vec![init; units * slots];
            let mut before = BTreeMap::new();
            for (_, _, start, first, part) in group {
                if unit == Unit::Tensor && !max {
                    before.insert(*start, sums.clone());
                }
                let at = first * slots;
                for (s, p) in sums[at..at + part.len()].iter_mut().zip(part) {
                    *s = if max { s.max(*p) } else { *s + p };
                }
            }
            found[r][i].stages.push(Found::Sums {
                slots,
                sums,
                before,
            });
        }
        Ok(())
    }

    /// The exact selects asked for at this stage: one per tensor, every representative's
    /// scores as rows of it.
    fn select_stage(
        &self,
        merge: &[Chunk],
        reps: &[usize],
        wants: &[Vec<Option<Stage>>],
        found: &mut [Vec<TensorStats>],
    ) -> Result<()> {
        for i in 0..self.plan.len() {
            let rows: Vec<usize> = (0..reps.len())
                .filter(|&r| wants[r][i] == Some(Stage::Select))
                .collect();
            if rows.is_empty() {
                continue;
            }
            let chunks: Vec<Chunk> = merge.iter().filter(|c| c.tensor == i).copied().collect();
            let mut requests = Vec::new();
            let mut counts = Vec::new();
            for (row, &r) in rows.iter().enumerate() {
                let ranks = self.kernel_of(reps[r]).ranks(&self.plan[i], &found[r][i]);
                counts.push(ranks.len());
                requests.extend(ranks.into_iter().map(|rank| Request { row, rank }));
            }
            let values = if requests.is_empty() {
                Vec::new()
            } else {
                let found_ro: &[Vec<TensorStats>] = found;
                let emit = |w: &mut Work, c: &Chunk, emit: &mut dyn FnMut(usize, &[f32])| {
                    for (row, &r) in rows.iter().enumerate() {
                        let mut out = std::mem::take(&mut w.signed);
                        grow(&mut out, c.len);
                        self.with_chunk(w, reps[r], c, |k, x, scratch| {
                            k.score(x, &found_ro[r][i], scratch, &mut out[..c.len])
                        });
                        emit(row, &out[..c.len]);
                        w.signed = out;
                    }
                };
                self.select(&chunks, rows.len(), requests, &emit)?
            };
            let mut at = 0;
            for (&r, n) in rows.iter().zip(counts) {
                found[r][i]
                    .stages
                    .push(Found::Select(values[at..at + n].to_vec()));
                at += n;
            }
        }
        Ok(())
    }

    /// Calls `f` with set `j`'s kernel and chunk `c` as it sees it.
    pub(crate) fn with_chunk<R>(
        &self,
        w: &mut Work,
        j: usize,
        c: &Chunk,
        f: impl FnOnce(&dyn Kernel, &ChunkIn, Scratch) -> R,
    ) -> R {
        let k = self.kernel_of(j);
        let src = self.set_deltas(w, j, c);
        let n = c.len;
        let Work {
            base,
            raw,
            plain,
            eff,
            vals,
            scratch,
            out,
            scores,
            keys,
            wide,
            ..
        } = w;
        let from: &[Vec<f32>] = match src {
            Src::Raw => raw,
            Src::Plain => plain,
            Src::Eff => eff,
        };
        let deltas: Vec<&[f32]> = from.iter().map(|d| &d[..n]).collect();
        let values: Vec<&[f32]> = vals.iter().map(|d| &d[..n]).collect();
        let x = ChunkIn {
            tensor: &self.plan[c.tensor],
            start: c.start,
            n,
            base: &base[..n],
            deltas: &deltas,
            values: if self.values { &values } else { &[] },
            weights: &self.weights[j],
            given: self
                .given
                .get(c.tensor)
                .copied()
                .flatten()
                .map(|g| &g[c.start..c.start + n]),
            seed: self.recipe.seed,
        };
        let scratch = Scratch {
            a: scratch,
            b: out,
            per_task: scores,
            keys,
            wide,
        };
        f(k.as_ref(), &x, scratch)
    }

    /// M of set `j` for one chunk, into `w.m` (a value for [`Output::Value`] kernels).
    pub(crate) fn kernel_m(&self, w: &mut Work, j: usize, c: &Chunk, stats: &Stats) {
        let st = stats
            .kernel
            .get(&c.tensor)
            .unwrap_or_else(|| EMPTY.get_or_init(TensorStats::default));
        let mut m = std::mem::take(&mut w.m);
        grow(&mut m, c.len);
        self.with_chunk(w, j, c, |k, x, scratch| {
            k.merge(x, st, scratch, &mut m[..c.len])
        });
        w.m = m;
    }
}
