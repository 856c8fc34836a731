//! Where the output goes, and every check on that place that can be made before any work:
//! the path's shape, what is there now, and whether writing there would touch an input or
//! make a model directory ambiguous to loaders.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::header::MAX_HEADER_LEN;
use crate::reader::{INDEX_FILE, SINGLE_FILE};

/// Metadata key that marks a weightweave output.
pub const VERSION_KEY: &str = "weightweave.version";
/// Metadata key listing every entry of a directory output (what `overwrite` may delete).
pub const FILES_KEY: &str = "weightweave.files";

/// A file system's limit on one name.
const NAME_MAX: usize = 255;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// One `.safetensors` file.
    File,
    /// A model directory: `model.safetensors`, or shards + index; config files copied in.
    Dir { shard_size: Option<u64> },
}

/// The output as asked: a path, its kind, and whether an earlier output may be replaced.
#[derive(Clone, Debug)]
pub struct Target {
    /// As the user gave it: every message names this path.
    pub path: PathBuf,
    pub parent: PathBuf,
    pub name: OsString,
    pub kind: Kind,
    pub overwrite: bool,
    /// The weight files' stem in a directory output: `model`, or the base's own stem
    /// (`diffusion_pytorch_model` for a diffusers component), so its loader finds them.
    pub stem: &'static str,
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::BadOutput {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

impl Target {
    /// A path ending in `.safetensors` is a file; anything else a directory. Checks the path's
    /// shape only; `check_place` looks at what is there.
    pub fn new(path: &Path, shard_size: Option<u64>, overwrite: bool) -> Result<Target> {
        if path.as_os_str().is_empty() {
            return Err(bad(path, "the output path is empty"));
        }
        let Some(name) = path.file_name() else {
            return Err(bad(
                path,
                "the output path must end in a file or directory name",
            ));
        };
        if name.as_bytes().len() > NAME_MAX {
            return Err(bad(
                path,
                format!(
                    "the name is {} bytes, over the {NAME_MAX}-byte limit of file systems",
                    name.as_bytes().len()
                ),
            ));
        }
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let kind = if path.extension().is_some_and(|e| e == "safetensors") {
            if shard_size.is_some() {
                return Err(bad(
                    path,
                    "sharded output needs a directory, not a .safetensors file",
                ));
            }
            Kind::File
        } else {
            if shard_size == Some(0) {
                return Err(Error::param("shard_size", "must be positive"));
            }
            Kind::Dir { shard_size }
        };
        Ok(Target {
            path: path.to_owned(),
            parent,
            name: name.to_owned(),
            kind,
            overwrite,
            stem: "model",
        })
    }

    /// The single weight file of a directory output.
    pub fn single_file(&self) -> String {
        format!("{}.safetensors", self.stem)
    }

    /// The shard index of a sharded directory output.
    pub fn index_file(&self) -> String {
        format!("{}.safetensors.index.json", self.stem)
    }

    pub fn is_dir(&self) -> bool {
        matches!(self.kind, Kind::Dir { .. })
    }

    pub fn shard_size(&self) -> Option<u64> {
        match self.kind {
            Kind::Dir { shard_size } => shard_size,
            Kind::File => None,
        }
    }
}

/// What is at the target now (looked at under the output lock).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    Absent,
    /// An empty directory: replacing it loses nothing.
    EmptyDir,
    /// An earlier weightweave output, to be replaced (`overwrite` was given).
    Previous,
}

#[derive(Deserialize)]
struct MetaOnly {
    #[serde(rename = "__metadata__", default)]
    metadata: Option<BTreeMap<String, String>>,
}

/// The `__metadata__` of a safetensors file, if it is one.
fn file_metadata(path: &Path) -> Option<BTreeMap<String, String>> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER_LEN {
        return None;
    }
    let mut text = vec![0u8; n as usize];
    f.read_exact(&mut text).ok()?;
    serde_json::from_slice::<MetaOnly>(&text).ok()?.metadata
}

#[derive(Deserialize)]
struct IndexOnly {
    weight_map: BTreeMap<String, String>,
}

fn index_shards(index: &Path) -> Option<Vec<String>> {
    let text = std::fs::read(index).ok()?;
    let idx: IndexOnly = serde_json::from_slice(&text).ok()?;
    let mut v: Vec<String> = idx.weight_map.into_values().collect();
    v.sort();
    v.dedup();
    Some(v)
}

/// Looks at the target's place: refuses what may not be replaced, and says what is there.
/// Whether `path` (with metadata `meta`) is mounted on: another device than its parent's, or
/// listed as a mount point by the kernel (a bind mount of the same file system).
fn is_mount_point(path: &Path, meta: &std::fs::Metadata) -> bool {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if std::fs::metadata(parent).is_ok_and(|p| p.dev() != meta.dev()) {
        return true;
    }
    let Ok(full) = std::fs::canonicalize(path) else {
        return false;
    };
    // /proc/self/mountinfo's fifth field is the mount point, with ' ', '\t', '\n' and '\\'
    // escaped as octal.
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = full
        .to_string_lossy()
        .replace('\\', "\\134")
        .replace(' ', "\\040")
        .replace('\t', "\\011")
        .replace('\n', "\\012");
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

pub fn check_place(t: &Target) -> Result<Existing> {
    let meta = match std::fs::symlink_metadata(&t.path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Existing::Absent),
        Err(e) => return Err(Error::io(&t.path, e)),
    };
    if meta.file_type().is_symlink() {
        return Err(if std::fs::metadata(&t.path).is_err() {
            bad(
                &t.path,
                "is a dangling symbolic link; remove it or give another path",
            )
        } else {
            bad(&t.path, "is a symbolic link; give the path it points to")
        });
    }
    if is_mount_point(&t.path, &meta) {
        // Publishing renames a staged copy over the target, which the kernel refuses for a
        // mount point (EBUSY): said now, not after the whole merge.
        return Err(bad(
            &t.path,
            "is a mount point; an output is published by renaming over it, which a mount point refuses: give a path inside it",
        ));
    }
    let again = "pass overwrite=True (--overwrite) to replace an earlier weightweave output";
    match t.kind {
        Kind::File => {
            if meta.is_dir() {
                return Err(bad(
                    &t.path,
                    "is a directory; a .safetensors output is a file",
                ));
            }
            if !meta.is_file() {
                return Err(bad(&t.path, "exists and is not a regular file"));
            }
            if !t.overwrite {
                return Err(bad(&t.path, format!("already exists; {again}")));
            }
            if !file_metadata(&t.path).is_some_and(|m| m.contains_key(VERSION_KEY)) {
                return Err(bad(
                    &t.path,
                    "exists and was not written by weightweave; refusing to replace it",
                ));
            }
            Ok(Existing::Previous)
        }
        Kind::Dir { .. } => {
            if !meta.is_dir() {
                return Err(bad(
                    &t.path,
                    "exists and is not a directory; give a directory, or a path ending in .safetensors",
                ));
            }
            let mut names = Vec::new();
            list_files(&t.path, Path::new(""), &mut names).map_err(|e| Error::io(&t.path, e))?;
            if names.is_empty() && std::fs::read_dir(&t.path).is_ok_and(|mut d| d.next().is_none())
            {
                return Ok(Existing::EmptyDir);
            }
            if !t.overwrite {
                return Err(bad(
                    &t.path,
                    format!("already exists and is not empty; {again}"),
                ));
            }
            let ours = previous_files(&t.path).ok_or_else(|| {
                bad(
                    &t.path,
                    "is not a weightweave output (its weights carry no weightweave metadata); refusing to replace it",
                )
            })?;
            names.sort();
            if let Some(stranger) = names.iter().find(|n| !ours.contains(n)) {
                return Err(bad(
                    &t.path,
                    format!("holds '{stranger}', which weightweave did not write; refusing to delete it (move it away first)"),
                ));
            }
            Ok(Existing::Previous)
        }
    }
}

/// Every entry below `dir` as a relative path: regular files, and anything that is neither a
/// file nor a directory (a link, a FIFO) as itself, so that it counts as a stranger. Empty
/// directories are listed with a trailing '/'.
fn list_files(dir: &Path, rel: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
    let mut empty = true;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        empty = false;
        let r = rel.join(e.file_name());
        let ft = e.file_type()?;
        if ft.is_dir() {
            list_files(&e.path(), &r, out)?;
        } else if ft.is_file() {
            out.push(r.to_string_lossy().into_owned());
        } else {
            out.push(format!("{} (not a regular file)", r.display()));
        }
    }
    if empty && !rel.as_os_str().is_empty() {
        out.push(format!("{}/", rel.display()));
    }
    Ok(())
}

/// The entries an earlier weightweave output directory says it wrote, if it is one.
fn previous_files(dir: &Path) -> Option<Vec<String>> {
    [
        "model",
        crate::reader::DIFFUSERS_STEM,
        crate::reader::OPEN_CLIP_STEM,
    ]
    .iter()
    .find_map(|stem| previous_files_of(dir, stem))
    .or_else(|| previous_files_below(dir))
}

/// An output whose root holds no weights (a diffusers pipeline's): the list every weights file
/// carries, read from a component's, in name order.
fn previous_files_below(dir: &Path) -> Option<Vec<String>> {
    let mut subs: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    subs.sort();
    subs.iter().find_map(|sub| {
        ["model", crate::reader::DIFFUSERS_STEM]
            .iter()
            .find_map(|stem| {
                let meta = file_metadata(&sub.join(format!("{stem}.safetensors")))?;
                meta.get(VERSION_KEY)?;
                serde_json::from_str(meta.get(FILES_KEY)?).ok()
            })
    })
}

fn previous_files_of(dir: &Path, stem: &str) -> Option<Vec<String>> {
    let (single, index_name) = (
        format!("{stem}.safetensors"),
        format!("{stem}.safetensors.index.json"),
    );
    let index = dir.join(&index_name);
    let (weights, shards) = if dir.join(&single).is_file() {
        (dir.join(&single), vec![single])
    } else {
        let shards = index_shards(&index)?;
        (dir.join(shards.first()?), shards)
    };
    let meta = file_metadata(&weights)?;
    meta.get(VERSION_KEY)?;
    match meta.get(FILES_KEY) {
        Some(list) => serde_json::from_str(list).ok(),
        // Outputs of 0.1 carry no list: their weight files and index only.
        None => {
            let mut v = shards;
            v.push(index_name);
            Some(v)
        }
    }
}

fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    a.dev() == b.dev() && a.ino() == b.ino()
}

/// Refuses a target that is, or holds, one of the inputs (replacing a directory would delete
/// it), or a `.safetensors` file that would change which weights a loader picks in its folder.
pub fn check_inputs(t: &Target, inputs: &[PathBuf]) -> Result<()> {
    let target = std::fs::metadata(&t.path).ok();
    for input in inputs {
        let Ok(im) = std::fs::metadata(input) else {
            continue;
        };
        if target.as_ref().is_some_and(|tm| same_file(tm, &im)) {
            return Err(Error::OutputIsInput {
                out: t.path.clone(),
                input: input.clone(),
            });
        }
        if let Some(tm) = target.as_ref().filter(|m| m.is_dir()) {
            // Is the input inside the target directory (at any depth)?
            let mut p = input.parent();
            while let Some(d) = p {
                if std::fs::metadata(if d.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    d
                })
                .is_ok_and(|dm| same_file(tm, &dm))
                {
                    return Err(Error::OutputIsInput {
                        out: t.path.clone(),
                        input: input.clone(),
                    });
                }
                p = d.parent();
            }
        }
    }
    if t.kind == Kind::File {
        let name = t.name.to_string_lossy();
        let index = t.parent.join(INDEX_FILE);
        if index.is_file() {
            if name == SINGLE_FILE {
                return Err(bad(
                    &t.path,
                    format!("{} holds a sharded model ({INDEX_FILE}); a {SINGLE_FILE} next to it would make loaders pick one or the other; write elsewhere", t.parent.display()),
                ));
            }
            if index_shards(&index).is_some_and(|s| s.iter().any(|s| *s == name)) {
                return Err(bad(
                    &t.path,
                    format!(
                        "is a shard of the model in {}; write elsewhere",
                        t.parent.display()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Creates the missing directories above the output; returns them, outermost first, so a
/// failed run can remove exactly those.
pub fn make_parents(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut d = dir.to_owned();
    loop {
        match std::fs::metadata(&d) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => return Err(bad(&d, "is not a directory")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                missing.push(d.clone());
                match d.parent() {
                    Some(p) if !p.as_os_str().is_empty() => d = p.to_owned(),
                    _ => break,
                }
            }
            Err(e) => return Err(Error::io(&d, e)),
        }
    }
    let mut created = Vec::new();
    for d in missing.into_iter().rev() {
        match std::fs::create_dir(&d) {
            Ok(()) => created.push(d),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && d.is_dir() => {}
            Err(e) => {
                remove_created(&created);
                return Err(Error::io(&d, e));
            }
        }
    }
    Ok(created)
}

/// Removes directories [`make_parents`] created, innermost first, if they are still empty.
pub fn remove_created(created: &[PathBuf]) {
    for d in created.iter().rev() {
        let _ = std::fs::remove_dir(d);
    }
}
