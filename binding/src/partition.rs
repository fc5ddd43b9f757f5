//! Choosing the partition of a batch: round robin (TR 103 527 Figure 3, the default) or by
//! device hash, which keeps each device's batches in order on one partition.

use std::sync::atomic::{AtomicU64, Ordering};

/// How batches are spread over partitions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Partitioning {
    /// Batch `k` goes to partition `k mod P`.
    #[default]
    RoundRobin,
    /// Single-device batches go to `fnv1a64(device) mod P`.
    DeviceHash,
}

impl std::str::FromStr for Partitioning {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "round-robin" => Ok(Self::RoundRobin),
            "device-hash" => Ok(Self::DeviceHash),
            other => Err(format!(
                "unknown partitioning {other:?}: expected round-robin or device-hash"
            )),
        }
    }
}

impl std::fmt::Display for Partitioning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::RoundRobin => "round-robin",
            Self::DeviceHash => "device-hash",
        })
    }
}

/// 64-bit FNV-1a of the bytes, as specified in `docs/binding.md`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Picks partitions for a producer; shared by its sending tasks.
#[derive(Debug)]
pub struct Partitioner {
    strategy: Partitioning,
    partitions: u32,
    next: AtomicU64,
}

impl Partitioner {
    /// A partitioner over `partitions` partitions (at least 1).
    pub fn new(strategy: Partitioning, partitions: u32) -> Self {
        Self {
            strategy,
            partitions: partitions.max(1),
            next: AtomicU64::new(0),
        }
    }

    /// The strategy in use.
    pub fn strategy(&self) -> Partitioning {
        self.strategy
    }

    /// The partition for the next batch; `device` is the batch's only device under
    /// [`Partitioning::DeviceHash`] (ignored under round robin).
    pub fn pick(&self, device: Option<&str>) -> u32 {
        match (self.strategy, device) {
            (Partitioning::DeviceHash, Some(d)) => {
                (fnv1a64(d.as_bytes()) % u64::from(self.partitions)) as u32
            }
            _ => (self.next.fetch_add(1, Ordering::Relaxed) % u64::from(self.partitions)) as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_reference_values() {
        // Reference vectors of FNV-1a 64.
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn round_robin_cycles() {
        let p = Partitioner::new(Partitioning::RoundRobin, 3);
        let picks: Vec<u32> = (0..7).map(|_| p.pick(None)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn device_hash_is_stable_and_spread() {
        let p = Partitioner::new(Partitioning::DeviceHash, 4);
        assert_eq!(p.pick(Some("meter-1")), p.pick(Some("meter-1")));
        let mut seen = [0u32; 4];
        for i in 0..1000 {
            seen[p.pick(Some(&format!("dev-{i}"))) as usize] += 1;
        }
        assert!(seen.iter().all(|c| *c > 150), "{seen:?}");
    }

    #[test]
    fn parses_names() {
        assert_eq!("device-hash".parse(), Ok(Partitioning::DeviceHash));
        assert!("hash".parse::<Partitioning>().is_err());
    }
}
