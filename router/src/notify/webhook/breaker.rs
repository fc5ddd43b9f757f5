//! The circuit breaker of one webhook target: a pure state machine (the caller passes the
//! time), so its rules are tested without a clock or a network.

use std::time::{Duration, Instant};

/// Evidence about a target's health from one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Health {
    /// It answered (2xx, or a 3xx/4xx that says the request is wrong, not the target).
    Up,
    /// A retryable failure: timeout, connection error, 5xx, 429, 408.
    Down,
    /// The target was not contacted (refused by the address rules, no slot free).
    Unknown,
}

/// A change of a circuit's state worth logging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transition {
    /// Failures reached the threshold, or the trial failed.
    Opened,
    /// The target answered again.
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CircuitState {
    Closed,
    Open {
        until: Instant,
    },
    /// One trial request is in flight; it is presumed lost (its caller gave up) after
    /// `trial_until`, and then the next request becomes the trial.
    HalfOpen {
        trial_until: Instant,
    },
}

/// The circuit breaker of one target, a pure state machine: the caller passes the time.
#[derive(Debug)]
pub(super) struct Breaker {
    threshold: u32,
    open_for: Duration,
    /// The longest a trial request can take (slot wait plus request).
    trial_for: Duration,
    failures: u32,
    state: CircuitState,
}

impl Breaker {
    pub(super) fn new(threshold: u32, open_for: Duration, trial_for: Duration) -> Self {
        Breaker {
            threshold: threshold.max(1),
            open_for,
            trial_for,
            failures: 0,
            state: CircuitState::Closed,
        }
    }

    /// Whether a request may go now; if not, how long until one may.
    pub(super) fn admit(&mut self, now: Instant) -> Result<(), Duration> {
        match self.state {
            CircuitState::Closed => Ok(()),
            CircuitState::Open { until } | CircuitState::HalfOpen { trial_until: until }
                if now < until =>
            {
                Err(until - now)
            }
            CircuitState::Open { .. } | CircuitState::HalfOpen { .. } => {
                self.state = CircuitState::HalfOpen {
                    trial_until: now + self.trial_for,
                };
                Ok(())
            }
        }
    }

    /// Records the outcome of an admitted request.
    pub(super) fn record(&mut self, now: Instant, health: Health) -> Option<Transition> {
        match (health, self.state) {
            (Health::Up, CircuitState::Closed) => {
                self.failures = 0;
                None
            }
            // Any answer, even from a request admitted before the circuit opened, shows
            // the target is back.
            (Health::Up, _) => {
                self.failures = 0;
                self.state = CircuitState::Closed;
                Some(Transition::Closed)
            }
            (Health::Down, CircuitState::Closed) => {
                self.failures = self.failures.saturating_add(1);
                (self.failures >= self.threshold).then(|| self.open(now))
            }
            (Health::Down, CircuitState::HalfOpen { .. }) => Some(self.open(now)),
            // A request admitted before the circuit opened, failing late: already known.
            (Health::Down, CircuitState::Open { .. }) => None,
            // The trial did not test the target: let the next request be the trial.
            (Health::Unknown, CircuitState::HalfOpen { .. }) => {
                self.state = CircuitState::Open { until: now };
                None
            }
            (Health::Unknown, _) => None,
        }
    }

    fn open(&mut self, now: Instant) -> Transition {
        self.state = CircuitState::Open {
            until: now + self.open_for,
        };
        Transition::Opened
    }

    /// Closed with no failure counted: nothing to remember.
    pub(super) fn is_idle(&self) -> bool {
        self.state == CircuitState::Closed && self.failures == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> (Breaker, Instant) {
        let open_for = Duration::from_secs(30);
        (
            Breaker::new(3, open_for, Duration::from_secs(10)),
            Instant::now(),
        )
    }

    #[test]
    fn breaker_opens_after_consecutive_failures() {
        let (mut b, t0) = breaker();
        assert_eq!(b.admit(t0), Ok(()));
        assert_eq!(b.record(t0, Health::Down), None);
        assert_eq!(b.record(t0, Health::Down), None);
        // An answer (even a 4xx) resets the count.
        assert_eq!(b.record(t0, Health::Up), None);
        assert_eq!(b.record(t0, Health::Down), None);
        assert_eq!(b.record(t0, Health::Down), None);
        // Not contacting the target says nothing either way.
        assert_eq!(b.record(t0, Health::Unknown), None);
        assert_eq!(b.record(t0, Health::Down), Some(Transition::Opened));
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(b.admit(t1), Err(Duration::from_secs(20)));
        // A late failure of a request admitted before the opening changes nothing.
        assert_eq!(b.record(t1, Health::Down), None);
        assert_eq!(b.admit(t1), Err(Duration::from_secs(20)));
    }

    #[test]
    fn breaker_half_open_lets_one_trial_through() {
        let (mut b, t0) = breaker();
        for _ in 0..3 {
            b.record(t0, Health::Down);
        }
        let t1 = t0 + Duration::from_secs(30);
        assert_eq!(b.admit(t1), Ok(()), "the trial");
        assert_eq!(b.admit(t1), Err(Duration::from_secs(10)), "one trial only");
        // The trial fails: open again for the full period.
        let t2 = t1 + Duration::from_secs(1);
        assert_eq!(b.record(t2, Health::Down), Some(Transition::Opened));
        assert_eq!(b.admit(t2), Err(Duration::from_secs(30)));
        // The next trial succeeds: closed, everything goes through.
        let t3 = t2 + Duration::from_secs(30);
        assert_eq!(b.admit(t3), Ok(()));
        assert_eq!(b.record(t3, Health::Up), Some(Transition::Closed));
        assert_eq!(b.admit(t3), Ok(()));
        assert_eq!(b.admit(t3), Ok(()));
        assert!(b.is_idle());
    }

    #[test]
    fn breaker_replaces_a_lost_or_untested_trial() {
        let (mut b, t0) = breaker();
        for _ in 0..3 {
            b.record(t0, Health::Down);
        }
        let t1 = t0 + Duration::from_secs(30);
        assert_eq!(b.admit(t1), Ok(()));
        // The trial's caller gave up without recording: after trial_for, another trial.
        assert_eq!(
            b.admit(t1 + Duration::from_secs(9)),
            Err(Duration::from_secs(1))
        );
        let t2 = t1 + Duration::from_secs(10);
        assert_eq!(b.admit(t2), Ok(()));
        // This trial did not reach the target: the next request is the trial.
        assert_eq!(b.record(t2, Health::Unknown), None);
        assert_eq!(b.admit(t2), Ok(()));
        assert_eq!(b.admit(t2), Err(Duration::from_secs(10)));
    }
}
