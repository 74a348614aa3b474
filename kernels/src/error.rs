//! The crate's one error type.

use crate::config::Why;

/// What went wrong in the kernels crate: a refused shape or configuration, a missing CUDA
/// library, a compile failure, or a failed CUDA call.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The configuration cannot run this shape (or cannot be built at all); the reason says why.
    #[error("configuration {config} cannot run shape {shape}: {why}")]
    Illegal {
        /// The configuration id.
        config: String,
        /// The shape, as `MxNxK` (with `/E` experts for a grouped shape).
        shape: String,
        /// Why.
        why: Why,
    },
    /// The shape itself is invalid for every kernel (zero sizes, K not a multiple of 128, ...).
    #[error("invalid shape {shape}: {why}")]
    Shape {
        /// The shape, as `MxNxK`.
        shape: String,
        /// Why.
        why: Why,
    },
    /// A host buffer given to a reference or a launch has the wrong length.
    #[error("buffer {what} has {got} elements, expected {expected}")]
    BufferLength {
        /// Which buffer.
        what: &'static str,
        /// Elements expected.
        expected: usize,
        /// Elements given.
        got: usize,
    },
    /// An input value is not usable (a non-finite activation, an expert index out of range, ...).
    #[error("invalid input {what}: {detail}")]
    Input {
        /// Which input.
        what: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// No CUDA driver library (libcuda) could be loaded: there is no usable GPU here.
    #[error("no CUDA device: the CUDA driver library could not be loaded (tried {detail})")]
    NoCudaDriver {
        /// The names tried.
        detail: String,
    },
    /// The driver loaded but reports no device.
    #[error("no CUDA device: {detail}")]
    NoDevice {
        /// What the driver said.
        detail: String,
    },
    /// The device is a GPU the kernels are not built for (neither sm_89 nor sm_90).
    #[error("{name} (compute capability {major}.{minor}) is not an sm_89/sm_90 GPU")]
    UnsupportedGpu {
        /// The device's name.
        name: String,
        /// Compute capability, major.
        major: i32,
        /// Compute capability, minor.
        minor: i32,
    },
    /// NVRTC (libnvrtc) could not be loaded, so no kernel can be compiled.
    #[error(
        "NVRTC not found (tried {tried}); kernels/ci/install_nvrtc.sh installs it and prints the LD_LIBRARY_PATH to export"
    )]
    NoNvrtc {
        /// The library names tried.
        tried: String,
    },
    /// cuBLASLt (libcublasLt) could not be loaded.
    #[error("cuBLASLt not found (tried {tried})")]
    NoCublasLt {
        /// The library names tried.
        tried: String,
    },
    /// NVRTC rejected a kernel; the log has the compiler's messages.
    #[error("NVRTC failed to compile {kernel} for {arch}: {log}")]
    Compile {
        /// The kernel variant (name and configuration).
        kernel: String,
        /// The target architecture.
        arch: String,
        /// The compiler log.
        log: String,
    },
    /// ptxas reported register spills or a stack frame for a kernel variant.
    #[error(
        "{kernel} spills registers for {arch}: {spill_stores} bytes spill stores, {spill_loads} bytes spill loads, {stack} bytes stack frame"
    )]
    Spill {
        /// The kernel variant.
        kernel: String,
        /// The target architecture.
        arch: String,
        /// Bytes of spill stores.
        spill_stores: u64,
        /// Bytes of spill loads.
        spill_loads: u64,
        /// Bytes of stack frame.
        stack: u64,
    },
    /// An NVRTC API call failed.
    #[error("NVRTC call {call} failed: {status}")]
    Nvrtc {
        /// The call.
        call: &'static str,
        /// The status it returned.
        status: String,
    },
    /// A CUDA driver API call (or a kernel launch) failed.
    #[error("CUDA call {call} failed: {status}")]
    Cuda {
        /// The call (or the kernel launched).
        call: String,
        /// The error name and description from the driver.
        status: String,
        /// The error left the CUDA context unusable (a kernel faulted: illegal address,
        /// misaligned access, ...): every later call in this process fails too.
        context_lost: bool,
    },
    /// The device did not finish its queued work in time (a kernel that never ends).
    #[error("the GPU did not finish within {seconds} s: a kernel hangs (deadlocked pipeline?)")]
    Timeout {
        /// How long was waited.
        seconds: f64,
    },
    /// A device address is not aligned as the kernel's accesses need.
    #[error("device address of {what} ({address:#x}) is not {align}-byte aligned")]
    Misaligned {
        /// Which operand.
        what: &'static str,
        /// Its address.
        address: u64,
        /// The alignment it needs, in bytes.
        align: u64,
    },
    /// A row-to-expert map names an expert that does not exist.
    #[error("m_indices[{row}] = {expert}: not -1 (padding) nor an expert of 0..{experts}")]
    ExpertOutOfRange {
        /// The row.
        row: usize,
        /// The value found.
        expert: i32,
        /// The number of experts.
        experts: usize,
    },
    /// A row-to-expert map breaks the M-grouped contiguous layout.
    #[error(
        "m_indices row {row}: each aligned 128-row block must hold one expert's rows followed only by padding (-1)"
    )]
    GroupLayout {
        /// The first row that breaks the layout.
        row: usize,
    },
    /// The `m_indices` given to a launch were checked for another problem.
    #[error("m_indices were checked for {rows} rows and {experts} experts, the launch has {m} rows and {e} experts")]
    GroupMismatch {
        /// Rows the map was checked for.
        rows: usize,
        /// Experts the map was checked for.
        experts: usize,
        /// Rows of the launch.
        m: usize,
        /// Experts of the launch.
        e: usize,
    },
    /// A cuBLASLt call failed.
    #[error("cuBLASLt call {call} failed: status {status}")]
    CublasLt {
        /// The call.
        call: &'static str,
        /// The status it returned.
        status: String,
    },
    /// Reading or writing the compile cache failed.
    #[error("compile cache {path}: {source}")]
    Cache {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl KernelError {
    /// True when the error is the caller's input (a shape, a configuration, a buffer), as opposed
    /// to the machine (no GPU, a failed CUDA call): the CLI exits 2 for these, 1 otherwise.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            KernelError::Illegal { .. }
                | KernelError::Shape { .. }
                | KernelError::BufferLength { .. }
                | KernelError::Input { .. }
                | KernelError::Misaligned { .. }
                | KernelError::ExpertOutOfRange { .. }
                | KernelError::GroupLayout { .. }
                | KernelError::GroupMismatch { .. }
        )
    }

    /// True when the device can no longer be used by this process: a kernel faulted (the
    /// context is lost) or hangs. A test or benchmark should record the failure and stop.
    pub fn is_device_lost(&self) -> bool {
        matches!(self, KernelError::Cuda { context_lost: true, .. } | KernelError::Timeout { .. })
    }

    /// True when there is no GPU (or driver) to run on, or none the kernels are built for, so a
    /// GPU test or benchmark can say why it was skipped.
    pub fn is_no_device(&self) -> bool {
        matches!(
            self,
            KernelError::NoCudaDriver { .. } | KernelError::NoDevice { .. } | KernelError::UnsupportedGpu { .. }
        )
    }
}
