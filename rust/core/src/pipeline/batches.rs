//! A merge whose statistics are each tensor's own, over inputs bigger than memory, runs in
//! batches of whole tensors that fit in memory: each batch's inputs are read from disk once, in
//! sequence, and its statistics passes and its output pass then find them in the page cache.
//!
//! Why: a per-tensor select (mergekit's TIES, DARE-TIES, Breadcrumbs, DELLA; any method at
//! `scope=tensor`) needs a tensor's exact statistics before its output, so a run over the whole
//! model read every input twice from disk, and each tensor's sample once more in random reads
//! (a 0.1 B bf16 TIES at `scope=tensor` in a 256 MiB cgroup: statistics 0.81 s, output 0.71 s,
//! against a cold `cat` of 0.49 s). A tensor's statistics depend on that tensor alone, so the
//! batches write the same bytes as one run would (as a cluster's units do, `cluster/`); a
//! tensor whose inputs alone are more than a batch holds still takes its passes from disk.
//! Cold 0.5 B bf16 in a 1 GiB cgroup: TIES at scope=tensor 9.03 -> 5.45 s, DARE-TIES 9.23 ->
//! 5.73 s, against a cold `cat` of 1.90 s (`benches/results/cold.md`).

use std::sync::atomic::AtomicBool;

use super::{advice, room, run_chunks, total_bytes, Given, Options, Part, Progress, Sink};
use crate::error::Result;
use crate::plan::{Chunk, TensorPlan};
use crate::reader::ModelView;
use crate::recipe::Recipe;

/// Runs `merge` (a whole model's, or a group's) in batches of whole tensors where that reads
/// less from disk ([`batch_bytes`]); otherwise in one run. The copies go with the first.
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
    let tasks = models.len();
    let input = |t: usize| (plan[t].numel * plan[t].base_dtype.size()) as u64 * (tasks as u64 + 1);
    let limit = batch_bytes(base, models, recipe, &part);
    let batches = match limit {
        Some(limit) => split(merge, limit, input),
        None => vec![merge.to_vec()],
    };
    let (Some(limit), true) = (limit, batches.len() > 1) else {
        return run_chunks(
            base,
            models,
            plan,
            recipe,
            opts,
            (merge, copy),
            sink,
            progress,
            cancel,
            given,
            part,
        );
    };
    let copies = |b: usize| if b == 0 { copy } else { &[][..] };
    let from_disk = advice::from_disk(base, models);
    let eligible = |m: &[Chunk]| super::speculate::eligible(recipe, plan, m, &part, from_disk);
    let total: u64 = (batches.iter().enumerate())
        .map(|(b, m)| {
            let one_read = eligible(m);
            total_bytes(
                plan,
                recipe,
                tasks,
                opts.chunk_size,
                (m, copies(b)),
                one_read,
            )
        })
        .sum();
    let mut done = 0u64;
    for (b, m) in batches.iter().enumerate() {
        let tensors = tensors_of(m);
        // The batch's inputs asked for in sequence up front (not the next batch's while this
        // one runs: reading ahead beside a batch's passes took the run from 5.2-5.4 s to
        // 6.7-6.8 s, TIES at scope=tensor, 0.5 B bf16 in a 1 GiB cgroup).
        if tensors.iter().map(|&t| input(t)).sum::<u64>() <= limit {
            for &t in &tensors {
                advice::will_need_tensor(base, models, plan, t);
            }
        }
        let at = done;
        let report = move |d: u64, _: u64, stage: u32| progress((at + d).min(total), total, stage);
        done += run_chunks(
            base,
            models,
            plan,
            recipe,
            opts,
            (m, copies(b)),
            sink,
            &report,
            cancel,
            given,
            part,
        )?;
        for &t in &tensors {
            advice::cold_tensor(base, models, plan, t);
        }
    }
    Ok(done)
}

/// The input bytes one batch may hold: a quarter of the memory this process may take
/// ([`room::room`]), where the recipe's statistics are every tensor's own and the inputs are on
/// disk and more than that memory (they cannot stay cached from one pass to the next); `None`
/// (one run) otherwise. WEIGHTWEAVE_BATCH_BYTES sets it (tests: their inputs fit and are cached).
fn batch_bytes(
    base: &ModelView,
    models: &[ModelView],
    recipe: &Recipe,
    part: &Part,
) -> Option<u64> {
    if !recipe.tensor_local() || !recipe.method().needs_statistics() {
        return None;
    }
    if !matches!(part.model, super::ModelPart::Compute) {
        return None;
    }
    let forced = std::env::var("WEIGHTWEAVE_BATCH_BYTES").ok();
    if let Some(b) = forced.and_then(|v| v.parse().ok()) {
        return Some(b);
    }
    let mapped: u64 = (base.maps.iter().chain(models.iter().flat_map(|m| &m.maps)))
        .map(|m| m.len() as u64)
        .sum();
    let room = room::room()?;
    (mapped > room && advice::from_disk(base, models)).then_some(room / BATCHES_IN_ROOM)
}

/// A batch is at most this share of the room: the batch, the output it writes and what the
/// kernel has not reclaimed yet of the batch before fit together. Smaller batches ran as fast
/// (0.5 B bf16 in a 1 GiB cgroup: a fifth 5.1-5.2 s, a third 5.2-5.9 s, a half 5.4-5.9 s).
const BATCHES_IN_ROOM: u64 = 4;

/// `merge` cut into batches of whole tensors (in the order each first appears; a tensor's
/// chunks all go to one batch, in their order, even where the list interleaves tensors), each
/// with at most `limit` input bytes unless one tensor alone has more (then it is a batch of its
/// own).
fn split(merge: &[Chunk], limit: u64, input: impl Fn(usize) -> u64) -> Vec<Vec<Chunk>> {
    let mut of_tensor: std::collections::BTreeMap<usize, Vec<Chunk>> = Default::default();
    let mut order = Vec::new();
    for c in merge {
        let chunks = of_tensor.entry(c.tensor).or_insert_with(|| {
            order.push(c.tensor);
            Vec::new()
        });
        chunks.push(*c);
    }
    let mut batches: Vec<Vec<Chunk>> = Vec::new();
    let mut held = 0u64;
    for t in order {
        let bytes = input(t);
        if batches.is_empty() || held + bytes > limit {
            batches.push(Vec::new());
            held = 0;
        }
        held += bytes;
        let chunks = of_tensor.remove(&t).expect("listed above");
        batches.last_mut().expect("pushed above").extend(chunks);
    }
    batches
}

/// The tensors of a batch, in order, each once.
fn tensors_of(m: &[Chunk]) -> Vec<usize> {
    let mut t: Vec<usize> = m.iter().map(|c| c.tensor).collect();
    t.dedup();
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(tensor: usize, start: usize, len: usize) -> Chunk {
        Chunk { tensor, start, len }
    }

    #[test]
    fn batches_hold_whole_tensors_up_to_the_limit() {
        let merge = [
            c(0, 0, 4),
            c(0, 4, 4),
            c(1, 0, 2),
            c(2, 0, 8),
            c(2, 8, 8),
            c(3, 0, 1),
        ];
        let bytes = |t: usize| [8, 2, 16, 1][t];
        let got: Vec<Vec<usize>> = split(&merge, 10, bytes)
            .iter()
            .map(|b| b.iter().map(|c| c.tensor).collect())
            .collect();
        // 8 + 2 fit; 16 is alone past the limit; 1 starts a batch of its own after it.
        assert_eq!(got, vec![vec![0, 0, 1], vec![2, 2], vec![3]]);
        let all: Vec<Chunk> = split(&merge, 10, bytes).concat();
        assert_eq!(all, merge);
        // Interleaved tensors: each tensor's chunks stay together, in their order.
        let mixed = [c(0, 0, 4), c(2, 0, 8), c(0, 4, 4), c(1, 0, 2), c(2, 8, 8)];
        let got = split(&mixed, 10, bytes);
        assert_eq!(
            got,
            vec![
                vec![c(0, 0, 4), c(0, 4, 4)],
                vec![c(2, 0, 8), c(2, 8, 8)],
                vec![c(1, 0, 2)]
            ]
        );
    }
}
