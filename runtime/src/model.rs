//! The building blocks of the decoder layers (linear layers with weights as stored, SwiGLU MLPs,
//! mixtures of experts, the pre-norm residual layer) and the model around the layers (embedding,
//! final norm, output head). Each architecture assembles its layers from these in its file under
//! [`crate::models`].

use fp8forge_quant::block::{ScaleFormat, fake_quant_token_groups};
use rayon::prelude::*;

use crate::config::ModelConfig;
use crate::error::{Result, RuntimeError};
use crate::models::layer_prefix;
use crate::ops::{RopeTable, rms_norm, swiglu};
use crate::prefix::Prefix;
use crate::router::Router;
use crate::weights::{Stored, Weights};

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
    /// Loads `{p}.{names[0]}` (gate), `{names[1]}` (up), `{names[2]}` (down).
    pub fn load(w: &'a Weights, p: &Prefix, names: [&str; 3], hidden: usize, inter: usize) -> Result<Self> {
        Ok(Ffn {
            gate: Linear::load(w, p.join(names[0]).as_str(), inter, hidden)?,
            up: Linear::load(w, p.join(names[1]).as_str(), inter, hidden)?,
            down: Linear::load(w, p.join(names[2]).as_str(), hidden, inter)?,
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

/// The names of a SwiGLU MLP's projections as most checkpoints write them.
pub const SWIGLU_NAMES: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

/// A mixture of experts with its router.
#[derive(Clone, Debug)]
pub struct Moe<'a> {
    /// The router's linear layer (`gate`), giving one logit per expert.
    router: Linear<'a>,
    /// How the logits choose experts.
    routing: Router,
    experts: Vec<Ffn<'a>>,
    shared: Option<Box<Ffn<'a>>>,
}

impl<'a> Moe<'a> {
    /// Loads the block `p` (`model.layers.3.mlp`): the router `{p}.gate`, the experts
    /// `{p}.experts.E.{names}` (or fused as `{p}.experts.gate_up_proj` and `down_proj`) and the
    /// shared expert `{p}.shared_experts` when `shared_intermediate` is given.
    pub fn load(
        w: &'a Weights,
        p: &Prefix,
        names: [&str; 3],
        routing: Router,
        hidden: usize,
        intermediate: usize,
        shared_intermediate: Option<usize>,
    ) -> Result<Self> {
        let n = routing.experts();
        let router = Linear::load(w, p.join("gate").as_str(), n, hidden)?;
        let ex = p.join("experts");
        let experts = if w.has(&ex.name("gate_up_proj")) {
            load_fused_experts(w, &ex, n, intermediate, hidden)?
        } else {
            (0..n).map(|e| Ffn::load(w, &ex.join(e), names, hidden, intermediate)).collect::<Result<_>>()?
        };
        let shared = match shared_intermediate {
            Some(i) => Some(Box::new(Ffn::load(w, &p.join("shared_experts"), SWIGLU_NAMES, hidden, i)?)),
            None => None,
        };
        Ok(Moe { router, routing, experts, shared })
    }

    /// Selected experts and their weights for each of `t` tokens (`t × top_k` each), experts in
    /// the order of selection.
    fn route(&self, x: &[f32], t: usize, act: &Act) -> Result<(Vec<usize>, Vec<f32>)> {
        let logits = self.router.forward(x, t, act)?;
        Ok(self.routing.select(&logits))
    }

    fn forward(&self, x: &[f32], t: usize, hidden: usize, act: &Act) -> Result<(Vec<f32>, Vec<usize>)> {
        let (idx, wts) = self.route(x, t, act)?;
        let k = self.routing.top_k();
        // Tokens of each expert, in token order, with their routing weight.
        let mut lists: Vec<Vec<(usize, f32)>> = vec![Vec::new(); self.routing.experts()];
        for (j, (&e, &w)) in idx.iter().zip(&wts).enumerate() {
            lists[e].push((j / k, w));
        }
        let inner = Act { parallel: false, ..*act };
        // Experts run in parallel a group at a time and are added in expert order, so memory holds
        // one group's outputs (not every expert's) and the sums do not depend on the batching.
        let group = 4 * rayon::current_num_threads().max(1);
        let mut out = vec![0f32; t * hidden];
        for (ffns, lists) in self.experts.chunks(group).zip(lists.chunks(group)) {
            let outs: Vec<Option<Vec<f32>>> = ffns
                .par_iter()
                .zip(lists)
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
            for (list, y) in lists.iter().zip(&outs) {
                let Some(y) = y else { continue };
                for (&(tok, w), row) in list.iter().zip(y.chunks(hidden)) {
                    for (o, &v) in out[tok * hidden..(tok + 1) * hidden].iter_mut().zip(row) {
                        *o += v * w;
                    }
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

/// Experts stored fused under `p` (`….mlp.experts`), as transformers 5 keeps them in memory:
/// `gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]`.
fn load_fused_experts(w: &Weights, p: &Prefix, e: usize, i: usize, hidden: usize) -> Result<Vec<Ffn<'static>>> {
    let gu_name = p.name("gate_up_proj");
    let dn_name = p.name("down_proj");
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

/// The attention block of a decoder layer with its weights: multi-head latent attention
/// (DeepSeek, [`crate::models::deepseek_v3`]) or grouped-query attention ([`crate::attention`]).
pub trait Attention<'a>: std::fmt::Debug + Send + Sync {
    /// Attention over the `t` tokens of one window (positions `0..t`): `x` is the normed input,
    /// `t × hidden`; returns `t × hidden`.
    fn forward(&self, rope: &RopeTable, x: &[f32], t: usize, act: &Act) -> Result<Vec<f32>>;

    /// Its linear layers, in a fixed order.
    fn linears(&self) -> Vec<&Linear<'a>>;
}

/// The feed-forward block of a layer.
#[derive(Clone, Debug)]
pub enum Mlp<'a> {
    /// Dense SwiGLU.
    Dense(Ffn<'a>),
    /// Mixture of experts.
    Moe(Moe<'a>),
}

/// One decoder layer with its weights: pre-norm attention and feed-forward blocks, each added to
/// the residual stream.
#[derive(Debug)]
pub struct Layer<'a> {
    /// Index in the model.
    pub index: usize,
    hidden: usize,
    rms_eps: f32,
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
    attn: Box<dyn Attention<'a> + 'a>,
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

/// Reads the vector `name` of `dim` values (a norm's weight).
pub fn norm(w: &Weights, name: &str, dim: usize) -> Result<Vec<f32>> {
    Ok(w.load(name, &[dim])?.data)
}

impl<'a> Layer<'a> {
    /// A layer of `attn` and `mlp`, with its norms `{p}.input_layernorm` and
    /// `{p}.post_attention_layernorm` loaded from `w` (`p`: `model.layers.{index}`).
    pub fn load(
        w: &'a Weights,
        p: &Prefix,
        index: usize,
        hidden: usize,
        rms_eps: f32,
        attn: Box<dyn Attention<'a> + 'a>,
        mlp: Mlp<'a>,
    ) -> Result<Self> {
        Ok(Layer {
            index,
            hidden,
            rms_eps,
            input_norm: norm(w, &p.name("input_layernorm.weight"), hidden)?,
            post_norm: norm(w, &p.name("post_attention_layernorm.weight"), hidden)?,
            attn,
            mlp,
        })
    }

    /// Every linear layer of this layer, for weight comparisons.
    pub fn linears(&self) -> Vec<&Linear<'a>> {
        let mut v = self.attn.linears();
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
    pub fn forward(&self, rope: &RopeTable, x: &mut [f32], t: usize, act: Option<ScaleFormat>) -> Result<Routing> {
        self.forward_attention(rope, x, t, act)?;
        self.forward_mlp(x, t, act)
    }

    /// The attention block over the `t` tokens of one window (positions `0..t`): `x += attn(norm(x))`.
    pub fn forward_attention(&self, rope: &RopeTable, x: &mut [f32], t: usize, act: Option<ScaleFormat>) -> Result<()> {
        let h = self.hidden;
        let act = Act { fmt: act, layer: self.index, parallel: true };
        let mut n = vec![0f32; t * h];
        rms_norm(x, h, &self.input_norm, self.rms_eps, &mut n);
        let a = self.attn.forward(rope, &n, t, &act)?;
        x.iter_mut().zip(&a).for_each(|(x, a)| *x += a);
        Ok(())
    }

    /// The feed-forward block over `rows` tokens, of one window or of several (each token's result
    /// is its own): `x += mlp(norm(x))`. Returns the routing of a MoE layer, `rows × top_k`.
    pub fn forward_mlp(&self, x: &mut [f32], rows: usize, act: Option<ScaleFormat>) -> Result<Routing> {
        let h = self.hidden;
        let act = Act { fmt: act, layer: self.index, parallel: true };
        let mut n = vec![0f32; rows * h];
        rms_norm(x, h, &self.post_norm, self.rms_eps, &mut n);
        let (m, routing) = match &self.mlp {
            Mlp::Dense(f) => (f.forward(&n, rows, &act)?, Routing::default()),
            Mlp::Moe(moe) => {
                let (y, experts) = moe.forward(&n, rows, h, &act)?;
                (y, Routing { top_k: moe.routing.top_k(), experts })
            }
        };
        x.iter_mut().zip(&m).for_each(|(x, m)| *x += m);
        Ok(routing)
    }

    /// Bytes of working memory per token that [`Layer::forward_mlp`] needs beyond `x`: its normed
    /// input and output, and the widest intermediate (a dense MLP's gate and up, a MoE layer's
    /// shared expert and routing).
    pub fn mlp_bytes_per_row(&self) -> usize {
        let inter = match &self.mlp {
            Mlp::Dense(f) => 2 * f.gate.w.rows,
            Mlp::Moe(m) => {
                2 * m.shared.as_ref().map_or(0, |s| s.gate.w.rows) + 2 * m.routing.top_k() + m.routing.experts()
            }
        };
        4 * (3 * self.hidden + inter)
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
        let r = cfg.rope();
        let rope = RopeTable::new(&r.inv_freq, r.attention_factor, r.interleave, max_t);
        Ok(Model { cfg, weights, final_norm, head, rope })
    }

    /// Loads decoder layer `i`.
    pub fn layer(&self, i: usize) -> Result<Layer<'_>> {
        let l = self.cfg.arch.load_layer(&self.weights, i);
        self.weights.release_all();
        l
    }

    /// Bytes decoder layer `i`'s weights take in memory once loaded (see [`Linear::load`]).
    pub fn layer_bytes(&self, i: usize) -> u64 {
        self.weights.loaded_bytes_with_prefix(&layer_prefix(i).name(""), TILE_ELEMS)
    }

    /// Bytes of the output head's matrix as stored (mapped while the logits are computed).
    pub fn head_bytes(&self) -> u64 {
        self.weights.tensors_with_prefix(self.head).find(|t| t.name == self.head).map_or(0, |t| t.nbytes() as u64)
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
}
