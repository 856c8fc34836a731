//! A count per key over a window of keys: what a windowed select keeps instead of the keys
//! themselves when they would not fit its memory budget.
//!
//! The sample that places a window is capped, so beyond ~1 B values per row a window holds a
//! fixed fraction of the row, and at 7 B that is tens of millions of keys per task. The window's
//! span in keys does not grow with the row (it is a fixed stretch of values), so counting each
//! key in it costs memory by the span (8 bytes a key), whatever the number of values. Counts
//! are integers, so merging workers' histograms is order-free: the selected value is the same
//! for any thread count or chunking.

/// Counts of the keys in (lo, lo + span], allocated on the first key counted (a worker that
/// sees none costs nothing).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct KeyHist {
    counts: Vec<u32>,
    /// A count passed 2^32 − 1 (one key held by billions of values): the select falls back.
    overflow: bool,
}

/// Keys all histograms of one select may span together: 2 Mi keys, 8 MiB of counts per worker
/// (and as many keys of the sign tally's flips, 16 MiB).
pub const HIST_BUDGET: u64 = 1 << 21;

impl KeyHist {
    /// Counts key `k`, which must lie in (lo, lo + span].
    #[inline]
    pub fn add(&mut self, lo: u32, span: u32, k: u32) {
        if self.counts.is_empty() {
            self.counts = vec![0; span as usize];
        }
        let c = &mut self.counts[(k - lo - 1) as usize];
        self.overflow |= *c == u32::MAX;
        *c = c.wrapping_add(1);
    }

    pub fn merge(&mut self, other: KeyHist) {
        self.overflow |= other.overflow;
        if self.counts.is_empty() {
            self.counts = other.counts;
        } else {
            for (a, b) in self.counts.iter_mut().zip(other.counts) {
                let (sum, over) = a.overflowing_add(b);
                *a = sum;
                self.overflow |= over;
            }
        }
    }

    /// Keys counted.
    pub fn len(&self) -> u64 {
        self.counts.iter().map(|&c| u64::from(c)).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `r`-th smallest (0-based) key counted above `lo`, None when fewer were counted (or
    /// a count overflowed).
    pub fn nth(&self, lo: u32, r: u64) -> Option<u32> {
        if self.overflow {
            return None;
        }
        let mut seen = 0u64;
        for (j, &c) in self.counts.iter().enumerate() {
            seen += u64::from(c);
            if seen > r {
                return Some(lo + 1 + j as u32);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn nth_matches_sorting(
            offsets in prop::collection::vec(1u32..=40, 0..300),
            split in 0usize..300,
            r in 0u64..320,
        ) {
            let lo = 1000u32;
            let keys: Vec<u32> = offsets.iter().map(|&o| lo + o).collect();
            // Two workers' histograms, merged.
            let (a, b) = keys.split_at(split.min(keys.len()));
            let mut h = KeyHist::default();
            a.iter().for_each(|&k| h.add(lo, 40, k));
            let mut g = KeyHist::default();
            b.iter().for_each(|&k| g.add(lo, 40, k));
            h.merge(g);
            let mut sorted = keys.clone();
            sorted.sort_unstable();
            prop_assert_eq!(h.len(), keys.len() as u64);
            prop_assert_eq!(h.nth(lo, r), sorted.get(r as usize).copied());
        }
    }
}
