//! Raw broker access for tests that inspect what Sluice put on the broker (queues, dead
//! letters and their `x-sluice-*` headers), and the transport the services would open.

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use sluice_binding::Topology;
use sluice_binding::transport::amqp::{AmqpConfig, AmqpTransport};

use crate::env::amqp_addr;

/// A plain lapin connection to `AMQP_ADDR` and a channel on it; panics if the broker is
/// not there.
pub async fn connect() -> (Connection, Channel) {
    let conn = Connection::connect(&amqp_addr(), ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("RabbitMQ reachable at AMQP_ADDR ({}): {e}", amqp_addr()));
    let ch = conn.create_channel().await.expect("a channel");
    (conn, ch)
}

/// Sluice's AMQP transport on `topology` at `AMQP_ADDR`, named `name` in the management
/// UI; it waits up to 30 s for the broker.
pub async fn transport(topology: &Topology, name: &str) -> AmqpTransport {
    let mut cfg = AmqpConfig::new(vec![amqp_addr()], topology.clone());
    cfg.connect_timeout = Duration::from_secs(30);
    cfg.connection_name = name.to_owned();
    AmqpTransport::connect(cfg)
        .await
        .expect("RabbitMQ reachable at AMQP_ADDR")
}

/// The string header `key` of a message (`x-sluice-reason`, …); panics if it is absent or
/// not a string.
pub fn header(properties: &BasicProperties, key: &str) -> String {
    let headers = properties.headers().clone().unwrap_or_default();
    match headers.inner().get(key) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        other => panic!("header {key}: {other:?}"),
    }
}

/// Messages ready in `queue` (not counting unacked ones), or `None` if it does not exist.
/// On a channel of its own: the broker closes the channel of a passive declare that fails.
pub async fn ready(conn: &Connection, queue: &str) -> Option<u32> {
    let ch = conn.create_channel().await.ok()?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let q = ch
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .ok()?;
    let _ = ch.close(200, "counted".into()).await;
    Some(q.message_count())
}

/// A broker user of a test's own, made with `rabbitmqctl` (the test command's broker runs
/// on this machine) and deleted when dropped: a direct publisher, as a third party would be
/// given one.
#[derive(Debug)]
pub struct BrokerUser {
    name: String,
    password: String,
}

impl BrokerUser {
    /// A new user `{prefix}-{random}` that may write everything on vhost `/` and read
    /// and configure nothing.
    pub fn create(prefix: &str) -> Self {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let user = Self {
            name: format!("{prefix}-{}", &suffix[..8]),
            password: suffix,
        };
        rabbitmqctl(&["add_user", &user.name, &user.password]);
        rabbitmqctl(&["set_permissions", "-p", "/", &user.name, "^$", ".*", "^$"]);
        user
    }

    /// The user name (what the broker checks `user_id` against).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `AMQP_ADDR` with this user's credentials.
    pub fn url(&self) -> String {
        let addr = amqp_addr();
        let (scheme, rest) = addr.split_once("://").unwrap_or(("amqp", addr.as_str()));
        let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        format!("{scheme}://{}:{}@{host}", self.name, self.password)
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_user", &self.name])
            .output();
    }
}

fn rabbitmqctl(args: &[&str]) {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("rabbitmqctl {args:?} (RabbitMQ on this machine): {e}"));
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The broker user of `AMQP_ADDR` (`guest` when it names none): what a test that publishes
/// batches with plain lapin sets as `user_id`, as every direct publisher must.
pub fn user() -> String {
    amqp_addr()
        .parse::<lapin::uri::AMQPUri>()
        .map(|u| u.authority.userinfo.username)
        .unwrap_or_else(|_| "guest".to_owned())
}

/// Publishes `body` to `exchange` with routing key `key` on `ch` (in confirm mode) as a
/// direct publisher of the binding would: persistent, mandatory, `user_id` set to the
/// connection's user; panics unless the broker acked it.
pub async fn publish_confirmed(ch: &Channel, exchange: &str, key: &str, body: &[u8]) {
    let confirm = ch
        .basic_publish(
            exchange.into(),
            key.into(),
            lapin::options::BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            body,
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_user_id(user().into()),
        )
        .await
        .expect("published")
        .await
        .expect("confirmed");
    assert!(confirm.is_ack(), "the broker did not ack: {confirm:?}");
}
