//! Access-pattern hints to the OS for the memory-mapped inputs. They change no byte of any
//! result, only when pages are read.
//!
//! Why: when the inputs do not fit in memory (the case this tool exists for), every pass reads
//! them from disk through page faults. A fault reads synchronously, so a worker waiting on the
//! disk computes nothing; with two workers both were often waiting. Asking for the pages a
//! worker will need a few chunks from now keeps the disk busy while it computes: task
//! arithmetic went from 2.44 s to 1.70 s on 1 GB of bf16 inputs in a 256 MiB cgroup, TIES from
//! 8.22 s to 4.07 s (`benches/results/cold.md`), with no change on a warm page cache.
//!
//! A sample pass touches 128 bytes every 32 KiB; the kernel's read-around made each touch read
//! 128 KiB, so the sample alone read the whole model from disk. Random-access advice while it
//! runs makes a touch read its own page.

use std::sync::atomic::Ordering;

use super::{room, Engine};
use crate::plan::{Chunk, TensorPlan};
use crate::reader::{ModelView, TensorRef};

/// How far ahead a worker asks for its inputs: about 1 MiB of elements (4 chunks of the
/// default size), at least the next chunk and at most 512 chunks (the sample's short runs).
fn distance(chunks: &[Chunk]) -> usize {
    let longest = chunks.iter().map(|c| c.len).max().unwrap_or(1).max(1);
    ((1usize << 20) / longest).clamp(1, 512)
}

/// Asks the OS to start reading `data[lo..hi]` (any memory: on an anonymous page the hint is
/// a no-op or a swap-in; errors are ignored, as for any hint), in pieces of [`PIECE`].
fn will_need(data: &[u8], lo: usize, hi: usize) {
    if lo >= hi || hi > data.len() {
        return;
    }
    let start = data.as_ptr() as usize + lo;
    let page = start & !(page_size() - 1);
    let end = start + (hi - lo);
    for at in (page..end).step_by(PIECE) {
        // SAFETY: MADV_WILLNEED only schedules reads of pages of this process's mappings; it
        // changes no memory, and the range lies in the pages holding `data[lo..hi]`, a live
        // slice.
        unsafe {
            libc::madvise(
                at as *mut libc::c_void,
                PIECE.min(end - at),
                libc::MADV_WILLNEED,
            );
        }
    }
}

/// The most one MADV_WILLNEED asks for. The kernel reads at most its read-ahead window of a
/// larger range (`read_ahead_kb`: 128 KiB by default) and drops the rest, so a tensor asked
/// for in one call was read only in its first 128 KiB (8 MiB on the bench machine).
const PIECE: usize = 128 << 10;

/// Asks the OS to start reading tensor `t` of the base and of every model, whole (a batch of
/// tensors about to be merged: `batches.rs`).
pub(super) fn will_need_tensor(
    base: &ModelView,
    models: &[ModelView],
    plan: &[TensorPlan],
    t: usize,
) {
    let name = super::source(plan, &plan[t]);
    for v in std::iter::once(base).chain(models) {
        if let Some(r) = v.tensors.get(name) {
            will_need(r.data, 0, r.data.len());
        }
    }
}

/// Marks the pages of tensor `t` of the base and of every model that this process maps as the
/// first to reclaim (MADV_COLD: no byte changes, the pages stay cached until memory is short).
/// A batch done with (`batches.rs`) was touched twice and sits on the active list, ahead of the
/// next batch's pages, read ahead and touched once: TIES at scope=tensor, 0.5 B bf16 in a 1 GiB
/// cgroup, took 5.18-5.41 s with this against 5.42-5.52 s without (alternated runs).
pub(super) fn cold_tensor(base: &ModelView, models: &[ModelView], plan: &[TensorPlan], t: usize) {
    let name = super::source(plan, &plan[t]);
    for v in std::iter::once(base).chain(models) {
        if let Some(r) = v.tensors.get(name) {
            let start = r.data.as_ptr() as usize;
            let page = start & !(page_size() - 1);
            let end = start + r.data.len();
            if r.data.is_empty() {
                continue;
            }
            // SAFETY: MADV_COLD only moves this process's pages of a live slice to the
            // inactive list; it changes no memory.
            unsafe {
                libc::madvise(page as *mut libc::c_void, end - page, libc::MADV_COLD);
            }
        }
    }
}

/// Unmaps the whole pages of `data[lo..hi]` from this process: they stay in the page cache,
/// and a later touch maps them again from it. Only for memory in a read-only file mapping
/// (`map`): on anonymous memory MADV_DONTNEED would zero it.
fn unmap_pages(map: &[u8], data: &[u8], lo: usize, hi: usize) {
    let (m0, m1) = (map.as_ptr() as usize, map.as_ptr() as usize + map.len());
    let start = data.as_ptr() as usize;
    if lo >= hi || hi > data.len() || start < m0 || start + hi > m1 {
        return;
    }
    let page = page_size();
    let first = (start + lo).next_multiple_of(page);
    let last = (start + hi) & !(page - 1);
    if first < last {
        // SAFETY: [first, last) is whole pages of a live read-only shared file mapping
        // (checked above); unmapping them changes no byte a later read sees, it only makes
        // that read fault the page in again from the page cache.
        unsafe {
            libc::madvise(
                first as *mut libc::c_void,
                last - first,
                libc::MADV_DONTNEED,
            );
        }
    }
}

/// The elements a worker's run of read chunks reaches before it is released
/// ([`Engine::release_after`]): 8 chunks of the default size (4 MiB of each bf16 input).
const RELEASE_RUN: usize = 1 << 21;

/// A worker that read chunk `c` with `run` (consecutive chunks of one tensor) not yet
/// released: what to release now, and the run left. `c` extends the run where it follows it
/// in the same tensor; otherwise the run is released and `c` starts the next. A run of at
/// least `most` elements is released at once.
fn after_read(run: Option<Chunk>, c: &Chunk, most: usize) -> ([Option<Chunk>; 2], Option<Chunk>) {
    let (done, run) = match run {
        Some(r) if r.tensor == c.tensor && r.start + r.len == c.start => (
            None,
            Chunk {
                len: r.len + c.len,
                ..r
            },
        ),
        other => (other, *c),
    };
    match run.len >= most {
        true => ([done, Some(run)], None),
        false => ([done, None], Some(run)),
    }
}

/// Pages of one mapped file that [`resident`] asks about, spread evenly over it.
const PROBES: usize = 256;

/// Whether a mapped file is in the page cache, judged from [`PROBES`] of its pages (`mincore`
/// one page at a time; false when it cannot tell, so that the hints are given). Asking about
/// every page cost more than the hints it saved: `mincore` looks each page this process has
/// not touched yet up in the page cache, 0.07 s for 4 GB, and a per-tensor statistic runs a
/// pass per tensor (TIES in mergekit's semantics on 0.5 B parameters: 17 % of its CPU time).
fn resident(map: &[u8]) -> bool {
    let page = page_size();
    let start = map.as_ptr() as usize;
    if map.is_empty() || !start.is_multiple_of(page) {
        return true;
    }
    let pages = map.len().div_ceil(page);
    let step = pages.div_ceil(PROBES).max(1);
    (0..pages).step_by(step).all(|p| {
        let mut v = 0u8;
        // SAFETY: page `p` lies in a whole live file mapping, and `v` holds its one byte.
        let rc = unsafe {
            libc::mincore(
                (start + p * page) as *mut libc::c_void,
                page,
                &mut v as *mut u8 as *mut _,
            )
        };
        rc == 0 && v & 1 == 1
    })
}

/// Whether some page of the inputs' mapped files is not in memory ([`resident`]): a pass
/// then reads from disk. Inputs held in memory (no file mapping) never are.
pub(super) fn from_disk(base: &ModelView, models: &[ModelView]) -> bool {
    let maps = base.maps.iter().chain(models.iter().flat_map(|m| &m.maps));
    !maps.into_iter().all(|m| resident(m))
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 && (p as usize).is_power_of_two() {
        p as usize
    } else {
        4096
    }
}

impl<'a> Engine<'a> {
    /// How far ahead a pass over `chunks` asks for its inputs; 0 (no hints) when the mapped
    /// inputs are in memory already ([`resident`]): a hint then finds nothing to read, and the
    /// page-cache lookups it makes cost about 7 % of a warm task arithmetic's CPU time.
    pub(super) fn read_ahead(&self, chunks: &[Chunk]) -> usize {
        match self.on_disk() {
            true => distance(chunks),
            false => 0,
        }
    }

    /// Whether some page of the mapped inputs is not in memory ([`resident`]): a pass reads
    /// from disk. Once every input has been found in memory, later passes take them as still
    /// there without asking: per-tensor statistics run a pass per tensor, and the probes at
    /// each (256 `mincore` calls per file, on one thread while the others wait) were 2 % of a
    /// warm TIES at scope=tensor's CPU time (`perf`, 0.5 B bf16). Pages evicted after that
    /// only lose the read-ahead hints; the hints change no byte.
    pub(super) fn on_disk(&self) -> bool {
        if self.in_memory.load(Ordering::Relaxed) {
            return false;
        }
        let all = self.maps.iter().all(|m| resident(m));
        self.in_memory.store(all, Ordering::Relaxed);
        !all
    }

    /// Starts reading chunk `c` of the base and of every model (its byte range in each: the
    /// chunk's share of the tensor's bytes, whatever the dtype).
    pub(super) fn prefetch(&self, c: &Chunk) {
        self.inputs_of(c).for_each(|r| self.prefetch_one(r, c));
    }

    /// Chunk `c`'s tensor in the base and in every model.
    fn inputs_of(&self, c: &Chunk) -> impl Iterator<Item = &TensorRef<'a>> {
        let t = c.tensor;
        let models = self.model_refs.iter().map(move |refs| &refs[t]);
        std::iter::once(&self.base_refs[t]).chain(models)
    }

    /// As [`Engine::prefetch`], of the base alone (the tensors copied from it).
    pub(super) fn prefetch_base(&self, c: &Chunk) {
        self.prefetch_one(&self.base_refs[c.tensor], c);
    }

    fn prefetch_one(&self, r: &TensorRef, c: &Chunk) {
        let (lo, hi) = self.bytes_of(r, c);
        will_need(r.data, lo, hi);
    }

    /// Chunk `c`'s byte range in `r`: its share of the tensor's bytes, whatever the dtype.
    fn bytes_of(&self, r: &TensorRef, c: &Chunk) -> (usize, usize) {
        let numel = self.plan[c.tensor].numel.max(1) as u128;
        let len = r.data.len() as u128;
        let lo = (len * c.start as u128 / numel) as usize;
        let hi = (len * (c.start + c.len) as u128 / numel).min(len) as usize;
        (lo, hi)
    }

    /// Whether a pass over `chunks` reading `ahead` chunks ahead ([`Engine::read_ahead`]: 0
    /// when the inputs are in memory) unmaps what it has read ([`Engine::release_base`]): where
    /// it reads from disk and its chunks' tensors (in every input) are more than the memory
    /// this process may take (including the page cache it may reclaim: [`room::room`]), so
    /// that they cannot stay cached. A batch of tensors that fits (`batches.rs`) keeps its
    /// pages mapped for its next pass. Tests set WEIGHTWEAVE_RELEASE=1 to release in every
    /// pass (the inputs of a test are cached).
    pub(super) fn releases(&self, ahead: usize, chunks: &[Chunk]) -> bool {
        if std::env::var_os("WEIGHTWEAVE_RELEASE").is_some_and(|v| v == "1") {
            return true;
        }
        if ahead == 0 {
            return false;
        }
        let mut seen = vec![false; self.plan.len()];
        let mut bytes = 0u64;
        for c in chunks {
            if !std::mem::replace(&mut seen[c.tensor], true) {
                bytes += self.inputs_of(c).map(|r| r.data.len() as u64).sum::<u64>();
            }
        }
        room::room().is_some_and(|r| bytes > r)
    }

    /// Releases chunk `c` ([`Engine::release`]) with the chunks the worker read just before
    /// it, in runs ([`after_read`]); the pass releases what is left of a worker's run at its
    /// end. Why: each release flushes the other cores' TLBs (an inter-processor interrupt, a
    /// VM exit on a virtual machine); one per chunk and input was about 5 % of a cold PCB's
    /// CPU time (`perf`, 0.5 B bf16 in a 1 GiB cgroup), and the kernel's system time of that
    /// run fell from 5.5-5.7 s to 3.8-4.1 s with runs.
    pub(super) fn release_after(&self, w: &mut super::Work, c: &Chunk) {
        let (now, left) = after_read(w.unreleased.take(), c, RELEASE_RUN);
        now.iter().flatten().for_each(|r| self.release(r));
        w.unreleased = left;
    }

    /// Unmaps the pages a pass is done with: chunk `c` of the base and of every model (see
    /// [`Engine::release_base`]).
    pub(super) fn release(&self, c: &Chunk) {
        self.inputs_of(c).for_each(|r| self.release_one(r, c));
    }

    /// Unmaps the whole pages of chunk `c` of the base from this process, where the inputs
    /// do not fit in memory ([`Engine::releases`]). Why: the kernel then evicts the pages
    /// a pass has read to make room for the next, and a page still mapped must first be
    /// unmapped, found through its reverse map and flushed from every core's TLB one batch of
    /// reclaim at a time: `perf` of a task arithmetic in a 256 MiB cgroup (0.1 B bf16, 1 GB of
    /// inputs) showed 1.03 s of system time against 0.37 s of user time, most of it in that
    /// reclaim. Pages unmapped here in whole chunks are evicted cheaply; they stay cached, so
    /// a later pass that still finds them only maps them again.
    pub(super) fn release_base(&self, c: &Chunk) {
        self.release_one(&self.base_refs[c.tensor], c);
    }

    fn release_one(&self, r: &TensorRef, c: &Chunk) {
        let (lo, hi) = self.bytes_of(r, c);
        // The map that holds the tensor, if any (`maps` is sorted by address).
        let start = r.data.as_ptr() as usize;
        let i = self.maps.partition_point(|m| m.as_ptr() as usize <= start);
        if let Some(map) = i.checked_sub(1).map(|i| self.maps[i]) {
            unmap_pages(map, r.data, lo, hi);
        }
    }

    /// Runs `f` with the input files advised for random access, then back to normal.
    pub(crate) fn random_access<R>(&self, f: impl FnOnce() -> R) -> R {
        self.advise_maps(libc::MADV_RANDOM);
        let r = f();
        self.advise_maps(libc::MADV_NORMAL);
        r
    }

    /// One piece of advice for every whole mapped input file (never for memory that is not a
    /// file mapping: `ModelView::maps` holds only those).
    fn advise_maps(&self, advice: libc::c_int) {
        let page = page_size();
        for m in &self.maps {
            let start = m.as_ptr() as usize;
            if m.is_empty() || !start.is_multiple_of(page) {
                continue;
            }
            // SAFETY: the range is a whole live read-only file mapping; RANDOM and NORMAL
            // only change its read-ahead.
            unsafe {
                libc::madvise(start as *mut libc::c_void, m.len(), advice);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn about_a_mebibyte_ahead() {
        let c = |len| Chunk {
            tensor: 0,
            start: 0,
            len,
        };
        assert_eq!(distance(&[c(1 << 18), c(5)]), 4);
        assert_eq!(distance(&[c(64)]), 512);
        assert_eq!(distance(&[c(1 << 24)]), 1);
        assert_eq!(distance(&[]), 512);
    }

    #[test]
    fn a_file_read_in_full_is_resident() {
        use std::io::Write;
        let dir = std::env::temp_dir().join(format!("ww-advice-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&vec![7u8; 3 * page_size() + 5])
            .unwrap();
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: a read-only map of a file this test owns.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        assert!(map.iter().all(|&b| b == 7)); // touched: every page in memory
        assert!(resident(&map));
        assert!(resident(&[]));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_never_read_is_not_resident() {
        // A sparse file: no page of it has been read or written, so none is in the page cache.
        let dir = std::env::temp_dir().join(format!("ww-advice-sparse-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len((3 * PROBES * page_size()) as u64).unwrap();
        drop(f);
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: a read-only map of a file this test owns.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        assert!(!resident(&map));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Kilobytes of `map` this process has mapped in (its VMA's `Rss` in /proc/self/smaps).
    fn rss_kb(map: &[u8]) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{:x}-", map.as_ptr() as usize);
        let vma = smaps.split_once(&start).expect("the map's VMA").1;
        let line = vma.lines().find(|l| l.starts_with("Rss:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn released_pages_are_unmapped_and_read_the_same() {
        use std::io::Write;
        let page = page_size();
        let dir = std::env::temp_dir().join(format!("ww-advice-release-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let bytes: Vec<u8> = (0..16 * page).map(|i| (i % 251) as u8).collect();
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&bytes)
            .unwrap();
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: a read-only map of a file this test owns.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        assert_eq!(&map[..], &bytes[..]); // every page mapped in
        let before = rss_kb(&map);
        // A "tensor" from byte 100 on; its bytes 3 pages in to 11 pages in less one byte
        // hold 7 whole pages (the partial ones at each end stay mapped).
        let data = &map[100..];
        unmap_pages(&map, data, 3 * page - 100, 11 * page - 101);
        assert_eq!(before - rss_kb(&map), 7 * page as u64 / 1024);
        assert_eq!(&map[..], &bytes[..]);
        // Memory outside the map (a tensor held in memory) is left alone: MADV_DONTNEED
        // would zero it.
        let heap = vec![9u8; 8 * page];
        unmap_pages(&map, &heap, 0, heap.len());
        assert!(heap.iter().all(|&b| b == 9));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn read_chunks_are_released_in_runs_of_one_tensor() {
        let c = |tensor, start, len| Chunk { tensor, start, len };
        // Consecutive chunks of one tensor grow the run; nothing is released yet.
        let (now, run) = after_read(Some(c(1, 0, 4)), &c(1, 4, 4), 10);
        assert_eq!((now, run), ([None, None], Some(c(1, 0, 8))));
        // Reaching the limit releases the whole run.
        let (now, run) = after_read(run, &c(1, 8, 4), 10);
        assert_eq!((now, run), ([None, Some(c(1, 0, 12))], None));
        // A gap, another tensor or nothing before: the old run goes, the chunk starts anew.
        let (now, run) = after_read(Some(c(1, 0, 4)), &c(1, 5, 4), 10);
        assert_eq!((now, run), ([Some(c(1, 0, 4)), None], Some(c(1, 5, 4))));
        let (now, run) = after_read(Some(c(1, 0, 4)), &c(2, 4, 4), 10);
        assert_eq!((now, run), ([Some(c(1, 0, 4)), None], Some(c(2, 4, 4))));
        assert_eq!(
            after_read(None, &c(0, 0, 3), 10),
            ([None, None], Some(c(0, 0, 3)))
        );
        // A chunk as long as the limit after another tensor's run: both go now.
        let (now, run) = after_read(Some(c(0, 0, 3)), &c(1, 0, 10), 10);
        assert_eq!((now, run), ([Some(c(0, 0, 3)), Some(c(1, 0, 10))], None));
    }

    #[test]
    fn hints_outside_the_slice_are_not_given() {
        // Out-of-range or empty requests return before any system call.
        let v = vec![1u8; 10_000];
        will_need(&v, 5, 5);
        will_need(&v, 0, 10_001);
        will_need(&v, 100, 9_000);
        assert!(v.iter().all(|&b| b == 1));
    }
}
