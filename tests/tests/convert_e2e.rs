//! `fp8forge convert` end to end on checkpoints laid out as transformers saves DeepSeek-V3,
//! Mixtral and Qwen3-MoE, checked against an independent reading of the format contract.

use std::path::Path;

use fp8forge_formats::{Checkpoint, Dtype};
use fp8forge_tests::{Arch, dir_files, fp8forge_p, stderr, write_checkpoint, write_model};

/// Value of an E4M3FN code from the format definition (bias 7, subnormals at exponent 0).
fn e4m3_value(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((b >> 3) & 0xF) as i32;
    let m = (b & 7) as f32;
    assert!(b & 0x7F != 0x7F, "NaN code in output");
    sign * if e == 0 { m / 8.0 * 2f32.powi(-6) } else { (1.0 + m / 8.0) * 2f32.powi(e - 7) }
}

fn widen(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        d => panic!("unexpected dtype {d:?}"),
    }
}

/// Checks every tensor of `out` against `input`: quantized weights have the contract's scales
/// (bitwise) and codes within half a code step of x / scale; everything else is byte-identical.
fn check_against_input(input: &Path, out: &Path, scale_suffix: &str, ue8m0: bool) -> (usize, usize) {
    let (inp, outp) = (Checkpoint::open(input).expect("input"), Checkpoint::open(out).expect("output"));
    let (mut quantized, mut copied) = (0, 0);
    for shard in &inp.shards {
        for t in &shard.file.header().tensors {
            let (oshard, ot) = outp.find(&t.name).unwrap_or_else(|| panic!("{} missing from output", t.name));
            let odata = oshard.file.data(ot);
            if ot.dtype != Dtype::F8_E4M3 {
                assert_eq!(odata, shard.file.data(t), "pass-through tensor {} differs", t.name);
                copied += 1;
                continue;
            }
            quantized += 1;
            let (n, k) = (t.shape[0], t.shape[1]);
            let (ss, st) = outp.find(&format!("{}{scale_suffix}", t.name)).expect("scale tensor");
            assert_eq!(st.dtype, Dtype::F32);
            assert_eq!(st.shape, vec![n.div_ceil(128), k.div_ceil(128)], "scale shape of {}", t.name);
            let scales = widen(Dtype::F32, ss.file.data(st));
            let x = widen(t.dtype, shard.file.data(t));
            for bi in 0..n.div_ceil(128) {
                for bj in 0..k.div_ceil(128) {
                    let mut amax = 0f32;
                    for r in bi * 128..(bi * 128 + 128).min(n) {
                        for c in bj * 128..(bj * 128 + 128).min(k) {
                            amax = amax.max(x[r * k + c].abs());
                        }
                    }
                    let mut s = amax.max(1e-12) / 448.0;
                    if ue8m0 {
                        s = 2f32.powi(s.log2().ceil() as i32);
                    }
                    let got = scales[bi * k.div_ceil(128) + bj];
                    assert_eq!(got.to_bits(), s.to_bits(), "scale [{bi},{bj}] of {}: {got} vs {s}", t.name);
                    for r in bi * 128..(bi * 128 + 128).min(n) {
                        for c in bj * 128..(bj * 128 + 128).min(k) {
                            let target = x[r * k + c] / s;
                            let q = e4m3_value(odata[r * k + c]);
                            // Half a code step: 2^-4 relative for normals, 2^-10 absolute below 2^-6.
                            let tol = (target.abs() * 0.0625).max(2f32.powi(-10)) * 1.0001;
                            assert!((q - target).abs() <= tol, "{}[{r},{c}]: code {q} for {target}", t.name);
                        }
                    }
                }
            }
        }
    }
    (quantized, copied)
}

fn convert_and_check(arch: Arch, shards: usize, extra: &[&str], scale_suffix: &str, ue8m0: bool) -> serde_json::Value {
    let d = tempfile::tempdir().expect("tempdir");
    let (input, out) = (d.path().join("in"), d.path().join("out"));
    write_model(&input, arch, shards);
    let mut args: Vec<std::ffi::OsString> =
        vec!["convert".into(), input.clone().into(), out.clone().into(), "--quiet".into()];
    args.extend(extra.iter().map(Into::into));
    let o = fp8forge_p(&args);
    assert!(o.status.success(), "convert failed: {}", stderr(&o));
    let (q, c) = check_against_input(&input, &out, scale_suffix, ue8m0);
    assert!(q > 10 && c > 5, "{q} quantized, {c} copied");
    let v = fp8forge_p(&[
        "verify".into(),
        out.clone().into_os_string(),
        "--reference".into(),
        input.clone().into_os_string(),
    ]);
    assert!(v.status.success(), "verify failed: {}{}", String::from_utf8_lossy(&v.stdout), stderr(&v));
    for name in ["generation_config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(std::fs::read(input.join(name)).ok(), std::fs::read(out.join(name)).ok(), "{name} not carried over");
    }
    let names: Vec<String> = dir_files(&out).into_iter().map(|(n, _)| n).collect();
    assert!(!std::fs::exists(out.join(".fp8forge")).unwrap_or(true), "state directory left behind");
    assert!(names.contains(&"SHA256SUMS".to_string()), "{names:?}");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).expect("config")).expect("json");
    config["quantization_config"].clone()
}

#[test]
fn deepseek_v3_layout_converts_with_contract_scales_and_identical_pass_through() {
    let qc = convert_and_check(Arch::DeepseekV3, 3, &[], "_scale_inv", false);
    assert_eq!(qc["quant_method"], "fp8");
    assert_eq!(qc["weight_block_size"], serde_json::json!([128, 128]));
    assert_eq!(qc["activation_scheme"], "dynamic");
    let skipped = qc["modules_to_not_convert"].as_array().expect("list");
    for m in ["lm_head", "model.layers.2.eh_proj", "model.layers.1.mlp.gate"] {
        assert!(skipped.iter().any(|s| s == m), "{m} not in modules_to_not_convert: {skipped:?}");
    }
}

#[test]
fn mixtral_layout_converts_to_ue8m0_scales() {
    let qc = convert_and_check(Arch::Mixtral, 2, &["--scale-format", "ue8m0"], "_scale_inv", true);
    assert_eq!(qc["scale_fmt"], "ue8m0");
}

#[test]
fn qwen3_moe_layout_converts_to_compressed_tensors() {
    let qc = convert_and_check(Arch::Qwen3Moe, 1, &["--format", "compressed-tensors"], "_scale", false);
    assert_eq!(qc["quant_method"], "compressed-tensors");
    assert_eq!(qc["config_groups"]["group_0"]["weights"]["strategy"], "block");
}

#[test]
fn small_max_shard_size_splits_output_and_index_totals_match() {
    let d = tempfile::tempdir().expect("tempdir");
    let (input, out) = (d.path().join("in"), d.path().join("out"));
    write_model(&input, Arch::Qwen3Moe, 1);
    let o = fp8forge_p(&[
        "convert".as_ref(),
        input.as_os_str(),
        out.as_os_str(),
        "--quiet".as_ref(),
        "--max-shard-size".as_ref(),
        "300kB".as_ref(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).expect("index")).expect("json");
    let ck = Checkpoint::open(&out).expect("reopen");
    assert!(ck.shards.len() > 3, "only {} shards", ck.shards.len());
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(ck.total_tensor_bytes()));
}

#[test]
fn dry_run_prints_the_plan_and_writes_nothing() {
    let d = tempfile::tempdir().expect("tempdir");
    let (input, out) = (d.path().join("in"), d.path().join("out"));
    write_model(&input, Arch::Mixtral, 2);
    let o =
        fp8forge_p(&["convert".as_ref(), input.as_os_str(), out.as_os_str(), "--dry-run".as_ref(), "--json".as_ref()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object on stdout");
    assert!(v["summary"]["quantized"].as_u64().unwrap_or(0) > 0);
    assert!(!out.exists());
}

#[test]
fn dequant_restores_bf16_close_to_the_original() {
    let d = tempfile::tempdir().expect("tempdir");
    let (input, fp8, back) = (d.path().join("in"), d.path().join("fp8"), d.path().join("back"));
    write_model(&input, Arch::DeepseekV3, 2);
    assert!(fp8forge_p(&["convert".as_ref(), input.as_os_str(), fp8.as_os_str(), "--quiet".as_ref()]).status.success());
    let o = fp8forge_p(&["dequant".as_ref(), fp8.as_os_str(), back.as_os_str(), "--quiet".as_ref()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b) = (Checkpoint::open(&input).expect("in"), Checkpoint::open(&back).expect("back"));
    for s in &a.shards {
        for t in &s.file.header().tensors {
            let (bs, bt) = b.find(&t.name).unwrap_or_else(|| panic!("{} missing", t.name));
            assert_eq!((bt.dtype, &bt.shape), (t.dtype, &t.shape), "{}", t.name);
            let (x, y) = (widen(t.dtype, s.file.data(t)), widen(bt.dtype, bs.file.data(bt)));
            let err: f64 = x.iter().zip(&y).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
            let norm: f64 = x.iter().map(|a| (*a as f64).powi(2)).sum();
            assert!(err <= 0.05f64.powi(2) * norm, "{}: relative error {}", t.name, (err / norm).sqrt());
        }
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(back.join("config.json")).expect("config")).expect("json");
    assert!(config.get("quantization_config").is_none());
}

#[test]
fn f16_and_f32_weights_convert_and_non_float_tensors_pass_through_unchanged() {
    let d = tempfile::tempdir().expect("tempdir");
    let (input, out) = (d.path().join("in"), d.path().join("out"));
    let specs = vec![
        ("model.layers.0.mlp.up_proj.weight".to_string(), Dtype::F16, vec![200, 130]),
        ("model.layers.0.mlp.down_proj.weight".to_string(), Dtype::F32, vec![130, 200]),
        ("model.layers.0.self_attn.o_proj.weight".to_string(), Dtype::BF16, vec![1, 1]),
        ("model.position_ids".to_string(), Dtype::I64, vec![16]),
        ("model.layers.0.mask".to_string(), Dtype::U8, vec![3, 5]),
    ];
    write_checkpoint(&input, &specs, &serde_json::json!({"model_type": "mixtral"}), 1, 3);
    let o = fp8forge_p(&["convert".as_ref(), input.as_os_str(), out.as_os_str(), "--quiet".as_ref()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (q, c) = check_against_input(&input, &out, "_scale_inv", false);
    assert_eq!((q, c), (3, 2), "quantized / copied");
}
