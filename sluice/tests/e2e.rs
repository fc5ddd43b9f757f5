//! End-to-end tests: the real `sluice` and `loadgen` binaries (and the Python example)
//! against real RabbitMQ and Redis. Tests needing them are behind the `broker-tests`
//! feature (the README test command enables it); they read `AMQP_ADDR` and `REDIS_URL`,
//! and isolate themselves with a fresh namespace, Redis prefix and data directory each.
//!
//! Counts are exact: every test proves "nothing lost, nothing duplicated" by counting rows
//! through DataFusion, not by trusting the services' own reports.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::*;

#[test]
fn embedded_mode_stores_every_reading_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = Command::new(sluice_bin())
        .args([
            "embedded",
            "--count",
            "100000",
            "--devices",
            "50",
            "--metrics",
            "2",
        ])
        .args(["--rate", "200000", "--duration", "120s", "--json"])
        .args(["--flush-interval", "200ms", "--metrics-listen", ""])
        .arg("--data-dir")
        .arg(&data)
        .arg("--out")
        .arg(dir.path().join("results"))
        .env_remove("SLUICE_REDIS_URL")
        .output()
        .unwrap();
    let stdout = output_ok(&out, "sluice embedded");
    let s = summary(&stdout);
    assert_eq!(s["sent"], 100_000, "{s}");
    assert_eq!(s["accepted"], 100_000, "{s}");
    assert_eq!(s["committed"], 100_000, "{s}");
    assert_eq!(total_rows(&data, "demo"), 100_000);
    assert_eq!(distinct_rows(&data, "demo"), 100_000);
    assert_eq!(
        count_rows(&data, "demo", "SELECT count(DISTINCT device) FROM readings"),
        50
    );
    // The report files a performance engineer reads.
    for f in [
        "summary.json",
        "latency.svg",
        "end-to-end-device-committed.hgrm",
    ] {
        let p = dir.path().join("results").join(f);
        assert!(p.exists(), "{} missing", p.display());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("p99.9"),
        "percentile table on stderr:\n{stderr}"
    );
}

#[test]
fn help_never_shows_secrets_from_the_environment() {
    for cmd in ["ingest", "process", "router", "embedded"] {
        let out = Command::new(sluice_bin())
            .args([cmd, "--help"])
            .env("SLUICE_AMQP_URL", "amqp://user:s3cret@rabbit:5672/%2f")
            .env("SLUICE_REDIS_URL", "redis://:s3cret@redis:6379")
            .output()
            .unwrap();
        let help = output_ok(&out, &format!("sluice {cmd} --help"));
        assert!(
            !help.contains("s3cret"),
            "sluice {cmd} --help shows a secret:\n{help}"
        );
    }
    let out = Command::new(loadgen_bin())
        .arg("--help")
        .env("LOADGEN_AMQP_URL", "amqp://user:s3cret@rabbit:5672/%2f")
        .env("LOADGEN_API_KEY", "s3cret")
        .output()
        .unwrap();
    let help = output_ok(&out, "loadgen --help");
    assert!(
        !help.contains("s3cret"),
        "loadgen --help shows a secret:\n{help}"
    );
}

/// compose.yaml's secure defaults: only ingest and the subscription API listen on every
/// interface; the broker's, Redis's and the dashboards' ports are on loopback; no default
/// credentials (RabbitMQ's and Grafana's passwords are required variables).
#[test]
fn compose_publishes_operator_ports_on_loopback_only_and_defaults_no_credentials() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("compose.yaml")).unwrap();
    assert!(
        !text.contains("guest"),
        "compose.yaml uses RabbitMQ's guest user"
    );
    assert!(
        !text.contains(":-admin}"),
        "compose.yaml defaults a Grafana password"
    );
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let mut published = 0;
    for (name, svc) in doc["services"].as_mapping().expect("services") {
        let name = name.as_str().unwrap();
        for port in svc["ports"].as_sequence().into_iter().flatten() {
            let port = port.as_str().unwrap();
            published += 1;
            let public = matches!(name, "ingest" | "router");
            assert!(
                public || port.starts_with("127.0.0.1:"),
                "service {name} publishes {port} on every interface"
            );
        }
    }
    assert!(published >= 6, "{published} ports found");
    for var in [
        "RABBITMQ_DEFAULT_PASS: ${RABBITMQ_PASSWORD:?",
        "GF_SECURITY_ADMIN_PASSWORD: ${GRAFANA_ADMIN_PASSWORD:?",
    ] {
        assert!(text.contains(var), "{var} missing");
    }
}

/// Every compose service's environment variables are flags of the binary it runs, so
/// compose.yaml cannot drift from the code.
#[test]
fn compose_environment_matches_the_binaries_flags() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("compose.yaml")).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let services = doc["services"].as_mapping().expect("services");
    let mut checked = 0;
    for (name, svc) in services {
        let Some(cmd) = svc["command"].as_sequence() else {
            continue;
        };
        let argv: Vec<&str> = cmd.iter().filter_map(|v| v.as_str()).collect();
        let help = match argv.first().copied() {
            Some("sluice") => Command::new(sluice_bin())
                .args(&argv[1..])
                .arg("--help")
                .output()
                .unwrap(),
            Some("loadgen") => Command::new(loadgen_bin()).arg("--help").output().unwrap(),
            _ => continue,
        };
        let help = output_ok(&help, &format!("{name:?} --help"));
        // Anchors (<<: *amqp-env) are merged by serde_yaml only as a `<<` key; resolve it.
        let mut keys: Vec<String> = Vec::new();
        if let Some(env) = svc["environment"].as_mapping() {
            for (k, v) in env {
                match k.as_str() {
                    Some("<<") => {
                        for (k2, _) in v.as_mapping().into_iter().flatten() {
                            keys.push(k2.as_str().unwrap().to_owned());
                        }
                    }
                    Some(k) => keys.push(k.to_owned()),
                    None => {}
                }
            }
        }
        assert!(!keys.is_empty(), "service {name:?} has no environment");
        for k in keys {
            assert!(
                // `env: K=value`, or `env: K]` where values are hidden (secrets).
                help.contains(&format!("env: {k}=")) || help.contains(&format!("env: {k}]")),
                "compose service {name:?} sets {k}, which `{}` does not read",
                argv.join(" ")
            );
        }
        checked += 1;
    }
    assert!(
        checked >= 4,
        "expected ingest, processors, router and loadgen in compose.yaml"
    );
}

#[cfg(feature = "broker-tests")]
mod broker {
    //! Tests against real RabbitMQ and Redis.

    use super::*;
    use futures::StreamExt;
    use lapin::BasicProperties;
    use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
    use lapin::types::FieldTable;
    use sluice_binding::codec;
    use sluice_binding::model::{BatchBuilder, now_ns};
    use sluice_testkit::amqp;

    use support::broker::*;

    /// POST over a bare TCP connection, for bodies the server refuses before reading them:
    /// it answers and closes while the body is still being sent, which HTTP clients report
    /// as a broken pipe instead of the answer. Write errors are ignored and the answer read.
    fn post_raw(url: &str, key: &str, body: Vec<u8>) -> (u16, String) {
        use std::io::{Read, Write};
        let rest = url.strip_prefix("http://").unwrap();
        let (host, path) = rest.split_at(rest.find('/').unwrap());
        let mut tcp = std::net::TcpStream::connect(host).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = tcp
            .write_all(head.as_bytes())
            .and_then(|()| tcp.write_all(&body));
        let mut answer = Vec::new();
        let _ = tcp.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer).into_owned();
        let status = answer
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no HTTP status in {answer:?}"));
        let body = answer
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    fn check_latest_values(
        w: &World,
        tenant: &str,
        devices: u32,
        metrics: u32,
        name: impl Fn(u32) -> String,
        expected: impl Fn(u32, u32) -> f64,
    ) {
        for d in 0..devices {
            let got = w.latest(tenant, &name(d));
            assert_eq!(got.len(), metrics as usize, "latest values of {}", name(d));
            for (m, (metric, _ts, value)) in got.iter().enumerate() {
                assert_eq!(metric, &format!("metric-{m}"));
                assert_eq!(*value, expected(d, m as u32), "latest {}/{metric}", name(d));
            }
        }
    }

    #[test]
    fn http_readings_are_all_stored_once_with_latest_values_in_redis() {
        let w = World::new();
        let processors = w.processors();
        let (ingest, url) = w.ingest(&[]);
        let s = w.loadgen(&[
            "--target",
            "http",
            "--url",
            &url,
            "--api-key",
            "acme-key",
            "--tenant",
            "acme",
            "--devices",
            "50",
            "--metrics",
            "2",
            "--count",
            "100000",
            "--rate",
            "50000",
            "--batch-size",
            "500",
            "--duration",
            "120s",
            "--seed",
            "7",
        ]);
        assert_eq!(s["accepted"], 100_000, "{s}");
        assert_eq!(s["committed"], 100_000, "{s}");
        assert_eq!(total_rows(&w.data(), "acme"), 100_000);
        assert_eq!(distinct_rows(&w.data(), "acme"), 100_000);
        assert_eq!(
            count_rows(
                &w.data(),
                "acme",
                "SELECT count(DISTINCT device) FROM readings"
            ),
            50
        );
        // Tenant isolation in storage: the other tenant sees nothing.
        assert_eq!(total_rows(&w.data(), "other"), 0);
        // Redis holds the last reading of every (device, metric).
        let cfg = sluice_loadgen::run::LoadConfig {
            devices: 50,
            metrics: 2,
            seed: 7,
            ..Default::default()
        };
        check_latest_values(
            &w,
            "acme",
            50,
            2,
            |d| format!("dev-{d:05}"),
            |d, m| sluice_loadgen::run::expected_last_value(&cfg, 100_000, d, m).unwrap(),
        );
        // Graceful shutdown: both exit cleanly on SIGTERM.
        assert!(ingest.terminate().success());
        assert!(processors.terminate().success());
    }

    #[test]
    fn python_publisher_batches_are_all_stored_once() {
        let python = sluice_testkit::env::python();
        let w = World::new();
        let _processors = w.processors();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python/publish.py");
        let out = Command::new(python)
            .arg(script)
            .args(["--amqp-url", &amqp_addr(), "--namespace", w.ns.name()])
            .args(["--partitions", &PARTITIONS.to_string(), "--tenant", "acme"])
            .args(["--devices", "50", "--metrics", "2", "--readings", "100000"])
            .args(["--batch-size", "500", "--seed", "11"])
            .output()
            .unwrap();
        let stdout = output_ok(&out, "publish.py");
        assert!(
            stdout.contains("\"published_readings\": 100000"),
            "{stdout}"
        );
        w.wait_for_rows("acme", 100_000, Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(600)); // one more flush interval: nothing extra
        assert_eq!(total_rows(&w.data(), "acme"), 100_000);
        assert_eq!(distinct_rows(&w.data(), "acme"), 100_000);
        // x = seed + i*1000 + j + k, k of the last reading of pair (i, j).
        check_latest_values(
            &w,
            "acme",
            50,
            2,
            |d| format!("dev-{d}"),
            |d, m| {
                let pairs = 100u64;
                let pair = u64::from(d * 2 + m);
                let k = (100_000 - 1 - pair) / pairs;
                (11 + u64::from(d) * 1000 + u64::from(m) + k) as f64
            },
        );
    }

    #[test]
    fn processors_killed_mid_stream_lose_and_duplicate_nothing() {
        let w = World::new();
        let mut first = w.processors();
        let ns = w.ns.name().to_owned();
        let dir = w.dir.path().join("results");
        let amqp = amqp_addr();
        // 100 000 readings straight to the broker at 20 000/s: about 5 s of stream.
        let load = std::thread::spawn(move || {
            Command::new(loadgen_bin())
                .args(["--amqp-url", &amqp, "--namespace", &ns, "--partitions", "4"])
                .args(["--target", "amqp", "--tenant", "acme", "--devices", "50"])
                .args([
                    "--count",
                    "100000",
                    "--rate",
                    "20000",
                    "--batch-size",
                    "500",
                ])
                .args([
                    "--duration",
                    "120s",
                    "--json",
                    "--quiet",
                    "--drain-timeout",
                    "120s",
                ])
                .arg("--out")
                .arg(dir)
                .output()
                .unwrap()
        });
        // Kill the processors with SIGKILL once some, not all, rows are stored.
        w.wait_for_rows("acme", 1, Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(700));
        first.kill();
        let before = total_rows(&w.data(), "acme");
        assert!(
            before > 0 && before < 100_000,
            "killed after {before} rows: not mid-stream"
        );
        let _second = w.processors();
        let s = summary(&output_ok(&load.join().unwrap(), "loadgen"));
        assert_eq!(s["accepted"], 100_000, "{s}");
        w.wait_for_rows("acme", 100_000, Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(1000));
        assert_eq!(
            total_rows(&w.data(), "acme"),
            100_000,
            "exactly N rows after the restart"
        );
        assert_eq!(distinct_rows(&w.data(), "acme"), 100_000);
    }

    #[test]
    fn bad_input_gets_its_documented_error_and_good_readings_are_stored() {
        let w = World::new();
        let _processors = w.processors();
        let (_ingest, url) = w.ingest(&[("SLUICE_MAX_BODY_BYTES", "65536")]);
        let http = Http::new();
        let now = now_ns();
        let endpoint = format!("{url}/v1/telemetry");
        let post =
            |key: Option<&str>, ctype: &str, body: Vec<u8>| http.post(&endpoint, key, ctype, body);
        let json = |s: String| s.into_bytes();
        // 500 readings (~38 KB of JSON) stay under the 64 KiB body limit set above.
        const GOOD: u64 = 500;
        let good = |i: u64| {
            let readings: Vec<String> = (0..GOOD)
                .map(|j| {
                    format!(
                        r#"{{"device":"dev-{}","metric":"temp","ts":{},"value":{}}}"#,
                        j % 20,
                        now - 1_000_000 * (i * GOOD + j) as i64,
                        j
                    )
                })
                .collect();
            format!(r#"{{"readings":[{}]}}"#, readings.join(","))
        };
        #[derive(serde::Serialize)]
        struct R<'a> {
            device: &'a str,
            metric: &'a str,
            ts: i64,
            value: f64,
        }
        #[derive(serde::Serialize)]
        struct B<'a> {
            readings: Vec<R<'a>>,
        }
        let msgpack_value = |v: f64| {
            rmp_serde_vec(&B {
                readings: vec![R {
                    device: "d",
                    metric: "m",
                    ts: now,
                    value: v,
                }],
            })
        };
        let cases: Vec<(&str, (u16, String), u16, &str)> = vec![
            (
                "malformed body",
                post(
                    Some("acme-key"),
                    "application/json",
                    json("{\"readings\": [".into()),
                ),
                400,
                "malformed_body",
            ),
            (
                "wrong type",
                post(
                    Some("acme-key"),
                    "application/json",
                    json(format!(
                        r#"{{"readings":[{{"device":"d","metric":"m","ts":{now},"value":"hot"}}]}}"#
                    )),
                ),
                400,
                "malformed_body",
            ),
            (
                "missing field",
                post(
                    Some("acme-key"),
                    "application/json",
                    json(format!(
                        r#"{{"readings":[{{"device":"d","ts":{now},"value":1}}]}}"#
                    )),
                ),
                400,
                "malformed_body",
            ),
            (
                "NaN value",
                post(
                    Some("acme-key"),
                    "application/msgpack",
                    msgpack_value(f64::NAN),
                ),
                422,
                "invalid_reading",
            ),
            (
                "infinite value",
                post(
                    Some("acme-key"),
                    "application/msgpack",
                    msgpack_value(f64::INFINITY),
                ),
                422,
                "invalid_reading",
            ),
            (
                "timestamp before 2000",
                post(
                    Some("acme-key"),
                    "application/json",
                    json(
                        r#"{"readings":[{"device":"d","metric":"m","ts":1000,"value":1}]}"#.into(),
                    ),
                ),
                422,
                "invalid_reading",
            ),
            (
                "timestamp in the future",
                post(
                    Some("acme-key"),
                    "application/json",
                    json(format!(
                        r#"{{"readings":[{{"device":"d","metric":"m","ts":{},"value":1}}]}}"#,
                        now + 7_200_000_000_000
                    )),
                ),
                422,
                "invalid_reading",
            ),
            (
                "unknown key",
                post(Some("wrong-key"), "application/json", json(good(99))),
                401,
                "unauthorized",
            ),
            (
                "missing key",
                post(None, "application/json", json(good(98))),
                401,
                "unauthorized",
            ),
            (
                "oversized body",
                post_raw(&endpoint, "acme-key", vec![b' '; 100_000]),
                413,
                "body_too_large",
            ),
            (
                "unsupported content type",
                post(Some("acme-key"), "text/plain", json(good(97))),
                415,
                "unsupported_media_type",
            ),
        ];
        let mut accepted = 0;
        for (i, (what, (status, body), want_status, want_code)) in cases.into_iter().enumerate() {
            assert_eq!(status, want_status, "{what}: {body}");
            let v: serde_json::Value = serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("{what}: error body is not JSON ({e}): {body}"));
            assert_eq!(v["error"], want_code, "{what}: {body}");
            assert!(
                v["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{what}: {body}"
            );
            // Interleave good requests: they must all be stored.
            let (status, body) = post(Some("acme-key"), "application/json", json(good(i as u64)));
            assert_eq!(status, 202, "good request after {what}: {body}");
            accepted += GOOD;
        }
        w.wait_for_rows("acme", accepted, Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(total_rows(&w.data(), "acme"), accepted);
    }

    fn rmp_serde_vec<T: serde::Serialize>(v: &T) -> Vec<u8> {
        rmp_serde::to_vec_named(v).unwrap()
    }

    #[test]
    fn undecodable_messages_are_dead_lettered_with_a_reason_and_the_stream_continues() {
        let w = World::new();
        let _processors = w.processors();
        rt().block_on(async {
            let (conn, ch) = amqp::connect().await;
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            let exchange = w.ns.topology().telemetry_exchange();
            let publish = |body: Vec<u8>| {
                let (ch, exchange) = (ch.clone(), exchange.clone());
                async move {
                    let confirm = ch
                        .basic_publish(
                            exchange.into(),
                            "0".into(),
                            BasicPublishOptions {
                                mandatory: true,
                                immediate: false,
                            },
                            &body,
                            BasicProperties::default().with_delivery_mode(2),
                        )
                        .await
                        .unwrap()
                        .await
                        .unwrap();
                    assert!(confirm.is_ack());
                }
            };
            let batch = |v: u32, n: usize| {
                let mut b = BatchBuilder::new("acme", "test", 0);
                for i in 0..n {
                    b.push(&format!("d{i}"), "m", now_ns() - 1_000_000, i as f64);
                }
                let mut batch = b.finish(now_ns());
                batch.v = v;
                codec::encode(&batch).unwrap()
            };
            publish(b"this is not msgpack".to_vec()).await;
            publish(batch(2, 3)).await;
            publish(batch(1, 10)).await;
            publish(b"\x81\xa1v\x01".to_vec()).await; // a map with only the version
            publish(batch(1, 20)).await;

            // The stream continued: both valid batches are stored.
            let data = w.data();
            tokio::task::spawn_blocking(move || {
                wait_until("the valid batches", Duration::from_secs(60), || {
                    data.join("tenant=acme").exists() && total_rows(&data, "acme") == 30
                })
            })
            .await
            .unwrap();

            let mut consumer = ch
                .basic_consume(
                    w.ns.topology().dead_letter_queue().into(),
                    "".into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap();
            let mut seen = Vec::new();
            while seen.len() < 3 {
                let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
                    .await
                    .expect("3 dead letters")
                    .unwrap()
                    .unwrap();
                let get = |k: &str| amqp::header(&d.properties, k);
                seen.push((
                    get("x-sluice-error"),
                    get("x-sluice-reason"),
                    get("x-sluice-group"),
                    d.data,
                ));
            }
            seen.sort();
            assert_eq!(seen[0].0, "decode");
            assert_eq!(
                seen[0].3,
                b"this is not msgpack".to_vec(),
                "original body kept"
            );
            assert_eq!(seen[1].0, "decode");
            assert!(seen[1].1.contains("missing field"), "{}", seen[1].1);
            assert_eq!(seen[2].0, "unsupported-version");
            assert!(seen[2].1.contains("version 2"), "{}", seen[2].1);
            assert!(seen.iter().all(|s| s.2 == "storage"));
            let _ = conn.close(200, "done".into()).await;
        });
    }

    /// `GET /v1/workers` of a processors admin endpoint.
    fn workers_status(http: &Http, admin: &str) -> serde_json::Value {
        http.rt.block_on(async {
            let r = http
                .client
                .get(format!("{admin}/v1/workers"))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "{}", r.status());
            r.json().await.unwrap()
        })
    }

    /// Runs `sluice workers` against `admin`; its stdout.
    fn sluice_workers(admin: &str, args: &[&str]) -> String {
        output_ok(&sluice_workers_output(admin, args), "sluice workers")
    }

    /// Runs `sluice workers` against `admin`, whatever its outcome.
    fn sluice_workers_output(admin: &str, args: &[&str]) -> Output {
        Command::new(sluice_bin())
            .env_clear()
            .args(["workers", "--admin-url", admin])
            .args(args)
            .output()
            .unwrap()
    }

    /// Loadgen straight to the broker in the background: `count` readings at `rate`/s.
    fn background_load(
        w: &World,
        count: u64,
        rate: u64,
        batch: u32,
    ) -> std::thread::JoinHandle<Output> {
        let (ns, amqp) = (w.ns.name().to_owned(), amqp_addr());
        let dir = w.dir.path().join("results");
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

    #[test]
    fn changing_the_worker_count_mid_stream_loses_and_duplicates_nothing() {
        let w = World::new();
        let admin_port = free_port();
        let admin = format!("http://127.0.0.1:{admin_port}");
        let _p = w.processors_with(&[
            ("SLUICE_ADMIN_LISTEN", &format!("127.0.0.1:{admin_port}")),
            ("SLUICE_WORKERS", "2"),
        ]);
        let http = Http::new();
        wait_until("admin endpoint", Duration::from_secs(30), || {
            http.ready(&format!("{admin}/healthz"))
        });
        let load = background_load(&w, 100_000, 10_000, 250);
        // Resize at several points of the stream, through the CLI, and check each took.
        for (i, n) in [4usize, 1, 3, 2].into_iter().enumerate() {
            w.wait_for_rows("acme", 15_000 * (i as u64 + 1), Duration::from_secs(120));
            let shown = sluice_workers(&admin, &["set", &n.to_string()]);
            assert!(shown.contains(&format!("{n} desired")), "{shown}");
            wait_until(
                &format!("{n} workers running"),
                Duration::from_secs(10),
                || workers_status(&http, &admin)["workers"] == n,
            );
            assert_eq!(workers_status(&http, &admin)["mode"], "manual");
        }
        let s = summary(&output_ok(&load.join().unwrap(), "loadgen"));
        assert_eq!(s["accepted"], 100_000, "{s}");
        w.wait_for_rows("acme", 100_000, Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(1000));
        assert_eq!(total_rows(&w.data(), "acme"), 100_000);
        assert_eq!(distinct_rows(&w.data(), "acme"), 100_000);
        // Bad requests are refused with a reason, and change nothing.
        let err = sluice_workers_output(&admin, &["set", "0"]);
        assert!(!err.status.success());
        assert!(String::from_utf8_lossy(&err.stderr).contains("out_of_range"));
        let err = sluice_workers_output(&admin, &["auto"]);
        assert!(String::from_utf8_lossy(&err.stderr).contains("no_autoscaler"));
        assert_eq!(workers_status(&http, &admin)["workers"], 2);
    }

    #[test]
    fn two_processors_processes_share_the_partitions_exactly() {
        let w = World::new();
        let _a = w.processors_with(&[("HOSTNAME", "proc-a")]);
        let _b = w.processors_with(&[("HOSTNAME", "proc-b")]);
        let load = background_load(&w, 100_000, 20_000, 500);
        let s = summary(&output_ok(&load.join().unwrap(), "loadgen"));
        assert_eq!(s["accepted"], 100_000, "{s}");
        w.wait_for_rows("acme", 100_000, Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(1000));
        assert_eq!(total_rows(&w.data(), "acme"), 100_000);
        assert_eq!(distinct_rows(&w.data(), "acme"), 100_000);
        // Both took part: each wrote files under its own writer id.
        let files = parquet_files(&w.data());
        for writer in ["proc-a", "proc-b"] {
            assert!(
                files.iter().any(|f| f.contains(&format!("part-{writer}-"))),
                "{writer} stored nothing: {files:?}"
            );
        }
    }

    fn parquet_files(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "parquet") {
                    out.push(p.file_name().unwrap().to_string_lossy().into_owned());
                }
            }
        }
        out
    }

    /// Polls the admin endpoint every 100 ms until `until` holds; the worker counts seen.
    fn watch_workers(
        http: &Http,
        admin: &str,
        timeout: Duration,
        mut until: impl FnMut(&[u64]) -> bool,
    ) -> Vec<u64> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            seen.push(workers_status(http, admin)["workers"].as_u64().unwrap());
            if until(&seen) {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "timed out; workers seen: {seen:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Direction changes (up after down or down after up) in a series of counts.
    fn reversals(seen: &[u64]) -> usize {
        let steps: Vec<bool> = seen
            .windows(2)
            .filter(|w| w[0] != w[1])
            .map(|w| w[1] > w[0])
            .collect();
        steps.windows(2).filter(|s| s[0] != s[1]).count()
    }

    fn autoscaled_processors(w: &World, admin_port: u16, max: &str) -> Proc {
        w.processors_with(&[
            ("SLUICE_ADMIN_LISTEN", &format!("127.0.0.1:{admin_port}")),
            ("SLUICE_AUTOSCALE", "true"),
            ("SLUICE_WORKERS", "1"),
            ("SLUICE_MIN_WORKERS", "1"),
            ("SLUICE_MAX_WORKERS", max),
            ("SLUICE_SCALE_INTERVAL", "300ms"),
            ("SLUICE_SCALE_COOLDOWN", "3s"),
            ("SLUICE_SCALE_TARGET", "backlog:20"),
            // Scale by backlog alone: whether the workers or the commit are the bottleneck
            // of a debug build on a shared machine is not what this test is about (the
            // busy gate has its unit tests).
            ("SLUICE_SCALE_MIN_BUSY", "0"),
            ("SLUICE_PREFETCH", "10"),
        ])
    }

    #[test]
    fn the_autoscaler_scales_up_under_backlog_and_down_when_idle_within_bounds() {
        let w = World::new();
        // Queue a backlog before any processor runs: ingest declares the partitions.
        let (ingest, _url) = w.ingest(&[]);
        // Small batches: enough messages that the pool cannot drain them between two
        // decisions of the autoscaler (the backlog is counted in messages).
        let load = background_load(&w, 100_000, 100_000, 25);
        let s = summary(&output_ok(&load.join().unwrap(), "loadgen"));
        assert_eq!(s["accepted"], 100_000, "{s}");
        drop(ingest);
        let admin_port = free_port();
        let admin = format!("http://127.0.0.1:{admin_port}");
        let _p = autoscaled_processors(&w, admin_port, "3");
        let http = Http::new();
        wait_until("admin endpoint", Duration::from_secs(30), || {
            http.ready(&format!("{admin}/healthz"))
        });
        // 4 000 messages queued, target 20 a worker: up to the maximum, a step at a time.
        let up = watch_workers(&http, &admin, Duration::from_secs(60), |s| {
            s.last() == Some(&3)
        });
        assert!(up.iter().all(|n| (1..=3).contains(n)), "{up:?}");
        let status = workers_status(&http, &admin);
        assert_eq!(status["mode"], "auto", "{status}");
        // Drained and idle: back down to the minimum, never below it.
        let down = watch_workers(&http, &admin, Duration::from_secs(180), |s| {
            s.last() == Some(&1)
        });
        assert!(down.iter().all(|n| (1..=3).contains(n)), "{down:?}");
        w.wait_for_rows("acme", 100_000, Duration::from_secs(60));
        assert_eq!(total_rows(&w.data(), "acme"), 100_000);
        assert_eq!(distinct_rows(&w.data(), "acme"), 100_000);
        // Idle at the minimum, it stays there.
        let rest = watch_workers(&http, &admin, Duration::from_secs(10), |s| s.len() >= 40);
        assert!(rest.iter().all(|n| *n == 1), "{rest:?}");
        let d = &workers_status(&http, &admin)["last_decision"];
        assert_eq!(d["reason"], "at_min", "{d}");
    }

    #[test]
    fn a_steady_load_does_not_make_the_autoscaler_flap() {
        let w = World::new();
        let admin_port = free_port();
        let admin = format!("http://127.0.0.1:{admin_port}");
        let _p = autoscaled_processors(&w, admin_port, "4");
        let http = Http::new();
        wait_until("admin endpoint", Duration::from_secs(30), || {
            http.ready(&format!("{admin}/healthz"))
        });
        // 15 s of steady load: five cooldowns.
        let load = background_load(&w, 150_000, 10_000, 250);
        let seen = watch_workers(&http, &admin, Duration::from_secs(120), |_| {
            load.is_finished()
        });
        let s = summary(&output_ok(&load.join().unwrap(), "loadgen"));
        assert_eq!(s["accepted"], 150_000, "{s}");
        // At most one direction change per cooldown (3 s) over the run.
        let cooldowns = (seen.len() as f64 * 0.1 / 3.0).ceil() as usize;
        assert!(reversals(&seen) <= cooldowns.max(1), "{seen:?}");
        assert!(seen.iter().all(|n| (1..=4).contains(n)), "{seen:?}");
        w.wait_for_rows("acme", 150_000, Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(1000));
        assert_eq!(total_rows(&w.data(), "acme"), 150_000);
    }

    #[test]
    fn single_active_consumer_partitions_fail_over_without_loss() {
        let w = World::new();
        let sac = ("SLUICE_SINGLE_ACTIVE_CONSUMER", "true");
        let mut a = w.processors_with(&[sac, ("HOSTNAME", "proc-a")]);
        let _b = w.processors_with(&[sac, ("HOSTNAME", "proc-b")]);
        let s = summary(&output_ok(
            &background_load(&w, 50_000, 20_000, 500).join().unwrap(),
            "loadgen",
        ));
        assert_eq!(s["accepted"], 50_000, "{s}");
        w.wait_for_rows("acme", 50_000, Duration::from_secs(120));
        // The first consumer of each partition is the active one; the other stands by.
        let files = parquet_files(&w.data());
        assert!(
            files.iter().all(|f| f.contains("part-proc-a-")),
            "{files:?}"
        );
        // The active one dies: the standby takes the partitions over.
        a.kill();
        let s = summary(&output_ok(
            &background_load(&w, 50_000, 20_000, 500).join().unwrap(),
            "loadgen",
        ));
        assert_eq!(s["accepted"], 50_000, "{s}");
        w.wait_for_rows("acme", 100_000, Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(1000));
        assert_eq!(total_rows(&w.data(), "acme"), 100_000);
        assert_eq!(distinct_rows(&w.data(), "acme"), 100_000);
        let files = parquet_files(&w.data());
        assert!(
            files.iter().any(|f| f.contains("part-proc-b-")),
            "{files:?}"
        );
    }

    /// A webhook receiver on its own thread and runtime: the event ids of every
    /// notification it accepted, in order (repeats included). Each request takes 20 ms, so
    /// notifications are in flight when the router is killed.
    #[test]
    fn a_router_killed_mid_stream_loses_no_notification() {
        let w = World::new();
        let port = free_port();
        let mut first = w.router(port);
        let (hook, got) = webhook_receiver();
        let http = Http::new();
        let sub = serde_json::json!({
            "criteria": {"devices": ["k-*"]},
            "policy": {"batch_notify": {"count": 50, "duration": "200ms"}},
            "target": {"type": "webhook", "url": hook},
        });
        let (status, body) = http.post(
            &format!("http://127.0.0.1:{port}/v1/subscriptions"),
            Some("acme-key"),
            "application/json",
            sub.to_string().into_bytes(),
        );
        assert_eq!(status, 201, "{body}");

        // 40 batches of 250 readings straight to the broker, 10 a second.
        let telemetry = w.ns.topology().telemetry_exchange();
        let mut expected = std::collections::BTreeSet::new();
        let mut batches = Vec::new();
        for seq in 0..40u64 {
            let mut b = BatchBuilder::new("acme", "router-e2e", seq);
            for i in 0..250 {
                b.push(&format!("k-{}", i % 25), "m", now_ns(), f64::from(i));
            }
            let batch = b.finish(now_ns());
            expected.extend((0..250).map(|i| format!("{}:{i}", batch.id.simple())));
            batches.push(batch);
        }
        let publisher = std::thread::spawn(move || {
            rt().block_on(async move {
                let (_conn, ch) = amqp::connect().await;
                ch.confirm_select(ConfirmSelectOptions::default())
                    .await
                    .unwrap();
                for (i, b) in batches.iter().enumerate() {
                    let body = codec::encode(b).unwrap();
                    let key = (i as u32 % PARTITIONS).to_string();
                    let confirm = ch
                        .basic_publish(
                            telemetry.as_str().into(),
                            key.into(),
                            BasicPublishOptions::default(),
                            &body,
                            BasicProperties::default().with_delivery_mode(2),
                        )
                        .await
                        .unwrap()
                        .await
                        .unwrap();
                    assert!(confirm.is_ack());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        });
        // SIGKILL once some, not all, notifications arrived.
        wait_until("first notifications", Duration::from_secs(60), || {
            !got.lock().unwrap().is_empty()
        });
        std::thread::sleep(Duration::from_millis(500));
        first.kill();
        let before = event_ids(&got);
        assert!(
            before.len() < expected.len(),
            "killed after {} of {} events: not mid-stream",
            before.len(),
            expected.len()
        );
        let _second = w.router(port);
        publisher.join().unwrap();
        wait_until("every event notified", Duration::from_secs(120), || {
            event_ids(&got).len() >= expected.len()
        });
        let all = event_ids(&got);
        assert_eq!(all, expected, "every event at least once, and nothing else");
    }
}
