//! What `eval` measures, as plain serializable data: the JSON printed by `eval --json` and the
//! input of the HTML report.

use serde::{Deserialize, Serialize};

/// The activation quantization an evaluation applied to the inputs of quantized linear layers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActivationQuant {
    /// None: activations stay f32 (weight-only numerics).
    #[default]
    #[serde(rename = "none")]
    None,
    /// Dynamic 1×128 FP8 groups with f32 scales.
    #[serde(rename = "fp8")]
    Fp8,
    /// Dynamic 1×128 FP8 groups with power-of-two scales.
    #[serde(rename = "fp8 (ue8m0 scales)")]
    Fp8Ue8m0,
}

impl std::fmt::Display for ActivationQuant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ActivationQuant::None => "none",
            ActivationQuant::Fp8 => "fp8",
            ActivationQuant::Fp8Ue8m0 => "fp8 (ue8m0 scales)",
        })
    }
}

/// The result of evaluating one model, optionally against a baseline.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EvalResult {
    /// The evaluated model (directory or file, as given).
    pub model: String,
    /// `model_type` of its config.json.
    pub model_type: String,
    /// How its weights are stored: `"bf16"`, `"fp8 (fp8, f32 scales)"`, ...
    pub weights: String,
    /// Activation quantization applied to the inputs of quantized linear layers.
    pub act_quant: ActivationQuant,
    /// Window length in tokens.
    pub ctx: usize,
    /// Number of windows evaluated.
    pub windows: usize,
    /// Tokens of the input stream.
    pub tokens: usize,
    /// Tokens scored (every token of a window but its first).
    pub tokens_scored: usize,
    /// Mean negative log-likelihood per scored token (nats).
    pub nll_mean: f64,
    /// Standard error of `nll_mean`.
    pub nll_stderr: f64,
    /// `exp(nll_mean)`.
    pub perplexity: f64,
    /// Standard error of the perplexity (delta method: `perplexity * nll_stderr`).
    pub perplexity_stderr: f64,
    /// True when layers were streamed (one layer's weights in memory at a time).
    pub streamed: bool,
    /// Wall time of the evaluation in seconds (loading included).
    pub seconds: f64,
    /// Input tokens processed per second, per model evaluated.
    pub tokens_per_second: f64,
    /// Per decoder layer: routing, expert load and (with a baseline) the error of the hidden states.
    pub layers: Vec<LayerStats>,
    /// The comparison with `--baseline`, flattened into the same JSON object.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Comparison>,
}

/// The comparison of a model with its baseline (usually FP8 against the BF16 original).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Comparison {
    /// The baseline model (directory or file, as given).
    pub baseline_model: String,
    /// Perplexity of the baseline on the same tokens.
    pub baseline_perplexity: f64,
    /// Its standard error.
    pub baseline_perplexity_stderr: f64,
    /// Mean NLL of the baseline.
    pub baseline_nll_mean: f64,
    /// Mean over scored tokens of KL(P_baseline || P_model) in nats.
    pub kld_mean: f64,
    /// 99th percentile of the per-token KL divergence.
    pub kld_p99: f64,
    /// Largest per-token KL divergence.
    pub kld_max: f64,
    /// Distribution of the per-token KL divergence.
    pub kld_histogram: Histogram,
    /// Share of scored positions where both models' most likely next token is the same.
    pub top1_agreement: f64,
    /// Share of (token, MoE layer) pairs whose selected expert set is the same in both models
    /// (the mean of the per-layer figures, weighted equally).
    pub routing_agreement: f64,
    /// Per-tensor weight error of the model against the baseline (the same figures as `verify
    /// --reference`), for the weights that differ.
    pub tensor_errors: Vec<TensorError>,
}

/// Per decoder layer figures.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LayerStats {
    /// Layer index.
    pub layer: usize,
    /// True for a MoE layer (routing figures present).
    pub moe: bool,
    /// Tokens routed to each expert (summed over the top-k choices); empty for a dense layer.
    pub expert_load: Vec<u64>,
    /// The same for the baseline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_expert_load: Option<Vec<u64>>,
    /// Share of tokens whose selected expert set equals the baseline's at this layer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routing_agreement: Option<f64>,
    /// `||h - h_baseline|| / ||h_baseline||` over all tokens, for the hidden states leaving this layer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hidden_rel_err: Option<f64>,
}

/// A histogram over log-spaced bins: `counts[i]` values fell in `[edges[i], edges[i + 1])`; values
/// below `edges[0]` count in the first bin, values at or above the last edge in the last.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Histogram {
    /// Bin edges, `counts.len() + 1` of them, increasing.
    pub edges: Vec<f64>,
    /// Values per bin.
    pub counts: Vec<u64>,
}

/// The error of one weight tensor against its baseline.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TensorError {
    /// Tensor name.
    pub name: String,
    /// Shape `[rows, cols]`.
    pub shape: Vec<usize>,
    /// `||w - w_ref|| / ||w_ref||`.
    pub rel_rms: f64,
    /// Largest absolute difference.
    pub max_abs: f64,
    /// Signal to noise ratio in dB (`None` when the tensors are equal).
    pub snr_db: Option<f64>,
}
