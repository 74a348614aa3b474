//! `fp8forge autotune`: parsing, the progress bar and printing; the method is
//! `fp8forge_autotune::run::autotune` (measured with `fp8forge_autotune::tune`, predicted with
//! `fp8forge_autotune::table::simulate`). The model's shapes come from the runtime's validated
//! config.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use fp8forge_autotune::candidate::Candidate;
use fp8forge_autotune::gpu;
use fp8forge_autotune::run::{
    AutotuneReport, AutotuneRequest, AutotuneWarning, Mode, RunSummary, autotune, calibrate_table,
};
use fp8forge_autotune::shapes::{AttentionDims, FfnDims, ModelDims, WeightShape, model_shapes};
use fp8forge_autotune::table::{self, Table, TableError};
use fp8forge_autotune::tune::{Outcome, TuneError, TuneOptions, TuneProgress};
use fp8forge_runtime::config::{AttentionShape, FfnShape, ModelConfig, Shapes};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::failure::Failure;
use crate::output::{emit, esc_path, note, print_json};

/// `autotune` options.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["model", "shape", "calibrate"])))]
pub struct AutotuneArgs {
    /// Model directory: every GEMM shape of its config.json.
    #[arg(long)]
    model: Option<PathBuf>,
    /// A weight shape NxK (repeatable); NxKxE for E experts in one grouped launch.
    #[arg(long, value_parser = parse_nk)]
    shape: Vec<(usize, usize, usize)>,
    /// M values to tune (comma-separated; per expert for grouped shapes).
    #[arg(long, value_delimiter = ',', default_values_t = table::default_m())]
    m: Vec<usize>,
    /// GPU: auto (the one present) or h100-sxm, h100-pcie, h800-sxm (h800), h800-pcie, h200, h20.
    #[arg(long, default_value = "auto")]
    gpu: String,
    /// Rank by the cost model alone, for a GPU that is not present; entries are marked predicted.
    #[arg(long)]
    simulate: bool,
    /// Time every legal configuration (default: the cost model prunes to --budget of them).
    #[arg(long, conflicts_with = "simulate")]
    exhaustive: bool,
    /// Share of the legal configurations timed per shape and M when pruning.
    #[arg(long, default_value_t = 0.15, conflicts_with = "simulate")]
    budget: f64,
    /// Continue an interrupted run: skip what the table at --out already holds as measured.
    #[arg(long, conflicts_with = "simulate")]
    resume: bool,
    /// Output table (YAML); an existing table of the same GPU and kernels is merged into.
    #[arg(long, required_unless_present = "calibrate")]
    out: Option<PathBuf>,
    /// Fit the cost model to this measured table and write the calibration (to --calibration
    /// FILE, default: TABLE.calibration.yaml beside it); nothing is tuned.
    #[arg(long, value_name = "TABLE.yaml", conflicts_with_all = ["model", "shape", "simulate", "exhaustive", "resume"])]
    calibrate: Option<PathBuf>,
    /// The cost model's calibration to rank (and with --simulate, predict) with (default: the
    /// OUT.calibration.yaml beside --out when there is one); with --calibrate, where to write it.
    #[arg(long, value_name = "FILE")]
    calibration: Option<PathBuf>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

fn parse_nk(s: &str) -> Result<(usize, usize, usize), String> {
    let bad = || format!("invalid --shape {s:?}: expected NxK or NxKxE, e.g. 4096x7168 or 4096x7168x8");
    let v: Vec<usize> = s.split(['x', 'X']).map(|p| p.trim().parse().map_err(|_| bad())).collect::<Result<_, _>>()?;
    match v[..] {
        [n, k] if n > 0 && k > 0 => Ok((n, k, 1)),
        [n, k, e] if n > 0 && k > 0 && e > 0 => Ok((n, k, e)),
        _ => Err(bad()),
    }
}

fn usage(message: String) -> Failure {
    Failure { message, code: 2 }
}

/// The GEMM dimensions of a model, from the runtime's validated config.
fn model_dims(s: Shapes) -> ModelDims {
    let attention = match s.attention {
        AttentionShape::Mla { heads, q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim } => {
            AttentionDims::Mla { heads, q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim }
        }
        AttentionShape::Gqa { heads, kv_heads, head_dim } => AttentionDims::Gqa { heads, kv_heads, head_dim },
    };
    let layers = s
        .layers
        .into_iter()
        .map(|l| match l {
            FfnShape::Dense { intermediate } => FfnDims::Dense { intermediate },
            FfnShape::Moe { experts, intermediate, shared_intermediate } => {
                FfnDims::Moe { experts, intermediate, shared_intermediate }
            }
        })
        .collect();
    ModelDims { hidden: s.hidden, attention, layers }
}

/// The library's request for the arguments.
fn request(a: &AutotuneArgs, out: &Path) -> Result<AutotuneRequest, Failure> {
    let mut shapes: Vec<WeightShape> =
        a.shape.iter().map(|&(n, k, groups)| WeightShape { n, k, groups, what: String::new() }).collect();
    if let Some(dir) = &a.model {
        let config = ModelConfig::load(&dir.join("config.json"))?;
        shapes.extend(model_shapes(&model_dims(config.shapes())));
    }
    let asked = match a.gpu.as_str() {
        "auto" => None,
        id => Some(gpu::by_id(id).ok_or_else(|| usage(format!("unknown --gpu {id:?}")))?),
    };
    let mode = if a.simulate {
        Mode::Simulate(asked.ok_or_else(|| {
            usage("--simulate needs --gpu ID (h100-sxm, h100-pcie, h800-sxm, h800-pcie, h200, h20)".into())
        })?)
    } else {
        let options =
            TuneOptions { budget: a.budget, exhaustive: a.exhaustive, resume: a.resume, ..TuneOptions::default() };
        Mode::Measure { expect: asked, options }
    };
    Ok(AutotuneRequest { shapes, ms: a.m.clone(), out: out.to_path_buf(), mode, calibration: a.calibration.clone() })
}

/// A failure of the library in the user's words: where a flag would fix it, which one.
fn failure(e: TuneError) -> Failure {
    let code = if e.is_bad_input() { 2 } else { 1 };
    let message = match &e {
        TuneError::ZeroM => "--m values must be positive".to_string(),
        TuneError::Budget(b) => format!("--budget {b} must be in (0, 1]"),
        TuneError::OpenDevice(_) => {
            format!("{e}; measuring needs the GPU (use --simulate --gpu ID to predict a table without one)")
        }
        TuneError::UnknownGpu { .. } => format!("{e}; use --simulate --gpu ID"),
        TuneError::OtherGpu { asked, found, name } => {
            format!("--gpu {asked} but the GPU here is {found} ({name}); measure it, or --simulate --gpu {asked}")
        }
        TuneError::Table(TableError::OtherGpu { .. }) => format!("{e}; choose another --out"),
        _ => return Failure::from(e),
    };
    Failure { message, code }
}

/// Runs `autotune`.
pub fn run(a: AutotuneArgs) -> Result<ExitCode, Failure> {
    if let Some(table) = &a.calibrate {
        return run_calibrate(&a, table);
    }
    let out = a.out.clone().ok_or_else(|| usage("--out FILE.yaml is required".into()))?;
    let req = request(&a, &out)?;
    let bar = TuneBar::new(a.quiet || a.json || a.simulate);
    let r = autotune(&req, &bar, &mut |t| save(&out, t));
    bar.finish();
    let r = r.map_err(failure)?;
    for w in &r.warnings {
        match w {
            AutotuneWarning::Skipped(_) => note(&format!("fp8forge: {w}")),
            AutotuneWarning::ReplacedStale { .. } | AutotuneWarning::Calibrated { .. } => {
                if !a.quiet {
                    note(&format!("fp8forge: note: {w}"))
                }
            }
            AutotuneWarning::NoCublasLt { .. } => note(&format!("fp8forge: warning: {w}")),
        }
    }
    if a.simulate {
        print_predicted(&a, &out, &r)?
    } else {
        print_measured(&a, &out, &r)?
    }
    Ok(ExitCode::SUCCESS)
}

/// `autotune --calibrate TABLE`: fit, write the calibration, print it.
fn run_calibrate(a: &AutotuneArgs, table: &Path) -> Result<ExitCode, Failure> {
    let r = calibrate_table(table, a.calibration.as_deref()).map_err(failure)?;
    let yaml = r.calibration.to_yaml().map_err(failure)?;
    fp8forge_formats::atomic::write_atomic(&r.out, yaml.as_bytes())
        .map_err(|e| failure(TuneError::Save(Box::new(e))))?;
    if a.json {
        #[derive(Serialize)]
        struct Calibrated<'a> {
            out: String,
            calibration: &'a fp8forge_autotune::calibrate::Calibration,
        }
        return print_json(&Calibrated { out: r.out.display().to_string(), calibration: &r.calibration })
            .map(|()| ExitCode::SUCCESS);
    }
    let c = &r.calibration;
    let mut params = String::new();
    for (name, v) in fp8forge_autotune::model::ModelParams::NAMES.iter().zip(c.params.to_vec()) {
        params += &format!("  {name:<18} {v:.4}\n");
    }
    emit(&format!(
        "calibrated the cost model on {} entries of {} ({}) -> {}\n{params}         median |predicted/measured - 1| per entry: {:.1}% before, {:.1}% after\n         median |simulated/measured - 1| per entry: {:.1}% before, {:.1}% after\n",
        c.entries,
        esc_path(table),
        c.gpu,
        esc_path(&r.out),
        100.0 * c.error_before,
        100.0 * c.error_after,
        100.0 * c.simulate_error_before,
        100.0 * c.simulate_error_after,
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// Writes the table atomically.
fn save(out: &Path, t: &Table) -> Result<(), TuneError> {
    let yaml = t.to_yaml()?;
    fp8forge_formats::atomic::write_atomic(out, yaml.as_bytes()).map(|_| ()).map_err(|e| TuneError::Save(Box::new(e)))
}

fn print_predicted(a: &AutotuneArgs, out: &Path, r: &AutotuneReport) -> Result<(), Failure> {
    if a.json {
        return print_json(&r.table);
    }
    let (t, g) = (&r.table, r.gpu);
    emit(&format!(
        "{} entries for {} ({}, predicted) -> {}\n{}",
        t.entries.len(),
        g.name,
        g.id,
        esc_path(out),
        render_entries(t)
    ))
}

#[derive(Serialize)]
struct MeasuredReport<'a> {
    summary: RunSummary,
    seconds: f64,
    table: &'a Table,
    outcomes: &'a [Outcome],
}

fn print_measured(a: &AutotuneArgs, out: &Path, r: &AutotuneReport) -> Result<(), Failure> {
    let (t, seconds) = (&r.table, r.seconds);
    if a.json {
        return print_json(&MeasuredReport { summary: r.summary(), seconds, table: t, outcomes: &r.outcomes });
    }
    for o in &r.outcomes {
        if let Some(first) = o.failures.first() {
            note(&format!(
                "fp8forge: warning: {}: {} candidate(s) failed; first: {} {}",
                o.problem,
                o.failures.len(),
                first.0,
                first.1
            ));
        }
    }
    emit(&format!(
        "{} problems tuned on {} ({}) in {seconds:.0} s{} -> {}\n{}",
        r.outcomes.len(),
        t.device.name,
        r.gpu.id,
        if a.exhaustive { ", exhaustive" } else { "" },
        esc_path(out),
        render_entries(t)
    ))?;
    let s = r.summary();
    let m = &s.metrics;
    let stat = |v: Option<fp8forge_autotune::metrics::RatioStats>, what: &str| {
        v.map(|x| format!("  {what}: min {:.3}, median {:.3}, max {:.3}\n", x.min, x.median, x.max)).unwrap_or_default()
    };
    emit(&format!(
        "{} candidates timed of {} ({} entries fp8forge, {} cuBLASLt)\n{}{}{}{}",
        s.candidates_timed,
        s.candidates,
        m.fp8forge_entries,
        m.cublaslt_entries,
        stat(m.pruned_vs_exhaustive, "pruned pick / exhaustive best (time ratio best/pick)"),
        stat(m.timed_share, "share of candidates timed"),
        stat(m.model_top1, "model's top-1 (time ratio best/pick)"),
        stat(m.vs_cublaslt, "cuBLASLt's best / chosen (time ratio)"),
    ))
}

fn render_entries(t: &Table) -> String {
    let mut s = String::new();
    for e in &t.entries {
        let timed = if e.candidates > 0 { format!("timed {}/{}", e.timed, e.candidates) } else { String::new() };
        s += &format!(
            "  {:>6}x{:<6} E={:<3} M={:<5} {:<8} {:<38} {:>9.1} us {:>7.0} TFLOP/s  {:<9} {:<15} {}\n",
            e.n,
            e.k,
            e.experts,
            e.m,
            e.implementation.to_string(),
            e.config.id(),
            e.us,
            e.tflops,
            e.source.to_string(),
            timed,
            e.what
        );
    }
    s
}

/// The progress bar of a measured run: one step per shape and M.
struct TuneBar {
    bar: ProgressBar,
}

impl TuneBar {
    fn new(hidden: bool) -> Self {
        let bar = ProgressBar::with_draw_target(
            None,
            if hidden { ProgressDrawTarget::hidden() } else { ProgressDrawTarget::stderr() },
        );
        let style = ProgressStyle::with_template("autotune {bar:30} {pos}/{len} shape×M ETA {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        TuneBar { bar }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl TuneProgress for TuneBar {
    fn begin(&self, problems: u64) {
        self.bar.set_length(problems);
    }

    fn problem(&self, what: &str) {
        self.bar.set_message(what.to_string());
    }

    fn timed(&self, what: &str, timed: usize, planned: usize, best: Option<(&Candidate, f64)>) {
        let best = best.map(|(c, us)| format!(", best {c} {us:.1} us")).unwrap_or_default();
        self.bar.set_message(format!("{what}: {timed}/{planned} candidates timed{best}"));
    }

    fn advance(&self) {
        self.bar.inc(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse() {
        assert_eq!(parse_nk("4096x7168"), Ok((4096, 7168, 1)));
        assert_eq!(parse_nk("4096x7168x8"), Ok((4096, 7168, 8)));
        assert!(parse_nk("4096").is_err() && parse_nk("0x7168").is_err() && parse_nk("ax1").is_err());
    }
}
