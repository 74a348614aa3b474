//! `fp8forge kernels precompile`: builds kernel variants into the kernel cache with NVRTC, where
//! no GPU is needed, so that a GPU machine only reads the cache (see `bench/gpu-check.sh
//! prepare`). Parsing and printing only; the work is `fp8forge_kernels::cache::build_all`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use fp8forge_kernels::GpuArch;
use fp8forge_kernels::cache::{build_all, build_report, cache_dir};
use fp8forge_kernels::filter::VariantFilter;
use fp8forge_kernels::source::{KernelSpec, all_variants};

use crate::failure::Failure;
use crate::output::{esc, esc_path, note};

/// What to do with the kernels.
#[derive(Subcommand, Debug)]
pub enum KernelsWhat {
    /// Compile every kernel variant (or those --filter selects) into the kernel cache
    /// ($FP8FORGE_KERNEL_CACHE, else ~/.cache/fp8forge/kernels); a variant that fails is reported and the others go on.
    Precompile(PrecompileArgs),
}

/// The architectures one can build for.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum ArchArg {
    /// Hopper with wgmma (H100, H200).
    #[value(name = "sm_90a")]
    Sm90a,
    /// Ada (mma.sync only).
    #[value(name = "sm_89")]
    Sm89,
}

/// `kernels precompile` options.
#[derive(Args, Debug)]
pub struct PrecompileArgs {
    /// Target architecture.
    #[arg(long, value_enum, default_value = "sm_90a")]
    pub arch: ArchArg,
    /// Only these GEMM variants: comma-separated `family:NAME` or configuration ids (as FP8FORGE_GPU_FILTER).
    #[arg(long, default_value = "")]
    pub filter: String,
    /// Write the per-variant build report (TSV: status, registers, stack, spills, warnings) here.
    #[arg(long, value_name = "FILE.tsv")]
    pub report: Option<PathBuf>,
}

/// Runs a `kernels` subcommand: 0 when every variant built, 1 when one failed (or NVRTC is
/// missing), 2 for a bad filter.
pub fn run(what: KernelsWhat) -> Result<ExitCode, Failure> {
    match what {
        KernelsWhat::Precompile(a) => precompile(&a),
    }
}

fn specs(a: &PrecompileArgs, arch: GpuArch) -> Result<Vec<KernelSpec>, Failure> {
    let filter =
        VariantFilter::parse(&a.filter, arch).map_err(|e| Failure { message: format!("--filter: {e}"), code: 2 })?;
    if filter.is_empty() {
        return Ok(all_variants(arch));
    }
    let mut out = Vec::new();
    for config in filter.select(arch) {
        out.push(KernelSpec::Gemm { config, grouped: false });
        if fp8forge_kernels::config::supports_grouped(&config) {
            out.push(KernelSpec::Gemm { config, grouped: true });
        }
    }
    Ok(out)
}

fn precompile(a: &PrecompileArgs) -> Result<ExitCode, Failure> {
    let arch = match a.arch {
        ArchArg::Sm90a => GpuArch::Sm90a,
        ArchArg::Sm89 => GpuArch::Sm89,
    };
    let specs = specs(a, arch)?;
    fp8forge_kernels::nvrtc::ensure_nvrtc().map_err(|e| Failure { message: e.to_string(), code: 1 })?;
    let dir = cache_dir().ok_or_else(|| Failure {
        message: "no kernel cache directory: set FP8FORGE_KERNEL_CACHE (or HOME)".to_string(),
        code: 1,
    })?;
    let t0 = std::time::Instant::now();
    let outcomes = build_all(&specs, arch);
    let failed: Vec<_> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    for o in &failed {
        if let Err(e) = &o.result {
            note(&format!("fp8forge: {} failed: {}", o.spec.label(), esc(&e.to_string())));
        }
    }
    let cached = outcomes.iter().filter(|o| o.was_cached).count();
    note(&format!(
        "fp8forge: {} variants for {arch} in {}: {cached} already cached, {} built, {} failed ({:.1} s)",
        outcomes.len(),
        esc_path(&dir),
        outcomes.len() - cached - failed.len(),
        failed.len(),
        t0.elapsed().as_secs_f64()
    ));
    if let Some(path) = &a.report {
        std::fs::write(path, build_report(&outcomes, arch))
            .map_err(|e| Failure { message: format!("{}: {e}", esc_path(path)), code: 1 })?;
    }
    Ok(if failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
