//! Every command that reads a checkpoint (convert, dequant, inspect, verify, eval) refuses an input
//! that is not there, a FIFO or a device, given as IN or named inside a checkpoint: exit 2, one
//! line on stderr naming it, and never blocking (opening a FIFO for reading would wait for a
//! writer forever; each run here is killed and the test fails after a timeout).

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use fp8forge_tests::{Arch, fp8forge_p, fp8forge_timeout, mkfifo, stderr, write_model};

const TIMEOUT: Duration = Duration::from_secs(60);
const SHARD1: &str = "model-00001-of-00002.safetensors";

/// The command line of `cmd` reading `input` (writing, where it writes, under `scratch`).
fn command(cmd: &str, input: &Path, scratch: &Path) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec![cmd.into(), input.into()];
    match cmd {
        "convert" | "dequant" => a.extend([scratch.join(format!("out-{cmd}")).into(), "--quiet".into()]),
        "eval" => {
            let tokens = scratch.join("tokens.txt");
            std::fs::write(&tokens, "1 2 3 4 5").expect("tokens");
            a.extend(["--tokens".into(), tokens.into(), "--quiet".into()]);
        }
        _ => {}
    }
    a
}

/// Runs `args`, expecting exit 2 and one line on stderr that contains `name`.
fn expect_refused(args: &[OsString], name: &str) {
    let shown = format!("{:?}", args);
    let o = fp8forge_timeout(args, TIMEOUT);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{shown}: exit status {:?}; stderr: {err}", o.status);
    assert_eq!(err.lines().count(), 1, "{shown}: not one line: {err}");
    assert!(err.starts_with("fp8forge: error: ") && err.contains(name), "{shown}: does not name {name}: {err}");
}

const COMMANDS: [&str; 5] = ["convert", "dequant", "inspect", "verify", "eval"];

#[test]
fn a_missing_fifo_or_device_input_exits_2_with_one_line_for_every_command() {
    let d = tempfile::tempdir().expect("tempdir");
    let fifo = d.path().join("fifo");
    mkfifo(&fifo);
    let missing = d.path().join("no-such-model");
    for cmd in COMMANDS {
        for input in [missing.as_path(), fifo.as_path(), Path::new("/dev/null"), Path::new("/dev/zero")] {
            expect_refused(&command(cmd, input, d.path()), &input.display().to_string());
        }
    }
}

/// A BF16 model and its FP8 conversion.
fn models() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let d = tempfile::tempdir().expect("tempdir");
    let (bf16, fp8) = (d.path().join("bf16"), d.path().join("fp8"));
    write_model(&bf16, Arch::Mixtral, 2);
    let o = fp8forge_p(&["convert".as_ref(), bf16.as_os_str(), fp8.as_os_str(), "--quiet".as_ref()]);
    assert!(o.status.success(), "convert: {}", stderr(&o));
    (d, bf16, fp8)
}

/// Replaces `dir/name` by a FIFO.
fn fifo_in_place_of(dir: &Path, name: &str) {
    std::fs::remove_file(dir.join(name)).expect("remove");
    mkfifo(&dir.join(name));
}

#[test]
fn a_fifo_named_inside_a_checkpoint_exits_2_with_one_line_and_never_blocks() {
    for (file, cmds) in [
        (SHARD1, &["convert", "inspect", "eval", "dequant", "verify"][..]),
        ("config.json", &["convert", "inspect", "eval", "dequant", "verify"][..]),
        ("SHA256SUMS", &["verify"][..]),
    ] {
        let (d, bf16, fp8) = models();
        if file != "SHA256SUMS" {
            fifo_in_place_of(&bf16, file);
        }
        fifo_in_place_of(&fp8, file);
        for cmd in cmds {
            let input = if matches!(*cmd, "dequant" | "verify") { &fp8 } else { &bf16 };
            expect_refused(&command(cmd, input, d.path()), file);
        }
    }
}

#[test]
fn a_link_to_a_device_inside_a_checkpoint_exits_2_with_one_line() {
    let (d, bf16, fp8) = models();
    for dir in [&bf16, &fp8] {
        std::fs::remove_file(dir.join(SHARD1)).expect("remove");
        std::os::unix::fs::symlink("/dev/zero", dir.join(SHARD1)).expect("symlink");
    }
    for cmd in COMMANDS {
        let input = if matches!(cmd, "dequant" | "verify") { &fp8 } else { &bf16 };
        expect_refused(&command(cmd, input, d.path()), SHARD1);
    }
}
