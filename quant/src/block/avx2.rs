//! The stripe quantizer written with AVX2 (and F16C) intrinsics, selected at run time.
//!
//! It computes exactly what [`super::quantize_stripe_portable`] computes, in the same order:
//! per panel of [`PANEL`] blocks, the block amaxes; then per block, row after row, the codes and
//! the error sums. Each 8-lane vector holds 8 consecutive elements of a row, so lane `l` of the
//! partial sums adds the same elements, in the same order, as lane `l` of the portable
//! [`super::sum_sq`] and [`super::max_abs`]; multiplications and additions stay separate (no
//! FMA), as in the portable code. A row segment whose length is not a multiple of 16 ends with
//! a zero-padded group, and the padding changes nothing: a zero encodes to code 0 with error 0,
//! and adding `+0.0` to a non-negative partial sum leaves it as it is.

use std::arch::x86_64::*;

use super::{BLOCK, F32_INF_BITS, NonFiniteAt, PANEL, ScaleFormat, SrcDtype};
use super::{f16_bits_to_f32, first_non_finite, scale_inv_for, widen};
use crate::stats::ErrorStats;

/// True when this CPU has what [`quantize_stripe`] needs: AVX2, and F16C (which every AVX2 CPU
/// made has) for F16 sources.
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c")
}

/// A source element type, as a type parameter, so that each kernel is compiled once per type
/// with the loads fixed.
trait Elem {
    /// The element type.
    const DTYPE: SrcDtype;
    /// Bytes per element.
    const SIZE: usize = Self::DTYPE.size();
}

/// bfloat16 source elements.
struct Bf16;
impl Elem for Bf16 {
    const DTYPE: SrcDtype = SrcDtype::BF16;
}

/// IEEE half-precision source elements.
struct F16;
impl Elem for F16 {
    const DTYPE: SrcDtype = SrcDtype::F16;
}

/// f32 source elements.
struct F32;
impl Elem for F32 {
    const DTYPE: SrcDtype = SrcDtype::F32;
}

/// Quantizes one stripe of at most 128 rows exactly as [`super::quantize_stripe_portable`]
/// does: the same codes, scales, statistics and non-finite report.
///
/// # Safety
///
/// The CPU must have AVX2 and F16C ([`available`]).
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn quantize_stripe(
    src: &[u8],
    dtype: SrcDtype,
    cols: usize,
    fmt: ScaleFormat,
    codes: &mut [u8],
    scales: &mut [f32],
) -> Result<ErrorStats, NonFiniteAt> {
    match dtype {
        SrcDtype::BF16 => stripe::<Bf16>(src, cols, fmt, codes, scales),
        SrcDtype::F16 => stripe::<F16>(src, cols, fmt, codes, scales),
        SrcDtype::F32 => stripe::<F32>(src, cols, fmt, codes, scales),
    }
}

/// [`quantize_stripe`] for sources of type `E`.
#[target_feature(enable = "avx2,f16c")]
fn stripe<E: Elem>(
    src: &[u8],
    cols: usize,
    fmt: ScaleFormat,
    codes: &mut [u8],
    scales: &mut [f32],
) -> Result<ErrorStats, NonFiniteAt> {
    let rows = codes.len() / cols;
    let mut stats = ErrorStats::default();
    for (p, panel_scales) in scales.chunks_mut(PANEL).enumerate() {
        let p0 = p * PANEL * BLOCK;
        let pw = (PANEL * BLOCK).min(cols - p0);
        // The amax of every block of the panel, reading the panel row by row (long runs).
        let mut amax = [0u32; PANEL];
        for r in 0..rows {
            if r + PREFETCH_ROWS < rows {
                let ahead = ((r + PREFETCH_ROWS) * cols + p0) * E::SIZE;
                prefetch(&src[ahead..ahead + pw * E::SIZE]);
            }
            let start = (r * cols + p0) * E::SIZE;
            let row = &src[start..start + pw * E::SIZE];
            for (m, part) in amax.iter_mut().zip(row.chunks(BLOCK * E::SIZE)) {
                *m = (*m).max(abs_max_bits::<E>(part));
            }
        }
        for (j, scale) in panel_scales.iter_mut().enumerate() {
            if amax[j] >= F32_INF_BITS {
                return Err(first_non_finite(src, E::DTYPE, cols));
            }
            let s = scale_inv_for(f32::from_bits(amax[j]), fmt);
            *scale = s;
            let b0 = p0 + j * BLOCK;
            let w = BLOCK.min(cols - b0);
            // The same part of the next panel, to be read by its amax pass.
            let (n0, n1) = ((b0 + PANEL * BLOCK).min(cols), (b0 + PANEL * BLOCK + BLOCK).min(cols));
            for r in 0..rows {
                let c0 = r * cols + b0;
                encode_segment::<E>(&src[c0 * E::SIZE..(c0 + w) * E::SIZE], s, &mut codes[c0..c0 + w], &mut stats);
                prefetch(&src[(r * cols + n0) * E::SIZE..(r * cols + n1) * E::SIZE]);
            }
        }
    }
    Ok(stats)
}

/// How many rows ahead the amax pass asks for the panel's next rows: far enough to cover the
/// latency of memory, near enough to stay in the L1 cache until used.
const PREFETCH_ROWS: usize = 4;

/// Asks the cache to load `run` (a hint: it neither faults nor changes memory).
#[target_feature(enable = "avx2")]
fn prefetch(run: &[u8]) {
    for line in run.chunks(64) {
        _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast());
    }
}

/// Largest `|x|` of `part` (little-endian elements of `E`) as f32 bits, at or above
/// [`F32_INF_BITS`] when `part` holds a NaN or an infinity.
///
/// BF16 and F16 are compared as 16-bit magnitudes: widening is exact and keeps the order of
/// magnitudes (and maps Inf and NaN to Inf and NaN), so the widened largest magnitude is the
/// largest widened magnitude.
#[target_feature(enable = "avx2,f16c")]
fn abs_max_bits<E: Elem>(part: &[u8]) -> u32 {
    match E::DTYPE {
        SrcDtype::BF16 => u32::from(abs_max_u16(part)) << 16,
        SrcDtype::F16 => f16_bits_to_f32(abs_max_u16(part)).to_bits(),
        SrcDtype::F32 => abs_max_u32(part),
    }
}

/// Largest 16-bit little-endian element of `part` with its top bit cleared.
#[target_feature(enable = "avx2")]
fn abs_max_u16(part: &[u8]) -> u16 {
    let mask = _mm256_set1_epi16(0x7FFF);
    let mut acc = _mm256_setzero_si256();
    let chunks = part.chunks_exact(32);
    let tail = chunks.remainder();
    for c in chunks {
        // SAFETY: `c` is 32 bytes long; the load has no alignment requirement.
        let v = unsafe { _mm256_loadu_si256(c.as_ptr().cast()) };
        acc = _mm256_max_epu16(acc, _mm256_and_si256(v, mask));
    }
    let mut lanes = [0u16; 16];
    // SAFETY: `lanes` is 32 bytes long; the store has no alignment requirement.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), acc) };
    let tail = tail.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7FFF);
    lanes.into_iter().chain(tail).fold(0, u16::max)
}

/// Largest f32 magnitude of `part` (little-endian f32), as bits.
#[target_feature(enable = "avx2")]
fn abs_max_u32(part: &[u8]) -> u32 {
    let mask = _mm256_set1_epi32(0x7FFF_FFFF);
    let mut acc = _mm256_setzero_si256();
    let chunks = part.chunks_exact(32);
    let tail = chunks.remainder();
    for c in chunks {
        // SAFETY: `c` is 32 bytes long; the load has no alignment requirement.
        let v = unsafe { _mm256_loadu_si256(c.as_ptr().cast()) };
        acc = _mm256_max_epu32(acc, _mm256_and_si256(v, mask));
    }
    let mut lanes = [0u32; 8];
    // SAFETY: `lanes` is 32 bytes long; the store has no alignment requirement.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), acc) };
    let tail = tail.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7FFF_FFFF);
    lanes.into_iter().chain(tail).fold(0, u32::max)
}

/// The first 8 elements of `E` in `c`, widened exactly to f32 (panics if `c` is shorter; the
/// callers pass exact 8-element chunks, so the check compiles away).
#[target_feature(enable = "avx2,f16c")]
fn load8<E: Elem>(c: &[u8]) -> __m256 {
    let c = &c[..8 * E::SIZE];
    // SAFETY: `c` holds 8 elements (16 or 32 bytes), which is what each load reads; the loads
    // have no alignment requirement.
    unsafe {
        match E::DTYPE {
            SrcDtype::BF16 => {
                let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(c.as_ptr().cast()));
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
            }
            SrcDtype::F16 => _mm256_cvtph_ps(_mm_loadu_si128(c.as_ptr().cast())),
            SrcDtype::F32 => _mm256_loadu_ps(c.as_ptr().cast()),
        }
    }
}

/// Encodes the row segment `part` (at most [`BLOCK`] elements of `E`) with scale `s` into
/// `out`, and adds its error to `stats` as [`super::add_error`] does.
#[target_feature(enable = "avx2,f16c")]
fn encode_segment<E: Elem>(part: &[u8], s: f32, out: &mut [u8], stats: &mut ErrorStats) {
    let w = out.len();
    let whole = w / 16 * 16;
    let mut sums = Sums::new(s);
    for (c, o) in part[..whole * E::SIZE].chunks_exact(16 * E::SIZE).zip(out[..whole].chunks_exact_mut(16)) {
        let (lo, hi) = c.split_at(8 * E::SIZE);
        let codes = sums.add16(load8::<E>(lo), load8::<E>(hi));
        // SAFETY: `o` is 16 bytes long; the store has no alignment requirement.
        unsafe { _mm_storeu_si128(o.as_mut_ptr().cast(), codes) };
    }
    if whole < w {
        // The last elements, widened into a zero-padded group of 16.
        let mut x = [0f32; 16];
        widen(&part[whole * E::SIZE..], E::DTYPE, &mut x[..w - whole]);
        // SAFETY: `x` holds 16 f32, so both 8-element loads are inside it; no alignment needed.
        let (lo, hi) = unsafe { (_mm256_loadu_ps(x.as_ptr()), _mm256_loadu_ps(x[8..].as_ptr())) };
        let mut codes = [0u8; 16];
        // SAFETY: `codes` is 16 bytes long; the store has no alignment requirement.
        unsafe { _mm_storeu_si128(codes.as_mut_ptr().cast(), sums.add16(lo, hi)) };
        out[whole..].copy_from_slice(&codes[..w - whole]);
    }
    sums.finish(w, stats);
}

/// The partial sums of one row segment's error, in 8 lanes (see [`super::add_error`]).
struct Sums {
    /// The scale, in every lane.
    s: __m256,
    /// Sum of `x²`.
    sq_x: __m256,
    /// Sum of `err²`.
    sq_err: __m256,
    /// Largest `|err|`.
    max_err: __m256,
}

impl Sums {
    /// Empty sums for scale `s`.
    #[target_feature(enable = "avx2")]
    fn new(s: f32) -> Self {
        let zero = _mm256_setzero_ps();
        Sums { s: _mm256_set1_ps(s), sq_x: zero, sq_err: zero, max_err: zero }
    }

    /// Encodes 16 consecutive elements (`lo`, then `hi`), adds their error (`lo` first, as the
    /// portable loop does) and returns their 16 codes in order.
    #[target_feature(enable = "avx2")]
    fn add16(&mut self, lo: __m256, hi: __m256) -> __m128i {
        let c0 = self.add8(lo);
        let c1 = self.add8(hi);
        // The codes fit a byte, so the unsigned-saturating packs keep them; the packs work
        // within 128-bit halves, and the permutation gathers the four 4-byte runs in order.
        let words = _mm256_packus_epi32(c0, c1);
        let bytes = _mm256_packus_epi16(words, words);
        let ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 0, 0, 0, 0));
        _mm256_castsi256_si128(ordered)
    }

    /// Encodes 8 elements, adds their error, and returns their codes, one per 32-bit lane.
    #[target_feature(enable = "avx2")]
    fn add8(&mut self, x: __m256) -> __m256i {
        let (code, value) = encode(_mm256_div_ps(x, self.s));
        let err = _mm256_sub_ps(_mm256_mul_ps(value, self.s), x);
        self.sq_x = _mm256_add_ps(self.sq_x, _mm256_mul_ps(x, x));
        self.sq_err = _mm256_add_ps(self.sq_err, _mm256_mul_ps(err, err));
        // `|err| > max ? |err| : max`, the portable loop's comparison, is `maxps(|err|, max)`.
        let abs_err = _mm256_andnot_ps(_mm256_set1_ps(-0.0), err);
        self.max_err = _mm256_max_ps(abs_err, self.max_err);
        code
    }

    /// Adds the sums of a segment of `n` elements to `stats`, reducing the lanes in order as the
    /// portable `Iterator::sum` and `fold` do.
    #[target_feature(enable = "avx2")]
    fn finish(&self, n: usize, stats: &mut ErrorStats) {
        let (mut x, mut e, mut m) = ([0f32; 8], [0f32; 8], [0f32; 8]);
        // SAFETY: each array holds 8 f32; the stores have no alignment requirement.
        unsafe {
            _mm256_storeu_ps(x.as_mut_ptr(), self.sq_x);
            _mm256_storeu_ps(e.as_mut_ptr(), self.sq_err);
            _mm256_storeu_ps(m.as_mut_ptr(), self.max_err);
        }
        stats.numel += n as u64;
        stats.sum_sq_ref += f64::from(x.iter().sum::<f32>());
        stats.sum_sq_err += f64::from(e.iter().sum::<f32>());
        stats.max_abs_err = stats.max_abs_err.max(f64::from(m.iter().fold(0f32, |m, &v| m.max(v))));
    }
}

/// [`crate::fp8::f32_to_e4m3`] of 8 non-NaN lanes: each lane's code (sign at bit 7), and the
/// code's value ([`super::decode_finite_e4m3`]).
///
/// The magnitude `af` (clamped to 448) is rounded to the E4M3 grid by the f32 adder:
/// `(af + c) - c` with `c = 2^(e + 20)`, `2^e` the binade of `af` (at least `2^-6`, the
/// smallest normal E4M3 magnitude). The sum lies in `[2^(e+20), 2^(e+21))`, where the f32 ulp
/// is `2^(e-3)`, the E4M3 ulp of that binade (`2^-9` below `2^-6`), so the addition rounds `af`
/// to the grid, ties to even (`c` is an even multiple of the ulp), and the subtraction is exact.
/// That is the rounding the portable encoder does with integer arithmetic. The code then sits
/// in the bits of `value · 2^-120`, `>> 20`: a normal E4M3 value `2^e · 1.m` becomes an f32
/// with biased exponent `e + 7` and mantissa `m` in its top 3 bits, and a subnormal one
/// `k · 2^-9` becomes the f32 subnormal `k · 2^-129`, whose bits are `k << 20`; the product is
/// exact.
///
/// A NaN lane would not give the portable encoder's 0x7F; the caller never has one (a finite
/// element over a positive finite scale).
#[target_feature(enable = "avx2")]
fn encode(q: __m256) -> (__m256i, __m256) {
    let sign = _mm256_and_ps(q, _mm256_set1_ps(-0.0));
    let abs = _mm256_andnot_ps(_mm256_set1_ps(-0.0), q);
    // `af < 448 ? af : 448`: `minps` returns its second operand unless the first is smaller.
    let af = _mm256_min_ps(abs, _mm256_set1_ps(448.0));
    let binade = _mm256_and_si256(_mm256_castps_si256(af), _mm256_set1_epi32(0x7F80_0000));
    let binade = _mm256_max_epi32(binade, _mm256_set1_epi32(0x3C80_0000));
    let c = _mm256_castsi256_ps(_mm256_add_epi32(binade, _mm256_set1_epi32(20 << 23)));
    let value = _mm256_sub_ps(_mm256_add_ps(af, c), c);
    let scaled = _mm256_mul_ps(value, _mm256_set1_ps(f32::from_bits((127 - 120) << 23)));
    let code = _mm256_srli_epi32::<20>(_mm256_castps_si256(scaled));
    let code = _mm256_or_si256(code, _mm256_srli_epi32::<24>(_mm256_castps_si256(sign)));
    (code, _mm256_or_ps(value, sign))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fp8::{E4M3_LUT, f32_to_e4m3};

    /// [`encode`] of 8 values: codes and values as arrays.
    fn encode8(q: [f32; 8]) -> ([i32; 8], [f32; 8]) {
        assert!(available(), "this CPU lacks AVX2 or F16C: the AVX2 encoder cannot be tested here");
        let (mut codes, mut values) = ([0i32; 8], [0f32; 8]);
        // SAFETY: the CPU has AVX2 (asserted above); the loads and stores cover exactly the
        // 8-element arrays, with no alignment requirement.
        unsafe {
            let (c, v) = encode(_mm256_loadu_ps(q.as_ptr()));
            _mm256_storeu_si256(codes.as_mut_ptr().cast(), c);
            _mm256_storeu_ps(values.as_mut_ptr(), v);
        }
        (codes, values)
    }

    /// Checks [`encode`] against the portable encoder and decoder on `qs`, naming the first input
    /// that differs.
    fn check(qs: impl Iterator<Item = f32>) {
        let qs: Vec<f32> = qs.collect();
        for chunk in qs.chunks(8) {
            let mut q = [0f32; 8];
            q[..chunk.len()].copy_from_slice(chunk);
            let (codes, values) = encode8(q);
            for l in 0..chunk.len() {
                let want = f32_to_e4m3(q[l]);
                let want_value = super::super::decode_finite_e4m3(want);
                assert_eq!(codes[l], i32::from(want), "code of {:#010x}", q[l].to_bits());
                assert_eq!(values[l].to_bits(), want_value.to_bits(), "value of {:#010x}", q[l].to_bits());
            }
        }
    }

    #[test]
    fn encoder_is_the_portable_one_on_a_dense_sweep_of_non_nan_f32() {
        // Every 1021st bit pattern (a prime step), infinities included, NaNs left out.
        check((0..=u32::MAX).step_by(1021).map(f32::from_bits).filter(|q| !q.is_nan()));
        check([f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MIN_POSITIVE, 0.0, -0.0].into_iter());
    }

    #[test]
    fn encoder_is_the_portable_one_around_every_rounding_boundary() {
        // Every finite E4M3 value and every midpoint between neighbours, each with the f32
        // values up to 3 ulps either side, both signs; beyond 448 too (saturation).
        let mut grid: Vec<f32> = E4M3_LUT[..0x7F].to_vec();
        grid.extend([480.0, 512.0]);
        let mids: Vec<f32> = grid.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        let around = grid.iter().chain(&mids).flat_map(|&v| (-3i32..=3).map(move |d| v.to_bits() as i32 + d));
        check(around.filter(|&b| b >= 0).flat_map(|b| [f32::from_bits(b as u32), -f32::from_bits(b as u32)]));
    }
}
