//! `autotune` as one call: the tuning problems of the shapes asked for, a table predicted by the
//! cost model or measured on the GPU present, merged into the table already at the output, and
//! saved (by the caller's `save`, after each measured problem).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use fp8forge_kernels::bench::BenchOptions;
use fp8forge_kernels::cuda::Device;

use serde::Serialize;

use crate::calibrate::{Calibration, beside, calibrate};
use crate::candidate::Impl;
use crate::gpu::GpuSpec;
use crate::measure::{GpuMeasure, identify_device};
use crate::metrics::{ShowRatios, show_ratios};
use crate::model::ModelParams;
use crate::shapes::WeightShape;
use crate::table::{CalibrationRef, Existing, Problem, SkippedShape, Table, problems, simulate_with};
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
    /// The cost model's calibration: this file, else the one beside `out`
    /// ([`crate::calibrate::beside`]) when there is one, else the defaults.
    pub calibration: Option<PathBuf>,
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
    /// The cost model used this calibration.
    Calibrated {
        /// The calibration file.
        file: String,
        /// The GPU it was fitted on.
        gpu: String,
    },
    /// cuBLASLt offered no algorithm for these problems (so their entries could only be ours).
    NoCublasLt {
        /// Problems concerned.
        problems: usize,
        /// The first reason.
        why: String,
    },
}

impl fmt::Display for AutotuneWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AutotuneWarning::Skipped(s) => write!(f, "skipped {s}"),
            AutotuneWarning::ReplacedStale { file } => {
                write!(f, "{} was tuned for other kernels (stale hash); replacing it", file.display())
            }
            AutotuneWarning::Calibrated { file, gpu } => write!(f, "cost model calibrated by {file} (fitted on {gpu})"),
            AutotuneWarning::NoCublasLt { problems, why } => {
                write!(f, "no cuBLASLt candidates for {problems} problem(s): {why}")
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
    let calibration = find_calibration(req)?;
    if let Some((c, r)) = &calibration {
        warnings.push(AutotuneWarning::Calibrated { file: r.file.clone(), gpu: c.gpu.clone() });
    }
    let params = calibration.as_ref().map_or_else(ModelParams::default, |(c, _)| c.params);
    let cref = calibration.map(|(_, r)| r);
    let mut report = match &req.mode {
        Mode::Simulate(gpu) => predicted(req, gpu, &problems, &params, cref, save)?,
        Mode::Measure { expect, options } => {
            let options = TuneOptions { model: params, ..options.clone() };
            measured(req, *expect, &options, cref, &problems, progress, save)?
        }
    };
    let no_lt: Vec<&Outcome> = report.outcomes.iter().filter(|o| o.lt_error.is_some()).collect();
    if let Some(first) = no_lt.first().and_then(|o| o.lt_error.clone()) {
        warnings.push(AutotuneWarning::NoCublasLt { problems: no_lt.len(), why: first });
    }
    warnings.append(&mut report.warnings);
    report.warnings = warnings;
    Ok(report)
}

/// The calibration asked for, else the one beside the output table, else none.
fn find_calibration(req: &AutotuneRequest) -> Result<Option<(Calibration, CalibrationRef)>, TuneError> {
    match &req.calibration {
        Some(file) => Calibration::load(file).map(Some),
        None => {
            let auto = beside(&req.out);
            if auto.is_file() { Calibration::load(&auto).map(Some) } else { Ok(None) }
        }
    }
}

/// What `autotune --calibrate` made: the calibration and where it is to be written.
#[derive(Debug)]
pub struct CalibrateReport {
    /// The calibration.
    pub calibration: Calibration,
    /// Where to write it (the caller writes it).
    pub out: PathBuf,
}

/// `autotune --calibrate TABLE`: the cost model fitted to the table, to be written to `out` or
/// beside the table ([`crate::calibrate::beside`]).
///
/// # Errors
///
/// As [`crate::calibrate::calibrate`].
pub fn calibrate_table(table: &Path, out: Option<&Path>) -> Result<CalibrateReport, TuneError> {
    let calibration = calibrate(table)?;
    Ok(CalibrateReport { calibration, out: out.map_or_else(|| beside(table), Path::to_path_buf) })
}

/// The summary of a run that a script reads (`autotune --json`).
#[derive(Debug, Serialize)]
pub struct RunSummary {
    /// The GPU id.
    pub gpu: String,
    /// `simulated`, `pruned` or `exhaustive`.
    pub mode: &'static str,
    /// Distinct weight shapes (N, K, experts) tuned in this run.
    pub shapes: usize,
    /// Problems (shape × M) tuned in this run (resumed ones not counted).
    pub problems: usize,
    /// Entries in the table as saved.
    pub entries: usize,
    /// Entries of the table per implementation.
    pub fp8forge_entries: usize,
    /// See `fp8forge_entries`.
    pub cublaslt_entries: usize,
    /// Candidates timed in this run (the finalists' re-timing not counted again).
    pub candidates_timed: usize,
    /// Candidates there were (ours legal, and cuBLASLt's).
    pub candidates: usize,
    /// Seconds spent tuning.
    pub seconds: f64,
    /// The calibration the cost model used.
    pub calibration: Option<CalibrationRef>,
    /// The ratios of the run ([`crate::metrics`]).
    pub metrics: ShowRatios,
}

impl AutotuneReport {
    /// The summary of the run.
    pub fn summary(&self) -> RunSummary {
        let mut shapes: Vec<(usize, usize, usize)> =
            self.outcomes.iter().map(|o| (o.problem.n, o.problem.k, o.problem.experts)).collect();
        shapes.sort_unstable();
        shapes.dedup();
        let count = |i: Impl| self.table.entries.iter().filter(|e| e.implementation == i).count();
        let mode = if self.outcomes.is_empty() && self.seconds == 0.0 {
            "simulated"
        } else if self.outcomes.iter().any(|o| o.exhaustive) {
            "exhaustive"
        } else {
            "pruned"
        };
        RunSummary {
            gpu: self.gpu.id.into(),
            mode,
            shapes: shapes.len(),
            problems: self.outcomes.len(),
            entries: self.table.entries.len(),
            fp8forge_entries: count(Impl::Fp8forge),
            cublaslt_entries: count(Impl::Cublaslt),
            candidates_timed: self.outcomes.iter().map(|o| o.timed).sum(),
            candidates: self.outcomes.iter().map(|o| o.candidates).sum(),
            seconds: self.seconds,
            calibration: self.table.calibration.clone(),
            metrics: show_ratios(&self.outcomes),
        }
    }
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
    params: &ModelParams,
    calibration: Option<CalibrationRef>,
    save: &mut dyn FnMut(&Table) -> Result<(), TuneError>,
) -> Result<AutotuneReport, TuneError> {
    let mut new = simulate_with(params, gpu, problems);
    new.calibration = calibration;
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
    calibration: Option<CalibrationRef>,
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
    new.calibration = calibration;
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
            calibration: None,
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
        let s = r.summary();
        assert_eq!((s.mode, s.entries, s.fp8forge_entries, s.cublaslt_entries), ("simulated", 4, 4, 0));
    }

    #[test]
    fn simulate_uses_the_calibration_asked_for_and_records_it() {
        let h800 = by_id("h800").expect("gpu");
        let d = std::env::temp_dir().join(format!("fp8forge-run-calibrated-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("dir");
        let slow = ModelParams { sustained_tensor: 0.39, hbm_efficiency: 0.45, ..ModelParams::default() };
        let c = Calibration {
            gpu: "h100-sxm".into(),
            device: "NVIDIA H100 80GB HBM3".into(),
            table: "h100.yaml".into(),
            table_digest: "0".repeat(64),
            entries: 22,
            params: slow,
            error_before: 0.1,
            error_after: 0.01,
            simulate_error_before: 0.1,
            simulate_error_after: 0.01,
        };
        let file = d.join("h100.calibration.yaml");
        std::fs::write(&file, c.to_yaml().expect("yaml")).expect("write");
        let mut req = request(&[(4096, 7168, 1)], &[64, 4096], Mode::Simulate(h800));
        let plain = autotune(&req, &NoProgress, &mut |_| Ok(())).expect("defaults");
        req.calibration = Some(file.clone());
        let r = autotune(&req, &NoProgress, &mut |_| Ok(())).expect("calibrated");
        let recorded = r.table.calibration.clone().expect("recorded");
        assert_eq!(recorded.file, file.display().to_string());
        assert_eq!(recorded.digest, crate::calibrate::digest(&std::fs::read(&file).expect("read")));
        // Half the efficiencies: about twice the time.
        for (a, b) in plain.table.entries.iter().zip(&r.table.entries) {
            assert!(b.us > 1.6 * a.us, "{} vs {}", b.us, a.us);
        }
        assert!(r.warnings.iter().any(|w| matches!(w, AutotuneWarning::Calibrated { .. })));
        // The calibration beside the output is found without being asked for.
        req.calibration = None;
        req.out = d.join("h100.yaml");
        let auto = autotune(&req, &NoProgress, &mut |_| Ok(())).expect("auto");
        assert_eq!(auto.table.calibration.map(|c| c.digest), Some(recorded.digest));
        // A calibration that is not one is refused.
        req.calibration = Some(d.join("missing.yaml"));
        let e = autotune(&req, &NoProgress, &mut |_| Ok(())).expect_err("missing");
        assert!(matches!(e, TuneError::CalibrationFile { .. }) && e.is_bad_input(), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
