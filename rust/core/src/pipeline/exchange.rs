//! Statistics passes spread over the processes of a cluster merge (`crate::cluster`), exact by
//! construction. Every process replays the same statistics algorithm over the whole model; each
//! pass's accumulator is already order-free (a run's result cannot depend on how rayon splits
//! the chunks), so a pass can as well be split by tensors across units: each unit folds its own
//! tensors' chunks into a partial, and the driver merges the partials with the pass's own merge
//! function. A pass whose merged result is known is not run again: its encoded result is
//! decoded. A process that reaches a pass it cannot finish stops with
//! [`Error::Suspended`], saying what it has (a unit's partial, the driver's merged result).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Engine, ModelPart, Work};
use crate::error::{Error, Result};
use crate::plan::Chunk;

/// One process's part in a distributed statistics gathering.
pub struct Exchange {
    /// The merged results of the passes so far, in pass order, encoded.
    pub known: Vec<Vec<u8>>,
    pub role: Role,
    next: AtomicUsize,
    said: Mutex<Option<Vec<u8>>>,
    /// Bytes a unit's partial pass read.
    read: AtomicU64,
}

pub enum Role {
    /// The driver: the units' partials of the first unknown pass, once they are in.
    Driver(Option<Vec<Vec<u8>>>),
    /// A unit: its tensors.
    Unit(Vec<bool>),
}

impl Exchange {
    pub fn new(known: Vec<Vec<u8>>, role: Role) -> Exchange {
        Exchange {
            known,
            role,
            next: AtomicUsize::new(0),
            said: Mutex::new(None),
            read: AtomicU64::new(0),
        }
    }

    /// Bytes this unit's partial pass read.
    pub fn read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// What this process has to say once suspended: a unit's partial, or the driver's merged
    /// result of the pass whose partials it was given (`None`: it needs partials first).
    pub fn said(&self) -> Option<Vec<u8>> {
        self.said.lock().expect("not poisoned").take()
    }
}

impl Engine<'_> {
    fn exchange(&self) -> Option<&Exchange> {
        match self.part.model {
            ModelPart::Gather(_, x) => x,
            _ => None,
        }
    }

    /// [`Engine::pass`] (or, `quiet`, [`Engine::pass_quiet`]) for the statistics a cluster
    /// merge gathers: split across its units when this run is part of one.
    pub(crate) fn pass_shared<A, I, F, R>(
        &self,
        chunks: &[Chunk],
        init: I,
        f: F,
        merge: R,
        quiet: bool,
    ) -> Result<A>
    where
        A: Send + Serialize + DeserializeOwned,
        I: Fn() -> A + Sync + Send,
        F: Fn(&mut Work, &Chunk, &mut A) -> Result<()> + Sync + Send,
        R: Fn(A, A) -> A + Sync + Send,
    {
        let Some(x) = self.exchange() else {
            return self.pass_impl(chunks, init, f, merge, !quiet);
        };
        let k = x.next.fetch_add(1, Ordering::Relaxed);
        if let Some(b) = x.known.get(k) {
            return decode(b);
        }
        let first = k == x.known.len();
        match &x.role {
            Role::Unit(mine) if first => {
                let own: Vec<Chunk> = chunks.iter().filter(|c| mine[c.tensor]).copied().collect();
                let a = self.pass_impl(&own, init, f, merge, !quiet)?;
                // Counted as a local run counts (a sample is not).
                let read = own
                    .iter()
                    .map(|c| (c.len * self.plan[c.tensor].base_dtype.size()) as u64)
                    .sum::<u64>()
                    * (self.tasks() as u64 + 1);
                x.read
                    .store(if quiet { 0 } else { read }, Ordering::Relaxed);
                *x.said.lock().expect("not poisoned") = Some(encode(&a)?);
                Err(Error::Suspended)
            }
            Role::Driver(Some(partials)) if first => {
                let mut a = init();
                for p in partials {
                    a = merge(a, decode(p)?);
                }
                *x.said.lock().expect("not poisoned") = Some(encode(&a)?);
                Ok(a)
            }
            _ => Err(Error::Suspended),
        }
    }
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    bincode::serialize(v).map_err(|e| Error::Internal {
        what: format!("encoding statistics for a cluster merge: {e}"),
    })
}

pub(crate) fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T> {
    use bincode::Options;
    // From our own driver and units; the limit only keeps a corrupt message from allocating
    // without bound.
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .allow_trailing_bytes()
        .with_limit(b.len() as u64 * 2 + 4096)
        .deserialize(b)
        .map_err(|e| {
            Error::param(
                "ticket",
                format!("not a cluster message of this version: {e}"),
            )
        })
}
