//! A supervised connection to one broker: the [`Link`] owns its connection and replaces it.
//!
//! lapin's automatic recovery was seen to stay in `Reconnecting` for minutes after a broker
//! restart (two runs in four), with every publish failing and nothing to notice it. So the
//! transport does not use it: a supervisor task per link connects, sets the connection up
//! (publishing channels in confirm mode, the registered declarations), publishes the
//! [`Session`] on a watch channel, and watches it. When the connection fails (an error
//! event, or a status other than connected), the session is dropped and a new connection
//! is made, with jittered backoff capped at [`MAX_BACKOFF`], until the link is closed. A
//! connection is never repaired in place; everything that used it (publishing channels,
//! consumers, acks of its deliveries) moves to the next session.
//!
//! Channels closed by the broker (a publish to an exchange that does not exist, a
//! precondition failure) leave the connection up; the slot holding such a channel opens a
//! new one the next time it is used. Publishes that a caller wants kept apart from the
//! shared channels (the router's AMQP targets, named by subscribers) go on a channel of
//! their own *lane*, so a broker-closed channel only ever fails the publishes of its lane.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use lapin::options::ConfirmSelectOptions;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties, Event};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::AmqpConfig;
use crate::internal_events::{
    BrokerBlocked, BrokerConnected, BrokerDisconnected, ChannelReplaced, DeclarationKept,
};
use crate::transport::TransportError;

/// Longest wait between two connection attempts; with jitter, a broker that accepts
/// connections again is reconnected to within this (plus one connection handshake).
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// First wait after a failed attempt.
const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// How often a session's connection status is checked besides its error events.
const STATUS_POLL: Duration = Duration::from_millis(250);
/// Heartbeat asked for when the URL names none: a silent peer (cut network) is noticed
/// within two intervals rather than RabbitMQ's 60 s default.
const DEFAULT_HEARTBEAT_SECS: u16 = 10;
/// TCP + AMQP handshake bound when the URL names none.
const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Most lanes a session keeps; at the bound the least recently used lane is closed (its
/// next publish opens it again).
pub(super) const MAX_LANES: usize = 1024;

/// What a link is for; separate links keep acks flowing when the broker blocks
/// publishing connections (memory or disk alarm).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Role {
    /// Publishing channels in confirm mode; declarations run on it.
    Publish,
    /// Consumers (and their acks) only.
    Consume,
}

impl Role {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Role::Publish => "publish",
            Role::Consume => "consume",
        }
    }
}

/// Declares objects on a fresh channel; run on every new publishing session so a broker
/// that lost its definitions gets them back.
pub(super) type Declare =
    Arc<dyn Fn(Channel) -> BoxFuture<'static, Result<(), lapin::Error>> + Send + Sync>;

/// A registered declaration: what to declare, and what to declare instead when the broker
/// refuses it with `PRECONDITION_FAILED` (an object of a deployment that predates an
/// argument, e.g. a dead-letter queue declared before it had a bound: a queue's arguments
/// cannot change, so the existing one is kept and the operator told to use a policy).
#[derive(Clone)]
pub(super) struct Declaration {
    pub(super) key: String,
    pub(super) declare: Declare,
    pub(super) fallback: Option<Declare>,
}

impl Declaration {
    /// Runs the declaration on channels of its own (a refusal closes its channel).
    pub(super) async fn run(&self, conn: &Connection, broker: &str) -> Result<(), lapin::Error> {
        let ch = conn.create_channel().await?;
        match (self.declare)(ch.clone()).await {
            Ok(()) => {
                let _ = ch.close(200, "declared".into()).await;
                Ok(())
            }
            Err(error) if is_precondition_failed(&error) && self.fallback.is_some() => {
                DeclarationKept {
                    broker,
                    key: &self.key,
                    error: &error,
                }
                .emit();
                let fallback = self.fallback.as_ref().expect("checked above");
                let ch = conn.create_channel().await?;
                fallback(ch.clone()).await?;
                let _ = ch.close(200, "declared".into()).await;
                Ok(())
            }
            Err(error) => Err(error),
        }
    }
}

/// The broker refused a declaration because an object exists with other arguments.
pub(super) fn is_precondition_failed(error: &lapin::Error) -> bool {
    matches!(
        error.kind(),
        lapin::ErrorKind::ProtocolError(e)
            if *e.kind() == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
    )
}

/// Declarations shared by the links of a transport, by key (registering a key twice keeps
/// the latest), run in the order first registered.
#[derive(Clone, Default)]
pub(super) struct Declarations(Arc<Mutex<Vec<Declaration>>>);

impl Declarations {
    pub(super) fn register(&self, declaration: Declaration) {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match all.iter_mut().find(|d| d.key == declaration.key) {
            Some(slot) => *slot = declaration,
            None => all.push(declaration),
        }
    }

    fn snapshot(&self) -> Vec<Declaration> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The state of a link, as seen by its users.
#[derive(Clone)]
pub(super) enum LinkState {
    /// No usable connection; the supervisor is trying. `error` is the last failure.
    Down { error: String, since: Instant },
    /// Connected.
    Up(Arc<Session>),
    /// Closed by [`Link::close`] (or the first connection never succeeded).
    Closed,
}

/// One supervised connection to one broker.
#[derive(Clone)]
pub(super) struct Link {
    shared: Arc<Shared>,
}

struct Shared {
    /// Broker URL without credentials.
    broker: String,
    role: Role,
    state: watch::Sender<LinkState>,
    stop: CancellationToken,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("broker", &self.shared.broker)
            .field("role", &self.shared.role)
            .finish()
    }
}

impl Link {
    /// Starts the supervisor and waits for the first connection: retried until
    /// `cfg.connect_timeout` (brokers may start after the services), then an error.
    pub(super) async fn start(
        url: &str,
        role: Role,
        cfg: &AmqpConfig,
        declarations: Declarations,
    ) -> Result<Self, TransportError> {
        let broker = super::redact(url);
        let uri = parse_uri(url).map_err(|reason| TransportError::InvalidUrl {
            url: broker.clone(),
            reason,
        })?;
        let (state, _) = watch::channel(LinkState::Down {
            error: "connecting".to_owned(),
            since: Instant::now(),
        });
        let shared = Arc::new(Shared {
            broker,
            role,
            state,
            stop: CancellationToken::new(),
        });
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        let sup = Supervisor {
            shared: shared.clone(),
            uri,
            props: ConnectionProperties::default().with_connection_name(
                format!("{} ({})", cfg.connection_name, role.as_str()).into(),
            ),
            publish_channels: cfg.publish_channels.max(1),
            connect_timeout: cfg.connect_timeout,
            declarations,
        };
        tokio::spawn(sup.run(first_tx));
        match first_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(TransportError::Closed),
        }
        Ok(Self { shared })
    }

    /// The broker, without credentials.
    pub(super) fn broker(&self) -> &str {
        &self.shared.broker
    }

    pub(super) fn role(&self) -> Role {
        self.shared.role
    }

    pub(super) fn state(&self) -> LinkState {
        self.shared.state.borrow().clone()
    }

    /// The current session, if connected.
    pub(super) fn current(&self) -> Option<Arc<Session>> {
        match &*self.shared.state.borrow() {
            LinkState::Up(s) => Some(s.clone()),
            _ => None,
        }
    }

    /// Waits for a session; `None` once the link is closed.
    pub(super) async fn session(&self) -> Option<Arc<Session>> {
        let mut rx = self.shared.state.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                LinkState::Up(s) => return Some(s.clone()),
                LinkState::Closed => return None,
                LinkState::Down { .. } => {}
            }
            rx.changed().await.ok()?;
        }
    }

    /// Resolves once the session of generation `generation` is no longer the current one.
    pub(super) async fn lost(&self, generation: u64) {
        let mut rx = self.shared.state.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                LinkState::Up(s) if s.generation == generation => {}
                _ => return,
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Why publishing through this link is refused now (no connection, or a broker alarm).
    pub(super) fn refusal(&self) -> Option<String> {
        match &*self.shared.state.borrow() {
            LinkState::Up(s) => s
                .blocked()
                .map(|r| format!("broker {} blocked publishing: {r}", self.shared.broker)),
            LinkState::Down { error, since } => Some(format!(
                "no connection to broker {} for {:.1?} ({error}); reconnecting",
                self.shared.broker,
                since.elapsed()
            )),
            LinkState::Closed => Some("transport closed".to_owned()),
        }
    }

    /// Stops the supervisor and closes the connection; unsettled deliveries go back to
    /// their queues.
    pub(super) async fn close(&self) {
        self.shared.stop.cancel();
        let prev = self.shared.state.send_replace(LinkState::Closed);
        if let LinkState::Up(s) = prev {
            let close = s.conn.close(200, "shutdown".into());
            if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(2), close).await {
                tracing::debug!(broker = %self.shared.broker, error = %e, "close");
            }
        }
    }
}

/// `url` as lapin's URI, with a heartbeat and a connection timeout unless it names them.
fn parse_uri(url: &str) -> Result<AMQPUri, String> {
    let mut uri: AMQPUri = url.parse()?;
    uri.query.heartbeat.get_or_insert(DEFAULT_HEARTBEAT_SECS);
    uri.query
        .connection_timeout
        .get_or_insert(DEFAULT_CONNECT_TIMEOUT_MS);
    Ok(uri)
}

/// One connection and what was set up on it.
pub(super) struct Session {
    /// Counts the sessions of a link, from 1.
    pub(super) generation: u64,
    pub(super) conn: Connection,
    blocked: Mutex<Option<String>>,
    /// Shared publishing channels (empty on a consuming link).
    slots: Vec<Slot>,
    next_slot: std::sync::atomic::AtomicUsize,
    /// Channels of callers' lanes, with their last use.
    lanes: Mutex<HashMap<String, (Arc<Slot>, Instant)>>,
    broker: String,
    /// The broker user the connection logged in as; every publish carries it as
    /// `user_id`, which the broker checks (a publisher cannot claim another user).
    pub(super) user: String,
}

impl Session {
    fn blocked(&self) -> Option<String> {
        self.blocked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_blocked(&self, reason: Option<String>) {
        *self.blocked.lock().unwrap_or_else(|p| p.into_inner()) = reason;
    }

    /// A publishing channel in confirm mode: the next shared one, or the one of `lane`.
    /// A channel the broker closed is replaced here.
    pub(super) async fn publish_channel(
        &self,
        lane: Option<&str>,
    ) -> Result<Channel, lapin::Error> {
        let slot = match lane {
            Some(lane) => self.lane(lane),
            None => {
                let n = self.slots.len().max(1);
                let i = self
                    .next_slot
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    % n;
                match self.slots.get(i) {
                    Some(s) => return s.get(&self.conn, &self.broker).await,
                    None => Arc::new(Slot::default()),
                }
            }
        };
        slot.get(&self.conn, &self.broker).await
    }

    fn lane(&self, lane: &str) -> Arc<Slot> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if let Some((slot, used)) = lanes.get_mut(lane) {
            *used = now;
            return slot.clone();
        }
        if lanes.len() >= MAX_LANES
            && let Some(oldest) = lanes
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
        {
            // Dropping the last handle closes the channel; publishes in flight hold theirs.
            lanes.remove(&oldest);
        }
        let slot = Arc::new(Slot::default());
        lanes.insert(lane.to_owned(), (slot.clone(), now));
        slot
    }
}

/// A publishing channel that is replaced when the broker closes it.
#[derive(Default)]
struct Slot {
    channel: RwLock<Option<Channel>>,
    replacing: tokio::sync::Mutex<()>,
}

impl Slot {
    fn usable(&self) -> Option<Channel> {
        self.channel
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|c| c.status().connected())
            .cloned()
    }

    async fn get(&self, conn: &Connection, broker: &str) -> Result<Channel, lapin::Error> {
        if let Some(ch) = self.usable() {
            return Ok(ch);
        }
        let _one = self.replacing.lock().await;
        if let Some(ch) = self.usable() {
            return Ok(ch);
        }
        let ch = open_confirm_channel(conn).await?;
        let replaced = self
            .channel
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .replace(ch.clone())
            .is_some();
        if replaced {
            ChannelReplaced {
                broker,
                channel: ch.id(),
            }
            .emit();
        }
        Ok(ch)
    }
}

async fn open_confirm_channel(conn: &Connection) -> Result<Channel, lapin::Error> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}

struct Supervisor {
    shared: Arc<Shared>,
    uri: AMQPUri,
    props: ConnectionProperties,
    publish_channels: usize,
    connect_timeout: Duration,
    declarations: Declarations,
}

impl Supervisor {
    async fn run(self, first: tokio::sync::oneshot::Sender<Result<(), TransportError>>) {
        let mut first = Some(first);
        let started = Instant::now();
        let mut backoff = MIN_BACKOFF;
        let mut generation = 0;
        let (broker, role) = (self.shared.broker.clone(), self.shared.role.as_str());
        loop {
            if self.shared.stop.is_cancelled() {
                break;
            }
            let error = match self.connect(generation + 1).await {
                Ok((session, events)) => {
                    generation += 1;
                    backoff = MIN_BACKOFF;
                    let session = Arc::new(session);
                    if self.shared.stop.is_cancelled() {
                        let _ = session.conn.close(200, "shutdown".into()).await;
                        break;
                    }
                    self.shared
                        .state
                        .send_replace(LinkState::Up(session.clone()));
                    BrokerConnected {
                        broker: &broker,
                        role,
                        generation,
                        reconnect: first.is_none(),
                    }
                    .emit();
                    if let Some(tx) = first.take() {
                        let _ = tx.send(Ok(()));
                    }
                    let reason = self.watch(&session, events).await;
                    let stopping = self.shared.stop.is_cancelled();
                    BrokerDisconnected {
                        broker: &broker,
                        role,
                        reason: (!stopping).then_some(reason.as_str()),
                    }
                    .emit();
                    if stopping {
                        break;
                    }
                    self.shared.state.send_replace(LinkState::Down {
                        error: reason,
                        since: Instant::now(),
                    });
                    // Close the broken connection without waiting on it.
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(1),
                            session.conn.close(320, "replaced".into()),
                        )
                        .await;
                    });
                    // Straight to a new attempt: the broker may already be back.
                    continue;
                }
                Err(e) => e,
            };
            if let Some(tx) = first.take() {
                if started.elapsed() + backoff >= self.connect_timeout {
                    self.shared.state.send_replace(LinkState::Closed);
                    let _ = tx.send(Err(TransportError::Connect {
                        url: broker.clone(),
                        reason: error,
                    }));
                    return;
                }
                tracing::info!(%broker, role, %error, retry_in = ?backoff, "broker not reachable yet");
                first = Some(tx);
            } else {
                // Copied out first: the watch's read guard must be gone before a send.
                let (since, same) = match &*self.shared.state.borrow() {
                    LinkState::Down { since, error: e } => (Some(*since), *e == error),
                    _ => (None, false),
                };
                // Said once per kind of failure (a refused declaration would otherwise
                // retry forever in silence), then at debug level each second.
                if same {
                    tracing::debug!(%broker, role, %error, retry_in = ?backoff, "reconnect attempt failed");
                } else {
                    tracing::warn!(%broker, role, %error, retry_in = ?backoff, "reconnect attempt failed; retrying");
                }
                if let Some(since) = since {
                    self.shared
                        .state
                        .send_replace(LinkState::Down { error, since });
                }
            }
            let wait = jitter(backoff);
            backoff = (backoff * 2).min(MAX_BACKOFF);
            tokio::select! {
                () = self.shared.stop.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
        }
        self.shared.state.send_replace(LinkState::Closed);
    }

    /// One connection attempt and its setup.
    async fn connect(
        &self,
        generation: u64,
    ) -> Result<(Session, BoxStream<'static, Event>), String> {
        let conn = Connection::connect_uri(self.uri.clone(), self.props.clone())
            .await
            .map_err(|e| e.to_string())?;
        let events = conn.events_listener().boxed();
        let setup = async {
            let mut slots = Vec::new();
            if self.shared.role == Role::Publish {
                for declaration in self.declarations.snapshot() {
                    declaration.run(&conn, &self.shared.broker).await?;
                }
                for _ in 0..self.publish_channels {
                    let slot = Slot::default();
                    *slot.channel.write().unwrap_or_else(|p| p.into_inner()) =
                        Some(open_confirm_channel(&conn).await?);
                    slots.push(slot);
                }
            }
            Ok::<_, lapin::Error>(slots)
        };
        match setup.await {
            Ok(slots) => Ok((
                Session {
                    generation,
                    blocked: Mutex::new(conn.status().blocked().then(String::new)),
                    conn,
                    slots,
                    next_slot: Default::default(),
                    lanes: Mutex::default(),
                    broker: self.shared.broker.clone(),
                    user: self.uri.authority.userinfo.username.clone(),
                },
                events,
            )),
            Err(e) => {
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    conn.close(200, "setup failed".into()),
                )
                .await;
                Err(format!("setting up the connection: {e}"))
            }
        }
    }

    /// Follows a session until its connection fails; returns why.
    async fn watch(&self, session: &Session, mut events: BoxStream<'static, Event>) -> String {
        let broker = &self.shared.broker;
        let mut poll = tokio::time::interval(STATUS_POLL);
        loop {
            tokio::select! {
                () = self.shared.stop.cancelled() => return "closed".to_owned(),
                ev = events.next() => match ev {
                    Some(Event::ConnectionBlocked(reason)) => {
                        BrokerBlocked { broker, reason: Some(&reason) }.emit();
                        session.set_blocked(Some(reason));
                    }
                    Some(Event::ConnectionUnblocked) => {
                        BrokerBlocked { broker, reason: None }.emit();
                        session.set_blocked(None);
                    }
                    // Channel-level errors (a publish to a missing exchange) come here
                    // too; only a connection that is no longer connected is lost.
                    Some(Event::Error(e)) if !session.conn.status().connected() => return e.to_string(),
                    Some(Event::Error(e)) => tracing::debug!(%broker, error = %e, "channel error; the connection stays"),
                    Some(_) => {}
                    None => return "connection events ended".to_owned(),
                },
                _ = poll.tick() => {
                    let status = session.conn.status();
                    if !status.connected() {
                        let state = if status.errored() {
                            "failed"
                        } else if status.closed() || status.closing() {
                            "closed"
                        } else {
                            "not connected"
                        };
                        return format!("connection {state}");
                    }
                }
            }
        }
    }
}

/// `d` scaled by a random factor in [0.5, 1): reconnecting services spread out.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(0.5..1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_gets_a_heartbeat_and_a_connect_timeout_unless_it_names_them() {
        let uri = parse_uri("amqp://u:p@h:5672/%2f").unwrap();
        assert_eq!(uri.query.heartbeat, Some(DEFAULT_HEARTBEAT_SECS));
        assert_eq!(
            uri.query.connection_timeout,
            Some(DEFAULT_CONNECT_TIMEOUT_MS)
        );
        let uri = parse_uri("amqp://h/%2f?heartbeat=3&connection_timeout=700").unwrap();
        assert_eq!(uri.query.heartbeat, Some(3));
        assert_eq!(uri.query.connection_timeout, Some(700));
        assert!(parse_uri("http://h").is_err());
    }

    #[test]
    fn jitter_stays_within_half_and_whole() {
        for _ in 0..1000 {
            let j = jitter(MAX_BACKOFF);
            assert!(j >= MAX_BACKOFF / 2 && j < MAX_BACKOFF, "{j:?}");
        }
    }

    #[test]
    fn a_declaration_registered_twice_is_kept_once() {
        let d = Declarations::default();
        let f: Declare = Arc::new(|_| Box::pin(async { Ok(()) }));
        let decl = |key: &str, fallback: Option<Declare>| Declaration {
            key: key.to_owned(),
            declare: f.clone(),
            fallback,
        };
        d.register(decl("topology", None));
        d.register(decl("outbox", None));
        d.register(decl("topology", Some(f.clone())));
        let keys: Vec<_> = d
            .snapshot()
            .into_iter()
            .map(|d| (d.key, d.fallback.is_some()))
            .collect();
        assert_eq!(
            keys,
            [("topology".to_owned(), true), ("outbox".to_owned(), false)],
            "the latest registration replaces the first in place"
        );
    }
}
