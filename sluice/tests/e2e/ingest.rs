//! Ingest over HTTP (loadgen) and a third-party AMQP publisher (the Python example) into
//! storage: every reading stored once with its latest value in Redis, and every kind of bad
//! request answered with its documented error while good ones go on being stored.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sluice_binding::model::now_ns;

use crate::support::broker::*;
use crate::support::*;

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
                json(r#"{"readings":[{"device":"d","metric":"m","ts":1000,"value":1}]}"#.into()),
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

fn rmp_serde_vec<T: serde::Serialize>(v: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(v).unwrap()
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
