//! The passes behind the data-free λ options (`crate::scaling`): MetaGPT's task norms before
//! anything else (they set the weights every later pass uses), and LiNeS's α = ‖Σ_t τ'_t‖₁ /
//! (T·‖M‖₁) after the statistics (it needs M). LiNeS then gives each tensor its own λ by its
//! block: the tensors fall into a few depth classes, each with its own [`Combine`] and points.

use super::{Chunk, Engine, Stats};
use crate::error::{Error, Result};
use crate::plan::TensorPlan;
use crate::pool::sets::SetPoints;
use crate::recipe::{Combine, Point, Recipe};
use crate::scaling::{self, auto_alpha_sets, Depth, ExactSum};

/// What the tensors of one depth class are pooled with.
#[derive(Clone, Debug)]
pub(crate) struct Class {
    pub(crate) combine: Combine,
    pub(crate) points: Vec<SetPoints>,
}

impl Class {
    pub(crate) fn of(combine: Combine, sets: usize) -> Class {
        let points = match &combine {
            Combine::Merge { lam } => vec![SetPoints {
                index: vec![0],
                lams: vec![*lam],
                lam_sum: *lam,
                increasing: true,
            }],
            Combine::Weave { points, .. } => SetPoints::of(points, sets),
        };
        Class { combine, points }
    }
}

/// The depth classes of a recipe (one without LiNeS) and each tensor's class. `alphas` holds
/// each set's α (used where a point sets none).
pub(crate) fn classes(
    recipe: &Recipe,
    plan: &[TensorPlan],
    alphas: &[f32],
) -> Result<(Vec<Class>, Vec<u32>)> {
    let sets = recipe.sets.len();
    let Some(lines) = &recipe.lines else {
        return Ok((
            vec![Class::of(recipe.combine.clone(), sets)],
            vec![0; plan.len()],
        ));
    };
    let (depth, _) = scaling::depths(plan, lines)?;
    let mut keys: Vec<Depth> = Vec::new();
    let mut class_of = Vec::with_capacity(plan.len());
    for d in &depth {
        let k = match keys
            .iter()
            .position(|k| k.map(f32::to_bits) == d.map(f32::to_bits))
        {
            Some(k) => k,
            None => {
                keys.push(*d);
                keys.len() - 1
            }
        };
        class_of.push(k as u32);
    }
    let classes = keys
        .iter()
        .map(|&d| {
            let combine = match &recipe.combine {
                Combine::Merge { lam } => Combine::Merge {
                    lam: scaling::lines_scale(alphas[0], *lam, d),
                },
                Combine::Weave {
                    points,
                    pool,
                    include_deltas,
                } => Combine::Weave {
                    points: points
                        .iter()
                        .map(|p| Point {
                            lam: scaling::lines_scale(p.alpha.unwrap_or(alphas[p.set]), p.lam, d),
                            ..*p
                        })
                        .collect(),
                    pool: pool.clone(),
                    include_deltas: *include_deltas,
                },
            };
            Class::of(combine, sets)
        })
        .collect();
    Ok((classes, class_of))
}

impl Engine<'_> {
    /// Σ τ_t² over every mergeable element, per task, exactly (MetaGPT's norms).
    pub(crate) fn task_sq_norms(&self, merge: &[Chunk]) -> Result<Vec<f64>> {
        let tasks = self.tasks();
        // Shared: a cluster's units each fold their tensors, the driver merges (exact sums).
        let acc = self.pass_shared(
            merge,
            || vec![ExactSum::new(true); tasks],
            |w, c, acc| {
                for (a, d) in acc.iter_mut().zip(&w.raw) {
                    a.add_slice(&d[..c.len]);
                }
                Ok(())
            },
            |a, b| a.into_iter().zip(&b).map(|(x, y)| x.merge(y)).collect(),
            false,
        )?;
        Ok(acc.iter().map(ExactSum::value).collect())
    }

    /// Each set's LiNeS α: the one given, or ‖Σ_t τ'_t‖₁ / (T·‖M‖₁) over the whole model
    /// (the paper's code, `aggregation.py`), from a pass computing every M that needs it.
    pub(crate) fn lines_alphas(&self, merge: &[Chunk], stats: &[Stats]) -> Result<Vec<f32>> {
        let recipe = self.recipe;
        let sets = recipe.sets.len();
        let Some(lines) = &recipe.lines else {
            return Ok(vec![1.0; sets]);
        };
        if let Some(a) = lines.alpha {
            return Ok(vec![a; sets]);
        }
        let tasks = self.tasks() as f64;
        let need = auto_alpha_sets(recipe);
        // Task arithmetic's M is Σ_t τ'_t itself: α = 1/T, no pass.
        let sum = |j: usize| recipe.sets[j].method.sum_of_deltas() && !self.own_weights[j];
        let pass: Vec<usize> = (0..sets).filter(|&j| need[j] && !sum(j)).collect();
        let mut alphas = vec![(1.0 / tasks) as f32; sets];
        if pass.is_empty() {
            return Ok(alphas);
        }
        let fresh = || vec![(ExactSum::new(false), ExactSum::new(false)); pass.len()];
        let acc = self.pass(
            merge,
            fresh,
            |w, c, acc| {
                let n = c.len;
                for (slot, &j) in pass.iter().enumerate() {
                    self.set_m(w, j, c, &stats[j])?;
                    if self.value_out {
                        self.value_to_delta(w, n);
                    }
                    acc[slot].1.add_slice(&w.m[..n]);
                    // Σ_t τ'_t with the set's weights, into the scratch buffer.
                    let own = self.own_weights[j];
                    let from = if own && self.need_plain {
                        &w.plain
                    } else {
                        &w.raw
                    };
                    let s = &mut w.scratch[..n];
                    s.fill(0.0);
                    for (t, d) in from.iter().enumerate() {
                        let wt = if own { self.weights[j][t] } else { 1.0 };
                        for (x, &y) in s.iter_mut().zip(&d[..n]) {
                            *x += wt * y;
                        }
                    }
                    acc[slot].0.add_slice(s);
                }
                Ok(())
            },
            |a, b| {
                a.into_iter()
                    .zip(&b)
                    .map(|((s, m), (s2, m2))| (s.merge(s2), m.merge(m2)))
                    .collect()
            },
        )?;
        for (&j, (s, m)) in pass.iter().zip(&acc) {
            let (s, m) = (s.value(), m.value());
            if m == 0.0 {
                return Err(Error::param(
                    "lines_alpha",
                    format!(
                        "LiNeS's α = ‖Σ τ‖₁ / (T·‖M‖₁) is undefined: the merged task vector of {} is zero; give lines_alpha",
                        recipe.sets[j].method.name()
                    ),
                ));
            }
            alphas[j] = (s / (tasks * m)) as f32;
        }
        Ok(alphas)
    }
}
