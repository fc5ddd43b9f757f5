//! Process telemetry shared by every binary: tracing logs and the Prometheus `/metrics`
//! listener, with histogram buckets for every `*_seconds` metric.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Latency buckets, in seconds, from 100 µs to 60 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// Installing telemetry failed.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The Prometheus exporter could not start (address in use, ...).
    #[error("cannot start the metrics listener on {addr}: {source}")]
    Metrics {
        /// Listener address.
        addr: SocketAddr,
        /// Cause.
        source: metrics_exporter_prometheus::BuildError,
    },
}

/// Installs a tracing subscriber writing to stderr with the given filter
/// (`info`, `sluice=debug,lapin=warn`, ...). Safe to call more than once.
pub fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Serves Prometheus metrics on `addr` (path `/metrics`). Must run inside a tokio runtime.
pub fn install_metrics(addr: SocketAddr) -> Result<(), TelemetryError> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .and_then(|b| b.install())
        .map_err(|source| TelemetryError::Metrics { addr, source })
}
