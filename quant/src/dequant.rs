//! FP8 checkpoint -> BF16 checkpoint.
//!
//! Reads DeepSeek-style (`<m>.weight` + `<m>.weight_scale_inv`) and compressed-tensors
//! (`<m>.weight` + `<m>.weight_scale`) FP8 checkpoints, with F32, BF16, F16 or F8_E8M0 scales laid
//! out as a block grid (the block size comes from config.json, never from the grid's shape), one
//! scale per tensor, or one per output channel. Every FP8 weight becomes BF16 (`q · s` in f32,
//! rounded to nearest even), its scales are dropped, and every other tensor is copied byte for
//! byte into an output file of the same name as its input shard.
//!
//! What an FP8 weight and its scale are is [`crate::scheme`]'s, shared with `verify`, `inspect`
//! and the runtime, so that they all agree on what a well-formed FP8 weight is.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use fp8forge_formats::checkpoint::{INDEX_NAME, pretty_json};
use fp8forge_formats::manifest::MANIFEST_NAME;
use fp8forge_formats::outdir::{Identity, Opened, OutputDir, Role, check_apart};
use fp8forge_formats::pipeline::{Piece, write_shard};
use fp8forge_formats::{Checkpoint, Dtype, FormatError, PlannedTensor, TensorInfo, WrittenFile};
use rayon::prelude::*;
use serde::Serialize;
use serde_json::Value;

use crate::convert::{ConvertError, Progress};
use crate::fp8::E4M3_LUT;
use crate::scheme::{
    Fp8Scheme, Fp8Weight, ScaleGeometry, Strictness, code_lut, count_bad_codes, is_fp8_weight_dtype, scales_to_f32,
};

/// Output bytes of dequantized tensors computed ahead of the writer: small tensors are
/// dequantized in parallel in batches of about this size, a larger tensor goes alone (and is
/// itself dequantized in parallel over its rows).
const BATCH_BYTES: u64 = 128 << 20;

/// What `dequant` did.
#[derive(Clone, Debug, Serialize)]
pub struct DequantReport {
    /// Output directory.
    pub output: PathBuf,
    /// Safetensors files written (one per input shard).
    pub files: usize,
    /// FP8 weights turned into BF16.
    pub tensors_dequantized: usize,
    /// Tensors copied byte for byte.
    pub tensors_copied: usize,
    /// Bytes of the safetensors files written by this run (headers included).
    pub bytes_out: u64,
    /// True when OUT already held this finished output: nothing was written.
    pub already_complete: bool,
}

/// A tensor located in a checkpoint: the shard index and its header entry.
type Loc<'a> = (usize, &'a TensorInfo);

/// What happens to one input tensor.
enum Op<'a> {
    /// Copied unchanged.
    Copy,
    /// Dequantized with the scale tensor at `scale`.
    Dequant { lut: &'static [f32; 256], scale: Loc<'a>, geom: ScaleGeometry },
}

/// One output tensor and where it comes from.
struct Entry<'a> {
    info: &'a TensorInfo,
    op: Op<'a>,
    /// Input bytes (the weight's plus its scale's when dequantized), for progress.
    bytes_in: u64,
}

/// The plan of one output file.
struct FilePlan<'a> {
    shard: usize,
    entries: Vec<Entry<'a>>,
}

impl FilePlan<'_> {
    fn tensors(&self) -> Vec<PlannedTensor> {
        self.entries
            .iter()
            .map(|e| PlannedTensor {
                name: e.info.name.clone(),
                dtype: if matches!(e.op, Op::Dequant { .. }) { Dtype::BF16 } else { e.info.dtype },
                shape: e.info.shape.clone(),
            })
            .collect()
    }
}

/// A tensor-level error of the input, as [`ConvertError`].
fn bad_tensor(path: &Path, tensor: &str, reason: String) -> ConvertError {
    ConvertError::Format(FormatError::BadTensor { path: path.to_owned(), tensor: tensor.to_owned(), reason })
}

/// Decides, before anything is written, what becomes of every tensor: each FP8 weight must have
/// a scale tensor whose shape fits it; scale tensors (and static `input_scale`s) of FP8 weights
/// are dropped.
fn plan_files<'a>(ckpt: &'a Checkpoint, scheme: &Fp8Scheme) -> Result<Vec<FilePlan<'a>>, ConvertError> {
    let mut by_name: HashMap<&str, Loc<'a>> = HashMap::new();
    for (si, s) in ckpt.shards.iter().enumerate() {
        for t in &s.file.header().tensors {
            by_name.insert(&t.name, (si, t));
        }
    }
    let mut dropped: HashSet<&str> = HashSet::new();
    let mut ops: HashMap<&str, Op<'a>> = HashMap::new();
    for s in &ckpt.shards {
        let path = s.file.path();
        for t in s.file.header().tensors.iter().filter(|t| is_fp8_weight_dtype(t.dtype)) {
            let lut = code_lut(t.dtype).ok_or_else(|| {
                bad_tensor(path, &t.name, format!("dtype {:?} is not supported (E4M3FN and E5M2 are)", t.dtype))
            })?;
            let (ss, st, geom) = scheme
                .locate_scale(t, Strictness::Lenient, |n| by_name.get(n).map(|&(si, ti)| (si, ti)))
                .map_err(|e| match e.scale_tensor().and_then(|n| by_name.get(n)) {
                    Some(&(ss, st)) => bad_tensor(ckpt.shards[ss].file.path(), &st.name, e.to_string()),
                    None => bad_tensor(path, &t.name, e.to_string()),
                })?;
            dropped.insert(&st.name);
            if let Some(m) = t.name.strip_suffix(".weight")
                && let Some((_, i)) = by_name.get(format!("{m}.input_scale").as_str())
            {
                dropped.insert(&i.name);
            }
            ops.insert(&t.name, Op::Dequant { lut, scale: (ss, st), geom });
        }
    }
    Ok(ckpt
        .shards
        .iter()
        .enumerate()
        .map(|(si, s)| FilePlan {
            shard: si,
            entries: s
                .file
                .header()
                .tensors
                .iter()
                .filter(|t| !dropped.contains(t.name.as_str()))
                .map(|t| {
                    let op = ops.remove(t.name.as_str()).unwrap_or(Op::Copy);
                    let scale_bytes = match &op {
                        Op::Dequant { scale: (_, st), .. } => st.nbytes() as u64,
                        Op::Copy => 0,
                    };
                    Entry { info: t, op, bytes_in: t.nbytes() as u64 + scale_bytes }
                })
                .collect(),
        })
        .collect())
}

/// What a dequantization writes: a digest of every output file's tensors (names, dtypes, shapes)
/// and of how each is made, so that a rerun recognizes its own unfinished or finished output.
fn digest(ckpt: &Checkpoint, plans: &[FilePlan<'_>], copies: &[String]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"fp8forge dequant v1\n");
    for p in plans {
        h.update(format!("file {}\n", ckpt.shards[p.shard].name).as_bytes());
        for (e, t) in p.entries.iter().zip(p.tensors()) {
            let how = match &e.op {
                Op::Copy => "copy".to_string(),
                Op::Dequant { scale: (_, st), geom, .. } => format!("dequant {} {geom:?}", st.name),
            };
            h.update(format!("{} {:?} {:?} {how}\n", t.name, t.dtype, t.shape).as_bytes());
        }
    }
    for c in copies {
        h.update(format!("copy {c}\n").as_bytes());
    }
    fp8forge_formats::atomic::hex(&h.finalize())
}

/// Dequantizes the FP8 checkpoint `input` (a directory or one `.safetensors` file) into a BF16
/// checkpoint in `out`: one output file per input shard with the same name, FP8 weights as BF16,
/// their scale tensors dropped, every other tensor byte-identical; config.json without its
/// `quantization_config`, the other files carried over, the index rewritten when there is one,
/// and a `SHA256SUMS` manifest, written last.
///
/// Refuses a non-empty `out` unless `force`, and the input directory itself always. Every FP8
/// weight's scale is checked before anything is written; a NaN code found while converting is an
/// error naming the file and tensor. Files are written atomically, under a lock on `out`.
pub fn dequant(input: &Path, out: &Path, force: bool, progress: &dyn Progress) -> Result<DequantReport, ConvertError> {
    let ckpt = Checkpoint::open(input)?;
    let scheme = Fp8Scheme::from_config(ckpt.config.as_ref())
        .map_err(|e| FormatError::BadJson { path: ckpt.root.join("config.json"), reason: e.to_string() })?;
    let plans = plan_files(&ckpt, &scheme)?;
    let copies: Vec<String> = ckpt.extra_files.iter().filter(|n| *n != MANIFEST_NAME).cloned().collect();
    let had_index = input.is_dir() && ckpt.root.join(INDEX_NAME).is_file();
    let mut inputs: Vec<String> = ckpt.shards.iter().map(|s| s.name.clone()).collect();
    inputs.extend(ckpt.config.as_ref().map(|_| "config.json".to_string()));
    inputs.extend(had_index.then(|| INDEX_NAME.to_string()));
    inputs.extend(copies.iter().cloned());
    let paths: Vec<PathBuf> = inputs.iter().map(|f| ckpt.root.join(f)).collect();
    check_apart(&ckpt.root, &paths, out)?;
    let digest = digest(&ckpt, &plans, &copies);
    let identity = Identity::stamp(digest.clone(), &ckpt.root, &inputs)?;

    let entries = plans.iter().flat_map(|p| &p.entries);
    let dequantized = entries.clone().filter(|e| matches!(e.op, Op::Dequant { .. })).count();
    let mut report = DequantReport {
        output: out.to_owned(),
        files: plans.len(),
        tensors_dequantized: dequantized,
        tensors_copied: entries.clone().count() - dequantized,
        bytes_out: 0,
        already_complete: false,
    };
    let dir = match OutputDir::open(out, identity, Role::Whole { force }, &copies)? {
        Opened::Complete => return Ok(DequantReport { already_complete: true, ..report }),
        Opened::Writing(dir) => dir,
    };
    let todo: Vec<&FilePlan<'_>> = plans.iter().filter(|p| dir.done(&ckpt.shards[p.shard].name).is_none()).collect();
    let entries = todo.iter().flat_map(|p| &p.entries);
    progress.begin(entries.clone().map(|e| e.bytes_in).sum(), entries.count());
    for plan in todo {
        let name = &ckpt.shards[plan.shard].name;
        let written = write_file(&ckpt, plan, &dir.staging(name), progress)?;
        dir.mark_done(name, &written)?;
        report.bytes_out += written.bytes;
    }

    let mut names: Vec<String> = plans.iter().map(|p| ckpt.shards[p.shard].name.clone()).collect();
    if let Some(config) = &ckpt.config {
        let mut config = config.clone();
        if let Value::Object(m) = &mut config {
            m.shift_remove("quantization_config");
        }
        dir.write_file("config.json", &pretty_json(&config, &dir.staging("config.json"))?)?;
        names.push("config.json".into());
    }
    for name in &copies {
        dir.copy_file(&ckpt.root.join(name), name)?;
        names.push(name.clone());
    }
    if plans.len() > 1 || had_index {
        dir.write_index(&plans.iter().map(|p| (ckpt.shards[p.shard].name.clone(), p.tensors())).collect::<Vec<_>>())?;
        names.push(INDEX_NAME.into());
    }
    let now = Identity::stamp(digest, &ckpt.root, &inputs)?;
    dir.commit(&names, &now)?;
    Ok(report)
}

/// Writes one output file: the calling thread dequantizes batches of tensors in parallel while the
/// shard writer's thread writes the previous batch (one batch computed, one being written: at
/// most twice [`BATCH_BYTES`] in flight).
fn write_file(
    ckpt: &Checkpoint,
    plan: &FilePlan<'_>,
    path: &Path,
    progress: &dyn Progress,
) -> Result<WrittenFile, ConvertError> {
    let shard = &ckpt.shards[plan.shard].file;
    write_shard(path, plan.tensors(), 2 * BATCH_BYTES, |out| {
        let mut start = 0;
        while start < plan.entries.len() {
            if progress.cancelled() {
                return Err(ConvertError::Interrupted);
            }
            let end = batch_end(plan, start);
            let owned = |e: &Entry<'_>| if matches!(e.op, Op::Dequant { .. }) { 2 * e.info.numel() as u64 } else { 0 };
            out.reserve(plan.entries[start..end].iter().map(owned).sum());
            let batch = (start..end)
                .into_par_iter()
                .map(|i| tensor_data(ckpt, plan.shard, &plan.entries[i]))
                .collect::<Result<Vec<_>, ConvertError>>()?;
            for (e, data) in plan.entries[start..end].iter().zip(batch) {
                let borrowed = matches!(data, Cow::Borrowed(_));
                let done = move || {
                    if borrowed {
                        shard.release(e.info);
                    }
                    progress.tensor_done(&e.info.name, e.bytes_in);
                };
                if !out.send(Piece { tensors: vec![data], reserved: owned(e), done: Box::new(done) }) {
                    // The writer stopped on an error; it reports it.
                    return Ok(());
                }
            }
            start = end;
        }
        Ok(())
    })
}

/// The end of the batch starting at entry `start`: small tensors together up to about
/// [`BATCH_BYTES`] of output, a larger one alone.
fn batch_end(plan: &FilePlan<'_>, start: usize) -> usize {
    let mut end = start;
    let mut bytes = 0u64;
    while end < plan.entries.len() {
        let e = &plan.entries[end];
        let b = if matches!(e.op, Op::Dequant { .. }) { 2 * e.info.numel() as u64 } else { 0 };
        if end > start && bytes + b > BATCH_BYTES {
            break;
        }
        bytes += b;
        end += 1;
    }
    end
}

/// The output bytes of one tensor: borrowed from the input map when copied, the BF16 weight
/// when dequantized (the input pages are released once read).
fn tensor_data<'a>(ckpt: &'a Checkpoint, shard: usize, e: &Entry<'a>) -> Result<Cow<'a, [u8]>, ConvertError> {
    let file = &ckpt.shards[shard].file;
    let codes = file.data(e.info);
    let Op::Dequant { lut, scale: (ss, st), geom } = &e.op else {
        return Ok(Cow::Borrowed(codes));
    };
    let sfile = &ckpt.shards[*ss].file;
    let scales = scales_to_f32(st.dtype, sfile.data(st))
        .ok_or_else(|| bad_tensor(sfile.path(), &st.name, format!("scale dtype {:?} is not supported", st.dtype)))?;
    sfile.release(st);
    if let Some((i, s)) = scales.iter().enumerate().find(|(_, s)| !s.is_finite()) {
        return Err(bad_tensor(sfile.path(), &st.name, format!("scale {i} is {s}, not finite")));
    }
    let (bad, first) = count_bad_codes(codes, lut);
    if bad > 0 {
        let what = if std::ptr::eq(*lut, &E4M3_LUT) { "NaN codes (0x7F/0xFF)" } else { "NaN or infinite codes" };
        return Err(bad_tensor(
            file.path(),
            &e.info.name,
            format!("{bad} {what}, first at element {}", first.unwrap_or(0)),
        ));
    }
    let out = Fp8Weight { codes, lut, scales: &scales, geom: *geom }.to_bf16();
    file.release(e.info);
    Ok(Cow::Owned(out))
}

/// Small checkpoints for the tests of `dequant`, `verify` and `inspect`.
#[cfg(test)]
pub(crate) mod fixture {
    use std::path::Path;

    use fp8forge_formats::{Dtype, PlannedTensor, ShardWriter};

    /// Deterministic pseudo-random numbers (splitmix64).
    pub struct Rng(u64);

    impl Rng {
        /// A generator from a seed.
        pub fn new(seed: u64) -> Self {
            Rng(seed)
        }

        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// Uniform in [0, 1).
        pub fn uniform(&mut self) -> f32 {
            (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
        }

        /// Standard normal (Box-Muller).
        pub fn normal(&mut self) -> f32 {
            let u1 = self.uniform().max(1e-7);
            let u2 = self.uniform();
            (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        }
    }

    /// `n` E4M3 codes of known values (no NaN codes).
    pub fn codes(rng: &mut Rng, n: usize) -> Vec<u8> {
        (0..n).map(|_| (rng.uniform() * 254.0) as u8).map(|c| if c & 0x7F == 0x7F { 0 } else { c }).collect()
    }

    /// `n` gaussian values of standard deviation `std` as BF16 bytes.
    pub fn bf16_gaussian(rng: &mut Rng, n: usize, std: f32) -> Vec<u8> {
        (0..n).flat_map(|_| half::bf16::from_f32(rng.normal() * std).to_le_bytes()).collect()
    }

    /// BF16 little-endian bytes to f32.
    pub fn bf16_to_f32(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
    }

    /// f32 values as little-endian bytes.
    pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// A tensor to write: name, dtype, shape, bytes.
    pub type T = (String, Dtype, Vec<usize>, Vec<u8>);

    /// Writes one safetensors file with `tensors` in this order.
    pub fn write_file(path: &Path, tensors: &[T]) {
        let plan = tensors
            .iter()
            .map(|(name, dtype, shape, _)| PlannedTensor { name: name.clone(), dtype: *dtype, shape: shape.clone() })
            .collect();
        let mut w = ShardWriter::create(path, plan).expect("create shard");
        for (name, _, _, data) in tensors {
            w.write_tensor(name, &[data]).expect("write tensor");
        }
        w.finish().expect("finish shard");
    }

    /// Writes a sharded checkpoint (index included when more than one file) with `config`.
    pub fn write_checkpoint(dir: &Path, shards: &[Vec<T>], config: &serde_json::Value) {
        std::fs::create_dir_all(dir).expect("mkdir");
        let n = shards.len();
        let mut map = serde_json::Map::new();
        for (i, tensors) in shards.iter().enumerate() {
            let name =
                if n == 1 { "model.safetensors".into() } else { format!("model-{:05}-of-{n:05}.safetensors", i + 1) };
            write_file(&dir.join(&name), tensors);
            for t in tensors {
                map.insert(t.0.clone(), name.clone().into());
            }
        }
        if n > 1 {
            let index = serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": map });
            std::fs::write(dir.join(fp8forge_formats::checkpoint::INDEX_NAME), index.to_string()).expect("index");
        }
        std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(config).expect("json")).expect("config");
    }

    /// A small BF16 MoE-like checkpoint in two shards: gaussian weights whose shapes are not all
    /// multiples of 128 (one with an all-zero block and an outlier), an embedding, norms, a router
    /// and a 1-D bias that stay in BF16, plus a tokenizer file.
    pub fn bf16_model(dir: &Path) {
        let mut rng = Rng::new(7);
        let mut t = |name: &str, shape: &[usize], std: f32| -> T {
            let n = shape.iter().product();
            (name.to_string(), Dtype::BF16, shape.to_vec(), bf16_gaussian(&mut rng, n, std))
        };
        let mut up = t("model.layers.0.mlp.up_proj.weight", &[320, 192], 0.02);
        // An all-zero first block row and one outlier.
        for b in &mut up.3[..128 * 192 * 2] {
            *b = 0;
        }
        up.3[(200 * 192 + 7) * 2..(200 * 192 + 8) * 2].copy_from_slice(&half::bf16::from_f32(3.5).to_le_bytes());
        let shard0 = vec![
            t("model.embed_tokens.weight", &[64, 96], 1.0),
            t("model.layers.0.input_layernorm.weight", &[96], 1.0),
            t("model.layers.0.self_attn.q_proj.weight", &[96, 96], 0.05),
            up,
            t("model.layers.0.mlp.down_proj.weight", &[192, 320], 0.02),
        ];
        let shard1 = vec![
            t("model.layers.1.mlp.gate.weight", &[4, 96], 0.1),
            t("model.layers.1.mlp.experts.0.gate_proj.weight", &[256, 256], 0.03),
            t("model.layers.1.mlp.experts.1.gate_proj.weight", &[130, 129], 1.0),
            t("model.layers.1.self_attn.o_proj.bias", &[96], 0.1),
            t("model.norm.weight", &[96], 1.0),
            t("lm_head.weight", &[64, 96], 0.05),
        ];
        let config = serde_json::json!({"architectures": ["TinyMoe"], "hidden_size": 96, "torch_dtype": "bfloat16"});
        write_checkpoint(dir, &[shard0, shard1], &config);
        std::fs::write(dir.join("tokenizer.json"), b"{\"version\": \"1.0\"}").expect("tokenizer");
    }

    /// Converts `input` into `out` with the default options (DeepSeek layout, f32 scales).
    pub fn convert_default(input: &Path, out: &Path) {
        convert_with(input, out, crate::plan::OutputFormat::Deepseek);
    }

    /// Converts `input` into `out` in `format`.
    pub fn convert_with(input: &Path, out: &Path, format: crate::plan::OutputFormat) {
        let opts = crate::plan::ConvertOptions { format, ..Default::default() };
        crate::convert::convert(input, out, &opts, &Default::default(), &crate::convert::NoProgress).expect("convert");
    }

    /// Rewrites the safetensors file `path`, letting `edit` change each tensor (name, dtype,
    /// shape, bytes) in place.
    pub fn rewrite(path: &Path, mut edit: impl FnMut(&mut T)) {
        let tensors: Vec<T> = {
            let f = fp8forge_formats::SafetensorsFile::open(path).expect("open");
            f.header()
                .tensors
                .iter()
                .map(|t| {
                    let mut x = (t.name.clone(), t.dtype, t.shape.clone(), f.data(t).to_vec());
                    edit(&mut x);
                    x
                })
                .collect()
        };
        write_file(path, &tensors);
    }

    /// Recomputes the SHA256SUMS manifest of `dir` over the files it lists.
    pub fn refresh_manifest(dir: &Path) {
        let old = fp8forge_formats::manifest::read_manifest(dir).expect("manifest");
        let new = old
            .keys()
            .map(|n| (n.clone(), fp8forge_formats::atomic::sha256_file(&dir.join(n)).expect("hash")))
            .collect();
        fp8forge_formats::manifest::write_manifest(dir, &new).expect("write manifest");
    }
}

#[cfg(test)]
mod tests {
    use super::fixture::*;
    use super::*;
    use crate::convert::NoProgress;
    use crate::fp8::E5M2_LUT;
    use fp8forge_formats::SafetensorsFile;

    fn find<'a>(ck: &'a Checkpoint, name: &str) -> (&'a SafetensorsFile, &'a TensorInfo) {
        let (s, t) = ck.find(name).unwrap_or_else(|| panic!("{name} missing"));
        (&s.file, t)
    }

    #[test]
    fn dequant_of_a_converted_checkpoint_is_within_block_error_and_copies_pass_through_bytes() {
        let d = tempfile::tempdir().expect("tempdir");
        let (input, fp8, back) = (d.path().join("in"), d.path().join("fp8"), d.path().join("back"));
        bf16_model(&input);
        convert_default(&input, &fp8);
        let r = dequant(&fp8, &back, false, &NoProgress).expect("dequant");
        assert_eq!((r.files, r.tensors_dequantized, r.tensors_copied), (2, 5, 6), "{r:?}");

        let (a, q, b) = (
            Checkpoint::open(&input).expect("in"),
            Checkpoint::open(&fp8).expect("fp8"),
            Checkpoint::open(&back).expect("back"),
        );
        let names = |c: &Checkpoint| c.shards.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&b), names(&q), "output files keep the input's names");
        let mut count = 0;
        for s in &a.shards {
            for t in &s.file.header().tensors {
                count += 1;
                let (bf, bt) = find(&b, &t.name);
                assert_eq!((bt.dtype, &bt.shape), (t.dtype, &t.shape), "{}", t.name);
                let (qf, qt) = find(&q, &t.name);
                if qt.dtype != Dtype::F8_E4M3 {
                    assert_eq!(bf.data(bt), s.file.data(t), "{} is not byte-identical", t.name);
                    continue;
                }
                // Bitwise: bf16(code value × scale) of the FP8 checkpoint.
                let (sf, st) = find(&q, &format!("{}_scale_inv", t.name));
                let scales = scales_to_f32(st.dtype, sf.data(st)).expect("f32");
                let (n, k) = (t.shape[0], t.shape[1]);
                let codes = qf.data(qt);
                let got = bf16_to_f32(bf.data(bt));
                let orig = bf16_to_f32(s.file.data(t));
                let mut err = 0f64;
                let mut norm = 0f64;
                for r in 0..n {
                    for c in 0..k {
                        let sc = scales[(r / 128) * k.div_ceil(128) + c / 128];
                        let want = half::bf16::from_f32(E4M3_LUT[codes[r * k + c] as usize] * sc).to_f32();
                        let i = r * k + c;
                        assert_eq!(got[i].to_bits(), want.to_bits(), "{}[{r},{c}]", t.name);
                        // Within half an E4M3 step of the original, plus BF16 rounding.
                        let tol = (orig[i].abs() * 0.0625).max(sc * 2f32.powi(-10)) * 1.0001 + got[i].abs() / 256.0;
                        assert!((got[i] - orig[i]).abs() <= tol, "{}[{r},{c}]: {} vs {}", t.name, got[i], orig[i]);
                        err += f64::from(got[i] - orig[i]).powi(2);
                        norm += f64::from(orig[i]).powi(2);
                    }
                }
                assert!(err <= 0.05f64.powi(2) * norm.max(1e-30), "{}: rel rms {}", t.name, (err / norm).sqrt());
            }
        }
        assert_eq!(count, b.shards.iter().map(|s| s.file.header().tensors.len()).sum::<usize>(), "extra tensors");
        let config: Value =
            serde_json::from_slice(&std::fs::read(back.join("config.json")).expect("config")).expect("j");
        assert!(config.get("quantization_config").is_none(), "{config}");
        assert_eq!(config["architectures"][0], "TinyMoe");
        assert_eq!(std::fs::read(back.join("tokenizer.json")).ok(), std::fs::read(input.join("tokenizer.json")).ok());
        let index: Value = serde_json::from_slice(&std::fs::read(back.join(INDEX_NAME)).expect("index")).expect("j");
        assert_eq!(index["metadata"]["total_size"].as_u64(), Some(b.total_tensor_bytes()));
        let checks = fp8forge_formats::manifest::check_manifest(&back, |_| {}).expect("manifest");
        assert!(checks.iter().all(|c| c.status == fp8forge_formats::manifest::FileStatus::Ok), "{checks:?}");
        assert!(!back.join(fp8forge_formats::outdir::STATE_DIR).exists(), "state directory left behind");
    }

    #[test]
    fn dequant_refuses_a_non_empty_output_without_force_and_the_input_directory_always() {
        let d = tempfile::tempdir().expect("tempdir");
        let (input, fp8, back) = (d.path().join("in"), d.path().join("fp8"), d.path().join("back"));
        bf16_model(&input);
        convert_default(&input, &fp8);
        std::fs::create_dir_all(&back).expect("mkdir");
        std::fs::write(back.join("stale.safetensors"), b"junk").expect("junk");
        let e = dequant(&fp8, &back, false, &NoProgress).expect_err("non-empty");
        assert!(
            matches!(
                &e,
                ConvertError::Format(FormatError::Refused { why: fp8forge_formats::error::Refusal::NotEmpty, .. })
            ),
            "{e}"
        );
        assert!(e.to_string().contains("not empty"), "{e}");
        dequant(&fp8, &back, true, &NoProgress).expect("with force");
        assert!(!back.join("stale.safetensors").exists(), "force leaves stale shards");
        Checkpoint::open(&back).expect("output opens");
        let e = dequant(&fp8, &fp8, true, &NoProgress).expect_err("in place").to_string();
        assert!(e.contains("input directory"), "{e}");
        assert!(Checkpoint::open(&fp8).is_ok(), "input damaged");
    }

    #[test]
    fn dequant_reads_bf16_block_e8m0_per_channel_and_f32_per_tensor_scales_with_the_config_block_size() {
        let d = tempfile::tempdir().expect("tempdir");
        let (input, back) = (d.path().join("in"), d.path().join("back"));
        let mut rng = Rng::new(3);
        // compressed-tensors with 64×32 blocks: grid [2, 3] for a [100, 70] weight.
        let (ca, cb, cc) = (codes(&mut rng, 100 * 70), codes(&mut rng, 40 * 50), codes(&mut rng, 30 * 20));
        let sa: Vec<f32> = (0..6).map(|i| 0.001 * (i + 1) as f32).collect();
        let sa_bf16: Vec<u8> = sa.iter().flat_map(|s| half::bf16::from_f32(*s).to_le_bytes()).collect();
        let sc_e8m0: Vec<u8> = (0..30).map(|i| 120 + (i % 5) as u8).collect();
        let tensors = vec![
            ("a.weight".to_string(), Dtype::F8_E4M3, vec![100, 70], ca.clone()),
            ("a.weight_scale".into(), Dtype::BF16, vec![2, 3], sa_bf16.clone()),
            ("a.input_scale".into(), Dtype::F32, vec![1], f32_bytes(&[0.5])),
            ("b.weight".into(), Dtype::F8_E4M3, vec![40, 50], cb.clone()),
            ("b.weight_scale".into(), Dtype::F32, vec![1], f32_bytes(&[0.25])),
            ("c.weight".into(), Dtype::F8_E5M2, vec![30, 20], cc.iter().map(|&c| c & 0x7B).collect()),
            ("c.weight_scale".into(), Dtype::F8_E8M0, vec![30, 1], sc_e8m0.clone()),
            ("norm.weight".into(), Dtype::BF16, vec![3], vec![1, 2, 3, 4, 5, 6]),
        ];
        let mut config = fp8forge_formats::qconfig::compressed_tensors_fp8_block(&[]);
        config["config_groups"]["group_0"]["weights"]["block_structure"] = serde_json::json!([64, 32]);
        write_checkpoint(&input, std::slice::from_ref(&tensors), &serde_json::json!({"quantization_config": config}));
        let r = dequant(&input, &back, false, &NoProgress).expect("dequant");
        assert_eq!((r.tensors_dequantized, r.tensors_copied), (3, 1));
        let b = Checkpoint::open(&back).expect("back");
        assert!(b.find("a.weight_scale").is_none() && b.find("a.input_scale").is_none(), "scales kept");
        let bf = |x: f32| half::bf16::from_f32(x).to_f32().to_bits();
        let got = |name: &str| bf16_to_f32(b.find(name).map(|(s, t)| s.file.data(t)).expect("tensor"));
        let a = got("a.weight");
        for r in 0..100 {
            for c in 0..70 {
                let s = half::bf16::from_f32(sa[(r / 64) * 3 + c / 32]).to_f32();
                assert_eq!(a[r * 70 + c].to_bits(), bf(E4M3_LUT[ca[r * 70 + c] as usize] * s), "a[{r},{c}]");
            }
        }
        let bw = got("b.weight");
        assert!(bw.iter().zip(&cb).all(|(v, &c)| v.to_bits() == bf(E4M3_LUT[c as usize] * 0.25)), "per-tensor");
        let cw = got("c.weight");
        for r in 0..30 {
            let s = 2f32.powi(i32::from(sc_e8m0[r]) - 127);
            for c in 0..20 {
                let code = cc[r * 20 + c] & 0x7B;
                assert_eq!(cw[r * 20 + c].to_bits(), bf(E5M2_LUT[code as usize] * s), "c[{r},{c}]");
            }
        }
        assert_eq!(b.find("norm.weight").map(|(s, t)| s.file.data(t).to_vec()), Some(vec![1, 2, 3, 4, 5, 6]));
        assert!(!back.join(INDEX_NAME).exists(), "single file needs no index");
    }

    #[test]
    fn dequant_refuses_a_scale_grid_that_does_not_fit_the_configured_block_naming_the_tensor() {
        let d = tempfile::tempdir().expect("tempdir");
        let (input, back) = (d.path().join("in"), d.path().join("back"));
        // A 192-row weight: 128-row blocks give 2 grid rows; a grid of 3 (64-row blocks) is refused.
        let tensors = vec![
            ("q_a_proj.weight".to_string(), Dtype::F8_E4M3, vec![192, 256], vec![0x38; 192 * 256]),
            ("q_a_proj.weight_scale_inv".into(), Dtype::F32, vec![3, 2], f32_bytes(&[1.0; 6])),
        ];
        let config = serde_json::json!({"quantization_config": fp8forge_formats::qconfig::deepseek_fp8(false, &[])});
        write_checkpoint(&input, &[tensors], &config);
        let e = dequant(&input, &back, false, &NoProgress).expect_err("bad grid").to_string();
        assert!(e.contains("q_a_proj.weight_scale_inv") && e.contains("[2, 2]") && e.contains("128x128"), "{e}");
        assert!(!back.exists() || std::fs::read_dir(&back).map(|mut r| r.next().is_none()).unwrap_or(false));
    }

    #[test]
    fn dequant_refuses_a_nan_code_naming_file_and_tensor_and_leaves_no_half_written_file() {
        let d = tempfile::tempdir().expect("tempdir");
        let (input, fp8, back) = (d.path().join("in"), d.path().join("fp8"), d.path().join("back"));
        bf16_model(&input);
        convert_default(&input, &fp8);
        let file = fp8.join("model-00002-of-00002.safetensors");
        rewrite(&file, |t| {
            if t.0 == "model.layers.1.mlp.experts.0.gate_proj.weight" {
                t.3[1000] = 0xFF;
            }
        });
        let e = dequant(&fp8, &back, false, &NoProgress).expect_err("NaN").to_string();
        assert!(
            e.contains("model-00002-of-00002.safetensors")
                && e.contains("model.layers.1.mlp.experts.0.gate_proj.weight")
                && e.contains("NaN"),
            "{e}"
        );
        // Only the state of the unfinished output is left (the first file, finished, is kept for a
        // rerun), and no temporary file.
        let left: Vec<_> = std::fs::read_dir(&back).expect("out").flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, [fp8forge_formats::outdir::STATE_DIR], "a failed dequant left files under final names");
        let staged = back.join(fp8forge_formats::outdir::STATE_DIR).join("files");
        let partial: Vec<_> = std::fs::read_dir(&staged)
            .expect("staging")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".partial"))
            .collect();
        assert!(partial.is_empty(), "temporary files left: {partial:?}");
    }
}
