//! The two OCP FP8 formats: E4M3FN (the weight and activation format) and E5M2.
//!
//! Both encoders round to nearest, ties to even, and saturate: a finite value beyond the largest
//! finite code, or an infinity, becomes that largest code with the input's sign, so a finite input
//! never gives NaN. NaN gives the NaN code with the input's sign. The sign of zero is kept.
//!
//! The encoders are branch-free manipulation of the f32 bits (plus one float add that does the
//! rounding in the subnormal range), so that a loop over a slice auto-vectorizes.

/// Largest finite E4M3FN value (`S.1111.110` = 1.75 · 2^8).
pub const E4M3_MAX: f32 = 448.0;

/// Largest finite E5M2 value (`S.11110.11` = 1.75 · 2^15).
pub const E5M2_MAX: f32 = 57344.0;

/// f32 bits of 2^-6, the smallest normal E4M3FN magnitude.
const E4M3_MIN_NORMAL_BITS: i32 = 0x3C80_0000;
/// f32 bits of 2^-14, the smallest normal E5M2 magnitude.
const E5M2_MIN_NORMAL_BITS: i32 = 0x3880_0000;
/// f32 bits of +Inf: an absolute value above it is NaN.
const F32_INF_BITS: i32 = 0x7F80_0000;

// How the encoders work, on `a`, the f32 bits of |x| clamped to the largest finite value
// (clamping first makes everything above it, +Inf included, round to that value):
//
// - normal range: round the 23-bit f32 mantissa to the format's mantissa width, ties to even, by
//   adding just under half an output ulp plus the output LSB, and shift; then rebias the
//   exponent. A carry out of the mantissa correctly bumps the exponent.
// - subnormal range (below the smallest normal): the code is round_ties_even(|x| / ulp), with
//   ulp = 2^-9 (E4M3FN) or 2^-16 (E5M2); adding 2^23 · ulp makes the f32 adder do exactly that
//   rounding, leaving the integer in the low mantissa bits. The largest result is the code of the
//   smallest normal, which is right.
//
// All comparisons are on i32 (the magnitudes are below 2^31), which SSE2 has natively.

/// Encodes `x` as E4M3FN: round to nearest even, saturating to ±448, NaN to `0x7F`/`0xFF`.
#[inline(always)]
pub fn f32_to_e4m3(x: f32) -> u8 {
    const MAGIC: f32 = 16384.0; // 2^23 · 2^-9
    const MAGIC_BITS: i32 = 0x4680_0000;
    let bits = x.to_bits();
    let sign = (bits >> 24) & 0x80;
    let abs = (bits & 0x7FFF_FFFF) as i32;
    let af = f32::from_bits(abs as u32);
    let af = if af < E4M3_MAX { af } else { E4M3_MAX };
    let a = af.to_bits() as i32;
    let normal = ((a + 0x7_FFFF + ((a >> 20) & 1)) >> 20) - ((127 - 7) << 3);
    let sub = (af + MAGIC).to_bits() as i32 - MAGIC_BITS;
    let code = if a < E4M3_MIN_NORMAL_BITS { sub } else { normal };
    let code = if abs > F32_INF_BITS { 0x7F } else { code };
    (code as u32 | sign) as u8
}

/// Encodes `x` as E5M2: round to nearest even, saturating to ±57344 (infinities included), NaN
/// to `0x7F`/`0xFF`.
#[inline(always)]
pub fn f32_to_e5m2(x: f32) -> u8 {
    const MAGIC: f32 = 128.0; // 2^23 · 2^-16
    const MAGIC_BITS: i32 = 0x4300_0000;
    let bits = x.to_bits();
    let sign = (bits >> 24) & 0x80;
    let abs = (bits & 0x7FFF_FFFF) as i32;
    let af = f32::from_bits(abs as u32);
    let af = if af < E5M2_MAX { af } else { E5M2_MAX };
    let a = af.to_bits() as i32;
    let normal = ((a + 0xF_FFFF + ((a >> 21) & 1)) >> 21) - ((127 - 15) << 2);
    let sub = (af + MAGIC).to_bits() as i32 - MAGIC_BITS;
    let code = if a < E5M2_MIN_NORMAL_BITS { sub } else { normal };
    let code = if abs > F32_INF_BITS { 0x7F } else { code };
    (code as u32 | sign) as u8
}

/// True for the two E4M3FN NaN codes, `0x7F` and `0xFF` (`S.1111.111`).
#[inline]
pub fn is_e4m3_nan(b: u8) -> bool {
    b & 0x7F == 0x7F
}

/// Decoded value of every E4M3FN code, indexed by the code (NaN for `0x7F` and `0xFF`).
pub static E4M3_LUT: [f32; 256] = build_lut(3, 7, false);

/// Decoded value of every E5M2 code, indexed by the code (±Inf at `0x7C`/`0xFC`, NaN above).
pub static E5M2_LUT: [f32; 256] = build_lut(2, 15, true);

/// Decodes an E4M3FN code.
#[inline(always)]
pub fn e4m3_to_f32(b: u8) -> f32 {
    E4M3_LUT[usize::from(b)]
}

/// Decodes an E5M2 code.
#[inline(always)]
pub fn e5m2_to_f32(b: u8) -> f32 {
    E5M2_LUT[usize::from(b)]
}

/// Encodes `src` into `dst` as E4M3FN, element by element.
///
/// The two slices should have the same length; only the first `min(src.len(), dst.len())`
/// elements are encoded.
pub fn encode_e4m3_slice(src: &[f32], dst: &mut [u8]) {
    debug_assert_eq!(src.len(), dst.len());
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f32_to_e4m3(s);
    }
}

/// Builds the decode table of an 8-bit float with `man` mantissa bits and exponent bias `bias`
/// (the exponent has `7 - man` bits). With `ieee_specials` the all-ones exponent holds Inf
/// (mantissa 0) and NaN (otherwise), as in IEEE 754; without it (the "FN" formats) only the
/// all-ones pattern is NaN.
const fn build_lut(man: u32, bias: u32, ieee_specials: bool) -> [f32; 256] {
    let mut lut = [0.0f32; 256];
    let exp_max = (1u32 << (7 - man)) - 1;
    let man_mask = (1u32 << man) - 1;
    let mut i = 0;
    while i < 256 {
        let b = i as u32;
        let sign = (b >> 7) << 31;
        let e = (b >> man) & exp_max;
        let m = b & man_mask;
        let bits = if e == exp_max && ieee_specials && m == 0 {
            F32_INF_BITS as u32
        } else if e == exp_max && (ieee_specials || m == man_mask) {
            0x7FC0_0000
        } else if e == 0 {
            // m · 2^(1 - bias - man), exact in f32 as the float of a small integer times a
            // power of two.
            let scale_bits = (127 + 1 - bias - man) << 23;
            (m as f32 * f32::from_bits(scale_bits)).to_bits()
        } else {
            ((e + 127 - bias) << 23) | (m << (23 - man))
        };
        lut[i] = f32::from_bits(bits | sign);
        i += 1;
    }
    lut
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One 8-bit float format described by its definition, independent of the encoders above.
    struct Format {
        name: &'static str,
        man_bits: u32,
        bias: i32,
        /// IEEE-style specials (exponent all ones = Inf/NaN) rather than "FN" (only S.1..1 NaN).
        ieee_specials: bool,
        max: f64,
    }

    const E4M3: Format = Format { name: "E4M3FN", man_bits: 3, bias: 7, ieee_specials: false, max: 448.0 };
    const E5M2: Format = Format { name: "E5M2", man_bits: 2, bias: 15, ieee_specials: true, max: 57344.0 };

    impl Format {
        /// The value of `code` from sign, exponent and mantissa fields (f64, computed with powi).
        fn value(&self, code: u8) -> f64 {
            let exp_bits = 7 - self.man_bits;
            let exp_all = (1u32 << exp_bits) - 1;
            let man_all = (1u32 << self.man_bits) - 1;
            let s = if code & 0x80 != 0 { -1.0 } else { 1.0 };
            let e = (u32::from(code) >> self.man_bits) & exp_all;
            let m = u32::from(code) & man_all;
            let frac = f64::from(m) / f64::from(1u32 << self.man_bits);
            if e == exp_all && self.ieee_specials {
                return if m == 0 { s * f64::INFINITY } else { f64::NAN };
            }
            if e == exp_all && m == man_all {
                return f64::NAN;
            }
            if e == 0 {
                s * frac * 2f64.powi(1 - self.bias)
            } else {
                s * (1.0 + frac) * 2f64.powi(e as i32 - self.bias)
            }
        }

        /// The finite non-negative codes (0x00..0x7F) with their values.
        fn finite_table(&self) -> Vec<(u8, f64)> {
            (0u8..0x80).map(|c| (c, self.value(c))).filter(|(_, v)| v.is_finite()).collect()
        }

        /// Reference encoder: exhaustive nearest-code search over `table` (this format's
        /// [`Format::finite_table`]), ties to the code with an even mantissa LSB, magnitudes
        /// above the maximum (and infinities) saturate, NaN to the NaN code, sign kept.
        fn encode(&self, table: &[(u8, f64)], x: f32) -> u8 {
            let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
            if x.is_nan() {
                return sign | 0x7F;
            }
            let mag = f64::from(x.abs()).min(self.max);
            let mut best = (0u8, f64::INFINITY);
            for &(c, v) in table {
                let d = (v - mag).abs();
                if d < best.1 || (d == best.1 && c & 1 == 0) {
                    best = (c, d);
                }
            }
            sign | best.0
        }
    }

    fn check_inputs(fmt: &Format, enc: fn(f32) -> u8, inputs: impl Iterator<Item = f32>) {
        let table = fmt.finite_table();
        for x in inputs {
            let got = enc(x);
            let want = fmt.encode(&table, x);
            assert!(
                got == want,
                "{}: first mismatch at input {:#010x} ({x:e}): encoder gave {got:#04x}, definition {want:#04x}",
                fmt.name,
                x.to_bits()
            );
        }
    }

    fn all_bf16() -> impl Iterator<Item = f32> {
        (0..=u16::MAX).map(|h| f32::from_bits(u32::from(h) << 16))
    }

    /// Every midpoint between consecutive finite magnitudes (and the point above the maximum
    /// where rounding would overflow), with its f32 neighbours, both signs.
    fn boundary_inputs(fmt: &Format) -> Vec<f32> {
        let mut mags: Vec<f64> = (0u8..0x80).map(|c| fmt.value(c)).filter(|v| v.is_finite()).collect();
        mags.sort_by(f64::total_cmp);
        let step_above_max = mags[mags.len() - 1] - mags[mags.len() - 2];
        mags.push(fmt.max + step_above_max);
        let mut out = Vec::new();
        for w in mags.windows(2) {
            let mid = (w[0] + w[1]) / 2.0;
            let m = mid as f32;
            assert_eq!(f64::from(m), mid, "{}: midpoint {mid:e} is not exact in f32", fmt.name);
            for p in [m, w[0] as f32, w[1] as f32] {
                let b = p.to_bits();
                for v in [b.wrapping_sub(2), b.wrapping_sub(1), b, b + 1, b + 2] {
                    let f = f32::from_bits(v);
                    out.push(f);
                    out.push(-f);
                }
            }
        }
        // Specials and extremes of the f32 range.
        for b in [0u32, 1, 0x007F_FFFF, 0x0080_0000, 0x7F7F_FFFF, 0x7F80_0000, 0x7F80_0001, 0x7FC0_0000, 0x7FFF_FFFF] {
            out.push(f32::from_bits(b));
            out.push(f32::from_bits(b | 0x8000_0000));
        }
        out
    }

    #[test]
    fn e4m3_matches_bitlevel_definition_on_all_bf16_inputs() {
        check_inputs(&E4M3, f32_to_e4m3, all_bf16());
    }

    #[test]
    fn e5m2_matches_bitlevel_definition_on_all_bf16_inputs() {
        check_inputs(&E5M2, f32_to_e5m2, all_bf16());
    }

    #[test]
    fn e4m3_matches_definition_at_every_rounding_boundary_and_its_f32_neighbours() {
        check_inputs(&E4M3, f32_to_e4m3, boundary_inputs(&E4M3).into_iter());
    }

    #[test]
    fn e5m2_matches_definition_at_every_rounding_boundary_and_its_f32_neighbours() {
        check_inputs(&E5M2, f32_to_e5m2, boundary_inputs(&E5M2).into_iter());
    }

    #[test]
    fn e4m3_matches_definition_on_a_dense_f32_sweep() {
        // Every 4096th f32 bit pattern: all exponents, many mantissas, both signs.
        check_inputs(&E4M3, f32_to_e4m3, (0..=u32::MAX >> 12).map(|i| f32::from_bits(i << 12 | (i & 0xFFF))));
    }

    fn check_decode(fmt: &Format, dec: fn(u8) -> f32) {
        for c in 0..=255u8 {
            let want = fmt.value(c);
            let got = dec(c);
            let ok = if want.is_nan() {
                got.is_nan()
            } else {
                f64::from(got) == want && got.is_sign_negative() == (c & 0x80 != 0)
            };
            assert!(ok, "{}: first mismatch decoding code {c:#04x}: got {got:e}, definition {want:e}", fmt.name);
        }
    }

    #[test]
    fn e4m3_decode_matches_definition_on_all_256_codes() {
        check_decode(&E4M3, e4m3_to_f32);
        for c in 0..=255u8 {
            assert_eq!(is_e4m3_nan(c), E4M3.value(c).is_nan(), "is_e4m3_nan wrong for {c:#04x}");
        }
    }

    #[test]
    fn e5m2_decode_matches_definition_on_all_256_codes() {
        check_decode(&E5M2, e5m2_to_f32);
    }

    #[test]
    fn decode_then_encode_is_identity_on_finite_codes() {
        for c in 0..=255u8 {
            let v = e4m3_to_f32(c);
            if !v.is_nan() {
                assert_eq!(f32_to_e4m3(v), c, "E4M3 code {c:#04x} does not round-trip");
            }
            let v = e5m2_to_f32(c);
            if v.is_finite() {
                assert_eq!(f32_to_e5m2(v), c, "E5M2 code {c:#04x} does not round-trip");
            }
        }
    }

    #[test]
    fn specials_saturate_keep_sign_and_never_give_nan_from_finite() {
        assert_eq!(f32_to_e4m3(f32::INFINITY), 0x7E);
        assert_eq!(f32_to_e4m3(f32::NEG_INFINITY), 0xFE);
        assert_eq!(f32_to_e4m3(f32::MAX), 0x7E);
        assert_eq!(f32_to_e4m3(464.0), 0x7E, "464 is the tie between 448 and (NaN) 480");
        assert_eq!(f32_to_e4m3(f32::NAN), 0x7F);
        assert_eq!(f32_to_e4m3(-f32::NAN), 0xFF);
        assert_eq!(f32_to_e4m3(-0.0), 0x80);
        assert_eq!(f32_to_e4m3(-1e-30), 0x80);
        assert_eq!(f32_to_e4m3(2f32.powi(-10)), 0x00, "2^-10 ties to 0");
        assert_eq!(f32_to_e4m3(3.0 * 2f32.powi(-10)), 0x02, "3·2^-10 ties to 2^-8");
        assert_eq!(f32_to_e5m2(f32::INFINITY), 0x7B);
        assert_eq!(f32_to_e5m2(f32::NEG_INFINITY), 0xFB);
        assert_eq!(f32_to_e5m2(f32::NAN), 0x7F);
        assert_eq!(f32_to_e5m2(-f32::NAN), 0xFF);
        assert_eq!(f32_to_e5m2(-0.0), 0x80);
    }

    #[test]
    fn slice_encoder_equals_scalar_encoder() {
        let src: Vec<f32> = all_bf16().collect();
        let mut dst = vec![0u8; src.len()];
        encode_e4m3_slice(&src, &mut dst);
        for (x, &d) in src.iter().zip(&dst) {
            assert_eq!(d, f32_to_e4m3(*x), "slice encoder differs at input {:#010x}", x.to_bits());
        }
    }

    /// Reference by search in the sorted finite magnitudes: the two neighbours of |x|, the nearer
    /// one, ties to the even mantissa.
    fn table_encode(sorted: &[(u8, f64)], max: f64, x: f32) -> u8 {
        let sign = if x.is_sign_negative() { 0x80 } else { 0 };
        if x.is_nan() {
            return sign | 0x7F;
        }
        let mag = f64::from(x.abs()).min(max);
        let i = sorted.partition_point(|&(_, v)| v <= mag); // sorted[i - 1] <= mag < sorted[i]
        let (lo, vlo) = sorted[i - 1];
        let Some(&(hi, vhi)) = sorted.get(i) else { return sign | lo };
        let (dlo, dhi) = (mag - vlo, vhi - mag);
        let code = if dlo < dhi || (dlo == dhi && lo & 1 == 0) { lo } else { hi };
        sign | code
    }

    /// All 2^32 f32 inputs against the table reference (slow: run in release with `--ignored`).
    #[test]
    #[ignore = "slow (4 Gi inputs): run in release"]
    fn e4m3_and_e5m2_match_the_definition_on_all_2_32_f32_inputs() {
        use rayon::prelude::*;
        for (fmt, enc) in [(&E4M3, f32_to_e4m3 as fn(f32) -> u8), (&E5M2, f32_to_e5m2)] {
            let mut sorted = fmt.finite_table();
            sorted.sort_by(|a, b| a.1.total_cmp(&b.1));
            let bad = (0u32..=0xFFFF).into_par_iter().find_first(|&hi| {
                (0u32..=0xFFFF).any(|lo| {
                    let x = f32::from_bits(hi << 16 | lo);
                    enc(x) != table_encode(&sorted, fmt.max, x)
                })
            });
            if let Some(hi) = bad {
                let lo = (0u32..=0xFFFF)
                    .find(|&lo| {
                        let x = f32::from_bits(hi << 16 | lo);
                        enc(x) != table_encode(&sorted, fmt.max, x)
                    })
                    .unwrap_or(0);
                panic!("{}: first mismatch at input {:#010x}", fmt.name, hi << 16 | lo);
            }
        }
    }
}
