//! A day (or `--hours`) of low-rate ingest into the readings table, time-compressed: one
//! commit per `--flush` of simulated time at `--rate` readings/s, with synthetic device
//! timestamps; then the file count and the latency of a last-hour query, before and after
//! one maintenance pass (compaction + vacuum), on a local directory or an object store.
//!
//! ```text
//! cargo run --release -p sluice-bench --bin table-day -- --hours 24 --flush 10s
//! cargo run --release -p sluice-bench --bin table-day -- --store s3://sluice-test/day \
//!     --store-option aws_endpoint=http://127.0.0.1:9555 --store-option aws_allow_http=true \
//!     --store-option aws_region=us-east-1 --store-option aws_access_key_id=test \
//!     --store-option aws_secret_access_key=test --hours 2
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use sluice_sinks::query::TenantQuery;
use sluice_sinks::table::maintain::MaintenanceConfig;
use sluice_sinks::table::pace::IoBudget;
use sluice_sinks::table::{ReadingsTable, TableConfig};
use sluice_sinks::{StagedBatch, readings_rows};

/// 2026-11-21T00:00:00Z, the simulated day's start.
const DAY_START_NS: i64 = 1_795_219_200_000_000_000;

#[derive(Debug, Parser)]
struct Cli {
    /// The table (a fresh temporary directory when unset).
    #[arg(long)]
    store: Option<String>,
    /// Object store options, KEY=VALUE.
    #[arg(long = "store-option")]
    store_options: Vec<String>,
    /// Simulated hours of ingest.
    #[arg(long, default_value_t = 24)]
    hours: u64,
    /// Readings per simulated second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Simulated time between commits (the storage pool's --flush-interval).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    flush: Duration,
    /// Devices the readings cycle over (one metric each).
    #[arg(long, default_value_t = 100)]
    devices: u64,
    /// Query runs per measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Only write the day (its small files left for a compactor to merge later, as
    /// `bench/scripts/compactor.sh` needs): no query, no maintenance pass.
    #[arg(long)]
    write_only: bool,
}

fn options(kvs: &[String]) -> Result<BTreeMap<String, String>> {
    kvs.iter()
        .map(|kv| {
            let (k, v) = kv.split_once('=').context("--store-option KEY=VALUE")?;
            Ok((k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// The readings of simulated seconds `[from_s, to_s)`.
fn batch(cli: &Cli, names: &[String], from_s: u64, to_s: u64) -> StagedBatch {
    let per_ns = 1_000_000_000 / cli.rate.max(1) as i64;
    let first = from_s * cli.rate;
    let readings = (first..to_s * cli.rate).map(|r| {
        (
            names[(r % cli.devices) as usize].as_str(),
            "kwh",
            DAY_START_NS + r as i64 * per_ns,
            (r % 977) as f64,
        )
    });
    StagedBatch {
        tenant: "day".into(),
        batch_id: uuid::Uuid::now_v7(),
        maybe_duplicate: false,
        rows: readings_rows(readings),
    }
}

async fn last_hour_ms(cli: &Cli, q: &TenantQuery, end_s: u64) -> Result<(f64, String)> {
    let since = DAY_START_NS / 1_000_000_000 + end_s as i64 - 3600;
    let sql = format!(
        "SELECT count(*) AS n, avg(value) AS mean FROM readings \
         WHERE ts > to_timestamp({since})"
    );
    let mut times = Vec::new();
    let mut answer = String::new();
    for _ in 0..cli.runs.max(1) {
        let t = Instant::now();
        let rows = q.sql_json(&sql).await?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        answer = serde_json::Value::Object(rows[0].clone()).to_string();
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], answer))
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let tmp = tempfile::tempdir()?;
    let store = cli
        .store
        .clone()
        .unwrap_or_else(|| tmp.path().to_string_lossy().into_owned());
    let storage_options = options(&cli.store_options)?;
    let table = ReadingsTable::open(TableConfig {
        store: store.clone(),
        storage_options: storage_options.clone(),
        writer_id: "day".into(),
        ..TableConfig::default()
    })
    .await?;
    let names: Vec<String> = (0..cli.devices).map(|d| format!("meter-{d:04}")).collect();
    let flush_s = cli.flush.as_secs().max(1);
    let end_s = cli.hours * 3600;

    let started = Instant::now();
    let mut commits = 0u64;
    let mut s = 0;
    while s < end_s {
        let to = (s + flush_s).min(end_s);
        table.commit(vec![batch(&cli, &names, s, to)]).await?;
        commits += 1;
        s = to;
    }
    table.settle().await;
    let write = started.elapsed();
    let rows = end_s * cli.rate;
    if cli.write_only {
        println!(
            "{}: {commits} commits, {rows} rows in {:.1} s",
            table.location(),
            write.as_secs_f64()
        );
        return Ok(());
    }

    let q = TenantQuery::new(table.location(), "day")?;
    let (before_ms, before) = last_hour_ms(&cli, &q, end_s).await?;
    let pass = Instant::now();
    let report = table
        .maintain_at(
            &MaintenanceConfig {
                vacuum_grace: Duration::ZERO,
                // The pass alone on the machine: as fast as it goes.
                io_budget: IoBudget::UNLIMITED,
                ..MaintenanceConfig::default()
            },
            chrono::NaiveDate::from_ymd_opt(2026, 11, 22).context("date")?,
        )
        .await?;
    let pass = pass.elapsed();
    let (after_ms, after) = last_hour_ms(&cli, &q, end_s).await?;
    anyhow::ensure!(before == after, "answers differ: {before} vs {after}");

    println!("store: {}", table.location());
    println!(
        "ingest: {} h simulated at {} readings/s, a commit per {} s: {commits} commits, {rows} rows in {:.1} s ({:.0} commits/s, {:.0} rows/s)",
        cli.hours,
        cli.rate,
        flush_s,
        write.as_secs_f64(),
        commits as f64 / write.as_secs_f64(),
        rows as f64 / write.as_secs_f64()
    );
    println!("| | files | last-hour query (median of {}) |", cli.runs);
    println!("|---|---:|---:|");
    println!(
        "| before compaction | {} | {before_ms:.1} ms |",
        report.files_compacted + report.files_live - report.files_merged
    );
    println!(
        "| after compaction | {} | {after_ms:.1} ms |",
        report.files_live
    );
    println!(
        "compaction + vacuum pass: {:.1} s ({} files merged into {}, {} vacuumed); answer {after}",
        pass.as_secs_f64(),
        report.files_compacted,
        report.files_merged,
        report.files_vacuumed
    );
    Ok(())
}
