//! RabbitMQ nodes of the test's own on loopback: independent ones and a cluster, each with
//! its own ports, data directory and no plugins. They are started through Debian's
//! `rabbitmq-server` as the `rabbitmq` user (sharing the local node's Erlang cookie, so
//! `rabbitmqctl -n` reaches them), which needs root like the fault tests, and killed and
//! removed when dropped.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::broker::rt;
use crate::support::free_port;

pub(crate) struct Node {
    /// Erlang node name, `sluice-<pid>-<tag>@localhost`.
    pub(crate) name: String,
    /// AMQP port on 127.0.0.1.
    pub(crate) port: u16,
    dir: PathBuf,
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e} (needs RabbitMQ installed and root)"));
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Node {
    /// Starts a node in the background; [`Node::await_up`] waits for it.
    pub(crate) fn start(tag: &str) -> Node {
        let name = format!("sluice-{}-{tag}@localhost", std::process::id());
        let (port, dist) = (free_port(), free_port());
        let dir = std::env::temp_dir().join(format!("sluice-node-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        run(
            Command::new("chown").args(["-R", "rabbitmq:"]).arg(&dir),
            "chown the node's directory to rabbitmq",
        );
        let d = dir.display();
        run(
            Command::new("runuser")
                .args(["-u", "rabbitmq", "--", "env", "HOME=/var/lib/rabbitmq"])
                .arg(format!("RABBITMQ_NODENAME={name}"))
                .arg("RABBITMQ_NODE_IP_ADDRESS=127.0.0.1")
                .arg(format!("RABBITMQ_NODE_PORT={port}"))
                .arg(format!("RABBITMQ_DIST_PORT={dist}"))
                .arg(format!("RABBITMQ_MNESIA_BASE={d}/mnesia"))
                .arg(format!("RABBITMQ_LOG_BASE={d}/log"))
                .arg(format!("RABBITMQ_PID_FILE={d}/pid"))
                .arg(format!("RABBITMQ_ENABLED_PLUGINS_FILE={d}/enabled_plugins"))
                .arg(format!("RABBITMQ_CONFIG_FILE={d}/rabbitmq"))
                .arg(format!("RABBITMQ_ADVANCED_CONFIG_FILE={d}/advanced.config"))
                .args(["/usr/lib/rabbitmq/bin/rabbitmq-server", "-detached"]),
            "rabbitmq-server -detached",
        );
        Node { name, port, dir }
    }

    /// Waits until the node completes an AMQP handshake.
    pub(crate) fn await_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !self.accepts() {
            assert!(
                Instant::now() < deadline,
                "node {} did not start within 120 s (logs in {})",
                self.name,
                self.dir.join("log").display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Whether the node completes an AMQP handshake now.
    pub(crate) fn accepts(&self) -> bool {
        let url = self.url();
        rt().block_on(async {
            let c = lapin::Connection::connect(&url, lapin::ConnectionProperties::default());
            match tokio::time::timeout(Duration::from_secs(2), c).await {
                Ok(Ok(c)) => {
                    let _ = c.close(200, "probe".into()).await;
                    true
                }
                _ => false,
            }
        })
    }

    pub(crate) fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// `rabbitmqctl -n <node> args…`; its output.
    pub(crate) fn ctl(&self, args: &[&str]) -> String {
        run(
            Command::new("rabbitmqctl")
                .args(["-q", "-n", &self.name])
                .args(args),
            &format!("rabbitmqctl -n {} {args:?}", self.name),
        )
    }

    /// Messages ready in the queues whose name starts with `prefix`.
    pub(crate) fn messages(&self, prefix: &str) -> u64 {
        self.ctl(&[
            "list_queues",
            "name",
            "messages_ready",
            "--no-table-headers",
        ])
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (name, n) = (f.next()?, f.next()?);
            name.starts_with(prefix).then(|| n.parse::<u64>().ok())?
        })
        .sum()
    }

    /// SIGKILL of the node's Erlang VM: a crash, nothing flushed or handed over.
    pub(crate) fn kill(&self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pid")) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
    }

    /// Joins the cluster of `seed` (stop_app, join_cluster, start_app).
    pub(crate) fn join(&self, seed: &Node) {
        self.ctl(&["stop_app"]);
        self.ctl(&["join_cluster", &seed.name]);
        self.ctl(&["start_app"]);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        // The VM may take a moment to release its files.
        std::thread::sleep(Duration::from_millis(200));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `n` nodes started together, then clustered with the first.
pub(crate) fn cluster(tag: &str, n: usize) -> Vec<Node> {
    let nodes: Vec<Node> = (0..n).map(|i| Node::start(&format!("{tag}{i}"))).collect();
    for node in &nodes {
        node.await_up();
    }
    for node in &nodes[1..] {
        node.join(&nodes[0]);
        node.await_up();
    }
    nodes
}
