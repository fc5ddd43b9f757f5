//! The live feed: a notification for a `live` target is published on the subscription's
//! Redis pub/sub channel, `{ns}:live:{tenant}:{id}`, which the API's
//! `GET /v1/subscriptions/{id}/live` follows as server-sent events. Nothing is kept: with
//! no listener, the notification is dropped (and counted as such).

use futures::{Stream, StreamExt};
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use uuid::Uuid;

use crate::internal_events::NotificationDropped;

/// The channels of the live feeds, and listening to one. Building it connects nowhere
/// (each listener opens its own pub/sub connection). Cheap to clone.
#[derive(Clone, Debug)]
pub struct LiveFeed {
    client: redis::Client,
    ns: String,
}

impl LiveFeed {
    /// The feeds of namespace `ns` on the Redis of `client`.
    pub fn new(client: redis::Client, ns: &str) -> Self {
        Self {
            client,
            ns: ns.to_owned(),
        }
    }

    /// The pub/sub channel of a subscription's live feed.
    pub fn channel(&self, tenant: &str, id: Uuid) -> String {
        format!("{}:live:{tenant}:{id}", self.ns)
    }

    /// The notifications published on a subscription's feed from now on, as JSON text,
    /// on a pub/sub connection of their own (closed when the stream is dropped).
    pub async fn listen(
        &self,
        tenant: &str,
        id: Uuid,
    ) -> Result<impl Stream<Item = String> + Send + use<>, redis::RedisError> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(self.channel(tenant, id)).await?;
        Ok(pubsub
            .into_on_message()
            .filter_map(|msg| async move { msg.get_payload::<String>().ok() }))
    }
}

/// Publishes notifications to live feeds. Cheap to clone.
#[derive(Clone)]
pub struct LiveNotifier {
    feed: LiveFeed,
    conn: ConnectionManager,
}

impl std::fmt::Debug for LiveNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveNotifier")
            .field("feed", &self.feed)
            .finish_non_exhaustive()
    }
}

impl LiveNotifier {
    /// Publishes on `feed`'s channels through `conn`.
    pub fn new(feed: LiveFeed, conn: ConnectionManager) -> Self {
        Self { feed, conn }
    }

    /// The feeds this notifier publishes to.
    pub fn feed(&self) -> &LiveFeed {
        &self.feed
    }

    /// Publishes a notification to the feed of `tenant`'s subscription `id`. No listener
    /// is not a failure: the notification is dropped by policy (`no_listener`).
    pub async fn send(&self, tenant: &str, id: Uuid, json: &str) -> Result<(), redis::RedisError> {
        let listeners: u64 = self
            .conn
            .clone()
            .publish(self.feed.channel(tenant, id), json)
            .await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_subscription_has_its_own_channel_under_its_tenant() {
        let feed = LiveFeed::new(redis::Client::open("redis://127.0.0.1:1").unwrap(), "ns");
        let id = Uuid::nil();
        assert_eq!(
            feed.channel("acme", id),
            "ns:live:acme:00000000-0000-0000-0000-000000000000"
        );
    }
}
