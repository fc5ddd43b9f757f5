//! `broker-ceiling`: the raw RabbitMQ ceiling that Sluice's end-to-end figures are compared
//! with. It moves messages of the size Sluice publishes (an encoded batch of `--readings`
//! readings) through the same kind of queues, with the same guarantees — persistent
//! messages, publisher confirms, manual acks after receipt — and does no other work:
//! publish and consume run at once, over `--partitions` queues round robin.
//!
//! It prints one JSON object: messages/s, MB/s and the equivalent readings/s.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use sluice_bench::BrokerArg;
use sluice_binding::codec;
use sluice_binding::model::{BatchBuilder, now_ns};
use tokio::sync::Semaphore;

/// Measure RabbitMQ's publish+consume ceiling for Sluice-sized messages.
#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    broker: BrokerArg,
    /// Queues, used round robin.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Readings per message (its size is that of an encoded batch of this many readings).
    #[arg(long, default_value_t = 500)]
    readings: usize,
    /// Messages to move.
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// Unconfirmed publishes in flight.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Consumer prefetch per queue.
    #[arg(long, default_value_t = 500)]
    prefetch: u16,
    /// Queue type: quorum or classic (Sluice's default is quorum).
    #[arg(long, default_value = "quorum")]
    queue_type: String,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let conn = Connection::connect(&cli.broker.amqp_url, ConnectionProperties::default())
        .await
        .context("cannot connect to the broker")?;
    let run = format!(
        "ceiling-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let queues: Vec<String> = (0..cli.partitions).map(|p| format!("{run}.{p}")).collect();
    let admin = conn.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(cli.queue_type.clone().into()),
    );
    for q in &queues {
        admin
            .queue_declare(
                q.clone().into(),
                QueueDeclareOptions::durable(),
                args.clone(),
            )
            .await?;
    }

    let mut b = BatchBuilder::new("bench", "ceiling", 0);
    let now = now_ns();
    for i in 0..cli.readings {
        b.push(
            &format!("dev-{:05}", i % 100),
            &format!("metric-{}", i % 2),
            now + i as i64,
            i as f64,
        );
    }
    let body = Arc::new(codec::encode(&b.finish(now))?);

    let consumed = Arc::new(AtomicU64::new(0));
    let mut consumers = Vec::new();
    for q in &queues {
        let ch = conn.create_channel().await?;
        ch.basic_qos(cli.prefetch, BasicQosOptions::default())
            .await?;
        let mut c = ch
            .basic_consume(
                q.clone().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let consumed = consumed.clone();
        let total = cli.messages;
        consumers.push(tokio::spawn(async move {
            while let Some(Ok(d)) = c.next().await {
                let _ = d.ack(BasicAckOptions::default()).await;
                if consumed.fetch_add(1, Ordering::Relaxed) + 1 >= total {
                    break;
                }
            }
            drop(ch);
        }));
    }

    let publisher = conn.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let window = Arc::new(Semaphore::new(cli.window));
    let start = Instant::now();
    let mut pending = Vec::new();
    for i in 0..cli.messages {
        let permit = window.clone().acquire_owned().await?;
        let confirm = publisher
            .basic_publish(
                "".into(),
                queues[(i % u64::from(cli.partitions)) as usize]
                    .clone()
                    .into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        pending.push(tokio::spawn(async move {
            let ok = confirm.await.map(|c| c.is_ack()).unwrap_or(false);
            drop(permit);
            ok
        }));
    }
    let mut nacked = 0;
    for p in pending {
        if !p.await? {
            nacked += 1;
        }
    }
    let published = start.elapsed();
    while consumed.load(Ordering::Relaxed) < cli.messages {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(600),
            "consumers stalled"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = start.elapsed();
    for c in consumers {
        c.abort();
    }
    for q in &queues {
        let _ = admin
            .queue_delete(q.clone().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "done".into()).await;

    let secs = elapsed.as_secs_f64();
    let msgs = cli.messages as f64 / secs;
    println!(
        "{}",
        serde_json::json!({
            "messages": cli.messages,
            "message_bytes": body.len(),
            "readings_per_message": cli.readings,
            "queue_type": cli.queue_type,
            "partitions": cli.partitions,
            "nacked": nacked,
            "publish_seconds": published.as_secs_f64(),
            "seconds": secs,
            "messages_per_sec": msgs,
            "mb_per_sec": msgs * body.len() as f64 / 1e6,
            "readings_per_sec": msgs * cli.readings as f64,
        })
    );
    Ok(())
}
