//! The Redis-stream notifier: appends a notification to a stream under its tenant's own
//! prefix, `{ns}:notify:{tenant}:{stream}` (fields `id`, the idempotency key, and
//! `notification`, the JSON), always trimmed to about `maxlen` entries (the target's, or
//! the default: Redis memory is every tenant's).

use redis::aio::ConnectionManager;

/// Appends notifications to tenants' Redis streams. Cheap to clone (one multiplexed
/// connection, shared with the subscription store).
#[derive(Clone)]
pub struct StreamNotifier {
    conn: ConnectionManager,
    ns: String,
}

impl std::fmt::Debug for StreamNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamNotifier")
            .field("ns", &self.ns)
            .finish_non_exhaustive()
    }
}

impl StreamNotifier {
    /// A notifier writing on `conn`, with keys under the namespace `ns`.
    pub fn new(conn: ConnectionManager, ns: &str) -> Self {
        Self {
            conn,
            ns: ns.to_owned(),
        }
    }

    /// The stream key of a Redis-stream target: under the tenant's own prefix.
    pub fn stream_key(&self, tenant: &str, stream: &str) -> String {
        stream_key(&self.ns, tenant, stream)
    }

    /// Appends a notification to a tenant's stream.
    pub async fn send(
        &self,
        tenant: &str,
        stream: &str,
        maxlen: u64,
        key: &str,
        json: &str,
    ) -> Result<(), redis::RedisError> {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(self.stream_key(tenant, stream))
            .arg("MAXLEN")
            .arg("~")
            .arg(maxlen)
            .arg("*")
            .arg("id")
            .arg(key)
            .arg("notification")
            .arg(json);
        let _: String = cmd.query_async(&mut self.conn.clone()).await?;
        Ok(())
    }
}

fn stream_key(ns: &str, tenant: &str, stream: &str) -> String {
    format!("{ns}:notify:{tenant}:{stream}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_live_under_their_tenant_s_prefix() {
        assert_eq!(
            stream_key("sluice", "acme", "alerts"),
            "sluice:notify:acme:alerts"
        );
    }
}
