//! GPU tests of the small operations against the CPU runtime (`fp8forge_runtime::ops`) or, where
//! the runtime keeps its code private (routing, KLD, top-1), against `reference`, which mirrors
//! it and is checked against the runtime on the CPU. Random inputs, sizes that are and are not
//! multiples of the block sizes, DeepSeek-V3's shapes where they matter.
//!
//! Where there is no CUDA device each test says on stderr that it SKIPPED (a failure when
//! `FP8FORGE_REQUIRE_GPU=1`, as bench/gpu-eval-check.sh sets). `FP8FORGE_SEED` fixes the inputs
//! (default: from the clock, printed); `FP8FORGE_GPU_REPORT=FILE` appends one TSV line per check
//! (test, case, worst error, status) as soon as it is known. Run on a GPU machine with
//! `cargo test -p fp8forge-cuda-runtime --test gpu -- --test-threads=1`.

use fp8forge_runtime::router::{GroupLimited, Router, SoftmaxTopK};
use std::io::Write;

use fp8forge_cuda_runtime::ops::{AttentionShape, OpKernels, RopeTableDevice, SigmoidRouting, Targets};
use fp8forge_cuda_runtime::reference;
use fp8forge_kernels::cuda::{Device, DeviceBuffer};
use fp8forge_kernels::problem::Rng;
use fp8forge_runtime::ops as cpu;

fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// The device and the loaded kernels, or None after saying why the test is skipped.
fn setup(test: &str) -> Option<(Device, OpKernels)> {
    let why = match Device::open(0) {
        Ok(d) if d.arch().is_some() => match OpKernels::load(&d) {
            Ok(k) => return Some((d, k)),
            Err(e) => panic!("{test}: the kernels do not load on {}: {e}", d.info.name),
        },
        Ok(d) => format!("{} is not an sm_89/sm_90 GPU", d.info.name),
        Err(e) => e.to_string(),
    };
    if std::env::var("FP8FORGE_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        panic!("{test}: FP8FORGE_REQUIRE_GPU=1 but {why}");
    }
    say(&format!("SKIPPED {test}: {why} (set FP8FORGE_REQUIRE_GPU=1 to make this a failure)"));
    None
}

fn rng(test: &str) -> Rng {
    let seed = std::env::var("FP8FORGE_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    say(&format!("{test}: FP8FORGE_SEED={seed}"));
    Rng::new(seed)
}

fn normals(r: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| r.normal() * scale).collect()
}

/// Appends a line to `FP8FORGE_GPU_REPORT` and to stderr.
fn report(test: &str, case: &str, worst: f64, ok: bool) {
    let line = format!("{test}\t{case}\t{worst:.3e}\t{}\n", if ok { "ok" } else { "FAIL" });
    say(line.trim_end());
    if let Some(p) = std::env::var_os("FP8FORGE_GPU_REPORT") {
        let f = std::fs::OpenOptions::new().append(true).create(true).open(&p);
        if let Err(e) = f.and_then(|mut f| f.write_all(line.as_bytes())) {
            say(&format!("FP8FORGE_GPU_REPORT {}: {e}", p.to_string_lossy()));
        }
    }
}

fn download<T: Copy + Default>(dev: &Device, buf: &DeviceBuffer<T>) -> Vec<T> {
    let mut host = vec![T::default(); buf.len()];
    dev.copy_to_host(&buf.all(), &mut host).expect("copy to host");
    host
}

/// Worst `|got - want| / (atol + rtol·|want|)` (≤ 1 passes) and where; NaN where `want` is not
/// NaN counts as infinitely wrong.
fn worst(got: &[f32], want: &[f32], atol: f64, rtol: f64) -> (f64, usize) {
    assert_eq!(got.len(), want.len(), "lengths");
    let mut w = (0.0f64, 0usize);
    for (i, (&g, &x)) in got.iter().zip(want).enumerate() {
        let e = if g.is_nan() != x.is_nan() {
            f64::INFINITY
        } else if g.is_nan() {
            0.0
        } else {
            (g as f64 - x as f64).abs() / (atol + rtol * (x as f64).abs())
        };
        if e > w.0 {
            w = (e, i);
        }
    }
    w
}

fn check(test: &str, case: &str, got: &[f32], want: &[f32], atol: f64, rtol: f64) {
    let (e, i) = worst(got, want, atol, rtol);
    report(test, case, e, e <= 1.0);
    assert!(e <= 1.0, "{test} {case}: element {i}: GPU {} vs CPU {} ({e:.2} x tolerance)", got[i], want[i]);
}

#[test]
fn rms_norm_matches_the_cpu_runtime() {
    let test = "rms_norm_matches_the_cpu_runtime";
    let Some((dev, k)) = setup(test) else { return };
    let mut r = rng(test);
    for (rows, dim) in [(37, 7168), (5, 1000), (1, 1536), (64, 512)] {
        let x = normals(&mut r, rows * dim, 3.0);
        let w = normals(&mut r, dim, 1.0);
        let mut want = vec![0f32; rows * dim];
        cpu::rms_norm(&x, dim, &w, 1e-6, &mut want);
        let (xd, wd, od) = (dev.upload(&x).unwrap(), dev.upload(&w).unwrap(), dev.alloc::<f32>(rows * dim).unwrap());
        k.rms_norm(&dev, xd.all(), wd.all(), od.all(), rows, dim, 1e-6).unwrap();
        check(test, &format!("{rows}x{dim}"), &download(&dev, &od), &want, 1e-6, 1e-5);
        // In place.
        k.rms_norm(&dev, xd.all(), wd.all(), xd.all(), rows, dim, 1e-6).unwrap();
        check(test, &format!("{rows}x{dim} in place"), &download(&dev, &xd), &want, 1e-6, 1e-5);
    }
}

/// YaRN-style frequencies (interpolated below a ramp, as transformers' `_compute_yarn_parameters`
/// shapes them): the kernel only sees a different table, which is the point of the shared table.
fn yarn_like_inv_freq(half: usize, theta: f64, factor: f64) -> Vec<f32> {
    (0..half)
        .map(|i| {
            let extrapolated = theta.powf(-((2 * i) as f64) / (2 * half) as f64);
            let ramp = ((i as f64 - half as f64 / 4.0) / (half as f64 / 2.0)).clamp(0.0, 1.0);
            (extrapolated / factor * ramp + extrapolated * (1.0 - ramp)) as f32
        })
        .collect()
}

#[test]
fn rope_matches_the_cpu_runtime_default_and_yarn_interleaved_or_not() {
    let test = "rope_matches_the_cpu_runtime_default_and_yarn_interleaved_or_not";
    let Some((dev, k)) = setup(test) else { return };
    let mut r = rng(test);
    // MLA's query layout: 128 dims without rotation, then 64 rotated, per head.
    let (windows, period, heads, stride, offset, half) = (3, 57, 16, 192, 128, 32);
    let default: Vec<f32> = (0..half).map(|i| 10000f64.powf(-((2 * i) as f64) / (2 * half) as f64) as f32).collect();
    let yarn = yarn_like_inv_freq(half, 10000.0, 40.0);
    for (name, inv, factor) in [("default", &default, 1.0f32), ("yarn", &yarn, 1.3)] {
        for interleave in [false, true] {
            let rows = windows * period;
            let x = normals(&mut r, rows * heads * stride, 1.0);
            let table = cpu::RopeTable::new(inv, factor, interleave, period);
            let mut want = x.clone();
            let mut scratch = Vec::new();
            for row in 0..rows {
                for h in 0..heads {
                    let base = (row * heads + h) * stride + offset;
                    table.apply(&mut want[base..base + 2 * half], row % period, &mut scratch);
                }
            }
            let td = RopeTableDevice::upload(&dev, inv, factor, period).unwrap();
            let xd = dev.upload(&x).unwrap();
            k.rope(&dev, xd.all(), &td, rows, heads, stride, offset, period, interleave).unwrap();
            check(test, &format!("{name} interleave={interleave}"), &download(&dev, &xd), &want, 1e-6, 1e-5);
        }
    }
}

#[test]
fn swiglu_matches_the_cpu_runtime() {
    let test = "swiglu_matches_the_cpu_runtime";
    let Some((dev, k)) = setup(test) else { return };
    let mut r = rng(test);
    for n in [1, 1000, (1 << 20) + 3] {
        let (g, u) = (normals(&mut r, n, 4.0), normals(&mut r, n, 1.0));
        let mut want = g.clone();
        cpu::swiglu(&mut want, &u);
        let (gd, ud) = (dev.upload(&g).unwrap(), dev.upload(&u).unwrap());
        k.swiglu(&dev, gd.all(), ud.all()).unwrap();
        check(test, &format!("n={n}"), &download(&dev, &gd), &want, 1e-7, 1e-5);
    }
}

/// Compares routings: the same experts in the same order, except where the CPU's own selection
/// values of the two experts are within `tie` (relative) of each other (a near tie that rounding
/// may break either way; at most 0.1% of tokens); weights within 1e-5 relative where the experts agree.
#[allow(clippy::too_many_arguments)]
fn check_routing(
    test: &str,
    case: &str,
    got_idx: &[i32],
    got_w: &[f32],
    want_idx: &[usize],
    want_w: &[f32],
    k: usize,
    value: impl Fn(usize, usize) -> f32,
) {
    let (mut ties, mut worst_w) = (0usize, 0f64);
    let tokens = want_idx.len() / k;
    for t in 0..tokens {
        let (g, w) = (&got_idx[t * k..(t + 1) * k], &want_idx[t * k..(t + 1) * k]);
        if let Some(j) = (0..k).find(|&j| g[j] as usize != w[j]) {
            let (a, b) = (value(t, w[j]), value(t, g[j].max(0) as usize));
            let near = (a - b).abs() <= 1e-5 * a.abs().max(b.abs());
            report(test, &format!("{case} token {t}"), (a - b).abs() as f64, near);
            assert!(
                near,
                "{test} {case}: token {t} selection {j}: GPU expert {} vs CPU {} (CPU values {b} vs {a})",
                g[j], w[j]
            );
            ties += 1;
            continue;
        }
        for j in 0..k {
            let e =
                (got_w[t * k + j] - want_w[t * k + j]).abs() as f64 / (1e-7 + 1e-5 * want_w[t * k + j].abs() as f64);
            worst_w = worst_w.max(e);
            assert!(
                e <= 1.0,
                "{test} {case}: token {t} weight {j}: GPU {} vs CPU {}",
                got_w[t * k + j],
                want_w[t * k + j]
            );
        }
    }
    report(test, &format!("{case} ({ties} near ties of {tokens} tokens)"), worst_w, ties * 1000 <= tokens);
    assert!(ties * 1000 <= tokens, "{test} {case}: {ties} near ties in {tokens} tokens");
}

#[test]
fn softmax_routing_matches_the_cpu_runtime() {
    let test = "softmax_routing_matches_the_cpu_runtime";
    let Some((dev, k)) = setup(test) else { return };
    let mut r = rng(test);
    for (tokens, experts, top, renorm) in [(1000, 8, 2, true), (1000, 128, 8, true), (333, 60, 4, false)] {
        let logits = normals(&mut r, tokens * experts, 2.0);
        let router = Router::Softmax(SoftmaxTopK { experts, top_k: top, norm_topk_prob: renorm });
        let (want_idx, want_w) = router.select(&logits);
        let ld = dev.upload(&logits).unwrap();
        let (id, wd) = (dev.alloc::<i32>(tokens * top).unwrap(), dev.alloc::<f32>(tokens * top).unwrap());
        k.router_softmax(&dev, ld.all(), id.all(), wd.all(), tokens, experts, top, renorm).unwrap();
        let value = |t: usize, e: usize| logits[t * experts + e];
        check_routing(
            test,
            &format!("{experts} experts top {top}"),
            &download(&dev, &id),
            &download(&dev, &wd),
            &want_idx,
            &want_w,
            top,
            value,
        );
    }
}

#[test]
fn sigmoid_group_limited_routing_matches_the_cpu_runtime() {
    let test = "sigmoid_group_limited_routing_matches_the_cpu_runtime";
    let Some((dev, k)) = setup(test) else { return };
    let mut r = rng(test);
    let v3 = SigmoidRouting { experts: 256, top_k: 8, groups: 8, topk_group: 4, renorm: true, scaling: 2.5 };
    for (tokens, cfg) in [
        (1000, v3),
        (777, SigmoidRouting { groups: 1, topk_group: 1, ..v3 }),
        (500, SigmoidRouting { experts: 64, top_k: 6, groups: 8, topk_group: 3, renorm: false, scaling: 1.0 }),
    ] {
        let e = cfg.experts;
        let logits = normals(&mut r, tokens * e, 2.0);
        let bias = normals(&mut r, e, 0.05);
        let limits = GroupLimited {
            experts: e,
            top_k: cfg.top_k,
            n_group: cfg.groups,
            topk_group: cfg.topk_group,
            norm_topk_prob: cfg.renorm,
            routed_scaling_factor: cfg.scaling,
        };
        let (want_idx, want_w) = Router::SigmoidGroupLimited(limits, bias.clone()).select(&logits);
        let (ld, bd) = (dev.upload(&logits).unwrap(), dev.upload(&bias).unwrap());
        let (id, wd) = (dev.alloc::<i32>(tokens * cfg.top_k).unwrap(), dev.alloc::<f32>(tokens * cfg.top_k).unwrap());
        k.router_sigmoid(&dev, ld.all(), bd.all(), id.all(), wd.all(), tokens, &cfg).unwrap();
        let choice: Vec<Vec<f32>> = logits.chunks(e).map(|l| reference::sigmoid_choice(l, &bias, &cfg).1).collect();
        let value = |t: usize, x: usize| choice[t][x];
        let case = format!("{e} experts {} groups keep {} top {}", cfg.groups, cfg.topk_group, cfg.top_k);
        check_routing(test, &case, &download(&dev, &id), &download(&dev, &wd), &want_idx, &want_w, cfg.top_k, value);
    }
}

#[test]
fn causal_attention_matches_the_cpu_runtime_gqa_mla_and_sliding_window() {
    let test = "causal_attention_matches_the_cpu_runtime_gqa_mla_and_sliding_window";
    let Some((dev, k)) = setup(test) else { return };
    let mut r = rng(test);
    let shapes = [
        AttentionShape { windows: 2, t: 100, heads: 8, kv_heads: 2, dq: 64, dv: 64, scale: 0.125, window: None },
        AttentionShape { windows: 1, t: 300, heads: 4, kv_heads: 4, dq: 128, dv: 128, scale: 0.09, window: Some(17) },
        // MLA after decompression: 192-wide queries and keys, 128-wide values.
        AttentionShape { windows: 2, t: 129, heads: 16, kv_heads: 16, dq: 192, dv: 128, scale: 0.072, window: None },
    ];
    for s in shapes {
        let rows = s.windows * s.t;
        let q = normals(&mut r, rows * s.heads * s.dq, 1.0);
        let kk = normals(&mut r, rows * s.kv_heads * s.dq, 1.0);
        let v = normals(&mut r, rows * s.kv_heads * s.dv, 1.0);
        let mut want = Vec::with_capacity(rows * s.heads * s.dv);
        for w in 0..s.windows {
            let part = |x: &[f32], width: usize| x[w * s.t * width..(w + 1) * s.t * width].to_vec();
            want.extend(cpu::causal_attention(
                &part(&q, s.heads * s.dq),
                &part(&kk, s.kv_heads * s.dq),
                &part(&v, s.kv_heads * s.dv),
                s.t,
                s.heads,
                s.kv_heads,
                s.dq,
                s.dv,
                s.scale,
                s.window,
            ));
        }
        let (qd, kd, vd) = (dev.upload(&q).unwrap(), dev.upload(&kk).unwrap(), dev.upload(&v).unwrap());
        let od = dev.alloc::<f32>(rows * s.heads * s.dv).unwrap();
        k.causal_attention(&dev, qd.all(), kd.all(), vd.all(), od.all(), &s).unwrap();
        let case = format!("t={} heads={}/{} dq={} dv={} window={:?}", s.t, s.heads, s.kv_heads, s.dq, s.dv, s.window);
        check(test, &case, &download(&dev, &od), &want, 1e-5, 1e-4);
    }
}

#[test]
fn causal_softmax_matches_the_cpu_runtimes_score_rows() {
    let test = "causal_softmax_matches_the_cpu_runtimes_score_rows";
    let Some((dev, k)) = setup(test) else { return };
    let mut r = rng(test);
    for (batch, t, window) in [(3, 77, None), (2, 300, Some(31))] {
        let scores = normals(&mut r, batch * t * t, 4.0);
        // The runtime's loop in ops::causal_attention, row by row.
        let mut want = scores.clone();
        for (row_index, row) in want.chunks_mut(t).enumerate() {
            let i = row_index % t;
            let lo = window.map_or(0, |w: usize| (i + 1).saturating_sub(w));
            let mut max = f32::NEG_INFINITY;
            for x in &mut row[lo..=i] {
                *x *= 0.1;
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
        let sd = dev.upload(&scores).unwrap();
        k.causal_softmax(&dev, sd.all(), batch, t, 0.1, window).unwrap();
        check(test, &format!("batch={batch} t={t} window={window:?}"), &download(&dev, &sd), &want, 1e-7, 1e-5);
    }
}

#[test]
fn log_softmax_nll_kld_and_top1_match_the_cpu_runtime() {
    let test = "log_softmax_nll_kld_and_top1_match_the_cpu_runtime";
    let Some((dev, k)) = setup(test) else { return };
    let mut r = rng(test);
    for (rows, vocab) in [(48, 129_280), (7, 1000), (3, 33)] {
        let base = normals(&mut r, rows * vocab, 3.0);
        let mut model: Vec<f32> = base.iter().map(|&x| x + 0.05 * r.normal()).collect();
        // Planted ties for top-1: row 0's maximum at two places (the lower must win).
        let m = model[..vocab].iter().copied().fold(f32::NEG_INFINITY, f32::max) + 1.0;
        model[vocab / 2] = m;
        model[vocab / 3] = m;
        let mut targets: Vec<i32> = (0..rows).map(|_| (r.next_u64() % vocab as u64) as i32).collect();
        targets[rows - 1] = -1;
        let (bd, md) = (dev.upload(&base).unwrap(), dev.upload(&model).unwrap());
        let td = Targets::upload(&dev, &targets, vocab).unwrap();
        let (zb, nb) = (dev.alloc::<f64>(rows).unwrap(), dev.alloc::<f64>(rows).unwrap());
        let (zm, nm) = (dev.alloc::<f64>(rows).unwrap(), dev.alloc::<f64>(rows).unwrap());
        let (kl, t1) = (dev.alloc::<f64>(rows).unwrap(), dev.alloc::<i32>(rows).unwrap());
        k.log_softmax_nll(&dev, bd.all(), &td, zb.all(), nb.all(), rows, vocab).unwrap();
        k.log_softmax_nll(&dev, md.all(), &td, zm.all(), nm.all(), rows, vocab).unwrap();
        k.kld(&dev, bd.all(), md.all(), zb.all(), zm.all(), kl.all(), rows, vocab).unwrap();
        k.top1(&dev, md.all(), t1.all(), rows, vocab).unwrap();
        let (lse, nll, kld, top) = (download(&dev, &zm), download(&dev, &nm), download(&dev, &kl), download(&dev, &t1));
        let mut worst_f64 = 0f64;
        for row in 0..rows {
            let (b, q) = (&base[row * vocab..(row + 1) * vocab], &model[row * vocab..(row + 1) * vocab]);
            let want_lse = cpu::log_sum_exp(q);
            let e = (lse[row] - want_lse).abs() / (1e-12 + 1e-12 * want_lse.abs());
            worst_f64 = worst_f64.max(e / 1e3);
            assert!(e <= 1e3, "{test} {vocab}: row {row} lse GPU {} vs CPU {want_lse}", lse[row]);
            if targets[row] < 0 {
                assert!(nll[row].is_nan(), "{test}: row {row} without target has nll {}", nll[row]);
            } else {
                let want = want_lse - q[targets[row] as usize] as f64;
                assert!(
                    (nll[row] - want).abs() <= 1e-9 * (1.0 + want.abs()),
                    "{test}: row {row} nll GPU {} vs CPU {want}",
                    nll[row]
                );
            }
            let want_kl = reference::kld(b, q);
            assert!(
                (kld[row] - want_kl).abs() <= 1e-9 + 1e-6 * want_kl,
                "{test} {vocab}: row {row} KLD GPU {} vs CPU {want_kl}",
                kld[row]
            );
            assert_eq!(top[row] as usize, reference::top1(q).unwrap_or(usize::MAX), "{test} {vocab}: row {row} top-1");
        }
        assert_eq!(top[0] as usize, vocab / 3, "{test}: the planted tie goes to the lower index");
        report(test, &format!("{rows}x{vocab}"), worst_f64, true);
    }
}

#[test]
fn launches_refuse_mismatched_buffers_before_touching_the_gpu() {
    let test = "launches_refuse_mismatched_buffers_before_touching_the_gpu";
    let Some((dev, k)) = setup(test) else { return };
    let x = dev.alloc::<f32>(100).unwrap();
    let w = dev.alloc::<f32>(10).unwrap();
    let e = k.rms_norm(&dev, x.all(), w.all(), x.slice(0, 99), 10, 10, 1e-6).unwrap_err();
    assert!(e.to_string().contains("buffer out has 99 elements, expected 100"), "{e}");
    assert!(Targets::upload(&dev, &[0, 5, 10], 10).is_err());
    let s = AttentionShape { windows: 1, t: 1 << 20, heads: 1, kv_heads: 1, dq: 64, dv: 64, scale: 1.0, window: None };
    let big = dev.alloc::<f32>(64 << 20).unwrap();
    let e = k.causal_attention(&dev, big.all(), big.all(), big.all(), big.all(), &s).unwrap_err();
    assert!(e.to_string().contains("shared memory"), "{e}");
    dev.synchronize().unwrap();
    report(test, "errors", 0.0, true);
}

/// Layers whose bytes say which layer they are.
struct PatternLayers {
    bytes: usize,
}

fn pattern(layer: usize, i: usize) -> u8 {
    ((layer * 7 + i) % 251) as u8
}

impl fp8forge_cuda_runtime::stream::cuda::LayerBytes for PatternLayers {
    fn pieces(
        &self,
        layer: usize,
        put: &mut dyn FnMut(&[u8]) -> fp8forge_cuda_runtime::Result<()>,
    ) -> fp8forge_cuda_runtime::Result<()> {
        // Two pieces, as a layer's tensors come from several places.
        let all: Vec<u8> = (0..self.bytes).map(|i| pattern(layer, i)).collect();
        let (a, b) = all.split_at(self.bytes / 3);
        put(a)?;
        put(b)
    }
}

/// A "layer" that copies its weights over the chunk's activations: after the run every chunk
/// holds the last layer's bytes exactly when each compute saw its own layer and every paged
/// chunk went out and back in order.
struct CopyLayer;

impl fp8forge_cuda_runtime::stream::cuda::LayerKernels for CopyLayer {
    fn compute(
        &mut self,
        dev: &Device,
        _layer: usize,
        weights: fp8forge_kernels::cuda::DeviceSlice<u8>,
        act: fp8forge_kernels::cuda::DeviceSlice<u8>,
        _workspace: fp8forge_kernels::cuda::DeviceSlice<u8>,
    ) -> fp8forge_cuda_runtime::Result<()> {
        Ok(dev.copy_on_device(&weights, &act)?)
    }
}

#[test]
fn streaming_on_the_gpu_delivers_every_layer_and_pages_in_order() {
    use fp8forge_cuda_runtime::stream::cuda::{ChunkMemory, CudaLayerDevice};
    use fp8forge_cuda_runtime::stream::{StreamInputs, plan, run};
    let test = "streaming_on_the_gpu_delivers_every_layer_and_pages_in_order";
    let Some((dev, _k)) = setup(test) else { return };
    let bytes = 256 << 20;
    let (layers, chunks) = (6, 5);
    for (case, budget) in [("resident", 16u64 << 30), ("paged", (2 + 1 + 2 + 1) * bytes as u64)] {
        let inputs = StreamInputs {
            layer_bytes: vec![bytes as u64; layers],
            chunks,
            chunk_bytes: bytes as u64,
            workspace: bytes as u64,
            budget,
        };
        let p = plan(&inputs).unwrap();
        let mut sd = CudaLayerDevice::new(&dev, PatternLayers { bytes }, CopyLayer).unwrap();
        let rep = run(&mut sd, &p).unwrap();
        for c in 0..chunks {
            let got = match sd.chunk(c, &p).unwrap() {
                ChunkMemory::Device(s) => {
                    let mut h = vec![0u8; s.len()];
                    dev.copy_to_host(&s, &mut h).unwrap();
                    h
                }
                ChunkMemory::Host(h) => h.to_vec(),
            };
            let bad = (0..bytes).find(|&i| got[i] != pattern(layers - 1, i));
            assert_eq!(bad, None, "{test} {case}: chunk {c} differs from the last layer's bytes first at byte {bad:?}");
        }
        let up: f64 = rep.layers.iter().map(|l| l.upload_s).sum();
        let comp: f64 = rep.layers.iter().map(|l| l.compute_s + l.page_in_s + l.page_out_s).sum();
        say(&format!(
            "{test} {case}: {} resident of {chunks} chunks; {:.3} s total, uploads {up:.3} s ({:.1} GB/s), computes+paging {comp:.3} s, model {:.3} s",
            p.resident(),
            rep.total_s,
            (layers * bytes) as f64 / up / 1e9,
            rep.projected_s()
        ));
        report(test, &format!("{case} total_s"), rep.total_s, true);
    }
}
