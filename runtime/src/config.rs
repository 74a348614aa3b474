//! Model configurations read from a Hugging Face `config.json`, validated whole at load: a field
//! the runtime does not implement is an error here, never a silent approximation in `forward`.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Result, RuntimeError};

/// The architectures the runtime implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// DeepSeek-V3 / R1 (and Kimi-K2, which uses the same architecture).
    DeepseekV3,
    /// Mixtral.
    Mixtral,
    /// Qwen3-MoE.
    Qwen3Moe,
}

/// Rotary position embedding.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    /// Number of rotated dimensions per head.
    pub dim: usize,
    /// Per-pair inverse frequencies (`dim / 2` of them), YaRN-corrected where configured.
    pub inv_freq: Vec<f32>,
    /// Factor applied to cos and sin (YaRN's attention factor; 1 otherwise).
    pub attention_factor: f32,
    /// DeepSeek's interleaved layout: pairs `(x0, x1), (x2, x3), ...` instead of halves.
    pub interleave: bool,
}

/// Attention of one architecture family.
#[derive(Clone, Debug, PartialEq)]
pub enum AttnConfig {
    /// Multi-head latent attention (DeepSeek-V2/V3).
    Mla {
        /// Query heads.
        heads: usize,
        /// Rank of the query compression (`None`: a plain `q_proj`).
        q_lora_rank: Option<usize>,
        /// Rank of the key/value compression.
        kv_lora_rank: usize,
        /// Per-head query/key dims without position encoding.
        qk_nope_head_dim: usize,
        /// Per-head query/key dims with RoPE (the key part is shared by all heads).
        qk_rope_head_dim: usize,
        /// Per-head value dims.
        v_head_dim: usize,
    },
    /// Grouped-query attention (Mixtral, Qwen3-MoE).
    Gqa {
        /// Query heads.
        heads: usize,
        /// Key/value heads (dividing `heads`).
        kv_heads: usize,
        /// Dims per head.
        head_dim: usize,
        /// Per-head RMSNorm of queries and keys before RoPE (Qwen3).
        qk_norm: bool,
        /// Keys further back than this many positions are masked (`None`: full causal attention).
        sliding_window: Option<usize>,
    },
}

/// How a MoE router scores experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scoring {
    /// Softmax over all experts, then top-k (Mixtral, Qwen3-MoE).
    Softmax,
    /// Sigmoid per expert; selection by score plus `e_score_correction_bias`, group-limited (DeepSeek-V3).
    Sigmoid,
}

/// A MoE feed-forward block.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    /// Routed experts.
    pub experts: usize,
    /// Experts selected per token.
    pub top_k: usize,
    /// Intermediate size of each routed expert.
    pub intermediate: usize,
    /// Intermediate size of the shared expert MLP (`None`: no shared expert).
    pub shared_intermediate: Option<usize>,
    /// Router scoring.
    pub scoring: Scoring,
    /// Renormalize the selected experts' weights to sum to 1.
    pub norm_topk_prob: bool,
    /// Multiplier of the routed experts' weights (DeepSeek).
    pub routed_scaling_factor: f32,
    /// Expert groups (group-limited routing; 1 means none).
    pub n_group: usize,
    /// Groups kept per token.
    pub topk_group: usize,
}

/// The feed-forward block of one decoder layer.
#[derive(Clone, Debug, PartialEq)]
pub enum MlpConfig {
    /// A dense SwiGLU MLP with this intermediate size.
    Dense(usize),
    /// A mixture of experts.
    Moe(MoeConfig),
}

/// A validated model configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// The config file it was read from.
    pub file: PathBuf,
    /// `model_type` as written.
    pub model_type: String,
    /// Architecture.
    pub arch: Arch,
    /// Model width.
    pub hidden: usize,
    /// Vocabulary size (rows of the embedding and the output head).
    pub vocab: usize,
    /// Epsilon of every RMSNorm.
    pub rms_eps: f32,
    /// The output head is the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Longest position the model was configured for.
    pub max_position_embeddings: usize,
    /// Attention.
    pub attn: AttnConfig,
    /// Rotary embedding.
    pub rope: RopeConfig,
    /// Multiplier of `q · k` before the softmax.
    pub softmax_scale: f32,
    /// Feed-forward block of each decoder layer.
    pub layers: Vec<MlpConfig>,
    /// Prefix of the decoder layers' tensor names (`model.layers.`).
    pub layer_prefix: String,
}

impl ModelConfig {
    /// Reads and validates `config.json` of a model directory.
    pub fn load(file: &Path) -> Result<Self> {
        // A regular file only: a FIFO would block the read (see fp8forge_formats::input).
        let text = fp8forge_formats::input::read_regular_to_string(file)?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| RuntimeError::Config { file: file.to_owned(), reason: format!("malformed JSON: {e}") })?;
        Self::from_json(file, &v)
    }

    /// Validates a parsed config (`file` names it in errors).
    pub fn from_json(file: &Path, v: &Value) -> Result<Self> {
        let c = Fields { file, v };
        let model_type = c.str("model_type")?;
        let arch = match model_type.as_str() {
            "deepseek_v3" | "kimi_k2" => Arch::DeepseekV3,
            "mixtral" => Arch::Mixtral,
            "qwen3_moe" => Arch::Qwen3Moe,
            other => {
                return Err(c.unsupported(format!(
                    "model_type {other:?} (supported: deepseek_v3, kimi_k2, mixtral, qwen3_moe)"
                )));
            }
        };
        let act = c.opt_str("hidden_act")?.unwrap_or_else(|| "silu".into());
        if act != "silu" {
            return Err(c.unsupported(format!("hidden_act {act:?} (only silu)")));
        }
        if c.opt_bool("attention_bias")?.unwrap_or(false) {
            return Err(c.unsupported("attention_bias true".into()));
        }
        if c.opt_bool("mlp_bias")?.unwrap_or(false) {
            return Err(c.unsupported("mlp_bias true".into()));
        }
        let hidden = c.usize("hidden_size")?;
        let vocab = c.usize("vocab_size")?;
        let n_layers = c.usize("num_hidden_layers")?;
        let heads = c.usize("num_attention_heads")?;
        let rms_eps = c.opt_f64("rms_norm_eps")?.unwrap_or(1e-6) as f32;
        let tie_word_embeddings = c.opt_bool("tie_word_embeddings")?.unwrap_or(false);
        let max_position_embeddings = c.opt_usize("max_position_embeddings")?.unwrap_or(4096);
        if hidden == 0 || vocab == 0 || n_layers == 0 || heads == 0 {
            return Err(c.bad("hidden_size, vocab_size, num_hidden_layers and num_attention_heads must be positive"));
        }
        let rope_params = RopeParams::read(&c)?;

        let (attn, rope_dim, head_dim_for_scale, interleave) = match arch {
            Arch::DeepseekV3 => {
                let kv_heads = c.opt_usize("num_key_value_heads")?.unwrap_or(heads);
                if kv_heads != heads {
                    return Err(
                        c.unsupported(format!("num_key_value_heads {kv_heads} != num_attention_heads with MLA"))
                    );
                }
                let qk_nope_head_dim = c.usize("qk_nope_head_dim")?;
                let qk_rope_head_dim = c.usize("qk_rope_head_dim")?;
                let a = AttnConfig::Mla {
                    heads,
                    q_lora_rank: c.opt_usize("q_lora_rank")?,
                    kv_lora_rank: c.usize("kv_lora_rank")?,
                    qk_nope_head_dim,
                    qk_rope_head_dim,
                    v_head_dim: c.usize("v_head_dim")?,
                };
                let interleave = c.opt_bool("rope_interleave")?.unwrap_or(true);
                (a, qk_rope_head_dim, qk_nope_head_dim + qk_rope_head_dim, interleave)
            }
            Arch::Mixtral | Arch::Qwen3Moe => {
                let kv_heads = c.opt_usize("num_key_value_heads")?.unwrap_or(heads);
                if kv_heads == 0 || heads % kv_heads != 0 {
                    return Err(c.bad("num_key_value_heads must divide num_attention_heads"));
                }
                let head_dim = c.opt_usize("head_dim")?.unwrap_or(hidden / heads);
                let sliding_window = match arch {
                    Arch::Qwen3Moe if !c.opt_bool("use_sliding_window")?.unwrap_or(false) => None,
                    _ => c.opt_usize("sliding_window")?,
                };
                if let Some(p) = c.opt_f64("partial_rotary_factor")?
                    && p != 1.0
                {
                    return Err(c.unsupported(format!("partial_rotary_factor {p}")));
                }
                let a = AttnConfig::Gqa { heads, kv_heads, head_dim, qk_norm: arch == Arch::Qwen3Moe, sliding_window };
                (a, head_dim, head_dim, false)
            }
        };
        if rope_dim % 2 != 0 || rope_dim == 0 {
            return Err(c.bad(&format!("the rotary dimension {rope_dim} must be even and positive")));
        }
        let (inv_freq, attention_factor) = rope_params.inv_freq(rope_dim, max_position_embeddings);
        let mut softmax_scale = (head_dim_for_scale as f64).powf(-0.5);
        if arch == Arch::DeepseekV3
            && let Some(y) = &rope_params.yarn
            && y.mscale_all_dim != 0.0
        {
            let m = yarn_mscale(y.factor, y.mscale_all_dim);
            softmax_scale *= m * m;
        }
        let rope = RopeConfig { dim: rope_dim, inv_freq, attention_factor: attention_factor as f32, interleave };

        let layers = match arch {
            Arch::DeepseekV3 => deepseek_layers(&c, n_layers)?,
            Arch::Mixtral => {
                let moe = MoeConfig {
                    experts: c.usize_any(&["num_local_experts", "num_experts"])?,
                    top_k: c.usize("num_experts_per_tok")?,
                    intermediate: c.usize("intermediate_size")?,
                    shared_intermediate: None,
                    scoring: Scoring::Softmax,
                    norm_topk_prob: true,
                    routed_scaling_factor: 1.0,
                    n_group: 1,
                    topk_group: 1,
                };
                vec![MlpConfig::Moe(moe); n_layers]
            }
            Arch::Qwen3Moe => qwen3_layers(&c, n_layers)?,
        };
        for l in &layers {
            if let MlpConfig::Moe(m) = l
                && (m.experts == 0 || m.top_k == 0 || m.top_k > m.experts)
            {
                return Err(c.bad("num_experts_per_tok must be between 1 and the number of experts"));
            }
        }
        Ok(ModelConfig {
            file: file.to_owned(),
            model_type,
            arch,
            hidden,
            vocab,
            rms_eps,
            tie_word_embeddings,
            max_position_embeddings,
            attn,
            rope,
            softmax_scale: softmax_scale as f32,
            layers,
            layer_prefix: "model.layers.".into(),
        })
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }
}

/// DeepSeek-V3's feed-forward blocks: dense before `first_k_dense_replace`, MoE after.
fn deepseek_layers(c: &Fields, n_layers: usize) -> Result<Vec<MlpConfig>> {
    let scoring = c.opt_str("scoring_func")?.unwrap_or_else(|| "sigmoid".into());
    if scoring != "sigmoid" {
        return Err(c.unsupported(format!("scoring_func {scoring:?} (DeepSeek-V3 uses sigmoid)")));
    }
    let method = c.opt_str("topk_method")?.unwrap_or_else(|| "noaux_tc".into());
    if method != "noaux_tc" {
        return Err(c.unsupported(format!("topk_method {method:?} (only noaux_tc)")));
    }
    let freq = c.opt_usize("moe_layer_freq")?.unwrap_or(1);
    if freq != 1 {
        return Err(c.unsupported(format!("moe_layer_freq {freq}")));
    }
    let experts = c.usize_any(&["n_routed_experts", "num_local_experts"])?;
    let n_group = c.opt_usize("n_group")?.unwrap_or(1).max(1);
    let topk_group = c.opt_usize("topk_group")?.unwrap_or(n_group);
    if experts % n_group != 0 || topk_group == 0 || topk_group > n_group {
        return Err(c.bad("n_group must divide n_routed_experts and 1 <= topk_group <= n_group"));
    }
    if n_group > 1 && experts / n_group < 2 {
        return Err(c.bad("group-limited routing needs at least 2 experts per group"));
    }
    let moe_inter = c.usize("moe_intermediate_size")?;
    let shared = c.opt_usize("n_shared_experts")?.unwrap_or(0);
    let moe = MoeConfig {
        experts,
        top_k: c.usize("num_experts_per_tok")?,
        intermediate: moe_inter,
        shared_intermediate: (shared > 0).then_some(moe_inter * shared),
        scoring: Scoring::Sigmoid,
        norm_topk_prob: c.opt_bool("norm_topk_prob")?.unwrap_or(true),
        routed_scaling_factor: c.opt_f64("routed_scaling_factor")?.unwrap_or(1.0) as f32,
        n_group,
        topk_group,
    };
    if moe.top_k > topk_group * (experts / n_group) {
        return Err(c.bad("num_experts_per_tok exceeds the experts of the kept groups"));
    }
    let first_dense = c.opt_usize("first_k_dense_replace")?.unwrap_or(0);
    let dense = c.usize("intermediate_size")?;
    Ok((0..n_layers)
        .map(|i| if i < first_dense { MlpConfig::Dense(dense) } else { MlpConfig::Moe(moe.clone()) })
        .collect())
}

/// Qwen3-MoE's feed-forward blocks: MoE every `decoder_sparse_step` layers unless listed in `mlp_only_layers`.
fn qwen3_layers(c: &Fields, n_layers: usize) -> Result<Vec<MlpConfig>> {
    // Hub configs say num_experts; transformers 5 writes num_local_experts.
    let experts = c.usize_any(&["num_experts", "num_local_experts"])?;
    let step = c.opt_usize("decoder_sparse_step")?.unwrap_or(1).max(1);
    let only: Vec<usize> = match c.v.get("mlp_only_layers") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_u64().map(|x| x as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| c.bad("mlp_only_layers must be a list of layer indices"))?,
        Some(_) => return Err(c.bad("mlp_only_layers must be a list of layer indices")),
    };
    if c.opt_usize("shared_expert_intermediate_size")?.unwrap_or(0) > 0 {
        return Err(c.unsupported("shared_expert_intermediate_size (Qwen3-MoE has no shared expert)".into()));
    }
    let moe = MoeConfig {
        experts,
        top_k: c.usize("num_experts_per_tok")?,
        intermediate: c.usize("moe_intermediate_size")?,
        shared_intermediate: None,
        scoring: Scoring::Softmax,
        norm_topk_prob: c.opt_bool("norm_topk_prob")?.unwrap_or(false),
        routed_scaling_factor: 1.0,
        n_group: 1,
        topk_group: 1,
    };
    let dense = c.opt_usize("intermediate_size")?;
    (0..n_layers)
        .map(|i| {
            if !only.contains(&i) && experts > 0 && (i + 1) % step == 0 {
                Ok(MlpConfig::Moe(moe.clone()))
            } else {
                dense.map(MlpConfig::Dense).ok_or_else(|| c.bad("intermediate_size is needed by dense layers"))
            }
        })
        .collect()
}

/// YaRN parameters.
#[derive(Clone, Debug, PartialEq)]
struct Yarn {
    factor: f64,
    original_max_position_embeddings: usize,
    beta_fast: f64,
    beta_slow: f64,
    mscale: f64,
    mscale_all_dim: f64,
    attention_factor: Option<f64>,
    truncate: bool,
}

/// The RoPE settings: `rope_theta` and `rope_scaling` (hub configs) or `rope_parameters`
/// (transformers 5 configs).
struct RopeParams {
    theta: f64,
    yarn: Option<Yarn>,
}

impl RopeParams {
    fn read(c: &Fields) -> Result<Self> {
        let params = c.v.get("rope_parameters").filter(|p| p.is_object());
        let scaling = c.v.get("rope_scaling").filter(|p| p.is_object()).or(params);
        let theta = match c.opt_f64("rope_theta")? {
            Some(t) => t,
            None => params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64).unwrap_or(10000.0),
        };
        if theta <= 0.0 {
            return Err(c.bad("rope_theta must be positive"));
        }
        let Some(s) = scaling else { return Ok(RopeParams { theta, yarn: None }) };
        let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
        let num = |k: &str| s.get(k).and_then(Value::as_f64);
        match kind {
            "default" => Ok(RopeParams { theta, yarn: None }),
            "yarn" => {
                let orig = s
                    .get("original_max_position_embeddings")
                    .and_then(Value::as_u64)
                    .map(|x| x as usize)
                    .ok_or_else(|| c.bad("YaRN rope scaling needs original_max_position_embeddings"))?;
                let max_pos = c.opt_usize("max_position_embeddings")?.unwrap_or(orig);
                let factor = num("factor").unwrap_or(max_pos as f64 / orig as f64);
                let yarn = Yarn {
                    factor,
                    original_max_position_embeddings: orig,
                    beta_fast: num("beta_fast").filter(|&b| b != 0.0).unwrap_or(32.0),
                    beta_slow: num("beta_slow").filter(|&b| b != 0.0).unwrap_or(1.0),
                    mscale: num("mscale").unwrap_or(0.0),
                    mscale_all_dim: num("mscale_all_dim").unwrap_or(0.0),
                    attention_factor: num("attention_factor"),
                    truncate: s.get("truncate").and_then(Value::as_bool).unwrap_or(true),
                };
                Ok(RopeParams { theta, yarn: Some(yarn) })
            }
            other => Err(c.unsupported(format!("rope scaling type {other:?} (only default and yarn)"))),
        }
    }

    /// Inverse frequencies for `dim` rotated dims and the factor on cos/sin, as transformers
    /// computes them (`_compute_default_rope_parameters`, `_compute_yarn_parameters`).
    fn inv_freq(&self, dim: usize, _max_pos: usize) -> (Vec<f32>, f64) {
        let base = self.theta;
        let pos_freq = |i: usize| (base as f32).powf((2 * i) as f32 / dim as f32) as f64;
        let half = dim / 2;
        let Some(y) = &self.yarn else {
            return ((0..half).map(|i| (1.0 / pos_freq(i)) as f32).collect(), 1.0);
        };
        let attention_factor = y.attention_factor.unwrap_or_else(|| {
            if y.mscale != 0.0 && y.mscale_all_dim != 0.0 {
                yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)
            } else {
                yarn_mscale(y.factor, 1.0)
            }
        });
        let orig = y.original_max_position_embeddings as f64;
        let correction_dim =
            |rot: f64| (dim as f64 * (orig / (rot * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base.ln());
        let (mut low, mut high) = (correction_dim(y.beta_fast), correction_dim(y.beta_slow));
        if y.truncate {
            low = low.floor();
            high = high.ceil();
        }
        let low = low.max(0.0);
        let mut high = high.min(dim as f64 - 1.0);
        if low == high {
            high += 0.001;
        }
        let inv = (0..half)
            .map(|i| {
                let ramp = (((i as f32 - low as f32) / (high as f32 - low as f32)) as f64).clamp(0.0, 1.0);
                let extrapolation = 1.0 - ramp;
                let pf = pos_freq(i);
                let (inter, extra) = ((1.0 / (y.factor as f32 * pf as f32)) as f64, (1.0 / pf as f32) as f64);
                (inter * (1.0 - extrapolation) + extra * extrapolation) as f32
            })
            .collect();
        (inv, attention_factor)
    }
}

/// YaRN's magnitude correction `0.1 · m · ln(s) + 1` (1 for `s <= 1`).
fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 }
}

/// Typed access to config fields with errors naming the file and field.
struct Fields<'a> {
    file: &'a Path,
    v: &'a Value,
}

impl Fields<'_> {
    fn bad(&self, reason: &str) -> RuntimeError {
        RuntimeError::Config { file: self.file.to_owned(), reason: reason.to_owned() }
    }
    fn unsupported(&self, what: String) -> RuntimeError {
        RuntimeError::Unsupported { file: self.file.to_owned(), what }
    }
    fn get(&self, k: &str) -> Option<&Value> {
        self.v.get(k).filter(|x| !x.is_null())
    }
    fn str(&self, k: &str) -> Result<String> {
        self.opt_str(k)?.ok_or_else(|| self.bad(&format!("missing field {k}")))
    }
    fn opt_str(&self, k: &str) -> Result<Option<String>> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(x) => Err(self.bad(&format!("field {k} is {x}, not a string"))),
        }
    }
    fn usize(&self, k: &str) -> Result<usize> {
        self.opt_usize(k)?.ok_or_else(|| self.bad(&format!("missing field {k}")))
    }
    /// The first present of several names of one field.
    fn usize_any(&self, names: &[&str]) -> Result<usize> {
        for k in names {
            if let Some(v) = self.opt_usize(k)? {
                return Ok(v);
            }
        }
        Err(self.bad(&format!("missing field {}", names.join(" (or ") + &")".repeat(names.len() - 1))))
    }
    fn opt_usize(&self, k: &str) -> Result<Option<usize>> {
        match self.get(k) {
            None => Ok(None),
            Some(x) => x
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| self.bad(&format!("field {k} is {x}, not a non-negative integer"))),
        }
    }
    fn opt_f64(&self, k: &str) -> Result<Option<f64>> {
        match self.get(k) {
            None => Ok(None),
            Some(x) => x.as_f64().map(Some).ok_or_else(|| self.bad(&format!("field {k} is {x}, not a number"))),
        }
    }
    fn opt_bool(&self, k: &str) -> Result<Option<bool>> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(x) => Err(self.bad(&format!("field {k} is {x}, not true or false"))),
        }
    }
}
