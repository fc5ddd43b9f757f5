//! The attack suite: one deployment of Sluice (`sluice ingest`, `process`, `router` and
//! `query-api` against real RabbitMQ and Redis) probed by a hostile tenant, `mallory`,
//! while a victim tenant, `acme`, goes on working. Each probe tries one way of reaching,
//! forging or stalling another tenant's data, subscriptions or capacity (the holes of
//! issue #9, SQL escapes, SSRF forms, spoofed tenants, hostile bytes) and checks, by
//! counting on the broker, in Redis and in the table, that nothing passed.
//!
//! One `#[test]` runs every probe in turn against the same deployment, as an attacker
//! would, and never stops at the first leak: each probe's panic is caught and reported,
//! the table of results goes to stderr and to `$CARGO_TARGET_TMPDIR/attack-suite.md`, and
//! the test fails if any probe found a leak. `SECURITY.md` quotes the last result.
//!
//! Needs the `broker-tests` feature (the README's test command) and `rabbitmqctl` on this
//! machine (mallory's broker user is made with it).
#![cfg(feature = "broker-tests")]

#[path = "../support/mod.rs"]
mod support;

mod deployment;
mod direct;
mod ingest;
mod operator;
mod reads;
mod subscriptions;

use std::fmt::Write as _;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Instant;

use futures::FutureExt;

use deployment::Deployment;

/// The outcome of one probe.
struct Outcome {
    hole: &'static str,
    probe: String,
    /// `None` when the defence held; else what leaked (the probe's panic message).
    leak: Option<String>,
    secs: f64,
}

/// Runs probes and keeps their outcomes.
pub(crate) struct Suite {
    outcomes: Vec<Outcome>,
}

impl Suite {
    /// Runs one probe; a panic inside it is a leak (or a probe that could not run), and
    /// the suite goes on.
    pub(crate) async fn probe<F: Future<Output = ()>>(
        &mut self,
        hole: &'static str,
        probe: impl Into<String>,
        f: F,
    ) {
        let probe = probe.into();
        let started = Instant::now();
        let leak = AssertUnwindSafe(f).catch_unwind().await.err().map(|p| {
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "a panic without a message".to_owned())
        });
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "probe [{hole}] {probe}: {} ({secs:.1} s)",
            if leak.is_some() { "LEAK" } else { "held" }
        );
        self.outcomes.push(Outcome {
            hole,
            probe,
            leak,
            secs,
        });
    }

    fn report(&self) -> String {
        let leaks = self.outcomes.iter().filter(|o| o.leak.is_some()).count();
        let mut s = format!(
            "# Attack suite\n\nprobes tried: {}, leaks found: {leaks}\n\n| hole | probe | result | s |\n|---|---|---|---:|\n",
            self.outcomes.len()
        );
        for o in &self.outcomes {
            let result = match &o.leak {
                None => "held".to_owned(),
                Some(l) => format!("**LEAK**: {}", l.replace('\n', " ").replace('|', "\\|")),
            };
            let _ = writeln!(s, "| {} | {} | {result} | {:.1} |", o.hole, o.probe, o.secs);
        }
        s
    }
}

#[test]
fn a_hostile_tenant_reaches_forges_and_stalls_nothing_of_another() {
    let d = Deployment::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut suite = Suite {
        outcomes: Vec::new(),
    };
    rt.block_on(async {
        // Poisons that stay for the rest of the suite come first: a target the broker
        // refuses and a batch held for a day, while the victim keeps being served.
        subscriptions::probes(&d, &mut suite).await;
        direct::probes(&d, &mut suite).await;
        ingest::probes(&d, &mut suite).await;
        reads::probes(&d, &mut suite).await;
        operator::probes(&d, &mut suite).await;
        // Last: everything acme was told was accepted, and nothing else, is acme's.
        suite
            .probe(
                "all",
                "acme's table, latest values and notifications hold acme's readings only",
                d.acme_holds_only_its_own(),
            )
            .await;
    });
    let report = suite.report();
    eprintln!("\n{report}");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("attack-suite.md");
    let _ = std::fs::write(&path, &report);
    let leaks = suite.outcomes.iter().filter(|o| o.leak.is_some()).count();
    assert_eq!(leaks, 0, "{leaks} probe(s) found a leak:\n{report}");
}
