//! Inputs that change under a running merge. Two defences:
//!
//! * Every input file's identity and state — (device, inode, size, mtime, ctime) — is recorded
//!   when it is opened and compared just before the output is published: a file replaced,
//!   rewritten in place or truncated while the merge ran is an error, and nothing is published.
//! * A file truncated under its memory map makes the next read of a lost page raise SIGBUS,
//!   which would kill the process (a whole notebook kernel). A process-wide SIGBUS handler
//!   recognises faults inside our input maps, maps a page of zeros over the faulting page so
//!   the read completes, and marks the map; the run then fails at the check above. Faults
//!   anywhere else go to the handler that was there before (or kill the process as usual).
//!
//! The handler costs nothing on the hot path: reads stay plain memory reads of the maps.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};

use crate::error::{Error, Result};

/// What identifies a file and its contents' version, short of reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fingerprint {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Fingerprint {
    pub fn of(m: &std::fs::Metadata) -> Fingerprint {
        Fingerprint {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// What another machine sees of the same file on a shared file system (device and inode
    /// numbers are per mount): size and modification time.
    pub fn shared(&self) -> (u64, i64, i64) {
        (self.size, self.mtime.0, self.mtime.1)
    }

    /// What differs from `now`, in words, or `None` when nothing does.
    fn change(&self, now: &Fingerprint) -> Option<String> {
        if (self.dev, self.ino) != (now.dev, now.ino) {
            Some("it was replaced by another file".into())
        } else if self.size != now.size {
            Some(format!(
                "its size went from {} to {} bytes",
                self.size, now.size
            ))
        } else if (self.mtime, self.ctime) != (now.mtime, now.ctime) {
            Some("it was modified".into())
        } else {
            None
        }
    }
}

/// Checks that `path` still matches `fp`.
pub fn verify(path: &Path, fp: &Fingerprint) -> Result<()> {
    let why = match std::fs::metadata(path) {
        Ok(m) => fp.change(&Fingerprint::of(&m)),
        Err(e) => Some(format!("it can no longer be read ({e})")),
    };
    match why {
        Some(what) => Err(Error::InputChanged {
            path: path.to_owned(),
            what,
        }),
        None => Ok(()),
    }
}

/// A registered input map. Slots are claimed and released with atomics only: the signal
/// handler must not lock or allocate.
struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    hit: AtomicBool,
}

const SLOTS: usize = 8192;

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    hit: AtomicBool::new(false),
};
static REGISTRY: [Slot; SLOTS] = [FREE; SLOTS];
static PAGE: AtomicUsize = AtomicUsize::new(4096);
/// The handler we replaced (leaked, so the signal handler may read it at any time).
static PREVIOUS: AtomicPtr<libc::sigaction> = AtomicPtr::new(std::ptr::null_mut());

/// A map watched for SIGBUS; unregistered on drop.
#[derive(Debug)]
pub struct Guard {
    slot: Option<usize>,
    path: PathBuf,
}

impl Guard {
    /// Watches `len` bytes at `start` (a map of `path`). When every slot is taken (thousands of
    /// open files), the map is simply not watched: the fingerprint check still catches changes.
    pub fn register(start: *const u8, len: usize, path: &Path) -> Guard {
        install();
        let slot = REGISTRY.iter().position(|s| {
            s.len
                .compare_exchange(0, usize::MAX, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        });
        if let Some(i) = slot {
            let s = &REGISTRY[i];
            s.hit.store(false, Ordering::Relaxed);
            s.start.store(start as usize, Ordering::Relaxed);
            s.len.store(len.max(1), Ordering::Release);
        }
        Guard {
            slot,
            path: path.to_owned(),
        }
    }

    /// An error if a read of this map hit a truncated page.
    pub fn check(&self) -> Result<()> {
        match self.slot {
            Some(i) if REGISTRY[i].hit.load(Ordering::Acquire) => Err(Error::InputChanged {
                path: self.path.clone(),
                what: "it was truncated while the merge ran".into(),
            }),
            _ => Ok(()),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            let s = &REGISTRY[i];
            s.len.store(usize::MAX, Ordering::Release);
            s.start.store(0, Ordering::Relaxed);
            s.len.store(0, Ordering::Release);
        }
    }
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    let page = PAGE.load(Ordering::Relaxed);
    for s in REGISTRY.iter() {
        let len = s.len.load(Ordering::Acquire);
        if len == 0 || len == usize::MAX {
            continue;
        }
        let start = s.start.load(Ordering::Relaxed);
        if addr >= start && addr - start < len {
            let at = addr & !(page - 1);
            // SAFETY: replaces one page of our own read-only input map (which the truncated
            // file no longer backs) with zeros; the map is unmapped as a whole later.
            let p = unsafe {
                libc::mmap(
                    at as *mut libc::c_void,
                    page,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                s.hit.store(true, Ordering::Release);
                return;
            }
        }
    }
    // Not ours: hand over to whoever handled SIGBUS before us.
    let prev = PREVIOUS.load(Ordering::Acquire);
    // SAFETY: PREVIOUS is null or a leaked, never-freed sigaction.
    unsafe {
        if !prev.is_null() {
            let h = (*prev).sa_sigaction;
            if h != libc::SIG_DFL && h != libc::SIG_IGN {
                if (*prev).sa_flags & libc::SA_SIGINFO != 0 {
                    let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                        std::mem::transmute(h);
                    f(sig, info, ctx);
                } else {
                    let f: extern "C" fn(libc::c_int) = std::mem::transmute(h);
                    f(sig);
                }
                return;
            }
        }
        // Default action: die of SIGBUS when the faulting instruction runs again.
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
    }
}

/// Installs the handler unless it is already the current one (someone, e.g. Python's
/// faulthandler, may have replaced it since; we then chain to them).
fn install() {
    static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = INSTALLING.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: plain libc calls with valid, zero-initialised structs.
    unsafe {
        let page = libc::sysconf(libc::_SC_PAGESIZE);
        if page > 0 {
            PAGE.store(page as usize, Ordering::Relaxed);
        }
        let mut current: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut current) != 0 {
            return;
        }
        if current.sa_sigaction == on_sigbus as *const () as usize {
            return;
        }
        let mut ours: libc::sigaction = std::mem::zeroed();
        ours.sa_sigaction = on_sigbus as *const () as usize;
        ours.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
        libc::sigemptyset(&mut ours.sa_mask);
        let prev = Box::into_raw(Box::new(current));
        PREVIOUS.store(prev, Ordering::Release);
        libc::sigaction(libc::SIGBUS, &ours, std::ptr::null_mut());
    }
}
