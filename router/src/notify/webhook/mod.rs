//! The webhook notifier: POSTs a prepared notification to a subscriber's URL.
//!
//! - `address`: the address rules that keep webhooks off internal networks (the SSRF
//!   guard), checked when a subscription is created ([`WebhookNotifier::check_target`])
//!   and again at connect time, by a resolver that drops refused addresses (a host name
//!   may resolve elsewhere by the time we send: DNS rebinding);
//! - `breaker`: the circuit breaker of one target (scheme, host and port);
//! - `client`: the HTTP client, with back pressure and isolation per target (a
//!   concurrency limit and a circuit breaker), so one slow or dead endpoint neither floods
//!   nor stalls the others;
//! - `outcome`: the classification of a failed delivery for the retry logic
//!   ([`WebhookError`]).
//!
//! The delay before the next attempt is [`crate::notify::backoff`], shared by every
//! notifier; what a delivery logs and counts is in [`crate::internal_events`].

use std::time::Duration;

mod address;
mod breaker;
mod client;
mod outcome;

pub use address::{AllowRule, ParseAllowRuleError};
pub(crate) use breaker::Transition;
pub use client::WebhookNotifier;
pub use outcome::WebhookError;

/// Settings of the webhook notifier.
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    /// Limit on a whole request, from connecting to the end of the response headers (and
    /// of the bit of body read). Also bounds the wait for a per-target slot. Default 5 s.
    pub timeout: Duration,
    /// Limit on establishing the TCP connection. Default 2 s.
    pub connect_timeout: Duration,
    /// Requests in flight at once to one target (scheme, host and port); more wait.
    /// Default 8; 0 counts as 1.
    pub per_target_concurrency: usize,
    /// Consecutive retryable failures that open a target's circuit. Default 5; 0 counts
    /// as 1.
    pub breaker_failures: u32,
    /// How long an open circuit refuses requests before letting one trial request
    /// through (half-open). Default 30 s.
    pub breaker_open_for: Duration,
    /// Hosts and networks allowed although the address rules refuse them (loopback,
    /// private, link-local…): for development and on-premises subscribers.
    pub allow: Vec<AllowRule>,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            per_target_concurrency: 8,
            breaker_failures: 5,
            breaker_open_for: Duration::from_secs(30),
            allow: Vec::new(),
        }
    }
}
