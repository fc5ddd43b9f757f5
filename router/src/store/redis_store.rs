//! The subscription store in Redis, so that every router instance sees the same
//! subscriptions and enforces the same policy counters:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{ns}:subs:{tenant}` | hash | subscription id → subscription JSON |
//! | `{ns}:subs:tenants` | set | tenants that have subscriptions |
//! | `{ns}:subs:version` | counter | bumped by every change |
//! | `{ns}:subs:changed` | pub/sub channel | the tenant whose set changed |
//! | `{ns}:exc:{tenant}:{id}` | counter | notifications sent (expirationCounter) |
//! | `{ns}:rl:{tenant}:{id}` | sorted set | send times in the rate-limit window |
//! | `{ns}:batch:{tenant}:{id}` | list | held `batch_notify` events (MessagePack), oldest first |
//! | `{ns}:batch:{tenant}:{id}:lock` | string | the flusher's token, with a TTL |
//! | `{ns}:batches:due` | sorted set | `{id}:{tenant}` of every held batch → due time (ms) |
//! | `{ns}:latest:{tenant}:{id}` | string | key of the newest `latest_notify` notification, with a TTL |
//!
//! The Redis notifiers' keys (`{ns}:live:…`, `{ns}:notify:…`) are theirs:
//! [`crate::notify::live`], [`crate::notify::stream`].
//!
//! Instances learn of a change from the pub/sub message (milliseconds), and, since pub/sub
//! drops messages while a connection is down, also by polling the version counter (see
//! [`crate::sync`]).

use std::time::Duration;

use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use sluice_binding::TenantId;
use uuid::Uuid;

use sluice_binding::event::Event;

use super::{Changes, Expiration, HeldBatch, StoreError, expiration, now_ms};
use crate::subscription::{RateLimit, Subscription};

/// `KEYS[1]` = counter, `ARGV[1]` = limit. Returns the count after this notification, or
/// -1 when the limit had already been reached (the counter is not moved past it).
const EXPIRATION_SCRIPT: &str = r"
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n >= tonumber(ARGV[1]) then return -1 end
return redis.call('INCR', KEYS[1])
";

/// Creates a subscription within its tenant's cap, in one step (so concurrent creates
/// cannot pass the cap together). `KEYS` = the tenant's hash, the tenants set, the version
/// counter; `ARGV` = id, JSON, tenant, cap, changes channel. Returns -1 once created, else
/// the number the tenant already holds.
const CREATE_SCRIPT: &str = r"
local held = redis.call('HLEN', KEYS[1])
if held >= tonumber(ARGV[4]) then return held end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('INCR', KEYS[3])
redis.call('PUBLISH', ARGV[5], ARGV[3])
return -1
";

/// Sliding-window rate limit. `KEYS[1]` = sorted set of send times (ms), `ARGV` = now (ms),
/// window (ms), max, member. Returns 0 if a send is allowed now (and records it), else the
/// milliseconds until the oldest send leaves the window.
const RATE_SCRIPT: &str = r"
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], window)
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local wait = tonumber(oldest[2]) + window - now
if wait < 1 then wait = 1 end
return wait
";

/// Appends to a held batch within its cap. `KEYS` = the batch, the due set; `ARGV` = the
/// due-set member, due time (ms), cap, then the events. Returns the events held after, or
/// -1 when the batch already held `cap` (nothing is added). A new batch's due time is set;
/// a growing one keeps its own.
const HOLD_SCRIPT: &str = r"
local n = redis.call('LLEN', KEYS[1])
if n >= tonumber(ARGV[3]) then return -1 end
for i = 4, #ARGV, 1000 do
  redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('ZADD', KEYS[2], 'NX', ARGV[2], ARGV[1])
return n + #ARGV - 3
";

/// Removes the first `ARGV[1]` held events (sent on). `KEYS` = the batch, the due set;
/// `ARGV` = count, due-set member, next due time. Returns the events still held; an empty
/// batch leaves the due set.
const RELEASE_SCRIPT: &str = r"
redis.call('LTRIM', KEYS[1], tonumber(ARGV[1]), -1)
local left = redis.call('LLEN', KEYS[1])
if left == 0 then
  redis.call('ZREM', KEYS[2], ARGV[2])
else
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
end
return left
";

/// Frees a lock only for the token that took it. `KEYS[1]` = lock, `ARGV[1]` = token.
const UNLOCK_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// The subscription store and policy counters in Redis. Cheap to clone.
#[derive(Clone)]
pub struct RedisStore {
    client: redis::Client,
    conn: ConnectionManager,
    ns: String,
    max_per_tenant: usize,
    create: Script,
    expiration: Script,
    rate: Script,
    hold: Script,
    release: Script,
    unlock: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("ns", &self.ns)
            .field("max_per_tenant", &self.max_per_tenant)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to `url`; keys live under `ns`; a tenant may hold `max_per_tenant`
    /// subscriptions. The connection manager reconnects by itself after failures, at most
    /// 1 s apart (its default backoff grows to 3.2 s, which held deliveries seconds after
    /// Redis was back).
    pub async fn connect(url: &str, ns: &str, max_per_tenant: usize) -> Result<Self, StoreError> {
        let connect_error = |source| StoreError::Connect {
            url: sluice_binding::transport::amqp::redact(url),
            source,
        };
        let client = redis::Client::open(url).map_err(connect_error)?;
        let cfg = ConnectionManagerConfig::new().set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_with_config(client.clone(), cfg)
            .await
            .map_err(connect_error)?;
        Ok(Self {
            client,
            conn,
            ns: ns.to_owned(),
            max_per_tenant,
            create: Script::new(CREATE_SCRIPT),
            expiration: Script::new(EXPIRATION_SCRIPT),
            rate: Script::new(RATE_SCRIPT),
            hold: Script::new(HOLD_SCRIPT),
            release: Script::new(RELEASE_SCRIPT),
            unlock: Script::new(UNLOCK_SCRIPT),
        })
    }

    /// The connection (multiplexed, reconnecting), shared with the Redis notifiers.
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// The Redis client (for pub/sub connections).
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// The key namespace.
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    fn subs_key(&self, tenant: &str) -> String {
        format!("{}:subs:{tenant}", self.ns)
    }

    fn tenants_key(&self) -> String {
        format!("{}:subs:tenants", self.ns)
    }

    fn batch_key(&self, tenant: &str, id: Uuid) -> String {
        format!("{}:batch:{tenant}:{id}", self.ns)
    }

    fn due_key(&self) -> String {
        format!("{}:batches:due", self.ns)
    }

    fn latest_key(&self, tenant: &str, id: Uuid) -> String {
        format!("{}:latest:{tenant}:{id}", self.ns)
    }

    fn version_key(&self) -> String {
        format!("{}:subs:version", self.ns)
    }

    /// The pub/sub channel announcing changes.
    pub fn changes_channel(&self) -> String {
        format!("{}:subs:changed", self.ns)
    }

    /// The tenants whose set changes from now on, on a pub/sub connection of its own.
    pub async fn follow(&self) -> Result<Changes, StoreError> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(self.changes_channel()).await?;
        Ok(pubsub
            .into_on_message()
            .filter_map(|msg| async move { msg.get_payload::<String>().ok() })
            .boxed())
    }

    /// Stores a new subscription and announces the change.
    pub async fn create(&self, sub: &Subscription) -> Result<(), StoreError> {
        let json = serde_json::to_string(sub).expect("a subscription always serialises");
        let held: i64 = self
            .create
            .key(self.subs_key(sub.tenant.as_str()))
            .key(self.tenants_key())
            .key(self.version_key())
            .arg(sub.id.to_string())
            .arg(json)
            .arg(sub.tenant.as_str())
            .arg(self.max_per_tenant)
            .arg(self.changes_channel())
            .invoke_async(&mut self.conn.clone())
            .await?;
        match usize::try_from(held) {
            Ok(held) => Err(StoreError::TooMany(held)),
            Err(_) => Ok(()),
        }
    }

    /// Deletes a subscription and its counters; whether it existed.
    pub async fn delete(&self, tenant: &TenantId, id: Uuid) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let (removed,): (u32,) = redis::pipe()
            .atomic()
            .hdel(self.subs_key(tenant.as_str()), id.to_string())
            .del(format!("{}:exc:{tenant}:{id}", self.ns))
            .ignore()
            .del(format!("{}:rl:{tenant}:{id}", self.ns))
            .ignore()
            .del(self.batch_key(tenant.as_str(), id))
            .ignore()
            .zrem(self.due_key(), due_member(tenant.as_str(), id))
            .ignore()
            .del(self.latest_key(tenant.as_str(), id))
            .ignore()
            .incr(self.version_key(), 1)
            .ignore()
            .publish(self.changes_channel(), tenant.as_str())
            .ignore()
            .query_async(&mut conn)
            .await?;
        Ok(removed > 0)
    }

    /// One subscription of `tenant`.
    pub async fn get(
        &self,
        tenant: &TenantId,
        id: Uuid,
    ) -> Result<Option<Subscription>, StoreError> {
        let json: Option<String> = self
            .conn
            .clone()
            .hget(self.subs_key(tenant.as_str()), id.to_string())
            .await?;
        json.map(|j| parse(&id.to_string(), &j)).transpose()
    }

    /// Every subscription of `tenant`, oldest first.
    pub async fn list(&self, tenant: &str) -> Result<Vec<Subscription>, StoreError> {
        let all: Vec<(String, String)> = self.conn.clone().hgetall(self.subs_key(tenant)).await?;
        let mut subs = Vec::with_capacity(all.len());
        for (id, json) in all {
            match parse(&id, &json) {
                // Only the tenant's own subscriptions, whatever the hash holds.
                Ok(s) if s.tenant.as_str() == tenant => subs.push(s),
                Ok(_) => {
                    tracing::warn!(%tenant, %id, "subscription stored under another tenant; ignored")
                }
                Err(e) => tracing::warn!(error = %e, "ignoring an unreadable subscription"),
            }
        }
        subs.sort_by_key(|s| s.id);
        Ok(subs)
    }

    /// The tenants that have subscriptions.
    pub async fn tenants(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.conn.clone().smembers(self.tenants_key()).await?)
    }

    /// The change counter.
    pub async fn version(&self) -> Result<u64, StoreError> {
        let v: Option<u64> = self.conn.clone().get(self.version_key()).await?;
        Ok(v.unwrap_or(0))
    }

    /// Counts one notification against the expiration counter `max`.
    pub async fn count_notification(
        &self,
        tenant: &str,
        id: Uuid,
        max: u64,
    ) -> Result<Expiration, StoreError> {
        let n: i64 = self
            .expiration
            .key(format!("{}:exc:{tenant}:{id}", self.ns))
            .arg(max)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(expiration(n, max))
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
        let now_ms = now_ms();
        let wait_ms: u64 = self
            .rate
            .key(format!("{}:rl:{tenant}:{id}", self.ns))
            .arg(now_ms)
            .arg(limit.window.as_millis() as u64)
            .arg(limit.max)
            .arg(format!("{member}:{now_ms}"))
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok((wait_ms > 0).then(|| Duration::from_millis(wait_ms)))
    }
}

/// Held notifications.
impl RedisStore {
    /// See [`super::Store::hold_batch`].
    pub async fn hold_batch(
        &self,
        tenant: &str,
        id: Uuid,
        events: &[Event],
        due_ms: u64,
        cap: usize,
    ) -> Result<Option<usize>, StoreError> {
        let mut call = self.hold.prepare_invoke();
        call.key(self.batch_key(tenant, id))
            .key(self.due_key())
            .arg(due_member(tenant, id))
            .arg(due_ms)
            .arg(cap);
        for e in events {
            call.arg(rmp_serde::to_vec_named(e).expect("an event always serialises"));
        }
        let held: i64 = call.invoke_async(&mut self.conn.clone()).await?;
        Ok(usize::try_from(held).ok())
    }

    /// See [`super::Store::held_batch`].
    pub async fn held_batch(
        &self,
        tenant: &str,
        id: Uuid,
        n: usize,
    ) -> Result<HeldBatch, StoreError> {
        let (raw, len, due): (Vec<Vec<u8>>, usize, Option<f64>) = redis::pipe()
            .atomic()
            .lrange(self.batch_key(tenant, id), 0, n as isize - 1)
            .llen(self.batch_key(tenant, id))
            .zscore(self.due_key(), due_member(tenant, id))
            .query_async(&mut self.conn.clone())
            .await?;
        let mut events = Vec::with_capacity(raw.len());
        for r in raw {
            match rmp_serde::from_slice(&r) {
                Ok(e) => events.push(e),
                // Written by this module only: unreadable means damaged; sending the rest
                // beats holding the batch forever.
                Err(e) => {
                    tracing::warn!(%tenant, subscription = %id, error = %e, "dropping an unreadable held event")
                }
            }
        }
        Ok(HeldBatch {
            events,
            len,
            due_ms: due.map_or(0, |d| d as u64),
        })
    }

    /// See [`super::Store::release_batch`].
    pub async fn release_batch(
        &self,
        tenant: &str,
        id: Uuid,
        n: usize,
        next_due_ms: u64,
    ) -> Result<usize, StoreError> {
        Ok(self
            .release
            .key(self.batch_key(tenant, id))
            .key(self.due_key())
            .arg(n)
            .arg(due_member(tenant, id))
            .arg(next_due_ms)
            .invoke_async(&mut self.conn.clone())
            .await?)
    }

    /// See [`super::Store::due_batches`].
    pub async fn due_batches(
        &self,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<(String, Uuid)>, StoreError> {
        let members: Vec<String> = self
            .conn
            .clone()
            .zrangebyscore_limit(self.due_key(), "-inf", now_ms, 0, limit as isize)
            .await?;
        Ok(members.iter().filter_map(|m| parse_due_member(m)).collect())
    }

    /// See [`super::Store::lock_batch`].
    pub async fn lock_batch(
        &self,
        tenant: &str,
        id: Uuid,
        token: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let taken: Option<String> = redis::cmd("SET")
            .arg(format!("{}:lock", self.batch_key(tenant, id)))
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(taken.is_some())
    }

    /// See [`super::Store::unlock_batch`].
    pub async fn unlock_batch(
        &self,
        tenant: &str,
        id: Uuid,
        token: &str,
    ) -> Result<(), StoreError> {
        let _: i64 = self
            .unlock
            .key(format!("{}:lock", self.batch_key(tenant, id)))
            .arg(token)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// See [`super::Store::drop_batch`].
    pub async fn drop_batch(&self, tenant: &str, id: Uuid) -> Result<usize, StoreError> {
        let (len,): (usize,) = redis::pipe()
            .atomic()
            .llen(self.batch_key(tenant, id))
            .del(self.batch_key(tenant, id))
            .ignore()
            .zrem(self.due_key(), due_member(tenant, id))
            .ignore()
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(len)
    }

    /// See [`super::Store::set_latest`].
    pub async fn set_latest(
        &self,
        tenant: &str,
        id: Uuid,
        key: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let _: () = self
            .conn
            .clone()
            .pset_ex(
                self.latest_key(tenant, id),
                key,
                ttl.as_millis().max(1) as u64,
            )
            .await?;
        Ok(())
    }

    /// See [`super::Store::latest`].
    pub async fn latest(&self, tenant: &str, id: Uuid) -> Result<Option<String>, StoreError> {
        Ok(self.conn.clone().get(self.latest_key(tenant, id)).await?)
    }
}

/// The due set's member for a subscription: the id first (a UUID holds no `:`).
fn due_member(tenant: &str, id: Uuid) -> String {
    format!("{id}:{tenant}")
}

fn parse_due_member(member: &str) -> Option<(String, Uuid)> {
    let (id, tenant) = member.split_once(':')?;
    Some((tenant.to_owned(), id.parse().ok()?))
}

fn parse(id: &str, json: &str) -> Result<Subscription, StoreError> {
    serde_json::from_str(json).map_err(|source| StoreError::Corrupt {
        key: id.to_owned(),
        source,
    })
}
