//! Files of the base's model directory that belong next to the merged weights (config,
//! tokenizer, generation config, subfolders such as sentence-transformers' `1_Pooling/`).
//! Copied by the kernel (`copy_file_range` through `std::fs::copy`, which keeps the file mode):
//! never read whole into memory. Weights in other formats, training logs and very large files
//! are not copied, and the report says so. `config.json`'s dtype follows the written dtype.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

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

/// One file to copy: its source and its path relative to the output directory (kept as the
/// file system's bytes, never a lossy UTF-8 copy that two names could share).
#[derive(Clone, Debug)]
pub struct Companion {
    pub src: PathBuf,
    pub rel: PathBuf,
    /// Its size when listed: never more is copied (a `/proc` file reports 0 and reads forever).
    pub size: u64,
    /// Its identity when listed (device, inode): the file opened for copying must be it.
    id: (u64, u64),
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

/// Where links in a model directory may point: the directory itself and, for a Hugging Face
/// cache snapshot (`models--org--name/snapshots/REV/`), that repository's `blobs/`. A link
/// anywhere else (`~/.ssh/id_rsa`, `/proc/...`, another model) is never followed: cloned repos
/// and untarred archives carry links, and a companion is uploaded with the model.
struct Confine {
    roots: Vec<PathBuf>,
}

impl Confine {
    fn new(model_dir: &Path) -> Result<Confine> {
        let dir = std::fs::canonicalize(model_dir).map_err(|e| Error::io(model_dir, e))?;
        let mut roots = vec![dir.clone()];
        let mut at = dir.as_path();
        while let Some(parent) = at.parent() {
            if parent.file_name().is_some_and(|n| n == "snapshots") {
                if let Some(repo) = parent.parent() {
                    if let Ok(blobs) = std::fs::canonicalize(repo.join("blobs")) {
                        roots.push(blobs);
                    }
                }
                break;
            }
            at = parent;
        }
        Ok(Confine { roots })
    }

    /// The link's final target when it stays inside; None otherwise (or when it dangles).
    fn resolve(&self, link: &Path) -> Option<PathBuf> {
        let t = std::fs::canonicalize(link).ok()?;
        self.roots.iter().any(|r| t.starts_with(r)).then_some(t)
    }
}

/// Lists the companions of `model_dir`, sorted. Hidden entries and `own` (the checkpoint's own
/// weight files, which are what is being merged) are passed over without a word. Two names
/// that would read the same once shown as text are an error (one would hide the other in the
/// output's manifest and messages).
pub fn list(model_dir: &Path, own: &[PathBuf], cancel: &AtomicBool) -> Result<Companions> {
    let mut out = Companions::default();
    let confine = Confine::new(model_dir)?;
    walk(model_dir, Path::new(""), 0, own, &confine, cancel, &mut out)?;
    out.files.sort_by(|a, b| a.rel.cmp(&b.rel));
    out.skipped.sort();
    let mut seen = std::collections::BTreeMap::new();
    for c in &out.files {
        let shown = c.rel.to_string_lossy().into_owned();
        if let Some(other) = seen.insert(shown, &c.rel) {
            return Err(Error::BadOutput {
                path: model_dir.join(&c.rel),
                reason: format!(
                    "its name reads the same as {:?} (names that are not UTF-8); rename one of them",
                    other.as_os_str()
                ),
            });
        }
    }
    Ok(out)
}

fn walk(
    dir: &Path,
    rel: &Path,
    depth: usize,
    own: &[PathBuf],
    confine: &Confine,
    cancel: &AtomicBool,
    out: &mut Companions,
) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name_os = e.file_name();
        let name = name_os.to_string_lossy().into_owned();
        let (src, r) = (e.path(), rel.join(&name_os));
        if name.starts_with('.') || own.iter().any(|o| same_file(o, &src)) {
            continue;
        }
        let lmeta = std::fs::symlink_metadata(&src).map_err(|e| Error::io(&src, e))?;
        let (src, meta) = if lmeta.file_type().is_symlink() {
            match confine.resolve(&src) {
                Some(t) => {
                    let m = std::fs::metadata(&t).map_err(|e| Error::io(&src, e))?;
                    (t, m)
                }
                None => {
                    out.skipped.push(format!(
                        "{} (a link to outside the model directory)",
                        r.display()
                    ));
                    continue;
                }
            }
        } else {
            (src, lmeta)
        };
        if meta.is_dir() {
            if depth + 1 >= MAX_DEPTH {
                out.skipped
                    .push(format!("{} (nested too deep)", r.display()));
            } else {
                walk(&src, &r, depth + 1, own, confine, cancel, out)?;
            }
        } else if !meta.is_file() {
            out.skipped
                .push(format!("{} (not a regular file)", r.display()));
        } else if let Some(why) = why_not(&name, meta.len()) {
            out.skipped.push(format!("{} ({why})", r.display()));
        } else {
            out.files.push(Companion {
                src,
                rel: r,
                size: meta.len(),
                id: (meta.dev(), meta.ino()),
            });
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

/// Bytes copied between cancellation checks.
const PIECE: u64 = 8 << 20;

/// Copies `c` into `staging` (creating its subfolders) and flushes it; `config.json` gets its
/// dtype set to `dtype` (the written dtype, when the caller asked for one). `shown` is where
/// the user will find it. The source is opened without following a link, without blocking
/// (a FIFO swapped in cannot hang it), must still be the regular file that was listed, and
/// gives exactly the size it had then (by the kernel's `copy_file_range`, in pieces, checking
/// `cancel` between them).
/// What changes in a copied `config.json`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Edits<'a> {
    /// The written dtype, when the caller asked for one.
    pub dtype: Option<DType>,
    /// Scaled FP8 weights written dequantized: the quantization config goes.
    pub dequantized: bool,
    /// Slices: each output layer's source layer.
    pub layers: Option<&'a [usize]>,
    /// A tokenizer built for the output: its vocabulary size.
    pub vocab_size: Option<usize>,
}

/// The files a Hugging Face tokenizer is saved as (transformers' slow and fast tokenizers,
/// sentencepiece models, chat templates).
const TOKENIZER_FILES: [&str; 12] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
];

/// Whether `rel` (relative to the model directory) is one of the model's tokenizer files.
pub fn is_tokenizer_file(rel: &Path) -> bool {
    rel.to_str().is_some_and(|r| TOKENIZER_FILES.contains(&r))
}

pub fn copy(
    c: &Companion,
    staging: &Path,
    shown: &Path,
    edits: Edits,
    cancel: &AtomicBool,
) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let dst = staging.join(&c.rel);
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(shown, e))?;
    }
    let src = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&c.src)
        .map_err(|e| Error::io(&c.src, e))?;
    let meta = src.metadata().map_err(|e| Error::io(&c.src, e))?;
    if !meta.is_file() || (meta.dev(), meta.ino()) != c.id {
        return Err(Error::InputChanged {
            path: c.src.clone(),
            what: "a companion file was replaced".into(),
        });
    }
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(meta.permissions().mode() & 0o777)
        .open(&dst)
        .map_err(|e| Error::io(shown, e))?;
    let mut left = c.size;
    let mut reader = std::io::Read::take(&src, c.size);
    while left > 0 {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        let n = std::io::copy(&mut std::io::Read::take(&mut reader, PIECE), &mut out)
            .map_err(|e| Error::io(&c.src, e))?;
        if n == 0 {
            return Err(Error::InputChanged {
                path: c.src.clone(),
                what: "a companion file became shorter".into(),
            });
        }
        left -= n;
    }
    drop(out);
    if c.rel == Path::new("config.json") {
        edit_config(&dst, edits, shown)?;
    }
    std::fs::File::open(&dst)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(shown, e))
}

/// transformers casts to a config's `torch_dtype` (or `dtype`) on load: it must name what
/// was written. Sub-configs (vision/text towers) carry their own. With slices the layer count
/// (`num_hidden_layers`, in the text config too) and per-layer lists (`layer_types`) follow the
/// layers taken, as mergekit writes them.
fn edit_config(path: &Path, edits: Edits, shown: &Path) -> Result<()> {
    let name = match edits.dtype {
        Some(DType::F32) => "float32",
        Some(DType::F16) => "float16",
        Some(DType::BF16) => "bfloat16",
        Some(DType::F64) => "float64",
        _ => "",
    };
    let dequantized = edits.dequantized;
    if name.is_empty() && edits.layers.is_none() && edits.vocab_size.is_none() {
        return Ok(());
    }
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
    let mut changed = !name.is_empty() && visit(&mut v, name);
    if let Some(map) = edits.layers {
        changed |= set_layers(&mut v, map);
    }
    if let Some(n) = edits.vocab_size {
        changed |= set_vocab_size(&mut v, n);
    }
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

/// `vocab_size` where the config keeps it: at the top, else in its `text_config` (the
/// multimodal configs mergekit names `text_config.vocab_size`).
fn set_vocab_size(v: &mut serde_json::Value, n: usize) -> bool {
    let Some(o) = v.as_object_mut() else {
        return false;
    };
    let at = if o.contains_key("vocab_size") {
        Some(o)
    } else {
        o.get_mut("text_config")
            .and_then(|t| t.as_object_mut())
            .filter(|t| t.contains_key("vocab_size"))
    };
    match at {
        Some(o) => {
            o.insert("vocab_size".into(), serde_json::json!(n));
            true
        }
        None => false,
    }
}

/// The layer count and per-layer lists of a config (and of its `text_config`) for layers taken
/// as `map` says.
fn set_layers(v: &mut serde_json::Value, map: &[usize]) -> bool {
    let mut changed = false;
    if let Some(t) = v.get_mut("text_config") {
        changed |= set_layers(t, map);
    }
    let Some(o) = v.as_object_mut() else {
        return changed;
    };
    for key in ["num_hidden_layers", "n_layer", "num_layers"] {
        if o.get(key).is_some_and(serde_json::Value::is_u64) {
            o.insert(key.to_owned(), serde_json::json!(map.len()));
            changed = true;
        }
    }
    if let Some(list) = o.get("layer_types").and_then(|l| l.as_array()).cloned() {
        if map.iter().all(|&i| i < list.len()) {
            o.insert(
                "layer_types".to_owned(),
                serde_json::Value::Array(map.iter().map(|&i| list[i].clone()).collect()),
            );
            changed = true;
        }
    }
    changed
}
