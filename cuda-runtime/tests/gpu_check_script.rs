//! `bench/gpu-eval-check.sh` against this crate: it parses (`bash -n`) and runs exactly the GPU
//! tests of tests/gpu.rs, each as a step. Runs without a GPU.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn script_parses_and_runs_every_gpu_test() {
    let script = std::fs::read_to_string(repo().join("bench/gpu-eval-check.sh")).expect("bench/gpu-eval-check.sh");
    let status = Command::new("bash").arg("-n").arg(repo().join("bench/gpu-eval-check.sh")).status().expect("bash");
    assert!(status.success(), "bash -n bench/gpu-eval-check.sh failed");
    let start = script.find("\nGPU_TESTS=\"").expect("GPU_TESTS in the script") + "\nGPU_TESTS=\"".len();
    let end = start + script[start..].find('"').expect("closing quote");
    let mut listed: Vec<&str> = script[start..end].split_whitespace().collect();
    let tests =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/gpu.rs")).expect("tests/gpu.rs");
    let mut defined: Vec<&str> =
        tests.split("#[test]\nfn ").skip(1).filter_map(|rest| rest.split('(').next()).collect();
    listed.sort_unstable();
    defined.sort_unstable();
    assert_eq!(listed, defined, "GPU_TESTS in bench/gpu-eval-check.sh differs from the tests in tests/gpu.rs");
}
