//! Helpers shared by the CLI tests.
#![allow(dead_code)]

use std::process::{Command, Output};

/// The `bitnet` binary under test.
pub fn bitnet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bitnet"))
}

/// Run `cmd`, fail the test with its stderr unless it succeeds, and return its output.
pub fn succeeds(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{:?} failed:\n{}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
