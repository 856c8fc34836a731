//! Data-free ways to set λ besides Weight Weaving (SPEC "Newest data-free methods and λ"):
//! MetaGPT's per-task weights from the task vectors' norms, and LiNeS's layer-increasing
//! scaling of the merged task vector. Both need whole-model sums, gathered in passes by
//! `pipeline/scaling.rs`; the sums are exact ([`ExactSum`]), so the weights and scales do not
//! depend on the thread count or the chunk size.

use crate::error::{Error, Result};
use crate::plan::TensorPlan;
use crate::recipe::{Combine, Recipe};

/// LiNeS as the caller asked for it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Lines {
    /// α, the scale of the first block and of every tensor outside the blocks; `None` for the
    /// paper's rule, ‖Σ_t τ'_t‖₁ / (T·‖M‖₁) per parameter set.
    pub alpha: Option<f32>,
    /// L, the number of blocks; `None`: one more than the largest block index in the names.
    pub blocks: Option<usize>,
}

/// A tensor's position for LiNeS: the fraction (ℓ − 1)/(L − 1) of its block, or `None` outside
/// the blocks (embeddings, the head, final norms).
pub type Depth = Option<f32>;

/// The block index of a tensor name: its first dot-separated component that is a decimal
/// integer (`model.layers.7.mlp.up_proj.weight` → 7, `visual.transformer.resblocks.3.attn…`
/// → 3). The paper's code takes the first of `.0.`, `.1.`, … that the name contains, which is
/// the same index for names with one integer component; for names with several
/// (`layers.2.experts.0.w`) the first component is the block, where the paper's code would
/// find block 0.
pub fn block_index(name: &str) -> Option<usize> {
    name.split('.')
        .find(|c| !c.is_empty() && c.len() <= 9 && c.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|c| c.parse().ok())
}

/// Each planned tensor's depth, and L.
pub fn depths(plan: &[TensorPlan], lines: &Lines) -> Result<(Vec<Depth>, usize)> {
    let found = plan
        .iter()
        .filter(|t| t.mergeable)
        .filter_map(|t| block_index(&t.name))
        .max();
    let blocks = match (lines.blocks, found) {
        (Some(l), _) => l,
        (None, Some(i)) => i + 1,
        (None, None) => {
            return Err(Error::param(
                "lines",
                "no tensor name holds a block index (a component such as 'layers.3.'), so LiNeS has no depth to scale by",
            ))
        }
    };
    if blocks < 2 {
        return Err(Error::param(
            "lines_blocks",
            format!(
                "LiNeS scales by (ℓ − 1)/(L − 1), undefined for L = {blocks}; it needs at least 2 blocks"
            ),
        ));
    }
    if let (Some(i), Some(_)) = (found, lines.blocks) {
        if i >= blocks {
            let t = plan
                .iter()
                .find(|t| t.mergeable && block_index(&t.name) == Some(i))
                .expect("the tensor found");
            return Err(Error::param(
                "lines_blocks",
                format!(
                    "{blocks} blocks, but tensor '{}' is in block {i} (indices start at 0)",
                    t.name
                ),
            ));
        }
    }
    let depth = plan
        .iter()
        .map(|t| block_index(&t.name).map(|i| i as f32 / (blocks - 1) as f32))
        .collect();
    Ok((depth, blocks))
}

/// The LiNeS scale of a point: α + λ·depth in the blocks, α outside them.
#[inline]
pub fn lines_scale(alpha: f32, lam: f32, depth: Depth) -> f32 {
    match depth {
        Some(d) => alpha + lam * d,
        None => alpha,
    }
}

/// The sets whose α is LiNeS's rule (no α given for them).
pub(crate) fn auto_alpha_sets(recipe: &Recipe) -> Vec<bool> {
    let mut need = vec![false; recipe.sets.len()];
    match (&recipe.lines, &recipe.combine) {
        (Some(l), _) if l.alpha.is_some() => {}
        (None, _) => {}
        (Some(_), Combine::Merge { .. }) => need[0] = true,
        (Some(_), Combine::Weave { points, .. }) => {
            for p in points.iter().filter(|p| p.alpha.is_none()) {
                need[p.set] = true;
            }
        }
    }
    need
}

/// An exact sum of |x| or of x² over f32 values: per binary exponent of x, the integer sum of
/// the significands (or of their squares), so that adding is associative and the result is the
/// same whatever the order, the chunking or the threads. Turned into an f64 once, bins in a
/// fixed order.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ExactSum {
    bins: Vec<u128>,
    square: bool,
}

impl ExactSum {
    /// A sum of |x| (`square` false) or of x².
    pub fn new(square: bool) -> ExactSum {
        ExactSum {
            bins: vec![0; 256],
            square,
        }
    }

    #[inline(always)]
    pub fn add_slice(&mut self, x: &[f32]) {
        // Per-call u64 partials: a significand is < 2^24 and its square < 2^48, so 2^15 squares
        // (or 2^39 magnitudes) fit before a partial has to go into its u128 bin.
        const BLOCK: usize = 1 << 15;
        for part in x.chunks(BLOCK) {
            let mut local = [0u64; 256];
            for &v in part {
                let bits = v.to_bits() & 0x7fff_ffff;
                let e = (bits >> 23) as usize;
                let m = (bits & 0x7f_ffff) as u64 | if e > 0 { 1 << 23 } else { 0 };
                local[e] += if self.square { m * m } else { m };
            }
            for (b, l) in self.bins.iter_mut().zip(local) {
                *b += l as u128;
            }
        }
    }

    pub fn merge(mut self, other: &ExactSum) -> ExactSum {
        for (a, b) in self.bins.iter_mut().zip(&other.bins) {
            *a += b;
        }
        self
    }

    /// The sum, rounded once per bin (bins in increasing order).
    pub fn value(&self) -> f64 {
        self.bins
            .iter()
            .enumerate()
            .filter(|(_, &b)| b != 0)
            .map(|(e, &b)| {
                // x = m·2^(max(e, 1) − 150) (subnormals have e = 0 and the scale of e = 1).
                let p = e.max(1) as i32 - 150;
                (b as f64) * 2f64.powi(if self.square { 2 * p } else { p })
            })
            .sum()
    }
}

/// MetaGPT's weights λ_t = ‖τ_t‖² / Σ_k ‖τ_k‖² from the tasks' exact squared norms.
pub fn metagpt_weights(norms: &[f64]) -> Result<Vec<f32>> {
    let total: f64 = norms.iter().sum();
    if total <= 0.0 || !total.is_finite() {
        return Err(Error::param(
            "lam",
            "metagpt: every task vector is zero (or the norms overflow), so λ_t = ‖τ_t‖² / Σ‖τ_k‖² is undefined",
        ));
    }
    Ok(norms.iter().map(|n| (n / total) as f32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_index_is_the_first_integer_component() {
        assert_eq!(block_index("model.layers.7.mlp.up_proj.weight"), Some(7));
        assert_eq!(
            block_index("visual.transformer.resblocks.11.attn.in_proj_weight"),
            Some(11)
        );
        assert_eq!(block_index("layers.2.experts.0.w1"), Some(2));
        assert_eq!(block_index("model.embed_tokens.weight"), None);
        assert_eq!(block_index("conv1.weight"), None);
        assert_eq!(block_index("h.0.attn.c_attn.weight"), Some(0));
    }

    #[test]
    fn exact_sums_do_not_depend_on_order() {
        let mut seed = 3u64;
        let x: Vec<f32> = (0..100_000)
            .map(|i| {
                seed = crate::rng::mix(seed);
                let v = (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                v * 2f32.powi((i % 60) - 30)
            })
            .chain([f32::MIN_POSITIVE / 8.0, -3.0e30, 0.0, -0.0])
            .collect();
        for square in [false, true] {
            let mut whole = ExactSum::new(square);
            whole.add_slice(&x);
            let mut rev = x.clone();
            rev.reverse();
            let parts = rev
                .chunks(777)
                .map(|c| {
                    let mut s = ExactSum::new(square);
                    s.add_slice(c);
                    s
                })
                .fold(ExactSum::new(square), |a, b| a.merge(&b));
            assert_eq!(whole.value().to_bits(), parts.value().to_bits());
            let f: f64 = x
                .iter()
                .map(|&v| {
                    if square {
                        (v as f64) * (v as f64)
                    } else {
                        (v as f64).abs()
                    }
                })
                .sum();
            assert!(
                (whole.value() - f).abs() <= 1e-12 * f,
                "{} vs {f}",
                whole.value()
            );
        }
        let mut s = ExactSum::new(true);
        s.add_slice(&[3.0, -4.0]);
        assert_eq!(s.value(), 25.0);
        let mut s = ExactSum::new(false);
        s.add_slice(&[1.5, -2.25, f32::from_bits(1)]);
        assert_eq!(s.value(), 3.75 + 2f64.powi(-149));
    }

    #[test]
    fn metagpt_weights_are_norm_shares() {
        assert_eq!(metagpt_weights(&[1.0, 3.0]).unwrap(), vec![0.25, 0.75]);
        assert!(metagpt_weights(&[0.0, 0.0]).is_err());
    }
}
