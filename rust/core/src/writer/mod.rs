//! Writing the output so that it is never seen half-written, and never mixed with another run's.
//!
//! Under a lock on the target ([`lock`]), every output file is built in a staging area next to
//! the target: a hidden directory holding the shards, index and companion files, or, for a
//! single `.safetensors` output, one hidden temporary file. Chunks land there with positioned
//! writes (workers never contend on a cursor). [`FileOutput::publish`] fsyncs everything,
//! lets the caller check its inputs, and publishes with one rename — an atomic exchange when
//! an earlier output is replaced — so that at any instant the target holds the old output or
//! the new one. Dropping an unpublished output removes all it created; what a killed run
//! leaves behind is removed by the next run in that directory ([`leftovers`]).

mod companions;
pub mod leftovers;
pub mod lock;
mod patch;
mod target;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub use target::{Existing, Kind, Target, FILES_KEY, VERSION_KEY};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::pipeline::Sink;
use crate::plan::TensorPlan;
use crate::reader::SINGLE_FILE;
use companions::Companion;
use lock::OutputLock;

struct OutFile {
    name: String,
    header: Vec<u8>,
    size: u64,
}

/// What the output takes from the base's directory: its companion files (config, tokenizer), and
/// the module directories whose weights are merged (sentence-transformers' `2_Dense/`).
pub struct BaseDir<'a> {
    pub dir: Option<&'a Path>,
    /// (module path, the file its weights are written to).
    pub modules: &'a [(String, String)],
}

/// Output files and the position of every tensor within them.
pub struct Layout {
    files: Vec<OutFile>,
    /// Per tensor: (file index, absolute byte offset of its data).
    loc: Vec<(usize, u64)>,
    index: Option<Vec<u8>>,
    index_name: String,
}

impl Layout {
    /// `modules`: module paths whose tensors (named `path/name`) go to `path/model.safetensors`
    /// (sentence-transformers' module directories), named there without the path.
    pub fn new(
        plan: &[TensorPlan],
        target: &Target,
        metadata: &BTreeMap<String, String>,
        modules: &[(String, String)],
    ) -> Layout {
        let module_of = |name: &str| {
            modules.iter().position(|(m, _)| {
                name.strip_prefix(m.as_str())
                    .is_some_and(|r| r.starts_with('/'))
            })
        };
        // Group the root's tensors into shards (in name order, like transformers: a new shard
        // starts when the next tensor would overflow the current one).
        let limit = target.shard_size().unwrap_or(u64::MAX);
        let mut groups: Vec<Vec<usize>> = vec![Vec::new()];
        let mut in_module: Vec<Vec<usize>> = vec![Vec::new(); modules.len()];
        let mut used = 0u64;
        for (i, t) in plan.iter().enumerate() {
            if let Some(m) = module_of(&t.name) {
                in_module[m].push(i);
                continue;
            }
            let b = t.out_bytes() as u64;
            if used > 0 && used.saturating_add(b) > limit {
                groups.push(Vec::new());
                used = 0;
            }
            groups.last_mut().expect("non-empty").push(i);
            used += b;
        }
        // A pipeline's root holds no weights of its own: no root file then.
        if groups[0].is_empty() && !modules.is_empty() {
            groups.clear();
        }
        let n = groups.len();
        let mut names: Vec<String> = match target.kind {
            Kind::File => vec![target.name.to_string_lossy().into_owned()],
            Kind::Dir { .. } if n == 1 => vec![target.single_file()],
            Kind::Dir { .. } => (1..=n)
                .map(|k| format!("{}-{k:05}-of-{n:05}.safetensors", target.stem))
                .collect(),
        };
        let main_total: u64 = groups
            .iter()
            .flatten()
            .map(|&i| plan[i].out_bytes() as u64)
            .sum();
        for ((m, file), g) in modules.iter().zip(in_module) {
            if !g.is_empty() {
                groups.push(g);
                names.push(format!("{m}/{file}"));
            }
        }
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
                let local = match module_of(&t.name) {
                    Some(m) => t.name[modules[m].0.len() + 1..].to_owned(),
                    None => {
                        weight_map.insert(t.name.clone(), name.clone().into());
                        t.name.clone()
                    }
                };
                header.insert(
                    local,
                    serde_json::json!({"dtype": t.out_dtype.name(), "shape": t.shape, "data_offsets": [offset, end]}),
                );
                offset = end;
            }
            let mut bytes = serde_json::to_vec(&header).expect("json");
            // Pad so tensor data starts 8-byte aligned, as the safetensors library does.
            while !bytes.len().is_multiple_of(8) {
                bytes.push(b' ');
            }
            let data_start = 8 + bytes.len() as u64;
            let mut full = (bytes.len() as u64).to_le_bytes().to_vec();
            full.extend(bytes);
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
            let v = serde_json::json!({"metadata": {"total_size": main_total}, "weight_map": weight_map});
            serde_json::to_vec_pretty(&v).expect("json")
        });
        Layout {
            files,
            loc,
            index,
            index_name: target.index_file(),
        }
    }

    /// Total bytes of all output files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Every file a directory output will hold (relative paths), for its manifest.
    fn entry_names(&self, companions: &[Companion]) -> Vec<String> {
        let mut v: Vec<String> = self.files.iter().map(|f| f.name.clone()).collect();
        if self.index.is_some() {
            v.push(self.index_name.clone());
        }
        v.extend(
            companions
                .iter()
                .map(|c| c.rel.to_string_lossy().into_owned()),
        );
        v.sort();
        v
    }
}

/// A file being written in the staging area.
struct Staged {
    /// Where the user will find it (errors name this, never the staging path).
    shown: PathBuf,
    file: File,
}

/// Test hook: dies like `kill -9` at the named point of the publish, to check that a crash at
/// any instant leaves the old output or the new one.
fn failpoint(name: &str) {
    if std::env::var_os("WEIGHTWEAVE_FAILPOINT").is_some_and(|v| v == name) {
        // SAFETY: sending a signal to ourselves has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

fn nonce() -> String {
    use std::sync::atomic::AtomicU32;
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{:x}{:08x}{:x}",
        std::process::id(),
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Moves `a` to `b` only if nothing is at `b` (Linux `renameat2(RENAME_NOREPLACE)`): a file
/// someone put at the target while the merge ran is not silently replaced. File systems
/// without the flag get a plain rename.
fn rename_new(a: &Path, b: &Path) -> std::io::Result<()> {
    match renameat2(a, b, libc::RENAME_NOREPLACE) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) => {
            std::fs::rename(a, b)
        }
        r => r,
    }
}

/// Swaps two paths atomically (Linux `renameat2(RENAME_EXCHANGE)`).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    renameat2(a, b, libc::RENAME_EXCHANGE)
}

fn renameat2(a: &Path, b: &Path, flags: libc::c_uint) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).expect("no NUL in paths");
    let (ca, cb) = (c(a), c(b));
    // SAFETY: two valid NUL-terminated paths; the syscall only reads them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Per staged file (its path in the staging area, the path the user will see), and per planned
/// tensor (file, byte offset of its data).
pub type Staging = (Vec<(PathBuf, PathBuf)>, Vec<(usize, u64)>);

/// An output being written. [`FileOutput::publish`] to publish; drop to discard.
pub struct FileOutput {
    target: Target,
    existing: Existing,
    lock: Option<OutputLock>,
    created_parents: Vec<PathBuf>,
    /// The staging directory (directory output) or temporary file (file output); `None` until
    /// created.
    staging: Option<PathBuf>,
    files: Vec<Staged>,
    /// Per file: bytes written since writeback was last started.
    unflushed: Vec<AtomicU64>,
    loc: Vec<(usize, u64)>,
    index: Option<Vec<u8>>,
    companions: Vec<Companion>,
    /// Files of the base's directory not copied, with why.
    skipped: Vec<String>,
    /// The dtype `config.json` must name (the `out_dtype` asked for).
    config_dtype: Option<DType>,
    /// With slices: each output layer's source layer (`config.json` gets the new layer count).
    layer_map: Option<Vec<usize>>,
    /// With a tokenizer built for the output: its vocabulary size (`config.json`'s).
    vocab_size: Option<usize>,
    /// Scaled FP8 weights were written dequantized: `config.json` loses its
    /// `quantization_config`.
    dequantized: bool,
    /// The index and companions are in the staging directory.
    extras_staged: bool,
    published: bool,
}

impl FileOutput {
    /// Layers taken by slices: output layer i is source layer `map[i]` (its `config.json` says
    /// how many there are now, and its per-layer lists follow).
    pub fn set_layer_map(&mut self, map: Option<Vec<usize>>) {
        self.layer_map = map;
    }

    /// A tokenizer built for the output: the files of `dir` are written with the output in place
    /// of the base's tokenizer files (none of which stays: a stale `tokenizer.model` beside a new
    /// `tokenizer.json` would give a slow tokenizer another vocabulary), and `config.json`
    /// gets `vocab_size` when given.
    pub fn set_tokenizer(&mut self, dir: &Path, vocab_size: Option<usize>) -> Result<()> {
        if !self.target.is_dir() {
            return Err(Error::param(
                "tokenizer",
                format!(
                    "{}: a tokenizer is written beside the weights; give a directory output",
                    self.target.path.display()
                ),
            ));
        }
        let found = companions::list(dir, &[], &std::sync::atomic::AtomicBool::new(false))?;
        let new: std::collections::BTreeSet<PathBuf> =
            found.files.iter().map(|c| c.rel.clone()).collect();
        self.companions
            .retain(|c| !new.contains(&c.rel) && !companions::is_tokenizer_file(&c.rel));
        self.companions.extend(found.files);
        self.vocab_size = vocab_size;
        Ok(())
    }

    /// Locks the target, checks its place against the inputs, and creates the staging area
    /// with every output file at its final size. `metadata` is recorded in every weight file;
    /// `companions_from` is the base's model directory, whose config files are copied along
    /// (their `config.json` naming `config_dtype` when given).
    pub fn create(
        target: &Target,
        plan: &[TensorPlan],
        metadata: &BTreeMap<String, String>,
        inputs: &[PathBuf],
        from: BaseDir<'_>,
        config_dtype: Option<DType>,
        dequantized: bool,
    ) -> Result<(FileOutput, u64)> {
        let (companions_from, modules) = (from.dir, from.modules);
        let mut out = FileOutput {
            target: target.clone(),
            existing: Existing::Absent,
            lock: None,
            created_parents: Vec::new(),
            staging: None,
            files: Vec::new(),
            unflushed: Vec::new(),
            loc: Vec::new(),
            index: None,
            companions: Vec::new(),
            skipped: Vec::new(),
            config_dtype,
            layer_map: None,
            vocab_size: None,
            dequantized,
            extras_staged: false,
            published: false,
        };
        // From here on, dropping `out` undoes whatever was done.
        out.created_parents = target::make_parents(&target.parent)?;
        let key = lock::key(&target.name);
        out.lock = Some(OutputLock::acquire(&target.parent, &key, &target.path)?);
        leftovers::clean(&target.parent, &key);
        target::check_inputs(target, inputs)?;
        out.existing = target::check_place(target)?;
        if !modules.is_empty() && !target.is_dir() {
            return Err(Error::BadOutput {
                path: target.path.clone(),
                reason: format!(
                    "the model keeps weights in its module directories ({}): write it to a directory",
                    modules.iter().map(|(m, _)| m.as_str()).collect::<Vec<_>>().join(", ")
                ),
            });
        }
        if let (true, Some(d)) = (target.is_dir(), companions_from) {
            let found = companions::list(d, inputs, &AtomicBool::new(false))?;
            out.companions = found.files;
            // A module's weights are merged, not skipped.
            let merged = |s: &String| {
                modules.iter().any(|(m, _)| {
                    [
                        SINGLE_FILE,
                        crate::reader::BIN_FILE,
                        "diffusion_pytorch_model.safetensors",
                        "diffusion_pytorch_model.bin",
                    ]
                    .iter()
                    .any(|w| s.starts_with(&format!("{m}/{w} ")))
                })
            };
            out.skipped = found.skipped.into_iter().filter(|s| !merged(s)).collect();
        }
        let mut metadata = metadata.clone();
        let probe = Layout::new(plan, target, &metadata, modules);
        if target.is_dir() {
            let names = probe.entry_names(&out.companions);
            metadata.insert(
                FILES_KEY.into(),
                serde_json::to_string(&names).expect("json"),
            );
        }
        let layout = Layout::new(plan, target, &metadata, modules);
        if let Some(f) = layout
            .files
            .iter()
            .find(|f| f.header.len() as u64 - 8 > WRITE_HEADER_LIMIT)
        {
            return Err(Error::BadOutput {
                path: target.path.clone(),
                reason: format!(
                    "{}'s header would be {} bytes, more than the {WRITE_HEADER_LIMIT} that safetensors readers open (the base's metadata or tensor names are too large)",
                    f.name,
                    f.header.len() - 8
                ),
            });
        }
        let bytes = layout.bytes();
        out.loc = layout.loc;
        out.index = layout.index;
        out.unflushed = layout.files.iter().map(|_| AtomicU64::new(0)).collect();
        let parent = &target.parent;
        let staging = match target.kind {
            Kind::Dir { .. } => {
                let s = parent.join(format!("{}{key}-{}.staging", lock::PREFIX, nonce()));
                std::fs::create_dir(&s).map_err(|e| Error::io(&target.path, e))?;
                s
            }
            Kind::File => parent.join(format!("{}{key}-{}.tmp", lock::PREFIX, nonce())),
        };
        out.staging = Some(staging.clone());
        for f in &layout.files {
            let (path, shown) = match target.kind {
                Kind::Dir { .. } => (staging.join(&f.name), target.path.join(&f.name)),
                Kind::File => (staging.clone(), target.path.clone()),
            };
            if let (Kind::Dir { .. }, Some(dir)) = (&target.kind, path.parent()) {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(&shown, e))?;
                // a module's
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| Error::io(&shown, e))?;
            file.set_len(f.size).map_err(|e| Error::io(&shown, e))?;
            file.write_all_at(&f.header, 0)
                .map_err(|e| Error::io(&shown, e))?;
            out.files.push(Staged { shown, file });
        }
        Ok((out, bytes))
    }

    /// Makes everything durable, runs `verify` (the inputs are unchanged), and publishes the
    /// output in one step; returns the published paths. Once the output is in place nothing
    /// can fail any more: later steps (fsync of the parent, removal of the replaced output)
    /// are best effort, and what they leave is cleaned by the next run.
    pub fn publish(mut self, verify: &dyn Fn() -> Result<()>) -> Result<Vec<PathBuf>> {
        for s in &self.files {
            s.file.sync_all().map_err(|e| Error::io(&s.shown, e))?;
        }
        let staging = self.staging.clone().expect("created");
        if self.target.is_dir() {
            if !self.extras_staged {
                self.stage_extras(&AtomicBool::new(false))?;
            }
            fsync_dir(&staging).map_err(|e| Error::io(&self.target.path, e))?;
        }
        failpoint("staged");
        verify()?;
        let t = &self.target.path;
        match self.existing {
            Existing::Previous if self.target.is_dir() => {
                exchange(&staging, t).map_err(|e| Error::io(t, e))?;
                self.published = true;
                failpoint("exchanged");
                // The staging name now holds the replaced output.
                let _ = std::fs::remove_dir_all(&staging);
            }
            existing => {
                let moved = if existing == Existing::Absent {
                    rename_new(&staging, t)
                } else {
                    std::fs::rename(&staging, t)
                };
                moved.map_err(|e| match e.raw_os_error() {
                    Some(libc::ENOTEMPTY) | Some(libc::EEXIST) => Error::BadOutput {
                        path: t.clone(),
                        reason:
                            "something was put there while the merge ran; nothing was published"
                                .into(),
                    },
                    _ => Error::io(t, e),
                })?;
                self.published = true;
            }
        }
        failpoint("published");
        let _ = fsync_dir(&self.target.parent);
        Ok(self.outputs())
    }

    fn outputs(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self.files.iter().map(|s| s.shown.clone()).collect();
        if self.index.is_some() {
            v.push(self.target.path.join(self.target.index_file()));
        }
        v.extend(
            self.companions
                .iter()
                .map(|c| self.target.path.join(&c.rel)),
        );
        v
    }

    /// Per output file (its path in the staging area, the path the user will see), and per
    /// planned tensor (file, byte offset of its data): where other processes write (a cluster
    /// merge's units).
    pub fn staged(&self) -> Staging {
        let staging = self.staging.clone().expect("created");
        let files = self
            .files
            .iter()
            .map(|s| match self.target.kind {
                Kind::Dir { .. } => {
                    let rel = s.shown.strip_prefix(&self.target.path).expect("inside");
                    (staging.join(rel), s.shown.clone())
                }
                Kind::File => (staging.clone(), s.shown.clone()),
            })
            .collect();
        (files, self.loc.clone())
    }

    /// Files of the base's directory that were not copied, with why.
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// Writes the index and copies the companion files into the staging directory (a
    /// directory output only). Callers run it with the merge, where Ctrl-C is watched, so the
    /// publish after it only renames: thousands of companions cannot delay an interrupt, and
    /// nothing is copied once one arrived.
    pub fn stage_extras(&mut self, cancel: &AtomicBool) -> Result<()> {
        if !self.target.is_dir() || self.extras_staged {
            return Ok(());
        }
        let staging = self.staging.clone().expect("created");
        let staging = staging.as_path();
        if let Some(index) = &self.index {
            let name = self.target.index_file();
            let shown = self.target.path.join(&name);
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(staging.join(&name))
                .map_err(|e| Error::io(&shown, e))?;
            f.write_all_at(index, 0).map_err(|e| Error::io(&shown, e))?;
            f.sync_all().map_err(|e| Error::io(&shown, e))?;
        }
        let mut dirs = std::collections::BTreeSet::new();
        for c in &self.companions {
            let shown = self.target.path.join(&c.rel);
            companions::copy(
                c,
                staging,
                &shown,
                companions::Edits {
                    dtype: self.config_dtype,
                    dequantized: self.dequantized,
                    layers: self.layer_map.as_deref(),
                    vocab_size: self.vocab_size,
                },
                cancel,
            )?;
            if let Some(parent) = c.rel.parent().filter(|p| !p.as_os_str().is_empty()) {
                dirs.insert(parent.to_owned());
            }
        }
        for d in dirs {
            fsync_dir(&staging.join(&d)).map_err(|e| Error::io(self.target.path.join(&d), e))?;
        }
        self.extras_staged = true;
        Ok(())
    }
}

/// The largest header the `safetensors` library opens (its `MAX_HEADER_SIZE`): an output with
/// a larger one is refused before any work, not written for nobody to read.
pub const WRITE_HEADER_LIMIT: u64 = 100_000_000;

/// Dirty bytes per output file after which the kernel is asked to start writing them out.
const WRITEBACK_EVERY: u64 = 32 << 20;

/// Starts (without waiting for) writeback of the file's dirty pages, so the disk works while the
/// merge computes and the fsync at publish only waits for the tail. Advisory: errors surface at
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

impl FileOutput {
    /// Writes `data` at byte `at` of output file `f`, starting writeback every
    /// [`WRITEBACK_EVERY`] bytes.
    fn write_at(&self, f: usize, at: u64, data: &[u8]) -> Result<()> {
        let s = &self.files[f];
        s.file
            .write_all_at(data, at)
            .map_err(|e| Error::io(&s.shown, e))?;
        let pending = self.unflushed[f].fetch_add(data.len() as u64, Ordering::Relaxed);
        if pending + data.len() as u64 >= WRITEBACK_EVERY {
            self.unflushed[f].store(0, Ordering::Relaxed);
            start_writeback(&s.file);
        }
        Ok(())
    }
}

impl Sink for FileOutput {
    fn write(&self, tensor: usize, offset: usize, data: &[u8]) -> Result<()> {
        let (f, base) = self.loc[tensor];
        self.write_at(f, base + offset as u64, data)
    }

    fn patch(&self, edits: &crate::pipeline::patch::Edits) -> Result<()> {
        self.patch_windows(edits)
    }
}

impl Drop for FileOutput {
    fn drop(&mut self) {
        if !self.published {
            self.files.clear();
            if let Some(s) = &self.staging {
                match self.target.kind {
                    Kind::Dir { .. } => {
                        let _ = std::fs::remove_dir_all(s);
                    }
                    Kind::File => {
                        let _ = std::fs::remove_file(s);
                    }
                }
            }
        }
        // The lock file goes before the directories that may hold it.
        self.lock.take();
        if !self.published {
            target::remove_created(&self.created_parents);
        }
    }
}
