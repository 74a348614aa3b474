//! `fp8forge eval` against numbers Hugging Face transformers computed (tests/fixtures/hf, made by
//! tools/make_fixtures.py), streaming against resident evaluation, a memory cap below the model
//! size, and bad input.

use std::path::{Path, PathBuf};

use fp8forge_tests::{Arch, fp8forge_p, json_difference, model_specs, stderr, write_checkpoint};
use serde_json::Value;

const ARCHS: [&str; 3] = ["deepseek_v3", "mixtral", "qwen3_moe"];

fn fixture(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/hf").join(arch)
}

fn reference(arch: &str, name: &str) -> Value {
    let p = fixture(arch).join(name);
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .expect("reference json")
}

/// A path as a command-line argument (the test paths are UTF-8).
fn s(p: &Path) -> String {
    p.to_str().expect("UTF-8 path").to_owned()
}

/// Runs `fp8forge eval ... --json` and returns its JSON.
fn eval_json(args: &[String]) -> Value {
    let mut a: Vec<String> = vec!["eval".into()];
    a.extend_from_slice(args);
    a.push("--json".into());
    let o = fp8forge_p(&a);
    assert_eq!(o.status.code(), Some(0), "eval failed: {}", stderr(&o));
    serde_json::from_slice(&o.stdout).expect("eval --json prints one JSON object")
}

fn eval_fixture(model: &Path, arch: &str, extra: &[&str]) -> Value {
    let tokens = fixture(arch).join("tokens.txt");
    let mut a: Vec<String> = vec![s(model), "--tokens".into(), s(&tokens), "--ctx".into(), "64".into()];
    a.extend(extra.iter().map(|x| x.to_string()));
    eval_json(&a)
}

fn assert_close(arch: &str, what: &str, got: f64, want: f64, rel: f64) {
    let err = (got / want - 1.0).abs();
    assert!(err <= rel, "{arch} {what}: ours {got}, transformers {want}, relative difference {err:.2e} > {rel:.0e}");
}

fn convert(input: &Path, out: &Path, extra: &[&str]) {
    let mut a: Vec<String> = vec!["convert".into(), s(input), s(out), "--quiet".into()];
    a.extend(extra.iter().map(|x| x.to_string()));
    let o = fp8forge_p(&a);
    assert_eq!(o.status.code(), Some(0), "convert failed: {}", stderr(&o));
}

#[test]
fn bf16_perplexity_matches_transformers_within_1e4() {
    for arch in ARCHS {
        let r = reference(arch, "reference.json");
        let ours = eval_fixture(&fixture(arch), arch, &[]);
        assert_eq!(ours["tokens_scored"], r["tokens_scored"], "{arch}: tokens scored");
        let (got, want) = (ours["perplexity"].as_f64().unwrap_or(f64::NAN), r["perplexity"].as_f64().unwrap_or(0.0));
        // A random model scores near its vocabulary size; the fixtures are peaky on purpose,
        // so that a wrong layer shows up as a large perplexity difference.
        assert!(want < 10.0, "{arch}: the fixture's reference perplexity {want} is not peaky");
        assert_close(arch, "BF16 perplexity", got, want, 1e-4);
    }
}

#[test]
fn bf16_logits_match_transformers() {
    use fp8forge_runtime::model::Model;
    for arch in ARCHS {
        let r = reference(arch, "reference.json");
        let want: Vec<Vec<f64>> = serde_json::from_value(r["logits_window0"].clone()).expect("logits_window0");
        let tokens: Vec<u32> = std::fs::read_to_string(fixture(arch).join("tokens.txt"))
            .expect("tokens")
            .split_whitespace()
            .map(|t| t.parse().expect("token id"))
            .collect();
        let m = Model::open(&fixture(arch), 64).expect("open fixture");
        let w = &tokens[..64];
        let mut h = m.embed(w).expect("embed");
        for i in 0..m.cfg.num_layers() {
            m.layer(i).expect("layer").forward(&m.rope, &mut h, w.len(), None).expect("forward");
        }
        let logits = m.logits(&h, w.len(), None).expect("logits");
        let v = m.cfg.vocab;
        let mut worst = 0f64;
        for (pos, row) in want.iter().enumerate() {
            assert_eq!(row.len(), v, "{arch}: reference row length");
            for (j, &x) in row.iter().enumerate() {
                worst = worst.max((logits[pos * v + j] as f64 - x).abs() / (1.0 + x.abs()));
            }
        }
        assert!(worst < 1e-4, "{arch}: logits of window 0 differ from transformers by up to {worst:.2e}");
    }
}

#[test]
fn fp8_perplexity_matches_transformers_on_dequantized_weights() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for arch in ARCHS {
        for (scale, reference_file, format) in [
            ("f32", "reference_fp8.json", "deepseek"),
            ("f32", "reference_fp8.json", "compressed-tensors"),
            ("ue8m0", "reference_fp8_ue8m0.json", "deepseek"),
        ] {
            let out = tmp.path().join(format!("{arch}-{scale}-{format}"));
            convert(&fixture(arch), &out, &["--scale-format", scale, "--format", format]);
            let r = reference(arch, reference_file);
            let ours = eval_fixture(&out, arch, &["--act-quant", "none"]);
            let what = format!("FP8 ({scale} scales, {format}) weight-only perplexity");
            assert_close(
                arch,
                &what,
                ours["perplexity"].as_f64().unwrap_or(f64::NAN),
                r["perplexity"].as_f64().unwrap_or(0.0),
                1e-4,
            );
            let bf16 = reference(arch, "reference.json")["perplexity"].as_f64().unwrap_or(0.0);
            assert_ne!(ours["perplexity"].as_f64(), Some(bf16), "{arch}: FP8 weights changed nothing");
        }
    }
}

/// Removes the fields that legitimately differ between two runs.
fn without_timing(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        for k in ["seconds", "tokens_per_second", "streamed"] {
            o.remove(k);
        }
    }
    v
}

#[test]
fn streamed_and_resident_evaluation_agree_to_rounding() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for arch in ARCHS {
        let fp8 = tmp.path().join(arch);
        convert(&fixture(arch), &fp8, &[]);
        let base = fixture(arch);
        let b = s(&base);
        let resident = eval_fixture(&fp8, arch, &["--baseline", &b]);
        let streamed = eval_fixture(&fp8, arch, &["--baseline", &b, "--stream"]);
        assert_eq!(resident["streamed"], Value::Bool(false), "{arch}: the small model should be resident");
        assert_eq!(streamed["streamed"], Value::Bool(true));
        assert_eq!(resident["act_quant"], "fp8", "{arch}: FP8 checkpoints default to W8A8");
        for k in ["perplexity", "baseline_perplexity", "kld_mean", "top1_agreement", "routing_agreement"] {
            assert!(resident[k].is_number(), "{arch}: {k} missing from --json");
        }
        assert_llama_cpp_figures_consistent(arch, &resident);
        // Streaming runs each feed-forward block over several windows at once: the same sums per
        // token, rounded by products of other shapes (about 1e-9), which W8A8 can amplify where an
        // activation sits on an FP8 rounding boundary.
        let diff = json_difference(&without_timing(resident), &without_timing(streamed), 1e-4, 1e-6);
        assert!(diff.is_none(), "{arch}: streamed differs from resident at {}", diff.unwrap_or_default());
    }
}

/// The KL divergence percentiles in llama.cpp's order, highest first.
const KLD_PERCENTILES: [&str; 8] = ["p99.9", "p99", "p95", "p90", "p50", "p10", "p5", "p1"];

fn number(v: &Value, arch: &str, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{arch}: {key} missing from --json: {}", v[key]))
}

/// The llama.cpp figures of an FP8 model against its BF16 baseline agree with each other and with
/// the perplexities.
fn assert_llama_cpp_figures_consistent(arch: &str, r: &Value) {
    let n = |k: &str| number(r, arch, k);
    let p: Vec<f64> = KLD_PERCENTILES
        .iter()
        .map(|k| r["kld_percentiles"][k].as_f64().unwrap_or_else(|| panic!("{arch}: kld_percentiles.{k} missing")))
        .collect();
    assert!(p.windows(2).all(|w| w[0] >= w[1]) && p[7] >= 0.0, "{arch}: percentiles not decreasing: {p:?}");
    assert!(n("kld_max") >= p[0] && p[0] > 0.0, "{arch}: max {} against 99.9% {}", n("kld_max"), p[0]);
    assert_eq!(n("kld_p99"), p[1], "{arch}: kld_p99 is not kld_percentiles.p99");
    let ln_ratio = (n("perplexity") / n("baseline_perplexity")).ln();
    assert!((n("ln_ppl_ratio") - ln_ratio).abs() < 1e-9, "{arch}: ln ratio {} != {ln_ratio}", n("ln_ppl_ratio"));
    // Paired differences: the shared noise of the two models' NLLs cancels.
    let separate = n("nll_stderr").hypot(n("baseline_perplexity_stderr") / n("baseline_perplexity"));
    assert!(n("ln_ppl_ratio_stderr") > 0.0 && n("ln_ppl_ratio_stderr") < separate, "{arch}: paired stderr");
    assert!(n("delta_p_rms") >= n("delta_p_mean").abs() && n("delta_p_rms") > 0.0, "{arch}: RMS Δp");
    for k in ["delta_p_mean_stderr", "delta_p_rms_stderr", "kld_mean_stderr", "top1_agreement_stderr"] {
        assert!(n(k) >= 0.0 && n(k).is_finite(), "{arch}: {k} = {}", n(k));
    }
    // The same top-1 is in the top 5, so top-5 agreement is at least top-1 agreement.
    let (top1, top5, overlap) = (n("top1_agreement"), n("top5_agreement"), n("top5_overlap"));
    assert!(top1 <= top5 && top5 <= 1.0 && overlap > 0.5 && overlap <= 1.0, "{arch}: {top1} {top5} {overlap}");
}

#[test]
fn a_model_against_itself_shows_no_change_in_any_llama_cpp_figure() {
    for arch in ARCHS {
        let m = fixture(arch);
        let r = eval_fixture(&m, arch, &["--baseline", &s(&m)]);
        let n = |k: &str| number(&r, arch, k);
        for k in KLD_PERCENTILES {
            assert_eq!(r["kld_percentiles"][k].as_f64(), Some(0.0), "{arch}: KLD {k}");
        }
        for k in ["kld_mean", "kld_max", "kld_p99", "ln_ppl_ratio", "ln_ppl_ratio_stderr"] {
            assert_eq!(n(k), 0.0, "{arch}: {k}");
        }
        for k in ["delta_p_mean", "delta_p_mean_stderr", "delta_p_rms", "delta_p_rms_stderr", "top1_agreement_stderr"] {
            assert_eq!(n(k), 0.0, "{arch}: {k}");
        }
        for k in ["top1_agreement", "top5_agreement", "top5_overlap", "routing_agreement"] {
            assert_eq!(n(k), 1.0, "{arch}: {k}");
        }
        assert_eq!(n("perplexity"), n("baseline_perplexity"), "{arch}: perplexities");
    }
}

/// Runs the binary and returns (exit code, stdout, peak RSS in bytes) via wait4.
/// The child is reaped by wait4 (which std's `wait` cannot do while returning its rusage).
#[allow(clippy::zombie_processes)]
fn run_with_peak_rss(args: &[String]) -> (i32, Vec<u8>, u64) {
    use std::io::Read;
    let mut child = std::process::Command::new(fp8forge_tests::bin())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("spawn fp8forge");
    let mut out = Vec::new();
    child.stdout.take().expect("stdout").read_to_end(&mut out).expect("read stdout");
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value; wait4 fills it for our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    // SAFETY: pid is our child, not yet reaped; the pointers are valid for the call.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    assert_eq!(r, pid, "wait4");
    (libc::WEXITSTATUS(status), out, ru.ru_maxrss as u64 * 1024)
}

#[test]
fn memory_cap_below_model_size_streams_and_matches_resident() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("model");
    let (specs, config) = model_specs(Arch::Mixtral, 20, 8);
    write_checkpoint(&dir, &specs, &config, 3, 7);
    let on_disk: u64 = std::fs::read_dir(&dir)
        .expect("read dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    let tokens = tmp.path().join("tokens.txt");
    let ids: Vec<String> = (0..600u32).map(|i| ((i * 7919) % 300).to_string()).collect();
    std::fs::write(&tokens, ids.join(" ")).expect("tokens");
    let base =
        ["eval".to_string(), s(&dir), "--tokens".into(), s(&tokens), "--ctx".into(), "128".into(), "--json".into()];
    let mut capped = base.to_vec();
    capped.extend(["--max-memory".into(), format!("{}", on_disk / 4)]);
    let (code, out, rss) = run_with_peak_rss(&capped);
    assert_eq!(code, 0, "capped eval failed");
    let streamed: Value = serde_json::from_slice(&out).expect("json");
    assert_eq!(streamed["streamed"], Value::Bool(true), "a model over --max-memory must be streamed");
    // The BF16 checkpoint is about 80 MB (160 MB once in f32); streaming holds one layer of 8 MB.
    assert!(rss < on_disk / 2, "peak RSS {rss} B is not below half the model's {on_disk} B on disk");
    let mut resident_args = base.to_vec();
    resident_args.extend(["--max-memory".into(), "64GiB".into()]);
    let (code, out, resident_rss) = run_with_peak_rss(&resident_args);
    assert_eq!(code, 0, "resident eval failed");
    // The measurement can tell the two apart: this model's matrices are small (at most one 4 MB
    // tile each), which the runtime widens to f32 once at load, so holding every layer takes
    // twice the BF16 bytes. (Large matrices stay in the mapped files in both modes.)
    assert!(resident_rss > on_disk, "resident peak RSS {resident_rss} B is not above {on_disk} B");
    let resident: Value = serde_json::from_slice(&out).expect("json");
    assert_eq!(resident["streamed"], Value::Bool(false));
    let diff = json_difference(&without_timing(streamed), &without_timing(resident), 1e-4, 1e-6);
    assert!(diff.is_none(), "streamed differs from resident at {}", diff.unwrap_or_default());
    eprintln!("model {on_disk} B on disk, peak RSS streamed {rss} B, resident {resident_rss} B");
}

fn expect_eval_refused(args: &[String], expect: &[&str]) {
    let mut a: Vec<String> = vec!["eval".into()];
    a.extend_from_slice(args);
    let o = fp8forge_p(&a);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "exit code; stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    for e in expect {
        assert!(err.contains(e), "stderr lacks {e:?}: {err}");
    }
}

fn copy_fixture(arch: &str, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(fixture(arch)).expect("read fixture").filter_map(Result::ok) {
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

#[test]
fn unsupported_models_and_bad_tokens_exit_2_naming_the_problem() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let tokens = s(&fixture("mixtral").join("tokens.txt"));
    let with_tokens = |d: &Path| vec![s(d), "--tokens".into(), tokens.clone()];
    let edit = |name: &str, f: &dyn Fn(&mut Value)| {
        let d = tmp.path().join(name);
        copy_fixture("mixtral", &d);
        let p = d.join("config.json");
        let mut c: Value = serde_json::from_slice(&std::fs::read(&p).expect("config")).expect("json");
        f(&mut c);
        std::fs::write(&p, serde_json::to_vec(&c).expect("json")).expect("write config");
        d
    };
    let d = edit("llama", &|c| c["model_type"] = "llama".into());
    expect_eval_refused(&with_tokens(&d), &["config.json", "model_type \"llama\"", "not supported"]);
    let d = edit("gelu", &|c| c["hidden_act"] = "gelu".into());
    expect_eval_refused(&with_tokens(&d), &["hidden_act \"gelu\""]);
    let d = edit("longrope", &|c| c["rope_scaling"] = serde_json::json!({"rope_type": "longrope", "factor": 4.0}));
    expect_eval_refused(&with_tokens(&d), &["rope_scaling.rope_type \"longrope\""]);
    let d = edit("wide", &|c| c["hidden_size"] = 192.into());
    expect_eval_refused(&with_tokens(&d), &["model.safetensors", "model.embed_tokens.weight", "shape"]);
    let bad = tmp.path().join("bad-tokens.txt");
    std::fs::write(&bad, "1 2 3 299 300 4").expect("write");
    let m = fixture("mixtral");
    expect_eval_refused(&[s(&m), "--tokens".into(), s(&bad)], &["bad-tokens.txt", "token 4", "300", "vocabulary"]);
    std::fs::write(&bad, "1 2 x").expect("write");
    expect_eval_refused(&[s(&m), "--tokens".into(), s(&bad)], &["bad-tokens.txt", "token 2"]);
    let other = fixture("qwen3_moe");
    let mut a = with_tokens(&m);
    a.extend(["--baseline".into(), s(&other)]);
    expect_eval_refused(&a, &["baseline", "differ"]);
}

/// Rewrites every BF16/F16 tensor of the single-file checkpoint in `src` as F32 (exact widening)
/// into `dst`, config included.
fn widen_to_f32(src: &Path, dst: &Path) {
    use fp8forge_formats::{Dtype, PlannedTensor, SafetensorsFile, ShardWriter};
    std::fs::create_dir_all(dst).expect("mkdir");
    std::fs::copy(src.join("config.json"), dst.join("config.json")).expect("config");
    let f = SafetensorsFile::open(&src.join("model.safetensors")).expect("open");
    let widen = |t: &fp8forge_formats::TensorInfo| -> Vec<u8> {
        let b = f.data(t);
        match t.dtype {
            Dtype::BF16 => {
                b.chunks_exact(2).flat_map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32().to_le_bytes()).collect()
            }
            Dtype::F16 => {
                b.chunks_exact(2).flat_map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32().to_le_bytes()).collect()
            }
            _ => b.to_vec(),
        }
    };
    let planned: Vec<PlannedTensor> = f
        .header()
        .tensors
        .iter()
        .map(|t| PlannedTensor {
            name: t.name.clone(),
            dtype: if matches!(t.dtype, Dtype::BF16 | Dtype::F16) { Dtype::F32 } else { t.dtype },
            shape: t.shape.clone(),
        })
        .collect();
    let mut w = ShardWriter::create(&dst.join("model.safetensors"), planned).expect("create");
    for t in &f.header().tensors {
        w.write_tensor(&t.name, &[&widen(t)]).expect("write");
    }
    w.finish().expect("finish");
}

#[test]
fn f16_and_f32_checkpoints_evaluate_like_their_exact_bf16_source() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let tokens = s(&fixture("qwen3_moe").join("tokens.txt"));
    let args = |d: &Path| vec![s(d), "--tokens".into(), tokens.clone(), "--ctx".into(), "64".into()];
    // BF16 fixture -> F32: identical values, identical numbers.
    let f32_dir = tmp.path().join("f32");
    widen_to_f32(&fixture("qwen3_moe"), &f32_dir);
    let a = eval_json(&args(&fixture("qwen3_moe")));
    let b = eval_json(&args(&f32_dir));
    assert_eq!(b["weights"], "f32");
    assert_eq!(a["perplexity"], b["perplexity"], "BF16 and its exact F32 widening differ");
    // An F16 checkpoint and its F32 widening.
    let (mut specs, config) = model_specs(Arch::Qwen3Moe, 2, 4);
    for sp in &mut specs {
        if sp.1 == fp8forge_formats::Dtype::BF16 {
            sp.1 = fp8forge_formats::Dtype::F16;
        }
    }
    let f16_dir = tmp.path().join("f16");
    write_checkpoint(&f16_dir, &specs, &config, 1, 3);
    let f16_f32 = tmp.path().join("f16-f32");
    widen_to_f32(&f16_dir, &f16_f32);
    let toks = tmp.path().join("t.txt");
    std::fs::write(&toks, (0..200u32).map(|i| ((i * 31) % 300).to_string()).collect::<Vec<_>>().join(" ")).expect("w");
    let args = |d: &Path| vec![s(d), "--tokens".into(), s(&toks), "--ctx".into(), "64".into()];
    let c = eval_json(&args(&f16_dir));
    let d = eval_json(&args(&f16_f32));
    assert_eq!(c["weights"], "f16");
    assert!(c["perplexity"].as_f64().is_some_and(f64::is_finite));
    assert_eq!(c["perplexity"], d["perplexity"], "F16 and its exact F32 widening differ");
}

/// Multiply-adds per token of one decoder layer's products, from config.json alone (the active
/// parameters: attention, a dense MLP or the router, shared experts and `top_k` routed experts),
/// and the query and value widths of attention.
fn active_params(c: &Value, layer: usize) -> (f64, f64) {
    let u = |k: &str| c[k].as_u64().unwrap_or(0) as f64;
    let (h, heads) = (u("hidden_size"), u("num_attention_heads"));
    let (attn, q_out, o_in) = if c.get("kv_lora_rank").is_some() {
        let (qk, v) = (u("qk_nope_head_dim") + u("qk_rope_head_dim"), u("v_head_dim"));
        let q = u("q_lora_rank") * h + heads * qk * u("q_lora_rank");
        let kv =
            (u("kv_lora_rank") + u("qk_rope_head_dim")) * h + heads * (u("qk_nope_head_dim") + v) * u("kv_lora_rank");
        (q + kv + h * heads * v, heads * qk, heads * v)
    } else {
        let d = if c["head_dim"].is_u64() { u("head_dim") } else { h / heads };
        let kv = u("num_key_value_heads") * d;
        (2.0 * heads * d * h + 2.0 * kv * h, heads * d, heads * d)
    };
    let experts = ["n_routed_experts", "num_local_experts", "num_experts"].iter().map(|k| u(k)).fold(0.0, f64::max);
    // DeepSeek: the first `first_k_dense_replace` layers; Qwen3-MoE: `mlp_only_layers`, and every
    // layer but each `decoder_sparse_step`-th.
    let dense = (layer as u64) < c["first_k_dense_replace"].as_u64().unwrap_or(0)
        || c["mlp_only_layers"].as_array().is_some_and(|v| v.iter().any(|x| x.as_u64() == Some(layer as u64)))
        || !(layer as u64 + 1).is_multiple_of(c["decoder_sparse_step"].as_u64().unwrap_or(1));
    let mlp = if dense {
        3.0 * u("intermediate_size") * h
    } else {
        let inter =
            if c["moe_intermediate_size"].is_u64() { u("moe_intermediate_size") } else { u("intermediate_size") };
        experts * h + 3.0 * inter * h * (u("num_experts_per_tok") + u("n_shared_experts"))
    };
    (attn + mlp, q_out + o_in)
}

/// Bytes of tensor data in a safetensors file: its size less the 8-byte length and the header.
fn data_bytes(file: &Path) -> u64 {
    let b = std::fs::read(file).expect("read safetensors");
    b.len() as u64 - 8 - u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

#[test]
fn dry_run_counts_every_multiply_add_and_byte_from_the_config_and_evaluates_nothing() {
    for arch in ARCHS {
        let dir = fixture(arch);
        let c: Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).expect("config")).expect("json");
        let n_tokens = std::fs::read_to_string(dir.join("tokens.txt")).expect("tokens").split_whitespace().count();
        let ctx = 64usize;
        let lengths: Vec<usize> =
            (0..n_tokens).step_by(ctx).map(|s| ctx.min(n_tokens - s)).filter(|&t| t >= 2).collect();
        let layers = c["num_hidden_layers"].as_u64().expect("layers") as usize;
        let mut want = 0.0;
        for l in 0..layers {
            let (per_token, attn_width) = active_params(&c, l);
            want += lengths.iter().map(|&t| t as f64 * per_token + (t * t) as f64 / 2.0 * attn_width).sum::<f64>();
        }
        let (vocab, h) = (c["vocab_size"].as_f64().expect("vocab"), c["hidden_size"].as_f64().expect("hidden"));
        want += n_tokens as f64 * vocab * h;

        let e = eval_fixture(&dir, arch, &["--dry-run"]);
        assert!(e.get("perplexity").is_none(), "{arch}: --dry-run evaluated: {e}");
        let got = number(&e, arch, "multiply_adds");
        assert!((got / want - 1.0).abs() < 1e-9, "{arch}: {got} multiply-adds priced, {want} from the config");
        assert_eq!(e["windows"].as_u64(), Some(lengths.len() as u64), "{arch}: windows");
        assert_eq!(e["bytes_to_read"].as_u64(), Some(data_bytes(&dir.join("model.safetensors"))), "{arch}: bytes");
        for key in ["seconds", "compute_seconds", "peak_memory_bytes"] {
            assert!(number(&e, arch, key) > 0.0, "{arch}: {key} not positive: {e}");
        }

        // Against itself as baseline: every count doubles.
        let e2 = eval_fixture(&dir, arch, &["--dry-run", "--baseline", &s(&dir)]);
        let got2 = number(&e2, arch, "multiply_adds");
        assert!((got2 / (2.0 * want) - 1.0).abs() < 1e-9, "{arch}: {got2} with a baseline, want {}", 2.0 * want);
        assert_eq!(e2["bytes_to_read"].as_u64(), Some(2 * data_bytes(&dir.join("model.safetensors"))), "{arch}");
    }
}
