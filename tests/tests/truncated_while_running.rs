//! An input shard truncated while a command reads it (inputs are memory-mapped: a read past the
//! new end raises SIGBUS) ends the run with exit code 2 and one line naming the file, not a
//! crash; a conversion leaves nothing under a final name. The shard is truncated at a point
//! where the run has opened it and not yet read it: once the plan is recorded (convert), or once
//! the process has it mapped (verify, eval: read from /proc/PID/maps).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fp8forge_tests::{Arch, bin, has_mapped, model_specs, write_big_checkpoint};

/// A Mixtral-like model of `experts` experts per layer (0.86 MB each over 2 layers) in 4 shards;
/// returns its directory and its last shard.
fn big_model(dir: &Path, experts: usize) -> (PathBuf, PathBuf) {
    let input = dir.join("in");
    let (specs, config) = model_specs(Arch::Mixtral, 2, experts);
    write_big_checkpoint(&input, &specs, &config, 4);
    let last = input.join("model-00004-of-00004.safetensors").canonicalize().expect("last shard");
    (input, last)
}

fn spawn(args: &[&std::ffi::OsStr]) -> Child {
    Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run fp8forge: {e}"))
}

/// Waits until `ready()` (failing if the run ends first), truncates `shard` to a quarter, and
/// checks that the run exits 2 with one line naming it. Returns the line.
fn truncate_when(mut child: Child, ready: impl Fn(u32) -> bool, shard: &Path, what: &str) -> String {
    let start = Instant::now();
    while !ready(child.id()) {
        if let Some(s) = child.try_wait().expect("wait") {
            panic!("{what}: the run ended ({s}) before the moment to truncate came; make the input larger");
        }
        assert!(start.elapsed() < Duration::from_secs(120), "{what}: the moment to truncate never came");
        std::thread::sleep(Duration::from_millis(1));
    }
    let len = std::fs::metadata(shard).expect("stat shard").len();
    std::fs::OpenOptions::new().write(true).open(shard).expect("open shard").set_len(len / 4).expect("truncate");
    let waited = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if waited.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("{what}: still running 120 s after the truncation");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().expect("output");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{what}: exit status {:?}; stderr: {err}", out.status);
    assert_eq!(err.lines().count(), 1, "{what}: not one line: {err}");
    let name = shard.display().to_string();
    assert!(err.starts_with("fp8forge: error: ") && err.contains(&name), "{what}: does not name {name}: {err}");
    assert!(err.contains("truncated while being read"), "{what}: {err}");
    err
}

#[test]
fn input_truncated_during_convert_exits_2_naming_it_and_leaves_no_final_file() {
    let d = tempfile::tempdir().expect("tempdir");
    let (input, last) = big_model(d.path(), 256);
    let total: u64 =
        std::fs::read_dir(&input).expect("ls").map(|e| e.expect("entry").metadata().expect("stat").len()).sum();
    assert!(total > 200_000_000, "the input is only {total} bytes");
    let out = d.path().join("out");
    let plan = out.join(".fp8forge").join("journal.json");
    let child = spawn(&[
        "convert".as_ref(),
        input.as_os_str(),
        out.as_os_str(),
        "--threads".as_ref(),
        "1".as_ref(),
        "--quiet".as_ref(),
    ]);
    truncate_when(child, |_| plan.exists(), &last, "convert");
    let finals: Vec<String> = std::fs::read_dir(&out)
        .expect("OUT exists")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert!(finals.is_empty(), "final-named files in OUT: {finals:?}");
}

#[test]
fn reference_truncated_during_verify_exits_2_naming_it() {
    let d = tempfile::tempdir().expect("tempdir");
    let (input, last) = big_model(d.path(), 128);
    let fp8 = d.path().join("fp8");
    let o = fp8forge_tests::fp8forge_p(&["convert".as_ref(), input.as_os_str(), fp8.as_os_str(), "--quiet".as_ref()]);
    assert!(o.status.success(), "convert: {}", fp8forge_tests::stderr(&o));
    let child =
        spawn(&["verify".as_ref(), fp8.as_os_str(), "--reference".as_ref(), input.as_os_str(), "--quiet".as_ref()]);
    truncate_when(child, |pid| has_mapped(pid, &last), &last, "verify --reference");
}

#[test]
fn model_truncated_during_eval_exits_2_naming_it() {
    let d = tempfile::tempdir().expect("tempdir");
    let (input, last) = big_model(d.path(), 128);
    let tokens = d.path().join("tokens.txt");
    std::fs::write(&tokens, "1 2 3 4 5 6 7 8 9 10").expect("tokens");
    let child =
        spawn(&["eval".as_ref(), input.as_os_str(), "--tokens".as_ref(), tokens.as_os_str(), "--quiet".as_ref()]);
    truncate_when(child, |pid| has_mapped(pid, &last), &last, "eval");
}
