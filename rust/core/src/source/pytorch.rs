//! PyTorch checkpoints (`pytorch_model.bin`, `*.pt`, `*.pth`) as `torch.save` writes them since
//! 1.6: a zip archive, stored uncompressed, holding `data.pkl` (the state dict, pickled) and one
//! entry per storage (`data/0`, `data/1`, ...). The archive is memory-mapped like a safetensors
//! file; its directory gives each storage's position, and the restricted unpickler
//! ([`super::pickle`]) gives each tensor's storage, offset and shape. Tensor data is read in
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
    let Value::Dict(items) = value else {
        return Err(bad(
            "data.pkl does not hold a state dict (a dict of tensors)".into(),
        ));
    };
    let items = state_dict(file, items)?;
    let mut rows = Vec::with_capacity(items.len());
    for (k, v) in items {
        let Value::Str(name) = k else {
            return Err(bad("a state dict key that is not a string".into()));
        };
        let Value::Tensor(t) = v else {
            return Err(Error::tensor(file, &name, "is not a tensor"));
        };
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

/// The entries of a training checkpoint that hold the model's state dict, in the order they are
/// looked for: open_clip, timm and Lightning save `state_dict`, DeiT-style scripts `model`,
/// DeepSpeed-style wrappers `module`.
pub const ENTRIES: [&str; 3] = ["state_dict", "model", "module"];

/// The state dict in a checkpoint's top-level dict: the dict itself when every value is a
/// tensor, else the first of [`ENTRIES`] that is a dict of tensors (a training checkpoint: its
/// epoch, optimizer state and the like are left unread).
fn state_dict(file: &str, items: Vec<(Value, Value)>) -> Result<Vec<(Value, Value)>> {
    if items.iter().all(|(_, v)| matches!(v, Value::Tensor(_))) {
        return Ok(items);
    }
    let key_of = |k: &Value| match k {
        Value::Str(s) => Some(s.clone()),
        _ => None,
    };
    let is_tensors = |v: &Value| match v {
        Value::Dict(d) => {
            !d.is_empty()
                && d.iter()
                    .all(|(k, v)| matches!((k, v), (Value::Str(_), Value::Tensor(_))))
        }
        _ => false,
    };
    for entry in ENTRIES {
        let found = items
            .iter()
            .position(|(k, v)| key_of(k).as_deref() == Some(entry) && is_tensors(v));
        if let Some(i) = found {
            let Some((_, Value::Dict(d))) = items.into_iter().nth(i) else {
                unreachable!("checked to be a dict")
            };
            return Ok(d);
        }
    }
    let mut keys: Vec<String> = items
        .iter()
        .filter_map(|(k, _)| key_of(k))
        .take(8)
        .collect();
    if items.len() > keys.len() {
        keys.push("...".into());
    }
    Err(Error::header(
        file,
        format!(
            "this looks like a training checkpoint (entries: {}), and none of its entries {} is a dict of tensors; save the model's state_dict() instead",
            keys.join(", "),
            ENTRIES.map(|e| format!("'{e}'")).join(", ")
        ),
    ))
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
