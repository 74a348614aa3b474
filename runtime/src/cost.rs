//! What an evaluation will cost, said before running it (`eval --dry-run`): bytes to read, peak
//! memory and time on this machine.
//!
//! Nothing is evaluated. The time comes from a short calibration on one real weight matrix of
//! each model: a product with 1 row and one with a window's rows (at most `CALIBRATION_ROWS`) give the cost per weight
//! element of reading and widening the weight (`decode`) and of one multiply-add per row (`fma`);
//! every product of the evaluation is then priced from its shape and the rows it gets (all tokens
//! of a window for a dense matrix, about `t · top_k / experts` for an expert). Shapes come from the
//! checkpoint headers, so any architecture the runtime loads is priced the same way.

use std::io::Read;
use std::path::Path;
use std::time::Instant;

use fp8forge_formats::TensorInfo;
use fp8forge_quant::block::ScaleFormat;
use serde::{Deserialize, Serialize};

use crate::error::{Result, RuntimeError};
use crate::model::{Act, Linear, Model};

/// Most rows of the longer calibration product (the window length when shorter): products of
/// many rows run more multiply-adds per second than those of few, and a window's dense products
/// are the bulk of an evaluation.
const CALIBRATION_ROWS: usize = 512;
/// Matrices of at most this many elements are widened to f32 once at load (see `Linear::load`).
const WIDENED_UP_TO: usize = 1 << 20;
/// Tokens of the window the real layer is timed on (the per-token overhead barely depends on it).
const OVERHEAD_TOKENS: usize = 64;
/// Time spent repeating each calibration product (the best run counts).
const CALIBRATION_SECONDS: f64 = 0.1;
/// Bytes read to measure the read rate of a checkpoint's files.
const READ_PROBE: u64 = 256 << 20;
/// Memory of the process before any model is opened (binary, allocator, thread stacks).
const BASE_BYTES: u64 = 16 << 20;

/// The estimated cost of an evaluation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalEstimate {
    /// The model (as given).
    pub model: String,
    /// The baseline (as given).
    pub baseline: Option<String>,
    /// Decoder layers of each model.
    pub layers: usize,
    /// Tokens of the input.
    pub tokens: usize,
    /// Window length.
    pub ctx: usize,
    /// Windows.
    pub windows: usize,
    /// Whether layers would be streamed (one resident at a time).
    pub streamed: bool,
    /// Worker threads.
    pub threads: usize,
    /// Bytes of tensor data in the checkpoints (each is read from disk at least once).
    pub bytes_to_read: u64,
    /// Estimated peak resident memory of the process.
    pub peak_memory_bytes: u64,
    /// Multiply-adds of all products, both models (×2 for FLOPs).
    pub multiply_adds: f64,
    /// Estimated seconds reading the checkpoints once at the measured read rate.
    pub read_seconds: f64,
    /// Estimated seconds computing (products and attention), both models.
    pub compute_seconds: f64,
    /// Estimated wall time: reading plus computing.
    pub seconds: f64,
    /// What the estimate is based on.
    pub calibration: Calibration,
    /// Per decoder layer, both models together.
    pub per_layer: Vec<LayerEstimate>,
}

/// The measurements behind an estimate.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Calibration {
    /// Seconds the calibration took.
    pub seconds: f64,
    /// Bytes per second reading a checkpoint file (from the page cache when it was read recently).
    pub read_bytes_per_second: f64,
    /// The product rates, one per model (the model first).
    pub products: Vec<ProductRate>,
}

/// The cost of the products of one model's weights on this machine.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProductRate {
    /// The weight matrix timed.
    pub matrix: String,
    /// How the model's weights are stored.
    pub weights: String,
    /// Nanoseconds per weight element to read and widen the weight once per product.
    pub decode_ns_per_element: f64,
    /// Nanoseconds per multiply-add.
    pub fma_ns: f64,
}

/// The estimated cost of one decoder layer over all windows, both models.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerEstimate {
    /// Layer index.
    pub layer: usize,
    /// Bytes of the layer's tensors in both checkpoints.
    pub bytes: u64,
    /// Multiply-adds.
    pub multiply_adds: f64,
    /// Estimated compute seconds.
    pub seconds: f64,
}

/// One weight matrix of a layer, from the checkpoint header.
#[derive(Clone, Debug)]
struct Matrix {
    name: String,
    rows: usize,
    cols: usize,
    /// One matrix of many routed experts (each sees a share of the tokens).
    expert: bool,
    /// Widened to f32 at load (no per-product decoding), or stored as f32.
    widened: bool,
    /// Bytes as stored.
    bytes: u64,
}

/// The weight matrices under `prefix`: 2-D `…weight` tensors, and 3-D fused expert tensors
/// (`experts.gate_up_proj`, `experts.down_proj`) as one matrix per expert.
fn matrices(m: &Model, prefix: &str) -> Vec<Matrix> {
    let mut out = Vec::new();
    for t in m.weights.tensors_with_prefix(prefix) {
        if is_scale(t) {
            continue;
        }
        let f32_stored = t.dtype == fp8forge_formats::Dtype::F32;
        match *t.shape.as_slice() {
            [rows, cols] if t.name.ends_with("weight") => out.push(Matrix {
                name: t.name.clone(),
                rows,
                cols,
                expert: is_routed_expert(&t.name),
                widened: f32_stored || rows * cols <= WIDENED_UP_TO,
                bytes: t.nbytes() as u64,
            }),
            [experts, rows, cols] if t.name.contains(".experts.") => {
                out.extend((0..experts).map(|_| Matrix {
                    name: t.name.clone(),
                    rows,
                    cols,
                    expert: true,
                    widened: f32_stored || rows * cols <= WIDENED_UP_TO,
                    bytes: (t.nbytes() / experts.max(1)) as u64,
                }));
            }
            _ => {}
        }
    }
    out
}

fn is_scale(t: &TensorInfo) -> bool {
    t.name.ends_with("_scale_inv") || t.name.ends_with("_scale") || t.name.ends_with("weight_scale")
}

fn is_routed_expert(name: &str) -> bool {
    name.contains(".experts.") && !name.contains("shared_expert")
}

/// The routing of a model: routed experts per MoE layer and experts per token (from config.json).
fn routing(m: &Model) -> (usize, usize) {
    let cfg = m.weights.config();
    let get = |keys: &[&str]| {
        keys.iter().find_map(|k| cfg.and_then(|c| c.get(*k)).and_then(serde_json::Value::as_u64)).unwrap_or(0) as usize
    };
    (get(&["n_routed_experts", "num_local_experts", "num_experts"]), get(&["num_experts_per_tok"]))
}

/// Times one product of `rows` rows with `l`: the best of at least two runs and of as many as
/// fit in [`CALIBRATION_SECONDS`].
fn time_product(l: &Linear, rows: usize) -> Result<f64> {
    let x: Vec<f32> = (0..rows * l.w.cols).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 1013.0).collect();
    let act = Act { fmt: None, layer: 0, parallel: true };
    let (mut best, mut runs, start) = (f64::INFINITY, 0, Instant::now());
    while runs < 2 || (start.elapsed().as_secs_f64() < CALIBRATION_SECONDS && runs < 1000) {
        let t0 = Instant::now();
        l.forward(&x, rows, &act)?;
        best = best.min(t0.elapsed().as_secs_f64());
        runs += 1;
    }
    Ok(best)
}

/// Calibrates the product cost on a real matrix of `m`: the stored (not widened) matrix closest
/// to 8M elements, else the largest, with 1 and `rows` rows.
fn calibrate_products(m: &Model, rows: usize) -> Result<ProductRate> {
    let all = matrices(m, &crate::models::layers_prefix().name(""));
    let target = 8usize << 20;
    let pick = all
        .iter()
        .filter(|x| !x.widened && x.name.ends_with(".weight"))
        .min_by_key(|x| (x.rows * x.cols).abs_diff(target))
        .or_else(|| all.iter().filter(|x| x.name.ends_with(".weight")).max_by_key(|x| x.rows * x.cols))
        .ok_or_else(|| RuntimeError::Config {
            file: m.cfg.file.clone(),
            reason: "no weight matrix under the decoder layers to calibrate on".into(),
        })?;
    let prefix = pick.name.trim_end_matches(".weight");
    let l = Linear::load(&m.weights, prefix, pick.rows, pick.cols)?;
    let elems = (pick.rows * pick.cols) as f64;
    let t1 = time_product(&l, 1)?;
    let rows = rows.clamp(2, CALIBRATION_ROWS);
    let tn = time_product(&l, rows)?;
    let fma = ((tn - t1) / (elems * (rows - 1) as f64)).max(1e-12);
    let decode = (t1 / elems - fma).max(0.0);
    m.weights.release_all();
    Ok(ProductRate {
        matrix: pick.name.clone(),
        weights: m.weights.description.clone(),
        decode_ns_per_element: decode * 1e9,
        fma_ns: fma * 1e9,
    })
}

/// Bytes per second reading the start of the largest file under `root` (plain reads, as the
/// first touch of a mapped file costs).
fn read_rate(root: &Path) -> Result<f64> {
    let dir = if root.is_file() { root.parent().unwrap_or(Path::new(".")) } else { root };
    let largest = std::fs::read_dir(dir)
        .map_err(|e| RuntimeError::Io { file: dir.to_owned(), source: e })?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .filter_map(|e| Some((e.metadata().ok()?.len(), e.path())))
        .max();
    let Some((_, file)) = largest else { return Ok(1e9) };
    let mut f = std::fs::File::open(&file).map_err(|e| RuntimeError::Io { file: file.clone(), source: e })?;
    let mut buf = vec![0u8; 8 << 20];
    let (mut done, start) = (0u64, Instant::now());
    while done < READ_PROBE {
        match f.read(&mut buf).map_err(|e| RuntimeError::Io { file: file.clone(), source: e })? {
            0 => break,
            n => done += n as u64,
        }
    }
    Ok(done as f64 / start.elapsed().as_secs_f64().max(1e-6))
}

/// Inputs of [`estimate`] that the evaluation itself decided.
pub(crate) struct Plan<'a> {
    /// The model, and the activation quantization of its FP8 layers.
    pub model: (&'a Model, Option<ScaleFormat>),
    /// The baseline, and the activation quantization of its FP8 layers.
    pub baseline: Option<(&'a Model, Option<ScaleFormat>)>,
    pub model_path: &'a Path,
    pub baseline_path: Option<&'a Path>,
    /// The first window's tokens (for the timed layer).
    pub first_window: &'a [u32],
    pub window_lengths: Vec<usize>,
    pub tokens: usize,
    pub ctx: usize,
    pub streamed: bool,
}

/// The price of one decoder layer of one model over the given windows.
#[derive(Default)]
struct LayerPrice {
    bytes: u64,
    macs: f64,
    seconds: f64,
    /// f32 bytes of the matrices widened at load.
    widened_bytes: u64,
    /// Stored bytes of the largest matrix read in place.
    largest_matrix: u64,
    /// Widest matrix side (for the activations of one window).
    widest: usize,
    /// Working memory per token of the feed-forward block.
    mlp_bytes_per_row: usize,
}

/// A weight of a decoder layer's feed-forward block.
fn is_mlp(name: &str) -> bool {
    name.contains(".mlp.") || name.contains(".block_sparse_moe.")
}

/// What `Layer::mlp_bytes_per_row` gives, from the headers: the normed input, output and residual,
/// and the widest intermediate (a dense MLP's gate and up; a MoE layer's shared expert and routing).
fn mlp_bytes_per_row(m: &Model, mats: &[Matrix]) -> usize {
    let hidden = m.cfg.hidden;
    let (experts, top_k) = routing(m);
    let gate_rows = |shared: bool| {
        mats.iter()
            .filter(|x| is_mlp(&x.name) && !x.expert && (x.name.contains("shared_expert") == shared))
            .filter(|x| x.name.ends_with("gate_proj.weight") || x.name.ends_with(".w1.weight"))
            .map(|x| x.rows)
            .max()
    };
    let inter = match gate_rows(false) {
        Some(r) if !mats.iter().any(|x| x.expert) => 2 * r,
        _ => 2 * gate_rows(true).unwrap_or(0) + 2 * top_k + experts,
    };
    4 * (3 * hidden + inter)
}

/// Prices layer `i` of `m` over windows of `lengths` tokens, `overhead` seconds per token on top
/// of the products and attention. With `streamed`, the feed-forward block's products run over
/// batches of windows ([`crate::eval::mlp_batches`]), once per batch.
fn price_layer(
    m: &Model,
    rate: &ProductRate,
    i: usize,
    lengths: &[usize],
    overhead: f64,
    streamed: bool,
) -> LayerPrice {
    let prefix = crate::models::layer_prefix(i).name("");
    let (experts, top_k) = routing(m);
    let mut p = LayerPrice {
        bytes: m.weights.tensors_with_prefix(&prefix).map(|t| t.nbytes() as u64).sum(),
        ..LayerPrice::default()
    };
    let (mut q_out, mut o_in) = (0usize, 0usize);
    let mats = matrices(m, &prefix);
    let per_row = mlp_bytes_per_row(m, &mats);
    p.mlp_bytes_per_row = per_row;
    let batched: Vec<usize> = if streamed {
        crate::eval::mlp_batches(lengths, per_row).into_iter().map(|r| lengths[r].iter().sum()).collect()
    } else {
        lengths.to_vec()
    };
    for x in mats {
        let elems = (x.rows * x.cols) as f64;
        if x.widened {
            p.widened_bytes += elems as u64 * 4;
        } else {
            p.largest_matrix = p.largest_matrix.max(x.bytes);
        }
        p.widest = p.widest.max(x.rows.max(x.cols));
        if x.name.ends_with("q_proj.weight") || x.name.ends_with("q_b_proj.weight") {
            q_out = x.rows;
        }
        if x.name.ends_with("o_proj.weight") {
            o_in = x.cols;
        }
        let rows_of = if is_mlp(&x.name) { &batched } else { lengths };
        for &t in rows_of {
            // A routed expert sees about `t · top_k / experts` rows, and is read only when used.
            let (rows, used) = if x.expert && experts > 0 {
                let share = top_k.min(experts) as f64 / experts as f64;
                (t as f64 * share, 1.0 - (1.0 - share).powi(t as i32))
            } else {
                (t as f64, 1.0)
            };
            let decode = if x.widened { 0.0 } else { used * elems * rate.decode_ns_per_element };
            p.macs += rows * elems;
            p.seconds += (decode + rows * elems * rate.fma_ns) * 1e-9;
        }
    }
    for &t in lengths {
        // Causal attention: q·kᵀ and p·v over the lower triangle.
        let macs = (t * t) as f64 / 2.0 * (q_out + o_in) as f64;
        p.macs += macs;
        p.seconds += macs * rate.fma_ns * 1e-9 + t as f64 * overhead;
    }
    p
}

/// Seconds per token per layer that a real layer takes beyond its priced products: norms,
/// routing, softmax, activation quantization. Timed on the layer of `m` with the fewest bytes,
/// over the start of the first window.
fn layer_overhead(m: &Model, act: Option<ScaleFormat>, rate: &ProductRate, window: &[u32]) -> Result<f64> {
    let layers = m.cfg.num_layers();
    let Some(i) = (0..layers).min_by_key(|&i| price_layer(m, rate, i, &[], 0.0, false).bytes) else {
        return Ok(0.0);
    };
    let window = &window[..window.len().min(OVERHEAD_TOKENS)];
    let t = window.len();
    let layer = m.layer(i)?;
    let x0 = m.embed(window)?;
    let (mut best, mut runs, start) = (f64::INFINITY, 0, Instant::now());
    while runs < 1 || (start.elapsed().as_secs_f64() < CALIBRATION_SECONDS && runs < 20) {
        let mut x = x0.clone();
        let t0 = Instant::now();
        layer.forward(&m.rope, &mut x, t, act)?;
        best = best.min(t0.elapsed().as_secs_f64());
        runs += 1;
    }
    drop(layer);
    m.weights.release_all();
    let priced = price_layer(m, rate, i, &[t], 0.0, false).seconds;
    Ok(((best - priced) / t as f64).max(0.0))
}

/// Prices the evaluation `p` on this machine (a calibration of a second or so per model).
pub(crate) fn estimate(p: &Plan) -> Result<EvalEstimate> {
    let start = Instant::now();
    let sides: Vec<(&Model, Option<ScaleFormat>)> = std::iter::once(p.model).chain(p.baseline).collect();
    let mut rates = Vec::with_capacity(sides.len());
    let mut overheads = Vec::with_capacity(sides.len());
    for &(m, act) in &sides {
        let rate = calibrate_products(m, p.ctx.min(p.tokens))?;
        overheads.push(layer_overhead(m, act, &rate, p.first_window)?);
        rates.push(rate);
    }
    let read = read_rate(p.model_path)?;
    let calibration =
        Calibration { seconds: start.elapsed().as_secs_f64(), read_bytes_per_second: read, products: rates };

    let layers = p.model.0.cfg.num_layers();
    let t = p.ctx.min(p.tokens) as u64;
    let threads = rayon::current_num_threads() as u64;
    let (mut resident_widened, mut max_layer_widened, mut layer_phase) = (0u64, 0u64, 0u64);
    let mut per_layer = Vec::with_capacity(layers);
    for i in 0..layers {
        let mut e = LayerEstimate { layer: i, bytes: 0, multiply_adds: 0.0, seconds: 0.0 };
        let mut widened = 0;
        for ((m, _), (rate, &overhead)) in sides.iter().zip(calibration.products.iter().zip(&overheads)) {
            let lp = price_layer(m, rate, i, &p.window_lengths, overhead, p.streamed);
            e.bytes += lp.bytes;
            e.multiply_adds += lp.macs;
            e.seconds += lp.seconds;
            widened += lp.widened_bytes;
            // One matrix mapped, a window's activations, each thread's attention scores and tile.
            let transient =
                lp.largest_matrix + t * lp.widest as u64 * 4 * 6 + threads * (t * t * 4 + WIDENED_UP_TO as u64 * 4);
            layer_phase = layer_phase.max(transient);
        }
        resident_widened += widened;
        max_layer_widened = max_layer_widened.max(widened);
        per_layer.push(e);
    }

    // The head: every window's logits, both models.
    let (vocab, hidden) = (p.model.0.cfg.vocab, p.model.0.cfg.hidden);
    let (mut head_seconds, mut head_macs) = (0.0, 0.0);
    for rate in &calibration.products {
        for &t in &p.window_lengths {
            let elems = (vocab * hidden) as f64;
            head_macs += t as f64 * elems;
            head_seconds += (elems * rate.decode_ns_per_element + t as f64 * elems * rate.fma_ns) * 1e-9;
        }
    }
    let n_sides = sides.len() as u64;
    let head_bytes = sides.iter().map(|(m, _)| m.head_bytes()).max().unwrap_or(0);
    let head_phase = head_bytes + 2 * n_sides * t * vocab as u64 * 4;
    let hidden_states = if p.streamed { p.tokens as u64 } else { t } * hidden as u64 * 4 * n_sides;
    let weights_resident = if p.streamed { max_layer_widened } else { resident_widened };
    let peak = BASE_BYTES + weights_resident + hidden_states + layer_phase.max(head_phase);

    let bytes_to_read: u64 = sides.iter().map(|(m, _)| m.weights.stored_bytes()).sum();
    let compute: f64 = per_layer.iter().map(|l| l.seconds).sum::<f64>() + head_seconds;
    let read_seconds = bytes_to_read as f64 / calibration.read_bytes_per_second.max(1.0);
    Ok(EvalEstimate {
        model: p.model_path.display().to_string(),
        baseline: p.baseline_path.map(|b| b.display().to_string()),
        layers,
        tokens: p.tokens,
        ctx: p.ctx,
        windows: p.window_lengths.len(),
        streamed: p.streamed,
        threads: threads as usize,
        bytes_to_read,
        peak_memory_bytes: peak,
        multiply_adds: per_layer.iter().map(|l| l.multiply_adds).sum::<f64>() + head_macs,
        read_seconds,
        compute_seconds: compute,
        seconds: compute + read_seconds,
        calibration,
        per_layer,
    })
}
