//! Parquet commit throughput (rows/s) for 100k-row commits: 200 staged batches of 500
//! readings (the binding's typical batch), 1000 devices × 5 metrics, ZSTD level 1.
//!
//! `cargo bench -p sluice-sinks --bench parquet_commit`

use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use sluice_sinks::parquet::{ParquetStore, ParquetStoreConfig};
use sluice_sinks::{StagedBatch, readings_rows};

const ROWS_PER_COMMIT: usize = 100_000;
const ROWS_PER_BATCH: usize = 500;
/// 2026-11-21T10:00:00Z.
const T0: i64 = 1_795_255_200_000_000_000;

fn staged(first_row: usize, start_ns: i64) -> StagedBatch {
    let devices: Vec<String> = (first_row..first_row + ROWS_PER_BATCH)
        .map(|i| format!("meter-{}", i / 5 % 1000))
        .collect();
    let readings = (first_row..first_row + ROWS_PER_BATCH).map(|i| {
        (
            devices[i - first_row].as_str(),
            ["kwh", "volt", "amp", "temp", "hz"][i % 5],
            start_ns + i as i64 * 10_000_000,
            (i % 977) as f64 * 0.25,
        )
    });
    StagedBatch {
        tenant: "bench".into(),
        batch_id: uuid::Uuid::now_v7(),
        maybe_duplicate: false,
        rows: readings_rows(readings),
    }
}

fn commit_input(start_ns: i64) -> Vec<StagedBatch> {
    (0..ROWS_PER_COMMIT / ROWS_PER_BATCH)
        .map(|b| staged(b * ROWS_PER_BATCH, start_ns))
        .collect()
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ParquetStore::open(ParquetStoreConfig {
        root: dir.path().to_owned(),
        writer_id: "bench".into(),
        ..ParquetStoreConfig::default()
    })
    .expect("store");

    let mut group = c.benchmark_group("parquet_commit");
    group
        .throughput(Throughput::Elements(ROWS_PER_COMMIT as u64))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    // 100k rows 10 ms apart span 1000 s: one partition.
    group.bench_function("100k_rows_one_hour", |b| {
        b.iter_batched(
            || commit_input(T0),
            |batches| runtime.block_on(store.commit(batches)).expect("commit"),
            BatchSize::PerIteration,
        )
    });
    // Starting 500 s before the hour: every commit is split over two partitions.
    group.bench_function("100k_rows_straddling_hour", |b| {
        b.iter_batched(
            || commit_input(T0 + 3_100_000_000_000),
            |batches| runtime.block_on(store.commit(batches)).expect("commit"),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
