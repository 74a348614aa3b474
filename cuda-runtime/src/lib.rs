//! fp8forge-cuda-runtime: the CUDA backend of the fp8forge runtime, built so far only as far as a
//! machine without a GPU can check it (issue 17):
//!
//! - [`source`]: the small operations (RMSNorm, RoPE, SwiGLU, the two routers, causal attention
//!   and its softmax, log-softmax with NLL, KLD, top-1) as CUDA C programs compiled with NVRTC
//!   for sm_90a (through the kernels crate's compiler and disk cache);
//! - [`ops`]: their launch wrappers, which check every shape and buffer before a launch;
//! - [`reference`](mod@reference): the CPU definitions the kernels follow where the CPU runtime
//!   keeps its own private (routing, KLD, top-1) and the shared RoPE table;
//! - [`stream`]: the layer-streaming scheduler (two layer buffers, the next layer's upload
//!   overlapping this layer's compute, activations resident or paged within a memory budget),
//!   generic over [`stream::LayerDevice`] and tested on the CPU with a simulated device.
//!
//! Like the kernels crate it loads CUDA dynamically (cudarc): it builds, and its CPU tests run,
//! where no CUDA is installed.

#![deny(missing_docs)]

mod error;
pub mod ops;
pub mod reference;
pub mod source;
pub mod stream;

pub use error::CudaRuntimeError;

/// The crate's result type.
pub type Result<T, E = CudaRuntimeError> = std::result::Result<T, E>;
