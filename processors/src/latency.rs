//! HDR histograms of the storage pool: the latency of its own stages and end to end
//! (device timestamp → committed). They back the percentile table printed at shutdown,
//! the `*_seconds` Prometheus histograms, and the histograms carried by commit receipts.

use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Serializer, V2DeflateSerializer};

/// Highest latency tracked, in ns (one hour); larger values are clamped to it.
pub const MAX_NS: u64 = 3_600_000_000_000;

/// A new histogram in ns, 1 µs .. 1 h, three significant digits.
pub fn new_histogram() -> Histogram<u64> {
    // Bounds are constants that hdrhistogram accepts.
    Histogram::new_with_bounds(1_000, MAX_NS, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

/// Records a latency in ns, clamped into the tracked range.
pub fn record(h: &mut Histogram<u64>, ns: i64) {
    let v = (ns.max(1_000) as u64).min(MAX_NS);
    // In range by construction.
    let _ = h.record(v);
}

/// V2 deflate serialization (the receipts' format).
pub fn serialize(h: &Histogram<u64>) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing into a Vec does not fail.
    let _ = V2DeflateSerializer::new().serialize(h, &mut out);
    out
}

/// A percentile table in milliseconds: count, p50, p90, p99, p99.9, max.
pub fn table(rows: &[(&str, &Histogram<u64>)]) -> String {
    let mut s = format!(
        "{:<28} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
        "stage (ms)", "count", "p50", "p90", "p99", "p99.9", "max"
    );
    for (name, h) in rows {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e6;
        s.push_str(&format!(
            "{:<28} {:>10} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>10.3}\n",
            name,
            h.len(),
            ms(0.5),
            ms(0.9),
            ms(0.99),
            ms(0.999),
            h.max() as f64 / 1e6
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdrhistogram::serialization::Deserializer;

    #[test]
    fn clamps_and_round_trips() {
        let mut h = new_histogram();
        record(&mut h, -5);
        record(&mut h, 5_000_000);
        record(&mut h, i64::MAX);
        assert_eq!(h.len(), 3);
        assert!(h.max() >= MAX_NS && h.max() <= MAX_NS + MAX_NS / 1000);
        let bytes = serialize(&h);
        let back: Histogram<u64> = Deserializer::new().deserialize(&mut &bytes[..]).unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!(back.value_at_quantile(0.5), h.value_at_quantile(0.5));
        assert!(table(&[("e2e", &h)]).contains("e2e"));
    }
}
