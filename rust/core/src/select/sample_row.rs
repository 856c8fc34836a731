//! One row of a sample as the windows read it: its keys sorted, and per quantile how much more
//! the sample's count of keys below it varies than independent draws would make it vary (the
//! design effect of drawing runs of neighbours).
//!
//! Why: a sample is drawn in runs of neighbouring values, because on inputs bigger than memory
//! each run costs one random read from disk whatever its length up to a page, and the reads are
//! what a cold select spends its time on. Neighbours are not independent draws: where a
//! tensor's rows or columns have scales of their own, a run's values are alike, and the count of
//! sample keys below a quantile varies by more than the binomial spread the windows assume, so
//! windows placed by it would miss their rank (and a miss costs the radix select's extra
//! passes). The runs themselves show how much more: the variance of their counts below a key,
//! against the binomial variance, at probe quantiles spread over the row.

use std::ops::Deref;

/// A row's sorted sample keys and design effects (see the module doc).
#[derive(Clone, Debug, Default)]
pub struct SampleRow {
    keys: Vec<u32>,
    /// (p, design effect ≥ 1) at the probe quantiles, p ascending; empty: 1 everywhere.
    effect: Vec<(f64, f64)>,
}

/// Keys taken as independent draws (sorted here): every design effect 1.
impl From<Vec<u32>> for SampleRow {
    fn from(mut keys: Vec<u32>) -> SampleRow {
        keys.sort_unstable();
        SampleRow {
            keys,
            effect: Vec::new(),
        }
    }
}

impl Deref for SampleRow {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        &self.keys
    }
}

/// The design effects need this many runs to be estimated at all; with fewer the row's keys
/// count as independent draws (a sample that small is the whole scope or nearly).
const MIN_RUNS: usize = 32;

impl SampleRow {
    /// A row from its keys in the order drawn, `runs` the length of each run in that order
    /// (they sum to the keys' count).
    pub fn from_runs(keys: Vec<u32>, runs: &[u32]) -> SampleRow {
        debug_assert_eq!(runs.iter().map(|&m| m as usize).sum::<usize>(), keys.len());
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        let effect = match runs.len() < MIN_RUNS {
            true => Vec::new(),
            false => effects(&keys, runs, &sorted),
        };
        SampleRow {
            keys: sorted,
            effect,
        }
    }

    /// The design effect at quantile `p`: the larger of the probes' on each side of it (1
    /// where nothing was probed).
    pub fn effect_at(&self, p: f64) -> f64 {
        let e = &self.effect;
        let i = e.partition_point(|&(q, _)| q < p);
        let below = i.checked_sub(1).map(|j| e[j].1);
        let above = e.get(i).map(|&(_, d)| d);
        match (below, above) {
            (Some(a), Some(b)) => a.max(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => 1.0,
        }
    }
}

/// The design effect at each probe ([`probes`]) of a row: keys in the order drawn, its runs'
/// lengths, the same keys sorted. For each probe's key t (a share p of the keys lie below it),
/// the runs' counts below t, c, against their expectations m·p: Σ (c − m p)², against the
/// binomial variance n p (1 − p); at least 1 (fewer than independent draws would vary is
/// noise, not a narrower window).
///
/// The keys are walked once in draw order, each counted in the bucket between the probes'
/// keys it falls in (a table on its top 16 bits finds nearly every bucket at once), and each
/// run's counts below every probe are its buckets' prefix sums: sorting the runs and searching
/// each for each probe had cost most of a sort of the whole sample more.
fn effects(keys: &[u32], runs: &[u32], sorted: &[u32]) -> Vec<(f64, f64)> {
    let n = sorted.len();
    // The probes' distinct keys, ascending, and the share of keys below each.
    let mut at: Vec<(u32, f64)> = Vec::new();
    for k in probes(n) {
        let t = sorted[k];
        if at.last().is_none_or(|&(u, _)| u < t) {
            at.push((t, sorted.partition_point(|&x| x < t) as f64 / n as f64));
        }
    }
    let t: Vec<u32> = at.iter().map(|&(t, _)| t).collect();
    let bucket = Buckets::new(&t);
    // Sums of integers per probe, exact in any order of the runs (the threads' split of a
    // pass orders them): Σ (c − m p)² = Σ c² − 2 p Σ c m + p² Σ m².
    let (mut cc, mut cm, mut mm) = (vec![0u64; t.len()], vec![0u64; t.len()], 0u64);
    let mut hist = vec![0u64; t.len() + 1];
    let mut from = 0;
    for &m in runs {
        hist.fill(0);
        for &x in &keys[from..from + m as usize] {
            hist[bucket.of(x)] += 1;
        }
        from += m as usize;
        let m = u64::from(m);
        // Keys below probe i: those in buckets 0..=i (bucket b: b probe keys ≤ the key).
        let mut c = 0;
        for i in 0..t.len() {
            c += hist[i];
            cc[i] += c * c;
            cm[i] += c * m;
        }
        mm += m * m;
    }
    // r / (r − 1): p is estimated from these same runs.
    let r = runs.len() as f64;
    at.iter()
        .enumerate()
        .map(|(i, &(_, p))| {
            if p <= 0.0 || p >= 1.0 {
                return (p, 1.0);
            }
            let squares = cc[i] as f64 - 2.0 * p * cm[i] as f64 + p * p * mm as f64;
            let variance = squares * r / (r - 1.0);
            (p, (variance / (n as f64 * p * (1.0 - p))).max(1.0))
        })
        .collect()
}

/// For ascending keys t, a key's bucket: how many of t are ≤ it. A table over the top 16
/// bits holds each bucket range; only keys sharing their top bits with some t search it.
struct Buckets<'t> {
    t: &'t [u32],
    /// Per top 16 bits: the bucket of its lowest key and of its highest.
    range: Vec<(u8, u8)>,
}

impl<'t> Buckets<'t> {
    fn new(t: &'t [u32]) -> Buckets<'t> {
        assert!(t.len() < 256, "probes fit a byte");
        // How many of t are ≤ each top's lowest and highest key: both grow with the top, so
        // one walk along t finds them (a binary search per top cost 3× as much).
        let (mut below_lo, mut below_hi) = (0, 0);
        let range = (0..=u16::MAX)
            .map(|h| {
                let lo = u32::from(h) << 16;
                while t.get(below_lo).is_some_and(|&u| u <= lo) {
                    below_lo += 1;
                }
                while t.get(below_hi).is_some_and(|&u| u <= lo | 0xFFFF) {
                    below_hi += 1;
                }
                (below_lo as u8, below_hi as u8)
            })
            .collect();
        Buckets { t, range }
    }

    #[inline]
    fn of(&self, x: u32) -> usize {
        let (lo, hi) = self.range[(x >> 16) as usize];
        if lo == hi {
            return lo as usize;
        }
        let (lo, hi) = (lo as usize, hi as usize);
        lo + self.t[lo..hi].partition_point(|&u| u <= x)
    }
}

/// Sample positions probed in a row of `n` keys: sixteenths, and halvings towards each end
/// (a select's rank is often far in a tail: TIES keeps a fifth, a row's maximum is its last).
fn probes(n: usize) -> Vec<usize> {
    let mut k: Vec<usize> = (1..16).map(|j| j * n / 16).collect();
    let mut d = n / 32;
    while d >= 1 {
        k.push(d);
        k.push(n - d);
        d /= 2;
    }
    k.retain(|&k| k > 0 && k < n);
    k.sort_unstable();
    k.dedup();
    k
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::mix;
    use crate::select::{key, Request, Windows};

    /// Uniform draws in [0, 1) from a seeded counter.
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Rng {
            Rng(seed << 32)
        }

        fn next_f64(&mut self) -> f64 {
            self.0 += 1;
            (mix(self.0) >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// Standard normal draws (Box–Muller) from a seeded stream.
    fn normals(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u = rng.next_f64().max(1e-300);
                let v = rng.next_f64();
                ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
            })
            .collect()
    }

    /// `rows` rows of `width` values, each row's values a scale of its own (log-uniform over
    /// 1..100) times standard normal draws: neighbours alike, as in a weight matrix.
    fn scaled_rows(seed: u64, rows: usize, width: usize) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        let mut out = Vec::with_capacity(rows * width);
        for _ in 0..rows {
            let scale = 100f64.powf(rng.next_f64()) as f32;
            out.extend(normals(&mut rng, width).iter().map(|x| x * scale));
        }
        out
    }

    /// Runs of `run` values every `step`, from `phase` on: keys in draw order and run lengths.
    fn runs_of(values: &[f32], run: usize, step: usize, phase: usize) -> (Vec<u32>, Vec<u32>) {
        let mut keys = Vec::new();
        let mut runs = Vec::new();
        let mut at = phase;
        while at < values.len() {
            let end = (at + run).min(values.len());
            keys.extend(values[at..end].iter().map(|&v| key(v)));
            runs.push((end - at) as u32);
            at += step;
        }
        (keys, runs)
    }

    #[test]
    fn independent_draws_show_no_effect() {
        let values = normals(&mut Rng::new(7), 1 << 18);
        let (keys, runs) = runs_of(&values, 256, 512, 0);
        let row = SampleRow::from_runs(keys.clone(), &runs);
        let mut sorted = keys;
        sorted.sort_unstable();
        assert_eq!(&*row, &sorted[..]);
        assert!(row.effect.len() > 20);
        for &(p, d) in &row.effect {
            assert!((1.0..1.5).contains(&d), "p {p}: effect {d}");
        }
    }

    #[test]
    fn runs_within_rows_of_their_own_scale_show_it() {
        let values = scaled_rows(3, 512, 2048);
        let (keys, runs) = runs_of(&values, 256, 2048, 100);
        let row = SampleRow::from_runs(keys, &runs);
        // Between a run's values the scale is shared: a run's count below a quantile off the
        // median is mostly all or nothing.
        assert!(row.effect_at(0.8) > 20.0, "{:?}", row.effect);
        assert!(row.effect_at(0.2) > 20.0, "{:?}", row.effect);
        // The median of symmetric draws is 0 at any scale: no effect there.
        let median = row.effect.iter().find(|e| e.0 == 0.5).expect("probed");
        assert!(median.1 < 1.5, "{median:?}");
    }

    /// The design effects against a literal count of each run's keys below each probe's key,
    /// over keys with many ties (bf16's: the low 16 bits zero) and without.
    #[test]
    fn effects_count_each_run_below_each_probe() {
        for (seed, mask) in [(1u64, u32::MAX), (2, 0xFFFF_0000), (3, 0xFFF0_0000)] {
            let values = scaled_rows(seed, 64, 1000);
            let keys: Vec<u32> = values.iter().map(|&v| key(v) & mask).collect();
            let runs: Vec<u32> = (0..keys.len() / 700)
                .map(|i| 600 + (i % 3) as u32 * 50)
                .collect();
            let keys = &keys[..runs.iter().sum::<u32>() as usize];
            let row = SampleRow::from_runs(keys.to_vec(), &runs);
            let n = keys.len();
            let mut want = Vec::new();
            for k in probes(n) {
                let t = row[k];
                let p = keys.iter().filter(|&&x| x < t).count() as f64 / n as f64;
                if want.last().is_some_and(|&(q, _): &(f64, f64)| q == p) {
                    continue;
                }
                let mut squares = 0.0;
                let mut from = 0;
                for &m in &runs {
                    let run = &keys[from..from + m as usize];
                    from += m as usize;
                    let c = run.iter().filter(|&&x| x < t).count() as f64;
                    squares += (c - f64::from(m) * p).powi(2);
                }
                let r = runs.len() as f64;
                let d = match p > 0.0 && p < 1.0 {
                    true => (squares * r / (r - 1.0) / (n as f64 * p * (1.0 - p))).max(1.0),
                    false => 1.0,
                };
                want.push((p, d));
            }
            assert_eq!(row.effect.len(), want.len());
            for (&(p, d), &(q, e)) in row.effect.iter().zip(&want) {
                assert_eq!(p, q);
                assert!((d - e).abs() <= 1e-9 * e, "p {p}: {d} against {e}");
            }
            assert!(row.effect.iter().any(|&(_, d)| d > 2.0));
        }
    }

    #[test]
    fn effects_between_probes_take_the_larger_neighbour() {
        let row = SampleRow {
            keys: vec![0; 4],
            effect: vec![(0.25, 2.0), (0.5, 5.0), (0.75, 1.0)],
        };
        assert_eq!(row.effect_at(0.1), 2.0);
        assert_eq!(row.effect_at(0.3), 5.0);
        assert_eq!(row.effect_at(0.5), 5.0);
        assert_eq!(row.effect_at(0.6), 5.0);
        assert_eq!(row.effect_at(0.9), 1.0);
        assert_eq!(SampleRow::from(vec![3, 1, 2]).effect_at(0.5), 1.0);
        assert_eq!(&*SampleRow::from(vec![3, 1, 2]), &[1, 2, 3]);
    }

    /// The bucket table against its definition (how many probe keys are ≤ a key), for
    /// probes sharing their top 16 bits, at the ends of the key range, and for keys between.
    #[test]
    fn buckets_count_the_probes_at_or_below_a_key() {
        let t = [
            0,
            5,
            0x0001_0000,
            0x0001_8000,
            0x0001_FFFF,
            0x7F80_0000,
            u32::MAX,
        ];
        let b = Buckets::new(&t);
        let mut rng = Rng::new(4);
        let mut keys: Vec<u32> = (0..20_000)
            .map(|_| (rng.next_f64() * 2f64.powi(32)) as u32)
            .collect();
        keys.extend(
            t.iter()
                .flat_map(|&u| [u.wrapping_sub(1), u, u.wrapping_add(1)]),
        );
        keys.extend([0x0000_FFFF, 0x0001_7FFF, 0x0002_0000, 0x7F7F_FFFF]);
        for x in keys {
            assert_eq!(b.of(x), t.iter().filter(|&&u| u <= x).count(), "key {x:#x}");
        }
    }

    #[test]
    fn too_few_runs_count_as_independent_draws() {
        let values = scaled_rows(5, 16, 2048);
        let (keys, runs) = runs_of(&values, 256, 2048, 0);
        assert!(runs.len() < MIN_RUNS);
        assert!(SampleRow::from_runs(keys, &runs).effect.is_empty());
    }

    #[test]
    fn probes_lie_inside_the_row_and_reach_its_ends() {
        let k = probes(1 << 12);
        assert!(k.windows(2).all(|w| w[0] < w[1]));
        assert_eq!((k[0], k[k.len() - 1]), (1, (1 << 12) - 1));
        assert!(k.contains(&2048) && k.contains(&(4096 - 128)));
        assert!(probes(1).is_empty());
    }

    /// A sample of long runs places 6σ windows that hold their rank over rows of scales of
    /// their own, because the windows are widened by the runs' design effect; as independent
    /// draws (the same keys, effect 1) they miss. The rank is found by sorting the data.
    #[test]
    fn windows_from_long_runs_hold_their_rank() {
        let values = scaled_rows(11, 1024, 2048);
        let total = values.len() as u64;
        let mut all: Vec<u32> = values.iter().map(|&v| key(v)).collect();
        all.sort_unstable();
        let (mut held, mut held_independent) = (0, 0);
        let trials = 24u32;
        for t in 0..trials {
            let (keys, runs) = runs_of(&values, 512, 8192, 333 * t as usize + 17);
            // Off the median (where the scales move nothing), from either side.
            let share = 0.7 + 0.25 * f64::from(t / 2) / 12.0;
            let share = if t % 2 == 0 { share } else { 1.0 - share };
            let rank = (total as f64 * share) as u64;
            let want = all[rank as usize];
            let holds = |row: SampleRow| {
                let w = Windows::from_sample(vec![Request { row: 0, rank }], &[row], total, 6.0);
                let (lo, hi) = w.bounds[0];
                lo <= want && want <= hi
            };
            held += usize::from(holds(SampleRow::from_runs(keys.clone(), &runs)));
            held_independent += usize::from(holds(SampleRow::from(keys)));
        }
        assert_eq!(held, trials as usize);
        assert!(held_independent < trials as usize / 2, "{held_independent}");
    }
}
