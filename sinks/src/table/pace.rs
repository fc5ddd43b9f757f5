//! The I/O budget of table maintenance: an object store wrapper that spends a byte budget
//! and a request budget (two token buckets) before each call goes through.
//!
//! A compaction pass is I/O work — thousands of small-file opens and reads, a few large
//! writes, as many deletes — and on a machine it shares with ingest it takes from ingest
//! what CPU priority does not guard: the file system, the disk and memory bandwidth (the
//! pass cost ingest as much at SCHED_IDLE as at normal priority, BENCHMARKS.md). Bounding
//! its rate, as Cassandra's `compaction_throughput` and RocksDB's rate limiter bound theirs,
//! bounds all of them at once: the pass takes longer and ingest keeps its pace. Everything
//! the pass does goes through the store (reading the log, the files it merges, the merged
//! files it writes, vacuum's listing and deletes), so one wrapper paces all of it, whatever
//! delta-rs does inside.

use std::fmt;
use std::num::NonZeroU32;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result, UploadPart,
};

/// What maintenance may spend per second. A zero field is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoBudget {
    /// Bytes read plus bytes written per second.
    pub bytes_per_second: u64,
    /// Store requests (gets, puts, upload parts, deletes, lists, copies) per second.
    pub requests_per_second: u32,
}

impl IoBudget {
    /// No limit at all.
    pub const UNLIMITED: Self = Self {
        bytes_per_second: 0,
        requests_per_second: 0,
    };

    /// Whether the budget limits anything.
    pub fn is_unlimited(&self) -> bool {
        self.bytes_per_second == 0 && self.requests_per_second == 0
    }
}

impl Default for IoBudget {
    /// 32 MiB and 400 requests a second: a day of 1 s files (86 400 of them) merges in
    /// about ten minutes, and ingest on the same machine keeps its pace (BENCHMARKS.md).
    fn default() -> Self {
        Self {
            bytes_per_second: 32 * 1024 * 1024,
            requests_per_second: 400,
        }
    }
}

/// Bytes are counted in KiB cells: governor counts in `u32`.
const CELL: u64 = 1024;

/// A token bucket refilled at a rate per second, with a second's worth of burst: short
/// calls go through at once, a sustained rate is held to the budget.
struct Bucket {
    limiter: DefaultDirectRateLimiter,
    burst: NonZeroU32,
}

impl Bucket {
    /// `None` for a rate of 0 (unlimited).
    fn per_second(cells: u64) -> Option<Self> {
        let burst = NonZeroU32::new(u32::try_from(cells).unwrap_or(u32::MAX))?;
        Some(Self {
            limiter: RateLimiter::direct(Quota::per_second(burst)),
            burst,
        })
    }

    /// Waits until `cells` may go, a burst at a time (never over it, so never
    /// `InsufficientCapacity`).
    async fn spend(&self, mut cells: u64) {
        while cells > 0 {
            let step = cells.min(u64::from(self.burst.get()));
            let n = NonZeroU32::new(step as u32).unwrap_or(self.burst);
            let _ = self.limiter.until_n_ready(n).await;
            cells -= step;
        }
    }
}

/// The two buckets, and what went through them.
pub(crate) struct Pace {
    /// In KiB cells.
    bytes: Option<Bucket>,
    requests: Option<Bucket>,
    spent_bytes: AtomicU64,
    spent_requests: AtomicU64,
    waited_ns: AtomicU64,
}

/// What a paced store spent so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoSpent {
    /// Bytes read and written.
    pub bytes: u64,
    /// Requests made.
    pub requests: u64,
    /// Time callers waited on the budget.
    pub waited: Duration,
}

impl Pace {
    pub(crate) fn new(budget: IoBudget) -> Self {
        let bytes = (budget.bytes_per_second > 0)
            .then(|| Bucket::per_second((budget.bytes_per_second / CELL).max(1)))
            .flatten();
        Self {
            bytes,
            requests: Bucket::per_second(u64::from(budget.requests_per_second)),
            spent_bytes: AtomicU64::new(0),
            spent_requests: AtomicU64::new(0),
            waited_ns: AtomicU64::new(0),
        }
    }

    pub(crate) fn spent(&self) -> IoSpent {
        IoSpent {
            bytes: self.spent_bytes.load(Ordering::Relaxed),
            requests: self.spent_requests.load(Ordering::Relaxed),
            waited: Duration::from_nanos(self.waited_ns.load(Ordering::Relaxed)),
        }
    }

    /// Waits until `requests` requests may go.
    async fn request(&self, requests: u32) {
        self.spent_requests
            .fetch_add(u64::from(requests), Ordering::Relaxed);
        self.spend(&self.requests, u64::from(requests)).await;
    }

    /// Waits until `n` bytes may go.
    async fn bytes(&self, n: u64) {
        self.spent_bytes.fetch_add(n, Ordering::Relaxed);
        self.spend(&self.bytes, n.div_ceil(CELL)).await;
    }

    async fn spend(&self, bucket: &Option<Bucket>, cells: u64) {
        let Some(bucket) = bucket else {
            return;
        };
        let started = Instant::now();
        bucket.spend(cells).await;
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.waited_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

/// An object store whose calls spend a [`Pace`] first.
pub(crate) struct PacedStore {
    inner: Arc<dyn ObjectStore>,
    pace: Arc<Pace>,
}

impl PacedStore {
    pub(crate) fn new(inner: Arc<dyn ObjectStore>, pace: Arc<Pace>) -> Self {
        Self { inner, pace }
    }
}

impl fmt::Debug for PacedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PacedStore({})", self.inner)
    }
}

impl fmt::Display for PacedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PacedStore({})", self.inner)
    }
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl ObjectStore for PacedStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.pace.request(1).await;
        self.pace.bytes(payload.content_length() as u64).await;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.pace.request(1).await;
        let upload = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(PacedUpload {
            upload,
            pace: Arc::clone(&self.pace),
        }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.pace.request(1).await;
        let result = self.inner.get_opts(location, options).await?;
        // Charged before the caller reads: the range is known, the bytes are not read yet
        // (a local file is read as the caller polls).
        self.pace.bytes(result.range.end - result.range.start).await;
        Ok(result)
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.pace
            .request(u32::try_from(ranges.len().max(1)).unwrap_or(u32::MAX))
            .await;
        self.pace
            .bytes(ranges.iter().map(|r| r.end.saturating_sub(r.start)).sum())
            .await;
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let pace = Arc::clone(&self.pace);
        let paced = locations
            .then(move |location| {
                let pace = Arc::clone(&pace);
                async move {
                    pace.request(1).await;
                    location
                }
            })
            .boxed();
        self.inner.delete_stream(paced)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let prefix = prefix.cloned();
        let inner = Arc::clone(&self.inner);
        let pace = Arc::clone(&self.pace);
        async move {
            pace.request(1).await;
            inner.list(prefix.as_ref())
        }
        .into_stream()
        .flatten()
        .boxed()
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        let prefix = prefix.cloned();
        let offset = offset.clone();
        let inner = Arc::clone(&self.inner);
        let pace = Arc::clone(&self.pace);
        async move {
            pace.request(1).await;
            inner.list_with_offset(prefix.as_ref(), &offset)
        }
        .into_stream()
        .flatten()
        .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.pace.request(1).await;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.pace.request(1).await;
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.pace.request(1).await;
        self.inner.rename_opts(from, to, options).await
    }
}

/// A multipart upload whose parts spend the budget.
#[derive(Debug)]
struct PacedUpload {
    upload: Box<dyn MultipartUpload>,
    pace: Arc<Pace>,
}

impl fmt::Debug for Pace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pace")
            .field("spent", &self.spent())
            .finish()
    }
}

#[async_trait]
impl MultipartUpload for PacedUpload {
    /// Local uploads start writing when the part is made, so for them the wait follows the
    /// part; callers await each part before making more than a few, so the rate holds.
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let pace = Arc::clone(&self.pace);
        let n = data.content_length() as u64;
        let part = self.upload.put_part(data);
        Box::pin(async move {
            pace.request(1).await;
            pace.bytes(n).await;
            part.await
        })
    }

    async fn complete(&mut self) -> Result<PutResult> {
        self.pace.request(1).await;
        self.upload.complete().await
    }

    async fn abort(&mut self) -> Result<()> {
        self.upload.abort().await
    }
}

#[cfg(test)]
mod tests {
    use object_store::ObjectStoreExt;
    use object_store::memory::InMemory;

    use super::*;

    fn paced(budget: IoBudget) -> (PacedStore, Arc<Pace>) {
        let pace = Arc::new(Pace::new(budget));
        (
            PacedStore::new(Arc::new(InMemory::new()), Arc::clone(&pace)),
            pace,
        )
    }

    #[tokio::test]
    async fn requests_over_the_budget_wait() {
        let (store, pace) = paced(IoBudget {
            bytes_per_second: 0,
            requests_per_second: 20,
        });
        let started = Instant::now();
        // 20 go at once (a second's burst), the next 10 at 20 a second: ≥ 0.45 s.
        for i in 0..30 {
            store
                .put(&Path::from(format!("f{i}")), PutPayload::from_static(b"x"))
                .await
                .expect("put");
        }
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(450), "{took:?}");
        let spent = pace.spent();
        assert_eq!(spent.requests, 30);
        assert_eq!(spent.bytes, 30);
        assert!(spent.waited >= Duration::from_millis(400), "{spent:?}");
    }

    #[tokio::test]
    async fn bytes_over_the_budget_wait_and_reads_count_what_they_return() {
        let (store, pace) = paced(IoBudget {
            bytes_per_second: 64 * 1024,
            requests_per_second: 0,
        });
        let payload = PutPayload::from(vec![7u8; 64 * 1024]);
        let started = Instant::now();
        store.put(&Path::from("a"), payload).await.expect("put");
        // The burst is spent: reading the same 64 KiB waits about a second.
        let read = store.get(&Path::from("a")).await.expect("get");
        assert_eq!(read.bytes().await.expect("bytes").len(), 64 * 1024);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(900), "{took:?}");
        assert_eq!(pace.spent().bytes, 128 * 1024);
        // Ranges count what they ask for.
        store
            .get_ranges(&Path::from("a"), &[0..10, 20..30])
            .await
            .expect("ranges");
        assert_eq!(pace.spent().bytes, 128 * 1024 + 20);
        assert_eq!(pace.spent().requests, 4);
    }

    #[tokio::test]
    async fn calls_larger_than_a_second_of_budget_go_through_in_steps() {
        let (store, pace) = paced(IoBudget {
            bytes_per_second: 1024 * 1024,
            requests_per_second: 0,
        });
        let started = Instant::now();
        // 2.5 s of budget in one put: the first second's burst, then 1.5 s of waiting.
        store
            .put(
                &Path::from("big"),
                PutPayload::from(vec![0u8; 5 * 512 * 1024]),
            )
            .await
            .expect("put");
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(1400), "{took:?}");
        assert_eq!(pace.spent().requests, 1);
    }

    #[tokio::test]
    async fn an_unlimited_budget_never_waits_and_deletes_and_lists_are_counted() {
        let (store, pace) = paced(IoBudget::UNLIMITED);
        for i in 0..100 {
            store
                .put(
                    &Path::from(format!("d/{i}")),
                    PutPayload::from_static(b"xy"),
                )
                .await
                .expect("put");
        }
        let listed: Vec<_> = store.list(Some(&Path::from("d"))).collect().await;
        assert_eq!(listed.len(), 100);
        let paths =
            futures::stream::iter(listed.into_iter().map(|m| Ok(m.expect("meta").location)))
                .boxed();
        let deleted: Vec<_> = store.delete_stream(paths).collect().await;
        assert_eq!(deleted.len(), 100);
        let spent = pace.spent();
        assert_eq!(spent.requests, 100 + 1 + 100);
        assert_eq!(spent.bytes, 200);
        assert!(spent.waited < Duration::from_millis(100), "{spent:?}");
        assert_eq!(store.list(None).count().await, 0);
    }
}
