//! Block-scaled FP8 quantization, DeepSeek style.
//!
//! A weight `W[N, K]` is cut into 128×128 blocks (edge blocks partial). Each block gets one
//! `scale_inv = max(amax, 1e-12) / 448` (f32), optionally rounded up to a power of two
//! ([`ScaleFormat::Ue8m0`]), and each element becomes `E4M3FN(x / scale_inv)` with a true f32
//! division and round-to-nearest-even, saturating. Dequantization is `code_value * scale_inv`.
//! Activations use the same rule over 1×128 groups (one token, 128 channels).

use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;

use crate::fp8::{E4M3_LUT, E4M3_MAX, f32_to_e4m3};
use crate::stats::ErrorStats;

#[cfg(target_arch = "x86_64")]
mod avx2;

/// Side of a weight block, and width of an activation group.
pub const BLOCK: usize = 128;

/// Lower bound on a block's amax before it becomes a scale, so an all-zero block gets a finite,
/// non-zero scale.
const MIN_AMAX: f32 = 1e-12;

/// How block scales are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleFormat {
    /// Any f32: `max(amax, 1e-12) / 448`.
    F32,
    /// A power of two (an 8-bit exponent, as Blackwell MXFP8 kernels want): the f32 scale rounded
    /// up to the next power of two. Still stored as f32.
    Ue8m0,
}

/// Element type of a source tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SrcDtype {
    /// bfloat16.
    BF16,
    /// IEEE half precision.
    F16,
    /// IEEE single precision.
    F32,
}

impl SrcDtype {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            SrcDtype::BF16 | SrcDtype::F16 => 2,
            SrcDtype::F32 => 4,
        }
    }
}

/// Why a tensor cannot be quantized or dequantized.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// The input holds a NaN or an infinity (the first one in row-major order).
    #[error("non-finite value {value} at [{row}, {col}]")]
    NonFinite {
        /// Row of the element.
        row: usize,
        /// Column of the element.
        col: usize,
        /// The element, widened to f32.
        value: f32,
    },
    /// A buffer's length does not match the shape.
    #[error("{what} has length {got}, expected {expected}")]
    Shape {
        /// Which buffer.
        what: &'static str,
        /// Length the shape requires.
        expected: usize,
        /// Length given.
        got: usize,
    },
}

/// The scale (`scale_inv`, the dequantization multiplier) of a block whose largest magnitude is
/// `amax` (finite, non-negative).
pub fn scale_inv_for(amax: f32, fmt: ScaleFormat) -> f32 {
    let s = amax.max(MIN_AMAX) / E4M3_MAX;
    match fmt {
        ScaleFormat::F32 => s,
        ScaleFormat::Ue8m0 => pow2_ceil(s),
    }
}

/// Smallest power of two >= `s`, for a positive normal `s` (a power of two stays itself).
fn pow2_ceil(s: f32) -> f32 {
    let bits = s.to_bits();
    if bits & 0x007F_FFFF == 0 { s } else { f32::from_bits((bits & 0x7F80_0000) + 0x0080_0000) }
}

/// Checks that buffer `what` has length `expected`.
fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), QuantError> {
    if expected == got { Ok(()) } else { Err(QuantError::Shape { what, expected, got }) }
}

/// `rows * cols * elem`, or a Shape error on `what` (length `got`) when it overflows.
fn len_of(what: &'static str, rows: usize, cols: usize, elem: usize, got: usize) -> Result<usize, QuantError> {
    rows.checked_mul(cols).and_then(|n| n.checked_mul(elem)).ok_or(QuantError::Shape {
        what,
        expected: usize::MAX,
        got,
    })
}

/// Quantizes the weight `src` (`rows × cols` elements of `dtype`, little-endian bytes, any
/// alignment) into E4M3FN `codes` (`rows * cols`, row-major) and the block scale grid `scales`
/// (`ceil(rows/128) × ceil(cols/128)`, row-major), and returns the error of the dequantized
/// weight against the source.
///
/// Runs in parallel over 128-row stripes.
///
/// # Errors
///
/// [`QuantError::NonFinite`] for a NaN or an infinity in the source, naming the first one in
/// row-major order (`codes` and `scales` are then unspecified); [`QuantError::Shape`] when a
/// buffer's length does not match the shape.
pub fn quantize_weight_into(
    src: &[u8],
    dtype: SrcDtype,
    rows: usize,
    cols: usize,
    fmt: ScaleFormat,
    codes: &mut [u8],
    scales: &mut [f32],
) -> Result<ErrorStats, QuantError> {
    check_len("source bytes", len_of("source bytes", rows, cols, dtype.size(), src.len())?, src.len())?;
    check_len("codes", rows * cols, codes.len())?;
    let grid_cols = cols.div_ceil(BLOCK);
    check_len("scales", rows.div_ceil(BLOCK) * grid_cols, scales.len())?;
    if rows == 0 || cols == 0 {
        return Ok(ErrorStats::default());
    }
    // Lowest stripe known to hold a non-finite value: later stripes need not be quantized.
    let first_bad = AtomicUsize::new(usize::MAX);
    let stripe = BLOCK.min(rows) * cols;
    let results: Vec<Result<ErrorStats, QuantError>> = src
        .par_chunks(stripe * dtype.size())
        .zip(codes.par_chunks_mut(stripe))
        .zip(scales.par_chunks_mut(grid_cols))
        .enumerate()
        .map(|(i, ((src, codes), scales))| {
            if i > first_bad.load(Ordering::Relaxed) {
                return Ok(ErrorStats::default());
            }
            let r = quantize_stripe(src, dtype, cols, fmt, codes, scales);
            r.map_err(|(row, col, value)| {
                first_bad.fetch_min(i, Ordering::Relaxed);
                QuantError::NonFinite { row: i * BLOCK + row, col, value }
            })
        })
        .collect();
    // In stripe order, so the first error is the first non-finite element in row-major order and
    // the merged sums do not depend on thread scheduling.
    let mut stats = ErrorStats::default();
    for r in results {
        stats.merge(&r?);
    }
    Ok(stats)
}

/// A non-finite element: (row within the stripe, column, value).
type NonFiniteAt = (usize, usize, f32);

/// Quantizes one stripe of at most 128 rows, with the AVX2 kernel ([`avx2`]) where the CPU has
/// it. Every path gives the same bits: IEEE division and the integer rounding do not depend on
/// the vector width, and the error sums add the same values in the same order.
fn quantize_stripe(
    src: &[u8],
    dtype: SrcDtype,
    cols: usize,
    fmt: ScaleFormat,
    codes: &mut [u8],
    scales: &mut [f32],
) -> Result<ErrorStats, NonFiniteAt> {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: the CPU has AVX2 and F16C, checked just above.
        return unsafe { avx2::quantize_stripe(src, dtype, cols, fmt, codes, scales) };
    }
    quantize_stripe_portable(src, dtype, cols, fmt, codes, scales)
}

/// Quantizes one stripe of at most 128 rows (`src` and `codes` row-major, `cols` wide; `scales`
/// its row of the grid), one panel of [`PANEL`] blocks side by side at a time: widen the panel
/// once into an f32 scratch that stays in cache (reading runs of `PANEL * 128` source elements,
/// which the hardware prefetcher likes), then per block the amax, and divide, encode and
/// measure the error.
#[inline(always)]
fn quantize_stripe_portable(
    src: &[u8],
    dtype: SrcDtype,
    cols: usize,
    fmt: ScaleFormat,
    codes: &mut [u8],
    scales: &mut [f32],
) -> Result<ErrorStats, NonFiniteAt> {
    let rows = codes.len() / cols;
    let esize = dtype.size();
    let mut scratch = vec![0f32; rows * cols.min(PANEL * BLOCK)];
    let mut stats = ErrorStats::default();
    for (p, panel_scales) in scales.chunks_mut(PANEL).enumerate() {
        let p0 = p * PANEL * BLOCK;
        let pw = (PANEL * BLOCK).min(cols - p0);
        let panel = &mut scratch[..rows * pw];
        for (r, dst) in panel.chunks_exact_mut(pw).enumerate() {
            let start = (r * cols + p0) * esize;
            widen(&src[start..start + pw * esize], dtype, dst);
        }
        for (j, scale) in panel_scales.iter_mut().enumerate() {
            let b0 = j * BLOCK;
            let w = BLOCK.min(pw - b0);
            let amax = panel.chunks_exact(pw).fold(0, |m, row| m.max(abs_max_bits(&row[b0..b0 + w])));
            if amax >= F32_INF_BITS {
                return Err(first_non_finite(src, dtype, cols));
            }
            let s = scale_inv_for(f32::from_bits(amax), fmt);
            *scale = s;
            for (r, row) in panel.chunks_exact(pw).enumerate() {
                let x = &row[b0..b0 + w];
                let c0 = r * cols + p0 + b0;
                let out = &mut codes[c0..c0 + w];
                encode_scaled(x, s, out);
                add_error(x, out, s, &mut stats);
            }
        }
    }
    Ok(stats)
}

/// Blocks per panel in [`quantize_stripe_portable`] (a 128 × 512 f32 panel is 256 KiB).
const PANEL: usize = 4;

/// f32 bits of +Inf: an absolute-value bit pattern at or above it is not finite.
const F32_INF_BITS: u32 = 0x7F80_0000;

/// Widens `src` (little-endian elements of `dtype`) into `dst`, exactly.
#[inline(always)]
fn widen(src: &[u8], dtype: SrcDtype, dst: &mut [f32]) {
    match dtype {
        SrcDtype::BF16 => {
            for (d, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
            }
        }
        SrcDtype::F16 => {
            // Two simple loops (load, then convert in place) vectorize better than one.
            for (d, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])));
            }
            for d in dst.iter_mut() {
                *d = f16_bits_to_f32(d.to_bits() as u16);
            }
        }
        SrcDtype::F32 => {
            for (d, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
    }
}

/// IEEE half-precision bits to f32, exactly, branch-free so that loops vectorize (NaNs stay NaN,
/// payload kept).
#[inline(always)]
fn f16_bits_to_f32(h: u16) -> f32 {
    let h = u32::from(h);
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7FFF;
    // Normal: move exponent and mantissa into place and rebias the exponent from 15 to 127.
    let normal = (em << 13) + ((127 - 15) << 23);
    // Inf/NaN (exponent 31): exponent 255, mantissa kept.
    let special = (em << 13) | 0x7F80_0000;
    // Subnormal or zero (exponent 0): m · 2^-24, exact.
    let sub = (em as f32 * f32::from_bits((127 - 24) << 23)).to_bits();
    let bits = if em < 0x0400 {
        sub
    } else if em >= 0x7C00 {
        special
    } else {
        normal
    };
    f32::from_bits(bits | sign)
}

/// Largest `|x|` as f32 bits (bit patterns of non-negative floats order like the floats); at or
/// above [`F32_INF_BITS`] when `x` holds a NaN or an infinity.
#[inline(always)]
fn abs_max_bits(x: &[f32]) -> u32 {
    x.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7FFF_FFFF))
}

/// Position and value of the first non-finite element of a stripe (`src` row-major, `cols`
/// wide). Only called once `src` is known to hold one.
#[cold]
fn first_non_finite(src: &[u8], dtype: SrcDtype, cols: usize) -> NonFiniteAt {
    let mut one = [0f32];
    for (i, b) in src.chunks_exact(dtype.size()).enumerate() {
        widen(b, dtype, &mut one);
        if !one[0].is_finite() {
            return (i / cols, i % cols, one[0]);
        }
    }
    debug_assert!(false, "first_non_finite called on a finite stripe");
    (0, 0, f32::NAN)
}

/// `out[i] = E4M3(x[i] / s)`.
#[inline(always)]
fn encode_scaled(x: &[f32], s: f32, out: &mut [u8]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = f32_to_e4m3(v / s);
    }
}

/// Adds to `stats` the error of `codes` dequantized with `s` (code value times `s`, as
/// [`dequantize_weight_into`] computes it) against `x` (at most [`BLOCK`] elements). Partial
/// sums run in f32 lanes, then go to the f64 totals.
#[inline(always)]
fn add_error(x: &[f32], codes: &[u8], s: f32, stats: &mut ErrorStats) {
    // A map, then one loop per reduction: LLVM vectorizes each of these cleanly, but not one
    // loop doing everything.
    let mut err = [0f32; BLOCK];
    let err = &mut err[..x.len()];
    for (e, (&v, &c)) in err.iter_mut().zip(x.iter().zip(codes)) {
        *e = decode_finite_e4m3(c) * s - v;
    }
    stats.numel += x.len() as u64;
    stats.sum_sq_ref += f64::from(sum_sq(x));
    stats.sum_sq_err += f64::from(sum_sq(err));
    stats.max_abs_err = stats.max_abs_err.max(f64::from(max_abs(err)));
}

/// Lanes of the partial sums: independent accumulators that vectorize.
const LANES: usize = 8;

/// Sum of squares of `x`, in [`LANES`] f32 partial sums.
#[inline(always)]
fn sum_sq(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (chunks, tail) = x.as_chunks::<LANES>();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l] * c[l];
        }
    }
    for (a, &v) in acc.iter_mut().zip(tail) {
        *a += v * v;
    }
    acc.iter().sum()
}

/// Largest `|x|` (of non-NaN values).
#[inline(always)]
fn max_abs(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (chunks, tail) = x.as_chunks::<LANES>();
    for c in chunks {
        for l in 0..LANES {
            let a = c[l].abs();
            acc[l] = if a > acc[l] { a } else { acc[l] };
        }
    }
    for (m, &v) in acc.iter_mut().zip(tail) {
        *m = m.max(v.abs());
    }
    acc.iter().fold(0f32, |m, &v| m.max(v))
}

/// The value of a non-NaN E4M3FN code, computed (so that loops vectorize) rather than looked
/// up; equals [`E4M3_LUT`] on every code but the NaN codes, which the encoder never produces
/// from a finite input.
#[inline(always)]
fn decode_finite_e4m3(c: u8) -> f32 {
    let m = u32::from(c & 0x7F);
    let sign = u32::from(c & 0x80) << 24;
    // Exponent field 0: m · 2^-9. Otherwise rebias the exponent from 7 to 127.
    let sub = (m as f32 * (1.0 / 512.0)).to_bits();
    let normal = (m << 20) + ((127 - 7) << 23);
    f32::from_bits(if m < 8 { sub } else { normal } | sign)
}

/// Dequantizes `codes` (`rows × cols` E4M3FN) with the block `scales` into `out` (f32,
/// `code_value * scale_inv`). NaN codes give NaN. Runs in parallel over 128-row stripes.
///
/// # Errors
///
/// [`QuantError::Shape`] when a buffer's length does not match the shape.
pub fn dequantize_weight_into(
    codes: &[u8],
    scales: &[f32],
    rows: usize,
    cols: usize,
    out: &mut [f32],
) -> Result<(), QuantError> {
    dequantize_with(codes, scales, rows, cols, out, 1, |v, dst: &mut [f32]| dst[0] = v)
}

/// Dequantizes like [`dequantize_weight_into`] and rounds each value to bfloat16 (nearest, ties
/// to even), writing little-endian bytes (`rows * cols * 2`) into `out`.
///
/// # Errors
///
/// [`QuantError::Shape`] when a buffer's length does not match the shape.
pub fn dequantize_weight_to_bf16(
    codes: &[u8],
    scales: &[f32],
    rows: usize,
    cols: usize,
    out: &mut [u8],
) -> Result<(), QuantError> {
    dequantize_with(codes, scales, rows, cols, out, 2, |v, dst: &mut [u8]| {
        dst.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes());
    })
}

/// Shared body of the dequantizers: `out` holds `per` items of `T` per element, and `put`
/// writes one dequantized value into them.
fn dequantize_with<T: Send>(
    codes: &[u8],
    scales: &[f32],
    rows: usize,
    cols: usize,
    out: &mut [T],
    per: usize,
    put: impl Fn(f32, &mut [T]) + Sync,
) -> Result<(), QuantError> {
    check_len("codes", len_of("codes", rows, cols, 1, codes.len())?, codes.len())?;
    check_len("output", len_of("output", rows, cols, per, out.len())?, out.len())?;
    let grid_cols = cols.div_ceil(BLOCK);
    check_len("scales", rows.div_ceil(BLOCK) * grid_cols, scales.len())?;
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let stripe = BLOCK.min(rows) * cols;
    out.par_chunks_mut(stripe * per).zip(codes.par_chunks(stripe)).zip(scales.par_chunks(grid_cols)).for_each(
        |((out, codes), scales)| {
            for (out_row, code_row) in out.chunks_exact_mut(cols * per).zip(codes.chunks_exact(cols)) {
                for ((o, c), &s) in out_row.chunks_mut(BLOCK * per).zip(code_row.chunks(BLOCK)).zip(scales) {
                    for (dst, &code) in o.chunks_exact_mut(per).zip(c) {
                        put(E4M3_LUT[usize::from(code)] * s, dst);
                    }
                }
            }
        },
    );
    Ok(())
}

/// Quantizes activations `x` (`tokens × dim`, row-major) per token and per 128 channels into
/// E4M3FN `codes` (`tokens * dim`) and `scales` (`tokens × ceil(dim/128)`), by the same rule as
/// weight blocks.
///
/// # Errors
///
/// [`QuantError::NonFinite`] for a NaN or an infinity, naming the first one in row-major order
/// (`row` is the token, `col` the channel); [`QuantError::Shape`] when a buffer's length does not
/// match the shape.
pub fn quantize_token_groups(
    x: &[f32],
    tokens: usize,
    dim: usize,
    fmt: ScaleFormat,
    codes: &mut [u8],
    scales: &mut [f32],
) -> Result<(), QuantError> {
    check_len("activations", len_of("activations", tokens, dim, 1, x.len())?, x.len())?;
    check_len("codes", tokens * dim, codes.len())?;
    let groups = dim.div_ceil(BLOCK);
    check_len("scales", tokens * groups, scales.len())?;
    if tokens == 0 || dim == 0 {
        return Ok(());
    }
    let rows_per_task = (TASK_ELEMENTS / dim).max(1);
    let results: Vec<Result<(), QuantError>> = x
        .par_chunks(rows_per_task * dim)
        .zip(codes.par_chunks_mut(rows_per_task * dim))
        .zip(scales.par_chunks_mut(rows_per_task * groups))
        .enumerate()
        .map(|(t, ((x, codes), scales))| {
            let rows = x.chunks_exact(dim).zip(codes.chunks_exact_mut(dim)).zip(scales.chunks_exact_mut(groups));
            for (r, ((x, codes), scales)) in rows.enumerate() {
                let groups = x.chunks(BLOCK).zip(codes.chunks_mut(BLOCK)).zip(scales.iter_mut());
                for ((xg, cg), scale) in groups {
                    let s = group_scale(xg, fmt).ok_or_else(|| non_finite_in_row(x, t * rows_per_task + r))?;
                    *scale = s;
                    encode_scaled(xg, s, cg);
                }
            }
            Ok(())
        })
        .collect();
    results.into_iter().collect()
}

/// Replaces the activations `x` (`tokens × dim`) by their quantized-then-dequantized values, as
/// [`quantize_token_groups`] followed by dequantization would give (W8A8 simulation).
///
/// # Errors
///
/// As [`quantize_token_groups`]; on [`QuantError::NonFinite`], `x` is partly replaced.
pub fn fake_quant_token_groups(x: &mut [f32], tokens: usize, dim: usize, fmt: ScaleFormat) -> Result<(), QuantError> {
    check_len("activations", len_of("activations", tokens, dim, 1, x.len())?, x.len())?;
    if tokens == 0 || dim == 0 {
        return Ok(());
    }
    let rows_per_task = (TASK_ELEMENTS / dim).max(1);
    let results: Vec<Result<(), QuantError>> = x
        .par_chunks_mut(rows_per_task * dim)
        .enumerate()
        .map(|(t, x)| {
            for (r, row) in x.chunks_exact_mut(dim).enumerate() {
                for g in 0..dim.div_ceil(BLOCK) {
                    let group = &mut row[g * BLOCK..dim.min(g * BLOCK + BLOCK)];
                    let Some(s) = group_scale(group, fmt) else {
                        return Err(non_finite_in_row(row, t * rows_per_task + r));
                    };
                    for v in group.iter_mut() {
                        *v = E4M3_LUT[usize::from(f32_to_e4m3(*v / s))] * s;
                    }
                }
            }
            Ok(())
        })
        .collect();
    results.into_iter().collect()
}

/// Elements per parallel task for activations.
const TASK_ELEMENTS: usize = 1 << 16;

/// Scale of one activation group, or `None` when it holds a NaN or an infinity.
#[inline]
fn group_scale(x: &[f32], fmt: ScaleFormat) -> Option<f32> {
    let amax = abs_max_bits(x);
    (amax < F32_INF_BITS).then(|| scale_inv_for(f32::from_bits(amax), fmt))
}

/// The error for the first non-finite element of `row` (token `token`).
#[cold]
fn non_finite_in_row(row: &[f32], token: usize) -> QuantError {
    let col = row.iter().position(|v| !v.is_finite()).unwrap_or(0);
    QuantError::NonFinite { row: token, col, value: row.get(col).copied().unwrap_or(f32::NAN) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fp8::e4m3_to_f32;
    use crate::stats::compare;

    /// splitmix64: deterministic test data without a rand dependency.
    struct Rng(u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// Uniform in [0, 1).
        fn uniform(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
        }

        /// Standard normal (Box-Muller).
        fn gauss(&mut self) -> f32 {
            let u = 1.0 - self.uniform();
            let v = self.uniform();
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        }
    }

    /// Reference E4M3FN encoder, written from the format definition: nearest of the finite codes
    /// by exhaustive search, ties to even mantissa, saturating, sign kept.
    fn ref_e4m3(x: f32) -> u8 {
        let sign = if x.is_sign_negative() { 0x80 } else { 0 };
        if x.is_nan() {
            return sign | 0x7F;
        }
        let mag = f64::from(x.abs()).min(448.0);
        let mut best = (0u8, f64::INFINITY);
        for c in 0u8..0x7F {
            let (e, m) = (i32::from(c >> 3), f64::from(c & 7));
            let v = if e == 0 { m / 8.0 * 2f64.powi(-6) } else { (1.0 + m / 8.0) * 2f64.powi(e - 7) };
            let d = (v - mag).abs();
            if d < best.1 || (d == best.1 && c & 1 == 0) {
                best = (c, d);
            }
        }
        sign | best.0
    }

    /// Source tensor in one dtype: its little-endian bytes and its exact f32 values.
    struct Src {
        dtype: SrcDtype,
        bytes: Vec<u8>,
        values: Vec<f32>,
    }

    /// Rounds `values` to `dtype` and keeps both the bytes and the rounded values.
    fn make_src(values: &[f32], dtype: SrcDtype) -> Src {
        let mut bytes = Vec::new();
        let mut exact = Vec::new();
        for &v in values {
            match dtype {
                SrcDtype::BF16 => {
                    let h = half::bf16::from_f32(v);
                    bytes.extend_from_slice(&h.to_le_bytes());
                    exact.push(h.to_f32());
                }
                SrcDtype::F16 => {
                    let h = half::f16::from_f32(v);
                    bytes.extend_from_slice(&h.to_le_bytes());
                    exact.push(h.to_f32());
                }
                SrcDtype::F32 => {
                    bytes.extend_from_slice(&v.to_le_bytes());
                    exact.push(v);
                }
            }
        }
        Src { dtype, bytes, values: exact }
    }

    /// Plain scalar reference of the contract: per block, amax, scale, divide, encode.
    fn ref_quantize(x: &[f32], rows: usize, cols: usize, fmt: ScaleFormat) -> (Vec<u8>, Vec<f32>) {
        let (gr, gc) = (rows.div_ceil(128), cols.div_ceil(128));
        let mut codes = vec![0u8; rows * cols];
        let mut scales = vec![0f32; gr * gc];
        for bi in 0..gr {
            for bj in 0..gc {
                let (r0, r1) = (bi * 128, rows.min(bi * 128 + 128));
                let (c0, c1) = (bj * 128, cols.min(bj * 128 + 128));
                let mut amax = 0f32;
                for r in r0..r1 {
                    for c in c0..c1 {
                        amax = amax.max(x[r * cols + c].abs());
                    }
                }
                let mut s = amax.max(1e-12) / 448.0;
                if fmt == ScaleFormat::Ue8m0 {
                    let mut p = 2f32.powi(-149);
                    while p < s {
                        p *= 2.0;
                    }
                    s = p;
                }
                scales[bi * gc + bj] = s;
                for r in r0..r1 {
                    for c in c0..c1 {
                        codes[r * cols + c] = ref_e4m3(x[r * cols + c] / s);
                    }
                }
            }
        }
        (codes, scales)
    }

    fn assert_same(what: &str, got_codes: &[u8], got_scales: &[f32], want: &(Vec<u8>, Vec<f32>), x: &[f32]) {
        if let Some(i) = (0..want.1.len()).find(|&i| got_scales[i].to_bits() != want.1[i].to_bits()) {
            panic!(
                "{what}: first scale mismatch at block {i}: got {:#010x}, reference {:#010x}",
                got_scales[i].to_bits(),
                want.1[i].to_bits()
            );
        }
        if let Some(i) = (0..want.0.len()).find(|&i| got_codes[i] != want.0[i]) {
            panic!(
                "{what}: first code mismatch at element {i} (input {:#010x}): got {:#04x}, reference {:#04x}",
                x[i].to_bits(),
                got_codes[i],
                want.0[i]
            );
        }
    }

    fn quantize(src: &Src, rows: usize, cols: usize, fmt: ScaleFormat) -> (Vec<u8>, Vec<f32>, ErrorStats) {
        let mut codes = vec![0xAAu8; rows * cols];
        let mut scales = vec![f32::NAN; rows.div_ceil(128) * cols.div_ceil(128)];
        let stats = quantize_weight_into(&src.bytes, src.dtype, rows, cols, fmt, &mut codes, &mut scales);
        match stats {
            Ok(s) => (codes, scales, s),
            Err(e) => panic!("quantize {rows}x{cols} {:?}: {e}", src.dtype),
        }
    }

    fn gaussian(rows: usize, cols: usize, seed: u64, sigma: f32) -> Vec<f32> {
        let mut rng = Rng(seed);
        (0..rows * cols).map(|_| rng.gauss() * sigma).collect()
    }

    const SHAPES: [(usize, usize); 6] = [(1, 1), (127, 129), (300, 200), (129, 1000), (128, 128), (3, 260)];
    const DTYPES: [SrcDtype; 3] = [SrcDtype::BF16, SrcDtype::F16, SrcDtype::F32];
    const FORMATS: [ScaleFormat; 2] = [ScaleFormat::F32, ScaleFormat::Ue8m0];

    #[test]
    fn block_quantization_is_bitwise_the_scalar_reference_for_all_shapes_dtypes_and_formats() {
        for (k, &(rows, cols)) in SHAPES.iter().enumerate() {
            let raw = gaussian(rows, cols, 17 + k as u64, 0.02);
            for dtype in DTYPES {
                let src = make_src(&raw, dtype);
                for fmt in FORMATS {
                    let (codes, scales, _) = quantize(&src, rows, cols, fmt);
                    let want = ref_quantize(&src.values, rows, cols, fmt);
                    assert_same(&format!("{rows}x{cols} {dtype:?} {fmt:?}"), &codes, &scales, &want, &src.values);
                }
            }
        }
    }

    #[test]
    fn all_zero_blocks_get_scale_1e12_over_448_and_zero_codes() {
        for fmt in FORMATS {
            let src = make_src(&[0.0; 300 * 200], SrcDtype::BF16);
            let (codes, scales, stats) = quantize(&src, 300, 200, fmt);
            let want = scale_inv_for(0.0, fmt);
            assert_eq!(scale_inv_for(0.0, ScaleFormat::F32), 1e-12f32 / 448.0);
            assert!(scales.iter().all(|s| s.to_bits() == want.to_bits()), "{fmt:?}: scales {scales:?}");
            assert!(codes.iter().all(|&c| c == 0), "{fmt:?}: non-zero code");
            assert_eq!((stats.numel, stats.sum_sq_err, stats.rel_rms()), (60000, 0.0, 0.0));
        }
        // Negative zeros keep their sign.
        let src = make_src(&[-0.0; 4], SrcDtype::F32);
        assert_eq!(quantize(&src, 2, 2, ScaleFormat::F32).0, vec![0x80; 4]);
    }

    #[test]
    fn outlier_and_tiny_magnitude_blocks_match_the_reference() {
        let (rows, cols) = (129, 300);
        let mut rng = Rng(5);
        let mut x: Vec<f32> = (0..rows * cols).map(|_| (rng.uniform() as f32 - 0.5) * 2e-3).collect();
        x[3 * cols + 7] = 1e4; // outlier in block (0, 0)
        x[128 * cols + 299] = -1e4; // outlier in the edge block (1, 2)
        for c in 128..256 {
            for r in 0..128 {
                x[r * cols + c] = if (r + c) % 3 == 0 { 1e-30 } else { -3e-31 }; // block (0, 1): tiny
            }
        }
        for dtype in [SrcDtype::BF16, SrcDtype::F32] {
            let src = make_src(&x, dtype);
            for fmt in FORMATS {
                let (codes, scales, _) = quantize(&src, rows, cols, fmt);
                let want = ref_quantize(&src.values, rows, cols, fmt);
                assert_same(&format!("outliers {dtype:?} {fmt:?}"), &codes, &scales, &want, &src.values);
                if fmt == ScaleFormat::F32 {
                    assert_eq!(codes[3 * cols + 7], 0x7E, "outlier is the block max, 448");
                    assert_eq!(codes[128 * cols + 299], 0xFE, "edge-block outlier is -448");
                }
                // Tiny block: amax < 1e-12, so every value is far below the smallest step.
                assert!(codes[128..256].iter().all(|&c| c & 0x7F == 0));
            }
        }
    }

    #[test]
    fn ue8m0_scales_are_powers_of_two_at_least_the_f32_scale_and_below_twice_it() {
        let (rows, cols) = (300, 1000);
        let mut rng = Rng(9);
        let x: Vec<f32> = (0..rows * cols).map(|i| rng.gauss() * 10f32.powi((i % 13) as i32 - 6)).collect();
        let src = make_src(&x, SrcDtype::F32);
        let (_, f, _) = quantize(&src, rows, cols, ScaleFormat::F32);
        let (_, p, _) = quantize(&src, rows, cols, ScaleFormat::Ue8m0);
        for (i, (&f, &p)) in f.iter().zip(&p).enumerate() {
            assert_eq!(p.to_bits() & 0x007F_FFFF, 0, "block {i}: {:#010x} not a power of two", p.to_bits());
            assert!(p >= f && p < 2.0 * f, "block {i}: ue8m0 {:#010x} vs f32 {:#010x}", p.to_bits(), f.to_bits());
        }
        for amax in [448.0f32, 896.0, 1.0, 1e-12, 0.0] {
            let p = scale_inv_for(amax, ScaleFormat::Ue8m0);
            let f = scale_inv_for(amax, ScaleFormat::F32);
            assert!(p >= f && p < 2.0 * f && p.to_bits() & 0x007F_FFFF == 0, "amax {amax:e}");
        }
        assert_eq!(scale_inv_for(448.0, ScaleFormat::Ue8m0), 1.0, "exact power of two stays");
    }

    #[test]
    fn dequantize_round_trip_error_is_small_on_gaussian_data_and_stats_agree() {
        let (rows, cols) = (300, 1000);
        let src = make_src(&gaussian(rows, cols, 3, 0.02), SrcDtype::BF16);
        for fmt in FORMATS {
            let (codes, scales, stats) = quantize(&src, rows, cols, fmt);
            let mut deq = vec![0f32; rows * cols];
            dequantize_weight_into(&codes, &scales, rows, cols, &mut deq).unwrap();
            let direct = compare(&src.values, &deq);
            assert!(direct.rel_rms() < 0.05, "{fmt:?}: rel_rms {}", direct.rel_rms());
            assert_eq!(stats.numel, direct.numel);
            assert!((stats.rel_rms() - direct.rel_rms()).abs() < 1e-5 * direct.rel_rms(), "{stats:?} vs {direct:?}");
            assert!((stats.max_abs() - direct.max_abs()).abs() <= 1e-6 * direct.max_abs());
            // Dequantization is code value times block scale.
            for (i, &d) in deq.iter().enumerate() {
                let s = scales[(i / cols / 128) * cols.div_ceil(128) + (i % cols) / 128];
                assert_eq!(d.to_bits(), (e4m3_to_f32(codes[i]) * s).to_bits(), "element {i}");
            }
            let mut bf = vec![0u8; rows * cols * 2];
            dequantize_weight_to_bf16(&codes, &scales, rows, cols, &mut bf).unwrap();
            for (i, (b, &d)) in bf.chunks_exact(2).zip(&deq).enumerate() {
                let want = half::bf16::from_f32(d).to_bits();
                assert_eq!(u16::from_le_bytes([b[0], b[1]]), want, "bf16 element {i} ({:#010x})", d.to_bits());
            }
        }
    }

    #[test]
    fn non_finite_reports_the_first_element_in_row_major_order_across_stripes() {
        let (rows, cols) = (700, 300);
        let x = gaussian(rows, cols, 11, 1.0);
        // Several stripes hold NaN/Inf; in stripe 1 a later block column has an earlier row.
        let bad = [(650, 3, f32::NAN), (140, 250, f32::INFINITY), (141, 5, f32::NAN), (400, 0, f32::NEG_INFINITY)];
        for dtype in DTYPES {
            for _ in 0..5 {
                let mut x = x.clone();
                for &(r, c, v) in &bad {
                    x[r * cols + c] = v;
                }
                let src = make_src(&x, dtype);
                let mut codes = vec![0u8; rows * cols];
                let mut scales = vec![0f32; 6 * 3];
                let r = quantize_weight_into(&src.bytes, dtype, rows, cols, ScaleFormat::F32, &mut codes, &mut scales);
                match r {
                    Err(QuantError::NonFinite { row: 140, col: 250, value }) if value == f32::INFINITY => {}
                    other => panic!("{dtype:?}: expected Inf at [140, 250], got {other:?}"),
                }
            }
        }
    }

    #[test]
    fn shape_mismatches_are_errors_and_empty_tensors_are_fine() {
        let src = make_src(&[1.0; 6], SrcDtype::BF16);
        let mut codes = [0u8; 6];
        let mut scales = [0f32; 1];
        let r = quantize_weight_into(&src.bytes[1..], SrcDtype::BF16, 2, 3, ScaleFormat::F32, &mut codes, &mut scales);
        assert!(matches!(r, Err(QuantError::Shape { what: "source bytes", expected: 12, got: 11 })), "{r:?}");
        let r = quantize_weight_into(&src.bytes, SrcDtype::BF16, 2, 3, ScaleFormat::F32, &mut codes[1..], &mut scales);
        assert!(matches!(r, Err(QuantError::Shape { what: "codes", .. })), "{r:?}");
        let r = quantize_weight_into(&src.bytes, SrcDtype::BF16, 2, 3, ScaleFormat::F32, &mut codes, &mut []);
        assert!(matches!(r, Err(QuantError::Shape { what: "scales", .. })), "{r:?}");
        let r = quantize_weight_into(&[], SrcDtype::BF16, usize::MAX, 3, ScaleFormat::F32, &mut [], &mut []);
        assert!(matches!(r, Err(QuantError::Shape { .. })), "overflowing shape: {r:?}");
        for (rows, cols) in [(0, 0), (0, 5), (5, 0)] {
            let r = quantize_weight_into(&[], SrcDtype::F32, rows, cols, ScaleFormat::F32, &mut [], &mut []);
            assert_eq!(r.unwrap(), ErrorStats::default());
            dequantize_weight_into(&[], &[], rows, cols, &mut []).unwrap();
            quantize_token_groups(&[], rows, cols, ScaleFormat::F32, &mut [], &mut []).unwrap();
        }
        let r = dequantize_weight_to_bf16(&codes, &scales, 2, 3, &mut [0u8; 6]);
        assert!(matches!(r, Err(QuantError::Shape { what: "output", expected: 12, got: 6 })), "{r:?}");
    }

    #[test]
    fn token_groups_equal_block_quantization_of_each_row_alone() {
        for &(tokens, dim) in &[(1, 1), (5, 300), (37, 128), (700, 129)] {
            let x = gaussian(tokens, dim, 23, 3.0);
            for fmt in FORMATS {
                let groups = dim.div_ceil(128);
                let mut codes = vec![0u8; tokens * dim];
                let mut scales = vec![0f32; tokens * groups];
                quantize_token_groups(&x, tokens, dim, fmt, &mut codes, &mut scales).unwrap();
                let mut fake = x.clone();
                fake_quant_token_groups(&mut fake, tokens, dim, fmt).unwrap();
                for t in 0..tokens {
                    let row = make_src(&x[t * dim..(t + 1) * dim], SrcDtype::F32);
                    let (rc, rs, _) = quantize(&row, 1, dim, fmt);
                    let what = format!("{tokens}x{dim} {fmt:?} token {t}");
                    assert_same(
                        &what,
                        &codes[t * dim..(t + 1) * dim],
                        &scales[t * groups..(t + 1) * groups],
                        &(rc, rs),
                        &row.values,
                    );
                    let mut deq = vec![0f32; dim];
                    dequantize_weight_into(
                        &codes[t * dim..(t + 1) * dim],
                        &scales[t * groups..(t + 1) * groups],
                        1,
                        dim,
                        &mut deq,
                    )
                    .unwrap();
                    for (c, (a, b)) in fake[t * dim..(t + 1) * dim].iter().zip(&deq).enumerate() {
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "{what}: fake quant differs at channel {c} ({:#010x})",
                            x[t * dim + c].to_bits()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn token_groups_report_the_first_non_finite_in_row_major_order() {
        let (tokens, dim) = (1000, 300);
        let mut x = gaussian(tokens, dim, 2, 1.0);
        x[900 * dim + 3] = f32::NAN;
        x[600 * dim + 299] = f32::INFINITY;
        x[600 * dim + 200] = f32::NEG_INFINITY;
        let mut codes = vec![0u8; tokens * dim];
        let mut scales = vec![0f32; tokens * 3];
        let r = quantize_token_groups(&x, tokens, dim, ScaleFormat::F32, &mut codes, &mut scales);
        assert!(matches!(r, Err(QuantError::NonFinite { row: 600, col: 200, .. })), "{r:?}");
        let r = fake_quant_token_groups(&mut x, tokens, dim, ScaleFormat::F32);
        assert!(matches!(r, Err(QuantError::NonFinite { row: 600, col: 200, .. })), "{r:?}");
    }

    #[test]
    fn computed_decode_equals_the_lookup_table_on_every_non_nan_code() {
        for c in (0..=255u8).filter(|&c| !crate::fp8::is_e4m3_nan(c)) {
            let (got, want) = (decode_finite_e4m3(c), e4m3_to_f32(c));
            assert_eq!(got.to_bits(), want.to_bits(), "code {c:#04x}");
        }
    }

    #[test]
    fn f16_widening_is_exact_on_all_65536_patterns() {
        for h in 0..=u16::MAX {
            let (got, want) = (f16_bits_to_f32(h), half::f16::from_bits(h).to_f32());
            let same = got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan());
            assert!(same, "f16 {h:#06x}: got {:#010x}, half gives {:#010x}", got.to_bits(), want.to_bits());
        }
    }

    #[test]
    fn scale_format_serializes_lowercase() {
        assert_eq!(serde_json::to_string(&ScaleFormat::Ue8m0).unwrap(), "\"ue8m0\"");
        assert_eq!(serde_json::from_str::<ScaleFormat>("\"f32\"").unwrap(), ScaleFormat::F32);
    }

    #[test]
    fn portable_and_dispatched_stripe_paths_give_identical_bits_and_stats() {
        let (rows, cols) = (128, 777);
        let mut x = gaussian(rows, cols, 31, 0.05);
        x[5] = 3e-39; // an f32 subnormal, which BF16 and F32 keep
        for dtype in DTYPES {
            let src = make_src(&x, dtype);
            for fmt in FORMATS {
                let grid = cols.div_ceil(BLOCK);
                let (mut c1, mut s1) = (vec![0u8; rows * cols], vec![0f32; grid]);
                let (mut c2, mut s2) = (vec![0u8; rows * cols], vec![0f32; grid]);
                let a = quantize_stripe(&src.bytes, dtype, cols, fmt, &mut c1, &mut s1);
                let b = quantize_stripe_portable(&src.bytes, dtype, cols, fmt, &mut c2, &mut s2);
                let what = format!("{dtype:?} {fmt:?}");
                assert_same(&what, &c1, &s1, &(c2, s2), &src.values);
                assert_eq!(a, b, "{what}: stats differ");
            }
        }
    }

    #[test]
    fn unaligned_source_bytes_give_the_same_result() {
        let (rows, cols) = (130, 257);
        let x = gaussian(rows, cols, 41, 1.0);
        for dtype in DTYPES {
            let src = make_src(&x, dtype);
            let mut shifted = vec![0u8; 3];
            shifted.extend_from_slice(&src.bytes);
            let (c1, s1, st1) = quantize(&src, rows, cols, ScaleFormat::F32);
            let mut c2 = vec![0u8; rows * cols];
            let mut s2 = vec![0f32; s1.len()];
            let st2 = quantize_weight_into(&shifted[3..], dtype, rows, cols, ScaleFormat::F32, &mut c2, &mut s2);
            assert_same(&format!("{dtype:?} unaligned"), &c2, &s2, &(c1, s1), &src.values);
            assert_eq!(st2.ok(), Some(st1));
        }
    }

    /// What a stripe kernel returns.
    type KernelResult = Result<ErrorStats, NonFiniteAt>;

    /// A stripe kernel: [`quantize_stripe_portable`] or a SIMD one.
    type Kernel = fn(&[u8], SrcDtype, usize, ScaleFormat, &mut [u8], &mut [f32]) -> KernelResult;

    /// The portable kernel, as a [`Kernel`].
    fn portable(src: &[u8], d: SrcDtype, cols: usize, f: ScaleFormat, c: &mut [u8], s: &mut [f32]) -> KernelResult {
        quantize_stripe_portable(src, d, cols, f, c, s)
    }

    /// The AVX2 kernel, as a [`Kernel`]; fails (rather than passing untested) on a CPU without it.
    #[cfg(target_arch = "x86_64")]
    fn avx2_kernel(src: &[u8], d: SrcDtype, cols: usize, f: ScaleFormat, c: &mut [u8], s: &mut [f32]) -> KernelResult {
        assert!(avx2::available(), "this CPU lacks AVX2 or F16C: the AVX2 kernel cannot be tested here");
        // SAFETY: the CPU has AVX2 and F16C, asserted just above.
        unsafe { avx2::quantize_stripe(src, d, cols, f, c, s) }
    }

    /// A whole tensor quantized by a kernel: codes, scale bits, and the statistics or the first
    /// non-finite element as (row, col, value bits).
    struct Whole {
        codes: Vec<u8>,
        scales: Vec<u32>,
        stats: Result<ErrorStats, (usize, usize, u32)>,
    }

    /// A whole tensor through `kernel`, stripe after stripe, the statistics merged in stripe
    /// order as [`quantize_weight_into`] merges them.
    fn by_stripes(kernel: Kernel, src: &Src, rows: usize, cols: usize, fmt: ScaleFormat) -> Whole {
        let grid = cols.div_ceil(BLOCK);
        let mut codes = vec![0xAAu8; rows * cols];
        let mut scales = vec![f32::NAN; rows.div_ceil(BLOCK) * grid];
        let mut stats = Ok(ErrorStats::default());
        let stripe = BLOCK * cols;
        let parts =
            src.bytes.chunks(stripe * src.dtype.size()).zip(codes.chunks_mut(stripe)).zip(scales.chunks_mut(grid));
        for (i, ((s, c), g)) in parts.enumerate() {
            match kernel(s, src.dtype, cols, fmt, c, g) {
                Ok(st) => stats.iter_mut().for_each(|t| t.merge(&st)),
                Err((r, col, v)) => {
                    stats = Err((i * BLOCK + r, col, v.to_bits()));
                    break;
                }
            }
        }
        Whole { codes, scales: scales.iter().map(|s| s.to_bits()).collect(), stats }
    }

    /// Asserts that the AVX2 kernel gives exactly the portable kernel's codes, scales,
    /// statistics and non-finite report on `src`, naming the first difference.
    #[cfg(target_arch = "x86_64")]
    fn assert_avx2_is_portable(what: &str, src: &Src, rows: usize, cols: usize, fmt: ScaleFormat) {
        let want = by_stripes(portable, src, rows, cols, fmt);
        let got = by_stripes(avx2_kernel, src, rows, cols, fmt);
        assert_eq!(got.stats, want.stats, "{what}: statistics or non-finite report differ");
        if want.stats.is_err() {
            return; // codes and scales are unspecified after a non-finite element
        }
        if let Some(i) = (0..want.scales.len()).find(|&i| got.scales[i] != want.scales[i]) {
            panic!("{what}: scale of block {i}: AVX2 {:#010x}, portable {:#010x}", got.scales[i], want.scales[i]);
        }
        if let Some(i) = (0..want.codes.len()).find(|&i| got.codes[i] != want.codes[i]) {
            let (x, g, w) = (src.values[i].to_bits(), got.codes[i], want.codes[i]);
            panic!("{what}: code of element {i} (input {x:#010x}): AVX2 {g:#04x}, portable {w:#04x}");
        }
    }

    /// A source tensor made of raw 16-bit patterns of `dtype` (BF16 or F16).
    fn src_of_bits(bits: &[u16], dtype: SrcDtype) -> Src {
        let widen_one = |h: u16| match dtype {
            SrcDtype::BF16 => half::bf16::from_bits(h).to_f32(),
            _ => half::f16::from_bits(h).to_f32(),
        };
        Src {
            dtype,
            bytes: bits.iter().flat_map(|h| h.to_le_bytes()).collect(),
            values: bits.iter().map(|&h| widen_one(h)).collect(),
        }
    }

    /// Every finite 16-bit pattern of `dtype` (whose exponent field is not all ones), laid out in
    /// tensors of each of `shapes` (rows × cols = the number of patterns), in pattern order and
    /// sorted by magnitude (so that blocks hold neighbouring magnitudes and the scales span the
    /// whole range), quantized by both kernels in both scale formats.
    #[cfg(target_arch = "x86_64")]
    fn every_finite_16_bit_value(dtype: SrcDtype, exp_mask: u16, shapes: &[(usize, usize)]) {
        let finite: Vec<u16> = (0..=u16::MAX).filter(|h| h & exp_mask != exp_mask).collect();
        let mut sorted = finite.clone();
        sorted.sort_by_key(|h| (h & 0x7FFF, h >> 15));
        for &(rows, cols) in shapes {
            assert_eq!(rows * cols, finite.len());
            for (order, bits) in [("pattern order", &finite), ("by magnitude", &sorted)] {
                let src = src_of_bits(bits, dtype);
                for fmt in FORMATS {
                    assert_avx2_is_portable(&format!("{dtype:?} {rows}x{cols} {order} {fmt:?}"), &src, rows, cols, fmt);
                }
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_kernel_is_the_portable_one_on_every_finite_bf16_value() {
        let shapes = [(128, 510), (510, 128), (255, 256), (136, 480), (1360, 48), (8160, 8)];
        every_finite_16_bit_value(SrcDtype::BF16, 0x7F80, &shapes);
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_kernel_is_the_portable_one_on_every_finite_f16_value() {
        let shapes = [(128, 496), (496, 128), (248, 256), (992, 64), (31, 2048), (7936, 8)];
        every_finite_16_bit_value(SrcDtype::F16, 0x7C00, &shapes);
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_kernel_is_the_portable_one_on_a_dense_sweep_of_f32_values() {
        // Every 32771st bit pattern (a prime step: all exponents, mantissas and both signs),
        // finite ones only, then the same sorted by magnitude.
        let mut bits: Vec<u32> = (0..=u32::MAX).step_by(32771).filter(|b| b & 0x7F80_0000 != 0x7F80_0000).collect();
        bits.truncate(255 * 510);
        let mut sorted = bits.clone();
        sorted.sort_by_key(|b| (b & 0x7FFF_FFFF, b >> 31));
        for (order, bits) in [("pattern order", &bits), ("by magnitude", &sorted)] {
            let values: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
            let src = make_src(&values, SrcDtype::F32);
            for (rows, cols) in [(255, 510), (510, 255), (2040, 63)] {
                for fmt in FORMATS {
                    assert_avx2_is_portable(&format!("F32 {rows}x{cols} {order} {fmt:?}"), &src, rows, cols, fmt);
                }
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_kernel_is_the_portable_one_on_edge_blocks_zeros_outliers_and_tiny_values() {
        for (k, &(rows, cols)) in SHAPES.iter().chain(&[(129, 17), (260, 31), (128, 7168), (257, 385)]).enumerate() {
            let mut x = gaussian(rows, cols, 50 + k as u64, 0.02);
            let mut rng = Rng(k as u64);
            for v in x.iter_mut() {
                match rng.next_u64() % 64 {
                    0 => *v = 0.0,
                    1 => *v = -0.0,
                    2 => *v *= 1e4,                                 // outlier
                    3 => *v = 3e-39 * (rng.uniform() as f32 - 0.5), // f32 subnormal
                    4 => *v *= 1e-30,                               // far below a step of its block
                    5 => *v = 6e-8,                                 // an F16 subnormal
                    _ => {}
                }
            }
            // An all-zero block, where there is room for one.
            if rows >= 128 && cols >= 256 {
                (0..128).for_each(|r| x[r * cols + 128..r * cols + 256].fill(0.0));
            }
            for dtype in DTYPES {
                let src = make_src(&x, dtype);
                for fmt in FORMATS {
                    assert_avx2_is_portable(&format!("{dtype:?} {rows}x{cols} {fmt:?}"), &src, rows, cols, fmt);
                }
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_kernel_reports_the_same_first_non_finite_element() {
        let (rows, cols) = (300, 700);
        let x = gaussian(rows, cols, 7, 1.0);
        // Places: a full block, the partial last column block, a partial row segment's last
        // element, a block after a finite one in the same panel, a later panel with an earlier
        // row, the last element.
        let places = [(5, 3), (10, 699), (140, 690), (130, 300), (129, 600), (299, 699), (256, 0)];
        for dtype in DTYPES {
            let bad: Vec<f32> = match dtype {
                SrcDtype::F32 => vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::from_bits(0xFF80_0001)],
                _ => vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY],
            };
            for (p, &(r, c)) in places.iter().enumerate() {
                for (b, &v) in bad.iter().enumerate() {
                    let mut y = x.clone();
                    y[r * cols + c] = v;
                    // A second one later in row-major order, in an earlier block column.
                    y[(r + 1).min(rows - 1) * cols] = bad[(b + 1) % bad.len()];
                    let src = make_src(&y, dtype);
                    assert_avx2_is_portable(
                        &format!("{dtype:?} place {p} value {b}"),
                        &src,
                        rows,
                        cols,
                        ScaleFormat::F32,
                    );
                }
            }
        }
        // Every non-finite BF16 and F16 pattern, as the first bad element of a block.
        for (dtype, exp_mask) in [(SrcDtype::BF16, 0x7F80u16), (SrcDtype::F16, 0x7C00)] {
            for h in (0..=u16::MAX).filter(|h| h & exp_mask == exp_mask) {
                let mut bits = vec![0x3C00u16; 3 * 200];
                bits[250] = h;
                assert_avx2_is_portable(
                    &format!("{dtype:?} {h:#06x}"),
                    &src_of_bits(&bits, dtype),
                    3,
                    200,
                    ScaleFormat::F32,
                );
            }
        }
    }

    /// Throughput of BF16 weight quantization on 1 GiB (release build:
    /// `cargo test --release -p fp8forge-quant --lib -- --ignored --nocapture bench_`).
    #[test]
    #[ignore = "benchmark: run in release"]
    fn bench_quantize_1gib_bf16() {
        let (rows, cols) = (32768, 16384); // 512 Mi elements = 1 GiB of BF16
        // Cheap bell-shaped data: a sum of four uniform bytes, scaled to sigma 0.02.
        let mut rng = Rng(1);
        let mut bytes = vec![0u8; rows * cols * 2 + 1];
        for b in bytes[1..].chunks_exact_mut(8) {
            let r = rng.next_u64();
            for (k, h) in b.chunks_exact_mut(2).enumerate() {
                let w = (r >> (16 * k)) & 0xFFFF;
                let sum = (w & 0xF) + ((w >> 4) & 0xF) + ((w >> 8) & 0xF) + ((w >> 12) & 0xF);
                let v = (sum as f32 - 30.0) * (0.02 / 9.2);
                h.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes());
            }
        }
        let src = &bytes[1..]; // unaligned, as a memory map may give
        let mut codes = vec![0u8; rows * cols];
        let mut scales = vec![0f32; (rows / 128) * (cols / 128)];
        for _ in 0..4 {
            let t = std::time::Instant::now();
            let r = quantize_weight_into(src, SrcDtype::BF16, rows, cols, ScaleFormat::F32, &mut codes, &mut scales);
            let dt = t.elapsed().as_secs_f64();
            let s = r.unwrap();
            println!(
                "quantize 1 GiB bf16: {dt:.3} s = {:.2} GB/s of input on {} threads (rel_rms {:.4})",
                src.len() as f64 / dt / 1e9,
                rayon::current_num_threads(),
                s.rel_rms()
            );
        }
        let mut out = vec![0u8; rows * cols * 2];
        for _ in 0..2 {
            let t = std::time::Instant::now();
            dequantize_weight_to_bf16(&codes, &scales, rows, cols, &mut out).unwrap();
            println!("dequantize to bf16: {:.3} s", t.elapsed().as_secs_f64());
        }
    }

    /// CPU time this thread has run, in seconds (Linux's schedstat; 0 elsewhere): unlike wall
    /// time, it does not count the time other processes hold the core.
    fn thread_cpu_s() -> f64 {
        let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
        stat.split_whitespace().next().and_then(|ns| ns.parse::<f64>().ok()).unwrap_or(0.0) / 1e9
    }

    /// Single-thread throughput of the dispatched and the portable stripe paths, per source
    /// dtype, on 64 stripes of 128 × 7168 (more than the L3 cache), the paths interleaved and
    /// repeated, per second of this thread's CPU time so that other processes' load does not
    /// count (release build:
    /// `cargo test --release -p fp8forge-quant --lib -- --ignored --nocapture bench_stripe`).
    #[test]
    #[ignore = "benchmark: run in release"]
    fn bench_stripe_paths_one_thread() {
        let (stripes, cols) = (64, 7168);
        let x = gaussian(stripes * BLOCK, cols, 3, 0.02);
        for dtype in DTYPES {
            let src = make_src(&x, dtype);
            let mut codes = vec![0u8; BLOCK * cols];
            let mut scales = vec![0f32; cols.div_ceil(BLOCK)];
            let stripe_bytes = BLOCK * cols * dtype.size();
            let mut times = [Vec::new(), Vec::new()];
            for _ in 0..5 {
                for (path, t) in times.iter_mut().enumerate() {
                    let start = thread_cpu_s();
                    for s in src.bytes.chunks_exact(stripe_bytes) {
                        let r = if path == 0 {
                            quantize_stripe(s, dtype, cols, ScaleFormat::F32, &mut codes, &mut scales)
                        } else {
                            quantize_stripe_portable(s, dtype, cols, ScaleFormat::F32, &mut codes, &mut scales)
                        };
                        assert!(r.is_ok());
                    }
                    t.push(src.bytes.len() as f64 / (thread_cpu_s() - start) / 1e9);
                }
            }
            for (name, t) in ["dispatched", "portable"].iter().zip(&mut times) {
                t.sort_by(f64::total_cmp);
                let (best, median, worst) = (t[4], t[2], t[0]);
                println!(
                    "{dtype:?} {name}: {best:.2} GB/s of input per CPU-second (median {median:.2}, worst {worst:.2})"
                );
            }
        }
    }
}
