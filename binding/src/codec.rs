//! The versioned MessagePack encoding of a batch (`docs/binding.md` section 3).
//!
//! Encoding writes a map with string keys (`rmp_serde::to_vec_named`) so that producers
//! in other languages can build it from a plain dictionary. Decoding borrows strings from
//! the body ([`BatchView`]); errors are a plain enum, no allocation per message beyond the
//! message text of the rare failure.

use crate::dead_letter::DeadLetterKind;
use crate::model::{Batch, BatchView, FORMAT_VERSION};

/// The AMQP `content_type` of a batch.
pub const CONTENT_TYPE: &str = "application/vnd.sluice.batch+msgpack";

/// Largest message body accepted, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Why a body could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// Not a MessagePack map of the expected shape.
    #[error("malformed batch: {0}")]
    Malformed(String),
    /// A version this consumer does not read.
    #[error("unsupported batch version {0} (this consumer reads version {FORMAT_VERSION})")]
    UnsupportedVersion(u32),
    /// Larger than [`MAX_MESSAGE_BYTES`].
    #[error("batch of {0} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")]
    TooLarge(usize),
}

impl DecodeError {
    /// The stable kind written to the `x-sluice-error` dead-letter header.
    pub fn kind(&self) -> DeadLetterKind {
        match self {
            DecodeError::Malformed(_) | DecodeError::TooLarge(_) => DeadLetterKind::Decode,
            DecodeError::UnsupportedVersion(_) => DeadLetterKind::UnsupportedVersion,
        }
    }
}

/// Encoding failed (only on a serializer bug or exhausted memory).
#[derive(Debug, thiserror::Error)]
#[error("cannot encode batch: {0}")]
pub struct EncodeError(#[from] rmp_serde::encode::Error);

/// Encodes a batch.
pub fn encode(batch: &Batch) -> Result<Vec<u8>, EncodeError> {
    Ok(rmp_serde::to_vec_named(batch)?)
}

/// Decodes a body, borrowing strings from it. Checks the version, not the rules of
/// [`crate::validate`].
pub fn decode(body: &[u8]) -> Result<BatchView<'_>, DecodeError> {
    if body.len() > MAX_MESSAGE_BYTES {
        return Err(DecodeError::TooLarge(body.len()));
    }
    // Read the version first, so a future format with other keys is reported as such
    // rather than as a missing field.
    let probe: VersionProbe =
        rmp_serde::from_slice(body).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if probe.v != FORMAT_VERSION {
        return Err(DecodeError::UnsupportedVersion(probe.v));
    }
    rmp_serde::from_slice(body).map_err(|e| DecodeError::Malformed(e.to_string()))
}

#[derive(serde::Deserialize)]
struct VersionProbe {
    v: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::BatchBuilder;

    fn sample() -> Batch {
        let mut b = BatchBuilder::new("acme", "prod-1", 3);
        b.push("meter-1", "kwh", 1_763_762_399_000_000_000, 12.5);
        b.push("meter-1", "volt", 1_763_762_399_000_000_000, 230.1);
        b.push("meter-2", "kwh", 1_763_762_399_500_000_000, 7.25);
        b.finish(1_763_762_400_000_000_000)
    }

    #[test]
    fn round_trip_borrows() {
        let batch = sample();
        let body = encode(&batch).unwrap();
        let view = decode(&body).unwrap();
        assert_eq!(view.id, batch.id);
        assert_eq!(view.tenant, "acme");
        assert_eq!(view.devices, vec!["meter-1", "meter-2"]);
        assert_eq!(view.metrics, vec!["kwh", "volt"]);
        assert_eq!(view.d, batch.d);
        assert_eq!(view.t, batch.t);
        assert_eq!(view.x, batch.x);
        assert_eq!(view.seq, 3);
    }

    #[test]
    fn wire_shape_is_a_named_map_with_bin_id() {
        let body = encode(&sample()).unwrap();
        // fixmap with 12 entries
        assert_eq!(body[0], 0x80 | 12);
        let value: rmpv_like::Value = rmp_serde::from_slice(&body).unwrap();
        let keys: Vec<_> = value.0.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "v", "id", "producer", "seq", "created", "tenant", "devices", "metrics", "d", "m",
                "t", "x"
            ]
        );
        // bin8 marker, length 16
        let id_pos = body
            .windows(3)
            .position(|w| w == [0xa2, b'i', b'd'])
            .unwrap();
        assert_eq!(&body[id_pos + 3..id_pos + 5], &[0xc4, 16]);
    }

    #[test]
    fn accepts_integer_and_f32_values_and_ignores_unknown_keys() {
        #[derive(serde::Serialize)]
        struct Foreign<'a> {
            v: u32,
            #[serde(with = "serde_bytes_16")]
            id: [u8; 16],
            producer: &'a str,
            seq: u64,
            created: i64,
            tenant: &'a str,
            devices: Vec<&'a str>,
            metrics: Vec<&'a str>,
            d: Vec<u32>,
            m: Vec<u32>,
            t: Vec<i64>,
            x: (i64, f32),
            future_key: &'a str,
        }
        let body = rmp_serde::to_vec_named(&Foreign {
            v: 1,
            id: [7; 16],
            producer: "py",
            seq: 0,
            created: 1,
            tenant: "acme",
            devices: vec!["d"],
            metrics: vec!["m"],
            d: vec![0, 0],
            m: vec![0, 0],
            t: vec![1, 2],
            x: (3, 1.5),
            future_key: "ignored",
        })
        .unwrap();
        let view = decode(&body).unwrap();
        assert_eq!(view.x, vec![3.0, 1.5]);
    }

    #[test]
    fn rejects_other_versions_and_garbage() {
        let mut batch = sample();
        batch.v = 2;
        let body = encode(&batch).unwrap();
        assert_eq!(decode(&body), Err(DecodeError::UnsupportedVersion(2)));
        assert_eq!(
            decode(&body).unwrap_err().kind(),
            DeadLetterKind::UnsupportedVersion
        );
        let err = decode(b"\xc1 not msgpack").unwrap_err();
        assert_eq!(err.kind(), DeadLetterKind::Decode);
        // A map missing required keys.
        let body = rmp_serde::to_vec_named(&VersionOnly { v: 1 }).unwrap();
        assert!(
            matches!(decode(&body), Err(DecodeError::Malformed(m)) if m.contains("missing field"))
        );
    }

    #[derive(serde::Serialize)]
    struct VersionOnly {
        v: u32,
    }

    mod serde_bytes_16 {
        pub(super) fn serialize<S: serde::Serializer>(
            b: &[u8; 16],
            s: S,
        ) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(b)
        }
    }

    /// Minimal ordered-map reader for the wire-shape test.
    mod rmpv_like {
        use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
        use std::fmt;
        pub(super) struct Value(pub(super) Vec<(String, ())>);
        impl<'de> Deserialize<'de> for Value {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = Value;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("map")
                    }
                    fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Value, A::Error> {
                        let mut out = Vec::new();
                        while let Some((k, IgnoredAny)) = a.next_entry::<String, IgnoredAny>()? {
                            out.push((k, ()));
                        }
                        Ok(Value(out))
                    }
                }
                d.deserialize_map(V)
            }
        }
    }
}
