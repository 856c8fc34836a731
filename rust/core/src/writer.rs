//! Writing safetensors without ever leaving a half-written file: every output goes to a hidden
//! temporary name in the target directory, is fsynced, and is renamed into place only after the
//! whole merge succeeded. Dropping an uncommitted [`FileOutput`] (an error, a cancel, a panic)
//! removes the temporaries. Chunks are written with positioned writes, so workers never contend
//! on a file cursor.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::pipeline::Sink;
use crate::plan::TensorPlan;
use crate::reader::{INDEX_FILE, SINGLE_FILE};

/// Where the output goes.
#[derive(Clone, Debug)]
pub enum Target {
    /// A single `.safetensors` file.
    File(PathBuf),
    /// A model directory: `model.safetensors`, or shards + index; config files copied in.
    Dir {
        dir: PathBuf,
        shard_size: Option<u64>,
    },
}

impl Target {
    /// A path ending in `.safetensors` is a file; anything else a directory.
    pub fn from_path(path: &Path, shard_size: Option<u64>) -> Result<Target> {
        if path.extension().is_some_and(|e| e == "safetensors") {
            if shard_size.is_some() {
                return Err(Error::BadOutput {
                    path: path.to_owned(),
                    reason: "sharded output needs a directory, not a .safetensors file".into(),
                });
            }
            return Ok(Target::File(path.to_owned()));
        }
        if shard_size == Some(0) {
            return Err(Error::param("shard_size", "must be positive"));
        }
        Ok(Target::Dir {
            dir: path.to_owned(),
            shard_size,
        })
    }

    fn dir(&self) -> PathBuf {
        match self {
            Target::File(p) => match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
                _ => PathBuf::from("."),
            },
            Target::Dir { dir, .. } => dir.clone(),
        }
    }
}

struct OutFile {
    name: String,
    header: Vec<u8>,
    size: u64,
}

/// Output files and the position of every tensor within them.
pub struct Layout {
    files: Vec<OutFile>,
    /// Per tensor: (file index, absolute byte offset of its data).
    loc: Vec<(usize, u64)>,
    index: Option<Vec<u8>>,
}

impl Layout {
    pub fn new(
        plan: &[TensorPlan],
        target: &Target,
        metadata: &BTreeMap<String, String>,
    ) -> Layout {
        // Group tensors into shards (in name order, like transformers: a new shard starts when
        // the next tensor would overflow the current one).
        let limit = match target {
            Target::Dir {
                shard_size: Some(s),
                ..
            } => *s,
            _ => u64::MAX,
        };
        let mut groups: Vec<Vec<usize>> = vec![Vec::new()];
        let mut used = 0u64;
        for (i, t) in plan.iter().enumerate() {
            let b = t.out_bytes() as u64;
            if used > 0 && used.saturating_add(b) > limit {
                groups.push(Vec::new());
                used = 0;
            }
            groups.last_mut().expect("non-empty").push(i);
            used += b;
        }
        let n = groups.len();
        let names: Vec<String> = match target {
            Target::File(p) => vec![p
                .file_name()
                .expect("file name")
                .to_string_lossy()
                .into_owned()],
            Target::Dir { .. } if n == 1 => vec![SINGLE_FILE.to_owned()],
            Target::Dir { .. } => (1..=n)
                .map(|k| format!("model-{k:05}-of-{n:05}.safetensors"))
                .collect(),
        };
        let mut loc = vec![(0, 0); plan.len()];
        let mut files = Vec::new();
        let mut weight_map = serde_json::Map::new();
        for (f, (group, name)) in groups.iter().zip(&names).enumerate() {
            let mut header = serde_json::Map::new();
            header.insert(
                "__metadata__".into(),
                serde_json::to_value(metadata).expect("strings"),
            );
            let mut offset = 0u64;
            for &i in group {
                let t = &plan[i];
                let end = offset + t.out_bytes() as u64;
                header.insert(
                    t.name.clone(),
                    serde_json::json!({"dtype": t.out_dtype.name(), "shape": t.shape, "data_offsets": [offset, end]}),
                );
                weight_map.insert(t.name.clone(), name.clone().into());
                offset = end;
            }
            let mut bytes = serde_json::to_vec(&header).expect("json");
            // Pad so tensor data starts 8-byte aligned, as the safetensors library does.
            while bytes.len() % 8 != 0 {
                bytes.push(b' ');
            }
            let data_start = 8 + bytes.len() as u64;
            let mut full = (bytes.len() as u64).to_le_bytes().to_vec();
            full.extend(bytes);
            for &i in group {
                loc[i] = (f, 0);
            }
            let mut off = data_start;
            for &i in group {
                loc[i] = (f, off);
                off += plan[i].out_bytes() as u64;
            }
            files.push(OutFile {
                name: name.clone(),
                header: full,
                size: off,
            });
        }
        let index = (n > 1).then(|| {
            let total: u64 = plan.iter().map(|t| t.out_bytes() as u64).sum();
            let v =
                serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
            serde_json::to_vec_pretty(&v).expect("json")
        });
        Layout { files, loc, index }
    }

    /// Total bytes of all output files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Files in a model directory that belong next to the weights (config, tokenizer, ...).
fn companion_files(model_dir: &Path) -> Result<Vec<PathBuf>> {
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

/// An output being written. Commit to publish; drop to discard.
pub struct FileOutput {
    dir: PathBuf,
    created_dir: bool,
    /// (temporary path, final path, handle)
    files: Vec<(PathBuf, PathBuf, File)>,
    /// Per file: bytes written since writeback was last started.
    unflushed: Vec<AtomicU64>,
    loc: Vec<(usize, u64)>,
    index: Option<Vec<u8>>,
    companions: Vec<PathBuf>,
    committed: bool,
}

fn tmp_name(dir: &Path, name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    dir.join(format!(
        ".{name}.weightweave-{}-{nanos}.tmp",
        std::process::id()
    ))
}

impl FileOutput {
    /// Checks the target against the inputs and creates the temporary files.
    /// `companions_from`: the base's model directory, whose config files are copied alongside.
    pub fn create(
        target: &Target,
        layout: Layout,
        inputs: &[PathBuf],
        companions_from: Option<&Path>,
    ) -> Result<FileOutput> {
        let dir = target.dir();
        let finals: Vec<PathBuf> = layout.files.iter().map(|f| dir.join(&f.name)).collect();
        let companions = match (target, companions_from) {
            (Target::Dir { .. }, Some(d)) => companion_files(d)?,
            _ => Vec::new(),
        };
        let mut all_finals = finals.clone();
        if layout.index.is_some() {
            all_finals.push(dir.join(INDEX_FILE));
        }
        all_finals.extend(
            companions
                .iter()
                .map(|c| dir.join(c.file_name().expect("file"))),
        );
        for out in &all_finals {
            if let Some(input) = inputs.iter().find(|i| same_file(i, out)) {
                return Err(Error::OutputIsInput {
                    out: out.clone(),
                    input: input.clone(),
                });
            }
        }
        if let Target::File(path) = target {
            if !dir.is_dir() {
                return Err(Error::BadOutput {
                    path: path.clone(),
                    reason: "its directory does not exist".into(),
                });
            }
        }
        if let Target::Dir { .. } = target {
            if dir.is_file() {
                return Err(Error::BadOutput {
                    path: dir,
                    reason:
                        "exists and is a file; give a directory, or a path ending in .safetensors"
                            .into(),
                });
            }
            if dir.is_dir() {
                // Weight files we would not replace would make the directory ambiguous to loaders.
                for e in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
                    let p = e.map_err(|e| Error::io(&dir, e))?.path();
                    let name = p
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let weighty = name.ends_with(".safetensors") || name == INDEX_FILE;
                    if weighty && !name.starts_with('.') && !all_finals.contains(&p) {
                        return Err(Error::BadOutput {
                            path: dir,
                            reason: format!("already holds weight file '{name}' that this output would not replace; remove it or choose another directory"),
                        });
                    }
                }
            }
        }
        let created_dir = !dir.exists();
        if created_dir {
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        let mut out = FileOutput {
            dir: dir.clone(),
            created_dir,
            files: Vec::new(),
            unflushed: layout.files.iter().map(|_| AtomicU64::new(0)).collect(),
            loc: layout.loc,
            index: layout.index,
            companions,
            committed: false,
        };
        for (f, fin) in layout.files.iter().zip(finals) {
            let tmp = tmp_name(&dir, &f.name);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(|e| Error::io(&tmp, e))?;
            out.files.push((tmp.clone(), fin, file));
            let file = &out.files.last().expect("pushed").2;
            file.set_len(f.size).map_err(|e| Error::io(&tmp, e))?;
            file.write_all_at(&f.header, 0)
                .map_err(|e| Error::io(&tmp, e))?;
        }
        Ok(out)
    }

    /// Fsyncs and renames everything into place; returns the published paths.
    pub fn commit(mut self) -> Result<Vec<PathBuf>> {
        let mut published = Vec::new();
        for (tmp, _, file) in &self.files {
            file.sync_all().map_err(|e| Error::io(tmp, e))?;
        }
        let mut extra: Vec<(PathBuf, PathBuf)> = Vec::new();
        if let Err(e) = self.write_extras(&mut extra) {
            for (tmp, _) in &extra {
                let _ = std::fs::remove_file(tmp);
            }
            return Err(e);
        }
        // From here on renames only: the weights first, then index and companions.
        self.committed = true;
        let renames = self
            .files
            .iter()
            .map(|(t, f, _)| (t.clone(), f.clone()))
            .chain(extra);
        for (tmp, fin) in renames {
            std::fs::rename(&tmp, &fin).map_err(|e| Error::io(&fin, e))?;
            published.push(fin);
        }
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(published)
    }
}

impl FileOutput {
    /// Writes the index and the companion files to temporaries, recording each in `extra`
    /// (temporary, final) as soon as it exists so a failure can remove it.
    fn write_extras(&self, extra: &mut Vec<(PathBuf, PathBuf)>) -> Result<()> {
        if let Some(index) = &self.index {
            let tmp = tmp_name(&self.dir, INDEX_FILE);
            extra.push((tmp.clone(), self.dir.join(INDEX_FILE)));
            write_synced(&tmp, index)?;
        }
        for c in &self.companions {
            let name = c.file_name().expect("file").to_string_lossy().into_owned();
            let tmp = tmp_name(&self.dir, &name);
            extra.push((tmp.clone(), self.dir.join(&name)));
            let bytes = std::fs::read(c).map_err(|e| Error::io(c, e))?;
            write_synced(&tmp, &bytes)?;
        }
        Ok(())
    }
}

/// Dirty bytes per output file after which the kernel is asked to start writing them out.
const WRITEBACK_EVERY: u64 = 32 << 20;

/// Starts (without waiting for) writeback of the file's dirty pages, so the disk works while the
/// merge computes and the fsync at commit only waits for the tail. Advisory: errors surface at
/// that fsync.
fn start_writeback(file: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor; offset 0 and length 0 mean the whole file.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    f.write_all_at(bytes, 0).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

impl Sink for FileOutput {
    fn write(&self, tensor: usize, offset: usize, data: &[u8]) -> Result<()> {
        let (f, base) = self.loc[tensor];
        let (tmp, _, file) = &self.files[f];
        file.write_all_at(data, base + offset as u64)
            .map_err(|e| Error::io(tmp, e))?;
        let pending = self.unflushed[f].fetch_add(data.len() as u64, Ordering::Relaxed);
        if pending + data.len() as u64 >= WRITEBACK_EVERY {
            self.unflushed[f].store(0, Ordering::Relaxed);
            start_writeback(file);
        }
        Ok(())
    }
}

impl Drop for FileOutput {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for (tmp, _, _) in &self.files {
            let _ = std::fs::remove_file(tmp);
        }
        if self.created_dir {
            // Only succeeds when empty: never removes anything we did not create.
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}
