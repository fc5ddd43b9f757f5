//! Notify latency: loadgen subscribes to its own devices through the router and measures
//! device timestamp → webhook notification received.
//!
//! This module owns the run's side of the router: the webhook receiver ([`NotifyReceiver`],
//! deduplicating at-least-once deliveries and recording the latency), the subscription API
//! client ([`RouterClient`]) and the session tying them to a run ([`NotifySession`]: listen,
//! subscribe, and unsubscribe at the end). The run ([`crate::run`]) drains and reports
//! what the receiver recorded.
//!
//! - `receiver`: `POST /notify`, deduplication by event id, the latency histogram.
//! - `subscription`: the subscription body, create and delete.

mod receiver;
mod subscription;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use receiver::{NOTIFY_PATH, Notification, NotifiedEvent, NotifyCounts, NotifyReceiver};
pub use subscription::{RouterClient, default_notify_url, subscription_body};

/// Where to listen and how to subscribe.
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    /// Address of the webhook receiver.
    pub listen: SocketAddr,
    /// URL the router posts to; `None`: [`default_notify_url`] of the bound address.
    pub notify_url: Option<String>,
    /// Base URL of the router's subscription API.
    pub router_url: String,
    /// API key of the run's tenant.
    pub api_key: String,
    /// The run's device name prefix; the subscription matches `{prefix}*`.
    pub device_prefix: String,
    /// `batch_notify.count` of the subscription.
    pub batch_count: u32,
    /// `batch_notify.duration` of the subscription.
    pub batch_wait: Duration,
}

/// The receiver listening and the run's subscription in place. End it with
/// [`close`](NotifySession::close), on every path out of the run: a subscription left
/// behind keeps the router posting to an address nobody listens on.
#[derive(Debug)]
pub struct NotifySession {
    receiver: NotifyReceiver,
    router: RouterClient,
    subscription: String,
    url: String,
    server: JoinHandle<()>,
}

impl NotifySession {
    /// Starts the receiver on `cfg.listen`, then creates the subscription. The receiver
    /// listens first because the router may post as soon as the subscription exists.
    pub async fn start(cfg: &NotifyConfig) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("cannot listen on {} (--notify-listen)", cfg.listen))?;
        let bound = listener.local_addr()?;
        let url = cfg
            .notify_url
            .clone()
            .unwrap_or_else(|| default_notify_url(bound));
        let receiver = NotifyReceiver::new();
        let app = receiver.app();
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(error = %e, "notification receiver stopped");
            }
        });
        let router = RouterClient::new(&cfg.router_url, &cfg.api_key)?;
        let body = subscription_body(&cfg.device_prefix, cfg.batch_count, cfg.batch_wait, &url);
        let subscription = match router.create(&body).await {
            Ok(id) => id,
            Err(e) => {
                server.abort();
                return Err(e);
            }
        };
        receiver.set_subscription(&subscription);
        tracing::info!(%subscription, %url, router = router.base(), "subscribed to the run's devices");
        Ok(Self {
            receiver,
            router,
            subscription,
            url,
            server,
        })
    }

    /// The receiver, for the run to read.
    pub fn receiver(&self) -> &NotifyReceiver {
        &self.receiver
    }

    /// The subscription's id.
    pub fn subscription(&self) -> &str {
        &self.subscription
    }

    /// The URL the router posts to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Deletes the subscription, then stops the receiver (deleting first lets deliveries
    /// already under way land rather than fail into retries).
    pub async fn close(self) -> anyhow::Result<()> {
        let deleted = self.router.delete(&self.subscription).await.with_context(|| {
            format!(
                "cannot delete subscription {} (DELETE {}/v1/subscriptions/{} with the API key)",
                self.subscription,
                self.router.base(),
                self.subscription
            )
        });
        self.server.abort();
        deleted
    }
}
