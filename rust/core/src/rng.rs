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
        mix(self
            .key
            .wrapping_add(index.wrapping_add(1).wrapping_mul(GOLDEN)))
    }

    /// Bernoulli(density): true with probability `density` (exact multiples of 2^-24).
    #[inline(always)]
    pub fn keep(&self, index: u64, density: f32) -> bool {
        self.unit(index) < density
    }

    /// Uniform in [0, 1), a multiple of 2^-24 (exact in f32): `keep` compares it.
    #[inline(always)]
    pub fn unit(&self, index: u64) -> f32 {
        ((self.draw(index) >> 40) as f32) * (1.0 / 16_777_216.0)
    }

    /// Uniform in `0..n` for `n < 2^32`.
    #[inline]
    pub fn pick(&self, index: u64, n: u64) -> usize {
        (((self.draw(index) >> 32) * n) >> 32) as usize
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
