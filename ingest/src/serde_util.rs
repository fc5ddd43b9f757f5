//! Serde adapters for config fields: durations as humantime strings (`"5ms"`, `"1h"`) and
//! the partitioning strategy by name (`"round-robin"`, `"device-hash"`).

pub(crate) mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {s:?}: {e} (examples: \"5ms\", \"2s\", \"1h\")"
            ))
        })
    }
}

pub(crate) mod partitioning {
    use serde::{Deserialize, Deserializer};
    use sluice_binding::Partitioning;

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Partitioning, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
