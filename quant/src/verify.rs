//! Checking a converted checkpoint: (a) its `SHA256SUMS` manifest; (b) its structure: every FP8
//! weight has a scale tensor of the right name, dtype and grid shape, every scale is finite and
//! positive, no FP8 tensor holds a NaN code; (c) with the BF16 original as reference, the error of
//! every dequantized weight, and byte equality of every tensor that was not quantized.
//!
//! Findings about the checkpoint are problems (one line each, naming file and tensor) in the
//! report, not errors: an error means verification itself could not run (I/O failure, unreadable
//! reference).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use fp8forge_formats::header::dtype_name;
use fp8forge_formats::input::stat_input;
use fp8forge_formats::manifest::{FileCheck, FileStatus, MANIFEST_NAME, check_manifest, read_manifest};
use fp8forge_formats::{Checkpoint, Dtype, FormatError, SafetensorsFile, TensorInfo};
use rayon::prelude::*;
use serde::Serialize;

use crate::block::{BLOCK, dequantize_weight_into};
use crate::convert::{ConvertError, Progress, TensorReport};
use crate::fp8::E4M3_LUT;
use crate::scheme::{
    Fp8Scheme, Fp8Weight, SUFFIX_SCALE, SUFFIX_SCALE_INV, ScaleError, ScaleGeometry, Strictness, code_lut,
    count_bad_codes, is_fp8_weight_dtype, scales_to_f32,
};
use crate::stats::{ErrorStats, compare};

/// What `verify` found.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    /// True when no problem was found.
    pub ok: bool,
    /// Per-file result of the manifest check.
    pub files: Vec<FileCheck>,
    /// Problems, one line each naming the file and the tensor.
    pub problems: Vec<String>,
    /// Findings that do not fail the check (BF16 scales, files the manifest does not list, ...).
    pub warnings: Vec<String>,
    /// Error of every FP8 weight against the reference (empty without a reference).
    pub tensors: Vec<TensorReport>,
    /// The tensor with the largest relative RMS error.
    pub worst: Option<TensorReport>,
}

/// A tensor of a checkpoint: its file and header entry.
#[derive(Clone, Copy)]
struct Loc<'a> {
    file: &'a SafetensorsFile,
    shard: &'a str,
    info: &'a TensorInfo,
}

impl<'a> Loc<'a> {
    fn data(&self) -> &'a [u8] {
        self.file.data(self.info)
    }

    fn release(&self) {
        self.file.release(self.info);
    }
}

/// Every tensor of a checkpoint by name.
fn locate(ckpt: &Checkpoint) -> HashMap<&str, Loc<'_>> {
    let mut m = HashMap::new();
    for s in &ckpt.shards {
        for t in &s.file.header().tensors {
            m.insert(t.name.as_str(), Loc { file: &s.file, shard: &s.name, info: t });
        }
    }
    m
}

/// Findings about one tensor.
#[derive(Default)]
struct Outcome {
    problems: Vec<String>,
    warnings: Vec<String>,
    report: Option<TensorReport>,
}

/// Problems and warnings found so far.
#[derive(Default)]
struct Findings {
    problems: Vec<String>,
    warnings: Vec<String>,
}

/// Verifies the checkpoint `dir` (a directory, or one `.safetensors` file, which has no
/// manifest), against the BF16 checkpoint `reference` when given. Tensors are checked in
/// parallel; the input pages of each are released once it is checked. With `tp`, a checkpoint
/// that cannot run at that tensor parallelism is refused first ([`ConvertError::Tp`]).
pub fn verify(
    dir: &Path,
    reference: Option<&Path>,
    tp: Option<usize>,
    progress: &dyn Progress,
) -> Result<VerifyReport, ConvertError> {
    let mut found = Findings::default();
    // A DIR that is not there, or a FIFO or a device, is bad input (exit 2), not a finding.
    stat_input(dir)?;
    let opened = Checkpoint::open(dir);
    if let (Some(tp), Ok(ckpt)) = (tp, &opened) {
        let weights: Vec<(String, Vec<usize>)> = ckpt
            .shards
            .iter()
            .flat_map(|s| &s.file.header().tensors)
            .filter(|t| is_fp8_weight_dtype(t.dtype))
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect();
        crate::tp::check_tp(&weights, ckpt.config.as_ref(), tp)
            .map_err(|source| ConvertError::Tp { path: ckpt.root.clone(), source: Box::new(source) })?;
    }
    let (tensor_bytes, tensor_count) = opened.as_ref().map_or((0, 0), |c| {
        let n = c.shards.iter().map(|s| s.file.header().tensors.len()).sum();
        (c.total_tensor_bytes(), n)
    });
    progress.begin(manifest_bytes(dir) + tensor_bytes, tensor_count);

    // (a) manifest
    let files = check_files(dir, &mut found, progress)?;
    let ckpt = match opened {
        Ok(c) => c,
        // A FIFO or a device where a file should be cannot be read, let alone verified.
        Err(e @ FormatError::NotRegularFile { .. }) => return Err(e.into()),
        Err(e) if e.is_bad_input() => {
            found.problems.push(e.to_string());
            return Ok(finish(files, found, vec![]));
        }
        Err(e) => return Err(e.into()),
    };
    let reference = reference.map(Checkpoint::open).transpose()?;

    // (b) structure, and (c) the comparison with the reference, tensor by tensor.
    let scheme = read_scheme(dir, &ckpt, &mut found);
    let here = locate(&ckpt);
    let there = reference.as_ref().map(locate);
    let (scale_of, claimed) = claim_scales(&ckpt, &scheme, &here);
    let tasks: Vec<Loc<'_>> = ckpt
        .shards
        .iter()
        .flat_map(|s| s.file.header().tensors.iter().map(|info| Loc { file: &s.file, shard: &s.name, info }))
        .filter(|l| !claimed.contains(l.info.name.as_str()))
        .collect();
    let ctx = Ctx { here: &here, there: there.as_ref(), scheme: &scheme, scale_of: &scale_of };
    let outcomes: Vec<Outcome> = tasks
        .par_iter()
        .map(|l| {
            let o = if is_fp8_weight_dtype(l.info.dtype) { ctx.check_fp8(l) } else { ctx.check_plain(l) };
            let scale_bytes = match scale_of.get(l.info.name.as_str()) {
                Some(Ok((s, _))) => s.info.nbytes() as u64,
                _ => 0,
            };
            progress.tensor_done(&l.info.name, l.info.nbytes() as u64 + scale_bytes);
            o
        })
        .collect();
    let mut reports = Vec::new();
    for o in outcomes {
        found.problems.extend(o.problems);
        found.warnings.extend(o.warnings);
        reports.extend(o.report);
    }
    if let Some(r) = &reference {
        for s in &r.shards {
            for t in s.file.header().tensors.iter().filter(|t| !here.contains_key(t.name.as_str())) {
                found.problems.push(format!(
                    "{}: tensor {}: in the reference ({}) but missing from the checkpoint",
                    dir.display(),
                    t.name,
                    s.name
                ));
            }
        }
    }
    Ok(finish(files, found, reports))
}

/// Bytes of the files `dir`'s manifest lists (what checking it hashes); 0 without one.
fn manifest_bytes(dir: &Path) -> u64 {
    if !(dir.is_dir() && dir.join(MANIFEST_NAME).exists()) {
        return 0;
    }
    read_manifest(dir)
        .map(|m| m.keys().filter_map(|n| std::fs::metadata(dir.join(n)).ok()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

/// (a) Checks `dir` against its manifest: every listed file's sha256, the files it must list.
fn check_files(dir: &Path, found: &mut Findings, progress: &dyn Progress) -> Result<Vec<FileCheck>, ConvertError> {
    let manifest = dir.join(MANIFEST_NAME);
    // `exists`, not `is_file`: a FIFO or a device in its place is refused when it is read.
    if !dir.is_dir() {
        found.warnings.push(format!("{}: a single file has no SHA256SUMS manifest to check", dir.display()));
        return Ok(vec![]);
    }
    if !manifest.exists() {
        found.problems.push(format!("{}: no SHA256SUMS manifest", dir.display()));
        return Ok(vec![]);
    }
    let files = match check_manifest(dir, |b| progress.tensor_done(MANIFEST_NAME, b)) {
        Ok(checks) => checks,
        Err(e @ FormatError::BadJson { .. }) => {
            found.problems.push(e.to_string());
            vec![]
        }
        Err(e) => return Err(e.into()),
    };
    if files.iter().all(|f| f.status == FileStatus::Unlisted) {
        found.problems.push(format!("{}: lists no files", manifest.display()));
    }
    for f in &files {
        match (f.status, f.problem) {
            (FileStatus::Ok, _) => {}
            (FileStatus::Mismatch, _) => {
                found.problems.push(format!("{}: sha256 differs from SHA256SUMS (changed or corrupted)", f.file))
            }
            (FileStatus::Missing, _) => found.problems.push(format!("{}: listed in SHA256SUMS but missing", f.file)),
            (FileStatus::Unlisted, true) => found
                .problems
                .push(format!("{}: not listed in SHA256SUMS (weights, their index and config.json must be)", f.file)),
            (FileStatus::Unlisted, false) => found.warnings.push(format!("{}: not listed in SHA256SUMS", f.file)),
        }
    }
    Ok(files)
}

/// The FP8 scheme config.json declares (the default on a malformed one, which is a problem), and
/// whether the config and the tensors agree that the checkpoint is FP8.
fn read_scheme(dir: &Path, ckpt: &Checkpoint, found: &mut Findings) -> Fp8Scheme {
    let config_name = ckpt.root.join("config.json").display().to_string();
    let scheme = Fp8Scheme::from_config(ckpt.config.as_ref()).unwrap_or_else(|e| {
        found.problems.push(format!("{config_name}: {e}"));
        Fp8Scheme::default_blocks()
    });
    let fp8_count =
        ckpt.shards.iter().flat_map(|s| &s.file.header().tensors).filter(|t| is_fp8_weight_dtype(t.dtype)).count();
    match (&ckpt.config, ckpt.config.as_ref().and_then(|c| c.get("quantization_config"))) {
        (None, _) if dir.is_dir() => found.warnings.push(format!("{}: no config.json", dir.display())),
        (Some(_), None) if fp8_count > 0 => {
            found.problems.push(format!("{config_name}: {fp8_count} FP8 tensors but no quantization_config"))
        }
        (Some(_), Some(_)) if fp8_count == 0 => {
            found.warnings.push(format!("{config_name}: quantization_config but no FP8 tensors"))
        }
        _ => {}
    }
    scheme
}

/// Each FP8 weight claims its scale tensor by the names the config declares, located and fitted
/// (or why not); returns them by weight, and the names of the claimed scale tensors (checked with
/// their weight, not on their own).
fn claim_scales<'a>(
    ckpt: &'a Checkpoint,
    scheme: &Fp8Scheme,
    here: &HashMap<&'a str, Loc<'a>>,
) -> (HashMap<&'a str, ScaleOf<'a>>, HashSet<&'a str>) {
    let mut scale_of: HashMap<&str, ScaleOf<'_>> = HashMap::new();
    let mut claimed: HashSet<&str> = HashSet::new();
    for s in &ckpt.shards {
        for t in s.file.header().tensors.iter().filter(|t| is_fp8_weight_dtype(t.dtype)) {
            let found = scheme.locate_scale(t, Strictness::Declared, |n| here.get(n).map(|l| (*l, l.info)));
            match &found {
                Ok((l, ..)) => claimed.insert(l.info.name.as_str()),
                Err(e) => e.scale_tensor().and_then(|n| here.get_key_value(n)).is_some_and(|(k, _)| claimed.insert(k)),
            };
            scale_of.insert(&t.name, found.map(|(l, _, geom)| (l, geom)));
        }
    }
    (scale_of, claimed)
}

/// Assembles the report.
fn finish(files: Vec<FileCheck>, found: Findings, tensors: Vec<TensorReport>) -> VerifyReport {
    let worst = tensors.iter().max_by(|a, b| a.rel_rms.total_cmp(&b.rel_rms)).cloned();
    let Findings { problems, warnings } = found;
    VerifyReport { ok: problems.is_empty(), files, problems, warnings, tensors, worst }
}

/// What the per-tensor checks share.
struct Ctx<'a, 'r> {
    here: &'a HashMap<&'a str, Loc<'a>>,
    there: Option<&'a HashMap<&'r str, Loc<'r>>>,
    scheme: &'a Fp8Scheme,
    scale_of: &'a HashMap<&'a str, ScaleOf<'a>>,
}

/// An FP8 weight's scale tensor, located and fitted, or why not.
type ScaleOf<'a> = Result<(Loc<'a>, ScaleGeometry), ScaleError>;

impl Ctx<'_, '_> {
    /// Checks a tensor that is not an FP8 weight: a scale tensor must belong to an FP8 weight, and
    /// with a reference the bytes must be those of the reference.
    fn check_plain(&self, l: &Loc<'_>) -> Outcome {
        let mut o = Outcome::default();
        let name = &l.info.name;
        // `<w>_scale_inv` or `<m>.weight_scale` (not `input_scale`, `k_scale`...): a weight scale.
        let weight = name
            .strip_suffix(SUFFIX_SCALE_INV)
            .or_else(|| name.strip_suffix(SUFFIX_SCALE).filter(|w| w.ends_with(".weight")));
        if let Some(weight) = weight {
            let why = match self.here.get(weight) {
                Some(w) if is_fp8_weight_dtype(w.info.dtype) => format!(
                    "is not the scale name {} expects for {weight} (it wants {})",
                    self.scheme.method.as_deref().unwrap_or("this checkpoint"),
                    self.scheme.scale_suffixes.iter().map(|s| format!("{weight}{s}")).collect::<Vec<_>>().join(" or ")
                ),
                Some(w) => format!("scale tensor of {weight}, which is {} and not FP8", dtype_name(w.info.dtype)),
                None => format!("scale tensor of {weight}, which does not exist"),
            };
            o.problems.push(format!("{}: tensor {name}: {why}", l.shard));
        }
        if let Some(there) = self.there {
            match there.get(name.as_str()) {
                None => o.problems.push(format!("{}: tensor {name}: not in the reference", l.shard)),
                Some(r) if (r.info.dtype, &r.info.shape) != (l.info.dtype, &l.info.shape) => {
                    o.problems.push(format!(
                        "{}: tensor {name}: {} {:?} here but {} {:?} in the reference ({})",
                        l.shard,
                        dtype_name(l.info.dtype),
                        l.info.shape,
                        dtype_name(r.info.dtype),
                        r.info.shape,
                        r.shard
                    ));
                }
                Some(r) => {
                    let (a, b) = (l.data(), r.data());
                    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
                        o.problems.push(format!(
                            "{}: tensor {name}: differs from the reference ({}) from byte {i} on",
                            l.shard, r.shard
                        ));
                    }
                    r.release();
                }
            }
        }
        l.release();
        o
    }

    /// Checks an FP8 weight: no NaN codes; a scale tensor of the right name, dtype and shape,
    /// every scale finite and positive; with a reference, its dequantization error.
    fn check_fp8(&self, l: &Loc<'_>) -> Outcome {
        let mut o = self.check_fp8_inner(l);
        if self.there.is_some_and(|t| !t.contains_key(l.info.name.as_str())) {
            o.problems.push(format!("{}: tensor {}: not in the reference", l.shard, l.info.name));
        }
        l.release();
        o
    }

    fn check_fp8_inner(&self, l: &Loc<'_>) -> Outcome {
        let mut o = Outcome::default();
        let (name, shard) = (&l.info.name, l.shard);
        let Some(lut) = code_lut(l.info.dtype) else {
            o.problems.push(format!(
                "{shard}: tensor {name}: dtype {} is not supported (F8_E4M3 and F8_E5M2 are)",
                dtype_name(l.info.dtype)
            ));
            return o;
        };
        let codes = l.data();
        let (bad, first) = count_bad_codes(codes, lut);
        if bad > 0 {
            let what = if std::ptr::eq(lut, &E4M3_LUT) { "NaN codes (0x7F/0xFF)" } else { "NaN or infinite codes" };
            o.problems.push(format!("{shard}: tensor {name}: {bad} {what}, first at element {}", first.unwrap_or(0)));
        }
        let (s, geom) = match self.scale_of.get(name.as_str()) {
            Some(Ok((s, geom))) => (s, *geom),
            Some(Err(e)) => {
                let at = match e.scale_tensor().and_then(|n| self.here.get(n)) {
                    Some(sl) => format!("{}: tensor {}", sl.shard, sl.info.name),
                    None => format!("{shard}: tensor {name}"),
                };
                o.problems.push(format!("{at}: {e}"));
                return o;
            }
            None => {
                o.problems.push(format!("{shard}: tensor {name}: FP8 weight not checked for a scale tensor"));
                return o;
            }
        };
        let sname = &s.info.name;
        if s.info.dtype != Dtype::F32 {
            o.warnings.push(format!(
                "{}: tensor {sname}: {} scales (F32 expected; loaders widen them)",
                s.shard,
                dtype_name(s.info.dtype)
            ));
        }
        let Some(scales) = scales_to_f32(s.info.dtype, s.data()) else {
            o.problems.push(format!("{}: tensor {sname}: scale dtype {:?} is not supported", s.shard, s.info.dtype));
            return o;
        };
        s.release();
        let bad_scales: Vec<(usize, f32)> =
            scales.iter().copied().enumerate().filter(|(_, v)| !(v.is_finite() && *v > 0.0)).collect();
        if let Some((i, v)) = bad_scales.first() {
            o.problems.push(format!(
                "{}: tensor {sname}: {} scales are not finite and > 0, first at element {i}: {v}",
                s.shard,
                bad_scales.len()
            ));
        }
        let Some(r) = self.there.and_then(|there| there.get(name.as_str())) else { return o };
        if o.problems.is_empty() {
            let w = Fp8Weight { codes, lut, scales: &scales, geom };
            self.compare(l, &w, s.info.dtype, r, &mut o);
        }
        o
    }

    /// (c) Compares the FP8 weight `w` at `l` (scales stored as `scale_dtype`) with its reference
    /// `r`: the error statistics, and every element within the bound FP8 rounding allows.
    fn compare(&self, l: &Loc<'_>, w: &Fp8Weight<'_>, scale_dtype: Dtype, r: &Loc<'_>, o: &mut Outcome) {
        let (name, shard, geom) = (&l.info.name, l.shard, w.geom);
        let float = matches!(r.info.dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32);
        if !float || r.info.shape != l.info.shape {
            o.problems.push(format!(
                "{shard}: tensor {name}: reference ({}) is {} {:?}, expected a BF16/F16/F32 tensor of shape {:?}",
                r.shard,
                dtype_name(r.info.dtype),
                r.info.shape,
                l.info.shape
            ));
            return;
        }
        let bound = Bound::of(w.lut, scale_dtype);
        let (stats, over) = compare_with_reference(w, r.data(), r.info.dtype, bound);
        r.release();
        let rows = geom.batch * geom.rows;
        if let Some(e) = over.worst {
            o.problems.push(format!(
                "{shard}: tensor {name}: {} of {} elements are further from the reference ({}) than FP8 rounding \
                 allows with their block's scale; worst at [{}, {}]: reference {:e}, dequantized {:e}, scale {:e}, \
                 error {:e} > bound {:e}",
                over.count,
                rows * geom.cols,
                r.shard,
                e.index / geom.cols.max(1),
                e.index % geom.cols.max(1),
                e.x,
                e.approx,
                e.scale,
                (f64::from(e.approx) - f64::from(e.x)).abs() as f32,
                e.bound as f32
            ));
        }
        o.report = Some(TensorReport::new(name, [rows, geom.cols], &stats));
    }
}

/// Widens `bytes` of a BF16, F16 or F32 tensor into `out`.
fn widen_into(dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        Dtype::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        Dtype::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        _ => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
    }
}

/// The largest error FP8 rounding can leave in one element, given the scale stored for its block.
///
/// How it is derived. The converter computes `y = fl(x / s)` in f32, rounds it to the nearest
/// code `q` (ties to even, saturating at the largest finite code), and dequantization gives
/// `x̂ = fl(q · s)`. For a format with `m` mantissa bits and smallest normal exponent `e`
/// (E4M3: m = 3, e = -6; E5M2: m = 2, e = -14):
///
/// - in the normal range, codes near `y` are `2^(⌊log2 |y|⌋ - m) ≤ 2^-m |y|` apart, and the nearest
///   one is at most half of that away: `|q - y| ≤ 2^-(m+1) |y|` (E4M3: `2^-4 |y|`);
/// - below the normal range codes are `2^(e - m)` apart: `|q - y| ≤ 2^(e-m-1)` (E4M3: `2^-10`);
/// - a right scale is `s ≥ amax / max_code`, so `|y|` exceeds the largest code only by the
///   division's rounding, and saturating there costs less than the half spacing above.
///
/// So `|q - y| ≤ max(2^-(m+1) |y|, 2^(e-m-1))`; multiplied by `s`, with `y·s` and `q·s` within
/// `2^-24` (relative) of `x` and `x̂`: `|x - x̂| ≤ max(2^-4 |x|, 2^-10 s)` for E4M3, up to
/// `O(2^-24)(|x| + s)`. That last term is covered by a relative slack of `2^-16` on the bound
/// (at least `2^-20 |x|` and `2^-26 s`, where at most `3·2^-24 |x| + 2^-30 s` is needed). The
/// bound holds for f32 and ue8m0 (power-of-two) scales alike: it depends only on the stored `s`.
/// A scale stored narrower than it was computed (BF16, F16: relative rounding `u` = 2^-8, 2^-11)
/// moves `x̂` by up to `u |q s|` more, which is added. A scale off by 2× moves every element of its
/// block by at least half its magnitude: far above `2^-4 |x|`.
#[derive(Clone, Copy, Debug)]
struct Bound {
    /// Relative term: half the spacing of normal codes relative to the value, `2^-(m+1)`.
    rel: f64,
    /// Absolute term in units of the scale: half the spacing of subnormal codes, `2^(e-m-1)`.
    abs: f64,
    /// Relative rounding of the stored scale (0 for F32 and power-of-two E8M0 scales).
    scale_rounding: f64,
}

impl Bound {
    /// Relative slack on the bound for the f32 roundings of the division and the product.
    const SLACK: f64 = 1.0 / 65536.0;

    fn of(lut: &'static [f32; 256], scale_dtype: Dtype) -> Self {
        let (rel, abs) = if std::ptr::eq(lut, &E4M3_LUT) {
            (2f64.powi(-4), 2f64.powi(-10))
        } else {
            (2f64.powi(-3), 2f64.powi(-17)) // E5M2
        };
        let scale_rounding = match scale_dtype {
            Dtype::BF16 => 2f64.powi(-8),
            Dtype::F16 => 2f64.powi(-11),
            _ => 0.0,
        };
        Bound { rel, abs, scale_rounding }
    }

    /// The bound on `|x - x̂|` for a reference value `x` in a block of scale `s`.
    fn at(&self, x: f32, s: f32) -> f64 {
        let (x, s) = (f64::from(x).abs(), f64::from(s));
        let rounding = (x * self.rel).max(s * self.abs);
        (rounding + self.scale_rounding * (x + rounding)) * (1.0 + Self::SLACK)
    }
}

/// The element furthest beyond its [`Bound`], relative to it.
#[derive(Clone, Copy, Debug)]
struct Beyond {
    /// Index in the `[batch * rows, cols]` view.
    index: usize,
    x: f32,
    approx: f32,
    scale: f32,
    bound: f64,
    /// `|x - x̂| / bound`.
    ratio: f64,
}

/// Elements beyond their bound: how many, and the worst.
#[derive(Clone, Copy, Debug, Default)]
struct OverBound {
    count: u64,
    worst: Option<Beyond>,
}

impl OverBound {
    fn add(&mut self, b: Beyond) {
        self.count += 1;
        if self.worst.is_none_or(|w| b.ratio > w.ratio) {
            self.worst = Some(b);
        }
    }

    /// Merges `other`, on ties keeping the first element in the tensor (the result does not
    /// depend on the order stripes finish in).
    fn merge(mut self, other: OverBound) -> OverBound {
        self.count += other.count;
        self.worst = match (self.worst, other.worst) {
            (Some(a), Some(b)) => {
                Some(if (b.ratio, std::cmp::Reverse(b.index)) > (a.ratio, std::cmp::Reverse(a.index)) { b } else { a })
            }
            (a, b) => a.or(b),
        };
        self
    }
}

/// Checks rows `r0..` (`exact` and `approx` hold whole rows) against the bound of each element.
fn over_bound(w: &Fp8Weight<'_>, r0: usize, exact: &[f32], approx: &[f32], bound: Bound) -> OverBound {
    let g = &w.geom;
    let (cols, gc, gr) = (g.cols, g.grid_cols(), g.grid_rows());
    let mut out = OverBound::default();
    for (i, (xr, ar)) in exact.chunks_exact(cols).zip(approx.chunks_exact(cols)).enumerate() {
        let row = r0 + i;
        let grow = (row / g.rows) * gr + (row % g.rows) / g.block_rows;
        let srow = &w.scales[grow * gc..(grow + 1) * gc];
        for (j, ((xb, ab), &s)) in xr.chunks(g.block_cols).zip(ar.chunks(g.block_cols)).zip(srow).enumerate() {
            for (k, (&x, &a)) in xb.iter().zip(ab).enumerate() {
                let err = (f64::from(a) - f64::from(x)).abs();
                let b = bound.at(x, s);
                // A NaN error (a NaN in the reference) counts as beyond.
                if err > b || err.is_nan() {
                    let index = row * cols + j * g.block_cols + k;
                    out.add(Beyond { index, x, approx: a, scale: s, bound: b, ratio: err / b });
                }
            }
        }
    }
    out
}

/// Error statistics of the dequantized weight against the reference, and the elements beyond
/// their [`Bound`], computed stripe by stripe in parallel (memory: two f32 stripes per thread,
/// never the whole tensor). 128×128 E4M3 blocks go through `block.rs`'s dequantizer one 128-row
/// stripe at a time; other layouts through the general decoder.
fn compare_with_reference(
    w: &Fp8Weight<'_>,
    reference: &[u8],
    ref_dtype: Dtype,
    bound: Bound,
) -> (ErrorStats, OverBound) {
    let g = &w.geom;
    let (rows, cols) = (g.batch * g.rows, g.cols);
    if rows == 0 || cols == 0 {
        return (ErrorStats::default(), OverBound::default());
    }
    let standard = w.is_standard();
    let stripe = if standard { BLOCK } else { (1usize << 16).div_ceil(cols).max(1) };
    let elem = if ref_dtype == Dtype::F32 { 4 } else { 2 };
    let gc = g.grid_cols();
    (0..rows.div_ceil(stripe))
        .into_par_iter()
        .map(|si| {
            let r0 = si * stripe;
            let n = stripe.min(rows - r0);
            let mut approx = vec![0f32; n * cols];
            // A 128-row stripe of a standard weight is one row of the scale grid.
            let done = standard && {
                let (codes, scales) = (&w.codes[r0 * cols..(r0 + n) * cols], &w.scales[si * gc..(si + 1) * gc]);
                dequantize_weight_into(codes, scales, n, cols, &mut approx).is_ok()
            };
            if !done {
                w.decode_rows(r0, &mut approx, 1, |v, d: &mut [f32]| d[0] = v);
            }
            let mut exact = vec![0f32; n * cols];
            widen_into(ref_dtype, &reference[r0 * cols * elem..(r0 + n) * cols * elem], &mut exact);
            (compare(&exact, &approx), over_bound(w, r0, &exact, &approx, bound))
        })
        .reduce(
            || (ErrorStats::default(), OverBound::default()),
            |(mut a, oa), (b, ob)| {
                a.merge(&b);
                (a, oa.merge(ob))
            },
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::NoProgress;
    use crate::dequant::fixture::*;

    /// A fresh BF16 model and its default conversion, in a tempdir.
    fn converted() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let d = tempfile::tempdir().expect("tempdir");
        let (input, out) = (d.path().join("in"), d.path().join("out"));
        bf16_model(&input);
        convert_default(&input, &out);
        (d, input, out)
    }

    const SHARD2: &str = "model-00002-of-00002.safetensors";
    const EXPERT0: &str = "model.layers.1.mlp.experts.0.gate_proj.weight";

    fn problems_mention(r: &VerifyReport, words: &[&str]) -> bool {
        r.problems.iter().any(|p| words.iter().all(|w| p.contains(w)))
    }

    #[test]
    fn the_fp8_bound_holds_for_every_rounding_and_a_scale_off_by_two_breaks_it() {
        let bound = Bound::of(&E4M3_LUT, Dtype::F32);
        let mut rng = Rng::new(11);
        let mut broken = 0u32;
        for i in 0..400_000u32 {
            // Block maxima from 1e-30 to 1e10; values in the block up to it, the maximum itself too.
            let amax = half::bf16::from_f32(10f32.powf(rng.uniform() * 40.0 - 30.0)).to_f32();
            let x = if i % 5 == 0 { amax } else { (rng.uniform() * 2.0 - 1.0) * amax };
            let x = half::bf16::from_f32(x).to_f32();
            let s_f32 = amax.max(1e-12) / 448.0;
            let s_ue8m0 = 2f32.powi(s_f32.log2().ceil() as i32);
            assert!(s_ue8m0 >= s_f32 && s_ue8m0 < 2.0 * s_f32, "ue8m0 scale of {s_f32}");
            for s in [s_f32, s_ue8m0] {
                let q = E4M3_LUT[usize::from(crate::fp8::f32_to_e4m3(x / s))];
                let err = f64::from((q * s - x).abs());
                assert!(err <= bound.at(x, s), "x {x:e}, scale {s:e}: error {err:e} > bound {:e}", bound.at(x, s));
                // Dequantized with the scale doubled: beyond the bound wherever x / s is in the
                // normal range of E4M3 (below it, the absolute term 2^-10 s can hide the change).
                let err2 = f64::from((q * 2.0 * s - x).abs());
                if x.abs() >= 2f32.powi(-6) * s {
                    assert!(err2 > bound.at(x, 2.0 * s), "x {x:e}, scale {s:e} doubled: error {err2:e} within bound");
                    broken += 1;
                }
            }
        }
        assert!(broken > 500_000, "only {broken} cases where doubling the scale could be seen");
    }

    #[test]
    fn verify_passes_on_a_fresh_conversion() {
        let (_d, _input, out) = converted();
        let r = verify(&out, None, None, &NoProgress).expect("verify");
        assert!(r.ok, "{:?}", r.problems);
        assert!(r.files.iter().all(|f| f.status == FileStatus::Ok) && r.files.len() >= 5, "{:?}", r.files);
        assert!(r.tensors.is_empty() && r.worst.is_none());
    }

    #[test]
    fn verify_fails_naming_the_file_when_one_byte_of_a_weight_file_is_flipped() {
        let (_d, _input, out) = converted();
        let p = out.join(SHARD2);
        let mut bytes = std::fs::read(&p).expect("read");
        let i = bytes.len() - 100;
        bytes[i] ^= 0x01;
        std::fs::write(&p, &bytes).expect("write");
        let r = verify(&out, None, None, &NoProgress).expect("verify");
        assert!(!r.ok);
        assert!(problems_mention(&r, &[SHARD2, "sha256"]), "{:?}", r.problems);
        assert_eq!(r.files.iter().find(|f| f.file == SHARD2).map(|f| f.status), Some(FileStatus::Mismatch));
    }

    #[test]
    fn verify_fails_naming_the_tensor_when_a_scale_has_the_wrong_shape() {
        let (_d, _input, out) = converted();
        // [256, 256] weight: grid [2, 2]; stored as [4, 1] (same bytes, wrong shape).
        rewrite(&out.join(SHARD2), |t| {
            if t.0 == format!("{EXPERT0}_scale_inv") {
                t.2 = vec![4, 1];
            }
        });
        refresh_manifest(&out);
        let r = verify(&out, None, None, &NoProgress).expect("verify");
        assert!(!r.ok);
        assert!(
            problems_mention(&r, &[SHARD2, &format!("{EXPERT0}_scale_inv"), "[4, 1]", "[2, 2]"]),
            "{:?}",
            r.problems
        );
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
    }

    #[test]
    fn verify_fails_naming_file_and_tensor_when_an_fp8_code_is_nan() {
        let (_d, _input, out) = converted();
        rewrite(&out.join(SHARD2), |t| {
            if t.0 == EXPERT0 {
                t.3[77] = 0x7F;
                t.3[99] = 0xFF;
            }
        });
        refresh_manifest(&out);
        let r = verify(&out, None, None, &NoProgress).expect("verify");
        assert!(!r.ok);
        assert!(problems_mention(&r, &[SHARD2, EXPERT0, "2 NaN codes", "element 77"]), "{:?}", r.problems);
    }

    #[test]
    fn verify_fails_when_a_scale_is_zero_or_the_scale_tensor_is_missing() {
        let (_d, _input, out) = converted();
        let down = "model.layers.0.mlp.down_proj.weight";
        rewrite(&out.join("model-00001-of-00002.safetensors"), |t| {
            if t.0 == format!("{down}_scale_inv") {
                t.3[4..8].copy_from_slice(&0f32.to_le_bytes());
            }
            if t.0 == "model.layers.0.self_attn.q_proj.weight_scale_inv" {
                t.0 = "model.layers.0.self_attn.q_proj.weight_scale".into();
            }
        });
        let index_path = out.join(fp8forge_formats::checkpoint::INDEX_NAME);
        let mut index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&index_path).expect("index")).expect("json");
        let map = index["weight_map"].as_object_mut().expect("map");
        let file = map.shift_remove("model.layers.0.self_attn.q_proj.weight_scale_inv").expect("listed");
        map.insert("model.layers.0.self_attn.q_proj.weight_scale".into(), file);
        std::fs::write(&index_path, index.to_string()).expect("write index");
        refresh_manifest(&out);
        let r = verify(&out, None, None, &NoProgress).expect("verify");
        assert!(
            problems_mention(&r, &[&format!("{down}_scale_inv"), "not finite and > 0", "element 1"]),
            "{:?}",
            r.problems
        );
        assert!(problems_mention(&r, &["q_proj.weight", "without its scale tensor"]), "{:?}", r.problems);
        assert!(problems_mention(&r, &["q_proj.weight_scale", "is not the scale name"]), "{:?}", r.problems);
        assert_eq!(r.problems.len(), 3, "{:#?}", r.problems);
    }

    #[test]
    fn verify_reports_a_missing_manifest_as_a_problem_not_an_error() {
        let (_d, _input, out) = converted();
        std::fs::remove_file(out.join(MANIFEST_NAME)).expect("rm");
        let r = verify(&out, None, None, &NoProgress).expect("verify runs");
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        assert!(r.problems[0].contains("no SHA256SUMS manifest"));
    }

    #[test]
    fn verify_with_reference_gives_rel_rms_below_5_percent_on_gaussian_weights() {
        let (_d, input, out) = converted();
        let r = verify(&out, Some(&input), None, &NoProgress).expect("verify");
        assert!(r.ok, "{:?}", r.problems);
        assert_eq!(r.tensors.len(), 5);
        for t in &r.tensors {
            assert!(t.rel_rms < 0.05 && t.rel_rms > 0.0, "{}: rel_rms {}", t.name, t.rel_rms);
            assert!(t.snr_db.is_some_and(|s| s > 26.0), "{}: snr {:?}", t.name, t.snr_db);
        }
        let worst = r.worst.as_ref().expect("worst");
        assert!(r.tensors.iter().all(|t| t.rel_rms <= worst.rel_rms));
        // Same numbers as the converter measured while quantizing.
        let d2 = tempfile::tempdir().expect("tempdir");
        let rep = crate::convert::convert(
            &input,
            &d2.path().join("o"),
            &Default::default(),
            &Default::default(),
            &NoProgress,
        )
        .expect("convert");
        for t in &rep.tensors {
            let v = r.tensors.iter().find(|x| x.name == t.name).expect("reported");
            // Equal up to the order of the f64 sums.
            assert!((v.rel_rms - t.rel_rms).abs() <= 1e-6 * t.rel_rms, "{}: {} vs {}", t.name, v.rel_rms, t.rel_rms);
        }
    }

    #[test]
    fn verify_with_reference_names_pass_through_tensors_that_differ_or_are_missing() {
        let (_d, input, out) = converted();
        rewrite(&input.join(SHARD2), |t| {
            if t.0 == "model.norm.weight" {
                t.3[10] ^= 0x40;
            }
            if t.0 == "lm_head.weight" {
                t.0 = "lm_head2.weight".into();
            }
        });
        std::fs::remove_file(input.join(fp8forge_formats::checkpoint::INDEX_NAME)).expect("rm index");
        let r = verify(&out, Some(&input), None, &NoProgress).expect("verify");
        assert!(!r.ok);
        assert!(
            problems_mention(&r, &[SHARD2, "model.norm.weight", "differs from the reference", "byte 10"]),
            "{:?}",
            r.problems
        );
        assert!(problems_mention(&r, &["lm_head.weight", "not in the reference"]), "{:?}", r.problems);
        assert!(problems_mention(&r, &["lm_head2.weight", "missing from the checkpoint"]), "{:?}", r.problems);
        assert_eq!(r.problems.len(), 3, "{:?}", r.problems);
    }

    #[test]
    fn verify_with_reference_measures_non_standard_blocks_through_the_general_decoder() {
        let d = tempfile::tempdir().expect("tempdir");
        let (reference, q) = (d.path().join("ref"), d.path().join("q"));
        let mut rng = Rng::new(5);
        let (n, k) = (100, 70);
        let x = bf16_gaussian(&mut rng, n * k, 0.02);
        let xf = bf16_to_f32(&x);
        // Quantize by hand with 64×32 blocks, BF16 scales.
        let mut scales = [0f32; 2 * 3];
        for (bi, s) in scales.iter_mut().enumerate() {
            let (br, bc) = (bi / 3, bi % 3);
            let mut amax = 0f32;
            for r in br * 64..(br * 64 + 64).min(n) {
                for c in bc * 32..(bc * 32 + 32).min(k) {
                    amax = amax.max(xf[r * k + c].abs());
                }
            }
            *s = half::bf16::from_f32(amax / 448.0).to_f32();
        }
        let codes: Vec<u8> =
            (0..n * k).map(|i| crate::fp8::f32_to_e4m3(xf[i] / scales[(i / k / 64) * 3 + (i % k) / 32])).collect();
        write_checkpoint(&reference, &[vec![("w.weight".into(), Dtype::BF16, vec![n, k], x)]], &serde_json::json!({}));
        let qc = serde_json::json!({"quant_method": "fp8", "weight_block_size": [64, 32]});
        let sb: Vec<u8> = scales.iter().flat_map(|s| half::bf16::from_f32(*s).to_le_bytes()).collect();
        write_checkpoint(
            &q,
            &[vec![
                ("w.weight".into(), Dtype::F8_E4M3, vec![n, k], codes),
                ("w.weight_scale_inv".into(), Dtype::BF16, vec![2, 3], sb),
            ]],
            &serde_json::json!({"quantization_config": qc}),
        );
        let r = verify(&q, Some(&reference), None, &NoProgress).expect("verify");
        assert_eq!(r.problems, vec![format!("{}: no SHA256SUMS manifest", q.display())]);
        assert!(r.warnings.iter().any(|w| w.contains("BF16 scales")), "{:?}", r.warnings);
        let t = &r.tensors[0];
        assert!(t.rel_rms > 0.0 && t.rel_rms < 0.05, "rel_rms {}", t.rel_rms);
    }
}
