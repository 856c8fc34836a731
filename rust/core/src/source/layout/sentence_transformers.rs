//! sentence-transformers models: the root's weights (read as a weights directory) and those of
//! the module directories `modules.json` lists (`2_Dense/`), named `path/name` in the model.

use std::path::Path;

use super::{one_dir_name, read_small};
use crate::error::{Error, Result};
use crate::reader::{map_file, MappedFile, BIN_FILE, SINGLE_FILE};

/// The weights of the module directories a sentence-transformers model's `modules.json` lists
/// (`2_Dense/model.safetensors`; the root module's are the directory's own): each module path
/// must be one plain directory name in `dir` (a path that climbs out or nests is refused).
pub(super) fn open_modules(dir: &Path) -> Result<Vec<(String, MappedFile)>> {
    let listing = dir.join("modules.json");
    if !listing.is_file() {
        return Ok(Vec::new());
    }
    let label = listing.display().to_string();
    let text = read_small(&listing)?;
    #[derive(serde::Deserialize)]
    struct Module {
        #[serde(default)]
        path: String,
    }
    let list: Vec<Module> = serde_json::from_slice(&text).map_err(|e| {
        Error::header(
            &label,
            format!("not a sentence-transformers module list: {e}"),
        )
    })?;
    let mut out: Vec<(String, MappedFile)> = Vec::new();
    for m in list {
        if m.path.is_empty() {
            continue;
        }
        if !one_dir_name(&m.path) {
            return Err(Error::header(
                &label,
                format!(
                    "module path '{}' is not one directory name inside the model",
                    m.path.escape_debug()
                ),
            ));
        }
        if out.iter().any(|(p, _)| *p == m.path) {
            continue;
        }
        let weights = dir.join(&m.path).join(SINGLE_FILE);
        if weights.is_file() {
            out.push((m.path.clone(), map_file(&weights)?));
        } else if dir.join(&m.path).join(BIN_FILE).is_file() {
            out.push((m.path.clone(), map_file(&dir.join(&m.path).join(BIN_FILE))?));
        }
    }
    Ok(out)
}
