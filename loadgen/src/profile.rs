//! Load profiles: the offered rate over time, r(t), and the open-loop send schedule it implies.
//!
//! This module owns the *shape* of the load and nothing else: [`Profile`] says how many readings
//! per second are offered at each moment of a run (as a multiple of the base `--rate`), and
//! [`Schedule`] turns that into the intended send offset of every batch. The sender loop in
//! [`run`](crate::run::run) waits for those offsets whatever happens to earlier requests, so the
//! schedule stays open-loop and latency is still taken from the intended times.
//!
//! The shapes are the IoT load examples of ETSI TR 103 527: a constant rate, a one-off burst,
//! smart meters reporting in periodic time slots, and a reconnect storm after an outage.
//!
//! # Schedule
//!
//! Every profile is piecewise constant, so the cumulative offered readings R(t) = ∫₀ᵗ r is
//! piecewise linear and batch `i` goes out at the first moment R reaches `i × batch_size`
//! (batch 0 at t = 0, as the constant-rate schedule always did). Within a constant-rate piece
//! that is the familiar `t_{i+1} = t_i + batch_size / r`; a piece of rate 0 holds no batch, so
//! the schedule jumps over it. Working from R rather than summing intervals keeps the readings
//! offered in each phase exact to within one batch, however many phases a run crosses.

use std::fmt;
use std::time::Duration;

/// Rate multiplier of the busy phases when none is given (burst, slot, catch-up).
pub const DEFAULT_FACTOR: f64 = 10.0;
/// When the burst of [`Profile::burst`] starts.
pub const DEFAULT_BURST_AT: Duration = Duration::from_secs(30);
/// How long the burst of [`Profile::burst`] lasts.
pub const DEFAULT_BURST_FOR: Duration = Duration::from_secs(60);
/// Period of [`Profile::slots`]: how often the meters report.
pub const DEFAULT_SLOT_PERIOD: Duration = Duration::from_secs(60);
/// Busy part at the start of each period of [`Profile::slots`].
pub const DEFAULT_SLOT_WIDTH: Duration = Duration::from_secs(10);
/// When the outage of [`Profile::storm`] starts.
pub const DEFAULT_OUTAGE_AT: Duration = Duration::from_secs(30);
/// How long the devices of [`Profile::storm`] stay disconnected.
pub const DEFAULT_OUTAGE_FOR: Duration = Duration::from_secs(30);

/// How the offered rate varies over a run, relative to the base rate.
///
/// Times are offsets from the start of the run. Every variant is a multiple of the base rate
/// at each moment, so the same profile scales with `--rate`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Profile {
    /// r(t) = rate throughout.
    #[default]
    Steady,
    /// rate, then rate × `factor` during [`at`, `at + length`), then rate again.
    Burst {
        /// Start of the burst.
        at: Duration,
        /// Length of the burst.
        length: Duration,
        /// Rate multiplier during the burst.
        factor: f64,
    },
    /// Smart meters reporting in time slots: in every `period`, the first `width` runs at
    /// rate × `factor` and the rest at rate.
    Slots {
        /// Length of one reporting cycle.
        period: Duration,
        /// Busy part at the start of each cycle.
        width: Duration,
        /// Rate multiplier during the busy part.
        factor: f64,
    },
    /// A reconnect storm: rate until `outage_at`; nothing for `outage_for` while the devices
    /// are disconnected; then rate × `factor` until the readings buffered during the outage
    /// (rate × `outage_for`) have been flushed; then rate again.
    ///
    /// The devices keep producing live readings while they flush, so the backlog drains at
    /// rate × (`factor` − 1) and the catch-up lasts `outage_for / (factor − 1)`: at its end
    /// exactly as many readings have been offered as a steady run would have.
    Storm {
        /// Start of the outage.
        outage_at: Duration,
        /// Length of the outage.
        outage_for: Duration,
        /// Rate multiplier while catching up; must exceed 1 to ever catch up.
        factor: f64,
    },
}

/// A profile whose parameters cannot describe a load.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {profile} profile: {reason}")]
pub struct InvalidProfile {
    /// The profile's name.
    pub profile: &'static str,
    /// What is wrong.
    pub reason: &'static str,
}

/// A piece of the profile over which the rate is constant.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Piece {
    /// Readings per second.
    rate: f64,
    /// Where the rate next changes; `None` when it never does.
    end: Option<Duration>,
}

impl Profile {
    /// A burst with the defaults: ×10 for 60 s from 30 s.
    pub fn burst() -> Self {
        Self::Burst {
            at: DEFAULT_BURST_AT,
            length: DEFAULT_BURST_FOR,
            factor: DEFAULT_FACTOR,
        }
    }

    /// Time slots with the defaults: the first 10 s of every minute at ×10.
    pub fn slots() -> Self {
        Self::Slots {
            period: DEFAULT_SLOT_PERIOD,
            width: DEFAULT_SLOT_WIDTH,
            factor: DEFAULT_FACTOR,
        }
    }

    /// A reconnect storm with the defaults: a 30 s outage from 30 s, catching up at ×10.
    pub fn storm() -> Self {
        Self::Storm {
            outage_at: DEFAULT_OUTAGE_AT,
            outage_for: DEFAULT_OUTAGE_FOR,
            factor: DEFAULT_FACTOR,
        }
    }

    /// The profile's name, as `--profile` spells it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Steady => "steady",
            Self::Burst { .. } => "burst",
            Self::Slots { .. } => "slots",
            Self::Storm { .. } => "storm",
        }
    }

    /// Checks that the parameters describe a load the schedule can follow.
    pub fn validate(&self) -> Result<(), InvalidProfile> {
        let fail = |reason| {
            Err(InvalidProfile {
                profile: self.name(),
                reason,
            })
        };
        match *self {
            Self::Steady => Ok(()),
            Self::Burst { factor, .. } | Self::Slots { factor, .. }
                if !(factor.is_finite() && factor > 0.0) =>
            {
                fail("the factor must be positive and finite")
            }
            Self::Slots { period, width, .. } if period.is_zero() || width > period => {
                fail("the slot period must be positive and at least the slot width")
            }
            Self::Storm { factor, .. } if !(factor.is_finite() && factor > 1.0) => {
                // At or below ×1 the buffered readings would never be flushed.
                fail("the factor must be finite and above 1 to catch up")
            }
            Self::Burst { .. } | Self::Slots { .. } | Self::Storm { .. } => Ok(()),
        }
    }

    /// The offered rate, in readings per second, at offset `t` of a run whose base rate is
    /// `base_rate`. Each phase includes its start and excludes its end.
    pub fn rate_at(&self, base_rate: f64, t: Duration) -> f64 {
        self.piece_at(base_rate, t).rate
    }

    /// The readings offered during [0, `t`): the integral of [`rate_at`](Self::rate_at).
    pub fn offered_by(&self, base_rate: f64, t: Duration) -> f64 {
        let mut total = 0.0;
        let mut from = Duration::ZERO;
        while from < t {
            let piece = self.piece_at(base_rate, from);
            let to = piece.end.map_or(t, |e| e.min(t));
            total += piece.rate * (to - from).as_secs_f64();
            from = to;
        }
        total
    }

    /// The intended send offsets of successive batches of `batch_size` readings at base rate
    /// `base_rate` (see the module docs). Validate the profile first: an invalid one may give
    /// a schedule that ends early.
    pub fn schedule(&self, base_rate: f64, batch_size: u32) -> Schedule {
        let first = self.piece_at(base_rate, Duration::ZERO);
        Schedule {
            profile: *self,
            base_rate,
            batch: f64::from(batch_size),
            next: 0,
            piece_start: Duration::ZERO,
            piece: first,
            offered_before_piece: 0.0,
            anchor: None,
            last: Duration::ZERO,
        }
    }

    /// The constant-rate piece that holds `t`. Its end is strictly after `t`, so walking the
    /// pieces always makes progress.
    fn piece_at(&self, base: f64, t: Duration) -> Piece {
        let piece = |rate, end| Piece { rate, end };
        match *self {
            Self::Steady => piece(base, None),
            Self::Burst { at, length, factor } => {
                let until = at.checked_add(length);
                if t < at {
                    piece(base, Some(at))
                } else if until.is_none_or(|u| t < u) {
                    piece(base * factor, until)
                } else {
                    piece(base, None)
                }
            }
            Self::Slots {
                period,
                width,
                factor,
            } => {
                // Integer nanoseconds, so a slot boundary is never missed by rounding.
                let (p, now) = (period.as_nanos(), t.as_nanos());
                if p == 0 {
                    return piece(base, None);
                }
                let start = now - now % p;
                if now - start < width.as_nanos() {
                    piece(base * factor, nanos(start + width.as_nanos()))
                } else {
                    piece(base, nanos(start + p))
                }
            }
            Self::Storm {
                outage_at,
                outage_for,
                factor,
            } => {
                let back = outage_at.checked_add(outage_for);
                let caught_up = back
                    .zip(catch_up_time(outage_for, factor))
                    .and_then(|(b, c)| b.checked_add(c));
                if t < outage_at {
                    piece(base, Some(outage_at))
                } else if back.is_none_or(|b| t < b) {
                    piece(0.0, back)
                } else if caught_up.is_none_or(|c| t < c) {
                    piece(base * factor, caught_up)
                } else {
                    piece(base, None)
                }
            }
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = humantime::format_duration;
        match *self {
            Self::Steady => write!(f, "steady"),
            Self::Burst { at, length, factor } => {
                write!(f, "burst ×{factor} from {} for {}", d(at), d(length))
            }
            Self::Slots {
                period,
                width,
                factor,
            } => write!(
                f,
                "slots ×{factor} for the first {} of every {}",
                d(width),
                d(period)
            ),
            Self::Storm {
                outage_at,
                outage_for,
                factor,
            } => write!(
                f,
                "storm: outage from {} for {}, catch-up ×{factor}",
                d(outage_at),
                d(outage_for)
            ),
        }
    }
}

/// How long a storm's catch-up at rate × `factor` lasts: the backlog of `outage_for` worth of
/// readings drains at rate × (factor − 1). `None` when it never drains.
fn catch_up_time(outage_for: Duration, factor: f64) -> Option<Duration> {
    if factor > 1.0 {
        Duration::try_from_secs_f64(outage_for.as_secs_f64() / (factor - 1.0)).ok()
    } else {
        None
    }
}

/// A nanosecond count as a `Duration`; `None` (never) beyond what a `Duration` holds.
fn nanos(n: u128) -> Option<Duration> {
    const PER_SEC: u128 = 1_000_000_000;
    let secs = u64::try_from(n / PER_SEC).ok()?;
    // The remainder is below 10⁹, so it always fits.
    Some(Duration::new(secs, (n % PER_SEC) as u32))
}

/// Successive intended send offsets of a [`Profile`]; see the module docs.
///
/// Yields `Duration`s from the start of the run, non-decreasing. Infinite for a valid profile
/// with a positive base rate; the caller stops it by duration or count.
#[derive(Clone, Debug)]
pub struct Schedule {
    profile: Profile,
    base_rate: f64,
    batch: f64,
    /// Index of the next batch.
    next: u64,
    /// Start of the current constant-rate piece.
    piece_start: Duration,
    piece: Piece,
    /// Readings offered before `piece_start` (R at the piece's start).
    offered_before_piece: f64,
    /// The first batch of the current piece: its index, its offset, and the spacing of the
    /// piece. Later batches of the piece are `offset + interval × k`, which for a steady
    /// profile is exactly the constant-rate schedule `interval × i`.
    anchor: Option<(u64, Duration, Duration)>,
    /// The offset returned last, so rounding at a piece boundary never runs time backwards.
    last: Duration,
}

impl Schedule {
    /// Moves to the piece that holds cumulative reading `target`; `false` when none does.
    fn seek(&mut self, target: f64) -> bool {
        loop {
            let rate = self.piece.rate;
            // NaN counts as zero: such a piece offers nothing and is skipped.
            let positive = rate > 0.0;
            let end_offered = self
                .piece
                .end
                .map(|e| self.offered_before_piece + rate * (e - self.piece_start).as_secs_f64());
            if positive && end_offered.is_none_or(|r| target < r) {
                return true;
            }
            let Some(end) = self.piece.end else {
                // Zero rate forever: nothing more is ever offered.
                return false;
            };
            if positive {
                self.offered_before_piece = end_offered.unwrap_or(self.offered_before_piece);
            }
            self.piece_start = end;
            self.piece = self.profile.piece_at(self.base_rate, end);
            self.anchor = None;
        }
    }
}

impl Iterator for Schedule {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let target = self.next as f64 * self.batch;
        if !self.seek(target) {
            return None;
        }
        let rate = self.piece.rate;
        let (first, offset, interval) = *self.anchor.get_or_insert_with(|| {
            let into = Duration::try_from_secs_f64((target - self.offered_before_piece) / rate)
                .unwrap_or(Duration::ZERO);
            let interval = Duration::try_from_secs_f64(self.batch / rate).unwrap_or(Duration::ZERO);
            (self.next, self.piece_start + into, interval)
        });
        let t = (offset + interval.mul_f64((self.next - first) as f64)).max(self.last);
        self.next += 1;
        self.last = t;
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: f64 = 1_000.0;
    const BATCH: u32 = 100;

    fn s(secs: f64) -> Duration {
        Duration::from_secs_f64(secs)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Readings offered by the batches scheduled in [from, to).
    fn scheduled(profile: &Profile, from: f64, to: f64) -> f64 {
        let (from, to) = (s(from), s(to));
        profile
            .schedule(RATE, BATCH)
            .take_while(|t| *t < to)
            .filter(|t| *t >= from)
            .count() as f64
            * f64::from(BATCH)
    }

    fn assert_within_a_batch(got: f64, want: f64, what: &str) {
        assert!(
            (got - want).abs() <= f64::from(BATCH),
            "{what}: {got} readings, want {want} ± {BATCH}"
        );
    }

    #[test]
    fn steady_rate_is_constant() {
        for t in [0, 1, 30_000, 10_000_000] {
            assert_eq!(Profile::Steady.rate_at(RATE, ms(t)), RATE);
        }
        assert_eq!(Profile::default(), Profile::Steady);
    }

    #[test]
    fn burst_rate_at_its_boundaries() {
        let p = Profile::burst();
        assert_eq!(p.rate_at(RATE, Duration::ZERO), RATE);
        assert_eq!(p.rate_at(RATE, ms(29_999)), RATE);
        assert_eq!(p.rate_at(RATE, ms(30_000)), 10.0 * RATE);
        assert_eq!(p.rate_at(RATE, ms(89_999)), 10.0 * RATE);
        assert_eq!(p.rate_at(RATE, ms(90_000)), RATE);
        assert_eq!(p.rate_at(RATE, ms(1_000_000)), RATE);
    }

    #[test]
    fn slots_rate_at_its_boundaries() {
        let p = Profile::slots();
        for cycle in [0, 1, 7, 1_000] {
            let base = cycle * 60_000;
            assert_eq!(p.rate_at(RATE, ms(base)), 10.0 * RATE, "cycle {cycle}");
            assert_eq!(p.rate_at(RATE, ms(base + 9_999)), 10.0 * RATE);
            assert_eq!(p.rate_at(RATE, ms(base + 10_000)), RATE);
            assert_eq!(p.rate_at(RATE, ms(base + 59_999)), RATE);
        }
        // A slot as wide as the period is busy all the time, a zero-width one never.
        let full = Profile::Slots {
            period: ms(100),
            width: ms(100),
            factor: 2.0,
        };
        assert_eq!(full.rate_at(RATE, ms(99)), 2.0 * RATE);
        assert_eq!(full.rate_at(RATE, ms(100)), 2.0 * RATE);
        let none = Profile::Slots {
            period: ms(100),
            width: Duration::ZERO,
            factor: 2.0,
        };
        assert_eq!(none.rate_at(RATE, ms(0)), RATE);
    }

    #[test]
    fn storm_rate_at_its_boundaries() {
        let p = Profile::storm();
        // Catch-up: 30 s of backlog drained at ×(10 − 1) takes 30/9 s.
        let caught_up = s(60.0 + 30.0 / 9.0);
        assert_eq!(p.rate_at(RATE, ms(29_999)), RATE);
        assert_eq!(p.rate_at(RATE, ms(30_000)), 0.0);
        assert_eq!(p.rate_at(RATE, ms(59_999)), 0.0);
        assert_eq!(p.rate_at(RATE, ms(60_000)), 10.0 * RATE);
        assert_eq!(
            p.rate_at(RATE, caught_up - Duration::from_nanos(1)),
            10.0 * RATE
        );
        assert_eq!(p.rate_at(RATE, caught_up), RATE);
        assert_eq!(p.rate_at(RATE, ms(1_000_000)), RATE);
    }

    #[test]
    fn steady_schedule_is_the_constant_interval_schedule() {
        // Rates whose interval does not round to whole nanoseconds included.
        for (rate, batch) in [(50_000.0, 500), (3.0, 1), (7_000.0, 3), (1e6, 1)] {
            let interval = Duration::from_secs_f64(f64::from(batch) / rate);
            let got: Vec<Duration> = Profile::Steady.schedule(rate, batch).take(10_000).collect();
            for (i, t) in got.iter().enumerate() {
                assert_eq!(*t, interval.mul_f64(i as f64), "rate {rate} batch {i}");
            }
        }
    }

    #[test]
    fn burst_schedule_offers_each_phase_its_readings() {
        let p = Profile::burst();
        assert_within_a_batch(scheduled(&p, 0.0, 30.0), 1_000.0 * 30.0, "before");
        assert_within_a_batch(scheduled(&p, 30.0, 90.0), 10_000.0 * 60.0, "burst");
        assert_within_a_batch(scheduled(&p, 90.0, 120.0), 1_000.0 * 30.0, "after");
        assert_within_a_batch(
            scheduled(&p, 0.0, 120.0),
            1_000.0 * 30.0 + 10_000.0 * 60.0 + 1_000.0 * 30.0,
            "whole run",
        );
    }

    #[test]
    fn slots_schedule_offers_each_slot_its_readings() {
        let p = Profile::slots();
        for cycle in 0..3 {
            let base = 60.0 * f64::from(cycle);
            assert_within_a_batch(scheduled(&p, base, base + 10.0), 100_000.0, "slot");
            assert_within_a_batch(scheduled(&p, base + 10.0, base + 60.0), 50_000.0, "rest");
        }
        assert_within_a_batch(scheduled(&p, 0.0, 180.0), 3.0 * 150_000.0, "three cycles");
    }

    #[test]
    fn storm_schedule_catches_up_exactly_the_missed_readings() {
        let p = Profile::storm();
        let caught_up = 60.0 + 30.0 / 9.0;
        assert_within_a_batch(scheduled(&p, 0.0, 30.0), 30_000.0, "before the outage");
        assert_eq!(scheduled(&p, 30.0, 60.0), 0.0, "nothing during the outage");
        // The catch-up offers the live readings plus the 30 000 missed ones...
        assert_within_a_batch(
            scheduled(&p, 60.0, caught_up),
            1_000.0 * (caught_up - 60.0) + 30_000.0,
            "catch-up",
        );
        // ...so once caught up the run has offered what a steady run would have.
        assert_within_a_batch(scheduled(&p, 0.0, caught_up), 1_000.0 * caught_up, "total");
        assert_within_a_batch(scheduled(&p, 0.0, 120.0), 120_000.0, "whole run");
        // After the catch-up the schedule is steady again.
        let after: Vec<Duration> = p
            .schedule(RATE, BATCH)
            .skip_while(|t| *t < s(70.0))
            .take(3)
            .collect();
        assert_eq!(after[1] - after[0], ms(100));
        assert_eq!(after[2] - after[1], ms(100));
    }

    #[test]
    fn schedules_are_monotone_and_match_the_offered_integral() {
        let odd_slots = Profile::Slots {
            period: Duration::from_millis(1_700),
            width: Duration::from_millis(300),
            factor: 3.5,
        };
        let from_zero = Profile::Storm {
            outage_at: Duration::ZERO,
            outage_for: Duration::from_secs(2),
            factor: 4.0,
        };
        for p in [
            Profile::Steady,
            Profile::burst(),
            Profile::slots(),
            Profile::storm(),
            odd_slots,
            from_zero,
        ] {
            let horizon = s(200.0);
            let times: Vec<Duration> = p
                .schedule(RATE, BATCH)
                .take_while(|t| *t < horizon)
                .collect();
            assert!(times.windows(2).all(|w| w[0] <= w[1]), "{p}");
            assert_within_a_batch(
                times.len() as f64 * f64::from(BATCH),
                p.offered_by(RATE, horizon),
                &p.to_string(),
            );
        }
    }

    #[test]
    fn offered_by_integrates_the_rate() {
        assert_eq!(Profile::Steady.offered_by(RATE, s(12.5)), 12_500.0);
        let burst = Profile::burst();
        assert!((burst.offered_by(RATE, s(120.0)) - 660_000.0).abs() < 1e-6);
        let storm = Profile::storm();
        assert!((storm.offered_by(RATE, s(60.0)) - 30_000.0).abs() < 1e-6);
        assert!((storm.offered_by(RATE, s(100.0)) - 100_000.0).abs() < 1e-3);
    }

    #[test]
    fn validation_rejects_unusable_parameters() {
        for ok in [
            Profile::Steady,
            Profile::burst(),
            Profile::slots(),
            Profile::storm(),
        ] {
            assert_eq!(ok.validate(), Ok(()), "{ok}");
        }
        let bad = [
            Profile::Burst {
                at: ms(1),
                length: ms(1),
                factor: 0.0,
            },
            Profile::Slots {
                period: ms(1),
                width: ms(1),
                factor: f64::NAN,
            },
            Profile::Slots {
                period: Duration::ZERO,
                width: Duration::ZERO,
                factor: 2.0,
            },
            Profile::Slots {
                period: ms(10),
                width: ms(11),
                factor: 2.0,
            },
            Profile::Storm {
                outage_at: ms(1),
                outage_for: ms(1),
                factor: 1.0,
            },
            Profile::Storm {
                outage_at: ms(1),
                outage_for: ms(1),
                factor: f64::INFINITY,
            },
        ];
        for p in bad {
            assert!(p.validate().is_err(), "{p:?} accepted");
        }
    }

    #[test]
    fn a_storm_that_never_catches_up_does_not_panic() {
        // Invalid, but rate_at and the schedule must stay total functions.
        let p = Profile::Storm {
            outage_at: ms(10),
            outage_for: ms(10),
            factor: 0.5,
        };
        assert_eq!(p.rate_at(RATE, s(1e6)), 0.5 * RATE);
        assert!(p.schedule(RATE, BATCH).nth(1_000).is_some());
    }
}
