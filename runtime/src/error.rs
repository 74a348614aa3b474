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
    /// A config.json field names an architecture or setting the runtime does not implement.
    #[error("{file}: {field} {value} is not supported by the fp8forge runtime (supported: {supported})")]
    Unsupported {
        /// The config file.
        file: PathBuf,
        /// The field (`rope_scaling.rope_type` for a nested one).
        field: String,
        /// Its value, as JSON (`"gelu"`, `true`, `0.5`).
        value: String,
        /// What the runtime supports instead.
        supported: String,
    },
    /// A config.json field holds a value that cannot describe a model (alone or with another field).
    #[error("{file}: {field} {value} {rule}")]
    Invalid {
        /// The config file.
        file: PathBuf,
        /// The field.
        field: String,
        /// Its value, as JSON (`missing` when absent).
        value: String,
        /// The rule it breaks (`must divide num_attention_heads (32)`).
        rule: String,
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
    /// The window length cannot be used with this model.
    #[error("{file}: windows of {ctx} tokens: {why}")]
    Window {
        /// The model's config.json.
        file: PathBuf,
        /// The window length asked for.
        ctx: usize,
        /// Why it cannot be used.
        why: WindowProblem,
    },
    /// FP8 activations were asked of a model with no FP8 layer to apply them to.
    #[error(
        "{file}: quantizing activations to FP8 applies to the inputs of FP8 layers, and this model has none (no quantization_config)"
    )]
    NoFp8Layers {
        /// The model's config.json.
        file: PathBuf,
    },
    /// The checkpoint declares static activation scales, which the runtime does not simulate.
    #[error(
        "{file}: static activation scales (activation_scheme static) are not simulated; evaluate without activation quantization"
    )]
    StaticActivations {
        /// The model's config.json.
        file: PathBuf,
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
            | RuntimeError::Invalid { .. }
            | RuntimeError::Tensor { .. }
            | RuntimeError::Input { .. }
            | RuntimeError::Mismatch { .. }
            | RuntimeError::Window { .. }
            | RuntimeError::NoFp8Layers { .. }
            | RuntimeError::StaticActivations { .. } => true,
            RuntimeError::Format(e) => e.is_bad_input(),
            RuntimeError::Convert(e) => e.is_bad_input(),
            RuntimeError::ActQuant { .. } | RuntimeError::NonFinite { .. } | RuntimeError::Io { .. } => false,
        }
    }
}

/// Why a window length cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WindowProblem {
    /// Fewer than 2 tokens: nothing to predict from and score.
    #[error("a window needs at least 2 tokens (one to predict from, one to score)")]
    TooShort,
    /// Longer than the model's positions.
    #[error("more than the model's max_position_embeddings ({max})")]
    BeyondPositions {
        /// `max_position_embeddings`.
        max: usize,
    },
    /// The attention scores alone would not fit in memory.
    #[error("the attention scores need about {need_gb:.1} GB, more than the {have_gb:.1} GB available")]
    TooMuchMemory {
        /// Needed, in GB.
        need_gb: f64,
        /// Available, in GB.
        have_gb: f64,
    },
}

/// The runtime's result type.
pub type Result<T> = std::result::Result<T, RuntimeError>;
