//! Planning a conversion: a pure function of the input's headers and the options that says
//! which tensor goes where, in which dtype and shape, and how many bytes come in and go out.
//! Every run over the same input and options computes the same plan, which is what lets
//! `--resume` and `--shard i/n` jobs agree on the output without talking to each other.

use std::collections::HashMap;

use fp8forge_formats::manifest::MANIFEST_NAME;
use fp8forge_formats::{Checkpoint, Dtype, PlannedTensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::block::{BLOCK, ScaleFormat};
use crate::groups::{GroupKind, group_of};
use crate::select::{Decision, KeepReason, Selection};

/// Output layout of the quantized checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutputFormat {
    /// DeepSeek / transformers "fp8": `weight_scale_inv` tensors, `quant_method: "fp8"`.
    Deepseek,
    /// compressed-tensors "float-quantized": `weight_scale` tensors, block strategy.
    CompressedTensors,
}

/// What the user asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvertOptions {
    /// Output layout.
    pub format: OutputFormat,
    /// Scale format (f32 or power-of-two ue8m0 values stored as f32).
    pub scale_format: ScaleFormat,
    /// Extra exclusion patterns.
    pub skip: Vec<String>,
    /// Patterns replacing the default selection when not empty.
    pub only: Vec<String>,
    /// Largest output shard, in bytes of tensor data.
    pub max_shard_size: u64,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            format: OutputFormat::Deepseek,
            scale_format: ScaleFormat::F32,
            skip: vec![],
            only: vec![],
            max_shard_size: 5_000_000_000,
        }
    }
}

/// What is done to one input tensor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "lowercase")]
pub enum Action {
    /// Quantized: output tensors are the codes then the scales.
    Quantize {
        /// Rows (N, output features).
        rows: usize,
        /// Columns (K, input features).
        cols: usize,
    },
    /// Copied byte for byte.
    Copy {
        /// Why it is not quantized.
        reason: String,
    },
}

/// One input tensor and what becomes of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// Name of the tensor in the input.
    pub source: String,
    /// Index of the input shard holding it.
    pub shard: usize,
    /// What is done to it.
    #[serde(flatten)]
    pub action: Action,
    /// Output tensors, in file order (one when copied; weight and scale when quantized).
    pub outputs: Vec<PlannedTensor>,
    /// Input bytes.
    pub bytes_in: u64,
}

/// One output safetensors file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutFile {
    /// File name in the output directory.
    pub name: String,
    /// Index of the input shard its tensors come from.
    pub input_shard: usize,
    /// Its tensors.
    pub items: Vec<Item>,
}

impl OutFile {
    /// Output tensors in file order.
    pub fn tensors(&self) -> Vec<PlannedTensor> {
        self.items.iter().flat_map(|i| i.outputs.iter().cloned()).collect()
    }

    /// Bytes of tensor data in the file.
    pub fn data_bytes(&self) -> u64 {
        self.items.iter().flat_map(|i| &i.outputs).map(PlannedTensor::nbytes).sum()
    }
}

/// The whole conversion, before anything is written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Options it was made with.
    pub options: ConvertOptions,
    /// Input shard file names, in order.
    pub input_shards: Vec<String>,
    /// Output files.
    pub files: Vec<OutFile>,
    /// Other files copied from the input directory.
    pub copies: Vec<String>,
    /// Directory entries not carried over.
    pub not_copied: Vec<String>,
    /// Groups the engines load as one that `--skip` or `--only` split, widened to the whole group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub widened: Vec<Widened>,
    /// What the plan assumed (an architecture fp8forge does not know, ...), for the user to see.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// A group of weights the engines load as one (see [`crate::groups`]) that the user's patterns
/// split, and how it was made whole.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Widened {
    /// The module the engines see (`model.layers.3.mlp.experts`, `...self_attn.qkv_proj`).
    pub group: String,
    /// Why it is one.
    pub kind: GroupKind,
    /// True when the whole group is kept (a `--skip` widened), false when it is all quantized (an
    /// `--only` widened).
    pub kept: bool,
    /// Weights whose fate changed.
    pub changed: usize,
    /// Weights in the group.
    pub weights: usize,
}

impl std::fmt::Display for Widened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (what, how) = if self.kept { ("--skip", "kept in BF16") } else { ("--only", "quantized") };
        write!(
            f,
            "{what} widened to the whole of {} ({}): all {} weights {how}, {} more than asked",
            self.group,
            self.kind.describe(),
            self.weights,
            self.changed
        )
    }
}

/// model_type values whose modules fp8forge's rules were checked against (vLLM's and SGLang's
/// model code); others convert with the generic rules and a warning.
pub const KNOWN_MODEL_TYPES: &[&str] =
    &["deepseek_v2", "deepseek_v3", "deepseek_v32", "kimi_k2", "mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next"];

/// Summary numbers of a plan.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PlanSummary {
    /// Input tensors.
    pub tensors: usize,
    /// Of which quantized.
    pub quantized: usize,
    /// Of which copied unchanged.
    pub copied: usize,
    /// Tensor bytes read.
    pub bytes_in: u64,
    /// Tensor bytes written.
    pub bytes_out: u64,
    /// Output safetensors files.
    pub files: usize,
}

/// Why a plan cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A selection pattern is invalid.
    #[error(transparent)]
    Select(#[from] crate::select::SelectError),
    /// The input already holds FP8 weights or a quantization_config.
    #[error("{path}: already quantized ({what}); run `fp8forge dequant` first to requantize")]
    AlreadyQuantized {
        /// The file at fault.
        path: std::path::PathBuf,
        /// What shows it.
        what: String,
    },
    /// The plan could not be serialized for its digest.
    #[error("cannot serialize the plan for its digest: {0}")]
    Digest(#[source] serde_json::Error),
    /// Power-of-two scales were asked of the compressed-tensors format, which cannot declare them.
    #[error(
        "power-of-two (ue8m0) scales cannot be declared in compressed-tensors' block scheme (vLLM would read them \
         as plain f32 scales and never pick its UE8M0 kernels); use --format deepseek, which writes scale_fmt \
         \"ue8m0\""
    )]
    Ue8m0CompressedTensors,
    /// `--only` asks for FP8 where no serving engine loads it.
    #[error(
        "{path}: tensor {tensor} ({why}) cannot be FP8: vLLM and SGLang build it unquantized and would load \
         FP8 bytes wrongly; leave it out of --only"
    )]
    Unloadable {
        /// The file holding the tensor.
        path: std::path::PathBuf,
        /// The tensor's name.
        tensor: String,
        /// What it is.
        why: &'static str,
    },
    /// An input tensor has the name of the scale that quantizing another tensor would write.
    #[error(
        "{path}: tensor {tensor}: the input already holds it, and quantizing {weight} would write a scale of that name \
         (leftovers of a dequantization?); remove it, or keep {weight} with --skip"
    )]
    NameClash {
        /// The file holding the tensor.
        path: std::path::PathBuf,
        /// The tensor's name.
        tensor: String,
        /// The weight whose scale it would collide with.
        weight: String,
    },
}

/// Name of the scale tensor that goes with weight `name`.
pub fn scale_name(name: &str, format: OutputFormat) -> String {
    let suffix = match format {
        OutputFormat::Deepseek => "_scale_inv",
        OutputFormat::CompressedTensors => "_scale",
    };
    format!("{name}{suffix}")
}

/// Makes the plan for `ckpt` under `opts`.
pub fn make_plan(ckpt: &Checkpoint, opts: &ConvertOptions) -> Result<Plan, PlanError> {
    if let Some(qc) = ckpt.config.as_ref().and_then(|c| c.get("quantization_config")) {
        let method = qc.get("quant_method").and_then(|m| m.as_str()).unwrap_or("unknown");
        return Err(PlanError::AlreadyQuantized {
            path: ckpt.root.join("config.json"),
            what: format!("quantization_config with quant_method {method:?}"),
        });
    }
    if opts.format == OutputFormat::CompressedTensors && opts.scale_format == ScaleFormat::Ue8m0 {
        return Err(PlanError::Ue8m0CompressedTensors);
    }
    let sel = Selection::new(&opts.skip, &opts.only)?;
    let mut decisions: Vec<Vec<Decision>> = ckpt
        .shards
        .iter()
        .map(|s| s.file.header().tensors.iter().map(|t| sel.decide(&t.name, t.dtype, &t.shape)).collect())
        .collect();
    let mut warnings: Vec<String> = architecture_warning(ckpt).into_iter().collect();
    warnings.extend(settle_unloadable(ckpt, &sel, &mut decisions)?);
    let widened = widen(ckpt, &mut decisions);
    let items_per_shard = ckpt
        .shards
        .iter()
        .zip(decisions)
        .enumerate()
        .map(|(si, (shard, d))| {
            shard.file.header().tensors.iter().zip(d).map(|(t, d)| item(si, shard, t, d, opts)).collect()
        })
        .collect::<Result<Vec<Vec<Item>>, PlanError>>()?;
    check_names(ckpt, &items_per_shard)?;
    Ok(Plan {
        options: opts.clone(),
        input_shards: ckpt.shards.iter().map(|s| s.name.clone()).collect(),
        files: group_files(items_per_shard, opts.max_shard_size),
        // A manifest describes the checkpoint it came with, not the converted one: a new one is
        // written.
        copies: ckpt.extra_files.iter().filter(|n| *n != MANIFEST_NAME).cloned().collect(),
        not_copied: {
            let mut v = ckpt.skipped_files.clone();
            v.extend(ckpt.extra_files.iter().filter(|n| *n == MANIFEST_NAME).cloned());
            v.sort();
            v
        },
        widened,
        warnings,
    })
}

/// A warning when config.json names a `model_type` whose modules fp8forge's rules were not checked
/// against (or none).
fn architecture_warning(ckpt: &Checkpoint) -> Option<String> {
    let config = ckpt.config.as_ref()?;
    let model_type = config.get("model_type").and_then(serde_json::Value::as_str);
    match model_type {
        Some(m) if KNOWN_MODEL_TYPES.contains(&m) => None,
        Some(m) => Some(format!(
            "model_type {m:?} is not one fp8forge's rules were checked against ({}); the generic rules were \
             used: every 2-D .weight quantized but embeddings, the head, norms, routers and MTP projections",
            KNOWN_MODEL_TYPES.join(", ")
        )),
        None => Some("config.json names no model_type; the generic rules were used".into()),
    }
}

/// Settles the tensors `--only` asks to quantize that no serving engine loads in FP8: an `--only`
/// pattern that matches nothing else is refused ([`PlanError::Unloadable`]); one that also matches
/// loadable weights keeps those tensors in BF16, with a warning naming them.
fn settle_unloadable(
    ckpt: &Checkpoint,
    sel: &Selection,
    decisions: &mut [Vec<Decision>],
) -> Result<Option<String>, PlanError> {
    let tensors = || {
        ckpt.shards
            .iter()
            .enumerate()
            .flat_map(|(si, s)| s.file.header().tensors.iter().enumerate().map(move |(ti, t)| (si, ti, s, t)))
    };
    for re in sel.only() {
        let mut unloadable = None;
        let mut loadable = false;
        for (si, ti, s, t) in tensors().filter(|(.., t)| re.is_match(&t.name)) {
            match decisions[si][ti] {
                Decision::Quantize => loadable = true,
                Decision::Unloadable(why) => unloadable = unloadable.or(Some((s, t, why))),
                Decision::Keep(_) => {}
            }
        }
        if let (Some((s, t, why)), false) = (unloadable, loadable) {
            return Err(PlanError::Unloadable { path: s.file.path().to_owned(), tensor: t.name.clone(), why });
        }
    }
    let mut kept = Vec::new();
    for (si, ti, _, t) in tensors() {
        if let Decision::Unloadable(why) = decisions[si][ti] {
            kept.push(format!("{} ({why})", t.name));
            decisions[si][ti] = Decision::Keep(KeepReason::Default(why));
        }
    }
    Ok((!kept.is_empty()).then(|| {
        format!(
            "--only matched {} tensors no serving engine loads in FP8, kept in BF16: {}",
            kept.len(),
            kept.join(", ")
        )
    }))
}

/// Makes every group the engines load as one (see [`crate::groups`]) all FP8 or all kept: a
/// group a `--skip` split is kept whole, one an `--only` split is quantized whole. Returns what
/// was widened.
fn widen(ckpt: &Checkpoint, decisions: &mut [Vec<Decision>]) -> Vec<Widened> {
    // Group key -> (kind, members as (shard, tensor)).
    let mut groups: std::collections::BTreeMap<String, (GroupKind, Vec<(usize, usize)>)> = Default::default();
    for (si, s) in ckpt.shards.iter().enumerate() {
        for (ti, t) in s.file.header().tensors.iter().enumerate() {
            if let Some((key, kind)) = group_of(&t.name) {
                groups.entry(key).or_insert((kind, vec![])).1.push((si, ti));
            }
        }
    }
    let mut widened = Vec::new();
    for (group, (kind, members)) in groups {
        let quantized = members.iter().filter(|&&(s, t)| decisions[s][t] == Decision::Quantize).count();
        if quantized == 0 || quantized == members.len() {
            continue;
        }
        // Kept by a --skip anywhere in the group: keep it all. Else, when --only chose a part,
        // quantize it all; a group split any other way (a member of another dtype) is kept whole.
        let only = members.iter().any(|&(s, t)| decisions[s][t] == Decision::Keep(KeepReason::NotOnly));
        let skipped =
            !only || members.iter().any(|&(s, t)| matches!(decisions[s][t], Decision::Keep(KeepReason::Skip(_))));
        let mut changed = 0;
        for &(s, t) in &members {
            let d = &mut decisions[s][t];
            if skipped && *d == Decision::Quantize {
                *d = Decision::Keep(KeepReason::Widened(group.clone()));
                changed += 1;
            } else if !skipped && matches!(d, Decision::Keep(KeepReason::NotOnly)) {
                *d = Decision::Quantize;
                changed += 1;
            }
        }
        widened.push(Widened { group, kind, kept: skipped, changed, weights: members.len() });
    }
    widened
}

/// The item of tensor `t` of input shard `si` under decision `d`: quantized (codes and a scale
/// grid) or copied.
fn item(
    si: usize,
    shard: &fp8forge_formats::Shard,
    t: &fp8forge_formats::TensorInfo,
    d: Decision,
    opts: &ConvertOptions,
) -> Result<Item, PlanError> {
    let (action, outputs) = match d {
        Decision::Quantize => {
            let (rows, cols) = (t.shape[0], t.shape[1]);
            let outs = vec![
                PlannedTensor { name: t.name.clone(), dtype: Dtype::F8_E4M3, shape: vec![rows, cols] },
                PlannedTensor {
                    name: scale_name(&t.name, opts.format),
                    dtype: Dtype::F32,
                    shape: vec![rows.div_ceil(BLOCK), cols.div_ceil(BLOCK)],
                },
            ];
            (Action::Quantize { rows, cols }, outs)
        }
        Decision::Keep(reason) => {
            if matches!(t.dtype, Dtype::F8_E4M3 | Dtype::F8_E5M2) {
                return Err(PlanError::AlreadyQuantized {
                    path: shard.file.path().to_owned(),
                    what: format!("tensor {} is {:?}", t.name, t.dtype),
                });
            }
            let out = PlannedTensor { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone() };
            (Action::Copy { reason: reason.to_string() }, vec![out])
        }
        Decision::Unloadable(why) => {
            return Err(PlanError::Unloadable { path: shard.file.path().to_owned(), tensor: t.name.clone(), why });
        }
    };
    Ok(Item { source: t.name.clone(), shard: si, action, outputs, bytes_in: t.nbytes() as u64 })
}

/// Groups each input shard's items, in order, into output files of at most `max_shard_size`
/// bytes of data (a larger tensor alone), named as transformers names shards.
fn group_files(items_per_shard: Vec<Vec<Item>>, max_shard_size: u64) -> Vec<OutFile> {
    let mut groups: Vec<(usize, Vec<Item>)> = Vec::new();
    for (si, items) in items_per_shard.into_iter().enumerate() {
        let mut current: Vec<Item> = Vec::new();
        let mut size = 0u64;
        for item in items {
            let b: u64 = item.outputs.iter().map(PlannedTensor::nbytes).sum();
            if !current.is_empty() && size + b > max_shard_size {
                groups.push((si, std::mem::take(&mut current)));
                size = 0;
            }
            size += b;
            current.push(item);
        }
        if !current.is_empty() || groups.iter().all(|(s, _)| *s != si) {
            groups.push((si, current));
        }
    }
    let n = groups.len();
    groups
        .into_iter()
        .enumerate()
        .map(|(i, (input_shard, items))| OutFile {
            name: if n == 1 {
                "model.safetensors".into()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
            },
            input_shard,
            items,
        })
        .collect()
}

/// Refuses a plan that would write two tensors of one name: an input tensor named like the scale
/// of a weight that is quantized.
fn check_names(ckpt: &Checkpoint, items: &[Vec<Item>]) -> Result<(), PlanError> {
    let mut scales: HashMap<&str, &str> = HashMap::new();
    for item in items.iter().flatten() {
        if let (Action::Quantize { .. }, Some(scale)) = (&item.action, item.outputs.get(1)) {
            scales.insert(&scale.name, &item.source);
        }
    }
    for item in items.iter().flatten() {
        if let Some(weight) = scales.get(item.source.as_str()) {
            return Err(PlanError::NameClash {
                path: ckpt.shards[item.shard].file.path().to_owned(),
                tensor: item.source.clone(),
                weight: (*weight).to_owned(),
            });
        }
    }
    Ok(())
}

impl Plan {
    /// A digest identifying the plan: equal digests mean identical output. It guards `--resume`,
    /// so it is never computed over a default in place of the plan.
    ///
    /// # Errors
    ///
    /// [`PlanError::Digest`] if the plan cannot be serialized (it always can: plain data).
    pub fn digest(&self) -> Result<String, PlanError> {
        let json = serde_json::to_vec(self).map_err(PlanError::Digest)?;
        Ok(fp8forge_formats::atomic::hex(&Sha256::digest(&json)))
    }

    /// Summary numbers.
    pub fn summary(&self) -> PlanSummary {
        let mut s = PlanSummary { files: self.files.len(), ..Default::default() };
        for item in self.files.iter().flat_map(|f| &f.items) {
            s.tensors += 1;
            match item.action {
                Action::Quantize { .. } => s.quantized += 1,
                Action::Copy { .. } => s.copied += 1,
            }
            s.bytes_in += item.bytes_in;
            s.bytes_out += item.outputs.iter().map(PlannedTensor::nbytes).sum::<u64>();
        }
        s
    }

    /// The modules a loader must build unquantized, as module names (a kept 2-D weight's name
    /// without `.weight`), with, for each MoE layer whose experts are all kept, the fused module
    /// the engines look up (`model.layers.3.mlp.experts`).
    pub fn kept_modules(&self) -> Vec<String> {
        let items = || self.files.iter().flat_map(|f| &f.items);
        let mut kept: Vec<String> = items()
            .filter(|i| matches!(i.action, Action::Copy { .. }) && i.outputs[0].shape.len() == 2)
            .filter_map(|i| i.source.strip_suffix(".weight").map(str::to_owned))
            .collect();
        // An experts group is kept all or none (widening sees to it): one kept weight tells.
        let mut moe: Vec<String> = items()
            .filter(|i| matches!(i.action, Action::Copy { .. }))
            .filter_map(|i| group_of(&i.source))
            .filter(|(_, kind)| *kind == GroupKind::Experts)
            .map(|(layer, _)| layer)
            .collect();
        moe.sort();
        moe.dedup();
        kept.extend(moe);
        kept
    }

    /// Indices of the output files that job `i` of `n` writes: those whose input shard falls in
    /// the job's contiguous share of the input shards.
    pub fn files_of_job(&self, i: usize, n: usize) -> Vec<usize> {
        let shards = self.input_shards.len();
        let (lo, hi) = (i * shards / n, (i + 1) * shards / n);
        (0..self.files.len()).filter(|&f| (lo..hi).contains(&self.files[f].input_shard)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dequant::fixture::{T, write_checkpoint};

    fn t(name: &str, dtype: Dtype, shape: &[usize]) -> T {
        let n: usize = shape.iter().product();
        (name.into(), dtype, shape.to_vec(), vec![0; n * dtype.bitsize() / 8])
    }

    fn bf16(name: &str, shape: &[usize]) -> T {
        t(name, Dtype::BF16, shape)
    }

    /// Two input shards: a 2-D linear weight of 300×200 and a router in the first, norms and the
    /// head in the second.
    fn checkpoint(dir: &std::path::Path) -> Checkpoint {
        let shards = vec![
            vec![
                bf16("model.layers.0.mlp.down_proj.weight", &[300, 200]),
                bf16("model.layers.0.mlp.gate.weight", &[8, 200]),
            ],
            vec![bf16("model.norm.weight", &[200]), bf16("lm_head.weight", &[50, 200])],
        ];
        write_checkpoint(dir, &shards, &serde_json::json!({"model_type": "mixtral"}));
        Checkpoint::open(dir).expect("open")
    }

    #[test]
    fn the_plan_quantizes_linear_weights_into_codes_and_a_ceil_grid_and_keeps_the_rest() {
        let d = tempfile::tempdir().expect("tempdir");
        let ck = checkpoint(d.path());
        for (format, suffix) in [(OutputFormat::Deepseek, "_scale_inv"), (OutputFormat::CompressedTensors, "_scale")] {
            let plan = make_plan(&ck, &ConvertOptions { format, ..ConvertOptions::default() }).expect("plan");
            let items: Vec<&Item> = plan.files.iter().flat_map(|f| &f.items).collect();
            assert_eq!(items.len(), 4);
            let q = items.iter().find(|i| i.source.ends_with("down_proj.weight")).expect("down_proj");
            assert_eq!(q.action, Action::Quantize { rows: 300, cols: 200 });
            assert_eq!(q.outputs[0].dtype, Dtype::F8_E4M3);
            assert_eq!(q.outputs[1].name, format!("model.layers.0.mlp.down_proj.weight{suffix}"));
            assert_eq!((q.outputs[1].dtype, q.outputs[1].shape.as_slice()), (Dtype::F32, &[3usize, 2][..]));
            for kept in ["mlp.gate.weight", "model.norm.weight", "lm_head.weight"] {
                let i = items.iter().find(|i| i.source.ends_with(kept)).expect(kept);
                assert!(matches!(i.action, Action::Copy { .. }) && i.outputs.len() == 1, "{kept} not kept");
            }
            let s = plan.summary();
            assert_eq!((s.tensors, s.quantized, s.copied, s.files), (4, 1, 3, 2));
            assert_eq!(s.bytes_out, 300 * 200 + 6 * 4 + (8 * 200 + 200 + 50 * 200) * 2);
        }
    }

    #[test]
    fn output_files_follow_input_shards_split_at_the_size_limit_and_are_named_like_transformers() {
        let d = tempfile::tempdir().expect("tempdir");
        let ck = checkpoint(d.path());
        let names =
            |p: &Plan| p.files.iter().map(|f| (f.name.clone(), f.input_shard, f.items.len())).collect::<Vec<_>>();
        let one = make_plan(&ck, &ConvertOptions::default()).expect("plan");
        assert_eq!(
            names(&one),
            [("model-00001-of-00002.safetensors".to_string(), 0, 2), ("model-00002-of-00002.safetensors".into(), 1, 2)]
        );
        // A limit below the quantized weight: it goes alone; the router starts the next file.
        let small =
            make_plan(&ck, &ConvertOptions { max_shard_size: 10_000, ..ConvertOptions::default() }).expect("plan");
        assert_eq!(names(&small).iter().map(|n| (n.1, n.2)).collect::<Vec<_>>(), [(0, 1), (0, 1), (1, 1), (1, 1)]);
        assert!(small.files[3].name == "model-00004-of-00004.safetensors");
        // Jobs of an array share the files out, each exactly once.
        for n in 1..=5 {
            let mut all: Vec<usize> = (0..n).flat_map(|i| small.files_of_job(i, n)).collect();
            all.sort();
            assert_eq!(all, (0..small.files.len()).collect::<Vec<_>>(), "{n} jobs");
        }
    }

    #[test]
    fn the_digest_is_stable_and_changes_with_the_options() {
        let d = tempfile::tempdir().expect("tempdir");
        let ck = checkpoint(d.path());
        let a = make_plan(&ck, &ConvertOptions::default()).expect("plan").digest().expect("digest");
        let b = make_plan(&ck, &ConvertOptions::default()).expect("plan").digest().expect("digest");
        assert_eq!(a, b);
        let ue8m0 = ConvertOptions { scale_format: ScaleFormat::Ue8m0, ..ConvertOptions::default() };
        assert_ne!(a, make_plan(&ck, &ue8m0).expect("plan").digest().expect("digest"));
    }

    #[test]
    fn fp8_inputs_a_quantization_config_and_scale_name_clashes_are_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        let dir = d.path().join("fp8");
        write_checkpoint(&dir, &[vec![t("m.weight", Dtype::F8_E4M3, &[4, 4])]], &serde_json::json!({}));
        let e = make_plan(&Checkpoint::open(&dir).expect("open"), &ConvertOptions::default()).expect_err("fp8");
        assert!(matches!(e, PlanError::AlreadyQuantized { .. }), "{e}");
        let dir = d.path().join("qc");
        write_checkpoint(&dir, &[vec![bf16("m.weight", &[4, 4])]], &serde_json::json!({"quantization_config": {}}));
        let e = make_plan(&Checkpoint::open(&dir).expect("open"), &ConvertOptions::default()).expect_err("qc");
        assert!(matches!(e, PlanError::AlreadyQuantized { .. }), "{e}");
        let dir = d.path().join("clash");
        let shard = vec![bf16("m.weight", &[4, 4]), t("m.weight_scale_inv", Dtype::F32, &[1, 1])];
        write_checkpoint(&dir, &[shard], &serde_json::json!({}));
        let e = make_plan(&Checkpoint::open(&dir).expect("open"), &ConvertOptions::default()).expect_err("clash");
        assert!(
            matches!(&e, PlanError::NameClash { tensor, weight, .. } if tensor == "m.weight_scale_inv" && weight == "m.weight"),
            "{e}"
        );
    }
}
