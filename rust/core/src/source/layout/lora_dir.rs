//! The directory diffusers' `save_lora_weights` writes: one `pytorch_lora_weights.safetensors`
//! (or `.bin`), a diffusion LoRA file (see `source/lora/files.rs`).

use std::path::{Path, PathBuf};

use super::Layout;
use crate::error::{Error, Result};
use crate::reader::Checkpoint;
use crate::source::lora::files::WEIGHTS;

pub(super) struct DiffusersLoraDir;

fn weights(dir: &Path) -> Option<PathBuf> {
    WEIGHTS.iter().map(|w| dir.join(w)).find(|p| p.is_file())
}

impl Layout for DiffusersLoraDir {
    fn recognises(&self, dir: &Path) -> bool {
        weights(dir).is_some()
    }

    fn open(&self, dir: &Path) -> Result<Checkpoint> {
        let file = weights(dir).unwrap_or_else(|| dir.join(WEIGHTS[0]));
        let mut ck = Checkpoint::open_single(dir, &file)?;
        ck.lora = ck.diffusion_lora()?;
        if ck.lora.is_none() {
            return Err(Error::header(
                &file.display().to_string(),
                "holds no LoRA factors in diffusers' or kohya-ss's naming",
            ));
        }
        Ok(ck)
    }
}
