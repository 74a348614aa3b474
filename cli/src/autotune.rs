//! `fp8forge autotune`: parsing, the progress bar and printing; the method is
//! `fp8forge_autotune::tune` (measured) and `fp8forge_autotune::table::simulate` (predicted).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use fp8forge_autotune::gpu::{self, GpuSpec};
use fp8forge_autotune::measure::{GpuMeasure, identify_device};
use fp8forge_autotune::shapes::{self, GemmShape};
use fp8forge_autotune::table::{self, Problem, Table};
use fp8forge_autotune::tune::{Outcome, TuneError, TuneOptions, TuneProgress, tune_all};
use fp8forge_kernels::bench::BenchOptions;
use fp8forge_kernels::cuda::Device;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::failure::Failure;
use crate::output::{emit, esc_path, note, print_json};

/// `autotune` options.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["model", "shape"])))]
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
    #[arg(long)]
    out: PathBuf,
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

/// Runs `autotune`.
pub fn run(a: AutotuneArgs) -> Result<ExitCode, Failure> {
    let mut list: Vec<GemmShape> =
        a.shape.iter().map(|&(n, k, groups)| GemmShape { n, k, groups, what: String::new() }).collect();
    if let Some(dir) = &a.model {
        let file = dir.join("config.json");
        let v = fp8forge_formats::checkpoint::read_json(&file).map_err(|e| usage(e.to_string()))?;
        list.extend(shapes::model_shapes(&v).map_err(|e| usage(format!("{}: {e}", dir.display())))?);
    }
    if a.m.contains(&0) {
        return Err(usage("--m values must be positive".into()));
    }
    if !(a.budget > 0.0 && a.budget <= 1.0) {
        return Err(usage(format!("--budget {} must be in (0, 1]", a.budget)));
    }
    let (problems, skipped) = table::problems(&list, &a.m);
    if problems.is_empty() {
        let why = skipped.first().map(|s| format!(" ({}{})", s.trim(), if skipped.len() > 1 { ", ..." } else { "" }));
        return Err(usage(format!(
            "nothing to tune: none of the {} shape(s) is legal for any kernel{}; no table written",
            list.len(),
            why.unwrap_or_default()
        )));
    }
    for s in &skipped {
        note(&format!("fp8forge: skipped {}", s.trim()));
    }
    let asked = match a.gpu.as_str() {
        "auto" => None,
        id => Some(gpu::by_id(id).ok_or_else(|| usage(format!("unknown --gpu {id:?}")))?),
    };
    if a.simulate {
        let g = asked.ok_or_else(|| {
            usage("--simulate needs --gpu ID (h100-sxm, h100-pcie, h800-sxm, h800-pcie, h200, h20)".into())
        })?;
        let new = table::simulate(g, &problems);
        if new.entries.is_empty() {
            return Err(usage(format!(
                "nothing to tune: no kernel configuration is legal for these shapes on {}; no table written",
                g.id
            )));
        }
        let t = merge_into_existing(&a.out, new)?;
        save(&a.out, &t)?;
        if a.json {
            print_json(&t)?;
        } else {
            emit(&format!(
                "{} entries for {} ({}, predicted) -> {}\n{}",
                t.entries.len(),
                g.name,
                g.id,
                esc_path(&a.out),
                render_entries(&t)
            ))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    measured(&a, asked, &problems)
}

/// The table at `out` when it is for the same GPU and kernels, with `t` merged in; else `t`.
fn merge_into_existing(out: &Path, t: Table) -> Result<Table, Failure> {
    if !out.exists() {
        return Ok(t);
    }
    let mut old = Table::load(out).map_err(|e| usage(e.to_string()))?;
    if old.is_stale() {
        note(&format!("fp8forge: note: {} was tuned for other kernels (stale hash); replacing it", out.display()));
        return Ok(t);
    }
    if old.device.id != t.device.id {
        return Err(usage(format!(
            "{}: a table for {}, not {}; choose another --out",
            out.display(),
            old.device.id,
            t.device.id
        )));
    }
    old.merge(t).map_err(|e| usage(e.to_string()))?;
    Ok(old)
}

fn save(out: &Path, t: &Table) -> Result<(), Failure> {
    fp8forge_formats::atomic::write_atomic(out, t.to_yaml().as_bytes())
        .map(|_| ())
        .map_err(|e| Failure { code: 1, message: e.to_string() })
}

#[derive(Serialize)]
struct MeasuredReport<'a> {
    seconds: f64,
    table: &'a Table,
    outcomes: &'a [Outcome],
}

fn measured(a: &AutotuneArgs, asked: Option<&'static GpuSpec>, problems: &[Problem]) -> Result<ExitCode, Failure> {
    let runtime = |message: String| Failure { message, code: 1 };
    let dev = Device::open(0).map_err(|e| {
        runtime(format!("{e}; measuring needs the GPU (use --simulate --gpu ID to predict a table without one)"))
    })?;
    let (spec, device) = identify_device(&dev).map_err(|e| runtime(e.to_string()))?;
    if let Some(g) = asked
        && g.id != spec.id
    {
        return Err(usage(format!(
            "--gpu {} but the GPU here is {} ({}); measure it, or --simulate --gpu {}",
            g.id, spec.id, dev.info.name, g.id
        )));
    }
    let mut t = Table::new(spec);
    t.device = device;
    let mut t = merge_into_existing(&a.out, t)?;
    let mut measure = GpuMeasure::new(&dev, BenchOptions::default()).map_err(|e| runtime(e.to_string()))?;
    let opts = TuneOptions { budget: a.budget, exhaustive: a.exhaustive, resume: a.resume, ..TuneOptions::default() };
    let bar = TuneBar::new(a.quiet || a.json);
    let start = Instant::now();
    let out = &a.out;
    let r = tune_all(spec, problems, &mut t, &mut measure, &opts, &bar, &mut |t| {
        save(out, t).map_err(|f| TuneError::Save(f.message))
    });
    bar.finish();
    let outcomes = r.map_err(|e| runtime(e.to_string()))?;
    let seconds = start.elapsed().as_secs_f64();
    if a.json {
        print_json(&MeasuredReport { seconds, table: &t, outcomes: &outcomes })?;
    } else {
        for o in outcomes.iter().filter(|o| !o.failures.is_empty()) {
            note(&format!(
                "fp8forge: warning: {}: {} candidate(s) failed; first: {} {}",
                o.problem,
                o.failures.len(),
                o.failures[0].0,
                o.failures[0].1
            ));
        }
        emit(&format!(
            "{} problems tuned on {} ({}) in {seconds:.0} s{} -> {}\n{}",
            outcomes.len(),
            t.device.name,
            spec.id,
            if a.exhaustive { ", exhaustive" } else { "" },
            esc_path(out),
            render_entries(&t)
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn render_entries(t: &Table) -> String {
    let mut s = String::new();
    for e in &t.entries {
        let timed = if e.candidates > 0 { format!("timed {}/{}", e.timed, e.candidates) } else { String::new() };
        s += &format!(
            "  {:>6}x{:<6} E={:<3} M={:<5} {:<34} {:>9.1} us {:>7.0} TFLOP/s  {:<9} {:<15} {}\n",
            e.n,
            e.k,
            e.experts,
            e.m,
            e.config,
            e.us,
            e.tflops,
            format!("{:?}", e.source).to_lowercase(),
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
