//! A simulated [`LayerDevice`]: each stream (uploads, page-ins, computes, page-outs) runs its
//! operations in order, each starting when its stream, the host (when it was issued) and the
//! events it waits for allow, and lasting the time [`SimCosts`] gives. Every operation is
//! recorded ([`SimDevice::log`]) and checked against what the real device needs, the breaches
//! collected in [`SimDevice::violations`]:
//!
//! - at most two layer buffers; an upload never starts before the last compute that read its
//!   buffer has ended; a compute reads the layer it asks for, uploaded before it starts;
//! - the plan's memory within the device's;
//! - every chunk's activations current: a compute works on the copy holding exactly the layers
//!   before it, a page-in reads the host copy after the page-out that wrote it, a staging buffer
//!   is not refilled before it was paged out.
//!
//! Not modelled: uploads and page-ins sharing the host-to-device link (they run as two streams),
//! launch latencies.

use super::{ActSlot, ChunkPlace, LayerDevice, Span, StreamPlan};
use crate::{CudaRuntimeError, Result};

/// The simulated durations.
#[derive(Clone, Debug, PartialEq)]
pub struct SimCosts {
    /// Seconds to upload each layer.
    pub upload_s: Vec<f64>,
    /// Seconds of each layer's compute over one chunk.
    pub compute_s: Vec<f64>,
    /// Seconds to page one chunk in.
    pub page_in_s: f64,
    /// Seconds to page one chunk out.
    pub page_out_s: f64,
}

impl SimCosts {
    /// Uploads at `bytes_per_s` of each layer's stored bytes, computes of `compute_s` per layer
    /// and chunk, paging at `bytes_per_s` of `chunk_bytes`.
    pub fn from_rates(layer_bytes: &[u64], bytes_per_s: f64, compute_s: &[f64], chunk_bytes: u64) -> SimCosts {
        let page = chunk_bytes as f64 / bytes_per_s;
        SimCosts {
            upload_s: layer_bytes.iter().map(|&b| b as f64 / bytes_per_s).collect(),
            compute_s: compute_s.to_vec(),
            page_in_s: page,
            page_out_s: page,
        }
    }
}

/// A simulated stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimStream {
    /// Layer uploads (host to device).
    Upload,
    /// Activation page-ins (host to device).
    PageIn,
    /// Computes.
    Compute,
    /// Activation page-outs (device to host).
    PageOut,
}

/// A recorded operation.
#[derive(Clone, Debug, PartialEq)]
pub enum SimOp {
    /// Buffers allocated for a plan.
    Reserve {
        /// Bytes.
        bytes: u64,
    },
    /// A layer upload.
    Upload {
        /// The layer.
        layer: usize,
        /// Its buffer.
        slot: usize,
    },
    /// A layer's compute over one chunk.
    Compute {
        /// The layer.
        layer: usize,
        /// Its buffer.
        slot: usize,
        /// The chunk.
        chunk: usize,
        /// Where the chunk's activations were.
        act: ActSlot,
    },
    /// A chunk paged in.
    PageIn {
        /// The chunk.
        chunk: usize,
        /// The staging buffer.
        staging: usize,
    },
    /// A chunk paged out.
    PageOut {
        /// The chunk.
        chunk: usize,
        /// The staging buffer.
        staging: usize,
    },
    /// The host waited for the end of the operation recorded at `record`.
    Wait {
        /// Index in the log of the operation waited for.
        record: usize,
    },
}

/// One line of the log: what, when the host issued it, when it ran (simulated seconds).
#[derive(Clone, Debug, PartialEq)]
pub struct SimRecord {
    /// The operation.
    pub op: SimOp,
    /// The host's clock when it was issued.
    pub issued: f64,
    /// Start on its stream (for a wait: when the host resumed).
    pub start: f64,
    /// End.
    pub end: f64,
}

/// An event of the simulated device: a time, and the log line that recorded it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SimEvent {
    /// Simulated seconds.
    pub at: f64,
    /// Index in the log.
    pub record: usize,
}

/// The simulated device (see the module's documentation).
#[derive(Clone, Debug)]
pub struct SimDevice {
    costs: SimCosts,
    memory: u64,
    clocks: [f64; 4],
    host: f64,
    /// Every operation, in the order issued.
    pub log: Vec<SimRecord>,
    /// Every breach of an invariant, as a sentence.
    pub violations: Vec<String>,
    plan: Option<StreamPlan>,
    /// Per layer buffer: the layer in it, when its upload ends, when its last reader ends.
    slot_layer: [Option<(usize, f64)>; 2],
    slot_read_until: [f64; 2],
    /// Per chunk: layers applied to its newest copy, and where that copy is.
    chunk_layers: Vec<usize>,
    /// Per chunk: layers applied to its host copy and when that copy was written.
    host_copy: Vec<(usize, f64)>,
    /// Per staging buffer: the chunk in it, layers applied, when it is ready, when it was paged out.
    staging: [Option<(usize, usize, f64)>; 2],
    staging_free_at: [f64; 2],
}

impl SimDevice {
    /// A device of `memory` bytes with the given durations.
    pub fn new(memory: u64, costs: SimCosts) -> SimDevice {
        SimDevice {
            costs,
            memory,
            clocks: [0.0; 4],
            host: 0.0,
            log: Vec::new(),
            violations: Vec::new(),
            plan: None,
            slot_layer: [None, None],
            slot_read_until: [0.0; 2],
            chunk_layers: Vec::new(),
            host_copy: Vec::new(),
            staging: [None, None],
            staging_free_at: [0.0; 2],
        }
    }

    /// Layers applied to chunk `chunk`'s newest copy (after a run: all of them).
    pub fn chunk_layers(&self, chunk: usize) -> Option<usize> {
        self.chunk_layers.get(chunk).copied()
    }

    /// The log lines of `op`s matching `f`, with their indices.
    pub fn find(&self, f: impl Fn(&SimOp) -> bool) -> Vec<(usize, &SimRecord)> {
        self.log.iter().enumerate().filter(|(_, r)| f(&r.op)).collect()
    }

    fn schedule(&mut self, stream: SimStream, op: SimOp, after: &[SimEvent], seconds: f64) -> Span<SimEvent> {
        let s = stream as usize;
        let start = after.iter().map(|e| e.at).fold(self.clocks[s].max(self.host), f64::max);
        let end = start + seconds;
        self.clocks[s] = end;
        let record = self.log.len();
        self.log.push(SimRecord { op, issued: self.host, start, end });
        Span { start: SimEvent { at: start, record }, end: SimEvent { at: end, record } }
    }

    fn cost(&mut self, what: &str, v: Option<f64>) -> f64 {
        v.unwrap_or_else(|| {
            self.violations.push(format!("no simulated duration for {what}"));
            0.0
        })
    }
}

impl LayerDevice for SimDevice {
    type Event = SimEvent;

    fn reserve(&mut self, plan: &StreamPlan) -> Result<()> {
        let bytes = plan.device_bytes();
        self.log.push(SimRecord { op: SimOp::Reserve { bytes }, issued: self.host, start: self.host, end: self.host });
        if plan.layer_buffers > 2 {
            self.violations.push(format!("{} layer buffers reserved", plan.layer_buffers));
        }
        if let Some((l, b)) = plan.inputs.layer_bytes.iter().enumerate().find(|&(_, &b)| b > plan.layer_buffer) {
            self.violations.push(format!("layer {l} ({b} bytes) does not fit a layer buffer of {}", plan.layer_buffer));
        }
        if bytes > self.memory || bytes > plan.inputs.budget {
            return Err(CudaRuntimeError::Plan {
                detail: format!(
                    "simulated device: plan needs {bytes} bytes, budget {} of {} bytes",
                    plan.inputs.budget, self.memory
                ),
            });
        }
        self.chunk_layers = vec![0; plan.chunks.len()];
        self.host_copy = vec![(0, 0.0); plan.chunks.len()];
        self.plan = Some(plan.clone());
        Ok(())
    }

    fn upload(&mut self, layer: usize, slot: usize, after: &[SimEvent]) -> Result<Span<SimEvent>> {
        let buffers = self.plan.as_ref().map_or(0, |p| p.layer_buffers);
        if slot >= buffers {
            self.violations.push(format!("upload of layer {layer} into buffer {slot} of {buffers}"));
        }
        let d = self.cost("an upload", self.costs.upload_s.get(layer).copied());
        let span = self.schedule(SimStream::Upload, SimOp::Upload { layer, slot }, after, d);
        let s = slot.min(1);
        if span.start.at < self.slot_read_until[s] {
            self.violations.push(format!(
                "upload of layer {layer} into buffer {slot} starts at {:.6} s, before its last reader ends at {:.6} s",
                span.start.at, self.slot_read_until[s]
            ));
        }
        self.slot_layer[s] = Some((layer, span.end.at));
        Ok(span)
    }

    fn compute(
        &mut self,
        layer: usize,
        slot: usize,
        chunk: usize,
        act: ActSlot,
        after: &[SimEvent],
    ) -> Result<Span<SimEvent>> {
        let d = self.cost("a compute", self.costs.compute_s.get(layer).copied());
        let span = self.schedule(SimStream::Compute, SimOp::Compute { layer, slot, chunk, act }, after, d);
        let s = slot.min(1);
        match self.slot_layer[s] {
            Some((l, ready)) if l == layer && span.start.at >= ready => {}
            other => self.violations.push(format!(
                "compute of layer {layer} at {:.6} s reads buffer {slot} holding {other:?} (layer, upload end)",
                span.start.at
            )),
        }
        self.slot_read_until[s] = self.slot_read_until[s].max(span.end.at);
        let place = self.plan.as_ref().and_then(|p| p.chunks.get(chunk).copied());
        let applied = self.chunk_layers.get(chunk).copied();
        match act {
            ActSlot::Resident(r) => {
                if place != Some(ChunkPlace::Resident(r)) {
                    self.violations.push(format!("chunk {chunk} computed in resident buffer {r}, planned {place:?}"));
                }
                if applied != Some(layer) {
                    self.violations.push(format!("layer {layer} computed on chunk {chunk} holding {applied:?} layers"));
                }
            }
            ActSlot::Staging(st) => match self.staging.get(st).copied().flatten() {
                Some((c, l, ready)) if c == chunk && l == layer && span.start.at >= ready => {
                    self.staging[st] = Some((c, l + 1, span.end.at));
                }
                other => self.violations.push(format!(
                    "layer {layer} computed on chunk {chunk} in staging {st} holding {other:?} (chunk, layers, ready)"
                )),
            },
        }
        if let Some(a) = self.chunk_layers.get_mut(chunk) {
            *a = layer + 1;
        }
        Ok(span)
    }

    fn page_in(&mut self, chunk: usize, staging: usize, after: &[SimEvent]) -> Result<Span<SimEvent>> {
        let d = self.costs.page_in_s;
        let span = self.schedule(SimStream::PageIn, SimOp::PageIn { chunk, staging }, after, d);
        let st = staging.min(1);
        if staging > 1 || span.start.at < self.staging_free_at[st] {
            self.violations.push(format!(
                "page-in of chunk {chunk} into staging {staging} at {:.6} s, before it was paged out at {:.6} s",
                span.start.at, self.staging_free_at[st]
            ));
        }
        let (layers, written) = self.host_copy.get(chunk).copied().unwrap_or((usize::MAX, 0.0));
        if span.start.at < written || Some(layers) != self.chunk_layers.get(chunk).copied() {
            self.violations.push(format!(
                "page-in of chunk {chunk} at {:.6} s reads a host copy of {layers} layers written at {written:.6} s",
                span.start.at
            ));
        }
        self.staging[st] = Some((chunk, layers, span.end.at));
        Ok(span)
    }

    fn page_out(&mut self, chunk: usize, staging: usize, after: &[SimEvent]) -> Result<Span<SimEvent>> {
        let d = self.costs.page_out_s;
        let span = self.schedule(SimStream::PageOut, SimOp::PageOut { chunk, staging }, after, d);
        let st = staging.min(1);
        match self.staging[st] {
            Some((c, layers, ready)) if c == chunk && span.start.at >= ready => {
                if let Some(h) = self.host_copy.get_mut(chunk) {
                    *h = (layers, span.end.at);
                }
            }
            other => self.violations.push(format!(
                "page-out of chunk {chunk} from staging {staging} at {:.6} s holding {other:?}",
                span.start.at
            )),
        }
        self.staging_free_at[st] = span.end.at;
        Ok(span)
    }

    fn wait(&mut self, event: &SimEvent) -> Result<()> {
        self.host = self.host.max(event.at);
        let rec =
            SimRecord { op: SimOp::Wait { record: event.record }, issued: self.host, start: self.host, end: self.host };
        self.log.push(rec);
        Ok(())
    }

    fn seconds(&mut self, span: &Span<SimEvent>) -> Result<f64> {
        Ok(span.end.at - span.start.at)
    }

    fn clock(&mut self) -> f64 {
        self.host
    }
}
