//! Hands a serialised notification to the notifier of its subscription's target.

use std::time::Duration;

use bytes::Bytes;

use super::Ctx;
use crate::internal_events::NotificationDropped;
use crate::matching::SubRef;
use crate::notify::amqp::AmqpError;
use crate::notify::webhook::WebhookError;
use crate::subscription::Target;

/// Why a delivery to any target failed.
#[derive(Debug)]
pub(super) enum DeliverError {
    Webhook(WebhookError),
    Amqp(AmqpError),
    Redis(crate::store::StoreError),
}

impl DeliverError {
    pub(super) fn is_permanent(&self) -> bool {
        match self {
            DeliverError::Webhook(e) => e.is_permanent(),
            DeliverError::Amqp(e) => e.is_permanent(),
            DeliverError::Redis(_) => false,
        }
    }

    pub(super) fn reason(&self) -> String {
        match self {
            DeliverError::Webhook(e) => e.reason(),
            DeliverError::Amqp(e) => e.to_string(),
            DeliverError::Redis(e) => e.to_string(),
        }
    }

    pub(super) fn kind(&self) -> &'static str {
        match self {
            DeliverError::Webhook(e) if e.is_permanent() => "webhook-permanent",
            DeliverError::Webhook(_) => "webhook-retries-exhausted",
            DeliverError::Amqp(AmqpError::Forbidden { .. }) => "forbidden",
            DeliverError::Amqp(_) => "amqp",
            DeliverError::Redis(_) => "redis",
        }
    }

    /// How long to wait before the next attempt, given the backoff schedule's `backoff`.
    ///
    /// A target's `Retry-After` is honoured as given. An open circuit counts as an attempt
    /// but never shortens the schedule: the breaker's next trial may be sooner than the
    /// backoff, and retrying at every trial would spend the whole attempt budget within a
    /// few `breaker_open_for` periods of an outage the budget was sized to outlast.
    pub(super) fn retry_wait(&self, backoff: Duration) -> Duration {
        match self {
            DeliverError::Webhook(WebhookError::Retryable {
                retry_after: Some(after),
                ..
            }) => *after,
            DeliverError::Webhook(WebhookError::CircuitOpen { retry_in, .. }) => {
                (*retry_in).max(backoff)
            }
            _ => backoff,
        }
    }
}

pub(super) async fn deliver(
    ctx: &Ctx,
    sub: &SubRef,
    key: &str,
    json: String,
) -> Result<(), DeliverError> {
    let tenant = sub.tenant.as_str();
    match &sub.target {
        Target::Webhook { url } => ctx
            .webhook
            .send(url, &sub.id.to_string(), key, Bytes::from(json))
            .await
            .map_err(DeliverError::Webhook),
        Target::Amqp {
            exchange,
            routing_key,
        } => ctx
            .amqp
            .send(&sub.tenant, exchange, routing_key, key, &json)
            .await
            .map_err(DeliverError::Amqp),
        Target::RedisStream { stream, maxlen } => ctx
            .store
            .xadd(tenant, stream, *maxlen, key, &json)
            .await
            .map_err(DeliverError::Redis),
        Target::Live => {
            let listeners = ctx
                .store
                .publish_live(tenant, sub.id, &json)
                .await
                .map_err(DeliverError::Redis)?;
            if listeners == 0 {
                NotificationDropped {
                    tenant,
                    reason: "no_listener",
                    events: 0,
                }
                .emit();
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn webhook(e: WebhookError) -> DeliverError {
        DeliverError::Webhook(e)
    }

    #[test]
    fn an_open_circuit_never_shortens_the_backoff_schedule() {
        let backoff = Duration::from_secs(3);
        let open = |retry_in| {
            webhook(WebhookError::CircuitOpen {
                target: "http://t:80".into(),
                retry_in,
            })
        };
        assert_eq!(
            open(Duration::from_millis(200)).retry_wait(backoff),
            backoff
        );
        assert_eq!(
            open(Duration::from_secs(20)).retry_wait(backoff),
            Duration::from_secs(20)
        );
    }

    #[test]
    fn retry_after_is_honoured_and_other_failures_back_off() {
        let backoff = Duration::from_secs(3);
        let asked = webhook(WebhookError::Retryable {
            reason: "429".into(),
            retry_after: Some(Duration::from_millis(100)),
        });
        assert_eq!(asked.retry_wait(backoff), Duration::from_millis(100));
        let plain = webhook(WebhookError::Retryable {
            reason: "503".into(),
            retry_after: None,
        });
        assert_eq!(plain.retry_wait(backoff), backoff);
    }
}
