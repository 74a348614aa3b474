//! `fp8forge demo`: the bundled model trained on tinyshakespeare, converted to FP8 and evaluated
//! on the bundled held-out text, keeps its perplexity within 1% of BF16, weight-only and W8A8.

use std::process::Command;

use fp8forge_tests::{bin, fp8forge_p, stderr};
use serde_json::Value;

#[test]
fn demo_fp8_perplexity_within_one_percent_of_bf16_with_nothing_beside_the_binary() {
    // Run from an empty directory, with the binary copied there: nothing of the checkout (no
    // ../shared, no assets) is reachable from the working directory or the executable.
    let tmp = tempfile::tempdir().expect("tempdir");
    let exe = tmp.path().join("fp8forge");
    std::fs::copy(bin(), &exe).expect("copy the binary");
    let out = tmp.path().join("demo");
    let o = Command::new(&exe)
        .current_dir(tmp.path())
        .args(["demo", "--out", "demo", "--max-tokens", "16384", "--json"])
        .output()
        .expect("run fp8forge");
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
        let top5 = e["top5_agreement"].as_f64().unwrap_or(0.0);
        assert!(top5 >= top1 && top5 <= 1.0, "{key}: top-5 agreement {top5} against top-1 {top1}");
        let ratio = e["ln_ppl_ratio"].as_f64().unwrap_or(f64::NAN);
        assert!((ratio - (p / b).ln()).abs() < 1e-9, "{key}: ln(PPL ratio) {ratio} against {p} / {b}");
    }
    let html = std::fs::read_to_string(out.join("report.html")).expect("report.html");
    assert!(html.contains("<svg"), "report without plots");
    for f in ["bf16/model.safetensors", "fp8/model.safetensors", "fp8/SHA256SUMS", "demo.json"] {
        assert!(out.join(f).is_file(), "demo did not write {f}");
    }
    assert_eq!(r["data"], "bundled held-out tinyshakespeare (last 10%)");
    // A second run reuses its own output directory; --data evaluates a text of one's own, whole.
    let text = tmp.path().join("own.txt");
    std::fs::write(&text, "To be, or not to be, that is the question.\n".repeat(20)).expect("write text");
    let again = fp8forge_p(&[
        "demo".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
        "--data".as_ref(),
        text.as_os_str(),
        "--json".as_ref(),
    ]);
    assert_eq!(again.status.code(), Some(0), "second demo run failed: {}", stderr(&again));
    let r: Value = serde_json::from_slice(&again.stdout).expect("demo --json");
    assert_eq!(r["w8a8"]["tokens"], 20 * 43, "--data text not evaluated whole (43 bytes a line, byte tokens)");
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
