//! `bench/gpu-check.sh` against the library: its family list, smoke configurations and bench
//! shapes are the ones the kernels define, it parses (`bash -n`), and its size check refuses a
//! bundle over the limit. Runs without a GPU.

use std::path::{Path, PathBuf};
use std::process::Command;

use fp8forge_kernels::bench::deepseek_v3_shapes;
use fp8forge_kernels::config::{GemmConfig, GemmShape, GpuArch, check_config};
use fp8forge_kernels::filter::families;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn script() -> String {
    std::fs::read_to_string(repo().join("bench/gpu-check.sh")).expect("bench/gpu-check.sh")
}

/// The words of the shell variable `NAME="..."` (which may span lines).
fn words(text: &str, name: &str) -> Vec<String> {
    let start =
        text.find(&format!("\n{name}=\"")).unwrap_or_else(|| panic!("{name} not in the script")) + name.len() + 3;
    let end = start + text[start..].find('"').expect("closing quote");
    text[start..end].split_whitespace().map(str::to_string).collect()
}

#[test]
fn script_families_are_the_search_space_families() {
    let mut expected = families(GpuArch::Sm90a);
    expected.retain(|f| f != "mma");
    assert_eq!(words(&script(), "FAMILIES"), expected);
}

#[test]
fn script_smoke_configurations_are_buildable() {
    let s = script();
    let ids: Vec<String> = words(&s, "SMOKE_DENSE").into_iter().chain(words(&s, "SMOKE_GROUPED")).collect();
    assert_eq!(ids.len(), 7);
    for id in ids {
        let c: GemmConfig = id.parse().unwrap_or_else(|e| panic!("{id}: {e}"));
        check_config(&c).unwrap_or_else(|e| panic!("{id}: {e}"));
    }
}

#[test]
fn script_bench_shapes_are_bench_targets() {
    let s = script();
    let nk = words(&s, "BENCH_NK");
    let mut shapes = Vec::new();
    for m in [64usize, 128, 4096] {
        for x in &nk {
            let (n, k) = x.split_once('x').expect("NxK");
            shapes.push(GemmShape::dense(m, n.parse().unwrap(), k.parse().unwrap()));
        }
    }
    for g in words(&s, "BENCH_GROUPED") {
        let (mnk, e) = g.split_once(':').expect("MxNxK:E");
        let v: Vec<usize> = mnk.split('x').map(|x| x.parse().unwrap()).collect();
        let e: usize = e.parse().unwrap();
        shapes.push(GemmShape::grouped(v[0] * e, v[1], v[2], e));
    }
    assert_eq!(shapes, deepseek_v3_shapes());
}

fn bash(args: &[&str], envs: &[(&str, &str)]) -> Option<std::process::Output> {
    let mut c = Command::new("bash");
    c.args(args).current_dir(repo());
    for (k, v) in envs {
        c.env(k, v);
    }
    match c.output() {
        Ok(o) => Some(o),
        Err(e) => {
            eprintln!("SKIPPED (bash not runnable: {e})");
            None
        }
    }
}

#[test]
fn script_parses() {
    let Some(o) = bash(&["-n", "bench/gpu-check.sh"], &[]) else { return };
    assert!(o.status.success(), "bash -n: {}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn size_check_refuses_a_bundle_over_the_limit() {
    let dir = std::env::temp_dir().join(format!("fp8forge-bundle-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("blob"), vec![7u8; 2_000_000]).unwrap();
    let bundle = dir.to_string_lossy().into_owned();
    let check = |limit: &str| {
        bash(
            &["bench/gpu-check.sh", "size-check"],
            &[("FP8FORGE_BUNDLE", &bundle), ("FP8FORGE_BUNDLE_LIMIT_MB", limit)],
        )
    };
    let Some(big) = check("100000") else { return };
    let out = String::from_utf8_lossy(&big.stdout).into_owned();
    assert!(big.status.success(), "{out}{}", String::from_utf8_lossy(&big.stderr));
    assert!(out.contains("bundle 2000 kB"), "{out}");
    let small = check("1").unwrap();
    assert!(!small.status.success(), "a 2 MB bundle passed a 1 MB limit");
    assert!(String::from_utf8_lossy(&small.stderr).contains("not under 1 MB"));
    std::fs::remove_dir_all(&dir).unwrap();
}
