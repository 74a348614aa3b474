//! Calibration of the cost model from a measured table (`autotune --calibrate TABLE.yaml`): the
//! model's free parameters ([`ModelParams`]: tensor and HBM efficiencies, launch overhead, L2
//! bandwidth, per-family factors) fitted by least squares on log time to the table's measured
//! entries of our kernel, with a weak pull towards the defaults so that a parameter the table
//! says nothing about stays where it was. The calibration is a small YAML file naming the GPU and
//! the table (with its SHA-256) it came from; `--simulate` and the pruned search use it.

use std::path::{Path, PathBuf};

use fp8forge_kernels::{GemmConfig, GemmShape, GpuArch, search_space};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::candidate::Candidate;
use crate::gpu::{GpuSpec, by_id};
use crate::model::{ModelParams, predict_with, rank_with};
use crate::table::{CalibrationRef, Source, Table, TableError};
use crate::tune::TuneError;

/// The fewest measured entries of our kernel a calibration needs.
pub const MIN_SAMPLES: usize = 3;

/// Weight of the pull towards the default parameters (per squared log ratio).
const PRIOR: f64 = 0.01;

/// A calibration of the cost model, as written to its YAML file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// The GPU id of the table it was fitted to.
    pub gpu: String,
    /// The device's name in that table.
    pub device: String,
    /// The table, as given.
    pub table: String,
    /// SHA-256 of the table's bytes.
    pub table_digest: String,
    /// Measured entries of our kernel fitted.
    pub entries: usize,
    /// The fitted parameters.
    pub params: ModelParams,
    /// Median |predicted / measured − 1| over the entries' configurations, with the defaults ...
    pub error_before: f64,
    /// ... and with the fitted parameters.
    pub error_after: f64,
    /// Median |simulated / measured − 1| per entry (the model's own choice and its predicted
    /// time, as `--simulate` writes it, against the measured entry), with the defaults ...
    pub simulate_error_before: f64,
    /// ... and with the fitted parameters.
    pub simulate_error_after: f64,
}

/// One measured entry of our kernel: its configuration, the GEMM and the time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// The configuration.
    pub config: GemmConfig,
    /// The GEMM.
    pub shape: GemmShape,
    /// Measured microseconds.
    pub us: f64,
}

/// The measured entries of our kernel in `table` (cuBLASLt's and predicted ones left out).
pub fn samples(table: &Table) -> Vec<Sample> {
    table
        .entries
        .iter()
        .filter(|e| e.source == Source::Measured && e.us.is_finite() && e.us > 0.0)
        .filter_map(|e| match e.config {
            Candidate::Own(config) => Some(Sample { config, shape: e.problem_shape(), us: e.us }),
            Candidate::CublasLt(_) => None,
        })
        .collect()
}

/// [`samples`], and the best time of each other family of each entry (`family_best`): what the
/// fit uses.
pub fn fit_samples(table: &Table) -> Vec<Sample> {
    let mut v = samples(table);
    for e in table.entries.iter().filter(|e| e.source == Source::Measured) {
        for t in &e.family_best {
            if let (Candidate::Own(config), true) = (t.config, t.us.is_finite() && t.us > 0.0) {
                v.push(Sample { config, shape: e.problem_shape(), us: t.us });
            }
        }
    }
    v
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// Median |predicted / measured − 1| of `params` over `samples` (their own configurations).
pub fn prediction_error(params: &ModelParams, gpu: &GpuSpec, samples: &[Sample]) -> f64 {
    median(samples.iter().map(|s| (predict_with(params, gpu, &s.config, &s.shape).us / s.us - 1.0).abs()).collect())
}

/// Per sample, |simulated / measured − 1|: the time `--simulate` with `params` writes for the
/// sample's problem (the model's best configuration, predicted) against the measured time.
pub fn simulate_errors(params: &ModelParams, gpu: &GpuSpec, samples: &[Sample]) -> Vec<f64> {
    let space = search_space(GpuArch::Sm90a);
    samples
        .iter()
        .filter_map(|s| rank_with(params, gpu, &s.shape, &space).first().map(|(_, p)| (p.us / s.us - 1.0).abs()))
        .collect()
}

/// The sum of squared log errors of the parameters `exp(x) · defaults`, plus the pull towards
/// the defaults.
fn objective(x: &[f64], base: &[f64], gpu: &GpuSpec, samples: &[Sample]) -> f64 {
    let p = params_at(x, base);
    let fit: f64 = samples
        .iter()
        .map(|s| {
            let r = (predict_with(&p, gpu, &s.config, &s.shape).us / s.us).ln();
            r * r
        })
        .sum();
    fit + PRIOR * x.iter().map(|v| v * v).sum::<f64>()
}

fn params_at(x: &[f64], base: &[f64]) -> ModelParams {
    let v: Vec<f64> = base.iter().zip(x).map(|(b, x)| b * x.clamp(-2.0, 2.0).exp()).collect();
    ModelParams::from_slice(&v)
}

/// Fits the model's parameters to `samples` on `gpu` (Nelder–Mead on the log of each
/// parameter relative to its default; deterministic).
pub fn fit(gpu: &GpuSpec, samples: &[Sample]) -> ModelParams {
    let base = ModelParams::default().to_vec();
    let n = base.len();
    let f = |x: &[f64]| objective(x, &base, gpu, samples);
    // The simplex: the defaults, and a step of 10% along each parameter.
    let mut simplex: Vec<(Vec<f64>, f64)> = Vec::with_capacity(n + 1);
    let x0 = vec![0.0; n];
    simplex.push((x0.clone(), f(&x0)));
    for i in 0..n {
        let mut x = x0.clone();
        x[i] = 0.1;
        let v = f(&x);
        simplex.push((x, v));
    }
    for _ in 0..4000 {
        simplex.sort_by(|a, b| a.1.total_cmp(&b.1));
        if (simplex[n].1 - simplex[0].1).abs() < 1e-12 {
            break;
        }
        let centroid: Vec<f64> =
            (0..n).map(|j| simplex[..n].iter().map(|(x, _)| x[j]).sum::<f64>() / n as f64).collect();
        let towards =
            |t: f64| -> Vec<f64> { centroid.iter().zip(&simplex[n].0).map(|(c, w)| c + t * (w - c)).collect() };
        let reflected = towards(-1.0);
        let fr = f(&reflected);
        if fr < simplex[0].1 {
            let expanded = towards(-2.0);
            let fe = f(&expanded);
            simplex[n] = if fe < fr { (expanded, fe) } else { (reflected, fr) };
        } else if fr < simplex[n - 1].1 {
            simplex[n] = (reflected, fr);
        } else {
            let contracted = if fr < simplex[n].1 { towards(-0.5) } else { towards(0.5) };
            let fc = f(&contracted);
            if fc < fr.min(simplex[n].1) {
                simplex[n] = (contracted, fc);
            } else {
                // Shrink towards the best.
                let best = simplex[0].0.clone();
                for (x, v) in simplex.iter_mut().skip(1) {
                    for (xi, bi) in x.iter_mut().zip(&best) {
                        *xi = bi + 0.5 * (*xi - bi);
                    }
                    *v = f(x);
                }
            }
        }
    }
    simplex.sort_by(|a, b| a.1.total_cmp(&b.1));
    params_at(&simplex[0].0, &base)
}

/// SHA-256 of `bytes`, in hex.
pub fn digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Where the calibration of `table` is written by default, and found automatically:
/// `T.yaml` → `T.calibration.yaml` beside it.
pub fn beside(table: &Path) -> PathBuf {
    let stem = table.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    table.with_file_name(format!("{stem}.calibration.yaml"))
}

/// Calibrates the cost model from the measured table at `table_path`.
///
/// # Errors
///
/// [`TuneError::Table`] for a table that cannot be read, [`TuneError::UnknownTableGpu`] for a
/// table of a GPU outside the spec table, [`TuneError::NothingToCalibrate`] for fewer than
/// [`MIN_SAMPLES`] measured entries of our kernel.
pub fn calibrate(table_path: &Path) -> Result<Calibration, TuneError> {
    let table = Table::load(table_path)?;
    let bytes = std::fs::read(table_path)
        .map_err(|source| TuneError::Table(TableError::Unreadable { file: table_path.to_path_buf(), source }))?;
    let gpu = by_id(&table.device.id)
        .ok_or_else(|| TuneError::UnknownTableGpu { file: table_path.to_path_buf(), id: table.device.id.clone() })?;
    let samples = samples(&table);
    if samples.len() < MIN_SAMPLES {
        return Err(TuneError::NothingToCalibrate {
            file: table_path.to_path_buf(),
            measured: samples.len(),
            needed: MIN_SAMPLES,
        });
    }
    let params = fit(gpu, &fit_samples(&table));
    let defaults = ModelParams::default();
    Ok(Calibration {
        gpu: gpu.id.into(),
        device: table.device.name.clone(),
        table: table_path.display().to_string(),
        table_digest: digest(&bytes),
        entries: samples.len(),
        error_before: prediction_error(&defaults, gpu, &samples),
        error_after: prediction_error(&params, gpu, &samples),
        simulate_error_before: median(simulate_errors(&defaults, gpu, &samples)),
        simulate_error_after: median(simulate_errors(&params, gpu, &samples)),
        params,
    })
}

impl Calibration {
    /// The calibration as YAML.
    ///
    /// # Errors
    ///
    /// [`TuneError::Table`] ([`TableError::Serialize`]), not expected.
    pub fn to_yaml(&self) -> Result<String, TuneError> {
        serde_yaml::to_string(self).map_err(|e| TuneError::Table(TableError::Serialize(e)))
    }

    /// Reads a calibration file; returns it and the reference a table records.
    ///
    /// # Errors
    ///
    /// [`TuneError::CalibrationFile`] for a file that cannot be read,
    /// [`TuneError::MalformedCalibration`] for one that is not a calibration.
    pub fn load(path: &Path) -> Result<(Calibration, CalibrationRef), TuneError> {
        let bytes =
            std::fs::read(path).map_err(|source| TuneError::CalibrationFile { file: path.to_path_buf(), source })?;
        let c: Calibration = serde_yaml::from_slice(&bytes)
            .map_err(|source| TuneError::MalformedCalibration { file: path.to_path_buf(), source })?;
        Ok((c, CalibrationRef { file: path.display().to_string(), digest: digest(&bytes) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::{Problem, simulate_with};
    use crate::tune::{Measure, NoProgress, Timing, TuneOptions, tune_all};

    /// A GPU whose true costs are the model with other parameters (±1% noise per configuration).
    struct Perturbed {
        gpu: &'static GpuSpec,
        truth: ModelParams,
    }

    fn noise(c: &GemmConfig) -> f64 {
        let h = c.id().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        0.99 + 0.02 * (h % 1000) as f64 / 1000.0
    }

    impl Perturbed {
        fn time(&self, c: &GemmConfig, shape: &GemmShape) -> f64 {
            predict_with(&self.truth, self.gpu, c, shape).us * noise(c)
        }
    }

    impl Measure for Perturbed {
        fn measure(&mut self, p: &Problem, cands: &[Candidate]) -> Result<Vec<Timing>, TuneError> {
            let shape = p.shape();
            Ok(cands.iter().map(|c| Ok(self.time(&c.own().expect("ours only"), &shape))).collect())
        }
    }

    fn problems() -> Vec<Problem> {
        let mut v = Vec::new();
        for m in [64, 128, 4096] {
            for (n, k) in [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)] {
                v.push(Problem { n, k, experts: 1, m, what: String::new() });
            }
        }
        for (experts, m) in [(4, 8192), (8, 4096)] {
            for (n, k) in [(4096, 7168), (7168, 2048)] {
                v.push(Problem { n, k, experts, m, what: String::new() });
            }
        }
        v
    }

    #[test]
    fn calibrating_from_a_measured_table_brings_simulated_times_within_a_few_percent() {
        let gpu = by_id("h100-sxm").expect("gpu");
        let truth = ModelParams {
            sustained_tensor: 0.68,
            hbm_efficiency: 0.80,
            launch_us: 5.0,
            l2_bytes_per_clk: 56.0,
            bm64_factor: 1.08,
            bm256_factor: 1.12,
            multicast_factor: 0.96,
            mma_sync_factor: 1.0,
        };
        let mut m = Perturbed { gpu, truth };
        let list = problems();
        let mut table = Table::new(gpu);
        tune_all(gpu, &list, &mut table, &mut m, &TuneOptions::default(), &NoProgress, &mut |_| Ok(())).expect("tune");
        let d = std::env::temp_dir().join(format!("fp8forge-calibrate-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("dir");
        let path = d.join("h100.yaml");
        std::fs::write(&path, table.to_yaml().expect("yaml")).expect("write");
        let c = calibrate(&path).expect("calibrate");
        assert_eq!((c.gpu.as_str(), c.entries), ("h100-sxm", list.len()));
        assert_eq!(c.table_digest, digest(&std::fs::read(&path).expect("read")));

        // The simulated table of the same GPU, against the synthetic truth of what it chose.
        let sim_error = |p: &ModelParams| {
            let sim = simulate_with(p, gpu, &list);
            median(
                sim.entries
                    .iter()
                    .map(|e| {
                        let c = e.config.own().expect("ours");
                        (e.us / m.time(&c, &e.problem_shape()) - 1.0).abs()
                    })
                    .collect(),
            )
        };
        let (before, after) = (sim_error(&ModelParams::default()), sim_error(&c.params));
        eprintln!(
            "simulated vs truth: median error {before:.4} before, {after:.4} after; vs measured: {:.4} before, {:.4} after",
            c.simulate_error_before, c.simulate_error_after
        );
        assert!(after < 0.03, "median simulated error after calibration {after:.4} (before {before:.4}): {c:?}");
        assert!(after < before / 3.0, "after {after:.4} not clearly better than before {before:.4}");
        // Against the measured entries too (what the GPU check reports).
        assert!(c.simulate_error_after < 0.03 && c.simulate_error_after < c.simulate_error_before / 3.0, "{c:?}");
        assert!(c.error_after < c.error_before, "{c:?}");

        // The file round-trips, and its reference carries its digest.
        let file = beside(&path);
        assert_eq!(file, d.join("h100.calibration.yaml"));
        std::fs::write(&file, c.to_yaml().expect("yaml")).expect("write");
        let (back, r) = Calibration::load(&file).expect("load");
        assert_eq!(back, c);
        assert_eq!(r.digest, digest(&std::fs::read(&file).expect("read")));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_table_without_measured_entries_of_ours_cannot_calibrate() {
        let gpu = by_id("h800").expect("gpu");
        let d = std::env::temp_dir().join(format!("fp8forge-calibrate-none-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("dir");
        let path = d.join("t.yaml");
        let t = simulate_with(&ModelParams::default(), gpu, &problems());
        std::fs::write(&path, t.to_yaml().expect("yaml")).expect("write");
        let e = calibrate(&path).expect_err("predicted entries only");
        assert!(matches!(e, TuneError::NothingToCalibrate { measured: 0, .. }), "{e}");
        assert!(e.is_bad_input() && e.to_string().contains("t.yaml"), "{e}");
        let e = Calibration::load(&path).expect_err("a table is not a calibration");
        assert!(matches!(e, TuneError::MalformedCalibration { .. }) && e.is_bad_input(), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
