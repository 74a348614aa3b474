//! The analytic cost model: predicted time of one kernel configuration on one shape and GPU,
//! from waves and the tail wave, tile efficiency, bytes moved against FLOPs, and pipeline depth.
//! It ranks the legal search space so that only the promising share is timed, and it alone fills
//! the table under `--simulate`.

use fp8forge_kernels::{GemmConfig, GemmShape, KernelKind, Multicast, is_legal};
use serde::{Deserialize, Serialize};

use crate::gpu::GpuSpec;

/// The cost model's free parameters: the constants below by default, fitted to a GPU's measured
/// table by [`crate::calibrate`]. Efficiencies are shares of the datasheet figures, so a
/// calibration made on one GPU carries to another of the same architecture (`--simulate`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelParams {
    /// Share of the datasheet FP8 peak the tensor cores sustain ([`SUSTAINED_TENSOR`]).
    pub sustained_tensor: f64,
    /// Share of the datasheet HBM bandwidth a streaming kernel reaches ([`HBM_EFFICIENCY`]).
    pub hbm_efficiency: f64,
    /// Fixed cost of a launch and of filling the pipeline once, microseconds.
    pub launch_us: f64,
    /// Bytes per clock each SM pulls from L2.
    pub l2_bytes_per_clk: f64,
    /// Per-family factor on the time of a tile with BLOCK_M = 64 (one consumer warpgroup).
    pub bm64_factor: f64,
    /// Per-family factor on the time of a tile with BLOCK_M = 256.
    pub bm256_factor: f64,
    /// Per-family factor on the time of a tile of a multicast (2-CTA cluster) configuration.
    pub multicast_factor: f64,
    /// Per-family factor on the time of an mma.sync tile.
    pub mma_sync_factor: f64,
}

impl Default for ModelParams {
    fn default() -> Self {
        ModelParams {
            sustained_tensor: SUSTAINED_TENSOR,
            hbm_efficiency: HBM_EFFICIENCY,
            launch_us: LAUNCH_US,
            l2_bytes_per_clk: L2_BYTES_PER_CLK_PER_SM,
            bm64_factor: 1.0,
            bm256_factor: 1.0,
            multicast_factor: 1.0,
            mma_sync_factor: 1.0,
        }
    }
}

impl ModelParams {
    /// The parameters as a vector, in the order of [`ModelParams::NAMES`].
    pub fn to_vec(&self) -> Vec<f64> {
        vec![
            self.sustained_tensor,
            self.hbm_efficiency,
            self.launch_us,
            self.l2_bytes_per_clk,
            self.bm64_factor,
            self.bm256_factor,
            self.multicast_factor,
            self.mma_sync_factor,
        ]
    }

    /// The parameters from a vector in the order of [`ModelParams::NAMES`] (missing values keep
    /// the defaults); efficiencies are capped at 1.
    pub fn from_slice(v: &[f64]) -> Self {
        let d = ModelParams::default().to_vec();
        let at = |i: usize| v.get(i).copied().unwrap_or(d[i]);
        ModelParams {
            sustained_tensor: at(0).min(1.0),
            hbm_efficiency: at(1).min(1.0),
            launch_us: at(2),
            l2_bytes_per_clk: at(3),
            bm64_factor: at(4),
            bm256_factor: at(5),
            multicast_factor: at(6),
            mma_sync_factor: at(7),
        }
    }

    /// The names of the parameters, in vector order.
    pub const NAMES: [&'static str; 8] = [
        "sustained_tensor",
        "hbm_efficiency",
        "launch_us",
        "l2_bytes_per_clk",
        "bm64_factor",
        "bm256_factor",
        "multicast_factor",
        "mma_sync_factor",
    ];
}

/// Bytes per clock each SM can pull from L2 (Hopper: a 128×128 FP8 tile needs 64 B/clk to keep the
/// tensor cores busy, which is what large tiles with TMA reach).
const L2_BYTES_PER_CLK_PER_SM: f64 = 64.0;
/// Fixed cost of a launch and of filling the pipeline once, in microseconds.
const LAUNCH_US: f64 = 3.0;
/// mma.sync FP8 reaches about half the wgmma rate on Hopper.
const MMA_SYNC_RATE: f64 = 0.5;
/// ... and its cp.async loads (no TMA, no persistence) pull less bandwidth than TMA.
const MMA_SYNC_BANDWIDTH: f64 = 0.8;
/// Share of the datasheet FP8 peak the best Hopper kernels sustain at large M: clocks drop under
/// a full tensor load, and the issue and promotion costs below come on top. Calibrated on the
/// H100 SXM figures of BENCH_TARGETS.md (DeepGEMM and cuBLASLt at M = 4096 reach 1100–1460 of
/// 1979 TFLOP/s); see the `calibration` test.
pub const SUSTAINED_TENSOR: f64 = 0.78;
/// Share of the datasheet HBM bandwidth a streaming kernel reaches (3.0 of 3.35 TB/s measured
/// by a device-to-device copy on the lent H100).
pub const HBM_EFFICIENCY: f64 = 0.9;

/// What the model predicts for one configuration.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Prediction {
    /// Predicted time in microseconds.
    pub us: f64,
    /// Predicted TFLOP/s (2·M·N·K over the time).
    pub tflops: f64,
    /// CTA tiles.
    pub tiles: usize,
    /// Waves over the SMs (the last may be partial).
    pub waves: usize,
    /// Share of the SM slots busy over all waves (1.0: no tail).
    pub wave_efficiency: f64,
    /// True when HBM bandwidth, not the SMs, bounds the prediction.
    pub memory_bound: bool,
}

/// Predicts the time of `cfg` on `shape` on `gpu` (the configuration should be legal for it),
/// with the default parameters.
pub fn predict(gpu: &GpuSpec, cfg: &GemmConfig, shape: &GemmShape) -> Prediction {
    predict_with(&ModelParams::default(), gpu, cfg, shape)
}

/// [`predict`] with the parameters `p`.
pub fn predict_with(p: &ModelParams, gpu: &GpuSpec, cfg: &GemmConfig, shape: &GemmShape) -> Prediction {
    let (bm, bn) = (cfg.block_m as f64, cfg.block_n as f64);
    let clock = gpu.boost_mhz as f64 * 1e6;
    let tiles = shape.m.div_ceil(cfg.block_m as usize) * shape.n.div_ceil(cfg.block_n as usize);
    let cluster = cfg.cluster_size() as usize;
    let slots = (gpu.sms as usize / cluster * cluster).max(1);
    let waves = tiles.div_ceil(slots).max(1);
    let kb = shape.k_blocks() as f64;

    // Tensor-core time of one tile: the MMA at the per-SM peak, discounted for narrow tiles (fixed
    // issue cost per wgmma) and for the promotion of each 128-K partial sum on the CUDA cores
    // (overlapped with the other warpgroup's MMA when there are two, BLOCK_M >= 128).
    let flop_per_clk = p.sustained_tensor * gpu.fp8_tflops * 1e12 / (gpu.sms as f64 * clock);
    let (rate, promotion, bandwidth) = match cfg.kind {
        KernelKind::Wgmma => (1.0, if cfg.block_m >= 128 { 0.06 } else { 0.15 }, 1.0),
        KernelKind::MmaSync { .. } => (MMA_SYNC_RATE, 0.10, MMA_SYNC_BANDWIDTH),
    };
    let issue = bn / (bn + 16.0);
    let mma_s = kb * 2.0 * bm * bn * 128.0 / (flop_per_clk * rate * issue) * (1.0 + promotion) / clock;

    // Operand bytes one tile pulls into its SM per 128-K block; a multicast operand is shared by
    // the two CTAs of a cluster, each loading half.
    let (a_share, b_share) = match cfg.multicast {
        Multicast::None => (1.0, 1.0),
        Multicast::A => (0.5, 1.0),
        Multicast::B => (1.0, 0.5),
    };
    let load_bytes = kb * ((bm * a_share + bn * b_share) * 128.0 + 4.0 * (bm + 1.0));
    let store_bytes = bm * bn * 2.0;
    let sm_bw = p.l2_bytes_per_clk * clock * bandwidth;
    let load_s = (load_bytes + store_bytes) / sm_bw;
    // A shallow pipeline cannot hide the load latency behind the MMA.
    let overlap = match cfg.stages {
        0..=2 => 0.75,
        3 => 0.9,
        _ => 1.0,
    };
    // Wave by wave: each wave takes its tiles' time, or the HBM time of the bytes its tiles read
    // for the first time (A and B read once overall; L2 serves the re-reads), whichever is longer.
    // A shallow pipeline keeps fewer bytes in flight, which slows both.
    let mut factor = 1.0;
    if cfg.block_m == 64 {
        factor *= p.bm64_factor;
    }
    if cfg.block_m == 256 {
        factor *= p.bm256_factor;
    }
    if cfg.multicast != Multicast::None {
        factor *= p.multicast_factor;
    }
    if matches!(cfg.kind, KernelKind::MmaSync { .. }) {
        factor *= p.mma_sync_factor;
    }
    let tile_s = mma_s.max(load_s) * factor;
    let hbm_per_tile_s = shape.min_bytes() / tiles as f64 / (p.hbm_efficiency * bandwidth * gpu.hbm_gbps * 1e9);
    let (mut total_s, mut hbm_bound_s) = (0.0, 0.0);
    for w in 0..waves {
        let in_wave = (tiles - w * slots).min(slots) as f64;
        let hbm_s = hbm_per_tile_s * in_wave;
        total_s += tile_s.max(hbm_s) / overlap;
        if hbm_s > tile_s {
            hbm_bound_s += hbm_s;
        }
    }
    let s = total_s + p.launch_us * 1e-6;
    let memory_bound = hbm_bound_s * 2.0 > total_s;
    Prediction {
        us: s * 1e6,
        tflops: shape.flops() / s / 1e12,
        tiles,
        waves,
        wave_efficiency: tiles as f64 / (waves * slots) as f64,
        memory_bound,
    }
}

/// The legal configurations of `space` for `shape`, best predicted first (ties broken by id, so
/// the order is the same run to run).
pub fn rank(gpu: &GpuSpec, shape: &GemmShape, space: &[GemmConfig]) -> Vec<(GemmConfig, Prediction)> {
    rank_with(&ModelParams::default(), gpu, shape, space)
}

/// [`rank`] with the parameters `p`.
pub fn rank_with(
    p: &ModelParams,
    gpu: &GpuSpec,
    shape: &GemmShape,
    space: &[GemmConfig],
) -> Vec<(GemmConfig, Prediction)> {
    let mut v: Vec<(GemmConfig, Prediction)> =
        space.iter().filter(|c| is_legal(c, shape).is_ok()).map(|c| (*c, predict_with(p, gpu, c, shape))).collect();
    v.sort_by(|a, b| a.1.us.total_cmp(&b.1.us).then_with(|| a.0.id().cmp(&b.0.id())));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::by_id;
    use fp8forge_kernels::{GpuArch, search_space};

    fn h100() -> &'static GpuSpec {
        by_id("h100-sxm").expect("h100 in table")
    }

    #[test]
    fn a_tail_wave_costs_a_whole_wave() {
        // M = 128, N = 133·128: BLOCK_N 128 gives 133 tiles on 132 SMs (2 waves), BLOCK_N 136
        // gives 126 tiles (1 wave); the wider tile must win although each tile is a bit larger.
        let shape = GemmShape::dense(128, 133 * 128, 7168);
        let a = predict(h100(), &GemmConfig::wgmma(128, 128, 4, Multicast::None), &shape);
        let b = predict(h100(), &GemmConfig::wgmma(128, 136, 4, Multicast::None), &shape);
        assert_eq!((a.tiles, a.waves), (133, 2));
        assert_eq!((b.tiles, b.waves), (126, 1));
        assert!(b.us < 0.7 * a.us, "{b:?} vs {a:?}");
        assert!((a.wave_efficiency - 133.0 / 264.0).abs() < 1e-12);
    }

    #[test]
    fn hand_worked_compute_bound_time() {
        // 4096 x 7168 x 7168 with 128x128 tiles: 32·56 = 1792 tiles, 14 waves on 132 SMs. One tile:
        // 56 K-blocks × 2·128·128·128 flop at 0.78 · 1979e12 / 132 / 1.98e9 = 5906 flop/clk, issue
        // 128/144, promotion +6%: 56 · 4,194,304 / (5906 · 0.8889) · 1.06 / 1.98e9 = 24.0 µs.
        let shape = GemmShape::dense(4096, 7168, 7168);
        let p = predict(h100(), &GemmConfig::wgmma(128, 128, 4, Multicast::None), &shape);
        let flop_per_clk = 0.78 * 1979e12 / (132.0 * 1.98e9);
        let tile = 56.0 * 2.0 * 128.0 * 128.0 * 128.0 / (flop_per_clk * (128.0 / 144.0)) * 1.06 / 1.98e9;
        let want = 14.0 * tile * 1e6 + LAUNCH_US;
        assert!((p.us - want).abs() < 1e-6 * want, "{} vs {want}", p.us);
        assert!(!p.memory_bound);
    }

    #[test]
    fn small_m_is_memory_bound_and_shallow_pipelines_lose() {
        let shape = GemmShape::dense(64, 7168, 16384);
        let deep = predict(h100(), &GemmConfig::wgmma(64, 64, 4, Multicast::None), &shape);
        let shallow = predict(h100(), &GemmConfig::wgmma(64, 64, 2, Multicast::None), &shape);
        assert!(shallow.us > deep.us);
        // 7168·16384 bytes of B must come from HBM at least once: 117 MB / (0.9 · 3.35 TB/s) = 39 µs.
        assert!(deep.us >= 39.0, "{deep:?}");
    }

    /// The model's best prediction against what was measured on the lent H100 (BENCH_TARGETS.md,
    /// DeepGEMM column, block-scaled FP8 as our contract): the model must be in the right range
    /// per shape, and close on average per M, or its `--simulate` times mean nothing.
    #[test]
    fn calibration_against_measured_h100_figures() {
        let nk = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)];
        let measured: [(usize, [f64; 6]); 3] = [
            (64, [197.0, 285.0, 239.0, 344.0, 276.0, 236.0]),
            (128, [363.0, 512.0, 418.0, 583.0, 485.0, 408.0]),
            (4096, [1153.0, 1263.0, 950.0, 1280.0, 1417.0, 1256.0]),
        ];
        let space = search_space(GpuArch::Sm90a);
        for (m, figures) in measured {
            let mut log_ratio = 0.0;
            for ((n, k), want) in nk.into_iter().zip(figures) {
                let best = rank(h100(), &GemmShape::dense(m, n, k), &space)[0].1.tflops;
                let r = best / want;
                assert!((0.6..1.6).contains(&r), "M={m} {n}x{k}: predicted {best:.0} vs measured {want}");
                log_ratio += r.ln() / 6.0;
            }
            let geo = log_ratio.exp();
            assert!((0.8..1.25).contains(&geo), "M={m}: predicted/measured geomean {geo:.3}");
        }
    }

    #[test]
    fn ranking_is_legal_deterministic_and_prefers_big_tiles_at_large_m() {
        let space = search_space(GpuArch::Sm90a);
        let shape = GemmShape::dense(4096, 7168, 2048);
        let r1 = rank(h100(), &shape, &space);
        let r2 = rank(h100(), &shape, &space);
        assert_eq!(r1, r2);
        assert!(r1.iter().all(|(c, _)| is_legal(c, &shape).is_ok()));
        assert!(r1.windows(2).all(|w| w[0].1.us <= w[1].1.us));
        let best = r1[0].0;
        assert!(best.block_m >= 128 && best.block_n >= 112, "best {best}");
        assert!(matches!(best.kind, KernelKind::Wgmma));
    }
}
