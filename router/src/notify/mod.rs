//! Notifiers: deliver a prepared notification to its target. One module per target kind
//! ([`webhook`], [`amqp`], [`stream`], [`live`]), all behind [`Notifiers`], the one type
//! the delivery stage calls; [`backoff`] is the retry schedule they share and
//! [`NotifyError`] how a failure is classified for it.
//!
//! A new target kind is a module here, a variant of
//! [`Target`], and an arm of [`Notifiers::send`].

pub mod amqp;
pub mod backoff;
mod error;
pub mod live;
pub mod stream;
pub mod webhook;

use bytes::Bytes;

pub use error::NotifyError;

use crate::subscription::{Subscription, Target};
use amqp::AmqpNotifier;
use live::LiveNotifier;
use stream::StreamNotifier;
use webhook::WebhookNotifier;

/// Every notifier of a router instance. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Notifiers {
    /// POSTs to subscribers' URLs.
    pub webhook: WebhookNotifier,
    /// Publishes to exchanges granted to the tenant.
    pub amqp: AmqpNotifier,
    /// Appends to the tenant's Redis streams.
    pub stream: StreamNotifier,
    /// Publishes to live feeds.
    pub live: LiveNotifier,
}

impl Notifiers {
    /// Delivers `json`, the notification with idempotency key `key`, to `sub`'s target.
    pub async fn send(
        &self,
        sub: &Subscription,
        key: &str,
        json: String,
    ) -> Result<(), NotifyError> {
        let tenant = sub.tenant.as_str();
        match &sub.target {
            Target::Webhook { url } => {
                let body = Bytes::from(json);
                self.webhook
                    .send(tenant, url, &sub.id.to_string(), key, body)
                    .await?;
            }
            Target::Amqp {
                exchange,
                routing_key,
            } => {
                self.amqp
                    .send(&sub.tenant, exchange, routing_key, key, &json)
                    .await?;
            }
            Target::RedisStream { stream, .. } => {
                let maxlen = sub.target.stream_entries();
                self.stream.send(tenant, stream, maxlen, key, &json).await?;
            }
            Target::Live => self.live.send(tenant, sub.id, &json).await?,
        }
        Ok(())
    }
}
