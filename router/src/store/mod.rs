//! The subscription store: the subscriptions of every tenant, the policy counters
//! (expiration counters, rate-limit windows) and the held notifications (`batch_notify`
//! batches, the newest pending `latest_notify` notification) that every router instance
//! shares, and the announcement of each change, which keeps each instance's index up to
//! date ([`crate::sync`]).
//!
//! Held notifications live here rather than as unacked deliveries on the broker: a batch
//! waiting for its count or its duration (up to a day) would otherwise pin its jobs in the
//! notify queue's prefetch window, which every tenant's notifications share.
//!
//! Two implementations behind one type, as `LatestStore` has in sinks: [`RedisStore`], the
//! one a router runs on (shared by its instances), and [`MemoryStore`], one process's
//! own, for tests of the API, the sync and the delivery policies without services.

mod memory;
mod redis_store;

use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use sluice_binding::TenantId;
use sluice_binding::event::Event;
use uuid::Uuid;

pub use memory::MemoryStore;
pub use redis_store::RedisStore;

use crate::subscription::{RateLimit, Subscription};

/// The tenants whose subscription set changed, as announced (one item per change).
pub type Changes = BoxStream<'static, String>;

/// Default key namespace.
pub const DEFAULT_NAMESPACE: &str = "sluice";

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis failed or is unreachable.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The first connection failed.
    #[error("cannot connect to Redis at {url}: {source}")]
    Connect {
        /// The URL tried, without credentials.
        url: String,
        /// Cause.
        source: redis::RedisError,
    },
    /// A stored subscription is not valid JSON of the current shape.
    #[error("stored subscription {key} is unreadable: {source}")]
    Corrupt {
        /// Hash field.
        key: String,
        /// Cause.
        source: serde_json::Error,
    },
    /// The tenant has as many subscriptions as it may have.
    #[error("tenant has {0} subscriptions, the most allowed")]
    TooMany(usize),
}

/// A subscription's held batch, as read by the flusher.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeldBatch {
    /// Its first events, oldest first (at most what was asked for).
    pub events: Vec<Event>,
    /// Events held in all.
    pub len: usize,
    /// When it is due (ms since the Unix epoch; 0 when nothing is held).
    pub due_ms: u64,
}

/// What the expiration counter says about one more notification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiration {
    /// Send it; more may follow.
    Send,
    /// Send it; it is the last one: the subscription ends.
    SendLast,
    /// Do not send: the counter was already reached.
    Expired,
}

/// The subscription store and policy counters. Cheap to clone.
#[derive(Clone, Debug)]
pub enum Store {
    /// In Redis, shared by every router instance (behind an `Arc`: clones share it).
    Redis(Arc<RedisStore>),
    /// In this process.
    Memory(MemoryStore),
}

impl Store {
    /// The store in Redis.
    pub fn redis(store: RedisStore) -> Self {
        Store::Redis(Arc::new(store))
    }

    /// A store in this process; a tenant may hold `max_per_tenant` subscriptions.
    pub fn memory(max_per_tenant: usize) -> Self {
        Store::Memory(MemoryStore::new(max_per_tenant))
    }

    /// Stores a new subscription and announces the change; [`StoreError::TooMany`] when
    /// the tenant already holds as many as it may.
    pub async fn create(&self, sub: &Subscription) -> Result<(), StoreError> {
        match self {
            Store::Redis(s) => s.create(sub).await,
            Store::Memory(s) => s.create(sub),
        }
    }

    /// Deletes a subscription and its counters, and announces the change; whether it
    /// existed.
    pub async fn delete(&self, tenant: &TenantId, id: Uuid) -> Result<bool, StoreError> {
        match self {
            Store::Redis(s) => s.delete(tenant, id).await,
            Store::Memory(s) => Ok(s.delete(tenant, id)),
        }
    }

    /// One subscription of `tenant`.
    pub async fn get(
        &self,
        tenant: &TenantId,
        id: Uuid,
    ) -> Result<Option<Subscription>, StoreError> {
        match self {
            Store::Redis(s) => s.get(tenant, id).await,
            Store::Memory(s) => Ok(s.get(tenant, id)),
        }
    }

    /// Every subscription of `tenant`, oldest first.
    pub async fn list(&self, tenant: &str) -> Result<Vec<Subscription>, StoreError> {
        match self {
            Store::Redis(s) => s.list(tenant).await,
            Store::Memory(s) => Ok(s.list(tenant)),
        }
    }

    /// The tenants that have (or had) subscriptions.
    pub async fn tenants(&self) -> Result<Vec<String>, StoreError> {
        match self {
            Store::Redis(s) => s.tenants().await,
            Store::Memory(s) => Ok(s.tenants()),
        }
    }

    /// The change counter, bumped by every change.
    pub async fn version(&self) -> Result<u64, StoreError> {
        match self {
            Store::Redis(s) => s.version().await,
            Store::Memory(s) => Ok(s.version()),
        }
    }

    /// The changes announced from now on.
    pub async fn follow(&self) -> Result<Changes, StoreError> {
        match self {
            Store::Redis(s) => s.follow().await,
            Store::Memory(s) => Ok(s.follow()),
        }
    }

    /// Counts one notification against the expiration counter `max`.
    pub async fn count_notification(
        &self,
        tenant: &str,
        id: Uuid,
        max: u64,
    ) -> Result<Expiration, StoreError> {
        match self {
            Store::Redis(s) => s.count_notification(tenant, id, max).await,
            Store::Memory(s) => Ok(s.count_notification(tenant, id, max)),
        }
    }

    /// Takes a send slot of the rate limit: `None` if the notification may go now, else
    /// how long until a slot frees. `member` identifies the send (the idempotency key).
    pub async fn take_rate_slot(
        &self,
        tenant: &str,
        id: Uuid,
        limit: &RateLimit,
        member: &str,
    ) -> Result<Option<Duration>, StoreError> {
        match self {
            Store::Redis(s) => s.take_rate_slot(tenant, id, limit, member).await,
            Store::Memory(s) => Ok(s.take_rate_slot(tenant, id, limit)),
        }
    }
}

/// Held batches of the Redis store and the memory store.
impl Store {
    /// Adds `events` to the held batch of subscription `id`, which is due at `due_ms` if it
    /// was empty. Returns the events now held, or `None` when it already holds `cap` or
    /// more (its flushes are failing): the caller keeps the events elsewhere.
    pub async fn hold_batch(
        &self,
        tenant: &str,
        id: Uuid,
        events: &[Event],
        due_ms: u64,
        cap: usize,
    ) -> Result<Option<usize>, StoreError> {
        match self {
            Store::Redis(s) => s.hold_batch(tenant, id, events, due_ms, cap).await,
            Store::Memory(s) => Ok(s.hold_batch(tenant, id, events, due_ms, cap)),
        }
    }

    /// The first `n` held events of subscription `id`, how many are held and when due.
    pub async fn held_batch(
        &self,
        tenant: &str,
        id: Uuid,
        n: usize,
    ) -> Result<HeldBatch, StoreError> {
        match self {
            Store::Redis(s) => s.held_batch(tenant, id, n).await,
            Store::Memory(s) => Ok(s.held_batch(tenant, id, n)),
        }
    }

    /// Removes the first `n` held events of subscription `id` (they were sent on); what
    /// remains is due at `next_due_ms`. Returns the events still held.
    pub async fn release_batch(
        &self,
        tenant: &str,
        id: Uuid,
        n: usize,
        next_due_ms: u64,
    ) -> Result<usize, StoreError> {
        match self {
            Store::Redis(s) => s.release_batch(tenant, id, n, next_due_ms).await,
            Store::Memory(s) => Ok(s.release_batch(tenant, id, n, next_due_ms)),
        }
    }

    /// Held batches due at `now_ms`, at most `limit`, most overdue first.
    pub async fn due_batches(
        &self,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<(String, Uuid)>, StoreError> {
        match self {
            Store::Redis(s) => s.due_batches(now_ms, limit).await,
            Store::Memory(s) => Ok(s.due_batches(now_ms, limit)),
        }
    }

    /// Takes the flush lock of subscription `id`'s batch for `ttl` (one flusher among the
    /// instances, so a batch is sent once); whether it was free.
    pub async fn lock_batch(
        &self,
        tenant: &str,
        id: Uuid,
        token: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Redis(s) => s.lock_batch(tenant, id, token, ttl).await,
            Store::Memory(s) => Ok(s.lock_batch(tenant, id, token)),
        }
    }

    /// Frees the flush lock taken with `token` (not one another flusher took since).
    pub async fn unlock_batch(
        &self,
        tenant: &str,
        id: Uuid,
        token: &str,
    ) -> Result<(), StoreError> {
        match self {
            Store::Redis(s) => s.unlock_batch(tenant, id, token).await,
            Store::Memory(s) => {
                s.unlock_batch(tenant, id, token);
                Ok(())
            }
        }
    }

    /// Drops the held batch of a subscription that is gone; the events dropped.
    pub async fn drop_batch(&self, tenant: &str, id: Uuid) -> Result<usize, StoreError> {
        match self {
            Store::Redis(s) => s.drop_batch(tenant, id).await,
            Store::Memory(s) => Ok(s.drop_batch(tenant, id)),
        }
    }

    /// Records `key` as subscription `id`'s newest notification under `latest_notify`
    /// (kept `ttl`): a pending one with another key is superseded.
    pub async fn set_latest(
        &self,
        tenant: &str,
        id: Uuid,
        key: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        match self {
            Store::Redis(s) => s.set_latest(tenant, id, key, ttl).await,
            Store::Memory(s) => {
                s.set_latest(tenant, id, key);
                Ok(())
            }
        }
    }

    /// Subscription `id`'s newest notification under `latest_notify`, if one is recorded.
    pub async fn latest(&self, tenant: &str, id: Uuid) -> Result<Option<String>, StoreError> {
        match self {
            Store::Redis(s) => s.latest(tenant, id).await,
            Store::Memory(s) => Ok(s.latest(tenant, id)),
        }
    }
}

/// What the expiration counter says after counting `n` of at most `max` (`n < 0`: the
/// counter had already been reached and was not moved).
fn expiration(n: i64, max: u64) -> Expiration {
    match n {
        n if n < 0 => Expiration::Expired,
        n if n as u64 >= max => Expiration::SendLast,
        _ => Expiration::Send,
    }
}

/// Milliseconds since the Unix epoch: the clock of the rate-limit windows.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}
