//! The check the `lora_file` fuzz target and the corpus replay make: any byte string read as a
//! LoRA file against a fixed base (UNet, text-encoder and colliding names) is accepted or
//! refused, never a panic, and every delta it accepts can be evaluated over its whole tensor.

use std::collections::BTreeMap;

use super::{aligned_view, files, fill, Adapter, Delta};
use crate::dtype::DType;
use crate::reader::{ModelView, TensorRef};

/// The base's tensors: (name, shape).
const BASE: [(&str, &[usize]); 7] = [
    ("down_blocks.0.attentions.0.proj_in.weight", &[4, 4, 1, 1]),
    ("down_blocks.0.resnets.0.conv1.weight", &[4, 2, 3, 3]),
    (
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        &[4, 4],
    ),
    (
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight",
        &[4, 2],
    ),
    ("encoder.layers.0.self_attn.q_proj.weight", &[3, 5]),
    ("a.b.weight", &[2, 3]),
    ("a_b.weight", &[2, 3]),
];

#[doc(hidden)]
pub fn check_accepted(bytes: &[u8]) {
    let Ok(h) = crate::header::parse("fuzz", bytes) else {
        return;
    };
    let names: Vec<&str> = h.iter().map(|(n, _)| n).collect();
    if !files::detect(names.iter().copied()) {
        return;
    }
    let Ok(f) = files::LoraFile::new("fuzz", &names, &h.metadata) else {
        return;
    };
    let tensors = h
        .iter()
        .map(|(n, e)| {
            let data = &bytes[h.data_start + e.start..h.data_start + e.end];
            let t = TensorRef {
                dtype: e.dtype,
                shape: e.shape,
                data,
                file: "fuzz",
                delta: None,
                scale: None,
            };
            (n.to_owned(), t)
        })
        .collect();
    let lora = ModelView {
        label: "fuzz".into(),
        tensors,
        maps: Vec::new(),
    };
    let zeros = vec![0u8; 4 * 5 * 4 * 9];
    let base = ModelView {
        label: "base".into(),
        tensors: BASE
            .iter()
            .map(|&(n, shape)| {
                let len = 4 * shape.iter().product::<usize>();
                let t = TensorRef {
                    dtype: DType::F32,
                    shape,
                    data: &zeros[..len],
                    file: "base",
                    delta: None,
                    scale: None,
                };
                (n.to_owned(), t)
            })
            .collect::<BTreeMap<_, _>>(),
        maps: Vec::new(),
    };
    let Ok(view) = aligned_view(&Adapter::File(f), &lora, &base, None) else {
        return;
    };
    assert_eq!(view.tensors.len(), base.tensors.len());
    let mut scratch = (Vec::new(), Vec::new());
    for (name, t) in &view.tensors {
        let delta = t.delta.as_ref().expect("every tensor is a delta");
        if let Delta::LowRank { scaling, .. } = delta {
            assert!(scaling.is_finite());
        }
        let cols = t.shape.last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; t.numel()];
        // A non-finite factor is an error, never a panic; anything else fills every element.
        let _ = fill(delta, name, cols, 0, &mut out, &mut scratch);
    }
}
