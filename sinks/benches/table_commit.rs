//! Readings-table commit throughput (rows/s) for 100k-row commits: 200 staged batches of 500
//! readings (the binding's typical batch), 1000 devices × 5 metrics, ZSTD level 1, on a
//! local directory — with 1, 2 and 4 writers committing concurrently to one table (clones of
//! one `ReadingsTable`, as the storage pool's committers are), so that each iteration
//! commits `writers` × 100k rows.
//!
//! Beside it, in the same run, the ceiling of one writer's CPU work: encoding the same
//! 100k rows to Parquet in memory (ZSTD 1, dictionaries), no log, no I/O.
//!
//! `cargo bench -p sluice-sinks --bench table_commit`

use std::time::Duration;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sluice_sinks::table::{ReadingsTable, TableConfig};
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
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let table = runtime
        .block_on(ReadingsTable::open(TableConfig {
            store: dir.path().to_str().expect("utf-8").to_owned(),
            writer_id: "bench".into(),
            ..TableConfig::default()
        }))
        .expect("table");

    let mut ceiling = c.benchmark_group("parquet_encode_ceiling");
    ceiling
        .throughput(Throughput::Elements(ROWS_PER_COMMIT as u64))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    ceiling.bench_function("100k_rows_in_memory", |b| {
        b.iter_batched(
            || commit_input(T0),
            |batches| {
                let props = parquet::file::properties::WriterProperties::builder()
                    .set_compression(parquet::basic::Compression::ZSTD(
                        parquet::basic::ZstdLevel::try_new(1).expect("level"),
                    ))
                    .set_dictionary_enabled(true)
                    .build();
                let schema = batches[0].rows.schema();
                let mut w = parquet::arrow::ArrowWriter::try_new(Vec::new(), schema, Some(props))
                    .expect("writer");
                for b in &batches {
                    w.write(&b.rows).expect("write");
                }
                w.into_inner().expect("close").len()
            },
            BatchSize::PerIteration,
        )
    });
    ceiling.finish();

    let mut group = c.benchmark_group("table_commit");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));
    for writers in [1usize, 2, 4] {
        group.throughput(Throughput::Elements((writers * ROWS_PER_COMMIT) as u64));
        // 100k rows 10 ms apart span 1000 s: one partition per commit.
        group.bench_with_input(
            BenchmarkId::new("100k_rows_per_writer", writers),
            &writers,
            |b, &writers| {
                b.iter_batched(
                    || (0..writers).map(|_| commit_input(T0)).collect::<Vec<_>>(),
                    |inputs| {
                        runtime.block_on(async {
                            let commits = inputs.into_iter().map(|batches| {
                                let t = table.clone();
                                async move { t.commit(batches).await }
                            });
                            futures::future::try_join_all(commits)
                                .await
                                .expect("commit")
                        })
                    },
                    BatchSize::PerIteration,
                )
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
