//! The Sluice router (TR 103 527 clause 7.2.2 steps 7 to 9; the subscription/notification
//! service of Figure 10): it matches readings and derived events against tenants'
//! subscriptions and hands notifications to notifiers, with oneM2M notification policies.
//!
//! Layout, in data-path order:
//! - [`subscription`]: the subscription API's JSON shape and its rules;
//! - [`store`] and [`sync`]: subscriptions and policy counters (in Redis, or in memory
//!   for tests), and this instance's copy of them;
//! - [`api`]: the tenant-authenticated subscription API and the live feed;
//! - [`matching`]: the indexed matching engine (patterns, index, matcher);
//! - [`match_stage`]: the match stage, a consumer group on the telemetry partitions and the
//!   events queue, publishing jobs to the outbox;
//! - [`job`]: the outbox's jobs on the wire (events and notifications are the
//!   contract's, `sluice_binding::event`);
//! - [`outbox`]: the durable path between matching and delivery (notify, delay and
//!   dead-letter queues);
//! - [`deliver`]: the notification policies and the delivery stage;
//! - [`notify`]: the notifiers (webhook, AMQP, Redis stream, live feed) behind one type;
//! - [`internal_events`]: what the router logs and counts, with its metric names.

pub mod api;
pub mod deliver;
pub mod internal_events;
pub mod job;
pub mod match_stage;
pub mod matching;
pub mod notify;
pub mod outbox;
pub mod store;
pub mod subscription;
pub mod sync;
#[cfg(test)]
mod testing;

use std::sync::Arc;
use std::time::Duration;

use sluice_binding::serve::ServerLimits;
use sluice_binding::tenancy::Tenants;
use sluice_binding::transport::amqp::AmqpTransport;
use sluice_binding::transport::{Transport, TransportError};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use deliver::DeliverConfig;
pub use match_stage::MatchConfig;
pub use notify::webhook::{WebhookConfig, WebhookNotifier};

/// Settings of a router instance.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    /// Redis holding subscriptions and policy counters (`redis://host:6379`).
    pub redis_url: String,
    /// Prefix of the router's Redis keys.
    pub redis_namespace: String,
    /// Notify queues of the outbox; fixed at their first declaration like the partitions.
    pub notify_partitions: u32,
    /// Most subscriptions per tenant.
    pub max_subscriptions_per_tenant: usize,
    /// Most live feeds a tenant holds open at once on this router (each holds a Redis
    /// connection); one more is answered 429.
    pub max_live_feeds_per_tenant: usize,
    /// How often the subscription change counter is polled (pub/sub is the fast path).
    pub sync_poll: Duration,
    /// The match stage.
    pub matching: MatchConfig,
    /// The delivery stage.
    pub deliver: DeliverConfig,
    /// The webhook notifier.
    pub webhook: WebhookConfig,
    /// The subscription API's connection cap and header timeout (a slow or flooding
    /// client cannot hold every connection).
    pub api_limits: ServerLimits,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            redis_url: "redis://127.0.0.1:6379".to_owned(),
            redis_namespace: store::DEFAULT_NAMESPACE.to_owned(),
            notify_partitions: 4,
            max_subscriptions_per_tenant: 10_000,
            max_live_feeds_per_tenant: 16,
            sync_poll: Duration::from_millis(500),
            matching: MatchConfig::default(),
            deliver: DeliverConfig::default(),
            webhook: WebhookConfig::default(),
            api_limits: ServerLimits::default(),
        }
    }
}

/// Why the router could not start.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The broker failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Redis failed.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The webhook client could not be built.
    #[error("cannot build the webhook client: {0}")]
    Webhook(#[from] reqwest::Error),
    /// The API listener failed.
    #[error("subscription API: {0}")]
    Api(#[from] std::io::Error),
}

/// Runs a router instance until `shutdown`: the subscription API on `listener` (if any),
/// the subscription sync, the match stage and the delivery stage.
pub async fn run(
    transport: AmqpTransport,
    listener: Option<TcpListener>,
    tenants: Tenants,
    cfg: RouterConfig,
    shutdown: CancellationToken,
) -> Result<(), RouterError> {
    let redis = store::RedisStore::connect(
        &cfg.redis_url,
        &cfg.redis_namespace,
        cfg.max_subscriptions_per_tenant,
    )
    .await?;
    // The match stage holds direct publishers to their tenants (`amqp_users`).
    let publishers = Arc::new(tenants.clone());
    let notifiers = notify::Notifiers {
        webhook: WebhookNotifier::new(cfg.webhook.clone())?,
        amqp: notify::amqp::AmqpNotifier::new(transport.clone(), tenants.clone()),
        stream: notify::stream::StreamNotifier::new(redis.connection(), &cfg.redis_namespace),
        live: notify::live::LiveNotifier::new(
            notify::live::LiveFeed::new(redis.client().clone(), &cfg.redis_namespace),
            redis.connection(),
        ),
    };
    let store = store::Store::redis(redis);
    let outbox = outbox::Outbox::new(transport.clone(), cfg.notify_partitions);
    let generic = Transport::Amqp(transport.clone());
    generic.declare(&[match_stage::GROUP]).await?;
    outbox.declare().await?;
    let (index, version) = sync::load(&store).await?;
    tracing::info!(subscriptions = index.len(), "subscriptions loaded");
    let index = sync::SharedIndex::new(index);

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(sync::run(
        store.clone(),
        index.clone(),
        version,
        cfg.sync_poll,
        shutdown.clone(),
    ));
    if let Some(listener) = listener {
        let app = api::app(api::ApiState::new(api::ApiParts {
            tenants,
            store: store.clone(),
            webhook: notifiers.webhook.clone(),
            amqp: notifiers.amqp.grants().clone(),
            live: notifiers.live.feed().clone(),
            live_slots: api::LiveSlots::new(cfg.max_live_feeds_per_tenant),
            transport: generic.clone(),
            index: index.clone(),
            shutdown: shutdown.clone(),
        }));
        let (stop, limits) = (shutdown.clone(), cfg.api_limits);
        tasks.spawn(async move {
            let served =
                sluice_binding::serve::run(
                    listener,
                    app,
                    limits,
                    async move { stop.cancelled().await },
                )
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "subscription API failed");
            }
        });
    }
    let delivering = tokio::spawn(deliver::run(
        outbox.clone(),
        store.clone(),
        index.clone(),
        notifiers,
        cfg.deliver.clone().shared_by(publishers.len()),
        shutdown.clone(),
    ));
    let matched = match_stage::run(
        generic,
        outbox,
        index,
        publishers,
        cfg.matching.clone(),
        shutdown.clone(),
    )
    .await;
    if matched.is_err() {
        shutdown.cancel();
    }
    let delivered = delivering.await.unwrap_or(Ok(()));
    while tasks.join_next().await.is_some() {}
    matched?;
    delivered?;
    Ok(())
}
