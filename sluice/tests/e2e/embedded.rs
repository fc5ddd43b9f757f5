//! `sluice embedded`: the whole pipeline in one process on the in-process transport, no
//! services; the loadgen summary and the stored rows agree to the reading.

use std::process::Command;

use crate::support::*;

#[test]
fn embedded_mode_stores_every_reading_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = Command::new(sluice_bin())
        .args([
            "embedded",
            "--count",
            "100000",
            "--devices",
            "50",
            "--metrics",
            "2",
        ])
        .args(["--rate", "200000", "--duration", "120s", "--json"])
        .args(["--flush-interval", "200ms", "--metrics-listen", ""])
        .arg("--store")
        .arg(&data)
        .arg("--out")
        .arg(dir.path().join("results"))
        .env_remove("SLUICE_REDIS_URL")
        .output()
        .unwrap();
    let stdout = output_ok(&out, "sluice embedded");
    let s = summary(&stdout);
    assert_eq!(s["sent"], 100_000, "{s}");
    assert_eq!(s["accepted"], 100_000, "{s}");
    assert_eq!(s["committed"], 100_000, "{s}");
    assert_eq!(total_rows(&data, "demo"), 100_000);
    assert_eq!(distinct_rows(&data, "demo"), 100_000);
    assert_eq!(
        count_rows(&data, "demo", "SELECT count(DISTINCT device) FROM readings"),
        50
    );
    // The report files a performance engineer reads.
    for f in [
        "summary.json",
        "latency.svg",
        "end-to-end-device-committed.hgrm",
    ] {
        let p = dir.path().join("results").join(f);
        assert!(p.exists(), "{} missing", p.display());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("p99.9"),
        "percentile table on stderr:\n{stderr}"
    );
}
