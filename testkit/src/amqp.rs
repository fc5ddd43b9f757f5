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
