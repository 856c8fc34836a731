//! LoRA adapters as fine-tunes. An adapter stands for θ_pre + ΔW with ΔW = scaling · B·A on every
//! module it targets and τ = 0 on every other tensor. Its format (one file each, behind
//! `Format`) says how factors name their modules and how each is scaled: PEFT adapter
//! directories ([`peft`]), diffusers and kohya-ss LoRA files ([`files`]). ΔW is never
//! built whole: each chunk's rows are computed from the low-rank factors as the pipeline reaches
//! them ([`fill`]).

use std::collections::BTreeMap;

use crate::dtype::{decode, first_non_finite};
use crate::error::{Error, Result};
use crate::reader::{ModelView, TensorRef};

pub mod files;
#[doc(hidden)]
pub mod fuzzcheck;
pub mod peft;

pub use peft::{AdapterConfig, CONFIG_FILE, WEIGHTS};

/// One stored low-rank factor.
#[derive(Clone, Copy, Debug)]
pub struct Factor<'a> {
    pub dtype: crate::dtype::DType,
    pub shape: &'a [usize],
    pub data: &'a [u8],
    pub file: &'a str,
}

impl<'a> From<TensorRef<'a>> for Factor<'a> {
    fn from(t: TensorRef<'a>) -> Self {
        Factor {
            dtype: t.dtype,
            shape: t.shape,
            data: t.data,
            file: t.file,
        }
    }
}

/// How a fine-tune's tensor differs from the base when it is not stored whole.
#[derive(Clone, Copy, Debug)]
pub enum Delta<'a> {
    /// τ = scaling · B·A (`transposed`: τ = scaling · (B·A)ᵀ, for embeddings and Conv1D).
    LowRank {
        a: Factor<'a>,
        b: Factor<'a>,
        scaling: f32,
        transposed: bool,
    },
    /// The adapter does not touch this tensor: τ = 0.
    Zero,
}

/// Architectures whose projections are transformers' `Conv1D` (weight stored [in, out]): PEFT
/// transposes their ΔW whatever `fan_in_fan_out` says, and ignores the flag on `nn.Linear`.
const CONV1D_MODELS: [&str; 4] = ["gpt2", "openai-gpt", "imagegpt", "decision_transformer"];

/// One module's factors as a format found them: ΔW = scaling · B·A lands on the base's `target`.
pub(crate) struct Pair<'a> {
    /// The pipeline component the module belongs to ("" for a single model).
    pub component: String,
    /// The module's name within its component, as the format's scaling rules see it.
    pub module: String,
    pub target: String,
    pub a: TensorRef<'a>,
    pub b: TensorRef<'a>,
    /// An embedding adapter (PEFT stores its factors the other way round).
    pub emb: bool,
    /// A per-module α stored beside the factors (kohya-ss's `.alpha`).
    pub alpha: Option<f64>,
}

/// What a format finds in an adapter file.
pub(crate) struct Parsed<'a> {
    pub pairs: Vec<Pair<'a>>,
    /// Whole tensors that replace the base's (PEFT's `modules_to_save`).
    pub full: BTreeMap<String, TensorRef<'a>>,
}

/// An adapter format: how its tensors name the modules they adapt, and how each module's ΔW is
/// scaled. One file per format: [`peft`] (adapter directories), [`files`] (diffusion LoRA
/// files: diffusers and kohya-ss).
pub(crate) trait Format {
    /// Pairs the adapter's factors and aims each pair at a tensor of `base`.
    fn parse<'a>(&self, adapter: &ModelView<'a>, base: &ModelView<'a>) -> Result<Parsed<'a>>;
    /// The scale of `pair`'s ΔW; `rank` is its factors'.
    fn scaling(&self, pair: &Pair, rank: usize) -> Result<f32>;
    /// PEFT's `fan_in_fan_out` (no other format has one).
    fn fan_in_fan_out(&self) -> bool {
        false
    }
}

/// A LoRA adapter given as a fine-tune, in one of the formats.
#[derive(Clone, Debug)]
pub enum Adapter {
    /// A PEFT adapter directory.
    Peft(AdapterConfig),
    /// A diffusion LoRA file (diffusers or kohya-ss).
    File(files::LoraFile),
}

impl Adapter {
    fn format(&self) -> &dyn Format {
        match self {
            Adapter::Peft(c) => c,
            Adapter::File(f) => f,
        }
    }
}

/// The two halves of each module's factors as a format meets them, in any order.
#[derive(Default)]
pub(crate) struct Halves<'a> {
    /// (component, module) -> (target, A, B, embedding)
    #[allow(clippy::type_complexity)]
    found: BTreeMap<(String, String), (String, Option<TensorRef<'a>>, Option<TensorRef<'a>>, bool)>,
}

impl<'a> Halves<'a> {
    /// Records factor `which` (0: A / down, 1: B / up) of `module`, aimed at `target`.
    pub fn put(
        &mut self,
        component: &str,
        module: &str,
        target: String,
        which: u8,
        emb: bool,
        t: &TensorRef<'a>,
    ) {
        let e = self
            .found
            .entry((component.to_owned(), module.to_owned()))
            .or_insert((target, None, None, emb));
        if which == 0 {
            e.1 = Some(*t);
        } else {
            e.2 = Some(*t);
        }
    }

    /// Every module with both its factors; one with a single factor is an error.
    pub fn pairs(self, label: &str) -> Result<Vec<Pair<'a>>> {
        self.found
            .into_iter()
            .map(|((component, module), (target, a, b, emb))| {
                let (Some(a), Some(b)) = (a, b) else {
                    let name = if component.is_empty() {
                        module
                    } else {
                        format!("{component}.{module}")
                    };
                    return Err(Error::header(
                        label,
                        format!("module '{name}' has only one of its two LoRA factors"),
                    ));
                };
                Ok(Pair {
                    component,
                    module,
                    target,
                    a,
                    b,
                    emb,
                    alpha: None,
                })
            })
            .collect()
    }
}

/// The adapter as a fine-tune of `base`: every base tensor, as a low-rank delta, a full tensor
/// (PEFT's `modules_to_save`) or τ = 0. `model_type`: the base's architecture (its
/// config.json), which decides how the ΔW of a square weight is laid out.
pub fn aligned_view<'a>(
    adapter: &Adapter,
    view: &ModelView<'a>,
    base: &ModelView<'a>,
    model_type: Option<&str>,
) -> Result<ModelView<'a>> {
    let label = view.label.clone();
    let format = adapter.format();
    let Parsed { pairs, full } = format.parse(view, base)?;
    let mut tensors: BTreeMap<String, TensorRef<'a>> = BTreeMap::new();
    for pair in &pairs {
        let (a, b, target) = (&pair.a, &pair.b, &pair.target);
        let w = base.tensors.get(target).ok_or_else(|| {
            Error::tensor(
                a.file,
                target,
                "is targeted by the adapter but is not in the base",
            )
        })?;
        if tensors.contains_key(target) || full.contains_key(target) {
            return Err(Error::tensor(
                a.file,
                target,
                "is adapted twice by the file (two names for one module)",
            ));
        }
        let emb = pair.emb;
        // A convolution's (PEFT's Conv1d/2d/3d LoRA, LoCon): A [r, in, k…], B [out, r, 1…];
        // ΔW[o, i, k…] = Σ_r B[o, r]·A[r, i, k…], the 2-D product over A's flattened columns.
        let conv = !emb
            && w.shape.len() >= 3
            && a.shape.len() == w.shape.len()
            && b.shape.len() == w.shape.len()
            && b.shape[2..].iter().all(|&d| d == 1)
            && a.shape[2..] == w.shape[2..]
            && a.shape[0] == b.shape[1]
            && (b.shape[0], a.shape[1]) == (w.shape[0], w.shape[1]);
        // A: [r, in], B: [out, r]; ΔW = B·A is [out, in], transposed for embeddings (whose
        // factors PEFT stores the other way round) and for Conv1D weights ([in, out]).
        let ok = a.shape.len() == 2
            && b.shape.len() == 2
            && w.shape.len() == 2
            && a.shape[0] == b.shape[1];
        let plain = ok && (b.shape[0], a.shape[1]) == (w.shape[0], w.shape[1]);
        let flipped = ok && (a.shape[1], b.shape[0]) == (w.shape[0], w.shape[1]);
        let transposed = if conv {
            false
        } else if emb {
            flipped
        } else if plain && flipped {
            // A square weight: its layer type decides, as in PEFT, never the flag alone.
            match model_type {
                Some(m) => CONV1D_MODELS.contains(&m),
                None if format.fan_in_fan_out() => {
                    return Err(Error::tensor(
                        a.file,
                        target,
                        "is square and the adapter sets fan_in_fan_out: whether it is a Conv1D (transposed) or an nn.Linear (where PEFT ignores the flag) cannot be told without the base's config.json; give the base as a model directory",
                    ))
                }
                None => false,
            }
        } else {
            flipped
        };
        if !conv && !flipped && (emb || !plain) {
            return Err(Error::tensor(
                a.file,
                target,
                format!(
                    "LoRA factors A {:?} and B {:?} do not make the base's {:?}",
                    a.shape, b.shape, w.shape
                ),
            ));
        }
        if !(a.dtype.is_mergeable() && b.dtype.is_mergeable()) {
            return Err(Error::tensor(
                a.file,
                target,
                "LoRA factors must be floating point",
            ));
        }
        if a.shape[0] == 0 {
            return Err(Error::tensor(
                a.file,
                target,
                "has LoRA factors of rank 0: a LoRA rank must be positive (PEFT and diffusers refuse it)",
            ));
        }
        let scaling = format.scaling(pair, a.shape[0])?;
        tensors.insert(
            target.clone(),
            TensorRef {
                delta: Some(Delta::LowRank {
                    a: (*a).into(),
                    b: (*b).into(),
                    scaling,
                    transposed,
                }),
                scale: None,
                data: &[],
                ..*w
            },
        );
    }
    for (name, w) in &base.tensors {
        if let Some(t) = full.get(name) {
            tensors.insert(name.clone(), *t);
        } else if !tensors.contains_key(name) {
            tensors.insert(
                name.clone(),
                TensorRef {
                    delta: Some(Delta::Zero),
                    scale: None,
                    data: &[],
                    file: view.tensors.values().next().map_or("", |t| t.file),
                    ..*w
                },
            );
        }
    }
    Ok(ModelView {
        label,
        tensors,
        maps: view.maps.clone(),
    })
}

/// Checks that `saved` (an adapter's copy of a base tensor) holds exactly the base's values,
/// compared as f32 in pieces.
fn same_values(saved: &TensorRef, w: &TensorRef, key: &str, target: &str) -> Result<()> {
    let differs = |why: &str| {
        Error::tensor(
            saved.file,
            key,
            format!("{why} the base's '{target}': the adapter was trained on another base (a resized vocabulary?); merge it into that base instead"),
        )
    };
    if saved.shape != w.shape || !saved.dtype.is_mergeable() || w.data.is_empty() {
        return Err(differs("is not"));
    }
    const PIECE: usize = 1 << 16;
    let (sa, sb) = (saved.dtype.size(), w.dtype.size());
    let (mut x, mut y) = (vec![0f32; PIECE], vec![0f32; PIECE]);
    let n = saved.numel();
    let mut at = 0;
    while at < n {
        let k = PIECE.min(n - at);
        decode(
            saved.dtype,
            &saved.data[at * sa..(at + k) * sa],
            &mut x[..k],
        );
        decode(w.dtype, &w.data[at * sb..(at + k) * sb], &mut y[..k]);
        if x[..k]
            .iter()
            .zip(&y[..k])
            .any(|(p, q)| p.to_bits() != q.to_bits())
        {
            return Err(differs("differs from"));
        }
        at += k;
    }
    Ok(())
}

fn decoded(t: &Factor, name: &str, out: &mut Vec<f32>) -> Result<()> {
    out.resize(t.shape.iter().product(), 0.0);
    decode(t.dtype, t.data, out);
    if let Some((i, value)) = first_non_finite(out) {
        return Err(Error::NonFinite {
            file: t.file.to_owned(),
            tensor: name.to_owned(),
            index: i,
            value,
        });
    }
    Ok(())
}

/// τ for elements `start..start + out.len()` of a tensor whose rows are `cols` long (a
/// non-transposed ΔW's rows are A's flattened columns, whatever the tensor's last dimension).
/// `scratch` holds the decoded factors between calls.
pub fn fill(
    delta: &Delta,
    name: &str,
    cols: usize,
    start: usize,
    out: &mut [f32],
    scratch: &mut (Vec<f32>, Vec<f32>),
) -> Result<()> {
    let Delta::LowRank {
        a,
        b,
        scaling,
        transposed,
    } = delta
    else {
        out.fill(0.0);
        return Ok(());
    };
    let (fa, fb) = scratch;
    decoded(a, name, fa)?;
    decoded(b, name, fb)?;
    let r = a.shape[0];
    // A's columns: `in`, or `in × kernel` for a convolution (whose rows are that long too).
    let a_cols: usize = a.shape[1..].iter().product();
    let cols = if *transposed { cols } else { a_cols };
    for (k, o) in out.iter_mut().enumerate() {
        let idx = start + k;
        let (i, j) = (idx / cols, idx % cols);
        // Σ over the rank, in a fixed order: the same bits whatever the chunking.
        let mut acc = 0.0f32;
        for q in 0..r {
            acc += if *transposed {
                fb[j * r + q] * fa[q * a_cols + i]
            } else {
                fb[i * r + q] * fa[q * a_cols + j]
            };
        }
        *o = scaling * acc;
    }
    Ok(())
}
