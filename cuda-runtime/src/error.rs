//! The crate's one error type.

use fp8forge_kernels::KernelError;

/// What went wrong in the CUDA runtime: a refused shape or buffer, an input the kernels cannot
/// take, a memory budget too small for the streaming plan, or an error of the kernels crate (no
/// GPU, no NVRTC, a compile failure, a failed CUDA call).
#[derive(Debug, thiserror::Error)]
pub enum CudaRuntimeError {
    /// The kernels crate failed: compile, load, copy, launch or synchronization.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// An operation's sizes are invalid (zero, inconsistent, or beyond what its kernel takes).
    #[error("{op}: invalid shape: {detail}")]
    Shape {
        /// The operation.
        op: &'static str,
        /// What is wrong, with the values.
        detail: String,
    },
    /// A device buffer given to an operation has the wrong length.
    #[error("{op}: buffer {what} has {got} elements, expected {expected}")]
    BufferLength {
        /// The operation.
        op: &'static str,
        /// Which buffer.
        what: &'static str,
        /// Elements expected.
        expected: usize,
        /// Elements given.
        got: usize,
    },
    /// A target token id is outside the vocabulary (and not -1, "no target").
    #[error("target of row {row} is {value}, not -1 nor a token of 0..{vocab}")]
    Target {
        /// The row.
        row: usize,
        /// The value found.
        value: i32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// The memory budget cannot hold what streaming needs at the least.
    #[error(
        "GPU memory budget of {budget} bytes is too small: {detail} needs {needed} bytes at the least \
         (two layer buffers of {layer_buffer} bytes, {workspace} bytes of workspace, and {min_activations} \
         bytes of activations)"
    )]
    Budget {
        /// The budget, bytes.
        budget: u64,
        /// The least that would do, bytes.
        needed: u64,
        /// One layer buffer (the largest layer), bytes.
        layer_buffer: u64,
        /// The workspace, bytes.
        workspace: u64,
        /// The least activation memory (two chunks paged through), bytes.
        min_activations: u64,
        /// What the plan was for.
        detail: String,
    },
    /// A streaming plan was asked for with nothing to stream or inconsistent sizes.
    #[error("streaming plan: {detail}")]
    Plan {
        /// What is wrong, with the values.
        detail: String,
    },
}
