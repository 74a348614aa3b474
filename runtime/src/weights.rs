//! Reading a checkpoint's weights, whatever their storage. Weight matrices are read where they
//! lie in the mapped files ([`Stored`]: BF16/F16 bits, or FP8 codes with their scales), widened to
//! f32 a tile of rows at a time where they are used, and their pages released after
//! ([`Stored::release`]), so a model in use takes about one matrix of memory; vectors are read as
//! f32. BF16, F16 and F32 widen exactly; FP8 weights (DeepSeek `weight_scale_inv` or
//! compressed-tensors `weight_scale`, f32 or ue8m0 scales) dequantize as `q · s` per block, the
//! way `fp8forge dequant` and serving engines read them.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use fp8forge_formats::{Checkpoint, Dtype, SafetensorsFile, TensorInfo};
use fp8forge_quant::block::ScaleFormat;
use fp8forge_quant::scheme::{
    Fp8Scheme, Fp8Weight, ScaleGeometry, Strictness, code_lut, is_fp8_weight_dtype, scales_to_f32,
};
use serde_json::Value;

use crate::error::{Result, RuntimeError};
use crate::product::NR;

/// A tensor read as f32.
#[derive(Clone, Debug)]
pub struct Tensor {
    /// Row-major values.
    pub data: Vec<f32>,
    /// Shape.
    pub shape: Vec<usize>,
    /// True when the tensor was stored in FP8 (its layer's inputs are quantized under `--act-quant fp8`).
    pub fp8: bool,
}

/// A weight matrix `[rows, cols]` kept as it is stored, widened to f32 rows at a time
/// ([`Stored::decode_rows`]) with the same values a whole-tensor widening gives: borrowed from
/// the mapped file ([`Weights::map_matrix`]), or owned (`Stored<'static>`, f32 values).
#[derive(Clone, Debug)]
pub struct Stored<'a> {
    /// Rows (output features).
    pub rows: usize,
    /// Columns (input features).
    pub cols: usize,
    /// True when stored in FP8 (its layer's inputs are quantized under `--act-quant fp8`).
    pub fp8: bool,
    data: StoredData<'a>,
    /// Where a mapped matrix lies, to release its pages after use.
    src: Option<(&'a SafetensorsFile, &'a TensorInfo)>,
}

/// The bytes of a [`Stored`] matrix (BF16 and F16 as little-endian bytes).
#[derive(Clone, Debug)]
enum StoredData<'a> {
    F32(Vec<f32>),
    Bf16(Cow<'a, [u8]>),
    F16(Cow<'a, [u8]>),
    Fp8(Box<Fp8Data<'a>>),
}

/// An FP8 matrix's codes with what decodes them.
#[derive(Clone, Debug)]
struct Fp8Data<'a> {
    codes: Cow<'a, [u8]>,
    lut: &'static [f32; 256],
    scales: Vec<f32>,
    geom: ScaleGeometry,
}

impl Stored<'static> {
    /// A matrix of f32 values (`data.len() == rows * cols`).
    pub fn from_f32(data: Vec<f32>, rows: usize, cols: usize, fp8: bool) -> Self {
        Stored { rows, cols, fp8, data: StoredData::F32(data), src: None }
    }

    /// A matrix of BF16 bits (for tests of the widening paths).
    #[cfg(test)]
    pub(crate) fn from_bf16_bits(bits: Vec<u16>, rows: usize, cols: usize) -> Self {
        let bytes = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        Stored { rows, cols, fp8: false, data: StoredData::Bf16(Cow::Owned(bytes)), src: None }
    }

    /// A matrix of F16 bits (for tests of the widening paths).
    #[cfg(test)]
    pub(crate) fn from_f16_bits(bits: Vec<u16>, rows: usize, cols: usize) -> Self {
        let bytes = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        Stored { rows, cols, fp8: false, data: StoredData::F16(Cow::Owned(bytes)), src: None }
    }

    /// A matrix of E4M3 codes with one f32 scale per `block` (rows × columns) of it, row-major
    /// (for tests of the widening paths).
    #[cfg(test)]
    pub(crate) fn from_e4m3(codes: Vec<u8>, scales: Vec<f32>, rows: usize, cols: usize, block: (usize, usize)) -> Self {
        let geom = ScaleGeometry { batch: 1, rows, cols, block_rows: block.0, block_cols: block.1 };
        assert_eq!(scales.len(), geom.scale_count());
        let lut = &fp8forge_quant::fp8::E4M3_LUT;
        let data = StoredData::Fp8(Box::new(Fp8Data { codes: Cow::Owned(codes), lut, scales, geom }));
        Stored { rows, cols, fp8: true, data, src: None }
    }
}

impl Stored<'_> {
    /// The values, when stored as f32 (no widening needed).
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            StoredData::F32(v) => Some(v),
            _ => None,
        }
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> usize {
        match &self.data {
            StoredData::F32(v) => v.len() * 4,
            StoredData::Bf16(v) | StoredData::F16(v) => v.len(),
            StoredData::Fp8(f) => f.codes.len() + f.scales.len() * 4,
        }
    }

    /// Drops the resident pages of a matrix read from the mapped file (nothing for a copy): the
    /// next use refaults them from the page cache, so a layer in use takes no memory beyond the
    /// matrix being multiplied.
    pub fn release(&self) {
        if let Some((file, t)) = self.src {
            file.release(t);
        }
    }

    /// Widens rows `row0..row0 + out.len() / cols` into `out` (row-major).
    pub fn decode_rows(&self, row0: usize, out: &mut [f32]) {
        let c = self.cols;
        let range = row0 * c..row0 * c + out.len();
        match &self.data {
            StoredData::F32(v) => out.copy_from_slice(&v[range]),
            StoredData::Bf16(v) => {
                for (o, b) in out.iter_mut().zip(v[range.start * 2..range.end * 2].chunks_exact(2)) {
                    *o = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
                }
            }
            StoredData::F16(v) => {
                for (o, b) in out.iter_mut().zip(v[range.start * 2..range.end * 2].chunks_exact(2)) {
                    *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            StoredData::Fp8(f) => {
                let w = Fp8Weight { codes: &f.codes, lut: f.lut, scales: &f.scales, geom: f.geom };
                w.decode_rows(row0, out, 1, |v, d: &mut [f32]| d[0] = v);
            }
        }
    }

    /// The whole matrix widened to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.decode_rows(0, &mut out);
        out
    }

    /// The first element that widens to a value that is not finite, with that value: the stored
    /// bits are scanned first (in parallel, without widening), and only a matrix that may hold
    /// one is widened to find it.
    fn first_non_finite(&self) -> Option<(usize, f32)> {
        if self.may_hold_non_finite() { self.first_non_finite_widened() } else { None }
    }

    /// False when no element can widen to a non-finite value, decided on the stored bits: BF16 and
    /// F16 exponents all ones, FP8 codes whose table value is not finite or scales that make one
    /// so (`|s| · max |code value|` overflowing, or a non-finite scale).
    fn may_hold_non_finite(&self) -> bool {
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 20;
        let any_u16 = |v: &[u8], mask: u16| {
            v.par_chunks(CHUNK)
                .any(|c| c.chunks_exact(2).fold(false, |a, b| a | (u16::from_le_bytes([b[0], b[1]]) & mask == mask)))
        };
        match &self.data {
            StoredData::F32(v) => v.par_chunks(CHUNK / 4).any(|c| !c.iter().fold(true, |a, x| a & x.is_finite())),
            StoredData::Bf16(v) => any_u16(v, 0x7F80),
            StoredData::F16(v) => any_u16(v, 0x7C00),
            StoredData::Fp8(f) => {
                let max = f.lut.iter().filter(|v| v.is_finite()).fold(0f32, |m, v| m.max(v.abs()));
                if !f.scales.iter().all(|&s| (s * max).is_finite()) {
                    return true;
                }
                let bad: Vec<bool> = f.lut.iter().map(|v| !v.is_finite()).collect();
                let e4m3 = bad.iter().enumerate().all(|(q, &b)| b == (q & 0x7F == 0x7F));
                if e4m3 {
                    // E4M3's only non-finite codes are its two NaNs, 0x7F and 0xFF.
                    f.codes.par_chunks(CHUNK).any(|c| c.iter().fold(false, |a, &q| a | (q & 0x7F == 0x7F)))
                } else {
                    f.codes.par_chunks(CHUNK).any(|c| c.iter().fold(false, |a, &q| a | bad[usize::from(q)]))
                }
            }
        }
    }

    /// [`Stored::first_non_finite`] by widening every row.
    fn first_non_finite_widened(&self) -> Option<(usize, f32)> {
        const CHUNK_ROWS: usize = 64;
        let mut buf = vec![0f32; CHUNK_ROWS.min(self.rows) * self.cols];
        for r0 in (0..self.rows).step_by(CHUNK_ROWS) {
            let n = CHUNK_ROWS.min(self.rows - r0) * self.cols;
            self.decode_rows(r0, &mut buf[..n]);
            if let Some(i) = buf[..n].iter().position(|x| !x.is_finite()) {
                return Some((r0 * self.cols + i, buf[i]));
            }
        }
        None
    }
}

impl crate::product::PackB for Stored<'_> {
    fn n(&self) -> usize {
        self.rows
    }

    fn k(&self) -> usize {
        self.cols
    }

    /// Widens the panel of rows `n0..n0 + nn` and columns `k0..k0 + kc` straight into the
    /// product's packed layout, with the values [`Stored::decode_rows`] gives.
    fn pack(&self, n0: usize, nn: usize, k0: usize, kc: usize, dst: &mut [f32]) {
        let c = self.cols;
        for j in 0..nn {
            let row = n0 + j;
            let col = dst[j..].iter_mut().step_by(NR);
            let span = row * c + k0..row * c + k0 + kc;
            match &self.data {
                StoredData::F32(v) => col.zip(&v[span]).for_each(|(d, &x)| *d = x),
                StoredData::Bf16(v) => col
                    .zip(v[span.start * 2..span.end * 2].chunks_exact(2))
                    .for_each(|(d, b)| *d = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)),
                StoredData::F16(v) => col
                    .zip(v[span.start * 2..span.end * 2].chunks_exact(2))
                    .for_each(|(d, b)| *d = half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
                StoredData::Fp8(f) => {
                    let g = &f.geom;
                    let (gr, gc) = (g.grid_rows(), g.grid_cols());
                    let grow = (row / g.rows) * gr + (row % g.rows) / g.block_rows;
                    let scales = &f.scales[grow * gc..(grow + 1) * gc];
                    let codes = &f.codes[span];
                    let mut col = col;
                    let mut p = 0;
                    while p < kc {
                        let kb = (k0 + p) / g.block_cols;
                        let end = ((kb + 1) * g.block_cols - k0).min(kc);
                        let s = scales[kb];
                        // Codes first: `zip` takes from its first iterator before finding the
                        // second exhausted, and `col` continues past this block.
                        for (&q, d) in codes[p..end].iter().zip(col.by_ref()) {
                            *d = f.lut[usize::from(q)] * s;
                        }
                        p = end;
                    }
                }
            }
        }
    }
}

/// How activations are quantized at run time by the serving engine this checkpoint targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActScheme {
    /// No quantized weights: nothing to quantize.
    None,
    /// Dynamic per-token 1×128 FP8 groups with scales of this format.
    Dynamic(ScaleFormat),
    /// Static activation scales (`input_scale` tensors), which the runtime does not simulate.
    Static,
}

/// The weights of a checkpoint, indexed by name.
pub struct Weights {
    root: PathBuf,
    ckpt: Checkpoint,
    index: HashMap<String, (usize, usize)>,
    scheme: Fp8Scheme,
    /// Activation quantization that the checkpoint's `quantization_config` asks for.
    pub act_scheme: ActScheme,
    /// One-line description of the storage (`"bf16"`, `"fp8 e4m3, 128x128 blocks, f32 scales"`).
    pub description: String,
}

impl Weights {
    /// Opens a checkpoint (a directory or one `.safetensors` file) and reads its quantization config.
    pub fn open(path: &Path) -> Result<Self> {
        let ckpt = Checkpoint::open(path)?;
        let mut index = HashMap::new();
        for (si, s) in ckpt.shards.iter().enumerate() {
            for (ti, t) in s.file.header().tensors.iter().enumerate() {
                index.insert(t.name.clone(), (si, ti));
            }
        }
        let config_file = ckpt.root.join("config.json");
        let scheme = Fp8Scheme::from_config(ckpt.config.as_ref())
            .map_err(|e| RuntimeError::Config { file: config_file.clone(), reason: e.to_string() })?;
        let mut w = Weights {
            root: ckpt.root.clone(),
            ckpt,
            index,
            scheme,
            act_scheme: ActScheme::None,
            description: String::new(),
        };
        let fp8 = w.tensors().filter(|t| is_fp8_weight_dtype(t.dtype)).count();
        w.act_scheme = if fp8 == 0 { ActScheme::None } else { act_scheme(w.ckpt.config.as_ref()) };
        w.description = w.describe(fp8);
        Ok(w)
    }

    /// The checkpoint's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The parsed config.json, if the checkpoint has one.
    pub fn config(&self) -> Option<&Value> {
        self.ckpt.config.as_ref()
    }

    fn tensors(&self) -> impl Iterator<Item = &TensorInfo> {
        self.ckpt.shards.iter().flat_map(|s| s.file.header().tensors.iter())
    }

    fn describe(&self, fp8: usize) -> String {
        if fp8 > 0 {
            let fmt = match self.act_scheme {
                ActScheme::Dynamic(ScaleFormat::Ue8m0) => "ue8m0 scales",
                _ => "f32 scales",
            };
            let method = self.scheme.method.as_deref().unwrap_or("fp8");
            return format!("fp8 e4m3 ({method}, {}, {fmt})", self.scheme.layout.describe());
        }
        let mut by: HashMap<String, usize> = HashMap::new();
        for t in self.tensors() {
            *by.entry(format!("{:?}", t.dtype).to_lowercase()).or_default() += t.nbytes();
        }
        by.into_iter().max_by_key(|(_, n)| *n).map(|(d, _)| d).unwrap_or_default()
    }

    /// True when the checkpoint holds `name`.
    pub fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Drops every resident page of the checkpoint's files (after a layer is loaded).
    pub fn release_all(&self) {
        for s in &self.ckpt.shards {
            s.file.release_all();
        }
    }

    fn info(&self, name: &str) -> Option<(usize, &TensorInfo)> {
        let &(si, ti) = self.index.get(name)?;
        Some((si, &self.ckpt.shards[si].file.header().tensors[ti]))
    }

    fn error(&self, shard: Option<usize>, tensor: &str, reason: String) -> RuntimeError {
        let file = shard.map(|s| self.ckpt.shards[s].file.path().to_owned()).unwrap_or_else(|| self.root.clone());
        RuntimeError::Tensor { file, tensor: tensor.to_owned(), reason }
    }

    /// Reads `name` as f32, checking that its shape is `shape`. The file pages are released
    /// afterwards, so reading a model layer by layer keeps one layer resident, not the model.
    pub fn load(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (si, t) = self.info(name).ok_or_else(|| self.error(None, name, "missing from the checkpoint".into()))?;
        if t.shape != shape {
            return Err(self.error(Some(si), name, format!("shape {:?}, expected {shape:?}", t.shape)));
        }
        let file = &self.ckpt.shards[si].file;
        let bytes = file.data(t);
        let n: usize = shape.iter().product();
        let mut data = vec![0f32; n];
        let fp8 = is_fp8_weight_dtype(t.dtype);
        match t.dtype {
            Dtype::F32 => {
                for (d, b) in data.iter_mut().zip(bytes.chunks_exact(4)) {
                    *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Dtype::BF16 => {
                for (d, b) in data.iter_mut().zip(bytes.chunks_exact(2)) {
                    *d = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            Dtype::F16 => {
                for (d, b) in data.iter_mut().zip(bytes.chunks_exact(2)) {
                    *d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            d if fp8 => self.dequantize(si, t, bytes, &mut data, d)?,
            d => return Err(self.error(Some(si), name, format!("dtype {d:?} is not a float weight type"))),
        }
        file.release(t);
        if let Some(i) = data.iter().position(|x| !x.is_finite()) {
            return Err(self.error(Some(si), name, format!("non-finite value {} at element {i}", data[i])));
        }
        Ok(Tensor { data, shape: shape.to_vec(), fp8 })
    }

    /// The matrix `name` of shape `[rows, cols]` read where it lies in the mapped file, without a
    /// copy and without checking its values ([`Weights::map_checked`] does); release its pages
    /// with [`Weights::release_all`] once used.
    pub fn map_matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Stored<'_>> {
        let (si, t, bytes) = self.matrix_bytes(name, rows, cols)?;
        let mut m = self.matrix(si, t, Cow::Borrowed(bytes))?;
        m.src = Some((&self.ckpt.shards[si].file, t));
        Ok(m)
    }

    /// [`Weights::map_matrix`], its values checked once (every one must widen to a finite
    /// number) and its pages released until it is used.
    pub fn map_checked(&self, name: &str, rows: usize, cols: usize) -> Result<Stored<'_>> {
        let (si, t, bytes) = self.matrix_bytes(name, rows, cols)?;
        let mut m = self.matrix(si, t, Cow::Borrowed(bytes))?;
        m.src = Some((&self.ckpt.shards[si].file, t));
        let bad = m.first_non_finite();
        m.release();
        match bad {
            Some((i, v)) => Err(self.error(Some(si), name, format!("non-finite value {v} at element {i}"))),
            None => Ok(m),
        }
    }

    /// The shard index, header entry and bytes of the matrix `name`, its shape checked.
    fn matrix_bytes(&self, name: &str, rows: usize, cols: usize) -> Result<(usize, &TensorInfo, &[u8])> {
        let (si, t) = self.info(name).ok_or_else(|| self.error(None, name, "missing from the checkpoint".into()))?;
        if t.shape != [rows, cols] {
            return Err(self.error(Some(si), name, format!("shape {:?}, expected {:?}", t.shape, [rows, cols])));
        }
        Ok((si, t, self.ckpt.shards[si].file.data(t)))
    }

    /// A [`Stored`] over `bytes`, the data of `t` in shard `si`.
    fn matrix<'a>(&self, si: usize, t: &TensorInfo, bytes: Cow<'a, [u8]>) -> Result<Stored<'a>> {
        let data = match t.dtype {
            Dtype::F32 => {
                StoredData::F32(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
            }
            Dtype::BF16 => StoredData::Bf16(bytes),
            Dtype::F16 => StoredData::F16(bytes),
            d if is_fp8_weight_dtype(d) => {
                let (lut, scales, geom) = self.fp8_parts(si, t, d)?;
                StoredData::Fp8(Box::new(Fp8Data { codes: bytes, lut, scales, geom }))
            }
            d => return Err(self.error(Some(si), &t.name, format!("dtype {d:?} is not a float weight type"))),
        };
        Ok(Stored { rows: t.shape[0], cols: t.shape[1], fp8: is_fp8_weight_dtype(t.dtype), data, src: None })
    }

    /// Bytes the tensors whose name starts with `prefix` take in memory once loaded: matrices of
    /// more than `widened_up_to` elements none for long (read from the mapped files, released
    /// after each use) but counted as stored, smaller ones widened to f32, vectors read as f32.
    pub fn loaded_bytes_with_prefix(&self, prefix: &str, widened_up_to: usize) -> u64 {
        self.index
            .keys()
            .filter(|n| n.starts_with(prefix))
            .filter_map(|n| self.info(n))
            .map(|(_, t)| {
                let n = t.shape.iter().product::<usize>();
                if t.shape.len() == 2 && n > widened_up_to { t.nbytes() as u64 } else { n as u64 * 4 }
            })
            .sum()
    }

    /// The tensors whose name starts with `prefix`, as their headers describe them (no data read).
    pub fn tensors_with_prefix<'s>(&'s self, prefix: &'s str) -> impl Iterator<Item = &'s TensorInfo> + 's {
        self.tensors().filter(move |t| t.name.starts_with(prefix))
    }

    /// Total bytes of the checkpoint's tensor data.
    pub fn stored_bytes(&self) -> u64 {
        self.tensors().map(|t| t.nbytes() as u64).sum()
    }

    fn dequantize(&self, si: usize, t: &TensorInfo, codes: &[u8], out: &mut [f32], dtype: Dtype) -> Result<()> {
        let (lut, scales, geom) = self.fp8_parts(si, t, dtype)?;
        let w = Fp8Weight { codes, lut, scales: &scales, geom };
        w.decode_rows(0, out, 1, |v, d: &mut [f32]| d[0] = v);
        Ok(())
    }

    /// The decode table, scales (as f32) and scale geometry of the FP8 weight `t`.
    fn fp8_parts(
        &self,
        si: usize,
        t: &TensorInfo,
        dtype: Dtype,
    ) -> Result<(&'static [f32; 256], Vec<f32>, ScaleGeometry)> {
        let lut = code_lut(dtype)
            .ok_or_else(|| self.error(Some(si), &t.name, format!("FP8 dtype {dtype:?} is not supported")))?;
        let (ssi, st, geom) =
            self.scheme.locate_scale(t, Strictness::Lenient, |n| self.info(n)).map_err(|e| {
                match e.scale_tensor().and_then(|n| self.info(n)) {
                    Some((ssi, st)) => self.error(Some(ssi), &st.name, e.to_string()),
                    None => self.error(Some(si), &t.name, e.to_string()),
                }
            })?;
        let sfile = &self.ckpt.shards[ssi].file;
        let scales = scales_to_f32(st.dtype, sfile.data(st))
            .ok_or_else(|| self.error(Some(ssi), &st.name, format!("scale dtype {:?} is not supported", st.dtype)))?;
        sfile.release(st);
        Ok((lut, scales, geom))
    }
}

/// The activation scheme named by a `quantization_config` (dynamic 1×128 FP8 unless it says static).
fn act_scheme(config: Option<&Value>) -> ActScheme {
    let Some(qc) = config.and_then(|c| c.get("quantization_config")) else {
        return ActScheme::Dynamic(ScaleFormat::F32);
    };
    let fmt = match qc.get("scale_fmt").and_then(Value::as_str) {
        Some("ue8m0") => ScaleFormat::Ue8m0,
        _ => ScaleFormat::F32,
    };
    if qc.get("activation_scheme").and_then(Value::as_str) == Some("static") {
        return ActScheme::Static;
    }
    let Some(groups) = qc.get("config_groups").and_then(Value::as_object) else {
        return ActScheme::Dynamic(fmt);
    };
    // compressed-tensors: a group without input_activations is weight-only (W8A16).
    let mut dynamic = false;
    for a in groups.values().filter_map(|g| g.get("input_activations")).filter(|a| !a.is_null()) {
        if a.get("dynamic").and_then(Value::as_bool) == Some(false) {
            return ActScheme::Static;
        }
        dynamic = true;
    }
    if dynamic { ActScheme::Dynamic(fmt) } else { ActScheme::None }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fp8forge_formats::{PlannedTensor, ShardWriter};

    const BENCH_ROWS: usize = 2048;
    const BENCH_COLS: usize = 7168;

    #[test]
    fn values_check_on_stored_bits_finds_what_widening_finds() {
        let (n, k) = (300usize, 260usize);
        let clean_bf16: Vec<u16> = (0..n * k).map(|i| half::bf16::from_f32(i as f32 / 7.0 - 9.0).to_bits()).collect();
        let clean_f16: Vec<u16> = (0..n * k).map(|i| half::f16::from_f32(i as f32 / 900.0 - 9.0).to_bits()).collect();
        let codes: Vec<u8> = (0..n * k).map(|i| (i % 126) as u8 | ((i & 1) << 7) as u8).collect();
        let scales = vec![0.5f32; 3 * 3];
        let mut cases: Vec<(String, Stored<'static>, Option<usize>)> = vec![
            ("clean bf16".into(), Stored::from_bf16_bits(clean_bf16.clone(), n, k), None),
            ("clean f16".into(), Stored::from_f16_bits(clean_f16.clone(), n, k), None),
            ("clean fp8".into(), Stored::from_e4m3(codes.clone(), scales.clone(), n, k, (128, 128)), None),
            ("clean f32".into(), Stored::from_f32(vec![1.0; n * k], n, k, false), None),
        ];
        for &i in &[0usize, 4321, n * k - 1] {
            let mut b = clean_bf16.clone();
            b[i] = 0x7FC0; // NaN
            b[(i + 7) % (n * k)] = 0xFF80; // -inf, later (or earlier: the first one counts)
            let first = i.min((i + 7) % (n * k));
            cases.push((format!("bf16 NaN at {i}"), Stored::from_bf16_bits(b, n, k), Some(first)));
            let mut h = clean_f16.clone();
            h[i] = 0x7C00; // inf
            cases.push((format!("f16 inf at {i}"), Stored::from_f16_bits(h, n, k), Some(i)));
            let mut c = codes.clone();
            c[i] = 0xFF; // NaN
            cases.push((
                format!("fp8 NaN code at {i}"),
                Stored::from_e4m3(c, scales.clone(), n, k, (128, 128)),
                Some(i),
            ));
            let mut f = vec![1.0f32; n * k];
            f[i] = f32::NAN;
            cases.push((format!("f32 NaN at {i}"), Stored::from_f32(f, n, k, false), Some(i)));
        }
        // A scale that overflows the codes above 340 (352 · 1e36 > f32::MAX), and a NaN scale: the first element
        // of the block whose product is not finite.
        let mut big = scales.clone();
        big[4] = 1e36;
        let first_big = (0..n * k).find(|&i| (i / k) / 128 == 1 && (i % k) / 128 == 1 && (codes[i] & 0x7F) >= 0x7B);
        cases.push((
            "fp8 overflowing scale".into(),
            Stored::from_e4m3(codes.clone(), big, n, k, (128, 128)),
            first_big,
        ));
        let mut nan = scales.clone();
        nan[8] = f32::NAN;
        cases.push((
            "fp8 NaN scale".into(),
            Stored::from_e4m3(codes.clone(), nan, n, k, (128, 128)),
            Some(256 * k + 256),
        ));
        for (what, m, want) in &cases {
            let got = m.first_non_finite();
            assert_eq!(got.map(|g| g.0), *want, "{what}: first non-finite element");
            assert_eq!(got.map(|g| g.0), m.first_non_finite_widened().map(|g| g.0), "{what}: against widening");
            if let Some((i, v)) = got {
                assert!(!v.is_finite() && m.to_f32()[i].to_bits() == v.to_bits(), "{what}: value {v}");
            }
        }
    }

    /// A checkpoint of `count` matrices `BENCH_ROWS × BENCH_COLS` in `dtype` (BF16, or E4M3 with
    /// 128×128 f32 scales), finite values; returns the matrix names.
    fn write_bench_checkpoint(dir: &Path, dtype: Dtype, count: usize) -> Vec<String> {
        let names: Vec<String> = (0..count).map(|i| format!("model.layers.{i}.mlp.down_proj.weight")).collect();
        if dir.join("model.safetensors").exists() {
            return names;
        }
        std::fs::create_dir_all(dir).expect("bench dir");
        let (r, c) = (BENCH_ROWS, BENCH_COLS);
        let fp8 = dtype != Dtype::BF16;
        let config = if fp8 {
            r#"{"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}"#
        } else {
            "{}"
        };
        std::fs::write(dir.join("config.json"), config).expect("config");
        let mut planned = Vec::new();
        for n in &names {
            planned.push(PlannedTensor { name: n.clone(), dtype, shape: vec![r, c] });
            if fp8 {
                planned.push(PlannedTensor {
                    name: format!("{n}_scale_inv"),
                    dtype: Dtype::F32,
                    shape: vec![r / 128, c / 128],
                });
            }
        }
        let mut w = ShardWriter::create(&dir.join("model.safetensors"), planned).expect("create");
        let data: Vec<u8> = if fp8 {
            (0..r * c).map(|i| ((i.wrapping_mul(2654435761) >> 7) % 126) as u8 | ((i & 1) << 7) as u8).collect()
        } else {
            (0..r * c).flat_map(|i| (((i.wrapping_mul(2654435761) >> 9) as u16) & 0xBFFF).to_le_bytes()).collect()
        };
        let scales: Vec<u8> =
            (0..(r / 128) * (c / 128)).flat_map(|i| (1e-3f32 * (1.0 + i as f32)).to_le_bytes()).collect();
        for n in &names {
            w.write_tensor(n, &[&data]).expect("write");
            if fp8 {
                w.write_tensor(&format!("{n}_scale_inv"), &[&scales]).expect("write scales");
            }
        }
        w.finish().expect("finish");
        names
    }

    /// Reads `path` once so that it is in the page cache.
    fn warm(path: &Path) {
        use std::io::Read;
        let mut f = std::fs::File::open(path).expect("open");
        let mut buf = vec![0u8; 8 << 20];
        while f.read(&mut buf).expect("read") > 0 {}
    }

    /// `cargo test --release -p fp8forge-runtime --lib -- --ignored --nocapture bench_load`: GB/s
    /// of opening a checkpoint and mapping and checking every matrix (as `Linear::load` does),
    /// files in the page cache; 2 GB of BF16 and 1 GB of FP8 kept in `target/bench-load`.
    #[test]
    #[ignore = "benchmark; writes 3 GB under target/bench-load"]
    fn bench_load() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-load");
        for (dtype, label) in [(Dtype::BF16, "bf16"), (Dtype::F8_E4M3, "fp8")] {
            let dir = root.join(label);
            let names = write_bench_checkpoint(&dir, dtype, 70);
            let file = dir.join("model.safetensors");
            warm(&file);
            let bytes = std::fs::metadata(&file).expect("stat").len() as f64;
            let (mut check, mut touch) = (Vec::new(), Vec::new());
            for _ in 0..3 {
                let s = std::time::Instant::now();
                let w = Weights::open(&dir).expect("open");
                for n in &names {
                    w.map_checked(n, BENCH_ROWS, BENCH_COLS).expect("map");
                }
                check.push(bytes / s.elapsed().as_secs_f64() / 1e9);
                // The page faults alone: one byte read per page, pages released after.
                let s = std::time::Instant::now();
                let mut sum = 0u64;
                for n in &names {
                    let (si, t, b) = w.matrix_bytes(n, BENCH_ROWS, BENCH_COLS).expect("bytes");
                    sum += b.iter().step_by(4096).map(|&x| u64::from(x)).sum::<u64>();
                    w.ckpt.shards[si].file.release(t);
                }
                std::hint::black_box(sum);
                touch.push(bytes / s.elapsed().as_secs_f64() / 1e9);
            }
            println!(
                "{label}: {:.2} GB, open + map_checked {:?} GB/s, page faults alone {:?} GB/s",
                bytes / 1e9,
                check,
                touch
            );
        }
    }
}
