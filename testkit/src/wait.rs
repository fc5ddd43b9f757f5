//! Waiting for something to happen, instead of sleeping a guessed time: poll a condition
//! until it holds or a deadline passes. The panicking forms say what was awaited and for
//! how long, so a timeout reads as the failed expectation it is.

use std::future::Future;
use std::time::{Duration, Instant};

/// How often async conditions are polled.
pub const POLL: Duration = Duration::from_millis(50);

/// How often [`wait_until`] polls: its conditions are often costly (a query through
/// DataFusion, an HTTP probe of a child process).
pub const POLL_BLOCKING: Duration = Duration::from_millis(100);

/// Blocks until `ready()` holds; panics with `what` after `within`. For synchronous tests
/// (child processes, files on disk).
pub fn wait_until(what: &str, within: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what} (after {within:?})"
        );
        std::thread::sleep(POLL_BLOCKING);
    }
}

/// The first `Some` of `poll()`, or `None` once `within` has passed.
pub async fn until<T, F, Fut>(within: Duration, mut poll: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = poll().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The first `Some` of `poll()`; panics with `what` after `within`.
pub async fn wait_for<T, F, Fut>(what: &str, within: Duration, poll: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    until(within, poll)
        .await
        .unwrap_or_else(|| panic!("timed out waiting for {what} (after {within:?})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn until_returns_the_first_value_or_none_at_the_deadline() {
        let mut n = 0;
        let got = until(Duration::from_secs(5), || {
            n += 1;
            let v = (n == 3).then_some(n);
            async move { v }
        })
        .await;
        assert_eq!(got, Some(3));
        let never = until(Duration::from_millis(120), || async { None::<()> }).await;
        assert_eq!(never, None);
    }

    #[test]
    #[should_panic(expected = "timed out waiting for the impossible")]
    fn wait_until_names_what_never_happened() {
        wait_until("the impossible", Duration::from_millis(100), || false);
    }
}
