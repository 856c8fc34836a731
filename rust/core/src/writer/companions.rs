//! Files of the base's model directory that belong next to the merged weights (config,
//! tokenizer, generation config, ...), copied by the kernel (`copy_file_range` through
//! `std::fs::copy`, which also keeps the file mode): never read whole into memory.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Extensions of weight files: the base's weights in any format must not land next to the
/// merged ones.
const WEIGHTS: [&str; 9] = [
    "safetensors",
    "bin",
    "pt",
    "pth",
    "ckpt",
    "h5",
    "msgpack",
    "gguf",
    "npz",
];

/// The companion files of `model_dir`, sorted.
pub fn list(model_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(model_dir).map_err(|e| Error::io(model_dir, e))? {
        let e = e.map_err(|e| Error::io(model_dir, e))?;
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let is_weight = p
            .extension()
            .is_some_and(|x| WEIGHTS.iter().any(|w| x == *w))
            || name.ends_with(".index.json");
        if p.is_file() && !is_weight && !name.starts_with('.') {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// Copies `src` to `dst` (a new file) and flushes it to disk.
pub fn copy(src: &Path, dst: &Path, shown: &Path) -> Result<()> {
    std::fs::copy(src, dst).map_err(|e| Error::io(src, e))?;
    std::fs::File::open(dst)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(shown, e))
}
