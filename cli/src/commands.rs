//! Argument parsing and the one library call behind each command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};
use fp8forge_quant::block::ScaleFormat;
use fp8forge_quant::convert::{self, ConvertError, ConvertReport, RunOptions};
use fp8forge_quant::plan::{ConvertOptions, OutputFormat};
use fp8forge_runtime::eval::{ActQuant, EvalOptions, Input, estimate, evaluate};
use serde::Serialize;

use crate::failure::Failure;
use crate::output::{Bar, StepBar, emit, esc, esc_path, human_bytes, parse_size, print_json};

/// Block-scaled FP8 for Mixture-of-Experts checkpoints on Hopper GPUs.
#[derive(Parser, Debug)]
#[command(name = "fp8forge", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Convert a BF16/F16/F32 checkpoint to block-scaled FP8 (E4M3, one f32 scale per 128×128 block).
    Convert(ConvertArgs),
    /// Convert an FP8 checkpoint back to BF16.
    Dequant {
        /// FP8 checkpoint directory.
        input: PathBuf,
        /// Output directory (must not exist or be empty, unless --force).
        output: PathBuf,
        /// Overwrite an existing output directory.
        #[arg(long)]
        force: bool,
        /// Print one JSON object on stdout.
        #[arg(long)]
        json: bool,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// List a checkpoint's tensors, dtypes, shapes, sizes and quantization state.
    Inspect {
        /// Checkpoint directory or .safetensors file.
        path: PathBuf,
        /// Print one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Check a converted checkpoint: manifest hashes, FP8 structure, and error against the original.
    Verify {
        /// Checkpoint directory.
        dir: PathBuf,
        /// The BF16 original, for a per-tensor error table.
        #[arg(long)]
        reference: Option<PathBuf>,
        /// Refuse (exit 2) a checkpoint that cannot run at this tensor parallelism (every rank's
        /// shard of an FP8 weight must be whole 128×128 blocks).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
        tp: Option<u32>,
        /// Print one JSON object on stdout.
        #[arg(long)]
        json: bool,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// The whole pipeline on the bundled tiny MoE: convert to FP8, evaluate against BF16 on held-out text, write the report.
    Demo(DemoArgs),
    /// Choose kernel tile shapes per GEMM shape and M for a GPU, into a YAML table: measured on the GPU here, or predicted by the cost model (--simulate).
    Autotune(crate::autotune::AutotuneArgs),
    /// Benchmarks on the GPU at hand: ours vs cuBLASLt.
    Bench {
        #[command(subcommand)]
        what: crate::bench::BenchWhat,
    },
    /// The GPU kernels: build them into the kernel cache (no GPU needed).
    Kernels {
        #[command(subcommand)]
        what: crate::kernels::KernelsWhat,
    },
    /// Evaluate a model on text: perplexity, and against a baseline KL divergence, top-1 and routing agreement.
    Eval(EvalArgs),
}

#[derive(clap::Args, Debug)]
struct EvalArgs {
    /// Model directory (BF16, F16, F32 or FP8).
    model: PathBuf,
    /// Text file, tokenized with the model's tokenizer.json.
    #[arg(long, conflicts_with = "tokens", required_unless_present = "tokens")]
    text: Option<PathBuf>,
    /// File of whitespace-separated token ids.
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// Window length in tokens (default: 512, or less when the model's max_position_embeddings is smaller).
    #[arg(long)]
    ctx: Option<usize>,
    /// Baseline model (usually the BF16 original) to compare with.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Quantize the inputs of FP8 layers per token in 1×128 groups (default: what the checkpoint says).
    #[arg(long, value_enum, default_value = "auto")]
    act_quant: ActQuantArg,
    /// Memory for resident weights (f32); a larger model is streamed one layer at a time (default: half the available memory).
    #[arg(long, value_parser = parse_size)]
    max_memory: Option<u64>,
    /// Always stream layers, whatever the memory.
    #[arg(long)]
    stream: bool,
    /// Write the HTML report here.
    #[arg(long, value_name = "FILE.html")]
    report: Option<PathBuf>,
    /// Say what the evaluation would cost (bytes to read, peak memory, time on this machine, from
    /// a short calibration) and stop.
    #[arg(long)]
    dry_run: bool,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// No progress bar and no summary.
    #[arg(long)]
    quiet: bool,
}

#[derive(clap::Args, Debug)]
struct DemoArgs {
    /// Output directory (an earlier demo's is reused).
    #[arg(long, default_value = "fp8forge-demo")]
    out: PathBuf,
    /// Evaluate on this text file, whole (default: the bundled held-out tinyshakespeare).
    #[arg(long, value_name = "FILE")]
    data: Option<PathBuf>,
    /// Window length in tokens.
    #[arg(long, default_value_t = 256)]
    ctx: usize,
    /// Evaluate only the first N held-out tokens.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ActQuantArg {
    Auto,
    None,
    Fp8,
}

#[derive(clap::Args, Debug)]
struct ConvertArgs {
    /// Input checkpoint directory (or one .safetensors file).
    input: PathBuf,
    /// Output directory.
    output: PathBuf,
    /// Output layout.
    #[arg(long, value_enum, default_value = "deepseek")]
    format: FormatArg,
    /// Scale format: plain f32, or power-of-two (ue8m0) values stored as f32.
    #[arg(long, value_enum, default_value = "f32")]
    scale_format: ScaleArg,
    /// Do not quantize tensors whose name matches this regex (repeatable).
    #[arg(long, value_name = "RE")]
    skip: Vec<String>,
    /// Quantize only 2-D tensors whose name matches this regex, replacing the default rules (repeatable).
    #[arg(long, value_name = "RE")]
    only: Vec<String>,
    /// Largest output shard (5GB, 500MB, 2GiB, ...).
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    max_shard_size: u64,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Refuse (exit 2), before writing anything, an output that cannot run at this tensor
    /// parallelism in vLLM and SGLang (every rank's shard of an FP8 weight must be whole blocks).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    tp: Option<u32>,
    /// Convert only job i of n (0 <= i < n) of a job array; finish with `convert --resume`.
    #[arg(long, value_name = "i/n", value_parser = parse_shard)]
    shard: Option<(usize, usize)>,
    /// Continue an interrupted conversion.
    #[arg(long)]
    resume: bool,
    /// Overwrite an existing output directory.
    #[arg(long)]
    force: bool,
    /// Print the plan and write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// No progress bar and no summary.
    #[arg(long)]
    quiet: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum FormatArg {
    Deepseek,
    CompressedTensors,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ScaleArg {
    F32,
    Ue8m0,
}

fn parse_shard(s: &str) -> Result<(usize, usize), String> {
    let bad = || format!("invalid --shard {s:?}: expected i/n with 0 <= i < n, e.g. 0/8");
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n): (usize, usize) = (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
    if n == 0 || i >= n { Err(bad()) } else { Ok((i, n)) }
}

/// Lets SIGINT and SIGTERM ask the run to stop at the next tensor (see [`Bar`]), so that it
/// removes its temporary files and keeps what it finished, instead of dying mid-write.
fn stop_on_signals() -> Result<(), Failure> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let failed = |e: std::io::Error| Failure { message: format!("cannot handle SIGINT/SIGTERM: {e}"), code: 1 };
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        // A second signal ends the program at once (the first one is still being honoured).
        signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, std::sync::Arc::clone(&asked))
            .map_err(failed)?;
        signal_hook::flag::register(sig, std::sync::Arc::clone(&asked)).map_err(failed)?;
        // SAFETY: the handler only stores the signal number in an atomic, which is
        // async-signal-safe.
        unsafe {
            signal_hook::low_level::register(sig, move || {
                crate::output::INTERRUPT.store(sig as usize, std::sync::atomic::Ordering::Relaxed)
            })
        }
        .map_err(failed)?;
    }
    Ok(())
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode, Failure> {
    match cli.command {
        Command::Convert(a) => run_convert(a),
        Command::Dequant { input, output, force, json, quiet } => {
            stop_on_signals()?;
            let bar = Bar::new(quiet || json, "dequant");
            let r = fp8forge_quant::dequant::dequant(&input, &output, force, &bar);
            bar.finish();
            let r = r?;
            if json {
                print_json(&r)?;
            } else if !quiet {
                emit(&format!("wrote {} ({} files, {})\n", esc_path(&output), r.files, human_bytes(r.bytes_out)))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect { path, json } => {
            let r = fp8forge_quant::inspect::inspect(&path)?;
            if json {
                print_json(&r)?;
            } else {
                emit(&crate::output::render_inspection(&r))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify { dir, reference, tp, json, quiet } => {
            let bar = Bar::new(quiet || json, "verify");
            let r = fp8forge_quant::verify::verify(&dir, reference.as_deref(), tp.map(|t| t as usize), &bar);
            bar.finish();
            let r = r?;
            if json {
                print_json(&r)?;
            } else {
                emit(&crate::output::render_verify(&r))?;
            }
            Ok(if r.ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Eval(a) => run_eval(a),
        Command::Demo(a) => run_demo(a),
        Command::Autotune(a) => crate::autotune::run(a),
        Command::Bench { what } => crate::bench::run(what),
        Command::Kernels { what } => crate::kernels::run(what),
    }
}

fn run_demo(a: DemoArgs) -> Result<ExitCode, Failure> {
    use crate::demo::{DemoOptions, run};
    let opts = DemoOptions { out: a.out, data: a.data, ctx: a.ctx, max_tokens: a.max_tokens };
    let bar = StepBar::new(a.quiet || a.json, "demo");
    let r = run(&opts, &bar);
    bar.finish();
    let r = r?;
    if a.json {
        print_json(&r)?;
        return Ok(ExitCode::SUCCESS);
    }
    let (q, w) = (&r.w8a8, &r.weight_only);
    let Some(b) = &q.baseline else { return Ok(ExitCode::SUCCESS) };
    let pct = |x: f64| 100.0 * (x / b.baseline_perplexity - 1.0);
    let mut out =
        format!("bundled tiny MoE ({}), {} tokens of {}, windows of {}\n", q.model_type, q.tokens, esc(&r.data), q.ctx);
    out += &format!(
        "  BF16                 perplexity {:.4} ± {:.4}\n",
        b.baseline_perplexity, b.baseline_perplexity_stderr
    );
    out += &format!("  FP8 weight-only      perplexity {:.4} ({:+.3}%)\n", w.perplexity, pct(w.perplexity));
    out += &format!("  FP8 W8A8 (as served) perplexity {:.4} ({:+.3}%)\n", q.perplexity, pct(q.perplexity));
    out += &format!(
        "  W8A8 vs BF16: KL divergence mean {:.2e} (p99 {:.2e}), top-1 agreement {:.2}%, routing agreement {:.2}%\n",
        b.kld_mean,
        b.kld_p99,
        100.0 * b.top1_agreement,
        100.0 * b.routing_agreement
    );
    out += &format!(
        "  W8A8 vs BF16, as llama.cpp reports it: ln(PPL(Q)/PPL(base)) {:+.5} ± {:.5}, RMS Δp {:.3}%, \
         KLD 99.9% {:.2e}, top-5 agreement {:.2}%\n",
        b.ln_ppl_ratio,
        b.ln_ppl_ratio_stderr,
        100.0 * b.delta_p_rms,
        b.kld_percentiles.p99_9,
        100.0 * b.top5_agreement
    );
    out += &format!("checkpoints: {} -> {}\n", esc_path(&r.bf16), esc_path(&r.fp8));
    out += &format!("report: {}\n", esc_path(&r.report));
    emit(&out)?;
    Ok(ExitCode::SUCCESS)
}

fn run_eval(a: EvalArgs) -> Result<ExitCode, Failure> {
    let input = match (a.text, a.tokens) {
        (Some(t), _) => Input::Text(t),
        (None, Some(t)) => Input::Tokens(t),
        (None, None) => return Err(Failure { message: "give --text FILE or --tokens FILE".into(), code: 2 }),
    };
    let opts = EvalOptions {
        ctx: a.ctx,
        act_quant: match a.act_quant {
            ActQuantArg::Auto => ActQuant::Auto,
            ActQuantArg::None => ActQuant::None,
            ActQuantArg::Fp8 => ActQuant::Fp8,
        },
        max_memory: a.max_memory,
        stream: a.stream.then_some(true),
    };
    if a.dry_run {
        let e = estimate(&a.model, a.baseline.as_deref(), &input, &opts)?;
        if a.json {
            print_json(&e)?;
        } else if !a.quiet {
            emit(&crate::output::render_estimate(&e))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(path) = &a.report {
        check_report_path(path)?;
    }
    let bar = StepBar::new(a.quiet || a.json, "eval");
    let r = evaluate(&a.model, a.baseline.as_deref(), &input, &opts, &bar);
    bar.finish();
    let r = r?;
    if let Some(path) = &a.report {
        write_report(path, &r)?;
    }
    if a.json {
        print_json(&r)?;
    } else if !a.quiet {
        let mut out = crate::output::render_eval(&r);
        if let Some(path) = &a.report {
            out += &format!("report: {}\n", esc_path(path));
        }
        emit(&out)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Refuses, before an evaluation that may take hours, a report path that cannot be written:
/// its directory must exist, and the path must not be a directory.
fn check_report_path(path: &std::path::Path) -> Result<(), Failure> {
    let bad = |reason: &str| Failure { message: format!("{}: {reason}", esc_path(path)), code: 2 };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    if !dir.is_dir() {
        return Err(bad(&format!("cannot write the report: directory {} does not exist", esc_path(dir))));
    }
    if path.is_dir() {
        return Err(bad("cannot write the report: is a directory"));
    }
    Ok(())
}

/// Writes the HTML report atomically.
fn write_report(path: &std::path::Path, r: &fp8forge_runtime::metrics::EvalResult) -> Result<(), Failure> {
    let html = fp8forge_runtime::report::render_html(r);
    fp8forge_formats::atomic::write_atomic(path, html.as_bytes())
        .map(|_| ())
        .map_err(|e| Failure { code: 1, message: e.to_string() })
}

#[derive(Serialize)]
struct Timed<'a, T: Serialize> {
    #[serde(flatten)]
    report: &'a T,
    seconds: f64,
}

fn run_convert(a: ConvertArgs) -> Result<ExitCode, Failure> {
    if let Some(t) = a.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t.max(1))
            .build_global()
            .map_err(|e| Failure { message: format!("cannot start {t} threads: {e}"), code: 1 })?;
    }
    let opts = ConvertOptions {
        format: match a.format {
            FormatArg::Deepseek => OutputFormat::Deepseek,
            FormatArg::CompressedTensors => OutputFormat::CompressedTensors,
        },
        scale_format: match a.scale_format {
            ScaleArg::F32 => ScaleFormat::F32,
            ScaleArg::Ue8m0 => ScaleFormat::Ue8m0,
        },
        skip: a.skip,
        only: a.only,
        max_shard_size: a.max_shard_size,
    };
    if a.dry_run {
        let plan = convert::plan(&a.input, &opts, a.tp.map(|t| t as usize))?;
        for w in &plan.warnings {
            crate::output::note(&format!("fp8forge: warning: {w}"));
        }
        for w in &plan.widened {
            crate::output::note(&format!("fp8forge: {w}"));
        }
        if a.json {
            #[derive(Serialize)]
            struct DryRun<'a> {
                plan_digest: String,
                summary: fp8forge_quant::plan::PlanSummary,
                plan: &'a fp8forge_quant::plan::Plan,
            }
            let plan_digest = plan.digest().map_err(ConvertError::from)?;
            print_json(&DryRun { plan_digest, summary: plan.summary(), plan: &plan })?;
        } else {
            emit(&crate::output::render_plan(&plan).map_err(ConvertError::from)?)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    stop_on_signals()?;
    let run = RunOptions { resume: a.resume, force: a.force, shard: a.shard, tp: a.tp.map(|t| t as usize) };
    let bar = Bar::new(a.quiet || a.json, "convert");
    let start = Instant::now();
    let r = convert::convert(&a.input, &a.output, &opts, &run, &bar);
    bar.finish();
    let r = r?;
    let seconds = start.elapsed().as_secs_f64();
    if a.json {
        print_json(&Timed { report: &r, seconds })?;
    } else if !a.quiet {
        emit(&render_convert(&r, seconds))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn render_convert(r: &ConvertReport, seconds: f64) -> String {
    if r.already_complete {
        return format!(
            "{} already holds this conversion, finished (plan {}): nothing to do\n",
            esc_path(&r.output),
            &r.plan_digest[..r.plan_digest.len().min(12)]
        );
    }
    let s = &r.summary;
    let mut out = format!(
        "{} tensors: {} quantized to FP8, {} kept; {} -> {} in {} files\n",
        s.tensors,
        s.quantized,
        s.copied,
        human_bytes(s.bytes_in),
        human_bytes(s.bytes_out),
        s.files
    );
    out += &format!("this run wrote {} files ({} already done) in {seconds:.1} s\n", r.files_written, r.files_resumed);
    if let Some(w) = r.tensors.iter().max_by(|a, b| a.rel_rms.total_cmp(&b.rel_rms)) {
        out += &format!("largest relative RMS error: {:.4} ({})\n", w.rel_rms, esc(&w.name));
    }
    if r.complete {
        out += &format!("done: {} (check with `fp8forge verify`)\n", esc_path(&r.output));
    } else {
        out += "this job's share is done; when every job has finished, run the same command without --shard and with --resume to write the index and manifest\n";
    }
    out
}
