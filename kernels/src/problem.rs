//! Random GEMM problems quantized with the contract's rules: the inputs of the GPU tests and of
//! `bench gemm` (BENCH_TARGETS.md: normal activations, weights ×0.02).

use crate::config::GemmShape;
use crate::error::KernelError;
use rayon::prelude::*;

use crate::reference::{
    GemmInputs, ScaleFormat, act_quant_ref, bf16_to_f32, f32_to_bf16, grouped_layout, quantize_weight_ref,
};

/// splitmix64 with Box–Muller normals: deterministic data without a rand dependency.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal.
    pub fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
}

/// A GEMM problem in host memory, quantized.
#[derive(Clone, Debug)]
pub struct HostProblem {
    /// The shape.
    pub shape: GemmShape,
    /// A codes `[M, K]`.
    pub a: Vec<u8>,
    /// A scales `[M, K/128]`.
    pub sa: Vec<f32>,
    /// B codes `[E, N, K]`.
    pub b: Vec<u8>,
    /// B scales `[E, ceil(N/128), K/128]`.
    pub sb: Vec<f32>,
    /// Grouped: each row's expert, -1 for padding.
    pub m_indices: Option<Vec<i32>>,
}

impl HostProblem {
    /// A random problem of `shape`: activations N(0, 1) rounded to bf16 and quantized 1×128,
    /// weights N(0, 0.02²) quantized per 128×128 block (f32 scales). For a grouped shape the
    /// experts' token counts are `tokens` (cycled or cut to the expert count and scaled so that
    /// their aligned runs fill M exactly: the last expert takes what is left); for a dense
    /// shape `tokens` is ignored.
    ///
    /// # Errors
    ///
    /// [`KernelError::Shape`] for an invalid shape.
    pub fn random(shape: &GemmShape, seed: u64, tokens: &[usize]) -> Result<HostProblem, KernelError> {
        HostProblem::random_block_scaled(shape, seed, tokens, 0)
    }

    /// As [`HostProblem::random`], but before quantizing, each 1×128 activation group and each
    /// 128×128 weight block is multiplied by `2^e`, `e` drawn uniformly from the integers
    /// `-max_exp..=max_exp` (seeded): the codes are those of the unscaled data and the scales
    /// differ from block to block by exact powers of two, so a kernel that applies the scale of a
    /// wrong block (or of a neighbouring group) gives a visibly wrong output. `max_exp = 0` is
    /// [`HostProblem::random`].
    ///
    /// # Errors
    ///
    /// [`KernelError::Shape`] for an invalid shape.
    pub fn random_block_scaled(
        shape: &GemmShape,
        seed: u64,
        tokens: &[usize],
        max_exp: u32,
    ) -> Result<HostProblem, KernelError> {
        shape.validate().map_err(|why| KernelError::Shape { shape: shape.to_string(), why })?;
        let (m, n, k, e) = (shape.m, shape.n, shape.k, shape.experts());
        // Rows are drawn in parallel chunks, each from its own stream, so the data depends on
        // the seed only (not on the thread count).
        let mut x = random_rows(m, k, seed, 1.0);
        spread_blocks(&mut x, k, 1, max_exp, seed ^ 0xA5A5_5A5A);
        let (a, sa) = act_quant_ref(&x, m, k, ScaleFormat::F32)?;
        let mut b = Vec::with_capacity(e * n * k);
        let mut sb = Vec::new();
        for expert in 0..e {
            let mut w16 = random_rows(n, k, seed ^ (0xB0B0_0000 + expert as u64) << 20, 0.02);
            spread_blocks(&mut w16, k, 128, max_exp, seed ^ (0x5CA1_E000 + expert as u64) << 16);
            let w: Vec<f32> = w16.into_iter().map(bf16_to_f32).collect();
            let (codes, scales) = quantize_weight_ref(&w, n, k, ScaleFormat::F32);
            b.extend(codes);
            sb.extend(scales);
        }
        let m_indices = shape.groups.map(|experts| grouped_rows(m, experts, tokens));
        Ok(HostProblem { shape: *shape, a, sa, b, sb, m_indices })
    }

    /// The operands, borrowed.
    pub fn inputs(&self) -> GemmInputs<'_> {
        GemmInputs { a: &self.a, sa: &self.sa, b: &self.b, sb: &self.sb, m_indices: self.m_indices.as_deref() }
    }
}

/// `rows × cols` bf16 values drawn from N(0, sigma²), in parallel chunks of 64 rows.
fn random_rows(rows: usize, cols: usize, seed: u64, sigma: f32) -> Vec<u16> {
    let mut out = vec![0u16; rows * cols];
    out.par_chunks_mut((64 * cols).max(1)).enumerate().for_each(|(i, chunk)| {
        let mut rng = Rng::new(seed.wrapping_mul(0x9E37_79B9).wrapping_add(i as u64));
        for v in chunk {
            *v = f32_to_bf16(rng.normal() * sigma);
        }
    });
    out
}

/// The exponent of block `(row_block, col_block)` (of `rows_per_block` × 128 elements) drawn
/// uniformly from `-max_exp..=max_exp`, from `seed` and the block's index alone.
pub fn block_exponent(seed: u64, row_block: usize, col_block: usize, max_exp: u32) -> i32 {
    if max_exp == 0 {
        return 0;
    }
    let mut rng = Rng::new(seed ^ ((row_block as u64) << 24) ^ (col_block as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let span = 2 * u64::from(max_exp) + 1;
    (rng.next_u64() % span) as i32 - max_exp as i32
}

/// Multiplies each `rows_per_block × 128` block of the bf16 matrix `x` (`cols` wide, row-major)
/// by `2^e`, `e` from [`block_exponent`]. Exact in bf16 while no value leaves its normal range
/// (true for the test data's magnitudes and `max_exp` ≤ 3).
fn spread_blocks(x: &mut [u16], cols: usize, rows_per_block: usize, max_exp: u32, seed: u64) {
    if max_exp == 0 || cols == 0 {
        return;
    }
    x.par_chunks_mut(cols).enumerate().for_each(|(r, row)| {
        for (j, chunk) in row.chunks_mut(128).enumerate() {
            let factor = 2f32.powi(block_exponent(seed, r / rows_per_block, j, max_exp));
            for v in chunk {
                *v = f32_to_bf16(bf16_to_f32(*v) * factor);
            }
        }
    });
}

/// A row-to-expert map of exactly `m` rows (a multiple of 128) for `experts` experts, with token
/// counts taken from `tokens` while they fit; whatever is left goes to the last expert.
fn grouped_rows(m: usize, experts: usize, tokens: &[usize]) -> Vec<i32> {
    let mut counts = vec![0usize; experts];
    let mut used = 0usize;
    for (e, c) in counts.iter_mut().enumerate().take(experts.saturating_sub(1)) {
        let t = if tokens.is_empty() { 0 } else { tokens[e % tokens.len()] };
        let need = t.next_multiple_of(crate::config::GROUP_ALIGN);
        if used + need <= m {
            *c = t;
            used += need;
        }
    }
    counts[experts - 1] = m - used;
    grouped_layout(&counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_grouped_problem_fills_m_with_a_valid_layout() {
        let shape = GemmShape::grouped(1024, 64, 128, 4);
        let p = HostProblem::random(&shape, 1, &[100, 0, 300]).unwrap();
        let idx = p.m_indices.as_ref().unwrap();
        assert_eq!(idx.len(), 1024);
        p.inputs().validate(&shape).unwrap();
        // 100 (->128) + 0 + 300 (->384) leaves 512 rows for the last expert.
        assert_eq!(idx.iter().filter(|&&e| e == 0).count(), 100);
        assert_eq!(idx.iter().filter(|&&e| e == 2).count(), 300);
        assert_eq!(idx.iter().filter(|&&e| e == 3).count(), 512);
    }

    #[test]
    fn spread_scales_differ_by_powers_of_two_across_blocks() {
        let shape = GemmShape::grouped(256, 1000, 1024, 2);
        let plain = HostProblem::random(&shape, 9, &[100]).unwrap();
        let spread = HostProblem::random_block_scaled(&shape, 9, &[100], 3).unwrap();
        // The codes are the unscaled data's; every scale is the unscaled one times 2^e, |e| <= 3.
        assert_eq!(plain.a, spread.a);
        assert_eq!(plain.b, spread.b);
        let exponents = |p: &[f32], s: &[f32]| -> Vec<i32> {
            p.iter()
                .zip(s)
                .map(|(&p, &s)| {
                    let r = s / p;
                    let e = r.log2().round() as i32;
                    assert_eq!(r, 2f32.powi(e), "ratio {r} is not a power of two");
                    assert!((-3..=3).contains(&e), "exponent {e}");
                    e
                })
                .collect()
        };
        for (p, s) in [(&plain.sa, &spread.sa), (&plain.sb, &spread.sb)] {
            let e = exponents(p, s);
            let distinct: std::collections::BTreeSet<i32> = e.iter().copied().collect();
            assert_eq!(distinct.len(), 7, "all seven exponents appear: {distinct:?}");
        }
        // Neighbouring blocks differ often (a wrong-block read changes the result).
        let e = exponents(&plain.sb, &spread.sb);
        let kb = shape.k_blocks();
        let differing = e.chunks(kb).flat_map(|row| row.windows(2)).filter(|w| w[0] != w[1]).count();
        assert!(differing * 2 > e.len() / kb * (kb - 1), "{differing} of neighbouring K blocks differ");
    }

    #[test]
    fn block_exponents_are_seeded_and_in_range() {
        assert_eq!(block_exponent(1, 2, 3, 3), block_exponent(1, 2, 3, 3));
        assert_eq!(block_exponent(1, 2, 3, 0), 0);
        let all: Vec<i32> = (0..1000).map(|i| block_exponent(7, i / 10, i % 10, 3)).collect();
        assert!(all.iter().all(|e| (-3..=3).contains(e)));
        assert!(all.contains(&-3) && all.contains(&3));
    }

    #[test]
    fn random_data_is_not_degenerate() {
        let p = HostProblem::random(&GemmShape::dense(16, 16, 256), 3, &[]).unwrap();
        assert!(p.a.iter().filter(|&&c| c != 0).count() > 200);
        assert!(p.b.iter().filter(|&&c| c != 0).count() > 200);
        assert!(p.sa.iter().all(|&s| s > 0.0) && p.sb.iter().all(|&s| s > 0.0));
    }
}
