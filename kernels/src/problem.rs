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
        shape.validate().map_err(|why| KernelError::Shape { shape: shape.to_string(), why })?;
        let (m, n, k, e) = (shape.m, shape.n, shape.k, shape.experts());
        // Rows are drawn in parallel chunks, each from its own stream, so the data depends on
        // the seed only (not on the thread count).
        let x = random_rows(m, k, seed, 1.0);
        let (a, sa) = act_quant_ref(&x, m, k, ScaleFormat::F32)?;
        let mut b = Vec::with_capacity(e * n * k);
        let mut sb = Vec::new();
        for expert in 0..e {
            let w: Vec<f32> = random_rows(n, k, seed ^ (0xB0B0_0000 + expert as u64) << 20, 0.02)
                .into_iter()
                .map(bf16_to_f32)
                .collect();
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
    fn random_data_is_not_degenerate() {
        let p = HostProblem::random(&GemmShape::dense(16, 16, 256), 3, &[]).unwrap();
        assert!(p.a.iter().filter(|&&c| c != 0).count() > 200);
        assert!(p.b.iter().filter(|&&c| c != 0).count() > 200);
        assert!(p.sa.iter().all(|&s| s > 0.0) && p.sb.iter().all(|&s| s > 0.0));
    }
}
