//! The decoder layers of the supported architectures as plain structs: `load` from a config and
//! a weight source, `forward` over the tokens of one window.

use fp8forge_quant::block::{ScaleFormat, fake_quant_token_groups};
use rayon::prelude::*;

use crate::config::{AttnConfig, MlpConfig, ModelConfig, MoeConfig, Scoring};
use crate::error::{Result, RuntimeError};
use crate::ops::{RopeTable, causal_attention, rms_norm, rms_norm_inplace, swiglu};
use crate::weights::{Stored, Weights};

/// Epsilon of MLA's `q_a_layernorm` and `kv_a_layernorm`: DeepSeek's reference code and
/// transformers build them with the RMSNorm default, whatever `rms_norm_eps` says.
const MLA_NORM_EPS: f32 = 1e-6;

/// Weight elements widened to f32 at a time by a layer whose weight is not stored as f32: a tile
/// of 4 MB, so that the widened copy stays in cache-sized pieces and memory holds the weight as
/// stored.
const TILE_ELEMS: usize = 1 << 20;

/// A linear layer without bias, `y = x · Wᵀ`, with its weight kept as stored.
#[derive(Clone, Debug)]
pub struct Linear<'a> {
    /// Tensor name of the weight.
    pub name: String,
    /// `out × in` (rows: output features, columns: input features), as stored; `w.fp8`: its
    /// input is quantized under W8A8 simulation.
    pub w: Stored<'a>,
}

impl<'a> Linear<'a> {
    fn from_stored(name: String, w: Stored<'a>) -> Self {
        Linear { name, w }
    }

    /// Loads `{prefix}.weight` of shape `[out, in]`: read from the mapped file where it is used,
    /// or, when it fits one tile, widened to f32 once (a small matrix costs little memory, and
    /// widening it again in every product would cost time).
    pub fn load(w: &'a Weights, prefix: &str, out_features: usize, in_features: usize) -> Result<Self> {
        let name = format!("{prefix}.weight");
        let m = w.map_checked(&name, out_features, in_features)?;
        if out_features * in_features > TILE_ELEMS || m.as_f32().is_some() {
            return Ok(Self::from_stored(name, m));
        }
        let wide = Stored::from_f32(m.to_f32(), out_features, in_features, m.fp8);
        m.release();
        Ok(Self::from_stored(name, wide))
    }

    /// `x` is `t × in`; returns `t × out`. Under `act = Some(fmt)` an FP8 layer first rounds its
    /// input to FP8 per token in 1×128 groups, as block-scaled FP8 inference does.
    pub fn forward(&self, x: &[f32], t: usize, act: &Act) -> Result<Vec<f32>> {
        forward(&self.w, x, t, act)
    }
}

/// `x · wᵀ` for `x` of `t` rows, its input first rounded to FP8 per token in 1×128 groups when
/// `w` is FP8 and `act.fmt` says so.
fn forward(w: &Stored, x: &[f32], t: usize, act: &Act) -> Result<Vec<f32>> {
    let mut out = vec![0f32; t * w.rows];
    match act.fmt.filter(|_| w.fp8) {
        Some(fmt) => {
            let mut xq = x.to_vec();
            fake_quant_token_groups(&mut xq, t, w.cols, fmt)
                .map_err(|source| RuntimeError::ActQuant { layer: act.layer, source })?;
            product_t(&xq, t, w, &mut out, act.parallel);
        }
        None => product_t(x, t, w, &mut out, act.parallel),
    }
    w.release();
    Ok(out)
}

/// `out = x · wᵀ` for `x` of `t` rows, `w` read as stored ([`crate::product::linear_t`]: the same
/// values, f32 accumulation).
fn product_t(x: &[f32], t: usize, w: &Stored, out: &mut [f32], parallel: bool) {
    crate::product::linear_t(x, t, w, out, parallel);
}

/// How the inputs of FP8 layers are treated in one forward pass.
#[derive(Clone, Copy, Debug)]
pub struct Act {
    /// `Some`: quantize the inputs of FP8 layers with scales of this format.
    pub fmt: Option<ScaleFormat>,
    /// The layer being run (for errors).
    pub layer: usize,
    /// Let matrix products use all threads (off where the caller already runs in parallel).
    pub parallel: bool,
}

/// A SwiGLU MLP: `down(silu(gate(x)) · up(x))`.
#[derive(Clone, Debug)]
pub struct Ffn<'a> {
    gate: Linear<'a>,
    up: Linear<'a>,
    down: Linear<'a>,
}

impl<'a> Ffn<'a> {
    fn load(w: &'a Weights, prefix: &str, names: [&str; 3], hidden: usize, inter: usize) -> Result<Self> {
        Ok(Ffn {
            gate: Linear::load(w, &format!("{prefix}.{}", names[0]), inter, hidden)?,
            up: Linear::load(w, &format!("{prefix}.{}", names[1]), inter, hidden)?,
            down: Linear::load(w, &format!("{prefix}.{}", names[2]), hidden, inter)?,
        })
    }

    fn forward(&self, x: &[f32], t: usize, act: &Act) -> Result<Vec<f32>> {
        let mut g = self.gate.forward(x, t, act)?;
        let u = self.up.forward(x, t, act)?;
        swiglu(&mut g, &u);
        self.down.forward(&g, t, act)
    }

    fn linears(&self) -> [&Linear<'a>; 3] {
        [&self.gate, &self.up, &self.down]
    }
}

/// A mixture of experts with its router.
#[derive(Clone, Debug)]
pub struct Moe<'a> {
    cfg: MoeConfig,
    router: Linear<'a>,
    bias: Option<Vec<f32>>,
    experts: Vec<Ffn<'a>>,
    shared: Option<Box<Ffn<'a>>>,
}

impl<'a> Moe<'a> {
    fn load(w: &'a Weights, layer: &str, cfg: &MoeConfig, hidden: usize) -> Result<Self> {
        // Hub names: DeepSeek and Qwen3 `mlp.experts.E.gate_proj`, Mixtral `block_sparse_moe.experts.E.w1`.
        let (block, names) = if w.has(&format!("{layer}.block_sparse_moe.gate.weight")) {
            ("block_sparse_moe", ["w1", "w3", "w2"])
        } else {
            ("mlp", ["gate_proj", "up_proj", "down_proj"])
        };
        let p = format!("{layer}.{block}");
        let router = Linear::load(w, &format!("{p}.gate"), cfg.experts, hidden)?;
        let bias = match cfg.scoring {
            Scoring::Sigmoid => {
                let name = format!("{p}.gate.e_score_correction_bias");
                Some(if w.has(&name) { w.load(&name, &[cfg.experts])?.data } else { vec![0.0; cfg.experts] })
            }
            Scoring::Softmax => None,
        };
        let experts = if w.has(&format!("{p}.experts.gate_up_proj")) {
            load_fused_experts(w, &p, cfg, hidden)?
        } else {
            (0..cfg.experts)
                .map(|e| Ffn::load(w, &format!("{p}.experts.{e}"), names, hidden, cfg.intermediate))
                .collect::<Result<_>>()?
        };
        let shared = match cfg.shared_intermediate {
            Some(i) => Some(Box::new(Ffn::load(
                w,
                &format!("{p}.shared_experts"),
                ["gate_proj", "up_proj", "down_proj"],
                hidden,
                i,
            )?)),
            None => None,
        };
        Ok(Moe { cfg: cfg.clone(), router, bias, experts, shared })
    }

    /// Selected experts and their weights for each of `t` tokens (`t × top_k` each), experts in
    /// the order of selection.
    fn route(&self, x: &[f32], t: usize, act: &Act) -> Result<(Vec<usize>, Vec<f32>)> {
        let logits = self.router.forward(x, t, act)?;
        let (e, k) = (self.cfg.experts, self.cfg.top_k);
        let mut idx = vec![0usize; t * k];
        let mut wts = vec![0f32; t * k];
        idx.par_chunks_mut(k).zip(wts.par_chunks_mut(k)).zip(logits.par_chunks(e)).for_each(
            |((idx, wts), l)| match self.cfg.scoring {
                Scoring::Softmax => {
                    let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let ex: Vec<f32> = l.iter().map(|&v| (v - max).exp()).collect();
                    let sum: f32 = ex.iter().sum();
                    let probs: Vec<f32> = ex.iter().map(|v| v / sum).collect();
                    top_k(&probs, idx);
                    for (w, &i) in wts.iter_mut().zip(idx.iter()) {
                        *w = probs[i];
                    }
                    if self.cfg.norm_topk_prob {
                        let s: f32 = wts.iter().sum();
                        wts.iter_mut().for_each(|w| *w /= s);
                    }
                }
                Scoring::Sigmoid => {
                    let scores: Vec<f32> = l.iter().map(|&v| 1.0 / (1.0 + (-v).exp())).collect();
                    let bias = self.bias.as_deref().unwrap_or(&[]);
                    let mut choice: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
                    let (g, per) = (self.cfg.n_group, e / self.cfg.n_group);
                    if g > 1 {
                        let group_score: Vec<f32> = choice
                            .chunks(per)
                            .map(|c| {
                                let mut two = [0usize; 2];
                                top_k(c, &mut two);
                                c[two[0]] + c[two[1]]
                            })
                            .collect();
                        let mut keep = vec![0usize; self.cfg.topk_group];
                        top_k(&group_score, &mut keep);
                        for (gi, c) in choice.chunks_mut(per).enumerate() {
                            if !keep.contains(&gi) {
                                c.fill(f32::NEG_INFINITY);
                            }
                        }
                    }
                    top_k(&choice, idx);
                    for (w, &i) in wts.iter_mut().zip(idx.iter()) {
                        *w = scores[i];
                    }
                    if self.cfg.norm_topk_prob {
                        let s: f32 = wts.iter().sum::<f32>() + 1e-20;
                        wts.iter_mut().for_each(|w| *w /= s);
                    }
                    wts.iter_mut().for_each(|w| *w *= self.cfg.routed_scaling_factor);
                }
            },
        );
        Ok((idx, wts))
    }

    fn forward(&self, x: &[f32], t: usize, hidden: usize, act: &Act) -> Result<(Vec<f32>, Vec<usize>)> {
        let (idx, wts) = self.route(x, t, act)?;
        let k = self.cfg.top_k;
        // Tokens of each expert, in token order, with their routing weight.
        let mut lists: Vec<Vec<(usize, f32)>> = vec![Vec::new(); self.cfg.experts];
        for (j, (&e, &w)) in idx.iter().zip(&wts).enumerate() {
            lists[e].push((j / k, w));
        }
        let inner = Act { parallel: false, ..*act };
        let outs: Vec<Option<Vec<f32>>> = self
            .experts
            .par_iter()
            .zip(&lists)
            .map(|(ffn, list)| {
                if list.is_empty() {
                    return Ok(None);
                }
                let mut xs = Vec::with_capacity(list.len() * hidden);
                for &(tok, _) in list {
                    xs.extend_from_slice(&x[tok * hidden..(tok + 1) * hidden]);
                }
                ffn.forward(&xs, list.len(), &inner).map(Some)
            })
            .collect::<Result<_>>()?;
        let mut out = vec![0f32; t * hidden];
        for (list, y) in lists.iter().zip(&outs) {
            let Some(y) = y else { continue };
            for (&(tok, w), row) in list.iter().zip(y.chunks(hidden)) {
                for (o, &v) in out[tok * hidden..(tok + 1) * hidden].iter_mut().zip(row) {
                    *o += v * w;
                }
            }
        }
        if let Some(s) = &self.shared {
            let y = s.forward(x, t, act)?;
            out.iter_mut().zip(&y).for_each(|(o, v)| *o += v);
        }
        let mut sel = idx;
        sel.par_chunks_mut(k).for_each(|c| c.sort_unstable());
        Ok((out, sel))
    }
}

/// Experts stored fused, as transformers 5 keeps them in memory: `experts.gate_up_proj [E, 2I, H]`
/// and `experts.down_proj [E, H, I]`.
fn load_fused_experts(w: &Weights, p: &str, cfg: &MoeConfig, hidden: usize) -> Result<Vec<Ffn<'static>>> {
    let (e, i) = (cfg.experts, cfg.intermediate);
    let gu_name = format!("{p}.experts.gate_up_proj");
    let dn_name = format!("{p}.experts.down_proj");
    let gu = w.load(&gu_name, &[e, 2 * i, hidden])?;
    let dn = w.load(&dn_name, &[e, hidden, i])?;
    let part = |name: &str, data: &[f32], n: usize, k: usize, fp8: bool| {
        Linear::from_stored(name.to_owned(), Stored::from_f32(data.to_vec(), n, k, fp8))
    };
    Ok((0..e)
        .map(|x| {
            let g = &gu.data[x * 2 * i * hidden..(x * 2 + 1) * i * hidden];
            let u = &gu.data[(x * 2 + 1) * i * hidden..(x + 1) * 2 * i * hidden];
            let d = &dn.data[x * hidden * i..(x + 1) * hidden * i];
            Ffn {
                gate: part(&gu_name, g, i, hidden, gu.fp8),
                up: part(&gu_name, u, i, hidden, gu.fp8),
                down: part(&dn_name, d, hidden, i, dn.fp8),
            }
        })
        .collect())
}

/// Indices of the `out.len()` largest values of `v`, largest first (ties: lower index first).
fn top_k(v: &[f32], out: &mut [usize]) {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    out.copy_from_slice(&order[..out.len()]);
}

/// Attention weights of one layer.
#[derive(Clone, Debug)]
pub enum Attention<'a> {
    /// DeepSeek's multi-head latent attention.
    Mla {
        /// `q_a_proj` and `q_a_layernorm` when queries are compressed.
        q_a: Option<(Linear<'a>, Vec<f32>)>,
        /// `q_b_proj` (compressed queries) or `q_proj`.
        q: Linear<'a>,
        /// `kv_a_proj_with_mqa`.
        kv_a: Linear<'a>,
        /// `kv_a_layernorm`.
        kv_a_norm: Vec<f32>,
        /// `kv_b_proj`.
        kv_b: Linear<'a>,
        /// `o_proj`.
        o: Linear<'a>,
    },
    /// Grouped-query attention.
    Gqa {
        /// `q_proj`, `k_proj`, `v_proj`, `o_proj`.
        qkvo: [Linear<'a>; 4],
        /// Per-head `q_norm` and `k_norm` (Qwen3).
        qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    },
}

/// The feed-forward block of a layer.
#[derive(Clone, Debug)]
pub enum Mlp<'a> {
    /// Dense SwiGLU.
    Dense(Ffn<'a>),
    /// Mixture of experts.
    Moe(Moe<'a>),
}

/// One decoder layer with its weights in f32.
#[derive(Clone, Debug)]
pub struct Layer<'a> {
    /// Index in the model.
    pub index: usize,
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
    attn: Attention<'a>,
    mlp: Mlp<'a>,
}

/// What a layer's router chose for the tokens of a window.
#[derive(Clone, Debug, Default)]
pub struct Routing {
    /// Experts per token.
    pub top_k: usize,
    /// `t × top_k` selected experts, each token's sorted ascending (empty for a dense layer).
    pub experts: Vec<usize>,
}

fn norm(w: &Weights, name: &str, dim: usize) -> Result<Vec<f32>> {
    Ok(w.load(name, &[dim])?.data)
}

impl<'a> Layer<'a> {
    /// Loads decoder layer `i`.
    pub fn load(cfg: &ModelConfig, w: &'a Weights, i: usize) -> Result<Self> {
        let p = format!("{}{i}", cfg.layer_prefix);
        let h = cfg.hidden;
        let attn = match &cfg.attn {
            AttnConfig::Mla { heads, q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim } => {
                let qk = qk_nope_head_dim + qk_rope_head_dim;
                let (q_a, q) = match q_lora_rank {
                    Some(r) => (
                        Some((
                            Linear::load(w, &format!("{p}.self_attn.q_a_proj"), *r, h)?,
                            norm(w, &format!("{p}.self_attn.q_a_layernorm.weight"), *r)?,
                        )),
                        Linear::load(w, &format!("{p}.self_attn.q_b_proj"), heads * qk, *r)?,
                    ),
                    None => (None, Linear::load(w, &format!("{p}.self_attn.q_proj"), heads * qk, h)?),
                };
                Attention::Mla {
                    q_a,
                    q,
                    kv_a: Linear::load(
                        w,
                        &format!("{p}.self_attn.kv_a_proj_with_mqa"),
                        kv_lora_rank + qk_rope_head_dim,
                        h,
                    )?,
                    kv_a_norm: norm(w, &format!("{p}.self_attn.kv_a_layernorm.weight"), *kv_lora_rank)?,
                    kv_b: Linear::load(
                        w,
                        &format!("{p}.self_attn.kv_b_proj"),
                        heads * (qk_nope_head_dim + v_head_dim),
                        *kv_lora_rank,
                    )?,
                    o: Linear::load(w, &format!("{p}.self_attn.o_proj"), h, heads * v_head_dim)?,
                }
            }
            AttnConfig::Gqa { heads, kv_heads, head_dim, qk_norm, .. } => {
                let a = format!("{p}.self_attn");
                Attention::Gqa {
                    qkvo: [
                        Linear::load(w, &format!("{a}.q_proj"), heads * head_dim, h)?,
                        Linear::load(w, &format!("{a}.k_proj"), kv_heads * head_dim, h)?,
                        Linear::load(w, &format!("{a}.v_proj"), kv_heads * head_dim, h)?,
                        Linear::load(w, &format!("{a}.o_proj"), h, heads * head_dim)?,
                    ],
                    qk_norm: if *qk_norm {
                        Some((
                            norm(w, &format!("{a}.q_norm.weight"), *head_dim)?,
                            norm(w, &format!("{a}.k_norm.weight"), *head_dim)?,
                        ))
                    } else {
                        None
                    },
                }
            }
        };
        let mlp = match &cfg.layers[i] {
            MlpConfig::Dense(inter) => {
                Mlp::Dense(Ffn::load(w, &format!("{p}.mlp"), ["gate_proj", "up_proj", "down_proj"], h, *inter)?)
            }
            MlpConfig::Moe(m) => Mlp::Moe(Moe::load(w, &p, m, h)?),
        };
        Ok(Layer {
            index: i,
            input_norm: norm(w, &format!("{p}.input_layernorm.weight"), h)?,
            post_norm: norm(w, &format!("{p}.post_attention_layernorm.weight"), h)?,
            attn,
            mlp,
        })
    }

    /// Every linear layer of this layer, for weight comparisons.
    pub fn linears(&self) -> Vec<&Linear<'a>> {
        let mut v: Vec<&Linear<'a>> = match &self.attn {
            Attention::Mla { q_a, q, kv_a, kv_b, o, .. } => {
                q_a.iter().map(|(l, _)| l).chain([q, kv_a, kv_b, o]).collect()
            }
            Attention::Gqa { qkvo, .. } => qkvo.iter().collect(),
        };
        match &self.mlp {
            Mlp::Dense(f) => v.extend(f.linears()),
            Mlp::Moe(m) => {
                v.push(&m.router);
                for f in m.experts.iter().chain(m.shared.as_deref()) {
                    v.extend(f.linears());
                }
            }
        }
        v
    }

    /// Runs the layer over the `t` tokens of one window (positions `0..t`), in place on `x`
    /// (`t × hidden`). Returns the routing of a MoE layer.
    pub fn forward(
        &self,
        cfg: &ModelConfig,
        rope: &RopeTable,
        x: &mut [f32],
        t: usize,
        act: Option<ScaleFormat>,
    ) -> Result<Routing> {
        let h = cfg.hidden;
        let act = Act { fmt: act, layer: self.index, parallel: true };
        let mut n = vec![0f32; t * h];
        rms_norm(x, h, &self.input_norm, cfg.rms_eps, &mut n);
        let a = self.attention(cfg, rope, &n, t, &act)?;
        x.iter_mut().zip(&a).for_each(|(x, a)| *x += a);
        rms_norm(x, h, &self.post_norm, cfg.rms_eps, &mut n);
        let (m, routing) = match &self.mlp {
            Mlp::Dense(f) => (f.forward(&n, t, &act)?, Routing::default()),
            Mlp::Moe(moe) => {
                let (y, experts) = moe.forward(&n, t, h, &act)?;
                (y, Routing { top_k: moe.cfg.top_k, experts })
            }
        };
        x.iter_mut().zip(&m).for_each(|(x, m)| *x += m);
        Ok(routing)
    }

    fn attention(&self, cfg: &ModelConfig, rope: &RopeTable, x: &[f32], t: usize, act: &Act) -> Result<Vec<f32>> {
        match (&self.attn, &cfg.attn) {
            (
                Attention::Mla { q_a, q, kv_a, kv_a_norm, kv_b, o },
                AttnConfig::Mla {
                    heads,
                    kv_lora_rank,
                    qk_nope_head_dim: nope,
                    qk_rope_head_dim: rd,
                    v_head_dim: vd,
                    ..
                },
            ) => {
                let (heads, kvr, nope, rd, vd) = (*heads, *kv_lora_rank, *nope, *rd, *vd);
                let qk = nope + rd;
                let mut qs = match q_a {
                    Some((qa, qa_norm)) => {
                        let mut c = qa.forward(x, t, act)?;
                        rms_norm_inplace(&mut c, qa.w.rows, qa_norm, MLA_NORM_EPS);
                        q.forward(&c, t, act)?
                    }
                    None => q.forward(x, t, act)?,
                };
                let ckv = kv_a.forward(x, t, act)?;
                let mut latent = vec![0f32; t * kvr];
                let mut k_rot = vec![0f32; t * rd];
                for i in 0..t {
                    let row = &ckv[i * (kvr + rd)..(i + 1) * (kvr + rd)];
                    latent[i * kvr..(i + 1) * kvr].copy_from_slice(&row[..kvr]);
                    k_rot[i * rd..(i + 1) * rd].copy_from_slice(&row[kvr..]);
                }
                rms_norm_inplace(&mut latent, kvr, kv_a_norm, MLA_NORM_EPS);
                let kv = kv_b.forward(&latent, t, act)?;
                let mut scratch = Vec::new();
                let mut keys = vec![0f32; t * heads * qk];
                let mut values = vec![0f32; t * heads * vd];
                for i in 0..t {
                    rope.apply(&mut k_rot[i * rd..(i + 1) * rd], i, &mut scratch);
                    for hd in 0..heads {
                        let qh = &mut qs[(i * heads + hd) * qk..(i * heads + hd + 1) * qk];
                        rope.apply(&mut qh[nope..], i, &mut scratch);
                        let src = &kv[(i * heads + hd) * (nope + vd)..(i * heads + hd + 1) * (nope + vd)];
                        let kh = &mut keys[(i * heads + hd) * qk..(i * heads + hd + 1) * qk];
                        kh[..nope].copy_from_slice(&src[..nope]);
                        kh[nope..].copy_from_slice(&k_rot[i * rd..(i + 1) * rd]);
                        values[(i * heads + hd) * vd..(i * heads + hd + 1) * vd].copy_from_slice(&src[nope..]);
                    }
                }
                let out = causal_attention(&qs, &keys, &values, t, heads, heads, qk, vd, cfg.softmax_scale, None);
                o.forward(&out, t, act)
            }
            (Attention::Gqa { qkvo, qk_norm }, AttnConfig::Gqa { heads, kv_heads, head_dim, sliding_window, .. }) => {
                let (heads, kvh, hd) = (*heads, *kv_heads, *head_dim);
                let mut q = qkvo[0].forward(x, t, act)?;
                let mut k = qkvo[1].forward(x, t, act)?;
                let v = qkvo[2].forward(x, t, act)?;
                if let Some((qn, kn)) = qk_norm {
                    rms_norm_inplace(&mut q, hd, qn, cfg.rms_eps);
                    rms_norm_inplace(&mut k, hd, kn, cfg.rms_eps);
                }
                let mut scratch = Vec::new();
                for i in 0..t {
                    for hh in 0..heads {
                        rope.apply(&mut q[(i * heads + hh) * hd..(i * heads + hh + 1) * hd], i, &mut scratch);
                    }
                    for hh in 0..kvh {
                        rope.apply(&mut k[(i * kvh + hh) * hd..(i * kvh + hh + 1) * hd], i, &mut scratch);
                    }
                }
                let out = causal_attention(&q, &k, &v, t, heads, kvh, hd, hd, cfg.softmax_scale, *sliding_window);
                qkvo[3].forward(&out, t, act)
            }
            _ => Err(RuntimeError::Config {
                file: cfg.file.clone(),
                reason: format!("layer {} does not match the configured attention", self.index),
            }),
        }
    }
}

/// Name of the embedding matrix.
const EMBED: &str = "model.embed_tokens.weight";
/// Name of the output head.
const HEAD: &str = "lm_head.weight";

/// The parts of a model outside its decoder layers: embedding, final norm, output head. The
/// embedding and the head (each vocabulary × hidden, the largest matrices of most models) are read
/// where they lie in the mapped files when used, and their pages released after: they take memory
/// only while in use.
pub struct Model {
    /// Configuration.
    pub cfg: ModelConfig,
    /// Weight source.
    pub weights: Weights,
    final_norm: Vec<f32>,
    /// The head's matrix: `lm_head.weight`, or the embedding when tied.
    head: &'static str,
    /// Rotary tables for positions up to the window length.
    pub rope: RopeTable,
}

impl Model {
    /// Opens a model directory: config, weights, final norm; checks the embedding and the output
    /// head. Decoder layers are loaded on demand ([`Model::layer`]). `max_t` is the longest window.
    pub fn open(dir: &std::path::Path, max_t: usize) -> Result<Self> {
        let weights = Weights::open(dir)?;
        let cfg = ModelConfig::load(&weights.root().join("config.json"))?;
        let (v, h) = (cfg.vocab, cfg.hidden);
        weights.map_checked(EMBED, v, h)?;
        let final_norm = norm(&weights, "model.norm.weight", h)?;
        let head = if cfg.tie_word_embeddings && !weights.has(HEAD) { EMBED } else { HEAD };
        if head != EMBED {
            weights.map_checked(head, v, h)?;
        }
        let rope = RopeTable::new(&cfg.rope.inv_freq, cfg.rope.attention_factor, cfg.rope.interleave, max_t);
        Ok(Model { cfg, weights, final_norm, head, rope })
    }

    /// Loads decoder layer `i`.
    pub fn layer(&self, i: usize) -> Result<Layer<'_>> {
        let l = Layer::load(&self.cfg, &self.weights, i);
        self.weights.release_all();
        l
    }

    /// Bytes decoder layer `i`'s weights take in memory once loaded (see [`Linear::load`]).
    pub fn layer_bytes(&self, i: usize) -> u64 {
        self.weights.loaded_bytes_with_prefix(&format!("{}{i}.", self.cfg.layer_prefix), TILE_ELEMS)
    }

    /// The embeddings of `tokens` (`t × hidden`). Token ids were checked against the vocabulary.
    pub fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let h = self.cfg.hidden;
        let m = self.weights.map_matrix(EMBED, self.cfg.vocab, h)?;
        let mut x = vec![0f32; tokens.len() * h];
        for (row, &tok) in x.chunks_exact_mut(h).zip(tokens) {
            m.decode_rows(tok as usize, row);
        }
        self.weights.release_all();
        Ok(x)
    }

    /// Logits (`t × vocab`) of the final hidden states `x`.
    pub fn logits(&self, x: &[f32], t: usize, act: Option<ScaleFormat>) -> Result<Vec<f32>> {
        let h = self.cfg.hidden;
        let mut n = vec![0f32; t * h];
        rms_norm(x, h, &self.final_norm, self.cfg.rms_eps, &mut n);
        let act = Act { fmt: act, layer: self.cfg.num_layers(), parallel: true };
        let m = self.weights.map_matrix(self.head, self.cfg.vocab, h)?;
        let out = forward(&m, &n, t, &act);
        self.weights.release_all();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{View, matmul_t};

    #[test]
    fn a_bf16_weight_multiplies_tile_by_tile_like_its_f32_widening() {
        // 3000 rows of 700: several 4 MB tiles and a partial last one.
        let (n, k, t) = (3000usize, 700usize, 5usize);
        let bits: Vec<u16> =
            (0..n * k).map(|i| half::bf16::from_f32(((i * 7919 % 1000) as f32 - 500.0) / 997.0).to_bits()).collect();
        let stored = Stored::from_bf16_bits(bits, n, k);
        let wide = stored.to_f32();
        let x: Vec<f32> = (0..t * k).map(|i| ((i * 31 % 101) as f32 - 50.0) / 50.0).collect();
        let (mut tiled, mut direct) = (vec![0f32; t * n], vec![0f32; t * n]);
        product_t(&x, t, &stored, &mut tiled, true);
        matmul_t(View::dense(&x, t, k), View::dense(&wide, n, k), &mut direct, true);
        for (i, (a, b)) in tiled.iter().zip(&direct).enumerate() {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "element {i}: {a} vs {b}");
        }
        assert_eq!(stored.bytes(), n * k * 2);
        let mut row = vec![0f32; k];
        stored.decode_rows(2999, &mut row);
        assert_eq!(row, wide[2999 * k..]);
    }

    #[test]
    fn top_k_takes_largest_first_and_breaks_ties_by_index() {
        let mut o = [0usize; 3];
        top_k(&[0.1, 0.5, 0.5, -1.0, 0.7], &mut o);
        assert_eq!(o, [4, 1, 2]);
    }
}
