//! GEMM kernel configurations: the knobs, the one legality check, and the search space.
//!
//! Every configuration the autotuner may pick comes from [`search_space`], and every launch goes
//! through [`is_legal`] first, so a configuration that compiles (the CI compiles the whole search
//! space for `sm_90a`) is one the tuner may choose, and a shape a kernel cannot run is refused
//! on the host with a reason rather than computed wrongly.
//!
//! The problem is `D[M, N] (bf16) = A[M, K] (e4m3, f32 scale per row and 128 columns) ×
//! B[N, K]ᵀ (e4m3, f32 scale per 128×128 block)`; K must be a multiple of 128 (as in DeepGEMM and
//! every DeepSeek-V3 shape), M and N are arbitrary. See `reference` for the exact contract.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// K extent of one pipeline stage and of one scale block.
pub const BLOCK_K: u32 = 128;
/// Largest dynamic shared memory one block may use on sm_89/sm_90 (227 KiB).
pub const SMEM_LIMIT: u32 = 232_448;
/// Deepest pipeline the kernels allow (their static_asserts say the same); only
/// [`speed_variants`] go past [`SEARCH_MAX_STAGES`].
pub const MAX_STAGES: u32 = 16;
/// Deepest pipeline of the search space.
pub const SEARCH_MAX_STAGES: u32 = 8;
/// In the M-grouped contiguous layout every expert's run of rows starts at a multiple of this.
pub const GROUP_ALIGN: usize = 128;
/// Extra shared memory the wgmma kernel asks for to align its tiles to 1024 bytes.
const WGMMA_SMEM_SLACK: u32 = 1024;
/// Bytes of one padded 128-byte row in the mma.sync kernel's shared memory.
const MMA_ROW_BYTES: u32 = 144;

/// A GPU architecture the kernels are built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum GpuArch {
    /// Ada (compute capability 8.9): mma.sync FP8.
    Sm89,
    /// Hopper without the architecture-specific features: mma.sync FP8 only.
    Sm90,
    /// Hopper with `wgmma`, `setmaxnreg` and TMA multicast (H100, H800, H200).
    Sm90a,
}

impl GpuArch {
    /// The NVRTC `--gpu-architecture` value.
    pub fn nvrtc_name(self) -> &'static str {
        match self {
            GpuArch::Sm89 => "sm_89",
            GpuArch::Sm90 => "sm_90",
            GpuArch::Sm90a => "sm_90a",
        }
    }

    /// The architecture to build for on a device of compute capability `major.minor`, if any:
    /// 9.0 gets `sm_90a`, 8.9 gets `sm_89`.
    pub fn from_compute_capability(major: i32, minor: i32) -> Option<GpuArch> {
        match (major, minor) {
            (9, 0) => Some(GpuArch::Sm90a),
            (8, 9) => Some(GpuArch::Sm89),
            _ => None,
        }
    }
}

impl fmt::Display for GpuArch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.nvrtc_name())
    }
}

/// Which kernel family a configuration instantiates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum KernelKind {
    /// `kernels/cuda/gemm_wgmma.cu`: TMA, mbarrier ring, wgmma, persistent schedule (sm_90a).
    Wgmma,
    /// `kernels/cuda/gemm_mma.cu`: cp.async ring and mma.sync m16n8k32 on a `warps_m × warps_n`
    /// grid of warps (sm_89 and sm_90).
    MmaSync {
        /// Warps along M.
        warps_m: u32,
        /// Warps along N.
        warps_n: u32,
    },
}

/// TMA multicast across a cluster of two CTAs (wgmma only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Multicast {
    /// No cluster: every CTA loads its own tiles.
    None,
    /// Two CTAs on neighbouring N tiles of one M tile; each loads half of the A tile for both.
    A,
    /// Two CTAs on neighbouring M tiles of one N tile; each loads half of the B tile for both.
    B,
}

impl Multicast {
    /// CTAs per cluster.
    pub fn cluster_size(self) -> u32 {
        match self {
            Multicast::None => 1,
            Multicast::A | Multicast::B => 2,
        }
    }
}

/// Shared-memory layout of the operand tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Swizzle {
    /// Rows padded to 144 bytes (mma.sync kernel).
    Padded,
    /// TMA/wgmma 32-byte swizzle.
    B32,
    /// TMA/wgmma 64-byte swizzle.
    B64,
    /// TMA/wgmma 128-byte swizzle.
    B128,
}

impl Swizzle {
    /// Swizzle width in bytes (0 for [`Swizzle::Padded`]).
    pub fn bytes(self) -> u32 {
        match self {
            Swizzle::Padded => 0,
            Swizzle::B32 => 32,
            Swizzle::B64 => 64,
            Swizzle::B128 => 128,
        }
    }
}

/// One kernel configuration: every knob of a GEMM kernel, as the autotuner enumerates it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct GemmConfig {
    /// Kernel family.
    pub kind: KernelKind,
    /// Rows of D per CTA tile.
    pub block_m: u32,
    /// Columns of D per CTA tile.
    pub block_n: u32,
    /// Depth of the shared-memory pipeline (each stage holds 128 of K).
    pub stages: u32,
    /// TMA multicast (wgmma only).
    pub multicast: Multicast,
    /// Operand tile layout.
    pub swizzle: Swizzle,
    /// wgmma with BLOCK_N not dividing 128: the B-scale block of each 8-column group is chosen
    /// at compile time (one branch per tile start dispatches to a promotion unrolled for that
    /// split) instead of per group at run time. A speed variant (id suffix `_sbc`), not searched.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub static_b_scales: bool,
}

impl GemmConfig {
    /// A wgmma configuration with 128-byte swizzle.
    pub fn wgmma(block_m: u32, block_n: u32, stages: u32, multicast: Multicast) -> GemmConfig {
        GemmConfig {
            kind: KernelKind::Wgmma,
            block_m,
            block_n,
            stages,
            multicast,
            swizzle: Swizzle::B128,
            static_b_scales: false,
        }
    }

    /// An mma.sync configuration.
    pub fn mma(block_m: u32, block_n: u32, warps_m: u32, warps_n: u32, stages: u32) -> GemmConfig {
        GemmConfig {
            kind: KernelKind::MmaSync { warps_m, warps_n },
            block_m,
            block_n,
            stages,
            multicast: Multicast::None,
            swizzle: Swizzle::Padded,
            static_b_scales: false,
        }
    }

    /// The stable id of the configuration, e.g. `wgmma_bm128_bn128_s4_mcA2_sw128` or
    /// `mma_bm128_bn128_w2x4_s3`; [`GemmConfig::from_str`] parses it back.
    pub fn id(&self) -> String {
        match self.kind {
            KernelKind::Wgmma => {
                let mc = match self.multicast {
                    Multicast::None => "mc1".to_string(),
                    Multicast::A => "mcA2".to_string(),
                    Multicast::B => "mcB2".to_string(),
                };
                format!(
                    "wgmma_bm{}_bn{}_s{}_{}_sw{}{}",
                    self.block_m,
                    self.block_n,
                    self.stages,
                    mc,
                    self.swizzle.bytes(),
                    if self.static_b_scales { "_sbc" } else { "" }
                )
            }
            KernelKind::MmaSync { warps_m, warps_n } => {
                format!("mma_bm{}_bn{}_w{}x{}_s{}", self.block_m, self.block_n, warps_m, warps_n, self.stages)
            }
        }
    }

    /// Threads per CTA.
    pub fn threads(&self) -> u32 {
        match self.kind {
            KernelKind::Wgmma => 128 * (1 + self.math_warpgroups()),
            KernelKind::MmaSync { warps_m, warps_n } => 32 * warps_m * warps_n,
        }
    }

    /// Consumer warpgroups of the wgmma kernel (1 for BM = 64, else 2).
    fn math_warpgroups(&self) -> u32 {
        if self.block_m >= 128 { 2 } else { 1 }
    }

    /// CTAs per cluster.
    pub fn cluster_size(&self) -> u32 {
        self.multicast.cluster_size()
    }

    /// Shared memory per pipeline stage, in bytes.
    pub fn smem_per_stage(&self) -> u32 {
        match self.kind {
            // A and B tiles, plus one full and one empty mbarrier.
            KernelKind::Wgmma => (self.block_m + self.block_n) * BLOCK_K + 16,
            KernelKind::MmaSync { .. } => (self.block_m + self.block_n) * MMA_ROW_BYTES,
        }
    }

    /// Dynamic shared memory the kernel is launched with, in bytes.
    pub fn smem_bytes(&self) -> u32 {
        let fixed = match self.kind {
            KernelKind::Wgmma => WGMMA_SMEM_SLACK,
            KernelKind::MmaSync { .. } => 0,
        };
        fixed + self.stages * self.smem_per_stage()
    }

    /// The deepest pipeline that fits in shared memory for this tile (capped at [`MAX_STAGES`]).
    pub fn max_stages(&self) -> u32 {
        let fixed = match self.kind {
            KernelKind::Wgmma => WGMMA_SMEM_SLACK,
            KernelKind::MmaSync { .. } => 0,
        };
        ((SMEM_LIMIT - fixed) / self.smem_per_stage()).min(MAX_STAGES)
    }

    /// The architecture the configuration is compiled for when the device is `device`: wgmma
    /// needs `sm_90a`; mma.sync runs on sm_89 and sm_90 (built as `sm_90a` on Hopper).
    pub fn runs_on(&self, device: GpuArch) -> bool {
        match self.kind {
            KernelKind::Wgmma => device == GpuArch::Sm90a,
            KernelKind::MmaSync { .. } => true,
        }
    }
}

impl fmt::Display for GemmConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id())
    }
}

impl FromStr for GemmConfig {
    type Err = Why;

    /// Parses an id written by [`GemmConfig::id`].
    fn from_str(s: &str) -> Result<GemmConfig, Why> {
        let bad = || Why::BadId { id: s.to_string() };
        let (core, static_b_scales) = match s.strip_suffix("_sbc") {
            Some(core) => (core, true),
            None => (s, false),
        };
        let mut parts = core.split('_');
        let kind = parts.next().ok_or_else(bad)?;
        let num = |p: Option<&str>, prefix: &str| -> Result<u32, Why> {
            p.and_then(|p| p.strip_prefix(prefix)).and_then(|v| v.parse().ok()).ok_or_else(bad)
        };
        let cfg = match kind {
            "wgmma" => {
                let block_m = num(parts.next(), "bm")?;
                let block_n = num(parts.next(), "bn")?;
                let stages = num(parts.next(), "s")?;
                let multicast = match parts.next() {
                    Some("mc1") => Multicast::None,
                    Some("mcA2") => Multicast::A,
                    Some("mcB2") => Multicast::B,
                    _ => return Err(bad()),
                };
                let swizzle = match num(parts.next(), "sw")? {
                    32 => Swizzle::B32,
                    64 => Swizzle::B64,
                    128 => Swizzle::B128,
                    _ => return Err(bad()),
                };
                GemmConfig { kind: KernelKind::Wgmma, block_m, block_n, stages, multicast, swizzle, static_b_scales }
            }
            "mma" => {
                let block_m = num(parts.next(), "bm")?;
                let block_n = num(parts.next(), "bn")?;
                let (wm, wn) =
                    parts.next().and_then(|w| w.strip_prefix('w')).and_then(|w| w.split_once('x')).ok_or_else(bad)?;
                let warps_m = wm.parse().map_err(|_| bad())?;
                let warps_n = wn.parse().map_err(|_| bad())?;
                let stages = num(parts.next(), "s")?;
                if static_b_scales {
                    return Err(bad());
                }
                GemmConfig::mma(block_m, block_n, warps_m, warps_n, stages)
            }
            _ => return Err(bad()),
        };
        if parts.next().is_some() { Err(bad()) } else { Ok(cfg) }
    }
}

/// A GEMM problem's sizes: dense, or M-grouped contiguous (MoE experts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct GemmShape {
    /// Rows of A and D (for a grouped problem: all experts' rows, padding included).
    pub m: usize,
    /// Columns of D (rows of B, per expert).
    pub n: usize,
    /// The reduction dimension; a multiple of 128.
    pub k: usize,
    /// `None`: dense. `Some(E)`: M-grouped contiguous with E experts; B is `[E, N, K]`, each
    /// expert's rows of A are contiguous and start at a multiple of [`GROUP_ALIGN`], and an
    /// `m_indices[M]` array gives each row's expert (-1 for a padding row).
    pub groups: Option<usize>,
}

impl GemmShape {
    /// A dense shape.
    pub fn dense(m: usize, n: usize, k: usize) -> GemmShape {
        GemmShape { m, n, k, groups: None }
    }

    /// An M-grouped contiguous shape with `experts` experts and `m` rows in all.
    pub fn grouped(m: usize, n: usize, k: usize, experts: usize) -> GemmShape {
        GemmShape { m, n, k, groups: Some(experts) }
    }

    /// An M-grouped contiguous shape of `experts` experts with `tokens` rows each, every
    /// expert's run padded to [`GROUP_ALIGN`] rows: how a tuning table's grouped entries and
    /// `bench gemm --groups` lay their experts out.
    pub fn grouped_tokens(tokens: usize, n: usize, k: usize, experts: usize) -> GemmShape {
        GemmShape::grouped(experts * tokens.next_multiple_of(GROUP_ALIGN), n, k, experts)
    }

    /// Number of experts (1 for a dense shape).
    pub fn experts(&self) -> usize {
        self.groups.unwrap_or(1)
    }

    /// K / 128.
    pub fn k_blocks(&self) -> usize {
        self.k / BLOCK_K as usize
    }

    /// ceil(N / 128): rows of the per-expert B scale grid.
    pub fn n_blocks(&self) -> usize {
        self.n.div_ceil(BLOCK_K as usize)
    }

    /// Floating-point operations: 2·M·N·K (padding rows of a grouped shape included).
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }

    /// The fewest bytes a GEMM must move through device memory: A, B and their scales read once,
    /// D written once.
    pub fn min_bytes(&self) -> f64 {
        let (m, n, k, e) = (self.m as f64, self.n as f64, self.k as f64, self.experts() as f64);
        let kb = self.k_blocks() as f64;
        m * k + e * n * k + 4.0 * (m * kb + e * self.n_blocks() as f64 * kb) + 2.0 * m * n
    }

    /// Checks what every kernel needs of a shape: non-empty, K a multiple of 128, sizes that fit
    /// the kernels' 32-bit indices, and (grouped) M a multiple of [`GROUP_ALIGN`].
    pub fn validate(&self) -> Result<(), Why> {
        if self.m == 0 || self.n == 0 || self.k == 0 {
            return Err(Why::Empty);
        }
        if !self.k.is_multiple_of(BLOCK_K as usize) {
            return Err(Why::KNotMultipleOf128 { k: self.k });
        }
        let limit = i32::MAX as usize;
        if self.m > limit || self.n > limit || self.k > limit {
            return Err(Why::TooLarge);
        }
        if let Some(e) = self.groups {
            if e == 0 || e > limit {
                return Err(Why::NoExperts);
            }
            if !self.m.is_multiple_of(GROUP_ALIGN) {
                return Err(Why::GroupedM { m: self.m });
            }
        }
        Ok(())
    }
}

impl fmt::Display for GemmShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}x{}", self.m, self.n, self.k)?;
        if let Some(e) = self.groups {
            write!(f, "/{e}")?;
        }
        Ok(())
    }
}

/// Why a configuration or a shape is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Why {
    /// M, N or K is zero.
    #[error("M, N and K must be positive")]
    Empty,
    /// K is not a multiple of 128.
    #[error("K = {k} is not a multiple of 128 (every kernel promotes partial sums per 128-wide K block)")]
    KNotMultipleOf128 {
        /// The K given.
        k: usize,
    },
    /// A size does not fit a 32-bit index.
    #[error("M, N and K must each be below 2^31")]
    TooLarge,
    /// A grouped shape with no experts.
    #[error("a grouped shape needs at least one expert")]
    NoExperts,
    /// A grouped shape whose M is not a multiple of the expert alignment.
    #[error("grouped M = {m} is not a multiple of 128 (every expert's rows are padded to a multiple of 128)")]
    GroupedM {
        /// The M given.
        m: usize,
    },
    /// BLOCK_M not supported by the kernel family.
    #[error("BLOCK_M = {block_m} is not one of {allowed}")]
    BlockM {
        /// The BLOCK_M given.
        block_m: u32,
        /// The values allowed.
        allowed: &'static str,
    },
    /// BLOCK_N not supported by the kernel family.
    #[error("BLOCK_N = {block_n} is not allowed: {rule}")]
    BlockN {
        /// The BLOCK_N given.
        block_n: u32,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// The accumulators would not fit in registers (ptxas would spill).
    #[error(
        "BLOCK_M = {block_m}, BLOCK_N = {block_n} needs too many accumulator registers (BLOCK_N <= {max_block_n} for this BLOCK_M)"
    )]
    Registers {
        /// BLOCK_M.
        block_m: u32,
        /// BLOCK_N.
        block_n: u32,
        /// The largest BLOCK_N without spills for this BLOCK_M.
        max_block_n: u32,
    },
    /// Pipeline depth out of range.
    #[error("{stages} stages: must be 2..={max} for this tile (shared memory and MAX_STAGES)")]
    Stages {
        /// The stages given.
        stages: u32,
        /// The most allowed.
        max: u32,
    },
    /// The swizzle does not suit the kernel family.
    #[error("swizzle {swizzle:?} does not suit {kind}")]
    Swizzle {
        /// The swizzle given.
        swizzle: Swizzle,
        /// The kernel family.
        kind: &'static str,
    },
    /// Multicast asked of a kernel without clusters.
    #[error("TMA multicast needs the wgmma kernel")]
    MulticastUnsupported,
    /// Multicast pairs tiles along a dimension whose tile count is odd.
    #[error("multicast {multicast:?} pairs {dim} tiles, and {tiles} {dim} tiles cannot be paired")]
    MulticastOddTiles {
        /// The multicast.
        multicast: Multicast,
        /// "M" or "N".
        dim: &'static str,
        /// The number of tiles along it.
        tiles: usize,
    },
    /// A grouped problem with a BLOCK_M that does not divide the expert alignment.
    #[error("grouped GEMM needs BLOCK_M to divide 128, got {block_m}")]
    GroupedBlockM {
        /// The BLOCK_M given.
        block_m: u32,
    },
    /// A grouped problem with B multicast (paired M tiles may belong to different experts).
    #[error("grouped GEMM cannot multicast B: neighbouring M tiles may belong to different experts")]
    GroupedMulticastB,
    /// The warp grid of an mma.sync configuration does not tile the block.
    #[error("warp grid {warps_m}x{warps_n} does not suit a {block_m}x{block_n} tile: {rule}")]
    Warps {
        /// Warps along M.
        warps_m: u32,
        /// Warps along N.
        warps_n: u32,
        /// BLOCK_M.
        block_m: u32,
        /// BLOCK_N.
        block_n: u32,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// A configuration id that does not parse.
    #[error("{id:?} is not a configuration id (e.g. wgmma_bm128_bn128_s4_mcA2_sw128, mma_bm128_bn128_w2x4_s3)")]
    BadId {
        /// The text given.
        id: String,
    },
}

/// The largest BLOCK_N whose accumulators fit in registers without spills, per BLOCK_M, for the
/// wgmma kernel, measured with the ptxas of NVRTC 13.0 over every variant: each consumer thread
/// holds `(slabs + 1) × BLOCK_N / 2` f32 accumulators, within 255 registers for BM = 64 and 232
/// after `setmaxnreg` otherwise (BM = 64 with BLOCK_N = 192 spills in its grouped variant).
pub fn wgmma_max_block_n(block_m: u32) -> u32 {
    match block_m {
        64 => 184,
        128 => 184,
        _ => 128,
    }
}

/// Shape-independent legality: can this configuration be built at all?
pub fn check_config(cfg: &GemmConfig) -> Result<(), Why> {
    let (bm, bn) = (cfg.block_m, cfg.block_n);
    match cfg.kind {
        KernelKind::Wgmma => {
            if ![64, 128, 256].contains(&bm) {
                return Err(Why::BlockM { block_m: bm, allowed: "64, 128, 256" });
            }
            if !(16..=256).contains(&bn) || !bn.is_multiple_of(8) {
                return Err(Why::BlockN { block_n: bn, rule: "a multiple of 8 from 16 to 256 (wgmma N)" });
            }
            if cfg.multicast == Multicast::B && !bn.is_multiple_of(16) {
                return Err(Why::BlockN {
                    block_n: bn,
                    rule: "a multiple of 16 with B multicast (each CTA loads half)",
                });
            }
            let max_block_n = wgmma_max_block_n(bm);
            if bn > max_block_n {
                return Err(Why::Registers { block_m: bm, block_n: bn, max_block_n });
            }
            if !matches!(cfg.swizzle, Swizzle::B32 | Swizzle::B64 | Swizzle::B128) {
                return Err(Why::Swizzle { swizzle: cfg.swizzle, kind: "wgmma (32, 64 or 128 bytes)" });
            }
            if cfg.static_b_scales && 128 % bn == 0 {
                return Err(Why::BlockN {
                    block_n: bn,
                    rule: "not a divisor of 128 with compile-time B-scale selection (a divisor never splits a scale block)",
                });
            }
        }
        KernelKind::MmaSync { warps_m, warps_n } => {
            if ![64, 128].contains(&bm) {
                return Err(Why::BlockM { block_m: bm, allowed: "64, 128" });
            }
            if ![64, 128].contains(&bn) {
                return Err(Why::BlockN { block_n: bn, rule: "64 or 128 for mma.sync" });
            }
            let warps = |rule| Why::Warps { warps_m, warps_n, block_m: bm, block_n: bn, rule };
            if !(1..=4).contains(&warps_m) || !(1..=4).contains(&warps_n) || warps_m * warps_n > 8 {
                return Err(warps("1 to 4 warps each way, at most 8 in all"));
            }
            if !bm.is_multiple_of(16 * warps_m) || !bn.is_multiple_of(8 * warps_n) {
                return Err(warps("each warp's tile must be a multiple of 16 rows and 8 columns"));
            }
            // Partial and accumulator: 2 × (rows/16) × (cols/8) × 4 floats per thread; ptxas
            // spills above 64 of them (measured with NVRTC 13.0 for sm_90a).
            if 2 * (bm / warps_m / 16) * (bn / warps_n / 8) * 4 > 64 {
                return Err(warps("at most 64 accumulator registers per thread (a 32x32 warp tile)"));
            }
            if cfg.multicast != Multicast::None {
                return Err(Why::MulticastUnsupported);
            }
            if cfg.swizzle != Swizzle::Padded {
                return Err(Why::Swizzle { swizzle: cfg.swizzle, kind: "mma.sync (padded rows)" });
            }
            if cfg.static_b_scales {
                return Err(Why::BlockN { block_n: bn, rule: "compile-time B-scale selection is a wgmma variant" });
            }
        }
    }
    let max = cfg.max_stages();
    if cfg.stages < 2 || cfg.stages > max {
        return Err(Why::Stages { stages: cfg.stages, max });
    }
    Ok(())
}

/// The one legality check: can `cfg` compute `shape` exactly as the contract says?
pub fn is_legal(cfg: &GemmConfig, shape: &GemmShape) -> Result<(), Why> {
    shape.validate()?;
    check_config(cfg)?;
    let tiles_m = shape.m.div_ceil(cfg.block_m as usize);
    let tiles_n = shape.n.div_ceil(cfg.block_n as usize);
    match cfg.multicast {
        Multicast::None => {}
        Multicast::A if !tiles_n.is_multiple_of(2) => {
            return Err(Why::MulticastOddTiles { multicast: cfg.multicast, dim: "N", tiles: tiles_n });
        }
        Multicast::B if !tiles_m.is_multiple_of(2) => {
            return Err(Why::MulticastOddTiles { multicast: cfg.multicast, dim: "M", tiles: tiles_m });
        }
        Multicast::A | Multicast::B => {}
    }
    if shape.groups.is_some() {
        if !(GROUP_ALIGN as u32).is_multiple_of(cfg.block_m) {
            return Err(Why::GroupedBlockM { block_m: cfg.block_m });
        }
        if cfg.multicast == Multicast::B {
            return Err(Why::GroupedMulticastB);
        }
    }
    Ok(())
}

/// Whether `cfg` can serve grouped shapes at all (so whether its grouped variant is built).
pub fn supports_grouped(cfg: &GemmConfig) -> bool {
    (GROUP_ALIGN as u32).is_multiple_of(cfg.block_m) && cfg.multicast != Multicast::B
}

/// The search space for a device of architecture `arch`: every configuration the autotuner may
/// pick there, each passing [`check_config`].
///
/// wgmma (sm_90a only): BLOCK_M ∈ {64, 128, 256}; BLOCK_N from 16 in steps of 8 up to the
/// register limit of [`wgmma_max_block_n`]; multicast none, A or B (B with BLOCK_N a multiple of
/// 16); 4 stages and the deepest pipeline that fits; 128-byte swizzle (the 32- and 64-byte layouts
/// are legal and built by the CI check on a subset, but never faster, so not searched).
/// mma.sync (every arch): BLOCK_M, BLOCK_N ∈ {64, 128} with warp grids 2×2, 2×4 or 4×2 whose warp
/// tile is at most 32×32 (so 128×128 is out: it would need 16 warps and spills at 128 registers);
/// 2 to 4 stages.
pub fn search_space(arch: GpuArch) -> Vec<GemmConfig> {
    let mut out = Vec::new();
    if arch == GpuArch::Sm90a {
        for bm in [64u32, 128, 256] {
            for bn in (16..=wgmma_max_block_n(bm)).step_by(8) {
                for mc in [Multicast::None, Multicast::A, Multicast::B] {
                    let probe = GemmConfig::wgmma(bm, bn, 2, mc);
                    let deepest = probe.max_stages().min(SEARCH_MAX_STAGES);
                    let mut depths = vec![4.min(deepest), deepest];
                    depths.dedup();
                    for stages in depths {
                        let cfg = GemmConfig { stages, ..probe };
                        if check_config(&cfg).is_ok() {
                            out.push(cfg);
                        }
                    }
                }
            }
        }
    }
    for bm in [64u32, 128] {
        for bn in [64u32, 128] {
            for (wm, wn) in [(2u32, 2u32), (2, 4), (4, 2)] {
                for stages in 2..=4 {
                    let cfg = GemmConfig::mma(bm, bn, wm, wn, stages);
                    if check_config(&cfg).is_ok() {
                        out.push(cfg);
                    }
                }
            }
        }
    }
    out
}

/// Selectable variants outside the search space, for speed work that cannot be measured where it
/// is written (each must pass the sm_90a compile check; none replaces a search-space variant):
/// - every wgmma tile of the search space small enough for more than [`SEARCH_MAX_STAGES`]
///   stages, at the deepest pipeline that fits (at most [`MAX_STAGES`] = 16), e.g. BM = 64,
///   BN ≤ 136;
/// - every wgmma tile without multicast whose BLOCK_N does not divide 128, with 4 stages (or its
///   deepest pipeline if shallower), with the B-scale selection at compile time
///   ([`GemmConfig::static_b_scales`]).
///
/// Empty for an architecture without wgmma. Their family is `speed` (see `filter`).
pub fn speed_variants(arch: GpuArch) -> Vec<GemmConfig> {
    let mut out: Vec<GemmConfig> = Vec::new();
    let space = search_space(arch);
    for cfg in space.iter().filter(|c| c.kind == KernelKind::Wgmma) {
        let deep = GemmConfig { stages: cfg.max_stages(), ..*cfg };
        if deep.stages > SEARCH_MAX_STAGES && check_config(&deep).is_ok() && !out.contains(&deep) {
            out.push(deep);
        }
    }
    let four_stages = |c: &&GemmConfig| c.stages == 4.min(c.max_stages());
    for cfg in
        space.iter().filter(|c| c.kind == KernelKind::Wgmma && c.multicast == Multicast::None).filter(four_stages)
    {
        let sbc = GemmConfig { static_b_scales: true, ..*cfg };
        if check_config(&sbc).is_ok() {
            out.push(sbc);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_search_space_config_is_legal_and_its_id_round_trips() {
        let space = search_space(GpuArch::Sm90a);
        assert!(space.len() > 100, "search space has only {} configs", space.len());
        let mut ids = std::collections::HashSet::new();
        for cfg in &space {
            check_config(cfg).unwrap_or_else(|e| panic!("{cfg}: {e}"));
            assert!(cfg.smem_bytes() <= SMEM_LIMIT, "{cfg} uses {} bytes of shared memory", cfg.smem_bytes());
            let back: GemmConfig = cfg.id().parse().unwrap_or_else(|e| panic!("{}: {e}", cfg.id()));
            assert_eq!(&back, cfg, "id {} does not round-trip", cfg.id());
            assert!(ids.insert(cfg.id()), "duplicate id {}", cfg.id());
        }
    }

    #[test]
    fn speed_variants_are_deep_small_tiles_outside_the_search_space() {
        let space = search_space(GpuArch::Sm90a);
        let speed = speed_variants(GpuArch::Sm90a);
        assert!(!speed.is_empty());
        for cfg in &speed {
            check_config(cfg).unwrap_or_else(|e| panic!("{cfg}: {e}"));
            assert!(cfg.static_b_scales || (cfg.stages > SEARCH_MAX_STAGES && cfg.stages <= MAX_STAGES), "{cfg}");
            assert!(cfg.smem_bytes() <= SMEM_LIMIT, "{cfg}");
            assert!(!space.contains(cfg), "{cfg} is in the search space");
            let back: GemmConfig = cfg.id().parse().unwrap();
            assert_eq!(&back, cfg);
        }
        assert!(speed.iter().any(|c| c.block_m == 64 && c.block_n == 64 && c.stages == 14), "{speed:?}");
        let sbc: Vec<&GemmConfig> = speed.iter().filter(|c| c.static_b_scales).collect();
        assert!(sbc.iter().all(|c| 128 % c.block_n != 0 && c.multicast == Multicast::None));
        assert!(sbc.iter().any(|c| c.id() == "wgmma_bm128_bn160_s4_mc1_sw128_sbc"), "{sbc:?}");
        assert!(space.iter().all(|c| c.stages <= SEARCH_MAX_STAGES));
        assert!(speed_variants(GpuArch::Sm89).is_empty());
    }

    #[test]
    fn sm89_search_space_has_no_wgmma() {
        let space = search_space(GpuArch::Sm89);
        assert!(!space.is_empty());
        assert!(space.iter().all(|c| matches!(c.kind, KernelKind::MmaSync { .. })));
    }

    #[test]
    fn id_format_is_stable() {
        assert_eq!(GemmConfig::wgmma(128, 128, 4, Multicast::A).id(), "wgmma_bm128_bn128_s4_mcA2_sw128");
        assert_eq!(GemmConfig::wgmma(64, 88, 8, Multicast::None).id(), "wgmma_bm64_bn88_s8_mc1_sw128");
        assert_eq!(GemmConfig::mma(128, 64, 2, 2, 3).id(), "mma_bm128_bn64_w2x2_s3");
        let sbc = GemmConfig { static_b_scales: true, ..GemmConfig::wgmma(128, 96, 4, Multicast::None) };
        assert_eq!(sbc.id(), "wgmma_bm128_bn96_s4_mc1_sw128_sbc");
        assert_eq!("wgmma_bm128_bn96_s4_mc1_sw128_sbc".parse::<GemmConfig>(), Ok(sbc));
        assert!(check_config(&sbc).is_ok());
        assert!(
            check_config(&GemmConfig { static_b_scales: true, ..GemmConfig::wgmma(128, 64, 4, Multicast::None) })
                .is_err()
        );
        for bad in [
            "",
            "wgmma",
            "wgmma_bm128_bn128_s4_mcC2_sw128",
            "wgmma_bm128_bn128_s4_mc1_sw128_x",
            "mma_bm64_bn64_w2_s2",
            "mma_bm64_bn64_w2x2_s2_sbc",
            "wgmma_bm128_bn96_s4_mc1_sw128_sbc_sbc",
        ] {
            assert!(bad.parse::<GemmConfig>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn shared_memory_estimate_matches_the_kernel_layout() {
        // wgmma: 1024 bytes of alignment slack + per stage (A 128x128 + B 128x128 + 2 mbarriers).
        let c = GemmConfig::wgmma(128, 128, 4, Multicast::None);
        assert_eq!(c.smem_bytes(), 1024 + 4 * (128 * 128 + 128 * 128 + 16));
        // mma.sync: per stage (BM + BN) rows of 144 bytes.
        assert_eq!(GemmConfig::mma(64, 128, 2, 2, 3).smem_bytes(), 3 * 192 * 144);
        // The deepest pipeline fits and one more stage would not (or MAX_STAGES caps it).
        for cfg in search_space(GpuArch::Sm90a) {
            let deepest = GemmConfig { stages: cfg.max_stages(), ..cfg };
            assert!(deepest.smem_bytes() <= SMEM_LIMIT);
            let one_more = GemmConfig { stages: cfg.max_stages() + 1, ..cfg };
            assert!(one_more.smem_bytes() > SMEM_LIMIT || one_more.stages > MAX_STAGES, "{cfg}");
        }
    }

    #[test]
    fn legality_refuses_what_the_kernels_cannot_do() {
        let dense = GemmShape::dense(4096, 7168, 2048);
        assert_eq!(is_legal(&GemmConfig::wgmma(128, 128, 4, Multicast::None), &dense), Ok(()));
        assert_eq!(
            is_legal(&GemmConfig::wgmma(128, 128, 4, Multicast::None), &GemmShape::dense(64, 128, 100)),
            Err(Why::KNotMultipleOf128 { k: 100 })
        );
        assert_eq!(
            is_legal(&GemmConfig::wgmma(128, 128, 4, Multicast::None), &GemmShape::dense(0, 1, 128)),
            Err(Why::Empty)
        );
        assert!(matches!(check_config(&GemmConfig::wgmma(96, 128, 4, Multicast::None)), Err(Why::BlockM { .. })));
        assert!(matches!(check_config(&GemmConfig::wgmma(128, 100, 4, Multicast::None)), Err(Why::BlockN { .. })));
        assert!(matches!(check_config(&GemmConfig::wgmma(128, 200, 4, Multicast::None)), Err(Why::Registers { .. })));
        assert!(matches!(check_config(&GemmConfig::wgmma(128, 88, 4, Multicast::B)), Err(Why::BlockN { .. })));
        assert!(matches!(check_config(&GemmConfig::wgmma(256, 128, 5, Multicast::None)), Err(Why::Stages { .. })));
        assert!(matches!(check_config(&GemmConfig::wgmma(128, 128, 1, Multicast::None)), Err(Why::Stages { .. })));
        // Multicast A pairs N tiles: 7168 / 128 = 56 tiles pair up, 7168 / 112 = 64 too, 2112 / 128 = 16.5 -> 17 not.
        assert_eq!(is_legal(&GemmConfig::wgmma(128, 128, 4, Multicast::A), &dense), Ok(()));
        assert!(matches!(
            is_legal(&GemmConfig::wgmma(128, 128, 4, Multicast::A), &GemmShape::dense(128, 2112, 7168)),
            Err(Why::MulticastOddTiles { dim: "N", tiles: 17, .. })
        ));
        assert!(matches!(
            is_legal(&GemmConfig::wgmma(128, 128, 4, Multicast::B), &GemmShape::dense(64, 2112, 7168)),
            Err(Why::MulticastOddTiles { dim: "M", tiles: 1, .. })
        ));
        // Grouped: M a multiple of 128, BLOCK_M dividing 128, no B multicast.
        let grouped = GemmShape::grouped(4 * 8192, 4096, 7168, 4);
        assert_eq!(is_legal(&GemmConfig::wgmma(128, 128, 4, Multicast::A), &grouped), Ok(()));
        assert_eq!(
            is_legal(&GemmConfig::wgmma(256, 128, 4, Multicast::None), &grouped),
            Err(Why::GroupedBlockM { block_m: 256 })
        );
        assert_eq!(is_legal(&GemmConfig::wgmma(128, 128, 4, Multicast::B), &grouped), Err(Why::GroupedMulticastB));
        assert_eq!(
            is_legal(&GemmConfig::wgmma(64, 128, 4, Multicast::None), &GemmShape::grouped(200, 128, 128, 2)),
            Err(Why::GroupedM { m: 200 })
        );
        // mma.sync: no multicast, padded layout, warp tiles within the register budget.
        assert_eq!(check_config(&GemmConfig::mma(128, 64, 4, 2, 3)), Ok(()));
        assert!(matches!(check_config(&GemmConfig::mma(128, 128, 2, 4, 3)), Err(Why::Warps { .. })));
        assert!(matches!(check_config(&GemmConfig::mma(64, 64, 4, 4, 3)), Err(Why::Warps { .. })));
        let mut mc = GemmConfig::mma(64, 64, 2, 2, 2);
        mc.multicast = Multicast::A;
        assert_eq!(check_config(&mc), Err(Why::MulticastUnsupported));
    }

    #[test]
    fn grouped_tokens_pads_every_expert_to_the_alignment() {
        assert_eq!(GemmShape::grouped_tokens(100, 8, 128, 3), GemmShape::grouped(384, 8, 128, 3));
        assert_eq!(GemmShape::grouped_tokens(128, 8, 128, 2), GemmShape::grouped(256, 8, 128, 2));
        assert_eq!(GemmShape::grouped_tokens(100, 8, 128, 3).validate(), Ok(()));
    }

    #[test]
    fn shape_counts_flops_and_bytes() {
        let s = GemmShape::dense(64, 2112, 7168);
        assert_eq!(s.flops(), 2.0 * 64.0 * 2112.0 * 7168.0);
        // A + B + scales (64x56 and 17x56 f32) + D.
        let bytes = 64.0 * 7168.0 + 2112.0 * 7168.0 + 4.0 * (64.0 * 56.0 + 17.0 * 56.0) + 2.0 * 64.0 * 2112.0;
        assert_eq!(s.min_bytes(), bytes);
    }
}
