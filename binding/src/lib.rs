//! The Sluice high-throughput binding — the contract every Sluice service and every
//! third-party producer shares (ETSI TR 103 527 clause 8.3). The normative text is
//! `docs/binding.md`; this crate is its reference implementation.
//!
//! Layout, in data-path order:
//! - [`model`]: a batch of readings, columnar, as it travels ([`Batch`] to build and send,
//!   [`BatchView`] to decode without copying strings);
//! - [`codec`]: the versioned MessagePack encoding;
//! - [`validate`]: the rules every consumer checks, shared with the HTTP front end;
//! - [`partition`]: round robin or device-hash choice of partition;
//! - [`topology`]: exchange and queue names, and their idempotent declaration;
//! - [`transport`]: publishing with confirms and consuming with acks, over AMQP (lapin) or
//!   the in-process transport of the embedded mode;
//! - [`receipt`]: the commit receipts storage publishes after each commit;
//! - [`telemetry`] and [`shutdown`]: the process plumbing every service binary shares.

pub mod codec;
pub mod model;
pub mod partition;
pub mod receipt;
pub mod shutdown;
pub mod telemetry;
pub mod topology;
pub mod transport;
pub mod validate;

pub use model::{Batch, BatchView, TenantId};
pub use partition::{Partitioner, Partitioning};
pub use topology::{QueueType, Topology};
