//! Interrupted, resumed, sharded and concurrent conversions give the bytes of one uninterrupted run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fp8forge_tests::{Arch, bin, dir_files, fp8forge_p, model_specs, stderr, write_checkpoint};

/// A model big enough that a conversion takes a while: 6 shards of a few MB.
fn big_model(dir: &Path) {
    let (specs, config) = model_specs(Arch::Mixtral, 6, 8);
    write_checkpoint(dir, &specs, &config, 6, 7);
}

fn convert_args(input: &Path, out: &Path, extra: &[&str]) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> =
        vec!["convert".into(), input.into(), out.into(), "--quiet".into(), "--max-shard-size".into(), "2MB".into()];
    a.extend(extra.iter().map(Into::into));
    a
}

fn reference(input: &Path, root: &Path) -> (PathBuf, Vec<(String, Vec<u8>)>) {
    let out = root.join("reference");
    let o = fp8forge_p(&convert_args(input, &out, &[]));
    assert!(o.status.success(), "{}", stderr(&o));
    let files = dir_files(&out);
    (out, files)
}

fn assert_same(expected: &[(String, Vec<u8>)], out: &Path, what: &str) {
    fp8forge_tests::assert_same_files(expected, out, what);
}

fn done_count(out: &Path) -> usize {
    std::fs::read_dir(out.join(".fp8forge/done")).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn resume_after_sigkill_at_several_points_is_byte_identical() {
    let d = tempfile::tempdir().expect("tempdir");
    let input = d.path().join("in");
    big_model(&input);
    let (_, expected) = reference(&input, d.path());
    let nfiles = expected.iter().filter(|(n, _)| n.ends_with(".safetensors")).count();
    assert!(nfiles >= 6, "only {nfiles} output files");
    let mut interrupted = 0;
    // Kill once k files are done, at k = 0 (mid first file), 1, middle, and last-but-one.
    for k in [0, 1, nfiles / 2, nfiles - 1] {
        let out = d.path().join(format!("out-{k}"));
        let mut child = Command::new(bin())
            .args(convert_args(&input, &out, &["--threads", "1"]))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let start = Instant::now();
        let killed = loop {
            if child.try_wait().expect("wait").is_some() {
                break false;
            }
            if done_count(&out) >= k && out.join(".fp8forge/files").exists() {
                child.kill().expect("SIGKILL");
                child.wait().expect("reap");
                break true;
            }
            assert!(start.elapsed() < Duration::from_secs(120), "conversion hung");
            std::thread::sleep(Duration::from_micros(200));
        };
        if !killed {
            continue;
        }
        interrupted += 1;
        // Nothing under a final name while unfinished (besides what finalization writes).
        let visible: Vec<String> = dir_files(&out).into_iter().map(|(n, _)| n).collect();
        assert!(visible.is_empty() || done_count(&out) == nfiles, "k={k}: final-named files after kill: {visible:?}");
        // A requeued job reruns the same command: a plain rerun continues as --resume does.
        let extra: &[&str] = if k % 2 == 0 { &[] } else { &["--resume"] };
        let o = fp8forge_p(&convert_args(&input, &out, extra));
        assert!(o.status.success(), "k={k}: rerun {extra:?} failed: {}", stderr(&o));
        assert_same(&expected, &out, &format!("killed after {k} files"));
    }
    assert!(interrupted >= 3, "only {interrupted} of 4 kills interrupted the conversion");
}

#[test]
fn shard_jobs_then_final_resume_equal_one_run() {
    let d = tempfile::tempdir().expect("tempdir");
    let input = d.path().join("in");
    big_model(&input);
    let (_, expected) = reference(&input, d.path());
    // Sequential jobs, in a scrambled order.
    let out = d.path().join("seq");
    for i in [2, 0, 1] {
        let o = fp8forge_p(&convert_args(&input, &out, &["--shard", &format!("{i}/3")]));
        assert!(o.status.success(), "job {i}: {}", stderr(&o));
    }
    let o = fp8forge_p(&convert_args(&input, &out, &["--resume"]));
    assert!(o.status.success(), "final step: {}", stderr(&o));
    assert_same(&expected, &out, "sequential shard jobs");
    // Concurrent jobs, as a job array runs them.
    let out = d.path().join("par");
    let children: Vec<_> = (0..3)
        .map(|i| {
            Command::new(bin())
                .args(convert_args(&input, &out, &["--shard", &format!("{i}/3"), "--threads", "1"]))
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().expect("wait");
        assert!(o.status.success(), "concurrent job: {}", stderr(&o));
    }
    let o = fp8forge_p(&convert_args(&input, &out, &["--resume"]));
    assert!(o.status.success(), "final step: {}", stderr(&o));
    assert_same(&expected, &out, "concurrent shard jobs");
}

#[test]
fn second_concurrent_run_on_one_output_is_refused_by_the_lock() {
    let d = tempfile::tempdir().expect("tempdir");
    let input = d.path().join("in");
    big_model(&input);
    let out = d.path().join("out");
    let mut first = Command::new(bin()).args(convert_args(&input, &out, &["--threads", "1"])).spawn().expect("spawn");
    let start = Instant::now();
    while !out.join(".fp8forge/journal.json").exists() {
        assert!(first.try_wait().expect("wait").is_none(), "first run ended too early to test the lock");
        assert!(start.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_micros(200));
    }
    let o = fp8forge_p(&convert_args(&input, &out, &["--resume"]));
    assert!(first.wait().expect("wait").success());
    assert_eq!(o.status.code(), Some(2), "second run: {}", stderr(&o));
    assert!(stderr(&o).contains("another fp8forge run"), "{}", stderr(&o));
}
