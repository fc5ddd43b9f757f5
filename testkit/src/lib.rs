//! What the workspace's test binaries share (a dev-dependency only, never shipped):
//!
//! - [`env`]: where RabbitMQ, Redis and the example's Python are, from the environment
//!   `scripts/test.sh` exports, with the local defaults `scripts/services.sh` starts;
//! - [`namespace`]: a test's own namespace on the broker and in Redis, and its teardown,
//!   which deletes what the topology declared (names from [`sluice_binding::Topology`],
//!   the router's outbox included);
//! - [`amqp`]: raw broker access for tests that look at queues and headers themselves, and
//!   broker users of their own (direct publishers);
//! - `store` (feature `store`): row counts in a Parquet store, through DataFusion;
//! - [`wait`]: polling a condition until a deadline, with a panic that says what never
//!   happened.

pub mod amqp;
pub mod env;
pub mod namespace;
#[cfg(feature = "store")]
pub mod store;
pub mod wait;

pub use namespace::Namespace;
