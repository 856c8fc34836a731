//! Input formats. Each reader turns a memory-mapped file into the same compact tensor table
//! ([`safetensors::Header`]: name, dtype, shape and byte range of every tensor), so everything
//! downstream reads tensors in place whatever the format: one file per format here, nothing
//! format-specific beyond.

#[doc(hidden)]
pub mod fuzzgen;
pub mod layout;
pub mod lora;
mod pickle;
pub mod pytorch;
pub mod safetensors;
pub mod scaled;
pub mod slices;
mod zip;

use std::path::Path;

use crate::error::{Error, Result};
pub use safetensors::Header;

/// Reads the tensor table of `bytes` (the file at `path`; `label` names it), recognising the
/// format from its first bytes.
pub fn parse(label: &str, path: &Path, bytes: &[u8]) -> Result<Header> {
    if bytes.starts_with(pytorch::ZIP_MAGIC) {
        return pytorch::parse(label, bytes);
    }
    let torch_name = path
        .extension()
        .is_some_and(|e| e == "bin" || e == "pt" || e == "pth");
    if torch_name && pytorch::is_legacy(bytes) {
        return Err(Error::header(
            label,
            "a legacy (pre-1.6, not zip) PyTorch file; re-save it with a current torch: \
             torch.save(torch.load(path, weights_only=True), new_path)",
        ));
    }
    safetensors::parse(label, bytes)
}
