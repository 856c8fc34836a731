//! Element types of safetensors and the conversions to and from the f32 the arithmetic runs in.
//! Conversions read little-endian bytes at any alignment, because tensor data inside a
//! safetensors file is only byte-aligned.

use half::f16;

/// A safetensors dtype. Only F16/BF16/F32/F64 are merged; the rest are copied from the base.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    Bool,
    U8,
    I8,
    F8E5M2,
    F8E4M3,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    F64,
    I64,
    U64,
}

const ALL: [DType; 15] = [
    DType::Bool,
    DType::U8,
    DType::I8,
    DType::F8E5M2,
    DType::F8E4M3,
    DType::I16,
    DType::U16,
    DType::F16,
    DType::BF16,
    DType::I32,
    DType::U32,
    DType::F32,
    DType::F64,
    DType::I64,
    DType::U64,
];

impl DType {
    /// The name as written in safetensors headers.
    pub fn name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::F8E5M2 => "F8_E5M2",
            DType::F8E4M3 => "F8_E4M3",
            DType::I16 => "I16",
            DType::U16 => "U16",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I32 => "I32",
            DType::U32 => "U32",
            DType::F32 => "F32",
            DType::F64 => "F64",
            DType::I64 => "I64",
            DType::U64 => "U64",
        }
    }

    /// Parses a dtype name as safetensors headers spell it (exact case).
    pub fn parse_exact(s: &str) -> Option<DType> {
        ALL.into_iter().find(|d| d.name() == s)
    }

    /// Parses a dtype name case-insensitively (so "bf16" works from the CLI and API).
    pub fn parse(s: &str) -> Option<DType> {
        ALL.into_iter().find(|d| d.name().eq_ignore_ascii_case(s))
    }

    pub fn size(self) -> usize {
        match self {
            DType::Bool | DType::U8 | DType::I8 | DType::F8E5M2 | DType::F8E4M3 => 1,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::F64 | DType::I64 | DType::U64 => 8,
        }
    }

    /// Magnitude from which an f32 no longer rounds to a finite value of this dtype (round to
    /// nearest even).
    pub fn overflow_at(self) -> f32 {
        match self {
            DType::F16 => 65_520.0,
            DType::BF16 => f32::from_bits(0x7F7F_8000),
            // 464 is a tie between 448 (even) and the NaN code: it rounds to 448.
            DType::F8E4M3 => f32::from_bits(464f32.to_bits() + 1),
            DType::F8E5M2 => 61_440.0,
            _ => f32::INFINITY,
        }
    }

    /// The largest finite value of a floating output dtype (f32's for wider ones: the
    /// arithmetic is f32).
    pub fn max_finite(self) -> f32 {
        match self {
            DType::F16 => 65_504.0,
            DType::BF16 => f32::from_bits(0x7F7F_0000),
            DType::F8E4M3 => 448.0,
            DType::F8E5M2 => 57_344.0,
            _ => f32::MAX,
        }
    }

    /// Whether tensors of this dtype are merged (the rest are copied from the base).
    pub fn is_mergeable(self) -> bool {
        matches!(
            self,
            DType::F16 | DType::BF16 | DType::F32 | DType::F64 | DType::F8E4M3 | DType::F8E5M2
        )
    }
}

/// Decodes `out.len()` elements of `dtype` from `bytes` into f32.
#[inline(always)]
pub fn decode(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    debug_assert_eq!(bytes.len(), out.len() * dtype.size());
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        DType::F64 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                *o = f64::from_le_bytes(b) as f32;
            }
        }
        DType::F8E4M3 | DType::F8E5M2 => {
            let table = fp8::table(dtype);
            for (o, &b) in out.iter_mut().zip(bytes) {
                *o = table[b as usize];
            }
        }
        other => unreachable!("decode called on non-mergeable dtype {}", other.name()),
    }
}

/// Encodes f32 values as `dtype`, rounding to nearest even.
#[inline(always)]
pub fn encode(dtype: DType, src: &[f32], out: &mut [u8]) {
    debug_assert_eq!(out.len(), src.len() * dtype.size());
    match dtype {
        DType::F32 => {
            for (c, v) in out.chunks_exact_mut(4).zip(src) {
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        DType::BF16 => {
            for (c, v) in out.chunks_exact_mut(2).zip(src) {
                c.copy_from_slice(&bf16_bits(*v).to_le_bytes());
            }
        }
        DType::F16 => {
            for (c, v) in out.chunks_exact_mut(2).zip(src) {
                c.copy_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
        DType::F64 => {
            for (c, v) in out.chunks_exact_mut(8).zip(src) {
                c.copy_from_slice(&(*v as f64).to_le_bytes());
            }
        }
        DType::F8E4M3 | DType::F8E5M2 => {
            let f = fp8::Format::of(dtype);
            for (c, v) in out.iter_mut().zip(src) {
                *c = f.encode(*v);
            }
        }
        other => unreachable!("encode called on non-mergeable dtype {}", other.name()),
    }
}

/// The two FP8 formats of safetensors: E4M3 "fn" (bias 7, no infinities, S.1111.111 is NaN,
/// largest 448) and E5M2 (bias 15, IEEE-like with infinities, largest 57344). Decoding is a
/// table lookup; encoding rounds to nearest even exactly (in f64, where every step is exact).
pub mod fp8 {
    use std::sync::OnceLock;

    use super::DType;

    #[derive(Clone, Copy, Debug)]
    pub struct Format {
        mbits: i32,
        bias: i32,
        /// E4M3fn spends its top exponent on finite values; E5M2 on infinities and NaN.
        ieee: bool,
    }

    impl Format {
        pub fn of(d: DType) -> Format {
            match d {
                DType::F8E4M3 => Format {
                    mbits: 3,
                    bias: 7,
                    ieee: false,
                },
                DType::F8E5M2 => Format {
                    mbits: 2,
                    bias: 15,
                    ieee: true,
                },
                other => unreachable!("{} is not FP8", other.name()),
            }
        }

        pub fn decode(self, b: u8) -> f32 {
            let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
            let ebits = 7 - self.mbits;
            let e = ((b & 0x7F) >> self.mbits) as i32;
            let m = (b & ((1 << self.mbits) - 1)) as i32;
            let top = (1 << ebits) - 1;
            if self.ieee && e == top {
                return if m == 0 {
                    sign * f32::INFINITY
                } else {
                    f32::NAN
                };
            }
            if !self.ieee && e == top && m == (1 << self.mbits) - 1 {
                return f32::NAN;
            }
            let scale = |p: i32| (2.0f64).powi(p);
            let v = if e == 0 {
                m as f64 * scale(1 - self.bias - self.mbits)
            } else {
                (((1 << self.mbits) + m) as f64) * scale(e - self.bias - self.mbits)
            };
            sign * v as f32
        }

        /// Rounds a finite `v` below [`DType::overflow_at`] to the nearest code, ties to even.
        pub fn encode(self, v: f32) -> u8 {
            let sign = ((v.to_bits() >> 31) as u8) << 7;
            let exp = ((v.to_bits() >> 23) & 0xFF) as i32;
            if exp == 0 {
                // Zero or an f32 subnormal: far below half the smallest FP8 subnormal.
                return sign;
            }
            let a = v.abs() as f64;
            let min = 1 - self.bias;
            let e = (exp - 127).max(min);
            let r = (a / (2.0f64).powi(e - self.mbits)).round_ties_even() as i32;
            let one = 1 << self.mbits;
            let (field, mant) = if r < one {
                (0, r) // subnormal (e == min)
            } else if r == 2 * one {
                (e + 1 + self.bias, 0) // rounded up into the next binade
            } else {
                (e + self.bias, r - one)
            };
            sign | ((field << self.mbits) | mant) as u8
        }
    }

    /// Every code's value, for decoding by lookup.
    pub fn table(d: DType) -> &'static [f32; 256] {
        static E4M3: OnceLock<[f32; 256]> = OnceLock::new();
        static E5M2: OnceLock<[f32; 256]> = OnceLock::new();
        let cell = if d == DType::F8E4M3 { &E4M3 } else { &E5M2 };
        cell.get_or_init(|| {
            let f = Format::of(d);
            std::array::from_fn(|b| f.decode(b as u8))
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn known_values() {
            let e4 = Format::of(DType::F8E4M3);
            assert_eq!(e4.decode(0x7E), 448.0);
            assert!(e4.decode(0x7F).is_nan());
            assert_eq!(e4.decode(0x01), 2f32.powi(-9));
            assert_eq!(e4.decode(0x38), 1.0);
            let e5 = Format::of(DType::F8E5M2);
            assert_eq!(e5.decode(0x7B), 57344.0);
            assert_eq!(e5.decode(0x7C), f32::INFINITY);
            assert_eq!(e5.decode(0x01), 2f32.powi(-16));
            assert_eq!(e5.decode(0x3C), 1.0);
        }

        /// Every finite code round-trips, and every f32 between two neighbouring codes goes to
        /// the nearer one (the even one on a tie): checked against the sorted table.
        #[test]
        fn encode_is_round_to_nearest_even() {
            for d in [DType::F8E4M3, DType::F8E5M2] {
                let f = Format::of(d);
                let t = table(d);
                let mut finite: Vec<(f32, u8)> = (0..=255u8)
                    .filter(|&b| t[b as usize].is_finite() && b & 0x80 == 0)
                    .map(|b| (t[b as usize], b))
                    .collect();
                finite.sort_by(|a, b| a.0.total_cmp(&b.0));
                for &(v, b) in &finite {
                    assert_eq!(f.encode(v), b, "{v}");
                    assert_eq!(f.encode(-v), b | 0x80, "-{v}");
                }
                for w in finite.windows(2) {
                    let ((lo, bl), (hi, bh)) = (w[0], w[1]);
                    let mid = (lo as f64 + hi as f64) / 2.0;
                    let even = if bl & 1 == 0 { bl } else { bh };
                    assert_eq!(f.encode(mid as f32), even, "tie {lo}..{hi}");
                    let below = f32::from_bits((mid as f32).to_bits() - 1);
                    let above = f32::from_bits((mid as f32).to_bits() + 1);
                    assert_eq!(f.encode(below), bl, "below {mid}");
                    if above < d.overflow_at() {
                        assert_eq!(f.encode(above), bh, "above {mid}");
                    }
                }
                // Just under the overflow threshold still encodes to the largest finite value.
                let top = f32::from_bits(d.overflow_at().to_bits() - 1);
                assert_eq!(t[f.encode(top) as usize], d.max_finite());
                assert_eq!(f.encode(1e-30), 0);
            }
        }
    }
}

/// `v` rounded to floating dtype `d` (nearest even) and back to f32: the value a tensor loaded,
/// or a torch operation computed, in `d` holds (f32 and wider: `v` itself).
#[inline(always)]
pub fn round_to(d: DType, v: f32) -> f32 {
    match d {
        DType::BF16 => f32::from_bits(u32::from(bf16_bits(v)) << 16),
        DType::F16 => f16::from_f32(v).to_f32(),
        _ => v,
    }
}

/// `v` (a value of 16-bit `d`, bf16 or f16) as its bits: a held bf16/f16 iterate.
#[inline]
pub fn half_bits(d: DType, v: f32) -> u16 {
    match d {
        DType::BF16 => bf16_bits(v),
        DType::F16 => f16::from_f32(v).to_bits(),
        other => unreachable!("half_bits called on {}", other.name()),
    }
}

/// The value of 16-bit `d`'s bits `b`.
#[inline]
pub fn from_half_bits(d: DType, b: u16) -> f32 {
    match d {
        DType::BF16 => f32::from_bits(u32::from(b) << 16),
        DType::F16 => f16::from_bits(b).to_f32(),
        other => unreachable!("from_half_bits called on {}", other.name()),
    }
}

/// f32 → bf16 bits, round to nearest even, NaN kept NaN: branch-free so the loop vectorizes
/// (`half::bf16::from_f32` gives the same bits but branches per element).
#[inline]
pub fn bf16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    let rounded = (x.wrapping_add(0x7FFF + ((x >> 16) & 1)) >> 16) as u16;
    let nan = ((x >> 16) as u16) | 0x0040;
    if x & 0x7FFF_FFFF > 0x7F80_0000 {
        nan
    } else {
        rounded
    }
}

/// Decodes `out.len()` elements of `dtype` and subtracts `base` (the delta θ_t − θ_pre), in one
/// pass. Returns false if any decoded value is not finite.
#[inline(always)]
pub fn decode_delta(dtype: DType, bytes: &[u8], base: &[f32], out: &mut [f32]) -> bool {
    debug_assert_eq!(bytes.len(), out.len() * dtype.size());
    let mut finite = true;
    match dtype {
        DType::BF16 => {
            for ((o, c), b) in out.iter_mut().zip(bytes.chunks_exact(2)).zip(base) {
                let x = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                finite &= x.is_finite();
                *o = x - b;
            }
        }
        DType::F32 => {
            for ((o, c), b) in out.iter_mut().zip(bytes.chunks_exact(4)).zip(base) {
                let x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                finite &= x.is_finite();
                *o = x - b;
            }
        }
        _ => {
            decode(dtype, bytes, out);
            for (o, b) in out.iter_mut().zip(base) {
                finite &= o.is_finite();
                *o -= b;
            }
        }
    }
    finite
}

/// Decodes like [`decode`] and reports whether every value is finite, in the same pass.
#[inline(always)]
pub fn decode_finite(dtype: DType, bytes: &[u8], out: &mut [f32]) -> bool {
    match dtype {
        DType::BF16 => {
            let mut finite = true;
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                let x = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                finite &= x.is_finite();
                *o = x;
            }
            finite
        }
        _ => {
            decode(dtype, bytes, out);
            out.iter().fold(true, |ok, v| ok & v.is_finite())
        }
    }
}

/// Index and value of the first non-finite element, if any.
pub fn first_non_finite(values: &[f32]) -> Option<(usize, f32)> {
    // A branch-free scan first: the common case is all finite, and this vectorizes.
    if values.iter().fold(true, |ok, v| ok & v.is_finite()) {
        return None;
    }
    values
        .iter()
        .position(|v| !v.is_finite())
        .map(|i| (i, values[i]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn names_round_trip() {
        for d in ALL {
            assert_eq!(DType::parse(d.name()), Some(d));
        }
        assert_eq!(DType::parse("bf16"), Some(DType::BF16));
        assert_eq!(DType::parse("F128"), None);
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 is exactly halfway between two bf16 values: ties go to the even one (1.0).
        let halfway = 1.0f32 + 2f32.powi(-8);
        let mut out = [0u8; 2];
        encode(DType::BF16, &[halfway], &mut out);
        assert_eq!(u16::from_le_bytes(out), 0x3F80);
        // Just above halfway rounds up.
        encode(
            DType::BF16,
            &[f32::from_bits(halfway.to_bits() + 1)],
            &mut out,
        );
        assert_eq!(u16::from_le_bytes(out), 0x3F81);
    }

    #[test]
    fn decode_encode_round_trip_all_float_dtypes() {
        let vals = [0.0f32, -1.5, 3.25, 1e-3, -65504.0];
        for d in [DType::F16, DType::BF16, DType::F32, DType::F64] {
            let mut bytes = vec![0u8; vals.len() * d.size()];
            encode(d, &vals, &mut bytes);
            let mut back = [0f32; 5];
            decode(d, &bytes, &mut back);
            for (a, b) in vals.iter().zip(back) {
                assert!((a - b).abs() <= a.abs() * 1e-2, "{d:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn bf16_bits_match_half_everywhere_that_matters() {
        let mut x = 0u32;
        // A stride through all bit patterns, plus the rounding boundaries around a few values.
        while x < u32::MAX - 65_521 {
            let v = f32::from_bits(x);
            let want = bf16::from_f32(v);
            let got = bf16_bits(v);
            if v.is_nan() {
                assert!(bf16::from_bits(got).is_nan());
            } else {
                assert_eq!(got, want.to_bits(), "{x:#x}");
            }
            x += 65_521;
        }
        for base in [1.0f32, -3.5, 1e-30, 3.0e38] {
            let b = base.to_bits();
            for d in 0x7FF0..0x8010 {
                let v = f32::from_bits((b & 0xFFFF_0000) + d);
                assert_eq!(bf16_bits(v), bf16::from_f32(v).to_bits(), "{v}");
            }
        }
    }

    #[test]
    fn decode_delta_subtracts_and_flags() {
        let vals = [1.0f32, 2.0, 3.0];
        let mut bytes = vec![0u8; 12];
        encode(DType::F32, &vals, &mut bytes);
        let mut out = [0f32; 3];
        assert!(decode_delta(DType::F32, &bytes, &[0.5, 0.5, 0.5], &mut out));
        assert_eq!(out, [0.5, 1.5, 2.5]);
        encode(DType::F32, &[1.0, f32::INFINITY, 0.0], &mut bytes);
        assert!(!decode_delta(DType::F32, &bytes, &[0.0; 3], &mut out));
    }

    #[test]
    fn finds_non_finite() {
        assert_eq!(first_non_finite(&[1.0, 2.0]), None);
        let r = first_non_finite(&[1.0, f32::NAN, f32::INFINITY]).unwrap();
        assert_eq!(r.0, 1);
    }
}
