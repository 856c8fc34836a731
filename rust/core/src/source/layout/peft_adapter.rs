//! PEFT adapter directories: `adapter_config.json` beside `adapter_model.safetensors` (or `.bin`).

use std::path::Path;

use super::Layout;
use crate::error::{Error, Result};
use crate::reader::Checkpoint;
use crate::source::lora;

pub(super) struct PeftAdapter;

impl Layout for PeftAdapter {
    fn recognises(&self, dir: &Path) -> bool {
        dir.join(lora::CONFIG_FILE).exists()
    }

    /// Its weights file, with the adapter's configuration.
    fn open(&self, dir: &Path) -> Result<Checkpoint> {
        let cfg = lora::AdapterConfig::read(&dir.join(lora::CONFIG_FILE))?;
        let weights = lora::WEIGHTS
            .iter()
            .map(|w| dir.join(w))
            .find(|p| p.exists())
            .ok_or_else(|| {
                Error::header(
                    &dir.display().to_string(),
                    format!(
                        "a LoRA adapter directory without {}",
                        lora::WEIGHTS.join(" or ")
                    ),
                )
            })?;
        let mut ck = Checkpoint::open_single(dir, &weights)?;
        ck.lora = Some(lora::Adapter::Peft(cfg));
        Ok(ck)
    }
}
