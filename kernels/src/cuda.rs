//! A thin, checked layer over the CUDA driver API (cudarc's `driver::sys`, loaded dynamically):
//! the device and its primary context, device memory, modules, launches, events and graphs.
//! Every call's status is checked and turned into [`KernelError::Cuda`] naming the call.
//!
//! Everything here runs on the thread that opened the [`Device`] (the context is made current
//! there); the handles are not `Send`. Every copy, fill and launch goes to the device's one
//! stream, in order: the stream is non-blocking, so work on the legacy default stream would not
//! be ordered with it.

use std::ffi::{CStr, CString, c_void};
use std::marker::PhantomData;
use std::ptr;
use std::time::{Duration, Instant};

use cudarc::driver::sys::{self, CUresult};

use crate::config::GpuArch;
use crate::error::KernelError;

/// Turns a driver status into a result naming `call` (public for the crates that make driver
/// calls of their own, e.g. fp8forge-cuda-runtime's streams and pinned memory).
///
/// # Errors
///
/// [`KernelError::Cuda`] naming `call` and the driver's error.
pub fn check(call: &str, r: CUresult) -> Result<(), KernelError> {
    if r == CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    Err(KernelError::Cuda { call: call.to_string(), status: describe(r), context_lost: loses_context(r) })
}

/// True for the errors after which the CUDA context is unusable (a kernel faulted): every later
/// call in the process fails too, so a caller should stop using the device.
fn loses_context(r: CUresult) -> bool {
    use CUresult as R;
    matches!(
        r,
        R::CUDA_ERROR_ILLEGAL_ADDRESS
            | R::CUDA_ERROR_LAUNCH_TIMEOUT
            | R::CUDA_ERROR_HARDWARE_STACK_ERROR
            | R::CUDA_ERROR_ILLEGAL_INSTRUCTION
            | R::CUDA_ERROR_MISALIGNED_ADDRESS
            | R::CUDA_ERROR_INVALID_ADDRESS_SPACE
            | R::CUDA_ERROR_INVALID_PC
            | R::CUDA_ERROR_LAUNCH_FAILED
            | R::CUDA_ERROR_ASSERT
            | R::CUDA_ERROR_CONTEXT_IS_DESTROYED
    )
}

fn describe(r: CUresult) -> String {
    let (mut name, mut text): (*const std::ffi::c_char, *const std::ffi::c_char) = (ptr::null(), ptr::null());
    // SAFETY: the driver is loaded (a CUresult came from it); both calls write static strings.
    unsafe {
        sys::cuGetErrorName(r, &mut name);
        sys::cuGetErrorString(r, &mut text);
    }
    let s = |p: *const std::ffi::c_char| {
        // SAFETY: non-null pointers from the driver are NUL-terminated static strings.
        if p.is_null() { String::new() } else { unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned() }
    };
    match (s(name), s(text)) {
        (n, t) if n.is_empty() => format!("{r:?} {t}"),
        (n, t) => format!("{n}: {t}"),
    }
}

/// What the device is.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeviceInfo {
    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors.
    pub sms: u32,
    /// L2 cache, bytes.
    pub l2_bytes: u64,
    /// Largest dynamic shared memory a block may opt into, bytes.
    pub max_smem_optin: u32,
    /// The driver's CUDA version (e.g. 13000).
    pub driver_version: i32,
}

/// An open CUDA device: its primary context (current on this thread) and one stream.
pub struct Device {
    dev: sys::CUdevice,
    stream: sys::CUstream,
    /// What the device is.
    pub info: DeviceInfo,
    _not_send: PhantomData<*const ()>,
}

impl Device {
    /// Opens device `ordinal`: loads the driver (checking first that libcuda exists, so there is
    /// no panic on a machine without one), retains the primary context, makes it current, and
    /// creates a stream.
    ///
    /// # Errors
    ///
    /// [`KernelError::NoCudaDriver`] without libcuda, [`KernelError::NoDevice`] when the driver
    /// finds no such device, [`KernelError::Cuda`] for a failed call.
    pub fn open(ordinal: usize) -> Result<Device, KernelError> {
        crate::nvrtc::library_loads("cuda").map_err(|e| KernelError::NoCudaDriver { detail: e.tried })?;
        // SAFETY: libcuda is loadable; every out-pointer is valid.
        unsafe {
            let r = sys::cuInit(0);
            if r != CUresult::CUDA_SUCCESS {
                return Err(KernelError::NoDevice { detail: format!("cuInit: {}", describe(r)) });
            }
            let mut count = 0;
            check("cuDeviceGetCount", sys::cuDeviceGetCount(&mut count))?;
            if ordinal >= count as usize {
                return Err(KernelError::NoDevice { detail: format!("device {ordinal} asked for, {count} present") });
            }
            let mut dev = 0;
            check("cuDeviceGet", sys::cuDeviceGet(&mut dev, ordinal as i32))?;
            let mut ctx = ptr::null_mut();
            check("cuDevicePrimaryCtxRetain", sys::cuDevicePrimaryCtxRetain(&mut ctx, dev))?;
            check("cuCtxSetCurrent", sys::cuCtxSetCurrent(ctx))?;
            let attr = |a: sys::CUdevice_attribute| -> Result<i32, KernelError> {
                let mut v = 0;
                check("cuDeviceGetAttribute", sys::cuDeviceGetAttribute(&mut v, a, dev))?;
                Ok(v)
            };
            use sys::CUdevice_attribute as A;
            let major = attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
            let minor = attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
            let sms = attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
            let l2 = attr(A::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)? as u64;
            let smem = attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as u32;
            let mut name = [0 as std::ffi::c_char; 256];
            check("cuDeviceGetName", sys::cuDeviceGetName(name.as_mut_ptr(), name.len() as i32, dev))?;
            let name = CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned();
            let mut driver_version = 0;
            check("cuDriverGetVersion", sys::cuDriverGetVersion(&mut driver_version))?;
            let mut stream = ptr::null_mut();
            check(
                "cuStreamCreate",
                sys::cuStreamCreate(&mut stream, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32),
            )?;
            Ok(Device {
                dev,
                stream,
                info: DeviceInfo {
                    name,
                    compute_capability: (major, minor),
                    sms,
                    l2_bytes: l2,
                    max_smem_optin: smem,
                    driver_version,
                },
                _not_send: PhantomData,
            })
        }
    }

    /// The architecture kernels are built for on this device, if it is one the kernels support.
    pub fn arch(&self) -> Option<GpuArch> {
        let (major, minor) = self.info.compute_capability;
        GpuArch::from_compute_capability(major, minor)
    }

    /// The architecture kernels are built for on this device.
    ///
    /// # Errors
    ///
    /// [`KernelError::UnsupportedGpu`] for a device that is neither sm_89 nor sm_90.
    pub fn gpu_arch(&self) -> Result<GpuArch, KernelError> {
        let (major, minor) = self.info.compute_capability;
        self.arch().ok_or_else(|| KernelError::UnsupportedGpu { name: self.info.name.clone(), major, minor })
    }

    /// The device's stream (all launches and copies here go to it).
    pub fn stream(&self) -> sys::CUstream {
        self.stream
    }

    /// Waits for everything on the stream; an error a kernel raised surfaces here.
    ///
    /// # Errors
    ///
    /// [`KernelError::Cuda`].
    pub fn synchronize(&self) -> Result<(), KernelError> {
        // SAFETY: live stream.
        check("cuStreamSynchronize", unsafe { sys::cuStreamSynchronize(self.stream) })
    }

    /// Waits for everything on the stream, but at most `limit`: a kernel that does not finish by
    /// then (a deadlocked pipeline) is reported instead of blocking the caller for ever. The
    /// work stays queued; after a timeout the device is busy and the process should end.
    ///
    /// # Errors
    ///
    /// [`KernelError::Timeout`], or [`KernelError::Cuda`] for an error a kernel raised.
    pub fn synchronize_within(&self, limit: Duration) -> Result<(), KernelError> {
        let start = Instant::now();
        let mut pause = Duration::from_micros(20);
        loop {
            // SAFETY: live stream.
            let r = unsafe { sys::cuStreamQuery(self.stream) };
            if r != CUresult::CUDA_ERROR_NOT_READY {
                return check("cuStreamQuery", r);
            }
            if start.elapsed() >= limit {
                return Err(KernelError::Timeout { seconds: limit.as_secs_f64() });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }

    /// Free and total device memory, bytes.
    ///
    /// # Errors
    ///
    /// [`KernelError::Cuda`].
    pub fn memory(&self) -> Result<(usize, usize), KernelError> {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: valid out-pointers, current context.
        check("cuMemGetInfo", unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) })?;
        Ok((free, total))
    }

    /// Allocates `len` elements (uninitialized).
    ///
    /// # Errors
    ///
    /// [`KernelError::Cuda`] (out of memory included).
    pub fn alloc<T: Copy>(&self, len: usize) -> Result<DeviceBuffer<T>, KernelError> {
        let bytes = (len.max(1)) * std::mem::size_of::<T>();
        let mut ptr = 0;
        // SAFETY: valid out-pointer, current context.
        check(&format!("cuMemAlloc({bytes} bytes)"), unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes) })?;
        Ok(DeviceBuffer { ptr, len, _t: PhantomData })
    }

    /// Allocates a buffer holding a copy of `host`.
    ///
    /// # Errors
    ///
    /// [`KernelError::Cuda`].
    pub fn upload<T: Copy>(&self, host: &[T]) -> Result<DeviceBuffer<T>, KernelError> {
        let buf = self.alloc::<T>(host.len())?;
        self.copy_to_device(host, &buf.slice(0, host.len()))?;
        Ok(buf)
    }

    /// Copies `host` into `dst` on the stream (after the work queued before it), and waits for the
    /// copy, so `host` may change once this returns. Lengths must match.
    ///
    /// # Errors
    ///
    /// [`KernelError::BufferLength`], [`KernelError::Cuda`].
    pub fn copy_to_device<T: Copy>(&self, host: &[T], dst: &DeviceSlice<T>) -> Result<(), KernelError> {
        if host.len() != dst.len {
            return Err(KernelError::BufferLength { what: "device copy", expected: dst.len, got: host.len() });
        }
        // SAFETY: dst holds len elements; host is a valid slice of the same length, and stays
        // borrowed until the stream (this copy included) has finished below.
        check("cuMemcpyHtoDAsync", unsafe {
            sys::cuMemcpyHtoDAsync_v2(dst.ptr, host.as_ptr().cast(), std::mem::size_of_val(host), self.stream)
        })?;
        self.synchronize()
    }

    /// Copies `src` into `host` on the stream (after the work queued before it, whose errors
    /// surface here), and waits for it. Lengths must match.
    ///
    /// # Errors
    ///
    /// [`KernelError::BufferLength`], [`KernelError::Cuda`].
    pub fn copy_to_host<T: Copy>(&self, src: &DeviceSlice<T>, host: &mut [T]) -> Result<(), KernelError> {
        if host.len() != src.len {
            return Err(KernelError::BufferLength { what: "host copy", expected: src.len, got: host.len() });
        }
        // SAFETY: src holds len elements; host is a valid mutable slice of the same length, and
        // stays borrowed until the stream (this copy included) has finished below.
        check("cuMemcpyDtoHAsync", unsafe {
            sys::cuMemcpyDtoHAsync_v2(host.as_mut_ptr().cast(), src.ptr, std::mem::size_of_val(host), self.stream)
        })?;
        self.synchronize()
    }

    /// Copies device to device (`src` into `dst`, same length) on the stream, ordered with the
    /// launches before and after it; does not wait.
    ///
    /// # Errors
    ///
    /// [`KernelError::BufferLength`], [`KernelError::Cuda`].
    pub fn copy_on_device<T: Copy>(&self, src: &DeviceSlice<T>, dst: &DeviceSlice<T>) -> Result<(), KernelError> {
        if src.len != dst.len {
            return Err(KernelError::BufferLength { what: "device-to-device copy", expected: dst.len, got: src.len });
        }
        // SAFETY: both ranges hold len elements, in buffers the slices borrow.
        check("cuMemcpyDtoDAsync", unsafe {
            sys::cuMemcpyDtoDAsync_v2(dst.ptr, src.ptr, src.len * std::mem::size_of::<T>(), self.stream)
        })
    }

    /// Fills a 16-bit buffer with `value` (e.g. a NaN bf16 to poison an output), on the stream.
    ///
    /// # Errors
    ///
    /// [`KernelError::Cuda`].
    pub fn fill_u16(&self, dst: &DeviceSlice<u16>, value: u16) -> Result<(), KernelError> {
        // SAFETY: dst holds len 16-bit elements.
        check("cuMemsetD16Async", unsafe { sys::cuMemsetD16Async(dst.ptr, value, dst.len, self.stream) })
    }

    /// Loads a CUBIN.
    ///
    /// # Errors
    ///
    /// [`KernelError::Cuda`] (e.g. a CUBIN for another architecture).
    pub fn load_module(&self, cubin: &[u8]) -> Result<Module, KernelError> {
        let mut module = ptr::null_mut();
        // SAFETY: a CUBIN image in host memory, read during the call only.
        check("cuModuleLoadData", unsafe { sys::cuModuleLoadData(&mut module, cubin.as_ptr().cast()) })?;
        Ok(Module { module, _not_send: PhantomData })
    }

    /// A timing event.
    ///
    /// # Errors
    ///
    /// [`KernelError::Cuda`].
    pub fn event(&self) -> Result<Event, KernelError> {
        let mut e = ptr::null_mut();
        // SAFETY: valid out-pointer, current context.
        check("cuEventCreate", unsafe { sys::cuEventCreate(&mut e, 0) })?;
        Ok(Event { event: e, _not_send: PhantomData })
    }

    /// Records `e` on the stream.
    ///
    /// # Errors
    ///
    /// [`KernelError::Cuda`].
    pub fn record(&self, e: &Event) -> Result<(), KernelError> {
        // SAFETY: live event and stream.
        check("cuEventRecord", unsafe { sys::cuEventRecord(e.event, self.stream) })
    }

    /// Milliseconds between two recorded events (waits for the second).
    ///
    /// # Errors
    ///
    /// [`KernelError::Cuda`].
    pub fn elapsed_ms(&self, start: &Event, end: &Event) -> Result<f32, KernelError> {
        let mut ms = 0f32;
        // SAFETY: live events.
        unsafe {
            check("cuEventSynchronize", sys::cuEventSynchronize(end.event))?;
            check("cuEventElapsedTime", sys::cuEventElapsedTime_v2(&mut ms, start.event, end.event))?;
        }
        Ok(ms)
    }

    /// Captures what `work` enqueues on the stream into a graph, and instantiates it.
    ///
    /// # Errors
    ///
    /// What `work` returns, or [`KernelError::Cuda`] from the capture.
    pub fn capture<F>(&self, work: F) -> Result<Graph, KernelError>
    where
        F: FnOnce() -> Result<(), KernelError>,
    {
        self.synchronize()?;
        // SAFETY: live stream; the capture is always ended, even when `work` fails.
        unsafe {
            check(
                "cuStreamBeginCapture",
                sys::cuStreamBeginCapture_v2(
                    self.stream,
                    sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
                ),
            )?;
            let worked = work();
            let mut graph = ptr::null_mut();
            let ended = check("cuStreamEndCapture", sys::cuStreamEndCapture(self.stream, &mut graph));
            worked?;
            ended?;
            let mut exec = ptr::null_mut();
            let inst = check("cuGraphInstantiate", sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0));
            sys::cuGraphDestroy(graph);
            inst?;
            Ok(Graph { exec, _not_send: PhantomData })
        }
    }

    /// Launches an instantiated graph on the stream.
    ///
    /// # Errors
    ///
    /// [`KernelError::Cuda`].
    pub fn replay(&self, g: &Graph) -> Result<(), KernelError> {
        // SAFETY: live graph and stream.
        check("cuGraphLaunch", unsafe { sys::cuGraphLaunch(g.exec, self.stream) })
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: the stream and the primary-context reference are this value's.
        unsafe {
            sys::cuStreamSynchronize(self.stream);
            sys::cuStreamDestroy_v2(self.stream);
            sys::cuDevicePrimaryCtxRelease_v2(self.dev);
        }
    }
}

/// Device memory of `len` elements of `T`, freed on drop. Drop it before the [`Device`].
pub struct DeviceBuffer<T> {
    ptr: sys::CUdeviceptr,
    len: usize,
    _t: PhantomData<*const T>,
}

impl<T> DeviceBuffer<T> {
    /// Elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole buffer as a slice.
    pub fn all(&self) -> DeviceSlice<'_, T> {
        DeviceSlice { ptr: self.ptr, len: self.len, _b: PhantomData }
    }

    /// Elements `start..start + len` (clamped to the buffer).
    pub fn slice(&self, start: usize, len: usize) -> DeviceSlice<'_, T> {
        let start = start.min(self.len);
        let len = len.min(self.len - start);
        DeviceSlice { ptr: self.ptr + (start * std::mem::size_of::<T>()) as u64, len, _b: PhantomData }
    }
}

impl<T> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        // SAFETY: allocated by cuMemAlloc, freed once.
        unsafe {
            sys::cuMemFree_v2(self.ptr);
        }
    }
}

/// A range of device memory borrowed from a [`DeviceBuffer`].
#[derive(Clone, Copy, Debug)]
pub struct DeviceSlice<'a, T> {
    ptr: sys::CUdeviceptr,
    len: usize,
    _b: PhantomData<&'a T>,
}

impl<T> DeviceSlice<'_, T> {
    /// The device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A loaded CUBIN, unloaded on drop.
pub struct Module {
    module: sys::CUmodule,
    _not_send: PhantomData<*const ()>,
}

impl Module {
    /// The kernel `name`, with its dynamic shared memory limit raised to `smem_bytes`.
    ///
    /// # Errors
    ///
    /// [`KernelError::Cuda`].
    pub fn function(&self, name: &str, smem_bytes: u32) -> Result<Function, KernelError> {
        let cname = CString::new(name).map_err(|_| KernelError::Cuda {
            call: "cuModuleGetFunction".into(),
            status: "NUL in name".into(),
            context_lost: false,
        })?;
        let mut f = ptr::null_mut();
        // SAFETY: live module, valid name.
        unsafe {
            check(
                &format!("cuModuleGetFunction({name})"),
                sys::cuModuleGetFunction(&mut f, self.module, cname.as_ptr()),
            )?;
            check(
                &format!("cuFuncSetAttribute({name}, max dynamic shared memory {smem_bytes})"),
                sys::cuFuncSetAttribute(
                    f,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem_bytes as i32,
                ),
            )?;
        }
        Ok(Function { func: f, name: name.to_string(), _not_send: PhantomData })
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        // SAFETY: loaded by cuModuleLoadData, unloaded once.
        unsafe {
            sys::cuModuleUnload(self.module);
        }
    }
}

/// A kernel in a [`Module`]; valid while that module is loaded (keep both together, as
/// [`crate::gemm::GemmKernel`] does).
pub struct Function {
    func: sys::CUfunction,
    name: String,
    _not_send: PhantomData<*const ()>,
}

/// A launch's geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchDims {
    /// Blocks (1-D grid).
    pub grid: u32,
    /// Threads per block.
    pub block: u32,
    /// Dynamic shared memory, bytes.
    pub smem: u32,
}

impl Function {
    /// Launches the kernel on the device's stream; `params` points at each argument's value.
    /// The launch's own error is checked here; an error during execution surfaces at the next
    /// synchronization.
    ///
    /// # Safety
    ///
    /// `params` must match the kernel's parameter list in number, order and types, and every
    /// device address passed must be valid for what the kernel reads and writes.
    pub unsafe fn launch(&self, dev: &Device, dims: LaunchDims, params: &mut [*mut c_void]) -> Result<(), KernelError> {
        // SAFETY: the caller guarantees the parameters; the function and stream are live.
        let r = unsafe {
            sys::cuLaunchKernel(
                self.func,
                dims.grid,
                1,
                1,
                dims.block,
                1,
                1,
                dims.smem,
                dev.stream,
                params.as_mut_ptr(),
                ptr::null_mut(),
            )
        };
        check(&format!("launch of {} (grid {}, block {}, smem {})", self.name, dims.grid, dims.block, dims.smem), r)
    }

    /// How many clusters of `cluster` CTAs of `dims` can be resident at once, if the driver can
    /// tell.
    pub fn max_active_clusters(&self, dev: &Device, dims: LaunchDims, cluster: u32) -> Option<u32> {
        // SAFETY: a zeroed attribute value is a valid bit pattern; the union member set matches
        // the attribute id.
        unsafe {
            let mut attr: sys::CUlaunchAttribute = std::mem::zeroed();
            attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
            attr.value.clusterDim.x = cluster;
            attr.value.clusterDim.y = 1;
            attr.value.clusterDim.z = 1;
            let cfg = sys::CUlaunchConfig {
                gridDimX: dims.grid,
                gridDimY: 1,
                gridDimZ: 1,
                blockDimX: dims.block,
                blockDimY: 1,
                blockDimZ: 1,
                sharedMemBytes: dims.smem,
                hStream: dev.stream,
                attrs: &mut attr,
                numAttrs: 1,
            };
            let mut n = 0;
            let r = sys::cuOccupancyMaxActiveClusters(&mut n, self.func, &cfg);
            (r == CUresult::CUDA_SUCCESS && n > 0).then_some(n as u32)
        }
    }
}

/// A timing event.
pub struct Event {
    event: sys::CUevent,
    _not_send: PhantomData<*const ()>,
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created by cuEventCreate, destroyed once.
        unsafe {
            sys::cuEventDestroy_v2(self.event);
        }
    }
}

/// An instantiated CUDA graph.
pub struct Graph {
    exec: sys::CUgraphExec,
    _not_send: PhantomData<*const ()>,
}

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: instantiated by cuGraphInstantiateWithFlags, destroyed once.
        unsafe {
            sys::cuGraphExecDestroy(self.exec);
        }
    }
}
