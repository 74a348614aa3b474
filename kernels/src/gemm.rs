//! Launch wrappers: a compiled, loaded GEMM variant ([`GemmKernel`]) and the activation
//! quantization kernel ([`ActQuantKernel`]). Each launch checks legality ([`is_legal`]), buffer
//! sizes, and every CUDA call.

use std::ffi::c_void;

use cudarc::driver::sys;

use crate::cache::compile_cached;
use crate::config::{GemmConfig, GemmShape, GpuArch, KernelKind, Multicast, Swizzle, is_legal};
use crate::cuda::{Device, DeviceBuffer, DeviceSlice, Function, LaunchDims, Module, check};
use crate::error::KernelError;
use crate::nvrtc::ResourceUsage;
use crate::reference::{ScaleFormat, validate_m_indices};
use crate::source::KernelSpec;

/// Default band height (in tiles) of the rasterized tile order.
pub const DEFAULT_RASTER_GROUP: u32 = 8;

/// A grouped problem's row-to-expert map on the device, checked on the host when uploaded: every
/// value is -1 (padding) or one of the experts, in the M-grouped contiguous layout. The kernels
/// index B and SB with these values, so a launch takes only a checked map.
pub struct MIndices {
    buf: DeviceBuffer<i32>,
    experts: usize,
}

impl MIndices {
    /// Checks `host` for `experts` experts, then uploads it.
    ///
    /// # Errors
    ///
    /// [`KernelError::ExpertOutOfRange`] or [`KernelError::GroupLayout`] for a map the kernels
    /// cannot follow, [`KernelError::Cuda`] for the upload.
    pub fn upload(dev: &Device, host: &[i32], experts: usize) -> Result<MIndices, KernelError> {
        validate_m_indices(host, experts)?;
        Ok(MIndices { buf: dev.upload(host)?, experts })
    }

    /// Rows (the grouped M).
    pub fn rows(&self) -> usize {
        self.buf.len()
    }

    /// The number of experts the values were checked against.
    pub fn experts(&self) -> usize {
        self.experts
    }

    /// The map on the device.
    pub fn slice(&self) -> DeviceSlice<'_, i32> {
        self.buf.all()
    }
}

/// The device operands of one GEMM (see `reference` for layouts).
#[derive(Clone, Copy)]
pub struct GemmArgs<'a> {
    /// A codes `[M, K]` (16-byte aligned).
    pub a: DeviceSlice<'a, u8>,
    /// A scales `[M, K/128]`.
    pub sa: DeviceSlice<'a, f32>,
    /// B codes `[E, N, K]` (16-byte aligned).
    pub b: DeviceSlice<'a, u8>,
    /// B scales `[E, ceil(N/128), K/128]`.
    pub sb: DeviceSlice<'a, f32>,
    /// D, bf16 bits `[M, N]` (4-byte aligned: pairs of outputs are stored as one word).
    pub d: DeviceSlice<'a, u16>,
    /// Grouped only: `m_indices[M]`, checked.
    pub m_indices: Option<&'a MIndices>,
}

/// `Ok` when `address` is a multiple of `align`.
///
/// # Errors
///
/// [`KernelError::Misaligned`] naming the operand.
pub fn check_aligned(what: &'static str, address: u64, align: u64) -> Result<(), KernelError> {
    if address.is_multiple_of(align) { Ok(()) } else { Err(KernelError::Misaligned { what, address, align }) }
}

impl GemmArgs<'_> {
    /// Checks every buffer against `shape` before a launch: lengths, alignment (A and B 16 bytes
    /// for TMA and 16-byte copies, D 4 bytes for paired bf16 stores), and a grouped problem's
    /// map checked for this many rows and experts.
    fn validate(&self, shape: &GemmShape) -> Result<(), KernelError> {
        let len = |what, expected: usize, got: usize| {
            if expected == got { Ok(()) } else { Err(KernelError::BufferLength { what, expected, got }) }
        };
        let (m, n, k, e) = (shape.m, shape.n, shape.k, shape.experts());
        len("A", m * k, self.a.len())?;
        len("SA", m * shape.k_blocks(), self.sa.len())?;
        len("B", e * n * k, self.b.len())?;
        len("SB", e * shape.n_blocks() * shape.k_blocks(), self.sb.len())?;
        len("D", m * n, self.d.len())?;
        match (shape.groups, self.m_indices) {
            (Some(_), Some(idx)) if idx.rows() != m || idx.experts() != e => {
                Err(KernelError::GroupMismatch { rows: idx.rows(), experts: idx.experts(), m, e })
            }
            (Some(_), Some(_)) | (None, None) => Ok(()),
            (Some(_), None) => {
                Err(KernelError::Input { what: "m_indices", detail: "missing for a grouped shape".into() })
            }
            (None, Some(_)) => Err(KernelError::Input { what: "m_indices", detail: "given for a dense shape".into() }),
        }?;
        check_aligned("A", self.a.ptr(), 16)?;
        check_aligned("B", self.b.ptr(), 16)?;
        check_aligned("D", self.d.ptr(), 4)
    }
}

/// A GEMM variant, compiled (or read from the cache) and loaded on a device.
pub struct GemmKernel {
    /// The configuration.
    pub config: GemmConfig,
    /// Whether this is the grouped variant.
    pub grouped: bool,
    /// ptxas's report for the variant.
    pub resources: ResourceUsage,
    func: Function,
    /// Clusters of two that can be resident at once (multicast variants), if the driver said.
    max_clusters: Option<u32>,
    arch: GpuArch,
    // Last: the function handle above is only valid while the module is loaded.
    _module: Module,
}

impl GemmKernel {
    /// Compiles (or reads from the cache) and loads `config` for `dev`.
    ///
    /// # Errors
    ///
    /// [`KernelError::Illegal`] for a configuration that cannot be built or does not run on the
    /// device, [`KernelError::UnsupportedGpu`], NVRTC errors, [`KernelError::Cuda`].
    pub fn load(dev: &Device, config: GemmConfig, grouped: bool) -> Result<GemmKernel, KernelError> {
        let arch = dev.gpu_arch()?;
        let illegal = |why| KernelError::Illegal { config: config.id(), shape: "(any)".into(), why };
        crate::config::check_config(&config).map_err(illegal)?;
        if !config.runs_on(arch) {
            return Err(KernelError::Illegal {
                config: config.id(),
                shape: "(any)".into(),
                why: crate::config::Why::Swizzle { swizzle: config.swizzle, kind: "this GPU (wgmma needs sm_90a)" },
            });
        }
        let spec = KernelSpec::Gemm { config, grouped };
        let compiled = compile_cached(&spec, arch)?;
        let module = dev.load_module(&compiled.cubin)?;
        let func = module.function(spec.entry(), config.smem_bytes())?;
        // Queried once here: no driver query may run inside a stream capture.
        let max_clusters = (config.cluster_size() == 2)
            .then(|| {
                let dims = LaunchDims { grid: dev.info.sms & !1, block: config.threads(), smem: config.smem_bytes() };
                func.max_active_clusters(dev, dims, 2)
            })
            .flatten();
        Ok(GemmKernel { config, grouped, resources: compiled.resources, func, max_clusters, arch, _module: module })
    }

    /// Compiles every one of `configs` for `arch` in parallel, or finds it in the cache, so that
    /// later [`GemmKernel::load`]s only read the cache. One result per configuration, in order.
    pub fn precompile(configs: &[GemmConfig], grouped: bool, arch: GpuArch) -> Vec<Result<(), KernelError>> {
        use rayon::prelude::*;
        configs
            .par_iter()
            .map(|&config| compile_cached(&KernelSpec::Gemm { config, grouped }, arch).map(|_| ()))
            .collect()
    }

    /// The architecture the variant was built for.
    pub fn arch(&self) -> GpuArch {
        self.arch
    }

    /// The launch geometry for `shape` on `dev`: the persistent grid (wgmma: at most one CTA, or
    /// one cluster, per SM that can be resident) or one CTA per tile (mma.sync).
    pub fn dims(&self, dev: &Device, shape: &GemmShape) -> LaunchDims {
        let c = &self.config;
        let tiles = shape.m.div_ceil(c.block_m as usize) * shape.n.div_ceil(c.block_n as usize);
        let (block, smem) = (c.threads(), c.smem_bytes());
        let grid = match c.kind {
            KernelKind::MmaSync { .. } => tiles as u32,
            KernelKind::Wgmma if c.cluster_size() == 1 => (tiles as u32).min(dev.info.sms),
            KernelKind::Wgmma => {
                let pairs = (tiles / 2) as u32;
                let resident = self.max_clusters.unwrap_or(dev.info.sms / 2);
                2 * pairs.min(resident).max(1)
            }
        };
        LaunchDims { grid: grid.max(1), block, smem }
    }

    /// Launches `D = A × Bᵀ` for `shape` on the device's stream (asynchronously; an error during
    /// execution surfaces at the next synchronization).
    ///
    /// # Errors
    ///
    /// [`KernelError::Illegal`] when `is_legal` refuses the shape, [`KernelError::Shape`],
    /// [`KernelError::BufferLength`] / [`KernelError::Input`] for the buffers, and
    /// [`KernelError::Cuda`] for a failed call or launch.
    pub fn launch(
        &self,
        dev: &Device,
        shape: &GemmShape,
        args: &GemmArgs,
        raster_group: u32,
    ) -> Result<(), KernelError> {
        is_legal(&self.config, shape).map_err(|why| KernelError::Illegal {
            config: self.config.id(),
            shape: shape.to_string(),
            why,
        })?;
        if shape.groups.is_some() != self.grouped {
            return Err(KernelError::Input {
                what: "shape",
                detail: format!("a {} shape given to the {} variant", kind(shape.groups.is_some()), kind(self.grouped)),
            });
        }
        args.validate(shape)?;
        let dims = self.dims(dev, shape);
        let f = &self.func;
        let (mut sa, mut sb, mut d) = (args.sa.ptr(), args.sb.ptr(), args.d.ptr());
        let mut idx = args.m_indices.map_or(0, |s| s.slice().ptr());
        let (mut m, mut n, mut k) = (shape.m as i32, shape.n as i32, shape.k as i32);
        let mut raster = raster_group.max(1) as i32;
        // The two kernels differ only in their first three parameters: wgmma takes A and B as
        // tensor maps (by value), mma.sync as pointers, with SA between them.
        let (mut a, mut b) = (args.a.ptr(), args.b.ptr());
        let (mut ta, mut tb): (sys::CUtensorMap, sys::CUtensorMap);
        let head: [*mut c_void; 3] = match self.config.kind {
            KernelKind::Wgmma => {
                ta = tensor_map_a(&self.config, shape, a)?;
                tb = tensor_map_b(&self.config, shape, b)?;
                [
                    (&mut ta as *mut sys::CUtensorMap).cast(),
                    (&mut tb as *mut sys::CUtensorMap).cast(),
                    (&mut sa as *mut u64).cast(),
                ]
            }
            KernelKind::MmaSync { .. } => {
                [(&mut a as *mut u64).cast(), (&mut sa as *mut u64).cast(), (&mut b as *mut u64).cast()]
            }
        };
        let mut params: [*mut c_void; 10] = [
            head[0],
            head[1],
            head[2],
            (&mut sb as *mut u64).cast(),
            (&mut d as *mut u64).cast(),
            (&mut idx as *mut u64).cast(),
            (&mut m as *mut i32).cast(),
            (&mut n as *mut i32).cast(),
            (&mut k as *mut i32).cast(),
            (&mut raster as *mut i32).cast(),
        ];
        // SAFETY: the parameters match the kernel's list (fp8_gemm_wgmma: two CUtensorMap by
        // value, four device pointers, four ints; fp8_gemm_mma: six device pointers, four ints),
        // every pointee outlives the call; validate() checked every buffer's size and alignment,
        // and MIndices guarantees every expert index the kernel follows is in range.
        unsafe { f.launch(dev, dims, &mut params) }
    }
}

fn kind(grouped: bool) -> &'static str {
    if grouped { "grouped" } else { "dense" }
}

fn swizzle_mode(s: Swizzle) -> sys::CUtensorMapSwizzle {
    match s {
        Swizzle::B32 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_32B,
        Swizzle::B64 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_64B,
        Swizzle::B128 | Swizzle::Padded => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
    }
}

/// Encodes a tiled tensor map of bytes: `dims` innermost first, `strides` in bytes for every
/// dimension but the first, a `box_dims` box, zero fill out of bounds.
fn encode(
    what: &str,
    ptr: u64,
    dims: &[u64],
    strides: &[u64],
    box_dims: &[u32],
    swizzle: Swizzle,
) -> Result<sys::CUtensorMap, KernelError> {
    // SAFETY: CUtensorMap is plain bytes; zero is a valid initial value.
    let mut map: sys::CUtensorMap = unsafe { std::mem::zeroed() };
    let elem_strides = vec![1u32; dims.len()];
    // SAFETY: every array has `dims.len()` entries (strides one fewer), as the call requires.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
            dims.len() as u32,
            ptr as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            box_dims.as_ptr(),
            elem_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            swizzle_mode(swizzle),
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    check(&format!("cuTensorMapEncodeTiled({what}: dims {dims:?}, box {box_dims:?})"), r)?;
    Ok(map)
}

/// A's tensor map: `[M, K]` bytes, box `SW × BM` (`SW × BM/2` with A multicast).
fn tensor_map_a(cfg: &GemmConfig, shape: &GemmShape, ptr: u64) -> Result<sys::CUtensorMap, KernelError> {
    let rows = if cfg.multicast == Multicast::A { cfg.block_m / 2 } else { cfg.block_m };
    let sw = cfg.swizzle.bytes();
    encode("A", ptr, &[shape.k as u64, shape.m as u64], &[shape.k as u64], &[sw, rows], cfg.swizzle)
}

/// B's tensor map: `[E, N, K]` bytes, box `SW × BN × 1` (`SW × BN/2 × 1` with B multicast).
fn tensor_map_b(cfg: &GemmConfig, shape: &GemmShape, ptr: u64) -> Result<sys::CUtensorMap, KernelError> {
    let rows = if cfg.multicast == Multicast::B { cfg.block_n / 2 } else { cfg.block_n };
    let sw = cfg.swizzle.bytes();
    let (n, k, e) = (shape.n as u64, shape.k as u64, shape.experts() as u64);
    encode("B", ptr, &[k, n, e], &[k, n * k], &[sw, rows, 1], cfg.swizzle)
}

/// The 1×128 activation quantization kernel, loaded.
pub struct ActQuantKernel {
    /// The scale format it writes.
    pub format: ScaleFormat,
    func: Function,
    // Last: the function handle above is only valid while the module is loaded.
    _module: Module,
}

impl ActQuantKernel {
    /// Compiles (or reads from the cache) and loads the kernel.
    ///
    /// # Errors
    ///
    /// NVRTC errors, [`KernelError::Cuda`], [`KernelError::UnsupportedGpu`].
    pub fn load(dev: &Device, format: ScaleFormat) -> Result<ActQuantKernel, KernelError> {
        let arch = dev.gpu_arch()?;
        let compiled = compile_cached(&KernelSpec::ActQuant { format }, arch)?;
        let module = dev.load_module(&compiled.cubin)?;
        let func = module.function("fp8_act_quant", 0)?;
        Ok(ActQuantKernel { format, func, _module: module })
    }

    /// Quantizes bf16 `x[m, k]` into `q[m, k]` and `scales[m, k/128]` (K a multiple of 128).
    ///
    /// # Errors
    ///
    /// [`KernelError::Shape`], [`KernelError::BufferLength`], [`KernelError::Cuda`].
    pub fn launch(
        &self,
        dev: &Device,
        x: DeviceSlice<u16>,
        q: DeviceSlice<u8>,
        scales: DeviceSlice<f32>,
        m: usize,
        k: usize,
    ) -> Result<(), KernelError> {
        if k == 0 || !k.is_multiple_of(128) || m > i32::MAX as usize || k > i32::MAX as usize {
            return Err(KernelError::Shape {
                shape: format!("{m}x{k}"),
                why: crate::config::Why::KNotMultipleOf128 { k },
            });
        }
        for (what, expected, got) in
            [("x", m * k, x.len()), ("q", m * k, q.len()), ("scales", m * k / 128, scales.len())]
        {
            if expected != got {
                return Err(KernelError::BufferLength { what, expected, got });
            }
        }
        if m == 0 {
            return Ok(());
        }
        let groups = m * (k / 128);
        let dims = LaunchDims { grid: groups.div_ceil(8) as u32, block: 256, smem: 0 };
        let (mut xp, mut qp, mut sp) = (x.ptr(), q.ptr(), scales.ptr());
        let (mut mi, mut ki) = (m as i32, k as i32);
        let mut params: [*mut c_void; 5] = [
            (&mut xp as *mut u64).cast(),
            (&mut qp as *mut u64).cast(),
            (&mut sp as *mut u64).cast(),
            (&mut mi as *mut i32).cast(),
            (&mut ki as *mut i32).cast(),
        ];
        // SAFETY: matches fp8_act_quant(const u16*, u8*, float*, int, int); sizes checked above.
        unsafe { self.func.launch(dev, dims, &mut params) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_is_checked_per_operand() {
        assert!(check_aligned("D", 0x1000, 4).is_ok());
        assert!(check_aligned("A", 0x1010, 16).is_ok());
        assert!(matches!(
            check_aligned("D", 0x1002, 4),
            Err(KernelError::Misaligned { what: "D", address: 0x1002, align: 4 })
        ));
        assert!(matches!(check_aligned("B", 0x1008, 16), Err(KernelError::Misaligned { what: "B", .. })));
        assert!(KernelError::Misaligned { what: "D", address: 2, align: 4 }.is_bad_input());
    }
}
