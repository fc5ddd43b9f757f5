//! More than one broker, for real (TR 103 527 Figure 3): the `sluice` binaries against
//! RabbitMQ nodes this binary starts on loopback and throws away (`nodes.rs`; needs
//! RabbitMQ installed and root, like the fault tests), in both shapes `--amqp-url` takes:
//!
//! - two independent brokers: ingest spreads batches over both, the storage pool drains
//!   both; one is stopped mid-run and the other carries on;
//! - a three-node cluster with the partition queues quorum-replicated over it: one node is
//!   killed mid-run (SIGKILL) and the consumers move on to the queues' new leaders.
//!
//! Both count: every reading answered 202 is stored exactly once. The nodes are the tests'
//! own, so these tests run beside the others (they share only Redis, namespaced).
#![cfg(feature = "broker-tests")]

mod nodes;
#[path = "../support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nodes::{Node, cluster};
use support::broker::*;
use support::load::*;
use support::*;

/// The prefix of the storage pool's partition queues of `w`.
fn storage_queues(w: &World) -> String {
    let q = w.ns.topology().partition_queue("storage", 0);
    q.trim_end_matches(char::is_numeric).to_owned()
}

/// Requests sent in `[from, to)`: (sent, accepted).
fn between(sent: &HashMap<String, Sent>, from: Instant, to: Instant) -> (usize, usize) {
    let window: Vec<&Sent> = sent
        .values()
        .filter(|s| s.at >= from && s.at < to)
        .collect();
    let accepted = window.iter().filter(|s| s.status == 202).count();
    (window.len(), accepted)
}

#[test]
fn two_independent_brokers_share_the_load_and_one_stopping_loses_nothing() {
    let (a, b) = (Node::start("a"), Node::start("b"));
    a.await_up();
    b.await_up();
    let w = World::on_brokers(vec![a.url(), b.url()]);

    // Ingest alone first: it declares the storage queues on both brokers, and the batches
    // it accepts wait there, so each broker's share can be counted.
    let (ingest, url) = w.ingest(&[]);
    let stop = Arc::new(AtomicBool::new(false));
    let first = http_load_as("p", url.clone(), Duration::from_millis(20), stop.clone());
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let mut sent = first.join().unwrap();
    assert!(
        sent.values().all(|s| s.status == 202),
        "both brokers up, a request refused"
    );
    // The broker updates queue statistics every few seconds: wait for both.
    let queues = storage_queues(&w);
    let (mut on_a, mut on_b) = (0, 0);
    wait_until("batches on both brokers", Duration::from_secs(20), || {
        (on_a, on_b) = (a.messages(&queues), b.messages(&queues));
        on_a > 0 && on_b > 0
    });
    eprintln!(
        "{} requests: {on_a} batches on broker a, {on_b} on broker b",
        sent.len()
    );

    let processors = w.processors();
    let stop = Arc::new(AtomicBool::new(false));
    let load = http_load_as("s", url.clone(), Duration::from_millis(20), stop.clone());
    std::thread::sleep(Duration::from_secs(2));
    b.ctl(&["stop_app"]);
    let stopped = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let rows_then = total_rows(&w.data(), "acme");
    std::thread::sleep(Duration::from_secs(4));
    let rows_later = total_rows(&w.data(), "acme");
    let http = Http::new();
    let ready = http.get_text(&format!("{url}/readyz"));
    b.ctl(&["start_app"]);
    let restarted = Instant::now();
    b.await_up();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let second = load.join().unwrap();
    let (during, accepted_during) = between(&second, stopped, restarted);
    sent.extend(second);

    let (accepted, refused_stored) = check_stored_once(&w, &sent);
    eprintln!(
        "two brokers, b stopped {:.1?}: requests {}, accepted {accepted} (refused but stored \
         {refused_stored}); while b was down {accepted_during} of {during} accepted, rows \
         {rows_then} -> {rows_later}; ingest /readyz meanwhile: {ready}",
        restarted - stopped,
        sent.len()
    );
    assert!(
        accepted_during * 10 >= during * 9,
        "with b down only {accepted_during} of {during} requests were accepted"
    );
    assert!(rows_later > rows_then, "storage stopped while b was down");
    assert!(
        ready.contains("degraded"),
        "ingest /readyz with b down: {ready}"
    );
    drop((processors, ingest));
}

#[test]
fn a_three_node_cluster_loses_a_node_and_nothing_accepted() {
    let nodes = cluster("c", 3);
    let w = World::on_brokers(nodes.iter().map(Node::url).collect());
    let queues = storage_queues(&w);
    let processors = w.processors();
    let (ingest, url) = w.ingest(&[]);

    // Each partition queue is a quorum queue with a member on every node.
    let listed = nodes[1].ctl(&[
        "list_queues",
        "name",
        "type",
        "members",
        "--no-table-headers",
    ]);
    let partitions: Vec<&str> = listed.lines().filter(|l| l.starts_with(&queues)).collect();
    assert_eq!(partitions.len(), PARTITIONS as usize, "{listed}");
    for line in &partitions {
        assert!(line.contains("quorum"), "{line}");
        for n in &nodes {
            assert!(line.contains(&n.name), "{line}: no member on {}", n.name);
        }
    }

    let stop = Arc::new(AtomicBool::new(false));
    let load = http_load_as("c", url.clone(), Duration::from_millis(20), stop.clone());
    std::thread::sleep(Duration::from_secs(2));
    nodes[0].kill();
    let killed = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let rows_then = total_rows(&w.data(), "acme");
    std::thread::sleep(Duration::from_secs(4));
    let rows_later = total_rows(&w.data(), "acme");
    stop.store(true, Ordering::Relaxed);
    let sent = load.join().unwrap();
    let settled = killed + Duration::from_secs(2);
    let (after, accepted_after) = between(&sent, settled, Instant::now());

    let (accepted, refused_stored) = check_stored_once(&w, &sent);
    eprintln!(
        "cluster of 3, {} killed: requests {}, accepted {accepted} (refused but stored \
         {refused_stored}); from 2 s after the kill {accepted_after} of {after} accepted, rows \
         {rows_then} -> {rows_later}",
        nodes[0].name,
        sent.len()
    );
    assert!(
        accepted_after > 0,
        "nothing accepted after the node was killed"
    );
    assert!(
        rows_later > rows_then,
        "consumers did not move on after the kill"
    );
    drop((processors, ingest));
}
