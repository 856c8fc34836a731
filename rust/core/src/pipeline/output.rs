//! The output pass: per chunk, M of every parameter set (from the statistics), pooled into
//! θ_pre + P, range-checked, encoded to the output dtype and written at its final offset.

use std::sync::atomic::Ordering;

use super::{grow, Engine, Stats, Work};
use crate::dtype::encode;
use crate::error::{Error, Result};
use crate::plan::Chunk;
use crate::pool::sets::{Buffers, Weaving};
use crate::pool::{self, Pool};
use crate::recipe::Combine;
use crate::rng::{Stream, POOL_STREAM};
use crate::source::scaled;
use crate::Sink;

/// Fresh FP8 scales by plan index of the re-quantized weight.
pub(super) type Scales = std::collections::BTreeMap<usize, Vec<f32>>;

/// Elements per block of the output stage.
const OUT_BLOCK: usize = 4096;

impl Engine<'_> {
    pub(super) fn output(
        &self,
        merge: &[Chunk],
        copy: &[Chunk],
        stats: &[Stats],
        scales: &Scales,
        sink: &dyn Sink,
    ) -> Result<()> {
        self.in_output.store(true, Ordering::Relaxed);
        self.pass(
            merge,
            || (),
            #[inline(always)]
            |w, c, _| match scales.get(&c.tensor) {
                Some(s) => self.requant_chunk(w, c, stats, s, sink),
                None => self.output_chunk(w, c, stats, sink),
            },
            |_, _| (),
        )?;
        self.copy(copy, sink)
    }

    /// Writes the copied tensors' chunks as they are.
    pub(super) fn copy(&self, copy: &[Chunk], sink: &dyn Sink) -> Result<()> {
        use rayon::prelude::*;
        let total = self.total.load(Ordering::Relaxed);
        let ahead = self.read_ahead(copy);
        let release = self.releases(ahead, copy);
        copy.par_iter().enumerate().try_for_each(|(i, c)| {
            if let (true, Some(next)) = (ahead > 0, copy.get(i + ahead)) {
                self.prefetch_base(next);
            }
            let t = &self.plan[c.tensor];
            let size = t.base_dtype.size();
            let data = &self.base_refs[c.tensor].data[c.start * size..(c.start + c.len) * size];
            sink.write(c.tensor, c.start * size, data)?;
            if release {
                self.release_base(c);
            }
            let done =
                self.done.fetch_add(data.len() as u64, Ordering::Relaxed) + data.len() as u64;
            (self.progress)(done, total, 0);
            Ok(())
        })
    }

    /// M of parameter set `j` for one chunk, into `w.m` (the kernel forms the set's deltas
    /// itself: `with_chunk`).
    #[inline(always)]
    pub(crate) fn set_m(&self, w: &mut Work, j: usize, c: &Chunk, stats: &Stats) -> Result<()> {
        self.kernel_m(w, j, c, stats);
        Ok(())
    }

    /// The fresh scales of every re-quantized FP8 weight: a pass computing the merged values
    /// and folding each block's largest magnitude (a max: order-free, so deterministic).
    pub(super) fn requant_scales(&self, merge: &[Chunk], stats: &[Stats]) -> Result<Scales> {
        let chunks: Vec<Chunk> = merge
            .iter()
            .filter(|c| self.plan[c.tensor].requant.is_some())
            .copied()
            .collect();
        if chunks.is_empty() {
            return Ok(Scales::new());
        }
        let amax = self.pass(
            &chunks,
            Scales::new,
            |w, c, acc| {
                let t = &self.plan[c.tensor];
                let q = t.requant.expect("a requantized tensor");
                self.pooled(w, c, stats)?;
                let a = acc.entry(c.tensor).or_insert_with(|| vec![0.0; q.scales]);
                for (k, &v) in w.out[..c.len].iter().enumerate() {
                    let i = scaled::scale_index(q.block, q.cols, c.start + k);
                    a[i] = a[i].max(v.abs());
                }
                Ok(())
            },
            |mut a, b| {
                for (k, v) in b {
                    let e = a.entry(k).or_insert_with(|| vec![0.0; v.len()]);
                    for (x, y) in e.iter_mut().zip(v) {
                        *x = x.max(y);
                    }
                }
                a
            },
        )?;
        amax.into_iter()
            .map(|(i, a)| {
                let t = &self.plan[i];
                let scale = &self.plan[t.requant.expect("requantized").scale_tensor];
                let s = scaled::fresh_scales(&a, t.out_dtype, scale.out_dtype).map_err(|amax| {
                    Error::ScaleOverflow {
                        tensor: scale.name.clone(),
                        dtype: scale.out_dtype.name(),
                        max: scale.out_dtype.max_finite(),
                        amax,
                    }
                })?;
                Ok((i, s))
            })
            .collect()
    }

    /// Writes the scale tensors of the re-quantized weights.
    pub(super) fn write_scales(&self, scales: &Scales, sink: &dyn Sink) -> Result<()> {
        for (&i, s) in scales {
            let st = self.plan[i].requant.expect("requantized").scale_tensor;
            let dtype = self.plan[st].out_dtype;
            let mut bytes = vec![0u8; s.len() * dtype.size()];
            encode(dtype, s, &mut bytes);
            sink.write(st, 0, &bytes)?;
        }
        Ok(())
    }

    /// One chunk of a re-quantized weight: merged, divided by its block's scale, encoded.
    fn requant_chunk(
        &self,
        w: &mut Work,
        c: &Chunk,
        stats: &[Stats],
        scales: &[f32],
        sink: &dyn Sink,
    ) -> Result<()> {
        let q = self.plan[c.tensor].requant.expect("a requantized tensor");
        self.pooled(w, c, stats)?;
        for (k, v) in w.out[..c.len].iter_mut().enumerate() {
            *v /= scales[scaled::scale_index(q.block, q.cols, c.start + k)];
        }
        self.finish_chunk(w, c, sink)
    }

    /// θ_pre + P of one chunk into `w.out`, unencoded.
    fn pooled(&self, w: &mut Work, c: &Chunk, stats: &[Stats]) -> Result<()> {
        let n = c.len;
        let t = &self.plan[c.tensor];
        let stream = Stream::new(self.recipe.seed, POOL_STREAM, &t.name);
        let class = self.class(c.tensor);
        if self.recipe.sets.len() == 1 && !matches!(self.pool(), Some(Pool::Custom(_))) {
            self.set_m(w, 0, c, &stats[0])?;
            if self.value_out {
                // mergekit's values are written as they are at λ = 1.
                if let Combine::Merge { lam: 1.0 } = class.combine {
                    let Work { m, out, .. } = w;
                    out[..n].copy_from_slice(&m[..n]);
                    return Ok(());
                }
                self.value_to_delta(w, n);
            }
            let Work {
                base, raw, m, out, ..
            } = w;
            let m_is_sum = self.recipe.method().sum_of_deltas() && !self.own_weights[0];
            let raw: Vec<&[f32]> = raw.iter().map(|d| &d[..n]).collect();
            pool::apply(
                &class.combine,
                &class.points[0].lams,
                &raw,
                &m[..n],
                m_is_sum,
                class.points[0].lam_sum,
                &base[..n],
                &mut out[..n],
                &stream,
                c.start as u64,
            );
            return Ok(());
        }
        self.weave_sets(w, c, stats, &stream)
    }

    fn pool(&self) -> Option<&Pool> {
        match &self.recipe.combine {
            Combine::Merge { .. } => None,
            Combine::Weave { pool, .. } => Some(pool),
        }
    }

    #[inline(always)]
    pub(super) fn output_chunk(
        &self,
        w: &mut Work,
        c: &Chunk,
        stats: &[Stats],
        sink: &dyn Sink,
    ) -> Result<()> {
        let n = c.len;
        let t = &self.plan[c.tensor];
        let stream = Stream::new(self.recipe.seed, POOL_STREAM, &t.name);
        let single = self.recipe.sets.len() == 1 && !matches!(self.pool(), Some(Pool::Custom(_)));
        if !single || self.value_out {
            self.pooled(w, c, stats)?;
            return self.finish_chunk(w, c, sink);
        }
        // One set and a built-in pool: pool, range-check and encode block by block, while each
        // block is still in L1.
        let class = self.class(c.tensor);
        self.set_m(w, 0, c, &stats[0])?;
        let Work {
            base,
            raw,
            m,
            out,
            bytes,
            ..
        } = w;
        // For task arithmetic M already is Σ_t τ_t, which the mean pool would sum again.
        let m_is_sum = self.recipe.method().sum_of_deltas() && !self.own_weights[0];
        let in_range = encode_blocks(t, n, out, bytes, |r, out| {
            let raw: Vec<&[f32]> = raw.iter().map(|d| &d[r.clone()]).collect();
            pool::apply(
                &class.combine,
                &class.points[0].lams,
                &raw,
                &m[r.clone()],
                m_is_sum,
                class.points[0].lam_sum,
                &base[r.clone()],
                out,
                &stream,
                (c.start + r.start) as u64,
            );
        });
        self.write_chunk(w, c, in_range, sink)
    }

    /// θ_pre + pool(A*) of one chunk into `w.out`, for several sets or a function pool: the
    /// deltas go in first, then each set's M in turn.
    fn weave_sets(&self, w: &mut Work, c: &Chunk, stats: &[Stats], stream: &Stream) -> Result<()> {
        let n = c.len;
        let t = &self.plan[c.tensor];
        let class = self.class(c.tensor);
        let Combine::Weave {
            pool,
            points,
            include_deltas: include,
        } = &class.combine
        else {
            unreachable!("several sets only in a weave")
        };
        let include = *include;
        let (mut acc, mut pos, mut picks, mut astar) = (
            std::mem::take(&mut w.acc),
            std::mem::take(&mut w.pos),
            std::mem::take(&mut w.picks),
            std::mem::take(&mut w.astar),
        );
        grow(&mut acc, n);
        if pos.len() < n {
            pos.resize(n, 0);
        }
        if picks.len() < n {
            picks.resize(n, 0);
        }
        let result = (|| {
            let bufs = Buffers {
                acc: &mut acc,
                pos: &mut pos,
                picks: &mut picks,
                astar: &mut astar,
            };
            let deltas: Vec<&[f32]> = if include {
                w.raw.iter().map(|d| &d[..n]).collect()
            } else {
                Vec::new()
            };
            let mut weave =
                Weaving::start(pool, points, &deltas, n, bufs, (stream, c.start as u64));
            drop(deltas);
            // The sets' M leave `raw` as it is (their own deltas go to `eff`).
            for (j, s) in class.points.iter().enumerate() {
                if s.index.is_empty() {
                    continue;
                }
                // A chunk of a million-set grid is seconds of work: stop between sets too.
                if j % 64 == 63 && self.cancel.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(Error::Cancelled);
                }
                self.set_m(w, j, c, &stats[j])?;
                if self.value_out {
                    self.value_to_delta(w, n);
                }
                weave.add(j, s, &w.m);
            }
            let Work { raw, base, out, .. } = w;
            let deltas: Vec<&[f32]> = if include {
                raw.iter().map(|d| &d[..n]).collect()
            } else {
                Vec::new()
            };
            weave.finish(&deltas, base, out, &t.name)
        })();
        (w.acc, w.pos, w.picks, w.astar) = (acc, pos, picks, astar);
        result
    }

    /// Turns a kernel's merged value in `w.m` into M − θ_base.
    pub(super) fn value_to_delta(&self, w: &mut Work, n: usize) {
        let Work { base, m, .. } = w;
        for (x, &b) in m[..n].iter_mut().zip(&base[..n]) {
            *x -= b;
        }
    }

    /// Range-checks `w.out`, encodes it to the output dtype and writes it.
    fn finish_chunk(&self, w: &mut Work, c: &Chunk, sink: &dyn Sink) -> Result<()> {
        let t = &self.plan[c.tensor];
        let Work { out, bytes, .. } = w;
        let in_range = encode_blocks(t, c.len, out, bytes, |_, _| {});
        self.write_chunk(w, c, in_range, sink)
    }

    /// Writes the encoded chunk, or reports why its values do not fit.
    fn write_chunk(&self, w: &mut Work, c: &Chunk, in_range: bool, sink: &dyn Sink) -> Result<()> {
        let n = c.len;
        let t = &self.plan[c.tensor];
        let size = t.out_dtype.size();
        let Work { out, bytes, .. } = w;
        if !in_range {
            return Err(if out[..n].iter().any(|v| !v.is_finite()) {
                Error::ArithmeticOverflow {
                    tensor: t.name.clone(),
                }
            } else {
                Error::Overflow {
                    tensor: t.name.clone(),
                    dtype: t.out_dtype.name(),
                    max: t.out_dtype.max_finite(),
                }
            });
        }
        sink.write(c.tensor, c.start * size, &bytes[..n * size])
    }
}

/// Encodes `out[..n]` into `bytes` block by block, first filling each block with `fill` (the
/// pool), so that a block is encoded while it is still in L1. False when a value is out of the
/// output dtype's range.
#[inline(always)]
fn encode_blocks(
    t: &crate::plan::TensorPlan,
    n: usize,
    out: &mut [f32],
    bytes: &mut Vec<u8>,
    mut fill: impl FnMut(std::ops::Range<usize>, &mut [f32]),
) -> bool {
    let size = t.out_dtype.size();
    if bytes.len() < n * size {
        bytes.resize(n * size, 0);
    }
    let limit = t.out_dtype.overflow_at();
    let mut in_range = true;
    for start in (0..n).step_by(OUT_BLOCK) {
        let r = start..(start + OUT_BLOCK).min(n);
        let block = &mut out[r.clone()];
        fill(r.clone(), block);
        in_range &= block.iter().fold(true, |ok, v| ok & (v.abs() < limit));
        encode(t.out_dtype, block, &mut bytes[r.start * size..r.end * size]);
    }
    in_range
}
