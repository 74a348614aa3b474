//! CPU references of every kernel's exact contract, and an f64 reference of the dequantized
//! operands.
//!
//! # The GEMM contract
//!
//! `D[M, N] (bf16) = A[M, K] × B[N, K]ᵀ` with
//! - `A`: E4M3FN codes, row-major `[M, K]`; `SA`: f32, row-major `[M, K/128]` (one scale per row and
//!   128 columns, the 1×128 activation quantization);
//! - `B`: E4M3FN codes, row-major `[N, K]` (`[E, N, K]` grouped); `SB`: f32, row-major
//!   `[ceil(N/128), K/128]` (`[E, ceil(N/128), K/128]` grouped), one scale per 128×128 block;
//! - K a multiple of 128 (refused otherwise); M and N arbitrary.
//!
//! For each output `(m, n)` and each K block `kb`: `partial = Σ_{k in block} a[m,k] · b[n,k]`
//! accumulated in f32 (each product of two E4M3 values is exact in f32), then
//! `acc = fma(partial, SA[m, kb] · SB[n / 128, kb], acc)` in f32, starting from 0; finally
//! `D[m, n] = bf16(acc)`, rounded to nearest even. The tensor cores sum each partial in their own
//! order, so a kernel matches [`gemm_contract`] up to f32 rounding inside the partial sums, not
//! bit for bit; [`gemm_f64`] is the exact product of the dequantized operands.
//!
//! Grouped (M-grouped contiguous, MoE prefill): `m_indices[m]` is the expert of row `m` or -1 for
//! a padding row; row `m` uses `B[e]` and `SB[e]`; a padding row's output is 0. Every aligned
//! 128-row block holds one expert's rows followed only by padding rows (see
//! [`validate_m_indices`]).
//!
//! # The activation quantization contract
//!
//! Per token and per 128 channels of a bf16 `[M, K]` input: `amax = max |x|` (widened to f32
//! exactly), `scale = max(amax, 1e-12) / 448` in f32 (or, for [`ScaleFormat::Ue8m0`], the smallest
//! power of two `>=` that), `q = E4M3FN(x / scale)` with the division in f32, round to nearest
//! even, saturating at ±448. The same rules as ARCHITECTURE.md's weight format and as
//! `fp8forge_quant::block::quantize_token_groups`.

use rayon::prelude::*;

use crate::config::{BLOCK_K, GROUP_ALIGN, GemmShape};
use crate::error::KernelError;

/// Largest finite E4M3FN value.
pub const E4M3_MAX: f32 = 448.0;
/// Floor of `amax` before dividing by 448, so an all-zero group gets a positive scale.
pub const MIN_AMAX: f32 = 1e-12;
const BK: usize = BLOCK_K as usize;

/// How scales are stored.
// Not `fp8forge_quant::block::ScaleFormat`: kernels depends on no workspace crate, and this CPU
// reference is kept independent of the quantizer it checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum ScaleFormat {
    /// `max(amax, 1e-12) / 448` in f32.
    F32,
    /// The smallest power of two at least the f32 scale (stored as f32).
    Ue8m0,
}

/// Decodes one E4M3FN code (`0x7F`/`0xFF` are NaN).
pub fn e4m3_to_f32(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = i32::from((code >> 3) & 0xF);
    let man = f32::from(code & 7);
    if exp == 15 && code & 7 == 7 {
        return f32::NAN;
    }
    let mag = if exp == 0 { man * 2f32.powi(-9) } else { (1.0 + man / 8.0) * 2f32.powi(exp - 7) };
    sign * mag
}

/// Encodes `x` as E4M3FN: round to nearest, ties to even; saturating to ±448 (an infinity too);
/// NaN to `0x7F` with the input's sign.
pub fn f32_to_e4m3(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    if x.is_nan() {
        return sign | 0x7F;
    }
    let a = f64::from(x.abs());
    if a >= f64::from(E4M3_MAX) {
        return sign | 0x7E;
    }
    if a < 2f64.powi(-6) {
        // Subnormals (and zero): multiples of 2^-9; 8 · 2^-9 is the smallest normal, code 0x08.
        let q = (a * 512.0).round_ties_even() as u8;
        return sign | q;
    }
    // A normal f32: keep 3 of its 23 mantissa bits, ties to even; a carry bumps the exponent.
    let bits = x.abs().to_bits();
    let mut e = ((bits >> 23) & 0xFF) as i32 - 127;
    let man = bits & 0x007F_FFFF;
    let (mut q, rem) = (man >> 20, man & 0x000F_FFFF);
    if rem > 0x0008_0000 || (rem == 0x0008_0000 && q & 1 == 1) {
        q += 1;
    }
    if q == 8 {
        q = 0;
        e += 1;
    }
    sign | (((e + 7) << 3) as u8) | q as u8
}

/// A 256-entry decode table of E4M3FN.
pub fn e4m3_table() -> [f32; 256] {
    let mut t = [0f32; 256];
    for (c, v) in t.iter_mut().enumerate() {
        *v = e4m3_to_f32(c as u8);
    }
    t
}

/// f32 to bf16 bits, round to nearest even.
pub fn f32_to_bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// bf16 bits to f32 (exact).
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// The scale of a group whose largest magnitude is `amax` (finite, non-negative).
pub fn scale_for(amax: f32, fmt: ScaleFormat) -> f32 {
    let s = amax.max(MIN_AMAX) / E4M3_MAX;
    match fmt {
        ScaleFormat::F32 => s,
        ScaleFormat::Ue8m0 => {
            let bits = s.to_bits();
            if bits & 0x007F_FFFF == 0 { s } else { f32::from_bits((bits & 0x7F80_0000) + 0x0080_0000) }
        }
    }
}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), KernelError> {
    if expected == got { Ok(()) } else { Err(KernelError::BufferLength { what, expected, got }) }
}

/// The activation quantization contract on a bf16 `[m, k]` input (bits, row-major), `k` a
/// multiple of 128: returns the E4M3 codes `[m, k]` and the scales `[m, k/128]`, row-major.
///
/// # Errors
///
/// [`KernelError::Shape`] when `k` is not a multiple of 128, [`KernelError::BufferLength`] when
/// `x` is not `m × k`, [`KernelError::Input`] for a non-finite input.
pub fn act_quant_ref(x: &[u16], m: usize, k: usize, fmt: ScaleFormat) -> Result<(Vec<u8>, Vec<f32>), KernelError> {
    if !k.is_multiple_of(BK) || k == 0 {
        return Err(KernelError::Shape { shape: format!("{m}x{k}"), why: crate::config::Why::KNotMultipleOf128 { k } });
    }
    check_len("activations", m * k, x.len())?;
    let kb = k / BK;
    let mut codes = vec![0u8; m * k];
    let mut scales = vec![0f32; m * kb];
    codes.par_chunks_mut(k).zip(scales.par_chunks_mut(kb)).zip(x.par_chunks(k)).enumerate().try_for_each(
        |(row, ((codes, scales), x))| {
            for (g, ((xs, cs), s)) in x.chunks(BK).zip(codes.chunks_mut(BK)).zip(scales.iter_mut()).enumerate() {
                let v: Vec<f32> = xs.iter().map(|&b| bf16_to_f32(b)).collect();
                if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                    return Err(KernelError::Input {
                        what: "activations",
                        detail: format!("non-finite value {} at row {row}, column {}", v[i], g * BK + i),
                    });
                }
                let amax = v.iter().fold(0f32, |a, x| a.max(x.abs()));
                *s = scale_for(amax, fmt);
                for (c, x) in cs.iter_mut().zip(&v) {
                    *c = f32_to_e4m3(x / *s);
                }
            }
            Ok(())
        },
    )?;
    Ok((codes, scales))
}

/// Quantizes an f32 weight `[n, k]` (row-major) into E4M3 codes and a 128×128 block scale grid
/// `[ceil(n/128), ceil(k/128)]`, with the rules of ARCHITECTURE.md (used to make test data).
pub fn quantize_weight_ref(w: &[f32], n: usize, k: usize, fmt: ScaleFormat) -> (Vec<u8>, Vec<f32>) {
    let (nb, kb) = (n.div_ceil(BK), k.div_ceil(BK));
    let mut scales = vec![0f32; nb * kb];
    let mut codes = vec![0u8; n * k];
    // One 128-row stripe per task: its scale row, then its codes.
    codes.par_chunks_mut(BK * k).zip(scales.par_chunks_mut(kb)).zip(w.par_chunks(BK * k)).for_each(
        |((codes, scales), w)| {
            let rows = w.len() / k;
            for (j, s) in scales.iter_mut().enumerate() {
                let cols = j * BK..((j + 1) * BK).min(k);
                let amax = (0..rows)
                    .flat_map(|r| w[r * k + cols.start..r * k + cols.end].iter())
                    .fold(0f32, |a, x| a.max(x.abs()));
                *s = scale_for(amax, fmt);
            }
            for (i, (c, x)) in codes.iter_mut().zip(w).enumerate() {
                *c = f32_to_e4m3(x / scales[(i % k) / BK]);
            }
        },
    );
    (codes, scales)
}

/// The operands of one GEMM, borrowed (host copies of what a kernel reads).
#[derive(Clone, Copy, Debug)]
pub struct GemmInputs<'a> {
    /// A codes, `[M, K]`.
    pub a: &'a [u8],
    /// A scales, `[M, K/128]`.
    pub sa: &'a [f32],
    /// B codes, `[E, N, K]` (E = 1 dense).
    pub b: &'a [u8],
    /// B scales, `[E, ceil(N/128), K/128]`.
    pub sb: &'a [f32],
    /// Grouped only: the expert of each row, -1 for padding, `[M]`.
    pub m_indices: Option<&'a [i32]>,
}

impl GemmInputs<'_> {
    /// Checks every buffer's length against `shape`, and the row-to-expert map of a grouped shape.
    ///
    /// # Errors
    ///
    /// [`KernelError::Shape`] for an invalid shape, [`KernelError::BufferLength`] for a buffer of
    /// the wrong size, [`KernelError::Input`] for a missing or invalid `m_indices`.
    pub fn validate(&self, shape: &GemmShape) -> Result<(), KernelError> {
        shape.validate().map_err(|why| KernelError::Shape { shape: shape.to_string(), why })?;
        let (m, n, k, e) = (shape.m, shape.n, shape.k, shape.experts());
        check_len("A", m * k, self.a.len())?;
        check_len("SA", m * shape.k_blocks(), self.sa.len())?;
        check_len("B", e * n * k, self.b.len())?;
        check_len("SB", e * shape.n_blocks() * shape.k_blocks(), self.sb.len())?;
        match (shape.groups, self.m_indices) {
            (None, None) => Ok(()),
            (None, Some(_)) => {
                Err(KernelError::Input { what: "m_indices", detail: "given for a dense shape".to_string() })
            }
            (Some(_), None) => {
                Err(KernelError::Input { what: "m_indices", detail: "missing for a grouped shape".to_string() })
            }
            (Some(e), Some(idx)) => {
                check_len("m_indices", m, idx.len())?;
                validate_m_indices(idx, e)
            }
        }
    }
}

/// Checks a grouped row-to-expert map: every entry in `-1..experts`, and every aligned 128-row
/// block holding one expert's rows followed only by padding (-1) rows, which is what lets a
/// kernel read a tile's expert off its first row (and index B and SB with it).
///
/// # Errors
///
/// [`KernelError::ExpertOutOfRange`] or [`KernelError::GroupLayout`] naming the first offending
/// row.
pub fn validate_m_indices(m_indices: &[i32], experts: usize) -> Result<(), KernelError> {
    for (b, block) in m_indices.chunks(GROUP_ALIGN).enumerate() {
        let first = block[0];
        let mut padding = first < 0;
        for (i, &e) in block.iter().enumerate() {
            let row = b * GROUP_ALIGN + i;
            if e < -1 || i64::from(e) >= experts as i64 {
                return Err(KernelError::ExpertOutOfRange { row, expert: e, experts });
            }
            if e < 0 {
                padding = true;
            } else if padding || e != first {
                return Err(KernelError::GroupLayout { row });
            }
        }
    }
    Ok(())
}

/// Builds the M-grouped contiguous layout for `tokens[e]` rows of each expert: each expert's run
/// padded to a multiple of 128. Returns `m_indices` (its length is the grouped M).
pub fn grouped_layout(tokens: &[usize]) -> Vec<i32> {
    let mut idx = Vec::new();
    for (e, &t) in tokens.iter().enumerate() {
        idx.extend(std::iter::repeat_n(e as i32, t));
        idx.extend(std::iter::repeat_n(-1, t.next_multiple_of(GROUP_ALIGN) - t));
    }
    idx
}

/// One output row of both references: the contract's f32 accumulators (before the bf16 rounding)
/// and the f64 product of the dequantized operands.
fn reference_row(shape: &GemmShape, inp: &GemmInputs, lut: &[f32; 256], row: usize) -> (Vec<f32>, Vec<f64>) {
    let (n, k) = (shape.n, shape.k);
    let (kb_count, nb_count) = (shape.k_blocks(), shape.n_blocks());
    let expert = match inp.m_indices {
        Some(idx) if idx[row] < 0 => return (vec![0.0; n], vec![0.0; n]),
        Some(idx) => idx[row] as usize,
        None => 0,
    };
    let a: Vec<f32> = inp.a[row * k..(row + 1) * k].iter().map(|&c| lut[c as usize]).collect();
    let sa = &inp.sa[row * kb_count..(row + 1) * kb_count];
    let b = &inp.b[expert * n * k..(expert + 1) * n * k];
    let sb = &inp.sb[expert * nb_count * kb_count..(expert + 1) * nb_count * kb_count];
    let mut out32 = vec![0f32; n];
    let mut out64 = vec![0f64; n];
    for col in 0..n {
        let brow = &b[col * k..(col + 1) * k];
        let sbrow = &sb[(col / BK) * kb_count..(col / BK + 1) * kb_count];
        let (mut acc32, mut acc64) = (0f32, 0f64);
        for kb in 0..kb_count {
            let (mut p32, mut p64) = (0f32, 0f64);
            for (x, &c) in a[kb * BK..(kb + 1) * BK].iter().zip(&brow[kb * BK..(kb + 1) * BK]) {
                let prod = x * lut[c as usize];
                p32 += prod;
                p64 += f64::from(prod);
            }
            acc32 = p32.mul_add(sa[kb] * sbrow[kb], acc32);
            acc64 += p64 * f64::from(sa[kb]) * f64::from(sbrow[kb]);
        }
        out32[col] = acc32;
        out64[col] = acc64;
    }
    (out32, out64)
}

/// Both references on the rows `rows` (all rows when `None`): the contract's bf16 output and the
/// f64 product of the dequantized operands, each `rows.len() × N`, row-major. Runs in parallel.
///
/// # Errors
///
/// As [`GemmInputs::validate`]; [`KernelError::Input`] for a row out of range.
pub fn gemm_references(
    shape: &GemmShape,
    inp: &GemmInputs,
    rows: Option<&[usize]>,
) -> Result<(Vec<u16>, Vec<f64>), KernelError> {
    inp.validate(shape)?;
    let all: Vec<usize>;
    let rows = match rows {
        Some(r) => r,
        None => {
            all = (0..shape.m).collect();
            &all
        }
    };
    if let Some(&r) = rows.iter().find(|&&r| r >= shape.m) {
        return Err(KernelError::Input { what: "rows", detail: format!("row {r} is not below M = {}", shape.m) });
    }
    let lut = e4m3_table();
    let per_row: Vec<(Vec<f32>, Vec<f64>)> = rows.par_iter().map(|&r| reference_row(shape, inp, &lut, r)).collect();
    let mut bf = Vec::with_capacity(rows.len() * shape.n);
    let mut f64s = Vec::with_capacity(rows.len() * shape.n);
    for (r32, r64) in per_row {
        bf.extend(r32.iter().map(|&x| f32_to_bf16(x)));
        f64s.extend(r64);
    }
    Ok((bf, f64s))
}

/// The exact contract (see the module docs): D as bf16 bits, `[M, N]`.
///
/// # Errors
///
/// As [`GemmInputs::validate`].
pub fn gemm_contract(shape: &GemmShape, inp: &GemmInputs) -> Result<Vec<u16>, KernelError> {
    gemm_references(shape, inp, None).map(|(bf, _)| bf)
}

/// The f64 product of the dequantized operands, `[M, N]` (padding rows 0).
///
/// # Errors
///
/// As [`GemmInputs::validate`].
pub fn gemm_f64(shape: &GemmShape, inp: &GemmInputs) -> Result<Vec<f64>, KernelError> {
    gemm_references(shape, inp, None).map(|(_, r)| r)
}

/// How a kernel's bf16 output compares with a reference.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Comparison {
    /// ‖out − ref‖ / ‖ref‖ (Frobenius), over the finite outputs; 0 against an all-zero reference
    /// when the output is all zero too.
    pub rel_err: f64,
    /// Largest |out − ref|.
    pub max_abs_err: f64,
    /// Outputs that are NaN or infinite (an unwritten, NaN-poisoned output counts here).
    pub non_finite: usize,
    /// Index of the first non-finite output, if any.
    pub first_non_finite: Option<usize>,
}

impl Comparison {
    /// True when every output is finite and the relative error is below `tol`.
    pub fn passes(&self, tol: f64) -> bool {
        self.non_finite == 0 && self.rel_err < tol
    }
}

/// Compares bf16 outputs (bits) with a reference of the same length.
///
/// # Errors
///
/// [`KernelError::BufferLength`] when the lengths differ.
pub fn compare(out: &[u16], reference: &[f64]) -> Result<Comparison, KernelError> {
    check_len("output", reference.len(), out.len())?;
    let (mut diff2, mut ref2, mut max_abs) = (0f64, 0f64, 0f64);
    let (mut non_finite, mut first) = (0usize, None);
    for (i, (&o, &r)) in out.iter().zip(reference).enumerate() {
        let o = f64::from(bf16_to_f32(o));
        if !o.is_finite() {
            non_finite += 1;
            first.get_or_insert(i);
            continue;
        }
        diff2 += (o - r) * (o - r);
        ref2 += r * r;
        max_abs = max_abs.max((o - r).abs());
    }
    let rel_err = if ref2 > 0.0 { (diff2 / ref2).sqrt() } else { diff2.sqrt() };
    Ok(Comparison { rel_err, max_abs_err: max_abs, non_finite, first_non_finite: first })
}

/// The relative part of the contract check's element tolerance: `|out − ref|` may exceed one
/// bf16 ulp by this fraction of the reference's RMS. The tensor cores sum each 128-wide K block's
/// partial in their own order and precision (Hopper's FP8 accumulation keeps about 14 mantissa
/// bits before the promotion), so the kernel is not bit-exact; a wrong scale block moves an
/// output by at least half of that block's contribution, far above this. Not yet measured on a
/// GPU: the `contract_worst` column of the GPU report (worst error / tolerance) calibrates it.
pub const CONTRACT_RMS_TOL: f64 = 5e-3;

/// How a kernel's bf16 output compares with [`gemm_contract`]'s, element by element.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct ContractComparison {
    /// Outputs outside `ulp(ref) + CONTRACT_RMS_TOL · rms(ref)` (non-finite outputs included).
    pub mismatches: usize,
    /// Index of the first of them.
    pub first_mismatch: Option<usize>,
    /// Largest `|out − ref| / (ulp(ref) + CONTRACT_RMS_TOL · rms(ref))` (≤ 1 passes).
    pub worst: f64,
}

impl ContractComparison {
    /// True when every output is within the tolerance.
    pub fn passes(&self) -> bool {
        self.mismatches == 0
    }
}

/// One unit in the last place of a bf16 number of magnitude `x` (at least the smallest normal's).
pub fn bf16_ulp(x: f64) -> f64 {
    let exp = (((x.abs() as f32).to_bits() >> 23) & 0xff) as i32;
    2f64.powi(exp.max(1) - 127 - 7)
}

/// Compares bf16 outputs (bits) with the contract's bf16 outputs of the same elements: each must
/// be within one bf16 ulp of the larger of the two plus [`CONTRACT_RMS_TOL`] × the reference's RMS.
///
/// # Errors
///
/// [`KernelError::BufferLength`] when the lengths differ.
pub fn compare_contract(out: &[u16], contract: &[u16]) -> Result<ContractComparison, KernelError> {
    check_len("output", contract.len(), out.len())?;
    let sum2: f64 = contract.iter().map(|&c| f64::from(bf16_to_f32(c)).powi(2)).sum();
    let rms = (sum2 / contract.len().max(1) as f64).sqrt();
    let (mut mismatches, mut first, mut worst) = (0usize, None, 0f64);
    for (i, (&o, &c)) in out.iter().zip(contract).enumerate() {
        let (o, c) = (f64::from(bf16_to_f32(o)), f64::from(bf16_to_f32(c)));
        let tol = bf16_ulp(o.abs().max(c.abs())) + CONTRACT_RMS_TOL * rms;
        let ratio = if o.is_finite() { (o - c).abs() / tol } else { f64::INFINITY };
        worst = worst.max(ratio);
        if ratio > 1.0 {
            mismatches += 1;
            first.get_or_insert(i);
        }
    }
    Ok(ContractComparison { mismatches, first_mismatch: first, worst })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e4m3(x: f32) -> u8 {
        f32_to_e4m3(x)
    }

    #[test]
    fn e4m3_decodes_known_codes() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0xFE), -448.0);
        assert!(e4m3_to_f32(0x7F).is_nan() && e4m3_to_f32(0xFF).is_nan());
    }

    #[test]
    fn e4m3_encoder_round_trips_every_code_and_rounds_ties_to_even() {
        for c in 0u8..=255 {
            if c & 0x7F == 0x7F {
                continue;
            }
            assert_eq!(e4m3(e4m3_to_f32(c)), c, "code {c:#04x}");
        }
        // 1.0625 is halfway between 1.0 (0x38, even) and 1.125 (0x39): ties to even -> 1.0.
        assert_eq!(e4m3(1.0625), 0x38);
        // 1.1875 is halfway between 1.125 (0x39) and 1.25 (0x3A, even) -> 1.25.
        assert_eq!(e4m3(1.1875), 0x3A);
        // Subnormal tie: 1.5 * 2^-9 between 2^-9 (0x01) and 2 * 2^-9 (0x02, even).
        assert_eq!(e4m3(1.5 * 2f32.powi(-9)), 0x02);
        // Saturation, never NaN from a finite input.
        assert_eq!(e4m3(1e9), 0x7E);
        assert_eq!(e4m3(-500.0), 0xFE);
        assert_eq!(e4m3(f32::INFINITY), 0x7E);
        assert_eq!(e4m3(f32::NAN) & 0x7F, 0x7F);
        assert_eq!(e4m3(-0.0), 0x80);
    }

    #[test]
    fn e4m3_encoder_matches_the_quant_crate_on_every_bf16_value() {
        for bits in 0u16..=u16::MAX {
            let x = bf16_to_f32(bits);
            let ours = f32_to_e4m3(x);
            let theirs = fp8forge_quant::fp8::f32_to_e4m3(x);
            if x.is_nan() {
                assert_eq!(ours & 0x7F, 0x7F);
                assert_eq!(theirs & 0x7F, 0x7F);
            } else {
                assert_eq!(ours, theirs, "x = {x:e} (bf16 bits {bits:#06x})");
            }
        }
    }

    #[test]
    fn scales_follow_the_contract() {
        assert_eq!(scale_for(448.0, ScaleFormat::F32), 1.0);
        assert_eq!(scale_for(0.0, ScaleFormat::F32), 1e-12 / 448.0);
        assert_eq!(scale_for(448.0, ScaleFormat::Ue8m0), 1.0);
        assert_eq!(scale_for(449.0, ScaleFormat::Ue8m0), 2.0);
        assert_eq!(scale_for(100.0, ScaleFormat::Ue8m0), 0.25);
    }

    #[test]
    fn act_quant_matches_the_quant_crate() {
        let (m, k) = (5, 384);
        let mut rng = crate::problem::Rng::new(7);
        let x: Vec<u16> =
            (0..m * k).map(|i| f32_to_bf16(rng.normal() * if i % 97 == 0 { 40.0 } else { 1.0 })).collect();
        let xf: Vec<f32> = x.iter().map(|&b| bf16_to_f32(b)).collect();
        for (fmt, qfmt) in [
            (ScaleFormat::F32, fp8forge_quant::block::ScaleFormat::F32),
            (ScaleFormat::Ue8m0, fp8forge_quant::block::ScaleFormat::Ue8m0),
        ] {
            let (codes, scales) = act_quant_ref(&x, m, k, fmt).unwrap();
            let mut qc = vec![0u8; m * k];
            let mut qs = vec![0f32; m * k / 128];
            fp8forge_quant::block::quantize_token_groups(&xf, m, k, qfmt, &mut qc, &mut qs).unwrap();
            assert_eq!(scales, qs, "{fmt:?} scales");
            assert_eq!(codes, qc, "{fmt:?} codes");
        }
    }

    #[test]
    fn act_quant_hand_worked_group() {
        // One token, 128 channels: x[0] = 896 (amax), x[1] = 1, x[2] = -3.5, the rest 0.
        let mut x = vec![0u16; 128];
        x[0] = f32_to_bf16(896.0);
        x[1] = f32_to_bf16(1.0);
        x[2] = f32_to_bf16(-3.5);
        let (q, s) = act_quant_ref(&x, 1, 128, ScaleFormat::F32).unwrap();
        assert_eq!(s, vec![2.0]); // 896 / 448
        assert_eq!(q[0], 0x7E); // 448
        assert_eq!(e4m3_to_f32(q[1]), 0.5);
        assert_eq!(e4m3_to_f32(q[2]), -1.75);
        assert!(q[3..].iter().all(|&c| c == 0));
        // An all-zero group gets the floor scale and zero codes.
        let (q, s) = act_quant_ref(&[0u16; 128], 1, 128, ScaleFormat::F32).unwrap();
        assert_eq!(s, vec![1e-12 / 448.0]);
        assert!(q.iter().all(|&c| c == 0));
        // K must be a multiple of 128; non-finite input is refused.
        assert!(matches!(act_quant_ref(&[0u16; 100], 1, 100, ScaleFormat::F32), Err(KernelError::Shape { .. })));
        let mut bad = vec![0u16; 128];
        bad[5] = 0x7FC0;
        assert!(matches!(act_quant_ref(&bad, 1, 128, ScaleFormat::F32), Err(KernelError::Input { .. })));
    }

    /// One row, one column, K = 256: every A code 1.0, every B code 0.5, SA = [2, 0.5],
    /// SB = [1, 4]: partials 64 and 64, D = 64·2·1 + 64·0.5·4 = 256.
    #[test]
    fn gemm_hand_worked_two_k_blocks() {
        let shape = GemmShape::dense(1, 1, 256);
        let a = vec![e4m3(1.0); 256];
        let b = vec![e4m3(0.5); 256];
        let inp = GemmInputs { a: &a, sa: &[2.0, 0.5], b: &b, sb: &[1.0, 4.0], m_indices: None };
        let (bf, r) = gemm_references(&shape, &inp, None).unwrap();
        assert_eq!(r, vec![256.0]);
        assert_eq!(bf, vec![f32_to_bf16(256.0)]);
        // Swapping the two B block scales changes the answer: 64·2·4 + 64·0.5·1 = 544.
        let inp = GemmInputs { sb: &[4.0, 1.0], ..inp };
        assert_eq!(gemm_f64(&shape, &inp).unwrap(), vec![544.0]);
    }

    /// N = 130: columns 128 and 129 take the second row of the B scale grid.
    #[test]
    fn gemm_columns_past_128_use_the_next_scale_block() {
        let shape = GemmShape::dense(2, 130, 128);
        let a = vec![e4m3(1.0); 2 * 128];
        let b = vec![e4m3(1.0); 130 * 128];
        let inp = GemmInputs { a: &a, sa: &[1.0, 3.0], b: &b, sb: &[1.0, 10.0], m_indices: None };
        let r = gemm_f64(&shape, &inp).unwrap();
        assert_eq!(r[0], 128.0);
        assert_eq!(r[127], 128.0);
        assert_eq!(r[128], 1280.0);
        assert_eq!(r[130 + 129], 3840.0);
    }

    /// The bf16 rounding of the contract: 257 is halfway between bf16 256 and 258 -> 256 (even).
    #[test]
    fn gemm_output_rounds_to_nearest_even_bf16() {
        let shape = GemmShape::dense(1, 1, 128);
        let mut a = vec![0u8; 128];
        a[0] = e4m3(256.0);
        a[1] = e4m3(1.0);
        let b = vec![e4m3(1.0); 128];
        let inp = GemmInputs { a: &a, sa: &[1.0], b: &b, sb: &[1.0], m_indices: None };
        let (bf, r) = gemm_references(&shape, &inp, None).unwrap();
        assert_eq!(r, vec![257.0]);
        assert_eq!(bf, vec![f32_to_bf16(256.0)]);
        assert_eq!(bf16_to_f32(bf[0]), 256.0);
    }

    #[test]
    fn gemm_grouped_rows_use_their_expert_and_padding_is_zero() {
        // Two experts, 1 and 2 tokens: rows 0 (e0), 128..130 (e1); the rest padding.
        let idx = grouped_layout(&[1, 2]);
        assert_eq!(idx.len(), 256);
        let shape = GemmShape::grouped(256, 8, 128, 2);
        let a = vec![e4m3(1.0); 256 * 128];
        let sa = vec![1.0f32; 256];
        let mut b = vec![e4m3(1.0); 2 * 8 * 128];
        b[8 * 128..].fill(e4m3(2.0));
        let inp = GemmInputs { a: &a, sa: &sa, b: &b, sb: &[1.0, 1.0], m_indices: Some(&idx) };
        let r = gemm_f64(&shape, &inp).unwrap();
        assert_eq!(r[0], 128.0);
        assert_eq!(r[8], 0.0);
        assert_eq!(r[128 * 8], 256.0);
        assert_eq!(r[129 * 8 + 7], 256.0);
        assert_eq!(r[130 * 8], 0.0);
    }

    #[test]
    fn gemm_refuses_bad_shapes_and_buffers() {
        let a = vec![0u8; 100];
        let inp = GemmInputs { a: &a, sa: &[1.0], b: &a, sb: &[1.0], m_indices: None };
        assert!(matches!(
            gemm_f64(&GemmShape::dense(1, 1, 100), &inp),
            Err(KernelError::Shape { why: crate::config::Why::KNotMultipleOf128 { k: 100 }, .. })
        ));
        let a = vec![0u8; 128];
        let inp = GemmInputs { a: &a, sa: &[1.0], b: &a[..64], sb: &[1.0], m_indices: None };
        assert!(matches!(
            gemm_f64(&GemmShape::dense(1, 1, 128), &inp),
            Err(KernelError::BufferLength { what: "B", .. })
        ));
    }

    #[test]
    fn m_indices_validation() {
        assert!(validate_m_indices(&grouped_layout(&[5, 0, 300]), 3).is_ok());
        let mut idx = grouped_layout(&[5, 300]);
        idx[10] = 1; // a second expert inside the first 128-row block
        assert!(matches!(validate_m_indices(&idx, 2), Err(KernelError::GroupLayout { row: 10 })));
        let mut idx = grouped_layout(&[5]);
        idx[7] = 0; // expert row after padding
        assert!(matches!(validate_m_indices(&idx, 1), Err(KernelError::GroupLayout { row: 7 })));
        assert!(matches!(
            validate_m_indices(&grouped_layout(&[5]), 0),
            Err(KernelError::ExpertOutOfRange { row: 0, expert: 0, experts: 0 })
        ));
        let mut idx = grouped_layout(&[5, 3]);
        idx[128] = 7; // an expert that does not exist
        assert!(matches!(validate_m_indices(&idx, 2), Err(KernelError::ExpertOutOfRange { row: 128, expert: 7, .. })));
        idx[128] = -2;
        assert!(matches!(validate_m_indices(&idx, 2), Err(KernelError::ExpertOutOfRange { row: 128, expert: -2, .. })));
    }

    #[test]
    fn contract_and_f64_references_agree_on_random_data() {
        for shape in [GemmShape::dense(37, 300, 512), GemmShape::grouped(384, 72, 256, 3)] {
            let p = crate::problem::HostProblem::random(&shape, 11, &[100, 3, 140]).unwrap();
            let inp = p.inputs();
            let (bf, r) = gemm_references(&shape, &inp, None).unwrap();
            let c = compare(&bf, &r).unwrap();
            // bf16 output rounding dominates: about 2^-9 relative per element.
            assert!(c.passes(4e-3), "{shape}: {c:?}");
            assert!(c.rel_err > 0.0, "{shape}: the contract should differ from f64 by bf16 rounding");
            // The references are not trivially zero.
            assert!(r.iter().filter(|x| **x != 0.0).count() > r.len() / 2, "{shape}");
        }
    }

    /// The acceptance data (scales spread by powers of two) and the contract check together
    /// catch a kernel that reads one wrong scale block.
    #[test]
    fn contract_check_catches_a_swapped_scale_block() {
        let shape = GemmShape::dense(64, 384, 1024);
        let p = crate::problem::HostProblem::random_block_scaled(&shape, 42, &[], 3).unwrap();
        let good = gemm_contract(&shape, &p.inputs()).unwrap();
        assert!(compare_contract(&good, &good).unwrap().passes());
        // One bf16 ulp off everywhere still passes.
        let nudged: Vec<u16> = good.iter().map(|&b| if b & 0x7fff == 0 { b } else { b + 1 }).collect();
        assert!(compare_contract(&nudged, &good).unwrap().passes());
        // Weight scales: swap K blocks 2 and 5 of the second 128-column block.
        let kb = shape.k_blocks();
        let (i, j) = (kb + 2, kb + 5);
        assert_ne!(p.sb[i], p.sb[j], "the generator must make these differ for the test to mean anything");
        let mut sb = p.sb.clone();
        sb.swap(i, j);
        let wrong = gemm_contract(&shape, &GemmInputs { sb: &sb, ..p.inputs() }).unwrap();
        let c = compare_contract(&wrong, &good).unwrap();
        assert!(!c.passes() && c.mismatches >= 64, "{c:?}");
        // Activation scales: swap two groups of one row.
        let mut sa = p.sa.clone();
        let (a, b) = (3 * kb, 3 * kb + 1);
        assert_ne!(sa[a], sa[b]);
        sa.swap(a, b);
        let wrong = gemm_contract(&shape, &GemmInputs { sa: &sa, ..p.inputs() }).unwrap();
        let c = compare_contract(&wrong, &good).unwrap();
        assert!(!c.passes(), "{c:?}");
        assert_eq!(c.first_mismatch.map(|i| i / shape.n), Some(3), "only row 3 is wrong: {c:?}");
    }

    #[test]
    fn bf16_ulp_follows_the_exponent() {
        assert_eq!(bf16_ulp(1.0), 2f64.powi(-7));
        assert_eq!(bf16_ulp(1.99), 2f64.powi(-7));
        assert_eq!(bf16_ulp(-2.0), 2f64.powi(-6));
        assert!(bf16_ulp(0.0) > 0.0);
    }

    #[test]
    fn comparison_counts_nan_and_measures_error() {
        let r = vec![1.0, 2.0, 2.0];
        let out = vec![f32_to_bf16(1.0), f32_to_bf16(2.0), 0x7FC0];
        let c = compare(&out, &r).unwrap();
        assert_eq!(c.non_finite, 1);
        assert_eq!(c.first_non_finite, Some(2));
        assert!(!c.passes(1e-2));
        let out = vec![f32_to_bf16(1.0), f32_to_bf16(2.0), f32_to_bf16(3.0)];
        let c = compare(&out, &r).unwrap();
        assert!((c.rel_err - 1.0 / 3.0).abs() < 1e-12);
    }
}
