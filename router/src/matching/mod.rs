//! The indexed matching engine: which subscriptions an event matches. This module owns the
//! glob [`Pattern`]s of criteria, the [`Index`] of every tenant's subscriptions, and the
//! [`Matcher`] that runs batches through the index and remembers the previous value of
//! each series for `changed_by`.
//!
//! Why the index is shaped as it is:
//! - Tenant first: a map from tenant to that tenant's own index, so an event never sees,
//!   nor pays for, another tenant's subscriptions.
//! - Then one index per event kind: most subscriptions watch readings only, and a derived
//!   event must not wade through them (nor a reading through fault-only ones).
//! - Each subscription is placed on one dimension. Devices are the selective one, so a
//!   subscription goes there when every device pattern has a literal prefix; else on the
//!   metric dimension when every metric pattern has one (this covers the `*`-device
//!   subscriptions); else in a short residual list checked on every lookup (patterns such
//!   as `*-boiler` on both sides, which no prefix structure can narrow).
//! - On its dimension, a literal pattern is posted under its whole text in a hash map and
//!   any other pattern under its literal prefix in a prefix map. A lookup probes the exact
//!   map once and the prefix map once per distinct prefix length in use, so it reads only
//!   subscriptions whose literal prefix is a prefix of the name: the cost follows the
//!   number of plausible matches, not the number of subscriptions. The full criteria
//!   are then verified on those candidates only, cheaply: a posting whose key proves its
//!   dimension (a literal, or `prefix*`) skips that check, and a single literal on the
//!   other dimension is compared by fingerprint before any pattern is touched.
//! - Maps use the standard SipHash hasher on purpose: device and metric names are chosen
//!   by producers, and a faster unkeyed hash would let one flood a bucket. Lookups are per
//!   distinct (device, metric) pair of a batch, not per reading, so its cost is amortized.
//!
//! Layout: `pattern` compiles the glob patterns of criteria, `index` holds every
//! tenant's subscriptions posted on one dimension each, and `matcher` runs batches and
//! single events through the index, remembering each series' previous value.

mod index;
mod matcher;
mod pattern;
#[cfg(test)]
mod test_support;

pub use index::{Index, SubRef};
pub use matcher::{BatchMatches, Matcher};
pub use pattern::Pattern;
