//! The storage pool (`sluice process`) under failures and sharing: killed mid-stream,
//! undecodable messages, two processes or single-active-consumer partitions on one group.
//! Counts are exact, through DataFusion.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use sluice_binding::codec;
use sluice_binding::model::{BatchBuilder, now_ns};
use sluice_testkit::amqp;

use crate::support::broker::*;
use crate::support::*;

#[test]
fn processors_killed_mid_stream_lose_and_duplicate_nothing() {
    let w = World::new();
    let mut first = w.processors();
    let ns = w.ns.name().to_owned();
    let dir = w.dir.path().join("results");
    let amqp = amqp_addr();
    // 100 000 readings straight to the broker at 20 000/s: about 5 s of stream.
    let load = std::thread::spawn(move || {
        Command::new(loadgen_bin())
            .args(["--amqp-url", &amqp, "--namespace", &ns, "--partitions", "4"])
            .args(["--target", "amqp", "--tenant", "acme", "--devices", "50"])
            .args([
                "--count",
                "100000",
                "--rate",
                "20000",
                "--batch-size",
                "500",
            ])
            .args([
                "--duration",
                "120s",
                "--json",
                "--quiet",
                "--drain-timeout",
                "120s",
            ])
            .arg("--out")
            .arg(dir)
            .output()
            .unwrap()
    });
    // Kill the processors with SIGKILL once some, not all, rows are stored.
    w.wait_for_rows("acme", 1, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(700));
    first.kill();
    let before = total_rows(&w.data(), "acme");
    assert!(
        before > 0 && before < 100_000,
        "killed after {before} rows: not mid-stream"
    );
    let _second = w.processors();
    let s = summary(&output_ok(&load.join().unwrap(), "loadgen"));
    assert_eq!(s["accepted"], 100_000, "{s}");
    w.wait_for_rows("acme", 100_000, Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        total_rows(&w.data(), "acme"),
        100_000,
        "exactly N rows after the restart"
    );
    assert_eq!(distinct_rows(&w.data(), "acme"), 100_000);
}

#[test]
fn undecodable_messages_are_dead_lettered_with_a_reason_and_the_stream_continues() {
    let w = World::new();
    let _processors = w.processors();
    rt().block_on(async {
        let (conn, ch) = amqp::connect().await;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let exchange = w.ns.topology().telemetry_exchange();
        let publish = |body: Vec<u8>| {
            let (ch, exchange) = (ch.clone(), exchange.clone());
            async move { amqp::publish_confirmed(&ch, &exchange, "0", &body).await }
        };
        let batch = |v: u32, n: usize| {
            let mut b = BatchBuilder::new("acme", "test", 0);
            for i in 0..n {
                b.push(&format!("d{i}"), "m", now_ns() - 1_000_000, i as f64);
            }
            let mut batch = b.finish(now_ns());
            batch.v = v;
            codec::encode(&batch).unwrap()
        };
        publish(b"this is not msgpack".to_vec()).await;
        publish(batch(2, 3)).await;
        publish(batch(1, 10)).await;
        publish(b"\x81\xa1v\x01".to_vec()).await; // a map with only the version
        publish(batch(1, 20)).await;

        // The stream continued: both valid batches are stored.
        let data = w.data();
        tokio::task::spawn_blocking(move || {
            wait_until("the valid batches", Duration::from_secs(60), || {
                data.join("tenant=acme").exists() && total_rows(&data, "acme") == 30
            })
        })
        .await
        .unwrap();

        let mut consumer = ch
            .basic_consume(
                w.ns.topology().dead_letter_queue().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut seen = Vec::new();
        while seen.len() < 3 {
            let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
                .await
                .expect("3 dead letters")
                .unwrap()
                .unwrap();
            let get = |k: &str| amqp::header(&d.properties, k);
            seen.push((
                get("x-sluice-error"),
                get("x-sluice-reason"),
                get("x-sluice-group"),
                d.data,
            ));
        }
        seen.sort();
        assert_eq!(seen[0].0, "decode");
        assert_eq!(
            seen[0].3,
            b"this is not msgpack".to_vec(),
            "original body kept"
        );
        assert_eq!(seen[1].0, "decode");
        assert!(seen[1].1.contains("missing field"), "{}", seen[1].1);
        assert_eq!(seen[2].0, "unsupported-version");
        assert!(seen[2].1.contains("version 2"), "{}", seen[2].1);
        assert!(seen.iter().all(|s| s.2 == "storage"));
        let _ = conn.close(200, "done".into()).await;
    });
}

#[test]
fn two_processors_processes_share_the_partitions_exactly() {
    let w = World::new();
    let _a = w.processors_with(&[("HOSTNAME", "proc-a")]);
    let _b = w.processors_with(&[("HOSTNAME", "proc-b")]);
    let load = w.background_load(100_000, 20_000, 500);
    let s = summary(&output_ok(&load.join().unwrap(), "loadgen"));
    assert_eq!(s["accepted"], 100_000, "{s}");
    w.wait_for_rows("acme", 100_000, Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(total_rows(&w.data(), "acme"), 100_000);
    assert_eq!(distinct_rows(&w.data(), "acme"), 100_000);
    // Both took part: each wrote files under its own writer id.
    let files = parquet_files(&w.data());
    for writer in ["proc-a", "proc-b"] {
        assert!(
            files.iter().any(|f| f.contains(&format!("part-{writer}-"))),
            "{writer} stored nothing: {files:?}"
        );
    }
}

#[test]
fn single_active_consumer_partitions_fail_over_without_loss() {
    let w = World::new();
    let sac = ("SLUICE_SINGLE_ACTIVE_CONSUMER", "true");
    let mut a = w.processors_with(&[sac, ("HOSTNAME", "proc-a")]);
    let _b = w.processors_with(&[sac, ("HOSTNAME", "proc-b")]);
    let s = summary(&output_ok(
        &w.background_load(50_000, 20_000, 500).join().unwrap(),
        "loadgen",
    ));
    assert_eq!(s["accepted"], 50_000, "{s}");
    w.wait_for_rows("acme", 50_000, Duration::from_secs(120));
    // The first consumer of each partition is the active one; the other stands by.
    let files = parquet_files(&w.data());
    assert!(
        files.iter().all(|f| f.contains("part-proc-a-")),
        "{files:?}"
    );
    // The active one dies: the standby takes the partitions over.
    a.kill();
    let s = summary(&output_ok(
        &w.background_load(50_000, 20_000, 500).join().unwrap(),
        "loadgen",
    ));
    assert_eq!(s["accepted"], 50_000, "{s}");
    w.wait_for_rows("acme", 100_000, Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(total_rows(&w.data(), "acme"), 100_000);
    assert_eq!(distinct_rows(&w.data(), "acme"), 100_000);
    let files = parquet_files(&w.data());
    assert!(
        files.iter().any(|f| f.contains("part-proc-b-")),
        "{files:?}"
    );
}

/// The table's data files (not the log's checkpoints).
fn parquet_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                if !p.ends_with("_delta_log") {
                    stack.push(p);
                }
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p.file_name().unwrap().to_string_lossy().into_owned());
            }
        }
    }
    out
}
