//! Launch wrappers of the small operations ([`OpKernels`]): every size is checked against the
//! buffers and against what the kernel takes (i32 indices, shared memory) before a launch, and
//! every launch's status is checked. Work goes to the [`Device`]'s stream, in order; errors
//! raised while a kernel runs surface at the next synchronization.
//!
//! Layouts are the CPU runtime's (`fp8forge_runtime::ops`): f32 activations, row-major.

use std::ffi::c_void;

use fp8forge_kernels::cuda::{Device, DeviceBuffer, DeviceSlice, Function, LaunchDims, Module};

use crate::source::Op;
use crate::{CudaRuntimeError, Result};

/// Dynamic shared memory any kernel may use without opting in, bytes.
const DEFAULT_SMEM: u32 = 48 * 1024;

/// The parameters of sigmoid, group-limited routing (DeepSeek-V3).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SigmoidRouting {
    /// Routed experts.
    pub experts: usize,
    /// Experts selected per token.
    pub top_k: usize,
    /// Expert groups (1: no group limit).
    pub groups: usize,
    /// Groups kept per token.
    pub topk_group: usize,
    /// Divide the selected weights by their sum.
    pub renorm: bool,
    /// `routed_scaling_factor`, applied to the weights last.
    pub scaling: f32,
}

impl SigmoidRouting {
    /// Checks the parameters as the model config does (and the kernel relies on).
    ///
    /// # Errors
    ///
    /// [`CudaRuntimeError::Shape`].
    pub fn check(&self) -> Result<()> {
        let bad = |detail: String| Err(CudaRuntimeError::Shape { op: Op::RouterSigmoid.entry(), detail });
        let (e, g) = (self.experts, self.groups);
        if e == 0 || g == 0 || !e.is_multiple_of(g) {
            return bad(format!("{g} groups must divide {e} experts (both non-zero)"));
        }
        if g > 1 && e / g < 2 {
            return bad(format!("{} experts per group: group-limited routing needs at least 2", e / g));
        }
        if self.topk_group == 0 || self.topk_group > g {
            return bad(format!("topk_group {} is not in 1..={g}", self.topk_group));
        }
        if self.top_k == 0 || self.top_k > self.topk_group * (e / g) {
            return bad(format!(
                "top_k {} is not in 1..={} (the experts of the kept groups)",
                self.top_k,
                self.topk_group * (e / g)
            ));
        }
        Ok(())
    }
}

/// The shape of one causal attention call: `windows` windows of `t` tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionShape {
    /// Windows (each attends only within itself).
    pub windows: usize,
    /// Tokens per window.
    pub t: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (dividing `heads`).
    pub kv_heads: usize,
    /// Query/key head dimension.
    pub dq: usize,
    /// Value head dimension.
    pub dv: usize,
    /// Multiplier of `q · k` before the softmax.
    pub scale: f32,
    /// Sliding window (keys `j` with `i - j < window`), if any.
    pub window: Option<usize>,
}

/// A RoPE cos/sin table on the device: `len × half` each.
pub struct RopeTableDevice {
    cos: DeviceBuffer<f32>,
    sin: DeviceBuffer<f32>,
    half: usize,
    len: usize,
}

impl RopeTableDevice {
    /// Uploads tables for `len` positions from per-pair inverse frequencies and the attention
    /// factor ([`crate::reference::rope_tables`], the runtime's `RopeTable` values).
    ///
    /// # Errors
    ///
    /// [`CudaRuntimeError::Shape`] for an empty table, [`CudaRuntimeError::Kernel`] for the upload.
    pub fn upload(dev: &Device, inv_freq: &[f32], attention_factor: f32, len: usize) -> Result<RopeTableDevice> {
        if inv_freq.is_empty() || len == 0 {
            return Err(shape(Op::Rope, format!("table of {len} positions x {} pairs", inv_freq.len())));
        }
        let (cos, sin) = crate::reference::rope_tables(inv_freq, attention_factor, len);
        Ok(RopeTableDevice { cos: dev.upload(&cos)?, sin: dev.upload(&sin)?, half: inv_freq.len(), len })
    }

    /// Rotated pairs per head (half the rotated dimensions).
    pub fn half(&self) -> usize {
        self.half
    }

    /// Positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true (an empty table is refused).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Target tokens of rows of logits on the device, checked when uploaded: each is -1 (no target)
/// or a token of the vocabulary, so the kernel indexes only inside a row.
pub struct Targets {
    buf: DeviceBuffer<i32>,
    vocab: usize,
}

impl Targets {
    /// Checks `host` against `vocab`, then uploads it.
    ///
    /// # Errors
    ///
    /// [`CudaRuntimeError::Target`] naming the first bad row, [`CudaRuntimeError::Kernel`].
    pub fn upload(dev: &Device, host: &[i32], vocab: usize) -> Result<Targets> {
        if let Some((row, &value)) = host.iter().enumerate().find(|&(_, &v)| v < -1 || v as i64 >= vocab as i64) {
            return Err(CudaRuntimeError::Target { row, value, vocab });
        }
        Ok(Targets { buf: dev.upload(host)?, vocab })
    }

    /// Rows.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

fn shape(op: Op, detail: String) -> CudaRuntimeError {
    CudaRuntimeError::Shape { op: op.entry(), detail }
}

/// `Ok` when the buffer has `expected` elements.
fn length<T>(op: Op, what: &'static str, buf: &DeviceSlice<T>, expected: usize) -> Result<()> {
    if buf.len() == expected {
        Ok(())
    } else {
        Err(CudaRuntimeError::BufferLength { op: op.entry(), what, expected, got: buf.len() })
    }
}

/// `v` as a kernel's `int`.
fn int(op: Op, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| shape(op, format!("{what} = {v} exceeds the kernel's 32-bit indices")))
}

/// `a · b`, refused when it overflows.
fn product(op: Op, sizes: &[usize]) -> Result<usize> {
    sizes
        .iter()
        .try_fold(1usize, |acc, &s| acc.checked_mul(s))
        .ok_or_else(|| shape(op, format!("sizes {sizes:?} overflow")))
}

/// A pointer to one kernel argument.
fn arg<T>(v: &mut T) -> *mut c_void {
    (v as *mut T).cast()
}

/// The small operations, compiled (or read from the cache) and loaded on one device.
pub struct OpKernels {
    funcs: Vec<(Op, Function)>,
    /// Dynamic shared memory the attention kernel may use, bytes.
    attention_smem: u32,
    // Last: the function handles above are only valid while their modules are loaded.
    _modules: Vec<Module>,
}

impl OpKernels {
    /// Compiles (or reads from the kernels' cache) and loads every operation for the device.
    ///
    /// # Errors
    ///
    /// [`CudaRuntimeError::Kernel`]: an unsupported GPU, no NVRTC, a compile or load failure.
    pub fn load(dev: &Device) -> Result<OpKernels> {
        let arch = dev.gpu_arch()?;
        // The opt-in limit counts static shared memory too (the kernel's reduction scratch):
        // leave it 1 KiB, or cuFuncSetAttribute refuses the value.
        let attention_smem = dev.info.max_smem_optin.saturating_sub(1024).max(DEFAULT_SMEM);
        let mut funcs = Vec::with_capacity(Op::ALL.len());
        let mut modules = Vec::with_capacity(Op::ALL.len());
        for op in Op::ALL {
            let compiled = op.compile(arch)?;
            let module = dev.load_module(&compiled.cubin)?;
            let smem = if op == Op::CausalAttention { attention_smem } else { DEFAULT_SMEM };
            funcs.push((op, module.function(op.entry(), smem)?));
            modules.push(module);
        }
        Ok(OpKernels { funcs, attention_smem, _modules: modules })
    }

    /// Launches `op` on `blocks` blocks of its `BLOCK` threads.
    ///
    /// # Safety
    ///
    /// `params` must match the kernel's parameters, and the buffers they name must be as large as
    /// the kernel reads and writes (each wrapper checks this before calling).
    unsafe fn launch(&self, dev: &Device, op: Op, blocks: usize, smem: u32, params: &mut [*mut c_void]) -> Result<()> {
        if blocks == 0 {
            return Ok(());
        }
        let grid = u32::try_from(blocks)
            .ok()
            .filter(|&g| g < (1 << 31))
            .ok_or_else(|| shape(op, format!("{blocks} blocks exceed the grid limit")))?;
        let Some((_, f)) = self.funcs.iter().find(|(o, _)| *o == op) else {
            return Err(shape(op, "kernel not loaded".into()));
        };
        // SAFETY: guaranteed by the caller.
        unsafe { f.launch(dev, LaunchDims { grid, block: op.block(), smem }, params)? };
        Ok(())
    }

    /// RMSNorm of each `dim`-wide row of `x` (`rows × dim`) into `out` (which may be `x`'s
    /// buffer): `w · x / sqrt(mean(x²) + eps)`.
    ///
    /// # Errors
    ///
    /// [`CudaRuntimeError::Shape`], [`CudaRuntimeError::BufferLength`], [`CudaRuntimeError::Kernel`].
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm(
        &self,
        dev: &Device,
        x: DeviceSlice<f32>,
        w: DeviceSlice<f32>,
        out: DeviceSlice<f32>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        let op = Op::RmsNorm;
        let n = product(op, &[rows, dim])?;
        length(op, "x", &x, n)?;
        length(op, "w", &w, dim)?;
        length(op, "out", &out, n)?;
        let (mut xp, mut wp, mut op_, mut d, mut e) = (x.ptr(), w.ptr(), out.ptr(), int(op, "dim", dim)?, eps);
        // SAFETY: rms_norm(const float*, const float*, float*, int, float); x and out hold rows × dim.
        unsafe {
            self.launch(dev, op, rows, 0, &mut [arg(&mut xp), arg(&mut wp), arg(&mut op_), arg(&mut d), arg(&mut e)])
        }
    }

    /// Rotary embedding, in place: `x` is `rows × heads × stride`; the `2 · table.half()` dims
    /// from `offset` of each head vector are rotated for position `row % period` (windows of
    /// `period` tokens), with pairs `(x[i], x[half + i])`, or `(x[2i], x[2i+1])` written
    /// de-interleaved when `interleave` (the runtime's `RopeTable::apply`).
    ///
    /// # Errors
    ///
    /// [`CudaRuntimeError::Shape`] (a period longer than the table, dims beyond the stride),
    /// [`CudaRuntimeError::BufferLength`], [`CudaRuntimeError::Kernel`].
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        dev: &Device,
        x: DeviceSlice<f32>,
        table: &RopeTableDevice,
        rows: usize,
        heads: usize,
        stride: usize,
        offset: usize,
        period: usize,
        interleave: bool,
    ) -> Result<()> {
        let op = Op::Rope;
        let half = table.half;
        length(op, "x", &x, product(op, &[rows, heads, stride])?)?;
        if offset + 2 * half > stride {
            return Err(shape(op, format!("dims {offset}..{} exceed the head stride {stride}", offset + 2 * half)));
        }
        if period == 0 || period > table.len || heads == 0 {
            return Err(shape(op, format!("period {period} (heads {heads}) with a table of {} positions", table.len)));
        }
        let blocks = product(op, &[rows, heads])?;
        int(op, "rows x heads", blocks)?;
        let smem = u32::try_from(2 * half * 4).ok().filter(|&s| s <= DEFAULT_SMEM);
        let smem = smem.ok_or_else(|| shape(op, format!("{half} pairs per head exceed the shared memory")))?;
        let (mut xp, mut cp, mut sp) = (x.ptr(), table.cos.all().ptr(), table.sin.all().ptr());
        let (mut h, mut st, mut of, mut hf, mut pe, mut il) = (
            int(op, "heads", heads)?,
            int(op, "stride", stride)?,
            int(op, "offset", offset)?,
            int(op, "half", half)?,
            int(op, "period", period)?,
            i32::from(interleave),
        );
        let mut params = [
            arg(&mut xp),
            arg(&mut cp),
            arg(&mut sp),
            arg(&mut h),
            arg(&mut st),
            arg(&mut of),
            arg(&mut hf),
            arg(&mut pe),
            arg(&mut il),
        ];
        // SAFETY: rope(float*, const float*, const float*, int × 6); x holds rows × heads × stride,
        // the rotated dims lie inside each stride, positions < period <= the table's length.
        unsafe { self.launch(dev, op, blocks, smem, &mut params) }
    }

    /// `gate = silu(gate) · up`, elementwise (same lengths).
    ///
    /// # Errors
    ///
    /// [`CudaRuntimeError::BufferLength`], [`CudaRuntimeError::Kernel`].
    pub fn swiglu(&self, dev: &Device, gate: DeviceSlice<f32>, up: DeviceSlice<f32>) -> Result<()> {
        let op = Op::SwiGlu;
        length(op, "up", &up, gate.len())?;
        let n = gate.len();
        let blocks = n.div_ceil(op.block() as usize).min(1 << 16);
        let (mut gp, mut upp, mut nn) = (gate.ptr(), up.ptr(), n as i64);
        // SAFETY: swiglu(float*, const float*, i64); both hold n elements.
        unsafe { self.launch(dev, op, blocks, 0, &mut [arg(&mut gp), arg(&mut upp), arg(&mut nn)]) }
    }

    /// Softmax top-k routing of `tokens` rows of `experts` router logits: experts in selection
    /// order into `idx` and their probabilities (renormalized to sum 1 when `renorm`) into
    /// `wts`, `tokens × k` each.
    ///
    /// # Errors
    ///
    /// [`CudaRuntimeError::Shape`], [`CudaRuntimeError::BufferLength`], [`CudaRuntimeError::Kernel`].
    #[allow(clippy::too_many_arguments)]
    pub fn router_softmax(
        &self,
        dev: &Device,
        logits: DeviceSlice<f32>,
        idx: DeviceSlice<i32>,
        wts: DeviceSlice<f32>,
        tokens: usize,
        experts: usize,
        k: usize,
        renorm: bool,
    ) -> Result<()> {
        let op = Op::RouterSoftmax;
        if experts == 0 || k == 0 || k > experts {
            return Err(shape(op, format!("top {k} of {experts} experts")));
        }
        length(op, "logits", &logits, product(op, &[tokens, experts])?)?;
        length(op, "idx", &idx, product(op, &[tokens, k])?)?;
        length(op, "wts", &wts, product(op, &[tokens, k])?)?;
        let warps = (op.block() / 32) as usize;
        let smem = router_smem(op, warps * experts)?;
        let (mut lp, mut ip, mut wp) = (logits.ptr(), idx.ptr(), wts.ptr());
        let (mut t, mut e, mut kk, mut rn) =
            (int(op, "tokens", tokens)?, int(op, "experts", experts)?, int(op, "k", k)?, i32::from(renorm));
        let mut params =
            [arg(&mut lp), arg(&mut ip), arg(&mut wp), arg(&mut t), arg(&mut e), arg(&mut kk), arg(&mut rn)];
        // SAFETY: router_softmax(const float*, int*, float*, int × 4); buffers checked above.
        unsafe { self.launch(dev, op, tokens.div_ceil(warps), smem, &mut params) }
    }

    /// Sigmoid, group-limited routing with the correction `bias` (`experts` values) of `tokens`
    /// rows of router logits: experts in selection order into `idx`, weights into `wts`.
    ///
    /// # Errors
    ///
    /// [`CudaRuntimeError::Shape`] (including [`SigmoidRouting::check`]),
    /// [`CudaRuntimeError::BufferLength`], [`CudaRuntimeError::Kernel`].
    #[allow(clippy::too_many_arguments)]
    pub fn router_sigmoid(
        &self,
        dev: &Device,
        logits: DeviceSlice<f32>,
        bias: DeviceSlice<f32>,
        idx: DeviceSlice<i32>,
        wts: DeviceSlice<f32>,
        tokens: usize,
        r: &SigmoidRouting,
    ) -> Result<()> {
        let op = Op::RouterSigmoid;
        r.check()?;
        length(op, "logits", &logits, product(op, &[tokens, r.experts])?)?;
        length(op, "bias", &bias, r.experts)?;
        length(op, "idx", &idx, product(op, &[tokens, r.top_k])?)?;
        length(op, "wts", &wts, product(op, &[tokens, r.top_k])?)?;
        let warps = (op.block() / 32) as usize;
        let smem = router_smem(op, warps * (2 * r.experts + r.groups))?;
        let (mut lp, mut bp, mut ip, mut wp) = (logits.ptr(), bias.ptr(), idx.ptr(), wts.ptr());
        let (mut t, mut e, mut k, mut g, mut kg, mut rn, mut sc) = (
            int(op, "tokens", tokens)?,
            int(op, "experts", r.experts)?,
            int(op, "top_k", r.top_k)?,
            int(op, "groups", r.groups)?,
            int(op, "topk_group", r.topk_group)?,
            i32::from(r.renorm),
            r.scaling,
        );
        let mut params = [
            arg(&mut lp),
            arg(&mut bp),
            arg(&mut ip),
            arg(&mut wp),
            arg(&mut t),
            arg(&mut e),
            arg(&mut k),
            arg(&mut g),
            arg(&mut kg),
            arg(&mut rn),
            arg(&mut sc),
        ];
        // SAFETY: router_sigmoid(const float*, const float*, int*, float*, int × 6, float); the
        // buffers and the routing parameters were checked above.
        unsafe { self.launch(dev, op, tokens.div_ceil(warps), smem, &mut params) }
    }

    /// Causal attention of all heads (the runtime's `ops::causal_attention`, for `s.windows`
    /// windows at once): `q` is `windows·t × heads × dq`, `k` `windows·t × kv_heads × dq`, `v`
    /// `windows·t × kv_heads × dv`, `out` `windows·t × heads × dv`. The simple kernel keeps a row
    /// of `t` scores in shared memory, which bounds `t` (about 56k tokens on a Hopper GPU).
    ///
    /// # Errors
    ///
    /// [`CudaRuntimeError::Shape`], [`CudaRuntimeError::BufferLength`], [`CudaRuntimeError::Kernel`].
    #[allow(clippy::too_many_arguments)]
    pub fn causal_attention(
        &self,
        dev: &Device,
        q: DeviceSlice<f32>,
        k: DeviceSlice<f32>,
        v: DeviceSlice<f32>,
        out: DeviceSlice<f32>,
        s: &AttentionShape,
    ) -> Result<()> {
        let op = Op::CausalAttention;
        if s.t == 0 || s.heads == 0 || s.kv_heads == 0 || !s.heads.is_multiple_of(s.kv_heads) || s.dq == 0 || s.dv == 0
        {
            return Err(shape(op, format!("{s:?}: sizes must be non-zero and kv_heads must divide heads")));
        }
        let rows = product(op, &[s.windows, s.t])?;
        length(op, "q", &q, product(op, &[rows, s.heads, s.dq])?)?;
        length(op, "k", &k, product(op, &[rows, s.kv_heads, s.dq])?)?;
        length(op, "v", &v, product(op, &[rows, s.kv_heads, s.dv])?)?;
        length(op, "out", &out, product(op, &[rows, s.heads, s.dv])?)?;
        let blocks = product(op, &[rows, s.heads])?;
        int(op, "windows x t x heads", blocks)?;
        let smem = u32::try_from((s.t + s.dq) * 4).ok().filter(|&b| b <= self.attention_smem).ok_or_else(|| {
            shape(
                op,
                format!(
                    "{} tokens x {} dims of scores exceed {} bytes of shared memory",
                    s.t, s.dq, self.attention_smem
                ),
            )
        })?;
        let (mut qp, mut kp, mut vp, mut op_) = (q.ptr(), k.ptr(), v.ptr(), out.ptr());
        let (mut t, mut h, mut kh, mut dq, mut dv, mut sc, mut win) = (
            int(op, "t", s.t)?,
            int(op, "heads", s.heads)?,
            int(op, "kv_heads", s.kv_heads)?,
            int(op, "dq", s.dq)?,
            int(op, "dv", s.dv)?,
            s.scale,
            int(op, "window", s.window.unwrap_or(0))?,
        );
        let mut params = [
            arg(&mut qp),
            arg(&mut kp),
            arg(&mut vp),
            arg(&mut op_),
            arg(&mut t),
            arg(&mut h),
            arg(&mut kh),
            arg(&mut dq),
            arg(&mut dv),
            arg(&mut sc),
            arg(&mut win),
        ];
        // SAFETY: causal_attention(const float* × 3, float*, int × 5, float, int); buffers checked.
        unsafe { self.launch(dev, op, blocks, smem, &mut params) }
    }

    /// The causal softmax of `batch` score matrices `t × t` (from batched products), in place:
    /// row `i` becomes `softmax(scale · s)` over keys `j <= i` (within `window`), 0 elsewhere.
    ///
    /// # Errors
    ///
    /// [`CudaRuntimeError::Shape`], [`CudaRuntimeError::BufferLength`], [`CudaRuntimeError::Kernel`].
    pub fn causal_softmax(
        &self,
        dev: &Device,
        scores: DeviceSlice<f32>,
        batch: usize,
        t: usize,
        scale: f32,
        window: Option<usize>,
    ) -> Result<()> {
        let op = Op::CausalSoftmax;
        length(op, "scores", &scores, product(op, &[batch, t, t])?)?;
        let blocks = product(op, &[batch, t])?;
        let (mut sp, mut tt, mut sc, mut win) =
            (scores.ptr(), int(op, "t", t)?, scale, int(op, "window", window.unwrap_or(0))?);
        // SAFETY: causal_softmax(float*, int, float, int); scores holds batch × t × t.
        unsafe { self.launch(dev, op, blocks, 0, &mut [arg(&mut sp), arg(&mut tt), arg(&mut sc), arg(&mut win)]) }
    }

    /// Per row of `logits` (`rows × vocab`): its log-sum-exp into `lse` and the negative
    /// log-likelihood of its target into `nll` (NaN where the target is -1), both f64.
    ///
    /// # Errors
    ///
    /// [`CudaRuntimeError::Shape`], [`CudaRuntimeError::BufferLength`], [`CudaRuntimeError::Kernel`].
    #[allow(clippy::too_many_arguments)]
    pub fn log_softmax_nll(
        &self,
        dev: &Device,
        logits: DeviceSlice<f32>,
        targets: &Targets,
        lse: DeviceSlice<f64>,
        nll: DeviceSlice<f64>,
        rows: usize,
        vocab: usize,
    ) -> Result<()> {
        let op = Op::LogSoftmaxNll;
        if targets.vocab != vocab {
            return Err(shape(
                op,
                format!("targets checked for a vocabulary of {}, logits have {vocab}", targets.vocab),
            ));
        }
        length(op, "logits", &logits, product(op, &[rows, vocab])?)?;
        length(op, "targets", &targets.buf.all(), rows)?;
        length(op, "lse", &lse, rows)?;
        length(op, "nll", &nll, rows)?;
        let (mut lp, mut tp, mut zp, mut np, mut v) =
            (logits.ptr(), targets.buf.all().ptr(), lse.ptr(), nll.ptr(), int(op, "vocab", vocab)?);
        let mut params = [arg(&mut lp), arg(&mut tp), arg(&mut zp), arg(&mut np), arg(&mut v)];
        // SAFETY: log_softmax_nll(const float*, const int*, double*, double*, int); checked above.
        unsafe { self.launch(dev, op, rows, 0, &mut params) }
    }

    /// KL(P ‖ Q) per row, P from `base` and Q from `model` logits (`rows × vocab` each), with
    /// their log-sum-exps from [`OpKernels::log_softmax_nll`]; f64 into `out`.
    ///
    /// # Errors
    ///
    /// [`CudaRuntimeError::Shape`], [`CudaRuntimeError::BufferLength`], [`CudaRuntimeError::Kernel`].
    #[allow(clippy::too_many_arguments)]
    pub fn kld(
        &self,
        dev: &Device,
        base: DeviceSlice<f32>,
        model: DeviceSlice<f32>,
        lse_base: DeviceSlice<f64>,
        lse_model: DeviceSlice<f64>,
        out: DeviceSlice<f64>,
        rows: usize,
        vocab: usize,
    ) -> Result<()> {
        let op = Op::Kld;
        let n = product(op, &[rows, vocab])?;
        length(op, "base", &base, n)?;
        length(op, "model", &model, n)?;
        length(op, "lse_base", &lse_base, rows)?;
        length(op, "lse_model", &lse_model, rows)?;
        length(op, "out", &out, rows)?;
        let (mut bp, mut mp, mut zb, mut zm, mut op_, mut v) =
            (base.ptr(), model.ptr(), lse_base.ptr(), lse_model.ptr(), out.ptr(), int(op, "vocab", vocab)?);
        let mut params = [arg(&mut bp), arg(&mut mp), arg(&mut zb), arg(&mut zm), arg(&mut op_), arg(&mut v)];
        // SAFETY: kld(const float* × 2, const double* × 2, double*, int); checked above.
        unsafe { self.launch(dev, op, rows, 0, &mut params) }
    }

    /// The index of the largest logit of each row (`rows × vocab`), ties to the lowest, into `out`.
    ///
    /// # Errors
    ///
    /// [`CudaRuntimeError::Shape`], [`CudaRuntimeError::BufferLength`], [`CudaRuntimeError::Kernel`].
    pub fn top1(
        &self,
        dev: &Device,
        logits: DeviceSlice<f32>,
        out: DeviceSlice<i32>,
        rows: usize,
        vocab: usize,
    ) -> Result<()> {
        let op = Op::Top1;
        if vocab == 0 {
            return Err(shape(op, "empty rows".into()));
        }
        length(op, "logits", &logits, product(op, &[rows, vocab])?)?;
        length(op, "out", &out, rows)?;
        let (mut lp, mut op_, mut v) = (logits.ptr(), out.ptr(), int(op, "vocab", vocab)?);
        // SAFETY: top1(const float*, int*, int); checked above.
        unsafe { self.launch(dev, op, rows, 0, &mut [arg(&mut lp), arg(&mut op_), arg(&mut v)]) }
    }
}

/// The routers' shared memory for `floats` values, refused beyond the default limit.
fn router_smem(op: Op, floats: usize) -> Result<u32> {
    u32::try_from(floats * 4).ok().filter(|&b| b <= DEFAULT_SMEM).ok_or_else(|| {
        shape(op, format!("{floats} floats of routing state exceed {DEFAULT_SMEM} bytes of shared memory"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigmoid_routing_parameters_are_checked_as_the_config_does() {
        let ok = SigmoidRouting { experts: 256, top_k: 8, groups: 8, topk_group: 4, renorm: true, scaling: 2.5 };
        assert!(ok.check().is_ok());
        for bad in [
            SigmoidRouting { groups: 7, ..ok },
            SigmoidRouting { experts: 8, groups: 8, topk_group: 4, top_k: 2, ..ok },
            SigmoidRouting { topk_group: 0, ..ok },
            SigmoidRouting { topk_group: 9, ..ok },
            SigmoidRouting { top_k: 129, ..ok },
            SigmoidRouting { top_k: 0, ..ok },
        ] {
            assert!(
                matches!(bad.check(), Err(CudaRuntimeError::Shape { op: "router_sigmoid", .. })),
                "{bad:?} accepted"
            );
        }
        assert!(SigmoidRouting { top_k: 128, ..ok }.check().is_ok());
    }

    #[test]
    fn router_state_beyond_shared_memory_is_refused() {
        assert_eq!(router_smem(Op::RouterSoftmax, 4 * 256).ok(), Some(4096));
        assert!(router_smem(Op::RouterSoftmax, 13_000).is_err());
    }
}
