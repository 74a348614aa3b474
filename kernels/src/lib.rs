//! fp8forge-kernels: FP8 block-scaled GEMM kernels for Hopper, compiled at run time with NVRTC
//! (loaded dynamically through cudarc, so the crate builds and its CPU tests run where no CUDA is
//! installed), launch wrappers that check every CUDA call, and CPU references of every kernel's
//! exact contract.
//!
//! - [`config`]: the knobs of a kernel ([`GemmConfig`]), the one legality check ([`is_legal`]) and
//!   the search space the autotuner enumerates ([`search_space`]).
//! - [`reference`](mod@reference): the contracts, on the CPU.
//! - [`source`], [`nvrtc`], [`cache`]: program text, compilation to CUBIN, the disk cache.
//! - [`cuda`], [`gemm`], [`cublaslt`]: the device, the launch wrappers, the cuBLASLt baselines.
//! - [`filter`]: exact selection of variants by family or id (`FP8FORGE_GPU_FILTER`).
//! - [`problem`]: random quantized problems for tests and benchmarks; [`bench`](mod@bench): the `bench gemm` method.

#![deny(missing_docs)]

pub mod bench;
pub mod cache;
pub mod config;
pub mod cublaslt;
pub mod cuda;
mod error;
pub mod filter;
pub mod gemm;
pub mod nvrtc;
pub mod problem;
pub mod reference;
pub mod source;

pub use config::{GemmConfig, GemmShape, GpuArch, KernelKind, Multicast, Swizzle, Why, is_legal, search_space};
pub use error::KernelError;
pub use source::{KernelSpec, source_hash};
