//! PyTorch checkpoints (`pytorch_model.bin`, `*.pt`, `*.pth`) as `torch.save` writes them since
//! 1.6: a zip archive, stored uncompressed, holding `data.pkl` (a state dict, a training
//! checkpoint's dict, or a whole `nn.Module`, pickled) and one entry per storage (`data/0`,
//! `data/1`, ...). The archive is memory-mapped like a safetensors
//! file; its directory gives each storage's position, and the restricted unpickler
//! (`super::pickle`) gives each tensor's storage, offset and shape. Tensor data is read in
//! place: no whole-file load, and no code from the pickle ever runs.

use std::collections::BTreeMap;

use super::pickle::{self, Value};
use super::safetensors::Header;
use super::zip;
use crate::error::{Error, Result};

/// The first bytes of a zip archive.
pub const ZIP_MAGIC: &[u8] = b"PK\x03\x04";

/// Whether `bytes` look like a pre-1.6 (non-zip) PyTorch pickle.
pub fn is_legacy(bytes: &[u8]) -> bool {
    bytes.first() == Some(&0x80)
}

/// Reads the tensor table of a PyTorch zip checkpoint held in `bytes` (`file` names it).
pub fn parse(file: &str, bytes: &[u8]) -> Result<Header> {
    let bad = |why: String| Error::header(file, why);
    let list = zip::entries(bytes).map_err(|e| bad(format!("not a readable zip archive: {e}")))?;
    // torch's rule: the folder of the first entry is the archive's; every record is looked up
    // under it ("archive/data.pkl", "archive/data/0", "archive/byteorder").
    let first = list
        .first()
        .ok_or_else(|| bad("an empty zip archive: not a PyTorch checkpoint".into()))?;
    let prefix = match first.name.find('/') {
        Some(i) => first.name[..=i].to_owned(),
        None => {
            return Err(bad(format!(
                "'{}' is not in a folder: torch.save puts every record in one (torch refuses this archive too)",
                first.name
            )))
        }
    };
    let pickles: Vec<&str> = list
        .iter()
        .map(|e| e.name.as_str())
        .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .collect();
    if pickles.len() > 1 {
        return Err(bad(format!(
            "the archive holds several pickles ({}): which one is the model is ambiguous",
            pickles.join(", ")
        )));
    }
    let entries: BTreeMap<&str, &zip::Entry> = list.iter().map(|e| (e.name.as_str(), e)).collect();
    let pkl = format!("{prefix}data.pkl");
    if !entries.contains_key(pkl.as_str()) {
        return Err(bad(format!(
            "a zip archive without '{pkl}': not a PyTorch checkpoint"
        )));
    }
    let slice = |name: &str| -> Result<(u64, u64)> {
        let e = entries
            .get(name)
            .ok_or_else(|| bad(format!("the archive lacks '{name}'")))?;
        if !e.stored {
            return Err(bad(format!(
                "'{name}' is compressed; re-save the checkpoint with torch.save (storages must be stored uncompressed to be read in place)"
            )));
        }
        let end = e
            .start
            .checked_add(e.size)
            .filter(|&end| end <= bytes.len() as u64)
            .ok_or_else(|| bad(format!("'{name}' extends past the end of the file")))?;
        Ok((e.start, end))
    };
    // Storages are in the byte order of the machine that saved them ("little" when the record
    // is absent, as torch assumes). Big-endian ones would need swapping: refused, never misread.
    let order = format!("{prefix}byteorder");
    if entries.contains_key(order.as_str()) {
        let (s, e) = slice(&order)?;
        let text = &bytes[s as usize..e as usize];
        if text != b"little" {
            return Err(bad(format!(
                "its storages are in '{}' byte order; only little-endian checkpoints are read (load and re-save it with torch on a little-endian machine)",
                String::from_utf8_lossy(&text[..text.len().min(16)])
            )));
        }
    }
    let (ps, pe) = slice(&pkl)?;
    let value = pickle::load(&bytes[ps as usize..pe as usize])
        .map_err(|why| bad(format!("data.pkl: {why}")))?;
    let tensors = tensors_of(file, value)?;
    let mut rows = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let (ss, se) = slice(&format!("{prefix}data/{}", t.key))?;
        let size = t.dtype.size() as u64;
        let numel = t.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        let numel = numel.ok_or_else(|| Error::tensor(file, &name, "shape overflows"))?;
        // C-contiguous strides (a dimension of size 1 may have any stride).
        let mut want = 1u64;
        for (&d, &s) in t.shape.iter().zip(&t.stride).rev() {
            if d != 1 && s != want {
                return Err(Error::tensor(
                    file,
                    &name,
                    "is not contiguous (a view with strides); save a contiguous copy",
                ));
            }
            want = want.saturating_mul(d);
        }
        if t.stride.len() != t.shape.len() {
            return Err(Error::tensor(file, &name, "shape and stride disagree"));
        }
        let start = t
            .offset
            .checked_mul(size)
            .and_then(|o| o.checked_add(ss))
            .ok_or_else(|| Error::tensor(file, &name, "storage offset overflows"))?;
        let end = numel
            .checked_mul(size)
            .and_then(|n| n.checked_add(start))
            .filter(|&e| e <= se)
            .ok_or_else(|| Error::tensor(file, &name, "extends past its storage"))?;
        rows.push((name, t.dtype, t.shape, start, end));
    }
    if rows.is_empty() {
        return Err(bad("the state dict holds no tensors".into()));
    }
    Header::from_table(file, rows, bytes.len(), BTreeMap::new())
}

/// The entries of a training checkpoint that hold the model, in the order they are looked for:
/// open_clip, timm and Lightning save `state_dict`, DeiT-style scripts `model`, DeepSpeed-style
/// wrappers `module`.
pub const ENTRIES: [&str; 3] = ["state_dict", "model", "module"];

type Tensors = Vec<(String, Box<pickle::Tensor>)>;

/// The named tensors `data.pkl` holds: a state dict (a dict of tensors); a training checkpoint's
/// first [`ENTRIES`] entry that is a state dict or a module (its epoch, optimizer state and the
/// like are left unread); or a whole pickled `nn.Module`, named as its `state_dict()` names them.
fn tensors_of(file: &str, value: Value) -> Result<Tensors> {
    let bad = |why: String| Error::checkpoint(file, why);
    match value {
        Value::Dict(items) if items.iter().all(|(_, v)| matches!(v, Value::Tensor(_))) => {
            state_dict(file, items)
        }
        Value::Dict(items) => {
            let key = |k: &Value| match k {
                Value::Str(s) => Some(s.clone()),
                _ => None,
            };
            let usable = |v: &Value| match v {
                Value::Dict(d) => !d.is_empty() && d.iter().all(|(_, v)| matches!(v, Value::Tensor(_))),
                Value::Object(o) => !o.called,
                _ => false,
            };
            // A value made by a call is named before anything else (it is what a hostile
            // pickle looks like).
            let called = items
                .iter()
                .find(|(_, v)| matches!(v, Value::Object(o) if o.called));
            if let Some((k, v)) = called {
                let k = key(k).unwrap_or_else(|| "?".into());
                return Err(Error::tensor(file, &k, not_a_tensor(v)));
            }
            for entry in ENTRIES {
                let at = items
                    .iter()
                    .position(|(k, v)| key(k).as_deref() == Some(entry) && usable(v));
                if let Some(i) = at {
                    return match items.into_iter().nth(i).map(|(_, v)| v) {
                        Some(Value::Dict(d)) => state_dict(file, d),
                        Some(Value::Object(o)) => module(file, *o),
                        _ => unreachable!("checked to be a dict or an object"),
                    };
                }
            }
            let mut keys: Vec<String> = items.iter().filter_map(|(k, _)| key(k)).take(8).collect();
            if items.len() > keys.len() {
                keys.push("...".into());
            }
            Err(bad(format!(
                "this looks like a training checkpoint (entries: {}), and none of its entries {} is a dict of tensors or a module; save the model's state_dict() instead",
                keys.join(", "),
                ENTRIES.map(|e| format!("'{e}'")).join(", ")
            )))
        }
        Value::Object(o) if o.called => Err(bad(format!(
            "data.pkl: it refers to '{}' to make its value, which would run code; refusing to load it (a pickle can run code)",
            o.class
        ))),
        Value::Object(o) => module(file, *o),
        _ => Err(bad(
            "data.pkl holds neither a state dict (a dict of tensors) nor a module".into(),
        )),
    }
}

/// Why `v`, found where a tensor belongs, is not one.
fn not_a_tensor(v: &Value) -> String {
    match v {
        Value::Object(o) if o.called => format!(
            "refers to '{}' to make its value, which would run code; refusing to load it (a pickle can run code)",
            o.class
        ),
        Value::Object(o) => format!("is not a tensor (an object of class '{}')", o.class),
        _ => "is not a tensor".into(),
    }
}

fn state_dict(file: &str, items: Vec<(Value, Value)>) -> Result<Tensors> {
    let mut out = Vec::with_capacity(items.len());
    for (k, v) in items {
        let Value::Str(name) = k else {
            return Err(Error::checkpoint(
                file,
                "a state dict key that is not a string",
            ));
        };
        match v {
            Value::Tensor(t) => out.push((name, t)),
            other => return Err(Error::tensor(file, &name, not_a_tensor(&other))),
        }
    }
    Ok(out)
}

/// The tensors of a pickled `nn.Module`, named as `Module.state_dict()` names them: each
/// module's parameters, then its persistent buffers, then its children's, depth first, with
/// dotted prefixes. Read from each module's `__dict__` (`_parameters`, `_buffers`,
/// `_non_persistent_buffers_set`, `_modules`); no class is imported or constructed. A module
/// with state-dict hooks is refused: only running them would say what its state dict holds.
fn module(file: &str, top: pickle::Object) -> Result<Tensors> {
    let mut out = Vec::new();
    walk(file, top, String::new(), &mut out)?;
    if out.is_empty() {
        return Err(Error::checkpoint(
            file,
            "the pickled module holds no tensors",
        ));
    }
    Ok(out)
}

fn walk(file: &str, o: pickle::Object, prefix: String, out: &mut Tensors) -> Result<()> {
    let here = match prefix.strip_suffix('.') {
        None => format!("the pickled module ({})", o.class),
        Some(p) => format!("module '{p}' ({})", o.class),
    };
    let bad = |why: &str| Error::checkpoint(file, format!("{here} {why}"));
    if o.called {
        return Err(bad(
            "is made by a call, which would run code; refusing to load it (a pickle can run code)",
        ));
    }
    let state = match o.state {
        Some(Value::Dict(d)) => d,
        Some(Value::Tuple(t)) if matches!(t.first(), Some(Value::Dict(_))) => {
            let Some(Value::Dict(d)) = t.into_iter().next() else {
                unreachable!("checked to be a dict")
            };
            d
        }
        None => return Err(bad("has no state at this place in the pickle (a module referenced twice is read once); save model.state_dict() instead")),
        Some(_) => return Err(bad("has a state that is not a dict: not an nn.Module")),
    };
    // A dict's later value for a key wins, as in Python.
    let mut state: std::collections::HashMap<String, Value> = state
        .into_iter()
        .filter_map(|(k, v)| match k {
            Value::Str(k) => Some((k, v)),
            _ => None,
        })
        .collect();
    let (Some(params), Some(children)) = (state.remove("_parameters"), state.remove("_modules"))
    else {
        return Err(bad(
            "is not an nn.Module (its state has no _parameters and _modules)",
        ));
    };
    for hooks in ["_state_dict_hooks", "_state_dict_pre_hooks"] {
        if matches!(state.get(hooks), Some(Value::Dict(d)) if !d.is_empty()) {
            return Err(bad(&format!(
                "has {hooks}, which change its state dict by running code; save model.state_dict() instead"
            )));
        }
    }
    let skip: Vec<String> = match state.remove("_non_persistent_buffers_set") {
        Some(Value::List(l)) => l
            .into_iter()
            .filter_map(|v| match v {
                Value::Str(s) => Some(s),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let entries = |v: Option<Value>, what: &str| -> Result<Vec<(String, Value)>> {
        match v {
            None | Some(Value::None) => Ok(Vec::new()),
            Some(Value::Dict(d)) => d
                .into_iter()
                .map(|(k, v)| match k {
                    Value::Str(k) => Ok((k, v)),
                    _ => Err(bad(&format!("has a {what} name that is not a string"))),
                })
                .collect(),
            Some(_) => Err(bad(&format!("has {what} that are not a dict"))),
        }
    };
    let buffers = entries(state.remove("_buffers"), "buffers")?;
    for (name, v) in entries(Some(params), "parameters")?
        .into_iter()
        .chain(buffers.into_iter().filter(|(n, _)| !skip.contains(n)))
    {
        let full = format!("{prefix}{name}");
        match v {
            Value::Tensor(t) => out.push((full, t)),
            Value::None => {}
            other => return Err(Error::tensor(file, &full, not_a_tensor(&other))),
        }
    }
    for (name, v) in entries(Some(children), "modules")? {
        match v {
            Value::Object(child) => walk(file, *child, format!("{prefix}{name}."), out)?,
            Value::None => {}
            _ => return Err(bad(&format!("has a child '{name}' that is not a module"))),
        }
    }
    Ok(())
}

/// [`check_accepted`] on the archive a structure-aware program describes ([`super::fuzzgen`]).
#[doc(hidden)]
pub fn check_program(program: &[u8]) {
    check_accepted(&super::fuzzgen::archive(program));
}

/// Parses `bytes` as a PyTorch checkpoint and panics if an accepted one points a tensor outside
/// the file or at the wrong number of bytes. The fuzz target and the corpus replay call this.
#[doc(hidden)]
pub fn check_accepted(bytes: &[u8]) {
    let Ok(h) = parse("fuzz", bytes) else { return };
    for (name, e) in h.iter() {
        assert!(
            e.start <= e.end && e.end <= bytes.len(),
            "{name} inside the file"
        );
        let numel: usize = e.shape.iter().product();
        assert_eq!(numel * e.dtype.size(), e.end - e.start, "{name} size");
    }
}
