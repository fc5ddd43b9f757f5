//! A test's own namespace, so tests run concurrently on one broker and one Redis, and its
//! teardown, so they leave both as they found them.
//!
//! The objects deleted are named by the contract, never spelled out here: the exchanges,
//! the dead-letter queue, the partition queues of the consumer groups and the router's
//! outbox objects all come from [`Topology`]; Redis keys are those under the
//! `{namespace}:` prefix the services use. A test that declares objects of its own adds them by name
//! ([`Namespace::add_queue`], [`Namespace::add_exchange`]).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Mutex;

use futures::FutureExt;
use lapin::Channel;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use sluice_binding::Topology;
use sluice_binding::topology::NOTIFY_DELAY_TIERS;

use crate::env::{amqp_addr, redis_url};

/// A fresh namespace and what its teardown deletes.
#[derive(Debug)]
pub struct Namespace {
    name: String,
    broker: Option<Broker>,
    redis: bool,
    router: Option<u32>,
    added: Mutex<Added>,
}

#[derive(Debug)]
struct Broker {
    partitions: u32,
    groups: Vec<String>,
}

#[derive(Debug, Default)]
struct Added {
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Namespace {
    /// `{prefix}-{12 random hex digits}`, with nothing to delete yet.
    pub fn new(prefix: &str) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self {
            name: format!("{prefix}-{}", &id[..12]),
            broker: None,
            redis: false,
            router: None,
            added: Mutex::default(),
        }
    }

    /// Used on the broker with `partitions` partitions: teardown deletes the topology's
    /// exchanges, its dead-letter queue and the partition queues of `groups`.
    pub fn on_broker(mut self, partitions: u32, groups: &[&str]) -> Self {
        self.broker = Some(Broker {
            partitions,
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        });
        self
    }

    /// Used as a Redis key prefix: teardown deletes the keys `{namespace}:*`.
    pub fn in_redis(mut self) -> Self {
        self.redis = true;
        self
    }

    /// A router runs in it with `notify_partitions` notify queues: teardown also deletes
    /// the router's outbox exchanges and queues.
    pub fn with_router(mut self, notify_partitions: u32) -> Self {
        self.router = Some(notify_partitions);
        self
    }

    /// The namespace (`SLUICE_NAMESPACE`, the Redis prefix).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The topology of the namespace; panics unless it is [on the broker](Self::on_broker).
    pub fn topology(&self) -> Topology {
        let b = self
            .broker
            .as_ref()
            .expect("Namespace::on_broker sets the partitions");
        Topology::new(self.name.clone(), b.partitions)
    }

    /// Teardown also deletes the queue `name` (one the test declared itself).
    pub fn add_queue(&self, name: impl Into<String>) {
        self.added().queues.push(name.into());
    }

    /// Teardown also deletes the exchange `name` (one the test declared itself).
    pub fn add_exchange(&self, name: impl Into<String>) {
        self.added().exchanges.push(name.into());
    }

    fn added(&self) -> std::sync::MutexGuard<'_, Added> {
        self.added.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The queues and exchanges teardown deletes that the topology names.
    fn topology_objects(&self) -> (Vec<String>, Vec<String>) {
        let Some(b) = &self.broker else {
            return (Vec::new(), Vec::new());
        };
        let t = self.topology();
        let mut queues: Vec<String> = b
            .groups
            .iter()
            .flat_map(|g| (0..t.partitions).map(|p| t.partition_queue(g, p)))
            .collect();
        queues.push(t.dead_letter_queue());
        let exchanges = vec![
            t.telemetry_exchange(),
            t.dead_letter_exchange(),
            t.commits_exchange(),
        ];
        (queues, exchanges)
    }

    /// Runs `test`, tears down, then re-raises the test's panic if it failed.
    pub async fn guard(&self, test: impl Future<Output = ()>) {
        let outcome = AssertUnwindSafe(test).catch_unwind().await;
        self.teardown().await;
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }

    /// Deletes everything the namespace holds on the broker and in Redis. Best effort: a
    /// failure is printed, never a panic (it runs after failed tests too).
    pub async fn teardown(&self) {
        if self.broker.is_some() {
            self.teardown_broker().await;
        }
        if self.redis {
            self.teardown_redis().await;
        }
    }

    /// [`Namespace::teardown`] on a runtime of its own, for synchronous tests and `Drop`.
    pub fn teardown_blocking(&self) {
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(self.teardown()),
            Err(e) => eprintln!("teardown of {}: no runtime: {e}", self.name),
        }
    }

    async fn teardown_broker(&self) {
        let (mut queues, mut exchanges) = self.topology_objects();
        if let Some(n) = self.router {
            let (q, x) = self.router_objects(n);
            queues.extend(q);
            exchanges.extend(x);
        }
        {
            let added = self.added();
            queues.extend(added.queues.iter().cloned());
            exchanges.extend(added.exchanges.iter().cloned());
        }
        let conn =
            match lapin::Connection::connect(&amqp_addr(), lapin::ConnectionProperties::default())
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("teardown of {}: cannot connect: {e}", self.name);
                    return;
                }
            };
        let mut ch = conn.create_channel().await.ok();
        for q in queues {
            let Some(c) = ch.as_ref() else { break };
            if let Err(e) = c
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await
            {
                eprintln!("teardown: queue {q}: {e}");
                ch = reopen(&conn).await;
            }
        }
        for x in exchanges {
            let Some(c) = ch.as_ref() else { break };
            if let Err(e) = c
                .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await
            {
                eprintln!("teardown: exchange {x}: {e}");
                ch = reopen(&conn).await;
            }
        }
        let _ = conn.close(200, "teardown".into()).await;
    }

    /// The router's outbox queues and exchanges, as the topology names them.
    fn router_objects(&self, notify_partitions: u32) -> (Vec<String>, Vec<String>) {
        let t = self.topology();
        let mut queues = vec![t.router_events_queue(), t.notify_dead_queue()];
        queues.extend((0..notify_partitions).map(|p| t.notify_queue(p)));
        queues.extend(
            NOTIFY_DELAY_TIERS
                .iter()
                .map(|tier| t.notify_delay_queue(*tier)),
        );
        let exchanges = vec![
            t.events_exchange(),
            t.notify_exchange(),
            t.notify_delay_exchange(),
        ];
        (queues, exchanges)
    }

    async fn teardown_redis(&self) {
        let client = match redis::Client::open(redis_url()) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("teardown of {}: Redis URL: {e}", self.name);
                return;
            }
        };
        let mut conn = match client.get_multiplexed_async_connection().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("teardown of {}: cannot connect to Redis: {e}", self.name);
                return;
            }
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.name))
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        if !keys.is_empty()
            && let Err(e) = redis::cmd("DEL")
                .arg(keys)
                .query_async::<()>(&mut conn)
                .await
        {
            eprintln!("teardown of {}: Redis DEL: {e}", self.name);
        }
    }
}

/// A new channel after the broker closed the last one over a failed delete.
async fn reopen(conn: &lapin::Connection) -> Option<Channel> {
    conn.create_channel().await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_objects_come_from_the_topology() {
        let a = Namespace::new("t").on_broker(2, &["storage", "router"]);
        let b = Namespace::new("t");
        assert_ne!(a.name(), b.name());
        assert!(
            a.name().starts_with("t-") && a.name().len() == 14,
            "{}",
            a.name()
        );
        let t = a.topology();
        let (queues, exchanges) = a.topology_objects();
        assert_eq!(
            queues,
            [
                t.partition_queue("storage", 0),
                t.partition_queue("storage", 1),
                t.partition_queue("router", 0),
                t.partition_queue("router", 1),
                t.dead_letter_queue(),
            ]
        );
        assert_eq!(
            exchanges,
            [
                t.telemetry_exchange(),
                t.dead_letter_exchange(),
                t.commits_exchange()
            ]
        );
        assert_eq!(b.topology_objects(), (vec![], vec![]));
    }
}
