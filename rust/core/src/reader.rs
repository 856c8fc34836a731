//! Opening checkpoints: a safetensors file, a directory with `model.safetensors`, or a sharded
//! `model.safetensors.index.json`. Files are memory-mapped, so a model larger than RAM costs only
//! page cache, and every header is validated before any tensor is touched.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::Deserialize;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::header;
use crate::watch::{self, Fingerprint};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const BIN_FILE: &str = "pytorch_model.bin";
pub const BIN_INDEX_FILE: &str = "pytorch_model.bin.index.json";
/// A diffusers component's weights (UNet, transformer, VAE, ...): the same formats under
/// another stem, found in the same order.
pub const DIFFUSERS_STEM: &str = "diffusion_pytorch_model";
/// An open_clip hub directory's weights (beside `open_clip_config.json`).
pub const OPEN_CLIP_STEM: &str = "open_clip_model";
/// The weight files of a model directory, in the order loaders look for them (transformers',
/// diffusers', open_clip's).
pub const DIR_FILES: [&str; 10] = [
    INDEX_FILE,
    SINGLE_FILE,
    BIN_INDEX_FILE,
    BIN_FILE,
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin.index.json",
    "diffusion_pytorch_model.bin",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
];
/// The configuration files that make a directory a model's (its companions come along).
const CONFIG_FILES: [&str; 2] = ["config.json", "open_clip_config.json"];

/// A borrowed view of one tensor: where its bytes are and which file they came from.
#[derive(Clone, Copy, Debug)]
pub struct TensorRef<'a> {
    pub dtype: DType,
    pub shape: &'a [usize],
    pub data: &'a [u8],
    /// The file (or in-memory label) that holds the tensor, for error messages.
    pub file: &'a str,
    /// Set when the fine-tune is not stored whole (a LoRA adapter): `data` is then empty and
    /// the delta is computed from this.
    pub delta: Option<crate::source::lora::Delta<'a>>,
    /// Set for FP8 codes that carry scales (see [`crate::source::scaled`]).
    pub scale: Option<crate::source::scaled::Scale<'a>>,
}

impl TensorRef<'_> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// What the pipeline sees of one model, whatever it was read from.
#[derive(Clone, Debug, Default)]
pub struct ModelView<'a> {
    pub label: String,
    pub tensors: BTreeMap<String, TensorRef<'a>>,
    /// The whole memory-mapped files the tensors lie in (empty for tensors in memory): the
    /// engine gives the OS access-pattern hints for these (`pipeline::advice`), which only a
    /// file mapping may take.
    pub maps: Vec<&'a [u8]>,
}

pub(crate) struct MappedFile {
    path: PathBuf,
    label: String,
    /// Unregistered before the map goes (fields drop in order).
    guard: Option<watch::Guard>,
    map: Option<Mmap>,
    header: header::Header,
    fingerprint: Fingerprint,
}

/// Opens an input file for reading, refusing anything but a regular file up front (opening
/// a FIFO would block forever; a directory maps as "No such device").
pub fn open_regular(path: &Path) -> Result<(File, std::fs::Metadata)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(Error::header(
            &path.display().to_string(),
            "is a directory, not a file",
        ));
    }
    if !meta.is_file() {
        return Err(Error::header(
            &path.display().to_string(),
            "is not a regular file (a FIFO, socket or device cannot be read as a checkpoint)",
        ));
    }
    Ok((file, meta))
}

pub(crate) fn map_file(path: &Path) -> Result<MappedFile> {
    let label = path.display().to_string();
    let (file, meta) = open_regular(path)?;
    let len = meta.len();
    // SAFETY: the map is read-only. An input modified while mapped changes what we read and
    // is caught by the fingerprint check before publishing; one truncated raises SIGBUS, which
    // `watch` turns into zero pages and an error. A zero-length file cannot be mapped, and
    // fails validation below anyway.
    let map = if len == 0 {
        None
    } else {
        Some(unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?)
    };
    let guard = map
        .as_ref()
        .map(|m| watch::Guard::register(m.as_ptr(), m.len(), path));
    let header = crate::source::parse(&label, path, map.as_deref().unwrap_or(&[]))?;
    Ok(MappedFile {
        path: path.to_owned(),
        label,
        guard,
        map,
        header,
        fingerprint: Fingerprint::of(&meta),
    })
}

/// An opened, validated checkpoint on disk.
pub struct Checkpoint {
    /// The path the user gave.
    pub path: PathBuf,
    /// The directory the model lives in, when the user gave a directory (for config files).
    pub model_dir: Option<PathBuf>,
    /// Set when the checkpoint is a PEFT LoRA adapter directory.
    pub lora: Option<crate::source::lora::Adapter>,
    /// The index file, when the checkpoint is sharded, and its state when read.
    pub index_file: Option<PathBuf>,
    pub(crate) index_fingerprint: Option<Fingerprint>,
    pub(crate) files: Vec<MappedFile>,
    /// tensor name -> file index, for sharded checkpoints (a single file owns every tensor).
    owner: Option<BTreeMap<String, usize>>,
    /// Files whose tensors replace (or add to) the checkpoint's in [`Checkpoint::view`]: the
    /// vocabulary tensors realigned to a tokenizer built for the output (see
    /// [`Checkpoint::overlay`]).
    overlays: Vec<MappedFile>,
    /// The weights of a sentence-transformers model's module directories (`2_Dense/`, as
    /// `modules.json` lists them) or of a diffusers pipeline's components (`unet/`, as
    /// `model_index.json` lists them; the root then holds none), by path: their tensors are
    /// named `path/name` in [`Checkpoint::view`], and written back to `path/<weights file>`.
    pub(crate) modules: Vec<(String, MappedFile)>,
    /// The indexes of sharded module directories (a pipeline's components), as opened.
    pub(crate) module_indexes: Vec<(PathBuf, Fingerprint)>,
}

/// The module paths of a checkpoint's weights outside its root (sentence-transformers).
impl Checkpoint {
    /// Each module directory whose weights are part of the model, with the file its merged
    /// weights are written to (the input's name, safetensors for a `.bin`; one file for a
    /// sharded component, which its loader reads as well as shards).
    pub fn module_paths(&self) -> Vec<(String, String)> {
        let mut seen = std::collections::BTreeSet::new();
        self.modules
            .iter()
            .filter(|(p, _)| seen.insert(p.clone()))
            .map(|(p, f)| {
                let name = f.path.file_name().map(|n| n.to_string_lossy().into_owned());
                let out = match name.as_deref() {
                    Some(n) if n.starts_with(DIFFUSERS_STEM) => {
                        format!("{DIFFUSERS_STEM}.safetensors")
                    }
                    _ => SINGLE_FILE.to_owned(),
                };
                (p.clone(), out)
            })
            .collect()
    }
}

/// A weight file's name as transformers and diffusers save it (variants such as
/// `diffusion_pytorch_model.fp16.safetensors` included): given as a file, it comes with its
/// directory's config files.
pub(crate) fn is_weights_name(n: &str) -> bool {
    DIR_FILES.contains(&n)
        || (n.starts_with(DIFFUSERS_STEM) || n.starts_with("model."))
            && (n.ends_with(".safetensors") || n.ends_with(".safetensors.index.json"))
}

/// Why a directory is not a model: what it lacks, and the variants it holds instead (diffusers'
/// `variant="fp16"` files), which are passed as files.
pub(crate) fn not_a_model(path: &Path, label: &str) -> Error {
    let mut variants: Vec<String> = std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| is_weights_name(n) && !DIR_FILES.contains(&n.as_str()))
        .collect();
    variants.sort();
    let hint = match variants.first() {
        Some(v) => format!("; it holds the variant {v}: pass that file"),
        None => String::new(),
    };
    Error::NotAModel {
        file: label.to_owned(),
        reason: format!(
            "not a model directory: it holds none of {}{hint}",
            DIR_FILES.join(", ")
        ),
    }
}

#[derive(Deserialize)]
struct RawIndex {
    weight_map: BTreeMap<String, String>,
}

/// Parses a shard index (`model.safetensors.index.json`): the tensor → shard map and the
/// distinct shard names, each a plain relative path inside the index's directory.
pub fn parse_index(label: &str, text: &[u8]) -> Result<(BTreeMap<String, String>, Vec<String>)> {
    let raw: RawIndex = serde_json::from_slice(text)
        .map_err(|e| Error::header(label, format!("not a shard index: {e}")))?;
    if raw.weight_map.is_empty() {
        return Err(Error::header(
            label,
            "the index's weight_map lists no tensor",
        ));
    }
    let mut shards: Vec<String> = raw.weight_map.values().cloned().collect();
    shards.sort();
    shards.dedup();
    for name in &shards {
        let rel = Path::new(name);
        let plain = !name.is_empty()
            && !rel.is_absolute()
            && rel
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !plain {
            return Err(Error::header(
                label,
                format!("shard '{name}' is not a file inside the index's directory"),
            ));
        }
    }
    Ok((raw.weight_map, shards))
}

/// Parses `text` as an index and panics if an accepted one names a shard outside its
/// directory. The fuzz target and the corpus replay test call this.
#[doc(hidden)]
pub fn check_index_accepted(text: &[u8]) {
    let Ok((map, shards)) = parse_index("fuzz", text) else {
        return;
    };
    assert!(!map.is_empty() && !shards.is_empty());
    for s in &shards {
        let p = Path::new(s);
        assert!(
            !p.is_absolute()
                && p.components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)))
        );
        assert!(map.values().any(|v| v == s));
    }
}

impl Checkpoint {
    /// Opens a file, a model directory or an index file, validating every header.
    pub fn open(path: impl AsRef<Path>) -> Result<Checkpoint> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            crate::source::layout::open_dir(path)
        } else {
            let mut ck = if path.extension().is_some_and(|e| e == "json") {
                Self::open_index(path, path)?
            } else {
                Self::open_single(path, path)?
            };
            // `model_dir/model.safetensors` (or its index) given as a file still comes with its
            // model directory's config and tokenizer files; a loose file elsewhere does not.
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
                _ => PathBuf::from("."),
            };
            if name.as_deref().is_some_and(is_weights_name)
                && CONFIG_FILES.iter().any(|c| dir.join(c).is_file())
            {
                ck.model_dir = Some(dir);
            }
            ck.lora = ck.diffusion_lora()?;
            Ok(ck)
        }
    }

    /// What the pipeline reads of this checkpoint as a fine-tune of `base`: its own tensors,
    /// or, for a LoRA adapter, every base tensor as a low-rank delta or τ = 0.
    /// `model_type`: the base's architecture (its config.json), which decides how a LoRA ΔW of
    /// a square weight is laid out.
    pub fn tuned_view<'a>(
        &'a self,
        base: &ModelView<'a>,
        model_type: Option<&str>,
    ) -> Result<ModelView<'a>> {
        match &self.lora {
            None => Ok(self.view()),
            Some(a) => crate::source::lora::aligned_view(a, &self.view(), base, model_type),
        }
    }

    /// A single file whose tensors are a diffusion LoRA's (diffusers or kohya-ss names).
    pub(crate) fn diffusion_lora(&self) -> Result<Option<crate::source::lora::Adapter>> {
        use crate::source::lora::{files, Adapter};
        let [file] = self.files.as_slice() else {
            return Ok(None);
        };
        let names: Vec<&str> = file.header.iter().map(|(n, _)| n).collect();
        if !files::detect(names.iter().copied()) {
            return Ok(None);
        }
        let f = files::LoraFile::new(&file.label, &names, &file.header.metadata)?;
        Ok(Some(Adapter::File(f)))
    }

    /// A model made only of module directories (a diffusers pipeline's components).
    pub(crate) fn of_modules(
        dir: &Path,
        modules: Vec<(String, MappedFile)>,
        module_indexes: Vec<(PathBuf, Fingerprint)>,
    ) -> Checkpoint {
        Checkpoint {
            path: dir.to_owned(),
            model_dir: Some(dir.to_owned()),
            lora: None,
            index_file: None,
            index_fingerprint: None,
            files: Vec::new(),
            owner: None,
            overlays: Vec::new(),
            modules,
            module_indexes,
        }
    }

    pub(crate) fn open_single(given: &Path, file: &Path) -> Result<Checkpoint> {
        let mapped = map_file(file)?;
        let owner = None;
        Ok(Checkpoint {
            path: given.to_owned(),
            model_dir: None,
            lora: None,
            index_file: None,
            index_fingerprint: None,
            files: vec![mapped],
            owner,
            overlays: Vec::new(),
            modules: Vec::new(),
            module_indexes: Vec::new(),
        })
    }

    /// Lays the tensors of the safetensors file `path` over this checkpoint's: each replaces the
    /// tensor of its name (or is added). Errors about them name `label` (the user's input and
    /// what was done to it), never the temporary file.
    pub fn overlay(&mut self, path: &Path, label: &str) -> Result<()> {
        let mut f = map_file(path)?;
        f.label = label.to_owned();
        self.overlays.push(f);
        Ok(())
    }

    pub(crate) fn open_index(given: &Path, index: &Path) -> Result<Checkpoint> {
        let label = index.display().to_string();
        let (file, meta) = open_regular(index)?;
        if meta.len() > crate::header::MAX_HEADER_LEN {
            return Err(Error::header(
                &label,
                format!(
                    "index of {} bytes exceeds the {}-byte limit",
                    meta.len(),
                    crate::header::MAX_HEADER_LEN
                ),
            ));
        }
        let mut text = Vec::with_capacity(meta.len() as usize);
        std::io::Read::read_to_end(&mut std::io::BufReader::new(file), &mut text)
            .map_err(|e| Error::io(index, e))?;
        let (raw, shard_names) = parse_index(&label, &text)?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut files = Vec::new();
        let mut file_of = BTreeMap::new();
        for name in shard_names {
            file_of.insert(name.clone(), files.len());
            files.push(map_file(&dir.join(&name))?);
        }
        let mut owner = BTreeMap::new();
        for (tensor, shard) in &raw {
            let i = file_of[shard];
            if !files[i].header.contains(tensor) {
                return Err(Error::tensor(
                    &files[i].label,
                    tensor,
                    format!("listed in {label} but absent from the shard"),
                ));
            }
            owner.insert(tensor.clone(), i);
        }
        for f in &files {
            if let Some((extra, _)) = f.header.iter().find(|(t, _)| !owner.contains_key(*t)) {
                return Err(Error::tensor(
                    &f.label,
                    extra,
                    format!("present in the shard but not listed in {label}"),
                ));
            }
        }
        Ok(Checkpoint {
            path: given.to_owned(),
            model_dir: None,
            lora: None,
            index_file: Some(index.to_owned()),
            index_fingerprint: Some(Fingerprint::of(&meta)),
            files,
            owner: Some(owner),
            overlays: Vec::new(),
            modules: Vec::new(),
            module_indexes: Vec::new(),
        })
    }

    /// Every file this checkpoint reads (shards and index), to keep outputs off them.
    /// The stem of the weight files it was read from: [`DIFFUSERS_STEM`] for a diffusers
    /// component, [`OPEN_CLIP_STEM`] for an open_clip directory (the output directory is named
    /// so that its loader finds it), `model` otherwise.
    pub fn weights_stem(&self) -> &'static str {
        let file = self
            .index_file
            .as_ref()
            .or(self.files.first().map(|f| &f.path));
        let name = file.and_then(|f| f.file_name());
        let name = name.map(|n| n.to_string_lossy()).unwrap_or_default();
        if name.starts_with(DIFFUSERS_STEM) {
            DIFFUSERS_STEM
        } else if name.starts_with("open_clip_") {
            OPEN_CLIP_STEM
        } else {
            "model"
        }
    }

    pub fn input_files(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self
            .files
            .iter()
            .chain(&self.overlays)
            .chain(self.modules.iter().map(|(_, f)| f))
            .map(|f| f.path.clone())
            .collect();
        v.extend(self.index_file.clone());
        v.extend(self.module_indexes.iter().map(|(p, _)| p.clone()));
        v
    }

    /// An error if a read hit a page lost to truncation (see [`watch`]). Call once the reads
    /// are over, before the maps go.
    pub fn check_truncation(&self) -> Result<()> {
        self.files
            .iter()
            .chain(&self.overlays)
            .chain(self.modules.iter().map(|(_, f)| f))
            .filter_map(|f| f.guard.as_ref())
            .try_for_each(|g| g.check())
    }

    /// Every input file with its state when opened, for [`crate::watch::verify`] before
    /// publishing.
    pub fn fingerprints(&self) -> Vec<(PathBuf, Fingerprint)> {
        let mut v: Vec<(PathBuf, Fingerprint)> = self
            .files
            .iter()
            .chain(&self.overlays)
            .chain(self.modules.iter().map(|(_, f)| f))
            .map(|f| (f.path.clone(), f.fingerprint))
            .collect();
        if let (Some(p), Some(fp)) = (&self.index_file, self.index_fingerprint) {
            v.push((p.clone(), fp));
        }
        v.extend(self.module_indexes.iter().cloned());
        v
    }

    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.files
            .iter()
            .flat_map(|f| f.header.iter())
            .map(|(_, e)| (e.end - e.start) as u64)
            .sum()
    }

    /// The `__metadata__` of the (first) file.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        static NONE: BTreeMap<String, String> = BTreeMap::new();
        self.files.first().map_or(&NONE, |f| &f.header.metadata)
    }

    /// Every tensor in name order: (name, the file that holds it, its entry). Borrows the
    /// headers only: no copy of the names (headers may list millions of tensors).
    pub fn entries(&self) -> Box<dyn Iterator<Item = (&str, usize, header::Entry<'_>)> + '_> {
        match &self.owner {
            None if self.files.is_empty() => Box::new(std::iter::empty()),
            None => Box::new(self.files[0].header.iter().map(|(n, e)| (n, 0, e))),
            Some(owner) => Box::new(owner.iter().map(|(name, &i)| {
                let e = self.files[i]
                    .header
                    .get(name)
                    .expect("owned tensors are in their file");
                (name.as_str(), i, e)
            })),
        }
    }

    /// The largest shard's tensor bytes, for a sharded checkpoint.
    pub fn largest_shard_bytes(&self) -> Option<u64> {
        self.owner.as_ref()?;
        self.files
            .iter()
            .map(|f| f.header.iter().map(|(_, e)| (e.end - e.start) as u64).sum())
            .max()
    }

    /// The block of block-wise FP8 scales: the config's `quantization_config.weight_block_size`,
    /// else 128 × 128 (DeepSeek's).
    pub fn fp8_block(&self) -> (usize, usize) {
        let cfg = self.config();
        let size = cfg.as_ref().and_then(|c| {
            let b = c
                .get("quantization_config")?
                .get("weight_block_size")?
                .as_array()?;
            Some((b.first()?.as_u64()? as usize, b.get(1)?.as_u64()? as usize))
        });
        size.filter(|&(a, b)| a > 0 && b > 0).unwrap_or((128, 128))
    }

    /// The model directory's `config.json`, when there is one (at most 16 MiB of it) and it
    /// parses.
    fn config(&self) -> Option<serde_json::Value> {
        use std::io::Read;
        let f = std::fs::File::open(self.model_dir.as_ref()?.join("config.json")).ok()?;
        let mut text = Vec::new();
        f.take(16 << 20).read_to_end(&mut text).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// The architecture its `config.json` names (`model_type`).
    pub fn model_type(&self) -> Option<String> {
        Some(self.config()?.get("model_type")?.as_str()?.to_owned())
    }

    /// How many tensor files the checkpoint has.
    pub fn file_count(&self) -> usize {
        self.files.len()
    }

    /// The label (path) of the checkpoint's `i`-th file.
    pub fn file_label(&self, i: usize) -> &str {
        &self.files[i].label
    }

    /// Asks the OS to start reading a tensor's pages now (a prefetch hint; errors are ignored).
    pub fn will_need(&self, tensor: &str) {
        let i = match &self.owner {
            None => 0,
            Some(o) => match o.get(tensor) {
                Some(&i) => i,
                None => return,
            },
        };
        let f = &self.files[i];
        if let (Some(e), Some(map)) = (f.header.get(tensor), &f.map) {
            let _ = map.advise_range(
                memmap2::Advice::WillNeed,
                f.header.data_start + e.start,
                e.end - e.start,
            );
        }
    }

    /// A view for the pipeline, borrowing the maps.
    pub fn view(&self) -> ModelView<'_> {
        fn tensor_ref<'a>(f: &'a MappedFile, e: header::Entry<'a>) -> TensorRef<'a> {
            let bytes = f.map.as_deref().unwrap_or(&[]);
            TensorRef {
                dtype: e.dtype,
                shape: e.shape,
                data: &bytes[f.header.data_start + e.start..f.header.data_start + e.end],
                file: &f.label,
                delta: None,
                scale: None,
            }
        }
        let mut tensors: BTreeMap<String, TensorRef<'_>> = self
            .entries()
            .map(|(name, i, e)| (name.to_owned(), tensor_ref(&self.files[i], e)))
            .collect();
        for (path, f) in &self.modules {
            for (name, e) in f.header.iter() {
                tensors.insert(format!("{path}/{name}"), tensor_ref(f, e));
            }
        }
        for f in &self.overlays {
            for (name, e) in f.header.iter() {
                tensors.insert(name.to_owned(), tensor_ref(f, e));
            }
        }
        let maps = (self.files.iter())
            .chain(self.modules.iter().map(|(_, f)| f))
            .chain(&self.overlays)
            .filter_map(|f| f.map.as_deref())
            .collect();
        ModelView {
            label: self.path.display().to_string(),
            tensors,
            maps,
        }
    }
}

/// The physical floor of a streaming merge: reads every tensor byte of the checkpoints once,
/// in parallel, summing them as u64 words (the sum keeps the reads from being optimised away).
/// Returns (bytes read, checksum).
pub fn read_floor(paths: &[PathBuf], threads: usize) -> Result<(u64, u64)> {
    use rayon::prelude::*;
    let cks = paths
        .iter()
        .map(Checkpoint::open)
        .collect::<Result<Vec<_>>>()?;
    let views: Vec<ModelView> = cks.iter().map(|c| c.view()).collect();
    let slices: Vec<&[u8]> = views
        .iter()
        .flat_map(|v| v.tensors.values().flat_map(|t| t.data.chunks(1 << 20)))
        .collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .map_err(|e| Error::param("threads", e.to_string()))?;
    let sum = pool.install(|| {
        slices
            .par_iter()
            .map(|s| {
                let words = s.chunks_exact(8);
                let tail: u64 = words.remainder().iter().map(|&b| b as u64).sum();
                words.fold(tail, |acc, w| {
                    acc.wrapping_add(u64::from_le_bytes(w.try_into().expect("8 bytes")))
                })
            })
            .reduce(|| 0, u64::wrapping_add)
    });
    Ok((slices.iter().map(|s| s.len() as u64).sum(), sum))
}
