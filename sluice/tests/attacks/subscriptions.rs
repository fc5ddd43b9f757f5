//! Probes through the router: subscriptions that poison delivery (hole 1), reach Sluice's
//! own queues or another tenant's exchange (hole 2), pin the shared notify window (hole 7),
//! make matching expensive (hole 8), fill Redis (hole 5), reach internal networks (hole 11,
//! every SSRF form), read or delete another tenant's subscriptions, and trickle headers.

use std::sync::atomic::Ordering;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use sluice_testkit::wait::until;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Suite;
use crate::deployment::*;

pub(crate) async fn probes(d: &Deployment, s: &mut Suite) {
    s.probe(
        "1",
        "a granted exchange that does not exist: mallory's notifications fail alone",
        failing_target_fails_alone(d),
    )
    .await;
    let ns = d.w.ns.name().to_owned();
    for (exchange, key) in [
        (String::new(), format!("{ns}.storage.0")),
        (String::new(), d.acme_inbox.clone()),
        ("amq.direct".to_owned(), d.acme_inbox.clone()),
        ("amq.topic".to_owned(), "#".to_owned()),
        (format!("{ns}.telemetry"), "0".to_owned()),
        (format!("{ns}.events"), "acme.fault".to_owned()),
        (format!("{ns}.notify"), "0".to_owned()),
        (d.acme_exchange.clone(), String::new()),
    ] {
        s.probe(
            "2",
            format!("AMQP target exchange {exchange:?} key {key:?} is refused"),
            target_refused(
                d,
                json!({"type": "amqp", "exchange": exchange, "routing_key": key}),
            ),
        )
        .await;
    }
    s.probe(
        "7",
        "40 batches held for a day by mallory pin nothing: acme is notified",
        held_batches_pin_nothing(d),
    )
    .await;
    s.probe(
        "8",
        "matching cost is bounded per pattern, list and tenant",
        matching_bounded(d),
    )
    .await;
    s.probe(
        "5",
        "Redis stream targets are bounded per target and per tenant",
        streams_bounded(d),
    )
    .await;
    s.probe(
        "5",
        "mallory at its live-feed cap gets 429, acme opens its own",
        live_feeds_capped(d),
    )
    .await;
    ssrf(d, s).await;
    s.probe(
        "cross-tenant",
        "mallory cannot list, read, delete or follow acme's subscriptions",
        subscriptions_are_per_tenant(d),
    )
    .await;
    s.probe(
        "4",
        "connections trickling headers to the router are closed; acme is served",
        router_header_trickle(d),
    )
    .await;
}

async fn failing_target_fails_alone(d: &Deployment) {
    let dead = d.w.ns.topology().notify_dead_queue();
    let dead_before = d.ready(&dead).await;
    let (status, body) = d
        .subscribe(
            MALLORY,
            json!({"criteria": {"devices": ["m-h1-*"]},
                   "target": {"type": "amqp", "exchange": d.mallory_missing_exchange}}),
        )
        .await;
    assert_eq!(status, 201, "a granted exchange is a valid target: {body}");
    for i in 0..5 {
        assert_eq!(d.mallory_sends(&format!("m-h1-{i}"), 10).await, 202);
    }
    let inbox_before = d.ready(&d.acme_inbox).await;
    d.acme_sends("acme-h1", 1).await;
    d.acme_sends("acme-amqp-h1", 1).await;
    d.acme_notified("acme-h1", Duration::from_secs(20)).await;
    let inbox = until(Duration::from_secs(20), || async {
        let n = d.ready(&d.acme_inbox).await;
        (n > inbox_before).then_some(n)
    })
    .await;
    assert!(
        inbox.is_some(),
        "acme's AMQP notification never reached its queue"
    );
    // Mallory's own notifications took their own retries and their own dead letters.
    let dead_now = until(Duration::from_secs(30), || async {
        let n = d.ready(&dead).await;
        (n > dead_before).then_some(n)
    })
    .await;
    assert!(
        dead_now.is_some(),
        "mallory's refused notifications never reached {dead}"
    );
}

async fn target_refused(d: &Deployment, target: Value) {
    let (status, body) = d
        .subscribe(
            MALLORY,
            json!({"criteria": {"devices": ["m-h2-*"]}, "target": target}),
        )
        .await;
    assert!(
        (400..500).contains(&status),
        "{target} accepted ({status}): {body}"
    );
}

async fn held_batches_pin_nothing(d: &Deployment) {
    let (status, body) = d
        .subscribe(
            MALLORY,
            json!({"criteria": {"devices": ["m-h7-*"]},
                   "policy": {"batch_notify": {"count": 1000, "duration": "24h"}},
                   "target": {"type": "redis_stream", "stream": "held", "maxlen": 1000}}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    // 40 requests: 40 batches, each a job of the batching subscription, against a notify
    // window of 8 per queue.
    for i in 0..40 {
        assert_eq!(d.mallory_sends(&format!("m-h7-{i}"), 1).await, 202);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    d.acme_sends("acme-h7", 1).await;
    d.acme_notified("acme-h7", Duration::from_secs(20)).await;
}

async fn matching_bounded(d: &Deployment) {
    let long = format!("m-{}", "a".repeat(300));
    let stars = "m*a*b*c*d*e*f*g*h*i".to_owned();
    let many: Vec<String> = (0..65).map(|i| format!("m-{i}")).collect();
    for (what, criteria) in [
        ("a 300-byte pattern", json!({"devices": [long]})),
        ("a pattern with 9 '*'", json!({"devices": [stars]})),
        ("65 patterns", json!({"devices": many})),
    ] {
        let (status, body) = d
            .subscribe(
                MALLORY,
                json!({"criteria": criteria, "target": {"type": "live"}}),
            )
            .await;
        assert!((400..500).contains(&status), "{what} accepted: {body}");
    }
    // Subscriptions no index narrows are scanned on every lookup: at most 16 a tenant.
    let mut created = Vec::new();
    let refused = loop {
        let (status, body) = d
            .subscribe(
                MALLORY,
                json!({"criteria": {"devices": ["*x"], "metrics": ["*y"]},
                       "target": {"type": "live"}}),
            )
            .await;
        if status != 201 {
            break (status, body);
        }
        created.push(body["id"].as_str().unwrap().to_owned());
        assert!(
            created.len() <= 16,
            "{} scanned subscriptions",
            created.len()
        );
    };
    assert_eq!(refused.0, 422, "{}", refused.1);
    for id in created {
        d.router_call(Method::DELETE, MALLORY, &format!("/v1/subscriptions/{id}"))
            .await;
    }
}

async fn streams_bounded(d: &Deployment) {
    for maxlen in [0, 1_000_001] {
        let (status, body) = d
            .subscribe(
                MALLORY,
                json!({"criteria": {}, "target": {"type": "redis_stream", "stream": "s", "maxlen": maxlen}}),
            )
            .await;
        assert!((400..500).contains(&status), "maxlen {maxlen}: {body}");
    }
    // 2 000 000 entries a tenant: two streams of 1 000 000 fill it (with the 1000 of the
    // held-batch probe, the second is already one too many).
    let mut created = Vec::new();
    let mut last = (0, Value::Null);
    for _ in 0..3 {
        last = d
            .subscribe(
                MALLORY,
                json!({"criteria": {"devices": ["m-none"]},
                       "target": {"type": "redis_stream", "stream": "big", "maxlen": 1_000_000}}),
            )
            .await;
        if last.0 != 201 {
            break;
        }
        created.push(last.1["id"].as_str().unwrap().to_owned());
    }
    assert!(
        created.len() < 2,
        "{} streams of 1 000 000 entries",
        created.len()
    );
    assert_eq!(last.0, 422, "{}", last.1);
    assert_eq!(last.1["error"], "too_costly", "{}", last.1);
    for id in created {
        d.router_call(Method::DELETE, MALLORY, &format!("/v1/subscriptions/{id}"))
            .await;
    }
}

async fn live_feeds_capped(d: &Deployment) {
    let live = |key: &'static str| async move {
        let (status, body) = d
            .subscribe(
                key,
                json!({"criteria": {"devices": ["none-such"]}, "target": {"type": "live"}}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().unwrap().to_owned()
    };
    let open = |key: &'static str, id: String| async move {
        d.client
            .get(format!("{}/v1/subscriptions/{id}/live", d.router))
            .bearer_auth(key)
            .send()
            .await
            .expect("the router answers")
    };
    let id = live(MALLORY).await;
    let mut feeds = Vec::new();
    let refused = loop {
        let resp = open(MALLORY, id.clone()).await;
        if resp.status() != 200 {
            break resp.status().as_u16();
        }
        feeds.push(resp);
        assert!(feeds.len() <= 16, "{} live feeds open", feeds.len());
    };
    assert_eq!(refused, 429);
    let acme = live(ACME).await;
    let resp = open(ACME, acme.clone()).await;
    assert_eq!(resp.status(), 200, "acme's own live feed");
    drop(feeds);
    drop(resp);
    for (key, id) in [(MALLORY, id), (ACME, acme)] {
        d.router_call(Method::DELETE, key, &format!("/v1/subscriptions/{id}"))
            .await;
    }
}

/// Every way to spell an internal address, aimed at the canary port: refused at creation,
/// or, when a name only resolves there, never connected to.
async fn ssrf(d: &Deployment, s: &mut Suite) {
    let c = d.canary_port;
    let forms = [
        format!("http://127.0.0.1:{c}/"),
        format!("http://2130706433:{c}/"),
        format!("http://0x7f000001:{c}/"),
        format!("http://0177.0.0.1:{c}/"),
        format!("http://127.1:{c}/"),
        format!("http://0.0.0.0:{c}/"),
        format!("http://[::1]:{c}/"),
        format!("http://[::ffff:127.0.0.1]:{c}/"),
        format!("http://[::ffff:7f00:1]:{c}/"),
        format!("http://[::127.0.0.1]:{c}/"),
        format!("http://[64:ff9b::7f00:1]:{c}/"),
        format!("http://[64:ff9b:1::7f00:1]:{c}/"),
        format!("http://[2002:7f00:1::]:{c}/"),
        format!("http://acme@127.0.0.1:{c}/"),
        // Names that resolve to loopback on this machine (/etc/hosts), not allow-listed.
        format!("http://vm:{c}/"),
        format!("http://runsc:{c}/"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://[fe80::1]/".to_owned(),
        "http://[fd00::1]/".to_owned(),
        "http://10.0.0.1/".to_owned(),
        "http://172.16.0.1/".to_owned(),
        "http://192.168.1.1/".to_owned(),
        "http://100.64.0.1/".to_owned(),
        "http://192.0.0.1/".to_owned(),
        "http://198.18.0.1/".to_owned(),
        "http://240.0.0.1/".to_owned(),
        "http://224.0.0.1/".to_owned(),
        "http://255.255.255.255/".to_owned(),
        format!("gopher://127.0.0.1:{c}/"),
        "file:///etc/passwd".to_owned(),
    ];
    let mut accepted = Vec::new();
    for url in forms {
        let (status, body) = d
            .subscribe(
                MALLORY,
                json!({"criteria": {"devices": ["m-ssrf-*"]},
                       "target": {"type": "webhook", "url": url}}),
            )
            .await;
        match status {
            201 => accepted.push(url),
            400..=499 => {
                s.probe("11", format!("webhook {url} refused"), async {})
                    .await
            }
            _ => {
                s.probe("11", format!("webhook {url} refused"), async move {
                    panic!("{url}: {status} {body}")
                })
                .await
            }
        }
    }
    // Accepted ones (a name that resolves to loopback only when connecting) must never
    // connect: a matching reading, then acme's marker notified, then time to retry.
    let before = d.canary_hits.load(Ordering::SeqCst);
    assert_eq!(d.mallory_sends("m-ssrf-0", 1).await, 202);
    d.acme_sends("acme-ssrf", 1).await;
    d.acme_notified("acme-ssrf", Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let hits = d.canary_hits.load(Ordering::SeqCst) - before;
    for url in accepted {
        s.probe("11", format!("webhook {url} never connects"), async move {
            assert_eq!(hits, 0, "{url}: {hits} connection(s) reached the canary");
        })
        .await;
    }
}

async fn subscriptions_are_per_tenant(d: &Deployment) {
    let (status, list) = d.router_call(Method::GET, ACME, "/v1/subscriptions").await;
    assert_eq!(status, 200);
    let ids: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(!ids.is_empty());
    let (status, body) = d
        .subscribe(
            ACME,
            json!({"criteria": {"devices": ["none-such"]}, "target": {"type": "live"}}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let live = body["id"].as_str().unwrap().to_owned();
    let (_, mine) = d
        .router_call(Method::GET, MALLORY, "/v1/subscriptions")
        .await;
    for s in mine.as_array().unwrap() {
        assert!(
            !ids.contains(&s["id"].as_str().unwrap().to_owned()),
            "listed {s}"
        );
    }
    for id in ids.iter().chain([&live]) {
        for (method, path) in [
            (Method::GET, format!("/v1/subscriptions/{id}")),
            (Method::GET, format!("/v1/subscriptions/{id}/live")),
            (Method::DELETE, format!("/v1/subscriptions/{id}")),
        ] {
            let (status, body) = d.router_call(method.clone(), MALLORY, &path).await;
            assert!(
                status == 404 || (status == 400 && path.ends_with("/live")),
                "{method} {path} as mallory: {status} {body}"
            );
        }
        let (status, _) = d
            .router_call(Method::GET, ACME, &format!("/v1/subscriptions/{id}"))
            .await;
        assert_eq!(status, 200, "acme's {id} is still there");
    }
    d.router_call(Method::DELETE, ACME, &format!("/v1/subscriptions/{live}"))
        .await;
}

async fn router_header_trickle(d: &Deployment) {
    let addr = d.router.trim_start_matches("http://").to_owned();
    let mut conns = Vec::new();
    for _ in 0..100 {
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        c.write_all(b"GET /v1/subscriptions HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        conns.push(c);
    }
    // acme is served while they are open,
    let (status, _) = d.router_call(Method::GET, ACME, "/v1/subscriptions").await;
    assert_eq!(status, 200);
    // and every trickler is closed after the header timeout.
    for c in &mut conns {
        let mut buf = [0u8; 256];
        let r = tokio::time::timeout(READ_TIMEOUT * 3, c.read(&mut buf)).await;
        assert!(
            matches!(r, Ok(Ok(_)) | Ok(Err(_))),
            "a connection trickling headers stayed open"
        );
    }
}
