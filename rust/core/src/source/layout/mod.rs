//! Directory layouts, as each ecosystem writes a model: which files in a directory hold its
//! weights and how they are named. One file per layout, behind `Layout`; the first layout that
//! recognises a directory opens it. The formats of the files themselves are `source/`'s.

use std::path::Path;

use crate::error::{Error, Result};
use crate::reader::{not_a_model, open_regular, Checkpoint};

mod diffusers_pipeline;
mod lora_dir;
mod peft_adapter;
mod sentence_transformers;
mod weights;

pub use diffusers_pipeline::PIPELINE_INDEX;

/// One way of laying a model out in a directory.
pub(crate) trait Layout: Sync {
    /// Whether `dir` is laid out this way (by the files it holds; nothing is read).
    fn recognises(&self, dir: &Path) -> bool;
    /// Opens the model in `dir`, validating every header.
    fn open(&self, dir: &Path) -> Result<Checkpoint>;
}

/// In the order they are tried: an adapter's config marks an adapter whatever else is there,
/// and a weights file at the root a model (a sentence-transformers model has its modules beside
/// it); a pipeline's root holds no weights of its own.
const LAYOUTS: [&dyn Layout; 4] = [
    &peft_adapter::PeftAdapter,
    &weights::WeightsDir,
    &lora_dir::DiffusersLoraDir,
    &diffusers_pipeline::Pipeline,
];

/// Opens a model directory with the first layout that recognises it.
pub(crate) fn open_dir(dir: &Path) -> Result<Checkpoint> {
    match LAYOUTS.iter().find(|l| l.recognises(dir)) {
        Some(l) => l.open(dir),
        None => Err(not_a_model(dir, &dir.display().to_string())),
    }
}

/// Whether `s`, from a module or component list, names one directory inside the model (not
/// `..`, not absolute, not nested).
fn one_dir_name(s: &str) -> bool {
    let mut c = Path::new(s).components();
    matches!(
        (c.next(), c.next()),
        (Some(std::path::Component::Normal(_)), None)
    ) && !s.contains('/')
}

/// A small JSON file's bytes (a module or component list), bounded.
fn read_small(path: &Path) -> Result<Vec<u8>> {
    let label = path.display().to_string();
    let (file, meta) = open_regular(path)?;
    if meta.len() > MODULES_JSON_LIMIT {
        return Err(Error::header(
            &label,
            format!("is {} bytes, more than such a list holds", meta.len()),
        ));
    }
    let mut text = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(file, MODULES_JSON_LIMIT),
        &mut text,
    )
    .map_err(|e| Error::io(path, e))?;
    Ok(text)
}

/// The most `modules.json` read (sentence-transformers writes a few hundred bytes).
const MODULES_JSON_LIMIT: u64 = 1 << 20;
