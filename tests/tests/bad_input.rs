//! Bad input gets exit code 2, one line on stderr naming the file (and tensor) and the reason,
//! and nothing under a final name in OUT.

use std::path::Path;

use fp8forge_tests::{Arch, fp8forge_p, stderr, write_model};

/// Converts `input` into a fresh OUT, expects exit 2 with a one-line message containing every
/// string of `expect`, and no final-named file in OUT.
fn expect_refused(input: &Path, expect: &[&str]) {
    let out = input.parent().expect("parent").join("out");
    let o = fp8forge_p(&["convert".as_ref(), input.as_os_str(), out.as_os_str(), "--quiet".as_ref()]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "exit code; stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    for e in expect {
        assert!(err.contains(e), "stderr lacks {e:?}: {err}");
    }
    if out.exists() {
        let finals: Vec<_> = std::fs::read_dir(&out)
            .expect("read out")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        assert!(finals.is_empty(), "final-named files left in OUT: {finals:?}");
    }
}

fn model(arch: Arch, shards: usize) -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::tempdir().expect("tempdir");
    let input = d.path().join("in");
    write_model(&input, arch, shards);
    (d, input)
}

fn patch(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut b = std::fs::read(path).expect("read");
    f(&mut b);
    std::fs::write(path, b).expect("write");
}

fn header_json(path: &Path) -> (usize, String) {
    let b = std::fs::read(path).expect("read");
    let n = u64::from_le_bytes(b[..8].try_into().expect("8 bytes")) as usize;
    (n, String::from_utf8(b[8..8 + n].to_vec()).expect("utf8"))
}

/// Replaces the header of `path` by `json` padded to the same length (so the data stays put).
fn replace_header(path: &Path, edit: impl FnOnce(String) -> String) {
    let (n, json) = header_json(path);
    let mut new = edit(json);
    assert!(new.len() <= n, "edited header longer than the original");
    while new.len() < n {
        new.push(' ');
    }
    patch(path, |b| b[8..8 + n].copy_from_slice(new.as_bytes()));
}

const SHARD1: &str = "model-00001-of-00002.safetensors";

#[test]
fn truncated_shard_is_refused_naming_the_file() {
    let (_d, input) = model(Arch::Mixtral, 2);
    let p = input.join(SHARD1);
    patch(&p, |b| b.truncate(b.len() - 1000));
    expect_refused(&input, &[SHARD1, "truncated"]);
}

#[test]
fn absurd_header_length_is_refused() {
    let (_d, input) = model(Arch::Mixtral, 2);
    patch(&input.join(SHARD1), |b| b[..8].copy_from_slice(&(1u64 << 60).to_le_bytes()));
    expect_refused(&input, &[SHARD1, "header length"]);
}

#[test]
fn malformed_header_json_is_refused() {
    let (_d, input) = model(Arch::Mixtral, 2);
    replace_header(&input.join(SHARD1), |j| j.replacen('{', "[", 1));
    expect_refused(&input, &[SHARD1, "JSON"]);
}

#[test]
fn overlapping_offsets_are_refused_naming_the_tensor() {
    let (_d, input) = model(Arch::Qwen3Moe, 1);
    let p = input.join("model.safetensors");
    // Point lm_head's data at offset 0: it then overlaps the first tensor.
    replace_header(&p, |j| {
        let mut v: serde_json::Value = serde_json::from_str(&j).expect("json");
        let offs = v["lm_head.weight"]["data_offsets"].as_array().expect("offsets").clone();
        let len = offs[1].as_u64().expect("end") - offs[0].as_u64().expect("begin");
        v["lm_head.weight"]["data_offsets"] = serde_json::json!([0, len]);
        v.to_string()
    });
    expect_refused(&input, &["model.safetensors", "overlaps"]);
}

#[test]
fn out_of_range_offsets_are_refused() {
    let (_d, input) = model(Arch::Qwen3Moe, 1);
    let p = input.join("model.safetensors");
    replace_header(&p, |j| {
        let mut v: serde_json::Value = serde_json::from_str(&j).expect("json");
        // Drop the metadata to make room for the longer offsets.
        v.as_object_mut().expect("object").remove("__metadata__");
        let end = v["lm_head.weight"]["data_offsets"][1].as_u64().expect("end");
        let begin = v["lm_head.weight"]["data_offsets"][0].as_u64().expect("begin");
        v["lm_head.weight"]["data_offsets"] = serde_json::json!([begin + (1u64 << 40), end + (1u64 << 40)]);
        v.to_string()
    });
    expect_refused(&input, &["model.safetensors"]);
}

#[test]
fn unknown_dtype_is_refused_naming_the_tensor() {
    let (_d, input) = model(Arch::Qwen3Moe, 1);
    replace_header(&input.join("model.safetensors"), |j| j.replacen("\"BF16\"", "\"Q4_0\"", 1));
    expect_refused(&input, &["model.safetensors", "unknown dtype", "Q4_0"]);
}

fn plant_in_weight(input: &Path, value: f32) {
    let p = input.join("model-00002-of-00002.safetensors");
    let ck = fp8forge_formats::SafetensorsFile::open(&p).expect("open");
    let t = ck.header().tensors.iter().find(|t| t.name.ends_with("w2.weight")).expect("a w2").clone();
    let at = ck.header().data_start + t.begin + 2 * 1000;
    drop(ck);
    patch(&p, |b| b[at..at + 2].copy_from_slice(&half::bf16::from_f32(value).to_le_bytes()));
}

#[test]
fn nan_in_a_weight_is_refused_naming_tensor_and_position_after_other_shards_were_done() {
    let (_d, input) = model(Arch::Mixtral, 2);
    plant_in_weight(&input, f32::NAN);
    expect_refused(&input, &["model-00002-of-00002.safetensors", "w2.weight", "NaN"]);
}

#[test]
fn inf_in_a_weight_is_refused() {
    let (_d, input) = model(Arch::Mixtral, 2);
    plant_in_weight(&input, f32::INFINITY);
    expect_refused(&input, &["w2.weight", "inf"]);
}

#[test]
fn missing_shard_is_refused() {
    let (_d, input) = model(Arch::Mixtral, 2);
    std::fs::remove_file(input.join(SHARD1)).expect("rm");
    expect_refused(&input, &[SHARD1, "missing"]);
}

#[test]
fn index_path_escaping_the_directory_is_refused() {
    for evil in ["../secret.safetensors", "/etc/passwd", "sub/../../x.safetensors"] {
        let (_d, input) = model(Arch::Mixtral, 2);
        let p = input.join("model.safetensors.index.json");
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).expect("read")).expect("json");
        v["weight_map"]["lm_head.weight"] = serde_json::json!(evil);
        std::fs::write(&p, v.to_string()).expect("write");
        expect_refused(&input, &["model.safetensors.index.json", "plain file name"]);
    }
}

#[test]
fn symlink_out_of_the_directory_is_refused() {
    let (d, input) = model(Arch::Mixtral, 2);
    let outside = d.path().join("elsewhere.safetensors");
    std::fs::rename(input.join(SHARD1), &outside).expect("move");
    std::os::unix::fs::symlink(&outside, input.join(SHARD1)).expect("symlink");
    expect_refused(&input, &[SHARD1, "outside"]);
}

#[test]
fn existing_output_is_refused_without_force_and_replaced_with_it() {
    let (d, input) = model(Arch::Qwen3Moe, 1);
    let out = d.path().join("out");
    std::fs::create_dir_all(&out).expect("mkdir");
    std::fs::write(out.join("keep.txt"), "user data").expect("write");
    let args = |force: bool| {
        let mut a =
            vec!["convert".into(), input.clone().into_os_string(), out.clone().into_os_string(), "--quiet".into()];
        if force {
            a.push(std::ffi::OsString::from("--force"));
        }
        a
    };
    let o = fp8forge_p(&args(false));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--force"));
    let o = fp8forge_p(&args(true));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).expect("kept"), "user data");
}

#[test]
fn already_quantized_input_is_refused() {
    let (d, input) = model(Arch::Qwen3Moe, 1);
    let fp8 = d.path().join("fp8");
    assert!(fp8forge_p(&["convert".as_ref(), input.as_os_str(), fp8.as_os_str(), "--quiet".as_ref()]).status.success());
    expect_refused(&fp8, &["already quantized"]);
}
