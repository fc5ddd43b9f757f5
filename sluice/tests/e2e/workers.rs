//! The storage pool's worker count at run time: set by hand through `sluice workers` and the
//! admin endpoint, or by the autoscaler, while a stream is stored exactly once.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::support::broker::*;
use crate::support::*;

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
    let load = w.background_load(100_000, 10_000, 250);
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
fn the_autoscaler_scales_up_under_backlog_and_down_when_idle_within_bounds() {
    let w = World::new();
    // Queue a backlog before any processor runs: ingest declares the partitions.
    let (ingest, _url) = w.ingest(&[]);
    // Small batches: enough messages that the pool cannot drain them between two
    // decisions of the autoscaler (the backlog is counted in messages).
    let load = w.background_load(100_000, 100_000, 25);
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
    let load = w.background_load(150_000, 10_000, 250);
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
