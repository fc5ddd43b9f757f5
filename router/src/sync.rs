//! Keeps this instance's [`Index`] equal to the subscriptions in Redis.
//!
//! A change is announced ([`Store::follow`]; a pub/sub channel in Redis) with the tenant's id; the tenant's set is
//! reloaded at once (milliseconds). Pub/sub loses messages while a connection is down, so
//! the change counter is also polled every `poll` and any change not accounted for causes a
//! full reload. Either way a change reaches every instance within a second.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::internal_events::IndexChanged;
use crate::matching::Index;
use crate::store::{Store, StoreError};

/// The index every stage of this instance reads; written only by [`run`].
pub type SharedIndex = Arc<RwLock<Index>>;

/// Loads every subscription into a new index.
pub async fn load(store: &Store) -> Result<(Index, u64), StoreError> {
    let version = store.version().await?;
    let mut index = Index::new();
    for tenant in store.tenants().await? {
        let subs = store.list(&tenant).await?;
        index.replace_tenant(&tenant, subs);
    }
    IndexChanged {
        subscriptions: index.len(),
    }
    .emit();
    Ok((index, version))
}

/// Follows changes until `shutdown`.
pub async fn run(
    store: Store,
    index: SharedIndex,
    mut version: u64,
    poll: Duration,
    shutdown: CancellationToken,
) {
    let mut known: BTreeSet<String> = store
        .tenants()
        .await
        .unwrap_or_default()
        .into_iter()
        .collect();
    'connect: while !shutdown.is_cancelled() {
        let mut changes = match store.follow().await {
            Ok(changes) => changes,
            Err(e) => {
                tracing::warn!(error = %e, "cannot follow subscription changes; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue 'connect,
                }
            }
        };
        // Changes made while we were not subscribed.
        full_reload(&store, &index, &mut version, &mut known).await;
        let mut tick = tokio::time::interval(poll);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                tenant = changes.next() => {
                    let Some(tenant) = tenant else {
                        tracing::warn!("subscription change channel closed; reconnecting");
                        continue 'connect;
                    };
                    let before = version;
                    let now = store.version().await.unwrap_or(before);
                    if reload_tenant(&store, &index, &tenant).await.is_ok() {
                        known.insert(tenant);
                        // Exactly this change: no full reload needed.
                        if now == before + 1 {
                            version = now;
                        }
                    }
                }
                _ = tick.tick() => {
                    match store.version().await {
                        Ok(v) if v != version => full_reload(&store, &index, &mut version, &mut known).await,
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "cannot poll subscription changes"),
                    }
                }
            }
        }
    }
}

/// Replaces one tenant's subscriptions in `index` with those in Redis now. The API calls it
/// after a change, so the instance that answered sees its own write at once; the others
/// follow through [`run`].
pub async fn reload_tenant(
    store: &Store,
    index: &SharedIndex,
    tenant: &str,
) -> Result<(), StoreError> {
    match store.list(tenant).await {
        Ok(subs) => {
            let mut ix = index.write().unwrap_or_else(|p| p.into_inner());
            ix.replace_tenant(tenant, subs);
            IndexChanged {
                subscriptions: ix.len(),
            }
            .emit();
            Ok(())
        }
        Err(e) => {
            tracing::warn!(error = %e, %tenant, "cannot reload subscriptions");
            Err(e)
        }
    }
}

async fn full_reload(
    store: &Store,
    index: &SharedIndex,
    version: &mut u64,
    known: &mut BTreeSet<String>,
) {
    let result = async {
        let v = store.version().await?;
        let tenants: BTreeSet<String> = store.tenants().await?.into_iter().collect();
        let mut sets = Vec::with_capacity(tenants.len());
        for t in tenants.union(known) {
            sets.push((t.clone(), store.list(t).await?));
        }
        Ok::<_, StoreError>((v, tenants, sets))
    }
    .await;
    match result {
        Ok((v, tenants, sets)) => {
            let mut ix = index.write().unwrap_or_else(|p| p.into_inner());
            for (t, subs) in sets {
                ix.replace_tenant(&t, subs);
            }
            IndexChanged {
                subscriptions: ix.len(),
            }
            .emit();
            *version = v;
            *known = tenants;
        }
        Err(e) => tracing::warn!(error = %e, "cannot reload subscriptions"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use uuid::Uuid;

    use super::*;
    use crate::testing::sub;

    fn ids(index: &SharedIndex, tenant: &str) -> Vec<Uuid> {
        let index = index.read().unwrap();
        index
            .tenant_subscriptions(tenant)
            .iter()
            .map(|s| s.id)
            .collect()
    }

    /// Waits (at most 2 s) until `tenant`'s indexed subscriptions are `want`.
    async fn until_indexed(index: &SharedIndex, tenant: &str, want: &[Uuid]) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while ids(index, tenant) != want {
            assert!(
                Instant::now() < deadline,
                "{tenant}: indexed {:?}, want {want:?}",
                ids(index, tenant)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn load_reads_every_tenant_s_subscriptions() {
        let store = Store::memory(10);
        let (a, b) = (sub("acme", &["*"], &["*"]), sub("globex", &["*"], &["*"]));
        store.create(&a).await.unwrap();
        store.create(&b).await.unwrap();
        let (index, version) = load(&store).await.unwrap();
        assert_eq!((index.len(), version), (2, 2));
        assert!(index.get("acme", a.id).is_some());
        assert!(index.get("globex", b.id).is_some());
        assert!(index.get("acme", b.id).is_none());
    }

    #[tokio::test]
    async fn changes_reach_the_index_whether_announced_or_made_before_following() {
        let store = Store::memory(10);
        let (index, version) = load(&store).await.unwrap();
        let index: SharedIndex = Arc::new(RwLock::new(index));
        // Made after the load, before `run` follows: the reload on (re)connecting has it.
        let early = sub("acme", &["*"], &["*"]);
        store.create(&early).await.unwrap();
        let shutdown = CancellationToken::new();
        // A poll far longer than the test: announcements must carry the changes.
        let task = tokio::spawn(run(
            store.clone(),
            index.clone(),
            version,
            Duration::from_secs(3600),
            shutdown.clone(),
        ));
        until_indexed(&index, "acme", &[early.id]).await;
        let (late, other) = (sub("acme", &["*"], &["*"]), sub("globex", &["*"], &["*"]));
        store.create(&late).await.unwrap();
        store.create(&other).await.unwrap();
        until_indexed(&index, "acme", &[early.id, late.id]).await;
        until_indexed(&index, "globex", &[other.id]).await;
        store.delete(&early.tenant, early.id).await.unwrap();
        until_indexed(&index, "acme", &[late.id]).await;
        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn reload_tenant_replaces_only_that_tenant_s_set() {
        let store = Store::memory(10);
        let (a, b) = (sub("acme", &["*"], &["*"]), sub("globex", &["*"], &["*"]));
        store.create(&a).await.unwrap();
        store.create(&b).await.unwrap();
        let index: SharedIndex = Arc::new(RwLock::new(Index::new()));
        reload_tenant(&store, &index, "acme").await.unwrap();
        assert_eq!(ids(&index, "acme"), [a.id]);
        assert!(ids(&index, "globex").is_empty());
        store.delete(&a.tenant, a.id).await.unwrap();
        reload_tenant(&store, &index, "acme").await.unwrap();
        assert!(index.read().unwrap().is_empty());
    }
}
