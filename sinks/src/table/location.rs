//! Where the readings table lives: a store URL, its options, and the object store and Delta
//! log store built from them.
//!
//! A location is a local path (`data`, `/var/lib/sluice/readings`, `file:///…`) or an object
//! store URL: `s3://bucket/prefix` for AWS S3 and S3-compatible servers (MinIO, Ceph, moto),
//! and `memory:///` for tests. S3 settings come from the options (object_store's
//! `AmazonS3ConfigKey` names: `aws_endpoint`, `aws_region`, `aws_access_key_id`,
//! `aws_secret_access_key`, `aws_allow_http`, …) and, for whatever the options leave unset,
//! from the usual `AWS_*` environment variables.
//!
//! Concurrent writers on S3 rely on conditional writes (`If-None-Match: *` on the log entry):
//! object_store's default `aws_conditional_put = etag` does that, and AWS S3, MinIO, R2 and
//! moto honour it. A server that ignores the header would let two commits take one version;
//! `sluice` refuses `aws_conditional_put = disabled`.
//!
//! Local files get what object stores give for free and the local file system does not:
//! [`Location::sync`] fsyncs a written file and its directory, so that an acked commit
//! survives a power loss, not only a killed process.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Once};

use deltalake_core::DeltaResult;
use deltalake_core::logstore::{
    LogStore, LogStoreFactory, LogStoreRef, ObjectStoreFactory, ObjectStoreRef, StorageConfig,
    default_logstore, logstore_factories, object_store_factories,
};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjectPath;
use url::Url;

use super::TableError;

/// A parsed store location: the table's URL and the options to reach it.
#[derive(Clone)]
pub struct Location {
    url: Url,
    options: BTreeMap<String, String>,
}

impl fmt::Debug for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the options: they may hold credentials.
        f.debug_struct("Location")
            .field("url", &self.redacted())
            .finish_non_exhaustive()
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Option keys whose values are secrets (masked wherever options are shown).
pub fn is_secret_option(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("secret") || k.contains("token") || k.contains("password")
}

impl Location {
    /// Parses `store`: a URL with a scheme (`s3://`, `file://`, `memory://`), or else a local
    /// path, relative to the working directory or absolute. Local directories are created.
    pub fn parse(store: &str, options: BTreeMap<String, String>) -> Result<Self, TableError> {
        let invalid = |reason: String| TableError::Location {
            location: redact_url_text(store),
            reason,
        };
        if store.trim().is_empty() {
            return Err(invalid("empty store location".into()));
        }
        let url = match Url::parse(store) {
            // A one-letter "scheme" is a Windows drive, not a URL.
            Ok(url) if url.scheme().len() > 1 => url,
            _ => {
                let path = std::path::absolute(store).map_err(|e| invalid(e.to_string()))?;
                std::fs::create_dir_all(&path).map_err(|e| invalid(format!("create: {e}")))?;
                Url::from_directory_path(&path)
                    .map_err(|()| invalid("not an absolute path".into()))?
            }
        };
        let mut url = url;
        match url.scheme() {
            "file" => {
                let path = url
                    .to_file_path()
                    .map_err(|()| invalid("not a local path".into()))?;
                std::fs::create_dir_all(&path).map_err(|e| invalid(format!("create: {e}")))?;
            }
            "memory" => {}
            "s3" | "s3a" => {
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(invalid("s3 URL without a bucket".into()));
                }
                if let Some(v) = options
                    .iter()
                    .find(|(k, _)| {
                        matches!(
                            k.to_ascii_lowercase().as_str(),
                            "aws_conditional_put" | "conditional_put"
                        )
                    })
                    .map(|(_, v)| v)
                    && v.trim() == "disabled"
                {
                    return Err(invalid(
                        "aws_conditional_put = disabled: concurrent commits need conditional \
                         writes (use the default, etag)"
                            .into(),
                    ));
                }
                for key in options.keys() {
                    key.parse::<AmazonS3ConfigKey>()
                        .map_err(|e| invalid(format!("option {key}: {e}")))?;
                }
            }
            other => {
                return Err(invalid(format!(
                    "unsupported scheme {other}:// (expected a local path, file://, s3:// or memory://)"
                )));
            }
        }
        // Table roots are directories; a missing slash would make `join` drop the last segment.
        if !url.path().ends_with('/') {
            let path = format!("{}/", url.path());
            url.set_path(&path);
        }
        register_handlers();
        Ok(Self { url, options })
    }

    /// The table URL.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The URL without user info or query (what logs and errors show).
    pub fn redacted(&self) -> String {
        let mut url = self.url.clone();
        let _ = url.set_username("");
        let _ = url.set_password(None);
        url.set_query(None);
        url.to_string()
    }

    /// The options, secrets masked, for display.
    pub fn options_masked(&self) -> BTreeMap<String, String> {
        self.options
            .iter()
            .map(|(k, v)| {
                let v = if is_secret_option(k) {
                    "***".to_owned()
                } else {
                    v.clone()
                };
                (k.clone(), v)
            })
            .collect()
    }

    /// The local directory of a `file://` location.
    pub fn local_root(&self) -> Option<PathBuf> {
        (self.url.scheme() == "file")
            .then(|| self.url.to_file_path().ok())
            .flatten()
    }

    /// The options as delta-rs takes them.
    fn storage_options(&self) -> HashMap<String, String> {
        self.options
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The Delta log store of this location (rooted at the table).
    pub fn log_store(&self) -> Result<LogStoreRef, TableError> {
        deltalake_core::DeltaTableBuilder::from_url(self.url.clone())
            .and_then(|b| {
                b.with_storage_options(self.storage_options())
                    .build_storage()
            })
            .map_err(|e| TableError::Location {
                location: self.redacted(),
                reason: e.to_string(),
            })
    }

    /// The log store of this location with every store call spending `pace` first (table
    /// maintenance: [`super::pace`]), and the paced root store under it (DataFusion scans
    /// must be given it: their session has its own `file://` store).
    pub(crate) fn paced_log_store(
        &self,
        pace: Arc<super::pace::Pace>,
    ) -> Result<(LogStoreRef, ObjectStoreRef), TableError> {
        let root = self.log_store()?.root_object_store(None);
        let paced: ObjectStoreRef = Arc::new(super::pace::PacedStore::new(root, pace));
        deltalake_core::DeltaTableBuilder::from_url(self.url.clone())
            .and_then(|b| {
                b.with_storage_options(self.storage_options())
                    .with_storage_backend(Arc::clone(&paced), self.url.clone())
                    .build_storage()
            })
            .map(|log_store| (log_store, paced))
            .map_err(|e| TableError::Location {
                location: self.redacted(),
                reason: e.to_string(),
            })
    }

    /// Makes a written object durable on local disk: fsyncs the file and its directory
    /// (object stores are durable once the write returned). `path` is relative to the table.
    pub async fn sync(&self, path: &ObjectPath) -> Result<(), TableError> {
        let Some(root) = self.local_root() else {
            return Ok(());
        };
        let file = root.join(path.as_ref());
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::fs::File::open(&file)?.sync_all()?;
            if let Some(dir) = file.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        })
        .await
        .map_err(|e| TableError::Task(e.to_string()))?
        .map_err(|e| TableError::Sync {
            path: path.to_string(),
            source: e,
        })
    }
}

/// Shows `text` (a store argument that did not parse) without anything credential-like.
fn redact_url_text(text: &str) -> String {
    match Url::parse(text) {
        Ok(mut url) => {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.set_query(None);
            url.to_string()
        }
        Err(_) => text.to_owned(),
    }
}

/// Registers the S3 object store and log store with delta-rs, once per process.
///
/// delta-rs' own S3 crate brings the AWS SDK and a DynamoDB lock; with conditional writes
/// neither is needed, so `s3://` is served by object_store's S3 client and delta-rs'
/// default (conditional-put) log store.
fn register_handlers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for scheme in ["s3://", "s3a://"] {
            let url = Url::parse(scheme).expect("static URL");
            object_store_factories().insert(url.clone(), Arc::new(S3Factory));
            logstore_factories().insert(url, Arc::new(ConditionalPutLogStore));
        }
    });
}

#[derive(Debug)]
struct S3Factory;

impl ObjectStoreFactory for S3Factory {
    fn parse_url_opts(
        &self,
        url: &Url,
        config: &StorageConfig,
    ) -> DeltaResult<(ObjectStoreRef, ObjectPath)> {
        let mut builder = AmazonS3Builder::from_env().with_url(url.as_str());
        for (key, value) in &config.raw {
            let key: AmazonS3ConfigKey = key.parse()?;
            builder = builder.with_config(key, value);
        }
        let store = builder.build()?;
        let path = ObjectPath::from_url_path(url.path())?;
        Ok((Arc::new(store), path))
    }
}

#[derive(Debug)]
struct ConditionalPutLogStore;

impl LogStoreFactory for ConditionalPutLogStore {
    fn with_options(
        &self,
        prefixed_store: ObjectStoreRef,
        root_store: ObjectStoreRef,
        location: &Url,
        options: &StorageConfig,
    ) -> DeltaResult<Arc<dyn LogStore>> {
        Ok(default_logstore(
            prefixed_store,
            root_store,
            location,
            options,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_paths_become_directory_urls() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("readings");
        let loc = Location::parse(path.to_str().expect("utf-8"), BTreeMap::new()).expect("parse");
        assert_eq!(loc.url().scheme(), "file");
        assert!(loc.url().path().ends_with("/readings/"), "{}", loc.url());
        assert!(path.is_dir(), "the directory is created");
        assert_eq!(loc.local_root().expect("local"), path);
    }

    #[test]
    fn s3_urls_are_checked_and_shown_without_secrets() {
        let mut opts = BTreeMap::new();
        opts.insert("aws_secret_access_key".to_owned(), "hunter2".to_owned());
        opts.insert(
            "aws_endpoint".to_owned(),
            "http://127.0.0.1:9000".to_owned(),
        );
        let loc = Location::parse("s3://bucket/prefix", opts.clone()).expect("parse");
        assert_eq!(loc.url().as_str(), "s3://bucket/prefix/");
        assert!(!format!("{loc:?} {loc}").contains("hunter2"));
        assert_eq!(loc.options_masked()["aws_secret_access_key"], "***");

        let err = Location::parse("s3:///prefix", BTreeMap::new()).expect_err("no bucket");
        assert!(err.to_string().contains("bucket"), "{err}");

        opts.insert("no_such_option".to_owned(), "x".to_owned());
        let err = Location::parse("s3://bucket/p", opts).expect_err("unknown option");
        assert!(err.to_string().contains("no_such_option"), "{err}");

        let mut off = BTreeMap::new();
        off.insert("aws_conditional_put".to_owned(), "disabled".to_owned());
        let err = Location::parse("s3://bucket/p", off).expect_err("conditional put off");
        assert!(err.to_string().contains("conditional"), "{err}");

        let err = Location::parse("gopher://x/y", BTreeMap::new()).expect_err("scheme");
        assert!(err.to_string().contains("unsupported scheme"), "{err}");
    }
}
