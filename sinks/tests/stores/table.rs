//! The readings table on S3 (moto) and read by an independent reader.

use std::collections::BTreeMap;
use std::process::Command;

use sluice_sinks::table::{Location, ReadingsTable, TableConfig, TableError};
use sluice_sinks::{StagedBatch, readings_rows};
use sluice_testkit::env::{python, s3_endpoint, s3_options, s3_store};
use sluice_testkit::store::count_at;

/// 2026-11-21T10:00:00Z.
const T0: i64 = 1_795_255_200_000_000_000;

/// `n` readings of `device`, one per millisecond from `start`, values 0..n.
fn batch(tenant: &str, device: &str, n: usize, start: i64) -> StagedBatch {
    let readings: Vec<(&str, &str, i64, f64)> = (0..n)
        .map(|i| (device, "kwh", start + i as i64 * 1_000_000, i as f64))
        .collect();
    StagedBatch {
        tenant: tenant.to_owned(),
        batch_id: uuid::Uuid::now_v7(),
        maybe_duplicate: false,
        rows: readings_rows(readings),
    }
}

fn s3_config(store: &str, writer: &str) -> TableConfig {
    TableConfig {
        store: store.to_owned(),
        storage_options: s3_options(),
        writer_id: writer.to_owned(),
        ..TableConfig::default()
    }
}

async fn rows(store: &str, options: BTreeMap<String, String>, tenant: &str) -> u64 {
    let location = Location::parse(store, options).expect("location");
    count_at(&location, tenant, "SELECT count(*) AS n FROM readings").await
}

#[tokio::test]
async fn processes_racing_on_s3_store_every_batch_once() {
    let store = s3_store("race");
    // Two processes: two tables with their own ledgers, one location.
    let x = ReadingsTable::open(s3_config(&store, "x"))
        .await
        .expect("open x");
    let y = ReadingsTable::open(s3_config(&store, "y"))
        .await
        .expect("open y");
    let mut expected = 0u64;
    for round in 0..8 {
        let shared = batch("acme", &format!("shared-{round}"), 20, T0);
        let (ox, oy) = tokio::join!(
            x.commit(vec![shared.clone(), batch("acme", "x", 3, T0)]),
            y.commit(vec![batch("acme", "y", 5, T0), shared.clone()]),
        );
        let (ox, oy) = (ox.expect("x commits"), oy.expect("y commits"));
        assert_eq!(
            ox.rows_written() + oy.rows_written(),
            28,
            "round {round}: {ox:?} {oy:?}"
        );
        expected += 28;
    }
    // A third process, opened later, knows every batch from the log.
    let z = ReadingsTable::open(s3_config(&store, "z"))
        .await
        .expect("open z");
    let again = batch("acme", "late", 4, T0);
    let out = z
        .commit(vec![again.clone(), again.clone()])
        .await
        .expect("commit");
    assert_eq!((out.rows_written(), out.rows_skipped()), (4, 4));
    expected += 4;
    assert_eq!(rows(&store, s3_options(), "acme").await, expected);
    assert_eq!(rows(&store, s3_options(), "other").await, 0);
}

#[tokio::test]
async fn unreachable_or_misconfigured_stores_fail_at_open_without_secrets() {
    // Nothing listens on port 1.
    let mut options = s3_options();
    options.insert("aws_endpoint".into(), "http://127.0.0.1:1".into());
    let err = ReadingsTable::open(TableConfig {
        storage_options: options,
        ..s3_config("s3://sluice-test/unreachable", "w")
    })
    .await
    .expect_err("unreachable");
    let text = format!("{err:#}");
    assert!(text.contains("s3://sluice-test/unreachable"), "{text}");
    assert!(!text.contains("test-secret"), "{text}");

    // A bucket that does not exist.
    let err = ReadingsTable::open(s3_config("s3://no-such-bucket-here/t", "w"))
        .await
        .expect_err("no bucket");
    assert!(matches!(err, TableError::Location { .. }), "{err}");
    assert!(
        err.to_string().contains("s3://no-such-bucket-here/t"),
        "{err}"
    );

    // An option object_store does not know.
    let mut options = s3_options();
    options.insert("aws_endpoint_typo".into(), s3_endpoint());
    let err = ReadingsTable::open(TableConfig {
        storage_options: options,
        ..s3_config(&s3_store("typo"), "w")
    })
    .await
    .expect_err("unknown option");
    assert!(err.to_string().contains("aws_endpoint_typo"), "{err}");
}

/// Rows per tenant and the sum of their values, as the Python `deltalake` package reads the
/// table at `uri`.
fn read_with_python_deltalake(uri: &str, storage: &BTreeMap<String, String>) -> serde_json::Value {
    let script = r#"
import json, os, sys
from deltalake import DeltaTable
uri, options = sys.argv[1], json.loads(sys.argv[2])
t = DeltaTable(uri, storage_options=options or None).to_pyarrow_table()
out = {}
for tenant, value in zip(t.column("tenant").to_pylist(), t.column("value").to_pylist()):
    n, s = out.get(tenant, (0, 0.0))
    out[tenant] = (n + 1, s + value)
print(json.dumps({k: {"rows": n, "sum": s} for k, (n, s) in out.items()}), flush=True)
# pyarrow's thread pools can abort the interpreter's teardown ("terminate called without an
# active exception", apache/arrow#34314); the answer is out, so skip the teardown.
os._exit(0)
"#;
    let output = Command::new(python())
        .arg("-c")
        .arg(script)
        .arg(uri)
        .arg(serde_json::to_string(storage).expect("json"))
        .output()
        .expect("run python");
    assert!(
        output.status.success(),
        "python deltalake failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("json from python")
}

async fn write_two_tenants(config: TableConfig) {
    let table = ReadingsTable::open(config).await.expect("open");
    // Two commits, two tenants, one batch over two days, and a repeat that must not count.
    let a = batch("acme", "m1", 100, T0);
    table
        .commit(vec![a.clone(), batch("globex", "g1", 10, T0)])
        .await
        .expect("commit");
    table
        .commit(vec![
            a,
            batch("acme", "m2", 30, T0 + 86_400_000_000_000 - 10_000_000),
        ])
        .await
        .expect("commit");
}

#[tokio::test]
async fn an_independent_reader_reads_the_table_from_files_and_from_s3() {
    // sum(0..n) = n(n-1)/2
    let expected = serde_json::json!({
        "acme": {"rows": 130, "sum": 4950.0 + 435.0},
        "globex": {"rows": 10, "sum": 45.0},
    });

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_str().expect("utf-8").to_owned();
    write_two_tenants(TableConfig {
        store: path.clone(),
        ..TableConfig::default()
    })
    .await;
    assert_eq!(
        read_with_python_deltalake(&path, &BTreeMap::new()),
        expected
    );

    let store = s3_store("reader");
    write_two_tenants(s3_config(&store, "w")).await;
    // delta-rs' Python options: the same keys, as AWS_* names.
    let options: BTreeMap<String, String> = [
        ("AWS_ENDPOINT_URL", s3_endpoint()),
        ("AWS_REGION", "us-east-1".to_owned()),
        ("AWS_ACCESS_KEY_ID", "test".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "test-secret".to_owned()),
        ("AWS_ALLOW_HTTP", "true".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(read_with_python_deltalake(&store, &options), expected);
}
