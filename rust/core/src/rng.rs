//! The counter-based generator behind DARE masks and random pooling.
//!
//! Every draw is a pure function of (seed, stream, tensor name, element index), so results do not
//! depend on threads, chunk size or the order chunks run in. The construction is SplitMix64's
//! finalizer over a keyed counter; it is short enough to re-implement in numpy, which the test
//! oracle does independently:
//!
//! ```text
//! mix(z)    = z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^ (z >> 31)
//! key       = mix(mix(seed ^ mix(stream + G)) ^ fnv1a64(name))      G = 0x9E3779B97F4A7C15
//! draw(i)   = mix(key + (i + 1) * G)                                  (all arithmetic mod 2^64)
//! keep(i)   = float32(draw(i) >> 40) * 2^-24 < density               (DARE, stream = task index)
//! pick(i,N) = ((draw(i) >> 32) * N) >> 32                             (random pooling, stream = 2^64-1)
//! ```

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The stream used by random pooling (DARE uses the task index).
pub const POOL_STREAM: u64 = u64::MAX;

#[inline(always)]
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a, 64-bit: a stable hash of the tensor name (std's hashers are not stable across runs).
pub fn fnv1a64(s: &str) -> u64 {
    s.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// The draws for one (seed, stream, tensor).
#[derive(Clone, Copy, Debug)]
pub struct Stream {
    key: u64,
}

impl Stream {
    pub fn new(seed: u64, stream: u64, tensor: &str) -> Stream {
        let key = mix(mix(seed ^ mix(stream.wrapping_add(GOLDEN))) ^ fnv1a64(tensor));
        Stream { key }
    }

    #[inline(always)]
    pub fn draw(&self, index: u64) -> u64 {
        mix(self.counter(index))
    }

    /// The counter `draw(index)` mixes. Consecutive indices step it by the golden-ratio constant
    /// ([`Stream::draw_at`]), so a loop over a run of indices can carry it with one add
    /// instead of a 64-bit multiply per element.
    #[inline(always)]
    pub fn counter(&self, index: u64) -> u64 {
        self.key
            .wrapping_add(index.wrapping_add(1).wrapping_mul(GOLDEN))
    }

    /// The draw at `counter` ([`Stream::counter`]); returns the next index's counter too.
    #[inline(always)]
    pub fn draw_at(counter: u64) -> (u64, u64) {
        (mix(counter), counter.wrapping_add(GOLDEN))
    }

    /// Bernoulli(density): true with probability `density` (exact multiples of 2^-24). The
    /// definition; [`keep_below`] gives the same answer as an integer compare.
    #[inline(always)]
    pub fn keep(&self, index: u64, density: f32) -> bool {
        self.unit(index) < density
    }

    /// Uniform in [0, 1), a multiple of 2^-24 (exact in f32): `keep` compares it.
    #[inline(always)]
    pub fn unit(&self, index: u64) -> f32 {
        unit_of(self.draw(index))
    }

    /// Uniform in `0..n` for `n < 2^32`.
    #[inline]
    pub fn pick(&self, index: u64, n: u64) -> usize {
        (((self.draw(index) >> 32) * n) >> 32) as usize
    }
}

/// The unit a draw gives ([`Stream::unit`]): its top 24 bits times 2^-24.
#[inline(always)]
pub fn unit_of(draw: u64) -> f32 {
    ((draw >> 40) as f32) * (1.0 / 16_777_216.0)
}

/// [`Stream::keep`] as one integer compare: keep(i) ⇔ `draw(i) >> 40 < keep_below(density)`.
///
/// Why it is the same: v = draw >> 40 is below 2^24, so `unit` = v·2^-24 is exact in f32 and
/// unit < density ⇔ v < density·2^24 ⇔ v < ⌈density·2^24⌉ for the integer v (density·2^24 is
/// exact in f64). The float path converts eight 64-bit lanes to f32 twice per 16 draws; the
/// compare takes one instruction. A NaN or non-positive density keeps nothing, as `<` does.
pub fn keep_below(density: f32) -> u64 {
    let t = (f64::from(density) * 16_777_216.0).ceil();
    if t > 0.0 {
        t.min(16_777_216.0) as u64
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_values() {
        // Pinned so an accidental change to the generator (which would change every output) fails.
        assert_eq!(mix(0), 0);
        assert_eq!(fnv1a64(""), 0xCBF2_9CE4_8422_2325);
        let s = Stream::new(0, 0, "w");
        assert_eq!(s.draw(0), Stream::new(0, 0, "w").draw(0));
        assert_ne!(s.draw(0), Stream::new(1, 0, "w").draw(0));
        assert_ne!(s.draw(0), Stream::new(0, 1, "w").draw(0));
        assert_ne!(s.draw(0), Stream::new(0, 0, "v").draw(0));
    }

    #[test]
    fn keep_below_is_keep() {
        // Densities at, just above and just below multiples of 2^-24, and the ends.
        let step = 1.0f32 / 16_777_216.0;
        let mut densities = vec![
            0.0,
            -0.5,
            f32::NAN,
            1.0,
            1.5,
            f32::INFINITY,
            f32::MIN_POSITIVE,
        ];
        for k in [1u32, 2, 3, 1000, 8_388_608, 16_777_215] {
            let d = k as f32 * step;
            densities.extend([
                d,
                f32::from_bits(d.to_bits() + 1),
                f32::from_bits(d.to_bits() - 1),
            ]);
        }
        densities.extend([0.1, 0.3, 0.5, 0.53, 0.9, 0.999_999_94]);
        for d in densities {
            let below = keep_below(d);
            // Every v near the threshold, and the range's ends.
            let near = below.saturating_sub(3)..(below + 3).min(1 << 24);
            for v in near.chain([0, (1 << 24) - 1]) {
                let unit = (v as f32) * (1.0 / 16_777_216.0);
                assert_eq!(v < below, unit < d, "density {d:e}, v {v}");
            }
        }
        let s = Stream::new(9, 2, "w");
        let mut z = s.counter(41);
        for i in 41..300 {
            let (draw, next) = Stream::draw_at(z);
            assert_eq!(draw, s.draw(i));
            assert_eq!((draw >> 40) < keep_below(0.3), s.keep(i, 0.3));
            z = next;
        }
    }

    #[test]
    fn keep_rate_and_pick_range() {
        let s = Stream::new(7, 0, "t");
        let n = 200_000;
        let kept = (0..n).filter(|&i| s.keep(i, 0.3)).count() as f64 / n as f64;
        assert!((kept - 0.3).abs() < 0.01, "{kept}");
        let mut counts = [0usize; 5];
        for i in 0..n {
            counts[s.pick(i, 5)] += 1;
        }
        for c in counts {
            assert!((c as f64 / n as f64 - 0.2).abs() < 0.01, "{counts:?}");
        }
    }
}
