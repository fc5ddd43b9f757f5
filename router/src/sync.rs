//! Keeps this instance's [`Index`] equal to the subscriptions in Redis.
//!
//! A change is announced ([`Store::follow`]; a pub/sub channel in Redis) with the tenant's id; the tenant's set is
//! reloaded at once (milliseconds). Pub/sub loses messages while a connection is down, so
//! the change counter is also polled every `poll` and any change not accounted for causes a
//! full reload. Either way a change reaches every instance within a second.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, Guard};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::internal_events::IndexChanged;
use crate::matching::Index;
use crate::store::{Store, StoreError};

/// The index every stage of this instance reads: a snapshot, swapped whole on a change.
///
/// Readers never wait and never make a writer wait: a match holds the snapshot it loaded
/// (an `Arc`), not a lock, however long it takes, and a reload builds the next snapshot
/// beside it. A snapshot is cheap to derive: tenants' indexes are shared between
/// snapshots, and a change rebuilds only its tenant's.
#[derive(Clone, Default)]
pub struct SharedIndex {
    current: Arc<ArcSwap<Index>>,
    /// Serializes writers (the API's reload and [`run`]'s), so none loses another's change;
    /// held while deriving a snapshot, never by readers, never across an await.
    writers: Arc<Mutex<()>>,
}

impl SharedIndex {
    /// Shares `index`.
    pub fn new(index: Index) -> Self {
        Self {
            current: Arc::new(ArcSwap::from_pointee(index)),
            writers: Arc::default(),
        }
    }

    /// The current snapshot.
    pub fn load(&self) -> Guard<Arc<Index>> {
        self.current.load()
    }

    /// The current snapshot, owned (tests hold one across a change).
    #[cfg(test)]
    fn load_full_for_test(&self) -> Arc<Index> {
        self.current.load_full()
    }

    /// Derives the next snapshot with `change` and publishes it; returns its size.
    pub fn update(&self, change: impl FnOnce(&mut Index)) -> usize {
        let _writer = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = Index::clone(&self.current.load());
        change(&mut next);
        let len = next.len();
        self.current.store(Arc::new(next));
        len
    }
}

impl std::fmt::Debug for SharedIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedIndex")
            .field("subscriptions", &self.load().len())
            .finish()
    }
}

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
            let subscriptions = index.update(|ix| ix.replace_tenant(tenant, subs));
            IndexChanged { subscriptions }.emit();
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
            let subscriptions = index.update(|ix| {
                for (t, subs) in sets {
                    ix.replace_tenant(&t, subs);
                }
            });
            IndexChanged { subscriptions }.emit();
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
        index
            .load()
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
        let index: SharedIndex = SharedIndex::new(index);
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
        let index: SharedIndex = SharedIndex::new(Index::new());
        reload_tenant(&store, &index, "acme").await.unwrap();
        assert_eq!(ids(&index, "acme"), [a.id]);
        assert!(ids(&index, "globex").is_empty());
        store.delete(&a.tenant, a.id).await.unwrap();
        reload_tenant(&store, &index, "acme").await.unwrap();
        assert!(index.load().is_empty());
    }

    #[test]
    fn a_reader_s_snapshot_never_blocks_nor_sees_a_half_made_change() {
        let index = SharedIndex::new(Index::new());
        let a = sub("acme", &["*"], &["*"]);
        index.update(|ix| ix.insert(a.clone()));
        // A match in progress holds its snapshot...
        let held = index.load_full_for_test();
        // ...while a writer replaces the tenant's set (this would deadlock on one thread
        // with a lock held by the reader).
        let b = sub("acme", &["x-*"], &["*"]);
        let len = index.update(|ix| ix.replace_tenant("acme", vec![b.clone()]));
        assert_eq!(len, 1);
        assert_eq!(ids(&index, "acme"), [b.id], "new loads see the change");
        let old: Vec<Uuid> = held
            .tenant_subscriptions("acme")
            .iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(old, [a.id], "the held snapshot is unchanged");
    }
}
