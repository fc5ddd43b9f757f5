//! HTTP load whose fate is counted: one request per device of its own, so rows per device
//! tell which requests were stored and how often (the fault and multi-broker tests).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::broker::*;
use super::{distinct_rows, total_rows};

/// Readings per request; each request has a device of its own, so a row count per device
/// tells which requests were stored and how often.
pub const PER_REQUEST: usize = 50;

/// One request's fate.
#[derive(Clone, Debug)]
pub struct Sent {
    pub at: Instant,
    /// HTTP status; 0 for no answer (the connection was refused or reset).
    pub status: u16,
}

/// HTTP load on `url`: one request of [`PER_REQUEST`] readings every `every`, each with a
/// device of its own (`r{n}`), until `stop`.
pub fn http_load(
    url: String,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<HashMap<String, Sent>> {
    http_load_as("r", url, every, stop)
}

/// [`http_load`] with devices `{prefix}{n}`, so several loads of one test stay apart.
pub fn http_load_as(
    prefix: &'static str,
    url: String,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<HashMap<String, Sent>> {
    std::thread::spawn(move || {
        let http = Http::new();
        let mut sent = HashMap::new();
        let base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i64;
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let device = format!("{prefix}{n}");
            let readings: Vec<String> = (0..PER_REQUEST)
                .map(|i| {
                    format!(
                        r#"{{"device":"{device}","metric":"m","ts":{},"value":{i}}}"#,
                        base + i as i64 * 1_000
                    )
                })
                .collect();
            let body = format!(r#"{{"readings":[{}]}}"#, readings.join(","));
            let started = Instant::now();
            let status = http.try_post(
                &format!("{url}/v1/telemetry"),
                "acme-key",
                "application/json",
                body.into_bytes(),
            );
            sent.insert(
                device,
                Sent {
                    at: Instant::now(),
                    status,
                },
            );
            n += 1;
            if let Some(rest) = every.checked_sub(started.elapsed()) {
                std::thread::sleep(rest);
            }
        }
        sent
    })
}

/// Rows per device of `tenant`.
pub fn rows_per_device(w: &World, tenant: &str) -> HashMap<String, u64> {
    let rt = rt();
    rt.block_on(async {
        let location = sluice_sinks::table::Location::parse(
            w.data().to_str().unwrap(),
            std::collections::BTreeMap::new(),
        )
        .unwrap();
        let q = sluice_sinks::query::TenantQuery::new(&location, tenant).unwrap();
        q.sql_json("SELECT device, count(*) AS n FROM readings GROUP BY device")
            .await
            .unwrap()
            .into_iter()
            .map(|r| {
                (
                    r["device"].as_str().unwrap().to_owned(),
                    r["n"].as_u64().unwrap(),
                )
            })
            .collect()
    })
}

/// Every accepted request's readings are stored exactly once; a refused one is stored
/// once or not at all (its batch may have reached the broker before the connection broke),
/// never in part twice. Returns (accepted requests, refused ones stored anyway).
pub fn check_stored_once(w: &World, sent: &HashMap<String, Sent>) -> (usize, usize) {
    let accepted: Vec<&String> = sent
        .iter()
        .filter(|(_, s)| s.status == 202)
        .map(|(d, _)| d)
        .collect();
    let want = (accepted.len() * PER_REQUEST) as u64;
    let data = w.data();
    wait_until(
        &format!("{want} accepted readings stored"),
        Duration::from_secs(120),
        || {
            let rows = rows_per_device(w, "acme");
            accepted
                .iter()
                .all(|d| rows.get(*d) == Some(&(PER_REQUEST as u64)))
        },
    );
    std::thread::sleep(Duration::from_millis(600)); // one more flush: nothing extra arrives
    let rows = rows_per_device(w, "acme");
    let mut refused_stored = 0;
    for (device, n) in &rows {
        let s = sent
            .get(device)
            .unwrap_or_else(|| panic!("rows of unknown device {device}"));
        assert!(
            *n <= PER_REQUEST as u64,
            "{device}: {n} rows, {PER_REQUEST} sent: duplicates"
        );
        if s.status == 202 {
            assert_eq!(
                *n, PER_REQUEST as u64,
                "{device}: accepted, {n} rows stored"
            );
        } else {
            refused_stored += 1;
        }
    }
    assert_eq!(
        distinct_rows(&data, "acme"),
        total_rows(&data, "acme"),
        "a row stored twice"
    );
    (accepted.len(), refused_stored)
}
