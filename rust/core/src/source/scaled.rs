//! FP8 weights that carry scale tensors, dequantized on the fly: W = q · s, with s one value for
//! the tensor (`X.weight_scale` of shape [] or [1]), one per row (`[rows]` or `[rows, 1]`), or
//! one per block (DeepSeek-style `X.weight_scale_inv` of shape [⌈rows/b⌉, ⌈cols/b⌉], b = 128
//! unless the config's `weight_block_size` says otherwise). The scale tensors leave the view:
//! they describe the weight, they are not tensors to merge.

use std::collections::BTreeMap;

use crate::dtype::{decode, first_non_finite, DType};
use crate::error::{Error, Result};
use crate::reader::{ModelView, TensorRef};
use crate::source::lora::Factor;

/// How a weight's codes are scaled.
#[derive(Clone, Copy, Debug)]
pub struct Scale<'a> {
    pub values: Factor<'a>,
    /// Rows and columns per scale value; (1, cols) per row; (rows, cols) for one value.
    pub block: (usize, usize),
}

fn ceil_div(a: usize, b: usize) -> usize {
    a.div_ceil(b.max(1))
}

/// `view` with every scaled FP8 weight's scale attached and the scale tensors removed.
/// `block`: the block size of block-wise scales (from the config; 128 × 128 by default).
pub fn dequant_view<'a>(mut view: ModelView<'a>, block: (usize, usize)) -> Result<ModelView<'a>> {
    let mut found: BTreeMap<String, (String, TensorRef<'a>)> = BTreeMap::new();
    for (name, t) in &view.tensors {
        for suffix in ["_scale_inv", "_scale"] {
            let Some(stem) = name.strip_suffix(suffix) else {
                continue;
            };
            if view
                .tensors
                .get(stem)
                .is_some_and(|w| matches!(w.dtype, DType::F8E4M3 | DType::F8E5M2))
            {
                found.insert(stem.to_owned(), (name.clone(), *t));
            }
        }
    }
    for (stem, (scale_name, s)) in found {
        let w = view.tensors.get_mut(&stem).expect("found above");
        let (rows, cols) = match w.shape {
            [r, c] => (*r, *c),
            [n] => (1, *n),
            _ => (1, w.shape.iter().product()),
        };
        let unit = match s.shape {
            [] | [1] => (rows.max(1), cols.max(1)),
            [r] | [r, 1] if *r == rows => (1, cols.max(1)),
            [a, b] if (*a, *b) == (ceil_div(rows, block.0), ceil_div(cols, block.1)) => block,
            other => {
                return Err(Error::tensor(
                    s.file,
                    &scale_name,
                    format!("scale of shape {other:?} fits no known layout of the {:?} weight '{stem}' (per tensor, per row, or {}×{} blocks)", w.shape, block.0, block.1),
                ))
            }
        };
        if !s.dtype.is_mergeable() {
            return Err(Error::tensor(
                s.file,
                &scale_name,
                "a scale must be floating point",
            ));
        }
        w.scale = Some(Scale {
            values: s.into(),
            block: unit,
        });
        view.tensors.remove(&scale_name);
    }
    Ok(view)
}

/// Multiplies `out` (elements `start..` of a tensor with rows of `cols`) by its scales.
pub fn apply(
    s: &Scale,
    name: &str,
    cols: usize,
    start: usize,
    out: &mut [f32],
    buf: &mut Vec<f32>,
) -> Result<()> {
    buf.resize(s.values.shape.iter().product(), 0.0);
    decode(s.values.dtype, s.values.data, buf);
    if let Some((i, value)) = first_non_finite(buf) {
        return Err(Error::NonFinite {
            file: s.values.file.to_owned(),
            tensor: format!("{name} (its scale)"),
            index: i,
            value,
        });
    }
    let (bh, bw) = s.block;
    let per_row = ceil_div(cols, bw);
    for (k, o) in out.iter_mut().enumerate() {
        let idx = start + k;
        let (i, j) = (idx / cols.max(1), idx % cols.max(1));
        *o *= buf[(i / bh) * per_row + j / bw];
    }
    Ok(())
}
