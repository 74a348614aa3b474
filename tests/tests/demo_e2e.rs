//! `fp8forge demo`: the bundled model trained on tinyshakespeare, converted to FP8 and evaluated
//! on held-out text, keeps its perplexity within 1% of BF16, weight-only and W8A8.

use std::path::PathBuf;

use fp8forge_tests::{fp8forge_p, stderr};
use serde_json::Value;

/// The shared data beside the checkout (ARCHITECTURE.md: skip with a printed reason when absent).
fn data() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/tinyshakespeare.txt");
    p.is_file().then_some(p)
}

#[test]
fn demo_fp8_perplexity_within_one_percent_of_bf16() {
    let Some(data) = data() else {
        eprintln!("SKIPPED: ../shared/data/tinyshakespeare.txt is absent beside the checkout");
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("demo");
    let o = fp8forge_p(&[
        "demo".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
        "--data".as_ref(),
        data.as_os_str(),
        "--max-tokens".as_ref(),
        "16384".as_ref(),
        "--json".as_ref(),
    ]);
    assert_eq!(o.status.code(), Some(0), "demo failed: {}", stderr(&o));
    let r: Value = serde_json::from_slice(&o.stdout).expect("demo --json");
    for (key, act) in [("w8a8", "fp8"), ("weight_only", "none")] {
        let e = &r[key];
        assert_eq!(e["act_quant"], act, "{key}: act_quant");
        assert_eq!(e["tokens"], 16384, "{key}: tokens");
        let (p, b) = (e["perplexity"].as_f64().unwrap_or(f64::NAN), e["baseline_perplexity"].as_f64().unwrap_or(0.0));
        // The model learned the text: far better than a byte-level unigram model (~15).
        assert!(b < 8.0, "{key}: BF16 held-out perplexity {b} is not that of a trained model");
        let rel = (p / b - 1.0).abs();
        assert!(rel < 0.01, "{key}: FP8 perplexity {p} is {:.2}% from BF16 {b}", 100.0 * rel);
        assert!(p != b, "{key}: FP8 changed nothing");
        let top1 = e["top1_agreement"].as_f64().unwrap_or(0.0);
        assert!(top1 > 0.9, "{key}: top-1 agreement {top1}");
    }
    let html = std::fs::read_to_string(out.join("report.html")).expect("report.html");
    assert!(html.contains("<svg"), "report without plots");
    for f in ["bf16/model.safetensors", "fp8/model.safetensors", "fp8/SHA256SUMS", "demo.json"] {
        assert!(out.join(f).is_file(), "demo did not write {f}");
    }
    // A second run reuses its own output directory.
    let again = fp8forge_p(&[
        "demo".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
        "--data".as_ref(),
        data.as_os_str(),
        "--max-tokens".as_ref(),
        "600".as_ref(),
        "--quiet".as_ref(),
    ]);
    assert_eq!(again.status.code(), Some(0), "second demo run failed: {}", stderr(&again));
}

#[test]
fn demo_refuses_a_foreign_output_directory() {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(tmp.path().join("precious.txt"), b"keep me").expect("write");
    let o = fp8forge_p(&[
        "demo".as_ref(),
        "--out".as_ref(),
        tmp.path().as_os_str(),
        "--data".as_ref(),
        "/nonexistent".as_ref(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("not an fp8forge demo directory"), "{}", stderr(&o));
    assert_eq!(std::fs::read(tmp.path().join("precious.txt")).expect("still there"), b"keep me");
}
