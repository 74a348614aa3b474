//! The GPU [`LayerDevice`] (cudarc, loaded dynamically): three streams beside the device's
//! compute stream (layer uploads, page-ins, page-outs), CUDA events for every dependency and
//! timing, layers copied from their stored bytes into two pinned host buffers and from there
//! asynchronously into the two device layer buffers, paged chunks kept in pinned host memory.
//!
//! Compiled, not yet run on a GPU (see cuda-runtime/NOTES.md). Everything here runs on the
//! thread that opened the [`Device`].

use std::ffi::c_void;
use std::ptr;
use std::rc::Rc;
use std::time::Instant;

use cudarc::driver::sys;
use fp8forge_kernels::cuda::{Device, DeviceBuffer, DeviceSlice, check};

use super::{ActSlot, ChunkPlace, LayerDevice, Span, StreamPlan};
use crate::{CudaRuntimeError, Result};

/// The kernels crate's checked driver call, as this crate's error.
fn cu(call: &str, r: sys::CUresult) -> Result<()> {
    Ok(check(call, r)?)
}

/// Where the layers' stored bytes come from (e.g. the tensors of a layer as mapped from the
/// checkpoint's safetensors files, FP8 codes and scales or BF16, as stored).
pub trait LayerBytes {
    /// Calls `put` with each piece of layer `layer`'s bytes, in the order the layer's compute
    /// expects them in its buffer.
    ///
    /// # Errors
    ///
    /// The source's (a file that cannot be read).
    fn pieces(&self, layer: usize, put: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()>;
}

/// What computes a layer: enqueues its kernels on the device's stream.
pub trait LayerKernels {
    /// Enqueues layer `layer` over one chunk of activations: its weights as uploaded in
    /// `weights`, the chunk's hidden states in `act` (read and written in place), scratch in
    /// `workspace`.
    ///
    /// # Errors
    ///
    /// A refused shape or a failed launch.
    fn compute(
        &mut self,
        dev: &Device,
        layer: usize,
        weights: DeviceSlice<u8>,
        act: DeviceSlice<u8>,
        workspace: DeviceSlice<u8>,
    ) -> Result<()>;
}

struct Stream(sys::CUstream);

impl Stream {
    fn new() -> Result<Stream> {
        let mut s = ptr::null_mut();
        // SAFETY: valid out-pointer; the context is current on this thread (the Device's).
        cu("cuStreamCreate", unsafe {
            sys::cuStreamCreate(&mut s, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
        })?;
        Ok(Stream(s))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: created by cuStreamCreate, destroyed once, after its work.
        unsafe {
            sys::cuStreamSynchronize(self.0);
            sys::cuStreamDestroy_v2(self.0);
        }
    }
}

struct RawEvent(sys::CUevent);

impl Drop for RawEvent {
    fn drop(&mut self) {
        // SAFETY: created by cuEventCreate, destroyed once.
        unsafe {
            sys::cuEventDestroy_v2(self.0);
        }
    }
}

/// A recorded CUDA event (shared: the scheduler keeps copies as dependencies).
#[derive(Clone)]
pub struct CudaEvent(Rc<RawEvent>);

/// Pinned (page-locked) host memory, freed on drop.
struct Pinned {
    ptr: *mut u8,
    len: usize,
}

impl Pinned {
    fn new(len: usize) -> Result<Pinned> {
        let mut p: *mut c_void = ptr::null_mut();
        // SAFETY: valid out-pointer, current context.
        cu(&format!("cuMemHostAlloc({len} bytes)"), unsafe { sys::cuMemHostAlloc(&mut p, len.max(1), 0) })?;
        Ok(Pinned { ptr: p.cast(), len })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `len` bytes allocated by cuMemHostAlloc, owned by this value.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: allocated by cuMemHostAlloc, freed once (after the streams' work: see
        // CudaLayerDevice's Drop).
        unsafe {
            sys::cuMemFreeHost(self.ptr.cast());
        }
    }
}

/// The GPU device of the layer-streaming scheduler.
pub struct CudaLayerDevice<'d, S, K> {
    dev: &'d Device,
    source: S,
    kernels: K,
    t0: Instant,
    layer_bufs: Vec<DeviceBuffer<u8>>,
    layer_len: [usize; 2],
    workspace: Option<DeviceBuffer<u8>>,
    resident: Vec<DeviceBuffer<u8>>,
    staging: Vec<DeviceBuffer<u8>>,
    /// The last upload from each pinned buffer (it may be refilled once that has happened).
    pinned_free: [Option<CudaEvent>; 2],
    pinned: Vec<Pinned>,
    /// Host copies of paged chunks (None for resident ones).
    host_chunks: Vec<Option<Pinned>>,
    upload: Stream,
    page_in: Stream,
    page_out: Stream,
}

impl<'d, S: LayerBytes, K: LayerKernels> CudaLayerDevice<'d, S, K> {
    /// A device streaming `source`'s layers through `kernels` on `dev`.
    ///
    /// # Errors
    ///
    /// [`CudaRuntimeError::Kernel`] when a stream cannot be created.
    pub fn new(dev: &'d Device, source: S, kernels: K) -> Result<Self> {
        Ok(CudaLayerDevice {
            dev,
            source,
            kernels,
            t0: Instant::now(),
            layer_bufs: Vec::new(),
            layer_len: [0; 2],
            workspace: None,
            resident: Vec::new(),
            staging: Vec::new(),
            pinned_free: [None, None],
            pinned: Vec::new(),
            host_chunks: Vec::new(),
            upload: Stream::new()?,
            page_in: Stream::new()?,
            page_out: Stream::new()?,
        })
    }

    /// Chunk `chunk`'s activations where they live between layers: its resident device buffer,
    /// or its pinned host copy (after [`LayerDevice::reserve`]), to fill before a run and read
    /// after it.
    pub fn chunk(&mut self, chunk: usize, plan: &StreamPlan) -> Option<ChunkMemory<'_>> {
        match plan.chunks.get(chunk)? {
            ChunkPlace::Resident(r) => self.resident.get(*r).map(|b| ChunkMemory::Device(b.all())),
            ChunkPlace::Paged => self.host_chunks.get_mut(chunk)?.as_mut().map(|p| ChunkMemory::Host(p.as_mut_slice())),
        }
    }

    fn event(&self) -> Result<CudaEvent> {
        let mut e = ptr::null_mut();
        // SAFETY: valid out-pointer, current context.
        cu("cuEventCreate", unsafe { sys::cuEventCreate(&mut e, 0) })?;
        Ok(CudaEvent(Rc::new(RawEvent(e))))
    }

    /// Makes `stream` wait for `after`, records a start event, runs `work` (which enqueues on
    /// `stream`), records an end event.
    fn enqueue(
        &mut self,
        stream: sys::CUstream,
        after: &[CudaEvent],
        work: impl FnOnce(&mut Self) -> Result<()>,
    ) -> Result<Span<CudaEvent>> {
        for e in after {
            // SAFETY: live stream and event.
            cu("cuStreamWaitEvent", unsafe { sys::cuStreamWaitEvent(stream, e.0.0, 0) })?;
        }
        let (start, end) = (self.event()?, self.event()?);
        // SAFETY: live event and stream.
        cu("cuEventRecord", unsafe { sys::cuEventRecord(start.0.0, stream) })?;
        work(self)?;
        // SAFETY: live event and stream.
        cu("cuEventRecord", unsafe { sys::cuEventRecord(end.0.0, stream) })?;
        Ok(Span { start, end })
    }
}

/// Where a chunk's activations are between layers.
pub enum ChunkMemory<'a> {
    /// A resident chunk's device buffer.
    Device(DeviceSlice<'a, u8>),
    /// A paged chunk's pinned host copy.
    Host(&'a mut [u8]),
}

fn usize_of(what: &str, v: u64) -> Result<usize> {
    usize::try_from(v)
        .map_err(|_| CudaRuntimeError::Plan { detail: format!("{what} of {v} bytes exceeds the address space") })
}

impl<S: LayerBytes, K: LayerKernels> LayerDevice for CudaLayerDevice<'_, S, K> {
    type Event = CudaEvent;

    fn reserve(&mut self, plan: &StreamPlan) -> Result<()> {
        let buffer = usize_of("a layer buffer", plan.layer_buffer)?;
        let chunk = usize_of("a chunk", plan.inputs.chunk_bytes)?;
        self.layer_bufs = (0..plan.layer_buffers).map(|_| self.dev.alloc::<u8>(buffer)).collect::<Result<_, _>>()?;
        self.pinned = (0..plan.layer_buffers).map(|_| Pinned::new(buffer)).collect::<Result<_>>()?;
        self.workspace = Some(self.dev.alloc::<u8>(usize_of("the workspace", plan.inputs.workspace)?)?);
        self.resident = (0..plan.resident()).map(|_| self.dev.alloc::<u8>(chunk)).collect::<Result<_, _>>()?;
        self.staging = (0..plan.staging).map(|_| self.dev.alloc::<u8>(chunk)).collect::<Result<_, _>>()?;
        self.host_chunks = plan
            .chunks
            .iter()
            .map(|c| if *c == ChunkPlace::Paged { Pinned::new(chunk).map(Some) } else { Ok(None) })
            .collect::<Result<_>>()?;
        self.t0 = Instant::now();
        Ok(())
    }

    fn upload(&mut self, layer: usize, slot: usize, after: &[CudaEvent]) -> Result<Span<CudaEvent>> {
        let bad = |detail: String| CudaRuntimeError::Plan { detail };
        if slot >= self.layer_bufs.len() {
            return Err(bad(format!("upload of layer {layer} into buffer {slot} of {}", self.layer_bufs.len())));
        }
        // The pinned buffer may be refilled once its previous copy to the device has happened.
        if let Some(e) = self.pinned_free[slot].take() {
            // SAFETY: live event.
            cu("cuEventSynchronize", unsafe { sys::cuEventSynchronize(e.0.0) })?;
        }
        let mut len = 0usize;
        {
            let pinned = self.pinned[slot].as_mut_slice();
            let capacity = pinned.len();
            self.source.pieces(layer, &mut |piece: &[u8]| {
                let end = len + piece.len();
                let dst = pinned.get_mut(len..end).ok_or_else(|| CudaRuntimeError::Plan {
                    detail: format!("layer {layer} has more than the {capacity} bytes of a layer buffer"),
                })?;
                dst.copy_from_slice(piece);
                len = end;
                Ok(())
            })?;
        }
        self.layer_len[slot] = len;
        let (dst, src, stream) = (self.layer_bufs[slot].all().ptr(), self.pinned[slot].ptr, self.upload.0);
        let span = self.enqueue(stream, after, |_| {
            // SAFETY: `len` bytes of pinned memory, owned by self and kept until this copy's end
            // event (pinned_free) has happened; the device buffer holds at least `len` bytes.
            cu("cuMemcpyHtoDAsync(layer)", unsafe { sys::cuMemcpyHtoDAsync_v2(dst, src.cast(), len, stream) })
        })?;
        self.pinned_free[slot] = Some(span.end.clone());
        Ok(span)
    }

    fn compute(
        &mut self,
        layer: usize,
        slot: usize,
        chunk: usize,
        act: ActSlot,
        after: &[CudaEvent],
    ) -> Result<Span<CudaEvent>> {
        let stream = self.dev.stream();
        self.enqueue(stream, after, |me| {
            let missing = |what: String| CudaRuntimeError::Plan {
                detail: format!("compute of layer {layer}, chunk {chunk}: {what}"),
            };
            let weights = me.layer_bufs.get(slot).ok_or_else(|| missing(format!("no layer buffer {slot}")))?;
            let weights = weights.slice(0, me.layer_len[slot.min(1)]);
            let act = match act {
                ActSlot::Resident(r) => me.resident.get(r).map(|b| b.all()),
                ActSlot::Staging(s) => me.staging.get(s).map(|b| b.all()),
            }
            .ok_or_else(|| missing(format!("no activation buffer {act:?}")))?;
            let ws = me.workspace.as_ref().ok_or_else(|| missing("no workspace (reserve first)".into()))?.all();
            me.kernels.compute(me.dev, layer, weights, act, ws)
        })
    }

    fn page_in(&mut self, chunk: usize, staging: usize, after: &[CudaEvent]) -> Result<Span<CudaEvent>> {
        let stream = self.page_in.0;
        let (dst, src, len) = self.paging(chunk, staging)?;
        self.enqueue(stream, after, |_| {
            // SAFETY: both ranges hold `len` bytes and live as long as self.
            cu("cuMemcpyHtoDAsync(page-in)", unsafe { sys::cuMemcpyHtoDAsync_v2(dst, src.cast(), len, stream) })
        })
    }

    fn page_out(&mut self, chunk: usize, staging: usize, after: &[CudaEvent]) -> Result<Span<CudaEvent>> {
        let stream = self.page_out.0;
        let (src, dst, len) = self.paging(chunk, staging)?;
        self.enqueue(stream, after, |_| {
            // SAFETY: both ranges hold `len` bytes and live as long as self.
            cu("cuMemcpyDtoHAsync(page-out)", unsafe { sys::cuMemcpyDtoHAsync_v2(dst.cast(), src, len, stream) })
        })
    }

    fn wait(&mut self, event: &CudaEvent) -> Result<()> {
        // SAFETY: live event.
        cu("cuEventSynchronize", unsafe { sys::cuEventSynchronize(event.0.0) })
    }

    fn seconds(&mut self, span: &Span<CudaEvent>) -> Result<f64> {
        let mut ms = 0f32;
        // SAFETY: live events recorded on one stream; the end has happened (or this waits).
        unsafe {
            cu("cuEventSynchronize", sys::cuEventSynchronize(span.end.0.0))?;
            cu("cuEventElapsedTime", sys::cuEventElapsedTime_v2(&mut ms, span.start.0.0, span.end.0.0))?;
        }
        Ok(f64::from(ms) / 1e3)
    }

    fn clock(&mut self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }
}

impl<S, K> Drop for CudaLayerDevice<'_, S, K> {
    fn drop(&mut self) {
        // Every stream's work ends before any buffer it reads or writes is freed.
        // SAFETY: live streams.
        unsafe {
            for s in [&self.upload, &self.page_in, &self.page_out] {
                sys::cuStreamSynchronize(s.0);
            }
        }
        let _ = self.dev.synchronize();
    }
}

impl<S, K> CudaLayerDevice<'_, S, K> {
    /// Staging buffer `staging`'s device address, chunk `chunk`'s pinned host copy, the length.
    fn paging(&mut self, chunk: usize, staging: usize) -> Result<(u64, *mut u8, usize)> {
        let missing =
            || CudaRuntimeError::Plan { detail: format!("chunk {chunk} is not paged through staging {staging}") };
        let dev = self.staging.get(staging).ok_or_else(missing)?.all().ptr();
        let host = self.host_chunks.get_mut(chunk).and_then(|h| h.as_mut()).ok_or_else(missing)?;
        Ok((dev, host.ptr, host.len))
    }
}
