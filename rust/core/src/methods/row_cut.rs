//! The rank keys at two ascending ranks of one row (Breadcrumbs' order: |x| descending, equal
//! magnitudes by position), found by counting rather than by `select_nth_unstable`.
//!
//! Why: the two quickselects per row were half of Breadcrumbs' time on 0.5 B bf16 (`perf`:
//! `partition_at_index` 52 %): their compares branch unpredictably, and the standard library's
//! code runs outside the wide copies (`simd!`).
//!
//! How: the magnitudes are spread over about `n / 8` buckets of equal width from 0 to the row's
//! largest. A bucket index is monotone in the magnitude, so every key of a higher bucket ranks
//! before every key of a lower one: walking the counts down from the top finds the bucket of
//! each wanted rank and how many keys precede it, and only that bucket's few keys are selected
//! exactly. The keys are the same as the quickselect's, hence the same bits downstream. A row
//! whose largest magnitude is zero, infinite, NaN or too small to scale goes to the quickselect,
//! as does a short row.
//!
//! Row after row of one task, [`cut_keys_hinted`] first tries windows around the previous row's
//! cuts, which need no histogram; the counting above runs where a rank falls outside them.

/// Elements per bucket, on average.
const PER_BUCKET: usize = 8;
/// At most this many buckets (the index must stay below 2^23 for the rounding trick).
const MAX_BUCKETS: usize = 1 << 20;
/// Rows shorter than this use the quickselect (counting does not pay for itself).
const SHORT: usize = 64;

/// Sort key: ascending key order = descending |x|, then ascending position.
#[inline(always)]
pub fn rank_key(x: f32, pos: usize) -> u64 {
    (((!x.abs().to_bits()) as u64) << 32) | pos as u64
}

/// The keys at ascending ranks `lo` and `hi` of the row's rank keys (`hi` = None: `u64::MAX`).
/// `lo < hi < row.len()`. `keys` is scratch.
#[inline(always)]
pub fn cut_keys(row: &[f32], lo: usize, hi: Option<usize>, keys: &mut Vec<u64>) -> (u64, u64) {
    let n = row.len();
    debug_assert!(lo < n && hi.is_none_or(|h| lo < h && h < n));
    let top = row.iter().fold(0u32, |m, &x| m.max(x.abs().to_bits()));
    let nb = (n / PER_BUCKET).clamp(1, MAX_BUCKETS);
    let scale = (nb - 1) as f32 / f32::from_bits(top);
    if n < SHORT || top == 0 || top >= f32::INFINITY.to_bits() || !scale.is_finite() {
        return by_select(row, lo, hi, keys);
    }
    // Monotone in |x| and free of branches: |x| times a positive constant, rounded to an
    // integer by adding 2^23, clamped.
    const MAGIC: f32 = 8_388_608.0;
    let bucket =
        |x: f32| ((x.abs() * scale + MAGIC).to_bits() - MAGIC.to_bits()).min(nb as u32 - 1);
    keys.clear();
    keys.resize(4 * nb, 0);
    let mut idx = [0u32; 256];
    for xs in row.chunks(256) {
        // The indices first, in a loop that vectorizes; then the increments, spread over four
        // histograms so that a run of equal buckets (small magnitudes crowd the lowest) does
        // not chain each increment on the one before.
        for (i, &x) in idx.iter_mut().zip(xs) {
            *i = bucket(x);
        }
        let idx = &idx[..xs.len()];
        let mut quads = idx.chunks_exact(4);
        for q in &mut quads {
            keys[q[0] as usize] += 1;
            keys[nb + q[1] as usize] += 1;
            keys[2 * nb + q[2] as usize] += 1;
            keys[3 * nb + q[3] as usize] += 1;
        }
        for &i in quads.remainder() {
            keys[i as usize] += 1;
        }
    }
    let (first, rest) = keys.split_at_mut(nb);
    for part in rest.chunks_exact(nb) {
        for (e, &o) in first.iter_mut().zip(part) {
            *e += o;
        }
    }
    keys.truncate(nb);
    // Walking down from the top bucket: the bucket holding rank `r` and the keys above it.
    let (mut b, mut above) = (nb, 0u64);
    let mut find = |r: usize| {
        let r = r as u64;
        while above + keys[b - 1] <= r {
            above += keys[b - 1];
            b -= 1;
        }
        (b - 1, above, keys[b - 1] as usize)
    };
    let (b0, above0, c0) = find(lo);
    let (b1, above1, c1) = match hi {
        Some(h) => find(h),
        None => (usize::MAX, 0, 0),
    };
    // Both ranks in one bucket: its keys are gathered once (no bucket is u32::MAX).
    let shared = b1 == b0;
    let (b1, c1) = if shared || hi.is_none() {
        (u32::MAX, 0)
    } else {
        (b1 as u32, c1)
    };
    // The two buckets' keys: each block of 64 marks its members in a bit mask (a loop that
    // vectorizes), then the few marked are gathered.
    keys.resize(nb + c0 + c1, 0);
    let (s0, s1) = keys[nb..].split_at_mut(c0);
    let b0 = b0 as u32;
    let is = |x: f32| (bucket(x) == b0, bucket(x) == b1);
    gather_two(row, |xs| bits_of(xs, is), s0, s1);
    let r0 = lo - above0 as usize;
    match hi {
        None => (*s0.select_nth_unstable(r0).1, u64::MAX),
        Some(h) if shared => {
            // Both ranks in one bucket: the far one first leaves the near one in front.
            let r1 = h - above0 as usize;
            let k1 = *s0.select_nth_unstable(r1).1;
            (*s0[..r1].select_nth_unstable(r0).1, k1)
        }
        Some(h) => {
            let k1 = *s1.select_nth_unstable(h - above1 as usize).1;
            (*s0.select_nth_unstable(r0).1, k1)
        }
    }
}

/// A row's cut magnitudes guessed from the row before it (rows of one tensor and task have
/// much the same spread): per cut, the bits of |x| found there and the window's relative
/// half-width around it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Hint {
    cuts: [(u32, f32); 2],
    seen: bool,
    /// Misses in a row, and the rows still to count without trying the windows: after k
    /// misses in a row, 2^k − 1 rows (at most [`MAX_REST`]), so that rows whose spreads
    /// alternate (a zero row between others, heads of different scales) cost the windows'
    /// pass on few of them.
    misses: u32,
    rest: u32,
}

/// The window a hint starts with, and the narrowest and widest it may take, relative to the
/// magnitude.
const FIRST_WIDTH: f32 = 0.1;
const MIN_WIDTH: f32 = 1.0 / 256.0;
const MAX_WIDTH: f32 = 0.5;
/// Each window is split into this many brackets of equal width; the pass counts the
/// magnitudes above each bracket's edges, and only the bracket holding the rank is gathered.
const BRACKETS: usize = 3;
const EDGES: usize = BRACKETS + 1;
/// The most rows counted without trying the windows after misses.
const MAX_REST: u32 = 63;

/// [`cut_keys`], trying first the windows of `hint` (the previous row's cuts): one pass counts
/// the magnitudes above each window's bracket edges; where each rank falls in a bracket, a
/// second gathers that bracket's few keys and the rank is selected among them. Where not,
/// [`cut_keys`] counts the row. Either way the keys are the same, and `hint` then holds this
/// row's cuts.
///
/// Why: the histogram's scattered increments and its two extra passes over the row (the
/// largest magnitude, the buckets' members) were most of Breadcrumbs' time; the edges' tests
/// are compares that vectorize.
#[inline(always)]
pub fn cut_keys_hinted(
    row: &[f32],
    lo: usize,
    hi: Option<usize>,
    keys: &mut Vec<u64>,
    hint: &mut Hint,
) -> (u64, u64) {
    let n = row.len();
    let tried = hint.seen && n >= SHORT && hint.rest == 0;
    hint.rest = hint.rest.saturating_sub(1);
    if tried {
        if let Some((found, at)) = windowed(row, lo, hi, keys, hint) {
            hint.misses = 0;
            hint.follow(found, Some(at));
            return found;
        }
    }
    let found = cut_keys(row, lo, hi, keys);
    if tried {
        hint.misses = hint.misses.saturating_add(1);
        hint.rest = ((1u32 << hint.misses.min(6)) - 1).min(MAX_REST);
        for c in &mut hint.cuts {
            c.1 = (c.1 * 2.0).min(MAX_WIDTH);
        }
    }
    hint.follow(found, None);
    found
}

impl Hint {
    /// Centres the windows on the cuts just found. A window whose rank fell in an inner
    /// bracket narrows, one whose rank fell in an outer bracket widens (`at`: the brackets, 1
    /// to [`BRACKETS`]; `None` where the windows were not used). A hint on a magnitude that is
    /// not finite is dropped.
    fn follow(&mut self, (k0, k1): (u64, u64), at: Option<[usize; 2]>) {
        let mag = |k: u64| !((k >> 32) as u32);
        let fresh = !self.seen;
        for (c, (k, j)) in self
            .cuts
            .iter_mut()
            .zip([k0, k1].into_iter().zip(at.unwrap_or_default()))
        {
            c.0 = if k == u64::MAX { 0 } else { mag(k) };
            c.1 = if fresh {
                FIRST_WIDTH
            } else if j == 1 || j == BRACKETS {
                (c.1 * 1.25).min(MAX_WIDTH)
            } else if j != 0 {
                (c.1 * 0.9).max(MIN_WIDTH)
            } else {
                c.1
            };
        }
        self.seen = self.cuts.iter().all(|c| c.0 < f32::INFINITY.to_bits());
    }
}

/// The cut keys where both ranks fall in the hint's windows, with the bracket each fell in;
/// `None` where one does not.
#[inline(always)]
fn windowed(
    row: &[f32],
    lo: usize,
    hi: Option<usize>,
    keys: &mut Vec<u64>,
    hint: &Hint,
) -> Option<((u64, u64), [usize; 2])> {
    // Bits of |x| order as the rank keys do (NaN above infinity above every finite value).
    // Edge e of a window sits at m·(1 + w·(2e/BRACKETS − 1)); bracket e holds the magnitudes
    // from edge e − 1 up to (not including) edge e. A cut at zero takes the brackets [0, 1),
    // [1, 2), … of the bits, the first holding the zeros.
    let edges = |(m, w): (u32, f32)| -> [u32; EDGES] {
        let v = f32::from_bits(m);
        std::array::from_fn(|e| {
            let f = 1.0 + w * (2.0 * e as f32 / BRACKETS as f32 - 1.0);
            if m == 0 {
                e as u32
            } else {
                (v * f).max(0.0).to_bits()
            }
        })
    };
    let mut t = [u32::MAX; 2 * EDGES];
    t[..EDGES].copy_from_slice(&edges(hint.cuts[0]));
    if hi.is_some() {
        t[EDGES..].copy_from_slice(&edges(hint.cuts[1]));
    }
    // above[e]: how many magnitudes reach edge e, every edge in one walk of the row (a
    // vector accumulator per edge): a walk per edge loaded and masked each value 8 times and
    // was 15 % of a warm Breadcrumbs' CPU time (`perf`, 0.5 B bf16).
    let mut above = [0usize; 2 * EDGES];
    if hi.is_some() {
        above = count_reaching(row, &t);
    } else {
        let t0: &[u32; EDGES] = t[..EDGES].try_into().expect("EDGES keys");
        above[..EDGES].copy_from_slice(&count_reaching(row, t0));
    }
    // The bracket holding descending rank r: above[e] <= r < above[e - 1].
    let bracket =
        |above: &[usize], r: usize| (1..EDGES).find(|&e| above[e] <= r && r < above[e - 1]);
    let b0 = bracket(&above[..EDGES], lo)?;
    let b1 = match hi {
        Some(h) => bracket(&above[EDGES..], h)?,
        None => 0,
    };
    // Each bracket's keys, gathered in one pass into a buffer of its own (the two windows may
    // overlap).
    let (g0, g1) = (
        above[b0 - 1] - above[b0],
        if hi.is_some() {
            above[EDGES + b1 - 1] - above[EDGES + b1]
        } else {
            0
        },
    );
    keys.clear();
    keys.resize(g0 + g1, 0);
    let (s0, s1) = keys.split_at_mut(g0);
    let (l0, h0) = (t[b0 - 1], t[b0]);
    let (l1, h1) = if hi.is_some() {
        (t[EDGES + b1 - 1], t[EDGES + b1])
    } else {
        (u32::MAX, u32::MAX)
    };
    gather_two(row, |xs| within_bits(xs, [(l0, h0), (l1, h1)]), s0, s1);
    let k0 = *s0.select_nth_unstable(lo - above[b0]).1;
    let k1 = match hi {
        Some(h) => *s1.select_nth_unstable(h - above[EDGES + b1]).1,
        None => u64::MAX,
    };
    Some(((k0, k1), [b0, b1]))
}

/// Per key of `t`, how many magnitudes of `row` (bits of |x|, NaN above infinity) reach it.
#[inline(always)]
fn count_reaching<const N: usize>(row: &[f32], t: &[u32; N]) -> [usize; N] {
    // u32 counters (a row is shorter than 2^32) vectorize twice as wide as usize.
    let mut acc = [0u32; N];
    for &x in row {
        let b = x.to_bits() & 0x7fff_ffff;
        for (a, &te) in acc.iter_mut().zip(t) {
            *a += u32::from(b >= te);
        }
    }
    acc.map(|a| a as usize)
}

/// Fills `s0` and `s1` with the rank keys, in position order, of the row's elements in its
/// first and its second set: `masks` gives each block of (at most) 64 elements' sets as bits,
/// whose few set bits are then visited. Each slice is exactly as long as its set.
#[inline(always)]
fn gather_two(row: &[f32], masks: impl Fn(&[f32]) -> (u64, u64), s0: &mut [u64], s1: &mut [u64]) {
    let (mut i0, mut i1) = (0, 0);
    for (blk, xs) in row.chunks(64).enumerate() {
        let (m0, m1) = masks(xs);
        for (mut m, s, i) in [(m0, &mut *s0, &mut i0), (m1, &mut *s1, &mut i1)] {
            while m != 0 {
                let j = blk * 64 + m.trailing_zeros() as usize;
                m &= m - 1;
                s[*i] = rank_key(row[j], j);
                *i += 1;
            }
        }
    }
}

/// The bits of the elements of `xs` (at most 64) that `is` puts in its first and its second
/// set, as a loop over the elements.
#[inline(always)]
fn bits_of(xs: &[f32], is: impl Fn(f32) -> (bool, bool)) -> (u64, u64) {
    let (mut m0, mut m1) = (0u64, 0u64);
    for (k, &x) in xs.iter().enumerate() {
        let (a, b) = is(x);
        m0 |= u64::from(a) << k;
        m1 |= u64::from(b) << k;
    }
    (m0, m1)
}

/// [`bits_of`] for the sets of magnitudes (the bits of |x|) in [l, h) each: compares into mask
/// registers in AVX-512 where the CPU has it (`gather_avx512.rs`). The loop above builds each
/// bit as a vector lane (a mask-to-vector move, two shifts and an OR per element, `objdump`)
/// and was a sixth of a warm Breadcrumbs' CPU time (`perf`, 0.5 B bf16).
#[inline(always)]
fn within_bits(xs: &[f32], w: [(u32, u32); 2]) -> (u64, u64) {
    #[cfg(target_arch = "x86_64")]
    if let (Ok(block), crate::simd::Tier::Avx512) = (xs.try_into(), crate::simd::tier()) {
        // SAFETY: the tier says the CPU has AVX-512 F, DQ and VL.
        return unsafe { super::gather_avx512::within_bits(block, w) };
    }
    let within = |x: f32, (l, h): (u32, u32)| (l..h).contains(&(x.to_bits() & 0x7fff_ffff));
    bits_of(xs, |x| (within(x, w[0]), within(x, w[1])))
}

/// [`cut_keys`] by quickselects over every key of the row.
fn by_select(row: &[f32], lo: usize, hi: Option<usize>, keys: &mut Vec<u64>) -> (u64, u64) {
    keys.clear();
    keys.extend(row.iter().enumerate().map(|(i, &x)| rank_key(x, i)));
    // The far cut first: it leaves the `hi` smallest keys in front (a small part of the row at
    // the usual densities), where the near one is then selected. Keys are distinct (the
    // position is in their low bits), so either order finds the same two.
    let (k1, front) = match hi {
        Some(h) => (*keys.select_nth_unstable(h).1, h),
        None => (u64::MAX, row.len()),
    };
    (*keys[..front].select_nth_unstable(lo).1, k1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keys at the two ranks from a full sort of the row.
    fn sorted(row: &[f32], lo: usize, hi: Option<usize>) -> (u64, u64) {
        let mut k: Vec<u64> = row
            .iter()
            .enumerate()
            .map(|(i, &x)| rank_key(x, i))
            .collect();
        k.sort_unstable();
        (k[lo], hi.map_or(u64::MAX, |h| k[h]))
    }

    fn rows() -> Vec<Vec<f32>> {
        let mut seed = 5u64;
        let mut next = move || {
            seed = crate::rng::mix(seed);
            (seed >> 40) as f32 / 16_777_216.0 - 0.5
        };
        let mut out = Vec::new();
        for n in [1usize, 2, 63, 64, 65, 100, 1000, 1536, 4099] {
            out.push((0..n).map(|_| next()).collect::<Vec<_>>());
            // Heavy tails: most magnitudes in the lowest buckets.
            out.push((0..n).map(|_| next().powi(5) * 1e-3).collect());
            // Few distinct values: large ties at every cut, -0 among the zeros.
            out.push(
                (0..n)
                    .map(|_| {
                        let v = (next() * 6.0).round() / 4.0;
                        if v == 0.0 && next() > 0.0 {
                            -0.0
                        } else {
                            v
                        }
                    })
                    .collect(),
            );
            out.push(vec![0.0; n]);
            // Subnormal magnitudes only (the scale would overflow: quickselect).
            out.push((0..n).map(|_| next() * 1e-39).collect());
            let mut special: Vec<f32> = (0..n).map(|_| next()).collect();
            special[n / 2] = if n % 2 == 0 { f32::INFINITY } else { f32::NAN };
            out.push(special);
            // One huge outlier: everything else in bucket 0.
            let mut outlier: Vec<f32> = (0..n).map(|_| next()).collect();
            outlier[n - 1] = 1e30;
            out.push(outlier);
        }
        out
    }

    /// Rows in the order a task's chunk passes them to the hinted cuts: runs of one spread
    /// (the windows hit), a spread 3x wider and 100x narrower (they miss), ties and zeros
    /// at the cuts, a NaN and an infinity, a row of zeros, and back.
    fn row_sequence(n: usize) -> Vec<Vec<f32>> {
        let mut seed = 11u64;
        let mut next = move || {
            seed = crate::rng::mix(seed);
            (seed >> 40) as f32 / 16_777_216.0 - 0.5
        };
        let mut out = Vec::new();
        for scale in [1.0f32, 1.0, 1.0, 1.02, 0.98, 3.0, 3.0, 0.03, 0.03, 1.0] {
            out.push((0..n).map(|_| next() * scale).collect::<Vec<_>>());
        }
        for _ in 0..3 {
            // Coarse values: long ties at both cuts.
            out.push((0..n).map(|_| (next() * 8.0).round() / 8.0).collect());
        }
        for zeros in [n / 2, n - n / 50, n] {
            // Most of the row zero: the far cut (and at `n`, the near one) at magnitude 0.
            out.push(
                (0..n)
                    .map(|i| if i < zeros { 0.0 } else { next() })
                    .collect(),
            );
        }
        let mut special: Vec<f32> = (0..n).map(|_| next()).collect();
        special[n / 3] = f32::NAN;
        special[n / 2] = f32::INFINITY;
        out.push(special.clone());
        out.push((0..n).map(|_| next()).collect());
        special[1] = -f32::INFINITY;
        special.swap(0, n - 1);
        out.push(special);
        for _ in 0..4 {
            out.push((0..n).map(|_| next()).collect());
        }
        out
    }

    /// The AVX-512 bits (where this CPU has them) and the portable loop's, over blocks of
    /// magnitudes near the ranges' ends, specials (±0, ±∞, NaN, subnormals) and empty ranges.
    #[test]
    fn within_bits_match_the_portable_loop() {
        let mut z = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            z = crate::rng::mix(z.wrapping_add(0x9E37_79B9_7F4A_7C15));
            z
        };
        let specials = [
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1e-40,
            -1e-40,
        ];
        for _ in 0..2000 {
            let l = (next() as u32) >> (next() % 32) as u32;
            let ranges = [
                (l, l.wrapping_add((next() % 1000) as u32)),
                (l, l),
                (l + 1, l),
            ];
            let pick = |r: u64| ranges[(r % 3) as usize];
            let w = [pick(next()), pick(next())];
            let xs: [f32; 64] = std::array::from_fn(|_| match next() % 8 {
                0 => specials[(next() % 7) as usize],
                1 | 2 => {
                    let b = w[(next() % 2) as usize].0.wrapping_add((next() % 5) as u32);
                    let v = f32::from_bits(b.wrapping_sub(2) & 0x7fff_ffff);
                    if next() % 2 == 0 {
                        -v
                    } else {
                        v
                    }
                }
                _ => f32::from_bits(next() as u32),
            });
            let within = |x: f32, (l, h): (u32, u32)| (l..h).contains(&(x.to_bits() & 0x7fff_ffff));
            let want = bits_of(&xs, |x| (within(x, w[0]), within(x, w[1])));
            assert_eq!(within_bits(&xs, w), want, "{w:?}");
            assert_eq!(
                within_bits(&xs[..37], w),
                (want.0 & ((1 << 37) - 1), want.1 & ((1 << 37) - 1))
            );
        }
    }

    #[test]
    fn hinted_cuts_are_the_sorted_keys_row_after_row() {
        let mut keys = Vec::new();
        let mut tried = 0;
        for n in [64usize, 100, 1536, 4099] {
            let cuts = [
                (n / 160, Some(n / 160 + n * 3 / 20)),
                (0, Some(n / 2)),
                (n / 10, None),
                (n - 2, Some(n - 1)),
                (0, Some(1)),
            ];
            for (lo, hi) in cuts {
                let mut hint = Hint::default();
                for (r, row) in row_sequence(n).iter().enumerate() {
                    let want = sorted(row, lo, hi);
                    tried += usize::from(hint.seen && hint.rest == 0);
                    let got = cut_keys_hinted(row, lo, hi, &mut keys, &mut hint);
                    assert_eq!(got, want, "n {n} lo {lo} hi {hi:?} row {r}");
                }
            }
        }
        // Of 520 rows; after misses the windows rest a few rows.
        assert!(tried > 200, "the windows were tried on {tried} rows");
    }

    /// The windows themselves, where they hold the ranks, against the sorted keys; and that
    /// they do hold them for a row like the one before.
    #[test]
    fn windows_select_the_sorted_keys_where_they_hit() {
        let mut keys = Vec::new();
        let rows = row_sequence(1536);
        let mut hits = 0;
        for pair in rows.windows(2) {
            for (lo, hi) in [(9, Some(239)), (100, None), (0, Some(767))] {
                let mut hint = Hint::default();
                cut_keys_hinted(&pair[0], lo, hi, &mut keys, &mut hint);
                if let Some((got, at)) = windowed(&pair[1], lo, hi, &mut keys, &hint) {
                    hits += 1;
                    assert_eq!(got, sorted(&pair[1], lo, hi), "lo {lo} hi {hi:?}");
                    assert!((1..=BRACKETS).contains(&at[0]));
                }
            }
        }
        // Many of the pairs are of one spread (or the same zeros): 44 of 75 hit.
        assert!(hits >= 20, "{hits} hits");
        // A cut at zero: the zeros' bracket holds it in the next such row.
        let mostly_zero: Vec<f32> = (0..1536)
            .map(|i| f32::from(u8::from(i % 10 == 0)))
            .collect();
        let mut hint = Hint::default();
        cut_keys_hinted(&mostly_zero, 9, Some(239), &mut keys, &mut hint);
        let got = windowed(&mostly_zero, 9, Some(239), &mut keys, &hint).map(|w| w.0);
        assert_eq!(got, Some(sorted(&mostly_zero, 9, Some(239))));
    }

    #[test]
    fn cuts_are_the_sorted_keys_at_the_ranks() {
        let mut keys = Vec::new();
        for row in rows() {
            let n = row.len();
            let mut pairs = vec![(0, None), (n - 1, None)];
            for (lo, hi) in [
                (0, 1),
                (0, n - 1),
                (n / 100, n / 5),
                (n / 3, n / 3 + 1),
                (n / 2, n - 1),
            ] {
                if lo < hi && hi < n {
                    pairs.push((lo, Some(hi)));
                }
            }
            pairs.push((n / 10, None));
            for (lo, hi) in pairs {
                let want = sorted(&row, lo, hi);
                assert_eq!(
                    cut_keys(&row, lo, hi, &mut keys),
                    want,
                    "n {n} lo {lo} hi {hi:?}"
                );
                assert_eq!(
                    by_select(&row, lo, hi, &mut keys),
                    want,
                    "n {n} lo {lo} hi {hi:?}"
                );
            }
        }
    }
}
