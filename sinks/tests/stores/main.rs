//! The sinks against real services:
//!
//! - `LatestStore::Redis` against a real Redis (`REDIS_URL`, default
//!   redis://127.0.0.1:6379). Each test uses its own key prefix (a
//!   `sluice_testkit::Namespace`) and deletes its keys afterwards, pass or fail.
//! - The readings table on a real S3-compatible server (`SLUICE_S3_ENDPOINT`, the moto
//!   server of `scripts/services.sh`), each test under a fresh prefix of the test bucket;
//!   and the table read back by an independent reader (the Python `deltalake` package of
//!   `SLUICE_PYTHON`'s venv), from local files and from S3.
#![cfg(feature = "broker-tests")]

mod redis;
mod table;
