//! mergekit's `slices`: the output's layers taken from layer ranges of the inputs, so layers can
//! be stacked, repeated or moved (passthrough "frankenmerges"). Applied to the input views before
//! anything else: each output slice names, per lane (the base and every merged model), an input
//! and its first layer, and the views of the lanes are assembled from those inputs' tensors under
//! the output's names. The plan, the methods and the writer then see ordinary models.
//!
//! A tensor's layer is its first integer name component (`model.layers.7.mlp…`). As in mergekit's
//! planner, the weights outside the layers come from the first slice's inputs when they precede
//! the layers (embeddings: a name holding `embed`, `wte` or `wpe`) and from the last slice's
//! otherwise (final norm, head).

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::reader::{ModelView, TensorRef};

/// Where one lane of a slice reads: input `input` (0 the base checkpoint, i the i-th model), from
/// its layer `start` on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Source {
    pub input: usize,
    pub start: usize,
}

/// One output slice: `len` layers; `lanes[0]` is the base's, the rest the merged models'.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slice {
    pub len: usize,
    pub lanes: Vec<Source>,
}

/// The output's layers, slice after slice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slices(pub Vec<Slice>);

/// Output layers a run may have (each a layer of some input: far beyond any model).
pub const MAX_LAYERS: usize = 1 << 16;

/// Where a planned tensor sits in the slices: its slice and mergekit's t (layer within the slice
/// / (slice length − 1), 1 in a one-layer slice; 0 outside the layers).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Position {
    pub slice: usize,
    pub t: f64,
}

/// The first integer component of a name: its index and value.
fn layer_of(name: &str) -> Option<(usize, usize)> {
    name.split('.').enumerate().find_map(|(i, c)| {
        (!c.is_empty() && c.len() <= 9 && c.bytes().all(|b| b.is_ascii_digit()))
            .then(|| c.parse().ok().map(|v| (i, v)))
            .flatten()
    })
}

/// `name` with its layer component (at `at`) set to `layer`.
fn with_layer(name: &str, at: usize, layer: usize) -> String {
    name.split('.')
        .enumerate()
        .map(|(i, c)| {
            if i == at {
                layer.to_string()
            } else {
                c.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Whether a tensor outside the layers comes before them (mergekit's pre-weights).
fn before_layers(name: &str) -> bool {
    ["embed", "wte", "wpe"].iter().any(|k| name.contains(k))
}

impl Slices {
    /// Output layers in all.
    pub fn layers(&self) -> usize {
        self.0.iter().map(|s| s.len).sum()
    }

    /// Lanes per slice (the base and the merged models).
    pub fn lanes(&self) -> usize {
        self.0.first().map_or(0, |s| s.lanes.len())
    }

    /// Checks the shape of the slices against `inputs` checkpoints.
    pub fn check(&self, inputs: usize) -> Result<()> {
        let bad = |m: String| Err(Error::param("slices", m));
        if self.0.is_empty() {
            return bad("no slice".into());
        }
        let lanes = self.lanes();
        if lanes < 2 {
            return bad("a slice needs the base's lane and a model's".into());
        }
        if self.0.iter().map(|s| s.len as u64).sum::<u64>() > MAX_LAYERS as u64 {
            return bad(format!("more than {MAX_LAYERS} output layers"));
        }
        for (k, s) in self.0.iter().enumerate() {
            if s.lanes.len() != lanes {
                return bad(format!(
                    "slice {k} has {} sources and slice 0 {lanes}: every slice merges as many",
                    s.lanes.len()
                ));
            }
            if s.len == 0 {
                return bad(format!("slice {k} is empty"));
            }
            if let Some(l) = s.lanes.iter().find(|l| l.input >= inputs) {
                return bad(format!("slice {k} reads input {}, of {inputs}", l.input));
            }
        }
        Ok(())
    }

    /// Each output layer's (slice, layer within it).
    fn layer_map(&self) -> Vec<(usize, usize)> {
        self.0
            .iter()
            .enumerate()
            .flat_map(|(k, s)| (0..s.len).map(move |i| (k, i)))
            .collect()
    }

    /// The source layer of every output layer in the base's lane (a config's per-layer lists,
    /// such as `layer_types`, follow it).
    pub fn base_layers(&self) -> Vec<usize> {
        self.layer_map()
            .into_iter()
            .map(|(k, i)| self.0[k].lanes[0].start + i)
            .collect()
    }

    /// Where output tensor `name` sits.
    pub fn position(&self, name: &str) -> Position {
        let map = self.layer_map();
        match layer_of(name).and_then(|(_, l)| map.get(l)) {
            Some(&(k, i)) => Position {
                slice: k,
                t: if self.0[k].len > 1 {
                    i as f64 / (self.0[k].len - 1) as f64
                } else {
                    1.0
                },
            },
            None if layer_of(name).is_none() && before_layers(name) => {
                Position { slice: 0, t: 0.0 }
            }
            None => Position {
                slice: self.0.len() - 1,
                t: 0.0,
            },
        }
    }

    /// The lanes' views under the output's names: `inputs[0]` the base, then the models.
    pub fn apply<'a>(
        &self,
        inputs: &[&ModelView<'a>],
    ) -> Result<(ModelView<'a>, Vec<ModelView<'a>>)> {
        self.check(inputs.len())?;
        // Per input: (name with its layer as 0, layer) → name, and each layer's names.
        type Layers = BTreeMap<usize, Vec<(String, usize)>>;
        let mut index: Vec<std::collections::HashMap<(String, usize), &str>> = Vec::new();
        let mut by_layer: Vec<Layers> = Vec::new();
        for v in inputs {
            let (mut ix, mut bl) = (std::collections::HashMap::new(), Layers::new());
            for n in v.tensors.keys() {
                if let Some((at, l)) = layer_of(n) {
                    let z = with_layer(n, at, 0);
                    bl.entry(l).or_default().push((z.clone(), at));
                    ix.insert((z, l), n.as_str());
                }
            }
            index.push(ix);
            by_layer.push(bl);
        }
        let lanes = self.lanes();
        let mut out: Vec<BTreeMap<String, TensorRef<'a>>> = vec![BTreeMap::new(); lanes];
        let missing = |input: usize, name: &str, k: usize| {
            Error::param(
                "slices",
                format!("slice {k}: {} has no tensor '{name}'", inputs[input].label),
            )
        };
        for (o, (k, i)) in self.layer_map().into_iter().enumerate() {
            let s = &self.0[k];
            // The layer's tensors, as the base's lane has them.
            let first = s.lanes[0];
            let layer = first.start + i;
            let names: &[(String, usize)] =
                by_layer[first.input].get(&layer).map_or(&[], Vec::as_slice);
            if names.is_empty() {
                return Err(Error::param(
                    "slices",
                    format!(
                        "slice {k}: {} has no layer {layer}",
                        inputs[first.input].label
                    ),
                ));
            }
            for (z, at) in names {
                let name = with_layer(z, *at, o);
                for (lane, src) in s.lanes.iter().enumerate() {
                    let want = with_layer(z, *at, src.start + i);
                    let r = index[src.input]
                        .get(&(z.clone(), src.start + i))
                        .and_then(|n| inputs[src.input].tensors.get(*n))
                        .ok_or_else(|| missing(src.input, &want, k))?;
                    out[lane].insert(name.clone(), *r);
                }
            }
        }
        // Outside the layers: the first slice's inputs for what precedes them, the last's after.
        for (n, _) in inputs[self.0[0].lanes[0].input]
            .tensors
            .iter()
            .chain(&inputs[self.0[self.0.len() - 1].lanes[0].input].tensors)
            .filter(|(n, _)| layer_of(n).is_none())
        {
            let k = if before_layers(n) {
                0
            } else {
                self.0.len() - 1
            };
            if out[0].contains_key(n) {
                continue;
            }
            for (lane, src) in self.0[k].lanes.iter().enumerate() {
                let r = inputs[src.input]
                    .tensors
                    .get(n)
                    .ok_or_else(|| missing(src.input, n, k))?;
                out[lane].insert(n.clone(), *r);
            }
        }
        let mut views = out.into_iter().enumerate().map(|(lane, tensors)| {
            let src = self.0[0].lanes[lane];
            ModelView {
                label: inputs[src.input].label.clone(),
                tensors,
                // Lanes mix inputs; a hint for a file this lane does not read costs nothing.
                maps: inputs.iter().flat_map(|v| v.maps.iter().copied()).collect(),
            }
        });
        let base = views.next().expect("two lanes at least");
        Ok((base, views.collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_follow_mergekit() {
        let s = Slices(vec![
            Slice {
                len: 3,
                lanes: vec![Source { input: 0, start: 0 }; 2],
            },
            Slice {
                len: 1,
                lanes: vec![Source { input: 1, start: 5 }; 2],
            },
        ]);
        let p = |n: &str| s.position(n);
        assert_eq!(p("model.layers.0.mlp.w"), Position { slice: 0, t: 0.0 });
        assert_eq!(p("model.layers.1.mlp.w"), Position { slice: 0, t: 0.5 });
        assert_eq!(p("model.layers.3.mlp.w"), Position { slice: 1, t: 1.0 });
        assert_eq!(
            p("model.embed_tokens.weight"),
            Position { slice: 0, t: 0.0 }
        );
        assert_eq!(p("lm_head.weight"), Position { slice: 1, t: 0.0 });
        assert_eq!(s.base_layers(), vec![0, 1, 2, 5]);
        assert_eq!(with_layer("a.7.b", 1, 12), "a.12.b");
    }
}
