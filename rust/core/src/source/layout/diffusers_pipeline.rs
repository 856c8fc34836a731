//! Whole diffusers pipelines: `model_index.json` lists the components, each a subdirectory whose
//! weights are read like a module directory's (`unet/diffusion_pytorch_model.safetensors` is
//! named `unet/...` in the model).

use std::path::{Path, PathBuf};

use super::{one_dir_name, read_small, Layout};
use crate::error::{Error, Result};
use crate::reader::{
    is_weights_name, map_file, Checkpoint, MappedFile, BIN_FILE, DIR_FILES, SINGLE_FILE,
};
use crate::watch::Fingerprint;

/// Module directories' weight files by module path, and the shard indexes among them.
type Modules = (Vec<(String, MappedFile)>, Vec<(PathBuf, Fingerprint)>);

/// A diffusers pipeline's component list (the components are subdirectories).
pub const PIPELINE_INDEX: &str = "model_index.json";

/// The weight-bearing components of a diffusers pipeline directory (`unet/`, `vae/`,
/// `text_encoder/`, ... as `model_index.json` lists them), each read like a module directory: one
/// weights file, named as diffusers or transformers save it, or the shards its index lists (with
/// the index, to watch). A variant-only component is refused with what to do.
fn open_pipeline(dir: &Path) -> Result<Modules> {
    let listing = dir.join(PIPELINE_INDEX);
    let label = listing.display().to_string();
    let text = read_small(&listing)?;
    let index: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&text)
        .map_err(|e| Error::header(&label, format!("not a diffusers pipeline index: {e}")))?;
    let mut out = Vec::new();
    let mut indexes = Vec::new();
    for (name, v) in &index {
        if name.starts_with('_')
            || !v
                .as_array()
                .is_some_and(|a| a.len() == 2 && a[0].is_string())
        {
            continue; // _class_name, _diffusers_version; components set to null
        }
        if !one_dir_name(name) {
            return Err(Error::header(
                &label,
                format!(
                    "component '{}' is not one directory name inside the pipeline",
                    name.escape_debug()
                ),
            ));
        }
        let sub = dir.join(name);
        if !sub.is_dir() {
            continue;
        }
        let single = [
            SINGLE_FILE,
            "diffusion_pytorch_model.safetensors",
            BIN_FILE,
            "diffusion_pytorch_model.bin",
        ];
        if let Some(f) = single.iter().map(|f| sub.join(f)).find(|p| p.is_file()) {
            out.push((name.clone(), map_file(&f)?));
            continue;
        }
        if let Some(f) = DIR_FILES
            .iter()
            .map(|f| sub.join(f))
            .find(|f| f.extension().is_some_and(|e| e == "json") && f.is_file())
        {
            // Sharded: the index checks that its shards hold exactly the tensors it lists.
            let ck = Checkpoint::open_index(&sub, &f)?;
            indexes.extend(ck.index_file.clone().zip(ck.index_fingerprint));
            out.extend(ck.files.into_iter().map(|m| (name.clone(), m)));
            continue;
        }
        if std::fs::read_dir(&sub)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| is_weights_name(&e.file_name().to_string_lossy()))
        {
            return Err(Error::NotAModel {
                file: label,
                reason: format!("component '{name}' holds only variant weights (such as fp16); pass the variant files of each component instead"),
            });
        }
    }
    Ok((out, indexes))
}

/// A directory with `model_index.json`.
pub(super) struct Pipeline;

impl Layout for Pipeline {
    fn recognises(&self, dir: &Path) -> bool {
        dir.join(PIPELINE_INDEX).is_file()
    }

    fn open(&self, dir: &Path) -> Result<Checkpoint> {
        let (modules, module_indexes) = open_pipeline(dir)?;
        if modules.is_empty() {
            return Err(Error::NotAModel {
                file: dir.display().to_string(),
                reason: format!(
                    "a diffusers pipeline ({PIPELINE_INDEX}) none of whose components holds weights"
                ),
            });
        }
        Ok(Checkpoint::of_modules(dir, modules, module_indexes))
    }
}
