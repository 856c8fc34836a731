//! One writer per output at a time. The lock is a file next to the target, held with `flock`:
//! the kernel drops the lock when its holder dies (SIGKILL included), so a stale lock is taken
//! over by simply locking it, with no guessing from pids. The file also says who holds it
//! (pid, host, target), for the error a second writer gets.
//!
//! Everything a run creates next to the target carries the lock's key in its name, so a later
//! run can tell leftovers of dead runs (their key's lock is free) from work in progress.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// What a lock file says when its holder only removes a dead run's leftovers.
pub const CLEANING: &str = ", removing a dead run's leftovers";

/// Prefix of every entry weightweave creates in an output's parent directory.
pub const PREFIX: &str = ".weightweave-";

/// A stable 64-bit key of the target's file name (FNV-1a): stable across runs and versions,
/// unlike std's hasher, and short, so entry names never approach the 255-byte limit.
pub fn key(name: &OsStr) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in name.as_bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The lock file of `key` in `dir`.
pub fn path(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("{PREFIX}{key}.lock"))
}

/// A held lock; dropping it removes the lock file and releases it.
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
    file: File,
}

fn flock(file: &File, op: libc::c_int) -> std::io::Result<()> {
    // SAFETY: a valid open descriptor; flock has no memory-safety preconditions.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or
    // truncates, and the last byte stays 0.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
    if rc != 0 {
        return "?".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

impl OutputLock {
    /// Takes the lock of `key` in `dir` without waiting. `Ok(Err(holder))`: another live
    /// process holds it (`holder` says who, when it can be read). `role` is appended to what
    /// the lock file says of us; `shown` names the path in errors.
    pub fn try_acquire(
        dir: &Path,
        key: &str,
        role: &str,
        shown: &Path,
    ) -> Result<std::result::Result<OutputLock, String>> {
        let path = path(dir, key);
        loop {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|e| Error::io(shown, e))?;
            if let Err(e) = flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    let mut who = String::new();
                    let _ = file.read_to_string(&mut who);
                    return Ok(Err(who.trim().to_owned()));
                }
                return Err(Error::io(shown, e));
            }
            // The holder we waited out may have removed the file after we opened it: the lock
            // is only ours if it is still the file at `path`.
            let ours = file.metadata().map_err(|e| Error::io(shown, e))?;
            match std::fs::symlink_metadata(&path) {
                Ok(now) if now.ino() == ours.ino() && now.dev() == ours.dev() => {}
                _ => continue,
            }
            let who = format!("pid {} on host {}{role}", std::process::id(), hostname());
            file.set_len(0).map_err(|e| Error::io(shown, e))?;
            file.write_all(who.as_bytes())
                .map_err(|e| Error::io(shown, e))?;
            return Ok(Ok(OutputLock { path, file }));
        }
    }

    /// Takes the lock for the output `shown` (the user's path, for the error), or fails at once
    /// when another run writes that output. A run that holds it only to remove a dead run's
    /// leftovers ([`CLEANING`]) is waited for.
    pub fn acquire(dir: &Path, key: &str, shown: &Path) -> Result<OutputLock> {
        let mut waited = std::time::Duration::ZERO;
        loop {
            match Self::try_acquire(dir, key, "", shown)? {
                Ok(lock) => return Ok(lock),
                Err(holder) if holder.ends_with(CLEANING) && waited.as_secs() < 600 => {
                    let pause = std::time::Duration::from_millis(20);
                    std::thread::sleep(pause);
                    waited += pause;
                }
                Err(holder) => {
                    return Err(Error::Locked {
                        path: shown.to_owned(),
                        holder: if holder.is_empty() {
                            "another process".into()
                        } else {
                            holder
                        },
                        lock: path(dir, key),
                    })
                }
            }
        }
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Unlink while still holding the lock, so a waiter never locks a removed file and
        // believes it owns the lock (it re-checks the inode above).
        let _ = std::fs::remove_file(&self.path);
        let _ = flock(&self.file, libc::LOCK_UN);
    }
}
