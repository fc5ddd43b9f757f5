//! The Sluice contract — what every Sluice service and every third-party producer shares
//! (ETSI TR 103 527 clause 8.3, the high-throughput binding). The normative text is
//! `docs/binding.md`; this crate is its reference implementation, and services depend on
//! it rather than on each other.
//!
//! Layout, in data-path order:
//! - [`tenancy`]: tenants, their API keys and grants, and request authentication;
//! - [`model`]: a batch of readings, columnar, as it travels ([`Batch`] to build and send,
//!   [`BatchView`] to decode without copying strings), tenant ids and the clock;
//! - [`codec`]: the versioned MessagePack encoding;
//! - [`validate`]: the rules every consumer checks, shared with the HTTP front end;
//! - [`dead_letter`]: why a consumer refuses a message, as the dead-letter headers say it;
//! - [`partition`]: round robin or device-hash choice of partition;
//! - [`topology`]: exchange and queue names, and their idempotent declaration;
//! - [`producer`]: encode, pick the partition, publish with confirms, retry the same bytes;
//! - [`transport`]: publishing with confirms and consuming with acks, over AMQP (lapin) or
//!   the in-process transport of the embedded mode;
//! - [`receipt`]: the commit receipts storage publishes after each commit;
//! - [`event`]: events, derived events and notifications (section 7);
//! - [`config`]: serde adapters every service's config uses;
//! - [`internal_events`]: the producer's and the transport's logs and metrics;
//! - [`telemetry`], [`shutdown`] and [`serve`] (the accept loop of public HTTP
//!   endpoints): the process plumbing every service shares.
//!
//! Features: `transport` (default) brings the transports, the producer and the shutdown
//! signal; `telemetry` (default) the log and metrics exporters; `serve` the HTTP accept
//! loop (for the services with public endpoints). Without them the crate is
//! the contract's data and rules alone, for crates like `sluice-sinks`.

pub mod codec;
pub mod config;
pub mod dead_letter;
pub mod event;
#[cfg(feature = "transport")]
pub mod internal_events;
pub mod model;
pub mod partition;
#[cfg(feature = "transport")]
pub mod producer;
pub mod receipt;
#[cfg(feature = "serve")]
pub mod serve;
#[cfg(feature = "transport")]
pub mod shutdown;
#[cfg(feature = "telemetry")]
pub mod telemetry;
pub mod tenancy;
pub mod topology;
#[cfg(feature = "transport")]
pub mod transport;
pub mod validate;

pub use dead_letter::{DeadLetterKind, Refusal};
pub use model::{Batch, BatchView, TenantId};
pub use partition::{Partitioner, Partitioning};
pub use topology::{QueueType, Topology};
