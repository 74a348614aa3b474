//! `fp8forge bench gemm`: our FP8 GEMM next to cuBLASLt BF16 and FP8 block-scaled on the GPU at
//! hand. Parsing and printing only; the method is `fp8forge_kernels::bench`.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use fp8forge_autotune::measure::identify_device;
use fp8forge_autotune::table::{Table, choose};
use fp8forge_kernels::bench::{BenchOptions, BenchRow, Implementation, bench_shape, deepseek_v3_shapes};
use fp8forge_kernels::config::{GemmConfig, GemmShape, is_legal, search_space};
use fp8forge_kernels::cublaslt::CublasLt;
use fp8forge_kernels::cuda::Device;
use fp8forge_kernels::{KernelError, source_hash};
use serde::Serialize;

use crate::failure::Failure;
use crate::output::{emit, note, print_json};

/// What to benchmark.
#[derive(Subcommand, Debug)]
pub enum BenchWhat {
    /// FP8 block-scaled GEMM: ours vs cuBLASLt BF16 and FP8 (1×128 / 128×128 scales).
    Gemm(GemmArgs),
}

/// `bench gemm` options.
#[derive(Args, Debug)]
pub struct GemmArgs {
    /// A shape MxNxK (repeatable). With --groups E: E experts of M tokens each, B is [E, N, K].
    #[arg(long = "shape", value_name = "MxNxK", value_parser = parse_shape)]
    pub shapes: Vec<(usize, usize, usize)>,
    /// DeepSeek-V3's shapes (BENCH_TARGETS.md): dense N×K at M = 64, 128, 4096, and the grouped MoE shapes.
    #[arg(long)]
    pub deepseek_v3: bool,
    /// Make each --shape an M-grouped (MoE, contiguous layout) GEMM over E experts.
    #[arg(long, value_name = "E")]
    pub groups: Option<usize>,
    /// Our kernel's configuration (repeatable), e.g. wgmma_bm128_bn128_s4_mcA2_sw128; default: a wave-count heuristic.
    #[arg(long = "config", value_name = "ID")]
    pub configs: Vec<String>,
    /// Every legal configuration of the search space (slow; re-time the best few with --config).
    #[arg(long, conflicts_with = "configs")]
    pub sweep: bool,
    /// Our kernel's configuration from a tuning table (`fp8forge autotune`): its entry for the
    /// shape and nearest M, else the cost model's choice.
    #[arg(long, value_name = "FILE.yaml", conflicts_with_all = ["configs", "sweep"])]
    pub table: Option<std::path::PathBuf>,
    /// Do not time the cuBLASLt baselines.
    #[arg(long)]
    pub no_baselines: bool,
    /// Timed graph replays per implementation (the median is reported).
    #[arg(long, default_value_t = 7)]
    pub replays: u32,
    /// Calls per captured graph (at least 20).
    #[arg(long, default_value_t = 20)]
    pub calls: u32,
    /// Output rows checked against the CPU reference per shape.
    #[arg(long, default_value_t = 64)]
    pub check_rows: usize,
    /// Seed of the random inputs (default: fixed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

fn parse_shape(s: &str) -> Result<(usize, usize, usize), String> {
    let bad = || format!("invalid shape {s:?}: expected MxNxK, e.g. 4096x7168x2048");
    let parts: Vec<&str> = s.split(['x', 'X']).collect();
    let [m, n, k] = parts.as_slice() else { return Err(bad()) };
    let p = |v: &str| v.trim().parse::<usize>().map_err(|_| bad());
    Ok((p(m)?, p(n)?, p(k)?))
}

#[derive(Serialize)]
struct Report<'a> {
    device: &'a str,
    arch: String,
    sms: u32,
    driver_version: i32,
    kernel_hash: String,
    rows: &'a [BenchRow],
}

/// Runs a `bench` subcommand: 0 when every row of ours passed its check, 1 for a runtime failure
/// (no GPU, a failed check), 2 for bad input (a shape, a configuration id).
pub fn run(what: BenchWhat) -> Result<ExitCode, Failure> {
    match what {
        BenchWhat::Gemm(a) => run_gemm(&a).map_err(|(code, message)| Failure { message, code }),
    }
}

fn fail(e: KernelError) -> (u8, String) {
    (if e.is_bad_input() { 2 } else { 1 }, e.to_string())
}

fn run_gemm(a: &GemmArgs) -> Result<ExitCode, (u8, String)> {
    // Each shape with its real tokens per expert (grouped --shape: M each).
    let mut shapes: Vec<(GemmShape, Option<usize>)> = a
        .shapes
        .iter()
        .map(|&(m, n, k)| match a.groups {
            Some(e) => (GemmShape::grouped(e * m.next_multiple_of(128), n, k, e), Some(m)),
            None => (GemmShape::dense(m, n, k), None),
        })
        .collect();
    if a.deepseek_v3 {
        shapes.extend(deepseek_v3_shapes().into_iter().map(|s| (s, None)));
    }
    if shapes.is_empty() {
        return Err((2, "give --shape MxNxK (repeatable) or --deepseek-v3".to_string()));
    }
    for (s, _) in &shapes {
        s.validate().map_err(|why| (2, format!("shape {s}: {why}")))?;
    }
    let table = match &a.table {
        Some(path) => Some(Table::load(path).map_err(|e| (2, e.to_string()))?),
        None => None,
    };
    let configs: Vec<GemmConfig> = a
        .configs
        .iter()
        .map(|id| id.parse::<GemmConfig>().map_err(|why| (2, format!("--config {id}: {why}"))))
        .collect::<Result<_, _>>()?;

    let dev = Device::open(0).map_err(fail)?;
    let arch = dev.arch().ok_or_else(|| {
        (
            1,
            format!(
                "{} (compute capability {:?}) is not an sm_89/sm_90 GPU",
                dev.info.name, dev.info.compute_capability
            ),
        )
    })?;
    let lt = if a.no_baselines {
        None
    } else {
        match CublasLt::new(&dev) {
            Ok(lt) => Some(lt),
            Err(e) => {
                note(&format!("fp8forge: warning: no cuBLASLt baselines: {e}"));
                None
            }
        }
    };
    let spec = match &table {
        Some(t) => {
            let (spec, _) = identify_device(&dev).map_err(|e| (1, e.to_string()))?;
            if t.is_stale() {
                note("fp8forge: warning: the table was tuned for other kernels (stale hash): using the cost model");
            } else if t.device.id != spec.id {
                note(&format!("fp8forge: warning: the table is for {}, this GPU is {}", t.device.id, spec.id));
            }
            Some(spec)
        }
        None => None,
    };
    let opts = BenchOptions {
        calls_per_graph: a.calls.max(20),
        replays: a.replays.max(1),
        check_rows: a.check_rows,
        seed: a.seed.unwrap_or(BenchOptions::default().seed),
        baselines: !a.no_baselines,
        ..BenchOptions::default()
    };
    let mut rows = Vec::new();
    for (shape, tokens) in &shapes {
        let opts = BenchOptions { tokens_per_expert: *tokens, ..opts.clone() };
        let for_shape: Vec<GemmConfig> = if a.sweep {
            search_space(arch).into_iter().filter(|c| is_legal(c, shape).is_ok()).collect()
        } else if let Some(spec) = spec {
            let e = shape.experts();
            let m = if e > 1 { tokens.unwrap_or(shape.m / e) } else { shape.m };
            choose(table.as_ref(), spec, shape.n, shape.k, e, m).into_iter().collect()
        } else {
            configs.clone()
        };
        if !a.json {
            note(&format!("bench {shape} ({} configuration(s))", for_shape.len().max(1)));
        }
        rows.extend(bench_shape(&dev, lt.as_ref(), shape, &for_shape, &opts).map_err(fail)?);
    }
    if a.json {
        let report = Report {
            device: &dev.info.name,
            arch: arch.to_string(),
            sms: dev.info.sms,
            driver_version: dev.info.driver_version,
            kernel_hash: source_hash(),
            rows: &rows,
        };
        print_json(&report).map_err(|f| (f.code, f.message))?;
    } else {
        emit(&render(&dev, arch, &rows)).map_err(|f| (f.code, f.message))?;
    }
    let failed = rows.iter().any(|r| r.implementation == Implementation::Fp8forge && !r.ok);
    Ok(if failed { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".to_string(), |x| format!("{x:.prec$}"))
}

/// The table: one line per implementation and shape, then per shape our best against each
/// baseline.
fn render(dev: &Device, arch: fp8forge_kernels::GpuArch, rows: &[BenchRow]) -> String {
    let mut out = format!(
        "device: {} ({arch}, {} SMs, driver {}), kernels {}\n",
        dev.info.name,
        dev.info.sms,
        dev.info.driver_version,
        &source_hash()[..12]
    );
    out += &format!(
        "{:>6} {:>6} {:>6} {:>3}  {:<19} {:<33} {:>9} {:>8} {:>7} {:>9}  {}\n",
        "M", "N", "K", "E", "impl", "config", "us", "TFLOP/s", "GB/s", "rel_err", "status"
    );
    for r in rows {
        out += &format!(
            "{:>6} {:>6} {:>6} {:>3}  {:<19} {:<33} {:>9} {:>8} {:>7} {:>9}  {}\n",
            r.m,
            r.n,
            r.k,
            r.groups,
            r.implementation,
            r.config,
            opt(r.us, 1),
            opt(r.tflops, 1),
            opt(r.gbps, 0),
            r.rel_err.map_or("-".to_string(), |e| format!("{e:.2e}")),
            if r.ok { "ok".to_string() } else { r.error.clone().unwrap_or_else(|| "failed".to_string()) }
        );
    }
    let mut shapes: Vec<(usize, usize, usize, usize)> = Vec::new();
    for r in rows {
        let s = (r.m, r.n, r.k, r.groups);
        if !shapes.contains(&s) {
            shapes.push(s);
        }
    }
    out += "\nours (best) vs cuBLASLt, same run:\n";
    for (m, n, k, e) in shapes {
        let best = |imp: &str| {
            rows.iter()
                .filter(|r| (r.m, r.n, r.k, r.groups) == (m, n, k, e) && r.implementation.name() == imp)
                .filter_map(|r| r.tflops)
                .fold(None, |a: Option<f64>, t| Some(a.map_or(t, |a| a.max(t))))
        };
        let (ours, bf16, fp8) = (best("fp8forge"), best("cublaslt_bf16"), best("cublaslt_fp8_block"));
        let ratio = |b: Option<f64>| match (ours, b) {
            (Some(o), Some(b)) if b > 0.0 => format!("{:.2}x", o / b),
            _ => "-".to_string(),
        };
        out += &format!(
            "  {m}x{n}x{k} E={e}: {} TFLOP/s; vs BF16 {}, vs FP8 block {}\n",
            opt(ours, 1),
            ratio(bf16),
            ratio(fp8)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse() {
        assert_eq!(parse_shape("4096x7168x2048"), Ok((4096, 7168, 2048)));
        assert!(parse_shape("4096x7168").is_err());
        assert!(parse_shape("ax1x1").is_err());
    }
}
