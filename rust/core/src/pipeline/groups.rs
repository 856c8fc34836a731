//! A merge whose parameters vary by tensor (`Recipe::groups`): each group of tensors runs its own
//! passes over its own chunks, one group after another, into the same sink. Every tensor is read
//! as often as in a run without groups, so the cost is the same bytes plus a few per-group
//! start-ups; progress counts over the whole run.

use std::sync::atomic::AtomicBool;

use super::{total_bytes, Given, Options, Part, Progress, Sink};
use crate::error::Result;
use crate::plan::{Chunk, TensorPlan};
use crate::reader::ModelView;
use crate::recipe::Recipe;

/// Runs every group of `recipe` over its share of `merge` (the copies go with the first).
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    base: &ModelView,
    models: &[ModelView],
    plan: &[TensorPlan],
    recipe: &Recipe,
    opts: Options,
    (merge, copy): (&[Chunk], &[Chunk]),
    sink: &dyn Sink,
    progress: Progress,
    cancel: &AtomicBool,
    given: Given,
    part: Part,
) -> Result<u64> {
    let mut group_of = vec![usize::MAX; plan.len()];
    for (g, grp) in recipe.groups.iter().enumerate() {
        for &t in &grp.tensors {
            group_of[t] = g;
        }
    }
    let mut shares: Vec<Vec<Chunk>> = vec![Vec::new(); recipe.groups.len()];
    for c in merge {
        let g = group_of[c.tensor];
        debug_assert!(g != usize::MAX, "every mergeable tensor is in a group");
        shares[g].push(*c);
    }
    let tasks = models.len();
    let copies = |g: usize| if g == 0 { copy } else { &[][..] };
    let from_disk = super::advice::from_disk(base, models);
    let total: u64 = recipe
        .groups
        .iter()
        .zip(&shares)
        .enumerate()
        .map(|(g, (grp, m))| {
            let part = Part { group: g, ..part };
            total_bytes(
                plan,
                &grp.recipe,
                tasks,
                opts.chunk_size,
                (m, copies(g)),
                super::speculate::eligible(&grp.recipe, plan, m, &part, from_disk),
            )
        })
        .sum();
    let mut done = 0u64;
    for (g, (grp, m)) in recipe.groups.iter().zip(&shares).enumerate() {
        if m.is_empty() && copies(g).is_empty() {
            continue;
        }
        let at = done;
        let report = move |d: u64, _: u64, stage: u32| progress((at + d).min(total), total, stage);
        done += super::batches::run(
            base,
            models,
            plan,
            &grp.recipe,
            opts,
            (m, copies(g)),
            sink,
            &report,
            cancel,
            given,
            Part { group: g, ..part },
        )?;
    }
    Ok(done)
}
