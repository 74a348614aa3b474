//! The FP8 scheme vocabulary shared by every command that reads FP8 checkpoints (`dequant`,
//! `verify`, `inspect`, the runtime): what `quantization_config` says ([`Fp8Scheme`]), how scales
//! are laid out over a weight ([`ScaleLayout`], [`ScaleGeometry`]), which tensor is a weight's
//! scale ([`Fp8Scheme::locate_scale`]), and how codes and scales decode ([`Fp8Weight`]).
//! Quantizing is `block.rs`'s; this module only reads.

use fp8forge_formats::{Dtype, TensorInfo};
use rayon::prelude::*;
use serde::Serialize;
use serde_json::Value;

use crate::block::{BLOCK, dequantize_weight_to_bf16};
use crate::fp8::{E4M3_LUT, E5M2_LUT};

/// Why a `quantization_config` cannot be read. Each message is about `quantization_config`; the
/// caller names the file.
#[derive(Debug, thiserror::Error)]
pub enum SchemeError {
    /// A block size is not two positive integers.
    #[error("quantization_config.{field} {value} is not two positive integers")]
    BadBlock {
        /// The field, below `quantization_config`.
        field: String,
        /// Its value, as JSON.
        value: String,
    },
    /// A compressed-tensors group names a weight strategy that is not a scale layout.
    #[error("quantization_config.config_groups.{group}.weights.strategy {strategy:?} is not block, channel or tensor")]
    BadStrategy {
        /// The group.
        group: String,
        /// The strategy given.
        strategy: String,
    },
    /// Compressed-tensors groups disagree on the weight layout.
    #[error("quantization_config.config_groups mix weight layouts ({layouts}), which is not supported")]
    MixedLayouts {
        /// The layouts, described.
        layouts: String,
    },
}

/// Why an FP8 weight's scale tensor cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ScaleError {
    /// No tensor of a scale name is in the checkpoint.
    #[error("FP8 weight without its scale tensor (looked for {})", looked_for.join(", "))]
    Missing {
        /// The names looked for, preferred first.
        looked_for: Vec<String>,
    },
    /// The scale tensor's dtype is not one scales are stored in.
    #[error("scale dtype {dtype:?} is not supported (F32, BF16, F16, F8_E8M0 are)")]
    Dtype {
        /// The scale tensor.
        scale_tensor: String,
        /// Its dtype.
        dtype: Dtype,
    },
    /// The scale tensor's shape fits no layout the scheme allows for this weight.
    #[error(transparent)]
    Shape(Box<ShapeMismatch>),
}

/// A scale tensor whose shape fits no layout the scheme allows for its weight.
#[derive(Debug, thiserror::Error)]
#[error(
    "scale shape {scale:?} does not fit weight {weight} of shape {weight_shape:?}: {layout} need {expected:?}{also}"
)]
pub struct ShapeMismatch {
    /// The scale tensor.
    pub scale_tensor: String,
    /// The weight's name.
    pub weight: String,
    /// The weight's shape.
    pub weight_shape: Vec<usize>,
    /// The scale tensor's shape.
    pub scale: Vec<usize>,
    /// The declared layout, described.
    pub layout: String,
    /// The shape it needs.
    pub expected: Vec<usize>,
    /// The other layouts that were tried, if any (" (or 1 element per tensor, ...)").
    pub also: &'static str,
}

impl ScaleError {
    /// The scale tensor at fault, when one was found (the weight is at fault otherwise).
    pub fn scale_tensor(&self) -> Option<&str> {
        match self {
            ScaleError::Missing { .. } => None,
            ScaleError::Dtype { scale_tensor, .. } => Some(scale_tensor),
            ScaleError::Shape(m) => Some(&m.scale_tensor),
        }
    }
}

/// How strictly [`Fp8Scheme::locate_scale`] reads a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strictness {
    /// As declared, as a serving engine loads it (`verify`): the config's scale suffixes and its
    /// layout only.
    Declared,
    /// As found (`dequant`, the runtime): either suffix convention, and per-tensor or per-channel
    /// scales besides the declared layout.
    Lenient,
}

/// Block size assumed when config.json names none (DeepSeek's and ours).
pub const DEFAULT_BLOCK: [usize; 2] = [BLOCK, BLOCK];

/// How the scales of an FP8 weight are laid out over it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScaleLayout {
    /// One scale per `[rows, cols]` block: grid `[ceil(N/rows), ceil(K/cols)]` (leading dims of a
    /// stacked weight kept).
    Block([usize; 2]),
    /// One scale per output row: shape `[N, 1]` or `[N]`.
    Channel,
    /// One scale for the whole tensor (any shape with one element).
    Tensor,
}

/// Where each scale of one FP8 weight applies: the weight is seen as `batch` matrices of
/// `rows × cols` (leading dims flattened), each cut into `block_rows × block_cols` blocks with one
/// scale per block, scales row-major over `[batch, ceil(rows/block_rows), ceil(cols/block_cols)]`.
/// Per-tensor and per-channel scales are blocks of the whole matrix and of one row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScaleGeometry {
    /// Number of stacked matrices (1 for a 2-D weight).
    pub batch: usize,
    /// Rows of each matrix (N).
    pub rows: usize,
    /// Columns of each matrix (K).
    pub cols: usize,
    /// Rows per block (at least 1).
    pub block_rows: usize,
    /// Columns per block (at least 1).
    pub block_cols: usize,
}

impl ScaleGeometry {
    /// Rows of the scale grid of one matrix.
    pub fn grid_rows(&self) -> usize {
        self.rows.div_ceil(self.block_rows)
    }

    /// Columns of the scale grid.
    pub fn grid_cols(&self) -> usize {
        self.cols.div_ceil(self.block_cols)
    }

    /// Number of scales.
    pub fn scale_count(&self) -> usize {
        self.batch * self.grid_rows() * self.grid_cols()
    }

    /// True for DeepSeek's 128×128 blocks on one matrix: the layout `block.rs` handles.
    pub fn is_standard_block(&self) -> bool {
        self.batch == 1 && self.block_rows == BLOCK && self.block_cols == BLOCK
    }
}

/// Splits a weight shape into (leading dims, rows, cols); a 1-D tensor is one row.
fn matrix_dims(shape: &[usize]) -> (&[usize], usize, usize) {
    match shape {
        [] => (&[], 1, 1),
        [k] => (&[], 1, *k),
        [lead @ .., n, k] => (lead, *n, *k),
    }
}

impl ScaleLayout {
    /// The scale shape this layout wants for a weight of shape `weight` (for per-tensor scales,
    /// `[1]`; per-channel, `[..., N, 1]`).
    pub fn expected_shape(&self, weight: &[usize]) -> Vec<usize> {
        let (lead, n, k) = matrix_dims(weight);
        let mut s = lead.to_vec();
        match self {
            ScaleLayout::Block([bn, bk]) => s.extend([n.div_ceil(*bn), k.div_ceil(*bk)]),
            ScaleLayout::Channel => s.extend([n, 1]),
            ScaleLayout::Tensor => return vec![1],
        }
        s
    }

    /// The geometry of a scale tensor of shape `scale` on a weight of shape `weight` under this
    /// layout, or `None` when the shapes do not fit it.
    pub fn fit(&self, weight: &[usize], scale: &[usize]) -> Option<ScaleGeometry> {
        let (lead, n, k) = matrix_dims(weight);
        let batch: usize = lead.iter().product();
        match *self {
            ScaleLayout::Block([bn, bk]) => (bn > 0 && bk > 0 && scale == self.expected_shape(weight))
                .then_some(ScaleGeometry { batch, rows: n, cols: k, block_rows: bn, block_cols: bk }),
            ScaleLayout::Channel => {
                let per_row = scale.len() == lead.len() + 1 && scale[..lead.len()] == *lead && scale[lead.len()] == n;
                (per_row || scale == self.expected_shape(weight)).then_some(ScaleGeometry {
                    batch,
                    rows: n,
                    cols: k,
                    block_rows: 1,
                    block_cols: k.max(1),
                })
            }
            ScaleLayout::Tensor => (scale.iter().product::<usize>() == 1).then_some(ScaleGeometry {
                batch: 1,
                rows: batch * n,
                cols: k,
                block_rows: (batch * n).max(1),
                block_cols: k.max(1),
            }),
        }
    }

    /// Words for messages: "128x128 blocks", "per-channel", "per-tensor".
    pub fn describe(&self) -> String {
        match self {
            ScaleLayout::Block([bn, bk]) => format!("{bn}x{bk} blocks"),
            ScaleLayout::Channel => "per-channel".into(),
            ScaleLayout::Tensor => "per-tensor".into(),
        }
    }
}

/// What config.json's `quantization_config` says about FP8 weights: the method, the scale layout
/// and the name suffixes of the scale tensors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fp8Scheme {
    /// `quant_method`, when there is a quantization_config.
    pub method: Option<String>,
    /// The declared scale layout (128×128 blocks when nothing says otherwise).
    pub layout: ScaleLayout,
    /// Suffixes appended to a weight's name to name its scale tensor, preferred first.
    pub scale_suffixes: &'static [&'static str],
}

/// Scale suffix of DeepSeek / transformers "fp8" checkpoints.
pub const SUFFIX_SCALE_INV: &str = "_scale_inv";
/// Scale suffix of compressed-tensors checkpoints.
pub const SUFFIX_SCALE: &str = "_scale";

impl Fp8Scheme {
    /// The scheme of a checkpoint without a `quantization_config`: 128×128 blocks, either scale
    /// suffix.
    pub fn default_blocks() -> Self {
        Fp8Scheme {
            method: None,
            layout: ScaleLayout::Block(DEFAULT_BLOCK),
            scale_suffixes: &[SUFFIX_SCALE_INV, SUFFIX_SCALE],
        }
    }

    /// Reads the scheme from a config.json value (`None`: no config, the defaults).
    ///
    /// # Errors
    ///
    /// [`SchemeError`] for a malformed block size or strategy, or compressed-tensors groups that
    /// disagree on the weight layout.
    pub fn from_config(config: Option<&Value>) -> Result<Self, SchemeError> {
        let Some(qc) = config.and_then(|c| c.get("quantization_config")) else {
            return Ok(Self::default_blocks());
        };
        let method = qc.get("quant_method").and_then(Value::as_str).map(str::to_owned);
        match method.as_deref() {
            Some("compressed-tensors") => {
                let mut layouts: Vec<ScaleLayout> = Vec::new();
                let groups = qc.get("config_groups").and_then(Value::as_object);
                for (gname, g) in groups.into_iter().flatten() {
                    let Some(w) = g.get("weights").filter(|w| !w.is_null()) else { continue };
                    let strategy = w.get("strategy").and_then(Value::as_str).unwrap_or("");
                    let bs = w.get("block_structure").filter(|b| !b.is_null());
                    let layout = match (strategy, bs) {
                        (_, Some(b)) => ScaleLayout::Block(parse_block(b).ok_or_else(|| SchemeError::BadBlock {
                            field: format!("config_groups.{gname}.weights.block_structure"),
                            value: b.to_string(),
                        })?),
                        ("block", None) => ScaleLayout::Block(DEFAULT_BLOCK),
                        ("channel", None) => ScaleLayout::Channel,
                        ("tensor", None) => ScaleLayout::Tensor,
                        (other, None) => {
                            return Err(SchemeError::BadStrategy { group: gname.clone(), strategy: other.into() });
                        }
                    };
                    if !layouts.contains(&layout) {
                        layouts.push(layout);
                    }
                }
                if layouts.len() > 1 {
                    let all: Vec<String> = layouts.iter().map(ScaleLayout::describe).collect();
                    return Err(SchemeError::MixedLayouts { layouts: all.join(", ") });
                }
                Ok(Fp8Scheme {
                    method,
                    layout: layouts.first().copied().unwrap_or(ScaleLayout::Block(DEFAULT_BLOCK)),
                    scale_suffixes: &[SUFFIX_SCALE],
                })
            }
            _ => {
                let layout = match qc.get("weight_block_size").filter(|b| !b.is_null()) {
                    Some(b) => ScaleLayout::Block(parse_block(b).ok_or_else(|| SchemeError::BadBlock {
                        field: "weight_block_size".into(),
                        value: b.to_string(),
                    })?),
                    // The fp8 method without a block size is per-tensor (and names the scale
                    // `weight_scale`, as vLLM's Fp8LinearMethod does).
                    None if method.as_deref() == Some("fp8") => ScaleLayout::Tensor,
                    None => ScaleLayout::Block(DEFAULT_BLOCK),
                };
                let scale_suffixes: &'static [&'static str] = match (method.as_deref(), layout) {
                    (Some("fp8"), ScaleLayout::Block(_)) => &[SUFFIX_SCALE_INV],
                    _ => &[SUFFIX_SCALE_INV, SUFFIX_SCALE],
                };
                Ok(Fp8Scheme { method, layout, scale_suffixes })
            }
        }
    }
}

/// Parses a block size: `[rows, cols]` of positive integers, or the older string form `"RxC"`.
fn parse_block(v: &Value) -> Option<[usize; 2]> {
    let dims: Vec<usize> = match v {
        Value::Array(a) => a.iter().map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok())).collect::<Option<_>>()?,
        Value::String(s) => s.split(['x', 'X']).map(|d| d.trim().parse().ok()).collect::<Option<_>>()?,
        _ => return None,
    };
    match dims[..] {
        [bn, bk] if bn > 0 && bk > 0 => Some([bn, bk]),
        _ => None,
    }
}

/// The decode table of an FP8 element type that carries weights, if `dtype` is one.
pub fn code_lut(dtype: Dtype) -> Option<&'static [f32; 256]> {
    match dtype {
        Dtype::F8_E4M3 => Some(&E4M3_LUT),
        Dtype::F8_E5M2 => Some(&E5M2_LUT),
        _ => None,
    }
}

/// True for the 8-bit float dtypes that hold weight codes (not the E8M0 scale type).
pub fn is_fp8_weight_dtype(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F8_E4M3 | Dtype::F8_E5M2 | Dtype::F8_E4M3FNUZ | Dtype::F8_E5M2FNUZ)
}

/// Decodes a scale tensor (F32, BF16, F16 or F8_E8M0, little-endian) to f32; `None` for other
/// dtypes. E8M0 byte `e` is `2^(e-127)` (255 is NaN).
pub fn scales_to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    let two = |b: &[u8]| [b[0], b[1]];
    Some(match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes(two(b)).to_f32()).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes(two(b)).to_f32()).collect(),
        Dtype::F8_E8M0 => bytes.iter().map(|&e| e8m0_to_f32(e)).collect(),
        _ => return None,
    })
}

/// The value of an E8M0 (unsigned exponent) byte: `2^(e-127)`, NaN for 255.
pub fn e8m0_to_f32(e: u8) -> f32 {
    match e {
        0 => f32::from_bits(0x0040_0000), // 2^-127, an f32 subnormal
        255 => f32::NAN,
        e => f32::from_bits(u32::from(e) << 23),
    }
}

/// Number of codes of `codes` that decode to NaN or an infinity under `lut`, and the index of
/// the first one.
pub fn count_bad_codes(codes: &[u8], lut: &[f32; 256]) -> (usize, Option<usize>) {
    let bad: [bool; 256] = std::array::from_fn(|i| !lut[i].is_finite());
    const CHUNK: usize = 1 << 20;
    codes
        .par_chunks(CHUNK)
        .enumerate()
        .map(|(ci, c)| {
            let n = c.iter().filter(|&&b| bad[usize::from(b)]).count();
            let first = (n > 0).then(|| c.iter().position(|&b| bad[usize::from(b)]).map(|p| ci * CHUNK + p)).flatten();
            (n, first)
        })
        .reduce(|| (0, None), |a, b| (a.0 + b.0, a.1.or(b.1)))
}

/// An FP8 weight ready to decode: its codes, their decode table, its scales widened to f32 and
/// where they apply.
#[derive(Clone, Copy, Debug)]
pub struct Fp8Weight<'a> {
    /// The codes, row-major over `[batch * rows, cols]`.
    pub codes: &'a [u8],
    /// Decode table of the code type ([`code_lut`]).
    pub lut: &'static [f32; 256],
    /// The scales, row-major over the grid of `geom`.
    pub scales: &'a [f32],
    /// Where each scale applies.
    pub geom: ScaleGeometry,
}

impl Fp8Weight<'_> {
    /// True for DeepSeek's layout, E4M3 in 128×128 blocks, which `block.rs` dequantizes.
    pub fn is_standard(&self) -> bool {
        self.geom.is_standard_block() && std::ptr::eq(self.lut, &E4M3_LUT)
    }

    /// Dequantizes rows `row0..row0 + out.len() / (cols * per)` of the weight seen as a
    /// `[batch * rows, cols]` matrix, calling `put(q · s, dst)` on the `per` items of `out` of
    /// each element, in parallel over rows.
    pub fn decode_rows<T: Send>(&self, row0: usize, out: &mut [T], per: usize, put: impl Fn(f32, &mut [T]) + Sync) {
        let g = &self.geom;
        let cols = g.cols;
        if cols == 0 || g.rows == 0 || per == 0 {
            return;
        }
        let (gr, gc) = (g.grid_rows(), g.grid_cols());
        out.par_chunks_mut(cols * per).enumerate().for_each(|(i, out_row)| {
            let row = row0 + i;
            let (b, r) = (row / g.rows, row % g.rows);
            let grow = b * gr + r / g.block_rows;
            let srow = &self.scales[grow * gc..(grow + 1) * gc];
            let code_row = &self.codes[row * cols..(row + 1) * cols];
            for ((o, c), &s) in out_row.chunks_mut(g.block_cols * per).zip(code_row.chunks(g.block_cols)).zip(srow) {
                for (dst, &code) in o.chunks_exact_mut(per).zip(c) {
                    put(self.lut[usize::from(code)] * s, dst);
                }
            }
        });
    }

    /// Dequantizes the whole weight to BF16 little-endian bytes (the f32 product rounded to
    /// nearest even): through `block.rs` for the standard layout, the general decoder otherwise.
    pub fn to_bf16(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.codes.len() * 2];
        let g = &self.geom;
        if !(self.is_standard() && dequantize_weight_to_bf16(self.codes, self.scales, g.rows, g.cols, &mut out).is_ok())
        {
            self.decode_rows(0, &mut out, 2, |v, d: &mut [u8]| {
                d.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes());
            });
        }
        out
    }
}

impl Fp8Scheme {
    /// The scale suffixes to try, preferred first: the config's, and with [`Strictness::Lenient`]
    /// the other convention after them.
    pub fn suffixes(&self, strictness: Strictness) -> Vec<&'static str> {
        let mut v = self.scale_suffixes.to_vec();
        if strictness == Strictness::Lenient {
            for s in [SUFFIX_SCALE_INV, SUFFIX_SCALE] {
                if !v.contains(&s) {
                    v.push(s);
                }
            }
        }
        v
    }

    /// Finds the scale tensor of the FP8 weight `weight` through `find` (a lookup by name that
    /// returns the caller's handle and the tensor's header entry), checks its dtype, and fits its
    /// shape to the weight: the one place that decides which tensor scales which weight, and how.
    ///
    /// # Errors
    ///
    /// [`ScaleError`]: no scale tensor, an unsupported scale dtype, or a shape that fits no layout.
    pub fn locate_scale<'a, T>(
        &self,
        weight: &TensorInfo,
        strictness: Strictness,
        find: impl Fn(&str) -> Option<(T, &'a TensorInfo)>,
    ) -> Result<(T, &'a TensorInfo, ScaleGeometry), ScaleError> {
        let names: Vec<String> = self.suffixes(strictness).iter().map(|x| format!("{}{x}", weight.name)).collect();
        let Some((handle, scale)) = names.iter().find_map(|n| find(n)) else {
            return Err(ScaleError::Missing { looked_for: names });
        };
        if scales_to_f32(scale.dtype, &[]).is_none() {
            return Err(ScaleError::Dtype { scale_tensor: scale.name.clone(), dtype: scale.dtype });
        }
        let layouts: &[ScaleLayout] = match strictness {
            Strictness::Declared => &[self.layout],
            Strictness::Lenient => &[self.layout, ScaleLayout::Tensor, ScaleLayout::Channel],
        };
        let mismatch = || ShapeMismatch {
            scale_tensor: scale.name.clone(),
            weight: weight.name.clone(),
            weight_shape: weight.shape.clone(),
            scale: scale.shape.clone(),
            layout: self.layout.describe(),
            expected: self.layout.expected_shape(&weight.shape),
            also: match strictness {
                Strictness::Declared => "",
                Strictness::Lenient => " (or 1 element per tensor, or [N, 1] per channel)",
            },
        };
        let geom = layouts
            .iter()
            .find_map(|l| l.fit(&weight.shape, &scale.shape))
            .ok_or_else(|| ScaleError::Shape(Box::new(mismatch())))?;
        Ok((handle, scale, geom))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dequant::fixture::{Rng, codes};

    fn info(name: &str, dtype: Dtype, shape: &[usize]) -> TensorInfo {
        TensorInfo { name: name.into(), dtype, shape: shape.to_vec(), begin: 0, end: 0 }
    }

    #[test]
    fn general_decoder_matches_block_rs_bitwise_on_128_blocks() {
        let mut rng = Rng::new(11);
        let (n, k) = (300, 200);
        let c = codes(&mut rng, n * k);
        let s: Vec<f32> = (0..6).map(|_| rng.uniform() * 0.01 + 1e-4).collect();
        let g = ScaleLayout::Block(DEFAULT_BLOCK).fit(&[n, k], &[3, 2]).expect("fits");
        let mut via_block = vec![0u8; n * k * 2];
        dequantize_weight_to_bf16(&c, &s, n, k, &mut via_block).expect("block.rs");
        let mut general = vec![0u8; n * k * 2];
        let w = Fp8Weight { codes: &c, lut: &E4M3_LUT, scales: &s, geom: g };
        w.decode_rows(0, &mut general, 2, |v, d: &mut [u8]| {
            d.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes());
        });
        assert!(via_block == general, "general decoder differs from block.rs");
    }

    #[test]
    fn scale_layouts_fit_only_their_shapes_and_config_block_sizes_are_read() {
        let b = ScaleLayout::Block([128, 128]);
        assert!(b.fit(&[192, 256], &[2, 2]).is_some());
        assert!(b.fit(&[192, 256], &[3, 2]).is_none());
        assert!(b.fit(&[4, 192, 256], &[4, 2, 2]).is_some_and(|g| g.batch == 4));
        assert!(ScaleLayout::Channel.fit(&[192, 256], &[192, 1]).is_some());
        assert!(ScaleLayout::Channel.fit(&[192, 256], &[192]).is_some());
        assert!(ScaleLayout::Tensor.fit(&[192, 256], &[]).is_some());
        assert!(ScaleLayout::Tensor.fit(&[192, 256], &[2]).is_none());
        let ds = serde_json::json!({"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 32]}});
        assert_eq!(Fp8Scheme::from_config(Some(&ds)).map(|s| s.layout).ok(), Some(ScaleLayout::Block([64, 32])));
        let ct =
            serde_json::json!({"quantization_config": fp8forge_formats::qconfig::compressed_tensors_fp8_block(&[])});
        let s = Fp8Scheme::from_config(Some(&ct)).expect("ct");
        assert_eq!((s.layout, s.scale_suffixes), (ScaleLayout::Block([128, 128]), &[SUFFIX_SCALE][..]));
        let bad = serde_json::json!({"quantization_config": {"quant_method": "fp8", "weight_block_size": [0, 128]}});
        assert!(Fp8Scheme::from_config(Some(&bad)).is_err());
        assert_eq!(parse_block(&Value::String("128x64".into())), Some([128, 64]));
        assert_eq!(e8m0_to_f32(127), 1.0);
        assert_eq!(e8m0_to_f32(0), 2f32.powi(-127));
        assert!(e8m0_to_f32(255).is_nan());
    }

    #[test]
    fn locate_scale_finds_fits_and_names_the_scale_tensor_at_fault() {
        let w = info("m.weight", Dtype::F8_E4M3, &[192, 256]);
        let tensors = [
            info("m.weight_scale", Dtype::F32, &[2, 2]),
            info("x.weight_scale_inv", Dtype::I64, &[2, 2]),
            info("y.weight_scale_inv", Dtype::F32, &[3, 3]),
            info("t.weight_scale_inv", Dtype::F32, &[1]),
        ];
        let find = |n: &str| tensors.iter().position(|t| t.name == n).map(|i| (i, &tensors[i]));
        let deepseek = Fp8Scheme::from_config(Some(&serde_json::json!({"quantization_config":
            {"quant_method": "fp8", "weight_block_size": [128, 128]}})))
        .expect("scheme");
        // Declared: only `_scale_inv`; lenient: the other convention too.
        let e = deepseek.locate_scale(&w, Strictness::Declared, find).expect_err("declared name only");
        assert!(matches!(&e, ScaleError::Missing { looked_for } if looked_for == &["m.weight_scale_inv"]), "{e}");
        let (i, s, g) = deepseek.locate_scale(&w, Strictness::Lenient, find).expect("lenient");
        assert_eq!((i, s.name.as_str(), g.grid_rows(), g.grid_cols()), (0, "m.weight_scale", 2, 2));
        let e = deepseek.locate_scale(&info("x.weight", Dtype::F8_E4M3, &[192, 256]), Strictness::Lenient, find);
        assert!(matches!(e, Err(ScaleError::Dtype { ref scale_tensor, .. }) if scale_tensor == "x.weight_scale_inv"));
        let e = deepseek.locate_scale(&info("y.weight", Dtype::F8_E4M3, &[192, 256]), Strictness::Lenient, find);
        let e = e.expect_err("3x3 grid on 192x256");
        assert_eq!(e.scale_tensor(), Some("y.weight_scale_inv"));
        assert!(e.to_string().contains("[3, 3]") && e.to_string().contains("need [2, 2]"), "{e}");
        // A per-tensor scale in a block-declared checkpoint: read as found, refused as declared.
        let t = info("t.weight", Dtype::F8_E4M3, &[192, 256]);
        assert!(deepseek.locate_scale(&t, Strictness::Lenient, find).is_ok_and(|(_, _, g)| g.block_rows == 192));
        assert!(matches!(deepseek.locate_scale(&t, Strictness::Declared, find), Err(ScaleError::Shape(_))));
    }
}
