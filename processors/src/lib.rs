//! Sluice worker pools: the storage pool, which turns partition deliveries into rows
//! committed to the readings table and Redis latest values, and the table's maintenance.
//!
//! ```text
//! consumer task per partition queue ──► crossbeam (bounded) ──► N worker threads
//!   (transport prefetch window)                                  decode · validate · Arrow
//!                                                                        │ tokio mpsc (bounded)
//!                                                                        ▼
//!                        ack ◄── receipts ◄── latest values ◄── table commit ◄── committer
//! ```
//!
//! - [`pool`]: the pipeline above, its configuration and its shutdown order;
//! - [`workers`]: the worker threads, resizable while deliveries flow;
//! - [`control`]: the handle that sets the worker count of a running pool;
//! - [`autoscale`]: the autoscaling policy (backlog and busy time in, worker count out);
//! - [`admin`]: the HTTP endpoint over [`control`];
//! - [`health`]: whether the sinks take commits (part of `/readyz`);
//! - [`maintain`]: the table's maintenance service (retention, compaction, vacuum);
//! - [`stage`]: the CPU work of one delivery (decode, validate, build the Arrow batch);
//! - [`latency`]: HDR histograms of stage and end-to-end latency;
//! - [`internal_events`]: metrics and logs, each emitted in one place.

pub mod admin;
pub mod autoscale;
pub mod control;
pub mod health;
pub mod internal_events;
pub mod latency;
pub mod maintain;
pub mod pool;
pub mod stage;
pub mod workers;

pub use control::PoolControl;
pub use pool::{PoolConfig, PoolError, PoolReport, Sinks, run};
