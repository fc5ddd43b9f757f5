//! Why a consumer refuses a message: the stable kinds of the `x-sluice-error` dead-letter
//! header (`docs/binding.md` section 5), with the reason that goes beside them.
//!
//! Every consumer that dead-letters (the storage pool, the router's match stage) refuses
//! with a [`Refusal`], so the header's values are this enum's and nothing else.

use std::fmt;

/// The stable kind of a refused message (`x-sluice-error`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeadLetterKind {
    /// Not a MessagePack body of the expected shape, or larger than the binding allows.
    Decode,
    /// A format version this consumer does not read.
    UnsupportedVersion,
    /// Decoded, but breaks a rule of the binding (tenant id, names, timestamps, values).
    Invalid,
    /// Published by a broker user that may not publish for the tenant it names.
    Forbidden,
}

impl DeadLetterKind {
    /// The header value: `decode`, `unsupported-version`, `invalid` or `forbidden`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterKind::Decode => "decode",
            DeadLetterKind::UnsupportedVersion => "unsupported-version",
            DeadLetterKind::Invalid => "invalid",
            DeadLetterKind::Forbidden => "forbidden",
        }
    }
}

impl fmt::Display for DeadLetterKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message a consumer will not process: its kind and a human-readable reason
/// (`x-sluice-reason`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {reason}")]
pub struct Refusal {
    /// The stable kind.
    pub kind: DeadLetterKind,
    /// What is wrong, for the operator reading the dead-letter queue.
    pub reason: String,
}

impl Refusal {
    /// A refusal of `kind` for `reason`.
    pub fn new(kind: DeadLetterKind, reason: impl Into<String>) -> Self {
        Self {
            kind,
            reason: reason.into(),
        }
    }
}

impl From<crate::codec::DecodeError> for Refusal {
    fn from(e: crate::codec::DecodeError) -> Self {
        Refusal::new(e.kind(), e.to_string())
    }
}

impl From<crate::validate::Invalid> for Refusal {
    fn from(e: crate::validate::Invalid) -> Self {
        Refusal::new(DeadLetterKind::Invalid, format!("invalid batch: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_the_documented_header_values() {
        let kinds = [
            DeadLetterKind::Decode,
            DeadLetterKind::UnsupportedVersion,
            DeadLetterKind::Invalid,
            DeadLetterKind::Forbidden,
        ];
        let names: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
        assert_eq!(
            names,
            ["decode", "unsupported-version", "invalid", "forbidden"]
        );
        let doc = include_str!("../../docs/binding.md");
        assert!(
            doc.contains("`decode`, `unsupported-version`, `invalid`, `forbidden`"),
            "docs/binding.md lists other dead-letter kinds"
        );
    }
}
