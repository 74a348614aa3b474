//! `fp8forge eval`: perplexity of a model on a token stream and, with a baseline, the KL
//! divergence, top-1 and routing agreement and per-layer error against it.
//!
//! Two executors compute the same numbers: unstreamed (every layer resident, each window runs
//! through the whole model) and streamed (one layer resident at a time, all windows go through it
//! before the next is loaded, each feed-forward block over batches of windows so that its weights
//! are read once per batch). Both run the same per-token arithmetic and feed the accumulators in
//! the same order; they differ only by the rounding of products of other shapes (about 1e-9
//! relative), which W8A8 can amplify where an activation sits on an FP8 rounding boundary.

use std::path::{Path, PathBuf};
use std::time::Instant;

use fp8forge_quant::block::ScaleFormat;
use fp8forge_quant::stats::compare;

use crate::divergence::{DivergenceAcc, LogProbs, compare_position, mean_stderr};
use crate::error::{Result, RuntimeError, WindowProblem};
use crate::metrics::{ActivationQuant, Comparison, EvalResult, LayerStats, TensorError};
use crate::model::{Layer, Model, Routing};
use crate::ops::log_sum_exp;
use crate::tokens::{read_token_file, tokenize_file, windows};
use crate::weights::ActScheme;

/// Window length used when none is given (capped by the model's `max_position_embeddings`).
pub const DEFAULT_CTX: usize = 512;

/// Activation quantization during evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActQuant {
    /// What the checkpoint's `quantization_config` asks for: dynamic 1×128 FP8 for FP8 checkpoints.
    Auto,
    /// Weight-only numerics: activations stay f32.
    None,
    /// Quantize the input of every FP8 linear layer per token in 1×128 groups.
    Fp8,
}

/// Where the tokens come from.
#[derive(Clone, Debug)]
pub enum Input {
    /// Whitespace-separated token ids in a file.
    Tokens(PathBuf),
    /// Text in a file, tokenized with the model's `tokenizer.json`.
    Text(PathBuf),
    /// Token ids already in memory.
    Ids(Vec<u32>),
}

/// How to evaluate.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// Window length (`None`: [`DEFAULT_CTX`] capped by the model).
    pub ctx: Option<usize>,
    /// Activation quantization.
    pub act_quant: ActQuant,
    /// Memory for resident weights in bytes (`None`: half of the available memory); a model
    /// whose f32 weights exceed it is streamed layer by layer.
    pub max_memory: Option<u64>,
    /// Force streaming on or off (`None`: decided by `max_memory`).
    pub stream: Option<bool>,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions { ctx: None, act_quant: ActQuant::Auto, max_memory: None, stream: None }
    }
}

/// Progress of an evaluation, in steps of one layer over one window.
pub trait EvalProgress: Sync {
    /// Work is starting: this many steps.
    fn begin(&self, _steps: u64) {}
    /// Steps are done.
    fn advance(&self, _steps: u64) {}
}

/// An [`EvalProgress`] that ignores everything.
pub struct NoProgress;
impl EvalProgress for NoProgress {}

/// One model under evaluation and its activation quantization.
struct Side {
    model: Model,
    act: Option<ScaleFormat>,
}

/// Opens a model and resolves its activation quantization. [`ActQuant::Fp8`] asks to quantize
/// the inputs of FP8 layers: the model evaluated (not a baseline, usually BF16) must have some.
fn open_side(path: &Path, ctx: usize, aq: ActQuant, baseline: bool) -> Result<Side> {
    let model = Model::open(path, ctx)?;
    let act = match (aq, model.weights.act_scheme) {
        (ActQuant::Fp8, ActScheme::None) if !baseline => {
            return Err(RuntimeError::NoFp8Layers { file: model.cfg.file.clone() });
        }
        (ActQuant::None, _) | (_, ActScheme::None) => None,
        (_, ActScheme::Dynamic(fmt)) => Some(fmt),
        (ActQuant::Auto, ActScheme::Static) | (ActQuant::Fp8, ActScheme::Static) => {
            return Err(RuntimeError::StaticActivations { file: model.cfg.file.clone() });
        }
    };
    Ok(Side { model, act })
}

/// A model and its baseline opened, the tokens read and cut into windows, streaming decided:
/// everything an evaluation needs before its first product.
struct Prepared {
    m: Side,
    b: Option<Side>,
    tokens: Vec<u32>,
    ctx: usize,
    streamed: bool,
}

impl Prepared {
    fn windows(&self) -> Vec<&[u32]> {
        windows(&self.tokens, self.ctx)
    }
}

fn prepare(model: &Path, baseline: Option<&Path>, input: &Input, opts: &EvalOptions) -> Result<Prepared> {
    // Read the config first for the default window length.
    let probe = crate::config::ModelConfig::load(&model_dir(model).join("config.json"))?;
    let ctx = window_length(opts.ctx, &probe)?;
    let m = open_side(model, ctx, opts.act_quant, false)?;
    let b = baseline.map(|p| open_side(p, ctx, opts.act_quant, true)).transpose()?;
    if let Some(b) = &b {
        check_comparable(&m.model, &b.model)?;
    }
    let tokens = match input {
        Input::Tokens(f) => read_token_file(f)?,
        Input::Text(f) => tokenize_file(f, &model_dir(model).join("tokenizer.json"))?,
        Input::Ids(v) => v.clone(),
    };
    let input_file = match input {
        Input::Tokens(f) | Input::Text(f) => f.clone(),
        Input::Ids(_) => PathBuf::from("<tokens>"),
    };
    if let Some(i) = tokens.iter().position(|&t| t as usize >= m.model.cfg.vocab) {
        return Err(RuntimeError::Input {
            file: input_file,
            reason: format!("token {i} has id {} outside the vocabulary of {}", tokens[i], m.model.cfg.vocab),
        });
    }
    if windows(&tokens, ctx).is_empty() {
        return Err(RuntimeError::Input { file: input_file, reason: "fewer than 2 tokens: nothing to score".into() });
    }
    check_attention_memory(ctx.min(tokens.len()), &probe)?;

    let n_layers = m.model.cfg.num_layers();
    let resident: u64 =
        (0..n_layers).map(|i| m.model.layer_bytes(i) + b.as_ref().map_or(0, |b| b.model.layer_bytes(i))).sum();
    let budget = opts.max_memory.unwrap_or_else(|| available_memory() / 2);
    let streamed = opts.stream.unwrap_or(resident > budget);
    Ok(Prepared { m, b, tokens, ctx, streamed })
}

/// Evaluates `model` on `input`, against `baseline` when given.
pub fn evaluate(
    model: &Path,
    baseline: Option<&Path>,
    input: &Input,
    opts: &EvalOptions,
    progress: &dyn EvalProgress,
) -> Result<EvalResult> {
    let start = Instant::now();
    let p = prepare(model, baseline, input, opts)?;
    let (m, b, wins) = (&p.m, p.b.as_ref(), p.windows());
    let n_layers = m.model.cfg.num_layers();
    let sides = 1 + usize::from(b.is_some());
    progress.begin((n_layers * sides * wins.len() + wins.len()) as u64);

    let mut acc = Accumulators::new(&m.model, b.is_some());
    if p.streamed {
        run_streamed(m, b, &wins, &mut acc, progress)?;
    } else {
        run_resident(m, b, &wins, &mut acc, progress)?;
    }

    let seconds = start.elapsed().as_secs_f64();
    let tokens_run: usize = wins.iter().map(|w| w.len()).sum();
    Ok(acc.finish(FinishInfo {
        model,
        baseline,
        m,
        b,
        ctx: p.ctx,
        windows: wins.len(),
        tokens: p.tokens.len(),
        streamed: p.streamed,
        seconds,
        tokens_per_second: (tokens_run * sides) as f64 / seconds.max(1e-9),
    }))
}

/// What evaluating `model` on `input` (against `baseline`) would cost on this machine, without
/// evaluating: the models are opened and checked, the input read, and a short calibration run
/// (see [`crate::cost`]).
pub fn estimate(
    model: &Path,
    baseline: Option<&Path>,
    input: &Input,
    opts: &EvalOptions,
) -> Result<crate::cost::EvalEstimate> {
    let p = prepare(model, baseline, input, opts)?;
    let wins = p.windows();
    crate::cost::estimate(&crate::cost::Plan {
        model: (&p.m.model, p.m.act),
        baseline: p.b.as_ref().map(|b| (&b.model, b.act)),
        model_path: model,
        baseline_path: baseline,
        first_window: wins[0],
        window_lengths: wins.iter().map(|w| w.len()).collect(),
        tokens: p.tokens.len(),
        ctx: p.ctx,
        streamed: p.streamed,
    })
}

/// The window length: the one asked for (at least 2 tokens, at most the model's
/// `max_position_embeddings`), else [`DEFAULT_CTX`] capped by the model.
fn window_length(ctx: Option<usize>, cfg: &crate::config::ModelConfig) -> Result<usize> {
    let max = cfg.max_position_embeddings;
    let refuse = |ctx: usize, why| Err(RuntimeError::Window { file: cfg.file.clone(), ctx, why });
    match ctx {
        None => Ok(DEFAULT_CTX.min(max).max(2)),
        Some(c) if c < 2 => refuse(c, WindowProblem::TooShort),
        Some(c) if c > max => refuse(c, WindowProblem::BeyondPositions { max }),
        Some(c) => Ok(c),
    }
}

/// Refuses a window so long that the attention scores alone (one `t × t` f32 matrix per head
/// being computed, one head per thread) would not fit in the available memory.
fn check_attention_memory(t: usize, cfg: &crate::config::ModelConfig) -> Result<()> {
    let per_head = (t as u64).saturating_mul(t as u64).saturating_mul(4);
    let need = per_head.saturating_mul(rayon::current_num_threads() as u64);
    let have = available_memory();
    if need > have {
        let why = WindowProblem::TooMuchMemory { need_gb: need as f64 / 1e9, have_gb: have as f64 / 1e9 };
        return Err(RuntimeError::Window { file: cfg.file.clone(), ctx: t, why });
    }
    Ok(())
}

/// The directory holding a model's config and tokenizer (the parent of a single-file model).
fn model_dir(path: &Path) -> PathBuf {
    if path.is_file() { path.parent().map(Path::to_owned).unwrap_or_default() } else { path.to_owned() }
}

/// A model and its baseline must have the same architecture and shapes.
fn check_comparable(m: &Model, b: &Model) -> Result<()> {
    let (x, y) = (&m.cfg, &b.cfg);
    if x.same_architecture(y) {
        Ok(())
    } else {
        Err(RuntimeError::Mismatch {
            file: y.file.clone(),
            reason: format!(
                "the baseline's architecture or shapes differ from {} (model_type, hidden size, vocabulary, layers or attention)",
                x.file.display()
            ),
        })
    }
}

/// `MemAvailable` of /proc/meminfo in bytes (8 GiB when unknown).
fn available_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(8 << 30, |kb| kb * 1024)
}

/// Every layer resident; each window goes through the whole model.
fn run_resident(
    m: &Side,
    b: Option<&Side>,
    wins: &[&[u32]],
    acc: &mut Accumulators,
    p: &dyn EvalProgress,
) -> Result<()> {
    let n = m.model.cfg.num_layers();
    let mut lm = Vec::with_capacity(n);
    let mut lb = Vec::with_capacity(n);
    for i in 0..n {
        let l = m.model.layer(i)?;
        if let Some(b) = b {
            let bl = b.model.layer(i)?;
            acc.tensor_errors.extend(weight_errors(&l, &bl));
            lb.push(bl);
        }
        lm.push(l);
    }
    for (wi, w) in wins.iter().enumerate() {
        let t = w.len();
        let mut hm = m.model.embed(w)?;
        let mut hb = b.map(|b| b.model.embed(w)).transpose()?;
        for i in 0..n {
            let rm = lm[i].forward(&m.model.rope, &mut hm, t, m.act)?;
            let rb = match (b, hb.as_mut()) {
                (Some(b), Some(h)) => Some(lb[i].forward(&b.model.rope, h, t, b.act)?),
                _ => None,
            };
            acc.layer(i, &rm, rb.as_ref(), &hm, hb.as_deref());
            p.advance(1 + u64::from(b.is_some()));
        }
        acc.head(wi, m, b, &hm, hb.as_deref(), w)?;
        p.advance(1);
    }
    Ok(())
}

/// Working memory for the feed-forward block of a batch of windows in streamed evaluation.
pub const MLP_BATCH_BYTES: usize = 1 << 30;

/// Consecutive windows whose tokens go through a feed-forward block together: as many as fit in
/// [`MLP_BATCH_BYTES`] at `bytes_per_row`, at least one.
pub fn mlp_batches(lengths: &[usize], bytes_per_row: usize) -> Vec<std::ops::Range<usize>> {
    let cap = (MLP_BATCH_BYTES / bytes_per_row.max(1)).max(1);
    let mut out = Vec::new();
    let (mut start, mut rows) = (0, 0);
    for (i, &t) in lengths.iter().enumerate() {
        if i > start && rows + t > cap {
            out.push(start..i);
            (start, rows) = (i, 0);
        }
        rows += t;
    }
    if start < lengths.len() {
        out.push(start..lengths.len());
    }
    out
}

/// The feed-forward block of `l` over windows `batch` of `h` together (their rows concatenated:
/// one product per weight for all of them, so each weight is read once per batch, not once per
/// window); returns each window's routing.
fn mlp_batch(
    side: &Side,
    l: &Layer,
    h: &mut [Vec<f32>],
    batch: std::ops::Range<usize>,
    wins: &[&[u32]],
) -> Result<Vec<Routing>> {
    let hidden = side.model.cfg.hidden;
    let mut x: Vec<f32> = h[batch.clone()].concat();
    let rows = x.len() / hidden;
    let r = l.forward_mlp(&mut x, rows, side.act)?;
    let mut off = 0;
    let mut out = Vec::with_capacity(batch.len());
    for wi in batch {
        let t = wins[wi].len();
        h[wi].copy_from_slice(&x[off * hidden..(off + t) * hidden]);
        out.push(Routing {
            top_k: r.top_k,
            experts: r.experts.get(off * r.top_k..(off + t) * r.top_k).map(<[usize]>::to_vec).unwrap_or_default(),
        });
        off += t;
    }
    Ok(out)
}

/// One layer resident at a time; all windows go through it: attention window by window, then the
/// feed-forward block over batches of windows. Each token's numbers are those of the resident
/// executor.
fn run_streamed(
    m: &Side,
    b: Option<&Side>,
    wins: &[&[u32]],
    acc: &mut Accumulators,
    p: &dyn EvalProgress,
) -> Result<()> {
    let mut hm: Vec<Vec<f32>> = wins.iter().map(|w| m.model.embed(w)).collect::<Result<_>>()?;
    let mut hb: Option<Vec<Vec<f32>>> =
        b.map(|b| wins.iter().map(|w| b.model.embed(w)).collect::<Result<_>>()).transpose()?;
    let lengths: Vec<usize> = wins.iter().map(|w| w.len()).collect();
    for i in 0..m.model.cfg.num_layers() {
        let l = m.model.layer(i)?;
        let bl = b.map(|b| b.model.layer(i)).transpose()?;
        if let Some(bl) = &bl {
            acc.tensor_errors.extend(weight_errors(&l, bl));
        }
        for (wi, w) in wins.iter().enumerate() {
            l.forward_attention(&m.model.rope, &mut hm[wi], w.len(), m.act)?;
            if let (Some(b), Some(bl), Some(hb)) = (b, bl.as_ref(), hb.as_mut()) {
                bl.forward_attention(&b.model.rope, &mut hb[wi], w.len(), b.act)?;
            }
        }
        for batch in mlp_batches(&lengths, l.mlp_bytes_per_row()) {
            let rm = mlp_batch(m, &l, &mut hm, batch.clone(), wins)?;
            let rb = match (b, bl.as_ref(), hb.as_mut()) {
                (Some(b), Some(bl), Some(hb)) => Some(mlp_batch(b, bl, hb, batch.clone(), wins)?),
                _ => None,
            };
            for (j, wi) in batch.enumerate() {
                let hbw = hb.as_ref().map(|h| h[wi].as_slice());
                acc.layer(i, &rm[j], rb.as_ref().map(|r| &r[j]), &hm[wi], hbw);
                p.advance(1 + u64::from(b.is_some()));
            }
        }
    }
    for (wi, w) in wins.iter().enumerate() {
        acc.head(wi, m, b, &hm[wi], hb.as_ref().map(|h| h[wi].as_slice()), w)?;
        p.advance(1);
    }
    Ok(())
}

/// The error of each weight of `l` against the same weight of `base`, for those that differ.
fn weight_errors(l: &Layer, base: &Layer) -> Vec<TensorError> {
    l.linears()
        .into_iter()
        .zip(base.linears())
        .map(|(a, r)| {
            let (aw, rw) = (a.w.to_f32(), r.w.to_f32());
            a.w.release();
            r.w.release();
            (a, r, aw, rw)
        })
        .filter(|(.., aw, rw)| aw != rw)
        .map(|(a, _, aw, rw)| {
            let s = compare(&rw, &aw);
            TensorError {
                name: a.name.clone(),
                shape: vec![a.w.rows, a.w.cols],
                rel_rms: s.rel_rms(),
                max_abs: s.max_abs(),
                snr_db: s.snr_db(),
            }
        })
        .collect()
}

/// Per-layer running sums.
#[derive(Default)]
struct LayerAcc {
    moe: bool,
    load: Vec<u64>,
    base_load: Vec<u64>,
    agree: u64,
    routed: u64,
    err_sq: f64,
    ref_sq: f64,
}

/// Everything accumulated over windows.
struct Accumulators {
    layers: Vec<LayerAcc>,
    nll: Vec<f64>,
    divergence: DivergenceAcc,
    tensor_errors: Vec<TensorError>,
    with_baseline: bool,
}

impl Accumulators {
    fn new(m: &Model, with_baseline: bool) -> Self {
        Accumulators {
            layers: (0..m.cfg.num_layers()).map(|_| LayerAcc::default()).collect(),
            nll: Vec::new(),
            divergence: DivergenceAcc::default(),
            tensor_errors: Vec::new(),
            with_baseline,
        }
    }

    fn layer(&mut self, i: usize, rm: &Routing, rb: Option<&Routing>, hm: &[f32], hb: Option<&[f32]>) {
        let a = &mut self.layers[i];
        if rm.top_k > 0 {
            a.moe = true;
            count_load(&mut a.load, &rm.experts);
            if let Some(rb) = rb {
                count_load(&mut a.base_load, &rb.experts);
                let k = rm.top_k;
                a.agree += rm.experts.chunks(k).zip(rb.experts.chunks(k)).filter(|(x, y)| x == y).count() as u64;
                a.routed += (rm.experts.len() / k) as u64;
            }
        }
        if let Some(hb) = hb {
            let (mut e, mut r) = (0f64, 0f64);
            for (&x, &y) in hm.iter().zip(hb) {
                let d = x as f64 - y as f64;
                e += d * d;
                r += y as f64 * y as f64;
            }
            a.err_sq += e;
            a.ref_sq += r;
        }
    }

    fn head(&mut self, wi: usize, m: &Side, b: Option<&Side>, hm: &[f32], hb: Option<&[f32]>, w: &[u32]) -> Result<()> {
        let t = w.len();
        let v = m.model.cfg.vocab;
        let lm = m.model.logits(hm, t, m.act)?;
        if lm.iter().any(|x| !x.is_finite()) {
            return Err(RuntimeError::NonFinite { model: m.model.weights.root().to_owned(), window: wi });
        }
        let lb = match (b, hb) {
            (Some(b), Some(hb)) => {
                let l = b.model.logits(hb, t, b.act)?;
                if l.iter().any(|x| !x.is_finite()) {
                    return Err(RuntimeError::NonFinite { model: b.model.weights.root().to_owned(), window: wi });
                }
                Some(l)
            }
            _ => None,
        };
        for pos in 0..t - 1 {
            let target = w[pos + 1] as usize;
            let row = &lm[pos * v..(pos + 1) * v];
            let lse = log_sum_exp(row);
            self.nll.push(lse - row[target] as f64);
            if let Some(lb) = &lb {
                let brow = &lb[pos * v..(pos + 1) * v];
                let base = LogProbs::new(brow, log_sum_exp(brow));
                self.divergence.push(compare_position(base, LogProbs::new(row, lse), target));
            }
        }
        Ok(())
    }

    fn finish(self, f: FinishInfo) -> EvalResult {
        let (nll_mean, nll_stderr) = mean_stderr(&self.nll);
        let layers: Vec<LayerStats> = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, a)| LayerStats {
                layer: i,
                moe: a.moe,
                expert_load: a.load.clone(),
                baseline_expert_load: (self.with_baseline && a.moe).then(|| a.base_load.clone()),
                routing_agreement: (self.with_baseline && a.moe && a.routed > 0)
                    .then(|| a.agree as f64 / a.routed as f64),
                hidden_rel_err: (self.with_baseline && a.ref_sq > 0.0).then(|| (a.err_sq / a.ref_sq).sqrt()),
            })
            .collect();
        let (divergence, nll) = (self.divergence, &self.nll);
        let baseline = f.baseline.map(|bp| {
            let routing: Vec<f64> = layers.iter().filter_map(|l| l.routing_agreement).collect();
            Comparison {
                baseline_model: bp.display().to_string(),
                routing_agreement: if routing.is_empty() {
                    1.0
                } else {
                    routing.iter().sum::<f64>() / routing.len() as f64
                },
                tensor_errors: self.tensor_errors,
                ..divergence.finish(nll)
            }
        });
        let _ = f.b;
        EvalResult {
            model: f.model.display().to_string(),
            model_type: f.m.model.cfg.model_type.clone(),
            weights: f.m.model.weights.description.clone(),
            act_quant: match f.m.act {
                None => ActivationQuant::None,
                Some(ScaleFormat::F32) => ActivationQuant::Fp8,
                Some(ScaleFormat::Ue8m0) => ActivationQuant::Fp8Ue8m0,
            },
            ctx: f.ctx,
            windows: f.windows,
            tokens: f.tokens,
            tokens_scored: self.nll.len(),
            nll_mean,
            nll_stderr,
            perplexity: nll_mean.exp(),
            perplexity_stderr: nll_mean.exp() * nll_stderr,
            streamed: f.streamed,
            seconds: f.seconds,
            tokens_per_second: f.tokens_per_second,
            layers,
            baseline,
        }
    }
}

/// What `finish` needs besides the sums.
struct FinishInfo<'a> {
    model: &'a Path,
    baseline: Option<&'a Path>,
    m: &'a Side,
    b: Option<&'a Side>,
    ctx: usize,
    windows: usize,
    tokens: usize,
    streamed: bool,
    seconds: f64,
    tokens_per_second: f64,
}

fn count_load(load: &mut Vec<u64>, experts: &[usize]) {
    for &e in experts {
        if load.len() <= e {
            load.resize(e + 1, 0);
        }
        load[e] += 1;
    }
}

#[cfg(test)]
mod batch_tests {
    use super::*;

    #[test]
    fn mlp_batches_cover_every_window_once_in_order_within_the_budget() {
        let lengths = [512, 512, 512, 100, 512, 7];
        let per_row = MLP_BATCH_BYTES / 1100; // 1100 rows fit
        let b = mlp_batches(&lengths, per_row);
        assert_eq!(b, vec![0..2, 2..4, 4..6]);
        // A window longer than the budget still goes, alone.
        assert_eq!(mlp_batches(&[5000, 10], per_row), vec![0..1, 1..2]);
        // Everything fits: one batch.
        assert_eq!(mlp_batches(&lengths, 1), vec![0..6]);
        assert!(mlp_batches(&[], 1).is_empty());
    }
}
