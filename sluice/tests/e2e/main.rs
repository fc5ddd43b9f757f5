//! End-to-end tests: the real `sluice` and `loadgen` binaries (and the Python example)
//! against real RabbitMQ and Redis. Tests needing them are behind the `broker-tests`
//! feature (the README test command enables it); they read `AMQP_ADDR` and `REDIS_URL`,
//! and isolate themselves with a fresh namespace, Redis prefix and data directory each.
//!
//! Counts are exact: every test proves "nothing lost, nothing duplicated" by counting rows
//! through DataFusion, not by trusting the services' own reports.
//!
//! One test binary, a module per subsystem; the harness (binaries, child processes, the
//! per-test world) is `tests/support`, which the fault tests share.

#[path = "../support/mod.rs"]
mod support;

mod cli;
mod compose;
mod embedded;

#[cfg(feature = "broker-tests")]
mod ingest;
#[cfg(feature = "broker-tests")]
mod reads;
#[cfg(feature = "broker-tests")]
mod router;
#[cfg(feature = "broker-tests")]
mod storage;
#[cfg(feature = "broker-tests")]
mod workers;
