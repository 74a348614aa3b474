//! What a checkpoint holds: files, tensors with their dtype, shape and role (FP8 weight, scale,
//! FP8 without scale, plain tensor), totals per dtype, the quantization_config, and a one-line
//! state ("bf16", "fp8 (deepseek, 128x128 blocks)", "fp8 (compressed-tensors)", "mixed", ...).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use fp8forge_formats::header::dtype_name;
use fp8forge_formats::{Checkpoint, Dtype, FormatError};
use serde::Serialize;
use serde_json::Value;

use crate::convert::ConvertError;
use crate::scheme::{SUFFIX_SCALE, SUFFIX_SCALE_INV, is_fp8_weight_dtype};

/// What a tensor is to an FP8 checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// An FP8 tensor that has a scale tensor.
    Fp8Weight,
    /// A scale tensor of an FP8 weight (block or static input scale).
    Scale,
    /// An FP8 tensor without a scale tensor: loaders would read raw codes (suspicious).
    Fp8Unscaled,
    /// Every other tensor.
    Tensor,
}

impl Role {
    /// The role's name, as `--json` writes it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Fp8Weight => "fp8-weight",
            Role::Scale => "scale",
            Role::Fp8Unscaled => "fp8-unscaled",
            Role::Tensor => "tensor",
        }
    }
}

/// One safetensors file of the checkpoint.
#[derive(Clone, Debug, Serialize)]
pub struct FileInfo {
    /// File name inside the checkpoint directory.
    pub name: String,
    /// Size of the file in bytes.
    pub bytes: u64,
    /// Number of tensors in it.
    pub tensors: usize,
}

/// One tensor of the checkpoint.
#[derive(Clone, Debug, Serialize)]
pub struct TensorEntry {
    /// Tensor name.
    pub name: String,
    /// File holding it.
    pub file: String,
    /// Dtype as safetensors names it ("BF16", "F8_E4M3", ...).
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Bytes of data.
    pub bytes: u64,
    /// What it is to an FP8 checkpoint.
    pub role: Role,
}

/// Count and bytes of the tensors of one dtype.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DtypeTotal {
    /// Number of tensors.
    pub tensors: usize,
    /// Bytes of data.
    pub bytes: u64,
}

/// What `inspect` found.
#[derive(Clone, Debug, Serialize)]
pub struct Inspection {
    /// The path inspected.
    pub path: PathBuf,
    /// Safetensors files, in checkpoint order.
    pub files: Vec<FileInfo>,
    /// Every tensor, sorted by name.
    pub tensors: Vec<TensorEntry>,
    /// Totals per dtype name.
    pub by_dtype: BTreeMap<String, DtypeTotal>,
    /// config.json's `quantization_config`, when present.
    pub quantization: Option<Value>,
    /// One-line summary: "bf16", "fp8 (deepseek, 128x128 blocks)", "fp8 (compressed-tensors)",
    /// "fp8 (no quantization_config)", "fp8 (unscaled)", "mixed", ...
    pub state: String,
}

/// Inspects a checkpoint directory or a single `.safetensors` file. Reads headers and
/// config.json only, no tensor data.
pub fn inspect(path: &Path) -> Result<Inspection, ConvertError> {
    let ckpt = Checkpoint::open(path)?;
    let mut dtypes: HashMap<&str, Dtype> = HashMap::new();
    let mut files = Vec::with_capacity(ckpt.shards.len());
    for s in &ckpt.shards {
        let bytes = std::fs::metadata(s.file.path()).map_err(FormatError::io(s.file.path(), "stat"))?.len();
        files.push(FileInfo { name: s.name.clone(), bytes, tensors: s.file.header().tensors.len() });
        for t in &s.file.header().tensors {
            dtypes.insert(&t.name, t.dtype);
        }
    }
    let is_fp8 = |name: &str| dtypes.get(name).is_some_and(|d| is_fp8_weight_dtype(*d));
    let scale_of = |name: &str| {
        [SUFFIX_SCALE_INV, SUFFIX_SCALE].into_iter().find(|sfx| dtypes.contains_key(format!("{name}{sfx}").as_str()))
    };
    let role = |name: &str, dtype: Dtype| -> Role {
        if is_fp8_weight_dtype(dtype) {
            return if scale_of(name).is_some() { Role::Fp8Weight } else { Role::Fp8Unscaled };
        }
        let stem = [SUFFIX_SCALE_INV, SUFFIX_SCALE].into_iter().find_map(|sfx| name.strip_suffix(sfx));
        let input_scale_of_fp8 = name.strip_suffix(".input_scale").is_some_and(|m| is_fp8(&format!("{m}.weight")));
        if stem.is_some_and(is_fp8) || input_scale_of_fp8 { Role::Scale } else { Role::Tensor }
    };

    let mut tensors = Vec::new();
    let mut by_dtype: BTreeMap<String, DtypeTotal> = BTreeMap::new();
    for s in &ckpt.shards {
        for t in &s.file.header().tensors {
            let dtype = dtype_name(t.dtype);
            let total = by_dtype.entry(dtype.clone()).or_default();
            total.tensors += 1;
            total.bytes += t.nbytes() as u64;
            tensors.push(TensorEntry {
                name: t.name.clone(),
                file: s.name.clone(),
                dtype,
                shape: t.shape.clone(),
                bytes: t.nbytes() as u64,
                role: role(&t.name, t.dtype),
            });
        }
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let quantization = ckpt.config.as_ref().and_then(|c| c.get("quantization_config")).cloned();
    let suffixes: Vec<&str> =
        tensors.iter().filter(|t| t.role == Role::Fp8Weight).filter_map(|t| scale_of(&t.name)).collect();
    let state = state(&tensors, &by_dtype, quantization.as_ref(), &suffixes);
    Ok(Inspection { path: path.to_owned(), files, tensors, by_dtype, quantization, state })
}

/// The one-line state of a checkpoint from its tensors' roles, dtypes, quantization_config and
/// the scale suffixes its FP8 weights use.
fn state(
    tensors: &[TensorEntry],
    by_dtype: &BTreeMap<String, DtypeTotal>,
    qc: Option<&Value>,
    suffixes: &[&str],
) -> String {
    let scaled = tensors.iter().filter(|t| t.role == Role::Fp8Weight).count();
    let unscaled = tensors.iter().filter(|t| t.role == Role::Fp8Unscaled).count();
    if scaled + unscaled == 0 {
        // The float dtype holding the most bytes names the state (BF16 models keep a few F32 biases).
        let dominant = by_dtype
            .iter()
            .filter(|(d, _)| matches!(d.as_str(), "BF16" | "F16" | "F32" | "F64"))
            .max_by_key(|(_, t)| t.bytes)
            .or_else(|| by_dtype.iter().max_by_key(|(_, t)| t.bytes))
            .map_or_else(|| "empty".to_string(), |(d, _)| d.to_ascii_lowercase());
        return match qc {
            Some(_) => format!("{dominant} (quantization_config present but no fp8 tensors)"),
            None => dominant,
        };
    }
    if scaled == 0 {
        return "fp8 (unscaled)".into();
    }
    let mixed_suffixes = suffixes.iter().any(|s| *s != suffixes[0]);
    if unscaled > 0 || mixed_suffixes {
        return "mixed".into();
    }
    let method = qc.and_then(|q| q.get("quant_method")).and_then(Value::as_str);
    match (qc, method) {
        (Some(q), Some("fp8")) => {
            let block = q.get("weight_block_size").and_then(Value::as_array).map(|b| {
                let d: Vec<String> = b.iter().map(|x| x.to_string()).collect();
                d.join("x")
            });
            let ue8m0 = q.get("scale_fmt").and_then(Value::as_str) == Some("ue8m0");
            let layout = block.map_or_else(|| "per-tensor".to_string(), |b| format!("{b} blocks"));
            format!("fp8 (deepseek, {layout}{})", if ue8m0 { ", ue8m0 scales" } else { "" })
        }
        (Some(_), Some("compressed-tensors")) => "fp8 (compressed-tensors)".into(),
        (Some(_), Some(m)) => format!("fp8 ({m})"),
        (Some(_), None) => "fp8 (quantization_config without quant_method)".into(),
        (None, _) if suffixes.first() == Some(&SUFFIX_SCALE_INV) => {
            "fp8 (deepseek-style scales, no quantization_config)".into()
        }
        (None, _) => "fp8 (compressed-tensors-style scales, no quantization_config)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dequant::fixture::*;
    use crate::plan::OutputFormat;

    fn roles(i: &Inspection) -> HashMap<&str, Role> {
        i.tensors.iter().map(|t| (t.name.as_str(), t.role)).collect()
    }

    #[test]
    fn inspect_of_a_bf16_checkpoint_says_bf16_with_plain_tensors_sorted_by_name() {
        let d = tempfile::tempdir().expect("tempdir");
        bf16_model(d.path());
        let i = inspect(d.path()).expect("inspect");
        assert_eq!(i.state, "bf16");
        assert_eq!(i.files.len(), 2);
        assert!(i.tensors.iter().all(|t| t.role == Role::Tensor && t.dtype == "BF16"));
        assert!(i.tensors.windows(2).all(|w| w[0].name < w[1].name), "not sorted");
        assert_eq!(i.by_dtype["BF16"].tensors, 11);
        assert_eq!(i.by_dtype["BF16"].bytes, i.tensors.iter().map(|t| t.bytes).sum::<u64>());
        assert!(i.quantization.is_none());
        let total: u64 = i.files.iter().map(|f| f.bytes).sum();
        assert!(total > i.by_dtype["BF16"].bytes, "file sizes include headers");
    }

    #[test]
    fn inspect_of_a_deepseek_conversion_reports_weight_and_scale_roles_and_the_block_state() {
        let d = tempfile::tempdir().expect("tempdir");
        let (input, out) = (d.path().join("in"), d.path().join("out"));
        bf16_model(&input);
        convert_default(&input, &out);
        let i = inspect(&out).expect("inspect");
        assert_eq!(i.state, "fp8 (deepseek, 128x128 blocks)");
        let r = roles(&i);
        assert_eq!(r["model.layers.0.mlp.up_proj.weight"], Role::Fp8Weight);
        assert_eq!(r["model.layers.0.mlp.up_proj.weight_scale_inv"], Role::Scale);
        assert_eq!(r["model.embed_tokens.weight"], Role::Tensor);
        assert_eq!(i.by_dtype["F8_E4M3"].tensors, 5);
        assert_eq!(i.by_dtype["F32"].tensors, 5);
        assert_eq!(i.quantization.as_ref().and_then(|q| q.get("quant_method")), Some(&serde_json::json!("fp8")));
        // One file alone: no config, the state comes from the scale names.
        let one = inspect(&out.join("model-00001-of-00002.safetensors")).expect("file");
        assert_eq!(one.state, "fp8 (deepseek-style scales, no quantization_config)");
        assert_eq!(one.files.len(), 1);
    }

    #[test]
    fn inspect_of_a_compressed_tensors_conversion_reports_its_state() {
        let d = tempfile::tempdir().expect("tempdir");
        let (input, out) = (d.path().join("in"), d.path().join("out"));
        bf16_model(&input);
        convert_with(&input, &out, OutputFormat::CompressedTensors);
        let i = inspect(&out).expect("inspect");
        assert_eq!(i.state, "fp8 (compressed-tensors)");
        assert_eq!(roles(&i)["model.layers.0.mlp.up_proj.weight_scale"], Role::Scale);
    }

    #[test]
    fn inspect_flags_an_fp8_tensor_without_scale_as_unscaled_and_the_checkpoint_as_mixed() {
        let d = tempfile::tempdir().expect("tempdir");
        let tensors = vec![
            ("a.weight".to_string(), Dtype::F8_E4M3, vec![4, 4], vec![0x38; 16]),
            ("a.weight_scale_inv".into(), Dtype::F32, vec![1, 1], f32_bytes(&[1.0])),
            ("b.weight".into(), Dtype::F8_E4M3, vec![4, 4], vec![0x38; 16]),
        ];
        write_checkpoint(d.path(), &[tensors], &serde_json::json!({}));
        let i = inspect(d.path()).expect("inspect");
        let r = roles(&i);
        assert_eq!(
            (r["a.weight"], r["a.weight_scale_inv"], r["b.weight"]),
            (Role::Fp8Weight, Role::Scale, Role::Fp8Unscaled)
        );
        assert_eq!(i.state, "mixed");
        let json = serde_json::to_value(&i).expect("serializes");
        assert_eq!(json["tensors"][2]["role"], "fp8-unscaled");
    }
}
