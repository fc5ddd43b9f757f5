//! Where the services are: `AMQP_ADDR`, `REDIS_URL`, `SLUICE_PYTHON`, `SLUICE_S3_ENDPOINT`
//! and `SLUICE_S3_BUCKET`, as `scripts/test.sh` exports them. All but the Python
//! interpreter default to the local services `scripts/services.sh` starts; the interpreter
//! has no default (it is the venv holding the test requirements).

/// `AMQP_ADDR` when unset: the local node.
pub const DEFAULT_AMQP_ADDR: &str = "amqp://127.0.0.1:5672/%2f";

/// `REDIS_URL` when unset: the local server.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// The broker the tests use (`AMQP_ADDR`).
pub fn amqp_addr() -> String {
    std::env::var("AMQP_ADDR").unwrap_or_else(|_| DEFAULT_AMQP_ADDR.to_owned())
}

/// The Redis the tests use (`REDIS_URL`).
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS_URL.to_owned())
}

/// The Python interpreter that runs `examples/python` (`SLUICE_PYTHON`); panics when unset,
/// naming the script that sets it.
pub fn python() -> String {
    std::env::var("SLUICE_PYTHON").unwrap_or_else(|_| {
        panic!("SLUICE_PYTHON is not set: run the tests through scripts/test.sh")
    })
}

/// `SLUICE_S3_ENDPOINT` when unset: the moto server `scripts/services.sh` starts.
pub const DEFAULT_S3_ENDPOINT: &str = "http://127.0.0.1:9555";

/// `SLUICE_S3_BUCKET` when unset: the bucket `scripts/services.sh` creates.
pub const DEFAULT_S3_BUCKET: &str = "sluice-test";

/// The S3-compatible server the tests use (`SLUICE_S3_ENDPOINT`).
pub fn s3_endpoint() -> String {
    std::env::var("SLUICE_S3_ENDPOINT").unwrap_or_else(|_| DEFAULT_S3_ENDPOINT.to_owned())
}

/// The bucket the tests write under (`SLUICE_S3_BUCKET`).
pub fn s3_bucket() -> String {
    std::env::var("SLUICE_S3_BUCKET").unwrap_or_else(|_| DEFAULT_S3_BUCKET.to_owned())
}

/// A fresh table location in the test bucket: `s3://<bucket>/<prefix>-<uuid>/`.
pub fn s3_store(prefix: &str) -> String {
    format!(
        "s3://{}/{prefix}-{}",
        s3_bucket(),
        uuid::Uuid::new_v4().simple()
    )
}

/// The object store options that reach [`s3_endpoint`] (the test server takes any
/// credentials; these are placeholders, never real ones).
pub fn s3_options() -> std::collections::BTreeMap<String, String> {
    [
        ("aws_endpoint", s3_endpoint()),
        ("aws_region", "us-east-1".to_owned()),
        ("aws_access_key_id", "test".to_owned()),
        ("aws_secret_access_key", "test-secret".to_owned()),
        ("aws_allow_http", "true".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}
