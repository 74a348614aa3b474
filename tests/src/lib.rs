//! End-to-end tests of the `fp8forge` binary, and the synthetic checkpoints they use.
//!
//! The fixtures are small checkpoints laid out as transformers saves DeepSeek-V3, Mixtral and
//! Qwen3-MoE: the hub's per-expert tensor names, config.json, sharded safetensors with an index,
//! tokenizer files. Shapes are deliberately not multiples of 128, and the data has all-zero
//! blocks, outliers and tiny magnitudes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fp8forge_formats::{Dtype, PlannedTensor, ShardWriter};
use serde_json::json;

/// Path of the `fp8forge` binary built by this workspace (`cargo test --workspace` builds it).
pub fn bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FP8FORGE_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test-exe> -> target/<profile>/fp8forge
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
    let p = dir.join("fp8forge");
    assert!(p.exists(), "{} not built: run the tests with `cargo test --workspace`", p.display());
    p
}

/// Runs `fp8forge` with `args`.
pub fn fp8forge(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap_or_else(|e| panic!("cannot run fp8forge: {e}"))
}

/// Runs `fp8forge` with path arguments.
pub fn fp8forge_p<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(bin()).args(args).output().unwrap_or_else(|e| panic!("cannot run fp8forge: {e}"))
}

/// Standard error as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Deterministic pseudo-random numbers: the kernels' splitmix64 stream, drawn as f32 here (the
/// fixtures' values depend on this exact stream).
pub struct Rng(fp8forge_kernels::problem::Rng);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(fp8forge_kernels::problem::Rng::new(seed))
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
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

/// The architectures the fixtures imitate (the runtime's `model_type`s `deepseek_v3`, `mixtral`
/// and `qwen3_moe`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// DeepSeek-V3 (MLA, sigmoid group-limited routing, shared experts, an MTP layer).
    DeepseekV3,
    /// Mixtral (GQA, `block_sparse_moe` experts `w1`/`w2`/`w3`).
    Mixtral,
    /// Qwen3-MoE (GQA with q/k norms, `mlp.experts`).
    Qwen3Moe,
}

/// A tensor of a fixture: name, dtype, shape.
pub type Spec = (String, Dtype, Vec<usize>);

fn w(name: String, shape: &[usize]) -> Spec {
    (name, Dtype::BF16, shape.to_vec())
}

/// The tensors and config.json of a tiny model of `arch` with `layers` layers and `experts` experts.
pub fn model_specs(arch: Arch, layers: usize, experts: usize) -> (Vec<Spec>, serde_json::Value) {
    let (h, vocab) = (320usize, 300usize);
    let mut t = vec![w("model.embed_tokens.weight".into(), &[vocab, h])];
    let config;
    match arch {
        Arch::DeepseekV3 => {
            let (q_lora, kv_lora, rope, nope, v, heads, inter, moe_inter) = (192, 160, 32, 64, 64, 2, 400, 96);
            for l in 0..=layers {
                let p = format!("model.layers.{l}");
                if l == layers {
                    // The multi-token-prediction layer, as DeepSeek-V3 ships it.
                    t.push(w(format!("{p}.eh_proj.weight"), &[h, 2 * h]));
                    t.push(w(format!("{p}.enorm.weight"), &[h]));
                    t.push(w(format!("{p}.hnorm.weight"), &[h]));
                    t.push(w(format!("{p}.shared_head.head.weight"), &[vocab, h]));
                    t.push(w(format!("{p}.shared_head.norm.weight"), &[h]));
                }
                t.push(w(format!("{p}.input_layernorm.weight"), &[h]));
                t.push(w(format!("{p}.post_attention_layernorm.weight"), &[h]));
                let a = format!("{p}.self_attn");
                t.push(w(format!("{a}.q_a_proj.weight"), &[q_lora, h]));
                t.push(w(format!("{a}.q_a_layernorm.weight"), &[q_lora]));
                t.push(w(format!("{a}.q_b_proj.weight"), &[heads * (nope + rope), q_lora]));
                t.push(w(format!("{a}.kv_a_proj_with_mqa.weight"), &[kv_lora + rope, h]));
                t.push(w(format!("{a}.kv_a_layernorm.weight"), &[kv_lora]));
                t.push(w(format!("{a}.kv_b_proj.weight"), &[heads * (nope + v), kv_lora]));
                t.push(w(format!("{a}.o_proj.weight"), &[h, heads * v]));
                if l == 0 {
                    for n in ["gate_proj", "up_proj"] {
                        t.push(w(format!("{p}.mlp.{n}.weight"), &[inter, h]));
                    }
                    t.push(w(format!("{p}.mlp.down_proj.weight"), &[h, inter]));
                } else {
                    t.push(w(format!("{p}.mlp.gate.weight"), &[experts, h]));
                    t.push((format!("{p}.mlp.gate.e_score_correction_bias"), Dtype::F32, vec![experts]));
                    for e in (0..experts).map(|e| format!("experts.{e}")).chain(["shared_experts".to_string()]) {
                        t.push(w(format!("{p}.mlp.{e}.gate_proj.weight"), &[moe_inter, h]));
                        t.push(w(format!("{p}.mlp.{e}.up_proj.weight"), &[moe_inter, h]));
                        t.push(w(format!("{p}.mlp.{e}.down_proj.weight"), &[h, moe_inter]));
                    }
                }
            }
            config = json!({
                "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
                "hidden_size": h, "vocab_size": vocab, "num_hidden_layers": layers, "num_nextn_predict_layers": 1,
                "q_lora_rank": q_lora, "kv_lora_rank": kv_lora, "qk_rope_head_dim": rope, "qk_nope_head_dim": nope,
                "v_head_dim": v, "num_attention_heads": heads, "num_key_value_heads": heads,
                "intermediate_size": inter, "moe_intermediate_size": moe_inter, "n_routed_experts": experts,
                "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
                "norm_topk_prob": true, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
                "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": false
            });
        }
        Arch::Mixtral | Arch::Qwen3Moe => {
            let (heads, kv_heads, head_dim, inter) = (4usize, 2usize, 80usize, 224usize);
            for l in 0..layers {
                let p = format!("model.layers.{l}");
                t.push(w(format!("{p}.input_layernorm.weight"), &[h]));
                t.push(w(format!("{p}.post_attention_layernorm.weight"), &[h]));
                let a = format!("{p}.self_attn");
                t.push(w(format!("{a}.q_proj.weight"), &[heads * head_dim, h]));
                t.push(w(format!("{a}.k_proj.weight"), &[kv_heads * head_dim, h]));
                t.push(w(format!("{a}.v_proj.weight"), &[kv_heads * head_dim, h]));
                t.push(w(format!("{a}.o_proj.weight"), &[h, heads * head_dim]));
                if arch == Arch::Mixtral {
                    t.push(w(format!("{p}.block_sparse_moe.gate.weight"), &[experts, h]));
                    for e in 0..experts {
                        let m = format!("{p}.block_sparse_moe.experts.{e}");
                        t.push(w(format!("{m}.w1.weight"), &[inter, h]));
                        t.push(w(format!("{m}.w2.weight"), &[h, inter]));
                        t.push(w(format!("{m}.w3.weight"), &[inter, h]));
                    }
                } else {
                    t.push(w(format!("{a}.q_norm.weight"), &[head_dim]));
                    t.push(w(format!("{a}.k_norm.weight"), &[head_dim]));
                    t.push(w(format!("{p}.mlp.gate.weight"), &[experts, h]));
                    for e in 0..experts {
                        let m = format!("{p}.mlp.experts.{e}");
                        t.push(w(format!("{m}.gate_proj.weight"), &[inter, h]));
                        t.push(w(format!("{m}.up_proj.weight"), &[inter, h]));
                        t.push(w(format!("{m}.down_proj.weight"), &[h, inter]));
                    }
                }
            }
            let common = json!({
                "hidden_size": h, "vocab_size": vocab, "num_hidden_layers": layers, "num_attention_heads": heads,
                "num_key_value_heads": kv_heads, "head_dim": head_dim, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
                "torch_dtype": "bfloat16", "tie_word_embeddings": false, "num_experts_per_tok": 2
            });
            let mut c = common;
            if arch == Arch::Mixtral {
                c["architectures"] = json!(["MixtralForCausalLM"]);
                c["model_type"] = json!("mixtral");
                c["intermediate_size"] = json!(inter);
                c["num_local_experts"] = json!(experts);
            } else {
                c["architectures"] = json!(["Qwen3MoeForCausalLM"]);
                c["model_type"] = json!("qwen3_moe");
                c["moe_intermediate_size"] = json!(inter);
                c["num_experts"] = json!(experts);
                c["norm_topk_prob"] = json!(true);
            }
            config = c;
        }
    }
    t.push(w("model.norm.weight".into(), &[h]));
    t.push(w("lm_head.weight".into(), &[vocab, h]));
    (t, config)
}

/// Data of one fixture tensor: gaussian ×0.02 weights, with an all-zero block, an outlier and a
/// block of tiny magnitudes planted in 2-D weights; norms near 1; biases small f32.
pub fn tensor_bytes(spec: &Spec, rng: &mut Rng) -> Vec<u8> {
    let (name, dtype, shape) = spec;
    let numel: usize = shape.iter().product();
    let mut vals: Vec<f32> = (0..numel).map(|_| rng.normal() * 0.02).collect();
    if name.contains("norm") {
        vals.iter_mut().for_each(|v| *v += 1.0);
    }
    if shape.len() == 2 && shape[0] > 130 && shape[1] > 128 && name.ends_with("proj.weight") {
        let cols = shape[1];
        for r in 0..128 {
            for c in 0..128 {
                vals[r * cols + c] = 0.0; // an all-zero block
            }
        }
        vals[130 * cols + 3] = 40.0; // an outlier
        for r in 128..shape[0].min(256) {
            for c in 128..cols.min(256) {
                vals[r * cols + c] *= 1e-30; // tiny magnitudes
            }
        }
        vals[130 * cols + 3] = 40.0;
    }
    match dtype {
        Dtype::I64 => (0..numel as i64).flat_map(i64::to_le_bytes).collect(),
        Dtype::U8 => (0..numel).map(|i| i as u8).collect(),
        Dtype::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F16 => vals.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        _ => vals.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
    }
}

/// Writes a checkpoint of `specs` into `dir` (created), split into `shards` files (with an
/// index when more than one), plus config.json and the usual tokenizer and generation files.
pub fn write_checkpoint(dir: &Path, specs: &[Spec], config: &serde_json::Value, shards: usize, seed: u64) {
    std::fs::create_dir_all(dir).expect("create fixture dir");
    let mut rng = Rng::new(seed);
    let per = specs.len().div_ceil(shards.max(1));
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    for (i, chunk) in specs.chunks(per).enumerate() {
        let name = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{shards:05}.safetensors", i + 1)
        };
        let planned: Vec<PlannedTensor> =
            chunk.iter().map(|(n, d, s)| PlannedTensor { name: n.clone(), dtype: *d, shape: s.clone() }).collect();
        let mut wr = ShardWriter::create(&dir.join(&name), planned.clone()).expect("create shard");
        for (spec, p) in chunk.iter().zip(&planned) {
            let data = tensor_bytes(spec, &mut rng);
            wr.write_tensor(&p.name, &[&data]).expect("write tensor");
            weight_map.insert(p.name.clone(), json!(name));
            total += p.nbytes();
        }
        wr.finish().expect("finish shard");
    }
    if shards > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), serde_json::to_vec_pretty(&index).expect("json"))
            .expect("index");
    }
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(config).expect("json")).expect("config");
    std::fs::write(dir.join("generation_config.json"), br#"{"bos_token_id": 0, "eos_token_id": 1}"#).expect("gen");
    std::fs::write(
        dir.join("tokenizer.json"),
        br#"{"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}"#,
    )
    .expect("tok");
    std::fs::write(dir.join("tokenizer_config.json"), br#"{"model_max_length": 4096}"#).expect("tokcfg");
}

/// Writes a tiny model of `arch` into `dir`.
pub fn write_model(dir: &Path, arch: Arch, shards: usize) {
    let (specs, config) = model_specs(arch, 2, 4);
    write_checkpoint(dir, &specs, &config, shards, 42);
}

/// All regular files under `dir` (not hidden), with their bytes, sorted by name.
pub fn dir_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .expect("read_dir")
        .filter_map(Result::ok)
        .filter(|e| e.path().is_file())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).expect("read")))
        .filter(|(n, _)| !n.starts_with('.'))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Asserts that `out` holds exactly the (non-hidden) files of `expected`, byte for byte, and no
/// state directory; the message names the first differing file and byte.
pub fn assert_same_files(expected: &[(String, Vec<u8>)], out: &Path, what: &str) {
    let got = dir_files(out);
    let names = |v: &[(String, Vec<u8>)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&got), names(expected), "{what}: file lists differ");
    for ((n, a), (_, b)) in expected.iter().zip(&got) {
        let first = a.iter().zip(b).position(|(x, y)| x != y);
        assert!(
            a.len() == b.len() && first.is_none(),
            "{what}: {n} differs (sizes {} vs {}, first byte {first:?})",
            a.len(),
            b.len()
        );
    }
    assert!(!out.join(".fp8forge").exists(), "{what}: state directory left behind");
}

/// Every entry under `dir` (hidden ones included, recursively): relative path, size, modification
/// time and content hash, sorted; equal snapshots mean nothing was changed, not even touched.
pub fn snapshot(dir: &Path) -> Vec<(String, u64, std::time::SystemTime, String)> {
    use sha2::Digest;
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, u64, std::time::SystemTime, String)>) {
        for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).expect("stat");
            let rel = p.strip_prefix(root).expect("prefix").to_string_lossy().into_owned();
            if m.is_dir() {
                out.push((rel + "/", 0, m.modified().expect("mtime"), String::new()));
                walk(root, &p, out);
            } else {
                let h = if m.is_file() {
                    fp8forge_formats::atomic::hex(&sha2::Sha256::digest(std::fs::read(&p).expect("read")))
                } else {
                    String::new()
                };
                out.push((rel, m.len(), m.modified().expect("mtime"), h));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Names of the entries of `dir` that are not hidden (what a loader would see).
pub fn visible_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.retain(|n| !n.starts_with('.'));
    v.sort();
    v
}

/// Writes a BF16 checkpoint of `tensors` DeepSeek-V3 expert-shaped weights (2048×7168, 29.4 MB
/// each) in `shards` files with an index: a conversion long enough to be interrupted at a chosen
/// point.
pub fn write_large_model(dir: &Path, tensors: usize, shards: usize) {
    let mut specs: Vec<Spec> = (0..tensors)
        .map(|i| {
            (format!("model.layers.{}.mlp.experts.{}.gate_proj.weight", i / 8, i % 8), Dtype::BF16, vec![2048, 7168])
        })
        .collect();
    specs.push(("model.norm.weight".into(), Dtype::BF16, vec![7168]));
    let config = json!({"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"]});
    write_checkpoint(dir, &specs, &config, shards, 3);
}

/// Runs `fp8forge args`, killed after `timeout`; panics naming the command on a hang, so a test
/// that would block fails instead.
pub fn fp8forge_timeout<S: AsRef<std::ffi::OsStr>>(args: &[S], timeout: std::time::Duration) -> Output {
    let mut child = Command::new(bin())
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run fp8forge: {e}"));
    let start = std::time::Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect();
            panic!("fp8forge {shown:?} still running after {timeout:?}: it blocks");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.wait_with_output().expect("output")
}

/// Makes a FIFO at `path`.
pub fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL in path");
    // SAFETY: `c` is a valid NUL-terminated path.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo {}: {}", path.display(), std::io::Error::last_os_error());
}

/// Writes a large checkpoint fast: the tensors of `specs` (split into `shards` files, with an
/// index), whose 2-D weights repeat one block of 64 Ki gaussian BF16 values ×0.02 instead of
/// drawing every value, and config.json.
pub fn write_big_checkpoint(dir: &Path, specs: &[Spec], config: &serde_json::Value, shards: usize) {
    std::fs::create_dir_all(dir).expect("create fixture dir");
    let mut rng = Rng::new(7);
    let pattern: Vec<u8> = (0..1 << 16).flat_map(|_| half::bf16::from_f32(rng.normal() * 0.02).to_le_bytes()).collect();
    let per = specs.len().div_ceil(shards.max(1));
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in specs.chunks(per).enumerate() {
        let name = format!("model-{:05}-of-{shards:05}.safetensors", i + 1);
        let planned: Vec<PlannedTensor> =
            chunk.iter().map(|(n, d, s)| PlannedTensor { name: n.clone(), dtype: *d, shape: s.clone() }).collect();
        let mut wr = ShardWriter::create(&dir.join(&name), planned.clone()).expect("create shard");
        for (spec, p) in chunk.iter().zip(&planned) {
            let data = if spec.1 == Dtype::BF16 && spec.2.len() == 2 {
                pattern.iter().copied().cycle().take(p.nbytes() as usize).collect()
            } else {
                tensor_bytes(spec, &mut rng)
            };
            wr.write_tensor(&p.name, &[&data]).expect("write tensor");
            weight_map.insert(p.name.clone(), json!(name));
        }
        wr.finish().expect("finish shard");
    }
    let index = json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), serde_json::to_vec_pretty(&index).expect("json"))
        .expect("index");
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(config).expect("json")).expect("config");
}

/// True once process `pid` has `path` memory-mapped (read from /proc/PID/maps).
pub fn has_mapped(pid: u32, path: &Path) -> bool {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let p = path.to_string_lossy();
    maps.lines().any(|l| l.ends_with(p.as_ref()))
}

/// The path of the first place where `a` and `b` differ, numbers compared to `rel` relative or
/// `abs` absolute (a difference of two close figures, such as ln(PPL ratio), has no relative
/// precision), everything else exactly; `None` when they agree.
pub fn json_difference(a: &serde_json::Value, b: &serde_json::Value, rel: f64, abs: f64) -> Option<String> {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap_or(f64::NAN), y.as_f64().unwrap_or(f64::NAN));
            let close = x == y || (x - y).abs() <= (rel * x.abs().max(y.abs())).max(abs);
            (!close).then(|| format!(": {x} vs {y}"))
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (x, y))| json_difference(x, y, rel, abs).map(|d| format!("[{i}]{d}"))),
        (Value::Object(x), Value::Object(y)) if x.len() == y.len() => x.iter().find_map(|(k, v)| match y.get(k) {
            Some(w) => json_difference(v, w, rel, abs).map(|d| format!(".{k}{d}")),
            None => Some(format!(".{k}: missing from the second")),
        }),
        _ if a == b => None,
        _ => Some(format!(": {a} vs {b}")),
    }
}
