//! The CUDA sources (embedded from `kernels/cuda/`) and how one kernel variant's program text is
//! put together: the configuration's `#define`s, `common.cuh`, generated code, the kernel file.

use sha2::{Digest, Sha256};

use crate::config::{GemmConfig, GpuArch, KernelKind, Multicast};
use crate::reference::ScaleFormat;

/// `kernels/cuda/common.cuh`.
pub const COMMON: &str = include_str!("../cuda/common.cuh");
/// `kernels/cuda/gemm_wgmma.cu`.
pub const GEMM_WGMMA: &str = include_str!("../cuda/gemm_wgmma.cu");
/// `kernels/cuda/gemm_mma.cu`.
pub const GEMM_MMA: &str = include_str!("../cuda/gemm_mma.cu");
/// `kernels/cuda/act_quant.cu`.
pub const ACT_QUANT: &str = include_str!("../cuda/act_quant.cu");

/// Bumped whenever the way programs are assembled (this file) changes meaning.
const ASSEMBLY_VERSION: &str = "fp8forge-kernels-source-v2";

/// One kernel variant: what NVRTC compiles as one program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelSpec {
    /// A GEMM configuration, dense or M-grouped contiguous.
    Gemm {
        /// The configuration.
        config: GemmConfig,
        /// The grouped variant (reads `m_indices`, B is `[E, N, K]`).
        grouped: bool,
    },
    /// The 1×128 activation quantization kernel.
    ActQuant {
        /// Scale format.
        format: ScaleFormat,
    },
}

impl KernelSpec {
    /// The kernel's entry point in the program.
    pub fn entry(&self) -> &'static str {
        match self {
            KernelSpec::Gemm { config, .. } => match config.kind {
                KernelKind::Wgmma => "fp8_gemm_wgmma",
                KernelKind::MmaSync { .. } => "fp8_gemm_mma",
            },
            KernelSpec::ActQuant { .. } => "fp8_act_quant",
        }
    }

    /// A readable name of the variant, e.g. `gemm wgmma_bm128_bn128_s4_mc1_sw128 grouped`.
    pub fn label(&self) -> String {
        match self {
            KernelSpec::Gemm { config, grouped } => {
                format!("gemm {}{}", config.id(), if *grouped { " grouped" } else { "" })
            }
            KernelSpec::ActQuant { format } => format!("act_quant {format:?}"),
        }
    }

    /// The program text NVRTC compiles.
    pub fn source(&self) -> String {
        let mut s = format!("// {}\n", self.label());
        match self {
            KernelSpec::Gemm { config, grouped } => {
                let defs = [("BM", config.block_m), ("BN", config.block_n), ("STAGES", config.stages)];
                for (k, v) in defs {
                    s += &format!("#define {k} {v}\n");
                }
                s += &format!("#define GROUPED {}\n", u32::from(*grouped));
                // The host's launch values, checked against the kernel's layout by static_asserts.
                s += &format!("#define HOST_SMEM {}\n#define HOST_THREADS {}\n", config.smem_bytes(), config.threads());
                match config.kind {
                    KernelKind::Wgmma => {
                        let mc = match config.multicast {
                            Multicast::None => 0,
                            Multicast::A => 1,
                            Multicast::B => 2,
                        };
                        s += &format!("#define MC {mc}\n#define CLUSTER {}\n", config.cluster_size());
                        s += &format!("#define SW {}\n", config.swizzle.bytes());
                        s += &format!("#define SB_STATIC {}\n", u32::from(config.static_b_scales));
                        s += COMMON;
                        s += &wgmma_wrapper(config.block_n);
                        s += GEMM_WGMMA;
                    }
                    KernelKind::MmaSync { warps_m, warps_n } => {
                        s += &format!("#define WM {warps_m}\n#define WN {warps_n}\n");
                        s += COMMON;
                        s += GEMM_MMA;
                    }
                }
            }
            KernelSpec::ActQuant { format } => {
                s += &format!("#define UE8M0 {}\n", u32::from(*format == ScaleFormat::Ue8m0));
                s += COMMON;
                s += ACT_QUANT;
            }
        }
        s
    }
}

/// Every kernel variant a device of architecture `arch` may run: each configuration of the search
/// space and of the speed variants (`config::speed_variants`), dense and (where it supports
/// them) grouped, and the activation quantization kernels.
pub fn all_variants(arch: GpuArch) -> Vec<KernelSpec> {
    let mut out = Vec::new();
    for config in crate::config::search_space(arch).into_iter().chain(crate::config::speed_variants(arch)) {
        out.push(KernelSpec::Gemm { config, grouped: false });
        if crate::config::supports_grouped(&config) {
            out.push(KernelSpec::Gemm { config, grouped: true });
        }
    }
    out.push(KernelSpec::ActQuant { format: ScaleFormat::F32 });
    out.push(KernelSpec::ActQuant { format: ScaleFormat::Ue8m0 });
    out
}

/// NVRTC options for `arch`: CUBIN for the exact architecture (the lent GPUs' driver cannot JIT
/// PTX from a newer NVRTC), line info for profilers and sanitizers, and ptxas's resource report
/// (registers, stack, spills) in the program log.
pub fn compile_options(arch: GpuArch) -> Vec<String> {
    vec![
        format!("--gpu-architecture={}", arch.nvrtc_name()),
        "--std=c++17".to_string(),
        "-lineinfo".to_string(),
        "--ptxas-options=-v".to_string(),
    ]
}

/// The generated `wgmma_m64k32`: one `wgmma.mma_async m64nNk32 .f32.e4m3.e4m3` with both
/// operands in shared memory, N = `block_n` (N/2 f32 accumulators per thread), scale-d from a
/// register (0: D = A·B, 1: D += A·B).
pub fn wgmma_wrapper(block_n: u32) -> String {
    let n = block_n / 2;
    let regs: Vec<String> = (0..n).map(|i| format!("%{i}")).collect();
    let outs: Vec<String> = (0..n).map(|i| format!("\"+f\"(d[{i}])")).collect();
    format!(
        "// Generated for BN = {block_n}.\n\
         __device__ __forceinline__ void wgmma_m64k32(float (&d)[{n}], u64 da, u64 db, int scale_d) {{\n\
         \x20   asm volatile(\n\
         \x20       \"{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{p}, 0;\\n\"\n\
         \x20       \"wgmma.mma_async.sync.aligned.m64n{block_n}k32.f32.e4m3.e4m3 {{{regs}}}, %{da}, %{db}, p, 1, 1;\\n}}\\n\"\n\
         \x20       : {outs}\n\
         \x20       : \"l\"(da), \"l\"(db), \"r\"(scale_d));\n\
         }}\n",
        p = n + 2,
        da = n,
        db = n + 1,
        regs = regs.join(", "),
        outs = outs.join(", "),
    )
}

/// sha256 (hex) of every kernel source and of the assembly rules: changes whenever any kernel
/// may change, so tuning results can be tied to the code that produced them.
pub fn source_hash() -> String {
    let mut h = Sha256::new();
    for part in [ASSEMBLY_VERSION, COMMON, GEMM_WGMMA, GEMM_MMA, ACT_QUANT] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    hex(&h.finalize())
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wgmma_wrapper_has_one_operand_per_accumulator() {
        let w = wgmma_wrapper(24);
        assert!(
            w.contains("m64n24k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11}, %12, %13, p, 1, 1")
        );
        assert!(w.contains("setp.ne.b32 p, %14, 0"));
        assert!(w.contains("\"+f\"(d[11])") && !w.contains("d[12]"));
    }

    #[test]
    fn sources_carry_their_configuration() {
        let cfg = GemmConfig::wgmma(128, 96, 5, Multicast::A);
        let s = KernelSpec::Gemm { config: cfg, grouped: true }.source();
        for d in [
            "#define BM 128\n",
            "#define BN 96\n",
            "#define STAGES 5\n",
            "#define MC 1\n",
            "#define CLUSTER 2\n",
            "#define SW 128\n",
            "#define GROUPED 1\n",
            format!("#define HOST_SMEM {}\n", cfg.smem_bytes()).as_str(),
            "#define HOST_THREADS 384\n",
        ] {
            assert!(s.contains(d), "missing {d:?}");
        }
        assert!(s.contains("fp8_gemm_wgmma") && s.contains("m64n96k32"));
        let m = KernelSpec::Gemm { config: GemmConfig::mma(64, 128, 2, 2, 3), grouped: false }.source();
        assert!(
            m.contains("#define WM 2\n#define WN 2\n")
                && m.contains("fp8_gemm_mma")
                && m.contains("#define GROUPED 0\n")
        );
        let q = KernelSpec::ActQuant { format: ScaleFormat::Ue8m0 }.source();
        assert!(q.contains("#define UE8M0 1\n") && q.contains("fp8_act_quant"));
        assert_eq!(source_hash().len(), 64);
    }
}
