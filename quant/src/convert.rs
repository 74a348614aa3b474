//! Executing a conversion plan: streaming, resumable, shardable over a job array.
//!
//! The output directory is an [`OutputDir`]: locked before anything in it is looked at, with a
//! journal of the plan digest and of every input file's size and modification time, each output
//! file written whole in its staging folder and marked complete, and a commit that moves the
//! finished checkpoint into OUT only once every file (config, index and manifest included) is
//! complete. Any later run of the same plan on unchanged input continues where an earlier one
//! stopped (writing only the files without a marker), and a run on a finished output changes
//! nothing. Since every file is a deterministic function of the plan and the input, a resumed
//! run's output is byte-identical to an uninterrupted one.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use fp8forge_formats::checkpoint::{INDEX_NAME, pretty_json};
use fp8forge_formats::outdir::{Identity, Opened, OutputDir, Role, check_apart};
use fp8forge_formats::pipeline::{Piece, Producer, write_shard};
use fp8forge_formats::{Checkpoint, Dtype, FormatError, PlannedTensor, WrittenFile, qconfig};
use serde::Serialize;
use serde_json::Value;

use crate::block::{QuantError, SrcDtype, quantize_weight_into};
use crate::plan::{Action, ConvertOptions, Item, OutFile, OutputFormat, Plan, PlanError, PlanSummary, make_plan};
use crate::stats::ErrorStats;
use crate::tp::{TpError, check_tp};

pub use fp8forge_formats::outdir::STATE_DIR;

/// How this run goes about it.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Continue an interrupted conversion of the same input and options.
    pub resume: bool,
    /// Overwrite an existing output.
    pub force: bool,
    /// Only job `i` of `n` (0-based `i`): write the files of that share of the input shards.
    pub shard: Option<(usize, usize)>,
    /// Refuse, before writing anything, a checkpoint that cannot run at this tensor parallelism.
    pub tp: Option<usize>,
}

/// Receives progress while files are written. Implementations must be cheap.
pub trait Progress: Sync {
    /// Work is starting: this many input bytes in this many tensors are to be processed.
    fn begin(&self, _bytes: u64, _tensors: usize) {}
    /// One input tensor is done.
    fn tensor_done(&self, _name: &str, _bytes: u64) {}
    /// Something the user should know before the run goes on (a widened group, an assumption).
    fn notice(&self, _line: &str) {}
    /// True once the run should stop (the user interrupted it): checked between tensors; the
    /// run then removes its temporary files and returns [`ConvertError::Interrupted`].
    fn cancelled(&self) -> bool {
        false
    }
}

/// A [`Progress`] that ignores everything.
pub struct NoProgress;
impl Progress for NoProgress {}

/// The quantization error of one tensor.
#[derive(Clone, Debug, Serialize)]
pub struct TensorReport {
    /// Tensor name.
    pub name: String,
    /// Shape [N, K].
    pub shape: [usize; 2],
    /// Relative RMS error of the dequantized weight.
    pub rel_rms: f64,
    /// Largest absolute error.
    pub max_abs_err: f64,
    /// Signal-to-noise ratio in dB (`null` when the error is zero).
    pub snr_db: Option<f64>,
}

impl TensorReport {
    /// Builds the report of `name` from its statistics.
    pub fn new(name: &str, shape: [usize; 2], s: &ErrorStats) -> Self {
        TensorReport {
            name: name.to_owned(),
            shape,
            rel_rms: s.rel_rms(),
            max_abs_err: s.max_abs(),
            snr_db: s.snr_db(),
        }
    }
}

/// What a run did.
#[derive(Clone, Debug, Serialize)]
pub struct ConvertReport {
    /// Output directory.
    pub output: PathBuf,
    /// Digest of the plan (equal digests, identical output).
    pub plan_digest: String,
    /// Plan totals.
    pub summary: PlanSummary,
    /// Output files this run wrote.
    pub files_written: usize,
    /// Output files found complete from an earlier run and kept.
    pub files_resumed: usize,
    /// True when the index, config and manifest were written (the output is complete).
    pub complete: bool,
    /// True when OUT already held this finished output: nothing was written.
    pub already_complete: bool,
    /// Per-tensor quantization error of the tensors this run quantized.
    pub tensors: Vec<TensorReport>,
    /// Groups the engines load as one that `--skip`/`--only` split, widened to the whole group.
    pub widened: Vec<crate::plan::Widened>,
    /// What the plan assumed, for the user to see.
    pub warnings: Vec<String>,
}

/// Why a conversion failed.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// Reading the input or writing the output failed.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The plan cannot be made.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// A weight cannot be quantized (NaN or Inf in it).
    #[error("{path}: tensor {tensor}: {source}")]
    Quant {
        /// The input shard.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// What is wrong.
        #[source]
        source: QuantError,
    },
    /// A tensor that is copied unchanged holds a NaN or an infinity (the first one).
    #[error("{path}: tensor {tensor}: non-finite value {value} at {index:?}")]
    NonFinite {
        /// The input shard.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Position of the value in the tensor.
        index: Vec<usize>,
        /// The value, widened to f64.
        value: f64,
    },
    /// The output directory cannot be used as asked.
    #[error("{path}: {reason}")]
    Output {
        /// The output directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The checkpoint cannot run at the tensor parallelism asked for.
    #[error("{path}: {source}")]
    Tp {
        /// The input checkpoint.
        path: PathBuf,
        /// Which weight, and why.
        #[source]
        source: Box<TpError>,
    },
    /// Starting over was asked of one job of an array: it would delete the other jobs' files.
    #[error("{path}: a job of an array cannot start the output over (it would delete the other jobs' files)")]
    ForceInJob {
        /// The output directory.
        path: PathBuf,
    },
    /// The run was interrupted (SIGINT, SIGTERM) and stopped cleanly: its temporary files are
    /// removed, the files it finished are kept for the next run.
    #[error("interrupted; finished files are kept: run the same command again to continue")]
    Interrupted,
}

impl ConvertError {
    /// True when the input or the request is at fault (exit code 2), false for system failures.
    pub fn is_bad_input(&self) -> bool {
        match self {
            ConvertError::Format(e) => e.is_bad_input(),
            ConvertError::Interrupted | ConvertError::Plan(PlanError::Digest(_)) => false,
            _ => true,
        }
    }
}

/// Plans the conversion of `input` without writing anything, checking it can run at tensor
/// parallelism `tp` when given.
pub fn plan(input: &Path, opts: &ConvertOptions, tp: Option<usize>) -> Result<Plan, ConvertError> {
    let ckpt = Checkpoint::open(input)?;
    let plan = make_plan(&ckpt, opts)?;
    if let Some(tp) = tp {
        check_plan_tp(&plan, &ckpt, tp)?;
    }
    Ok(plan)
}

/// Checks that the weights `plan` quantizes can run at tensor parallelism `tp`.
fn check_plan_tp(plan: &Plan, ckpt: &Checkpoint, tp: usize) -> Result<(), ConvertError> {
    let weights: Vec<(String, Vec<usize>)> = plan
        .files
        .iter()
        .flat_map(|f| &f.items)
        .filter_map(|i| match i.action {
            Action::Quantize { rows, cols } => Some((i.source.clone(), vec![rows, cols])),
            Action::Copy { .. } => None,
        })
        .collect();
    check_tp(&weights, ckpt.config.as_ref(), tp)
        .map_err(|source| ConvertError::Tp { path: ckpt.root.clone(), source: Box::new(source) })
}

/// Converts `input` into `out` (all of it, or job `i/n`'s share with `run.shard`).
///
/// Refuses an `out` that is, or lies inside, the input directory; continues an unfinished output
/// of the same plan and unchanged input; does nothing on a finished one.
pub fn convert(
    input: &Path,
    out: &Path,
    opts: &ConvertOptions,
    run: &RunOptions,
    progress: &dyn Progress,
) -> Result<ConvertReport, ConvertError> {
    let ckpt = Checkpoint::open(input)?;
    let plan = make_plan(&ckpt, opts)?;
    if let Some(tp) = run.tp {
        check_plan_tp(&plan, &ckpt, tp)?;
    }
    for w in &plan.warnings {
        progress.notice(&format!("warning: {w}"));
    }
    for w in &plan.widened {
        progress.notice(&w.to_string());
    }
    let digest = plan.digest()?;
    let inputs = input_files(&ckpt, &plan, input.is_dir());
    let paths: Vec<PathBuf> = inputs.iter().map(|f| ckpt.root.join(f)).collect();
    check_apart(&ckpt.root, &paths, out)?;
    let role = match run.shard {
        Some(_) if run.force => return Err(ConvertError::ForceInJob { path: out.to_owned() }),
        Some((index, count)) => Role::Job { index, count },
        None => Role::Whole { force: run.force },
    };
    let identity = Identity::stamp(digest.clone(), &ckpt.root, &inputs)?;
    let mine: Vec<usize> = match run.shard {
        Some((i, n)) => plan.files_of_job(i, n),
        None => (0..plan.files.len()).collect(),
    };
    let report = |written: usize, already_complete: bool, tensors: Vec<TensorReport>| ConvertReport {
        output: out.to_owned(),
        plan_digest: digest.clone(),
        summary: plan.summary(),
        files_written: written,
        files_resumed: mine.len() - written,
        complete: run.shard.is_none() || already_complete,
        already_complete,
        tensors,
        widened: plan.widened.clone(),
        warnings: plan.warnings.clone(),
    };
    let dir = match OutputDir::open(out, identity, role, &plan.copies)? {
        Opened::Complete => return Ok(report(0, true, vec![])),
        Opened::Writing(dir) => dir,
    };

    let todo: Vec<usize> = mine.iter().copied().filter(|&f| dir.done(&plan.files[f].name).is_none()).collect();
    let bytes: u64 = todo.iter().flat_map(|&f| &plan.files[f].items).map(|i| i.bytes_in).sum();
    let tensors: usize = todo.iter().map(|&f| plan.files[f].items.len()).sum();
    progress.begin(bytes, tensors);

    let mut reports = Vec::new();
    for &f in &todo {
        let file = &plan.files[f];
        let written = write_file(&ckpt, file, &dir.staging(&file.name), opts, progress, &mut reports)?;
        dir.mark_done(&file.name, &written)?;
    }

    if run.shard.is_none() {
        let files = finalize(&ckpt, &plan, &dir)?;
        let now = Identity::stamp(digest.clone(), &ckpt.root, &inputs)?;
        dir.commit(&files, &now)?;
    }
    Ok(report(todo.len(), false, reports))
}

/// Every input file the conversion reads, relative to the input directory: the shards, then
/// config.json and the index when present, then the files carried over.
fn input_files(ckpt: &Checkpoint, plan: &Plan, is_dir: bool) -> Vec<String> {
    let mut files: Vec<String> = ckpt.shards.iter().map(|s| s.name.clone()).collect();
    if ckpt.config.is_some() {
        files.push("config.json".into());
    }
    if is_dir && ckpt.root.join(INDEX_NAME).is_file() {
        files.push(INDEX_NAME.into());
    }
    files.extend(plan.copies.iter().cloned());
    files
}

fn src_dtype(d: Dtype) -> Option<SrcDtype> {
    match d {
        Dtype::BF16 => Some(SrcDtype::BF16),
        Dtype::F16 => Some(SrcDtype::F16),
        Dtype::F32 => Some(SrcDtype::F32),
        _ => None,
    }
}

/// Output bytes allowed in flight between the quantizer and the writer thread. A tensor larger
/// than this goes through alone, so peak memory stays near one input tensor plus its output
/// (the bound of `bench/convert.sh`), while small tensors overlap quantization with writing.
const IN_FLIGHT_BYTES: u64 = 256 << 20;

/// Writes one output file: the calling thread quantizes (in parallel, with rayon) tensor after
/// tensor while the shard writer's thread hashes and writes the previous ones.
fn write_file(
    ckpt: &Checkpoint,
    file: &OutFile,
    path: &Path,
    opts: &ConvertOptions,
    progress: &dyn Progress,
    reports: &mut Vec<TensorReport>,
) -> Result<WrittenFile, ConvertError> {
    write_shard(path, file.tensors(), IN_FLIGHT_BYTES, |out| {
        for item in &file.items {
            if progress.cancelled() {
                return Err(ConvertError::Interrupted);
            }
            if !out.send(produce(ckpt, item, opts, out, reports, progress)?) {
                // The writer stopped on an error; it reports it.
                return Ok(());
            }
        }
        Ok(())
    })
}

/// The output tensors of one input tensor: its bytes (checked finite) when copied, its codes and
/// scales when quantized.
fn produce<'a>(
    ckpt: &'a Checkpoint,
    item: &Item,
    opts: &ConvertOptions,
    out: &Producer<'_, 'a>,
    reports: &mut Vec<TensorReport>,
    progress: &'a dyn Progress,
) -> Result<Piece<'a>, ConvertError> {
    let shard = &ckpt.shards[item.shard].file;
    let missing = || FormatError::BadTensor {
        path: shard.path().to_owned(),
        tensor: item.source.clone(),
        reason: "vanished from the file since planning".into(),
    };
    let info = shard.header().get(&item.source).ok_or_else(missing)?;
    let data = shard.data(info);
    let (source, bytes_in) = (item.source.clone(), item.bytes_in);
    match &item.action {
        Action::Copy { .. } => {
            if let Some((at, value)) = crate::finite::first_non_finite(data, info.dtype) {
                return Err(ConvertError::NonFinite {
                    path: shard.path().to_owned(),
                    tensor: item.source.clone(),
                    index: crate::finite::unravel(at, &info.shape),
                    value,
                });
            }
            let done = move || {
                shard.release(info);
                progress.tensor_done(&source, bytes_in);
            };
            Ok(Piece { tensors: vec![Cow::Borrowed(data)], reserved: 0, done: Box::new(done) })
        }
        Action::Quantize { rows, cols } => {
            let (rows, cols) = (*rows, *cols);
            let dtype = src_dtype(info.dtype).ok_or_else(missing)?;
            let reserved = item.outputs.iter().map(PlannedTensor::nbytes).sum();
            out.reserve(reserved);
            let mut codes = out.buffer(rows * cols);
            let mut scales = vec![0f32; rows.div_ceil(128) * cols.div_ceil(128)];
            let stats =
                quantize_weight_into(data, dtype, rows, cols, opts.scale_format, &mut codes, &mut scales).map_err(
                    |source| ConvertError::Quant { path: shard.path().to_owned(), tensor: item.source.clone(), source },
                )?;
            shard.release(info);
            reports.push(TensorReport::new(&item.source, [rows, cols], &stats));
            let scale_bytes: Vec<u8> = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
            let done = move || progress.tensor_done(&source, bytes_in);
            Ok(Piece { tensors: vec![Cow::Owned(codes), Cow::Owned(scale_bytes)], reserved, done: Box::new(done) })
        }
    }
}

/// Writes config.json (with its quantization_config), the carried-over files and the index into
/// the staging folder, beside the finished shards, and returns the names of all the output's
/// files for the commit. Idempotent: run again, it writes the same bytes.
fn finalize(ckpt: &Checkpoint, plan: &Plan, dir: &OutputDir) -> Result<Vec<String>, ConvertError> {
    let mut names: Vec<String> = plan.files.iter().map(|f| f.name.clone()).collect();
    if let Some(config) = &ckpt.config {
        let mut config = config.clone();
        let qc = quantization_config(plan);
        if let Value::Object(m) = &mut config {
            m.insert("quantization_config".into(), qc);
        }
        dir.write_file("config.json", &pretty_json(&config, &dir.staging("config.json"))?)?;
        names.push("config.json".into());
    }
    for name in &plan.copies {
        dir.copy_file(&ckpt.root.join(name), name)?;
        names.push(name.clone());
    }
    if plan.files.len() > 1 {
        dir.write_index(&plan.files.iter().map(|f| (f.name.clone(), f.tensors())).collect::<Vec<_>>())?;
        names.push(INDEX_NAME.into());
    }
    Ok(names)
}

/// The quantization_config recorded in config.json for this plan.
fn quantization_config(plan: &Plan) -> Value {
    let kept = plan.kept_modules();
    let ue8m0 = plan.options.scale_format == crate::block::ScaleFormat::Ue8m0;
    match plan.options.format {
        OutputFormat::Deepseek => qconfig::deepseek_fp8(ue8m0, &kept),
        OutputFormat::CompressedTensors => qconfig::compressed_tensors_fp8_block(&compressed_tensors_ignore(&kept)),
    }
}

/// compressed-tensors' `ignore` for the kept modules: their exact names (each expert's own
/// projections among them), and for a kept MoE layer (`<layer>.experts`) the names vLLM looks the
/// fused layer up by, `<layer>.experts.0.gate_proj`, `up_proj` and `down_proj`, whatever the
/// checkpoint calls its experts' projections (Mixtral's `w1`/`w2`/`w3`), instead of the fused
/// module's own name, which no engine matches.
fn compressed_tensors_ignore(kept: &[String]) -> Vec<String> {
    let mut ignore: Vec<String> = Vec::with_capacity(kept.len());
    for m in kept {
        if m.ends_with(".experts") {
            ignore.extend(["gate_proj", "up_proj", "down_proj"].map(|p| format!("{m}.0.{p}")));
        } else {
            ignore.push(m.clone());
        }
    }
    ignore.sort();
    ignore.dedup();
    ignore
}
