//! Running core work with the GIL released while staying responsive: the work runs on a scoped
//! thread; the calling thread wakes every 100 ms to check signals (so Ctrl-C works) and to report
//! progress to the Python callback. Either raising cancels the work, which stops at its next chunk.
//! The final tick runs after the work and before the caller publishes anything.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use pyo3::prelude::*;
use weightweave_core::Result;

use crate::errors::{panic_error, PyWeaveErr};

const TICK: Duration = Duration::from_millis(100);

pub fn run_detached<T, F>(py: Python<'_>, progress: Option<Py<PyAny>>, work: F) -> PyResult<T>
where
    T: Send,
    F: FnOnce(&(dyn Fn(u64, u64, u32) + Sync), &AtomicBool) -> Result<T> + Send,
{
    let done = AtomicU64::new(0);
    let total = AtomicU64::new(0);
    let stage = AtomicU32::new(0);
    let cancel = AtomicBool::new(false);
    let report = |d: u64, t: u64, s: u32| {
        done.fetch_max(d, Ordering::Relaxed);
        total.store(t, Ordering::Relaxed);
        stage.store(s, Ordering::Relaxed);
    };
    // A callback with a true `wants_stage` attribute (the CLI's bar) also gets the pass's name.
    let wants_stage = progress.as_ref().is_some_and(|cb| {
        cb.bind(py)
            .getattr("wants_stage")
            .and_then(|v| v.is_truthy())
            .unwrap_or(false)
    });
    let tick = |py: Python<'_>| -> PyResult<()> {
        py.check_signals()?;
        if let Some(cb) = &progress {
            let (d, t) = (done.load(Ordering::Relaxed), total.load(Ordering::Relaxed));
            if wants_stage {
                let name = match stage.load(Ordering::Relaxed) {
                    0 => "output".to_owned(),
                    k => format!("statistics {k}"),
                };
                cb.call1(py, (d, t, name))?;
            } else {
                cb.call1(py, (d, t))?;
            }
        }
        Ok(())
    };
    let (outcome, interrupted) = py.detach(|| {
        std::thread::scope(|s| {
            let (tx, rx) = mpsc::channel::<()>();
            let (report, cancel) = (&report, &cancel);
            let handle = s.spawn(move || {
                let r = work(report, cancel);
                let _ = tx.send(());
                r
            });
            let mut interrupted: Option<PyErr> = None;
            loop {
                match rx.recv_timeout(TICK) {
                    Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if interrupted.is_none() {
                            if let Err(e) = Python::attach(tick) {
                                cancel.store(true, Ordering::Relaxed);
                                interrupted = Some(e);
                            }
                        }
                    }
                }
            }
            (handle.join(), interrupted)
        })
    });
    if let Some(e) = interrupted {
        // The work saw the cancel flag and cleaned up; surface the Python exception itself.
        return Err(e);
    }
    match outcome {
        Ok(Ok(v)) => {
            // The last report, and the last chance to stop, come before the caller publishes:
            // nothing after the publish may raise.
            done.store(total.load(Ordering::Relaxed), Ordering::Relaxed);
            stage.store(0, Ordering::Relaxed);
            tick(py)?;
            Ok(v)
        }
        Ok(Err(e)) => Err(PyWeaveErr(e).into()),
        Err(payload) => Err(panic_error(payload)),
    }
}
