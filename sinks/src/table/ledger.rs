//! The deduplication ledger: which batch ids the Delta log holds, in the recent past.
//!
//! Every commit of [`super::ReadingsTable`] lists the ids of the batches it stores in its
//! `commitInfo` ([`BATCHES_KEY`]). The log is therefore the ledger; this module keeps the
//! in-memory index of it that commits check against:
//!
//! - at open, the commits of the last [`super::TableConfig::dedup_window`] are read;
//! - every commit that loses the race for a version reads the commit that won it before
//!   trying the next one, so a writer has read every version below the one it commits;
//! - commits older than the window are forgotten, which bounds memory (about 40 bytes per
//!   batch id in the window).
//!
//! So a batch is stored at most once as long as its copies reach the table within the window
//! of each other: a redelivery after a consumer died, a producer's retry after a lost
//! confirm, two processes racing for one redelivered batch.

use std::collections::{HashMap, VecDeque};

use serde_json::Value;
use uuid::Uuid;

/// `commitInfo` key listing the batch ids of a commit (a JSON array of UUID strings).
pub const BATCHES_KEY: &str = "sluice.batches";
/// `commitInfo` key naming the writer of a commit.
pub const WRITER_KEY: &str = "sluice.writer";

/// What one log entry says about batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EntryBatches {
    /// `commitInfo.timestamp`, ms since the Unix epoch (0 when absent).
    pub(crate) timestamp_ms: i64,
    /// The batch ids it stores ([`BATCHES_KEY`]); empty for commits of other kinds.
    pub(crate) batches: Vec<Uuid>,
}

/// Reads the `commitInfo` of a log entry (newline-delimited JSON actions).
pub(crate) fn parse_entry(bytes: &[u8]) -> Result<EntryBatches, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
    for line in text.lines() {
        if !line.contains("\"commitInfo\"") {
            continue;
        }
        let action: Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
        let Some(info) = action.get("commitInfo") else {
            continue;
        };
        let timestamp_ms = info.get("timestamp").and_then(Value::as_i64).unwrap_or(0);
        let batches = match info.get(BATCHES_KEY) {
            None => Vec::new(),
            Some(Value::Array(ids)) => ids
                .iter()
                .map(|id| {
                    id.as_str()
                        .and_then(|s| Uuid::parse_str(s).ok())
                        .ok_or_else(|| format!("{BATCHES_KEY}: not a UUID: {id}"))
                })
                .collect::<Result<_, _>>()?,
            Some(other) => return Err(format!("{BATCHES_KEY}: not an array: {other}")),
        };
        return Ok(EntryBatches {
            timestamp_ms,
            batches,
        });
    }
    Ok(EntryBatches {
        timestamp_ms: 0,
        batches: Vec::new(),
    })
}

/// The in-memory index of the log's recent batch ids.
#[derive(Debug)]
pub(crate) struct Ledger {
    /// The first version not read yet: the one the next commit tries.
    pub(crate) next_version: u64,
    by_batch: HashMap<Uuid, u64>,
    /// `(version, timestamp_ms, batches)` in version order, for eviction.
    commits: VecDeque<(u64, i64, Vec<Uuid>)>,
    window_ms: i64,
}

impl Ledger {
    pub(crate) fn new(next_version: u64, window_ms: i64) -> Self {
        Self {
            next_version,
            by_batch: HashMap::new(),
            commits: VecDeque::new(),
            window_ms,
        }
    }

    /// The version that holds `batch`, if it is in the window.
    pub(crate) fn find(&self, batch: &Uuid) -> Option<u64> {
        self.by_batch.get(batch).copied()
    }

    /// Records log entry `version`. Entries are recorded in version order, except at open
    /// where older entries are loaded after the newest one: `next_version` only moves up.
    pub(crate) fn record(&mut self, version: u64, entry: EntryBatches, now_ms: i64) {
        self.next_version = self.next_version.max(version + 1);
        if entry.timestamp_ms < now_ms - self.window_ms {
            return;
        }
        for id in &entry.batches {
            self.by_batch.insert(*id, version);
        }
        let at = self.commits.partition_point(|(v, ..)| *v < version);
        self.commits
            .insert(at, (version, entry.timestamp_ms, entry.batches));
        self.evict(now_ms);
    }

    /// Forgets commits older than the window.
    pub(crate) fn evict(&mut self, now_ms: i64) {
        let cutoff = now_ms - self.window_ms;
        while let Some((version, ts, _)) = self.commits.front() {
            if *ts >= cutoff {
                break;
            }
            let version = *version;
            let (_, _, ids) = self.commits.pop_front().expect("front exists");
            for id in ids {
                // A batch stored twice (before this ledger existed) keeps its newer version.
                if self.by_batch.get(&id) == Some(&version) {
                    self.by_batch.remove(&id);
                }
            }
        }
    }

    /// Batch ids in the window.
    pub(crate) fn len(&self) -> usize {
        self.by_batch.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ts: i64, ids: &[Uuid]) -> EntryBatches {
        EntryBatches {
            timestamp_ms: ts,
            batches: ids.to_vec(),
        }
    }

    #[test]
    fn parses_the_commit_info_of_an_entry() {
        let id = Uuid::now_v7();
        let text = format!(
            "{{\"commitInfo\":{{\"timestamp\":1234,\"operation\":\"WRITE\",\"{BATCHES_KEY}\":[\"{id}\"]}}}}\n{{\"add\":{{\"path\":\"x\"}}}}"
        );
        assert_eq!(parse_entry(text.as_bytes()), Ok(entry(1234, &[id])));
        // Commits of other writers (compaction, vacuum, another engine) list no batches.
        let other = "{\"commitInfo\":{\"timestamp\":5,\"operation\":\"OPTIMIZE\"}}";
        assert_eq!(parse_entry(other.as_bytes()), Ok(entry(5, &[])));
        let bad = format!("{{\"commitInfo\":{{\"{BATCHES_KEY}\":[\"nope\"]}}}}");
        assert!(parse_entry(bad.as_bytes()).is_err());
    }

    #[test]
    fn finds_what_is_in_the_window_and_forgets_the_rest() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let mut ledger = Ledger::new(0, 1_000);
        ledger.record(0, entry(10_000, &[a]), 10_000);
        assert_eq!(ledger.find(&a), Some(0));
        assert_eq!(ledger.next_version, 1);
        ledger.record(1, entry(10_500, &[b]), 10_500);
        ledger.evict(11_200);
        assert_eq!(ledger.find(&a), None, "older than the window");
        assert_eq!(ledger.find(&b), Some(1));
        assert_eq!(ledger.len(), 1);
        // Loading at open goes newest first; older entries never move next_version back.
        let mut ledger = Ledger::new(0, 1_000);
        ledger.record(7, entry(10_000, &[b]), 10_000);
        ledger.record(6, entry(9_900, &[a]), 10_000);
        assert_eq!(ledger.next_version, 8);
        assert_eq!(ledger.find(&a), Some(6));
        // An entry already outside the window is not kept, but still counts as read.
        ledger.record(8, entry(1, &[Uuid::now_v7()]), 10_000);
        assert_eq!(ledger.next_version, 9);
        assert_eq!(ledger.len(), 2);
    }
}
