//! `sluice ingest`: the HTTP front end of Sluice.
//!
//! It owns the first hop of the data path (`docs/binding.md`): authenticate the tenant from
//! the API key (`sluice_binding::tenancy`), validate readings with the binding's own rules,
//! gather them into batches by size and time, and publish them with publisher confirms — answering a request only once
//! the broker confirmed every batch holding its readings.
//!
//! Layout, in data-path order:
//! - [`http`]: the axum front end ([`app`], [`serve`], [`AppState`]), body parsing and the
//!   JSON error answers;
//! - [`batcher`]: readings of concurrent requests gathered per tenant (and device), sent by
//!   size or linger;
//! - the producer it publishes with (encode, pick the partition, publish and await the
//!   confirm, retry the same bytes) is the binding's, `sluice_binding::producer`;
//! - [`gate`]: the quota of direct publishers: each gated tenant's ingress queue drained
//!   at its rate into the partitions;
//! - [`quota`](crate::quota) (private): each tenant's rate buckets, shared by HTTP and the gate;
//! - [`config`]: [`IngestConfig`], the knobs of all of the above;
//! - [`internal_events`]: logs and metrics, one struct per event.
//!
//! The listen address and CLI flags belong to the `sluice` binary, which binds the socket,
//! builds the transport and calls [`serve`].

pub mod batcher;
pub mod config;
pub mod gate;
pub mod http;
pub mod internal_events;
mod quota;

pub use config::IngestConfig;
pub use http::{AppState, app, serve};
