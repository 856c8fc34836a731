//! The engine side of [`Kernel`]: statistics scheduled from the methods' requests, and M of a
//! chunk from them. Stage k of every tensor and parameter set runs in one shared pass (the
//! selects in passes of their own, `select_stage.rs`); parameter sets whose statistics
//! agree ([`Kernel::stats_key`], and their own weights) share them. A method with
//! [`Scope::Global`] statistics has one group, the model, asked as one flat tensor; the others a
//! group per tensor.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::sample::{self, forced_radix, sample_keys, SAMPLE_BUDGET, TENSOR_FLOOR};
use super::{grow, Engine, ModelPart, Src, Stats, Work};
use crate::error::Result;
use crate::methods::kernel::{ChunkIn, Found, Kernel, Scratch, Stage, TensorStats, Unit};
use crate::methods::Scope;
use crate::plan::{Chunk, TensorPlan};
use crate::stats::{Reach, ScopeSample};

/// A chunk's sums: (representative, group, chunk start, first unit, `units × slots` values),
/// in chunk order within a group once sorted (a group's chunks are in plan order).
type Partial = (usize, usize, usize, usize, usize, Vec<f64>);

static EMPTY: std::sync::OnceLock<TensorStats> = std::sync::OnceLock::new();

/// The statistics groups of one run: a group per tensor, and the model as group `n`.
pub(super) struct Groups<'p> {
    pub(super) n: usize,
    model: TensorPlan,
    plan: &'p [TensorPlan],
    /// Per representative: whether its statistics are the model's.
    global: Vec<bool>,
    /// Per tensor: whether this run merges it (a run over a group of tensors merges some).
    present: Vec<bool>,
}

impl Groups<'_> {
    pub(super) fn plan(&self, g: usize) -> &TensorPlan {
        if g == self.n {
            &self.model
        } else {
            &self.plan[g]
        }
    }

    /// The group chunk `c` falls in for representative `r`.
    fn of(&self, r: usize, c: &Chunk) -> usize {
        if self.global[r] {
            self.n
        } else {
            c.tensor
        }
    }

    /// Whether representative `r` gathers statistics over group `g`.
    fn live(&self, r: usize, g: usize) -> bool {
        let t = self.plan(g);
        let present = g == self.n || self.present[g];
        (self.global[r] == (g == self.n)) && present && t.mergeable && t.numel > 0
    }

    pub(super) fn chunks(&self, merge: &[Chunk], g: usize) -> Vec<Chunk> {
        if g == self.n {
            merge.to_vec()
        } else {
            merge.iter().filter(|c| c.tensor == g).copied().collect()
        }
    }
}

/// The model as one flat tensor of `d` elements: the group of [`Scope::Global`] statistics.
pub(super) fn model_plan(d: usize) -> TensorPlan {
    TensorPlan::vector("the model", d)
}

/// What one group asks of a trim stage: its asking representatives, their sets and ranks,
/// and its chunks.
struct TrimAsk {
    g: usize,
    asking: Vec<usize>,
    sets: Vec<usize>,
    ranks: Vec<Vec<(usize, u64)>>,
    chunks: Vec<Chunk>,
}

/// One round of stages: what every (representative, group) asks for.
#[derive(Clone, Copy)]
pub(super) struct Round<'r> {
    merge: &'r [Chunk],
    groups: &'r Groups<'r>,
    reps: &'r [usize],
    wants: &'r [Vec<Option<Stage>>],
}

/// A round's (merge chunks, groups, representatives, requests).
pub(super) type Parts<'r> = (
    &'r [Chunk],
    &'r Groups<'r>,
    &'r [usize],
    &'r [Vec<Option<Stage>>],
);

impl<'r> Round<'r> {
    pub(super) fn parts(&self) -> Parts<'r> {
        (self.merge, self.groups, self.reps, self.wants)
    }
}

impl Engine<'_> {
    pub(crate) fn kernel_of(&self, j: usize) -> &Arc<dyn Kernel> {
        &self.recipe.sets[j].method.0 .0
    }

    /// What set `j`'s deltas are: its own weights (where it has them) and DARE.
    pub(super) fn deltas_key(&self, j: usize) -> String {
        let own = self.own_weights[j].then(|| &self.weights[j]);
        format!("{own:?} {:?}", self.kernel_of(j).dare())
    }

    /// Every set's statistics, stage by stage, in shared passes.
    pub(crate) fn kernel_stats(
        &self,
        merge: &[Chunk],
        chunk_size: usize,
        stats: &mut [Stats],
    ) -> Result<()> {
        let sets = self.recipe.sets.len();
        // Representatives: one set per distinct statistics key.
        let mut reps: Vec<usize> = Vec::new();
        let mut rep_keys: Vec<String> = Vec::new();
        let mut of = Vec::with_capacity(sets);
        // By hash, not a scan: a 512 × 512 grid has a quarter million sets.
        let mut keys: std::collections::HashMap<String, usize> = Default::default();
        for j in 0..sets {
            let key = format!("{} {}", self.kernel_of(j).stats_key(), self.deltas_key(j));
            let r = *keys.entry(key.clone()).or_insert_with(|| {
                reps.push(j);
                rep_keys.push(key);
                reps.len() - 1
            });
            of.push(r);
        }
        let n = self.plan.len();
        let d: usize = merge.iter().map(|c| c.len).sum();
        let mut present = vec![false; n];
        for c in merge {
            present[c.tensor] = true;
        }
        let groups = Groups {
            n,
            model: model_plan(d),
            plan: self.plan,
            global: reps
                .iter()
                .map(|&j| self.kernel_of(j).scope() == Scope::Global)
                .collect(),
            present,
        };
        let mut found: Vec<Vec<TensorStats>> =
            vec![vec![TensorStats::default(); n + 1]; reps.len()];
        let gather = matches!(self.part.model, ModelPart::Gather(..));
        // Rows longer than a chunk, for a method ranking within rows: their pieces' cuts.
        let long: Vec<usize> = (0..n)
            .filter(|&i| {
                !gather && groups.present[i] && self.plan[i].has_long(self.rows, chunk_size)
            })
            .collect();
        if !long.is_empty() {
            for (&i, per_set) in long.iter().zip(self.crumbs_stats(merge, &long, &reps)?) {
                for (r, cuts) in per_set.into_iter().enumerate() {
                    found[r][i].cuts = cuts;
                }
            }
        }
        // Tensors whose chunks all hold whole rows (the model as one tensor: not known).
        let mut whole = vec![true; n + 1];
        whole[n] = false;
        for c in merge {
            let row = self.plan[c.tensor].row_len().max(1);
            let numel = self.plan[c.tensor].numel;
            let ends = c.start + c.len;
            if !c.start.is_multiple_of(row) || !(ends.is_multiple_of(row) || ends == numel) {
                whole[c.tensor] = false;
            }
        }
        let mut open: Vec<Vec<bool>> = (0..reps.len())
            .map(|r| (0..=n).map(|g| groups.live(r, g)).collect())
            .collect();
        // A cluster merge: the driver gathers the model's statistics alone, and its units take
        // them as given (their chunks are a part of the model).
        let group = self.part.group;
        for r in (0..reps.len()).filter(|&r| groups.global[r]) {
            if let ModelPart::Given(model) = self.part.model {
                if open[r][n] {
                    found[r][n] = model
                        .tensors
                        .get(&(group, rep_keys[r].clone()))
                        .cloned()
                        .ok_or_else(|| {
                            crate::Error::param(
                                "cluster",
                                "a unit was not given the model's statistics its method needs",
                            )
                        })?;
                    open[r][n] = false;
                }
            }
        }
        if gather {
            for row in &mut open {
                row[..n].iter_mut().for_each(|o| *o = false);
            }
        }
        loop {
            // This stage's requests per (representative, group).
            let mut wants: Vec<Vec<Option<Stage>>> = vec![vec![None; n + 1]; reps.len()];
            let mut any = false;
            for (r, &j) in reps.iter().enumerate() {
                let k = self.kernel_of(j);
                for g in 0..=n {
                    if !open[r][g] {
                        continue;
                    }
                    let (plan, weights) = (groups.plan(g), &self.weights[j]);
                    match k.next_stage_weighted(plan, self.tasks(), weights, &found[r][g], whole[g])
                    {
                        Some(s) => {
                            wants[r][g] = Some(s);
                            any = true;
                        }
                        None => open[r][g] = false,
                    }
                }
            }
            if !any {
                break;
            }
            let round = Round {
                merge,
                groups: &groups,
                reps: &reps,
                wants: &wants,
            };
            let t0 = std::time::Instant::now();
            self.sums_stage(&round, &mut found)?;
            let t1 = std::time::Instant::now();
            self.select_stage(&round, &mut found)?;
            let t2 = std::time::Instant::now();
            self.trim_stage(&round, &mut found)?;
            if std::env::var_os("WEIGHTWEAVE_DEBUG").is_some() {
                let s = |a: std::time::Instant, b: std::time::Instant| (b - a).as_secs_f64();
                let t3 = std::time::Instant::now();
                eprintln!(
                    "stage: sums {:.3}s select {:.3}s trim {:.3}s",
                    s(t0, t1),
                    s(t1, t2),
                    s(t2, t3)
                );
            }
        }
        let given = matches!(self.part.model, ModelPart::Given(_));
        for (r, &j) in reps.iter().enumerate() {
            let k = self.kernel_of(j);
            // Given statistics were checked where they were gathered (this run's "model" is
            // only its unit).
            let checked = |g: usize| groups.live(r, g) && !(given && g == n);
            for g in (0..=n).filter(|&g| checked(g) && !(gather && g < n)) {
                k.check_stats(groups.plan(g), &self.weights[j], &found[r][g])?;
            }
            if let (ModelPart::Gather(into, _), true) = (self.part.model, groups.global[r]) {
                if groups.live(r, n) {
                    into.lock()
                        .expect("not poisoned")
                        .tensors
                        .insert((group, rep_keys[r].clone()), found[r][n].clone());
                }
            }
            if groups.global[r] {
                // Every tensor sees the model's statistics.
                let model = std::mem::take(&mut found[r][n]);
                for (i, t) in self.plan.iter().enumerate() {
                    if groups.present[i] && t.mergeable && t.numel > 0 {
                        found[r][i].stages = model.stages.clone();
                    }
                }
            }
        }
        for (j, s) in stats.iter_mut().enumerate() {
            s.kernel = found[of[j]][..n]
                .iter()
                .enumerate()
                .filter(|(_, t)| !t.stages.is_empty() || !t.cuts.is_empty())
                .map(|(i, t)| (i, t.clone()))
                .collect();
        }
        Ok(())
    }

    /// One pass for every [`Stage::Sums`] and [`Stage::Maxes`] asked for at this stage.
    fn sums_stage(&self, round: &Round, found: &mut [Vec<TensorStats>]) -> Result<()> {
        let (merge, groups, reps, wants) = round.parts();
        let is_sums = |r: usize, c: &Chunk| {
            matches!(
                wants[r][groups.of(r, c)],
                Some(Stage::Sums { .. } | Stage::Maxes { .. })
            )
        };
        let chunks: Vec<Chunk> = merge
            .iter()
            .filter(|c| (0..reps.len()).any(|r| is_sums(r, c)))
            .copied()
            .collect();
        if chunks.is_empty() {
            return Ok(());
        }
        let found_ro: &[Vec<TensorStats>] = found;
        let mut partials: Vec<Partial> = self.pass_shared(
            &chunks,
            Vec::new,
            |w, c, acc: &mut Vec<Partial>| {
                let t = &self.plan[c.tensor];
                for (r, &j) in reps.iter().enumerate() {
                    let g = groups.of(r, c);
                    let (unit, slots, init) = match wants[r][g] {
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
                        k.accumulate(x, &found_ro[r][g], scratch, &mut sums)
                    });
                    acc.push((r, g, c.tensor, c.start, first, sums));
                }
                Ok(())
            },
            |mut a, b| {
                a.extend(b);
                a
            },
            false,
        )?;
        partials.sort_unstable_by_key(|p| (p.0, p.1, p.2, p.3));
        for group in partials.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
            let (r, g) = (group[0].0, group[0].1);
            let (unit, slots, max) = match wants[r][g] {
                Some(Stage::Sums { unit, slots }) => (unit, slots, false),
                Some(Stage::Maxes { unit, slots }) => (unit, slots, true),
                _ => unreachable!("a sums stage"),
            };
            // Over the model, only whole-tensor sums make sense (the model is one tensor).
            let units = if g == groups.n {
                1
            } else {
                unit.count(&self.plan[g])
            };
            let init = if max { f64::NEG_INFINITY } else { 0.0 };
            let mut sums = vec![init; units * slots];
            let mut before = BTreeMap::new();
            for (_, _, _, start, first, part) in group {
                if unit == Unit::Tensor && !max && g != groups.n {
                    before.insert(*start, sums.clone());
                }
                let at = first * slots;
                for (s, p) in sums[at..at + part.len()].iter_mut().zip(part) {
                    *s = if max { s.max(*p) } else { *s + p };
                }
            }
            found[r][g].stages.push(Found::Sums {
                slots,
                sums,
                before,
            });
        }
        Ok(())
    }

    /// The [`Stage::Trim`]s asked for at this stage: per group, the thresholds of every
    /// representative with the sign tallies, in shared passes. The tensors' samples are drawn
    /// together, as many as [`SAMPLE_BUDGET`] holds to a pass ([`Engine::trim_samples`]).
    fn trim_stage(&self, round: &Round, found: &mut [Vec<TensorStats>]) -> Result<()> {
        let (merge, groups, reps, wants) = round.parts();
        let asks: Vec<TrimAsk> = (0..=groups.n)
            .filter_map(|g| {
                let asking: Vec<usize> = (0..reps.len())
                    .filter(|&r| wants[r][g] == Some(Stage::Trim))
                    .collect();
                if asking.is_empty() {
                    return None;
                }
                let sets: Vec<usize> = asking.iter().map(|&r| reps[r]).collect();
                let ranks: Vec<Vec<(usize, u64)>> = asking
                    .iter()
                    .map(|&r| {
                        let k = self.kernel_of(reps[r]);
                        k.ranks(groups.plan(g), self.tasks(), &found[r][g])
                    })
                    .collect();
                let chunks = groups.chunks(merge, g);
                Some(TrimAsk {
                    g,
                    asking,
                    sets,
                    ranks,
                    chunks,
                })
            })
            .collect();
        // From disk, each tensor's sample stays just before its pass: drawn together, ten
        // tensors' random reads ran ahead of the batch's read in sequence (`batches.rs`) and
        // waited on the disk (0.5 B bf16 at scope=tensor in a 1 GiB cgroup: 4.9 -> 5.5 s).
        let model = match self.on_disk() {
            true => None,
            false => Some(groups.n),
        };
        let mut at = 0;
        while at < asks.len() {
            let (to, drawn) = self.trim_samples(&asks, at, model)?;
            for (a, d) in asks[at..to].iter().zip(drawn) {
                // The model's select (group `groups.n`) or one tensor's.
                let reach = match a.g == groups.n {
                    true => Reach::Model,
                    false => Reach::Tensor,
                };
                let got = self.ties_stats(&a.chunks, &a.sets, &a.ranks, (d, reach))?;
                for (&r, (thr, count)) in a.asking.iter().zip(got) {
                    found[r][a.g].stages.push(Found::Trim { thr, count });
                }
            }
            at = to;
        }
        Ok(())
    }

    /// The asks from `from` on whose tensors' samples fit one shared pass (at least one ask),
    /// each with its sample where it is one tensor's and selects something; and the first ask
    /// left. Why together: a sample pass per tensor sorted its three rows on two cores (one
    /// idle a third of the time) and paid a pass's start and residency probes each time.
    /// The model's ask (group `model`) is sampled by [`Engine::ties_stats`] itself, alone (it
    /// may take the sample the one-read path left); with `model` None, every ask is.
    fn trim_samples(
        &self,
        asks: &[TrimAsk],
        from: usize,
        model: Option<usize>,
    ) -> Result<(usize, Vec<Option<ScopeSample>>)> {
        let Some(model) = model else {
            return Ok((from + 1, vec![None]));
        };
        let sampled =
            |a: &TrimAsk| a.g != model && !forced_radix() && a.ranks.iter().any(|r| !r.is_empty());
        let (mut to, mut keys) = (from, 0usize);
        while let Some(a) = asks.get(to) {
            if to > from && (a.g == model || asks[to - 1].g == model) {
                break;
            }
            let k = match sampled(a) {
                true => sample_keys(&a.chunks, self.trim_rows(&a.sets).1, TENSOR_FLOOR),
                false => 0,
            };
            if to > from && keys + k > SAMPLE_BUDGET {
                break;
            }
            (keys, to) = (keys + k, to + 1);
        }
        let taken = &asks[from..to];
        let rows: Vec<(Vec<usize>, usize)> =
            taken.iter().map(|a| self.trim_rows(&a.sets)).collect();
        let emitters: Vec<Box<crate::stats::RowsFn>> = rows
            .iter()
            .map(|(reps, _)| {
                Box::new(
                    move |w: &mut Work,
                          c: &Chunk,
                          _: crate::stats::Floor,
                          emit: &mut crate::stats::Emit| {
                        self.emit_abs(w, c, reps, emit)
                    },
                ) as Box<crate::stats::RowsFn>
            })
            .collect();
        let scopes: Vec<sample::Scope> = (taken.iter().zip(&rows).zip(&emitters))
            .filter(|((a, _), _)| sampled(a))
            .map(|((a, (_, n_rows)), e)| (&a.chunks[..], *n_rows, &**e))
            .collect();
        let mut samples = self.sample_scopes(&scopes, TENSOR_FLOOR)?;
        let drawn = taken
            .iter()
            .map(|a| {
                let total: u64 = a.chunks.iter().map(|c| c.len as u64).sum();
                sampled(a).then(|| (samples.next().expect("one per scope"), total))
            })
            .collect();
        Ok((to, drawn))
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
        let values: Vec<&[f32]> = match self.reads_values(c.tensor) {
            true => vals.iter().map(|d| &d[..n]).collect(),
            false => Vec::new(),
        };
        let x = ChunkIn {
            tensor: &self.plan[c.tensor],
            start: c.start,
            n,
            base: &base[..n],
            deltas: &deltas,
            values: &values,
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
