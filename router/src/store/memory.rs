//! The subscription store in this process's memory: the same rules as Redis (the
//! per-tenant cap, the change counter and its announcements, the expiration counter and
//! the sliding rate-limit window, the held notifications), for one instance and for tests
//! that run without services.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use sluice_binding::TenantId;
use tokio::sync::broadcast;
use uuid::Uuid;

use sluice_binding::event::Event;

use super::{Changes, Expiration, HeldBatch, StoreError, expiration, now_ms};
use crate::subscription::{RateLimit, Subscription};

/// Announcements a slow follower may fall behind by; one that falls further misses some,
/// which the sync's poll of the change counter makes up for (as with Redis pub/sub).
const CHANGES_CAPACITY: usize = 1024;

/// The subscription store in memory. Cheap to clone (the state is shared).
#[derive(Clone, Debug)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
    changes: broadcast::Sender<String>,
    max_per_tenant: usize,
}

#[derive(Debug, Default)]
struct State {
    /// Tenant → id → subscription (ids are UUID v7: oldest first).
    subs: BTreeMap<String, BTreeMap<Uuid, Subscription>>,
    /// Tenants that ever had a subscription (Redis keeps them in its set too).
    tenants: BTreeSet<String>,
    version: u64,
    /// Notifications counted against each subscription's expiration counter.
    sent: HashMap<(String, Uuid), u64>,
    /// Send times (ms) in each subscription's rate-limit window.
    window: HashMap<(String, Uuid), VecDeque<u64>>,
    /// Held `batch_notify` events and when each batch is due (ms).
    batches: HashMap<(String, Uuid), (VecDeque<Event>, u64)>,
    /// Flush locks: the holder's token.
    locks: HashMap<(String, Uuid), String>,
    /// Key of each subscription's newest `latest_notify` notification.
    latest: HashMap<(String, Uuid), String>,
}

impl MemoryStore {
    /// An empty store; a tenant may hold `max_per_tenant` subscriptions.
    pub fn new(max_per_tenant: usize) -> Self {
        Self {
            state: Arc::default(),
            changes: broadcast::channel(CHANGES_CAPACITY).0,
            max_per_tenant,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every change below is complete before the guard drops: a panic leaves no half.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bumps the change counter and announces `tenant`'s change.
    fn changed(&self, state: &mut State, tenant: &str) {
        state.version += 1;
        // No follower is not an error: nobody is listening yet.
        let _ = self.changes.send(tenant.to_owned());
    }

    pub(super) fn create(&self, sub: &Subscription) -> Result<(), StoreError> {
        let mut state = self.state();
        let tenant = sub.tenant.as_str();
        let held = state.subs.get(tenant).map_or(0, BTreeMap::len);
        if held >= self.max_per_tenant {
            return Err(StoreError::TooMany(held));
        }
        state
            .subs
            .entry(tenant.to_owned())
            .or_default()
            .insert(sub.id, sub.clone());
        state.tenants.insert(tenant.to_owned());
        self.changed(&mut state, tenant);
        Ok(())
    }

    pub(super) fn delete(&self, tenant: &TenantId, id: Uuid) -> bool {
        let mut state = self.state();
        let t = tenant.as_str();
        let removed = state
            .subs
            .get_mut(t)
            .and_then(|subs| subs.remove(&id))
            .is_some();
        if state.subs.get(t).is_some_and(BTreeMap::is_empty) {
            state.subs.remove(t);
        }
        let key = (t.to_owned(), id);
        state.sent.remove(&key);
        state.window.remove(&key);
        state.batches.remove(&key);
        state.latest.remove(&key);
        self.changed(&mut state, t);
        removed
    }

    pub(super) fn get(&self, tenant: &TenantId, id: Uuid) -> Option<Subscription> {
        self.state()
            .subs
            .get(tenant.as_str())
            .and_then(|subs| subs.get(&id))
            .cloned()
    }

    pub(super) fn list(&self, tenant: &str) -> Vec<Subscription> {
        self.state()
            .subs
            .get(tenant)
            .map(|subs| subs.values().cloned().collect())
            .unwrap_or_default()
    }

    pub(super) fn tenants(&self) -> Vec<String> {
        self.state().tenants.iter().cloned().collect()
    }

    pub(super) fn version(&self) -> u64 {
        self.state().version
    }

    pub(super) fn follow(&self) -> Changes {
        futures::stream::unfold(self.changes.subscribe(), |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(tenant) => return Some((tenant, rx)),
                    // Missed announcements: the poll of the change counter catches up.
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .boxed()
    }

    pub(super) fn count_notification(&self, tenant: &str, id: Uuid, max: u64) -> Expiration {
        let mut state = self.state();
        let n = state.sent.entry((tenant.to_owned(), id)).or_default();
        if *n >= max {
            return expiration(-1, max);
        }
        *n += 1;
        expiration(*n as i64, max)
    }

    pub(super) fn take_rate_slot(
        &self,
        tenant: &str,
        id: Uuid,
        limit: &RateLimit,
    ) -> Option<Duration> {
        let now = now_ms();
        let window_ms = limit.window.as_millis() as u64;
        let mut state = self.state();
        let sends = state.window.entry((tenant.to_owned(), id)).or_default();
        // As the Redis script: sends at or before `now - window` have left the window.
        let horizon = now.saturating_sub(window_ms);
        sends.retain(|t| *t > horizon);
        if (sends.len() as u64) < u64::from(limit.max) {
            sends.push_back(now);
            return None;
        }
        let oldest = sends.iter().copied().min().unwrap_or(now);
        let wait = (oldest + window_ms).saturating_sub(now).max(1);
        Some(Duration::from_millis(wait))
    }
}

/// Held notifications, as the Redis store keeps them.
impl MemoryStore {
    pub(super) fn hold_batch(
        &self,
        tenant: &str,
        id: Uuid,
        events: &[Event],
        due_ms: u64,
        cap: usize,
    ) -> Option<usize> {
        let mut state = self.state();
        let (held, due) = state
            .batches
            .entry((tenant.to_owned(), id))
            .or_insert_with(|| (VecDeque::new(), due_ms));
        if held.len() >= cap {
            return None;
        }
        if held.is_empty() {
            *due = due_ms;
        }
        held.extend(events.iter().cloned());
        Some(held.len())
    }

    pub(super) fn held_batch(&self, tenant: &str, id: Uuid, n: usize) -> HeldBatch {
        let state = self.state();
        match state.batches.get(&(tenant.to_owned(), id)) {
            Some((held, due)) if !held.is_empty() => HeldBatch {
                events: held.iter().take(n).cloned().collect(),
                len: held.len(),
                due_ms: *due,
            },
            _ => HeldBatch::default(),
        }
    }

    pub(super) fn release_batch(&self, tenant: &str, id: Uuid, n: usize, next_due: u64) -> usize {
        let mut state = self.state();
        let key = (tenant.to_owned(), id);
        let Some((held, due)) = state.batches.get_mut(&key) else {
            return 0;
        };
        held.drain(..n.min(held.len()));
        *due = next_due;
        let left = held.len();
        if left == 0 {
            state.batches.remove(&key);
        }
        left
    }

    pub(super) fn due_batches(&self, now_ms: u64, limit: usize) -> Vec<(String, Uuid)> {
        let state = self.state();
        let mut due: Vec<(u64, (String, Uuid))> = state
            .batches
            .iter()
            .filter(|(_, (held, due))| !held.is_empty() && *due <= now_ms)
            .map(|(k, (_, due))| (*due, k.clone()))
            .collect();
        due.sort();
        due.into_iter().take(limit).map(|(_, k)| k).collect()
    }

    pub(super) fn lock_batch(&self, tenant: &str, id: Uuid, token: &str) -> bool {
        let mut state = self.state();
        let key = (tenant.to_owned(), id);
        if state.locks.contains_key(&key) {
            return false;
        }
        state.locks.insert(key, token.to_owned());
        true
    }

    pub(super) fn unlock_batch(&self, tenant: &str, id: Uuid, token: &str) {
        let mut state = self.state();
        let key = (tenant.to_owned(), id);
        if state.locks.get(&key).is_some_and(|t| t == token) {
            state.locks.remove(&key);
        }
    }

    pub(super) fn drop_batch(&self, tenant: &str, id: Uuid) -> usize {
        self.state()
            .batches
            .remove(&(tenant.to_owned(), id))
            .map_or(0, |(held, _)| held.len())
    }

    pub(super) fn set_latest(&self, tenant: &str, id: Uuid, key: &str) {
        self.state()
            .latest
            .insert((tenant.to_owned(), id), key.to_owned());
    }

    pub(super) fn latest(&self, tenant: &str, id: Uuid) -> Option<String> {
        self.state().latest.get(&(tenant.to_owned(), id)).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::sub;

    #[tokio::test]
    async fn changes_are_counted_announced_and_capped_per_tenant() {
        let store = MemoryStore::new(2);
        let mut changes = store.follow();
        let (a, b) = (sub("acme", &["*"], &["*"]), sub("acme", &["*"], &["*"]));
        store.create(&a).unwrap();
        store.create(&b).unwrap();
        assert!(matches!(
            store.create(&sub("acme", &["*"], &["*"])),
            Err(StoreError::TooMany(2))
        ));
        store.create(&sub("globex", &["*"], &["*"])).unwrap();
        assert_eq!(store.version(), 3);
        for want in ["acme", "acme", "globex"] {
            assert_eq!(changes.next().await.as_deref(), Some(want));
        }
        assert_eq!(
            store.list("acme").iter().map(|s| s.id).collect::<Vec<_>>(),
            [a.id, b.id]
        );
        assert!(store.get(&b.tenant, a.id).is_some());
        assert!(store.get(&TenantId::new("globex").unwrap(), a.id).is_none());
        assert!(store.delete(&a.tenant, a.id));
        assert!(!store.delete(&a.tenant, a.id));
        assert_eq!(store.version(), 5, "a delete is a change, found or not");
        assert_eq!(store.tenants(), ["acme", "globex"]);
    }

    #[test]
    fn the_expiration_counter_sends_up_to_its_limit_then_expires() {
        let store = MemoryStore::new(10);
        let id = Uuid::now_v7();
        let got: Vec<_> = (0..4)
            .map(|_| store.count_notification("acme", id, 2))
            .collect();
        assert_eq!(
            got,
            [
                Expiration::Send,
                Expiration::SendLast,
                Expiration::Expired,
                Expiration::Expired
            ]
        );
    }

    #[test]
    fn the_rate_limit_lets_max_sends_per_window_through() {
        let store = MemoryStore::new(10);
        let id = Uuid::now_v7();
        let limit = RateLimit {
            max: 2,
            window: Duration::from_secs(60),
            latest_notify: false,
        };
        assert_eq!(store.take_rate_slot("acme", id, &limit), None);
        assert_eq!(store.take_rate_slot("acme", id, &limit), None);
        let wait = store.take_rate_slot("acme", id, &limit).unwrap();
        assert!(
            wait > Duration::from_secs(59) && wait <= Duration::from_secs(60),
            "{wait:?}"
        );
        // Another subscription has a window of its own.
        assert_eq!(store.take_rate_slot("acme", Uuid::now_v7(), &limit), None);
    }

    fn ev(i: u32) -> Event {
        Event {
            id: format!("b:{i}"),
            kind: sluice_binding::event::EventKind::Reading,
            device: "d".into(),
            metric: "m".into(),
            t: i64::from(i),
            value: Some(f64::from(i)),
            detail: None,
        }
    }

    #[test]
    fn a_held_batch_keeps_its_due_time_fills_to_its_cap_and_releases_from_the_front() {
        let store = MemoryStore::new(10);
        let id = Uuid::now_v7();
        assert_eq!(
            store.hold_batch("acme", id, &[ev(0), ev(1)], 1_000, 4),
            Some(2)
        );
        // Growing does not move the due time.
        assert_eq!(
            store.hold_batch("acme", id, &[ev(2), ev(3)], 9_000, 4),
            Some(4)
        );
        assert_eq!(
            store.hold_batch("acme", id, &[ev(4)], 9_000, 4),
            None,
            "at its cap"
        );
        assert_eq!(store.due_batches(999, 10), []);
        assert_eq!(store.due_batches(1_000, 10), [("acme".to_owned(), id)]);
        let held = store.held_batch("acme", id, 3);
        assert_eq!((held.len, held.due_ms), (4, 1_000));
        assert_eq!(held.events, [ev(0), ev(1), ev(2)]);
        assert_eq!(store.release_batch("acme", id, 3, 5_000), 1);
        assert_eq!(store.held_batch("acme", id, 3).events, [ev(3)]);
        assert_eq!(store.due_batches(4_999, 10), []);
        assert_eq!(store.release_batch("acme", id, 1, 0), 0);
        assert_eq!(store.held_batch("acme", id, 3), HeldBatch::default());
        // Another tenant's subscription of the same id holds nothing of it.
        assert_eq!(store.held_batch("globex", id, 3), HeldBatch::default());
    }

    #[test]
    fn one_flusher_holds_a_batch_s_lock_and_only_its_token_frees_it() {
        let store = MemoryStore::new(10);
        let id = Uuid::now_v7();
        assert!(store.lock_batch("acme", id, "one"));
        assert!(!store.lock_batch("acme", id, "two"));
        store.unlock_batch("acme", id, "two");
        assert!(
            !store.lock_batch("acme", id, "two"),
            "not freed by another token"
        );
        store.unlock_batch("acme", id, "one");
        assert!(store.lock_batch("acme", id, "two"));
    }
}
