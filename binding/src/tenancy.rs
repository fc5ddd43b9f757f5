//! Tenants and their API keys, read from a TOML file (`deploy/tenants.example.toml`):
//!
//! ```toml
//! [[tenant]]
//! id = "demo"
//! api_keys = [
//!     "demo-key-change-me",                                      # every scope
//!     { key = "demo-device-key-change-me", scopes = ["ingest"] }, # telemetry only
//! ]
//! # Optional: the AMQP exchanges this tenant's subscriptions may publish notifications to.
//! amqp_exchanges = ["demo.alerts"]
//! # Optional: this tenant's ingest quota (else `[default_quota]`, else none).
//! quota = { readings_per_sec = 100000, bytes_per_sec = 8000000 }
//! ```
//!
//! A top-level `[default_quota]` table (same fields) sets the quota of every tenant
//! without its own; without either a tenant has none. See [`Quota`].
//!
//! Each key has [scopes](Scope): what a request with it may do. `ingest` sends telemetry,
//! `subscribe` manages subscriptions and follows live feeds, `query` reads stored data and
//! `admin` reaches a tenant's operator interfaces. A bare string key has every scope (the
//! file format before scopes); a key that ships inside devices should be written with
//! `scopes = ["ingest"]`, so that a key pulled out of a device cannot read or redirect the
//! tenant's data. A request whose key lacks the scope is answered 403.
//!
//! AMQP notification targets are confined to the exchanges the operator grants a tenant
//! here: none by default, never the default exchange (it reaches every queue by name) nor
//! an `amq.*` one, and never one granted to another tenant (a tenant could otherwise forge
//! the other's notifications).
//!
//! An HTTP request authenticates with one key, `Authorization: Bearer <key>` or
//! `X-Api-Key: <key>` ([`Tenants::authenticate`]); the key names the tenant of every reading
//! the request carries and of every subscription it manages (`docs/binding.md` section 6).
//! Ingest and the router's subscription API authenticate through the same function.
//!
//! Direct publishers (`docs/binding.md` section 6) are held to their tenant by their broker
//! user: the broker stamps nothing, but refuses a message whose AMQP `user_id` is not the
//! publishing connection's user, so `user_id` cannot be forged. A tenant lists the users
//! that publish for it in `amqp_users`; consumers check every batch with
//! [`Tenants::check_publisher`]: Sluice's own users may name any tenant, a mapped user only
//! its tenant, and a message with another user or none is refused (`forbidden`).
//!
//! Keys are looked up by their SHA-256 digest: the time a lookup takes depends on the
//! digest of the presented key, which tells a caller nothing about the stored keys. A map
//! keyed by the keys themselves would end in a byte-by-byte comparison against a stored
//! key, whose duration leaks the length of the matching prefix. Hashing a key costs well
//! under a microsecond, so the protection is cheap. The map itself (SipHash with a random
//! seed) is not attackable for collisions either.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use crate::dead_letter::{DeadLetterKind, Refusal};
use crate::model::TenantId;
use http::{HeaderMap, header};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Who published a message, as far as the broker vouches for it (its `user_id`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Publisher {
    /// This deployment: a broker user the consuming transport trusts (its own, or one
    /// configured as Sluice's), or the in-process transport.
    Sluice,
    /// Another broker user.
    User(String),
    /// No `user_id`: the broker vouches for nothing.
    Unknown,
}

/// What a key lets a request do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Send telemetry (ingest's readings endpoints).
    Ingest,
    /// Create, list and delete subscriptions, and follow live feeds (the router's API).
    Subscribe,
    /// Read stored data (the query interfaces).
    Query,
    /// The tenant's operator interfaces (its worker pools, its dead letters).
    Admin,
}

impl Scope {
    /// Every scope, in a fixed order.
    pub const ALL: [Scope; 4] = [Scope::Ingest, Scope::Subscribe, Scope::Query, Scope::Admin];

    /// The name in the tenants file and in error messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Ingest => "ingest",
            Scope::Subscribe => "subscribe",
            Scope::Query => "query",
            Scope::Admin => "admin",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// A set of [`Scope`]s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scopes(u8);

impl Scopes {
    /// Every scope (a bare key in the tenants file).
    pub const ALL: Scopes = Scopes(0b1111);

    /// The set of `scopes`.
    pub fn of(scopes: &[Scope]) -> Self {
        Scopes(scopes.iter().fold(0, |acc, s| acc | s.bit()))
    }

    /// Whether the set holds `scope`.
    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }
}

/// Why a request was not authenticated (401) or not allowed (403, [`AuthError::status`]);
/// the message says which.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Neither header is present (or `X-Api-Key` is blank).
    #[error("missing API key: send Authorization: Bearer <key> or X-Api-Key: <key>")]
    Missing,
    /// The named header has bytes outside visible ASCII.
    #[error("the {0} header is not visible ASCII")]
    NotAscii(&'static str),
    /// `Authorization` with another scheme than Bearer.
    #[error("the Authorization header must use the Bearer scheme")]
    NotBearer,
    /// `Authorization: Bearer` with nothing after it.
    #[error("the Authorization header has no key after Bearer")]
    EmptyBearer,
    /// A well-formed key that belongs to no tenant.
    #[error("unknown API key")]
    UnknownKey,
    /// A known key without the scope the request needs.
    #[error("this API key may not {what}: it lacks the {scope} scope", what = verb(*.0), scope = .0.as_str())]
    MissingScope(Scope),
}

fn verb(scope: Scope) -> &'static str {
    match scope {
        Scope::Ingest => "send telemetry",
        Scope::Subscribe => "manage subscriptions",
        Scope::Query => "query data",
        Scope::Admin => "use the operator interfaces",
    }
}

impl AuthError {
    /// The HTTP status to answer with: 403 for a known key without the scope, 401 for
    /// every other failure.
    pub fn status(&self) -> u16 {
        match self {
            AuthError::MissingScope(_) => 403,
            _ => 401,
        }
    }
}

/// The API key a request presents: `Authorization: Bearer <key>` (which wins) or
/// `X-Api-Key: <key>`, trimmed.
pub fn api_key(headers: &HeaderMap) -> Result<&str, AuthError> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v
            .to_str()
            .map_err(|_| AuthError::NotAscii("Authorization"))?
            .trim();
        let (scheme, key) = v.split_once(' ').unwrap_or((v, ""));
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::NotBearer);
        }
        let key = key.trim();
        if key.is_empty() {
            return Err(AuthError::EmptyBearer);
        }
        return Ok(key);
    }
    if let Some(v) = headers.get("x-api-key") {
        let key = v
            .to_str()
            .map_err(|_| AuthError::NotAscii("X-Api-Key"))?
            .trim();
        if !key.is_empty() {
            return Ok(key);
        }
    }
    Err(AuthError::Missing)
}

/// Why a tenants file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TenantsError {
    /// The file could not be read.
    #[error("cannot read tenants file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Not TOML of the expected shape (unknown keys, invalid tenant ids, wrong types);
    /// the message carries the line and column.
    #[error("invalid tenants file: {0}")]
    Parse(#[from] toml::de::Error),
    /// No `[[tenant]]` entry.
    #[error("the tenants file defines no tenant")]
    NoTenants,
    /// Two entries share a tenant id.
    #[error("tenant {0} is defined twice")]
    DuplicateTenant(TenantId),
    /// A tenant has no key, so nobody could send as it.
    #[error("tenant {0} has no API key (api_keys is empty)")]
    NoKeys(TenantId),
    /// A key is empty or has characters that cannot travel in an HTTP header.
    #[error(
        "tenant {tenant}: API key #{index} is empty or has characters other than visible ASCII"
    )]
    BadKey {
        /// The tenant.
        tenant: TenantId,
        /// Position of the key in the tenant's `api_keys` (from 1).
        index: usize,
    },
    /// A key written with `scopes = []`, which could do nothing.
    #[error("tenant {tenant}: API key #{index} has no scope (scopes is empty)")]
    NoScopes {
        /// The tenant.
        tenant: TenantId,
        /// Position of the key in the tenant's `api_keys` (from 1).
        index: usize,
    },
    /// An `amqp_exchanges` entry that may not be granted.
    #[error("tenant {tenant}: amqp_exchanges entry {name:?}: {why}")]
    BadExchange {
        /// The tenant.
        tenant: TenantId,
        /// The entry.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// One broker user is listed under two tenants (or is empty).
    #[error("broker user {name:?} publishes for tenants {first} and {second}; list it under one")]
    SharedUser {
        /// The user.
        name: String,
        /// The tenant that listed it first.
        first: TenantId,
        /// The tenant that listed it again.
        second: TenantId,
    },
    /// An empty `amqp_users` entry.
    #[error("tenant {0}: an amqp_users entry is empty")]
    EmptyUser(TenantId),
    /// A `retention` that is neither a duration nor `"forever"`.
    #[error("tenant {tenant}: {why}")]
    BadRetention {
        /// The tenant.
        tenant: TenantId,
        /// What is wrong.
        why: String,
    },
    /// One exchange is granted to two tenants.
    #[error("exchange {name:?} is granted to tenants {first} and {second}; grant it to one")]
    SharedExchange {
        /// The exchange.
        name: String,
        /// The tenant that listed it first.
        first: TenantId,
        /// The tenant that listed it again.
        second: TenantId,
    },
    /// One key is listed under two tenants (or twice under one); the key itself is not
    /// repeated in the message, which ends up in logs.
    #[error("an API key of tenant {second} is already a key of tenant {first}")]
    DuplicateKey {
        /// The tenant that listed it first.
        first: TenantId,
        /// The tenant that listed it again.
        second: TenantId,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    default_quota: Option<Quota>,
    tenant: Vec<Entry>,
}

/// A tenant's ingest quota: sustained rates over HTTP, each a token bucket refilled at
/// the rate, holding a second of it (and at least one largest request). A request over
/// it is answered 429 with `Retry-After`; nothing of it is published. A field left out
/// (or 0) is unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Readings a second.
    #[serde(default)]
    pub readings_per_sec: u64,
    /// Request body bytes a second (as received, before parsing).
    #[serde(default)]
    pub bytes_per_sec: u64,
}

impl Quota {
    /// No quota.
    pub const UNLIMITED: Quota = Quota {
        readings_per_sec: 0,
        bytes_per_sec: 0,
    };

    /// Whether either rate is bounded.
    pub fn is_limited(&self) -> bool {
        self.readings_per_sec > 0 || self.bytes_per_sec > 0
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    id: TenantId,
    api_keys: Vec<KeyEntry>,
    #[serde(default)]
    amqp_exchanges: Vec<String>,
    #[serde(default)]
    amqp_users: Vec<String>,
    /// How long the tenant's stored readings are kept: a duration (`"90d"`) or `"forever"`;
    /// unset, the deployment's default (`sluice maintain --retention`).
    #[serde(default)]
    retention: Option<String>,
    /// The tenant's ingest quota; unset, the file's `default_quota`.
    #[serde(default)]
    quota: Option<Quota>,
}

/// How long a tenant's stored readings are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Never deleted.
    Forever,
    /// Readings whose UTC day ended longer ago than this are deleted (whole days).
    For(std::time::Duration),
}

impl std::str::FromStr for Retention {
    type Err = String;

    /// `"forever"` or a humantime duration (`"30d"`, `"2w"`, `"12h"`); zero is refused.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.trim() == "forever" {
            return Ok(Self::Forever);
        }
        match humantime::parse_duration(text.trim()) {
            Ok(d) if d.is_zero() => Err(format!("retention {text:?}: must be longer than zero")),
            Ok(d) => Ok(Self::For(d)),
            Err(e) => Err(format!(
                "retention {text:?}: {e} (expected \"forever\" or a duration such as \"90d\")"
            )),
        }
    }
}

/// One `api_keys` entry: a bare key (every scope) or a key with its scopes.
enum KeyEntry {
    Bare(String),
    Scoped(ScopedKey),
}

impl<'de> Deserialize<'de> for KeyEntry {
    // By hand rather than `#[serde(untagged)]`, so that a misspelt scope or field is
    // reported as such (with its line) instead of "did not match any variant".
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = KeyEntry;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a key, or a table { key = \"…\", scopes = [\"ingest\", …] }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<KeyEntry, E> {
                Ok(KeyEntry::Bare(v.to_owned()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<KeyEntry, A::Error> {
                ScopedKey::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(KeyEntry::Scoped)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScopedKey {
    key: String,
    scopes: Vec<Scope>,
}

impl KeyEntry {
    fn parts(&self) -> (&str, Scopes) {
        match self {
            KeyEntry::Bare(key) => (key, Scopes::ALL),
            KeyEntry::Scoped(k) => (&k.key, Scopes::of(&k.scopes)),
        }
    }
}

/// The tenants of a deployment, the key → tenant map and the exchanges granted to each.
#[derive(Clone)]
pub struct Tenants {
    /// Key digest → the key's tenant and scopes.
    by_key_digest: HashMap<[u8; 32], (TenantId, Scopes)>,
    ids: Vec<TenantId>,
    /// Exchange → the tenant it is granted to.
    exchanges: HashMap<String, TenantId>,
    /// Broker user → the tenant it publishes for.
    amqp_users: HashMap<String, TenantId>,
    /// Tenants with their own retention.
    retention: HashMap<TenantId, Retention>,
    /// Each tenant's ingest quota (its own or the default; absent: none).
    quotas: HashMap<TenantId, Quota>,
}

impl std::fmt::Debug for Tenants {
    /// Lists tenant ids only: keys must never reach a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenants")
            .field("ids", &self.ids)
            .field("keys", &self.by_key_digest.len())
            .finish()
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Whether a message from `publisher` may carry data of `tenant`: always for Sluice's own
/// users, for a user listed in `tenants`' `amqp_users` only its own tenant, never for any
/// other user or one the broker does not vouch for. Without a tenants file (a storage pool
/// started without one) only Sluice's own users are accepted. The refusal (`forbidden`)
/// says why, for the dead letter.
pub fn check_publisher(
    tenants: Option<&Tenants>,
    publisher: &Publisher,
    tenant: &str,
) -> Result<(), Refusal> {
    let forbidden = |reason: String| Err(Refusal::new(DeadLetterKind::Forbidden, reason));
    match publisher {
        Publisher::Sluice => Ok(()),
        Publisher::User(user) => match tenants.and_then(|t| t.amqp_users.get(user)) {
            Some(own) if own.as_str() == tenant => Ok(()),
            Some(own) => forbidden(format!(
                "broker user {user:?} publishes for tenant {own}, not {tenant}"
            )),
            None => forbidden(format!(
                "broker user {user:?} is not listed in any tenant's amqp_users"
            )),
        },
        Publisher::Unknown => forbidden(
            "no user_id: a direct publisher sets the AMQP user_id property to its broker user \
             (docs/binding.md section 6)"
                .to_owned(),
        ),
    }
}

/// [`check_publisher`] for a telemetry batch on the partitions: also refuses a batch that a
/// gated tenant's own broker user published there. A tenant with a quota and `amqp_users`
/// is gated: its users publish to its ingress exchange, which ingest's gate drains at the
/// quota and forwards as Sluice's own user, so a batch of theirs on the partitions went
/// around the quota (its permissions are wider than section 6 says).
pub fn check_batch_publisher(
    tenants: Option<&Tenants>,
    publisher: &Publisher,
    tenant: &str,
) -> Result<(), Refusal> {
    check_publisher(tenants, publisher, tenant)?;
    if let (Some(t), Publisher::User(user)) = (tenants, publisher)
        && let Some(own) = t.amqp_users.get(user)
        && t.is_gated(own)
    {
        return Err(Refusal::new(
            DeadLetterKind::Forbidden,
            format!(
                "tenant {own} has a quota: its broker user {user:?} publishes batches to the \
                 tenant's ingress exchange (<namespace>.ingress.{own}, docs/binding.md section 6), \
                 not to the partitions"
            ),
        ));
    }
    Ok(())
}

impl Tenants {
    /// Reads and checks a tenants file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, TenantsError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| TenantsError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_str(&text)
    }

    /// Parses and checks the text of a tenants file.
    pub fn from_toml_str(text: &str) -> Result<Self, TenantsError> {
        let file: File = toml::from_str(text)?;
        if file.tenant.is_empty() {
            return Err(TenantsError::NoTenants);
        }
        let mut ids = Vec::with_capacity(file.tenant.len());
        let mut seen = HashSet::new();
        let mut by_key_digest = HashMap::new();
        let mut exchanges: HashMap<String, TenantId> = HashMap::new();
        let mut amqp_users: HashMap<String, TenantId> = HashMap::new();
        let mut retention = HashMap::new();
        let mut quotas = HashMap::new();
        for entry in file.tenant {
            if !seen.insert(entry.id.clone()) {
                return Err(TenantsError::DuplicateTenant(entry.id));
            }
            if entry.api_keys.is_empty() {
                return Err(TenantsError::NoKeys(entry.id));
            }
            for (i, key) in entry.api_keys.iter().enumerate() {
                let (key, scopes) = key.parts();
                if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(TenantsError::BadKey {
                        tenant: entry.id,
                        index: i + 1,
                    });
                }
                if scopes == Scopes::of(&[]) {
                    return Err(TenantsError::NoScopes {
                        tenant: entry.id,
                        index: i + 1,
                    });
                }
                let previous = by_key_digest.insert(digest(key), (entry.id.clone(), scopes));
                if let Some((first, _)) = previous {
                    return Err(TenantsError::DuplicateKey {
                        first,
                        second: entry.id,
                    });
                }
            }
            for name in entry.amqp_exchanges {
                let why = if name.is_empty() {
                    Some("the default exchange is never granted")
                } else if name.len() > 255 {
                    Some("longer than 255 bytes")
                } else if name.starts_with("amq.") {
                    Some("amq.* exchanges are the broker's own")
                } else {
                    None
                };
                if let Some(why) = why {
                    return Err(TenantsError::BadExchange {
                        tenant: entry.id,
                        name,
                        why,
                    });
                }
                match exchanges.get(&name) {
                    Some(first) if *first != entry.id => {
                        return Err(TenantsError::SharedExchange {
                            name,
                            first: first.clone(),
                            second: entry.id,
                        });
                    }
                    _ => {
                        exchanges.insert(name, entry.id.clone());
                    }
                }
            }
            for name in entry.amqp_users {
                if name.is_empty() {
                    return Err(TenantsError::EmptyUser(entry.id));
                }
                match amqp_users.get(&name) {
                    Some(first) if *first != entry.id => {
                        return Err(TenantsError::SharedUser {
                            name,
                            first: first.clone(),
                            second: entry.id,
                        });
                    }
                    _ => {
                        amqp_users.insert(name, entry.id.clone());
                    }
                }
            }
            if let Some(text) = &entry.retention {
                let r = text
                    .parse::<Retention>()
                    .map_err(|why| TenantsError::BadRetention {
                        tenant: entry.id.clone(),
                        why,
                    })?;
                retention.insert(entry.id.clone(), r);
            }
            if let Some(q) = entry.quota.or(file.default_quota)
                && q.is_limited()
            {
                quotas.insert(entry.id.clone(), q);
            }
            ids.push(entry.id);
        }
        Ok(Self {
            by_key_digest,
            ids,
            exchanges,
            amqp_users,
            retention,
            quotas,
        })
    }

    /// A single tenant with the given keys (tests, embedded mode).
    pub fn single(id: TenantId, api_keys: &[&str]) -> Self {
        Self {
            by_key_digest: api_keys
                .iter()
                .map(|k| (digest(k), (id.clone(), Scopes::ALL)))
                .collect(),
            ids: vec![id],
            exchanges: HashMap::new(),
            amqp_users: HashMap::new(),
            retention: HashMap::new(),
            quotas: HashMap::new(),
        }
    }

    /// The tenant's own retention, if the file sets one.
    pub fn retention(&self, tenant: &TenantId) -> Option<Retention> {
        self.retention.get(tenant).copied()
    }

    /// The tenant's ingest quota ([`Quota::UNLIMITED`] when the file sets none).
    pub fn quota(&self, tenant: &TenantId) -> Quota {
        self.quotas.get(tenant).copied().unwrap_or(Quota::UNLIMITED)
    }

    /// Every tenant with its own retention.
    pub fn retentions(&self) -> impl Iterator<Item = (&TenantId, Retention)> {
        self.retention.iter().map(|(t, r)| (t, *r))
    }

    /// Sets `tenant`'s ingest quota (tests, embedded mode).
    pub fn with_quota(mut self, tenant: &TenantId, quota: Quota) -> Self {
        if quota.is_limited() {
            self.quotas.insert(tenant.clone(), quota);
        } else {
            self.quotas.remove(tenant);
        }
        self
    }

    /// Grants `tenant` the AMQP exchange `name` (tests, embedded mode); the same rules as
    /// the file's `amqp_exchanges` are the caller's to keep.
    pub fn grant_exchange(mut self, tenant: &TenantId, name: &str) -> Self {
        self.exchanges.insert(name.to_owned(), tenant.clone());
        self
    }

    /// Maps the broker user `name` to `tenant` (tests, embedded mode); the same rules as
    /// the file's `amqp_users` are the caller's to keep.
    pub fn with_amqp_user(mut self, tenant: &TenantId, name: &str) -> Self {
        self.amqp_users.insert(name.to_owned(), tenant.clone());
        self
    }

    /// Whether a message from `publisher` may carry data of `tenant`
    /// ([`check_publisher`] with this file's `amqp_users`).
    pub fn check_publisher(&self, publisher: &Publisher, tenant: &str) -> Result<(), Refusal> {
        check_publisher(Some(self), publisher, tenant)
    }

    /// [`check_batch_publisher`] with this file.
    pub fn check_batch_publisher(
        &self,
        publisher: &Publisher,
        tenant: &str,
    ) -> Result<(), Refusal> {
        check_batch_publisher(Some(self), publisher, tenant)
    }

    /// Whether `tenant`'s direct publishers go through ingest's gate: it has a quota and at
    /// least one broker user.
    pub fn is_gated(&self, tenant: &TenantId) -> bool {
        self.quota(tenant).is_limited() && self.amqp_users.values().any(|t| t == tenant)
    }

    /// The gated tenants ([`Tenants::is_gated`]), in file order.
    pub fn gated(&self) -> Vec<TenantId> {
        self.ids
            .iter()
            .filter(|t| self.is_gated(t))
            .cloned()
            .collect()
    }

    /// Whether `publisher` is one of `tenant`'s broker users.
    pub fn is_amqp_user_of(&self, publisher: &Publisher, tenant: &TenantId) -> bool {
        matches!(publisher, Publisher::User(u) if self.amqp_users.get(u) == Some(tenant))
    }

    /// Every granted AMQP exchange with its tenant.
    pub fn granted_exchanges(&self) -> impl Iterator<Item = (&str, &TenantId)> {
        self.exchanges.iter().map(|(name, t)| (name.as_str(), t))
    }

    /// Whether `tenant` may publish notifications to the AMQP exchange `name`.
    pub fn may_publish_to(&self, tenant: &TenantId, name: &str) -> bool {
        self.exchanges.get(name) == Some(tenant)
    }

    /// Adds a key of `tenant` with `scopes` (tests, embedded mode); the same rules as the
    /// file's `api_keys` are the caller's to keep.
    pub fn with_key(mut self, tenant: &TenantId, key: &str, scopes: Scopes) -> Self {
        self.by_key_digest
            .insert(digest(key), (tenant.clone(), scopes));
        self
    }

    /// The tenant a key belongs to, and what the key may do.
    pub fn lookup(&self, key: &str) -> Option<(&TenantId, Scopes)> {
        self.by_key_digest
            .get(&digest(key))
            .map(|(tenant, scopes)| (tenant, *scopes))
    }

    /// The tenant whose key the request presents ([`api_key`]), if the key has `scope`.
    pub fn authenticate(&self, headers: &HeaderMap, scope: Scope) -> Result<&TenantId, AuthError> {
        let (tenant, scopes) = self
            .lookup(api_key(headers)?)
            .ok_or(AuthError::UnknownKey)?;
        if scopes.contains(scope) {
            Ok(tenant)
        } else {
            Err(AuthError::MissingScope(scope))
        }
    }

    /// Every tenant id, in file order.
    pub fn ids(&self) -> &[TenantId] {
        &self.ids
    }

    /// Number of tenants.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there is no tenant (only possible through [`Tenants::single`] misuse: files
    /// must define one).
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Tenants::from_toml_str(text).unwrap_err().to_string()
    }

    #[test]
    fn parses_the_deployed_example() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/tenants.example.toml"
        );
        let t = Tenants::load(path).unwrap();
        let ids: Vec<&str> = t.ids().iter().map(TenantId::as_str).collect();
        assert_eq!(ids, ["demo", "acme"]);
        let tenant = |key: &str| t.lookup(key).map(|(id, _)| id.as_str().to_owned());
        assert_eq!(tenant("demo-key-change-me").unwrap(), "demo");
        assert_eq!(tenant("acme-key-change-me").unwrap(), "acme");
        assert_eq!(tenant("acme-key-rotated-change-me").unwrap(), "acme");
        assert_eq!(tenant("demo-key-change-m"), None);
        assert_eq!(tenant(""), None);
        assert_eq!(t.lookup("demo-key-change-me").unwrap().1, Scopes::ALL);
        let (_, device) = t.lookup("demo-device-key-change-me").unwrap();
        assert!(device.contains(Scope::Ingest));
        assert!(!device.contains(Scope::Subscribe));
    }

    #[test]
    fn retention_is_a_duration_or_forever() {
        let t = Tenants::from_toml_str(
            "[[tenant]]\nid = \"a\"\napi_keys = [\"k1\"]\nretention = \"30d\"\n\
             [[tenant]]\nid = \"b\"\napi_keys = [\"k2\"]\nretention = \"forever\"\n\
             [[tenant]]\nid = \"c\"\napi_keys = [\"k3\"]\n",
        )
        .unwrap();
        let id = |s: &str| TenantId::new(s).unwrap();
        assert_eq!(
            t.retention(&id("a")),
            Some(Retention::For(std::time::Duration::from_secs(30 * 86_400)))
        );
        assert_eq!(t.retention(&id("b")), Some(Retention::Forever));
        assert_eq!(t.retention(&id("c")), None);
        let bad = err("[[tenant]]\nid = \"a\"\napi_keys = [\"k\"]\nretention = \"soon\"\n");
        assert!(bad.contains("tenant a: retention \"soon\""), "{bad}");
        let zero = err("[[tenant]]\nid = \"a\"\napi_keys = [\"k\"]\nretention = \"0s\"\n");
        assert!(zero.contains("longer than zero"), "{zero}");
    }

    #[test]
    fn a_tenant_s_quota_is_its_own_else_the_default_else_none() {
        let id = |s: &str| TenantId::new(s).unwrap();
        let t = Tenants::from_toml_str(
            "default_quota = { readings_per_sec = 1000 }\n\
             [[tenant]]\nid = \"a\"\napi_keys = [\"k1\"]\n\
             quota = { readings_per_sec = 50, bytes_per_sec = 4096 }\n\
             [[tenant]]\nid = \"b\"\napi_keys = [\"k2\"]\n\
             [[tenant]]\nid = \"c\"\napi_keys = [\"k3\"]\nquota = {}\n",
        )
        .unwrap();
        assert_eq!(
            t.quota(&id("a")),
            Quota {
                readings_per_sec: 50,
                bytes_per_sec: 4096
            }
        );
        assert_eq!(t.quota(&id("b")).readings_per_sec, 1000);
        assert_eq!(
            t.quota(&id("c")),
            Quota::UNLIMITED,
            "an empty quota lifts the default"
        );
        let none = Tenants::from_toml_str("[[tenant]]\nid = \"a\"\napi_keys = [\"k\"]\n").unwrap();
        assert_eq!(none.quota(&id("a")), Quota::UNLIMITED);
        let bad = err("[[tenant]]\nid = \"a\"\napi_keys = [\"k\"]\nquota = { readings = 5 }\n");
        assert!(bad.contains("unknown field `readings`"), "{bad}");
    }

    #[test]
    fn debug_never_shows_keys() {
        let t =
            Tenants::from_toml_str("[[tenant]]\nid = \"a\"\napi_keys = [\"s3cret\"]\n").unwrap();
        let dbg = format!("{t:?}");
        assert!(!dbg.contains("s3cret"), "{dbg}");
        assert!(dbg.contains("\"a\""), "{dbg}");
    }

    #[test]
    fn refuses_bad_files() {
        assert!(err("").contains("missing field `tenant`"));
        assert!(err("tenant = []").contains("no tenant"));
        let unknown = err("[[tenant]]\nid = \"a\"\napi_keys = [\"k\"]\nkeys = []\n");
        assert!(unknown.contains("unknown field `keys`"), "{unknown}");
        let bad_id = err("[[tenant]]\nid = \"Acme\"\napi_keys = [\"k\"]\n");
        assert!(bad_id.contains("invalid tenant id \"Acme\""), "{bad_id}");
        assert!(bad_id.contains("line 2"), "{bad_id}");
        assert_eq!(
            err("[[tenant]]\nid = \"a\"\napi_keys = []\n"),
            "tenant a has no API key (api_keys is empty)"
        );
        assert!(err("[[tenant]]\nid = \"a\"\napi_keys = [\"\"]\n").contains("key #1 is empty"));
        assert!(
            err("[[tenant]]\nid = \"a\"\napi_keys = [\"k\", \"two words\"]\n").contains("key #2")
        );
        assert_eq!(
            err(
                "[[tenant]]\nid = \"a\"\napi_keys = [\"k\"]\n[[tenant]]\nid = \"a\"\napi_keys = [\"j\"]\n"
            ),
            "tenant a is defined twice"
        );
        let dup = err(
            "[[tenant]]\nid = \"a\"\napi_keys = [\"shared\"]\n[[tenant]]\nid = \"b\"\napi_keys = [\"shared\"]\n",
        );
        assert_eq!(dup, "an API key of tenant b is already a key of tenant a");
        assert!(!dup.contains("shared"));
    }

    #[test]
    fn exchanges_are_granted_to_one_tenant_each() {
        let t = Tenants::from_toml_str(
            "[[tenant]]\nid = \"a\"\napi_keys = [\"k\"]\namqp_exchanges = [\"a.alerts\"]\n\
             [[tenant]]\nid = \"b\"\napi_keys = [\"j\"]\n",
        )
        .unwrap();
        let (a, b) = (TenantId::new("a").unwrap(), TenantId::new("b").unwrap());
        assert!(t.may_publish_to(&a, "a.alerts"));
        assert!(!t.may_publish_to(&b, "a.alerts"));
        assert!(!t.may_publish_to(&a, ""));
        assert!(!t.may_publish_to(&a, "a.other"));
        let shared = err(
            "[[tenant]]\nid = \"a\"\napi_keys = [\"k\"]\namqp_exchanges = [\"x\"]\n\
             [[tenant]]\nid = \"b\"\napi_keys = [\"j\"]\namqp_exchanges = [\"x\"]\n",
        );
        assert!(shared.contains("granted to tenants a and b"), "{shared}");
        for (name, why) in [("", "default exchange"), ("amq.topic", "broker's own")] {
            let e = err(&format!(
                "[[tenant]]\nid = \"a\"\napi_keys = [\"k\"]\namqp_exchanges = [\"{name}\"]\n"
            ));
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn requests_authenticate_with_a_bearer_or_x_api_key_header() {
        let t = Tenants::single(TenantId::new("a").unwrap(), &["k1"]);
        let headers = |pairs: &[(&'static str, &[u8])]| {
            let mut h = HeaderMap::new();
            for (name, value) in pairs {
                h.insert(*name, http::HeaderValue::from_bytes(value).unwrap());
            }
            h
        };
        let ok = |h: HeaderMap| {
            t.authenticate(&h, Scope::Ingest)
                .map(|id| id.as_str().to_owned())
        };
        assert_eq!(
            ok(headers(&[("authorization", b"Bearer k1")])).unwrap(),
            "a"
        );
        assert_eq!(
            ok(headers(&[("authorization", b" bearer  k1 ")])).unwrap(),
            "a"
        );
        assert_eq!(ok(headers(&[("x-api-key", b" k1 ")])).unwrap(), "a");
        // Authorization wins over X-Api-Key.
        let both = headers(&[("authorization", b"Bearer nope"), ("x-api-key", b"k1")]);
        assert_eq!(ok(both), Err(AuthError::UnknownKey));
        assert_eq!(ok(headers(&[])), Err(AuthError::Missing));
        assert_eq!(
            ok(headers(&[("x-api-key", b"  ")])),
            Err(AuthError::Missing)
        );
        assert_eq!(
            ok(headers(&[("authorization", b"Basic k1")])),
            Err(AuthError::NotBearer)
        );
        assert_eq!(
            ok(headers(&[("authorization", b"Bearer ")])),
            Err(AuthError::EmptyBearer)
        );
        assert_eq!(
            ok(headers(&[("x-api-key", b"k\xff")])),
            Err(AuthError::NotAscii("X-Api-Key"))
        );
        assert_eq!(
            AuthError::NotAscii("Authorization").to_string(),
            "the Authorization header is not visible ASCII"
        );
    }

    #[test]
    fn keys_carry_scopes_and_a_key_without_the_scope_is_forbidden() {
        let t = Tenants::from_toml_str(
            "[[tenant]]\nid = \"a\"\napi_keys = [\"all\", { key = \"dev\", scopes = [\"ingest\"] }, \
             { key = \"ops\", scopes = [\"subscribe\", \"query\"] }]\n",
        )
        .unwrap();
        let with = |key: &str| {
            let mut h = HeaderMap::new();
            h.insert("x-api-key", key.parse().unwrap());
            h
        };
        for scope in Scope::ALL {
            assert!(t.authenticate(&with("all"), scope).is_ok(), "{scope:?}");
        }
        assert!(t.authenticate(&with("dev"), Scope::Ingest).is_ok());
        let denied = t.authenticate(&with("dev"), Scope::Subscribe).unwrap_err();
        assert_eq!(denied, AuthError::MissingScope(Scope::Subscribe));
        assert_eq!(denied.status(), 403);
        assert_eq!(
            denied.to_string(),
            "this API key may not manage subscriptions: it lacks the subscribe scope"
        );
        assert_eq!(
            t.authenticate(&with("ops"), Scope::Ingest),
            Err(AuthError::MissingScope(Scope::Ingest))
        );
        assert!(t.authenticate(&with("ops"), Scope::Query).is_ok());
        assert_eq!(
            t.authenticate(&with("nope"), Scope::Ingest)
                .unwrap_err()
                .status(),
            401
        );
    }

    #[test]
    fn bad_scoped_keys_are_refused_with_what_is_wrong() {
        let typo =
            err("[[tenant]]\nid = \"a\"\napi_keys = [{ key = \"k\", scopes = [\"ingst\"] }]\n");
        assert!(typo.contains("unknown variant `ingst`"), "{typo}");
        let field = err("[[tenant]]\nid = \"a\"\napi_keys = [{ key = \"k\", scope = [] }]\n");
        assert!(field.contains("unknown field `scope`"), "{field}");
        assert_eq!(
            err("[[tenant]]\nid = \"a\"\napi_keys = [{ key = \"k\", scopes = [] }]\n"),
            "tenant a: API key #1 has no scope (scopes is empty)"
        );
        let dup = err(
            "[[tenant]]\nid = \"a\"\napi_keys = [\"k\", { key = \"k\", scopes = [\"ingest\"] }]\n",
        );
        assert!(dup.contains("already a key of tenant a"), "{dup}");
    }

    #[test]
    fn direct_publishers_are_held_to_their_tenant() {
        let t = Tenants::from_toml_str(
            "[[tenant]]\nid = \"a\"\napi_keys = [\"k\"]\namqp_users = [\"a-gw\"]\n\
             [[tenant]]\nid = \"b\"\napi_keys = [\"j\"]\n",
        )
        .unwrap();
        let user = |u: &str| Publisher::User(u.to_owned());
        assert_eq!(t.check_publisher(&Publisher::Sluice, "b"), Ok(()));
        assert_eq!(t.check_publisher(&user("a-gw"), "a"), Ok(()));
        let other = t.check_publisher(&user("a-gw"), "b").unwrap_err();
        assert_eq!(other.kind, DeadLetterKind::Forbidden);
        assert_eq!(
            other.reason,
            "broker user \"a-gw\" publishes for tenant a, not b"
        );
        let unmapped = t.check_publisher(&user("mallory"), "a").unwrap_err();
        assert!(unmapped.reason.contains("not listed"), "{unmapped}");
        let unknown = t.check_publisher(&Publisher::Unknown, "a").unwrap_err();
        assert_eq!(unknown.kind, DeadLetterKind::Forbidden);
        // Without a tenants file only Sluice's own users pass.
        assert_eq!(check_publisher(None, &Publisher::Sluice, "a"), Ok(()));
        assert!(check_publisher(None, &user("a-gw"), "a").is_err());
        let shared = err(
            "[[tenant]]\nid = \"a\"\napi_keys = [\"k\"]\namqp_users = [\"gw\"]\n\
             [[tenant]]\nid = \"b\"\napi_keys = [\"j\"]\namqp_users = [\"gw\"]\n",
        );
        assert!(shared.contains("publishes for tenants a and b"), "{shared}");
    }

    #[test]
    fn a_gated_tenants_users_publish_batches_through_its_ingress_only() {
        let t = Tenants::from_toml_str(
            "[[tenant]]\nid = \"a\"\napi_keys = [\"k\"]\namqp_users = [\"a-gw\"]\n\
             quota = { readings_per_sec = 10 }\n\
             [[tenant]]\nid = \"b\"\napi_keys = [\"j\"]\namqp_users = [\"b-gw\"]\n\
             [[tenant]]\nid = \"c\"\napi_keys = [\"i\"]\nquota = { bytes_per_sec = 10 }\n",
        )
        .unwrap();
        let id = |s: &str| TenantId::new(s).unwrap();
        let user = |u: &str| Publisher::User(u.to_owned());
        // a: a quota and a broker user; b: no quota; c: no broker user.
        assert_eq!(t.gated(), vec![id("a")]);
        assert!(t.is_amqp_user_of(&user("a-gw"), &id("a")));
        assert!(!t.is_amqp_user_of(&user("b-gw"), &id("a")));
        assert!(!t.is_amqp_user_of(&Publisher::Sluice, &id("a")));
        let around = t.check_batch_publisher(&user("a-gw"), "a").unwrap_err();
        assert_eq!(around.kind, DeadLetterKind::Forbidden);
        assert!(around.reason.contains("ingress exchange"), "{around}");
        // Derived events are not gated; the gate's forwarded batches come as Sluice's own.
        assert_eq!(t.check_publisher(&user("a-gw"), "a"), Ok(()));
        assert_eq!(t.check_batch_publisher(&Publisher::Sluice, "a"), Ok(()));
        assert_eq!(t.check_batch_publisher(&user("b-gw"), "b"), Ok(()));
        assert!(t.check_batch_publisher(&user("b-gw"), "a").is_err());
    }

    #[test]
    fn load_reports_the_path() {
        let e = Tenants::load("/nonexistent/tenants.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/tenants.toml"), "{e}");
    }
}
