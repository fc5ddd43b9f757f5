//! Fault tests: the real `sluice` binaries under load while the broker is stopped and
//! started (`rabbitmqctl stop_app` / `start_app`, so this needs the local node the test
//! command starts, and root), blocks publishers (memory and disk alarms), loses its network
//! (a proxy in the test that goes silent), while Redis is down and ingest is killed. They
//! prove by counting that every reading answered 202 is stored exactly once (and notified,
//! where a router runs), and they measure how long the pipeline takes to accept again.
//! SIGKILL of the storage pool and of the router: the e2e tests.
//!
//! The tests of this binary take turns: each stops the broker every other test uses. Other
//! test binaries run before or after this one (cargo runs binaries one at a time); never run
//! it next to another test process on the same broker (the e2e tests, another crate's
//! broker tests, a second `cargo test`): their connections would drop under them.
//!
//! `SLUICE_FAULT_RESTARTS=10 cargo test -p sluice --features broker-tests --test faults --
//! --nocapture` repeats the restart as often as asked and prints each recovery time (the
//! figures in BENCHMARKS.md).
#![cfg(feature = "broker-tests")]

mod support;

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::broker::*;
use support::load::*;
use support::*;

/// Held by each test: only one at a time stops the shared broker.
static BROKER: Mutex<()> = Mutex::new(());

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "rabbitmqctl {args:?}: {e} (the fault tests need the local RabbitMQ node and root)"
            )
        });
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether the broker completes an AMQP handshake now.
fn broker_accepts(rt: &tokio::runtime::Runtime) -> bool {
    let addr = amqp_addr();
    rt.block_on(async {
        let connect = lapin::Connection::connect(&addr, lapin::ConnectionProperties::default());
        match tokio::time::timeout(Duration::from_secs(2), connect).await {
            Ok(Ok(c)) => {
                let _ = c.close(200, "probe".into()).await;
                true
            }
            _ => false,
        }
    })
}

/// Restarts the broker's application and returns the instant it accepted AMQP connections
/// again.
fn restart_broker(down_for: Duration) -> Instant {
    rabbitmqctl(&["stop_app"]);
    std::thread::sleep(down_for);
    rabbitmqctl(&["start_app"]);
    let rt = rt();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if broker_accepts(&rt) {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "the broker did not come back");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ingest_and_storage_heal_after_every_broker_restart() {
    let _turn = BROKER.lock().unwrap_or_else(|p| p.into_inner());
    let restarts: usize = std::env::var("SLUICE_FAULT_RESTARTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let w = World::new();
    let admin = format!("127.0.0.1:{}", free_port());
    let _processors = w.processors_with(&[("SLUICE_ADMIN_LISTEN", admin.as_str())]);
    let (_ingest, url) = w.ingest(&[]);
    let stop = Arc::new(AtomicBool::new(false));
    let load = http_load(url.clone(), Duration::from_millis(10), stop.clone());
    let readyz = Http::new();

    let mut up_at = Vec::new();
    let mut saw_unready = [false, false];
    for _ in 0..restarts {
        std::thread::sleep(Duration::from_secs(2));
        // While the broker is down, ingest's and the storage pool's /readyz say so.
        let probe_stop = Arc::new(AtomicBool::new(false));
        let probe = {
            let urls = [format!("{url}/readyz"), format!("http://{admin}/readyz")];
            let stop = probe_stop.clone();
            std::thread::spawn(move || {
                let http = Http::new();
                let mut unready = [false, false];
                while !stop.load(Ordering::Relaxed) {
                    for (u, seen) in urls.iter().zip(unready.iter_mut()) {
                        *seen |= !http.ready(u);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                unready
            })
        };
        up_at.push(restart_broker(Duration::from_secs(2)));
        probe_stop.store(true, Ordering::Relaxed);
        let unready = probe.join().unwrap();
        saw_unready[0] |= unready[0];
        saw_unready[1] |= unready[1];
    }
    // Load goes on until the last recovery can be seen, then stops.
    std::thread::sleep(Duration::from_secs(5));
    for ready in [format!("{url}/readyz"), format!("http://{admin}/readyz")] {
        wait_until(&format!("{ready} again"), Duration::from_secs(30), || {
            readyz.ready(&ready)
        });
    }
    stop.store(true, Ordering::Relaxed);
    let sent = load.join().unwrap();

    // Time from "the broker accepts connections" to the first 202 answered after it.
    let mut recoveries = Vec::new();
    for up in &up_at {
        let first = sent
            .values()
            .filter(|s| s.status == 202 && s.at > *up)
            .map(|s| s.at)
            .min()
            .expect("a request accepted after the broker came back");
        recoveries.push(first.duration_since(*up));
    }
    let (accepted, refused_stored) = check_stored_once(&w, &sent);
    let refused = sent.values().filter(|s| s.status != 202).count();
    eprintln!(
        "broker restarts: {restarts}; requests {} ({} readings each): accepted {accepted}, \
         refused {refused} (of them stored anyway {refused_stored}); time from broker up to \
         the next 202: {recoveries:?}",
        sent.len(),
        PER_REQUEST
    );
    assert_eq!(
        saw_unready,
        [true, true],
        "/readyz of (ingest, storage) reported the broker down"
    );
    assert!(
        refused > 0,
        "the broker was down: some requests must have been refused"
    );
    // A liveness bound, not a performance figure: a pipeline that does not reconnect
    // would never accept again (the figures are in BENCHMARKS.md).
    for r in &recoveries {
        assert!(
            *r < Duration::from_secs(20),
            "ingest took {r:?} to accept again"
        );
    }
}

#[test]
fn ingest_answers_and_stops_in_bounded_time_while_the_broker_is_down() {
    let _turn = BROKER.lock().unwrap_or_else(|p| p.into_inner());
    let w = World::new();
    let (ingest, url) = w.ingest(&[]);
    let http = Http::new();
    rabbitmqctl(&["stop_app"]);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let body = br#"{"readings":[{"device":"d","metric":"m","ts":1000,"value":1}]}"#.to_vec();
        let started = Instant::now();
        let (status, text) = http.post(
            &format!("{url}/v1/telemetry"),
            Some("acme-key"),
            "application/json",
            body,
        );
        assert_eq!(status, 503, "{text}");
        assert!(text.contains("broker"), "{text}");
        assert!(
            started.elapsed() < Duration::from_secs(12),
            "503 after {:?}",
            started.elapsed()
        );
        assert!(!http.ready(&format!("{url}/readyz")));
        let started = Instant::now();
        let status = ingest.terminate();
        assert!(status.success(), "ingest exited with {status}");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "SIGTERM took {:?}",
            started.elapsed()
        );
    }));
    rabbitmqctl(&["start_app"]);
    let rt = rt();
    wait_until("the broker back", Duration::from_secs(60), || {
        broker_accepts(&rt)
    });
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// Subscribes tenant acme, through the router's API on `api`, to every reading of the
/// load's devices, delivered to `hook` in batches (the receiver takes 20 ms a
/// notification); `policy` adds to the batching.
fn subscribe_all(api: u16, hook: &str, mut policy: serde_json::Value) {
    policy["batch_notify"] = serde_json::json!({"count": 500, "duration": "200ms"});
    let sub = serde_json::json!({
        "criteria": {"devices": ["r*"]},
        "policy": policy,
        "target": {"type": "webhook", "url": hook},
    });
    let (status, body) = Http::new().post(
        &format!("http://127.0.0.1:{api}/v1/subscriptions"),
        Some("acme-key"),
        "application/json",
        sub.to_string().into_bytes(),
    );
    assert_eq!(status, 201, "{body}");
}

/// (device, value) of every reading of the accepted requests (values are 0..PER_REQUEST).
fn accepted_readings(sent: &HashMap<String, Sent>) -> std::collections::BTreeSet<(String, i64)> {
    sent.iter()
        .filter(|(_, s)| s.status == 202)
        .flat_map(|(d, _)| (0..PER_REQUEST as i64).map(move |i| (d.clone(), i)))
        .collect()
}

/// (device, value) of every reading notified so far.
fn notified_readings(got: &Notified) -> std::collections::BTreeSet<(String, i64)> {
    got.lock()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["device"].as_str().unwrap().to_owned(),
                e["value"].as_f64().unwrap() as i64,
            )
        })
        .collect()
}

/// Waits until every accepted reading was notified at least once.
fn wait_all_notified(sent: &HashMap<String, Sent>, got: &Notified) {
    let want = accepted_readings(sent);
    wait_until(
        "every accepted reading notified",
        Duration::from_secs(120),
        || want.is_subset(&notified_readings(got)),
    );
}

/// The value of a counter on a Prometheus endpoint (0 when absent), and the whole text.
fn counter(metrics: &str, name: &str) -> (f64, String) {
    let text = Http::new().get_text(&format!("http://{metrics}/metrics"));
    let value = text
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    (value, text)
}

/// A Redis server of the test's own (the shared one holds other tests' keys), with its
/// data in `dir`, so a restart keeps the router's subscriptions.
struct PrivateRedis {
    port: u16,
    dir: std::path::PathBuf,
    proc: Option<Proc>,
}

impl PrivateRedis {
    fn start(dir: std::path::PathBuf) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = PrivateRedis {
            port: free_port(),
            dir,
            proc: None,
        };
        r.up();
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn cli(&self, args: &[&str]) -> bool {
        Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .is_ok_and(|o| {
                o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "PONG"
            })
    }

    fn up(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(std::process::Stdio::null());
        self.proc = Some(Proc::spawn("redis-server", &mut cmd));
        wait_until("private Redis", Duration::from_secs(20), || {
            self.cli(&["ping"])
        });
    }

    /// Stops it the way an operator would (`SHUTDOWN`, data kept on disk).
    fn down(&mut self) {
        let _ = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "shutdown"])
            .output();
        if let Some(p) = self.proc.take() {
            let mut p = p;
            let deadline = Instant::now() + Duration::from_secs(10);
            while p.child.try_wait().unwrap().is_none() {
                assert!(Instant::now() < deadline, "redis-server did not stop");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Redis down for 6 s under load: storage (which writes latest values to Redis after the
/// Parquet commit) and the router (rate-limit windows in Redis) hold what they have and go
/// on once it is back. Every accepted reading is stored exactly once and notified.
#[test]
fn a_redis_outage_delays_storage_and_notifications_but_loses_nothing() {
    let _turn = BROKER.lock().unwrap_or_else(|p| p.into_inner());
    let w = World::new();
    let mut redis = PrivateRedis::start(w.dir.path().join("redis"));
    let url_env = redis.url();
    let redis_env = [("SLUICE_REDIS_URL", url_env.as_str())];
    let metrics = format!("127.0.0.1:{}", free_port());
    let _processors =
        w.processors_with(&[redis_env[0], ("SLUICE_METRICS_LISTEN", metrics.as_str())]);
    let (_ingest, url) = w.ingest(&[]);
    let api = free_port();
    let _router = w.router_with(api, &redis_env);
    let (hook, got) = webhook_receiver();
    // A rate limit no load here reaches: every notification takes a window slot in Redis.
    subscribe_all(
        api,
        &hook,
        serde_json::json!({"rate_limit": {"max": 1000000, "window": "1s"}}),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let load = http_load(url, Duration::from_millis(20), stop.clone());
    std::thread::sleep(Duration::from_secs(3));
    redis.down();
    std::thread::sleep(Duration::from_secs(6));
    let back = Instant::now();
    redis.up();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let sent = load.join().unwrap();

    let (accepted, _) = check_stored_once(&w, &sent);
    assert!(accepted > 0);
    let stored_after = back.elapsed();
    // Every reading of every accepted request notified at least once.
    wait_all_notified(&sent, &got);
    let notified_after = back.elapsed();
    // The latest values reached Redis once it was back: the last accepted request's.
    let (last, _) = sent
        .iter()
        .filter(|(_, s)| s.status == 202)
        .max_by_key(|(_, s)| s.at)
        .unwrap();
    wait_until(
        "latest values of the last request",
        Duration::from_secs(60),
        || !w.latest_in(&redis.url(), "acme", last).is_empty(),
    );
    // The storage pool held its deliveries through the outage: none came back from the
    // broker (a requeue would have, each counting towards RabbitMQ 4's delivery limit).
    let (failures, text) = counter(&metrics, "sluice_storage_commit_failures_total");
    assert!(failures > 0.0, "the outage failed no commit:\n{text}");
    assert!(
        counter(&metrics, "sluice_storage_deliveries_total").0 > 0.0,
        "{text}"
    );
    assert_eq!(
        counter(&metrics, "sluice_storage_redeliveries_total").0,
        0.0,
        "deliveries came back during the outage"
    );
    eprintln!(
        "Redis down 6 s: requests {}, accepted {accepted}; every accepted reading stored once \
         ({stored_after:.1?} after Redis came back) and notified ({} distinct readings, \
         {notified_after:.1?}); latest values in Redis after {:.1?}",
        sent.len(),
        notified_readings(&got).len(),
        back.elapsed()
    );
}

/// Ingest killed (SIGKILL) under load and started again on its port: what it answered 202
/// is stored exactly once; requests it never answered may or may not be stored, never twice.
#[test]
fn ingest_killed_mid_stream_loses_nothing_it_accepted() {
    let _turn = BROKER.lock().unwrap_or_else(|p| p.into_inner());
    let w = World::new();
    let _processors = w.processors();
    let port = free_port();
    let (mut first, url) = w.ingest_on(port, &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let load = http_load(url.clone(), Duration::from_millis(10), stop.clone());
    std::thread::sleep(Duration::from_secs(2));
    first.kill();
    let killed = Instant::now();
    let (_second, _) = w.ingest_on(port, &[]);
    let restarted = killed.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let sent = load.join().unwrap();
    let unanswered = sent.values().filter(|s| s.status == 0).count();
    let after_kill = sent
        .values()
        .filter(|s| s.status == 202 && s.at > killed)
        .count();
    let (accepted, refused_stored) = check_stored_once(&w, &sent);
    eprintln!(
        "ingest SIGKILL: requests {}, accepted {accepted}, unanswered {unanswered} (stored \
         anyway {refused_stored}); ready again {restarted:.1?} after the kill",
        sent.len()
    );
    assert!(after_kill > 0, "nothing accepted after the restart");
}

/// A resource alarm of the broker.
#[derive(Clone, Copy, Debug)]
enum Alarm {
    /// The memory high watermark set below what the node uses.
    Memory,
    /// The disk free limit set above the free space (`set_disk_free_limit`).
    Disk,
}

/// Raises `Alarm` on the local node and puts the previous setting back when dropped (a
/// failing test must not leave the broker blocked).
struct RaisedAlarm {
    alarm: Alarm,
    previous: String,
}

impl RaisedAlarm {
    fn raise(alarm: Alarm) -> Self {
        let get = match alarm {
            Alarm::Memory => "vm_memory_monitor:get_vm_memory_high_watermark().",
            Alarm::Disk => "rabbit_disk_monitor:get_disk_free_limit().",
        };
        let out = Command::new("rabbitmqctl")
            .args(["eval", get])
            .output()
            .expect("rabbitmqctl eval");
        let previous = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            previous.parse::<f64>().is_ok(),
            "a {alarm:?} limit of {previous:?} is not handled here"
        );
        match alarm {
            Alarm::Memory => rabbitmqctl(&["set_vm_memory_high_watermark", "0.0001"]),
            // 1 PB of free space wanted: more than any disk here has.
            Alarm::Disk => rabbitmqctl(&["set_disk_free_limit", "1000000000000000"]),
        }
        RaisedAlarm { alarm, previous }
    }
}

impl Drop for RaisedAlarm {
    fn drop(&mut self) {
        match self.alarm {
            Alarm::Memory => rabbitmqctl(&["set_vm_memory_high_watermark", &self.previous]),
            Alarm::Disk => rabbitmqctl(&["set_disk_free_limit", &self.previous]),
        }
    }
}

/// A memory alarm for 5 s under load: the broker blocks publishing connections. Ingest
/// refuses with 503 and says so on /readyz; storage keeps acking on its own consuming
/// connection and nothing comes back redelivered; the router holds what it matched until
/// it can publish again. Every accepted reading is stored once and notified.
#[test]
fn a_memory_alarm_blocks_publishing_and_loses_nothing() {
    an_alarm_blocks_publishing_and_loses_nothing(Alarm::Memory);
}

/// The same with a disk alarm (free space below the limit), which blocks publishers the
/// same way and must heal the same way.
#[test]
fn a_disk_alarm_blocks_publishing_and_loses_nothing() {
    an_alarm_blocks_publishing_and_loses_nothing(Alarm::Disk);
}

fn an_alarm_blocks_publishing_and_loses_nothing(kind: Alarm) {
    let _turn = BROKER.lock().unwrap_or_else(|p| p.into_inner());
    let w = World::new();
    let metrics = format!("127.0.0.1:{}", free_port());
    let _processors = w.processors_with(&[("SLUICE_METRICS_LISTEN", metrics.as_str())]);
    let (_ingest, url) = w.ingest(&[]);
    let api = free_port();
    let _router = w.router(api);
    let (hook, got) = webhook_receiver();
    subscribe_all(api, &hook, serde_json::json!({}));
    let http = Http::new();

    let stop = Arc::new(AtomicBool::new(false));
    let load = http_load(url.clone(), Duration::from_millis(20), stop.clone());
    std::thread::sleep(Duration::from_secs(2));
    let alarm = RaisedAlarm::raise(kind);
    // The load's request in flight waits for its confirm; new requests (tenant `other`,
    // outside the count) are refused at once while the broker blocks.
    let (mut unready, mut refused) = (false, 0);
    let until = Instant::now() + Duration::from_secs(5);
    let probe =
        r#"{"readings":[{"device":"probe","metric":"m","ts":1700000000000000000,"value":1}]}"#;
    while Instant::now() < until {
        unready |= !http.ready(&format!("{url}/readyz"));
        let status = http.try_post(
            &format!("{url}/v1/telemetry"),
            "other-key",
            "application/json",
            probe.as_bytes().to_vec(),
        );
        refused += usize::from(status == 503);
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(alarm);
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let sent = load.join().unwrap();

    let (accepted, _) = check_stored_once(&w, &sent);
    wait_all_notified(&sent, &got);
    let redelivered = counter(&metrics, "sluice_storage_redeliveries_total").0;
    eprintln!(
        "{kind:?} alarm 5 s: requests {}, accepted {accepted}; probes refused during the \
         alarm {refused}; every accepted reading stored once and notified; storage \
         redeliveries {redelivered}",
        sent.len()
    );
    assert!(unready, "ingest's /readyz never reported the alarm");
    assert!(refused > 0, "the alarm refused no new request");
    assert_eq!(
        redelivered, 0.0,
        "storage deliveries came back during the alarm"
    );
}

/// A TCP proxy to the broker that can cut the network the way a pulled cable does: while
/// cut, nothing passes on any connection, old or new, and nobody hears a FIN or a reset;
/// only heartbeats and timeouts can tell. Connections that lived through a cut are closed
/// when it heals (both ends gave up on them by then, as over a real network).
struct CutProxy {
    port: u16,
    cut: Arc<AtomicBool>,
    /// Incremented by each cut; a connection from an earlier epoch dies at the heal.
    epoch: Arc<std::sync::atomic::AtomicU64>,
}

impl CutProxy {
    fn start(upstream: std::net::SocketAddr) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let epoch = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (c, e) = (cut.clone(), epoch.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                // Accepted during a cut: never forwarded (a SYN into the void), dies at the heal.
                let born = if c.load(Ordering::SeqCst) {
                    u64::MAX
                } else {
                    e.load(Ordering::SeqCst)
                };
                let Ok(server) = std::net::TcpStream::connect(upstream) else {
                    continue;
                };
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let (c, e) = (c.clone(), e.clone());
                    std::thread::spawn(move || pump(from, to, born, &c, &e));
                }
            }
        });
        CutProxy { port, cut, epoch }
    }

    /// `url` with its host and port replaced by the proxy's, and `query` added.
    fn url(&self, url: &str, query: &str) -> String {
        let uri: lapin::uri::AMQPUri = url.parse().expect("an AMQP URL");
        let user = &uri.authority.userinfo;
        format!(
            "amqp://{}:{}@127.0.0.1:{}/{}?{query}",
            user.username,
            user.password,
            self.port,
            urlencoding(&uri.vhost)
        )
    }

    fn cut(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.cut.store(true, Ordering::SeqCst);
    }

    fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// The vhost as a URL path segment (`/` → `%2f`).
fn urlencoding(vhost: &str) -> String {
    vhost.replace('%', "%25").replace('/', "%2f")
}

/// Copies `from` to `to` while the network is up; holds still while it is cut; ends (and
/// closes both) on EOF, an error, or at the heal after a cut it lived through.
fn pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    born: u64,
    cut: &AtomicBool,
    epoch: &std::sync::atomic::AtomicU64,
) {
    use std::io::{Read, Write};
    from.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if cut.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        if born != epoch.load(Ordering::SeqCst) {
            break;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// The network between every service and the broker cut for 8 s under load (no FIN, no
/// reset: a pulled cable), then back. Heartbeats (2 s here) find the dead connections;
/// every service reconnects by itself. Every accepted reading is stored once and notified.
#[test]
fn a_network_cut_to_the_broker_heals_and_loses_nothing() {
    let _turn = BROKER.lock().unwrap_or_else(|p| p.into_inner());
    let w = World::new();
    let upstream = {
        let uri: lapin::uri::AMQPUri = amqp_addr().parse().unwrap();
        let host = if uri.authority.host == "localhost" {
            "127.0.0.1".to_owned()
        } else {
            uri.authority.host.clone()
        };
        format!("{host}:{}", uri.authority.port).parse().unwrap()
    };
    let proxy = CutProxy::start(upstream);
    let via = proxy.url(&amqp_addr(), "heartbeat=2&connection_timeout=2000");
    let env = [("SLUICE_AMQP_URL", via.as_str())];
    let _processors = w.processors_with(&env);
    let (_ingest, url) = w.ingest(&env);
    let api = free_port();
    let _router = w.router_with(api, &env);
    let (hook, got) = webhook_receiver();
    subscribe_all(api, &hook, serde_json::json!({}));

    let stop = Arc::new(AtomicBool::new(false));
    let load = http_load(url.clone(), Duration::from_millis(20), stop.clone());
    std::thread::sleep(Duration::from_secs(2));
    let cut_at = Instant::now();
    proxy.cut();
    std::thread::sleep(Duration::from_secs(8));
    proxy.heal();
    let healed = Instant::now();
    wait_until("ingest ready again", Duration::from_secs(30), || {
        Http::new().ready(&format!("{url}/readyz"))
    });
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let sent = load.join().unwrap();

    let (accepted, refused_stored) = check_stored_once(&w, &sent);
    wait_all_notified(&sent, &got);
    let refused = sent.values().filter(|s| s.status != 202).count();
    let first_after = sent
        .values()
        .filter(|s| s.status == 202 && s.at > healed)
        .map(|s| s.at.duration_since(healed))
        .min()
        .expect("a request accepted after the heal");
    let during = sent
        .values()
        .filter(|s| s.at > cut_at && s.at < healed)
        .count();
    eprintln!(
        "network cut 8 s: requests {}, accepted {accepted}, refused {refused} (stored anyway \
         {refused_stored}), answered during the cut {during}; first 202 {first_after:.1?} \
         after the heal; every accepted reading stored once and notified",
        sent.len()
    );
    assert!(refused > 0, "the cut refused no request");
    assert!(
        during > 0,
        "ingest answered nothing while the network was cut"
    );
    // A liveness bound, not a performance figure (the figures are in BENCHMARKS.md).
    assert!(
        first_after < Duration::from_secs(20),
        "accepted again after {first_after:?}"
    );
}
