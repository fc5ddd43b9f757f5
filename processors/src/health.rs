//! Whether the pool's sinks take its commits: what `/readyz` reports besides the broker.
//!
//! A commit that fails on a sink (the table's store, Redis) is retried with backoff while
//! its deliveries stay unacked; meanwhile the sink is *failing*, and the pool is not ready.
//! The next commit that gets through that sink clears it. Nothing is probed: the state is
//! what the commits themselves found, so it costs nothing and cannot disagree with them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

/// The failing sinks of one pool. Clone it freely.
#[derive(Clone, Debug, Default)]
pub struct SinkHealth(Arc<Mutex<BTreeMap<&'static str, Failing>>>);

#[derive(Debug)]
struct Failing {
    since: Instant,
    error: String,
    attempts: u32,
}

impl SinkHealth {
    /// A commit on `sink` failed with `error`.
    pub fn failed(&self, sink: &'static str, error: &dyn std::fmt::Display) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let f = map.entry(sink).or_insert_with(|| Failing {
            since: Instant::now(),
            error: String::new(),
            attempts: 0,
        });
        f.error = error.to_string();
        f.attempts += 1;
    }

    /// A commit on `sink` went through.
    pub fn succeeded(&self, sink: &'static str) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(sink);
    }

    /// One line per failing sink; empty when every sink takes commits.
    pub fn problems(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(sink, f)| {
                format!(
                    "sink {sink} failing for {} s ({} attempts): {}",
                    f.since.elapsed().as_secs(),
                    f.attempts,
                    f.error
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sink_fails_until_a_commit_goes_through() {
        let h = SinkHealth::default();
        assert!(h.problems().is_empty());
        h.failed("latest", &"connection refused");
        h.failed("latest", &"connection reset");
        let p = h.problems();
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("sink latest failing for"), "{p:?}");
        assert!(p[0].contains("(2 attempts): connection reset"), "{p:?}");
        h.failed("table", &"disk full");
        assert_eq!(h.problems().len(), 2);
        h.succeeded("latest");
        let p = h.problems();
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("sink table"), "{p:?}");
        h.succeeded("table");
        assert!(h.problems().is_empty());
    }
}
