//! What will be written: the cross-model validation that must pass before any output exists,
//! and the split of every tensor into the chunks the pipeline streams.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::methods::Rows;
use crate::reader::ModelView;

/// One output tensor.
#[derive(Clone, Debug)]
pub struct TensorPlan {
    pub name: String,
    pub shape: Vec<usize>,
    pub numel: usize,
    pub base_dtype: DType,
    pub out_dtype: DType,
    /// Floating tensors are merged; the rest are copied from the base.
    pub mergeable: bool,
    /// An FP8 weight written re-quantized, with fresh scales in its scale tensor.
    pub requant: Option<Requant>,
    /// A scale tensor the engine computes (the plan index of the weight it scales): neither
    /// merged nor copied.
    pub derived: Option<usize>,
}

/// How a re-quantized FP8 weight is scaled on output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Requant {
    /// Rows and columns per scale value, as the base's scales.
    pub block: (usize, usize),
    /// Elements per row.
    pub cols: usize,
    /// Number of scale values.
    pub scales: usize,
    /// The plan index of the scale tensor.
    pub scale_tensor: usize,
}

impl TensorPlan {
    /// A mergeable f32 vector of `n` elements: the model as one flat tensor (the group of
    /// global statistics), and the tensor of kernels' unit tests.
    pub(crate) fn vector(name: &str, n: usize) -> TensorPlan {
        TensorPlan {
            name: name.to_owned(),
            shape: vec![n],
            numel: n,
            base_dtype: crate::dtype::DType::F32,
            out_dtype: crate::dtype::DType::F32,
            mergeable: true,
            requant: None,
            derived: None,
        }
    }

    /// Length of a row along the last dimension (a 0-d tensor is one row of one element).
    pub fn row_len(&self) -> usize {
        self.shape.last().copied().unwrap_or(1).max(1)
    }

    /// The length of the rows a method ranks within (see [`Rows`]); 1 for a 0-d tensor.
    pub fn unit(&self, rows: Rows) -> usize {
        match rows {
            Rows::Tensor => self.numel.max(1),
            Rows::Slab if self.shape.len() > 2 && self.shape[0] > 0 => self.numel / self.shape[0],
            _ => self.row_len(),
        }
    }

    /// Whether the rows a method ranks within are longer than a chunk, so that they must be
    /// streamed in pieces.
    pub fn has_long(&self, rows: Rows, chunk_size: usize) -> bool {
        match rows {
            Rows::None | Rows::Slab | Rows::Whole => false,
            Rows::Last => self.mergeable && !self.shape.is_empty() && self.row_len() > chunk_size,
            Rows::Tensor => self.mergeable && self.numel > chunk_size,
        }
    }

    /// Columns of the weight as its scales see it ([rows, cols]; one row otherwise).
    pub fn row_len_2d(&self) -> usize {
        match self.shape[..] {
            [_, c] => c,
            _ => self.numel.max(1),
        }
    }

    pub fn out_bytes(&self) -> usize {
        self.numel * self.out_dtype.size()
    }
}

/// A contiguous element range of one tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub tensor: usize,
    pub start: usize,
    pub len: usize,
}

/// Checks that every model holds exactly the base's tensors, with the same shapes and compatible
/// dtypes, and returns the output tensors in name order.
pub fn validate(
    base: &ModelView,
    models: &[ModelView],
    out_dtype: Option<DType>,
) -> Result<Vec<TensorPlan>> {
    if let Some(d) = out_dtype {
        if !d.is_mergeable() {
            return Err(Error::param(
                "out_dtype",
                format!("{} is not one of F32, F16, BF16, F64", d.name()),
            ));
        }
    }
    if base.tensors.is_empty() {
        return Err(Error::header(
            &base.label,
            "holds no tensors: nothing to merge",
        ));
    }
    for m in std::iter::once(base).chain(models) {
        check_quantization(m)?;
    }
    unshared(base, models)?;
    let mut plan = Vec::with_capacity(base.tensors.len());
    for (name, b) in &base.tensors {
        for m in models {
            let t = &m.tensors[name];
            let compatible = if b.dtype.is_mergeable() {
                t.dtype.is_mergeable()
            } else {
                t.dtype == b.dtype
            };
            if !compatible {
                return Err(Error::DtypeMismatch {
                    file: t.file.to_owned(),
                    tensor: name.clone(),
                    expected: b.dtype.name(),
                    got: t.dtype.name(),
                });
            }
        }
        let mergeable = b.dtype.is_mergeable();
        plan.push(TensorPlan {
            name: name.clone(),
            shape: b.shape.to_vec(),
            numel: b.numel(),
            base_dtype: b.dtype,
            out_dtype: if mergeable {
                out_dtype.unwrap_or(b.dtype)
            } else {
                b.dtype
            },
            mergeable,
            requant: None,
            derived: None,
        });
    }
    Ok(plan)
}

/// Every tensor a model and the base do not share (a model's own, one the model lacks, one of
/// another shape), found all at once: the error names the first as before, then lists the
/// others and the `keep_base` pattern that would copy the base's for all of them.
fn unshared(base: &ModelView, models: &[ModelView]) -> Result<()> {
    let mut found: Vec<(Error, String, String)> = Vec::new(); // (error, name, why)
    let none = String::new;
    for m in models {
        for (name, t) in &m.tensors {
            if !base.tensors.contains_key(name) {
                let file = t.file.to_owned();
                let why = format!("only in {file}");
                let e = Error::ExtraTensor {
                    file,
                    tensor: name.clone(),
                    hint: none(),
                };
                found.push((e, name.clone(), why));
            }
        }
    }
    for (name, b) in &base.tensors {
        for m in models {
            match m.tensors.get(name) {
                None => {
                    let e = Error::MissingTensor {
                        file: m.label.clone(),
                        tensor: name.clone(),
                        hint: none(),
                    };
                    found.push((e, name.clone(), format!("not in {}", m.label)));
                }
                Some(t) if t.shape != b.shape => {
                    let why = format!("{:?} in {}, {:?} in the base", t.shape, t.file, b.shape);
                    let e = Error::ShapeMismatch {
                        file: t.file.to_owned(),
                        tensor: name.clone(),
                        expected: b.shape.to_vec(),
                        got: t.shape.to_vec(),
                        hint: none(),
                    };
                    found.push((e, name.clone(), why));
                }
                Some(_) => {}
            }
        }
    }
    let Some((first, _, _)) = found.first() else {
        return Ok(());
    };
    let all: std::collections::BTreeSet<&str> = std::iter::once(base)
        .chain(models)
        .flat_map(|m| m.tensors.keys().map(String::as_str))
        .collect();
    let mut names: Vec<&str> = found.iter().map(|(_, n, _)| n.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    const SHOWN: usize = 6;
    let mut list: Vec<String> = found
        .iter()
        .take(SHOWN)
        .map(|(_, n, why)| format!("'{n}' ({why})"))
        .collect();
    if found.len() > SHOWN {
        list.push(format!("{} more", found.len() - SHOWN));
    }
    let hint = format!(
        "; {} tensor(s) are not shared by the base and every model: {}. None is guessed: to copy the base's for them (a model's own are then left out), pass keep_base='{}' (CLI --keep-base)",
        names.len(),
        list.join(", "),
        keep_pattern(&names, &all)
    );
    Err(match first {
        Error::ExtraTensor { file, tensor, .. } => Error::ExtraTensor {
            file: file.clone(),
            tensor: tensor.clone(),
            hint,
        },
        Error::MissingTensor { file, tensor, .. } => Error::MissingTensor {
            file: file.clone(),
            tensor: tensor.clone(),
            hint,
        },
        Error::ShapeMismatch {
            file,
            tensor,
            expected,
            got,
            ..
        } => Error::ShapeMismatch {
            file: file.clone(),
            tensor: tensor.clone(),
            expected: expected.clone(),
            got: got.clone(),
            hint,
        },
        _ => unreachable!("only these are found"),
    })
}

/// A regular expression that matches exactly `names` (sorted, distinct) among `all`: for each,
/// the shortest leading run of components (split at `.` and at a module directory's `/`) under
/// which every name of `all` is one of `names` (`text_model\.` when no tensor of the text tower
/// is shared, `vae/` when a pipeline lacks its VAE), else the whole name.
fn keep_pattern(names: &[&str], all: &std::collections::BTreeSet<&str>) -> String {
    let covered = |prefix: &str| {
        all.range(prefix..)
            .take_while(|n| n.starts_with(prefix))
            .all(|n| names.binary_search(n).is_ok())
    };
    let mut parts: Vec<String> = names
        .iter()
        .map(|n| {
            let cut = n
                .match_indices(['.', '/'])
                .map(|(i, _)| &n[..=i])
                .find(|p| covered(p));
            match cut {
                Some(p) => regex::escape(p),
                None => format!("{}$", regex::escape(n)),
            }
        })
        .collect();
    parts.sort_unstable();
    parts.dedup();
    format!("^({})", parts.join("|"))
}

/// Plans every scaled FP8 weight of `base` to be written re-quantized: the weight keeps its FP8
/// dtype and its scale tensor (name, dtype, shape as in the base) comes back as an output whose
/// values the engine computes from the merged weight.
pub fn requantize(plan: &mut Vec<TensorPlan>, base: &ModelView) {
    let mut added = Vec::new();
    for t in plan.iter() {
        let Some(s) = base.tensors.get(&t.name).and_then(|r| r.scale) else {
            continue;
        };
        added.push(TensorPlan {
            name: format!("{}{}", t.name, s.suffix),
            shape: s.values.shape.to_vec(),
            numel: s.values.shape.iter().product(),
            base_dtype: s.values.dtype,
            out_dtype: s.values.dtype,
            mergeable: false,
            requant: None,
            derived: None,
        });
    }
    let weights: Vec<String> = added
        .iter()
        .map(|a| {
            let stem = a
                .name
                .strip_suffix("_scale_inv")
                .or(a.name.strip_suffix("_scale"));
            stem.expect("a scale suffix").to_owned()
        })
        .collect();
    plan.extend(added);
    plan.sort_by(|a, b| a.name.cmp(&b.name));
    let index = |plan: &[TensorPlan], name: &str| {
        plan.iter().position(|t| t.name == name).expect("planned")
    };
    for w in weights {
        let (wi, scale) = (index(plan, &w), base.tensors[&w].scale.expect("scaled"));
        let si = index(plan, &format!("{w}{}", scale.suffix));
        let cols = plan[wi].row_len_2d();
        plan[wi].requant = Some(Requant {
            block: scale.block,
            cols,
            scales: plan[si].numel,
            scale_tensor: si,
        });
        plan[si].derived = Some(wi);
    }
}

/// Refuses checkpoints whose weights are stored in a form the arithmetic cannot read directly:
/// packed integer quantizations (GPTQ, AWQ, bitsandbytes). Merging their raw codes, or copying
/// them from the base, would write a wrong model without a word. (FP8 with scales is read
/// through [`crate::source::scaled`].)
fn check_quantization(m: &ModelView) -> Result<()> {
    const PACKED: [(&str, &str); 8] = [
        (".qweight", "GPTQ/AWQ packed integer weights"),
        (".qzeros", "GPTQ/AWQ packed integer weights"),
        (".g_idx", "GPTQ packed integer weights"),
        (".absmax", "bitsandbytes 4-bit weights"),
        (".quant_map", "bitsandbytes 4-bit weights"),
        (".nested_absmax", "bitsandbytes 4-bit weights"),
        (".SCB", "bitsandbytes 8-bit weights"),
        (".weight_format", "bitsandbytes 8-bit weights"),
    ];
    let refuse = |name: &str, file: &str, format: String| Error::Quantized {
        file: file.to_owned(),
        tensor: name.to_owned(),
        format,
    };
    for (name, t) in &m.tensors {
        if let Some((_, format)) = PACKED.iter().find(|(suffix, _)| name.ends_with(suffix)) {
            return Err(refuse(name, t.file, format.to_string()));
        }
        if name.contains(".quant_state.") {
            return Err(refuse(name, t.file, "bitsandbytes 4-bit weights".into()));
        }
    }
    Ok(())
}

/// The names of tensors copied from the base (integer, bool) whose bytes differ in some
/// fine-tune. They are never merged (BatchNorm counters legitimately differ), but a user must
/// hear of it.
pub fn differing_copies(
    base: &ModelView,
    models: &[ModelView],
    plan: &[TensorPlan],
) -> Vec<String> {
    plan.iter()
        .filter(|t| !t.mergeable && t.derived.is_none())
        .filter(|t| {
            let b = base.tensors[&t.name].data;
            models.iter().any(|m| {
                let r = m.tensors.get(&t.name);
                r.is_some_and(|r| r.delta.is_none() && r.data != b)
            })
        })
        .map(|t| t.name.clone())
        .collect()
}

/// Splits tensors into chunks of about `chunk_size` elements. With `rows` other than
/// [`Rows::None`], chunks of a mergeable tensor hold whole rows (methods that rank within rows
/// need them); a row longer than `chunk_size` is split into pieces that never cross into the
/// next row (see [`TensorPlan::has_long`]). Returns (merge chunks, copy chunks).
pub fn chunks(plan: &[TensorPlan], chunk_size: usize, rows: Rows) -> (Vec<Chunk>, Vec<Chunk>) {
    let (mut merge, mut copy) = (Vec::new(), Vec::new());
    let push = |list: &mut Vec<Chunk>, tensor, from: usize, to: usize, step: usize| {
        let mut start = from;
        while start < to {
            let len = step.min(to - start);
            list.push(Chunk { tensor, start, len });
            start += len;
        }
    };
    for (i, t) in plan.iter().enumerate() {
        if t.derived.is_some() {
            continue;
        } else if !t.mergeable {
            push(&mut copy, i, 0, t.numel, chunk_size);
        } else if rows == Rows::None || (rows == Rows::Whole && t.unit(rows) > chunk_size) {
            push(&mut merge, i, 0, t.numel, chunk_size);
        } else if t.has_long(rows, chunk_size) {
            let row = t.unit(rows);
            for r in (0..t.numel).step_by(row) {
                push(&mut merge, i, r, r + row, chunk_size);
            }
        } else {
            let row = t.unit(rows);
            push(&mut merge, i, 0, t.numel, (chunk_size / row).max(1) * row);
        }
    }
    (merge, copy)
}

/// Lines up externally computed M (by name) with the plan, checking that they belong to an
/// external method, name mergeable tensors and have the right length.
pub fn given_for<'a>(
    plan: &[TensorPlan],
    given: &std::collections::BTreeMap<String, &'a [f32]>,
    recipe: &crate::recipe::Recipe,
) -> Result<Vec<Option<&'a [f32]>>> {
    if given.is_empty() {
        return Ok(Vec::new());
    }
    if !recipe.method().external() {
        return Err(Error::param(
            "given",
            format!("{} computes M itself", recipe.method().name()),
        ));
    }
    let mut out = vec![None; plan.len()];
    for (name, m) in given {
        let Some(i) = plan.iter().position(|t| &t.name == name && t.mergeable) else {
            return Err(Error::param(
                "given",
                format!("'{name}' is not a mergeable tensor of the base"),
            ));
        };
        if m.len() != plan[i].numel {
            return Err(Error::param(
                "given",
                format!(
                    "M for '{name}' has {} elements, the tensor {}",
                    m.len(),
                    plan[i].numel
                ),
            ));
        }
        out[i] = Some(*m);
    }
    Ok(out)
}

/// The chunks of one tensor.
pub fn tensor_chunks(plan: &[TensorPlan], tensor: usize, chunk_size: usize) -> Vec<Chunk> {
    let t = &plan[tensor];
    (0..t.numel)
        .step_by(chunk_size.max(1))
        .map(|start| Chunk {
            tensor,
            start,
            len: chunk_size.max(1).min(t.numel - start),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Rows::Whole`: a tensor whose rows fit a chunk is cut at row boundaries only (the chunk
    /// shrinks to whole rows); one whose rows do not is cut as with `Rows::None`. Every element
    /// is in exactly one chunk, in order.
    #[test]
    fn whole_rows_fit_their_chunks() {
        let shaped = |name: &str, shape: Vec<usize>| TensorPlan {
            shape: shape.clone(),
            numel: shape.iter().product(),
            ..TensorPlan::vector(name, 0)
        };
        let plan = vec![
            shaped("a", vec![7, 3]),
            shaped("b", vec![2, 11]),
            shaped("c", vec![5]),
        ];
        let (whole, _) = chunks(&plan, 8, Rows::Whole);
        let (plain, _) = chunks(&plan, 8, Rows::None);
        let of = |list: &[Chunk], t: usize| -> Vec<(usize, usize)> {
            list.iter()
                .filter(|c| c.tensor == t)
                .map(|c| (c.start, c.len))
                .collect()
        };
        assert_eq!(of(&whole, 0), [(0, 6), (6, 6), (12, 6), (18, 3)]);
        assert_eq!(of(&whole, 1), of(&plain, 1));
        assert_eq!(of(&whole, 1), [(0, 8), (8, 8), (16, 6)]);
        assert_eq!(of(&whole, 2), [(0, 5)]);
        for (t, tensor) in plan.iter().enumerate() {
            let mut at = 0;
            for (start, len) in of(&whole, t) {
                assert_eq!(start, at);
                at += len;
            }
            assert_eq!(at, tensor.numel);
        }
    }
}
