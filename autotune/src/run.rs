//! `autotune` as one call: the tuning problems of the shapes asked for, a table predicted by the
//! cost model or measured on the GPU present, merged into the table already at the output, and
//! saved (by the caller's `save`, after each measured problem).

use std::fmt;
use std::path::PathBuf;
use std::time::Instant;

use fp8forge_kernels::bench::BenchOptions;
use fp8forge_kernels::cuda::Device;

use crate::gpu::GpuSpec;
use crate::measure::{GpuMeasure, identify_device};
use crate::shapes::WeightShape;
use crate::table::{Existing, Problem, SkippedShape, Table, problems, simulate};
use crate::tune::{Outcome, TuneError, TuneOptions, TuneProgress, tune_all};

/// How the table is made.
#[derive(Clone, Debug)]
pub enum Mode {
    /// Ranked by the cost model alone, for this GPU (none needs to be present).
    Simulate(&'static GpuSpec),
    /// Measured on the GPU present.
    Measure {
        /// The GPU the caller expects (`None`: whichever is present); another one is refused.
        expect: Option<&'static GpuSpec>,
        /// How much to time.
        options: TuneOptions,
    },
}

/// What `autotune` asks for.
#[derive(Clone, Debug)]
pub struct AutotuneRequest {
    /// The weight shapes.
    pub shapes: Vec<WeightShape>,
    /// The M buckets (rows per expert for grouped shapes).
    pub ms: Vec<usize>,
    /// The table file: a table there for the same GPU and kernels is extended.
    pub out: PathBuf,
    /// Predicted or measured.
    pub mode: Mode,
}

/// Something the user should know about a run that still made its table.
#[derive(Debug)]
pub enum AutotuneWarning {
    /// A shape no kernel can run was left out.
    Skipped(SkippedShape),
    /// The table at the output was tuned for other kernels (stale hash): it is replaced.
    ReplacedStale {
        /// The file.
        file: PathBuf,
    },
}

impl fmt::Display for AutotuneWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AutotuneWarning::Skipped(s) => write!(f, "skipped {s}"),
            AutotuneWarning::ReplacedStale { file } => {
                write!(f, "{} was tuned for other kernels (stale hash); replacing it", file.display())
            }
        }
    }
}

/// What `autotune` made.
#[derive(Debug)]
pub struct AutotuneReport {
    /// The table as saved.
    pub table: Table,
    /// The GPU it is for.
    pub gpu: &'static GpuSpec,
    /// Measured runs: what tuning each problem found (the problems resumed are not here).
    pub outcomes: Vec<Outcome>,
    /// Measured runs: seconds spent tuning.
    pub seconds: f64,
    /// What the user should know.
    pub warnings: Vec<AutotuneWarning>,
}

/// Makes the table `req` asks for and saves it with `save` (once when predicted, after each
/// problem when measured, so an interrupted run keeps what it measured).
///
/// # Errors
///
/// [`TuneError::ZeroM`], [`TuneError::Budget`], [`TuneError::NothingToTune`] and
/// [`TuneError::NoLegalConfiguration`] before anything is written; [`TuneError::Table`] for a
/// table at the output that cannot be read or is another GPU's; measured: no GPU
/// ([`TuneError::OpenDevice`]), an unknown one or not the one expected, and what tuning returns.
pub fn autotune(
    req: &AutotuneRequest,
    progress: &dyn TuneProgress,
    save: &mut dyn FnMut(&Table) -> Result<(), TuneError>,
) -> Result<AutotuneReport, TuneError> {
    if req.ms.contains(&0) {
        return Err(TuneError::ZeroM);
    }
    if let Mode::Measure { options, .. } = &req.mode {
        options.validate()?;
    }
    let (problems, skipped) = problems(&req.shapes, &req.ms);
    if problems.is_empty() {
        return Err(TuneError::NothingToTune { shapes: req.shapes.len(), skipped });
    }
    let mut warnings: Vec<AutotuneWarning> = skipped.into_iter().map(AutotuneWarning::Skipped).collect();
    let mut report = match &req.mode {
        Mode::Simulate(gpu) => predicted(req, gpu, &problems, save)?,
        Mode::Measure { expect, options } => measured(req, *expect, options, &problems, progress, save)?,
    };
    warnings.append(&mut report.warnings);
    report.warnings = warnings;
    Ok(report)
}

/// The warning, if any, about what [`Table::load_for`] found at the output.
fn existing_warning(req: &AutotuneRequest, existing: Existing) -> Vec<AutotuneWarning> {
    match existing {
        Existing::ReplacedStale => vec![AutotuneWarning::ReplacedStale { file: req.out.clone() }],
        Existing::Absent | Existing::Merged => Vec::new(),
    }
}

fn predicted(
    req: &AutotuneRequest,
    gpu: &'static GpuSpec,
    problems: &[Problem],
    save: &mut dyn FnMut(&Table) -> Result<(), TuneError>,
) -> Result<AutotuneReport, TuneError> {
    let new = simulate(gpu, problems);
    if new.entries.is_empty() {
        return Err(TuneError::NoLegalConfiguration { gpu: gpu.id.into() });
    }
    let (table, existing) = Table::load_for(&req.out, new)?;
    save(&table)?;
    Ok(AutotuneReport { table, gpu, outcomes: Vec::new(), seconds: 0.0, warnings: existing_warning(req, existing) })
}

fn measured(
    req: &AutotuneRequest,
    expect: Option<&'static GpuSpec>,
    options: &TuneOptions,
    problems: &[Problem],
    progress: &dyn TuneProgress,
    save: &mut dyn FnMut(&Table) -> Result<(), TuneError>,
) -> Result<AutotuneReport, TuneError> {
    let dev = Device::open(0).map_err(TuneError::OpenDevice)?;
    let (gpu, device) = identify_device(&dev)?;
    if let Some(g) = expect
        && g.id != gpu.id
    {
        return Err(TuneError::OtherGpu { asked: g.id.into(), found: gpu.id.into(), name: dev.info.name.clone() });
    }
    let mut new = Table::new(gpu);
    new.device = device;
    let (mut table, existing) = Table::load_for(&req.out, new)?;
    let mut measure = GpuMeasure::new(&dev, BenchOptions::default())?;
    let start = Instant::now();
    let outcomes = tune_all(gpu, problems, &mut table, &mut measure, options, progress, save)?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(AutotuneReport { table, gpu, outcomes, seconds, warnings: existing_warning(req, existing) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::by_id;
    use crate::tune::NoProgress;

    fn request(shapes: &[(usize, usize, usize)], ms: &[usize], mode: Mode) -> AutotuneRequest {
        AutotuneRequest {
            shapes: shapes.iter().map(|&(n, k, groups)| WeightShape { n, k, groups, what: String::new() }).collect(),
            ms: ms.to_vec(),
            out: std::env::temp_dir().join(format!("fp8forge-run-test-{}-never-written.yaml", std::process::id())),
            mode,
        }
    }

    fn never_saved(_: &Table) -> Result<(), TuneError> {
        panic!("saved a table for a refused request")
    }

    #[test]
    fn bad_requests_are_refused_before_anything_is_written() {
        let h800 = by_id("h800").expect("gpu");
        let measure =
            |budget: f64| Mode::Measure { expect: None, options: TuneOptions { budget, ..TuneOptions::default() } };
        for (req, want) in [
            (request(&[(4096, 7168, 1)], &[64, 0], Mode::Simulate(h800)), "ZeroM"),
            (request(&[(4096, 7168, 1)], &[64], measure(0.0)), "Budget"),
            (request(&[(4096, 7168, 1)], &[64], measure(1.5)), "Budget"),
            (request(&[(4096, 7000, 1)], &[64], Mode::Simulate(h800)), "NothingToTune"),
        ] {
            let e = autotune(&req, &NoProgress, &mut never_saved).expect_err(want);
            let got = match e {
                TuneError::ZeroM => "ZeroM",
                TuneError::Budget(_) => "Budget",
                TuneError::NothingToTune { .. } => "NothingToTune",
                ref other => panic!("{want}: got {other}"),
            };
            assert_eq!(got, want);
            assert!(e.is_bad_input(), "{e}");
        }
        let e = autotune(
            &request(&[(4096, 7000, 1), (4096, 7001, 1)], &[64], Mode::Simulate(h800)),
            &NoProgress,
            &mut never_saved,
        )
        .expect_err("nothing legal");
        assert!(e.to_string().contains("4096x7000: K = 7000") && e.to_string().contains(", ..."), "{e}");
    }

    #[test]
    fn a_simulated_run_saves_once_and_reports_the_skipped_shapes() {
        let h800 = by_id("h800").expect("gpu");
        let req = request(&[(4096, 7000, 1), (4096, 7168, 1), (7168, 2048, 8)], &[64, 4096], Mode::Simulate(h800));
        let mut saved = Vec::new();
        let r = autotune(&req, &NoProgress, &mut |t| {
            saved.push(t.clone());
            Ok(())
        })
        .expect("simulated");
        assert_eq!(saved, vec![r.table.clone()]);
        assert_eq!((r.gpu.id, r.table.entries.len(), r.outcomes.len()), ("h800-sxm", 4, 0));
        assert!(matches!(&r.warnings[..], [AutotuneWarning::Skipped(s)] if s.shape.k == 7000), "{:?}", r.warnings);
    }
}
