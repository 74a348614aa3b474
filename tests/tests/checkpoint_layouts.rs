//! Checkpoint layouts as the hub ships them, evaluated end to end: DeepSeek-V3 with its
//! multi-token-prediction layer in the files (not evaluated), and an index of many shards. The
//! fixtures are generated here, not committed.

use std::path::Path;

use fp8forge_formats::Dtype;
use fp8forge_tests::{Arch, Spec, fp8forge_p, model_specs, stderr, write_checkpoint};
use serde_json::Value;

/// Token ids `0..n` spread over the fixtures' vocabulary of 300.
fn write_tokens(path: &Path, n: usize) {
    let ids: Vec<String> = (0..n).map(|i| ((i * 37 + i / 7) % 300).to_string()).collect();
    std::fs::write(path, ids.join(" ")).expect("write tokens");
}

/// `fp8forge eval MODEL --tokens TOKENS --ctx 32 --json [extra]`, which must succeed.
fn eval(model: &Path, tokens: &Path, extra: &[&str]) -> Value {
    let mut a: Vec<&std::ffi::OsStr> =
        vec!["eval".as_ref(), model.as_os_str(), "--tokens".as_ref(), tokens.as_os_str()];
    a.extend(["--ctx", "32", "--json", "--quiet"].iter().chain(extra).map(std::ffi::OsStr::new));
    let o = fp8forge_p(&a);
    assert_eq!(o.status.code(), Some(0), "eval of {} failed: {}", model.display(), stderr(&o));
    serde_json::from_slice(&o.stdout).expect("eval --json prints one JSON object")
}

/// The result without what differs between two runs of the same numbers (time, the path).
fn numbers(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        for k in ["seconds", "tokens_per_second", "model"] {
            o.remove(k);
        }
    }
    v
}

/// The first key whose value differs between `a` and `b`, for failure messages.
fn first_difference(a: &Value, b: &Value) -> String {
    match (a.as_object(), b.as_object()) {
        (Some(x), Some(y)) => x.iter().find(|(k, v)| y.get(*k) != Some(v)).map_or_else(
            || "(keys only in b)".into(),
            |(k, v)| format!("{k}: {v} vs {}", y.get(k).unwrap_or(&Value::Null)),
        ),
        _ => format!("{a} vs {b}"),
    }
}

#[test]
fn deepseek_v3_with_its_mtp_layer_in_the_files_evaluates_its_decoder_layers_only() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Two decoder layers; model_specs adds layer 2 as DeepSeek-V3 ships its MTP layer 61
    // (eh_proj, enorm, hnorm, shared_head and a full decoder layer), config
    // num_nextn_predict_layers 1. The hub's MTP layer also has its own embed_tokens.
    let (specs, config) = model_specs(Arch::DeepseekV3, 2, 4);
    assert_eq!(config["num_nextn_predict_layers"], 1);
    let (mut mtp, rest): (Vec<Spec>, Vec<Spec>) =
        specs.into_iter().partition(|(n, ..)| n.starts_with("model.layers.2."));
    assert!(mtp.iter().any(|(n, ..)| n.ends_with("eh_proj.weight")), "the fixture has no MTP layer");
    mtp.push(("model.layers.2.embed_tokens.weight".into(), Dtype::BF16, vec![300, 320]));
    // The MTP tensors last, so that the other tensors get the same random values in both.
    let with_mtp: Vec<Spec> = rest.iter().cloned().chain(mtp).collect();
    let (a, b) = (tmp.path().join("with-mtp"), tmp.path().join("without-mtp"));
    write_checkpoint(&a, &with_mtp, &config, 3, 7);
    write_checkpoint(&b, &rest, &config, 3, 7);
    let tokens = tmp.path().join("tokens.txt");
    write_tokens(&tokens, 96);

    let with = eval(&a, &tokens, &[]);
    let layers = with["layers"].as_array().map_or(0, Vec::len);
    assert_eq!(layers, 2, "the MTP layer was counted as a decoder layer");
    let without = eval(&b, &tokens, &[]);
    assert_eq!(numbers(with.clone()), numbers(without), "the MTP layer changed the numbers");

    // The FP8 conversion keeps the MTP layer; FP8 against BF16 still evaluates the two layers.
    let fp8 = tmp.path().join("fp8");
    let o = fp8forge_p(&["convert".as_ref(), a.as_os_str(), fp8.as_os_str(), "--quiet".as_ref()]);
    assert_eq!(o.status.code(), Some(0), "convert failed: {}", stderr(&o));
    let r = eval(&fp8, &tokens, &["--baseline", a.to_str().expect("utf-8 path")]);
    assert_eq!(r["layers"].as_array().map_or(0, Vec::len), 2, "FP8 against BF16: layers");
    assert_eq!(r["baseline_perplexity"], with["perplexity"], "the baseline's perplexity");
}

#[test]
fn a_checkpoint_indexed_over_many_shards_evaluates_like_one_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for arch in [Arch::DeepseekV3, Arch::Qwen3Moe] {
        let (specs, config) = model_specs(arch, 2, 4);
        let one = tmp.path().join(format!("{arch:?}-1"));
        let many = tmp.path().join(format!("{arch:?}-{}", specs.len()));
        write_checkpoint(&one, &specs, &config, 1, 11);
        // One tensor per file, as many files as tensors (DeepSeek-V3 ships 163).
        write_checkpoint(&many, &specs, &config, specs.len(), 11);
        let shards = std::fs::read_dir(&many)
            .expect("read dir")
            .filter(|e| e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".safetensors")))
            .count();
        assert!(shards >= 20, "{arch:?}: only {shards} shards");
        let index: Value =
            serde_json::from_slice(&std::fs::read(many.join("model.safetensors.index.json")).expect("index"))
                .expect("index json");
        assert_eq!(index["weight_map"].as_object().map_or(0, |m| m.len()), specs.len(), "{arch:?}: index entries");

        let tokens = tmp.path().join("tokens.txt");
        write_tokens(&tokens, 80);
        let (a, b) = (numbers(eval(&one, &tokens, &[])), numbers(eval(&many, &tokens, &[])));
        assert_eq!(a, b, "{arch:?}: {shards} shards differ from one file at {}", first_difference(&a, &b));
        let streamed = numbers(eval(&many, &tokens, &["--stream"]));
        let (mut a, mut s) = (a, streamed);
        a.as_object_mut().map(|o| o.remove("streamed"));
        s.as_object_mut().map(|o| o.remove("streamed"));
        // Streamed: each feed-forward block over several windows at once, the same sums rounded by
        // products of other shapes.
        let diff = fp8forge_tests::json_difference(&a, &s, 1e-4, 1e-6);
        assert!(diff.is_none(), "{arch:?}: streamed over {shards} shards differs at {}", diff.unwrap_or_default());
    }
}
