//! The webhook receiver: `POST /notify` answers 204 at once and records, for the first
//! receipt of every event, the notify latency (receive time − the event's device timestamp).
//!
//! # Coordinated omission
//!
//! Nothing to correct here beyond what the sender already does: an event's `t` is its
//! reading's device timestamp, which loadgen sets to the *intended* send time of its batch
//! (see [`crate::run`]), so a sender falling behind its schedule, a stalled ingest or a slow
//! router all count in the latency, exactly as for the stored (commit receipt) latency. The
//! receiver itself issues no requests, so it cannot coordinate with the system under test.
//! The router's `batch_notify` hold is part of what is measured, by design.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use serde::Deserialize;
use sluice_binding::model::now_ns;

use crate::report::LatencyRecorder;

/// The path the router POSTs to.
pub const NOTIFY_PATH: &str = "/notify";

/// What loadgen reads of a router notification (`sluice_binding::event::Notification`);
/// other fields are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Notification {
    /// Subscription id.
    pub subscription: String,
    /// The events.
    pub events: Vec<NotifiedEvent>,
}

/// One event of a notification.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct NotifiedEvent {
    /// Stable id (`{batch id}:{reading index}` for readings): the same on every delivery.
    pub id: String,
    /// Device timestamp, ns since the Unix epoch.
    pub t: i64,
}

/// Event counts of the receiver.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NotifyCounts {
    /// Distinct events received (each recorded once in the latency histogram).
    pub notified: u64,
    /// Receipts of events already received (at-least-once delivery), not recorded again.
    pub repeats: u64,
    /// Events that are not this run's: from another subscription, or older than the run
    /// (a backlog the router matched against the new subscription).
    pub ignored: u64,
}

/// The receiver's shared state; cheap to clone (one `Arc`).
#[derive(Debug, Clone)]
pub struct NotifyReceiver {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Events with a device timestamp before this (ns) are not this run's.
    since: i64,
    /// Our subscription, once created; until then every notification is taken as ours.
    subscription: OnceLock<String>,
    state: Mutex<ReceiverState>,
}

#[derive(Debug, Default)]
struct ReceiverState {
    seen: Seen,
    latency: LatencyRecorder,
    counts: NotifyCounts,
    /// Readings first notified, by arrival (whole milliseconds since the epoch), for the
    /// run's timeline.
    arrivals: BTreeMap<i64, u64>,
}

impl NotifyReceiver {
    /// A receiver for a run starting now: every reading of the run has a device timestamp
    /// at or after this instant.
    pub fn new() -> Self {
        Self::since(now_ns())
    }

    /// A receiver that ignores events with a device timestamp before `since` (ns).
    pub fn since(since: i64) -> Self {
        Self {
            inner: Arc::new(Inner {
                since,
                subscription: OnceLock::new(),
                state: Mutex::new(ReceiverState::default()),
            }),
        }
    }

    /// Names the run's subscription: from now on, notifications of any other subscription
    /// (one left behind by a killed run, say) are acknowledged but ignored.
    pub fn set_subscription(&self, id: &str) {
        let _ = self.inner.subscription.set(id.to_owned());
    }

    /// The HTTP app: `POST /notify`.
    pub fn app(&self) -> Router {
        Router::new()
            .route(NOTIFY_PATH, post(receive))
            .with_state(self.clone())
    }

    /// Records a notification received at `received` (ns since the epoch).
    pub fn record(&self, n: &Notification, received: i64) {
        let ours = self
            .inner
            .subscription
            .get()
            .is_none_or(|id| *id == n.subscription);
        let mut s = self.lock();
        let ReceiverState {
            seen,
            latency,
            counts,
            arrivals,
        } = &mut *s;
        let first_before = counts.notified;
        for e in &n.events {
            if !ours || e.t < self.inner.since {
                counts.ignored += 1;
            } else if seen.insert(&e.id) {
                counts.notified += 1;
                // A receiver clock behind the device timestamp reads as 0, not as a panic.
                let ns = u64::try_from(received.saturating_sub(e.t)).unwrap_or(0);
                latency.record(Duration::from_nanos(ns));
            } else {
                counts.repeats += 1;
            }
        }
        if counts.notified > first_before {
            *arrivals.entry(received / 1_000_000).or_default() += counts.notified - first_before;
        }
    }

    /// The counts so far.
    pub fn counts(&self) -> NotifyCounts {
        self.lock().counts
    }

    /// The latency histogram so far, leaving an empty one.
    pub fn take_latency(&self) -> LatencyRecorder {
        std::mem::take(&mut self.lock().latency)
    }

    /// The counts and the latency histogram, read together (end of the run), and the
    /// readings first notified per arrival millisecond (since the epoch); the histogram
    /// and arrivals are left empty.
    pub fn finish(&self) -> (NotifyCounts, LatencyRecorder, BTreeMap<i64, u64>) {
        let mut s = self.lock();
        (
            s.counts,
            std::mem::take(&mut s.latency),
            std::mem::take(&mut s.arrivals),
        )
    }

    /// A panicked handler leaves counts, not a broken invariant: a poisoned lock is usable.
    fn lock(&self) -> MutexGuard<'_, ReceiverState> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Default for NotifyReceiver {
    fn default() -> Self {
        Self::new()
    }
}

/// Answers before anything slow can happen: the router's per-target concurrency limit and
/// circuit breaker would otherwise turn a slow receiver into notify latency.
async fn receive(State(receiver): State<NotifyReceiver>, body: Bytes) -> StatusCode {
    // The body has fully arrived when the handler runs: that is the receive time.
    let received = now_ns();
    match serde_json::from_slice::<Notification>(&body) {
        Ok(n) => {
            receiver.record(&n, received);
            StatusCode::NO_CONTENT
        }
        Err(e) => {
            tracing::warn!(error = %e, "malformed notification");
            StatusCode::BAD_REQUEST
        }
    }
}

/// Reading indexes below this are kept in a batch's bitset; others (and ids of any other
/// shape) in a set of strings.
const MAX_BITSET_INDEX: u32 = 1 << 16;

/// The event ids seen so far. A run sends millions of readings and reading ids are
/// `{batch id}:{index}`, so each batch keeps a bitset of its indexes (a few bytes per
/// reading) rather than a string per reading.
#[derive(Debug, Default)]
struct Seen {
    batches: HashMap<u128, Vec<u64>>,
    other: HashSet<String>,
}

impl Seen {
    /// Adds `id`; true the first time.
    fn insert(&mut self, id: &str) -> bool {
        let Some((batch, index)) = reading_id(id) else {
            return self.other.insert(id.to_owned());
        };
        let words = self.batches.entry(batch).or_default();
        let (word, bit) = ((index / 64) as usize, 1u64 << (index % 64));
        if words.len() <= word {
            words.resize(word + 1, 0);
        }
        let fresh = words[word] & bit == 0;
        words[word] |= bit;
        fresh
    }
}

/// `{32 lowercase hex digits}:{decimal index}`, in the one spelling the router writes, so
/// that two spellings of the same number cannot alias different ids.
fn reading_id(id: &str) -> Option<(u128, u32)> {
    let (batch, index) = id.split_once(':')?;
    let hex = batch.len() == 32
        && batch
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let decimal = !index.is_empty()
        && index.bytes().all(|b| b.is_ascii_digit())
        && (index == "0" || !index.starts_with('0'));
    if !(hex && decimal) {
        return None;
    }
    let index: u32 = index.parse().ok()?;
    if index >= MAX_BITSET_INDEX {
        return None;
    }
    Some((u128::from_str_radix(batch, 16).ok()?, index))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BATCH: &str = "0192f0c4a1b27c3d8e9f001122334455";
    const MS: i64 = 1_000_000;

    async fn serve(receiver: &NotifyReceiver) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = receiver.app();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}{NOTIFY_PATH}")
    }

    /// A notification of two readings, as the router sends it.
    fn notification(t: i64) -> String {
        serde_json::json!({
            "id": "5d41402abc4b2a76b9719d911017c592",
            "subscription": "0192f0c4-0000-7000-8000-000000000001",
            "tenant": "demo",
            "events": [
                {"id": format!("{BATCH}:0"), "kind": "reading", "device": "dev-00000",
                 "metric": "metric-0", "t": t, "value": 1.0},
                {"id": format!("{BATCH}:1"), "kind": "reading", "device": "dev-00000",
                 "metric": "metric-1", "t": t + 1, "value": 2.0},
            ],
            "sent": t + 5 * MS,
        })
        .to_string()
    }

    async fn post(url: &str, body: String) -> u16 {
        reqwest::Client::new()
            .post(url)
            .header("content-type", "application/json")
            .header("idempotency-key", "5d41402abc4b2a76b9719d911017c592")
            .body(body)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    #[tokio::test]
    async fn a_notification_of_two_events_is_recorded_twice() {
        let receiver = NotifyReceiver::since(0);
        let url = serve(&receiver).await;
        // Device timestamps 40 ms ago: the recorded latencies are at least that.
        let t = now_ns() - 40 * MS;
        assert_eq!(post(&url, notification(t)).await, 204);
        let counts = receiver.counts();
        assert_eq!(
            counts,
            NotifyCounts {
                notified: 2,
                repeats: 0,
                ignored: 0
            }
        );
        let latency = receiver.take_latency();
        assert_eq!(latency.count(), 2);
        assert!(latency.min() >= Duration::from_millis(39), "{latency:?}");
        assert!(latency.max() < Duration::from_secs(30));
    }

    #[tokio::test]
    async fn a_repeated_notification_counts_repeats_and_records_nothing_more() {
        let receiver = NotifyReceiver::since(0);
        let url = serve(&receiver).await;
        let body = notification(now_ns());
        assert_eq!(post(&url, body.clone()).await, 204);
        assert_eq!(post(&url, body).await, 204);
        let counts = receiver.counts();
        assert_eq!((counts.notified, counts.repeats), (2, 2));
        assert_eq!(receiver.take_latency().count(), 2);
    }

    #[tokio::test]
    async fn malformed_json_is_refused_and_records_nothing() {
        let receiver = NotifyReceiver::since(0);
        let url = serve(&receiver).await;
        assert_eq!(post(&url, "{\"events\": [".to_owned()).await, 400);
        assert_eq!(
            post(&url, r#"{"events":[{"id":"x"}]}"#.to_owned()).await,
            400
        );
        assert_eq!(receiver.counts(), NotifyCounts::default());
        assert!(receiver.take_latency().is_empty());
    }

    #[test]
    fn events_of_other_subscriptions_or_before_the_run_are_ignored() {
        let t = 1_000 * MS;
        let receiver = NotifyReceiver::since(t);
        let n: Notification = serde_json::from_str(&notification(t - 1)).unwrap();
        // The first event predates the run, the second (t) does not.
        receiver.record(&n, t + MS);
        assert_eq!(
            receiver.counts(),
            NotifyCounts {
                notified: 1,
                repeats: 0,
                ignored: 1
            }
        );
        receiver.set_subscription("0192f0c4-0000-7000-8000-000000000002");
        let later: Notification = serde_json::from_str(&notification(t + 10)).unwrap();
        receiver.record(&later, t + MS);
        assert_eq!(receiver.counts().ignored, 3);
        assert_eq!(receiver.take_latency().count(), 1);
    }

    #[test]
    fn arrivals_count_first_notifications_by_millisecond() {
        let receiver = NotifyReceiver::since(0);
        let n: Notification = serde_json::from_str(&notification(10 * MS)).unwrap();
        receiver.record(&n, 2_000 * MS + 7);
        // A repeat a second later adds no arrival.
        receiver.record(&n, 3_000 * MS);
        let (counts, _, arrivals) = receiver.finish();
        assert_eq!((counts.notified, counts.repeats), (2, 2));
        assert_eq!(arrivals.into_iter().collect::<Vec<_>>(), [(2_000, 2)]);
    }

    #[test]
    fn a_receiver_clock_behind_the_device_records_zero() {
        let receiver = NotifyReceiver::since(0);
        let n: Notification = serde_json::from_str(&notification(10 * MS)).unwrap();
        receiver.record(&n, 0);
        let latency = receiver.take_latency();
        assert_eq!((latency.count(), latency.max()), (2, Duration::ZERO));
    }

    #[test]
    fn seen_ids_dedupe_per_batch_and_in_any_other_shape() {
        let mut seen = Seen::default();
        for id in [
            format!("{BATCH}:0"),
            format!("{BATCH}:63"),
            format!("{BATCH}:64"),
            format!("{BATCH}:65535"),
            format!("{BATCH}:65536"),
            "fault-17".to_owned(),
        ] {
            assert!(seen.insert(&id), "{id} first time");
            assert!(!seen.insert(&id), "{id} again");
        }
        // Another batch, and spellings that would alias a reading id, are distinct ids.
        assert!(seen.insert("0192f0c4a1b27c3d8e9f001122334456:0"));
        assert!(seen.insert(&format!("{BATCH}:00")));
        assert!(seen.insert(&format!("{}:0", BATCH.to_uppercase())));
        assert_eq!(seen.batches.len(), 2);
        assert_eq!(
            seen.batches[&u128::from_str_radix(BATCH, 16).unwrap()].len(),
            1024
        );
    }
}
