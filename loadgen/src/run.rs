//! One load run: an open-loop schedule of requests, each `batch_size` readings, sent at
//! `rate` readings per second (shaped over time by a [`Profile`]) to the HTTP front end or
//! straight to the broker in the binding, with at most `concurrency` requests outstanding.
//!
//! Every reading's device timestamp is its request's *intended* send time, so both the
//! corrected send→accept latency and the end-to-end latency count any time a request spent
//! waiting behind slow ones (coordinated omission). End-to-end latency is measured by
//! storage itself: each commit receipt carries the HDR histogram of `committed − device
//! timestamp` over its rows, and the run merges the receipts of its tenant. With a
//! [`NotifyReceiver`] (see [`crate::notify`]), the latency to the router's notification is
//! measured the same way, from the same device timestamps, by the receiver.
//!
//! Readings are deterministic: reading `r` of the run belongs to series
//! `r mod (devices × metrics)` (device-major) and has value `seed + 1000·device + metric +
//! k` where `k = r div (devices × metrics)`, so a test can compute every series' last value.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use sluice_binding::model::now_ns;
use sluice_binding::producer::Producer;
use sluice_binding::receipt::Receipt;
use sluice_binding::shutdown::CancellationToken;
use tokio::sync::{Semaphore, mpsc};

use crate::notify::NotifyReceiver;
use crate::profile::Profile;
use crate::report::{
    Counters, CountersSnapshot, LatencyRecorder, LatencyReport, NANOS_PER_MILLI, NotifySummary,
    OpenLoopLatency, Progress, SERIES_CORRECTED, SERIES_END_TO_END, SERIES_NOTIFIED,
    SERIES_SERVICE_TIME, Summary, Timeline, write_hgrm,
};

/// Body encoding of HTTP requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BodyFormat {
    /// `application/json`.
    #[default]
    Json,
    /// `application/msgpack`.
    Msgpack,
}

/// Where the load goes.
#[derive(Clone, Debug)]
pub enum Target {
    /// POST `/v1/telemetry` of the HTTP front end.
    Http {
        /// Base URL, e.g. `http://127.0.0.1:8080`.
        url: String,
        /// API key of the tenant.
        api_key: String,
        /// Body encoding.
        format: BodyFormat,
    },
    /// Publish binding batches with the producer library (through its transport).
    Direct(Arc<Producer>),
}

/// Shape of the load.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Simulated devices.
    pub devices: u32,
    /// Metrics per device.
    pub metrics: u32,
    /// Base offered load, readings per second; `profile` shapes it over time.
    pub rate: f64,
    /// How the offered rate varies over the run (steady by default).
    pub profile: Profile,
    /// Readings per request (per batch when publishing directly).
    pub batch_size: u32,
    /// Stop scheduling after this long...
    pub duration: Option<Duration>,
    /// ...or after this many readings (whichever comes first).
    pub count: Option<u64>,
    /// Requests outstanding at once, at most.
    pub concurrency: usize,
    /// Tenant of the readings (direct target) and of the receipts counted.
    pub tenant: String,
    /// Device names are `<prefix><5-digit index>`.
    pub device_prefix: String,
    /// Added to every value (see the module docs).
    pub seed: u64,
    /// After the last request, how long to wait for storage to commit (and the router to
    /// notify) what was accepted.
    pub drain_timeout: Duration,
    /// Show a live progress line.
    pub progress: bool,
}

impl Default for LoadConfig {
    fn default() -> Self {
        Self {
            devices: 100,
            metrics: 2,
            rate: 50_000.0,
            profile: Profile::Steady,
            batch_size: 500,
            duration: Some(Duration::from_secs(10)),
            count: None,
            concurrency: 64,
            tenant: "demo".to_owned(),
            device_prefix: "dev-".to_owned(),
            seed: 0,
            drain_timeout: Duration::from_secs(60),
            progress: true,
        }
    }
}

/// Names of the simulated series, and the value rule.
#[derive(Debug)]
struct Fleet {
    devices: Vec<String>,
    metrics: Vec<String>,
    seed: u64,
}

impl Fleet {
    fn new(cfg: &LoadConfig) -> Self {
        Self {
            devices: (0..cfg.devices.max(1))
                .map(|i| format!("{}{i:05}", cfg.device_prefix))
                .collect(),
            metrics: (0..cfg.metrics.max(1))
                .map(|j| format!("metric-{j}"))
                .collect(),
            seed: cfg.seed,
        }
    }

    /// Series, device index, metric index and value of reading `r`.
    fn reading(&self, r: u64) -> (usize, usize, f64) {
        let (nd, nm) = (self.devices.len() as u64, self.metrics.len() as u64);
        let series = r % (nd * nm);
        let k = r / (nd * nm);
        let (d, m) = ((series / nm) as usize, (series % nm) as usize);
        let value = self.seed as f64 + 1000.0 * d as f64 + m as f64 + k as f64;
        (d, m, value)
    }
}

/// The device timestamp of reading `j` of a request intended at `intended_wall` (ns): one
/// microsecond apart, the precision the readings table stores (two readings of one series in
/// one microsecond would be indistinguishable there).
fn reading_ts(intended_wall: i64, j: u64) -> i64 {
    intended_wall + j as i64 * 1_000
}

/// The last value the run sends for (device index, metric index), given the readings sent.
pub fn expected_last_value(cfg: &LoadConfig, total: u64, device: u32, metric: u32) -> Option<f64> {
    let (nd, nm) = (u64::from(cfg.devices.max(1)), u64::from(cfg.metrics.max(1)));
    let series = u64::from(device) * nm + u64::from(metric);
    if series >= total {
        return None;
    }
    let k = (total - 1 - series) / (nd * nm);
    Some(cfg.seed as f64 + 1000.0 * f64::from(device) + f64::from(metric) + k as f64)
}

#[derive(Serialize)]
struct JsonReading<'a> {
    device: &'a str,
    metric: &'a str,
    ts: i64,
    value: f64,
}

#[derive(Serialize)]
struct JsonBody<'a> {
    readings: Vec<JsonReading<'a>>,
}

/// What a run observes beyond the answers to its requests.
#[derive(Debug, Default)]
pub struct Observers {
    /// Commit receipts: the stored count and latency.
    pub receipts: Option<mpsc::Receiver<Receipt>>,
    /// The receiver of the router's notifications: the notified count and latency.
    pub notifications: Option<NotifyReceiver>,
}

/// Runs the load until its duration or count is reached (or `shutdown`), waits for the
/// outstanding requests and, with `receipts`, for storage to commit what was accepted.
pub async fn run(
    cfg: LoadConfig,
    target: Target,
    receipts: Option<mpsc::Receiver<Receipt>>,
    shutdown: CancellationToken,
) -> anyhow::Result<Summary> {
    let observers = Observers {
        receipts,
        notifications: None,
    };
    run_observed(cfg, target, observers, shutdown).await
}

/// [`run`], also waiting (within the same drain timeout) for the router to notify every
/// accepted reading when `observers.notifications` is set, and reporting the notify latency.
pub async fn run_observed(
    cfg: LoadConfig,
    target: Target,
    observers: Observers,
    shutdown: CancellationToken,
) -> anyhow::Result<Summary> {
    let Observers {
        receipts,
        notifications,
    } = observers;
    anyhow::ensure!(cfg.rate > 0.0, "rate must be positive");
    anyhow::ensure!(cfg.batch_size > 0, "batch size must be positive");
    anyhow::ensure!(
        cfg.duration.is_some() || cfg.count.is_some(),
        "give a duration or a count"
    );
    cfg.profile.validate()?;
    tracing::info!(profile = %cfg.profile, rate = cfg.rate, "load profile");
    let fleet = Arc::new(Fleet::new(&cfg));
    let counters = Arc::new(Counters::new());
    let latency = Arc::new(Mutex::new(OpenLoopLatency::new()));
    let end_to_end = Arc::new(Mutex::new(LatencyRecorder::new()));
    let observe_commits = receipts.is_some();
    let snapshot = || observed(&counters, notifications.as_ref());
    let timeline = Arc::new(Mutex::new(Timeline::new(observe_commits)));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(cfg.concurrency)
        .timeout(Duration::from_secs(60))
        .build()?;

    let mut schedule = cfg.profile.schedule(cfg.rate, cfg.batch_size);
    let slots = Arc::new(Semaphore::new(cfg.concurrency.max(1)));
    let mut progress = if cfg.progress {
        Progress::new(cfg.count, cfg.duration)
    } else {
        Progress::hidden()
    };
    let start = Instant::now();
    let start_wall = now_ns();
    // Spawned after `start` so commits land in the timeline's seconds; receipts arriving
    // meanwhile wait in the channel.
    let receipt_task = receipts.map(|rx| {
        tokio::spawn(collect_receipts(
            rx,
            cfg.tenant.clone(),
            counters.clone(),
            end_to_end.clone(),
            timeline.clone(),
            start,
        ))
    });
    let deadline = cfg.duration.map(|d| start + d);
    let total = cfg.count.unwrap_or(u64::MAX);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut next_reading = 0u64;
    while next_reading < total {
        // The schedule alone fixes the intended times (open loop); it only ends for a profile
        // that never offers again.
        let Some(offset) = schedule.next() else {
            break;
        };
        let intended = start + offset;
        if deadline.is_some_and(|d| intended >= d) {
            break;
        }
        // Wait for the slot, updating the progress line meanwhile.
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(intended.into()) => break,
                _ = tick.tick() => progress.update(&snapshot()),
                _ = shutdown.cancelled() => break,
            }
        }
        if shutdown.is_cancelled() {
            break;
        }
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p?,
            _ = shutdown.cancelled() => break,
        };
        let n = u64::from(cfg.batch_size).min(total - next_reading);
        let first = next_reading;
        next_reading += n;
        let intended_wall = start_wall + intended.duration_since(start).as_nanos() as i64;
        let (fleet, counters, latency, timeline, target, client, tenant) = (
            fleet.clone(),
            counters.clone(),
            latency.clone(),
            timeline.clone(),
            target.clone(),
            client.clone(),
            cfg.tenant.clone(),
        );
        lock(&timeline).offer(offset, n);
        counters.sent.fetch_add(n, Ordering::Relaxed);
        counters.batches.fetch_add(1, Ordering::Relaxed);
        counters.in_flight.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let sent = Instant::now();
            let outcome = send(&target, &client, &fleet, &tenant, first, n, intended_wall).await;
            let done = Instant::now();
            match outcome {
                Outcome::Accepted => {
                    counters.accepted.fetch_add(n, Ordering::Relaxed);
                    lock(&timeline).accept(done.duration_since(start), n);
                    lock(&latency).record(intended, sent, done);
                }
                Outcome::Rejected => {
                    counters.rejected.fetch_add(n, Ordering::Relaxed);
                }
                Outcome::Failed => {
                    counters.failed.fetch_add(n, Ordering::Relaxed);
                }
            }
            counters.in_flight.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    // Every request settled once all slots are free again.
    let all = u32::try_from(cfg.concurrency.max(1)).unwrap_or(u32::MAX);
    loop {
        tokio::select! {
            p = slots.acquire_many(all) => { drop(p?); break; }
            _ = tick.tick() => progress.update(&snapshot()),
        }
    }
    let duration = start.elapsed();

    // One drain for both: the timeout bounds the wait after sending, whatever is awaited.
    if observe_commits || notifications.is_some() {
        let drain_until = Instant::now() + cfg.drain_timeout;
        loop {
            let s = snapshot();
            let stored = !observe_commits || s.committed.unwrap_or(0) >= s.accepted;
            let notified = s.notified.is_none_or(|n| n >= s.accepted);
            if (stored && notified) || Instant::now() >= drain_until {
                break;
            }
            tokio::select! {
                _ = tick.tick() => progress.update(&s),
                _ = shutdown.cancelled() => break,
            }
        }
    }
    progress.update(&snapshot());
    progress.finish();
    if let Some(t) = receipt_task {
        t.abort();
    }

    let latency = std::mem::take(&mut *lock(&latency));
    let mut report = LatencyReport::new()
        .with(SERIES_CORRECTED, latency.corrected)
        .with(SERIES_SERVICE_TIME, latency.service);
    if observe_commits {
        let e2e = std::mem::take(&mut *lock(&end_to_end));
        report.push(SERIES_END_TO_END, e2e);
    }
    let mut counts = counters.snapshot();
    if !observe_commits {
        counts.committed = None;
    }
    let mut timeline = std::mem::take(&mut *lock(&timeline));
    let notified = notifications.as_ref().map(|n| {
        let (c, latency, arrivals) = n.finish();
        for (ms, readings) in arrivals {
            let since_start = u64::try_from(ms * 1_000_000 - start_wall).unwrap_or(0);
            timeline.notify(Duration::from_nanos(since_start), readings);
        }
        (c, latency)
    });
    let mut summary = Summary::new(&counts, duration, report).with_timeline(timeline);
    if let Some((c, latency)) = notified {
        summary.latency.push(SERIES_NOTIFIED, latency);
        summary = summary.with_notify(NotifySummary {
            notified: c.notified,
            repeats: c.repeats,
            missing: counts.accepted.saturating_sub(c.notified),
            ignored: c.ignored,
        });
    }
    Ok(summary)
}

/// The counters, with the notified count when the run subscribes.
fn observed(counters: &Counters, notifications: Option<&NotifyReceiver>) -> CountersSnapshot {
    let mut s = counters.snapshot();
    s.notified = notifications.map(|n| n.counts().notified);
    s
}

/// Locks a report shared with the sender tasks; a panicked sender leaves counts, not a
/// broken invariant, so a poisoned lock is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

enum Outcome {
    Accepted,
    Rejected,
    Failed,
}

async fn send(
    target: &Target,
    client: &reqwest::Client,
    fleet: &Fleet,
    tenant: &str,
    first: u64,
    n: u64,
    intended_wall: i64,
) -> Outcome {
    match target {
        Target::Http {
            url,
            api_key,
            format,
        } => {
            let readings = (0..n)
                .map(|j| {
                    let (d, m, value) = fleet.reading(first + j);
                    JsonReading {
                        device: &fleet.devices[d],
                        metric: &fleet.metrics[m],
                        ts: reading_ts(intended_wall, j),
                        value,
                    }
                })
                .collect();
            let body = JsonBody { readings };
            let request = client
                .post(format!("{url}/v1/telemetry"))
                .bearer_auth(api_key);
            let request = match format {
                BodyFormat::Json => match serde_json::to_vec(&body) {
                    Ok(b) => request.header("content-type", "application/json").body(b),
                    Err(_) => return Outcome::Failed,
                },
                BodyFormat::Msgpack => match rmp_serde::to_vec_named(&body) {
                    Ok(b) => request
                        .header("content-type", "application/msgpack")
                        .body(b),
                    Err(_) => return Outcome::Failed,
                },
            };
            match request.send().await {
                Ok(r) if r.status().as_u16() == 202 => Outcome::Accepted,
                Ok(r) => {
                    let status = r.status();
                    let text = r.text().await.unwrap_or_default();
                    tracing::debug!(%status, body = %text, "request refused");
                    Outcome::Rejected
                }
                Err(e) => {
                    tracing::debug!(error = %e, "request failed");
                    Outcome::Failed
                }
            }
        }
        Target::Direct(producer) => {
            let mut b = producer.batch(tenant);
            for j in 0..n {
                let (d, m, value) = fleet.reading(first + j);
                b.push(
                    &fleet.devices[d],
                    &fleet.metrics[m],
                    reading_ts(intended_wall, j),
                    value,
                );
            }
            match producer.send(&b.finish(now_ns())).await {
                Ok(()) => Outcome::Accepted,
                Err(e) => {
                    tracing::debug!(error = %e, "publish failed");
                    Outcome::Failed
                }
            }
        }
    }
}

async fn collect_receipts(
    mut rx: mpsc::Receiver<Receipt>,
    tenant: String,
    counters: Arc<Counters>,
    end_to_end: Arc<Mutex<LatencyRecorder>>,
    timeline: Arc<Mutex<Timeline>>,
    start: Instant,
) {
    let mut committed = 0u64;
    counters.set_committed(0);
    while let Some(r) = rx.recv().await {
        if r.tenant != tenant {
            continue;
        }
        committed += r.rows;
        lock(&timeline).commit(start.elapsed(), r.rows);
        match LatencyRecorder::from_v2_deflate(&r.latency) {
            Ok(h) => lock(&end_to_end).merge(&h),
            Err(e) => tracing::warn!(error = %e, "receipt with an unreadable histogram"),
        }
        counters.set_committed(committed);
    }
}

/// Writes `summary.json`, one `.hgrm` file per latency series, `latency.svg` and
/// `timeline.csv` (readings per second, see [`Timeline::to_csv`]) into `dir`; returns the
/// files written.
pub fn write_outputs(summary: &Summary, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for s in summary.latency.series() {
        if s.histogram().is_empty() {
            continue;
        }
        let slug: String = s
            .name()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect::<String>()
            .split('-')
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
            .join("-");
        let path = dir.join(format!("{slug}.hgrm"));
        write_hgrm(&path, s.histogram().histogram(), NANOS_PER_MILLI)?;
        written.push(path);
    }
    let plot = dir.join("latency.svg");
    summary.latency.write_plot(&plot)?;
    written.push(plot);
    let timeline = dir.join("timeline.csv");
    std::fs::write(&timeline, summary.timeline.to_csv())?;
    written.push(timeline);
    let json = dir.join("summary.json");
    std::fs::write(&json, summary.to_json()?)?;
    written.push(json);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_cycle_over_series_and_last_values_are_computable() {
        let cfg = LoadConfig {
            devices: 3,
            metrics: 2,
            seed: 7,
            ..LoadConfig::default()
        };
        let fleet = Fleet::new(&cfg);
        assert_eq!(fleet.devices[2], "dev-00002");
        let total = 20u64;
        let mut last = std::collections::HashMap::new();
        for r in 0..total {
            let (d, m, v) = fleet.reading(r);
            last.insert((d as u32, m as u32), v);
        }
        for d in 0..3 {
            for m in 0..2 {
                assert_eq!(
                    expected_last_value(&cfg, total, d, m),
                    last.get(&(d, m)).copied()
                );
            }
        }
        assert_eq!(expected_last_value(&cfg, 2, 2, 0), None);
    }

    #[test]
    fn outputs_include_the_timeline_csv() {
        let mut timeline = Timeline::new(false);
        timeline.offer(Duration::from_millis(100), 500);
        timeline.accept(Duration::from_millis(1_200), 500);
        let summary = Summary::new(
            &crate::report::CountersSnapshot::default(),
            Duration::from_secs(2),
            LatencyReport::new(),
        )
        .with_timeline(timeline);
        let dir = tempfile::tempdir().unwrap();
        let files = write_outputs(&summary, dir.path()).unwrap();
        let csv = dir.path().join("timeline.csv");
        assert!(files.contains(&csv), "{files:?}");
        assert_eq!(
            std::fs::read_to_string(csv).unwrap(),
            "second,offered,accepted,committed\n0,500,0,\n1,0,500,\n"
        );
    }
}
