//! The numeric building blocks of the models, in f32: products with a weight matrix, RMSNorm,
//! SwiGLU, rotary embeddings and causal attention.

use gemm::{Parallelism, gemm};
use rayon::prelude::*;

/// Products below this many multiply-adds run on one thread.
const PARALLEL_MIN_WORK: usize = 1 << 18;

/// A row-major matrix view with explicit strides (elements).
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    /// Backing values.
    pub data: &'a [f32],
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Distance between rows.
    pub row_stride: usize,
}

impl<'a> View<'a> {
    /// A dense `rows × cols` matrix.
    pub fn dense(data: &'a [f32], rows: usize, cols: usize) -> Self {
        View { data, rows, cols, row_stride: cols }
    }

    fn check(&self) {
        assert!(
            self.rows == 0 || self.cols == 0 || (self.rows - 1) * self.row_stride + self.cols <= self.data.len(),
            "matrix view out of bounds"
        );
    }
}

/// `out[m, n] = Σ_k a[m, k] · b[n, k]`: `a` times the transpose of `b` (a PyTorch Linear with
/// weight `b`), f32 accumulation. `out` is dense `a.rows × b.rows`.
pub fn matmul_t(a: View, b: View, out: &mut [f32], parallel: bool) {
    assert_eq!(a.cols, b.cols, "inner dimensions differ");
    assert_eq!(out.len(), a.rows * b.rows, "output size");
    // bᵀ[k, n] = b[n, k]: column stride = b's row stride, row stride 1.
    product(a, b, b.rows, b.row_stride, 1, out, b.rows, parallel);
}

/// [`matmul_t`] into columns `col0..col0 + b.rows` of `out`, a dense matrix `a.rows × out_cols`:
/// one tile of output features of a larger product.
pub fn matmul_t_cols(a: View, b: View, out: &mut [f32], out_cols: usize, col0: usize, parallel: bool) {
    assert_eq!(a.cols, b.cols, "inner dimensions differ");
    assert!(col0 + b.rows <= out_cols && out.len() == a.rows * out_cols, "output tile out of bounds");
    product(a, b, b.rows, b.row_stride, 1, &mut out[col0..], out_cols, parallel);
}

/// `out[m, n] = Σ_k a[m, k] · b[k, n]` with `b` row-major `k × n` (strided rows allowed).
pub fn matmul(a: View, b: View, out: &mut [f32]) {
    assert_eq!(a.cols, b.rows, "inner dimensions differ");
    assert_eq!(out.len(), a.rows * b.cols, "output size");
    product(a, b, b.cols, 1, b.row_stride, out, b.cols, false);
}

/// `out = a · B` where `B` is `a.cols × n` at `b.data` with the given column and row strides, and
/// `out` has rows `out_rs` apart.
#[allow(clippy::too_many_arguments)]
fn product(a: View, b: View, n: usize, b_cs: usize, b_rs: usize, out: &mut [f32], out_rs: usize, parallel: bool) {
    assert!(a.rows == 0 || n == 0 || out.len() >= (a.rows - 1) * out_rs + n, "output size");
    a.check();
    b.check();
    let (m, k) = (a.rows, a.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.chunks_mut(out_rs).take(m).for_each(|r| r[..n].fill(0.0));
        return;
    }
    let par = if parallel && m * n * k >= PARALLEL_MIN_WORK { Parallelism::Rayon(0) } else { Parallelism::None };
    // SAFETY: both views were bounds-checked for their shapes and strides, and the callers pass
    // the strides of those shapes; `out` holds `m` rows of `n` values `out_rs` apart (checked
    // above) and does not alias the inputs.
    unsafe {
        gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            out_rs as isize,
            false,
            a.data.as_ptr(),
            1,
            a.row_stride as isize,
            b.data.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// RMSNorm of each `dim`-wide row of `x` into `out`: `w · x / sqrt(mean(x²) + eps)`.
pub fn rms_norm(x: &[f32], dim: usize, w: &[f32], eps: f32, out: &mut [f32]) {
    assert_eq!(w.len(), dim);
    out.par_chunks_mut(dim).zip(x.par_chunks(dim)).for_each(|(o, r)| rms_norm_row(r, w, eps, o));
}

/// RMSNorm of each `dim`-wide row of `x`, in place.
pub fn rms_norm_inplace(x: &mut [f32], dim: usize, w: &[f32], eps: f32) {
    assert_eq!(w.len(), dim);
    x.par_chunks_mut(dim).for_each(|r| {
        let inv = rms_inv(r, eps);
        for (v, &g) in r.iter_mut().zip(w) {
            *v = g * (*v * inv);
        }
    });
}

fn rms_inv(r: &[f32], eps: f32) -> f32 {
    let ss: f32 = r.iter().map(|v| v * v).sum();
    1.0 / (ss / r.len() as f32 + eps).sqrt()
}

fn rms_norm_row(r: &[f32], w: &[f32], eps: f32, o: &mut [f32]) {
    let inv = rms_inv(r, eps);
    for ((o, &v), &g) in o.iter_mut().zip(r).zip(w) {
        *o = g * (v * inv);
    }
}

/// `silu(gate) · up`, elementwise, into `gate`.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    gate.par_chunks_mut(4096).zip(up.par_chunks(4096)).for_each(|(g, u)| {
        for (g, &u) in g.iter_mut().zip(u) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
    });
}

/// Cos and sin tables of a rotary embedding for positions `0..len`: `len × dim/2` each.
#[derive(Clone, Debug)]
pub struct RopeTable {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
    interleave: bool,
}

impl RopeTable {
    /// Tables for `len` positions from per-pair inverse frequencies, scaled by `attention_factor`.
    pub fn new(inv_freq: &[f32], attention_factor: f32, interleave: bool, len: usize) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in 0..len {
            for &f in inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos() * attention_factor);
                sin.push(a.sin() * attention_factor);
            }
        }
        RopeTable { half, cos, sin, interleave }
    }

    /// Rotates the `2 · half` dims of `x` that start at `offset`, for position `pos`. With the
    /// interleaved layout, pairs are `(x[2i], x[2i+1])` and the result is written de-interleaved
    /// (rotated evens, then rotated odds), as transformers does: queries and keys get the same
    /// permutation, so their products are unchanged.
    pub fn apply(&self, x: &mut [f32], pos: usize, scratch: &mut Vec<f32>) {
        let h = self.half;
        let (c, s) = (&self.cos[pos * h..(pos + 1) * h], &self.sin[pos * h..(pos + 1) * h]);
        let v = &mut x[..2 * h];
        scratch.clear();
        scratch.extend_from_slice(v);
        if self.interleave {
            for i in 0..h {
                let (a, b) = (scratch[2 * i], scratch[2 * i + 1]);
                v[i] = a * c[i] - b * s[i];
                v[h + i] = b * c[i] + a * s[i];
            }
        } else {
            for i in 0..h {
                let (a, b) = (scratch[i], scratch[h + i]);
                v[i] = a * c[i] - b * s[i];
                v[h + i] = b * c[i] + a * s[i];
            }
        }
    }
}

/// Causal attention of one window, all heads.
///
/// `q` is `t × heads × dq`, `k` is `t × kv_heads × dq`, `v` is `t × kv_heads × dv` (row-major;
/// query head `h` uses key/value head `h / (heads / kv_heads)`). Returns `t × heads × dv`.
/// Query `i` attends to keys `j <= i` with `i - j < window` when a window is given.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    heads: usize,
    kv_heads: usize,
    dq: usize,
    dv: usize,
    scale: f32,
    window: Option<usize>,
) -> Vec<f32> {
    let group = heads / kv_heads;
    let per_head: Vec<Vec<f32>> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let kh = h / group;
            let qv = View { data: &q[h * dq..], rows: t, cols: dq, row_stride: heads * dq };
            let kv = View { data: &k[kh * dq..], rows: t, cols: dq, row_stride: kv_heads * dq };
            let vv = View { data: &v[kh * dv..], rows: t, cols: dv, row_stride: kv_heads * dv };
            let mut s = vec![0f32; t * t];
            matmul_t(qv, kv, &mut s, false);
            for (i, row) in s.chunks_mut(t).enumerate() {
                let lo = window.map_or(0, |w| (i + 1).saturating_sub(w));
                let mut max = f32::NEG_INFINITY;
                for x in &mut row[lo..=i] {
                    *x *= scale;
                    max = max.max(*x);
                }
                let mut sum = 0f32;
                for x in &mut row[lo..=i] {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                for x in &mut row[lo..=i] {
                    *x /= sum;
                }
                row[..lo].fill(0.0);
                row[i + 1..].fill(0.0);
            }
            let mut o = vec![0f32; t * dv];
            matmul(View::dense(&s, t, t), vv, &mut o);
            o
        })
        .collect();
    let mut out = vec![0f32; t * heads * dv];
    for (h, o) in per_head.iter().enumerate() {
        for i in 0..t {
            out[(i * heads + h) * dv..(i * heads + h + 1) * dv].copy_from_slice(&o[i * dv..(i + 1) * dv]);
        }
    }
    out
}

/// Log-sum-exp of a row, in f64.
pub fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let s: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    max + s.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_t(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut o = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                o[i * n + j] = (0..k).map(|x| a[i * k + x] as f64 * b[j * k + x] as f64).sum::<f64>() as f32;
            }
        }
        o
    }

    fn vals(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn matmul_t_matches_naive_including_parallel_and_odd_sizes() {
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (17, 130, 129), (64, 300, 200)] {
            let (a, b) = (vals(m * k, 1), vals(n * k, 2));
            let mut o = vec![f32::NAN; m * n];
            matmul_t(View::dense(&a, m, k), View::dense(&b, n, k), &mut o, true);
            let r = naive_t(&a, &b, m, n, k);
            for (x, y) in o.iter().zip(&r) {
                assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{m}x{n}x{k}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn attention_of_one_key_returns_its_value_and_window_masks_the_past() {
        // t = 3, one head, dq = dv = 1. With window 1 each query sees only itself.
        let q = [1.0, 1.0, 1.0];
        let k = [0.5, -0.3, 2.0];
        let v = [10.0, 20.0, 30.0];
        let o = causal_attention(&q, &k, &v, 3, 1, 1, 1, 1, 1.0, Some(1));
        assert_eq!(o, vec![10.0, 20.0, 30.0]);
        let o = causal_attention(&q, &k, &v, 3, 1, 1, 1, 1, 1.0, None);
        assert_eq!(o[0], 10.0);
        let w = [0.5f64.exp(), (-0.3f64).exp()];
        let want = (10.0 * w[0] + 20.0 * w[1]) / (w[0] + w[1]);
        assert!((o[1] as f64 - want).abs() < 1e-5, "{} vs {want}", o[1]);
    }

    #[test]
    fn interleaved_rope_is_a_permuted_half_rope() {
        let inv = [1.0f32, 0.1];
        let t_half = RopeTable::new(&inv, 1.0, false, 4);
        let t_int = RopeTable::new(&inv, 1.0, true, 4);
        let mut s = Vec::new();
        // Interleaved input (a0, b0, a1, b1) must equal half-layout (a0, a1, b0, b1) after rotation.
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        let mut y = vec![1.0, 3.0, 2.0, 4.0];
        t_int.apply(&mut x, 3, &mut s);
        t_half.apply(&mut y, 3, &mut s);
        assert_eq!(x, y);
        let (c, sn) = (3.0f32.cos(), 3.0f32.sin());
        assert!((y[0] - (1.0 * c - 2.0 * sn)).abs() < 1e-6);
    }

    #[test]
    fn rms_norm_scales_rows_to_unit_rms() {
        let x = [3.0, 4.0, 0.0, 0.0];
        let mut o = [0.0; 4];
        rms_norm(&x, 2, &[1.0, 2.0], 0.0, &mut o);
        let inv = 1.0 / 12.5f32.sqrt();
        assert_eq!(o[0], 3.0 * inv);
        assert_eq!(o[1], 2.0 * (4.0 * inv));
        assert!(o[2].is_nan() || o[2] == 0.0);
    }
}
