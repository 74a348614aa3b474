//! Executing a conversion plan: streaming, resumable, shardable over a job array.
//!
//! Output files are written whole under temporary names inside the state directory
//! `OUT/.fp8forge/files/`, fsynced and renamed when complete; each finished file leaves a marker
//! in `OUT/.fp8forge/done/`. Nothing appears under a final name in OUT until every file is done,
//! so a run stopped by bad input halfway (a NaN in the tenth shard) leaves no partial checkpoint
//! that a loader could pick up. A resumed run recomputes the plan, checks that its digest is the
//! one recorded in `OUT/.fp8forge/plan.sha256`, and writes only the files without a marker.
//! Since every file is a deterministic function of the plan and the input, a resumed run's
//! output is byte-identical to an uninterrupted one. The last step moves the files into OUT,
//! writes config, carried-over files, index and `SHA256SUMS` (last), and removes the state
//! directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, PoisonError, mpsc};

use fp8forge_formats::atomic::{copy_atomic, is_partial_name, write_atomic};
use fp8forge_formats::lock::DirLock;
use fp8forge_formats::manifest::{MANIFEST_NAME, write_manifest};
use fp8forge_formats::{Checkpoint, Dtype, FormatError, PlannedTensor, ShardWriter, WrittenFile, qconfig};
use serde::Serialize;
use serde_json::Value;

use crate::block::{QuantError, SrcDtype, quantize_weight_into};
use crate::plan::{Action, ConvertOptions, OutFile, OutputFormat, Plan, PlanError, PlanSummary, make_plan};
use crate::stats::ErrorStats;

/// Name of the state directory inside OUT while a conversion is unfinished.
pub const STATE_DIR: &str = ".fp8forge";

/// How this run goes about it.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Continue an interrupted conversion of the same input and options.
    pub resume: bool,
    /// Overwrite an existing output.
    pub force: bool,
    /// Only job `i` of `n` (0-based `i`): write the files of that share of the input shards.
    pub shard: Option<(usize, usize)>,
}

/// Receives progress while files are written. Implementations must be cheap.
pub trait Progress: Sync {
    /// Work is starting: this many input bytes in this many tensors are to be processed.
    fn begin(&self, _bytes: u64, _tensors: usize) {}
    /// One input tensor is done.
    fn tensor_done(&self, _name: &str, _bytes: u64) {}
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
    /// Per-tensor quantization error of the tensors this run quantized.
    pub tensors: Vec<TensorReport>,
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
    /// The output directory cannot be used as asked.
    #[error("{path}: {reason}")]
    Output {
        /// The output directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl ConvertError {
    /// True when the input or the request is at fault (exit code 2), false for system failures.
    pub fn is_bad_input(&self) -> bool {
        match self {
            ConvertError::Format(e) => e.is_bad_input(),
            _ => true,
        }
    }
}

/// Plans the conversion of `input` without writing anything.
pub fn plan(input: &Path, opts: &ConvertOptions) -> Result<Plan, ConvertError> {
    let ckpt = Checkpoint::open(input)?;
    Ok(make_plan(&ckpt, opts)?)
}

/// Converts `input` into `out` (all of it, or job `i/n`'s share with `run.shard`).
pub fn convert(
    input: &Path,
    out: &Path,
    opts: &ConvertOptions,
    run: &RunOptions,
    progress: &dyn Progress,
) -> Result<ConvertReport, ConvertError> {
    let ckpt = Checkpoint::open(input)?;
    let plan = make_plan(&ckpt, opts)?;
    let digest = plan.digest();
    let _locks = prepare_output(out, &plan, &digest, run)?;
    let state = out.join(STATE_DIR);
    let done_dir = state.join("done");
    let staging = state.join("files");
    for d in [&done_dir, &staging] {
        std::fs::create_dir_all(d).map_err(FormatError::io(d, "create"))?;
    }

    let mine: Vec<usize> = match run.shard {
        Some((i, n)) => plan.files_of_job(i, n),
        None => (0..plan.files.len()).collect(),
    };
    let todo: Vec<usize> = mine.iter().copied().filter(|&f| read_marker(out, &plan.files[f].name).is_none()).collect();
    let bytes: u64 = todo.iter().flat_map(|&f| &plan.files[f].items).map(|i| i.bytes_in).sum();
    let tensors: usize = todo.iter().map(|&f| plan.files[f].items.len()).sum();
    progress.begin(bytes, tensors);

    let mut reports = Vec::new();
    for &f in &todo {
        let file = &plan.files[f];
        let written = write_file(&ckpt, file, &staging.join(&file.name), opts, progress, &mut reports)?;
        write_atomic(&done_dir.join(&file.name), format!("{} {}\n", written.sha256, written.bytes).as_bytes())?;
    }

    let complete = run.shard.is_none();
    if complete {
        finalize(&ckpt, &plan, out)?;
        std::fs::remove_dir_all(&state).map_err(FormatError::io(&state, "remove"))?;
    }
    Ok(ConvertReport {
        output: out.to_owned(),
        plan_digest: digest,
        summary: plan.summary(),
        files_written: todo.len(),
        files_resumed: mine.len() - todo.len(),
        complete,
        tensors: reports,
    })
}

/// Checks that OUT may be written by this run, cleans it under `--force`, records the plan
/// digest and takes the locks. Returns the held locks.
fn prepare_output(out: &Path, plan: &Plan, digest: &str, run: &RunOptions) -> Result<Vec<DirLock>, ConvertError> {
    let err = |reason: String| ConvertError::Output { path: out.to_owned(), reason };
    let state = out.join(STATE_DIR);
    let digest_path = state.join("plan.sha256");
    if out.exists() && !out.is_dir() {
        return Err(err("exists and is not a directory".into()));
    }
    let nonempty = out.is_dir() && std::fs::read_dir(out).map_err(FormatError::io(out, "read_dir"))?.next().is_some();
    let prior = std::fs::read_to_string(&digest_path).ok().map(|s| s.trim().to_owned());
    if nonempty && run.force && run.shard.is_none() {
        clean_output(out, plan)?;
    } else if nonempty {
        match prior.as_deref() {
            Some(d) if d != digest => {
                return Err(err(format!(
                    "holds an unfinished conversion of other input or options (plan {} here, {} now); use --force to start over",
                    &d[..d.len().min(12)],
                    &digest[..12]
                )));
            }
            Some(_) if run.resume || run.shard.is_some() => {}
            Some(_) => {
                return Err(err(
                    "holds an unfinished conversion: add --resume to finish it, or --force to start over".into()
                ));
            }
            None if out.join(MANIFEST_NAME).exists() => {
                return Err(err(
                    "already holds a finished checkpoint (SHA256SUMS present); use --force to overwrite it".into(),
                ));
            }
            // A sibling job of a sharded run has created the state directory but not yet
            // recorded the plan: the digest is checked again under the lock below.
            None if run.shard.is_some() && only_state_dir(out)? => {}
            None => return Err(err("exists and is not empty; use --force to overwrite".into())),
        }
    }
    std::fs::create_dir_all(&state).map_err(FormatError::io(&state, "create"))?;
    let mut locks = Vec::new();
    match run.shard {
        None => locks.push(DirLock::acquire(&state.join("lock"))?),
        Some((i, n)) => {
            locks.push(DirLock::acquire_shared(&state.join("lock"))?);
            locks.push(DirLock::acquire(&state.join(format!("lock-{}-of-{n}", i + 1)))?);
        }
    }
    // Under the lock: the digest on disk (if a concurrent job wrote one) must still be ours.
    match std::fs::read_to_string(&digest_path).ok().map(|s| s.trim().to_owned()) {
        Some(d) if d != digest => {
            return Err(err("another conversion with other input or options started here".into()));
        }
        Some(_) => {}
        None => {
            write_atomic(&digest_path, format!("{digest}\n").as_bytes())?;
        }
    }
    if run.shard.is_none() {
        remove_partials(out)?;
        remove_partials(&state.join("files"))?;
    }
    Ok(locks)
}

/// True when the only entry of `out` is the state directory.
fn only_state_dir(out: &Path) -> Result<bool, ConvertError> {
    let mut entries = std::fs::read_dir(out).map_err(FormatError::io(out, "read_dir"))?;
    Ok(entries.all(|e| e.is_ok_and(|e| e.file_name() == STATE_DIR)))
}

/// Removes what a conversion writes (and stale temporary files) from OUT; leaves other files.
fn clean_output(out: &Path, plan: &Plan) -> Result<(), ConvertError> {
    let state = out.join(STATE_DIR);
    if state.exists() {
        std::fs::remove_dir_all(&state).map_err(FormatError::io(&state, "remove"))?;
    }
    for e in std::fs::read_dir(out).map_err(FormatError::io(out, "read_dir"))? {
        let e = e.map_err(FormatError::io(out, "read_dir"))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = name.ends_with(".safetensors")
            || name.ends_with(".safetensors.index.json")
            || name == MANIFEST_NAME
            || name == "config.json"
            || is_partial_name(&name)
            || plan.copies.contains(&name);
        if ours && e.path().is_file() {
            std::fs::remove_file(e.path()).map_err(FormatError::io(e.path(), "remove"))?;
        }
    }
    Ok(())
}

fn remove_partials(out: &Path) -> Result<(), ConvertError> {
    if !out.is_dir() {
        return Ok(());
    }
    for e in std::fs::read_dir(out).map_err(FormatError::io(out, "read_dir"))? {
        let e = e.map_err(FormatError::io(out, "read_dir"))?;
        if is_partial_name(&e.file_name().to_string_lossy()) {
            std::fs::remove_file(e.path()).map_err(FormatError::io(e.path(), "remove"))?;
        }
    }
    Ok(())
}

/// The (sha256, size) recorded for a finished output file, if its marker exists and the file is
/// there with that size, in the staging directory or already moved into OUT.
fn read_marker(out: &Path, name: &str) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(out.join(STATE_DIR).join("done").join(name)).ok()?;
    let (h, n) = text.trim().split_once(' ')?;
    let n: u64 = n.parse().ok()?;
    let size = |p: PathBuf| std::fs::metadata(p).ok().map(|m| m.len());
    let staged = out.join(STATE_DIR).join("files").join(name);
    (size(staged) == Some(n) || size(out.join(name)) == Some(n)).then(|| (h.to_owned(), n))
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

/// A counter of output bytes in flight, waited on by the producer.
struct Budget {
    /// Bytes in flight, and whether the writer has stopped (then nothing waits any more).
    used: Mutex<(u64, bool)>,
    freed: Condvar,
    /// A codes buffer the writer is done with, kept for the next tensor: reusing it saves
    /// faulting in and zeroing fresh pages for every tensor.
    spare: Mutex<Option<Vec<u8>>>,
}

impl Budget {
    /// Waits until `bytes` fit in the budget (or nothing is in flight), then takes them.
    fn take(&self, bytes: u64) {
        let mut used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        while !used.1 && used.0 > 0 && used.0 + bytes > IN_FLIGHT_BYTES {
            used = self.freed.wait(used).unwrap_or_else(PoisonError::into_inner);
        }
        used.0 += bytes;
    }

    /// Gives `bytes` back.
    fn give(&self, bytes: u64) {
        let mut used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        used.0 = used.0.saturating_sub(bytes);
        self.freed.notify_all();
    }

    /// A buffer of `len` bytes for codes: the spare one if there is one (its old bytes are
    /// left: the quantizer overwrites every code), else a new one.
    fn buffer(&self, len: usize) -> Vec<u8> {
        match self.spare.lock().unwrap_or_else(PoisonError::into_inner).take() {
            Some(mut buf) => {
                buf.resize(len, 0);
                buf
            }
            None => vec![0u8; len],
        }
    }

    /// Keeps `buf` as the spare codes buffer.
    fn recycle(&self, buf: Vec<u8>) {
        *self.spare.lock().unwrap_or_else(PoisonError::into_inner) = Some(buf);
    }

    /// The writer has stopped: wake the producer for good.
    fn close(&self) {
        self.used.lock().unwrap_or_else(PoisonError::into_inner).1 = true;
        self.freed.notify_all();
    }
}

/// The data of one input tensor on its way to the writer.
enum Payload<'a> {
    /// Bytes copied from the input map (released once written).
    Copy(&'a [u8]),
    /// Quantized codes and the scale grid as little-endian bytes.
    Quantized(Vec<u8>, Vec<u8>),
}

/// Writes one output file. The calling thread quantizes (in parallel, with rayon) tensor after
/// tensor while a writer thread hashes and writes the previous ones.
fn write_file(
    ckpt: &Checkpoint,
    file: &OutFile,
    path: &Path,
    opts: &ConvertOptions,
    progress: &dyn Progress,
    reports: &mut Vec<TensorReport>,
) -> Result<WrittenFile, ConvertError> {
    let writer = ShardWriter::create(path, file.tensors())?;
    let budget = Budget { used: Mutex::new((0, false)), freed: Condvar::new(), spare: Mutex::new(None) };
    let (tx, rx) = mpsc::channel::<(usize, Payload<'_>, u64)>();
    std::thread::scope(|scope| {
        let budget = &budget;
        let handle = scope.spawn(move || {
            let r = write_all(writer, file, ckpt, rx, budget, progress);
            budget.close();
            r
        });
        let produced = produce(ckpt, file, opts, budget, &tx, reports);
        drop(tx);
        let written = handle.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        // A producer error comes first: the writer then only saw its input end early.
        produced.and(written)
    })
}

/// The writer thread: writes and hashes what the producer sends, in order.
fn write_all<'a>(
    mut w: ShardWriter,
    file: &OutFile,
    ckpt: &'a Checkpoint,
    rx: mpsc::Receiver<(usize, Payload<'a>, u64)>,
    budget: &Budget,
    progress: &dyn Progress,
) -> Result<WrittenFile, ConvertError> {
    for (i, payload, bytes) in rx {
        let item = &file.items[i];
        let shard = &ckpt.shards[item.shard].file;
        match &payload {
            Payload::Copy(data) => w.write_tensor(&item.outputs[0].name, &[data])?,
            Payload::Quantized(codes, scales) => {
                w.write_tensor(&item.outputs[0].name, &[codes])?;
                w.write_tensor(&item.outputs[1].name, &[scales])?;
            }
        }
        if let (Payload::Copy(_), Some(info)) = (&payload, shard.header().get(&item.source)) {
            shard.release(info);
        }
        if let Payload::Quantized(codes, _) = payload {
            budget.recycle(codes);
        }
        budget.give(bytes);
        progress.tensor_done(&item.source, item.bytes_in);
    }
    Ok(w.finish()?)
}

/// Quantizes the tensors of `file` in order and hands them to the writer through `tx`.
fn produce<'a>(
    ckpt: &'a Checkpoint,
    file: &OutFile,
    opts: &ConvertOptions,
    budget: &Budget,
    tx: &mpsc::Sender<(usize, Payload<'a>, u64)>,
    reports: &mut Vec<TensorReport>,
) -> Result<(), ConvertError> {
    for (i, item) in file.items.iter().enumerate() {
        let shard = &ckpt.shards[item.shard].file;
        let missing = || FormatError::BadTensor {
            path: shard.path().to_owned(),
            tensor: item.source.clone(),
            reason: "vanished from the file since planning".into(),
        };
        let info = shard.header().get(&item.source).ok_or_else(missing)?;
        let data = shard.data(info);
        let (payload, bytes) = match &item.action {
            Action::Copy { .. } => (Payload::Copy(data), 0),
            Action::Quantize { rows, cols } => {
                let (rows, cols) = (*rows, *cols);
                let dtype = src_dtype(info.dtype).ok_or_else(missing)?;
                let bytes = item.outputs.iter().map(PlannedTensor::nbytes).sum();
                budget.take(bytes);
                let mut codes = budget.buffer(rows * cols);
                let mut scales = vec![0f32; rows.div_ceil(128) * cols.div_ceil(128)];
                let stats = quantize_weight_into(data, dtype, rows, cols, opts.scale_format, &mut codes, &mut scales)
                    .map_err(|source| ConvertError::Quant {
                    path: shard.path().to_owned(),
                    tensor: item.source.clone(),
                    source,
                })?;
                shard.release(info);
                reports.push(TensorReport::new(&item.source, [rows, cols], &stats));
                let scale_bytes = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
                (Payload::Quantized(codes, scale_bytes), bytes)
            }
        };
        if tx.send((i, payload, bytes)).is_err() {
            // The writer stopped on an error; it reports it.
            return Ok(());
        }
    }
    Ok(())
}

/// Moves the finished files into OUT and writes config.json (with its quantization_config), the
/// carried-over files, the index and, last, the manifest. Idempotent: an interrupted finalization
/// run again gives the same bytes.
fn finalize(ckpt: &Checkpoint, plan: &Plan, out: &Path) -> Result<(), ConvertError> {
    let mut manifest = BTreeMap::new();
    for f in &plan.files {
        let (sha, _) = read_marker(out, &f.name).ok_or_else(|| ConvertError::Output {
            path: out.join(&f.name),
            reason: "output file is missing or incomplete; run again with --resume".into(),
        })?;
        manifest.insert(f.name.clone(), sha);
    }
    let staging = out.join(STATE_DIR).join("files");
    for f in &plan.files {
        let staged = staging.join(&f.name);
        if staged.exists() {
            std::fs::rename(&staged, out.join(&f.name)).map_err(FormatError::io(out.join(&f.name), "rename"))?;
        }
    }
    fp8forge_formats::atomic::sync_parent(&out.join("config.json"))?;
    if let Some(config) = &ckpt.config {
        let mut config = config.clone();
        let qc = quantization_config(plan);
        if let Value::Object(m) = &mut config {
            m.insert("quantization_config".into(), qc);
        }
        let w = write_atomic(&out.join("config.json"), &pretty(&config))?;
        manifest.insert("config.json".into(), w.sha256);
    }
    for name in &plan.copies {
        let w = copy_atomic(&ckpt.root.join(name), &out.join(name))?;
        manifest.insert(name.clone(), w.sha256);
    }
    if plan.files.len() > 1 {
        let mut weight_map = BTreeMap::new();
        let mut total = 0u64;
        for f in &plan.files {
            for t in f.tensors() {
                total += t.nbytes();
                weight_map.insert(t.name.clone(), f.name.clone());
            }
        }
        let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        let w = write_atomic(&out.join(fp8forge_formats::checkpoint::INDEX_NAME), &pretty(&index))?;
        manifest.insert(fp8forge_formats::checkpoint::INDEX_NAME.into(), w.sha256);
    }
    write_manifest(out, &manifest)?;
    Ok(())
}

/// The quantization_config recorded in config.json for this plan.
fn quantization_config(plan: &Plan) -> Value {
    let kept: Vec<String> = plan
        .files
        .iter()
        .flat_map(|f| &f.items)
        .filter(|i| matches!(i.action, Action::Copy { .. }) && i.outputs[0].shape.len() == 2)
        .filter_map(|i| i.source.strip_suffix(".weight").map(str::to_owned))
        .collect();
    let ue8m0 = plan.options.scale_format == crate::block::ScaleFormat::Ue8m0;
    match plan.options.format {
        OutputFormat::Deepseek => qconfig::deepseek_fp8(ue8m0, &kept),
        OutputFormat::CompressedTensors => qconfig::compressed_tensors_fp8_block(&kept),
    }
}

/// JSON as transformers writes it: two-space indent and a final newline.
fn pretty(v: &Value) -> Vec<u8> {
    let mut s = serde_json::to_vec_pretty(v).unwrap_or_default();
    s.push(b'\n');
    s
}
