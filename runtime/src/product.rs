//! The matrix product of the runtime, `out = a · b` with f32 accumulation, register- and
//! cache-blocked (BLIS's loop order): the activations `a` are packed once into panels of [`MR`]
//! rows, the right operand into panels of [`NR`] columns, [`KC`] steps of the inner dimension at a
//! time, and a micro-kernel computes each `MR × NR` tile of the output. The right operand is any
//! [`PackB`]: an f32 view, or a weight as it is stored (BF16, F16, FP8 codes with their scales),
//! widened to f32 while it is packed, so a weight is never copied to f32 whole.
//!
//! Every output is `Σ_k a[m, k] · b[k, n]` summed in order of `k` with one fused multiply-add per
//! term, starting from zero: the blocking, the thread count, the weight's storage and the CPU
//! (AVX2 kernel or the portable one) do not change a single bit of the result.

use std::cell::Cell;

use rayon::prelude::*;

use crate::ops::{View, matmul_t, matmul_t_cols};
use crate::weights::Stored;

/// Rows of the output tile of the micro-kernel.
pub(crate) const MR: usize = 6;
/// Columns of the output tile of the micro-kernel.
pub(crate) const NR: usize = 16;
/// Steps of the inner dimension per packed panel (a `KC × NR` panel of the right operand, 16 KB,
/// stays in the level-1 cache while the kernel runs down the rows).
const KC: usize = 256;
/// Columns of the right operand packed at a time (`KC × NC`, 256 KB, in the level-2 cache).
const NC: usize = 256;
/// Rows of the activations that go through one packed block of the right operand before the next.
const MC: usize = 16 * MR;
/// Products below this many multiply-adds run on one thread.
const PARALLEL_MIN_WORK: usize = 1 << 18;

/// The right operand `B` (`k × n`) of a product, read a panel at a time.
pub(crate) trait PackB: Sync {
    /// Columns (`n`: output features).
    fn n(&self) -> usize;

    /// Rows (`k`: the inner dimension).
    fn k(&self) -> usize;

    /// Writes `B[k0 + p, n0 + j]` to `dst[p · NR + j]` for `p < kc`, `j < nn` (`nn <= NR`); the
    /// other columns of `dst` are left as they are.
    fn pack(&self, n0: usize, nn: usize, k0: usize, kc: usize, dst: &mut [f32]);
}

/// `B = bᵀ` for a row-major `b` (`n × k`): a PyTorch Linear's weight.
#[cfg(test)]
pub(crate) struct Transposed<'a>(pub View<'a>);

#[cfg(test)]
impl PackB for Transposed<'_> {
    fn n(&self) -> usize {
        self.0.rows
    }

    fn k(&self) -> usize {
        self.0.cols
    }

    fn pack(&self, n0: usize, nn: usize, k0: usize, kc: usize, dst: &mut [f32]) {
        let v = &self.0;
        for j in 0..nn {
            let start = (n0 + j) * v.row_stride + k0;
            for (d, &x) in dst[j..].iter_mut().step_by(NR).zip(&v.data[start..start + kc]) {
                *d = x;
            }
        }
    }
}

/// Which micro-kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// Plain Rust, any CPU.
    Portable,
    /// AVX2 and FMA ([`crate::kernels_x86`]).
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    pub(crate) fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        if crate::kernels_x86::available() {
            return Kernel::Avx2;
        }
        Kernel::Portable
    }

    /// One `MR × NR` tile (see [`crate::kernels_x86::kernel_6x16`]) into `c`, rows `ldc` apart.
    ///
    /// # Safety
    /// `c` points at `MR` rows of `NR` writable values `ldc` apart that nothing else accesses
    /// while this runs.
    unsafe fn tile(self, kc: usize, a: &[f32], b: &[f32], c: *mut f32, ldc: usize, accumulate: bool) {
        assert!(a.len() >= kc * MR && b.len() >= kc * NR, "packed panels too short");
        match self {
            // SAFETY: the caller's guarantee on `c`.
            Kernel::Portable => unsafe { portable_tile(kc, a, b, c, ldc, accumulate) },
            // SAFETY: `Avx2` is chosen only where the CPU has AVX2 and FMA; `a` and `b` hold the
            // values the kernel reads (asserted), and the caller's guarantee on `c`.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { crate::kernels_x86::kernel_6x16(kc, a.as_ptr(), b.as_ptr(), c, ldc, accumulate) },
        }
    }
}

/// The portable micro-kernel: the same fused multiply-adds in the same order as the AVX2 one.
///
/// # Safety
/// As [`Kernel::tile`].
unsafe fn portable_tile(kc: usize, a: &[f32], b: &[f32], c: *mut f32, ldc: usize, accumulate: bool) {
    let mut acc = [[0f32; NR]; MR];
    if accumulate {
        for (i, row) in acc.iter_mut().enumerate() {
            // SAFETY: row `i` of the tile, `NR` values (the caller's guarantee).
            row.copy_from_slice(unsafe { std::slice::from_raw_parts(c.add(i * ldc), NR) });
        }
    }
    for (ap, bp) in a.chunks_exact(MR).zip(b.chunks_exact(NR)).take(kc) {
        for (row, &x) in acc.iter_mut().zip(ap) {
            for (o, &y) in row.iter_mut().zip(bp) {
                *o = x.mul_add(y, *o);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), NR) }.copy_from_slice(row);
    }
}

thread_local! {
    /// Each thread's packed activations and packed block of the right operand, kept between
    /// products (taken out while in use: a product that rayon runs on this thread while another
    /// waits finds them empty and makes its own).
    static PACKED_A: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    static PACKED_B: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// Each thread's buffer for a weight tile widened to f32 (at most [`TILE_ELEMS`] values).
    static TILE: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// A thread's buffer from `slot`, at least `len` long.
fn take(slot: &'static std::thread::LocalKey<Cell<Vec<f32>>>, len: usize) -> Vec<f32> {
    let mut v = slot.with(Cell::take);
    if v.len() < len {
        v.resize(len, 0.0);
    }
    v
}

/// The output of a product, shared by the tasks that each write their own tiles of it.
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    /// Distance between rows.
    rs: usize,
}

// SAFETY: the tasks of one product write disjoint tiles of the output (each task owns a block of
// columns and a range of rows), and the product returns only after all of them finished.
unsafe impl Send for Out {}
// SAFETY: as above.
unsafe impl Sync for Out {}

/// Weight elements above which a matrix is read as stored (smaller ones are widened at load).
const TILE_ELEMS: usize = 1 << 20;
/// Rows of activations up to which this module's kernel runs the product of a large weight;
/// above it, the weight is widened a 4 MB tile at a time and multiplied by the `gemm` crate
/// (measured faster there so far; see docs/BENCHMARKS.md).
const FUSED_MAX_ROWS: usize = 128;

/// `out = x · wᵀ` for `x` of `t` rows (`t × w.cols`, dense) and a weight as it is stored: the
/// product every Linear layer and expert runs. `out` is dense `t × w.rows`. The path depends on
/// the shapes alone, never on the storage, so a BF16 weight and its exact F32 widening give the
/// same bits.
pub(crate) fn linear_t(x: &[f32], t: usize, w: &Stored, out: &mut [f32], parallel: bool) {
    let (n, k) = (w.rows, w.cols);
    if n * k > TILE_ELEMS && t <= FUSED_MAX_ROWS {
        product(View::dense(x, t, k), w, out, n, parallel);
        return;
    }
    let a = View::dense(x, t, k);
    if let Some(wf) = w.as_f32() {
        matmul_t(a, View::dense(wf, n, k), out, parallel);
        return;
    }
    let tile = (TILE_ELEMS / k.max(1)).clamp(1, n.max(1));
    let mut buf = take(&TILE, tile * k);
    for r0 in (0..n).step_by(tile) {
        let rows = tile.min(n - r0);
        let b = &mut buf[..rows * k];
        w.decode_rows(r0, b);
        matmul_t_cols(a, View::dense(b, rows, k), out, n, r0, parallel);
    }
    TILE.with(|c| c.set(buf));
}

/// `out = a · B` with the fastest kernel of this CPU; `out` holds `a.rows` rows of `b.n()` values,
/// `out_rs` apart (values between rows untouched). With `parallel`, large products use all of
/// rayon's threads.
pub(crate) fn product<B: PackB>(a: View, b: &B, out: &mut [f32], out_rs: usize, parallel: bool) {
    product_with(Kernel::best(), a, b, out, out_rs, parallel);
}

/// [`product`] with the given kernel.
pub(crate) fn product_with<B: PackB>(kernel: Kernel, a: View, b: &B, out: &mut [f32], out_rs: usize, parallel: bool) {
    let (m, k, n) = (a.rows, a.cols, b.n());
    assert_eq!(k, b.k(), "inner dimensions differ");
    assert!(m == 0 || n == 0 || (out_rs >= n && out.len() >= (m - 1) * out_rs + n), "output size");
    assert!(m == 0 || k == 0 || (a.row_stride >= k && a.data.len() >= (m - 1) * a.row_stride + k), "view size");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.chunks_mut(out_rs).take(m).for_each(|r| r[..n].fill(0.0));
        return;
    }
    let threads = if parallel && m * n * k >= PARALLEL_MIN_WORK { rayon::current_num_threads() } else { 1 };
    let panels = m.div_ceil(MR);

    // The activations, packed once: panel `i` holds rows `i·MR..` as `k` steps of `MR` values
    // (zeros past the last row).
    let mut pa = take(&PACKED_A, panels * k * MR);
    let pack_a = |(i, dst): (usize, &mut [f32])| {
        let rows = MR.min(m - i * MR);
        for r in 0..rows {
            let src = &a.data[(i * MR + r) * a.row_stride..][..k];
            for (d, &x) in dst[r..].iter_mut().step_by(MR).zip(src) {
                *d = x;
            }
        }
        for r in rows..MR {
            dst[r..].iter_mut().step_by(MR).for_each(|d| *d = 0.0);
        }
    };
    let pa_used = &mut pa[..panels * k * MR];
    if threads > 1 {
        pa_used.par_chunks_mut(k * MR).enumerate().for_each(pack_a);
    } else {
        pa_used.chunks_mut(k * MR).enumerate().for_each(pack_a);
    }

    // Tasks: blocks of at most NC columns, and, where there are fewer blocks than twice the
    // threads, groups of row panels too.
    let nc = if threads > 1 { n.div_ceil(2 * threads).next_multiple_of(NR).clamp(NR, NC) } else { NC };
    let col_blocks = n.div_ceil(nc);
    let row_groups = if threads > 1 { (2 * threads).div_ceil(col_blocks).min(panels) } else { 1 };
    let per_group = panels.div_ceil(row_groups);
    let row_groups = panels.div_ceil(per_group);
    let o = Out { ptr: out.as_mut_ptr(), rs: out_rs };
    let packed = &pa[..panels * k * MR];
    let task = |t: usize| {
        let (cb, rg) = (t % col_blocks, t / col_blocks);
        let (c0, c1) = (cb * nc, ((cb + 1) * nc).min(n));
        let (p0, p1) = (rg * per_group, ((rg + 1) * per_group).min(panels));
        block(kernel, packed, k, m, b, (c0, c1), (p0, p1), o);
    };
    if threads > 1 {
        (0..col_blocks * row_groups).into_par_iter().for_each(task);
    } else {
        (0..col_blocks * row_groups).for_each(task);
    }
    PACKED_A.with(|c| c.set(pa));
}

/// Columns `cols` of the output, rows of panels `panels` (of `MR` rows; `m` rows in all): the
/// right operand packed `KC × NR` panels at a time, each multiplied with the packed activations.
#[allow(clippy::too_many_arguments)]
fn block<B: PackB>(
    kernel: Kernel,
    pa: &[f32],
    k: usize,
    m: usize,
    b: &B,
    (c0, c1): (usize, usize),
    (p0, p1): (usize, usize),
    o: Out,
) {
    let jpanels = (c1 - c0).div_ceil(NR);
    let mut pb = take(&PACKED_B, KC.min(k) * jpanels * NR);
    let mut edge = [0f32; MR * NR];
    for k0 in (0..k).step_by(KC) {
        let kc = KC.min(k - k0);
        for (jp, dst) in pb.chunks_exact_mut(kc * NR).take(jpanels).enumerate() {
            let n0 = c0 + jp * NR;
            let nn = NR.min(c1 - n0);
            if nn < NR {
                dst.fill(0.0);
            }
            b.pack(n0, nn, k0, kc, dst);
        }
        let accumulate = k0 > 0;
        for i0 in (p0..p1).step_by(MC / MR) {
            let i1 = (i0 + MC / MR).min(p1);
            for (jp, bp) in pb.chunks_exact(kc * NR).take(jpanels).enumerate() {
                let n0 = c0 + jp * NR;
                let nn = NR.min(c1 - n0);
                for i in i0..i1 {
                    let ap = &pa[(i * k + k0) * MR..(i * k + k0 + kc) * MR];
                    let rows = MR.min(m - i * MR);
                    // SAFETY: rows `i·MR..i·MR + rows` and columns `n0..n0 + nn` of the output
                    // belong to this task alone (see `Out`), and lie inside it (`product` checked
                    // its size).
                    unsafe {
                        let c = o.ptr.add(i * MR * o.rs + n0);
                        if rows == MR && nn == NR {
                            kernel.tile(kc, ap, bp, c, o.rs, accumulate);
                        } else {
                            // A tile at the edge: through a full-size copy.
                            for r in 0..rows {
                                let row = std::slice::from_raw_parts_mut(c.add(r * o.rs), nn);
                                edge[r * NR..r * NR + nn].copy_from_slice(row);
                            }
                            kernel.tile(kc, ap, bp, edge.as_mut_ptr(), NR, accumulate);
                            for r in 0..rows {
                                let row = std::slice::from_raw_parts_mut(c.add(r * o.rs), nn);
                                row.copy_from_slice(&edge[r * NR..r * NR + nn]);
                            }
                        }
                    }
                }
            }
        }
    }
    PACKED_B.with(|c| c.set(pb));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pseudo-random values in [-1, 1).
    fn vals(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Shapes `(t, n, k)` off every blocking: rows not a multiple of `MR` or `MC`, columns not of
    /// `NR` or `NC`, inner dimensions not of `KC` nor of 128 (FP8 blocks).
    const SHAPES: [(usize, usize, usize); 7] =
        [(1, 1, 1), (2, 5, 3), (7, 17, 129), (13, 33, 300), (97, 70, 257), (6, 272, 513), (101, 530, 700)];

    /// Checks `got = x · wᵀ` against an f64 reference of the widened `w`, within the bound of an
    /// f32 sum of `k` terms (`k · ε · Σ|x·w|`), naming the first element outside it.
    fn check_against_f64(what: &str, x: &[f32], w: &[f32], t: usize, n: usize, k: usize, got: &[f32]) {
        for i in 0..t {
            for j in 0..n {
                let (mut sum, mut abs) = (0f64, 0f64);
                for p in 0..k {
                    let v = f64::from(x[i * k + p]) * f64::from(w[j * k + p]);
                    sum += v;
                    abs += v.abs();
                }
                let err = (f64::from(got[i * n + j]) - sum).abs();
                let bound = k as f64 * f64::from(f32::EPSILON) * abs + 1e-30;
                assert!(
                    err <= bound,
                    "{what} {t}x{n}x{k}: element ({i}, {j}) is {}, f64 gives {sum} (bound {bound:e})",
                    got[i * n + j]
                );
            }
        }
    }

    fn stored_kinds(n: usize, k: usize, seed: u64) -> Vec<(&'static str, Stored<'static>)> {
        let w = vals(n * k, seed);
        let bf16 = w.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
        let f16 = w.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
        // Every code but the two NaNs (0x7f, 0xff), scales varying per 128 × 128 block.
        let codes = (0..n * k).map(|i| (i * 37 % 254) as u8 + u8::from(i * 37 % 254 >= 0x7f)).collect();
        let scales = (0..n.div_ceil(128) * k.div_ceil(128)).map(|i| 2f32.powi(-9) * (1.0 + i as f32 / 7.0)).collect();
        vec![
            ("f32", Stored::from_f32(w, n, k, false)),
            ("bf16", Stored::from_bf16_bits(bf16, n, k)),
            ("f16", Stored::from_f16_bits(f16, n, k)),
            ("fp8", Stored::from_e4m3(codes, scales, n, k, (128, 128))),
        ]
    }

    #[test]
    fn product_of_every_storage_matches_an_f64_reference_on_odd_shapes() {
        for (si, &(t, n, k)) in SHAPES.iter().enumerate() {
            let x = vals(t * k, 100 + si as u64);
            for (name, w) in stored_kinds(n, k, si as u64) {
                let wide = w.to_f32();
                for kernel in [Kernel::best(), Kernel::Portable] {
                    for parallel in [false, true] {
                        let mut out = vec![f32::NAN; t * n];
                        product_with(kernel, View::dense(&x, t, k), &w, &mut out, n, parallel);
                        check_against_f64(&format!("{name} {kernel:?} parallel={parallel}"), &x, &wide, t, n, k, &out);
                    }
                }
            }
        }
    }

    #[test]
    fn stored_weights_give_the_bits_of_their_f32_widening_with_either_kernel_and_any_threads() {
        for (si, &(t, n, k)) in SHAPES.iter().enumerate() {
            let x = vals(t * k, 200 + si as u64);
            for (name, w) in stored_kinds(n, k, 50 + si as u64) {
                let wide = w.to_f32();
                let mut want = vec![0f32; t * n];
                product_with(
                    Kernel::Portable,
                    View::dense(&x, t, k),
                    &Transposed(View::dense(&wide, n, k)),
                    &mut want,
                    n,
                    false,
                );
                for kernel in [Kernel::best(), Kernel::Portable] {
                    for parallel in [false, true] {
                        let mut got = vec![f32::NAN; t * n];
                        product_with(kernel, View::dense(&x, t, k), &w, &mut got, n, parallel);
                        if let Some(i) = (0..t * n).find(|&i| got[i].to_bits() != want[i].to_bits()) {
                            panic!(
                                "{name} {kernel:?} parallel={parallel} {t}x{n}x{k}: element ({}, {}) is {}, the portable f32 product gives {}",
                                i / n,
                                i % n,
                                got[i],
                                want[i]
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn simd_kernel_is_in_use_where_the_cpu_has_it() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            assert_eq!(Kernel::best(), Kernel::Avx2);
            return;
        }
        eprintln!("skipped: this CPU has no SIMD kernel, only the portable one runs");
    }

    /// The product before this module (issue 16's first version): 4 MB tiles of the weight widened
    /// to f32, then the `gemm` crate on each. For the benchmark below.
    fn tiled_gemm_crate(x: &[f32], t: usize, w: &Stored, out: &mut [f32]) {
        let (n, k) = (w.rows, w.cols);
        let tile = ((1 << 20) / k).clamp(1, n);
        let mut buf = vec![0f32; tile * k];
        for r0 in (0..n).step_by(tile) {
            let rows = tile.min(n - r0);
            let b = &mut buf[..rows * k];
            w.decode_rows(r0, b);
            // SAFETY: `x` is t × k, `b` rows × k, `out` t × n with columns r0..r0 + rows written.
            unsafe {
                gemm::gemm(
                    t,
                    rows,
                    k,
                    out[r0..].as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    b.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(0),
                );
            }
        }
    }

    /// `cargo test --release -p fp8forge-runtime --lib -- --ignored --nocapture bench_linear`:
    /// GFLOP/s of `x · wᵀ` at DeepSeek-V3 widths, the tiled `gemm`-crate product and this module's
    /// kernel alternated.
    #[test]
    #[ignore = "benchmark; run by hand in a release build"]
    fn bench_linear_widths() {
        let reps = 5;
        for &(t, n, k) in &[(512usize, 2048usize, 7168usize), (512, 7168, 2048), (64, 2048, 7168), (8, 2048, 7168)] {
            let x = vals(t * k, 1);
            for (name, w) in stored_kinds(n, k, 2).into_iter().filter(|(nm, _)| *nm != "f16") {
                let flop = 2.0 * (t * n * k) as f64;
                let (mut old, mut new) = (Vec::new(), Vec::new());
                let (mut o1, mut o2) = (vec![0f32; t * n], vec![0f32; t * n]);
                for _ in 0..reps {
                    let s = std::time::Instant::now();
                    tiled_gemm_crate(&x, t, &w, &mut o1);
                    old.push(flop / s.elapsed().as_secs_f64() / 1e9);
                    let s = std::time::Instant::now();
                    product(View::dense(&x, t, k), &w, &mut o2, n, true);
                    new.push(flop / s.elapsed().as_secs_f64() / 1e9);
                }
                let worst = o1.iter().zip(&o2).map(|(a, b)| ((a - b) / (1.0 + b.abs())).abs()).fold(0f32, f32::max);
                old.sort_by(f64::total_cmp);
                new.sort_by(f64::total_cmp);
                println!(
                    "T={t} N={n} K={k} {name}: before {:.1} GFLOP/s (range {:.1}-{:.1}), after {:.1} ({:.1}-{:.1}), x{:.2}; max rel diff {worst:.1e}",
                    old[reps / 2],
                    old[0],
                    old[reps - 1],
                    new[reps / 2],
                    new[0],
                    new[reps - 1],
                    new[reps / 2] / old[reps / 2]
                );
            }
        }
    }
}
