//! Names the base and the models do not share. A prefix that differs (`bert.` on a
//! classification fine-tune of a bare encoder, DDP's `module.`, a pipeline's `unet/` for a
//! fine-tuned UNet directory) is aligned, and said: a model's
//! names are renamed into the base's where that makes more of them land on a base tensor of the
//! same shape. What still differs (a classification head of another size, a tensor one side
//! lacks) is never guessed: with `keep_base`, a regular expression naming them, the output takes
//! the base's, copied as they are. Both change the models' views before planning: a matching
//! tensor of the base stands in for each model's (so every later step sees the base's, and the
//! plan copies it), and a model's own matching tensors are left out.

use crate::error::Result;
use crate::reader::ModelView;

/// What alignment and `keep_base` did, for the report and the output's metadata.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Kept {
    /// Per model whose names were aligned: what was done, said in a line.
    pub aligned: Vec<String>,
    /// The base's tensors copied to the output, sorted.
    pub copied: Vec<String>,
    /// Tensors only models held, left out, sorted.
    pub dropped: Vec<String>,
}

/// Aligns the models' names ([`align`]), then applies `keep_base` if given.
pub fn share<'a>(
    keep_base: Option<&str>,
    base: &ModelView<'a>,
    models: &mut [ModelView<'a>],
) -> Result<Kept> {
    let aligned = align(base, models);
    let mut kept = match keep_base {
        Some(p) => apply(p, base, models)?,
        None => Kept::default(),
    };
    kept.aligned = aligned;
    Ok(kept)
}

/// How a model's names may map into the base's: a leading component removed or added.
#[derive(Clone, Debug)]
enum Rename {
    Strip(String),
    Add(String),
}

impl Rename {
    fn apply(&self, name: &str) -> Option<String> {
        match self {
            Rename::Strip(p) => name.strip_prefix(p.as_str()).map(str::to_owned),
            Rename::Add(p) => Some(format!("{p}{name}")),
        }
    }
}

/// Renames each model's tensors into the base's names where a leading component differs: of
/// the renamings that remove one of the model's first components or add one of the base's, the
/// one that lands the most of the model's tensors on a base tensor of the same shape, if it
/// lands more than the names as they are and no other lands as many. Only names that land on a
/// base tensor are renamed (a head the base lacks keeps its name); a renaming that would make
/// two names one is not taken. Returns a line per model aligned.
pub fn align(base: &ModelView<'_>, models: &mut [ModelView<'_>]) -> Vec<String> {
    let lands =
        |name: &str, shape: &[usize]| base.tensors.get(name).is_some_and(|b| b.shape == shape);
    // Leading components end at a '.' or at a module directory's '/' (a pipeline's `unet/`).
    let firsts = |names: &mut dyn Iterator<Item = &String>| {
        let mut f: Vec<String> = names
            .filter_map(|n| n.find(['.', '/']).map(|i| n[..=i].to_owned()))
            .collect();
        f.sort_unstable();
        f.dedup();
        f
    };
    let base_firsts = firsts(&mut base.tensors.keys());
    let mut said = Vec::new();
    for m in models.iter_mut() {
        let score = |r: Option<&Rename>| -> usize {
            m.tensors
                .iter()
                .filter(|(n, t)| match r {
                    None => lands(n, t.shape),
                    Some(r) => r.apply(n).is_some_and(|to| lands(&to, t.shape)),
                })
                .count()
        };
        let here = score(None);
        if here == m.tensors.len() {
            continue;
        }
        let candidates = firsts(&mut m.tensors.keys())
            .into_iter()
            .map(Rename::Strip)
            .chain(base_firsts.iter().cloned().map(Rename::Add));
        let scored: Vec<(usize, Rename)> = candidates.map(|r| (score(Some(&r)), r)).collect();
        let Some(best) = scored.iter().map(|(s, _)| *s).max() else {
            continue;
        };
        let mut top = scored.into_iter().filter(|(s, _)| *s == best);
        let (Some((_, r)), None) = (top.next(), top.next()) else {
            continue; // none, or ambiguous
        };
        if best <= here {
            continue;
        }
        let mut renamed = std::collections::BTreeMap::new();
        let mut moved = 0usize;
        for (n, t) in &m.tensors {
            let to = r.apply(n).filter(|to| lands(to, t.shape));
            moved += usize::from(to.is_some());
            if renamed
                .insert(to.unwrap_or_else(|| n.clone()), *t)
                .is_some()
            {
                moved = 0; // two names would become one: not aligned
                break;
            }
        }
        if moved == 0 {
            continue;
        }
        m.tensors = renamed;
        said.push(match &r {
            Rename::Strip(p) => format!("{}: '{p}' removed from {moved} tensor names", m.label),
            Rename::Add(p) => format!("{}: '{p}' added to {moved} tensor names", m.label),
        });
    }
    said
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

/// The plan of a merge of these views: their names aligned and `keep_base` applied first
/// ([`share`]), then [`crate::plan::validate`]; the copied tensors marked. When validation
/// fails after names were aligned, its error says so.
pub fn plan<'a>(
    job: &crate::recipe::Job,
    base: &ModelView<'a>,
    models: &mut [ModelView<'a>],
    out_dtype: Option<crate::DType>,
) -> Result<(Vec<crate::plan::TensorPlan>, Kept)> {
    let kept = job.share_names(base, models)?;
    let mut plan = crate::plan::validate(base, models, out_dtype).map_err(|e| {
        if kept.aligned.is_empty() {
            return e;
        }
        let note = format!(" (after aligning names: {})", kept.aligned.join("; "));
        use crate::error::Error::*;
        match e {
            ExtraTensor { file, tensor, hint } => ExtraTensor {
                file,
                tensor,
                hint: hint + &note,
            },
            MissingTensor { file, tensor, hint } => MissingTensor {
                file,
                tensor,
                hint: hint + &note,
            },
            ShapeMismatch {
                file,
                tensor,
                expected,
                got,
                hint,
            } => ShapeMismatch {
                file,
                tensor,
                expected,
                got,
                hint: hint + &note,
            },
            other => other,
        }
    })?;
    mark(&mut plan, &kept);
    Ok((plan, kept))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::reader::TensorRef;

    fn view<'a>(label: &str, names: &[&str], shape: &'a [usize]) -> ModelView<'a> {
        let t = TensorRef {
            dtype: DType::F32,
            shape,
            data: &[],
            file: "f",
            delta: None,
            scale: None,
        };
        ModelView {
            label: label.into(),
            tensors: names.iter().map(|n| (n.to_string(), t)).collect(),
            maps: Vec::new(),
        }
    }

    #[test]
    fn only_a_unique_better_renaming_is_taken() {
        let (s2, s3) = (&[2usize][..], &[3usize][..]);
        let base = view("base", &["enc.w", "enc.b", "head.w"], s2);
        // A prefix on every name: removed, and said.
        let mut m = vec![view(
            "ft",
            &["module.enc.w", "module.enc.b", "module.head.w"],
            s2,
        )];
        assert_eq!(
            align(&base, &mut m),
            ["ft: 'module.' removed from 3 tensor names"]
        );
        assert!(m[0].tensors.keys().eq(base.tensors.keys()));
        // Added where missing; a name that would not land keeps its own.
        let mut m = vec![view("ft", &["w", "b", "extra"], s2)];
        assert_eq!(align(&base, &mut m), ["ft: 'enc.' added to 2 tensor names"]);
        assert!(m[0].tensors.contains_key("extra") && m[0].tensors.contains_key("enc.w"));
        // Two renamings land as many: ambiguous, nothing renamed.
        let two = view("base", &["a.w", "b.w"], s2);
        let mut m = vec![view("ft", &["w"], s2)];
        assert!(align(&two, &mut m).is_empty() && m[0].tensors.contains_key("w"));
        // Shapes must agree for a name to land.
        let mut m = vec![view("ft", &["module.enc.w"], s3)];
        assert!(align(&base, &mut m).is_empty());
        // A module directory's '/' ends a component too (a pipeline's unet/).
        let pipe = view("base", &["unet/conv.w", "unet/conv.b", "vae/x.w"], s2);
        let mut m = vec![view("ft", &["conv.w", "conv.b"], s2)];
        assert_eq!(
            align(&pipe, &mut m),
            ["ft: 'unet/' added to 2 tensor names"]
        );
        // Names that already land are left alone.
        let mut m = vec![view("ft", &["enc.w", "enc.b"], s2)];
        assert!(align(&base, &mut m).is_empty());
    }
}
