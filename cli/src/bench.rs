//! `fp8forge bench gemm`: our FP8 GEMM next to cuBLASLt BF16 and FP8 block-scaled on the GPU at
//! hand. Parsing and printing only; the method is `fp8forge_autotune::bench` over
//! `fp8forge_kernels::bench`.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use fp8forge_autotune::bench::{BenchProgress, BenchReport, BenchRequest, BenchShape, ConfigChoice, bench_gemm};
use fp8forge_kernels::GemmShape;
use fp8forge_kernels::bench::BenchOptions;
use fp8forge_kernels::config::GemmConfig;

use crate::failure::Failure;
use crate::output::{emit, esc, note, print_json};

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

/// Runs a `bench` subcommand: 0 when every row of ours passed its check, 1 for a runtime failure
/// (no GPU, a failed check), 2 for bad input (a shape, a configuration id).
pub fn run(what: BenchWhat) -> Result<ExitCode, Failure> {
    match what {
        BenchWhat::Gemm(a) => run_gemm(&a),
    }
}

fn usage(message: String) -> Failure {
    Failure { message, code: 2 }
}

/// The library's request for the arguments.
fn request(a: &GemmArgs) -> Result<BenchRequest, Failure> {
    if a.shapes.is_empty() && !a.deepseek_v3 {
        return Err(usage("give --shape MxNxK (repeatable) or --deepseek-v3".to_string()));
    }
    let configs = if a.sweep {
        ConfigChoice::Sweep
    } else if let Some(path) = &a.table {
        ConfigChoice::Table(path.clone())
    } else if a.configs.is_empty() {
        ConfigChoice::Heuristic
    } else {
        let parse = |id: &String| id.parse::<GemmConfig>().map_err(|why| usage(format!("--config {id}: {why}")));
        ConfigChoice::Given(a.configs.iter().map(parse).collect::<Result<_, _>>()?)
    };
    Ok(BenchRequest {
        shapes: a.shapes.iter().map(|&(m, n, k)| BenchShape { m, n, k, experts: a.groups }).collect(),
        deepseek_v3: a.deepseek_v3,
        configs,
        options: BenchOptions {
            calls_per_graph: a.calls.max(20),
            replays: a.replays.max(1),
            check_rows: a.check_rows,
            seed: a.seed.unwrap_or(BenchOptions::default().seed),
            baselines: !a.no_baselines,
            ..BenchOptions::default()
        },
    })
}

/// A line on stderr per shape, before it is measured (not with `--json`).
struct ShapeNotes {
    quiet: bool,
}

impl BenchProgress for ShapeNotes {
    fn shape(&self, shape: &GemmShape, configs: usize) {
        if !self.quiet {
            note(&format!("bench {shape} ({configs} configuration(s))"));
        }
    }
}

fn run_gemm(a: &GemmArgs) -> Result<ExitCode, Failure> {
    let report = bench_gemm(&request(a)?, &ShapeNotes { quiet: a.json })?;
    for w in &report.warnings {
        note(&format!("fp8forge: warning: {w}"));
    }
    if a.json {
        print_json(&report)?;
    } else {
        emit(&render(&report))?;
    }
    Ok(if report.ours_failed() { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".to_string(), |x| format!("{x:.prec$}"))
}

/// The table: one line per implementation and shape, then per shape our best against each
/// baseline.
fn render(r: &BenchReport) -> String {
    let hash = r.kernel_hash.get(..12).unwrap_or(&r.kernel_hash);
    let mut out = format!(
        "device: {} ({}, {} SMs, driver {}), kernels {hash}\n",
        esc(&r.device),
        r.arch,
        r.sms,
        r.driver_version
    );
    out += &format!(
        "{:>6} {:>6} {:>6} {:>3}  {:<19} {:<33} {:>9} {:>8} {:>7} {:>9}  {}\n",
        "M", "N", "K", "E", "impl", "config", "us", "TFLOP/s", "GB/s", "rel_err", "status"
    );
    for row in &r.rows {
        let status = if row.ok { "ok".to_string() } else { row.error.clone().unwrap_or_else(|| "failed".to_string()) };
        out += &format!(
            "{:>6} {:>6} {:>6} {:>3}  {:<19} {:<33} {:>9} {:>8} {:>7} {:>9}  {}\n",
            row.m,
            row.n,
            row.k,
            row.groups,
            row.implementation.name(),
            row.config,
            opt(row.us, 1),
            opt(row.tflops, 1),
            opt(row.gbps, 0),
            row.rel_err.map_or("-".to_string(), |e| format!("{e:.2e}")),
            esc(&status)
        );
    }
    out += "\nours (best) vs cuBLASLt, same run:\n";
    let ratio = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.2}x"));
    for s in r.summary() {
        out += &format!(
            "  {}x{}x{} E={}: {} TFLOP/s; vs BF16 {}, vs FP8 block {}\n",
            s.m,
            s.n,
            s.k,
            s.groups,
            opt(s.ours, 1),
            ratio(s.vs_bf16),
            ratio(s.vs_fp8_block)
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
