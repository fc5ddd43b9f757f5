//! The `loadgen` binary as operators (and the sluice end-to-end tests, which drive it) use
//! it: every flag documented with its environment variable, bad load shapes refused before
//! anything is sent. Being an integration test also makes `cargo test --workspace` build
//! the binary that the end-to-end tests (`sluice/tests/e2e/`) run.

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

#[test]
fn help_lists_the_notify_flags() {
    let out = loadgen().arg("--help").output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--notify-listen <NOTIFY_LISTEN>",
        "--notify-url <NOTIFY_URL>",
        "--router-url <ROUTER_URL>",
        "--notify-batch <NOTIFY_BATCH>",
        "--notify-batch-wait <NOTIFY_BATCH_WAIT>",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}

#[test]
fn an_unreachable_router_fails_quickly_before_sending() {
    // Bound, then closed: nothing listens there.
    let router = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("results");
    let started = std::time::Instant::now();
    let out = loadgen()
        .args(["--notify-listen", "127.0.0.1:0"])
        .args(["--router-url", &format!("http://{router}")])
        .args(["--url", "http://127.0.0.1:9", "--quiet"])
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the router"), "{err}");
    assert!(err.contains(&router.to_string()), "{err}");
    assert!(err.contains("--router-url"), "{err}");
    assert!(!out_dir.exists(), "nothing was run, nothing written");
}

#[test]
fn a_run_against_an_ingest_that_never_answers_ends_at_its_deadline() {
    // Accepts connections and reads, never answers: requests hang until the deadline.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in silent.incoming().flatten() {
            held.push(conn);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let out = loadgen()
        .args([
            "--url",
            &format!("http://{addr}"),
            "--quiet",
            "--rate",
            "1000",
        ])
        .args(["--duration", "60s", "--deadline", "2s"])
        .arg("--out")
        .arg(dir.path().join("results"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit 0 at a deadline:\n{err}");
    assert!(err.contains("deadline"), "{err}");
    // The deadline, the grace for the run to end, and start-up: well under a minute.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
}
