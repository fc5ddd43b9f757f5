//! The delay before a notifier's next attempt, shared by every notifier (the delivery
//! stage asks it for a failed notification's retry schedule).

use std::time::Duration;

/// The delay before retry number `attempt` (1-based; 0 counts as 1): exponential backoff
/// with "equal jitter" ("Exponential Backoff And Jitter", AWS Architecture Blog). The
/// base is `initial` doubled per attempt, capped at `max`; the delay is uniform in
/// [base/2, base], so retries spread out but never come back at once.
pub fn backoff(
    attempt: u32,
    initial: Duration,
    max: Duration,
    rng: &mut impl rand::Rng,
) -> Duration {
    let doublings = attempt.saturating_sub(1).min(31);
    let base = initial.saturating_mul(1 << doublings).min(max);
    let hi = u64::try_from(base.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.random_range(hi / 2..=hi))
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    #[test]
    fn backoff_bounds_and_cap() {
        let mut rng = StdRng::seed_from_u64(7);
        let initial = Duration::from_millis(100);
        let max = Duration::from_secs(10);
        for attempt in 0..200 {
            let base = match attempt {
                0 | 1 => initial,
                n if n < 40 => (initial * 2u32.pow((n - 1).min(31))).min(max),
                _ => max,
            };
            for _ in 0..50 {
                let d = backoff(attempt, initial, max, &mut rng);
                assert!(
                    d >= base / 2 && d <= base,
                    "attempt {attempt}: {d:?} vs {base:?}"
                );
            }
        }
        // The upper bound grows monotonically up to the cap and stays there.
        let mut last = Duration::ZERO;
        for attempt in 1..100 {
            let hi = backoff(attempt, initial, max, &mut MaxRng);
            assert!(hi >= last && hi <= max, "attempt {attempt}");
            last = hi;
        }
        assert_eq!(last, max);
        // No overflow at the extremes.
        let d = backoff(
            u32::MAX,
            Duration::from_secs(1),
            Duration::from_secs(3600),
            &mut rng,
        );
        assert!(d >= Duration::from_secs(1800) && d <= Duration::from_secs(3600));
        backoff(u32::MAX, Duration::MAX, Duration::MAX, &mut rng);
        assert_eq!(backoff(3, Duration::ZERO, max, &mut rng), Duration::ZERO);
    }

    /// An RNG that always picks the top of a range.
    struct MaxRng;

    impl rand::RngCore for MaxRng {
        fn next_u32(&mut self) -> u32 {
            u32::MAX
        }
        fn next_u64(&mut self) -> u64 {
            u64::MAX
        }
        fn fill_bytes(&mut self, dst: &mut [u8]) {
            dst.fill(0xff);
        }
    }
}
