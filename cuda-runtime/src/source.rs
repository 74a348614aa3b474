//! The small operations' CUDA programs (embedded from `cuda-runtime/cuda/`): one NVRTC program per
//! operation, put together as `#define BLOCK`, the kernels crate's `common.cuh`, this crate's
//! `ops_common.cuh`, then the kernel file. Compiled with the kernels crate's options and disk
//! cache ([`fp8forge_kernels::cache::compile_program_cached`]), so a `gpu-check.sh prepare`-style
//! cache covers them too.

use fp8forge_kernels::GpuArch;
use fp8forge_kernels::cache::compile_program_cached;
use fp8forge_kernels::nvrtc::Compiled;

use crate::Result;

/// `cuda-runtime/cuda/ops_common.cuh`.
pub const OPS_COMMON: &str = include_str!("../cuda/ops_common.cuh");

/// One small operation: one program, one entry point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// RMSNorm of rows.
    RmsNorm,
    /// Rotary embedding from a cos/sin table (default RoPE and YaRN), interleaved or not.
    Rope,
    /// `silu(gate) · up`.
    SwiGlu,
    /// Softmax top-k routing, optionally renormalized.
    RouterSoftmax,
    /// Sigmoid, group-limited top-k routing with a correction bias (DeepSeek-V3).
    RouterSigmoid,
    /// Causal attention of all heads, one simple kernel.
    CausalAttention,
    /// The causal softmax of score matrices from batched products.
    CausalSoftmax,
    /// Log-sum-exp and NLL of the target, per row of logits.
    LogSoftmaxNll,
    /// KL divergence between two rows of logits.
    Kld,
    /// Index of the largest logit per row.
    Top1,
}

impl Op {
    /// Every operation.
    pub const ALL: [Op; 10] = [
        Op::RmsNorm,
        Op::Rope,
        Op::SwiGlu,
        Op::RouterSoftmax,
        Op::RouterSigmoid,
        Op::CausalAttention,
        Op::CausalSoftmax,
        Op::LogSoftmaxNll,
        Op::Kld,
        Op::Top1,
    ];

    /// The kernel's entry point (also its name in errors).
    pub fn entry(self) -> &'static str {
        match self {
            Op::RmsNorm => "rms_norm",
            Op::Rope => "rope",
            Op::SwiGlu => "swiglu",
            Op::RouterSoftmax => "router_softmax",
            Op::RouterSigmoid => "router_sigmoid",
            Op::CausalAttention => "causal_attention",
            Op::CausalSoftmax => "causal_softmax",
            Op::LogSoftmaxNll => "log_softmax_nll",
            Op::Kld => "kld",
            Op::Top1 => "top1",
        }
    }

    /// The kernel file.
    pub fn kernel_source(self) -> &'static str {
        match self {
            Op::RmsNorm => include_str!("../cuda/rms_norm.cu"),
            Op::Rope => include_str!("../cuda/rope.cu"),
            Op::SwiGlu => include_str!("../cuda/swiglu.cu"),
            Op::RouterSoftmax => include_str!("../cuda/router_softmax.cu"),
            Op::RouterSigmoid => include_str!("../cuda/router_sigmoid.cu"),
            Op::CausalAttention => include_str!("../cuda/causal_attention.cu"),
            Op::CausalSoftmax => include_str!("../cuda/causal_softmax.cu"),
            Op::LogSoftmaxNll => include_str!("../cuda/log_softmax_nll.cu"),
            Op::Kld => include_str!("../cuda/kld.cu"),
            Op::Top1 => include_str!("../cuda/top1.cu"),
        }
    }

    /// Threads per block (the program's `BLOCK`): a warp per token for the routers, 4 tokens a
    /// block; 64 for RoPE (a head's pairs); 256 for the row kernels.
    pub fn block(self) -> u32 {
        match self {
            Op::RouterSoftmax | Op::RouterSigmoid => 128,
            Op::Rope => 64,
            _ => 256,
        }
    }

    /// A readable name of the program, e.g. `op rms_norm (block 256)`.
    pub fn label(self) -> String {
        program_label(self, self.block())
    }

    /// The program text NVRTC compiles.
    pub fn source(self) -> String {
        program_source(self, self.block())
    }

    /// Compiles the program for `arch`, or reads it from the kernels' disk cache.
    ///
    /// # Errors
    ///
    /// [`fp8forge_kernels::KernelError`]: no NVRTC, a compile error (a refused `BLOCK` included),
    /// a spill.
    pub fn compile(self, arch: GpuArch) -> Result<Compiled> {
        Ok(compile_program_cached(&self.label(), &self.source(), arch)?)
    }
}

/// The label of `op`'s program built with `block` threads per block.
pub fn program_label(op: Op, block: u32) -> String {
    format!("op {} (block {block})", op.entry())
}

/// The program text of `op` with `block` threads per block (any value: the program's
/// `static_assert` refuses one that is not a multiple of 32 in 32..1024).
pub fn program_source(op: Op, block: u32) -> String {
    format!(
        "// {}\n#define BLOCK {block}\n{}{}{}",
        program_label(op, block),
        fp8forge_kernels::source::COMMON,
        OPS_COMMON,
        op.kernel_source()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_program_names_its_entry_and_block_once() {
        for op in Op::ALL {
            let s = op.source();
            assert!(s.contains(&format!("#define BLOCK {}\n", op.block())), "{}", op.label());
            assert_eq!(s.matches(&format!(" {}(", op.entry())).count(), 1, "{}: entry point", op.label());
            assert!(s.contains("typedef unsigned short u16;"), "{}: kernels' common.cuh missing", op.label());
            assert!(op.block().is_multiple_of(32) && (32..=1024).contains(&op.block()), "{}", op.label());
        }
        let labels: std::collections::HashSet<String> = Op::ALL.iter().map(|o| o.label()).collect();
        assert_eq!(labels.len(), Op::ALL.len());
    }
}
