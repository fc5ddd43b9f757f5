//! The storage pool over AMQP against a real RabbitMQ (`AMQP_ADDR`, default
//! `amqp://127.0.0.1:5672/%2f`; `scripts/services.sh` starts one), with a Parquet store in a
//! temporary directory and in-memory latest values: what was published is committed exactly
//! once and acked, and bad batches are dead-lettered with their reason. Each test works in
//! a namespace of its own (`sluice_testkit::Namespace`) and deletes it at the end, pass or
//! fail. Nothing here restarts the broker.
//!
//! Run with `cargo test -p sluice-processors --features broker-tests`.
#![cfg(feature = "broker-tests")]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use sluice_binding::codec;
use sluice_binding::model::{BatchBuilder, now_ns};
use sluice_binding::shutdown::CancellationToken;
use sluice_binding::tenancy::Tenants;
use sluice_binding::transport::amqp::{AmqpConfig, AmqpTransport};
use sluice_binding::transport::{Outgoing, Transport};
use sluice_processors::{PoolConfig, PoolControl, PoolReport, Sinks, run};
use sluice_sinks::latest::LatestStore;
use sluice_sinks::table::{ReadingsTable, TableConfig};
use sluice_testkit::amqp::BrokerUser;
use sluice_testkit::wait::wait_for;
use sluice_testkit::{Namespace, amqp, store};

const PARTITIONS: u32 = 2;
const GROUP: &str = "storage";

fn namespace() -> Namespace {
    Namespace::new("pt").on_broker(PARTITIONS, &[GROUP])
}

async fn sinks(root: &Path) -> Sinks {
    Sinks {
        table: ReadingsTable::open(TableConfig {
            store: root.to_str().unwrap().to_owned(),
            ..TableConfig::default()
        })
        .await
        .unwrap(),
        latest: LatestStore::memory(),
    }
}

/// `n` readings of device `dev-{seq}` for tenant acme, encoded.
fn batch(seq: u64, n: usize) -> Vec<u8> {
    batch_of("acme", seq, n)
}

/// `n` readings of device `dev-{seq}` for `tenant`, encoded.
fn batch_of(tenant: &str, seq: u64, n: usize) -> Vec<u8> {
    let mut b = BatchBuilder::new(tenant, "processors-test", seq);
    let ts = now_ns() - 1_000_000_000;
    for i in 0..n {
        b.push(
            &format!("dev-{seq}"),
            "temp",
            ts + i as i64 * 1_000,
            i as f64,
        );
    }
    codec::encode(&b.finish(now_ns())).unwrap()
}

async fn publish(t: &Transport, bodies: &[Vec<u8>]) {
    for (i, body) in bodies.iter().enumerate() {
        t.publish(Outgoing {
            partition: i as u32 % PARTITIONS,
            body,
            batch_id: uuid::Uuid::now_v7(),
            producer: "processors-test",
        })
        .await
        .expect("confirmed");
    }
}

/// (rows, distinct readings) of acme in the store.
async fn rows(root: &Path) -> (u64, u64) {
    (
        store::total(root, "acme").await,
        store::distinct(root, "acme").await,
    )
}

/// A storage pool on `t` until `stop` is cancelled.
fn start(
    t: &Transport,
    sinks: &Sinks,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<PoolReport> {
    start_with(t, sinks, None, stop)
}

/// A storage pool on `t` with the tenants file `tenants`, until `stop` is cancelled.
fn start_with(
    t: &Transport,
    sinks: &Sinks,
    tenants: Option<Tenants>,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<PoolReport> {
    let cfg = PoolConfig {
        flush_interval: Duration::from_millis(100),
        prefetch: 50,
        tenants: tenants.map(Arc::new),
        ..PoolConfig::default()
    };
    let control = PoolControl::for_pool(&cfg);
    let (t, sinks, stop) = (t.clone(), sinks.clone(), stop.clone());
    tokio::spawn(async move { run(t, sinks, cfg, control, stop).await.expect("pool ran") })
}

/// The next `n` dead letters of `ns`, waited for: (`x-sluice-error`, `x-sluice-reason`,
/// `x-sluice-group`, body).
async fn dead_letters(
    ch: &lapin::Channel,
    ns: &Namespace,
    n: usize,
) -> Vec<(String, String, String, Vec<u8>)> {
    let dlq = ns.topology().dead_letter_queue();
    let mut dead = Vec::new();
    while dead.len() < n {
        let m = wait_for("a dead letter", Duration::from_secs(30), || async {
            ch.basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
        })
        .await;
        let p = &m.delivery.properties;
        dead.push((
            amqp::header(p, "x-sluice-error"),
            amqp::header(p, "x-sluice-reason"),
            amqp::header(p, "x-sluice-group"),
            m.delivery.data.clone(),
        ));
    }
    dead
}

/// Messages ready in the partition queues, counted by the broker.
async fn ready(ns: &Namespace) -> u32 {
    let (conn, _) = amqp::connect().await;
    let mut n = 0;
    for p in 0..PARTITIONS {
        let queue = ns.topology().partition_queue(GROUP, p);
        n += amqp::ready(&conn, &queue).await.expect("declared");
    }
    let _ = conn.close(200, "done".into()).await;
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_was_published_is_committed_exactly_once_and_acked() {
    let ns = namespace();
    ns.guard(async {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        let t = Transport::Amqp(amqp::transport(&ns.topology(), "sluice-processors-test").await);
        t.declare(&[GROUP]).await.unwrap();
        // Half queued before the pool starts, half while it runs.
        let bodies: Vec<Vec<u8>> = (0..40).map(|s| batch(s, 250)).collect();
        publish(&t, &bodies[..20]).await;
        let sinks = sinks(&root).await;
        let stop = CancellationToken::new();
        let pool = start(&t, &sinks, &stop);
        publish(&t, &bodies[20..]).await;

        wait_for("10 000 rows", Duration::from_secs(60), || async {
            (rows(&root).await.0 >= 10_000).then_some(())
        })
        .await;
        stop.cancel();
        let report = pool.await.unwrap();
        t.close().await;
        assert_eq!(report.deliveries, 40);
        assert_eq!(report.rows_committed, 10_000);
        assert_eq!(report.rows_duplicate, 0);
        assert_eq!(report.dead_lettered, 0);
        assert_eq!(rows(&root).await, (10_000, 10_000), "stored once");
        let latest = sinks.latest.get("acme", "dev-39").await.unwrap();
        assert_eq!(latest[0].value, 249.0);
        // Acked: with the pool's connections closed, nothing went back to the queues.
        assert_eq!(ready(&ns).await, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_batches_are_dead_lettered_with_their_reason_and_the_good_ones_stored() {
    let ns = namespace();
    ns.guard(async {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        let t = Transport::Amqp(amqp::transport(&ns.topology(), "sluice-processors-test").await);
        t.declare(&[GROUP]).await.unwrap();
        let mut unsupported = BatchBuilder::new("acme", "processors-test", 0);
        unsupported.push("d", "m", now_ns(), 1.0);
        let mut unsupported = unsupported.finish(now_ns());
        unsupported.v = 2;
        publish(
            &t,
            &[
                b"not msgpack".to_vec(),
                codec::encode(&unsupported).unwrap(),
                batch(1, 10),
            ],
        )
        .await;
        let sinks = sinks(&root).await;
        let stop = CancellationToken::new();
        let pool = start(&t, &sinks, &stop);

        let (conn, ch) = amqp::connect().await;
        let mut dead = dead_letters(&ch, &ns, 2).await;
        dead.sort();
        assert_eq!(dead[0].0, "decode");
        assert_eq!(dead[0].3, b"not msgpack", "the original body is kept");
        assert_eq!(dead[1].0, "unsupported-version");
        assert!(dead[1].1.contains("version 2"), "{}", dead[1].1);
        assert!(dead.iter().all(|d| d.2 == GROUP));
        wait_for("the good batch", Duration::from_secs(30), || async {
            (rows(&root).await.0 == 10).then_some(())
        })
        .await;
        stop.cancel();
        let report = pool.await.unwrap();
        t.close().await;
        let _ = conn.close(200, "done".into()).await;
        assert_eq!(report.dead_lettered, 2);
        assert_eq!(report.rows_committed, 10);
        assert_eq!(ready(&ns).await, 0, "dead-lettered deliveries are acked");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_publisher_stores_its_own_tenant_only() {
    let ns = namespace();
    let gw = BrokerUser::create("pt-gw");
    ns.guard(async {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        let t = Transport::Amqp(amqp::transport(&ns.topology(), "sluice-processors-test").await);
        t.declare(&[GROUP]).await.unwrap();
        let tenants = Tenants::from_toml_str(&format!(
            "[[tenant]]\nid = \"acme\"\napi_keys = [\"k\"]\namqp_users = [\"{}\"]\n\
             [[tenant]]\nid = \"globex\"\napi_keys = [\"j\"]\n",
            gw.name()
        ))
        .unwrap();
        // The gateway publishes through the binding's transport (which sets `user_id`):
        // its own tenant, and a batch that claims another one.
        let direct = Transport::Amqp(
            AmqpTransport::connect(AmqpConfig::new(vec![gw.url()], ns.topology()))
                .await
                .expect("the gateway's user connects"),
        );
        publish(&direct, &[batch(1, 10), batch_of("globex", 2, 10)]).await;
        direct.close().await;
        // And one without `user_id`, which the broker cannot vouch for.
        let conn = Connection::connect(&gw.url(), ConnectionProperties::default())
            .await
            .unwrap();
        let raw = conn.create_channel().await.unwrap();
        raw.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        raw.basic_publish(
            ns.topology().telemetry_exchange().into(),
            "0".into(),
            BasicPublishOptions::default(),
            &batch(3, 10),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        let _ = conn.close(200, "done".into()).await;

        let sinks = sinks(&root).await;
        let stop = CancellationToken::new();
        let pool = start_with(&t, &sinks, Some(tenants), &stop);
        let (conn, ch) = amqp::connect().await;
        let mut dead = dead_letters(&ch, &ns, 2).await;
        dead.sort();
        assert!(dead.iter().all(|d| d.0 == "forbidden"), "{dead:?}");
        assert!(
            dead.iter()
                .any(|d| d.1.contains("publishes for tenant acme, not globex")),
            "{dead:?}"
        );
        assert!(dead.iter().any(|d| d.1.contains("no user_id")), "{dead:?}");
        wait_for("acme's own batch", Duration::from_secs(30), || async {
            (rows(&root).await.0 == 10).then_some(())
        })
        .await;
        stop.cancel();
        let report = pool.await.unwrap();
        t.close().await;
        let _ = conn.close(200, "done".into()).await;
        assert_eq!(report.dead_lettered, 2);
        assert_eq!(report.rows_committed, 10, "only acme's own batch is stored");
        assert_eq!(store::total(&root, "globex").await, 0);
    })
    .await;
}
