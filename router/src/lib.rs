//! The Sluice router (TR 103 527 clause 7.2.2 steps 7 to 9; the subscription/notification
//! service of Figure 10): it matches readings and derived events against tenants'
//! subscriptions and hands notifications to notifiers, with oneM2M notification policies.
//!
//! Layout, in data-path order:
//! - [`subscription`]: the subscription API's JSON shape and its rules;
//! - [`matching`]: the indexed matching engine (patterns, value predicates);
//! - [`notify`]: the notifiers, which deliver a prepared notification to its target
//!   (HTTP webhook).
pub mod matching;
pub mod notify;
pub mod subscription;
