//! The `loadgen` binary as operators (and the sluice end-to-end tests, which drive it) use
//! it: every flag documented with its environment variable, bad load shapes refused before
//! anything is sent. Being an integration test also makes `cargo test --workspace` build
//! the binary that `sluice/tests/e2e.rs` runs.

use std::process::Command;

fn loadgen() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loadgen"));
    cmd.env_clear();
    cmd
}

#[test]
fn every_flag_has_an_environment_variable() {
    let out = loadgen().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    // Each option starts a block (`      --name <VALUE>`) holding its doc and `[env: …]`.
    let mut blocks: Vec<String> = Vec::new();
    for line in help.lines() {
        if line.trim_start().starts_with("--") || line.trim_start().starts_with("-h, --") {
            blocks.push(String::new());
        }
        if let Some(b) = blocks.last_mut() {
            b.push_str(line);
            b.push('\n');
        }
    }
    let mut flags = 0;
    for block in &blocks {
        let name = block
            .split_whitespace()
            .find(|w| w.starts_with("--"))
            .unwrap();
        if matches!(name, "--help" | "--version") {
            continue;
        }
        flags += 1;
        assert!(
            block.contains("[env: LOADGEN_"),
            "{name} has no LOADGEN_ variable:\n{block}"
        );
    }
    assert!(flags >= 20, "only {flags} flags found in:\n{help}");
}

#[test]
fn a_storm_that_cannot_catch_up_is_refused_before_sending() {
    let out = loadgen()
        .args(["--profile", "storm", "--burst-factor", "1"])
        .args(["--url", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("storm"), "{err}");
    assert!(err.contains("factor"), "{err}");
}
