//! The [`Measure`] of a real GPU: the kernels' benchmark harness (`bench gemm`'s method: random
//! quantized operands, every candidate checked on a poisoned output against the f64 reference,
//! CUDA-graph replays timed with events, operands rotated past L2, candidates interleaved), with
//! cuBLASLt's FP8 block-scaled algorithms timed beside our configurations.

use std::collections::HashSet;
use std::sync::Arc;

use fp8forge_kernels::bench::{BenchOptions, BenchRow, Implementation, LtRow, ShapeBench};
use fp8forge_kernels::cublaslt::{CublasLt, LT_ALGORITHMS, LtAlgo};
use fp8forge_kernels::cuda::Device;
use fp8forge_kernels::gemm::GemmKernel;
use fp8forge_kernels::{GemmConfig, GpuArch, KernelError};

use crate::candidate::Candidate;
use crate::gpu::{GpuSpec, identify};
use crate::table::{Problem, TableGpu};
use crate::tune::{Measure, NoLtCandidates, Timing, TuneError, Untimed};

/// Times candidates on `dev`. The problem of the last call stays on the device, so the batches
/// of one problem share their operands and reference.
pub struct GpuMeasure<'d> {
    dev: &'d Device,
    arch: GpuArch,
    opts: BenchOptions,
    current: Option<(Problem, ShapeBench<'d>)>,
    compiled: HashSet<(GemmConfig, bool)>,
    /// cuBLASLt, or why it could not be opened.
    lt: Result<CublasLt, Arc<KernelError>>,
}

impl<'d> GpuMeasure<'d> {
    /// A measurer on `dev` timing with `opts` (its baselines are ignored).
    ///
    /// # Errors
    ///
    /// [`TuneError::Device`] ([`KernelError::UnsupportedGpu`]) when the GPU is not one the
    /// kernels run on.
    pub fn new(dev: &'d Device, opts: BenchOptions) -> Result<Self, TuneError> {
        let arch = dev.gpu_arch()?;
        Ok(GpuMeasure {
            dev,
            arch,
            opts: BenchOptions { baselines: false, ..opts },
            current: None,
            compiled: HashSet::new(),
            lt: CublasLt::new(dev).map_err(Arc::new),
        })
    }
}

/// The harness of `problem` in `current` (made when it is not the last one's).
fn bench_for<'c, 'd>(
    current: &'c mut Option<(Problem, ShapeBench<'d>)>,
    dev: &'d Device,
    opts: &BenchOptions,
    problem: &Problem,
) -> Result<&'c ShapeBench<'d>, TuneError> {
    let next = match current.take() {
        Some(c) if c.0 == *problem => c,
        last => {
            drop(last); // free the last problem's device memory first
            let opts = BenchOptions { tokens_per_expert: (problem.experts > 1).then_some(problem.m), ..opts.clone() };
            (problem.clone(), ShapeBench::new(dev, &problem.shape(), &opts)?)
        }
    };
    Ok(&current.insert(next).1)
}

impl Measure for GpuMeasure<'_> {
    fn measure(&mut self, problem: &Problem, candidates: &[Candidate]) -> Result<Vec<Timing>, TuneError> {
        let grouped = problem.experts > 1;
        let configs: Vec<GemmConfig> = candidates.iter().filter_map(Candidate::own).collect();
        let algos: Vec<LtAlgo> = candidates.iter().filter_map(Candidate::lt).collect();
        // Compile what is new in parallel (the disk cache makes later runs free).
        let fresh: Vec<GemmConfig> =
            configs.iter().copied().filter(|c| !self.compiled.contains(&(*c, grouped))).collect();
        let mut compile_errors = Vec::new();
        for (c, r) in fresh.iter().zip(GemmKernel::precompile(&fresh, grouped, self.arch)) {
            match r {
                Ok(()) => {
                    self.compiled.insert((*c, grouped));
                }
                Err(e) => compile_errors.push((*c, e)),
            }
        }
        let runnable: Vec<GemmConfig> =
            configs.iter().copied().filter(|c| !compile_errors.iter().any(|(x, _)| x == c)).collect();
        let lt_rows: Vec<LtRow> = algos.iter().map(|&algo| LtRow::Algo { algo, fall_back: false }).collect();
        let bench = bench_for(&mut self.current, self.dev, &self.opts, problem)?;
        let rows = bench.run_with(self.lt.as_ref().ok(), &runnable, &lt_rows)?;
        Ok(timings(candidates, compile_errors, &rows))
    }

    fn lt_candidates(&mut self, problem: &Problem) -> Result<Vec<LtAlgo>, NoLtCandidates> {
        let lt = self.lt.as_ref().map_err(|e| NoLtCandidates::Open(Arc::clone(e)))?;
        let bench = bench_for(&mut self.current, self.dev, &self.opts, problem)
            .map_err(|e| NoLtCandidates::Prepare(Box::new(e)))?;
        Ok(bench.lt_algorithms(lt, LT_ALGORITHMS)?)
    }
}

/// One [`Timing`] per configuration, in order, from the harness's rows (which come in its own
/// order: failures first) and the compile errors.
fn timings(
    candidates: &[Candidate],
    mut compile_errors: Vec<(GemmConfig, KernelError)>,
    rows: &[BenchRow],
) -> Vec<Timing> {
    candidates
        .iter()
        .map(|c| {
            if let Some(i) = compile_errors.iter().position(|(x, _)| Some(*x) == c.own()) {
                return Err(Untimed::Compile(compile_errors.swap_remove(i).1));
            }
            let id = c.id();
            let implementation = match c {
                Candidate::Own(_) => Implementation::Fp8forge,
                Candidate::CublasLt(_) => Implementation::CublasLtAlgo,
            };
            match rows.iter().find(|r| r.config == id && r.implementation == implementation) {
                Some(r) if r.ok => r.us.ok_or(Untimed::NoTime),
                Some(r) => Err(Untimed::Failed(r.error.clone().unwrap_or_else(|| "failed its check".into()))),
                None => Err(Untimed::NotMeasured),
            }
        })
        .collect()
}

/// The spec and table identity of the GPU behind `dev`: recognized by name, SM count and compute
/// capability; a GPU the spec table does not know is refused (the cost model that prunes the
/// search needs its figures).
///
/// # Errors
///
/// [`TuneError::UnknownGpu`] naming what was found.
pub fn identify_device(dev: &Device) -> Result<(&'static GpuSpec, TableGpu), TuneError> {
    let (major, minor) = dev.info.compute_capability;
    let cc = (major.max(0) as u32, minor.max(0) as u32);
    let spec = identify(&dev.info.name, dev.info.sms, cc).ok_or_else(|| TuneError::UnknownGpu {
        name: dev.info.name.clone(),
        sms: dev.info.sms,
        major,
        minor,
    })?;
    let device =
        TableGpu { id: spec.id.into(), name: dev.info.name.clone(), sms: dev.info.sms, cc: format!("{major}.{minor}") };
    Ok((spec, device))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fp8forge_kernels::Multicast;

    fn row(config: &GemmConfig, us: Option<f64>, ok: bool, error: Option<&str>) -> BenchRow {
        BenchRow {
            m: 64,
            n: 4096,
            k: 7168,
            groups: 1,
            implementation: Implementation::Fp8forge,
            config: config.id(),
            us,
            tflops: None,
            gbps: None,
            rel_err: Some(1e-3),
            ok,
            error: error.map(str::to_string),
        }
    }

    #[test]
    fn rows_map_back_to_their_configurations() {
        let c: Vec<GemmConfig> =
            [64, 128, 136, 144].into_iter().map(|bn| GemmConfig::wgmma(128, bn, 4, Multicast::None)).collect();
        // The harness lists failures first, then the timed rows.
        let rows =
            vec![row(&c[2], None, false, Some("check failed: relative error 1e0")), row(&c[0], Some(5.0), true, None)];
        let spill =
            KernelError::Spill { kernel: c[1].id(), arch: "sm_90a".into(), spill_stores: 8, spill_loads: 8, stack: 0 };
        let mut cand: Vec<Candidate> = c.iter().map(|x| Candidate::Own(*x)).collect();
        let lt: LtAlgo = "cublaslt_a66_t20_s13_k1_r0_w0_c0_i0_l0".parse().expect("id");
        cand.push(Candidate::CublasLt(lt));
        let mut lt_row = row(&c[0], Some(4.0), true, None);
        (lt_row.implementation, lt_row.config) = (Implementation::CublasLtAlgo, lt.id());
        // A failed check of a cuBLASLt algorithm gives no time, although the harness timed it.
        let mut lt_failed = lt_row.clone();
        (lt_failed.ok, lt_failed.error) = (false, Some("check failed: relative error 5e-1".into()));
        let t = timings(&cand, vec![(c[1], spill)], &[rows.clone(), vec![lt_row]].concat());
        assert!(matches!(t[4], Ok(4.0)), "{:?}", t[4]);
        let failed = timings(&cand[4..], Vec::new(), &[lt_failed]);
        assert!(matches!(&failed[0], Err(Untimed::Failed(why)) if why.contains("5e-1")), "{:?}", failed[0]);
        assert!(matches!(t[0], Ok(5.0)), "{:?}", t[0]);
        assert!(matches!(&t[1], Err(Untimed::Compile(KernelError::Spill { .. }))), "{:?}", t[1]);
        assert!(matches!(&t[2], Err(Untimed::Failed(why)) if why == "check failed: relative error 1e0"), "{:?}", t[2]);
        assert!(matches!(t[3], Err(Untimed::NotMeasured)), "{:?}", t[3]);
    }
}
