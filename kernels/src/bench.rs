//! `bench gemm`: our kernels next to cuBLASLt BF16 and FP8 block-scaled, timed the way
//! BENCH_TARGETS.md measured its targets, so the numbers compare.
//!
//! Per shape: a random problem (activations N(0,1), weights N(0,0.02²), quantized with the
//! contract's rules); each implementation first runs once on a NaN-poisoned output, which is
//! checked in full for unwritten or non-finite values and on sampled rows against the f64
//! reference of the dequantized operands (our kernel must pass, relative Frobenius error < 1e-2,
//! before it is timed); then each implementation is captured as a CUDA graph of at least 20
//! back-to-back calls cycling through enough copies of the operands to exceed 2 × L2, warmed up,
//! and the graphs are replayed interleaved (ours, BF16, FP8, ours, ...) 7 times; the time of one
//! call is the median replay over the calls per graph. TFLOP/s = 2·M·N·K / time; GB/s = the
//! fewest bytes the GEMM must move (operands read once, D written once) / time.

use std::fmt;

use std::cell::RefCell;
use std::rc::Rc;

use rayon::prelude::*;
use serde::{Serialize, Serializer};

use crate::config::{GemmConfig, GemmShape, GpuArch, KernelKind, Multicast, is_legal, search_space};
use crate::cublaslt::{
    AlgoAsk, Baseline, CublasLt, LtAlgo, LtArgs, LtChoice, LtPlan, LtScales, activation_scale_len,
    activation_scales_for_cublas, weight_scale_ld, weight_scales_for_cublas,
};
use crate::cuda::{Device, DeviceBuffer, Graph};
use crate::error::KernelError;
use crate::gemm::{DEFAULT_RASTER_GROUP, GemmArgs, GemmKernel, MIndices};
use crate::problem::HostProblem;
use crate::reference::{Comparison, compare, e4m3_table, f32_to_bf16, gemm_references};

/// A NaN bf16 (all ones): what outputs are poisoned with before a checked run.
pub const POISON: u16 = 0xFFFF;

/// How long one checked call may run before it counts as hung (the largest benchmark problem
/// takes milliseconds).
pub const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How to measure.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Calls captured back to back in one graph (at least 20).
    pub calls_per_graph: u32,
    /// Timed replays per implementation; the median is reported.
    pub replays: u32,
    /// Untimed replays first.
    pub warmup_replays: u32,
    /// The operand copies cycled through must exceed this many bytes (0: 2 × the device's L2).
    pub rotate_bytes: u64,
    /// Rows compared with the CPU reference (evenly spread, first and last included).
    pub check_rows: usize,
    /// Relative error our kernel must stay under.
    pub tolerance: f64,
    /// Seed of the random problem.
    pub seed: u64,
    /// Also time the cuBLASLt baselines.
    pub baselines: bool,
    /// Band height of our kernel's tile order.
    pub raster_group: u32,
    /// Grouped shapes: the real tokens of each expert (its run is padded to 128 rows); `None`
    /// splits M evenly over the experts.
    pub tokens_per_expert: Option<usize>,
}

impl Default for BenchOptions {
    fn default() -> BenchOptions {
        BenchOptions {
            calls_per_graph: 20,
            replays: 7,
            warmup_replays: 2,
            rotate_bytes: 0,
            check_rows: 64,
            tolerance: 1e-2,
            seed: 0x5EED,
            baselines: true,
            raster_group: DEFAULT_RASTER_GROUP,
            tokens_per_expert: None,
        }
    }
}

/// What one row of `bench gemm` timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Implementation {
    /// Our kernel.
    Fp8forge,
    /// A cuBLASLt baseline.
    CublasLt(Baseline),
    /// cuBLASLt FP8 block-scaled with a chosen algorithm (a tuning candidate, or a tuning
    /// table's entry): checked like ours, and a failed check means no time.
    CublasLtAlgo,
}

impl Implementation {
    /// The `impl` value in `bench gemm --json`: `fp8forge`, `cublaslt_bf16`,
    /// `cublaslt_fp8_block` or `cublaslt_fp8_algo`.
    pub fn name(self) -> &'static str {
        match self {
            Implementation::Fp8forge => "fp8forge",
            Implementation::CublasLt(b) => b.name(),
            Implementation::CublasLtAlgo => "cublaslt_fp8_algo",
        }
    }

    /// True for what a tuning table may choose (our kernel, a chosen cuBLASLt algorithm), as
    /// opposed to the baselines it is compared with.
    pub fn is_tuned(self) -> bool {
        matches!(self, Implementation::Fp8forge | Implementation::CublasLtAlgo)
    }
}

impl fmt::Display for Implementation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

impl Serialize for Implementation {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// One line of results (the `rows` of `bench gemm --json`).
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    /// Rows of D (grouped: all experts' rows).
    pub m: usize,
    /// Columns of D.
    pub n: usize,
    /// K.
    pub k: usize,
    /// Number of B matrices: 1 dense, E grouped.
    pub groups: usize,
    /// What was timed: `fp8forge`, `cublaslt_bf16`, `cublaslt_fp8_block` or
    /// `cublaslt_fp8_algo`.
    #[serde(rename = "impl")]
    pub implementation: Implementation,
    /// Our configuration id, `heuristic` for a cuBLASLt baseline, the algorithm's id
    /// ([`LtAlgo::id`]) for `cublaslt_fp8_algo` (`heuristic` when it had to fall back).
    pub config: String,
    /// Median time of one call, microseconds (absent when the check failed or the implementation
    /// could not run).
    pub us: Option<f64>,
    /// 2·M·N·K / time, TFLOP/s.
    pub tflops: Option<f64>,
    /// Minimum bytes / time, GB/s.
    pub gbps: Option<f64>,
    /// Relative Frobenius error on the checked rows against the f64 reference.
    pub rel_err: Option<f64>,
    /// Whether the output passed the check (every element written and finite, error under the
    /// tolerance).
    pub ok: bool,
    /// Why the row has no time, if it has none.
    pub error: Option<String>,
}

/// The shapes of BENCH_TARGETS.md: DeepSeek-V3's dense N×K at M = 64, 128, 4096, and the
/// M-grouped MoE shapes (experts × tokens per expert).
pub fn deepseek_v3_shapes() -> Vec<GemmShape> {
    let nk = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)];
    let mut out = Vec::new();
    for m in [64, 128, 4096] {
        for (n, k) in nk {
            out.push(GemmShape::dense(m, n, k));
        }
    }
    for (experts, tokens) in [(4, 8192), (8, 4096)] {
        for (n, k) in [(4096, 7168), (7168, 2048)] {
            out.push(GemmShape::grouped(experts * tokens, n, k, experts));
        }
    }
    out
}

/// A configuration for `shape` when none is given: among the search space's legal wgmma (else
/// mma.sync) configurations without multicast, the one with the fewest waves of tiles over `sms`,
/// each tile's cost taken as its area plus its operand traffic (BM·BN + 64·(BM + BN)); ties go to
/// the larger tile, then the deeper pipeline. A wave-count heuristic, not a tuner.
pub fn heuristic_config(shape: &GemmShape, arch: GpuArch, sms: u32) -> Option<GemmConfig> {
    let candidates: Vec<GemmConfig> = search_space(arch)
        .into_iter()
        .filter(|c| c.multicast == Multicast::None && is_legal(c, shape).is_ok())
        .collect();
    let wgmma: Vec<GemmConfig> = candidates.iter().copied().filter(|c| c.kind == KernelKind::Wgmma).collect();
    let pool = if wgmma.is_empty() { candidates } else { wgmma };
    let cost = |c: &GemmConfig| {
        let (bm, bn) = (c.block_m as f64, c.block_n as f64);
        let tiles = shape.m.div_ceil(c.block_m as usize) * shape.n.div_ceil(c.block_n as usize);
        let waves = tiles.div_ceil(sms.max(1) as usize) as f64;
        waves * (bm * bn + 64.0 * (bm + bn))
    };
    pool.into_iter().min_by(|a, b| {
        cost(a)
            .total_cmp(&cost(b))
            .then((b.block_m * b.block_n).cmp(&(a.block_m * a.block_n)))
            .then(b.stages.cmp(&a.stages))
    })
}

/// Rows checked against the reference: up to `count` real (non-padding) rows, evenly spread,
/// the first and last included.
fn check_rows(p: &HostProblem, count: usize) -> Vec<usize> {
    let real: Vec<usize> = match &p.m_indices {
        Some(idx) => (0..p.shape.m).filter(|&r| idx[r] >= 0).collect(),
        None => (0..p.shape.m).collect(),
    };
    if real.len() <= count.max(2) {
        return real;
    }
    let count = count.max(2);
    let mut rows: Vec<usize> = (0..count).map(|i| real[i * (real.len() - 1) / (count - 1)]).collect();
    rows.dedup();
    rows
}

/// The operands on the device, `copies` times over, each copy at a 256-byte aligned offset.
struct Rotation<T> {
    buf: DeviceBuffer<T>,
    stride: usize,
    len: usize,
    copies: usize,
}

impl<T: Copy> Rotation<T> {
    fn new(dev: &Device, host: &[T], copies: usize) -> Result<Rotation<T>, KernelError> {
        let align = 256 / std::mem::size_of::<T>().max(1);
        let stride = host.len().next_multiple_of(align.max(1)).max(1);
        let buf = dev.alloc::<T>(stride * copies)?;
        dev.copy_to_device(host, &buf.slice(0, host.len()))?;
        for c in 1..copies {
            dev.copy_on_device(&buf.slice(0, host.len()), &buf.slice(c * stride, host.len()))?;
        }
        Ok(Rotation { buf, stride, len: host.len(), copies })
    }

    fn get(&self, i: usize) -> crate::cuda::DeviceSlice<'_, T> {
        self.buf.slice((i % self.copies) * self.stride, self.len)
    }

    /// `len` elements of copy `i` from element `offset` on.
    fn part(&self, i: usize, offset: usize, len: usize) -> crate::cuda::DeviceSlice<'_, T> {
        self.buf.slice((i % self.copies) * self.stride + offset, len)
    }
}

/// Our operands (also what the cuBLASLt FP8 baseline reads, with its own scale layouts).
struct Fp8Set {
    a: Rotation<u8>,
    sa: Rotation<f32>,
    b: Rotation<u8>,
    sb: Rotation<f32>,
    d: Rotation<u16>,
    m_indices: Option<MIndices>,
}

/// What a cuBLASLt baseline reads besides [`Fp8Set`], and its own output.
enum LtOperands {
    /// The dequantized operands, rounded to bf16.
    Bf16 { a: Rotation<u16>, b: Rotation<u16>, d: Rotation<u16> },
    /// Our FP8 operands' scales in cuBLASLt's layouts (the codes are read from [`Fp8Set`]).
    Fp8Block { a_scales: Rotation<f32>, b_scales: Rotation<f32>, d: Rotation<u16> },
}

impl LtOperands {
    fn d(&self) -> &Rotation<u16> {
        match self {
            LtOperands::Bf16 { d, .. } | LtOperands::Fp8Block { d, .. } => d,
        }
    }
}

/// One implementation, ready to enqueue call `i` (on operand copy `i`).
enum Impl<'a> {
    /// Our kernel.
    Ours(GemmKernel),
    /// A cuBLASLt baseline or algorithm: one plan per expert with rows (and the expert's index),
    /// its operands (shared by every algorithm of the shape).
    Lt { lt: &'a CublasLt, plans: Vec<(LtPlan, usize)>, ops: Rc<LtOperands> },
}

/// An implementation that passed its check, captured as a graph. The graph is dropped before
/// the implementation it replays (fields drop in order), so our kernel's module stays loaded for
/// as long as a graph launches it.
struct Captured<'a> {
    row: BenchRow,
    graph: Graph,
    _imp: Impl<'a>,
}

/// Benchmarks `shape`: our kernel in each of `configs` (a heuristic pick when empty) and, with
/// `opts.baselines`, the cuBLASLt baselines.
///
/// # Errors
///
/// [`KernelError`] for a failure that stops the whole shape (no device memory, a failed CUDA
/// call outside a kernel); an implementation that fails its check or cannot run gets a row with
/// `ok: false` and the reason.
pub fn bench_shape(
    dev: &Device,
    lt: Option<&CublasLt>,
    shape: &GemmShape,
    configs: &[GemmConfig],
    opts: &BenchOptions,
) -> Result<Vec<BenchRow>, KernelError> {
    bench_shape_with(dev, lt, shape, configs, &[], opts)
}

/// [`bench_shape`], also timing cuBLASLt FP8 block-scaled with each of `algos`
/// ([`Implementation::CublasLtAlgo`] rows; when an algorithm no longer exists, the heuristic's
/// choice with the row's config `heuristic`). Without `lt` the algorithms get rows saying so.
///
/// # Errors
///
/// As [`bench_shape`].
pub fn bench_shape_with(
    dev: &Device,
    lt: Option<&CublasLt>,
    shape: &GemmShape,
    configs: &[GemmConfig],
    algos: &[LtAlgo],
    opts: &BenchOptions,
) -> Result<Vec<BenchRow>, KernelError> {
    let arch = dev.gpu_arch()?;
    let configs: Vec<GemmConfig> = if configs.is_empty() && algos.is_empty() {
        heuristic_config(shape, arch, dev.info.sms).into_iter().collect()
    } else {
        configs.to_vec()
    };
    let bench = ShapeBench::new(dev, shape, opts)?;
    let mut lt_rows: Vec<LtRow> = algos.iter().map(|a| LtRow::Algo { algo: *a, fall_back: true }).collect();
    if opts.baselines {
        lt_rows.extend([LtRow::Baseline(Baseline::Bf16), LtRow::Baseline(Baseline::Fp8Block)]);
    }
    bench.run_with(lt, &configs, &lt_rows)
}

/// A cuBLASLt row to time besides our kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LtRow {
    /// A baseline with the heuristic's algorithm (timed even when its check fails).
    Baseline(Baseline),
    /// FP8 block-scaled with this algorithm, checked like ours; with `fall_back`, the
    /// heuristic's algorithm when this one no longer exists, else the row fails.
    Algo {
        /// The algorithm.
        algo: LtAlgo,
        /// Fall back to the heuristic's choice when it cannot be rebuilt.
        fall_back: bool,
    },
}

/// One shape made ready to measure many times: the random problem, its f64 reference on the
/// checked rows, and the rotated operand copies on the device. What the autotuner uses, so that
/// each batch of candidates is not a new problem.
pub struct ShapeBench<'d> {
    dev: &'d Device,
    shape: GemmShape,
    opts: BenchOptions,
    problem: HostProblem,
    rows: Vec<usize>,
    reference: Vec<f64>,
    rotate: u64,
    fp8: Fp8Set,
    /// The cuBLASLt operands, made on first use, per baseline.
    lt_ops: RefCell<Vec<(Baseline, Rc<LtOperands>)>>,
}

impl<'d> ShapeBench<'d> {
    /// Draws the problem of `shape` (seed `opts.seed`), computes its reference and uploads it.
    ///
    /// # Errors
    ///
    /// [`KernelError`]: a shape the kernels cannot run, no device memory, a failed copy.
    pub fn new(dev: &'d Device, shape: &GemmShape, opts: &BenchOptions) -> Result<ShapeBench<'d>, KernelError> {
        let tokens = match shape.groups {
            Some(e) => vec![opts.tokens_per_expert.unwrap_or(shape.m / e.max(1)); e],
            None => Vec::new(),
        };
        let problem = HostProblem::random(shape, opts.seed, &tokens)?;
        let rows = check_rows(&problem, opts.check_rows);
        let (_, reference) = gemm_references(shape, &problem.inputs(), Some(&rows))?;
        let rotate = if opts.rotate_bytes == 0 { 2 * dev.info.l2_bytes } else { opts.rotate_bytes };
        let set_bytes =
            (problem.a.len() + problem.b.len() + 4 * (problem.sa.len() + problem.sb.len()) + 2 * shape.m * shape.n)
                as u64;
        let copies = copies_for(rotate, set_bytes);
        let fp8 = Fp8Set {
            a: Rotation::new(dev, &problem.a, copies)?,
            sa: Rotation::new(dev, &problem.sa, copies)?,
            b: Rotation::new(dev, &problem.b, copies)?,
            sb: Rotation::new(dev, &problem.sb, copies)?,
            d: Rotation::new(dev, &vec![POISON; shape.m * shape.n], copies)?,
            m_indices: problem.m_indices.as_ref().map(|i| MIndices::upload(dev, i, shape.experts())).transpose()?,
        };
        Ok(ShapeBench {
            dev,
            shape: *shape,
            opts: opts.clone(),
            problem,
            rows,
            reference,
            rotate,
            fp8,
            lt_ops: RefCell::new(Vec::new()),
        })
    }

    /// The shape.
    pub fn shape(&self) -> &GemmShape {
        &self.shape
    }

    /// Checks, then times, our kernel in each of `configs` and, given `lt`, the two cuBLASLt
    /// baselines; all that pass their check are timed interleaved in the same replays. Rows come
    /// in this order: the implementations that could not be set up, those that failed their
    /// check (or capture), then the timed ones.
    ///
    /// # Errors
    ///
    /// As [`bench_shape`].
    pub fn run(&self, lt: Option<&CublasLt>, configs: &[GemmConfig]) -> Result<Vec<BenchRow>, KernelError> {
        let rows = [LtRow::Baseline(Baseline::Bf16), LtRow::Baseline(Baseline::Fp8Block)];
        self.run_with(lt, configs, if lt.is_some() { &rows } else { &[] })
    }

    /// The algorithms cuBLASLt's heuristic offers for this shape in FP8 block-scaled (at most
    /// `count`; for a grouped shape, those of the first expert's matmul, which every expert of
    /// the tuner's problems shares).
    ///
    /// # Errors
    ///
    /// [`KernelError`]: cuBLASLt failed, or offers nothing.
    pub fn lt_algorithms(&self, lt: &CublasLt, count: usize) -> Result<Vec<LtAlgo>, KernelError> {
        let ops = self.lt_operands(Baseline::Fp8Block)?;
        let rows = expert_ranges(&self.problem).into_iter().map(|(_, rows)| rows).find(|&r| r > 0).unwrap_or(0);
        let scales = lt_scales(&ops, 0, 0, 0);
        lt.algorithms(Baseline::Fp8Block, rows, self.shape.n, self.shape.k, scales, count)
    }

    /// The cuBLASLt operands of `baseline`, uploaded once per shape.
    fn lt_operands(&self, baseline: Baseline) -> Result<Rc<LtOperands>, KernelError> {
        if let Some((_, ops)) = self.lt_ops.borrow().iter().find(|(b, _)| *b == baseline) {
            return Ok(Rc::clone(ops));
        }
        let ops = Rc::new(lt_operands(self.dev, &self.problem, baseline, self.rotate)?);
        self.lt_ops.borrow_mut().push((baseline, Rc::clone(&ops)));
        Ok(ops)
    }

    /// [`ShapeBench::run`] with the cuBLASLt rows given (none without `lt`: rows of
    /// algorithms then say that cuBLASLt is not there).
    ///
    /// # Errors
    ///
    /// As [`bench_shape`].
    pub fn run_with<'a>(
        &self,
        lt: Option<&'a CublasLt>,
        configs: &[GemmConfig],
        lt_rows: &[LtRow],
    ) -> Result<Vec<BenchRow>, KernelError> {
        let mut out = Vec::new();
        let mut ready: Vec<(BenchRow, Impl<'a>)> = Vec::new();
        for (mut row, prepared) in self.prepare(lt, configs, lt_rows) {
            match prepared {
                Ok(imp) => ready.push((row, imp)),
                Err(e) => {
                    row.error = Some(e.to_string());
                    out.push(row);
                }
            }
        }
        let mut captured = Vec::new();
        for (mut row, imp) in ready {
            match self.check_and_capture(&mut row, &imp)? {
                Some(graph) => captured.push(Captured { row, graph, _imp: imp }),
                None => out.push(row),
            }
        }
        out.extend(self.time(captured)?);
        Ok(out)
    }

    /// Loads our kernel in each configuration and sets up the baselines: one row each, with the
    /// implementation or why it cannot run.
    fn prepare<'a>(
        &self,
        lt: Option<&'a CublasLt>,
        configs: &[GemmConfig],
        lt_rows: &[LtRow],
    ) -> Vec<(BenchRow, Result<Impl<'a>, KernelError>)> {
        let mut out = Vec::new();
        for &cfg in configs {
            let kernel = GemmKernel::load(self.dev, cfg, self.shape.groups.is_some());
            out.push((empty_row(&self.shape, Implementation::Fp8forge, &cfg.id()), kernel.map(Impl::Ours)));
        }
        for &r in lt_rows {
            let (implementation, baseline, ask, mut config) = match r {
                LtRow::Baseline(b) => (Implementation::CublasLt(b), b, AlgoAsk::Heuristic, "heuristic".to_string()),
                LtRow::Algo { algo, fall_back } => {
                    let ask = if fall_back { AlgoAsk::Prefer(algo) } else { AlgoAsk::Exactly(algo) };
                    (Implementation::CublasLtAlgo, Baseline::Fp8Block, ask, algo.id())
                }
            };
            let imp = match lt {
                None => Err(KernelError::CublasLt { call: "cublasLtCreate", status: "cuBLASLt is not open".into() }),
                Some(lt) => self.lt_operands(baseline).and_then(|ops| {
                    let plans = lt_plans(lt, &self.problem, baseline, &ops, ask)?;
                    if plans.iter().any(|(p, _)| matches!(p.choice, LtChoice::FellBack { .. })) {
                        config = "heuristic".to_string();
                    }
                    Ok(Impl::Lt { lt, plans, ops })
                }),
            };
            out.push((empty_row(&self.shape, implementation, &config), imp));
        }
        out
    }

    /// Enqueues call `i` of `imp` (on operand copy `i`).
    fn enqueue(&self, imp: &Impl, i: usize) -> Result<(), KernelError> {
        let fp8 = &self.fp8;
        match imp {
            Impl::Ours(kernel) => {
                let args = GemmArgs {
                    a: fp8.a.get(i),
                    sa: fp8.sa.get(i),
                    b: fp8.b.get(i),
                    sb: fp8.sb.get(i),
                    d: fp8.d.get(i),
                    m_indices: fp8.m_indices.as_ref(),
                };
                kernel.launch(self.dev, &self.shape, &args, self.opts.raster_group)
            }
            Impl::Lt { lt, plans, ops } => lt_enqueue(self.dev, lt, plans, ops, fp8, &self.shape, i),
        }
    }

    /// Runs `imp` once on a poisoned output and compares it with the reference; when it passes
    /// (or is a baseline, which is timed even when it is off), captures its graph. `None` when
    /// the row is finished: it failed, and `row.error` says why.
    ///
    /// # Errors
    ///
    /// Only an error after which the device cannot be used ([`KernelError::is_device_lost`]: a
    /// kernel faulted or hangs); every other failure is the row's.
    fn check_and_capture(&self, row: &mut BenchRow, imp: &Impl) -> Result<Option<Graph>, KernelError> {
        let finished = |row: &mut BenchRow, e: KernelError, what: &str| {
            if e.is_device_lost() {
                return Err(e);
            }
            row.error = Some(format!("{what}{e}"));
            Ok(None)
        };
        match self.check(imp) {
            Ok(c) => {
                row.rel_err = Some(c.rel_err);
                row.ok = c.passes(self.opts.tolerance);
                if !row.ok {
                    row.error = Some(format!(
                        "check failed: relative error {:.3e}, {} non-finite outputs",
                        c.rel_err, c.non_finite
                    ));
                    if row.implementation.is_tuned() {
                        return Ok(None);
                    }
                }
            }
            Err(e) => return finished(row, e, ""),
        }
        let calls = self.opts.calls_per_graph.max(20) as usize;
        match self.dev.capture(|| (0..calls).try_for_each(|i| self.enqueue(imp, i))) {
            Ok(g) => Ok(Some(g)),
            Err(e) => finished(row, e, "graph capture: "),
        }
    }

    /// One call of `imp` on a NaN-poisoned output: every element must be written and finite, and
    /// the sampled rows close to the reference.
    fn check(&self, imp: &Impl) -> Result<Comparison, KernelError> {
        let (dev, shape) = (self.dev, &self.shape);
        let d0 = match imp {
            Impl::Ours(_) => self.fp8.d.get(0),
            Impl::Lt { ops, .. } => ops.d().get(0),
        };
        dev.fill_u16(&d0, POISON)?;
        self.enqueue(imp, 0)?;
        dev.synchronize_within(CHECK_TIMEOUT)?;
        let mut host = vec![0u16; shape.m * shape.n];
        dev.copy_to_host(&d0, &mut host)?;
        let non_finite = host.par_iter().filter(|&&v| !crate::reference::bf16_to_f32(v).is_finite()).count();
        let sampled: Vec<u16> =
            self.rows.iter().flat_map(|&r| host[r * shape.n..(r + 1) * shape.n].iter().copied()).collect();
        let mut c = compare(&sampled, &self.reference)?;
        if c.non_finite == 0 && non_finite > 0 {
            c.non_finite = non_finite;
        }
        Ok(c)
    }

    /// Warms the graphs up, then replays them interleaved; each row gets the median time of one
    /// call.
    fn time(&self, captured: Vec<Captured>) -> Result<Vec<BenchRow>, KernelError> {
        let (dev, shape, opts) = (self.dev, &self.shape, &self.opts);
        let (start, end) = (dev.event()?, dev.event()?);
        for _ in 0..opts.warmup_replays {
            for c in &captured {
                dev.replay(&c.graph)?;
            }
        }
        dev.synchronize()?;
        let calls = opts.calls_per_graph.max(20) as f64;
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); captured.len()];
        for _ in 0..opts.replays.max(1) {
            for (i, c) in captured.iter().enumerate() {
                dev.record(&start)?;
                dev.replay(&c.graph)?;
                dev.record(&end)?;
                samples[i].push(f64::from(dev.elapsed_ms(&start, &end)?) * 1e3 / calls);
            }
        }
        let mut out = Vec::new();
        for (c, mut s) in captured.into_iter().zip(samples) {
            let mut row = c.row;
            s.sort_by(f64::total_cmp);
            let us = s[s.len() / 2];
            row.us = Some(us);
            row.tflops = Some(shape.flops() / (us * 1e-6) / 1e12);
            row.gbps = Some(shape.min_bytes() / (us * 1e-6) / 1e9);
            out.push(row);
        }
        Ok(out)
    }
}

fn copies_for(rotate: u64, set_bytes: u64) -> usize {
    (rotate.div_ceil(set_bytes.max(1)) as usize).clamp(1, 64)
}

fn empty_row(shape: &GemmShape, implementation: Implementation, config: &str) -> BenchRow {
    BenchRow {
        m: shape.m,
        n: shape.n,
        k: shape.k,
        groups: shape.experts(),
        implementation,
        config: config.to_string(),
        us: None,
        tflops: None,
        gbps: None,
        rel_err: None,
        ok: false,
        error: None,
    }
}

/// The experts' row ranges `(start, rows)` of a grouped problem (padding included), or the whole
/// M for a dense one.
fn expert_ranges(p: &HostProblem) -> Vec<(usize, usize)> {
    match &p.m_indices {
        None => vec![(0, p.shape.m)],
        Some(idx) => {
            let mut out: Vec<(usize, usize)> = Vec::new();
            let mut start = 0;
            for e in 0..p.shape.experts() as i32 {
                // An expert's run: its rows, then padding up to the next 128-row boundary.
                let end = idx.iter().rposition(|&x| x == e).map_or(start, |last| (last + 1).next_multiple_of(128));
                out.push((start, end - start));
                start = end;
            }
            out
        }
    }
}

/// Uploads what a cuBLASLt baseline reads besides our operands.
fn lt_operands(dev: &Device, p: &HostProblem, baseline: Baseline, rotate: u64) -> Result<LtOperands, KernelError> {
    let shape = &p.shape;
    let (m, n, k, kb, nb) = (shape.m, shape.n, shape.k, shape.k_blocks(), shape.n_blocks());
    let ranges = expert_ranges(p);
    Ok(match baseline {
        Baseline::Bf16 => {
            // The dequantized operands, rounded to bf16.
            let lut = e4m3_table();
            let a: Vec<u16> = (0..m * k)
                .into_par_iter()
                .map(|i| f32_to_bf16(lut[p.a[i] as usize] * p.sa[(i / k) * kb + (i % k) / 128]))
                .collect();
            let b: Vec<u16> = (0..p.b.len())
                .into_par_iter()
                .map(|i| {
                    let (e, r, c) = (i / (n * k), (i / k) % n, i % k);
                    f32_to_bf16(lut[p.b[i] as usize] * p.sb[(e * nb + r / 128) * kb + c / 128])
                })
                .collect();
            let copies = copies_for(rotate, (2 * (a.len() + b.len() + m * n)) as u64);
            LtOperands::Bf16 {
                a: Rotation::new(dev, &a, copies)?,
                b: Rotation::new(dev, &b, copies)?,
                d: Rotation::new(dev, &vec![POISON; m * n], copies)?,
            }
        }
        Baseline::Fp8Block => {
            // Per expert: its rows' activation scales M-fastest, its weight scales padded.
            let mut a_scales = Vec::new();
            for &(start, rows) in &ranges {
                let (t, _) = activation_scales_for_cublas(&p.sa[start * kb..(start + rows) * kb], rows, kb);
                a_scales.extend(t);
            }
            let mut b_scales = Vec::new();
            for e in 0..shape.experts() {
                b_scales.extend(weight_scales_for_cublas(&p.sb[e * nb * kb..(e + 1) * nb * kb], nb, kb));
            }
            let copies = copies_for(rotate, (p.a.len() + p.b.len() + 2 * m * n) as u64);
            LtOperands::Fp8Block {
                a_scales: Rotation::new(dev, &a_scales, copies)?,
                b_scales: Rotation::new(dev, &b_scales, copies)?,
                d: Rotation::new(dev, &vec![POISON; m * n], copies)?,
            }
        }
    })
}

/// Plans a baseline, one matmul per expert with rows, with `algo` (else the heuristic's).
fn lt_plans(
    lt: &CublasLt,
    p: &HostProblem,
    baseline: Baseline,
    ops: &LtOperands,
    ask: AlgoAsk,
) -> Result<Vec<(LtPlan, usize)>, KernelError> {
    let shape = &p.shape;
    let (n, k, kb, nb) = (shape.n, shape.k, shape.k_blocks(), shape.n_blocks());
    let ranges = expert_ranges(p);
    // Planned with the scale pointers of the first copy set (the heuristic sees the operation as
    // it runs); each call sets its own copy's pointers again.
    let mut plans = Vec::new();
    let mut a_scale_off = 0usize;
    for (e, &(_, rows)) in ranges.iter().enumerate() {
        if rows > 0 {
            let scales = lt_scales(ops, 0, a_scale_off, e * nb * weight_scale_ld(kb));
            plans.push((lt.plan_with(baseline, rows, n, k, scales, ask)?, e));
            a_scale_off += activation_scale_len(rows, kb);
        }
    }
    Ok(plans)
}

/// The scale pointers of operand copy `i` at these offsets (in floats), or none for BF16.
fn lt_scales(ops: &LtOperands, i: usize, a_off: usize, b_off: usize) -> LtScales {
    match ops {
        LtOperands::Bf16 { .. } => LtScales::default(),
        LtOperands::Fp8Block { a_scales, b_scales, .. } => {
            LtScales { a: a_scales.get(i).ptr() + (a_off * 4) as u64, b: b_scales.get(i).ptr() + (b_off * 4) as u64 }
        }
    }
}

/// Enqueues baseline call `i`: one cuBLASLt matmul per expert (one for a dense shape).
fn lt_enqueue(
    dev: &Device,
    lt: &CublasLt,
    plans: &[(LtPlan, usize)],
    ops: &LtOperands,
    fp8: &Fp8Set,
    shape: &GemmShape,
    i: usize,
) -> Result<(), KernelError> {
    let (n, k, kb, nb) = (shape.n, shape.k, shape.k_blocks(), shape.n_blocks());
    let mut row0 = 0usize;
    let mut a_scale_off = 0usize;
    for (plan, e) in plans {
        let rows = plan.m;
        let d = ops.d().part(i, row0 * n, rows * n);
        let args = match ops {
            LtOperands::Bf16 { a, b, .. } => LtArgs {
                a: a.get(i).ptr() + (row0 * k * 2) as u64,
                b: b.get(i).ptr() + (e * n * k * 2) as u64,
                d,
                a_scales: 0,
                b_scales: 0,
            },
            LtOperands::Fp8Block { .. } => {
                let scales = lt_scales(ops, i, a_scale_off, e * nb * weight_scale_ld(kb));
                LtArgs {
                    a: fp8.a.get(i).ptr() + (row0 * k) as u64,
                    b: fp8.b.get(i).ptr() + (e * n * k) as u64,
                    d,
                    a_scales: scales.a,
                    b_scales: scales.b,
                }
            }
        };
        lt.run(dev, plan, &args)?;
        a_scale_off += activation_scale_len(rows, kb);
        row0 += rows;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deepseek_shapes_are_legal_for_some_wgmma_config() {
        let shapes = deepseek_v3_shapes();
        assert_eq!(shapes.len(), 22);
        for s in &shapes {
            let c = heuristic_config(s, GpuArch::Sm90a, 132).unwrap_or_else(|| panic!("no config for {s}"));
            assert_eq!(c.kind, KernelKind::Wgmma, "{s}");
            assert_eq!(is_legal(&c, s), Ok(()));
        }
    }

    #[test]
    fn heuristic_prefers_one_full_wave() {
        // 4096 x 7168: BM = 128 gives 32 row tiles; 32 x 56 = 1792 tiles of 128 x 128.
        let c = heuristic_config(&GemmShape::dense(4096, 7168, 2048), GpuArch::Sm90a, 132).unwrap();
        assert!(c.block_m >= 128, "{c}");
        // M = 64: one row of tiles, BM = 64.
        let c = heuristic_config(&GemmShape::dense(64, 7168, 2048), GpuArch::Sm90a, 132).unwrap();
        assert_eq!(c.block_m, 64, "{c}");
        // Without wgmma (sm_89) the heuristic falls back to mma.sync.
        let c = heuristic_config(&GemmShape::dense(64, 7168, 2048), GpuArch::Sm89, 128).unwrap();
        assert!(matches!(c.kind, KernelKind::MmaSync { .. }));
    }

    #[test]
    fn implementations_keep_their_json_names() {
        let names: Vec<String> = [
            Implementation::Fp8forge,
            Implementation::CublasLt(Baseline::Bf16),
            Implementation::CublasLt(Baseline::Fp8Block),
        ]
        .iter()
        .map(|i| format!("{i}"))
        .collect();
        assert_eq!(names, ["fp8forge", "cublaslt_bf16", "cublaslt_fp8_block"]);
    }

    #[test]
    fn rotation_covers_twice_the_l2() {
        assert_eq!(copies_for(120 << 20, 50 << 20), 3);
        assert_eq!(copies_for(120 << 20, 500 << 20), 1);
        assert_eq!(copies_for(120 << 20, 1), 64);
    }

    #[test]
    fn check_rows_skip_padding_and_keep_the_ends() {
        let shape = GemmShape::grouped(512, 8, 128, 2);
        let p = HostProblem::random(&shape, 1, &[100]).unwrap();
        let rows = check_rows(&p, 8);
        let idx = p.m_indices.as_ref().unwrap();
        assert!(rows.iter().all(|&r| idx[r] >= 0));
        assert_eq!(rows[0], 0);
        assert_eq!(*rows.last().unwrap(), 511);
        let dense = HostProblem::random(&GemmShape::dense(3, 8, 128), 1, &[]).unwrap();
        assert_eq!(check_rows(&dense, 64), vec![0, 1, 2]);
    }

    #[test]
    fn expert_ranges_tile_the_rows() {
        let shape = GemmShape::grouped(640, 8, 128, 3);
        let p = HostProblem::random(&shape, 1, &[100, 200]).unwrap();
        assert_eq!(expert_ranges(&p), vec![(0, 128), (128, 256), (384, 256)]);
    }
}
