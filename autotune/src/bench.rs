//! `bench gemm` as one call: the shapes asked for, the configurations of our kernel chosen for
//! each (given, the whole legal search space, a tuning table, or the harness's heuristic), the
//! kernels' benchmark harness on the GPU at hand, and the comparison with cuBLASLt.
//!
//! It lives here, not in the kernels crate, because choosing configurations from a tuning table
//! needs the tables and the cost model.

use std::fmt;
use std::path::PathBuf;

use fp8forge_kernels::bench::{BenchOptions, BenchRow, Implementation, bench_shape_with, deepseek_v3_shapes};
use fp8forge_kernels::cublaslt::{Baseline, CublasLt, LtAlgo};
use fp8forge_kernels::cuda::Device;
use fp8forge_kernels::{GemmConfig, GemmShape, GpuArch, KernelError, is_legal, search_space, source_hash};
use serde::{Serialize, Serializer};

use crate::candidate::Candidate;
use crate::measure::identify_device;
use crate::table::{Table, choose};
use crate::tune::TuneError;

/// A shape to benchmark: `M×N×K`, dense or M-grouped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchShape {
    /// Rows of D (grouped: the tokens of each expert).
    pub m: usize,
    /// Columns of D.
    pub n: usize,
    /// K.
    pub k: usize,
    /// `Some(E)`: an M-grouped launch over E experts of `m` tokens each (each expert's run padded
    /// to 128 rows), B is `[E, N, K]`.
    pub experts: Option<usize>,
}

impl BenchShape {
    /// The launch, and the real tokens of each expert for a grouped one.
    fn launch(self) -> (GemmShape, Option<usize>) {
        match self.experts {
            Some(e) => (GemmShape::grouped_tokens(self.m, self.n, self.k, e), Some(self.m)),
            None => (GemmShape::dense(self.m, self.n, self.k), None),
        }
    }
}

/// Which configurations of our kernel to time per shape.
#[derive(Clone, Debug, PartialEq)]
pub enum ConfigChoice {
    /// The harness's wave-count heuristic picks one.
    Heuristic,
    /// These configurations.
    Given(Vec<GemmConfig>),
    /// Every legal configuration of the search space.
    Sweep,
    /// The tuning table's entry for the shape and nearest M, run with its implementation (our
    /// kernel, or the cuBLASLt algorithm it names), else the cost model's choice.
    Table(PathBuf),
}

/// What `bench gemm` asks for.
#[derive(Clone, Debug)]
pub struct BenchRequest {
    /// The shapes, in order.
    pub shapes: Vec<BenchShape>,
    /// Also DeepSeek-V3's shapes (BENCH_TARGETS.md), after `shapes`.
    pub deepseek_v3: bool,
    /// Our kernel's configurations.
    pub configs: ConfigChoice,
    /// How to measure (`tokens_per_expert` is set per shape).
    pub options: BenchOptions,
}

/// Something the user should know about a benchmark that still ran.
#[derive(Debug)]
pub enum BenchWarning {
    /// cuBLASLt could not be opened: there are no baseline rows.
    NoBaselines(KernelError),
    /// The table was tuned for other kernels (stale hash): the cost model chose instead.
    StaleTable,
    /// The table is another GPU's.
    TableForOtherGpu {
        /// The table's GPU id.
        table: String,
        /// The GPU id here.
        here: String,
    },
    /// A table's cuBLASLt algorithm no longer exists here (another cuBLASLt): its heuristic's
    /// choice ran instead.
    AlgoFellBack {
        /// The shape.
        shape: GemmShape,
        /// The algorithm of the table.
        algo: LtAlgo,
    },
    /// A table's cuBLASLt entry, but cuBLASLt could not be opened: the shape has no tuned row.
    NoCublasLtForTable {
        /// The shape.
        shape: GemmShape,
    },
}

impl fmt::Display for BenchWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BenchWarning::NoBaselines(e) => write!(f, "no cuBLASLt baselines: {e}"),
            BenchWarning::StaleTable => {
                f.write_str("the table was tuned for other kernels (stale hash): using the cost model")
            }
            BenchWarning::TableForOtherGpu { table, here } => write!(f, "the table is for {table}, this GPU is {here}"),
            BenchWarning::AlgoFellBack { shape, algo } => write!(
                f,
                "{shape}: the table's cuBLASLt algorithm {algo} does not exist on this cuBLASLt; ran its heuristic's choice"
            ),
            BenchWarning::NoCublasLtForTable { shape } => {
                write!(f, "{shape}: the table chose cuBLASLt, which could not be opened")
            }
        }
    }
}

/// What `bench gemm` found (as JSON: the device, then `rows`).
#[derive(Debug, Serialize)]
pub struct BenchReport {
    /// The device's name.
    pub device: String,
    /// The architecture the kernels were built for.
    #[serde(serialize_with = "as_text")]
    pub arch: GpuArch,
    /// Its multiprocessors.
    pub sms: u32,
    /// The driver's CUDA version.
    pub driver_version: i32,
    /// `source_hash()` of the kernels measured.
    pub kernel_hash: String,
    /// One row per shape and implementation: ours first checked against the CPU reference.
    pub rows: Vec<BenchRow>,
    /// What the user should know (not in the JSON).
    #[serde(skip)]
    pub warnings: Vec<BenchWarning>,
}

fn as_text<S: Serializer>(v: &GpuArch, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// Per shape: our best against each baseline, in the same run.
#[derive(Clone, Debug, PartialEq)]
pub struct ShapeSummary {
    /// Rows of D.
    pub m: usize,
    /// Columns of D.
    pub n: usize,
    /// K.
    pub k: usize,
    /// Experts (1: dense).
    pub groups: usize,
    /// Our best TFLOP/s (our kernel, or the cuBLASLt algorithm a table chose), if anything of
    /// ours was timed.
    pub ours: Option<f64>,
    /// Ours over cuBLASLt BF16's TFLOP/s.
    pub vs_bf16: Option<f64>,
    /// Ours over cuBLASLt FP8 block-scaled's TFLOP/s.
    pub vs_fp8_block: Option<f64>,
}

impl BenchReport {
    /// True when a row of ours (our kernel, or a table's cuBLASLt algorithm) failed its check or
    /// could not run.
    pub fn ours_failed(&self) -> bool {
        self.rows.iter().any(|r| r.implementation.is_tuned() && !r.ok)
    }

    /// Per shape (in the order of the rows): our best TFLOP/s and its ratio to each baseline's.
    pub fn summary(&self) -> Vec<ShapeSummary> {
        let mut shapes: Vec<(usize, usize, usize, usize)> = Vec::new();
        for r in &self.rows {
            let s = (r.m, r.n, r.k, r.groups);
            if !shapes.contains(&s) {
                shapes.push(s);
            }
        }
        let best = |s: (usize, usize, usize, usize), imp: Implementation| {
            let same = |i: Implementation| i == imp || (imp.is_tuned() && i.is_tuned());
            self.rows
                .iter()
                .filter(|r| (r.m, r.n, r.k, r.groups) == s && same(r.implementation))
                .filter_map(|r| r.tflops)
                .fold(None, |a: Option<f64>, t| Some(a.map_or(t, |a| a.max(t))))
        };
        shapes
            .into_iter()
            .map(|s| {
                let ours = best(s, Implementation::Fp8forge);
                let ratio = |b: Option<f64>| match (ours, b) {
                    (Some(o), Some(b)) if b > 0.0 => Some(o / b),
                    _ => None,
                };
                ShapeSummary {
                    m: s.0,
                    n: s.1,
                    k: s.2,
                    groups: s.3,
                    ours,
                    vs_bf16: ratio(best(s, Implementation::CublasLt(Baseline::Bf16))),
                    vs_fp8_block: ratio(best(s, Implementation::CublasLt(Baseline::Fp8Block))),
                }
            })
            .collect()
    }
}

/// Progress of a benchmark, one step per shape.
pub trait BenchProgress {
    /// `shape` is about to be measured with this many configurations of ours.
    fn shape(&self, _shape: &GemmShape, _configs: usize) {}
}

/// A [`BenchProgress`] that ignores everything.
pub struct NoBenchProgress;
impl BenchProgress for NoBenchProgress {}

/// Runs `bench gemm`: every shape checked, the table read, then on device 0 each shape with our
/// kernel in its configurations and (unless `options.baselines` is off) cuBLASLt.
///
/// # Errors
///
/// [`TuneError::Shape`] for a shape no kernel runs, [`TuneError::Table`] for a table that cannot
/// be read, [`TuneError::OpenDevice`] without a GPU, [`TuneError::UnknownGpu`] for a table on a
/// GPU outside the spec table, [`TuneError::Device`] for a failure that stops a shape.
pub fn bench_gemm(req: &BenchRequest, progress: &dyn BenchProgress) -> Result<BenchReport, TuneError> {
    let mut shapes: Vec<(GemmShape, Option<usize>)> = req.shapes.iter().map(|s| s.launch()).collect();
    if req.deepseek_v3 {
        shapes.extend(deepseek_v3_shapes().into_iter().map(|s| (s, None)));
    }
    for (shape, _) in &shapes {
        shape.validate().map_err(|why| TuneError::Shape { shape: *shape, why })?;
    }
    let table = match &req.configs {
        ConfigChoice::Table(path) => Some(Table::load(path)?),
        _ => None,
    };
    let dev = Device::open(0).map_err(TuneError::OpenDevice)?;
    let arch = dev.gpu_arch()?;
    let mut warnings = Vec::new();
    // Open for the baselines, and for a table (its entries may be cuBLASLt algorithms).
    let lt = if req.options.baselines || table.is_some() {
        CublasLt::new(&dev)
            .map_err(|e| {
                if req.options.baselines {
                    warnings.push(BenchWarning::NoBaselines(e))
                }
            })
            .ok()
    } else {
        None
    };
    let spec = match &table {
        Some(t) => {
            let (spec, _) = identify_device(&dev)?;
            if t.is_stale() {
                warnings.push(BenchWarning::StaleTable);
            } else if t.device.id != spec.id {
                warnings.push(BenchWarning::TableForOtherGpu { table: t.device.id.clone(), here: spec.id.into() });
            }
            Some(spec)
        }
        None => None,
    };
    let mut rows = Vec::new();
    for (shape, tokens) in &shapes {
        let (configs, algos): (Vec<GemmConfig>, Vec<LtAlgo>) = match (&req.configs, spec) {
            (ConfigChoice::Given(configs), _) => (configs.clone(), Vec::new()),
            (ConfigChoice::Sweep, _) => {
                (search_space(arch).into_iter().filter(|c| is_legal(c, shape).is_ok()).collect(), Vec::new())
            }
            (ConfigChoice::Table(_), Some(spec)) => {
                let e = shape.experts();
                let m = if e > 1 { tokens.unwrap_or(shape.m / e) } else { shape.m };
                match choose(table.as_ref(), spec, shape.n, shape.k, e, m) {
                    Some(Candidate::Own(c)) => (vec![c], Vec::new()),
                    Some(Candidate::CublasLt(a)) => {
                        if lt.is_none() {
                            warnings.push(BenchWarning::NoCublasLtForTable { shape: *shape });
                        }
                        (Vec::new(), vec![a])
                    }
                    None => (Vec::new(), Vec::new()),
                }
            }
            (ConfigChoice::Heuristic | ConfigChoice::Table(_), _) => (Vec::new(), Vec::new()),
        };
        progress.shape(shape, (configs.len() + algos.len()).max(1));
        let opts = BenchOptions { tokens_per_expert: *tokens, ..req.options.clone() };
        let shape_rows = bench_shape_with(&dev, lt.as_ref(), shape, &configs, &algos, &opts)?;
        for a in &algos {
            let ran = shape_rows.iter().any(|r| r.implementation == Implementation::CublasLtAlgo && r.config == a.id());
            if lt.is_some() && !ran {
                warnings.push(BenchWarning::AlgoFellBack { shape: *shape, algo: *a });
            }
        }
        rows.extend(shape_rows);
    }
    Ok(BenchReport {
        device: dev.info.name.clone(),
        arch,
        sms: dev.info.sms,
        driver_version: dev.info.driver_version,
        kernel_hash: source_hash(),
        rows,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(m: usize, implementation: Implementation, tflops: Option<f64>, ok: bool) -> BenchRow {
        BenchRow {
            m,
            n: 4096,
            k: 7168,
            groups: 1,
            implementation,
            config: "x".into(),
            us: tflops.map(|t| 1.0 / t),
            tflops,
            gbps: None,
            rel_err: None,
            ok,
            error: None,
        }
    }

    fn report(rows: Vec<BenchRow>) -> BenchReport {
        BenchReport {
            device: "NVIDIA H100 80GB HBM3".into(),
            arch: GpuArch::Sm90a,
            sms: 132,
            driver_version: 13000,
            kernel_hash: "abc".into(),
            rows,
            warnings: vec![BenchWarning::StaleTable],
        }
    }

    #[test]
    fn summary_compares_our_best_with_each_baseline_per_shape() {
        let bf16 = Implementation::CublasLt(Baseline::Bf16);
        let fp8 = Implementation::CublasLt(Baseline::Fp8Block);
        let r = report(vec![
            row(64, Implementation::Fp8forge, Some(300.0), true),
            row(64, Implementation::Fp8forge, Some(400.0), true),
            row(64, bf16, Some(200.0), true),
            row(64, fp8, Some(500.0), false),
            row(128, Implementation::Fp8forge, None, false),
            row(128, bf16, Some(100.0), true),
        ]);
        let s = r.summary();
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].m, s[0].ours, s[0].vs_bf16, s[0].vs_fp8_block), (64, Some(400.0), Some(2.0), Some(0.8)));
        assert_eq!((s[1].m, s[1].ours, s[1].vs_bf16, s[1].vs_fp8_block), (128, None, None, None));
        assert!(r.ours_failed());
        assert!(!report(r.rows[..4].to_vec()).ours_failed());
        // A table's cuBLASLt algorithm is the tuned row of its shape.
        let r = report(vec![row(64, Implementation::CublasLtAlgo, Some(600.0), true), row(64, fp8, Some(500.0), true)]);
        assert_eq!(r.summary()[0].vs_fp8_block, Some(1.2));
        assert!(!r.ours_failed());
    }

    #[test]
    fn json_keeps_its_fields_and_impl_names() {
        let r = report(vec![
            row(64, Implementation::Fp8forge, Some(1.0), true),
            row(64, Implementation::CublasLt(Baseline::Bf16), Some(1.0), true),
            row(64, Implementation::CublasLt(Baseline::Fp8Block), Some(1.0), true),
        ]);
        let v = serde_json::to_value(&r).expect("json");
        let keys: Vec<&str> = v.as_object().expect("object").keys().map(String::as_str).collect();
        assert_eq!(keys, ["device", "arch", "sms", "driver_version", "kernel_hash", "rows"]);
        assert_eq!(v["arch"], "sm_90a");
        let names: Vec<&str> = v["rows"].as_array().expect("rows").iter().filter_map(|r| r["impl"].as_str()).collect();
        assert_eq!(names, ["fp8forge", "cublaslt_bf16", "cublaslt_fp8_block"]);
    }

    #[test]
    fn grouped_shapes_pad_each_expert_like_the_tables() {
        let (shape, tokens) = BenchShape { m: 100, n: 4096, k: 7168, experts: Some(4) }.launch();
        assert_eq!((shape, tokens), (GemmShape::grouped(512, 4096, 7168, 4), Some(100)));
        assert_eq!(shape, crate::table::problem(4096, 7168, 4, 100));
        let (dense, tokens) = BenchShape { m: 100, n: 4096, k: 7168, experts: None }.launch();
        assert_eq!((dense, tokens), (GemmShape::dense(100, 4096, 7168), None));
    }

    #[test]
    fn a_bad_shape_or_table_is_refused_before_the_gpu_is_opened() {
        let req = |shape: BenchShape, configs: ConfigChoice| BenchRequest {
            shapes: vec![shape],
            deepseek_v3: false,
            configs,
            options: BenchOptions::default(),
        };
        let bad = BenchShape { m: 64, n: 4096, k: 7000, experts: None };
        let e = bench_gemm(&req(bad, ConfigChoice::Heuristic), &NoBenchProgress).expect_err("K = 7000");
        assert!(matches!(e, TuneError::Shape { why: fp8forge_kernels::Why::KNotMultipleOf128 { k: 7000 }, .. }), "{e}");
        assert!(e.is_bad_input());
        let good = BenchShape { m: 64, n: 4096, k: 7168, experts: None };
        let missing = std::env::temp_dir().join(format!("fp8forge-no-such-table-{}.yaml", std::process::id()));
        let e = bench_gemm(&req(good, ConfigChoice::Table(missing)), &NoBenchProgress).expect_err("no table");
        assert!(matches!(e, TuneError::Table(crate::table::TableError::Missing { .. })), "{e}");
        assert!(e.is_bad_input());
    }
}
