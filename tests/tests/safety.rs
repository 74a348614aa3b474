//! Nothing is ever lost, and every retry succeeds: a conversion killed anywhere between 10% and
//! 90% is finished by a rerun to the bytes of an uninterrupted run; a retry of a finished job
//! changes nothing; OUT never resolves to IN; a changed input is never mixed into an output;
//! `--force` never takes OUT from a running conversion; an OUT left by a failed start resumes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fp8forge_tests::{
    Arch, assert_same_files, bin, dir_files, fp8forge_p, snapshot, stderr, visible_names, write_large_model,
    write_model,
};

fn args(input: &Path, out: &Path, extra: &[&str]) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = vec!["convert".into(), input.into(), out.into(), "--quiet".into()];
    a.extend(extra.iter().map(Into::into));
    a
}

fn convert_ok(input: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let o = fp8forge_p(&args(input, out, extra));
    assert!(o.status.success(), "convert {extra:?} failed: {}", stderr(&o));
    o
}

fn spawn(input: &Path, out: &Path, extra: &[&str]) -> Child {
    Command::new(bin())
        .args(args(input, out, extra))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fp8forge")
}

/// Bytes written so far into OUT's staging folder (temporary files included).
fn staged_bytes(out: &Path) -> u64 {
    std::fs::read_dir(out.join(".fp8forge/files"))
        .map(|d| d.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

/// Waits until `child` has staged `frac` of `total` output bytes and returns true, or returns
/// false when it finished first.
fn wait_for_progress(child: &mut Child, out: &Path, total: u64, frac: f64) -> bool {
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return false;
        }
        if staged_bytes(out) as f64 >= frac * total as f64 {
            return true;
        }
        assert!(start.elapsed() < Duration::from_secs(300), "conversion hung");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn partials(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".partial"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn killed_at_10_to_90_percent_of_a_300mb_conversion_a_rerun_gives_the_same_bytes() {
    let d = tempfile::tempdir().expect("tempdir");
    let input = d.path().join("in");
    write_large_model(&input, 10, 5); // 294 MB of BF16 in 5 shards
    let reference = d.path().join("reference");
    convert_ok(&input, &reference, &[]);
    let expected = dir_files(&reference);
    let total: u64 = expected.iter().filter(|(n, _)| n.ends_with(".safetensors")).map(|(_, b)| b.len() as u64).sum();
    let record = std::fs::read(reference.join(".fp8forge-done.json")).expect("record");

    let mut interrupted = 0;
    for (i, pct) in [10, 30, 50, 70, 90].into_iter().enumerate() {
        let out = d.path().join(format!("out-{pct}"));
        let mut child = spawn(&input, &out, &["--threads", "1"]);
        if !wait_for_progress(&mut child, &out, total, pct as f64 / 100.0) {
            continue;
        }
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        interrupted += 1;
        assert_eq!(visible_names(&out), Vec::<String>::new(), "{pct}%: names visible in OUT after the kill");
        // A requeued job reruns its command as is, or with --resume: both finish the output.
        let extra: &[&str] = if i % 2 == 0 { &[] } else { &["--resume"] };
        convert_ok(&input, &out, extra);
        assert_same_files(&expected, &out, &format!("killed at {pct}%, rerun {extra:?}"));
        assert_eq!(std::fs::read(out.join(".fp8forge-done.json")).expect("record"), record, "{pct}%: record");
    }
    assert!(interrupted >= 4, "only {interrupted} of 5 kills interrupted the conversion");

    // SIGTERM (a scheduler's preemption): the run stops cleanly, removes its temporary files and
    // says so in one line; the rerun finishes it.
    let out = d.path().join("out-term");
    let mut child = spawn(&input, &out, &["--threads", "1"]);
    assert!(wait_for_progress(&mut child, &out, total, 0.4), "finished before SIGTERM");
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let o = child.wait_with_output().expect("wait");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(128 + libc::SIGTERM), "exit status after SIGTERM: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.contains("SIGTERM") && err.contains("run the same command again"), "{err}");
    assert_eq!(partials(&out.join(".fp8forge/files")), Vec::<String>::new(), "temporary files left after SIGTERM");
    assert_eq!(visible_names(&out), Vec::<String>::new(), "names visible in OUT after SIGTERM");
    convert_ok(&input, &out, &[]);
    assert_same_files(&expected, &out, "after SIGTERM and a rerun");
}

#[test]
fn retries_of_a_finished_conversion_exit_0_and_change_nothing() {
    let d = tempfile::tempdir().expect("tempdir");
    let input = d.path().join("in");
    write_model(&input, Arch::Qwen3Moe, 3);
    let out = d.path().join("out");
    convert_ok(&input, &out, &["--max-shard-size", "1MB"]);
    let before = snapshot(&out);
    assert!(before.iter().any(|(n, ..)| n == "SHA256SUMS"));
    for extra in [&[][..], &["--resume"], &["--shard", "0/3"], &["--shard", "2/3"], &["--json"]] {
        let mut a = vec!["--max-shard-size", "1MB"];
        a.extend_from_slice(extra);
        let o = convert_ok(&input, &out, &a);
        assert_eq!(snapshot(&out), before, "a retry {extra:?} changed OUT");
        if extra == ["--json"] {
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("--json");
            assert_eq!(v["already_complete"], true, "{v}");
            assert_eq!(v["files_written"], 0, "{v}");
        }
    }
    // The same retries on a finished output made with other options are refused, not merged.
    let o = fp8forge_p(&args(&input, &out, &["--max-shard-size", "2MB"]));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("finished conversion of other input or options"), "{}", stderr(&o));
    assert_eq!(snapshot(&out), before, "a refused run changed OUT");
}

#[test]
fn an_output_that_resolves_to_the_input_is_refused_and_the_input_is_untouched() {
    let d = tempfile::tempdir().expect("tempdir");
    let input = d.path().join("r1");
    write_model(&input, Arch::DeepseekV3, 2);
    std::os::unix::fs::symlink(&input, d.path().join("alias")).expect("symlink");
    let before = snapshot(&input);
    let spellings: Vec<PathBuf> = vec![
        input.clone(),
        PathBuf::from(format!("{}/", input.display())),
        d.path().join("r1/../r1"),
        d.path().join("alias"),
        d.path().join("alias/./"),
        input.join("fp8"),
        d.path().join("alias/sub/fp8"),
    ];
    for out in &spellings {
        for force in [false, true] {
            let mut a = args(&input, out, &[]);
            if force {
                a.push("--force".into());
            }
            let o = fp8forge_p(&a);
            let err = stderr(&o);
            assert_eq!(o.status.code(), Some(2), "{} (force {force}): {err}", out.display());
            assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
            assert!(err.contains("input directory"), "{err}");
            assert!(!err.contains("--force"), "the refusal suggests --force: {err}");
            assert_eq!(snapshot(&input), before, "{} (force {force}) changed the input", out.display());
        }
    }
    // The input given through the alias, the output the real directory: refused as well.
    let o = fp8forge_p(&args(&d.path().join("alias"), &input, &["--force"]));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(snapshot(&input), before, "the input changed");
}

#[test]
fn a_changed_input_is_refused_on_resume_and_on_a_finished_output_naming_the_file() {
    let d = tempfile::tempdir().expect("tempdir");
    let input = d.path().join("in");
    write_model(&input, Arch::Mixtral, 3);
    let shard = input.join("model-00003-of-00003.safetensors");
    // Unfinished: job 0 of 3 has written its share.
    let out = d.path().join("out");
    convert_ok(&input, &out, &["--shard", "0/3"]);
    let rewrite = |p: &Path| {
        let mut b = std::fs::read(p).expect("read");
        let n = b.len();
        b[n - 1] ^= 1; // same size, other data, later mtime
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(p, b).expect("write");
    };
    rewrite(&shard);
    for extra in [&["--resume"][..], &[], &["--shard", "1/3"]] {
        let o = fp8forge_p(&args(&input, &out, extra));
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{extra:?} after the input changed: {err}");
        assert!(err.contains("model-00003-of-00003.safetensors") && err.contains("changed since"), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    }
    convert_ok(&input, &out, &["--force"]);
    // Finished, then the input changes: a rerun says so instead of claiming the output is current.
    let before = snapshot(&out);
    let config = input.join("config.json");
    std::thread::sleep(Duration::from_millis(20));
    let mut text = std::fs::read(&config).expect("config");
    text.push(b'\n');
    std::fs::write(&config, text).expect("edit config.json");
    let o = fp8forge_p(&args(&input, &out, &[]));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("config.json") && stderr(&o).contains("the output was finished"), "{}", stderr(&o));
    assert_eq!(snapshot(&out), before, "a refused run changed OUT");
}

#[test]
fn force_never_takes_the_output_from_a_running_conversion() {
    let d = tempfile::tempdir().expect("tempdir");
    let input = d.path().join("in");
    write_large_model(&input, 4, 2);
    let reference = d.path().join("reference");
    convert_ok(&input, &reference, &[]);
    let out = d.path().join("out");
    let mut first = spawn(&input, &out, &["--threads", "1"]);
    let start = Instant::now();
    while !out.join(".fp8forge/journal.json").exists() {
        assert!(first.try_wait().expect("wait").is_none(), "first run ended before the test could race it");
        assert!(start.elapsed() < Duration::from_secs(60), "no journal");
        std::thread::sleep(Duration::from_millis(1));
    }
    for extra in [&["--force"][..], &["--force", "--scale-format", "ue8m0"], &["--resume"]] {
        let o = fp8forge_p(&args(&input, &out, extra));
        assert_eq!(o.status.code(), Some(2), "{extra:?} while a run writes OUT: {}", stderr(&o));
        assert!(stderr(&o).contains("another fp8forge run"), "{}", stderr(&o));
    }
    let o = first.wait_with_output().expect("wait");
    assert!(o.status.success(), "the running conversion failed: {}", stderr(&o));
    assert_same_files(&dir_files(&reference), &out, "the run raced by --force");
    // --force with --shard is refused outright: one job would delete the others' files.
    let o = fp8forge_p(&args(&input, &d.path().join("jobs"), &["--force", "--shard", "0/2"]));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn an_output_left_by_a_failed_start_resumes_without_force() {
    let d = tempfile::tempdir().expect("tempdir");
    let input = d.path().join("in");
    write_model(&input, Arch::Qwen3Moe, 2);
    let reference = d.path().join("reference");
    convert_ok(&input, &reference, &[]);
    // What a full disk (or a kill) leaves before the journal is recorded: the state folder with
    // its lock and a temporary file, or only an empty state folder.
    for (k, leftovers) in [&["lock", ".journal.json.1234.partial"][..], &[]].into_iter().enumerate() {
        let out = d.path().join(format!("out-{k}"));
        std::fs::create_dir_all(out.join(".fp8forge")).expect("mkdir");
        for f in leftovers {
            std::fs::write(out.join(".fp8forge").join(f), b"").expect("leftover");
        }
        convert_ok(&input, &out, &[]);
        assert_same_files(&dir_files(&reference), &out, "after a failed start");
    }
}

#[test]
fn a_manifest_in_the_input_is_not_carried_into_the_output() {
    // Converting the output of `fp8forge dequant` (which has a SHA256SUMS of its own): the new
    // SHA256SUMS must describe the new files, and `sha256sum -c` must pass.
    let d = tempfile::tempdir().expect("tempdir");
    let (input, fp8, back, again) =
        (d.path().join("in"), d.path().join("fp8"), d.path().join("back"), d.path().join("again"));
    write_model(&input, Arch::DeepseekV3, 2);
    convert_ok(&input, &fp8, &[]);
    let o = fp8forge_p(&["dequant".as_ref(), fp8.as_os_str(), back.as_os_str(), "--quiet".as_ref()]);
    assert!(o.status.success(), "dequant: {}", stderr(&o));
    assert!(back.join("SHA256SUMS").is_file());
    convert_ok(&back, &again, &[]);
    let o = fp8forge_p(&["verify".as_ref(), again.as_os_str(), "--quiet".as_ref()]);
    assert!(o.status.success(), "verify: {}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
    let sums = std::fs::read_to_string(again.join("SHA256SUMS")).expect("SHA256SUMS");
    assert!(!sums.contains(" SHA256SUMS"), "the manifest lists itself:\n{sums}");
    // A dequant retried on its finished output changes nothing either.
    let before = snapshot(&back);
    let o = fp8forge_p(&["dequant".as_ref(), fp8.as_os_str(), back.as_os_str(), "--quiet".as_ref()]);
    assert!(o.status.success(), "dequant retry: {}", stderr(&o));
    assert_eq!(snapshot(&back), before, "a dequant retry changed OUT");
}
