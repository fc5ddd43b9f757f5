//! Probes of what an operator ships (hole 10): credentials given in URLs never reach the
//! logs of a service that cannot connect. (compose's ports and passwords are checked by
//! the end-to-end tests, `sluice/tests/e2e/compose.rs`.)

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::Suite;
use crate::deployment::*;
use crate::support::sluice_bin;

pub(crate) async fn probes(d: &Deployment, s: &mut Suite) {
    for service in ["ingest", "process", "router", "query-api"] {
        s.probe(
            "10",
            format!("`sluice {service}` never logs the passwords of its URLs"),
            passwords_stay_out_of_logs(d, service),
        )
        .await;
    }
}

async fn passwords_stay_out_of_logs(d: &Deployment, service: &'static str) {
    let dir = d.w.dir.path().join(format!("secrets-{service}"));
    std::fs::create_dir_all(&dir).unwrap();
    let (out, err) = (dir.join("stdout"), dir.join("stderr"));
    let mut child = Command::new(sluice_bin())
        .arg(service)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        // Nothing listens on these ports: each service reports that it cannot connect.
        .env(
            "SLUICE_AMQP_URL",
            "amqp://mallory:hunter2-amqp@127.0.0.1:1/%2f",
        )
        .env(
            "SLUICE_REDIS_URL",
            "redis://mallory:hunter2-redis@127.0.0.1:2/0",
        )
        .env("SLUICE_CONNECT_TIMEOUT", "2s")
        .env("SLUICE_TENANTS", &d.w.tenants)
        .env("SLUICE_STORE", dir.join("data"))
        .env("SLUICE_LISTEN", "127.0.0.1:0")
        .env("SLUICE_ROUTER_LISTEN", "127.0.0.1:0")
        .env("SLUICE_METRICS_LISTEN", "")
        .env("SLUICE_ADMIN_LISTEN", "")
        .env("SLUICE_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let logs = std::fs::read_to_string(&out).unwrap() + &std::fs::read_to_string(&err).unwrap();
    assert!(!logs.is_empty(), "sluice {service} said nothing");
    assert!(
        !logs.contains("hunter2"),
        "sluice {service} logged a password:\n{logs}"
    );
}
