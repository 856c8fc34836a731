//! Files of the base's model directory that belong next to the merged weights (config,
//! tokenizer, generation config, subfolders such as sentence-transformers' `1_Pooling/`).
//! Copied by the kernel (`copy_file_range` through `std::fs::copy`, which keeps the file mode):
//! never read whole into memory. Weights in other formats, training logs and very large files
//! are not copied, and the report says so. `config.json`'s dtype follows the written dtype.

use std::path::{Path, PathBuf};

use crate::dtype::DType;
use crate::error::{Error, Result};

/// Endings of weight files in any format: the base's unmerged weights must not land next to
/// the merged ones (a loader could pick them).
const WEIGHTS: [&str; 14] = [
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".npz",
    ".onnx",
    ".onnx_data",
    ".onnx.data",
    ".tflite",
    ".index.json",
];

/// Larger files are not copied (a stray dataset or checkpoint in the model directory).
pub const MAX_FILE: u64 = 512 << 20;
/// Subfolders deeper than this are not copied.
const MAX_DEPTH: usize = 3;

/// One file to copy: its source and its path relative to the output directory.
#[derive(Clone, Debug)]
pub struct Companion {
    pub src: PathBuf,
    pub rel: PathBuf,
}

/// What a model directory holds for the output: the files to copy, and the ones left out
/// ("path (why)").
#[derive(Clone, Debug, Default)]
pub struct Companions {
    pub files: Vec<Companion>,
    pub skipped: Vec<String>,
}

fn why_not(name: &str, size: u64) -> Option<&'static str> {
    if WEIGHTS.iter().any(|w| name.ends_with(w)) {
        Some("weights in another format")
    } else if name.starts_with("events.out.tfevents") || name.ends_with(".log") {
        Some("a training log")
    } else if size > MAX_FILE {
        Some("over 512 MiB")
    } else {
        None
    }
}

/// Lists the companions of `model_dir`, sorted. Hidden entries and `own` (the checkpoint's own
/// weight files, which are what is being merged) are passed over without a word.
pub fn list(model_dir: &Path, own: &[PathBuf]) -> Result<Companions> {
    let mut out = Companions::default();
    walk(model_dir, Path::new(""), 0, own, &mut out)?;
    out.files.sort_by(|a, b| a.rel.cmp(&b.rel));
    out.skipped.sort();
    Ok(out)
}

fn walk(dir: &Path, rel: &Path, depth: usize, own: &[PathBuf], out: &mut Companions) -> Result<()> {
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let (src, r) = (e.path(), rel.join(&name));
        if name.starts_with('.') || own.iter().any(|o| same_file(o, &src)) {
            continue;
        }
        let meta = std::fs::metadata(&src).map_err(|e| Error::io(&src, e))?;
        if meta.is_dir() {
            if depth + 1 >= MAX_DEPTH {
                out.skipped
                    .push(format!("{} (nested too deep)", r.display()));
            } else {
                walk(&src, &r, depth + 1, own, out)?;
            }
        } else if !meta.is_file() {
            continue;
        } else if let Some(why) = why_not(&name, meta.len()) {
            out.skipped.push(format!("{} ({why})", r.display()));
        } else {
            out.files.push(Companion { src, rel: r });
        }
    }
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Copies `c` into `staging` (creating its subfolders) and flushes it; `config.json` gets its
/// dtype set to `dtype` (the written dtype, when the caller asked for one). `shown` is where
/// the user will find it.
pub fn copy(
    c: &Companion,
    staging: &Path,
    shown: &Path,
    dtype: Option<DType>,
    dequantized: bool,
) -> Result<()> {
    let dst = staging.join(&c.rel);
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(shown, e))?;
    }
    std::fs::copy(&c.src, &dst).map_err(|e| Error::io(&c.src, e))?;
    if let (Some(d), true) = (dtype, c.rel == Path::new("config.json")) {
        set_config_dtype(&dst, d, dequantized, shown)?;
    }
    std::fs::File::open(&dst)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(shown, e))
}

/// transformers casts to a config's `torch_dtype` (or `dtype`) on load: it must name what
/// was written. Sub-configs (vision/text towers) carry their own.
fn set_config_dtype(path: &Path, d: DType, dequantized: bool, shown: &Path) -> Result<()> {
    let name = match d {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::F64 => "float64",
        _ => return Ok(()),
    };
    let text = std::fs::read(path).map_err(|e| Error::io(shown, e))?;
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&text) else {
        return Ok(()); // not JSON we understand: copied as it is
    };
    fn visit(v: &mut serde_json::Value, name: &str) -> bool {
        let mut changed = false;
        if let Some(obj) = v.as_object_mut() {
            for (k, x) in obj.iter_mut() {
                if (k == "torch_dtype" || k == "dtype") && x.is_string() {
                    *x = serde_json::Value::String(name.to_owned());
                    changed = true;
                } else {
                    changed |= visit(x, name);
                }
            }
        }
        changed
    }
    let mut changed = visit(&mut v, name);
    if dequantized {
        // The weights are no longer quantized: a loader must not treat them as such.
        changed |= v
            .as_object_mut()
            .and_then(|o| o.shift_remove("quantization_config"))
            .is_some();
    }
    if changed {
        let mut out = serde_json::to_vec_pretty(&v).expect("json");
        out.push(b'\n');
        std::fs::write(path, out).map_err(|e| Error::io(shown, e))?;
    }
    Ok(())
}
