//! The AMQP notifier: publishes a notification (persistent, confirmed, mandatory) to an
//! exchange the operator granted the subscription's tenant.
//!
//! Two rules keep one tenant's target from reaching or stalling anything else:
//! - **Confinement.** A target names an exchange from its tenant's `amqp_exchanges` in the
//!   tenants file, checked when the subscription is created and again at every delivery
//!   (a subscription created by a router with another tenants file may be delivered by
//!   this one). The default exchange (every queue by name),
//!   `amq.*` and Sluice's own namespace are never reachable, whatever the file says.
//! - **Isolation.** Each tenant's notifications go on a channel lane of that tenant's own
//!   ([`AmqpTransport::publish_in_lane`]). A publish the broker refuses by closing the
//!   channel (the exchange was deleted, the router's user may not write to it) fails only
//!   that tenant's publishes in flight; the lane opens a new channel for its next one, and
//!   the failure takes the subscription's own retry schedule and dead letter.

use lapin::BasicProperties;
use sluice_binding::TenantId;
use sluice_binding::tenancy::Tenants;
use sluice_binding::transport::PublishError;
use sluice_binding::transport::amqp::AmqpTransport;

/// Why an AMQP notification was not published.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// The exchange is not (or no longer) granted to the tenant: permanent.
    #[error("exchange {exchange:?} is not granted to tenant {tenant}{why}")]
    Forbidden {
        /// The tenant.
        tenant: String,
        /// The exchange named by the target.
        exchange: String,
        /// More on why, if the grant is not simply missing.
        why: &'static str,
    },
    /// No queue is bound to the exchange for the routing key (the message was returned):
    /// retried on the subscription's schedule, as the tenant may bind one.
    #[error("no queue is bound to exchange {exchange:?} for routing key {routing_key:?}")]
    Unroutable {
        /// The exchange named by the target.
        exchange: String,
        /// The target's routing key.
        routing_key: String,
    },
    /// The broker did not confirm it: retried on the subscription's schedule.
    #[error("amqp: {0}")]
    Publish(#[from] PublishError),
}

impl AmqpError {
    /// Whether retrying cannot help.
    pub fn is_permanent(&self) -> bool {
        matches!(self, AmqpError::Forbidden { .. })
    }
}

/// Which exchanges each tenant may send notifications to: the grants of the tenants
/// file, minus the names no tenant may ever reach. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AmqpGrants {
    tenants: Tenants,
    /// `{namespace}.`: Sluice's own exchanges and queues.
    reserved: String,
}

impl AmqpGrants {
    /// The grants of `tenants`, with Sluice's own objects under `namespace` out of reach.
    pub fn new(tenants: Tenants, namespace: &str) -> Self {
        let reserved = format!("{namespace}.");
        // The tenants file cannot know the namespace; say at start what it grants in vain.
        for (exchange, tenant) in tenants.granted_exchanges() {
            if exchange.starts_with(&reserved) {
                tracing::warn!(%tenant, exchange, namespace, "amqp_exchanges grants an exchange in Sluice's namespace; no notification is ever sent to it");
            }
        }
        Self { tenants, reserved }
    }

    /// Whether `tenant` may send notifications to `exchange`.
    pub fn check_target(&self, tenant: &TenantId, exchange: &str) -> Result<(), AmqpError> {
        let forbidden = |why| AmqpError::Forbidden {
            tenant: tenant.to_string(),
            exchange: exchange.to_owned(),
            why,
        };
        if exchange.is_empty() {
            return Err(forbidden(": the default exchange is never reachable"));
        }
        if exchange.starts_with("amq.") || exchange.starts_with(&self.reserved) {
            return Err(forbidden(": reserved name"));
        }
        if !self.tenants.may_publish_to(tenant, exchange) {
            return Err(forbidden(
                " (the operator grants exchanges in the tenants file, amqp_exchanges)",
            ));
        }
        Ok(())
    }
}

/// Publishes AMQP notifications. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AmqpNotifier {
    transport: AmqpTransport,
    grants: AmqpGrants,
}

impl AmqpNotifier {
    /// A notifier over `transport`, with the grants of `tenants`.
    pub fn new(transport: AmqpTransport, tenants: Tenants) -> Self {
        let grants = AmqpGrants::new(tenants, &transport.topology().namespace);
        Self { transport, grants }
    }

    /// The grants checked at every delivery (and by the API when a subscription is
    /// created).
    pub fn grants(&self) -> &AmqpGrants {
        &self.grants
    }

    /// Publishes `json` to `exchange` with `routing_key`, on `tenant`'s lane; returns once
    /// the broker confirmed it.
    pub async fn send(
        &self,
        tenant: &TenantId,
        exchange: &str,
        routing_key: &str,
        key: &str,
        json: &str,
    ) -> Result<(), AmqpError> {
        self.grants.check_target(tenant, exchange)?;
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(key.into());
        let lane = format!("tenant:{tenant}");
        self.transport
            .publish_in_lane(&lane, exchange, routing_key, json.as_bytes(), props, true)
            .await
            .map_err(|e| match e {
                // The transport speaks of partitions; a target has an exchange and a key.
                PublishError::Unroutable(_) => AmqpError::Unroutable {
                    exchange: exchange.to_owned(),
                    routing_key: routing_key.to_owned(),
                },
                other => AmqpError::Publish(other),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_granted_exchanges_outside_reserved_names_are_reachable() {
        let acme = TenantId::new("acme").unwrap();
        let globex = TenantId::new("globex").unwrap();
        let tenants = Tenants::single(acme.clone(), &["k-acme"])
            .grant_exchange(&acme, "alerts")
            .grant_exchange(&acme, "amq.topic")
            .grant_exchange(&acme, "sluice.notify");
        let grants = AmqpGrants::new(tenants, "sluice");
        assert!(grants.check_target(&acme, "alerts").is_ok());
        for refused in ["", "amq.topic", "sluice.notify", "other"] {
            let e = grants.check_target(&acme, refused).unwrap_err();
            assert!(e.is_permanent(), "{refused:?}: {e}");
        }
        assert!(grants.check_target(&globex, "alerts").is_err());
    }

    #[test]
    fn the_reserved_namespace_is_the_configured_one() {
        let acme = TenantId::new("acme").unwrap();
        let tenants = Tenants::single(acme.clone(), &["k"])
            .grant_exchange(&acme, "sluice.alerts")
            .grant_exchange(&acme, "prod.alerts");
        let grants = AmqpGrants::new(tenants, "prod");
        assert!(grants.check_target(&acme, "sluice.alerts").is_ok());
        assert!(
            grants
                .check_target(&acme, "prod.alerts")
                .unwrap_err()
                .is_permanent()
        );
    }
}
