//! Layer streaming: the schedule that runs a model one decoder layer at a time over all tokens
//! on a GPU whose memory holds two layers, not the model.
//!
//! - [`plan`] decides, from the layers' stored sizes, the activations and a memory budget
//!   (`--max-memory`, [`parse_budget`]), what lives on the device: two layer buffers (the largest
//!   layer each), the workspace, and as many activation chunks as fit; the other chunks are paged
//!   through two staging buffers from host memory.
//! - [`run`] executes a [`StreamPlan`] on a [`LayerDevice`]: layer `L + 1` is uploaded into the
//!   buffer layer `L - 1` used while layer `L` computes (the upload waits on the device for
//!   layer `L - 1`'s compute, not on the host), and the host waits once per layer, for layer
//!   `L`'s compute, after `L + 1`'s upload is issued. Each operation's device time comes back in
//!   the [`StreamReport`].
//! - [`projected_seconds`] is the time model of that pipeline (upload and compute per layer, two
//!   buffers); fed with the times a GPU run measures, it projects a larger model's run.
//! - [`sim::SimDevice`] is a simulated device: it keeps a clock per stream and the host's, records
//!   every operation, and checks the invariants (a buffer is never overwritten while a compute
//!   reads it, memory within the budget, a paged chunk always current). The CPU tests run the
//!   scheduler on it; with measured durations it is the projection of a whole run.

use crate::{CudaRuntimeError, Result};

pub mod cuda;
pub mod sim;

/// Where one chunk of activations lives during a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkPlace {
    /// In its own device buffer for the whole run (index among the resident chunks).
    Resident(usize),
    /// In host memory, paged in (and out) through one of the two staging buffers per layer.
    Paged,
}

/// What a streamed run needs: the layers' stored sizes, the activations and the scratch memory.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamInputs {
    /// Bytes of each layer's weights as stored (FP8 codes and scales, or BF16), in order.
    pub layer_bytes: Vec<u64>,
    /// Activation chunks (e.g. one per window, or per group of windows).
    pub chunks: usize,
    /// Bytes of one chunk's activations kept from one layer to the next (the hidden states).
    pub chunk_bytes: u64,
    /// Scratch bytes one chunk's compute needs (projections, attention scores, MoE buffers).
    pub workspace: u64,
    /// The GPU memory the run may use, bytes.
    pub budget: u64,
}

/// What lives where during a run (a pure function of [`StreamInputs`], see [`plan`]).
#[derive(Clone, Debug, PartialEq)]
pub struct StreamPlan {
    /// The inputs planned for.
    pub inputs: StreamInputs,
    /// Bytes of each of the (at most two) layer buffers: the largest layer.
    pub layer_buffer: u64,
    /// Layer buffers: 2, or 1 for a one-layer model.
    pub layer_buffers: usize,
    /// Each chunk's place.
    pub chunks: Vec<ChunkPlace>,
    /// Staging buffers for paged chunks: 0 when all are resident, else 2.
    pub staging: usize,
}

impl StreamPlan {
    /// Chunks resident on the device.
    pub fn resident(&self) -> usize {
        self.chunks.iter().filter(|c| matches!(c, ChunkPlace::Resident(_))).count()
    }

    /// Device memory the plan uses at its peak, bytes (all its buffers are allocated up front).
    pub fn device_bytes(&self) -> u64 {
        let i = &self.inputs;
        self.layer_buffers as u64 * self.layer_buffer
            + i.workspace
            + (self.resident() + self.staging) as u64 * i.chunk_bytes
    }
}

/// Plans a run: everything on the device when it fits, else two layer buffers, the workspace,
/// two staging buffers and as many resident chunks as the rest of the budget holds.
///
/// # Errors
///
/// [`CudaRuntimeError::Plan`] for no layers or no chunks, [`CudaRuntimeError::Budget`] when not
/// even two layer buffers, the workspace and two chunks fit.
pub fn plan(inputs: &StreamInputs) -> Result<StreamPlan> {
    let i = inputs;
    if i.layer_bytes.is_empty() || i.chunks == 0 {
        return Err(CudaRuntimeError::Plan {
            detail: format!("{} layers and {} activation chunks: nothing to stream", i.layer_bytes.len(), i.chunks),
        });
    }
    let layer_buffer = i.layer_bytes.iter().copied().max().unwrap_or(0);
    let layer_buffers = i.layer_bytes.len().min(2);
    let overflow = || CudaRuntimeError::Plan { detail: format!("sizes overflow 64 bits: {i:?}") };
    let fixed = (layer_buffers as u64)
        .checked_mul(layer_buffer)
        .and_then(|b| b.checked_add(i.workspace))
        .ok_or_else(overflow)?;
    let all = (i.chunks as u64).checked_mul(i.chunk_bytes).ok_or_else(overflow)?;
    if fixed.checked_add(all).is_some_and(|b| b <= i.budget) {
        let chunks = (0..i.chunks).map(ChunkPlace::Resident).collect();
        return Ok(StreamPlan { inputs: i.clone(), layer_buffer, layer_buffers, chunks, staging: 0 });
    }
    let min_activations = 2 * i.chunk_bytes;
    let needed = fixed.checked_add(min_activations).ok_or_else(overflow)?;
    if needed > i.budget {
        return Err(CudaRuntimeError::Budget {
            budget: i.budget,
            needed,
            layer_buffer,
            workspace: i.workspace,
            min_activations,
            detail: format!("{} layers and {} chunks of {} bytes", i.layer_bytes.len(), i.chunks, i.chunk_bytes),
        });
    }
    let spare = i.budget - needed;
    let resident = spare.checked_div(i.chunk_bytes).map_or(i.chunks, |r| (r as usize).min(i.chunks));
    let chunks =
        (0..i.chunks).map(|c| if c < resident { ChunkPlace::Resident(c) } else { ChunkPlace::Paged }).collect();
    Ok(StreamPlan { inputs: i.clone(), layer_buffer, layer_buffers, chunks, staging: 2 })
}

/// Parses a memory budget: bytes with an optional unit (`K`, `M`, `G`, `T` and `KiB`..`TiB`
/// binary; `KB`..`TB` decimal), or a percentage of `device_total` (`90%`).
///
/// # Errors
///
/// [`CudaRuntimeError::Plan`] naming the text.
pub fn parse_budget(text: &str, device_total: u64) -> Result<u64> {
    let bad = |why: &str| CudaRuntimeError::Plan { detail: format!("memory budget {text:?}: {why}") };
    let t = text.trim();
    if let Some(p) = t.strip_suffix('%') {
        let p: f64 = p.trim().parse().map_err(|_| bad("not a number before %"))?;
        if !(p > 0.0 && p <= 100.0) {
            return Err(bad("a percentage must be in (0, 100]"));
        }
        return Ok((device_total as f64 * p / 100.0) as u64);
    }
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| bad("expected a number with an optional unit (80G, 75GiB, 90%)"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0f64.powi(2),
        "g" | "gib" => 1024.0f64.powi(3),
        "t" | "tib" => 1024.0f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        _ => return Err(bad("unknown unit (B, K/KiB, M/MiB, G/GiB, T/TiB, KB, MB, GB, TB or %)")),
    };
    let bytes = value * scale;
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(bad("out of range"));
    }
    Ok(bytes as u64)
}

/// Device work between two events: where it started and ended.
#[derive(Clone, Debug)]
pub struct Span<E> {
    /// Recorded before the work.
    pub start: E,
    /// Recorded after the work; later work that depends on this waits for it.
    pub end: E,
}

/// Where a compute finds its chunk of activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActSlot {
    /// The chunk's own resident buffer.
    Resident(usize),
    /// Staging buffer 0 or 1 (the chunk was paged in).
    Staging(usize),
}

/// What the scheduler needs of a device: buffers, three kinds of asynchronous work on its
/// streams (uploads and page-ins host to device, computes, page-outs device to host), each
/// after given events, and host waits. Implementations: [`sim::SimDevice`] (simulated, with
/// checks) and [`cuda::CudaLayerDevice`] (the GPU; compiled, not yet run on one).
pub trait LayerDevice {
    /// A point in a stream's work that other work (or the host) can wait for.
    type Event: Clone;

    /// Allocates what `plan` places on the device: its layer buffers, workspace, resident chunks
    /// and staging buffers.
    ///
    /// # Errors
    ///
    /// The device's (e.g. out of memory).
    fn reserve(&mut self, plan: &StreamPlan) -> Result<()>;

    /// Enqueues, after `after`, the copy of layer `layer`'s stored bytes into layer buffer `slot`.
    ///
    /// # Errors
    ///
    /// The device's.
    fn upload(&mut self, layer: usize, slot: usize, after: &[Self::Event]) -> Result<Span<Self::Event>>;

    /// Enqueues, after `after`, layer `layer`'s compute over activation chunk `chunk` (found at
    /// `act`), its weights in layer buffer `slot`.
    ///
    /// # Errors
    ///
    /// The device's.
    fn compute(
        &mut self,
        layer: usize,
        slot: usize,
        chunk: usize,
        act: ActSlot,
        after: &[Self::Event],
    ) -> Result<Span<Self::Event>>;

    /// Enqueues, after `after`, the copy of chunk `chunk`'s activations from host memory into
    /// staging buffer `staging`.
    ///
    /// # Errors
    ///
    /// The device's.
    fn page_in(&mut self, chunk: usize, staging: usize, after: &[Self::Event]) -> Result<Span<Self::Event>>;

    /// Enqueues, after `after`, the copy of staging buffer `staging` back to chunk `chunk`'s host
    /// memory.
    ///
    /// # Errors
    ///
    /// The device's.
    fn page_out(&mut self, chunk: usize, staging: usize, after: &[Self::Event]) -> Result<Span<Self::Event>>;

    /// Blocks the host until `event` has happened.
    ///
    /// # Errors
    ///
    /// The device's (an error a kernel raised surfaces here).
    fn wait(&mut self, event: &Self::Event) -> Result<()>;

    /// Seconds of device time between a finished span's start and end.
    ///
    /// # Errors
    ///
    /// The device's.
    fn seconds(&mut self, span: &Span<Self::Event>) -> Result<f64>;

    /// The host's clock, seconds since an origin of the device's choosing.
    fn clock(&mut self) -> f64;
}

/// What one layer took on the device.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerReport {
    /// The layer.
    pub layer: usize,
    /// Seconds of its upload.
    pub upload_s: f64,
    /// Seconds of its computes (all chunks).
    pub compute_s: f64,
    /// Seconds of its chunks' page-ins.
    pub page_in_s: f64,
    /// Seconds of its chunks' page-outs.
    pub page_out_s: f64,
}

/// What a streamed run did and took.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamReport {
    /// The plan run.
    pub plan: StreamPlan,
    /// Each layer's device times.
    pub layers: Vec<LayerReport>,
    /// Host seconds from the first upload issued to the last work finished.
    pub total_s: f64,
}

impl StreamReport {
    /// The time model's projection of this run from its measured per-layer times (uploads and
    /// computes; paging adds to compute): what [`projected_seconds`] gives.
    pub fn projected_s(&self) -> f64 {
        let times: Vec<LayerTimes> = self
            .layers
            .iter()
            .map(|l| LayerTimes { upload_s: l.upload_s, compute_s: l.compute_s + l.page_in_s + l.page_out_s })
            .collect();
        projected_seconds(&times)
    }
}

/// Runs `plan` on `dev`: for each layer, its computes over every chunk (paged chunks in, computed,
/// out, alternating the two staging buffers), then the next layer's upload into the other
/// buffer, then a host wait for this layer's computes.
///
/// # Errors
///
/// The device's.
pub fn run<D: LayerDevice>(dev: &mut D, plan: &StreamPlan) -> Result<StreamReport> {
    let n = plan.inputs.layer_bytes.len();
    dev.reserve(plan)?;
    let t0 = dev.clock();
    let mut uploads: Vec<Span<D::Event>> = Vec::with_capacity(n);
    uploads.push(dev.upload(0, 0, &[])?);
    // The last compute that read each layer buffer; each chunk's last write (compute or page-out);
    // the last page-out of each staging buffer.
    let mut slot_reader: [Option<D::Event>; 2] = [None, None];
    let mut chunk_ready: Vec<Option<D::Event>> = vec![None; plan.chunks.len()];
    let mut staging_free: [Option<D::Event>; 2] = [None, None];
    // Per layer: its computes, page-ins and page-outs (their times are read at the end).
    let mut work: Vec<[Vec<Span<D::Event>>; 3]> = Vec::with_capacity(n);
    let mut next_staging = 0usize;
    for layer in 0..n {
        let slot = layer % 2;
        let up_end = uploads[layer].end.clone();
        let [mut computes, mut ins, mut outs] = [Vec::new(), Vec::new(), Vec::new()];
        for (chunk, place) in plan.chunks.iter().enumerate() {
            let span = match place {
                ChunkPlace::Resident(r) => {
                    let after: Vec<D::Event> =
                        std::iter::once(up_end.clone()).chain(chunk_ready[chunk].clone()).collect();
                    let span = dev.compute(layer, slot, chunk, ActSlot::Resident(*r), &after)?;
                    chunk_ready[chunk] = Some(span.end.clone());
                    span
                }
                ChunkPlace::Paged => {
                    let s = next_staging;
                    next_staging = (next_staging + 1) % 2;
                    let after: Vec<D::Event> =
                        chunk_ready[chunk].iter().chain(staging_free[s].iter()).cloned().collect();
                    let pin = dev.page_in(chunk, s, &after)?;
                    let span =
                        dev.compute(layer, slot, chunk, ActSlot::Staging(s), &[up_end.clone(), pin.end.clone()])?;
                    let pout = dev.page_out(chunk, s, std::slice::from_ref(&span.end))?;
                    chunk_ready[chunk] = Some(pout.end.clone());
                    staging_free[s] = Some(pout.end.clone());
                    ins.push(pin);
                    outs.push(pout);
                    span
                }
            };
            slot_reader[slot] = Some(span.end.clone());
            computes.push(span);
        }
        // The next layer's upload, into the buffer layer - 1 read: issued before the host waits
        // for this layer, it runs while this layer computes.
        if layer + 1 < n {
            let next = (layer + 1) % 2;
            let after: Vec<D::Event> = slot_reader[next].iter().cloned().collect();
            uploads.push(dev.upload(layer + 1, next, &after)?);
        }
        if let Some(last) = computes.last() {
            dev.wait(&last.end)?;
        }
        work.push([computes, ins, outs]);
    }
    // Page-outs run on their own stream: the run ends when the last one has.
    if let Some(last) = work.iter().rev().find_map(|[_, _, outs]| outs.last()) {
        dev.wait(&last.end)?;
    }
    let total_s = dev.clock() - t0;
    let mut layers = Vec::with_capacity(n);
    for (layer, ([computes, ins, outs], upload)) in work.iter().zip(&uploads).enumerate() {
        let mut sum = |spans: &[Span<D::Event>]| -> Result<f64> { spans.iter().map(|s| dev.seconds(s)).sum() };
        let (compute_s, page_in_s, page_out_s) = (sum(computes)?, sum(ins)?, sum(outs)?);
        layers.push(LayerReport { layer, upload_s: dev.seconds(upload)?, compute_s, page_in_s, page_out_s });
    }
    Ok(StreamReport { plan: plan.clone(), layers, total_s })
}

/// One layer's measured (or assumed) device times.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LayerTimes {
    /// Seconds to upload its stored weights.
    pub upload_s: f64,
    /// Seconds of its compute over all tokens.
    pub compute_s: f64,
}

/// The time model of the two-buffer pipeline: layer `L`'s upload starts when layer `L - 1`'s
/// upload has ended and layer `L - 2`'s compute (the last reader of its buffer) has ended; its
/// compute starts when its upload and layer `L - 1`'s compute have ended. Returns the end of the
/// last compute: between `max(Σ upload, Σ compute)` and `Σ (upload + compute)`.
pub fn projected_seconds(layers: &[LayerTimes]) -> f64 {
    let (mut up_end, mut comp_end) = (Vec::with_capacity(layers.len()), Vec::with_capacity(layers.len()));
    for (l, t) in layers.iter().enumerate() {
        let prev_up: f64 = if l >= 1 { up_end[l - 1] } else { 0.0 };
        let buffer_free: f64 = if l >= 2 { comp_end[l - 2] } else { 0.0 };
        let u = prev_up.max(buffer_free) + t.upload_s;
        let prev_comp: f64 = if l >= 1 { comp_end[l - 1] } else { 0.0 };
        up_end.push(u);
        comp_end.push(prev_comp.max(u) + t.compute_s);
    }
    comp_end.last().copied().unwrap_or(0.0)
}

/// A model's per-layer times from measured kinds: `dense` for its first `n_dense` layers, then
/// `moe` for `n_moe` (DeepSeek-V3: 3 dense and 58 MoE layers).
pub fn layer_pattern(dense: LayerTimes, n_dense: usize, moe: LayerTimes, n_moe: usize) -> Vec<LayerTimes> {
    std::iter::repeat_n(dense, n_dense).chain(std::iter::repeat_n(moe, n_moe)).collect()
}

#[cfg(test)]
mod tests;
