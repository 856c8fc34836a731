//! `keep_base`: tensors the base and the models do not share (a classification head of another
//! size, a tensor one side lacks) are never guessed; the user names them with a regular
//! expression, and the output takes the base's, copied as they are. The models' views are
//! changed before planning: a matching tensor of the base stands in for each model's (so every
//! later step sees the base's, and the plan copies it), and a model's own matching tensors are
//! left out.

use crate::error::Result;
use crate::reader::ModelView;

/// What `keep_base` did, for the report and the output's metadata.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Kept {
    /// The base's tensors copied to the output, sorted.
    pub copied: Vec<String>,
    /// Tensors only models held, left out, sorted.
    pub dropped: Vec<String>,
}

/// Applies `pattern` (Python's `re.search` semantics, linear time) to every tensor name of the
/// base and the models.
pub fn apply<'a>(
    pattern: &str,
    base: &ModelView<'a>,
    models: &mut [ModelView<'a>],
) -> Result<Kept> {
    let mut names: Vec<String> = base.tensors.keys().cloned().collect();
    for m in models.iter() {
        names.extend(
            m.tensors
                .keys()
                .filter(|n| !base.tensors.contains_key(*n))
                .cloned(),
        );
    }
    names.sort_unstable();
    names.dedup();
    let hit = crate::names_matching("keep_base", pattern, &names)?;
    let mut kept = Kept::default();
    for (name, _) in names.iter().zip(&hit).filter(|(_, h)| **h) {
        match base.tensors.get(name) {
            Some(b) => {
                for m in models.iter_mut() {
                    m.tensors.insert(name.clone(), *b);
                }
                kept.copied.push(name.clone());
            }
            None => {
                for m in models.iter_mut() {
                    m.tensors.remove(name);
                }
                kept.dropped.push(name.clone());
            }
        }
    }
    Ok(kept)
}

/// Marks the copied tensors in `plan`: taken from the base as they are, never merged.
pub fn mark(plan: &mut [crate::plan::TensorPlan], kept: &Kept) {
    for t in plan.iter_mut() {
        if kept.copied.binary_search(&t.name).is_ok() {
            t.mergeable = false;
            t.out_dtype = t.base_dtype;
        }
    }
}
