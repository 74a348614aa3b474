//! The [`Measure`] of a real GPU: the kernels' benchmark harness (`bench gemm`'s method: random
//! quantized operands, every candidate checked on a poisoned output against the f64 reference,
//! CUDA-graph replays timed with events, operands rotated past L2, candidates interleaved).

use std::collections::HashSet;

use fp8forge_kernels::bench::{BenchOptions, BenchRow, Implementation, ShapeBench};
use fp8forge_kernels::cuda::Device;
use fp8forge_kernels::gemm::GemmKernel;
use fp8forge_kernels::{GemmConfig, GpuArch, KernelError};

use crate::gpu::{GpuSpec, identify};
use crate::table::{Problem, TableGpu};
use crate::tune::{Measure, Timing, TuneError, Untimed};

/// Times candidates on `dev`. The problem of the last call stays on the device, so the batches
/// of one problem share their operands and reference.
pub struct GpuMeasure<'d> {
    dev: &'d Device,
    arch: GpuArch,
    opts: BenchOptions,
    current: Option<(Problem, ShapeBench<'d>)>,
    compiled: HashSet<(GemmConfig, bool)>,
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
        })
    }
}

impl Measure for GpuMeasure<'_> {
    fn measure(&mut self, problem: &Problem, configs: &[GemmConfig]) -> Result<Vec<Timing>, TuneError> {
        let shape = problem.shape();
        let grouped = shape.groups.is_some();
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
        let current = match self.current.take() {
            Some(current) if current.0 == *problem => current,
            last => {
                drop(last); // free the last problem's device memory first
                let opts =
                    BenchOptions { tokens_per_expert: (problem.experts > 1).then_some(problem.m), ..self.opts.clone() };
                (problem.clone(), ShapeBench::new(self.dev, &shape, &opts)?)
            }
        };
        let (_, bench) = self.current.insert(current);
        let runnable: Vec<GemmConfig> =
            configs.iter().copied().filter(|c| !compile_errors.iter().any(|(x, _)| x == c)).collect();
        let rows = bench.run(None, &runnable)?;
        Ok(timings(configs, compile_errors, &rows))
    }
}

/// One [`Timing`] per configuration, in order, from the harness's rows (which come in its own
/// order: failures first) and the compile errors.
fn timings(
    configs: &[GemmConfig],
    mut compile_errors: Vec<(GemmConfig, KernelError)>,
    rows: &[BenchRow],
) -> Vec<Timing> {
    configs
        .iter()
        .map(|c| {
            if let Some(i) = compile_errors.iter().position(|(x, _)| x == c) {
                return Err(Untimed::Compile(compile_errors.swap_remove(i).1));
            }
            let id = c.id();
            match rows.iter().find(|r| r.config == id && r.implementation == Implementation::Fp8forge) {
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
        let t = timings(&c, vec![(c[1], spill)], &rows);
        assert!(matches!(t[0], Ok(5.0)), "{:?}", t[0]);
        assert!(matches!(&t[1], Err(Untimed::Compile(KernelError::Spill { .. }))), "{:?}", t[1]);
        assert!(matches!(&t[2], Err(Untimed::Failed(why)) if why == "check failed: relative error 1e0"), "{:?}", t[2]);
        assert!(matches!(t[3], Err(Untimed::NotMeasured)), "{:?}", t[3]);
    }
}
