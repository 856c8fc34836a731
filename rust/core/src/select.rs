//! Exact order statistics over data too large to hold: a two-pass radix select on the 32-bit
//! order-preserving keys of f32 values. Pass one histograms the high 16 bits of every key; the
//! bucket holding the wanted rank is then resolved exactly by histogramming the low 16 bits of
//! the keys inside it. Counts are integers, so merging per-thread histograms is order-free and the
//! result is bit-identical for any thread count or chunking.

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
#[derive(Clone, Debug)]
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

    /// Pass one: counts the high halves of the keys of `values` into histogram `row`.
    pub fn count_high(&mut self, row: usize, values: &[f32]) {
        let h = &mut self.bins[row * BINS..(row + 1) * BINS];
        for &v in values {
            h[(key(v) >> 16) as usize] += 1;
        }
    }

    /// Pass two: for every request on `row`, counts the low halves of keys in its bucket.
    pub fn count_low(&mut self, found: &Buckets, row: usize, values: &[f32]) {
        for (i, (req, &(bucket, _))) in found.requests.iter().zip(&found.buckets).enumerate() {
            if req.row != row {
                continue;
            }
            let h = &mut self.bins[i * BINS..(i + 1) * BINS];
            for &v in values {
                let k = key(v);
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
        let reqs = vec![Request { row: 0, rank }];
        let mut high = Hist::new(1);
        for c in values.chunks(chunk) {
            high.count_high(0, c);
        }
        let found = Buckets::resolve(&high, reqs);
        let mut low = found.low_hist();
        for c in values.chunks(chunk) {
            low.count_low(&found, 0, c);
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
    }
}
