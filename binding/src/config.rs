//! Serde adapters for config fields shared by every service's config structs: durations as
//! humantime strings (`"5ms"`, `"1h"`) and the partitioning strategy by name
//! (`"round-robin"`, `"device-hash"`). Use them with `#[serde(with = "…")]`.

/// A [`std::time::Duration`] written as a humantime string.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the humantime form (`"15m"`), which [`deserialize`] reads back.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    /// Parses `"5ms"`, `"2s"`, `"1h"`; the error names the value and gives examples.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {s:?}: {e} (examples: \"5ms\", \"2s\", \"1h\")"
            ))
        })
    }
}

/// A [`crate::Partitioning`] by name.
pub mod partitioning {
    use serde::{Deserialize, Deserializer};

    use crate::Partitioning;

    /// Parses `"round-robin"` or `"device-hash"`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Partitioning, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
