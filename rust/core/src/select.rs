//! Exact order statistics over data too large to hold: a two-pass radix select on the 32-bit
//! order-preserving keys of f32 values. Pass one histograms the high 16 bits of every key; the
//! bucket holding the wanted rank is then resolved exactly by histogramming the low 16 bits of
//! the keys inside it. Counts are integers, so merging per-thread histograms is order-free and the
//! result is bit-identical for any thread count or chunking.

use crate::key_hist::{KeyHist, HIST_BUDGET};

mod keep_avx512;
mod sample_row;
pub use sample_row::SampleRow;

const BINS: usize = 1 << 16;

/// Maps f32 to u32 so that unsigned order equals numeric order (finite values).
#[inline]
pub fn key(v: f32) -> u32 {
    let b = v.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

#[inline]
pub fn unkey(k: u32) -> f32 {
    f32::from_bits(if k & 0x8000_0000 != 0 {
        k & 0x7FFF_FFFF
    } else {
        !k
    })
}

/// One wanted order statistic: the `rank`-th smallest (0-based) value of row `row`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub row: usize,
    pub rank: u64,
}

/// `n` histograms of 2^16 bins each.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Hist {
    bins: Vec<u64>,
}

impl Hist {
    pub fn new(n: usize) -> Hist {
        Hist {
            bins: vec![0; n * BINS],
        }
    }

    pub fn merge(mut self, other: Hist) -> Hist {
        for (a, b) in self.bins.iter_mut().zip(other.bins) {
            *a += b;
        }
        self
    }

    /// Pass one: counts the high halves of the keys of `values` (scored by `s`) into
    /// histogram `row`.
    #[inline(always)]
    pub fn count_high(&mut self, row: usize, values: &[f32], s: Score) {
        match s {
            Score::Value => self.count_high_as::<false>(row, values),
            Score::Magnitude => self.count_high_as::<true>(row, values),
        }
    }

    #[inline(always)]
    fn count_high_as<const ABS: bool>(&mut self, row: usize, values: &[f32]) {
        let h = &mut self.bins[row * BINS..(row + 1) * BINS];
        for &v in values {
            h[(key(magnitude::<ABS>(v)) >> 16) as usize] += 1;
        }
    }

    /// Pass two: for every request on `row`, counts the low halves of keys in its bucket.
    #[inline(always)]
    pub fn count_low(&mut self, found: &Buckets, row: usize, values: &[f32], s: Score) {
        match s {
            Score::Value => self.count_low_as::<false>(found, row, values),
            Score::Magnitude => self.count_low_as::<true>(found, row, values),
        }
    }

    #[inline(always)]
    fn count_low_as<const ABS: bool>(&mut self, found: &Buckets, row: usize, values: &[f32]) {
        for (i, (req, &(bucket, _))) in found.requests.iter().zip(&found.buckets).enumerate() {
            if req.row != row {
                continue;
            }
            let h = &mut self.bins[i * BINS..(i + 1) * BINS];
            for &v in values {
                let k = key(magnitude::<ABS>(v));
                if k >> 16 == bucket {
                    h[(k & 0xFFFF) as usize] += 1;
                }
            }
        }
    }

    /// Index of the bin holding `rank` in histogram `n`, and the rank left inside that bin.
    fn locate(&self, n: usize, mut rank: u64) -> (u32, u64) {
        for (i, &c) in self.bins[n * BINS..(n + 1) * BINS].iter().enumerate() {
            if rank < c {
                return (i as u32, rank);
            }
            rank -= c;
        }
        panic!("rank beyond the histogram's count: the request was validated by the caller")
    }
}

/// The outcome of pass one: for each request, its high-half bucket and the residual rank.
#[derive(Clone, Debug)]
pub struct Buckets {
    pub requests: Vec<Request>,
    pub buckets: Vec<(u32, u64)>,
}

impl Buckets {
    pub fn resolve(high: &Hist, requests: Vec<Request>) -> Buckets {
        let buckets = requests
            .iter()
            .map(|r| high.locate(r.row, r.rank))
            .collect();
        Buckets { requests, buckets }
    }

    /// A histogram sized for pass two.
    pub fn low_hist(&self) -> Hist {
        Hist::new(self.requests.len())
    }

    /// The selected values, in request order.
    pub fn finish(&self, low: &Hist) -> Vec<f32> {
        self.buckets
            .iter()
            .enumerate()
            .map(|(i, &(bucket, residual))| {
                let (lo, _) = low.locate(i, residual);
                unkey((bucket << 16) | lo)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn select(values: &[f32], rank: u64, chunk: usize) -> f32 {
        select_scored(values, rank, chunk, Score::Value)
    }

    fn select_scored(values: &[f32], rank: u64, chunk: usize, s: Score) -> f32 {
        let reqs = vec![Request { row: 0, rank }];
        let mut high = Hist::new(1);
        for c in values.chunks(chunk) {
            high.count_high(0, c, s);
        }
        let found = Buckets::resolve(&high, reqs);
        let mut low = found.low_hist();
        for c in values.chunks(chunk) {
            low.count_low(&found, 0, c, s);
        }
        found.finish(&low)[0]
    }

    #[test]
    fn key_is_monotone() {
        let xs = [-1e30f32, -2.0, -1.0, -1e-30, 0.0, 1e-30, 1.0, 2.0, 1e30];
        for w in xs.windows(2) {
            assert!(key(w[0]) < key(w[1]));
            assert_eq!(unkey(key(w[0])), w[0]);
        }
    }

    proptest! {
        #[test]
        fn matches_sorting(values in prop::collection::vec(-1e6f32..1e6, 1..500), r in 0usize..500, chunk in 1usize..64) {
            let rank = r % values.len();
            let mut sorted = values.clone();
            sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
            prop_assert_eq!(select(&values, rank as u64, chunk), sorted[rank]);
        }

        #[test]
        fn magnitudes_match_sorting_their_absolute_values(values in prop::collection::vec(-1e6f32..1e6, 1..500), r in 0usize..500, chunk in 1usize..64) {
            let rank = r % values.len();
            let mut sorted: Vec<f32> = values.iter().map(|v| v.abs()).collect();
            sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
            prop_assert_eq!(select_scored(&values, rank as u64, chunk, Score::Magnitude), sorted[rank]);
            prop_assert_eq!(Score::Magnitude.key(values[rank]), key(values[rank].abs()));
        }
    }
}

/// One-pass exact selection inside a key window guessed from a sample. For each request the
/// window [lo, hi] should contain the wanted rank; one pass counts the keys below it and at lo,
/// keeps the keys above lo inside it, and the rank is then selected exactly among those. (Keys
/// at lo are only counted: a mass of equal values, such as the zeros DARE leaves, sits there.) When the guess was
/// wrong (the rank is not inside) or a window held more keys than its cap, [`Windowed::finish`]
/// says so and the caller falls back to the two-pass radix select.
#[derive(Clone, Debug)]
pub struct Windows {
    pub requests: Vec<Request>,
    /// Inclusive key bounds per request.
    pub bounds: Vec<(u32, u32)>,
    /// Per request, the most keys kept before giving up: shares of [`WINDOW_BUDGET`] in
    /// proportion to the keys each window is expected to hold, so that one wide window (a
    /// quantile in the bulk of the data) may use what the narrow ones beside it (a row's
    /// maximum) do not need.
    pub caps: Vec<usize>,
    /// False when the expected keys inside would not fit the memory budget.
    pub viable: bool,
    /// Per request, the sample's own estimate (a key inside the window): where a speculative
    /// pass guesses the value before it is known.
    pub guess: Vec<u32>,
    /// Per request (empty: none), a fraction f when its rank is only known after the pass:
    /// the ⌊nonzero · f⌋-th largest value of its row (in f32, as mergekit's
    /// `int(count_nonzero · f)`), the row's zeros counted by the pass itself; the request's
    /// `rank` is then the sample's estimate, which placed the window.
    pub late: Vec<Option<f32>>,
    /// The values in each row (what a late rank counts down from).
    pub total: u64,
    /// Per request, the keys above its lower bound the sample expects the window to hold
    /// (what a speculative pass expects to set aside).
    pub expected: Vec<f64>,
    /// Per request, whether its window counts each key ([`KeyHist`]) instead of keeping the
    /// keys: see [`Self::densified`].
    pub dense: Vec<bool>,
}

/// Keys all windows of one select may keep together (32 MiB), so statistics memory is bounded
/// whatever the model size; past it the radix select (fixed-size histograms) takes over.
pub const WINDOW_BUDGET: usize = 1 << 23;

impl Windows {
    /// Windows from per-row samples: the sample quantile of each request's rank, widened by
    /// `sigmas` standard deviations of the count of sample keys below it (the binomial's times
    /// the row's design effect there: [`SampleRow::effect_at`]) and a margin on each side.
    pub fn from_sample(
        requests: Vec<Request>,
        samples: &[SampleRow],
        total: u64,
        sigmas: f64,
    ) -> Windows {
        Self::from_sample_spread(requests, samples, total, sigmas, &[])
    }

    /// [`Self::from_sample`], each request's window widened by `extra[i]` more sample
    /// positions on each side (none past the slice's end): the uncertainty of a rank that
    /// was itself estimated from the sample.
    pub fn from_sample_spread(
        requests: Vec<Request>,
        samples: &[SampleRow],
        total: u64,
        sigmas: f64,
        extra: &[f64],
    ) -> Windows {
        let mut bounds = Vec::with_capacity(requests.len());
        let mut guess = Vec::with_capacity(requests.len());
        // Per request, the keys its window is expected to keep.
        let mut expected = Vec::with_capacity(requests.len());
        for (i, r) in requests.iter().enumerate() {
            let s = &samples[r.row];
            if s.is_empty() || total == 0 {
                bounds.push((0, u32::MAX));
                guess.push(key(0.0));
                expected.push(total as f64);
                continue;
            }
            let n = s.len() as f64;
            let p = (r.rank as f64 + 0.5) / total as f64;
            let spread = sigmas * (n * p * (1.0 - p) * s.effect_at(p)).sqrt()
                + 8.0
                + extra.get(i).copied().unwrap_or(0.0);
            let lo_i = (p * n - spread).floor();
            let hi_i = (p * n + spread).ceil();
            let lo = if lo_i < 0.0 { 0 } else { s[lo_i as usize] };
            let hi = if hi_i >= n - 1.0 {
                u32::MAX
            } else {
                s[hi_i as usize]
            };
            bounds.push((lo, hi));
            let at = ((p * n).floor() as usize).min(s.len() - 1);
            guess.push(s[at].clamp(lo, hi));
            // Keys above lo are stored; estimate how many from the sample itself (ties make
            // index distance a poor guide). Keys at lo are only counted.
            expected.push(if lo < hi {
                let inside = s.partition_point(|&k| k <= hi) - s.partition_point(|&k| k <= lo);
                (inside as f64 + spread) / n * total as f64
            } else {
                0.0
            });
        }
        // Four times the expectation (and a floor) each, scaled down together to the budget.
        let want: Vec<f64> = expected.iter().map(|e| 4.0 * e + 65536.0).collect();
        let scale = (WINDOW_BUDGET as f64 / want.iter().sum::<f64>()).min(1.0);
        let caps: Vec<usize> = want.iter().map(|w| (w * scale) as usize).collect();
        Windows {
            dense: vec![false; requests.len()],
            requests,
            bounds,
            viable: expected.iter().zip(&caps).all(|(&e, &c)| e < c as f64),
            caps,
            guess,
            late: Vec::new(),
            total,
            expected,
        }
    }

    /// These windows, those expected to hold more keys than their caps counting each key of
    /// their span instead (a [`KeyHist`]), as far as the spans fit [`HIST_BUDGET`] together;
    /// viable when every other window fits its cap. Only for [`Windowed`] passes (not the
    /// per-chunk counts of [`PieceWindows`]).
    pub fn densified(mut self) -> Windows {
        let mut spanned = 0u64;
        for i in 0..self.requests.len() {
            let (lo, hi) = self.bounds[i];
            let span = u64::from(hi.wrapping_sub(lo));
            let over = self.expected[i] >= self.caps[i] as f64;
            if lo < hi && over && self.late(i).is_none() && spanned + span <= HIST_BUDGET {
                self.dense[i] = true;
                spanned += span;
            }
        }
        self.viable = (self.expected.iter().zip(&self.caps).zip(&self.dense))
            .all(|((&e, &c), &d)| d || e < c as f64);
        self
    }

    /// Elements per task a sign tally beside these windows may hold pending: the largest cap,
    /// but no more than an even share of the budget, so that the tallies of several parameter
    /// sets stay within it too.
    pub fn tally_cap(&self) -> usize {
        let even = WINDOW_BUDGET / self.requests.len().max(1);
        self.caps.iter().copied().max().unwrap_or(0).min(even)
    }

    /// Per row of `n_rows`, the lowest value any of its windows tells apart from the values
    /// below it: every value below counts the same in [`Windowed::count`]. −∞ for a row
    /// without a request.
    pub fn floors(&self, n_rows: usize) -> Vec<f32> {
        let mut f = vec![f32::NEG_INFINITY; n_rows];
        let mut seen = vec![false; n_rows];
        for (r, &(lo, _)) in self.requests.iter().zip(&self.bounds) {
            // The smallest key has no value below it (unkey(0) is a NaN).
            let v = if lo == 0 {
                f32::NEG_INFINITY
            } else {
                unkey(lo)
            };
            f[r.row] = if seen[r.row] { f[r.row].min(v) } else { v };
            seen[r.row] = true;
        }
        f
    }

    pub fn acc(&self) -> Windowed {
        Windowed {
            below: vec![0; self.requests.len()],
            equal: vec![0; self.requests.len()],
            inside: vec![Vec::new(); self.requests.len()],
            hist: vec![KeyHist::default(); self.requests.len()],
            overflow: false,
            zeros: vec![0; self.requests.len()],
        }
    }

    /// Request `i`'s fraction when its rank is late.
    fn late(&self, i: usize) -> Option<f32> {
        self.late.get(i).copied().flatten()
    }
}

/// The rank of the ⌊nonzero · f⌋-th largest of `total` values (f32 product, as mergekit's
/// `int(count_nonzero · f)`), None when that is no value at all (k = 0).
pub fn top_rank(total: u64, nonzero: u64, f: f32) -> Option<u64> {
    let k = ((nonzero as f32 * f) as u64).min(total);
    (k > 0).then(|| total - k)
}

impl Windows {}

/// Per-worker state of a windowed pass.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Windowed {
    below: Vec<u64>,
    /// Keys equal to lo: only counted.
    equal: Vec<u64>,
    inside: Vec<Vec<u32>>,
    /// The counts of dense requests' windows ([`Windows::dense`]).
    #[serde(default)]
    hist: Vec<KeyHist>,
    overflow: bool,
    /// Values equal to 0 (either sign), for the late requests only.
    #[serde(default)]
    zeros: Vec<u64>,
}

impl Windowed {
    /// Counts `n` values of `row` below its floor ([`Windows::floors`]), left out by their
    /// producer: below every window of the row (and not zero).
    pub fn count_below(&mut self, w: &Windows, row: usize, n: u64) {
        if n == 0 || self.overflow {
            return;
        }
        for (b, req) in self.below.iter_mut().zip(&w.requests) {
            if req.row == row {
                *b += n;
            }
        }
    }

    #[inline(always)]
    pub fn count(&mut self, w: &Windows, row: usize, values: &[f32]) {
        self.count_as::<false>(w, row, values);
    }

    /// [`Self::count`] of |values|: the magnitudes' keys taken in the counting loops, without
    /// a pass that writes the magnitudes out and one that reads them back (TIES's thresholds).
    #[inline(always)]
    pub fn count_abs(&mut self, w: &Windows, row: usize, values: &[f32]) {
        self.count_as::<true>(w, row, values);
    }

    /// [`Self::count`] or [`Self::count_abs`], as `s` scores the values.
    #[inline(always)]
    pub fn count_scored(&mut self, w: &Windows, row: usize, values: &[f32], s: Score) {
        match s {
            Score::Value => self.count_as::<false>(w, row, values),
            Score::Magnitude => self.count_as::<true>(w, row, values),
        }
    }

    #[inline(always)]
    fn count_as<const ABS: bool>(&mut self, w: &Windows, row: usize, values: &[f32]) {
        if self.overflow {
            return;
        }
        for (i, (req, &(lo, hi))) in w.requests.iter().zip(&w.bounds).enumerate() {
            if req.row != row {
                continue;
            }
            if w.late(i).is_some() {
                self.zeros[i] += values.iter().map(|&v| u64::from(v == 0.0)).sum::<u64>();
            }
            // u32 counters (a chunk holds < 2^32 values) vectorize twice as wide as u64.
            let mut below = 0u32;
            let inside = &mut self.inside[i];
            let width = hi - lo;
            if width == 0 {
                let mut equal = 0u32;
                for &v in values {
                    let k = key(magnitude::<ABS>(v));
                    below += u32::from(k < lo);
                    equal += u32::from(k == lo);
                }
                self.equal[i] += u64::from(equal);
                self.below[i] += u64::from(below);
                continue;
            }
            let inside_window = |k: u32| k.wrapping_sub(lo).wrapping_sub(1) < width;
            // Two copies of the counting loop (one per way of keeping the keys inside), so
            // that the usual one carries no test of the other.
            let (below, equal) = if w.dense[i] {
                let hist = &mut self.hist[i];
                count_blocks::<ABS>(values, lo, width, |block: &[f32]| {
                    for &v in block {
                        let k = key(magnitude::<ABS>(v));
                        if inside_window(k) {
                            hist.add(lo, width, k);
                        }
                    }
                })
            } else {
                count_keep::<ABS>(values, lo, width, inside)
            };
            self.below[i] += u64::from(below);
            self.equal[i] += u64::from(equal);
            if inside.len() > w.caps[i] {
                self.overflow = true;
                self.inside.iter_mut().for_each(|v| *v = Vec::new());
                return;
            }
        }
    }
    pub fn merge(mut self, mut other: Windowed) -> Windowed {
        self.overflow |= other.overflow;
        for (a, b) in self.below.iter_mut().zip(&other.below) {
            *a += b;
        }
        for (a, b) in self.equal.iter_mut().zip(&other.equal) {
            *a += b;
        }
        for (a, b) in self.zeros.iter_mut().zip(&other.zeros) {
            *a += b;
        }
        for (a, b) in self.inside.iter_mut().zip(&mut other.inside) {
            a.append(b);
        }
        for (a, b) in self.hist.iter_mut().zip(other.hist) {
            a.merge(b);
        }
        self
    }

    /// [`Self::merge`], overflowing where the merged keys of a request exceed its cap: each
    /// worker checks its own keys, and rayon's pieces of a pass are merged afterwards, so
    /// without this check whether a pass overflowed (and fell back) would depend on how the
    /// chunks were split, and a merge could hold more than the caps.
    pub fn merge_capped(self, other: Windowed, w: &Windows) -> Windowed {
        self.merge(other).capped(w)
    }

    /// Overflowed (its keys dropped) if a request holds more keys than its cap.
    fn capped(mut self, w: &Windows) -> Windowed {
        if !self.overflow && self.inside.iter().zip(&w.caps).any(|(v, &c)| v.len() > c) {
            self.overflow = true;
            self.inside.iter_mut().for_each(|v| *v = Vec::new());
        }
        self
    }

    /// Per request, the nonzero values of its row the pass counted (late requests only; a
    /// count is complete unless the pass overflowed, when [`Self::finish`] says None).
    pub fn nonzero(&self, w: &Windows) -> Vec<u64> {
        self.zeros.iter().map(|&z| w.total - z).collect()
    }

    pub fn describe(&self) -> String {
        let sizes: Vec<u64> = (self.inside.iter().zip(&self.hist))
            .map(|(v, h)| v.len() as u64 + h.len())
            .collect();
        format!(
            "overflow {} below {:?} inside {:?}",
            self.overflow, self.below, sizes
        )
    }

    /// The selected values, or None when a rank fell outside its window (or it overflowed).
    pub fn finish(self, w: &Windows) -> Option<Vec<f32>> {
        self.capped(w).finish_within(w)
    }

    /// [`Self::finish`] of counts within their caps.
    fn finish_within(mut self, w: &Windows) -> Option<Vec<f32>> {
        if self.overflow {
            return None;
        }
        let mut out = Vec::with_capacity(w.requests.len());
        for (i, req) in w.requests.iter().enumerate() {
            let rank = match w.late(i) {
                None => req.rank,
                Some(f) => match top_rank(w.total, w.total - self.zeros[i], f) {
                    Some(rank) => rank,
                    // Nothing is kept: no value to find.
                    None => {
                        out.push(f32::INFINITY);
                        continue;
                    }
                },
            };
            let r = rank.checked_sub(self.below[i])?;
            let (lo, hi) = w.bounds[i];
            if lo == hi {
                if r >= self.equal[i] {
                    return None;
                }
                out.push(unkey(lo));
                continue;
            }
            if r < self.equal[i] {
                out.push(unkey(lo));
                continue;
            }
            let r = r - self.equal[i];
            if w.dense[i] {
                out.push(unkey(self.hist[i].nth(lo, r)?));
                continue;
            }
            let keys = &mut self.inside[i];
            if r >= keys.len() as u64 {
                return None;
            }
            let (_, &mut k, _) = keys.select_nth_unstable(r as usize);
            out.push(unkey(k));
        }
        Some(out)
    }
}

/// What a row's keys are taken of: its values, or their magnitudes. A producer of magnitudes
/// (TIES's and mergekit's trims rank |τ|) hands its deltas over as they are and the counting
/// loops take |v| themselves: writing the magnitudes out first was a pass of its own, 5 % of
/// mergekit's TIES's `perf` samples.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Score {
    Value,
    Magnitude,
}

impl Score {
    /// The key a value of a row so scored counts as.
    #[inline(always)]
    pub fn key(self, v: f32) -> u32 {
        match self {
            Score::Value => key(v),
            Score::Magnitude => key(v.abs()),
        }
    }
}

/// `v`, or |v| where `ABS` (a count of magnitudes).
#[inline(always)]
fn magnitude<const ABS: bool>(v: f32) -> f32 {
    if ABS {
        v.abs()
    } else {
        v
    }
}

/// (#keys < lo, #keys = lo) of `values` (|values| where `ABS`), every key in (lo, lo + width]
/// appended to `inside` in order: in AVX-512 where the CPU has it (`select/keep_avx512.rs`),
/// else through [`count_blocks`].
#[inline(always)]
fn count_keep<const ABS: bool>(
    values: &[f32],
    lo: u32,
    width: u32,
    inside: &mut Vec<u32>,
) -> (u32, u32) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::tier() == crate::simd::Tier::Avx512 {
        // SAFETY: the tier is AVX-512 only where the CPU has avx512f, avx512dq and avx512vl.
        return unsafe { keep_avx512::count_keep::<ABS>(values, lo, width, inside) };
    }
    count_keep_portable::<ABS>(values, lo, width, inside)
}

/// [`count_keep`] in portable code.
#[inline(always)]
fn count_keep_portable<const ABS: bool>(
    values: &[f32],
    lo: u32,
    width: u32,
    inside: &mut Vec<u32>,
) -> (u32, u32) {
    let inside_window = |k: u32| k.wrapping_sub(lo).wrapping_sub(1) < width;
    count_blocks::<ABS>(values, lo, width, |block: &[f32]| {
        // Branch-free compaction: every key is written, the count advances on the ones
        // inside. A window holding a whole level of bf16 deltas (mergekit's per-tensor TIES)
        // has a key in most blocks, where a push per key cost a fifth of the pass.
        let (mut keep, mut c) = ([0u32; 16], 0usize);
        for &v in block {
            let k = key(magnitude::<ABS>(v));
            keep[c & 15] = k;
            c += usize::from(inside_window(k));
        }
        inside.extend_from_slice(&keep[..c]);
    })
}

/// Counts `values`' keys below `lo` and at `lo`, and hands `inside` every block of up to 16
/// values with a key in (lo, lo + width]. Counts run in short vectorized blocks and stay in
/// per-lane registers across them: only a block's hit test is reduced across lanes (an OR),
/// not three sums per block; a block is revisited only when it has keys inside (rare: the
/// window is narrow). One unsigned compare tests lo < k <= lo + width.
#[inline(always)]
fn count_blocks<const ABS: bool>(
    values: &[f32],
    lo: u32,
    width: u32,
    mut inside: impl FnMut(&[f32]),
) -> (u32, u32) {
    let inside_window = |k: u32| k.wrapping_sub(lo).wrapping_sub(1) < width;
    let (mut below_l, mut equal_l) = ([0u32; 16], [0u32; 16]);
    let mut blocks = values.chunks_exact(16);
    for block in &mut blocks {
        let mut hits = 0u32;
        for ((&v, b), e) in block.iter().zip(&mut below_l).zip(&mut equal_l) {
            let k = key(magnitude::<ABS>(v));
            *b += u32::from(k < lo);
            *e += u32::from(k == lo);
            hits |= u32::from(inside_window(k));
        }
        if hits > 0 {
            inside(block);
        }
    }
    let (mut below, mut equal) = (0u32, 0u32);
    for v in blocks.remainder().chunks(1) {
        let k = key(magnitude::<ABS>(v[0]));
        below += u32::from(k < lo);
        equal += u32::from(k == lo);
        if inside_window(k) {
            inside(v);
        }
    }
    (
        below + below_l.iter().sum::<u32>(),
        equal + equal_l.iter().sum::<u32>(),
    )
}

/// What one chunk's windowed count saw, kept so that the chunk's counts above and at any value
/// its window finds can be read off afterwards (a per-chunk count without another pass).
#[derive(Clone, Debug)]
pub struct PieceWindow {
    /// The chunk's start and the length of each of its rows.
    pub start: usize,
    pub len: u64,
    counted: Windowed,
}

impl PieceWindow {
    pub fn new(start: usize, len: u64, counted: Windowed) -> PieceWindow {
        PieceWindow {
            start,
            len,
            counted,
        }
    }

    /// (#keys > key(value), #keys = key(value)) of request `i`'s row in this chunk, for a value
    /// inside the request's window (as [`Windowed::finish`] returns it).
    pub fn above_equal(&self, w: &Windows, i: usize, value: f32) -> [u64; 2] {
        let k = key(value);
        let (lo, hi) = w.bounds[i];
        let c = &self.counted;
        if lo == hi {
            return [self.len - c.below[i] - c.equal[i], c.equal[i]];
        }
        let inside = &c.inside[i];
        let above_window = self.len - c.below[i] - c.equal[i] - inside.len() as u64;
        let above = inside.iter().filter(|&&x| x > k).count() as u64;
        let at_lo = if k == lo { c.equal[i] } else { 0 };
        let equal = inside.iter().filter(|&&x| x == k).count() as u64 + at_lo;
        debug_assert!(k >= lo && k <= hi);
        [above_window + above, equal]
    }

    /// The chunks' counts merged, as one windowed pass over them all would count.
    pub fn merged(pieces: &[PieceWindow], w: &Windows) -> Windowed {
        let mut all = w.acc();
        for p in pieces {
            all = all.merge(p.counted.clone());
        }
        if all.inside.iter().zip(&w.caps).any(|(v, &c)| v.len() > c) {
            all.overflow = true;
        }
        all
    }
}

/// One worker's [`PieceWindow`]s, holding no more keys per request than one windowed pass
/// would ([`Windows::caps`]): past that the keys are dropped and the select falls back to radix,
/// so memory stays bounded however many chunks a scope has.
#[derive(Clone, Debug, Default)]
pub struct PieceWindows {
    pub pieces: Vec<PieceWindow>,
    kept: Vec<usize>,
    overflow: bool,
}

impl PieceWindows {
    pub fn push(&mut self, w: &Windows, piece: PieceWindow) {
        if self.overflow {
            return;
        }
        self.kept.resize(w.requests.len(), 0);
        for (k, v) in self.kept.iter_mut().zip(&piece.counted.inside) {
            *k += v.len();
        }
        if piece.counted.overflow || self.kept.iter().zip(&w.caps).any(|(&k, &c)| k > c) {
            self.overflow = true;
            self.pieces = Vec::new();
            return;
        }
        self.pieces.push(piece);
    }

    pub fn merge(mut self, other: PieceWindows) -> PieceWindows {
        self.overflow |= other.overflow;
        if self.overflow {
            self.pieces = Vec::new();
        } else {
            self.pieces.extend(other.pieces);
        }
        self
    }

    /// [`Self::merge`], dropping the keys where the merged pieces hold more than a request's
    /// cap (as [`Windowed::merge_capped`]).
    pub fn merge_capped(self, other: PieceWindows, w: &Windows) -> PieceWindows {
        let mut kept = self.kept.clone();
        kept.resize(w.requests.len(), 0);
        for (k, o) in kept.iter_mut().zip(&other.kept) {
            *k += o;
        }
        let mut merged = self.merge(other);
        merged.kept = kept;
        if merged.kept.iter().zip(&w.caps).any(|(&k, &c)| k > c) {
            merged.overflow = true;
            merged.pieces = Vec::new();
        }
        merged
    }

    /// The chunks' counts merged, or None when a worker dropped its keys.
    pub fn merged(&self, w: &Windows) -> Option<Windowed> {
        (!self.overflow).then(|| PieceWindow::merged(&self.pieces, w))
    }
}

#[cfg(test)]
mod window_tests;
