//! A directory whose root holds the weights, as transformers (`model.safetensors`, its index,
//! `pytorch_model.bin`), diffusers components (`diffusion_pytorch_model.safetensors`) and open_clip
//! (`open_clip_model.safetensors`) save them; a sentence-transformers model is one too, with its
//! module directories beside.

use std::path::Path;

use super::{sentence_transformers, Layout};
use crate::error::{Error, Result};
use crate::reader::{Checkpoint, DIR_FILES, INDEX_FILE, SINGLE_FILE};

pub(super) struct WeightsDir;

impl Layout for WeightsDir {
    fn recognises(&self, dir: &Path) -> bool {
        DIR_FILES.iter().any(|f| dir.join(f).exists())
    }

    fn open(&self, dir: &Path) -> Result<Checkpoint> {
        if dir.join(INDEX_FILE).exists() && dir.join(SINGLE_FILE).exists() {
            return Err(Error::header(
                &dir.display().to_string(),
                format!("holds both {SINGLE_FILE} and {INDEX_FILE}, and loaders disagree on which wins; pass the one to use"),
            ));
        }
        let found = DIR_FILES
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.exists())
            .unwrap_or_else(|| dir.join(SINGLE_FILE));
        let mut ck = if found.extension().is_some_and(|e| e == "json") {
            Checkpoint::open_index(dir, &found)?
        } else {
            Checkpoint::open_single(dir, &found)?
        };
        ck.model_dir = Some(dir.to_owned());
        ck.modules = sentence_transformers::open_modules(dir)?;
        Ok(ck)
    }
}
