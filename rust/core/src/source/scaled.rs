//! FP8 weights that carry scale tensors, dequantized on the fly: W = q · s, with s one value for
//! the tensor (`X.weight_scale` of shape `[]` or `[1]`), one per row (`[rows]` or `[rows, 1]`), or
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
    /// The scale tensor's name is the weight's plus this.
    pub suffix: &'static str,
}

fn ceil_div(a: usize, b: usize) -> usize {
    a.div_ceil(b.max(1))
}

/// `view` with every scaled FP8 weight's scale attached and the scale tensors removed.
/// `block`: the block size of block-wise scales (from the config; 128 × 128 by default).
pub fn dequant_view<'a>(mut view: ModelView<'a>, block: (usize, usize)) -> Result<ModelView<'a>> {
    let mut found: BTreeMap<String, (String, TensorRef<'a>, &'static str)> = BTreeMap::new();
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
                found.insert(stem.to_owned(), (name.clone(), *t, suffix));
            }
        }
    }
    for (stem, (scale_name, s, suffix)) in found {
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
            suffix,
        });
        view.tensors.remove(&scale_name);
    }
    Ok(view)
}

/// The index of the scale of element `idx` of a tensor with rows of `cols`, for `block`.
#[inline]
pub fn scale_index(block: (usize, usize), cols: usize, idx: usize) -> usize {
    let cols = cols.max(1);
    let (i, j) = (idx / cols, idx % cols);
    (i / block.0) * ceil_div(cols, block.1) + j / block.1
}

/// Fresh scales for FP8 codes of `dtype` from each block's largest |value|: s = amax / max,
/// rounded to the scale tensor's dtype and nudged up when that rounding would push a block's
/// largest value past the FP8 range (an all-zero block gets 1). Err(amax) when a scale does not
/// fit the scale's own dtype (an f16 scale above 65504 would be written as infinity, and the
/// model would dequantize to NaN).
pub fn fresh_scales(
    amax: &[f32],
    dtype: DType,
    scale_dtype: DType,
) -> std::result::Result<Vec<f32>, f32> {
    let max = dtype.max_finite();
    amax.iter()
        .map(|&a| {
            if a == 0.0 {
                return Ok(1.0);
            }
            let mut s = round_to(scale_dtype, a / max);
            while s.is_finite() && a / s > max {
                s = round_to(scale_dtype, next_up(s));
            }
            if s.is_finite() {
                Ok(s)
            } else {
                Err(a)
            }
        })
        .collect()
}

/// Refuses views where one model stores a weight scaled (codes plus a scale tensor) and another
/// the same weight unscaled: the same codes would mean different values.
pub fn check_same_scaling(base: &ModelView, models: &[ModelView]) -> Result<()> {
    for (name, b) in &base.tensors {
        for m in models {
            let Some(t) = m.tensors.get(name) else {
                continue;
            };
            if t.delta.is_some() || b.scale.is_some() == t.scale.is_some() {
                continue;
            }
            let (with, without) = if b.scale.is_some() { (b, t) } else { (t, b) };
            let suffix = with.scale.map_or("_scale", |s| s.suffix);
            return Err(Error::tensor(
                without.file,
                name,
                format!(
                    "is FP8 without a scale, but {} scales it with '{name}{suffix}': scaled and unscaled codes mean different values; merge checkpoints quantized the same way",
                    with.file
                ),
            ));
        }
    }
    Ok(())
}

/// The smallest value of `dtype` ≥ v (v > 0): round to nearest, and when that went down, the
/// next code up (for positive IEEE values, consecutive codes are consecutive values).
fn round_to(dtype: DType, v: f32) -> f32 {
    let mut bytes = vec![0u8; dtype.size()];
    crate::dtype::encode(dtype, &[v], &mut bytes);
    let mut out = [0f32];
    decode(dtype, &bytes, &mut out);
    if out[0] < v {
        for b in bytes.iter_mut() {
            let (x, carry) = b.overflowing_add(1);
            *b = x;
            if !carry {
                break;
            }
        }
        decode(dtype, &bytes, &mut out);
    }
    out[0]
}

fn next_up(v: f32) -> f32 {
    f32::from_bits(v.to_bits() + 1)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_scales_keep_every_block_in_range() {
        let amax = [448.0, 1.0, 0.0, 3.3e-3, 1234.567, 7.0e-30];
        for scale_dtype in [DType::F32, DType::BF16, DType::F16] {
            let s = fresh_scales(&amax, DType::F8E4M3, scale_dtype).unwrap();
            for (&a, &v) in amax.iter().zip(&s) {
                assert!(v > 0.0 && a / v <= 448.0, "{scale_dtype:?} {a} {v}");
                // Representable in the scale dtype (encode/decode is the identity on it).
                assert_eq!(round_to(scale_dtype, v), v);
                // Not needlessly large: one code below would overflow the range.
                if a > 0.0 && scale_dtype == DType::F32 {
                    assert!(a / f32::from_bits(v.to_bits() - 1) > 448.0 || a / v == 448.0);
                }
            }
        }
        assert_eq!(
            fresh_scales(&[0.0], DType::F8E5M2, DType::F32),
            Ok(vec![1.0])
        );
        // 448 × 65504 needs a scale above f16's largest value: refused, never infinity.
        assert_eq!(
            fresh_scales(&[448.0 * 65504.0 * 2.0], DType::F8E4M3, DType::F16),
            Err(448.0 * 65504.0 * 2.0)
        );
        assert!(fresh_scales(&[448.0 * 65000.0], DType::F8E4M3, DType::F16).is_ok());
    }

    #[test]
    fn scale_index_follows_the_layout() {
        // 5 × 7 weight, 2 × 3 blocks: ⌈7/3⌉ = 3 blocks per row of blocks.
        assert_eq!(scale_index((2, 3), 7, 0), 0);
        assert_eq!(scale_index((2, 3), 7, 6), 2);
        assert_eq!(scale_index((2, 3), 7, 2 * 7 + 4), 4);
        // Per row and per tensor.
        assert_eq!(scale_index((1, 7), 7, 3 * 7 + 6), 3);
        assert_eq!(scale_index((5, 7), 7, 34), 0);
    }
}
