//! The AMQP transport (RabbitMQ, lapin).
//!
//! - Per broker, two supervised connections ([`link`]): one for publishing, one for
//!   consuming (opened on first use). RabbitMQ stops reading from publishing connections
//!   under a memory or disk alarm, acks included; kept apart, consumers go on draining the
//!   queues and the alarm can clear. Each link reconnects by itself with bounded, jittered
//!   backoff, runs the registered declarations again, and consumers subscribe again
//!   ([`consumer`]); nothing relies on lapin's own recovery.
//! - A small pool of publishing channels per broker, all in confirm mode: concurrent
//!   publishes keep hundreds of confirms in flight (performance-facts: 1 in flight gives
//!   1.6 k msg/s, 1024 give 12 k), and each caller awaits only its own confirm. A channel
//!   the broker closed is replaced on its next use; [`AmqpTransport::publish_in_lane`]
//!   keeps a caller's publishes on channels of their own.
//! - `mandatory` publishes, so an unroutable batch is an error, never a silent drop.
//! - A publish never waits for a broker that is gone: with no connected broker it fails at
//!   once ([`PublishError::Unavailable`]), and the whole publish, confirm included, is
//!   bounded by the confirm timeout.
//! - Connection-blocked notifications (memory or disk alarms) are tracked, so producers
//!   refuse fast with the broker's reason instead of queueing behind the alarm.
//! - Consumers get their own channel each, with an explicit prefetch (`basic.qos`).

mod consumer;
mod link;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};
use tokio::sync::{OnceCell, mpsc};

pub(super) use consumer::AmqpConsumer;
use consumer::ConsumerCounts;
use link::{Declaration, Declarations, Link, LinkState, Role};

use super::{
    Consumer, ConsumerInner, DeadLetter, Outgoing, PublishError, Readiness, TransportError,
};
use crate::codec::CONTENT_TYPE;
use crate::receipt::Receipt;
use crate::topology::Topology;

/// Settings of the AMQP transport.
#[derive(Clone, Debug)]
pub struct AmqpConfig {
    /// Broker URLs (`amqp://user:pass@host:5672/%2f`); batches are spread round robin over
    /// them, and consumers consume from all of them. A URL without `heartbeat` gets 10 s,
    /// one without `connection_timeout` 5 000 ms.
    pub urls: Vec<String>,
    /// Names and shape on the broker.
    pub topology: Topology,
    /// Publishing channels per broker.
    pub publish_channels: usize,
    /// Longest a publish takes, confirm included, before it is reported as failed.
    pub confirm_timeout: Duration,
    /// How long to keep retrying the first connection to each broker (brokers may start
    /// after the services). Later losses are retried for as long as the transport lives.
    pub connect_timeout: Duration,
    /// Connection name shown in the RabbitMQ management UI (` (publish)` or
    /// ` (consume)` is appended).
    pub connection_name: String,
    /// Broker users, besides those of `urls`, whose batches are Sluice's own and may carry
    /// any tenant: the users Sluice's other services log in as, when they differ from this
    /// one's. Every other publisher is held to the tenant its user is mapped to
    /// ([`crate::tenancy::Tenants::check_publisher`]).
    pub trusted_users: Vec<String>,
}

impl AmqpConfig {
    /// Defaults for `urls` and `topology`.
    pub fn new(urls: Vec<String>, topology: Topology) -> Self {
        Self {
            urls,
            topology,
            publish_channels: 4,
            confirm_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(60),
            connection_name: "sluice".to_owned(),
            trusted_users: Vec::new(),
        }
    }
}

/// The state of one supervised connection, for health endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkHealth {
    /// Broker URL without credentials.
    pub broker: String,
    /// `publish` or `consume`.
    pub role: &'static str,
    /// Connected now.
    pub connected: bool,
    /// Why not, or the broker's alarm while connected.
    pub problem: Option<String>,
}

/// RabbitMQ transport: cheap to clone.
#[derive(Clone)]
pub struct AmqpTransport {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: AmqpConfig,
    /// The publishing link of every broker, in `cfg.urls` order.
    publish: Vec<Link>,
    /// The consuming links, opened by the first consumer.
    consume: OnceCell<Vec<Link>>,
    declarations: Declarations,
    next_broker: AtomicUsize,
    consumers: Arc<ConsumerCounts>,
    /// The users of `cfg.urls` and `cfg.trusted_users`.
    trusted: Arc<HashSet<String>>,
}

impl std::fmt::Debug for AmqpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.inner.publish.iter().map(Link::broker).collect();
        f.debug_struct("AmqpTransport")
            .field("brokers", &names)
            .field("topology", &self.inner.cfg.topology)
            .finish()
    }
}

/// Readiness from the state of every connection. With one broker every problem stops the
/// work. With several, the broker is chosen per publish and every broker's queues are
/// consumed, so a broker down or blocked while another of the same role (publishing,
/// consuming) is up only degrades the service: ingest must stay in its load balancer while
/// one broker of two restarts. Missing consumers count the same way: while some consuming
/// connection is down and some consumer is attached, the missing ones are taken to wait for
/// that connection.
fn assess(links: &[LinkHealth], consumers: usize, attached: usize) -> Readiness {
    let usable = |role: &str| links.iter().any(|l| l.role == role && l.problem.is_none());
    let mut r = Readiness {
        consumers,
        consumers_attached: attached,
        ..Readiness::default()
    };
    for l in links {
        if let Some(p) = &l.problem {
            if usable(l.role) {
                r.degraded.push(p.clone());
            } else {
                r.problems.push(p.clone());
            }
        }
    }
    if attached < consumers {
        let why = format!(
            "{attached} of {consumers} consumers subscribed; the others are waiting for their queue or connection"
        );
        let consuming_down = links.iter().any(|l| l.role == "consume" && !l.connected);
        if consuming_down && attached > 0 && usable("consume") {
            r.degraded.push(why);
        } else {
            r.problems.push(why);
        }
    }
    r
}

/// A URL without its credentials: `amqp://user:pass@host/vhost` → `amqp://host/vhost`
/// (any `scheme://…@` URL, e.g. `redis://`).
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}{}", &url[..s + 3], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

impl AmqpTransport {
    /// Connects to every broker (retrying until `connect_timeout`) and opens the
    /// publishing channels in confirm mode.
    pub async fn connect(cfg: AmqpConfig) -> Result<Self, TransportError> {
        let declarations = Declarations::default();
        let mut publish = Vec::with_capacity(cfg.urls.len());
        for url in &cfg.urls {
            match Link::start(url, Role::Publish, &cfg, declarations.clone()).await {
                Ok(l) => publish.push(l),
                Err(e) => {
                    for l in &publish {
                        l.close().await;
                    }
                    return Err(e);
                }
            }
        }
        let trusted = cfg
            .urls
            .iter()
            .filter_map(|u| u.parse::<lapin::uri::AMQPUri>().ok())
            .map(|u| u.authority.userinfo.username)
            .chain(cfg.trusted_users.iter().cloned())
            .collect();
        Ok(Self {
            inner: Arc::new(Inner {
                trusted: Arc::new(trusted),
                cfg,
                publish,
                consume: OnceCell::new(),
                declarations,
                next_broker: AtomicUsize::new(0),
                consumers: Arc::default(),
            }),
        })
    }

    /// The topology served.
    pub fn topology(&self) -> &Topology {
        &self.inner.cfg.topology
    }

    async fn consume_links(&self) -> Result<&[Link], TransportError> {
        let links = self
            .inner
            .consume
            .get_or_try_init(|| async {
                let mut links = Vec::with_capacity(self.inner.cfg.urls.len());
                for url in &self.inner.cfg.urls {
                    links.push(
                        Link::start(url, Role::Consume, &self.inner.cfg, Declarations::default())
                            .await?,
                    );
                }
                Ok::<_, TransportError>(links)
            })
            .await?;
        Ok(links)
    }

    pub(super) async fn declare(&self, groups: &[&str]) -> Result<(), TransportError> {
        let topology = self.inner.cfg.topology.clone();
        let groups: Vec<String> = groups.iter().map(|g| (*g).to_owned()).collect();
        let dead = topology.clone();
        let kept = topology.clone();
        self.declare_with_fallback(
            "dead-letters",
            move |ch| {
                let t = dead.clone();
                Box::pin(async move { t.declare_dead_letters(&ch, false).await })
            },
            move |ch| {
                let t = kept.clone();
                Box::pin(async move { t.declare_dead_letters(&ch, true).await })
            },
        )
        .await?;
        let key = format!("topology:{}", groups.join(","));
        self.declare_with(&key, move |ch| {
            let (topology, groups) = (topology.clone(), groups.clone());
            Box::pin(async move {
                let refs: Vec<&str> = groups.iter().map(String::as_str).collect();
                topology.declare(&ch, &refs).await
            })
        })
        .await
    }

    /// Runs `declare` on a new channel of every broker now, and again on every new
    /// publishing connection (a broker that lost its definitions gets them back before
    /// anything is published to it). `key` names the declaration; registering a key again
    /// replaces it. For services with objects of their own (the router's outbox).
    pub async fn declare_with<F>(&self, key: &str, declare: F) -> Result<(), TransportError>
    where
        F: Fn(Channel) -> BoxFuture<'static, Result<(), lapin::Error>> + Send + Sync + 'static,
    {
        self.register(Declaration {
            key: key.to_owned(),
            declare: Arc::new(declare),
            fallback: None,
        })
        .await
    }

    /// Like [`declare_with`](Self::declare_with), but a broker that refuses `declare`
    /// with `PRECONDITION_FAILED` (the object exists with other arguments, e.g. declared
    /// by an older release) gets `fallback` instead, on a new channel, and a warning
    /// (`sluice_broker_declarations_kept_total`).
    pub async fn declare_with_fallback<F, G>(
        &self,
        key: &str,
        declare: F,
        fallback: G,
    ) -> Result<(), TransportError>
    where
        F: Fn(Channel) -> BoxFuture<'static, Result<(), lapin::Error>> + Send + Sync + 'static,
        G: Fn(Channel) -> BoxFuture<'static, Result<(), lapin::Error>> + Send + Sync + 'static,
    {
        self.register(Declaration {
            key: key.to_owned(),
            declare: Arc::new(declare),
            fallback: Some(Arc::new(fallback)),
        })
        .await
    }

    async fn register(&self, declaration: Declaration) -> Result<(), TransportError> {
        for l in &self.inner.publish {
            let session = l.session().await.ok_or(TransportError::Closed)?;
            declaration.run(&session.conn, l.broker()).await?;
        }
        self.inner.declarations.register(declaration);
        Ok(())
    }

    /// The next broker whose connection is up and not blocked, round robin, with its
    /// session; why none is, if none is.
    fn pick(&self) -> Result<Arc<link::Session>, PublishError> {
        let start = self.inner.next_broker.fetch_add(1, Ordering::Relaxed);
        self.pick_from(start)
    }

    /// The first usable broker from `start` on. Only [`Self::pick`] advances the round
    /// robin: a check that also did (ingest asks [`Self::blocked`] before every request)
    /// would alias with it, and with two brokers every batch would go to the same one.
    fn pick_from(&self, start: usize) -> Result<Arc<link::Session>, PublishError> {
        let links = &self.inner.publish;
        let n = links.len();
        let mut refusal = None;
        for i in 0..n {
            let l = &links[(start + i) % n];
            match (l.current(), l.refusal()) {
                (Some(s), None) => return Ok(s),
                (Some(_), Some(r)) => refusal = refusal.or(Some(PublishError::Blocked(r))),
                (None, Some(r)) => refusal = refusal.or(Some(PublishError::Unavailable(r))),
                (None, None) => {}
            }
        }
        Err(refusal.unwrap_or(PublishError::Closed))
    }

    pub(super) fn blocked(&self) -> Option<String> {
        self.pick_from(0).err().map(|e| match e {
            PublishError::Blocked(r) | PublishError::Unavailable(r) => r,
            other => other.to_string(),
        })
    }

    /// The state of every connection: publishing ones, then consuming ones (if opened).
    pub fn health(&self) -> Vec<LinkHealth> {
        let consume = self.inner.consume.get().map(Vec::as_slice).unwrap_or(&[]);
        self.inner
            .publish
            .iter()
            .chain(consume)
            .map(|l| LinkHealth {
                broker: l.broker().to_owned(),
                role: l.role().as_str(),
                connected: matches!(l.state(), LinkState::Up(_)),
                problem: l.refusal(),
            })
            .collect()
    }

    /// Ready with a connection up for each role (alarms included: a blocked broker takes
    /// no publishes) and every consumer subscribed. See [`assess`].
    pub fn readiness(&self) -> Readiness {
        let (consumers, attached) = self.inner.consumers.get();
        assess(&self.health(), consumers, attached)
    }

    /// Publishes any message with a confirm, like the batches: to `exchange` with routing
    /// key `key`. With `mandatory`, a message no queue takes is [`PublishError::Unroutable`].
    pub async fn publish_to(
        &self,
        exchange: &str,
        key: &str,
        body: &[u8],
        props: BasicProperties,
        mandatory: bool,
    ) -> Result<(), PublishError> {
        self.publish_raw(None, exchange, key, body, props, mandatory)
            .await
    }

    /// Like [`AmqpTransport::publish_to`], on a channel of `lane`'s own: when the broker
    /// closes it (an exchange that does not exist, a missing permission), only the
    /// publishes of that lane fail, and the lane's next publish opens a new channel. For
    /// destinations named by users (the router's AMQP targets, one lane per tenant).
    /// Not retried: the caller's retry schedule decides.
    pub async fn publish_in_lane(
        &self,
        lane: &str,
        exchange: &str,
        key: &str,
        body: &[u8],
        props: BasicProperties,
        mandatory: bool,
    ) -> Result<(), PublishError> {
        self.publish_raw(Some(lane), exchange, key, body, props, mandatory)
            .await
    }

    pub(super) async fn publish(&self, msg: Outgoing<'_>) -> Result<(), PublishError> {
        let topo = &self.inner.cfg.topology;
        if msg.partition >= topo.partitions {
            return Err(PublishError::Unroutable(msg.partition));
        }
        let mut headers = FieldTable::default();
        headers.insert(ShortString::from("sluice-version"), AMQPValue::LongInt(1));
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(CONTENT_TYPE.into())
            .with_message_id(msg.batch_id.hyphenated().to_string().into())
            .with_app_id(msg.producer.into())
            .with_headers(headers);
        let exchange = topo.telemetry_exchange();
        let key = Topology::routing_key(msg.partition);
        self.publish_raw(None, &exchange, &key, msg.body, props, true)
            .await
            .map_err(|e| match e {
                PublishError::Unroutable(_) => PublishError::Unroutable(msg.partition),
                other => other,
            })
    }

    /// Publishes with confirm, within the confirm timeout. On a shared channel, a failed
    /// attempt is tried once more (on a new channel, or another broker); a lane's is not.
    async fn publish_raw(
        &self,
        lane: Option<&str>,
        exchange: &str,
        key: &str,
        body: &[u8],
        props: BasicProperties,
        mandatory: bool,
    ) -> Result<(), PublishError> {
        let timeout = self.inner.cfg.confirm_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let attempts = if lane.is_some() { 1 } else { 2 };
        let mut last_err = None;
        for _ in 0..attempts {
            let session = self.pick()?;
            let confirm = tokio::time::timeout_at(deadline, async {
                let ch = session.publish_channel(lane).await?;
                ch.basic_publish(
                    exchange.into(),
                    key.into(),
                    BasicPublishOptions {
                        mandatory,
                        immediate: false,
                    },
                    body,
                    // Every message names the broker user that published it; the broker
                    // refuses a `user_id` other than the connection's own, so consumers
                    // can tell Sluice's services from direct publishers (section 6).
                    props.clone().with_user_id(session.user.as_str().into()),
                )
                .await?
                .await
            })
            .await;
            match confirm {
                Err(_) => return Err(PublishError::Timeout(timeout)),
                Ok(Ok(Confirmation::Ack(None) | Confirmation::NotRequested)) => return Ok(()),
                Ok(Ok(Confirmation::Ack(Some(_)))) => return Err(PublishError::Unroutable(0)),
                Ok(Ok(Confirmation::Nack(_))) => return Err(PublishError::Nacked),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, ?lane, "publish failed");
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.map_or(PublishError::Closed, PublishError::Connection))
    }

    pub(super) async fn dead_letter(&self, dl: DeadLetter<'_>) -> Result<(), PublishError> {
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from("x-sluice-reason"),
            AMQPValue::LongString(dl.refusal.reason.as_str().into()),
        );
        headers.insert(
            ShortString::from("x-sluice-error"),
            AMQPValue::LongString(dl.refusal.kind.as_str().into()),
        );
        headers.insert(
            ShortString::from("x-sluice-group"),
            AMQPValue::LongString(dl.group.into()),
        );
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers);
        let exchange = self.inner.cfg.topology.dead_letter_exchange();
        self.publish_raw(None, &exchange, dl.group, dl.body, props, true)
            .await
    }

    pub(super) async fn publish_receipt(&self, receipt: &Receipt) -> Result<(), PublishError> {
        let exchange = self.inner.cfg.topology.commits_exchange();
        let body = receipt.encode();
        // Not mandatory: nobody may be listening, and that is fine.
        self.publish_raw(
            None,
            &exchange,
            "",
            &body,
            BasicProperties::default(),
            false,
        )
        .await
    }

    pub(super) async fn subscribe_receipts(
        &self,
        capacity: usize,
    ) -> Result<mpsc::Receiver<Receipt>, TransportError> {
        let (tx, rx) = mpsc::channel(capacity);
        let exchange = self.inner.cfg.topology.commits_exchange();
        for link in self.consume_links().await? {
            tokio::spawn(consumer::forward_receipts(
                link.clone(),
                exchange.clone(),
                tx.clone(),
            ));
        }
        Ok(rx)
    }

    pub(super) async fn consume_group(
        &self,
        group: &str,
        prefetch: u16,
    ) -> Result<Vec<Consumer>, TransportError> {
        let topo = &self.inner.cfg.topology;
        let queues: Vec<String> = (0..topo.partitions)
            .map(|p| topo.partition_queue(group, p))
            .collect();
        self.consume_queues(&queues, prefetch).await
    }

    /// One consumer per queue of `queues` on every broker, each on its own channel with
    /// `prefetch` unsettled deliveries at most. For services with queues of their own
    /// beyond the partition groups (the router's notification outbox). The consumers
    /// follow their connection: they subscribe again after a reconnect or a cancel by the
    /// broker, and end only when cancelled or when the transport is closed.
    pub async fn consume_queues(
        &self,
        queues: &[String],
        prefetch: u16,
    ) -> Result<Vec<Consumer>, TransportError> {
        let mut out = Vec::new();
        for link in self.consume_links().await? {
            for queue in queues {
                let c = AmqpConsumer::start(
                    link.clone(),
                    queue,
                    prefetch,
                    self.inner.consumers.clone(),
                    self.inner.trusted.clone(),
                )
                .await?;
                out.push(Consumer {
                    queue: Arc::from(queue.as_str()),
                    inner: ConsumerInner::Amqp(Box::new(c)),
                });
            }
        }
        Ok(out)
    }

    pub(super) async fn backlog(&self, group: &str) -> Result<Vec<(String, u64)>, TransportError> {
        let topo = &self.inner.cfg.topology;
        let mut out = Vec::new();
        for l in &self.inner.publish {
            let Some(session) = l.current() else {
                return Err(TransportError::Unavailable(
                    l.refusal().unwrap_or_else(|| l.broker().to_owned()),
                ));
            };
            // A passive declare returns the ready count without the management plugin.
            let ch = session.conn.create_channel().await?;
            for p in 0..topo.partitions {
                let queue = topo.partition_queue(group, p);
                let q = ch
                    .queue_declare(
                        queue.clone().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await?;
                out.push((queue, u64::from(q.message_count())));
            }
            let _ = ch.close(200, "backlog".into()).await;
        }
        Ok(out)
    }

    /// Closes the connections; unsettled deliveries go back to their queues.
    pub async fn close(&self) {
        if let Some(links) = self.inner.consume.get() {
            for l in links {
                l.close().await;
            }
        }
        for l in &self.inner.publish {
            l.close().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{LinkHealth, assess, redact};

    fn link(broker: &str, role: &'static str, problem: Option<&str>) -> LinkHealth {
        LinkHealth {
            broker: broker.to_owned(),
            role,
            connected: problem.is_none(),
            problem: problem.map(str::to_owned),
        }
    }

    #[test]
    fn one_broker_down_is_not_ready() {
        let r = assess(
            &[
                link("a", "publish", Some("down")),
                link("a", "consume", Some("down")),
            ],
            4,
            0,
        );
        assert!(!r.is_ready());
        assert_eq!(r.problems.len(), 3, "{r:?}");
    }

    #[test]
    fn one_broker_of_two_down_degrades_only() {
        let links = [
            link("a", "publish", None),
            link("b", "publish", Some("b down")),
            link("a", "consume", None),
            link("b", "consume", Some("b down")),
        ];
        let r = assess(&links, 8, 4);
        assert!(r.is_ready(), "{r:?}");
        assert_eq!(r.degraded.len(), 3, "{r:?}");
    }

    #[test]
    fn every_broker_down_or_missing_consumers_on_live_brokers_is_not_ready() {
        let down = [
            link("a", "publish", Some("a down")),
            link("b", "publish", Some("b down")),
        ];
        assert_eq!(assess(&down, 0, 0).problems.len(), 2);
        // Every connection up, a consumer still missing: its queue is missing, not a broker.
        let up = [link("a", "consume", None), link("b", "consume", None)];
        assert!(!assess(&up, 8, 7).is_ready());
    }

    #[test]
    fn redacts_credentials() {
        assert_eq!(
            redact("amqp://guest:secret@rabbit:5672/%2f"),
            "amqp://rabbit:5672/%2f"
        );
        assert_eq!(redact("amqp://rabbit"), "amqp://rabbit");
    }
}
