//! Bad input and hostile surroundings get exit 2 (or a quiet, correct exit) and one line: inputs a
//! conversion would turn into an unreadable or silently wrong output, evaluation options that
//! cannot work, names crafted to forge terminal output, a closed or full stdout, an autotune run
//! with nothing to tune.

use std::path::Path;
use std::process::{Command, Stdio};

use fp8forge_formats::{Dtype, PlannedTensor, ShardWriter};
use fp8forge_tests::{Arch, bin, fp8forge_p, stderr, visible_names, write_model};

/// Expects exit 2 and exactly one line on stderr containing every string of `expect`.
fn refused(o: &std::process::Output, expect: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "exit code; stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    for e in expect {
        assert!(err.contains(e), "stderr lacks {e:?}: {err}");
    }
}

/// Writes one safetensors file of `tensors` (name, dtype, shape, little-endian data).
fn write_file(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    let plan: Vec<PlannedTensor> =
        tensors.iter().map(|(n, d, s, _)| PlannedTensor { name: (*n).into(), dtype: *d, shape: s.clone() }).collect();
    let mut w = ShardWriter::create(path, plan).expect("create");
    for (n, _, _, data) in tensors {
        w.write_tensor(n, &[data]).expect("write");
    }
    w.finish().expect("finish");
}

fn bf16(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect()
}

fn convert(input: &Path, out: &Path) -> std::process::Output {
    fp8forge_p(&["convert".as_ref(), input.as_os_str(), out.as_os_str(), "--quiet".as_ref()])
}

#[test]
fn a_weight_next_to_a_scale_of_its_name_is_refused_before_anything_is_written() {
    // What a naive dequantization leaves: the BF16 weight and its old scale.
    let d = tempfile::tempdir().expect("tempdir");
    let input = d.path().join("in/model.safetensors");
    write_file(
        &input,
        &[
            ("model.layers.0.mlp.down_proj.weight", Dtype::BF16, vec![256, 256], bf16(&vec![0.01; 256 * 256])),
            ("model.layers.0.mlp.down_proj.weight_scale_inv", Dtype::F32, vec![2, 2], vec![0; 16]),
        ],
    );
    let out = d.path().join("out");
    refused(
        &convert(&d.path().join("in"), &out),
        &["model.safetensors", "down_proj.weight_scale_inv", "dequantization"],
    );
    assert_eq!(visible_names(&out), Vec::<String>::new());
}

#[test]
fn nan_or_inf_in_a_kept_tensor_is_refused_naming_tensor_and_position() {
    for (name, shape, at, value) in [
        ("model.norm.weight", vec![300usize], 17usize, f32::NAN),
        ("model.embed_tokens.weight", vec![4, 300], 2 * 300 + 5, f32::INFINITY),
    ] {
        let d = tempfile::tempdir().expect("tempdir");
        let input = d.path().join("in/model.safetensors");
        let mut v = vec![0.5f32; shape.iter().product()];
        v[at] = value;
        write_file(&input, &[(name, Dtype::BF16, shape.clone(), bf16(&v))]);
        let out = d.path().join("out");
        let index = if shape.len() == 1 { "[17]" } else { "[2, 5]" };
        refused(&convert(&d.path().join("in"), &out), &["model.safetensors", name, "non-finite", index]);
        assert_eq!(visible_names(&out), Vec::<String>::new());
    }
}

#[test]
fn eval_options_that_cannot_work_are_refused_before_the_evaluation() {
    let d = tempfile::tempdir().expect("tempdir");
    let model = d.path().join("m");
    write_model(&model, Arch::Mixtral, 1);
    let tokens = d.path().join("tokens.txt");
    std::fs::write(&tokens, (0..300).map(|i| (i % 250).to_string()).collect::<Vec<_>>().join(" ")).expect("tokens");
    let eval = |extra: &[&str]| {
        let mut a: Vec<std::ffi::OsString> =
            vec!["eval".into(), model.clone().into(), "--tokens".into(), tokens.clone().into(), "--quiet".into()];
        a.extend(extra.iter().map(Into::into));
        fp8forge_p(&a)
    };
    for ctx in ["0", "1"] {
        refused(&eval(&["--ctx", ctx]), &["config.json", "--ctx", "at least 2"]);
    }
    for ctx in ["100000000", "18446744073709551615"] {
        refused(&eval(&["--ctx", ctx]), &["config.json", "max_position_embeddings"]);
    }
    refused(&eval(&["--act-quant", "fp8"]), &["--act-quant fp8", "no quantization_config"]);
    let report = d.path().join("missing-dir/report.html");
    refused(&eval(&["--report", report.to_str().expect("utf8")]), &["missing-dir", "does not exist"]);
    // And the options that can work still do.
    let o = eval(&["--ctx", "64", "--report", d.path().join("r.html").to_str().expect("utf8")]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A name that would clear the screen and forge an error line if printed raw.
const EVIL: &str = "model.layers.0.evil\n\x1b[2Jfp8forge: error: forged\u{202e}.weight";

#[test]
fn names_from_files_cannot_forge_lines_or_drive_the_terminal() {
    let d = tempfile::tempdir().expect("tempdir");
    let dir = d.path().join("in");
    let ok = bf16(&vec![0.01; 256 * 256]);
    write_file(
        &dir.join("model.safetensors"),
        &[
            (EVIL, Dtype::BF16, vec![256, 256], ok.clone()),
            ("model.norm.weight", Dtype::BF16, vec![4], bf16(&[1.0; 4])),
        ],
    );
    let clean = |text: &[u8], what: &str| {
        let t = String::from_utf8_lossy(text);
        assert!(!t.contains('\x1b') && !t.contains('\u{202e}'), "{what}: raw control characters printed: {t:?}");
        assert!(!t.lines().any(|l| l.starts_with("fp8forge: error: forged")), "{what}: a line was forged: {t}");
    };
    let o = fp8forge_p(&["inspect".as_ref(), dir.as_os_str()]);
    assert!(o.status.success(), "{}", stderr(&o));
    clean(&o.stdout, "inspect");
    assert!(String::from_utf8_lossy(&o.stdout).contains("evil\\n\\u{1b}[2J"), "escaped name not shown");
    let out = d.path().join("out");
    let o = fp8forge_p(&["convert".as_ref(), dir.as_os_str(), out.as_os_str(), "--dry-run".as_ref()]);
    assert!(o.status.success(), "{}", stderr(&o));
    clean(&o.stdout, "convert --dry-run");
    // In an error message: the same tensor holding a NaN.
    let mut bad = ok;
    bad[0..2].copy_from_slice(&half::bf16::NAN.to_le_bytes());
    write_file(&dir.join("model.safetensors"), &[(EVIL, Dtype::BF16, vec![256, 256], bad)]);
    let o = convert(&dir, &out);
    refused(&o, &["evil\\n\\u{1b}[2J", "non-finite"]);
    clean(&o.stderr, "error message");
}

#[test]
fn a_closed_or_full_stdout_never_panics() {
    let d = tempfile::tempdir().expect("tempdir");
    let dir = d.path().join("in");
    write_model(&dir, Arch::DeepseekV3, 2);
    // `fp8forge inspect DIR | head -1`: the reader is gone before anything is written.
    let mut child = Command::new(bin())
        .arg("inspect")
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stdout.take());
    let o = child.wait_with_output().expect("wait");
    assert_eq!(o.status.code(), Some(0), "broken pipe: {}", stderr(&o));
    assert_eq!(stderr(&o), "", "broken pipe printed something");
    // `> /dev/full`: exit 1 and one line, no panic.
    let full = || std::fs::OpenOptions::new().write(true).open("/dev/full").expect("/dev/full");
    let o = Command::new(bin()).arg("inspect").arg(&dir).stdout(full()).output().expect("run");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim_end().lines().count(), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("standard output"), "{}", stderr(&o));
    // A conversion whose report cannot be printed is still complete, and says so.
    let out = d.path().join("out");
    let o = Command::new(bin()).arg("convert").arg(&dir).arg(&out).arg("--json").stdout(full()).output().expect("run");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("the work itself completed"), "{}", stderr(&o));
    assert!(out.join("SHA256SUMS").is_file() && out.join(".fp8forge-done.json").is_file(), "output not complete");
    let o = convert(&dir, &out);
    assert!(o.status.success(), "the retry of the finished conversion failed: {}", stderr(&o));
}

#[test]
fn autotune_with_nothing_to_tune_exits_2_and_writes_no_table() {
    let d = tempfile::tempdir().expect("tempdir");
    let table = d.path().join("t.yaml");
    for extra in [&["--simulate", "--gpu", "h100-sxm"][..], &[]] {
        let mut a: Vec<std::ffi::OsString> =
            vec!["autotune".into(), "--shape".into(), "100x100".into(), "--out".into(), table.clone().into()];
        a.extend(extra.iter().map(Into::into));
        let o = fp8forge_p(&a);
        refused(&o, &["nothing to tune", "100x100"]);
        assert!(!table.exists(), "a table was written");
    }
}
