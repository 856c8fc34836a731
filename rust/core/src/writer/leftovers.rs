//! Cleaning up after runs that died (SIGKILL, power loss) before they could clean up after
//! themselves. Entries are recognised by name, and removed only when the lock of the key in
//! their name is free: a live run holds its key's lock for as long as its entries exist.

use std::collections::BTreeMap;
use std::path::Path;

use super::lock::{OutputLock, CLEANING, PREFIX};

/// What a name in an output's parent directory is to us.
enum Entry<'a> {
    /// A staging directory or temporary file of the run that holds `key`'s lock.
    Work {
        key: &'a str,
    },
    /// A lock file.
    Lock {
        key: &'a str,
    },
    /// A temporary of weightweave 0.1, named after its writer's pid.
    Legacy {
        pid: i32,
    },
    Other,
}

fn classify(name: &str) -> Entry<'_> {
    if let Some(rest) = name.strip_prefix(PREFIX) {
        let hex16 = |s: &str| s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit());
        if let Some(key) = rest.strip_suffix(".lock") {
            if hex16(key) {
                return Entry::Lock { key };
            }
        }
        let body = rest
            .strip_suffix(".staging")
            .or_else(|| rest.strip_suffix(".tmp"));
        if let Some((key, nonce)) = body.and_then(|b| b.split_once('-')) {
            if hex16(key) && !nonce.is_empty() && nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Entry::Work { key };
            }
        }
        return Entry::Other;
    }
    // 0.1: ".NAME.weightweave-PID-NANOS.tmp"
    if let Some(body) = name.strip_suffix(".tmp") {
        if let Some((_, tail)) = body.rsplit_once(".weightweave-") {
            if let Some((pid, nanos)) = tail.split_once('-') {
                if let (Ok(pid), true) = (pid.parse(), nanos.bytes().all(|b| b.is_ascii_digit())) {
                    if name.starts_with('.') {
                        return Entry::Legacy { pid };
                    }
                }
            }
        }
    }
    Entry::Other
}

fn pid_is_dead(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid > 0
        && unsafe { libc::kill(pid, 0) } != 0
        && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

fn remove(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(path);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
}

/// Removes leftovers of dead runs from `dir`. `own_key`'s lock is held by the caller, so
/// everything under that key is dead. Best effort: what cannot be removed now is left for
/// the next run.
pub fn clean(dir: &Path, own_key: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut by_key: BTreeMap<String, Vec<std::path::PathBuf>> = BTreeMap::new();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        match classify(name) {
            Entry::Work { key } => by_key.entry(key.to_owned()).or_default().push(e.path()),
            Entry::Lock { key } => {
                by_key.entry(key.to_owned()).or_default();
            }
            Entry::Legacy { pid } if pid_is_dead(pid) => remove(&e.path()),
            _ => {}
        }
    }
    for (key, paths) in by_key {
        if key == own_key {
            paths.iter().for_each(|p| remove(p));
            continue;
        }
        // Free lock: nobody works under this key. Dropping the lock removes its stale file.
        if let Ok(Ok(_held)) = OutputLock::try_acquire(dir, &key, CLEANING, dir) {
            paths.iter().for_each(|p| remove(p));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(matches!(
            classify(".weightweave-0123456789abcdef-1f.staging"),
            Entry::Work {
                key: "0123456789abcdef"
            }
        ));
        assert!(matches!(
            classify(".weightweave-0123456789abcdef-2.tmp"),
            Entry::Work { .. }
        ));
        assert!(matches!(
            classify(".weightweave-0123456789abcdef.lock"),
            Entry::Lock { .. }
        ));
        assert!(matches!(
            classify(".out.safetensors.weightweave-123-456.tmp"),
            Entry::Legacy { pid: 123 }
        ));
        for other in [
            "model.safetensors",
            ".weightweave-xyz.lock",
            ".weightweave-0123456789abcdef-.tmp",
            ".weightweave-0123456789abcdef-1.staging.bak",
            "a.weightweave-1-2.tmp",
        ] {
            assert!(matches!(classify(other), Entry::Other), "{other}");
        }
    }
}
