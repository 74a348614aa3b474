//! The binary starts, lists its commands and rejects bad usage with exit code 2. (Having an
//! integration test here also makes `cargo test --workspace` build the binary that the
//! end-to-end tests in `tests/` drive.)

use std::process::Command;

#[test]
fn help_lists_every_command_and_bad_usage_exits_2() {
    let bin = env!("CARGO_BIN_EXE_fp8forge");
    let o = Command::new(bin).arg("--help").output().expect("run fp8forge");
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    for c in ["convert", "dequant", "inspect", "verify"] {
        assert!(help.contains(c), "--help lacks {c}: {help}");
    }
    let o = Command::new(bin).args(["convert", "only-one-arg"]).output().expect("run fp8forge");
    assert_eq!(o.status.code(), Some(2));
    let o = Command::new(bin).args(["convert", "a", "b", "--shard", "3/3"]).output().expect("run fp8forge");
    assert_eq!(o.status.code(), Some(2));
}
