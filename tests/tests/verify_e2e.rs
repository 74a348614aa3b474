//! `verify` fails when something is wrong: a quantized weight further from the reference than FP8
//! rounding allows (a scale off by 2× that SHA256SUMS was refreshed over, so that only the
//! reference check can see it), a weight file SHA256SUMS does not list, an empty SHA256SUMS. A
//! "not ok" count above zero is never followed by "OK".

use std::path::{Path, PathBuf};

use fp8forge_formats::SafetensorsFile;
use fp8forge_formats::atomic::sha256_file;
use fp8forge_tests::{Arch, fp8forge_p, stderr, write_model};

/// A BF16 Mixtral model and its conversion with `extra` options.
fn converted(extra: &[&str]) -> (tempfile::TempDir, PathBuf, PathBuf) {
    converted_arch(Arch::Mixtral, extra)
}

/// A BF16 model of `arch` and its conversion with `extra` options.
fn converted_arch(arch: Arch, extra: &[&str]) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let d = tempfile::tempdir().expect("tempdir");
    let (bf16, fp8) = (d.path().join("bf16"), d.path().join("fp8"));
    write_model(&bf16, arch, 2);
    let mut args = vec!["convert".as_ref(), bf16.as_os_str(), fp8.as_os_str(), "--quiet".as_ref()];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    let o = fp8forge_p(&args);
    assert!(o.status.success(), "convert: {}", stderr(&o));
    (d, bf16, fp8)
}

/// `fp8forge verify fp8 [--reference bf16]`: (exit code, stdout).
fn verify(fp8: &Path, reference: Option<&Path>) -> (Option<i32>, String) {
    let mut args = vec!["verify".as_ref(), fp8.as_os_str(), "--quiet".as_ref()];
    if let Some(r) = reference {
        args.extend(["--reference".as_ref(), r.as_os_str()]);
    }
    let o = fp8forge_p(&args);
    (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Rewrites the SHA256SUMS line of `file` with its current digest.
fn refresh_manifest(dir: &Path, file: &str) {
    let p = dir.join("SHA256SUMS");
    let text = std::fs::read_to_string(&p).expect("manifest");
    let digest = sha256_file(&dir.join(file)).expect("sha256");
    let new: String = text
        .lines()
        .map(|l| if l.ends_with(&format!("  {file}")) { format!("{digest}  {file}\n") } else { format!("{l}\n") })
        .collect();
    assert_ne!(new, text, "{file} is not in SHA256SUMS");
    std::fs::write(&p, new).expect("write manifest");
}

/// The shard holding `tensor` in `dir`, and the file offset of the tensor's data.
fn locate(dir: &Path, tensor: &str) -> (String, usize) {
    for e in std::fs::read_dir(dir).expect("ls") {
        let name = e.expect("entry").file_name().to_string_lossy().into_owned();
        if !name.ends_with(".safetensors") {
            continue;
        }
        let f = SafetensorsFile::open(&dir.join(&name)).expect("open");
        if let Some(t) = f.header().get(tensor) {
            return (name, f.header().data_start + t.begin);
        }
    }
    panic!("{tensor} not found in {}", dir.display());
}

/// Multiplies scale `index` of `weight`'s scale tensor by `factor`, and refreshes SHA256SUMS.
fn scale_block(fp8: &Path, weight: &str, index: usize, factor: f32) {
    let (shard, at) = locate(fp8, &format!("{weight}_scale_inv"));
    let p = fp8.join(&shard);
    let mut bytes = std::fs::read(&p).expect("read");
    let at = at + 4 * index;
    let s = f32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    bytes[at..at + 4].copy_from_slice(&(s * factor).to_le_bytes());
    std::fs::write(&p, bytes).expect("write");
    refresh_manifest(fp8, &shard);
}

/// The summary lines of verify's report: the manifest line, and the last line.
fn assert_not_ok_is_never_ok(out: &str) {
    let manifest = out.lines().find(|l| l.starts_with("manifest:")).expect("a manifest line");
    let last = out.lines().last().unwrap_or("");
    if !manifest.ends_with(" 0 not ok") {
        assert_eq!(last, "FAILED", "{manifest:?} followed by {last:?}:\n{out}");
    }
}

const W1: &str = "model.layers.1.block_sparse_moe.experts.2.w1.weight";

/// Every fixture (zero blocks, outliers, tiny magnitudes in DeepSeek-V3's and Qwen3's weights),
/// both scale formats and both layouts: within the bound everywhere.
#[test]
fn fresh_conversions_pass_verify_with_reference_within_the_fp8_bound() {
    let options: [&[&str]; 3] = [&[], &["--scale-format", "ue8m0"], &["--format", "compressed-tensors"]];
    for arch in [Arch::DeepseekV3, Arch::Mixtral, Arch::Qwen3Moe] {
        for extra in options {
            let (_d, bf16, fp8) = converted_arch(arch, extra);
            let (code, out) = verify(&fp8, Some(&bf16));
            assert_eq!(code, Some(0), "{arch:?} {extra:?}: verify --reference failed:\n{out}");
            assert!(out.ends_with("OK\n") && !out.contains("problem:"), "{arch:?} {extra:?}:\n{out}");
        }
    }
}

#[test]
fn a_scale_doubled_or_halved_in_one_block_fails_verify_with_reference_naming_the_tensor() {
    for (extra, factor) in [(&[][..], 2.0f32), (&["--scale-format", "ue8m0"][..], 0.5)] {
        let (_d, bf16, fp8) = converted(extra);
        scale_block(&fp8, W1, 1, factor);
        let (code, out) = verify(&fp8, None);
        assert_eq!(code, Some(0), "{extra:?}: without a reference the change is invisible:\n{out}");
        let (code, out) = verify(&fp8, Some(&bf16));
        assert_eq!(code, Some(1), "{extra:?} ×{factor}: verify --reference passed:\n{out}");
        let problem = out.lines().find(|l| l.starts_with("problem:")).unwrap_or("");
        assert!(
            problem.contains(W1) && problem.contains("than FP8 rounding allows") && problem.contains("worst at ["),
            "{extra:?} ×{factor}: the problem does not name {W1}:\n{out}"
        );
        // Block (0, 1) of a [224, 320] weight: 128 × 128 elements, nearly all beyond the bound.
        let count: u64 =
            problem.split(": ").nth(3).and_then(|s| s.split(' ').next()).and_then(|n| n.parse().ok()).unwrap_or(0);
        assert!((12_000..=128 * 128).contains(&count), "{extra:?} ×{factor}: {count} elements beyond: {problem}");
        assert_eq!(out.lines().filter(|l| l.starts_with("problem:")).count(), 1, "{out}");
        assert_not_ok_is_never_ok(&out);
    }
}

#[test]
fn an_unlisted_weight_file_or_an_empty_manifest_fails_verify_other_unlisted_files_warn() {
    let (_d, _bf16, fp8) = converted(&[]);
    std::fs::write(fp8.join("README.md"), "notes").expect("readme");
    let (code, out) = verify(&fp8, None);
    assert_eq!(code, Some(0), "an unlisted README fails verify:\n{out}");
    assert!(out.contains("0 not ok") && out.contains("warning: README.md: not listed in SHA256SUMS"), "{out}");
    assert_not_ok_is_never_ok(&out);

    std::fs::copy(fp8.join("model-00001-of-00002.safetensors"), fp8.join("model-extra.safetensors")).expect("copy");
    let (code, out) = verify(&fp8, None);
    assert_eq!(code, Some(1), "an unlisted weight file passes verify:\n{out}");
    assert!(out.contains("1 not ok") && out.contains("  model-extra.safetensors: unlisted"), "{out}");
    assert!(out.contains("problem: model-extra.safetensors: not listed in SHA256SUMS"), "{out}");
    assert!(out.contains("warning: README.md"), "{out}");
    assert_not_ok_is_never_ok(&out);
    std::fs::remove_file(fp8.join("model-extra.safetensors")).expect("rm");

    let manifest = std::fs::read_to_string(fp8.join("SHA256SUMS")).expect("manifest");
    let without_index: String =
        manifest.lines().filter(|l| !l.ends_with(".index.json")).map(|l| format!("{l}\n")).collect();
    std::fs::write(fp8.join("SHA256SUMS"), without_index).expect("write");
    let (code, out) = verify(&fp8, None);
    assert_eq!(code, Some(1), "an unlisted index passes verify:\n{out}");
    assert!(out.contains("problem: model.safetensors.index.json: not listed"), "{out}");
    assert_not_ok_is_never_ok(&out);

    std::fs::write(fp8.join("SHA256SUMS"), "").expect("empty");
    let (code, out) = verify(&fp8, None);
    assert_eq!(code, Some(1), "an empty SHA256SUMS passes verify:\n{out}");
    assert!(out.contains("SHA256SUMS: lists no files"), "{out}");
    assert_not_ok_is_never_ok(&out);
}
