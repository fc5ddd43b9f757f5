//! What the end-to-end and fault tests share: the binaries, child processes that die with
//! the test, row counts through DataFusion, and (with `broker-tests`) one test's isolated
//! world on the broker, in Redis and on disk. Service addresses, namespaces and their
//! teardown, and polling come from `sluice_testkit`.
#![allow(dead_code, unreachable_pub)] // each test binary uses its own part

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sluice_testkit::store;

pub fn sluice_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sluice"))
}

/// loadgen is another package's binary: `cargo test --workspace` builds it because that
/// package has integration tests of its own (loadgen/tests/cli.rs).
pub fn loadgen_bin() -> PathBuf {
    let p = sluice_bin().with_file_name(format!("loadgen{}", std::env::consts::EXE_SUFFIX));
    assert!(
        p.exists(),
        "{} missing: run the tests with `cargo test --workspace` (scripts/test.sh)",
        p.display()
    );
    p
}

/// A child process killed (SIGKILL) when dropped, so a failing test leaves nothing behind.
pub struct Proc {
    pub child: Child,
    pub name: &'static str,
}

impl Proc {
    pub fn spawn(name: &'static str, cmd: &mut Command) -> Self {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc { child, name }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not stop on SIGTERM",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// [`sluice_testkit::store::count`], for these synchronous tests.
pub fn count_rows(data: &Path, tenant: &str, sql: &str) -> u64 {
    block_on(store::count(data, tenant, sql))
}

pub fn total_rows(data: &Path, tenant: &str) -> u64 {
    block_on(store::total(data, tenant))
}

pub fn distinct_rows(data: &Path, tenant: &str) -> u64 {
    block_on(store::distinct(data, tenant))
}

/// Runs `f` to completion on a runtime of its own.
fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

pub fn output_ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The loadgen summary JSON (the last JSON document on stdout).
pub fn summary(stdout: &str) -> serde_json::Value {
    let start = stdout.find('{').expect("summary JSON on stdout");
    serde_json::from_str(&stdout[start..]).expect("summary JSON")
}

#[cfg(feature = "broker-tests")]
pub mod load;

#[cfg(feature = "broker-tests")]
pub mod broker {
    //! The world of a test against real RabbitMQ and Redis.

    use super::*;
    use sluice_sinks::latest::RedisLatest;
    pub use sluice_testkit::env::{amqp_addr, redis_url};
    use sluice_testkit::wait::wait_for;
    pub use sluice_testkit::wait::wait_until;
    use sluice_testkit::{Namespace, amqp};

    pub const PARTITIONS: u32 = 4;

    /// One test's isolated world: namespace on the broker and in Redis (torn down when the
    /// world is dropped), data directory.
    pub struct World {
        pub ns: Namespace,
        pub dir: tempfile::TempDir,
        pub tenants: PathBuf,
        /// The brokers the services are given (`--amqp-url`).
        pub amqp: Vec<String>,
    }

    impl World {
        pub fn new() -> Self {
            // The storage pool's and, when a test runs one, the router's objects.
            let ns = Namespace::new("t")
                .on_broker(PARTITIONS, &["storage", "router"])
                .with_router(sluice_router::RouterConfig::default().notify_partitions)
                .in_redis();
            Self::with(ns, vec![amqp_addr()])
        }

        /// A world on brokers of the test's own (nodes it starts and throws away, so
        /// nothing is torn down on them); Redis is still shared and cleaned.
        pub fn on_brokers(amqp: Vec<String>) -> Self {
            // on_broker only for the topology's names: the teardown's deletes on the shared
            // broker find nothing of this namespace there.
            let ns = Namespace::new("t").on_broker(PARTITIONS, &[]).in_redis();
            Self::with(ns, amqp)
        }

        fn with(ns: Namespace, amqp: Vec<String>) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let tenants = dir.path().join("tenants.toml");
            std::fs::write(
                &tenants,
                "[[tenant]]\nid = \"acme\"\napi_keys = [\"acme-key\"]\n\n[[tenant]]\nid = \"other\"\napi_keys = [\"other-key\"]\n",
            )
            .unwrap();
            World {
                ns,
                dir,
                tenants,
                amqp,
            }
        }

        pub fn data(&self) -> PathBuf {
            self.dir.path().join("data")
        }

        pub fn common(&self, cmd: &mut Command) {
            cmd.env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .env("SLUICE_AMQP_URL", self.amqp.join(","))
                .env("SLUICE_NAMESPACE", self.ns.name())
                .env("SLUICE_PARTITIONS", PARTITIONS.to_string())
                .env("SLUICE_METRICS_LISTEN", "")
                .env("SLUICE_ADMIN_LISTEN", "")
                .env("SLUICE_LOG", "warn");
        }

        pub fn processors(&self) -> Proc {
            self.processors_with(&[])
        }

        pub fn processors_with(&self, extra: &[(&str, &str)]) -> Proc {
            let mut cmd = Command::new(sluice_bin());
            self.common(&mut cmd);
            cmd.arg("process")
                .env("SLUICE_STORE", self.data())
                .env("SLUICE_REDIS_URL", redis_url())
                .env("SLUICE_REDIS_PREFIX", self.ns.name())
                .env("SLUICE_FLUSH_INTERVAL", "200ms")
                .env("SLUICE_PREFETCH", "200");
            for (k, v) in extra {
                cmd.env(k, v);
            }
            let p = Proc::spawn("processors", &mut cmd);
            self.wait_for_queues();
            p
        }

        pub fn ingest(&self, extra: &[(&str, &str)]) -> (Proc, String) {
            self.ingest_on(free_port(), extra)
        }

        /// Ingest listening on `port` (a restarted one takes its predecessor's); returns once
        /// it is ready.
        pub fn ingest_on(&self, port: u16, extra: &[(&str, &str)]) -> (Proc, String) {
            let mut cmd = Command::new(sluice_bin());
            self.common(&mut cmd);
            cmd.arg("ingest")
                .env("SLUICE_LISTEN", format!("127.0.0.1:{port}"))
                .env("SLUICE_TENANTS", &self.tenants);
            for (k, v) in extra {
                cmd.env(k, v);
            }
            let p = Proc::spawn("ingest", &mut cmd);
            let url = format!("http://127.0.0.1:{port}");
            let http = Http::new();
            wait_until("ingest /readyz", Duration::from_secs(60), || {
                http.ready(&format!("{url}/readyz"))
            });
            (p, url)
        }

        pub fn loadgen(&self, args: &[&str]) -> serde_json::Value {
            let out = Command::new(loadgen_bin())
                .args([
                    "--amqp-url",
                    &self.amqp.join(","),
                    "--namespace",
                    self.ns.name(),
                ])
                .args(["--partitions", &PARTITIONS.to_string(), "--json", "--quiet"])
                .arg("--out")
                .arg(self.dir.path().join("results"))
                .args(args)
                .output()
                .unwrap();
            summary(&output_ok(&out, "loadgen"))
        }

        /// Loadgen straight to the broker in the background: `count` readings at `rate`/s.
        pub fn background_load(
            &self,
            count: u64,
            rate: u64,
            batch: u32,
        ) -> std::thread::JoinHandle<Output> {
            let (ns, amqp) = (self.ns.name().to_owned(), self.amqp.join(","));
            let dir = self.dir.path().join("results");
            let (count, rate, batch) = (count.to_string(), rate.to_string(), batch.to_string());
            std::thread::spawn(move || {
                Command::new(loadgen_bin())
                    .args(["--amqp-url", &amqp, "--namespace", &ns])
                    .args(["--partitions", &PARTITIONS.to_string()])
                    .args(["--target", "amqp", "--tenant", "acme", "--devices", "50"])
                    .args(["--count", &count, "--rate", &rate, "--batch-size", &batch])
                    .args(["--duration", "300s", "--json", "--quiet"])
                    .args(["--drain-timeout", "1s"])
                    .arg("--out")
                    .arg(dir)
                    .output()
                    .unwrap()
            })
        }

        /// A router with its API on `port`; `extra` environment variables override.
        pub fn router_with(&self, port: u16, extra: &[(&str, &str)]) -> Proc {
            let mut cmd = Command::new(sluice_bin());
            self.common(&mut cmd);
            cmd.arg("router")
                .env("SLUICE_ROUTER_LISTEN", format!("127.0.0.1:{port}"))
                .env("SLUICE_TENANTS", &self.tenants)
                .env("SLUICE_REDIS_URL", redis_url())
                .env("SLUICE_REDIS_PREFIX", self.ns.name())
                .env("SLUICE_WEBHOOK_ALLOW", "127.0.0.1");
            for (k, v) in extra {
                cmd.env(k, v);
            }
            let p = Proc::spawn("router", &mut cmd);
            let http = Http::new();
            wait_until("router /healthz", Duration::from_secs(60), || {
                http.ready(&format!("http://127.0.0.1:{port}/healthz"))
            });
            p
        }

        pub fn router(&self, port: u16) -> Proc {
            self.router_with(port, &[])
        }

        /// Waits until the processors declared the partition queues on every broker.
        pub fn wait_for_queues(&self) {
            let queue = self
                .ns
                .topology()
                .partition_queue("storage", PARTITIONS - 1);
            rt().block_on(async {
                for url in &self.amqp {
                    let conn =
                        lapin::Connection::connect(url, lapin::ConnectionProperties::default())
                            .await
                            .unwrap_or_else(|e| panic!("broker {url}: {e}"));
                    let what = format!("the queues of {} on {url}", self.ns.name());
                    wait_for(&what, Duration::from_secs(60), || {
                        amqp::ready(&conn, &queue)
                    })
                    .await;
                    let _ = conn.close(200, "done".into()).await;
                }
            });
        }

        pub fn wait_for_rows(&self, tenant: &str, n: u64, timeout: Duration) {
            let data = self.data();
            wait_until(&format!("{n} rows of {tenant}"), timeout, || {
                data.join(format!("tenant={tenant}")).exists() && total_rows(&data, tenant) >= n
            });
        }

        pub fn latest(&self, tenant: &str, device: &str) -> Vec<(String, i64, f64)> {
            self.latest_in(&redis_url(), tenant, device)
        }

        /// The latest values of `device` in the Redis at `url`, by metric.
        pub fn latest_in(&self, url: &str, tenant: &str, device: &str) -> Vec<(String, i64, f64)> {
            rt().block_on(async {
                let r = RedisLatest::connect(url, self.ns.name()).await.unwrap();
                let mut v: Vec<_> = sluice_sinks::latest::LatestStore::Redis(r)
                    .get(tenant, device)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|l| (l.metric, l.ts_ns, l.value))
                    .collect();
                v.sort_by(|a, b| a.0.cmp(&b.0));
                v
            })
        }
    }

    impl Drop for World {
        fn drop(&mut self) {
            // Leave the broker and Redis as we found them.
            self.ns.teardown_blocking();
        }
    }

    /// Events notified so far, as the router's webhook posted them.
    pub type Notified = std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>;

    /// A webhook receiver on loopback (it answers 204 after 20 ms); its URL and the events
    /// it got.
    pub fn webhook_receiver() -> (String, Notified) {
        let got = Notified::default();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let g = got.clone();
        std::thread::spawn(move || {
            rt().block_on(async move {
                let app = axum::Router::new().route(
                    "/hook",
                    axum::routing::post(move |body: axum::body::Bytes| {
                        let g = g.clone();
                        async move {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            let n: serde_json::Value = serde_json::from_slice(&body).unwrap();
                            let events = n["events"].as_array().cloned().unwrap_or_default();
                            g.lock().unwrap().extend(events);
                            axum::http::StatusCode::NO_CONTENT
                        }
                    }),
                );
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        (url, got)
    }

    /// The distinct ids of the events notified.
    pub fn event_ids(got: &Notified) -> std::collections::BTreeSet<String> {
        got.lock()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect()
    }

    pub fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Blocking HTTP for these synchronous tests (a private runtime per call site).
    pub struct Http {
        pub rt: tokio::runtime::Runtime,
        pub client: reqwest::Client,
    }

    impl Http {
        pub fn new() -> Self {
            Http {
                rt: rt(),
                client: reqwest::Client::new(),
            }
        }

        pub fn ready(&self, url: &str) -> bool {
            self.rt
                .block_on(self.client.get(url).send())
                .is_ok_and(|r| r.status().is_success())
        }

        pub fn post(
            &self,
            url: &str,
            key: Option<&str>,
            ctype: &str,
            body: Vec<u8>,
        ) -> (u16, String) {
            self.rt.block_on(async {
                let mut r = self
                    .client
                    .post(url)
                    .header("content-type", ctype)
                    .body(body);
                if let Some(k) = key {
                    r = r.bearer_auth(k);
                }
                let resp = r.send().await.unwrap();
                let status = resp.status().as_u16();
                (status, resp.text().await.unwrap())
            })
        }

        /// The body of a GET (any status).
        pub fn get_text(&self, url: &str) -> String {
            self.rt.block_on(async {
                let resp = self.client.get(url).send().await.unwrap();
                resp.text().await.unwrap()
            })
        }

        /// Like [`Http::post`]; a request that got no answer (connection refused or
        /// reset) is status 0.
        pub fn try_post(&self, url: &str, key: &str, ctype: &str, body: Vec<u8>) -> u16 {
            self.rt.block_on(async {
                let sent = self
                    .client
                    .post(url)
                    .header("content-type", ctype)
                    .bearer_auth(key)
                    .body(body)
                    .send()
                    .await;
                sent.map_or(0, |r| r.status().as_u16())
            })
        }
    }
}
