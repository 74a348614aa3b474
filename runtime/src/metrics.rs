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
///
/// Per scored token, P is the baseline's next-token distribution and Q the model's; `p` and `q`
/// are the probabilities they give the correct token. Beside our own figures (routing agreement,
/// hidden-state and tensor errors) are those llama.cpp's `perplexity --kl-divergence` prints, with
/// its definitions; the doc of each field names the line it corresponds to.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Comparison {
    /// The baseline model (directory or file, as given).
    pub baseline_model: String,
    /// Perplexity of the baseline on the same tokens (llama.cpp: "Mean PPL(base)").
    pub baseline_perplexity: f64,
    /// Its standard error, from the baseline's per-token NLL alone.
    pub baseline_perplexity_stderr: f64,
    /// Mean NLL of the baseline.
    pub baseline_nll_mean: f64,
    /// `ln(PPL(model) / PPL(baseline))`: the mean over tokens of `nll_q − nll_p`, which equals
    /// `nll_mean − baseline_nll_mean` (llama.cpp: "Mean ln(PPL(Q)/PPL(base))").
    #[serde(default)]
    pub ln_ppl_ratio: f64,
    /// Standard error of `ln_ppl_ratio` from the per-token differences `nll_q − nll_p`. The two
    /// models err on the same tokens, so this is far smaller than the two perplexities' separate
    /// standard errors suggest; it is what says whether a perplexity change is real.
    #[serde(default)]
    pub ln_ppl_ratio_stderr: f64,
    /// Mean over scored tokens of KL(P_baseline || P_model) in nats (llama.cpp: "Mean KLD").
    pub kld_mean: f64,
    /// Standard error of `kld_mean`.
    #[serde(default)]
    pub kld_mean_stderr: f64,
    /// 99th percentile of the per-token KL divergence: the `p99` of `kld_percentiles`, kept here
    /// for the tools that read it.
    pub kld_p99: f64,
    /// Largest per-token KL divergence (llama.cpp: "Maximum KLD").
    pub kld_max: f64,
    /// Percentiles of the per-token KL divergence (llama.cpp: "99.9% KLD" ... "1.0% KLD", with
    /// "Median KLD" as `p50`).
    #[serde(default)]
    pub kld_percentiles: KldPercentiles,
    /// Distribution of the per-token KL divergence.
    pub kld_histogram: Histogram,
    /// Mean over scored tokens of Δp = q − p, the change of the correct token's probability, as a
    /// fraction (llama.cpp: "Mean Δp", printed in percent).
    #[serde(default)]
    pub delta_p_mean: f64,
    /// Standard error of `delta_p_mean`.
    #[serde(default)]
    pub delta_p_mean_stderr: f64,
    /// Root mean square of Δp, as a fraction (llama.cpp: "RMS Δp", printed in percent).
    #[serde(default)]
    pub delta_p_rms: f64,
    /// Standard error of `delta_p_rms` (delta method: the standard error of the mean of Δp²
    /// divided by `2 · delta_p_rms`; 0 when `delta_p_rms` is 0).
    #[serde(default)]
    pub delta_p_rms_stderr: f64,
    /// Share of scored positions where both models' most likely next token is the same: what
    /// llama.cpp calls "Same top p" (ties go to the lower token id in both models).
    pub top1_agreement: f64,
    /// Standard error of `top1_agreement`, `√(s(1 − s)/(n − 1))` as llama.cpp gives it.
    #[serde(default)]
    pub top1_agreement_stderr: f64,
    /// Share of scored positions where the baseline's most likely next token is among the
    /// model's five most likely (all of them when the vocabulary is smaller).
    #[serde(default)]
    pub top5_agreement: f64,
    /// Mean over scored positions of `|top5(P) ∩ top5(Q)| / 5`: how many of the baseline's five
    /// most likely next tokens are among the model's five, as a fraction.
    #[serde(default)]
    pub top5_overlap: f64,
    /// Share of (token, MoE layer) pairs whose selected expert set is the same in both models
    /// (the mean of the per-layer figures, weighted equally).
    pub routing_agreement: f64,
    /// Per-tensor weight error of the model against the baseline (the same figures as `verify
    /// --reference`), for the weights that differ.
    pub tensor_errors: Vec<TensorError>,
}

/// Percentiles of the per-token KL divergence in nats, those llama.cpp's `perplexity
/// --kl-divergence` prints, computed as it does: linear interpolation between the sorted values
/// at rank `fraction × (n − 1)` (so `p50` is the median).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KldPercentiles {
    /// 99.9th percentile.
    #[serde(rename = "p99.9")]
    pub p99_9: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 90th percentile.
    pub p90: f64,
    /// Median.
    pub p50: f64,
    /// 10th percentile.
    pub p10: f64,
    /// 5th percentile.
    pub p5: f64,
    /// 1st percentile.
    pub p1: f64,
}

impl KldPercentiles {
    /// Each percentile with its level in percent, as llama.cpp labels it ("99.9%", ..., "1%"),
    /// highest first.
    pub fn levels(&self) -> [(&'static str, f64); 8] {
        [
            ("99.9%", self.p99_9),
            ("99%", self.p99),
            ("95%", self.p95),
            ("90%", self.p90),
            ("50%", self.p50),
            ("10%", self.p10),
            ("5%", self.p5),
            ("1%", self.p1),
        ]
    }
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
