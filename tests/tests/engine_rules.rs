//! What the output declares, checked by the serving engines' own rules (read from vLLM's and
//! SGLang's loaders, re-implemented here independently of fp8forge): no fused group split between
//! FP8 and BF16, the kept modules under both config keys, a compressed-tensors `ignore` that
//! matches exactly the kept modules, no FP8 head or embedding, `--tp` refusals by the block rules,
//! and the architecture-aware defaults.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Output;

use fp8forge_formats::{Checkpoint, Dtype};
use fp8forge_tests::{Arch, Spec, fp8forge_p, model_specs, stderr, write_checkpoint, write_model};
use serde_json::{Value, json};

fn convert(input: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<&std::ffi::OsStr> =
        vec!["convert".as_ref(), input.as_os_str(), out.as_os_str(), "--quiet".as_ref()];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    fp8forge_p(&args)
}

fn converted(input: &Path, out: &Path, extra: &[&str]) -> Output {
    let o = convert(input, out, extra);
    assert!(o.status.success(), "convert {extra:?}: {}", stderr(&o));
    o
}

/// Every 2-D `.weight` of the output, as module name -> whether it is FP8.
fn fp8_modules(out: &Path) -> BTreeMap<String, bool> {
    let ck = Checkpoint::open(out).expect("output");
    let mut m = BTreeMap::new();
    for s in &ck.shards {
        for t in &s.file.header().tensors {
            if let Some(module) = t.name.strip_suffix(".weight")
                && t.shape.len() == 2
            {
                m.insert(module.to_owned(), t.dtype == Dtype::F8_E4M3);
            }
        }
    }
    m
}

fn quantization_config(out: &Path) -> Value {
    let c: Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).expect("config")).expect("json");
    c["quantization_config"].clone()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

/// The MoE layers of a checkpoint (`model.layers.1.mlp.experts`) with their expert modules.
fn moe_layers(modules: &BTreeMap<String, bool>) -> BTreeMap<String, Vec<String>> {
    let mut layers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in modules.keys() {
        if let Some(i) = m.find(".experts.") {
            layers.entry(m[..i + ".experts".len()].to_owned()).or_default().push(m.clone());
        }
    }
    layers
}

/// vLLM's `is_equal_or_regex_match` for compressed-tensors' `ignore`: the exact name, or `re:`
/// and a Python regular expression matched at the start of the name (`re.match`), which fp8forge
/// never writes.
fn matches_ignore(name: &str, ignore: &[String]) -> bool {
    // fp8forge writes exact names: a `re:` entry is a finding in itself.
    ignore.iter().any(|t| match t.strip_prefix("re:") {
        Some(p) => panic!("ignore has a regular expression re:{p} (checked against {name}): exact names expected"),
        None => t == name,
    })
}

/// The fused module vLLM builds for a weight module, with its parts as the checkpoint names them
/// (vLLM's packed_modules_mapping): q/k/v -> qkv_proj, gate/up -> gate_up_proj.
fn fused_parts(module: &str) -> Option<(String, Vec<String>)> {
    let (parent, leaf) = module.rsplit_once('.')?;
    let parts: &[&str] = match leaf {
        "q_proj" | "k_proj" | "v_proj" if parent.ends_with("self_attn") => &["q_proj", "k_proj", "v_proj"],
        "gate_proj" | "up_proj" if !parent.contains(".experts.") => &["gate_proj", "up_proj"],
        _ => return None,
    };
    let fused = if parts.len() == 3 { "qkv_proj" } else { "gate_up_proj" };
    Some((format!("{parent}.{fused}"), parts.iter().map(|p| format!("{parent}.{p}")).collect()))
}

/// Checks a compressed-tensors output the way vLLM decides per module: every linear module (and
/// fused module, and MoE layer through its `.0.gate_proj`-style lookup names) is ignored exactly
/// when its weights are BF16, no fused module gets mixed schemes, and every `ignore` entry names a
/// kept module or a lookup name of a kept MoE layer.
fn check_ignore_by_vllm_rules(out: &Path) {
    let qc = quantization_config(out);
    assert_eq!(qc["quant_method"], "compressed-tensors");
    let ignore = strings(&qc["ignore"]);
    let modules = fp8_modules(out);
    let linear = |m: &str| !m.contains("embed_tokens") && m != "lm_head";
    let mut used: BTreeSet<String> = BTreeSet::new();
    for (m, &fp8) in modules.iter().filter(|(m, _)| linear(m) && !m.contains(".experts.")) {
        let names = match fused_parts(m) {
            Some((_, parts)) => parts,
            None => vec![m.clone()],
        };
        let ignored: Vec<bool> = names.iter().map(|n| matches_ignore(n, &ignore)).collect();
        assert!(ignored.iter().all(|&i| i == ignored[0]), "{m}: vLLM would find mixed schemes in {names:?}");
        assert_eq!(ignored[0], !fp8, "{m}: FP8 {fp8}, but ignored by the config {}", ignored[0]);
        used.extend(names.into_iter().filter(|n| matches_ignore(n, &ignore)));
    }
    for (layer, experts) in moe_layers(&modules) {
        let lookups: Vec<String> =
            ["gate_proj", "up_proj", "down_proj"].iter().map(|p| format!("{layer}.0.{p}")).collect();
        let ignored: Vec<bool> = lookups.iter().map(|n| matches_ignore(n, &ignore)).collect();
        assert!(ignored.iter().all(|&i| i == ignored[0]), "{layer}: mixed MoE schemes {ignored:?}");
        let fp8: Vec<bool> = experts.iter().map(|e| modules[e]).collect();
        assert!(fp8.iter().all(|&f| f == fp8[0]), "{layer}: experts part FP8, part BF16");
        assert_eq!(ignored[0], !fp8[0], "{layer}: experts FP8 {}, ignored {}", fp8[0], ignored[0]);
        // The experts' own modules, as compressed-tensors matches them module by module.
        for e in &experts {
            assert_eq!(matches_ignore(e, &ignore), !modules[e], "{e}");
        }
        if ignored[0] {
            used.extend(lookups);
            used.extend(experts);
        }
    }
    let stale: Vec<&String> = ignore.iter().filter(|i| !used.contains(*i) && linear(i)).collect();
    assert!(stale.is_empty(), "ignore entries naming no kept module: {stale:?}");
}

#[test]
fn skipping_one_expert_keeps_every_expert_of_its_layer_in_both_formats_and_says_so() {
    let d = tempfile::tempdir().expect("tempdir");
    let input = d.path().join("in");
    write_model(&input, Arch::Qwen3Moe, 1);
    for format in ["deepseek", "compressed-tensors"] {
        let out = d.path().join(format);
        let o = converted(&input, &out, &["--format", format, "--skip", r"experts\.0\."]);
        let err = stderr(&o);
        for layer in ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"] {
            assert!(
                err.lines().any(|l| l.contains("widened") && l.contains(&format!("{layer} "))),
                "{format}: no widened line for {layer}: {err}"
            );
        }
        let modules = fp8_modules(&out);
        for (m, fp8) in &modules {
            if m.contains(".experts.") {
                assert!(!fp8, "{format}: {m} is FP8 though its layer's expert 0 is kept");
            } else if m.ends_with("_proj") {
                assert!(fp8, "{format}: {m} should stay FP8");
            }
        }
        if format == "compressed-tensors" {
            check_ignore_by_vllm_rules(&out);
        }
    }
    // The --json plan says the same.
    let o = fp8forge_p(&[
        "convert".as_ref(),
        input.as_os_str(),
        d.path().join("dry").as_os_str(),
        "--dry-run".as_ref(),
        "--json".as_ref(),
        "--skip".as_ref(),
        r"experts\.0\.".as_ref(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    let widened = v["plan"]["widened"].as_array().expect("widened in the plan");
    assert_eq!(widened.len(), 2, "{widened:?}");
    assert!(
        widened.iter().all(|w| w["kind"] == "experts" && w["kept"] == true && w["weights"] == 12 && w["changed"] == 9)
    );
}

#[test]
fn fused_attention_and_mla_groups_are_widened_by_skip_and_by_only() {
    let d = tempfile::tempdir().expect("tempdir");
    let (mixtral, deepseek) = (d.path().join("mixtral"), d.path().join("deepseek"));
    write_model(&mixtral, Arch::Mixtral, 1);
    write_model(&deepseek, Arch::DeepseekV3, 1);
    // --skip k_proj keeps q, k and v of every layer; o_proj stays FP8.
    let out = d.path().join("m");
    converted(&mixtral, &out, &["--skip", r"layers\.0\.self_attn\.k_proj"]);
    let m = fp8_modules(&out);
    for p in ["q_proj", "k_proj", "v_proj"] {
        assert!(!m[&format!("model.layers.0.self_attn.{p}")], "{p} of layer 0 kept");
        assert!(m[&format!("model.layers.1.self_attn.{p}")], "{p} of layer 1 FP8");
    }
    assert!(m["model.layers.0.self_attn.o_proj"]);
    // --only q_a_proj quantizes SGLang's fused q_a + kv_a, and nothing else.
    let out = d.path().join("d");
    let o = converted(&deepseek, &out, &["--only", "q_a_proj"]);
    assert!(stderr(&o).contains("fused_qkv_a_proj"), "{}", stderr(&o));
    let m = fp8_modules(&out);
    let fp8: BTreeSet<String> = m.iter().filter(|(_, f)| **f).map(|(k, _)| k.clone()).collect();
    // Layers 0 (dense), 1 (MoE) and 2 (the MTP layer).
    let want: BTreeSet<String> = ["q_a_proj", "kv_a_proj_with_mqa"]
        .iter()
        .flat_map(|p| (0..3).map(move |l| format!("model.layers.{l}.self_attn.{p}")))
        .collect();
    assert_eq!(fp8, want);
    // --only on one gate_proj quantizes its up_proj (vLLM's gate_up_proj) too.
    let out = d.path().join("gu");
    converted(&deepseek, &out, &["--only", r"layers\.0\.mlp\.gate_proj"]);
    let m = fp8_modules(&out);
    assert!(m["model.layers.0.mlp.gate_proj"] && m["model.layers.0.mlp.up_proj"] && !m["model.layers.0.mlp.down_proj"]);
}

#[test]
fn kept_modules_are_declared_under_both_keys_exactly() {
    let d = tempfile::tempdir().expect("tempdir");
    let input = d.path().join("in");
    write_model(&input, Arch::DeepseekV3, 1);
    for (i, extra) in
        [vec![], vec!["--skip", r"layers\.1\.mlp\.experts\.3\."], vec!["--skip", "o_proj"]].iter().enumerate()
    {
        let out = d.path().join(format!("out{i}"));
        converted(&input, &out, extra);
        let qc = quantization_config(&out);
        let (a, b) = (strings(&qc["ignored_layers"]), strings(&qc["modules_to_not_convert"]));
        assert_eq!(a, b, "{extra:?}: ignored_layers and modules_to_not_convert differ");
        // Independently: every module whose weight is not FP8, and each MoE layer all kept.
        let modules = fp8_modules(&out);
        let mut want: BTreeSet<String> = modules.iter().filter(|(_, f)| !**f).map(|(m, _)| m.clone()).collect();
        for (layer, experts) in moe_layers(&modules) {
            if experts.iter().all(|e| !modules[e]) {
                want.insert(layer);
            }
        }
        assert_eq!(a.iter().cloned().collect::<BTreeSet<_>>(), want, "{extra:?}");
        assert_eq!(a.len(), want.len(), "{extra:?}: duplicates");
        for m in ["lm_head", "model.layers.1.mlp.gate", "model.layers.2.eh_proj"] {
            assert!(a.contains(&m.to_string()), "{m}");
        }
    }
}

#[test]
fn compressed_tensors_ignore_matches_exactly_the_kept_modules_by_vllm_rules() {
    let d = tempfile::tempdir().expect("tempdir");
    for arch in [Arch::Qwen3Moe, Arch::Mixtral] {
        let input = d.path().join(format!("{arch:?}"));
        write_model(&input, arch, 1);
        for (i, extra) in [
            vec![],
            vec!["--skip", r"layers\.1\..*experts\.2\.", "--skip", r"layers\.0\.self_attn\.q_proj"],
            vec!["--skip", "experts"],
        ]
        .iter()
        .enumerate()
        {
            let out = d.path().join(format!("{arch:?}-{i}"));
            let mut args = vec!["--format", "compressed-tensors"];
            args.extend(extra);
            converted(&input, &out, &args);
            check_ignore_by_vllm_rules(&out);
        }
    }
}

#[test]
fn an_fp8_head_or_embedding_is_refused_and_nothing_is_written() {
    let d = tempfile::tempdir().expect("tempdir");
    let input = d.path().join("in");
    write_model(&input, Arch::Qwen3Moe, 1);
    for (pattern, tensor) in [("lm_head", "lm_head.weight"), ("embed_tokens", "model.embed_tokens.weight")] {
        let out = d.path().join(pattern);
        let o = convert(&input, &out, &["--only", pattern]);
        assert_eq!(o.status.code(), Some(2), "{pattern}: {}", stderr(&o));
        let err = stderr(&o);
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains(tensor) && err.contains("cannot be FP8") && err.contains("vLLM"), "{err}");
        assert!(!out.exists(), "{pattern}: output written");
    }
    // A pattern that also matches loadable weights keeps the head in BF16 and says so.
    let out = d.path().join("mixed");
    let o = converted(&input, &out, &["--only", "lm_head|o_proj"]);
    assert!(stderr(&o).contains("lm_head.weight (output head)"), "{}", stderr(&o));
    let m = fp8_modules(&out);
    assert!(!m["lm_head"] && m["model.layers.0.self_attn.o_proj"] && !m["model.layers.0.self_attn.q_proj"]);
}

/// A Qwen3-MoE-like checkpoint whose every dimension is whole 128-blocks: hidden 256, 4 query
/// and 2 key/value heads of 128, 4 experts of 256.
fn qwen3_of_whole_blocks() -> (Vec<Spec>, Value) {
    let w = |n: &str, s: [usize; 2]| (n.to_string(), Dtype::BF16, s.to_vec());
    let p = "model.layers.0";
    let mut t = vec![
        w("model.embed_tokens.weight", [300, 256]),
        (format!("{p}.input_layernorm.weight"), Dtype::BF16, vec![256]),
        w(&format!("{p}.self_attn.q_proj.weight"), [512, 256]),
        w(&format!("{p}.self_attn.k_proj.weight"), [256, 256]),
        w(&format!("{p}.self_attn.v_proj.weight"), [256, 256]),
        w(&format!("{p}.self_attn.o_proj.weight"), [256, 512]),
        w(&format!("{p}.mlp.gate.weight"), [4, 256]),
    ];
    for e in 0..4 {
        t.push(w(&format!("{p}.mlp.experts.{e}.gate_proj.weight"), [256, 256]));
        t.push(w(&format!("{p}.mlp.experts.{e}.up_proj.weight"), [256, 256]));
        t.push(w(&format!("{p}.mlp.experts.{e}.down_proj.weight"), [256, 256]));
    }
    t.push(w("lm_head.weight", [300, 256]));
    let config = json!({
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 256, "vocab_size": 300,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128,
        "moe_intermediate_size": 256, "num_experts": 4, "num_experts_per_tok": 2
    });
    (t, config)
}

#[test]
fn tp_is_refused_where_a_rank_would_hold_partial_blocks_in_convert_and_verify() {
    let d = tempfile::tempdir().expect("tempdir");
    let input = d.path().join("in");
    let (specs, config) = qwen3_of_whole_blocks();
    write_checkpoint(&input, &specs, &config, 1, 7);
    // TP 4: experts of 256 rows split in 64-row shards; TP 2 and expert parallelism work.
    let out = d.path().join("tp4");
    let o = convert(&input, &out, &["--tp", "4"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("model.layers.0.mlp.experts.0.gate_proj.weight") && err.contains("[64, 256]"), "{err}");
    assert!(err.contains("tensor parallelism 2 works") && err.contains("expert parallelism"), "{err}");
    assert!(!out.exists(), "a refused --tp wrote {}", out.display());
    let out = d.path().join("tp2");
    converted(&input, &out, &["--tp", "2"]);
    let verify =
        |tp: &str| fp8forge_p(&["verify".as_ref(), out.as_os_str(), "--tp".as_ref(), tp.as_ref(), "--quiet".as_ref()]);
    let o = verify("2");
    assert!(o.status.success(), "verify --tp 2: {}", stderr(&o));
    let o = verify("4");
    assert_eq!(o.status.code(), Some(2), "verify --tp 4: {}", stderr(&o));
    assert!(stderr(&o).contains("[64, 256]"), "{}", stderr(&o));
    // At TP 8 the 2 key/value heads are replicated (128 rows each: fine), but the 4 query heads
    // do not split over 8 ranks.
    let o = convert(&input, &d.path().join("tp8"), &["--tp", "8"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("q_proj.weight: its query heads (4) do not split over 8 ranks"), "{}", stderr(&o));
    // The small fixtures (hidden 320, heads of 80) cannot load even unsplit: vLLM fuses q/k/v
    // and needs q's 320 rows whole blocks.
    let small = d.path().join("small");
    write_model(&small, Arch::Qwen3Moe, 1);
    let o = convert(&small, &d.path().join("small-out"), &["--tp", "1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("q_proj.weight") && stderr(&o).contains("fused"), "{}", stderr(&o));
}

#[test]
fn architecture_rules_keep_shared_expert_gates_and_indexer_weights_and_warn_on_unknown_models() {
    let d = tempfile::tempdir().expect("tempdir");
    let check_kept = |model_type: &str, extra: Spec, module: &str| {
        let (mut specs, mut config) = model_specs(Arch::Qwen3Moe, 1, 4);
        specs.push(extra);
        config["model_type"] = json!(model_type);
        let input = d.path().join(model_type);
        write_checkpoint(&input, &specs, &config, 1, 3);
        let out = d.path().join(format!("{model_type}-out"));
        let o = converted(&input, &out, &[]);
        let m = fp8_modules(&out);
        assert!(!m[module], "{model_type}: {module} quantized");
        let qc = quantization_config(&out);
        for key in ["ignored_layers", "modules_to_not_convert"] {
            assert!(strings(&qc[key]).contains(&module.to_string()), "{model_type}: {module} not in {key}");
        }
        stderr(&o)
    };
    let gate = "model.layers.0.mlp.shared_expert_gate";
    let err = check_kept("qwen2_moe", (format!("{gate}.weight"), Dtype::BF16, vec![1, 320]), gate);
    assert!(!err.contains("warning"), "{err}");
    let idx = "model.layers.0.self_attn.indexer.weights_proj";
    check_kept("deepseek_v32", (format!("{idx}.weight"), Dtype::BF16, vec![64, 320]), idx);
    // An unknown model_type converts with the generic rules and says what it assumed, once.
    let err = check_kept("foo_moe", (format!("{gate}.weight"), Dtype::BF16, vec![1, 320]), gate);
    let warnings: Vec<&str> = err.lines().filter(|l| l.contains("warning: model_type \"foo_moe\"")).collect();
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(warnings[0].contains("generic rules"), "{err}");
}

#[test]
fn ue8m0_scales_are_refused_in_compressed_tensors_with_the_reason() {
    let d = tempfile::tempdir().expect("tempdir");
    let input = d.path().join("in");
    write_model(&input, Arch::Mixtral, 1);
    let out = d.path().join("out");
    let o = convert(&input, &out, &["--format", "compressed-tensors", "--scale-format", "ue8m0"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("ue8m0") && stderr(&o).contains("--format deepseek"), "{}", stderr(&o));
    assert!(!out.exists());
    // The deepseek format declares it where vLLM and SGLang read it.
    converted(&input, &out, &["--scale-format", "ue8m0"]);
    assert_eq!(quantization_config(&out)["scale_fmt"], "ue8m0");
}
