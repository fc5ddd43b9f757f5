//! Notifiers: deliver a prepared notification to its target.

pub mod amqp;
pub mod backoff;
pub mod webhook;
