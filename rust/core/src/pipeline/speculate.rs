//! One read for the global TIES (and DARE-TIES): the output pass runs with statistics guessed
//! from a sample, gathers the exact ones as it goes, and rewrites the few elements the guess
//! may have got wrong once they are known.
//!
//! The sample gives each trim threshold a key window that holds it (or the pass finds that it
//! did not). An element whose |τ_t| all fall outside their windows survives or falls to the
//! trim the same way whatever the exact thresholds are, so its M is settled, unless its trimmed
//! values cancel (it then takes the majority sign, known only at the end).
//! [`SignTally::observe_marking`] marks the others; the pass holds their inputs (what `load`
//! made of them, and each set's own deltas) with their position, and writes every chunk whole
//! with the guessed statistics. At the end, each held element whose M the exact statistics
//! change is computed again as a one-element chunk at its own index (so DARE's and the random
//! pool's draws are the same) and written over the guess.
//!
//! Where the premise fails the run falls back to the passes it would have made anyway, with
//! nothing lost: a threshold outside its window (radix select and a sign pass, then the output
//! pass), a tally or the held elements past their budget, or a guessed value outside the
//! output's range (the output pass again, with the exact statistics).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use rayon::prelude::*;

use super::patch::{Collect, Edits};
use super::room;
use super::sample::FLOOR;
use super::{grow, kernel::model_plan, Engine, ModelPart, Part, Stats, Work};
use crate::error::{Error, Result};
use crate::methods::kernel::{Found, TensorStats};
use crate::methods::sign_tally::SignTally;
use crate::plan::{Chunk, TensorPlan};
use crate::pool::Pool;
use crate::recipe::{Combine, Recipe};
use crate::select::{key, unkey, Request, Windowed, Windows};
use crate::stats::{Reach, SpareSample};
use crate::Sink;

/// Bytes the held elements may take before the run falls back to a second output pass, at
/// most: [`held_budget`] gives less where memory is short.
const HELD_BUDGET: usize = 256 << 20;

/// [`HELD_BUDGET`], or an eighth of the memory this process may still take ([`room`]) where
/// that is less: the held records grow by doubling and are merged across workers, so their
/// peak is a few times what they count.
fn held_budget() -> usize {
    let room = room::room().map_or(usize::MAX, |r| usize::try_from(r / 8).unwrap_or(usize::MAX));
    HELD_BUDGET.min(room)
}

/// What [`Engine::speculate`] did.
pub(super) enum Spec {
    /// Not for this run: the usual statistics passes, then the output pass.
    No,
    /// The exact statistics; the merged tensors still need their output pass.
    Stats(Vec<Stats>),
    /// Every merged tensor written with the exact statistics.
    Written,
}

/// Whether a run of `recipe` takes the one-read path. It can where every parameter set is a
/// global TIES and nothing after M needs the exact statistics before the output (LiNeS's fitted
/// α, re-quantized FP8 scales, a function pool), on a run that computes its own statistics.
/// It does where `WEIGHTWEAVE_ONE_READ` is `1`, never where it is `0`, and otherwise where the
/// inputs come from disk (`from_disk`: some page of them is not in memory).
///
/// Why only then: the pass's marking and holding cost more compute than the statistics pass
/// it replaces saves once the inputs are in memory (2 cores, 0.1 B bf16: 0.70-0.78 s against
/// 0.59-0.64 s); read from disk, the saved read is worth more (in a cgroup smaller than the
/// inputs, TIES 2.08-2.39 s against 2.48-2.87 s). The numbers are in
/// `benches/results/one_read.md`.
pub(crate) fn eligible(
    recipe: &Recipe,
    plan: &[TensorPlan],
    merge: &[Chunk],
    part: &Part,
    from_disk: bool,
) -> bool {
    let on = match std::env::var_os("WEIGHTWEAVE_ONE_READ") {
        Some(v) if v == "1" => true,
        Some(v) if v == "0" => false,
        _ => from_disk,
    };
    on && matches!(part.model, ModelPart::Compute)
        && recipe.sets.iter().all(|s| s.method.speculates())
        && recipe.lines.as_ref().is_none_or(|l| l.alpha.is_some())
        && !matches!(
            recipe.combine,
            Combine::Weave {
                pool: Pool::Custom(_),
                ..
            }
        )
        && merge.iter().all(|c| plan[c.tensor].requant.is_none())
}

/// Where a held element's values sit in its record: the base, each task's delta as `load`
/// leaves it, the unweighted deltas (when kept), then each variant's own deltas.
struct Layout {
    tasks: usize,
    plain: bool,
    /// Per variant, the offset of the deltas its kernel sees.
    sees: Vec<usize>,
    /// Per variant with deltas of its own (weights, DARE): its offset.
    own: Vec<Option<usize>>,
    width: usize,
}

/// The elements a pass holds: (tensor, element) and `width` values each.
#[derive(Default)]
struct Held {
    at: Vec<(u32, u64)>,
    vals: Vec<f32>,
}

/// The positions of the marked elements, ascending. Few are marked (0.06 % of the 0.5 B
/// bf16 set's): blocks of 64 are skipped on one OR of their marks, which vectorizes, where
/// an element-by-element test was 5 % of the one-read pass (`perf`).
fn marked(marks: &[u8]) -> Vec<usize> {
    let mut picked = Vec::new();
    for (b, block) in marks.chunks(64).enumerate() {
        if block.iter().fold(0u8, |a, &m| a | m) != 0 {
            let at = block.iter().enumerate().filter(|&(_, &m)| m != 0);
            picked.extend(at.map(|(i, _)| b * 64 + i));
        }
    }
    picked
}

/// What decides whether a held element changes: each representative's variant, its guessed
/// and exact thresholds, and its exact sign count.
type Verdicts<'v> = (&'v [usize], &'v [Vec<f32>], &'v [Vec<f32>], &'v [i64]);

/// A worker's share of the pass.
struct Acc {
    windows: Windowed,
    tallies: Vec<SignTally>,
    held: Held,
    /// A guessed chunk fell outside the output's range: write it all again.
    redo: bool,
}

impl Engine<'_> {
    /// Runs the one-read path where [`eligible`] says so (see the module's notes).
    pub(super) fn speculate(&self, merge: &[Chunk], sink: &dyn Sink) -> Result<Spec> {
        let sets: Vec<usize> = (0..self.recipe.sets.len()).collect();
        // Representatives: sets whose statistics agree (a grid repeats them).
        let mut reps: Vec<usize> = Vec::new();
        let mut rep_of = Vec::with_capacity(sets.len());
        let mut keys: std::collections::HashMap<String, usize> = Default::default();
        for &j in &sets {
            let k = format!("{} {}", self.kernel_of(j).stats_key(), self.deltas_key(j));
            rep_of.push(*keys.entry(k).or_insert_with(|| {
                reps.push(j);
                reps.len() - 1
            }));
        }
        let tasks = self.tasks();
        let d: usize = merge.iter().map(|c| c.len).sum();
        let model = model_plan(d);
        let (of, variants) = self.variants(&reps);
        let mut requests = Vec::new();
        let mut slot: Vec<Vec<Option<usize>>> = vec![vec![None; tasks]; reps.len()];
        for (k, &j) in reps.iter().enumerate() {
            for (t, rank) in self
                .kernel_of(j)
                .ranks(&model, tasks, &TensorStats::default())
            {
                slot[k][t] = Some(requests.len());
                requests.push(Request {
                    row: of[k] * tasks + t,
                    rank,
                });
            }
        }
        let n_rows = variants.len() * tasks;
        let rows =
            &|w: &mut Work,
              c: &Chunk,
              _floor: crate::stats::Floor,
              emit: &mut crate::stats::Emit| { self.emit_abs(w, c, &variants, emit) };
        let mut sample = None;
        let windows = if requests.is_empty() {
            Windows {
                requests: Vec::new(),
                bounds: Vec::new(),
                caps: Vec::new(),
                viable: true,
                guess: Vec::new(),
                late: Vec::new(),
                total: 0,
                expected: Vec::new(),
                dense: Vec::new(),
            }
        } else {
            sample = self.sample_scope(merge, n_rows, rows, FLOOR)?;
            let guess = sample.as_ref().and_then(|(s, total)| {
                Engine::guess_from(s, *total, requests.clone(), Reach::Model)
            });
            match guess {
                Some(crate::stats::Guess::Window(w)) => w,
                // The sample was the data: windows one key wide.
                Some(crate::stats::Guess::Exact(v)) => Windows {
                    bounds: v.iter().map(|&x| (key(x), key(x))).collect(),
                    guess: v.iter().map(|&x| key(x)).collect(),
                    requests: requests.clone(),
                    caps: vec![0; requests.len()],
                    viable: true,
                    late: Vec::new(),
                    total: 0,
                    expected: vec![0.0; requests.len()],
                    dense: vec![false; requests.len()],
                },
                None => return Ok(Spec::No),
            }
        };
        let zero = key(0.0);
        let per_set = |f: &dyn Fn(usize) -> u32| -> Vec<Vec<u32>> {
            slot.iter()
                .map(|s| s.iter().map(|o| o.map_or(zero, f)).collect())
                .collect()
        };
        let lo = per_set(&|i| windows.bounds[i].0);
        let hi = per_set(&|i| windows.bounds[i].1);
        let bounds: Vec<Vec<(u32, u32)>> = lo
            .iter()
            .zip(&hi)
            .map(|(l, h)| l.iter().copied().zip(h.iter().copied()).collect())
            .collect();
        let guessed_thr: Vec<Vec<f32>> = per_set(&|i| windows.guess[i])
            .iter()
            .map(|ks| ks.iter().map(|&k| unkey(k)).collect())
            .collect();
        // The majority sign is guessed positive.
        let guessed = self.trim_stats(&rep_of, &reps, merge, &guessed_thr, &vec![1; reps.len()]);
        let layout = self.layout(&variants);
        // Tests shrink the budget (WEIGHTWEAVE_HELD_BUDGET, bytes) to reach the fallback.
        let budget = std::env::var("WEIGHTWEAVE_HELD_BUDGET")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(held_budget);
        let cap = budget / (16 + 4 * layout.width);
        // The elements the windows are expected to set aside (each task's as if none shared
        // an element; the cancelling ones come on top): past the cap, the pass would end in
        // the output pass again, a read more than the statistics passes make.
        let expected: f64 = windows.expected.iter().sum();
        if expected > cap as f64 {
            if std::env::var_os("WEIGHTWEAVE_DEBUG").is_some() {
                eprintln!("one read: {expected:.0} elements expected held, cap {cap}: passes");
            }
            if let Some(s) = sample {
                *self.spare_sample.lock().expect("not poisoned") =
                    Some(SpareSample::new(merge, n_rows, &variants, s));
            }
            return Ok(Spec::No);
        }
        let (count, over) = (AtomicUsize::new(0), AtomicBool::new(false));
        self.in_output.store(true, Ordering::Relaxed);
        let t0 = std::time::Instant::now();
        let acc = self.pass(
            merge,
            || Acc {
                windows: windows.acc(),
                tallies: (0..reps.len())
                    .map(|_| SignTally::new(windows.tally_cap() * tasks))
                    .collect(),
                held: Held::default(),
                redo: false,
            },
            #[inline(always)]
            |w, c, acc| {
                let n = c.len;
                let mut marks = std::mem::take(&mut w.marks);
                marks.clear();
                marks.resize(n, 0);
                for (v, &j) in variants.iter().enumerate() {
                    let src = self.set_deltas(w, j, c);
                    let p = w.parts(src);
                    for (t, x) in p.deltas.iter().enumerate() {
                        let row = v * tasks + t;
                        crate::simd!(acc.windows.count_abs(&windows, row, &x[..n]));
                    }
                    for (k, tally) in acc.tallies.iter_mut().enumerate() {
                        if of[k] == v {
                            let scratch = (&mut p.scratch[..], &mut p.m[..]);
                            crate::simd!(
                                tally.observe_marking(p.deltas, &bounds[k], n, scratch, &mut marks)
                            );
                        }
                    }
                }
                let picked = marked(&marks);
                let marked = picked.len();
                if marked > 0 && !over.load(Ordering::Relaxed) {
                    if count.fetch_add(marked, Ordering::Relaxed) + marked > cap {
                        over.store(true, Ordering::Relaxed);
                    } else {
                        self.hold(w, c, &variants, &layout, &picked, &mut acc.held);
                    }
                }
                if over.load(Ordering::Relaxed) {
                    acc.held = Held::default();
                }
                w.marks = marks;
                match self.output_chunk(w, c, &guessed, sink) {
                    Err(Error::Overflow { .. } | Error::ArithmeticOverflow { .. }) => {
                        acc.redo = true;
                        Ok(())
                    }
                    r => r,
                }
            },
            |mut a, mut b| {
                a.windows = a.windows.merge(b.windows);
                a.tallies = a
                    .tallies
                    .into_iter()
                    .zip(b.tallies)
                    .map(|(x, y)| x.merge(y))
                    .collect();
                a.held.at.append(&mut b.held.at);
                a.held.vals.append(&mut b.held.vals);
                a.redo |= b.redo;
                a
            },
        )?;
        self.in_output.store(false, Ordering::Relaxed);
        if std::env::var_os("WEIGHTWEAVE_DEBUG").is_some() {
            eprintln!("one read: pass {:.2}s", t0.elapsed().as_secs_f64());
        }
        let Acc {
            windows: found,
            tallies,
            held,
            redo,
        } = acc;
        let thresholds = |v: &[f32]| -> Vec<Vec<f32>> {
            slot.iter()
                .map(|s| s.iter().map(|o| o.map_or(0.0, |i| v[i])).collect())
                .collect()
        };
        let Some(v) = found.finish(&windows) else {
            // A threshold outside its window: the tallies and the marks stood on a wrong premise.
            let thr = thresholds(&self.radix_select(merge, n_rows, requests, rows)?);
            let counts = self.sign_counts(merge, &of, &variants, &thr)?;
            return Ok(Spec::Stats(
                self.trim_stats(&rep_of, &reps, merge, &thr, &counts),
            ));
        };
        let thr = thresholds(&v);
        let resolved: Option<Vec<i64>> = tallies
            .iter()
            .zip(&thr)
            .map(|(t, x)| t.resolve(x))
            .collect();
        let (counts, settled) = match resolved {
            Some(c) => (c, !redo && !over.load(Ordering::Relaxed)),
            None => (self.sign_counts(merge, &of, &variants, &thr)?, false),
        };
        let exact = self.trim_stats(&rep_of, &reps, merge, &thr, &counts);
        if !settled {
            return Ok(Spec::Stats(exact));
        }
        self.fix_up(
            held,
            &layout,
            (&of, &guessed_thr, &thr, &counts),
            &exact,
            sink,
        )?;
        Ok(Spec::Written)
    }

    /// Every set's statistics from its representative's thresholds and sign count, for every
    /// merged tensor (the model's, as the statistics passes hand them out).
    fn trim_stats(
        &self,
        rep_of: &[usize],
        reps: &[usize],
        merge: &[Chunk],
        thr: &[Vec<f32>],
        counts: &[i64],
    ) -> Vec<Stats> {
        let mut present = vec![false; self.plan.len()];
        for c in merge {
            present[c.tensor] = true;
        }
        let per_rep: Vec<TensorStats> = (0..reps.len())
            .map(|k| TensorStats {
                stages: vec![Found::Trim {
                    thr: thr[k].clone(),
                    count: counts[k],
                }],
                ..TensorStats::default()
            })
            .collect();
        rep_of
            .iter()
            .map(|&k| Stats {
                kernel: (0..self.plan.len())
                    .filter(|&i| present[i] && self.plan[i].mergeable && self.plan[i].numel > 0)
                    .map(|i| (i, per_rep[k].clone()))
                    .collect(),
            })
            .collect()
    }

    fn layout(&self, variants: &[usize]) -> Layout {
        let tasks = self.tasks();
        let plain = self.need_plain;
        let mut width = 1 + tasks * (1 + usize::from(plain));
        let mut own = Vec::new();
        let mut sees = Vec::new();
        for &j in variants {
            let method = &self.recipe.sets[j].method;
            if method.unweighted() {
                own.push(None);
                sees.push(if plain { 1 + tasks } else { 1 });
            } else if self.own_weights[j] || method.dare().is_some() {
                own.push(Some(width));
                sees.push(width);
                width += tasks;
            } else {
                own.push(None);
                sees.push(1);
            }
        }
        Layout {
            tasks,
            plain,
            sees,
            own,
            width,
        }
    }

    /// Holds chunk `c`'s marked elements (`picked`, ascending): their position and inputs, and
    /// each variant's own deltas (formed again for all but the last variant, whose are still
    /// in `w.eff`).
    fn hold(
        &self,
        w: &mut Work,
        c: &Chunk,
        variants: &[usize],
        layout: &Layout,
        picked: &[usize],
        held: &mut Held,
    ) {
        let first = held.vals.len();
        held.vals.resize(first + picked.len() * layout.width, 0.0);
        for (h, &i) in picked.iter().enumerate() {
            held.at.push((c.tensor as u32, (c.start + i) as u64));
            let rec = &mut held.vals[first + h * layout.width..first + (h + 1) * layout.width];
            rec[0] = w.base[i];
            for t in 0..layout.tasks {
                rec[1 + t] = w.raw[t][i];
                if layout.plain {
                    rec[1 + layout.tasks + t] = w.plain[t][i];
                }
            }
        }
        // The last variant's deltas are still in `eff`: take them before forming the others.
        let last = variants.len() - 1;
        for v in std::iter::once(last).chain(0..last) {
            let Some(at) = layout.own[v] else { continue };
            if v != last {
                self.set_deltas(w, variants[v], c);
            }
            for (h, &i) in picked.iter().enumerate() {
                let rec = &mut held.vals[first + h * layout.width..first + (h + 1) * layout.width];
                for t in 0..layout.tasks {
                    rec[at + t] = w.eff[t][i];
                }
            }
        }
    }

    /// Rewrites each held element whose M the exact statistics change.
    fn fix_up(
        &self,
        held: Held,
        layout: &Layout,
        (of, guessed, thr, counts): Verdicts,
        exact: &[Stats],
        sink: &dyn Sink,
    ) -> Result<()> {
        let w = layout.width;
        let changes = |rec: &[f32]| -> bool {
            (0..thr.len()).any(|k| {
                let x = &rec[layout.sees[of[k]]..layout.sees[of[k]] + layout.tasks];
                let trim = |t: usize, th: &[f32]| x[t] * f32::from(u8::from(x[t].abs() >= th[t]));
                if (0..layout.tasks)
                    .any(|t| (x[t].abs() >= guessed[k][t]) != (x[t].abs() >= thr[k][t]))
                {
                    return true;
                }
                // Trims agree; the sign is the majority's where the trimmed values cancel.
                counts[k].signum() != 1 && {
                    let s = (0..layout.tasks).fold(0.0f32, |s, t| s + trim(t, &thr[k]));
                    s == 0.0 && (0..layout.tasks).any(|t| trim(t, &thr[k]) != 0.0)
                }
            })
        };
        let mut redo: Vec<usize> = (0..held.at.len())
            .into_par_iter()
            .filter(|&h| changes(&held.vals[h * w..(h + 1) * w]))
            .collect();
        redo.par_sort_unstable_by_key(|&h| held.at[h]);
        let t0 = std::time::Instant::now();
        let parts: Vec<Edits> = redo
            .par_chunks(1024)
            .map(|part| {
                if self.cancel.load(Ordering::Relaxed) {
                    return Err(Error::Cancelled);
                }
                let mut work = self.spare_work();
                let out = Collect::default();
                for &h in part {
                    let (tensor, at) = held.at[h];
                    self.load_held(&mut work, layout, &held.vals[h * w..(h + 1) * w]);
                    let c = Chunk {
                        tensor: tensor as usize,
                        start: at as usize,
                        len: 1,
                    };
                    crate::simd!(self.output_chunk(&mut work, &c, exact, &out))?;
                }
                self.spare.lock().expect("not poisoned").push(work);
                Ok(out.into_edits())
            })
            .collect::<Result<_>>()?;
        let mut edits = Edits::default();
        for p in parts {
            edits.append(p);
        }
        sink.patch(&edits)?;
        if std::env::var_os("WEIGHTWEAVE_DEBUG").is_some() {
            let (n, k) = (held.at.len(), redo.len());
            let secs = t0.elapsed().as_secs_f64();
            eprintln!("one read: held {n}, rewrote {k} in {secs:.2}s; sign counts {counts:?}");
        }
        Ok(())
    }

    /// Puts a held element back where `load` would have left it, as a one-element chunk.
    fn load_held(&self, w: &mut Work, layout: &Layout, rec: &[f32]) {
        let tasks = layout.tasks;
        grow(&mut w.base, 1);
        w.base[0] = rec[0];
        w.raw.resize_with(tasks, Vec::new);
        if layout.plain {
            w.plain.resize_with(tasks, Vec::new);
        }
        for t in 0..tasks {
            grow(&mut w.raw[t], 1);
            w.raw[t][0] = rec[1 + t];
            if layout.plain {
                grow(&mut w.plain[t], 1);
                w.plain[t][0] = rec[1 + tasks + t];
            }
        }
        grow(&mut w.m, 1);
        grow(&mut w.scratch, 1);
        grow(&mut w.out, 1);
    }
}
