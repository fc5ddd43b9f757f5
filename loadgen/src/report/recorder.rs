//! The latency histogram every report is built from.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2DeflateSerializer};
use serde::{Deserialize, Serialize};

use super::ReportError;

/// Lowest value the histogram distinguishes from 0, in nanoseconds.
///
/// 1 ns keeps the full 3-significant-digit precision down to microsecond latencies (in-process
/// transports answer that fast); the memory cost over a 1 µs floor is about 30%.
pub const LOWEST_DISCERNIBLE_NS: u64 = 1;

/// Highest value recorded as is, in nanoseconds (1 h). Longer latencies are clamped to this
/// value and counted in [`LatencyRecorder::saturated`].
pub const HIGHEST_TRACKABLE_NS: u64 = 3_600 * 1_000_000_000;

/// Significant decimal digits kept at every magnitude (relative error ≤ 0.1%).
pub const SIGNIFICANT_DIGITS: u8 = 3;

/// Nanoseconds per millisecond: the value scale for reports shown in milliseconds.
pub const NANOS_PER_MILLI: f64 = 1e6;

/// A latency histogram in nanoseconds, 1 ns..1 h at 3 significant digits.
///
/// Wraps an `hdrhistogram::Histogram<u64>` (about 270 KB) with a fixed layout so that any two
/// recorders merge exactly. Values above [`HIGHEST_TRACKABLE_NS`] are clamped to it and counted,
/// so one lost response never makes a run fail to report; a non-zero [`saturated`] count is
/// printed next to the table.
///
/// Recording is `&mut self` and allocation-free: give each sender task its own recorder and
/// [`merge`] them at the end (or at each reporting interval).
///
/// [`saturated`]: LatencyRecorder::saturated
/// [`merge`]: LatencyRecorder::merge
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(into = "RecorderWire", try_from = "RecorderWire")]
pub struct LatencyRecorder {
    hist: Histogram<u64>,
    saturated: u64,
}

impl Default for LatencyRecorder {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyRecorder {
    /// An empty recorder.
    pub fn new() -> Self {
        Self {
            hist: empty_histogram(),
            saturated: 0,
        }
    }

    /// Records one latency, clamping values above 1 h.
    pub fn record(&mut self, latency: Duration) {
        self.record_n(latency, 1);
    }

    /// Records `count` occurrences of the same latency (e.g. every reading of one batch).
    pub fn record_n(&mut self, latency: Duration, count: u64) {
        if count == 0 {
            return;
        }
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        let nanos = if nanos > HIGHEST_TRACKABLE_NS {
            self.saturated = self.saturated.saturating_add(count);
            HIGHEST_TRACKABLE_NS
        } else {
            nanos
        };
        // In range by construction, so saturating_record_n never clamps here.
        self.hist.saturating_record_n(nanos, count);
    }

    /// Adds every value (and the saturation count) of `other` to this recorder.
    pub fn merge(&mut self, other: &LatencyRecorder) {
        self.saturated = self.saturated.saturating_add(other.saturated);
        self.merge_histogram(&other.hist);
    }

    /// Adds a histogram from elsewhere, which must hold nanoseconds.
    ///
    /// A histogram with our layout is added exactly. Any other layout is re-binned value by value
    /// (each bucket at its lowest equivalent value, as HdrHistogram's own `add` does), and values
    /// above 1 h are clamped and counted as saturated.
    pub fn merge_histogram(&mut self, other: &Histogram<u64>) {
        if same_layout(other) && self.hist.add(other).is_ok() {
            return;
        }
        for bucket in other.iter_recorded() {
            let value = other.lowest_equivalent(bucket.value_iterated_to());
            let count = bucket.count_at_value();
            let value = if value > HIGHEST_TRACKABLE_NS {
                self.saturated = self.saturated.saturating_add(count);
                HIGHEST_TRACKABLE_NS
            } else {
                value
            };
            self.hist.saturating_record_n(value, count);
        }
    }

    /// Decodes a histogram serialized in HdrHistogram's V2 format, compressed (deflate, what
    /// [`to_v2_deflate`](Self::to_v2_deflate) and the storage processes send) or not.
    ///
    /// The values must be nanoseconds; the layout may differ from ours and is re-binned.
    pub fn from_v2_deflate(bytes: &[u8]) -> Result<Self, ReportError> {
        let decoded: Histogram<u64> = Deserializer::new().deserialize(&mut &bytes[..])?;
        let mut recorder = Self::new();
        recorder.merge_histogram(&decoded);
        Ok(recorder)
    }

    /// Serializes the histogram in HdrHistogram's V2 deflate format (interoperable with the
    /// Java, C and Go implementations). The saturation count is not part of the format.
    pub fn to_v2_deflate(&self) -> Result<Vec<u8>, ReportError> {
        let mut out = Vec::new();
        V2DeflateSerializer::new().serialize(&self.hist, &mut out)?;
        Ok(out)
    }

    /// Number of recorded values, including saturated ones.
    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.hist.is_empty()
    }

    /// Number of values that exceeded 1 h and were recorded as 1 h.
    pub fn saturated(&self) -> u64 {
        self.saturated
    }

    /// The latency at quantile `q` (0.0..=1.0): the highest value equivalent to the bucket that
    /// holds it, as HdrHistogram reports it. Zero when empty.
    pub fn value_at_quantile(&self, q: f64) -> Duration {
        Duration::from_nanos(self.hist.value_at_quantile(q))
    }

    /// The highest recorded latency (bucket's highest equivalent value). Zero when empty.
    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.hist.max())
    }

    /// The lowest recorded latency. Zero when empty.
    pub fn min(&self) -> Duration {
        if self.is_empty() {
            Duration::ZERO
        } else {
            Duration::from_nanos(self.hist.min())
        }
    }

    /// The mean latency (from bucket midpoints). Zero when empty.
    pub fn mean(&self) -> Duration {
        Duration::from_secs_f64(self.hist.mean() / 1e9)
    }

    /// The underlying histogram, in nanoseconds.
    pub fn histogram(&self) -> &Histogram<u64> {
        &self.hist
    }

    /// Forgets every value, keeping the allocation (for interval reporting).
    pub fn clear(&mut self) {
        self.hist.reset();
        self.saturated = 0;
    }
}

/// The two latencies of one open-loop request, recorded from the same instants.
///
/// `corrected` runs from the intended send time (the schedule slot, which is also the reading's
/// device timestamp) to the response, so it includes any wait behind a slow request: this is the
/// latency a device on that schedule would see. `service` runs from the actual send to the
/// response: what the server took once it got the request. See the module docs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OpenLoopLatency {
    /// Intended send time → response (corrected for coordinated omission).
    pub corrected: LatencyRecorder,
    /// Actual send time → response (service time).
    pub service: LatencyRecorder,
}

impl OpenLoopLatency {
    /// An empty pair of recorders.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one request. Instants out of order (a response "before" its slot) count as 0.
    pub fn record(&mut self, intended: Instant, sent: Instant, done: Instant) {
        self.corrected
            .record(done.saturating_duration_since(intended));
        self.service.record(done.saturating_duration_since(sent));
    }

    /// Adds both recorders of `other`.
    pub fn merge(&mut self, other: &OpenLoopLatency) {
        self.corrected.merge(&other.corrected);
        self.service.merge(&other.service);
    }
}

fn empty_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(
        LOWEST_DISCERNIBLE_NS,
        HIGHEST_TRACKABLE_NS,
        SIGNIFICANT_DIGITS,
    )
    .expect("constant histogram bounds are valid")
}

fn same_layout(h: &Histogram<u64>) -> bool {
    h.low() == LOWEST_DISCERNIBLE_NS
        && h.high() == HIGHEST_TRACKABLE_NS
        && h.sigfig() == SIGNIFICANT_DIGITS
}

/// How a recorder appears in JSON: the V2 deflate bytes as hex, plus the saturation count the
/// format has no field for.
#[derive(Serialize, Deserialize)]
struct RecorderWire {
    saturated: u64,
    v2_deflate_hex: String,
}

impl From<LatencyRecorder> for RecorderWire {
    fn from(r: LatencyRecorder) -> Self {
        // Serializing into a Vec only fails for counts that do not fit the format, which a
        // u64 histogram cannot hold; an empty string then decodes as an error, never as data.
        let bytes = r.to_v2_deflate().unwrap_or_default();
        RecorderWire {
            saturated: r.saturated,
            v2_deflate_hex: to_hex(&bytes),
        }
    }
}

impl TryFrom<RecorderWire> for LatencyRecorder {
    type Error = ReportError;

    fn try_from(w: RecorderWire) -> Result<Self, ReportError> {
        let mut r = LatencyRecorder::from_v2_deflate(&from_hex(&w.v2_deflate_hex)?)?;
        r.saturated = w.saturated;
        Ok(r)
    }
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

fn from_hex(s: &str) -> Result<Vec<u8>, ReportError> {
    fn nibble(c: u8) -> Result<u8, ReportError> {
        match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(ReportError::Hex("non-hex character")),
        }
    }
    let bytes = s.as_bytes();
    if !bytes.len().is_multiple_of(2) {
        return Err(ReportError::Hex("odd length"));
    }
    bytes
        .chunks_exact(2)
        .map(|pair| Ok(nibble(pair[0])? << 4 | nibble(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// True when `got` is within the histogram's 0.1% resolution of `want`.
    fn close(got: Duration, want: Duration) -> bool {
        let (g, w) = (got.as_nanos() as f64, want.as_nanos() as f64);
        (g - w).abs() <= w * 1e-3
    }

    #[test]
    fn percentiles_of_a_uniform_sequence() {
        let mut r = LatencyRecorder::new();
        for i in 1..=10_000 {
            r.record(us(i));
        }
        assert_eq!(r.count(), 10_000);
        for (q, want) in [
            (0.5, 5_000),
            (0.9, 9_000),
            (0.99, 9_900),
            (0.999, 9_990),
            (1.0, 10_000),
        ] {
            let got = r.value_at_quantile(q);
            assert!(close(got, us(want)), "q={q}: {got:?} vs {want} µs");
        }
        assert!(close(r.max(), us(10_000)));
        assert!(close(r.min(), us(1)));
        assert!(close(r.mean(), Duration::from_nanos(5_000_500)));
        assert_eq!(r.saturated(), 0);
    }

    #[test]
    fn a_rare_outlier_shows_only_in_the_tail() {
        // 9 999 fast responses and one 100 ms stall: the median ignores it, p99.99 and max don't.
        let mut r = LatencyRecorder::new();
        r.record_n(Duration::from_millis(1), 9_999);
        r.record(Duration::from_millis(100));
        assert!(close(r.value_at_quantile(0.5), Duration::from_millis(1)));
        assert!(close(r.value_at_quantile(0.999), Duration::from_millis(1)));
        assert!(close(r.value_at_quantile(1.0), Duration::from_millis(100)));
        assert!(close(r.max(), Duration::from_millis(100)));
        // mean = (9 999 × 1 + 100) / 10 000 ms
        assert!(close(r.mean(), Duration::from_nanos(1_009_900)));
    }

    #[test]
    fn values_above_one_hour_are_clamped_and_counted() {
        let mut r = LatencyRecorder::new();
        r.record(Duration::from_secs(2 * 3_600));
        r.record_n(Duration::MAX, 2);
        r.record(us(5));
        assert_eq!(r.count(), 4);
        assert_eq!(r.saturated(), 3);
        assert!(close(r.max(), Duration::from_nanos(HIGHEST_TRACKABLE_NS)));
    }

    #[test]
    fn merge_equals_recording_everything_in_one() {
        let mut a = LatencyRecorder::new();
        let mut b = LatencyRecorder::new();
        let mut all = LatencyRecorder::new();
        for i in 1..=1_000 {
            let d = us(i * 7);
            if i % 3 == 0 { &mut a } else { &mut b }.record(d);
            all.record(d);
        }
        b.record(Duration::from_secs(7_200));
        all.record(Duration::from_secs(7_200));
        a.merge(&b);
        assert_eq!(a, all);
        assert_eq!(a.saturated(), 1);
    }

    #[test]
    fn v2_deflate_round_trip_is_exact() {
        let mut r = LatencyRecorder::new();
        for i in 0..5_000u64 {
            r.record(Duration::from_nanos(1 + i * i * 1_013));
        }
        let bytes = r.to_v2_deflate().unwrap();
        // V2 compressed cookie, as the Java/C/Go implementations write it.
        assert_eq!(bytes[..4], [0x1c, 0x84, 0x93, 0x14]);
        let back = LatencyRecorder::from_v2_deflate(&bytes).unwrap();
        assert_eq!(back.histogram(), r.histogram());
        assert_eq!(back.count(), 5_000);
    }

    #[test]
    fn foreign_layouts_are_rebinned_and_clamped() {
        // A storage process with a microsecond-floor, 2-hour histogram.
        let mut foreign = Histogram::<u64>::new_with_bounds(1_000, 7_200_000_000_000, 3).unwrap();
        foreign.record_n(2_000_000, 10).unwrap(); // 2 ms
        foreign.record(7_000_000_000_000).unwrap(); // ~1.9 h
        let mut bytes = Vec::new();
        V2DeflateSerializer::new()
            .serialize(&foreign, &mut bytes)
            .unwrap();
        let r = LatencyRecorder::from_v2_deflate(&bytes).unwrap();
        assert_eq!(r.count(), 11);
        assert_eq!(r.saturated(), 1);
        assert!(close(r.value_at_quantile(0.5), Duration::from_millis(2)));
    }

    #[test]
    fn garbage_bytes_are_a_decode_error() {
        let err = LatencyRecorder::from_v2_deflate(b"not a histogram").unwrap_err();
        assert!(matches!(err, ReportError::Decode(_)), "{err:?}");
    }

    #[test]
    fn open_loop_latency_separates_corrected_from_service_time() {
        // Sends are scheduled every 1 ms. The server stalls for 100 ms on the first request, and
        // the next 99 sends go out late, the moment the stall ends; each is then served in 1 ms.
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut lat = OpenLoopLatency::new();
        lat.record(t0, t0, t0 + ms(100));
        for i in 1..100 {
            let intended = t0 + ms(i);
            let sent = t0 + ms(100);
            lat.record(intended, sent, sent + ms(1));
        }
        // Service time says everything but one request was fast...
        assert!(close(lat.service.value_at_quantile(0.9), ms(1)));
        // ...the corrected view shows what devices on that schedule actually waited.
        assert!(lat.corrected.value_at_quantile(0.5) >= ms(50));
        assert!(close(lat.corrected.max(), ms(100)));
        // A response stamped before its slot counts as zero, not as a panic.
        lat.record(t0 + ms(10), t0, t0);
        assert_eq!(lat.corrected.count(), 101);
    }

    #[test]
    fn serde_round_trip_keeps_saturation() {
        let mut r = LatencyRecorder::new();
        r.record(us(3));
        r.record(Duration::from_secs(4_000));
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("v2_deflate_hex"));
        let back: LatencyRecorder = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.saturated(), 1);
    }

    #[test]
    fn hex_round_trip_and_rejects_bad_input() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(from_hex(&to_hex(&bytes)).unwrap(), bytes);
        assert!(from_hex("abc").is_err());
        assert!(from_hex("zz").is_err());
    }
}
