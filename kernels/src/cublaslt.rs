//! cuBLASLt baselines for `bench gemm`: BF16 (`D = A·Bᵀ` on the dequantized operands) and FP8
//! with DeepSeek block scaling (`CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F` on the activations,
//! `..._BLK128x128_32F` on the weights, CUDA ≥ 12.9), through cudarc's cuBLASLt bindings (loaded
//! dynamically, after checking that libcublasLt exists).
//!
//! cuBLAS is column-major, so the row-major `D[M, N] = A[M, K] · B[N, K]ᵀ` is computed as
//! `Dᵀ[N, M] = op(B)·A` with cuBLAS's "A" = our B (`[N, K]` row-major = K×N column-major,
//! transposed: the "TN" form FP8 requires) and cuBLAS's "B" = our A (K×M column-major).
//!
//! Scale layouts for the FP8 mode (as PyTorch's `_scaled_mm` hands them to cuBLASLt): the
//! activations' 1×128 scales M-fastest, `[K/128][M4]` with M padded to a multiple of 4 (see
//! [`activation_scales_for_cublas`]); the weights' 128×128 scales `[ceil(N/128)][KB4]`, K-blocks
//! fastest with their count padded to a multiple of 4 (see [`weight_scales_for_cublas`]).

use std::ffi::c_void;
use std::ptr;

use cudarc::cublaslt::sys as lt;

use crate::cuda::{Device, DeviceBuffer, DeviceSlice};
use crate::error::KernelError;

fn check(call: &'static str, s: lt::cublasStatus_t) -> Result<(), KernelError> {
    if s == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(KernelError::CublasLt { call, status: format!("{s:?}") })
    }
}

/// Workspace handed to cuBLASLt, bytes.
const WORKSPACE: usize = 32 << 20;

/// A cuBLASLt handle and its workspace.
pub struct CublasLt {
    handle: lt::cublasLtHandle_t,
    workspace: DeviceBuffer<u8>,
}

/// The baselines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Baseline {
    /// BF16 × BF16 → BF16, f32 accumulation.
    Bf16,
    /// E4M3 × E4M3 → BF16 with 1×128 / 128×128 f32 block scales.
    Fp8Block,
}

impl Baseline {
    /// The `impl` name in `bench gemm --json`.
    pub fn name(self) -> &'static str {
        match self {
            Baseline::Bf16 => "cublaslt_bf16",
            Baseline::Fp8Block => "cublaslt_fp8_block",
        }
    }
}

/// The device addresses of the FP8 block scales in cuBLASLt's layouts ([`activation_scales_for_cublas`],
/// [`weight_scales_for_cublas`]); both 0 for the BF16 baseline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LtScales {
    /// Our A's (the activations') 1×128 scales.
    pub a: u64,
    /// Our B's (the weights') 128×128 scales.
    pub b: u64,
}

/// Algorithms asked of cuBLASLt's heuristic per problem when listing candidates.
pub const LT_ALGORITHMS: usize = 8;

/// One cuBLASLt algorithm, described by its configuration attributes
/// (`cublasLtMatmulAlgoConfigGetAttribute`): enough to rebuild it later
/// ([`CublasLt::plan_with`]) for the same problem on the same cuBLASLt. Written as its id,
/// `cublaslt_a66_t20_s13_k1_r0_w0_c0_i0_l0` (algorithm, tile, stages, split-K, reduction
/// scheme, CTA swizzle, custom option, inner shape, cluster shape).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LtAlgo {
    /// `CUBLASLT_ALGO_CONFIG_ID`.
    pub algo: i32,
    /// `CUBLASLT_ALGO_CONFIG_TILE_ID` (a `cublasLtMatmulTile_t`).
    pub tile: u32,
    /// `CUBLASLT_ALGO_CONFIG_STAGES_ID` (a `cublasLtMatmulStages_t`).
    pub stages: u32,
    /// `CUBLASLT_ALGO_CONFIG_SPLITK_NUM` (1: no split).
    pub splitk: u32,
    /// `CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME`.
    pub reduction: u32,
    /// `CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING`.
    pub swizzle: u32,
    /// `CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION`.
    pub custom: u32,
    /// `CUBLASLT_ALGO_CONFIG_INNER_SHAPE_ID`.
    pub inner: u16,
    /// `CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID`.
    pub cluster: u16,
}

/// The prefix of every [`LtAlgo`] id.
pub const LT_ALGO_PREFIX: &str = "cublaslt_";

impl LtAlgo {
    /// The id: `cublaslt_a{algo}_t{tile}_s{stages}_k{splitk}_r{reduction}_w{swizzle}_c{custom}_i{inner}_l{cluster}`.
    pub fn id(&self) -> String {
        format!(
            "{LT_ALGO_PREFIX}a{}_t{}_s{}_k{}_r{}_w{}_c{}_i{}_l{}",
            self.algo,
            self.tile,
            self.stages,
            self.splitk,
            self.reduction,
            self.swizzle,
            self.custom,
            self.inner,
            self.cluster
        )
    }
}

impl std::fmt::Display for LtAlgo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(&self.id())
    }
}

impl std::str::FromStr for LtAlgo {
    type Err = String;

    /// Parses an id written by [`LtAlgo::id`]; anything else is an error naming it.
    fn from_str(s: &str) -> Result<LtAlgo, String> {
        let bad = || {
            format!(
                "{s:?} is not a cuBLASLt algorithm id (cublaslt_a<id>_t<tile>_s<stages>_k<splitk>_r<reduction>_w<swizzle>_c<custom>_i<inner>_l<cluster>)"
            )
        };
        let rest = s.strip_prefix(LT_ALGO_PREFIX).ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('_').collect();
        let keys = ["a", "t", "s", "k", "r", "w", "c", "i", "l"];
        if parts.len() != keys.len() {
            return Err(bad());
        }
        let mut v = [0i64; 9];
        for (i, (part, key)) in parts.iter().zip(keys).enumerate() {
            v[i] = part.strip_prefix(key).and_then(|x| x.parse::<i64>().ok()).ok_or_else(bad)?;
        }
        let u32_of = |x: i64| u32::try_from(x).map_err(|_| bad());
        let u16_of = |x: i64| u16::try_from(x).map_err(|_| bad());
        Ok(LtAlgo {
            algo: i32::try_from(v[0]).map_err(|_| bad())?,
            tile: u32_of(v[1])?,
            stages: u32_of(v[2])?,
            splitk: u32_of(v[3])?,
            reduction: u32_of(v[4])?,
            swizzle: u32_of(v[5])?,
            custom: u32_of(v[6])?,
            inner: u16_of(v[7])?,
            cluster: u16_of(v[8])?,
        })
    }
}

impl serde::Serialize for LtAlgo {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.id())
    }
}

impl<'de> serde::Deserialize<'de> for LtAlgo {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<LtAlgo, D::Error> {
        let id = String::deserialize(d)?;
        id.parse().map_err(serde::de::Error::custom)
    }
}

/// Reads the configuration attributes of `algo`.
fn describe_algo(algo: &lt::cublasLtMatmulAlgo_t) -> Result<LtAlgo, KernelError> {
    use lt::cublasLtMatmulAlgoConfigAttributes_t as C;
    fn get<T: Copy + Default>(algo: &lt::cublasLtMatmulAlgo_t, attr: C) -> Result<T, KernelError> {
        let mut v = T::default();
        let mut written = 0usize;
        // SAFETY: `algo` is a live algorithm value; the buffer is a T of the attribute's size
        // (the cuBLASLt documentation's type for each attribute read below).
        check("cublasLtMatmulAlgoConfigGetAttribute", unsafe {
            lt::cublasLtMatmulAlgoConfigGetAttribute(
                algo,
                attr,
                (&mut v as *mut T).cast(),
                std::mem::size_of::<T>(),
                &mut written,
            )
        })?;
        Ok(v)
    }
    Ok(LtAlgo {
        algo: get::<i32>(algo, C::CUBLASLT_ALGO_CONFIG_ID)?,
        tile: get::<u32>(algo, C::CUBLASLT_ALGO_CONFIG_TILE_ID)?,
        stages: get::<u32>(algo, C::CUBLASLT_ALGO_CONFIG_STAGES_ID)?,
        splitk: get::<u32>(algo, C::CUBLASLT_ALGO_CONFIG_SPLITK_NUM)?,
        reduction: get::<u32>(algo, C::CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME)?,
        swizzle: get::<u32>(algo, C::CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING)?,
        custom: get::<u32>(algo, C::CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION)?,
        inner: get::<u16>(algo, C::CUBLASLT_ALGO_CONFIG_INNER_SHAPE_ID)?,
        cluster: get::<u16>(algo, C::CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID)?,
    })
}

/// Which algorithm to plan with ([`CublasLt::plan_with`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlgoAsk {
    /// The heuristic's first choice.
    Heuristic,
    /// This algorithm, or an error when it cannot be rebuilt (a tuning candidate).
    Exactly(LtAlgo),
    /// This algorithm, or the heuristic's first choice when it no longer exists (a table's
    /// entry: [`LtChoice::FellBack`] says why, and the caller warns).
    Prefer(LtAlgo),
}

/// How a plan got its algorithm ([`CublasLt::plan_with`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LtChoice {
    /// cuBLASLt's heuristic's first choice (none was asked for).
    Heuristic,
    /// The algorithm asked for, rebuilt exactly.
    Rebuilt(LtAlgo),
    /// The algorithm asked for no longer exists for this problem on this cuBLASLt: the
    /// heuristic's first choice instead, and why.
    FellBack {
        /// The algorithm asked for.
        asked: LtAlgo,
        /// What cuBLASLt said.
        why: String,
    },
}

/// One planned matmul: descriptors and the algorithm the heuristic chose.
pub struct LtPlan {
    desc: lt::cublasLtMatmulDesc_t,
    a_layout: lt::cublasLtMatrixLayout_t,
    b_layout: lt::cublasLtMatrixLayout_t,
    d_layout: lt::cublasLtMatrixLayout_t,
    algo: lt::cublasLtMatmulAlgo_t,
    /// How the algorithm was chosen.
    pub choice: LtChoice,
    /// Which baseline.
    pub baseline: Baseline,
    /// Rows of D (our M).
    pub m: usize,
    /// Columns of D (our N).
    pub n: usize,
    /// K.
    pub k: usize,
}

impl Drop for LtPlan {
    fn drop(&mut self) {
        // SAFETY: created by the matching create calls, destroyed once.
        unsafe {
            lt::cublasLtMatrixLayoutDestroy(self.a_layout);
            lt::cublasLtMatrixLayoutDestroy(self.b_layout);
            lt::cublasLtMatrixLayoutDestroy(self.d_layout);
            lt::cublasLtMatmulDescDestroy(self.desc);
        }
    }
}

impl LtPlan {
    /// The operation: f32 compute, cuBLAS's A (our B) transposed, and with FP8 block scaling the
    /// scale modes (weights 128×128 blocks, activations 1×128 vectors) and the scale pointers, so
    /// that the heuristic sees the operation as it will run. No layouts yet.
    fn describe(baseline: Baseline, m: usize, n: usize, k: usize, scales: LtScales) -> Result<LtPlan, KernelError> {
        use lt::cublasLtMatmulDescAttributes_t as D;
        let mut desc = ptr::null_mut();
        // SAFETY: valid out-pointer; the descriptor created is owned by the plan below, whose
        // Drop destroys it (and the still-null layouts, which cuBLASLt accepts).
        check("cublasLtMatmulDescCreate", unsafe {
            lt::cublasLtMatmulDescCreate(
                &mut desc,
                lt::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                lt::cudaDataType::CUDA_R_32F,
            )
        })?;
        let plan = LtPlan {
            desc,
            a_layout: ptr::null_mut(),
            b_layout: ptr::null_mut(),
            d_layout: ptr::null_mut(),
            // SAFETY: a plain C struct of integers, for which all zeros is a valid value; the
            // heuristic's choice replaces it before the plan is used.
            algo: unsafe { std::mem::zeroed() },
            choice: LtChoice::Heuristic,
            baseline,
            m,
            n,
            k,
        };
        let set = |attr: D, v: u32| -> Result<(), KernelError> {
            // SAFETY: live descriptor; the value outlives the call, which copies its 4 bytes.
            check("cublasLtMatmulDescSetAttribute", unsafe {
                lt::cublasLtMatmulDescSetAttribute(plan.desc, attr, (&v as *const u32).cast(), 4)
            })
        };
        let (op_t, op_n) = (1u32, 0u32);
        set(D::CUBLASLT_MATMUL_DESC_TRANSA, op_t)?;
        set(D::CUBLASLT_MATMUL_DESC_TRANSB, op_n)?;
        if baseline == Baseline::Fp8Block {
            let blk = lt::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F as u32;
            let vec = lt::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F as u32;
            set(D::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, blk)?;
            set(D::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, vec)?;
            plan.set_scale_pointers(scales)?;
        }
        Ok(plan)
    }

    /// Sets the scale pointers (cuBLAS's A = our B's scales, its B = our A's) on the descriptor.
    fn set_scale_pointers(&self, scales: LtScales) -> Result<(), KernelError> {
        use lt::cublasLtMatmulDescAttributes_t as D;
        if scales.a == 0 || scales.b == 0 {
            return Err(KernelError::Input {
                what: "scales",
                detail: "FP8 block scaling needs both scale pointers before the heuristic query".into(),
            });
        }
        for (attr, p) in
            [(D::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, scales.b), (D::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, scales.a)]
        {
            // SAFETY: live descriptor; the value outlives the call, which copies its 8 bytes.
            check("cublasLtMatmulDescSetAttribute(scale pointer)", unsafe {
                lt::cublasLtMatmulDescSetAttribute(self.desc, attr, (&p as *const u64).cast(), 8)
            })?;
        }
        Ok(())
    }

    /// The matrix layouts, column-major: cuBLAS's A is K×N (our B), its B K×M (our A), D N×M.
    fn lay_out(&mut self) -> Result<(), KernelError> {
        let in_type = match self.baseline {
            Baseline::Bf16 => lt::cudaDataType::CUDA_R_16BF,
            Baseline::Fp8Block => lt::cudaDataType::CUDA_R_8F_E4M3,
        };
        let (m, n, k) = (self.m as u64, self.n as u64, self.k as u64);
        // SAFETY: valid out-pointers into the plan, whose Drop destroys what is created here.
        unsafe {
            check(
                "cublasLtMatrixLayoutCreate(A)",
                lt::cublasLtMatrixLayoutCreate(&mut self.a_layout, in_type, k, n, k as i64),
            )?;
            check(
                "cublasLtMatrixLayoutCreate(B)",
                lt::cublasLtMatrixLayoutCreate(&mut self.b_layout, in_type, k, m, k as i64),
            )?;
            check(
                "cublasLtMatrixLayoutCreate(D)",
                lt::cublasLtMatrixLayoutCreate(&mut self.d_layout, lt::cudaDataType::CUDA_R_16BF, n, m, n as i64),
            )
        }
    }
}

/// The device operands of one baseline call.
#[derive(Clone, Copy, Debug)]
pub struct LtArgs<'a> {
    /// Our A: bf16 `[M, K]` (Bf16) or e4m3 `[M, K]` (Fp8Block), as raw bytes' device address.
    pub a: u64,
    /// Our B: bf16 or e4m3 `[N, K]`.
    pub b: u64,
    /// D: bf16 `[M, N]`.
    pub d: DeviceSlice<'a, u16>,
    /// Fp8Block: activation scales in cuBLAS's layout.
    pub a_scales: u64,
    /// Fp8Block: weight scales in cuBLAS's layout.
    pub b_scales: u64,
}

impl CublasLt {
    /// Opens cuBLASLt on the device's context.
    ///
    /// # Errors
    ///
    /// [`KernelError::NoCublasLt`] when the library is missing, [`KernelError::CublasLt`],
    /// [`KernelError::Cuda`].
    pub fn new(dev: &Device) -> Result<CublasLt, KernelError> {
        crate::nvrtc::library_loads("cublasLt").map_err(|e| KernelError::NoCublasLt { tried: e.tried })?;
        let workspace = dev.alloc::<u8>(WORKSPACE)?;
        let mut handle = ptr::null_mut();
        // SAFETY: the library is loadable; valid out-pointer.
        check("cublasLtCreate", unsafe { lt::cublasLtCreate(&mut handle) })?;
        Ok(CublasLt { handle, workspace })
    }

    /// cuBLASLt's version number.
    pub fn version(&self) -> usize {
        // SAFETY: the library is loaded.
        unsafe { lt::cublasLtGetVersion() }
    }

    /// Plans `D[M, N] = A[M, K]·B[N, K]ᵀ` for `baseline`: the operation's descriptor (with
    /// FP8 block scaling, its scale modes and `scales`' pointers), the matrix layouts, then the
    /// algorithm cuBLASLt's heuristic picks. [`CublasLt::run`] sets the scale pointers again for
    /// each call (they may point to another copy of the same layout).
    ///
    /// # Errors
    ///
    /// [`KernelError::Input`] for FP8 block scaling without both scale pointers,
    /// [`KernelError::CublasLt`], including `CUBLAS_STATUS_NOT_SUPPORTED` when no algorithm
    /// serves the problem (e.g. block scaling on a cuBLASLt older than 12.9).
    pub fn plan(
        &self,
        baseline: Baseline,
        m: usize,
        n: usize,
        k: usize,
        scales: LtScales,
    ) -> Result<LtPlan, KernelError> {
        self.plan_with(baseline, m, n, k, scales, AlgoAsk::Heuristic)
    }

    /// The algorithms cuBLASLt's heuristic offers for `baseline` on `D[M, N] = A·Bᵀ` (at most
    /// `count`, best first by its own estimate), each described by its configuration attributes.
    ///
    /// # Errors
    ///
    /// As [`CublasLt::plan`].
    pub fn algorithms(
        &self,
        baseline: Baseline,
        m: usize,
        n: usize,
        k: usize,
        scales: LtScales,
        count: usize,
    ) -> Result<Vec<LtAlgo>, KernelError> {
        let mut plan = LtPlan::describe(baseline, m, n, k, scales)?;
        plan.lay_out()?;
        let mut out: Vec<LtAlgo> = Vec::new();
        for a in self.heuristics(&plan, count.max(1))? {
            let d = describe_algo(&a)?;
            if !out.contains(&d) {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Plans like [`CublasLt::plan`], with the algorithm `ask` names: rebuilt from its
    /// parameters (`cublasLtMatmulAlgoInit`, its configuration attributes set, then checked with
    /// `cublasLtMatmulAlgoCheck`), else the heuristic's offer that matches it. When it no longer
    /// exists: [`AlgoAsk::Prefer`] takes the heuristic's first choice ([`LtChoice::FellBack`]
    /// says why), [`AlgoAsk::Exactly`] fails.
    ///
    /// # Errors
    ///
    /// As [`CublasLt::plan`]; [`KernelError::CublasLt`] for [`AlgoAsk::Exactly`] an algorithm
    /// that cannot be rebuilt.
    pub fn plan_with(
        &self,
        baseline: Baseline,
        m: usize,
        n: usize,
        k: usize,
        scales: LtScales,
        ask: AlgoAsk,
    ) -> Result<LtPlan, KernelError> {
        let mut plan = LtPlan::describe(baseline, m, n, k, scales)?;
        plan.lay_out()?;
        let (asked, fall_back) = match &ask {
            AlgoAsk::Heuristic => {
                plan.algo = self.heuristic(&plan)?;
                return Ok(plan);
            }
            AlgoAsk::Exactly(a) => (a, false),
            AlgoAsk::Prefer(a) => (a, true),
        };
        let rebuilt = self.rebuild(&plan, asked).or_else(|first| {
            // The heuristic's offers, in case the rebuilt value differs in a field the
            // attributes do not cover.
            let offers = self.heuristics(&plan, 32)?;
            offers.into_iter().find(|a| describe_algo(a).is_ok_and(|d| d == *asked)).ok_or(first)
        });
        match rebuilt {
            Ok(a) => {
                plan.algo = a;
                plan.choice = LtChoice::Rebuilt(*asked);
            }
            Err(e) if fall_back => {
                plan.algo = self.heuristic(&plan)?;
                plan.choice = LtChoice::FellBack { asked: *asked, why: e.to_string() };
            }
            Err(e) => return Err(e),
        }
        Ok(plan)
    }

    /// `asked` rebuilt for `plan`: initialized for the plan's types, its attributes set, and
    /// checked by cuBLASLt against the plan (and the workspace).
    fn rebuild(&self, plan: &LtPlan, asked: &LtAlgo) -> Result<lt::cublasLtMatmulAlgo_t, KernelError> {
        use lt::cublasLtMatmulAlgoConfigAttributes_t as C;
        let in_type = match plan.baseline {
            Baseline::Bf16 => lt::cudaDataType::CUDA_R_16BF,
            Baseline::Fp8Block => lt::cudaDataType::CUDA_R_8F_E4M3,
        };
        // SAFETY: a plain C struct of integers, for which all zeros is a valid value; AlgoInit
        // fills it.
        let mut algo: lt::cublasLtMatmulAlgo_t = unsafe { std::mem::zeroed() };
        // SAFETY: live handle; valid out-pointer.
        check("cublasLtMatmulAlgoInit", unsafe {
            lt::cublasLtMatmulAlgoInit(
                self.handle,
                lt::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                lt::cudaDataType::CUDA_R_32F,
                in_type,
                in_type,
                lt::cudaDataType::CUDA_R_16BF,
                lt::cudaDataType::CUDA_R_16BF,
                asked.algo,
                &mut algo,
            )
        })?;
        fn set<T>(algo: &mut lt::cublasLtMatmulAlgo_t, attr: C, v: T) -> Result<(), KernelError> {
            // SAFETY: the algorithm value is live; the value outlives the call, which copies it.
            check("cublasLtMatmulAlgoConfigSetAttribute", unsafe {
                lt::cublasLtMatmulAlgoConfigSetAttribute(algo, attr, (&v as *const T).cast(), std::mem::size_of::<T>())
            })
        }
        set(&mut algo, C::CUBLASLT_ALGO_CONFIG_TILE_ID, asked.tile)?;
        set(&mut algo, C::CUBLASLT_ALGO_CONFIG_STAGES_ID, asked.stages)?;
        set(&mut algo, C::CUBLASLT_ALGO_CONFIG_SPLITK_NUM, asked.splitk)?;
        set(&mut algo, C::CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, asked.reduction)?;
        set(&mut algo, C::CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING, asked.swizzle)?;
        set(&mut algo, C::CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION, asked.custom)?;
        set(&mut algo, C::CUBLASLT_ALGO_CONFIG_INNER_SHAPE_ID, asked.inner)?;
        set(&mut algo, C::CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, asked.cluster)?;
        // SAFETY: live handle and descriptors; a zeroed result is a valid value of the C struct.
        let mut result: lt::cublasLtMatmulHeuristicResult_t = unsafe { std::mem::zeroed() };
        check("cublasLtMatmulAlgoCheck", unsafe {
            lt::cublasLtMatmulAlgoCheck(
                self.handle,
                plan.desc,
                plan.a_layout,
                plan.b_layout,
                plan.d_layout,
                plan.d_layout,
                &algo,
                &mut result,
            )
        })?;
        check("cublasLtMatmulAlgoCheck(state)", result.state)?;
        if result.workspaceSize > WORKSPACE {
            return Err(KernelError::CublasLt {
                call: "cublasLtMatmulAlgoCheck",
                status: format!("{} needs {} bytes of workspace, more than {WORKSPACE}", asked, result.workspaceSize),
            });
        }
        // Rebuilt exactly what was asked (cuBLASLt may have adjusted a field it does not take).
        let got = describe_algo(&algo)?;
        if got != *asked {
            return Err(KernelError::CublasLt {
                call: "cublasLtMatmulAlgoConfigSetAttribute",
                status: format!("asked for {asked}, cuBLASLt made {got}"),
            });
        }
        Ok(algo)
    }

    /// The algorithm cuBLASLt's heuristic picks for `plan` within the workspace.
    fn heuristic(&self, plan: &LtPlan) -> Result<lt::cublasLtMatmulAlgo_t, KernelError> {
        let mut v = self.heuristics(plan, 1)?;
        if v.is_empty() {
            return Err(KernelError::CublasLt {
                call: "cublasLtMatmulAlgoGetHeuristic",
                status: "no algorithm for this problem".to_string(),
            });
        }
        Ok(v.swap_remove(0))
    }

    /// Up to `count` algorithms cuBLASLt's heuristic offers for `plan` within the workspace, best
    /// first (those whose state is not success left out).
    fn heuristics(&self, plan: &LtPlan, count: usize) -> Result<Vec<lt::cublasLtMatmulAlgo_t>, KernelError> {
        let count = count.clamp(1, 64);
        // SAFETY: the handle and the plan's descriptors are live; the preference is created and
        // destroyed here; the attribute value and the out-pointers outlive the calls; a zeroed
        // heuristic result is a valid value of the plain C struct, and the array has `count` of them.
        unsafe {
            let mut pref = ptr::null_mut();
            check("cublasLtMatmulPreferenceCreate", lt::cublasLtMatmulPreferenceCreate(&mut pref))?;
            let ws = WORKSPACE as u64;
            let r = lt::cublasLtMatmulPreferenceSetAttribute(
                pref,
                lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&ws as *const u64).cast(),
                8,
            );
            let mut results: Vec<lt::cublasLtMatmulHeuristicResult_t> = vec![std::mem::zeroed(); count];
            let mut found = 0;
            let h = lt::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                plan.desc,
                plan.a_layout,
                plan.b_layout,
                plan.d_layout,
                plan.d_layout,
                pref,
                count as i32,
                results.as_mut_ptr(),
                &mut found,
            );
            lt::cublasLtMatmulPreferenceDestroy(pref);
            check("cublasLtMatmulPreferenceSetAttribute", r)?;
            check("cublasLtMatmulAlgoGetHeuristic", h)?;
            results.truncate(found.clamp(0, count as i32) as usize);
            Ok(results
                .into_iter()
                .filter(|r| r.state == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
                .map(|r| r.algo)
                .collect())
        }
    }

    /// Enqueues one planned matmul on the device's stream.
    ///
    /// # Errors
    ///
    /// [`KernelError::BufferLength`] for a D of the wrong size, [`KernelError::CublasLt`].
    pub fn run(&self, dev: &Device, plan: &LtPlan, args: &LtArgs) -> Result<(), KernelError> {
        if args.d.len() != plan.m * plan.n {
            return Err(KernelError::BufferLength { what: "D", expected: plan.m * plan.n, got: args.d.len() });
        }
        let (alpha, beta) = (1f32, 0f32);
        // SAFETY (the block below): the plan's descriptors are live; the addresses are device
        // buffers of the sizes the plan describes (the caller's contract, D checked above); the
        // scale pointers were set on the descriptor above, before the call that reads them.
        if plan.baseline == Baseline::Fp8Block {
            plan.set_scale_pointers(LtScales { a: args.a_scales, b: args.b_scales })?;
        }
        unsafe {
            check(
                "cublasLtMatmul",
                lt::cublasLtMatmul(
                    self.handle,
                    plan.desc,
                    (&alpha as *const f32).cast(),
                    args.b as *const c_void,
                    plan.a_layout,
                    args.a as *const c_void,
                    plan.b_layout,
                    (&beta as *const f32).cast(),
                    args.d.ptr() as *const c_void,
                    plan.d_layout,
                    args.d.ptr() as *mut c_void,
                    plan.d_layout,
                    &plan.algo,
                    self.workspace.all().ptr() as *mut c_void,
                    WORKSPACE,
                    dev.stream().cast(),
                ),
            )
        }
    }
}

impl Drop for CublasLt {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtCreate, destroyed once.
        unsafe {
            lt::cublasLtDestroy(self.handle);
        }
    }
}

/// The leading dimension of the activation scales in cuBLASLt's VEC128_32F layout for `m` rows:
/// the scale tensor is "outer-dim major" (M fastest) and its outer dimension is padded to a
/// multiple of 4 (16 bytes of f32), as cuBLASLt requires for 1D block scaling and PyTorch's
/// `_scaled_mm` hands it over (M not a multiple of 4 gets zero scales in the padding).
pub fn activation_scale_ld(m: usize) -> usize {
    m.next_multiple_of(4)
}

/// Floats of the activation scales of `m` rows and `kb` K blocks in cuBLASLt's layout (every
/// such block starts 16-byte aligned when they are laid back to back, as per expert in a grouped
/// baseline).
pub fn activation_scale_len(m: usize, kb: usize) -> usize {
    kb * activation_scale_ld(m)
}

/// The leading dimension of the weight scales in cuBLASLt's BLK128x128_32F layout: K blocks
/// fastest, their count padded to a multiple of 4.
pub fn weight_scale_ld(kb: usize) -> usize {
    kb.next_multiple_of(4)
}

/// Our activation scales `[M, KB]` (row-major) in cuBLASLt's VEC128_32F layout: `[KB][M4]`, M
/// fastest, M padded to a multiple of 4 with zeros ([`activation_scale_ld`]). Returns the buffer
/// and M4.
pub fn activation_scales_for_cublas(sa: &[f32], m: usize, kb: usize) -> (Vec<f32>, usize) {
    let ld = activation_scale_ld(m);
    let mut out = vec![0f32; activation_scale_len(m, kb)];
    for r in 0..m {
        for b in 0..kb {
            out[b * ld + r] = sa[r * kb + b];
        }
    }
    (out, ld)
}

/// Our weight scales `[NB, KB]` (row-major) in cuBLASLt's BLK128x128_32F layout: `[NB][KB4]`,
/// K-blocks fastest, their count padded to a multiple of 4 with zeros ([`weight_scale_ld`]).
pub fn weight_scales_for_cublas(sb: &[f32], nb: usize, kb: usize) -> Vec<f32> {
    let ld = weight_scale_ld(kb);
    let mut out = vec![0f32; nb * ld];
    for i in 0..nb {
        out[i * ld..i * ld + kb].copy_from_slice(&sb[i * kb..(i + 1) * kb]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithm_ids_round_trip_and_bad_ones_are_refused() {
        let a = LtAlgo {
            algo: 66,
            tile: 20,
            stages: 13,
            splitk: 1,
            reduction: 0,
            swizzle: 1,
            custom: 2,
            inner: 3,
            cluster: 4,
        };
        assert_eq!(a.id(), "cublaslt_a66_t20_s13_k1_r0_w1_c2_i3_l4");
        assert_eq!(a.id().parse::<LtAlgo>(), Ok(a));
        let neg = LtAlgo { algo: -1, ..a };
        assert_eq!(neg.id().parse::<LtAlgo>(), Ok(neg));
        for bad in [
            "wgmma_bm128_bn128_s4_mc1_sw128",
            "cublaslt_a66_t20",
            "cublaslt_a66_t20_s13_k1_r0_w1_c2_i3_x4",
            "cublaslt_a66_t-1_s13_k1_r0_w1_c2_i3_l4",
            "cublaslt_a66_t20_s13_k1_r0_w1_c2_i70000_l4",
        ] {
            let e = bad.parse::<LtAlgo>().expect_err(bad);
            assert!(e.contains(bad), "{e}");
        }
        let json = serde_json::to_string(&a).expect("json");
        assert_eq!(json, format!("\"{}\"", a.id()));
        assert_eq!(serde_json::from_str::<LtAlgo>(&json).expect("parse"), a);
    }

    #[test]
    fn scale_layouts_for_cublas() {
        // M = 3, KB = 2: sa[r][b] = 10 r + b.
        let sa = [0.0, 1.0, 10.0, 11.0, 20.0, 21.0];
        let (t, m4) = activation_scales_for_cublas(&sa, 3, 2);
        assert_eq!(m4, 4);
        assert_eq!(t, vec![0.0, 10.0, 20.0, 0.0, 1.0, 11.0, 21.0, 0.0]);
        let sb = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        assert_eq!(weight_scales_for_cublas(&sb, 2, 3), vec![1.0, 2.0, 3.0, 0.0, 4.0, 5.0, 6.0, 0.0]);
    }

    #[test]
    fn activation_scales_are_padded_to_four_rows_for_every_m() {
        let kb = 3;
        for m in 1..=9 {
            let sa: Vec<f32> = (0..m * kb).map(|i| 1.0 + i as f32).collect();
            let (t, ld) = activation_scales_for_cublas(&sa, m, kb);
            assert_eq!(ld % 4, 0, "m = {m}");
            assert!(ld >= m && ld < m + 4);
            assert_eq!(t.len(), activation_scale_len(m, kb));
            for r in 0..ld {
                for b in 0..kb {
                    let want = if r < m { sa[r * kb + b] } else { 0.0 };
                    assert_eq!(t[b * ld + r], want, "m = {m}, row {r}, block {b}");
                }
            }
            // Experts' blocks laid back to back stay 16-byte aligned.
            assert_eq!((activation_scale_len(m, kb) * 4) % 16, 0);
        }
    }

    #[test]
    fn weight_scales_are_padded_to_four_k_blocks() {
        for kb in 1..=9 {
            let sb: Vec<f32> = (0..2 * kb).map(|i| 1.0 + i as f32).collect();
            let t = weight_scales_for_cublas(&sb, 2, kb);
            let ld = weight_scale_ld(kb);
            assert_eq!(ld % 4, 0);
            assert_eq!(t.len(), 2 * ld);
            assert_eq!(t.iter().filter(|&&x| x != 0.0).count(), 2 * kb);
            assert_eq!(t[ld], sb[kb]);
        }
    }
}
