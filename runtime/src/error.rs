//! The runtime's error type.

use std::path::PathBuf;

use fp8forge_formats::FormatError;
use fp8forge_quant::block::QuantError;

/// Everything that can go wrong while loading or evaluating a model. Each variant names the file
/// (and the tensor where there is one) and reads as a sentence.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// config.json is missing, malformed, or misses a field.
    #[error("{file}: {reason}")]
    Config {
        /// The config file.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The model uses an architecture or setting the runtime does not implement.
    #[error("{file}: {what} is not supported by the fp8forge runtime")]
    Unsupported {
        /// The config file.
        file: PathBuf,
        /// The setting, with its value.
        what: String,
    },
    /// A tensor is missing or has the wrong shape or dtype.
    #[error("{file}: tensor {tensor}: {reason}")]
    Tensor {
        /// The checkpoint file (or directory when the tensor is missing).
        file: PathBuf,
        /// Tensor name.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// The token or text input cannot be used.
    #[error("{file}: {reason}")]
    Input {
        /// The input file.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Two models that are compared do not match.
    #[error("{file}: {reason}")]
    Mismatch {
        /// The baseline's config file.
        file: PathBuf,
        /// What differs.
        reason: String,
    },
    /// Reading the checkpoint failed.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The demo's conversion failed.
    #[error(transparent)]
    Convert(#[from] fp8forge_quant::convert::ConvertError),
    /// Activation quantization failed (a non-finite activation).
    #[error("activation quantization at layer {layer}: {source}")]
    ActQuant {
        /// Decoder layer.
        layer: usize,
        /// The quantizer's error.
        source: QuantError,
    },
    /// A non-finite value appeared in the model's output.
    #[error("{model}: non-finite logits in window {window}")]
    NonFinite {
        /// The model.
        model: PathBuf,
        /// Window index.
        window: usize,
    },
    /// An I/O error while writing results.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl RuntimeError {
    /// True when the error is the input's fault (exit code 2), not a failure of the run.
    pub fn is_bad_input(&self) -> bool {
        match self {
            RuntimeError::Config { .. }
            | RuntimeError::Unsupported { .. }
            | RuntimeError::Tensor { .. }
            | RuntimeError::Input { .. }
            | RuntimeError::Mismatch { .. } => true,
            RuntimeError::Format(e) => e.is_bad_input(),
            RuntimeError::Convert(e) => e.is_bad_input(),
            RuntimeError::ActQuant { .. } | RuntimeError::NonFinite { .. } | RuntimeError::Io { .. } => false,
        }
    }
}

/// The runtime's result type.
pub type Result<T> = std::result::Result<T, RuntimeError>;
