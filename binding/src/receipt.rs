//! Commit receipts (`docs/binding.md` section 5): what storage tells the world after each
//! commit. loadgen merges their latency histograms into its end-to-end report, which is
//! how that figure is measured rather than estimated.

use serde::{Deserialize, Serialize};

/// One tenant's share of one commit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    /// Tenant whose rows were committed.
    pub tenant: String,
    /// Rows newly stored (duplicates skipped on redelivery are not counted).
    pub rows: u64,
    /// Commit time, ns since the Unix epoch.
    pub committed: i64,
    /// HDR histogram (V2 deflate serialization) of `committed − device timestamp`, in ns,
    /// over those rows.
    #[serde(with = "serde_bytes_vec")]
    pub latency: Vec<u8>,
}

/// Decoding a receipt failed.
#[derive(Debug, thiserror::Error)]
#[error("malformed receipt: {0}")]
pub struct ReceiptError(String);

impl Receipt {
    /// MessagePack map, like batches.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain fields into a Vec cannot fail.
        rmp_serde::to_vec_named(self).unwrap_or_default()
    }

    /// Decodes a receipt.
    pub fn decode(body: &[u8]) -> Result<Self, ReceiptError> {
        rmp_serde::from_slice(body).map_err(|e| ReceiptError(e.to_string()))
    }
}

mod serde_bytes_vec {
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;

    pub(super) fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(b)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = a.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_bytes(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let r = Receipt {
            tenant: "acme".into(),
            rows: 500,
            committed: 42,
            latency: vec![1, 2, 3],
        };
        assert_eq!(Receipt::decode(&r.encode()).unwrap(), r);
        assert!(Receipt::decode(b"\x01").is_err());
    }
}
