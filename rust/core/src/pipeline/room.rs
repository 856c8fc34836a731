//! How much more memory this process may take. It bounds what the one-read pass holds
//! (`speculate.rs`), which runs by default exactly when the inputs do not fit in memory: a
//! fixed budget of 256 MiB got it killed by the OOM killer in a 256 MiB cgroup.
//!
//! Read from `/proc/meminfo` and the process's memory cgroup (v1 or v2) rather than through a
//! system-information crate: what matters here is the limit less the *anonymous* memory
//! charged to the cgroup (page cache is reclaimed on demand, and a cgroup smaller than its
//! inputs is always full of it), which such crates do not report apart.

use std::path::{Path, PathBuf};

/// Bytes of heap this process may still take without making the machine or its memory
/// cgroup reclaim anything but page cache: the smaller of the system's `MemAvailable` and, in
/// a memory cgroup with a limit, that limit less the anonymous memory charged to the group.
/// `None` where neither can be read.
pub(crate) fn room() -> Option<u64> {
    let system = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| mem_available(&s));
    let group = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|s| cgroup_room(&s, Path::new("/sys/fs/cgroup")));
    match (system, group) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `MemAvailable` of a `/proc/meminfo`, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// The room left in the memory cgroup named by `/proc/self/cgroup` (`proc`), its hierarchy
/// mounted under `root`: v1's `memory` controller, else v2's unified group. `None` without a
/// limit or a readable group.
fn cgroup_room(proc: &str, root: &Path) -> Option<u64> {
    let mut v1 = None;
    let mut v2 = None;
    for line in proc.lines() {
        let mut f = line.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        if controllers.split(',').any(|c| c == "memory") {
            v1 = Some(path.trim_start_matches('/').to_owned());
        } else if controllers.is_empty() {
            v2 = Some(path.trim_start_matches('/').to_owned());
        }
    }
    let read = |p: PathBuf| std::fs::read_to_string(p).ok();
    if let Some(rel) = v1 {
        // Inside a cgroup namespace the listed path may not exist under the mount: the
        // mount's root is then the group.
        let dir = [root.join("memory").join(&rel), root.join("memory")]
            .into_iter()
            .find(|d| d.join("memory.stat").exists())?;
        return v1_room(&read(dir.join("memory.stat"))?);
    }
    let rel = v2?;
    let dir = [root.join(&rel), root.to_path_buf()]
        .into_iter()
        .find(|d| d.join("memory.stat").exists())?;
    // The smallest limit on the way up to the mount counts (v2 reports no hierarchical one).
    let mut limit = None::<u64>;
    let mut at = Some(dir.as_path());
    while let Some(d) = at.filter(|d| d.starts_with(root)) {
        if let Some(m) = read(d.join("memory.max")).and_then(|s| v2_max(&s)) {
            limit = Some(limit.map_or(m, |l| l.min(m)));
        }
        at = d.parent();
    }
    let anon = stat_field(&read(dir.join("memory.stat"))?, "anon")?;
    Some(limit?.saturating_sub(anon))
}

/// v1: `hierarchical_memory_limit` (the smallest limit of the group and its ancestors) less
/// `total_rss` (anonymous memory of the group and its children). The "no limit" value is a
/// page-rounded `i64::MAX`: anything above 2^60 counts as none.
fn v1_room(stat: &str) -> Option<u64> {
    let limit = stat_field(stat, "hierarchical_memory_limit")?;
    if limit >= 1 << 60 {
        return None;
    }
    Some(limit.saturating_sub(stat_field(stat, "total_rss").unwrap_or(0)))
}

/// v2 `memory.max`: a byte count, or `max` for none.
fn v2_max(s: &str) -> Option<u64> {
    s.trim().parse().ok()
}

fn stat_field(stat: &str, name: &str) -> Option<u64> {
    stat.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == name).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_available_in_bytes() {
        let m = "MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    8000000 kB\n";
        assert_eq!(mem_available(m), Some(8_000_000 * 1024));
        assert_eq!(mem_available("MemTotal: 5 kB\n"), None);
    }

    #[test]
    fn v1_limit_less_anonymous_memory() {
        let stat = "cache 900\nrss 10\nhierarchical_memory_limit 268435456\ntotal_cache 5000\ntotal_rss 1048576\n";
        assert_eq!(v1_room(stat), Some(268_435_456 - 1_048_576));
        let unlimited = "hierarchical_memory_limit 9223372036854771712\ntotal_rss 5\n";
        assert_eq!(v1_room(unlimited), None);
    }

    #[test]
    fn v2_takes_the_smallest_limit_up_the_tree() {
        let root = std::env::temp_dir().join(format!("ww-room-{}", std::process::id()));
        let leaf = root.join("a/b");
        std::fs::create_dir_all(&leaf).unwrap();
        std::fs::write(root.join("a/memory.max"), "1000000\n").unwrap();
        std::fs::write(leaf.join("memory.max"), "max\n").unwrap();
        std::fs::write(leaf.join("memory.stat"), "anon 250000\nfile 999999999\n").unwrap();
        assert_eq!(cgroup_room("0::/a/b\n", &root), Some(750_000));
        // No limit anywhere: no room to report.
        std::fs::write(root.join("a/memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_room("0::/a/b\n", &root), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn v1_group_found_under_its_controller() {
        let root = std::env::temp_dir().join(format!("ww-room1-{}", std::process::id()));
        let g = root.join("memory/job");
        std::fs::create_dir_all(&g).unwrap();
        let stat = "hierarchical_memory_limit 4096000\ntotal_rss 96000\n";
        std::fs::write(g.join("memory.stat"), stat).unwrap();
        let proc = "12:pids:/\n4:memory:/job\n0::/\n";
        assert_eq!(cgroup_room(proc, &root), Some(4_000_000));
        // A namespaced path that is not under the mount: the mount's root is the group.
        std::fs::write(root.join("memory/memory.stat"), stat).unwrap();
        assert_eq!(cgroup_room("4:memory:/elsewhere\n", &root), Some(4_000_000));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
