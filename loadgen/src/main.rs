//! `loadgen`: simulated devices pushing telemetry into Sluice over HTTP or straight to the
//! broker, reporting throughput and HDR latency percentiles (table, `.hgrm`, SVG plot).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use sluice_binding::partition::Partitioning;
use sluice_binding::producer::{Producer, ProducerConfig};
use sluice_binding::shutdown;
use sluice_binding::telemetry;
use sluice_binding::topology::{QueueType, Topology};
use sluice_binding::transport::Transport;
use sluice_binding::transport::amqp::{AmqpConfig, AmqpTransport};
use sluice_loadgen::notify::{NotifyConfig, NotifySession};
use sluice_loadgen::profile::Profile;
use sluice_loadgen::run::{BodyFormat, LoadConfig, Observers, Target, run_observed, write_outputs};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TargetKind {
    /// POST to the HTTP front end (`sluice ingest`).
    Http,
    /// Publish binding batches straight to RabbitMQ.
    Amqp,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Json,
    Msgpack,
}

/// Shapes of the offered load over time (ETSI TR 103 527's IoT load examples).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ProfileKind {
    /// --rate throughout.
    Steady,
    /// --rate × --burst-factor for --burst-for from --burst-at, --rate otherwise.
    Burst,
    /// Smart meters: the first --slot-width of every --slot-period at --rate × --burst-factor.
    Slots,
    /// Reconnect storm: nothing for --outage-for from --outage-at, then --rate ×
    /// --burst-factor until the missed readings are flushed, then --rate.
    Storm,
}

/// Push simulated IoT telemetry into Sluice and report throughput and latency.
///
/// The end-to-end latency (device timestamp → committed in storage) is measured from the
/// commit receipts storage publishes; it needs --amqp-url (the broker the processors use).
/// With --notify-listen, loadgen also subscribes to its devices through the router and
/// measures device timestamp → notification received.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version, about)]
struct Cli {
    /// Where to send: the HTTP front end or the broker directly.
    #[arg(long, env = "LOADGEN_TARGET", value_enum, default_value_t = TargetKind::Http)]
    target: TargetKind,
    /// Base URL of the HTTP front end.
    #[arg(long, env = "LOADGEN_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// API key (HTTP target); the tenant is the key's.
    #[arg(
        long,
        env = "LOADGEN_API_KEY",
        hide_env_values = true,
        default_value = "demo-key-change-me"
    )]
    api_key: String,
    /// HTTP body encoding.
    #[arg(long, env = "LOADGEN_FORMAT", value_enum, default_value_t = Format::Json)]
    format: Format,
    /// Broker URL(s), comma-separated: the target of --target amqp, and where commit
    /// receipts are read for the end-to-end latency. Empty: no end-to-end figure.
    #[arg(
        long,
        env = "LOADGEN_AMQP_URL",
        hide_env_values = true,
        value_delimiter = ','
    )]
    amqp_url: Vec<String>,
    /// Namespace of the topology.
    #[arg(long, env = "LOADGEN_NAMESPACE", default_value = "sluice")]
    namespace: String,
    /// Partitions (must match the services).
    #[arg(long, env = "LOADGEN_PARTITIONS", default_value_t = 4)]
    partitions: u32,
    /// Partitioning of directly published batches.
    #[arg(long, env = "LOADGEN_PARTITIONING", default_value = "round-robin")]
    partitioning: Partitioning,
    /// Tenant of directly published batches, and whose commit receipts are counted.
    #[arg(long, env = "LOADGEN_TENANT", default_value = "demo")]
    tenant: String,
    /// Simulated devices.
    #[arg(long, env = "LOADGEN_DEVICES", default_value_t = 100)]
    devices: u32,
    /// Metrics per device.
    #[arg(long, env = "LOADGEN_METRICS", default_value_t = 2)]
    metrics: u32,
    /// Offered load in readings per second (the base rate the profile scales).
    #[arg(long, env = "LOADGEN_RATE", default_value_t = 50_000.0)]
    rate: f64,
    /// Shape of the offered load over time.
    #[arg(long, env = "LOADGEN_PROFILE", value_enum, default_value_t = ProfileKind::Steady)]
    profile: ProfileKind,
    /// Rate multiplier of the busy phase of every profile: the burst, the slots, the
    /// storm's catch-up (which must be above 1).
    #[arg(long, env = "LOADGEN_BURST_FACTOR", default_value_t = 10.0)]
    burst_factor: f64,
    /// When the burst starts (--profile burst).
    #[arg(long, env = "LOADGEN_BURST_AT", default_value = "30s", value_parser = humantime::parse_duration)]
    burst_at: Duration,
    /// How long the burst lasts (--profile burst).
    #[arg(long, env = "LOADGEN_BURST_FOR", default_value = "60s", value_parser = humantime::parse_duration)]
    burst_for: Duration,
    /// Reporting cycle of the meters (--profile slots).
    #[arg(long, env = "LOADGEN_SLOT_PERIOD", default_value = "60s", value_parser = humantime::parse_duration)]
    slot_period: Duration,
    /// Busy part at the start of every cycle (--profile slots).
    #[arg(long, env = "LOADGEN_SLOT_WIDTH", default_value = "10s", value_parser = humantime::parse_duration)]
    slot_width: Duration,
    /// When the devices lose their connection (--profile storm).
    #[arg(long, env = "LOADGEN_OUTAGE_AT", default_value = "30s", value_parser = humantime::parse_duration)]
    outage_at: Duration,
    /// How long they stay disconnected, buffering readings (--profile storm).
    #[arg(long, env = "LOADGEN_OUTAGE_FOR", default_value = "30s", value_parser = humantime::parse_duration)]
    outage_for: Duration,
    /// Readings per request (or per batch with --target amqp).
    #[arg(long, env = "LOADGEN_BATCH_SIZE", default_value_t = 500)]
    batch_size: u32,
    /// How long to send.
    #[arg(long, env = "LOADGEN_DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Stop after this many readings (before --duration if reached first).
    #[arg(long, env = "LOADGEN_COUNT")]
    count: Option<u64>,
    /// Requests outstanding at once.
    #[arg(long, env = "LOADGEN_CONCURRENCY", default_value_t = 64)]
    concurrency: usize,
    /// Device name prefix.
    #[arg(long, env = "LOADGEN_DEVICE_PREFIX", default_value = "dev-")]
    device_prefix: String,
    /// Added to every value (values are deterministic; see the docs).
    #[arg(long, env = "LOADGEN_SEED", default_value_t = 0)]
    seed: u64,
    /// How long to wait after sending for storage to commit (and, with --notify-listen, the
    /// router to notify) everything accepted.
    #[arg(long, env = "LOADGEN_DRAIN_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Longest the whole run may take, sending and draining. At the deadline the run is
    /// stopped as by Ctrl-C, what was measured is reported, and loadgen exits with an
    /// error; a run still not ended 10 s later is abandoned. [default: --duration +
    /// --drain-timeout + 30s]
    #[arg(long, env = "LOADGEN_DEADLINE", value_parser = humantime::parse_duration)]
    deadline: Option<Duration>,
    /// Measure device → notified latency: receive the router's webhook notifications on this
    /// address (`POST /notify`, e.g. 0.0.0.0:8099) and, for the length of the run, subscribe
    /// to the run's devices (--device-prefix) through the router's API at --router-url with
    /// --api-key, whose tenant must be the readings' tenant. Unset: no subscription.
    #[arg(long, env = "LOADGEN_NOTIFY_LISTEN")]
    notify_listen: Option<SocketAddr>,
    /// URL the router posts notifications to [default: http://{--notify-listen}/notify, with
    /// 0.0.0.0 or :: replaced by loopback]. The router must allow its address: loopback and
    /// private addresses need `sluice router --webhook-allow`.
    #[arg(long, env = "LOADGEN_NOTIFY_URL", requires = "notify_listen")]
    notify_url: Option<String>,
    /// Base URL of the router's subscription API (`sluice router`), used with --notify-listen.
    #[arg(
        long,
        env = "LOADGEN_ROUTER_URL",
        default_value = "http://127.0.0.1:8090"
    )]
    router_url: String,
    /// Events per notification: the subscription's batch_notify count (1 to 1000).
    #[arg(long, env = "LOADGEN_NOTIFY_BATCH", default_value_t = 500)]
    notify_batch: u32,
    /// Longest the router holds a batch before notifying: the subscription's batch_notify
    /// duration. It is part of the measured notify latency.
    #[arg(long, env = "LOADGEN_NOTIFY_BATCH_WAIT", default_value = "100ms", value_parser = humantime::parse_duration)]
    notify_batch_wait: Duration,
    /// Directory for summary.json, .hgrm files, latency.svg and timeline.csv.
    #[arg(long, env = "LOADGEN_OUT", default_value = "results")]
    out: PathBuf,
    /// Print the summary as JSON on stdout (the table goes to stderr).
    #[arg(long, env = "LOADGEN_JSON")]
    json: bool,
    /// No live progress line.
    #[arg(long, env = "LOADGEN_QUIET")]
    quiet: bool,
    /// Log filter.
    #[arg(long, env = "LOADGEN_LOG", default_value = "warn")]
    log: String,
}

impl Cli {
    /// The profile the flags describe; the flags of other profiles are ignored.
    fn load_profile(&self) -> Profile {
        match self.profile {
            ProfileKind::Steady => Profile::Steady,
            ProfileKind::Burst => Profile::Burst {
                at: self.burst_at,
                length: self.burst_for,
                factor: self.burst_factor,
            },
            ProfileKind::Slots => Profile::Slots {
                period: self.slot_period,
                width: self.slot_width,
                factor: self.burst_factor,
            },
            ProfileKind::Storm => Profile::Storm {
                outage_at: self.outage_at,
                outage_for: self.outage_for,
                factor: self.burst_factor,
            },
        }
    }

    /// The router subscription the flags describe, if --notify-listen is given.
    fn notify_config(&self) -> Option<NotifyConfig> {
        Some(NotifyConfig {
            listen: self.notify_listen?,
            notify_url: self.notify_url.clone(),
            router_url: self.router_url.clone(),
            api_key: self.api_key.clone(),
            device_prefix: self.device_prefix.clone(),
            batch_count: self.notify_batch,
            batch_wait: self.notify_batch_wait,
        })
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Refuse bad profile flags before connecting to anything.
    cli.load_profile().validate()?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(main_async(cli))
}

async fn main_async(cli: Cli) -> Result<()> {
    telemetry::init_tracing(&cli.log);
    let stop = shutdown::on_signal();
    let topology = Topology {
        namespace: cli.namespace.clone(),
        partitions: cli.partitions,
        queue_type: QueueType::default(),
        ..Topology::default()
    };
    let transport = if cli.amqp_url.is_empty() {
        None
    } else {
        let mut cfg = AmqpConfig::new(cli.amqp_url.clone(), topology);
        cfg.connection_name = "loadgen".to_owned();
        Some(Transport::Amqp(
            AmqpTransport::connect(cfg)
                .await
                .context("cannot connect to the broker")?,
        ))
    };
    let target = match cli.target {
        TargetKind::Http => Target::Http {
            url: cli.url.trim_end_matches('/').to_owned(),
            api_key: cli.api_key.clone(),
            format: match cli.format {
                Format::Json => BodyFormat::Json,
                Format::Msgpack => BodyFormat::Msgpack,
            },
        },
        TargetKind::Amqp => {
            let transport = transport
                .clone()
                .context("--target amqp needs --amqp-url")?;
            let cfg = ProducerConfig {
                partitioning: cli.partitioning,
                ..ProducerConfig::default()
            };
            Target::Direct(Arc::new(Producer::new(transport, cfg)))
        }
    };
    let receipts = match &transport {
        Some(t) => Some(t.subscribe_receipts(1024).await?),
        None => None,
    };
    // Last before sending, so that a failure to connect elsewhere leaves no subscription.
    let notify = match cli.notify_config() {
        Some(cfg) => {
            let session = NotifySession::start(&cfg).await?;
            eprintln!(
                "subscribed to {}* through {} (subscription {}); notifications to {}",
                cli.device_prefix,
                cli.router_url,
                session.subscription(),
                session.url()
            );
            Some(session)
        }
        None => None,
    };
    let cfg = LoadConfig {
        devices: cli.devices,
        metrics: cli.metrics,
        rate: cli.rate,
        profile: cli.load_profile(),
        batch_size: cli.batch_size,
        duration: Some(cli.duration),
        count: cli.count,
        concurrency: cli.concurrency,
        tenant: cli.tenant.clone(),
        device_prefix: cli.device_prefix.clone(),
        seed: cli.seed,
        drain_timeout: cli.drain_timeout,
        progress: !cli.quiet,
    };
    let observers = Observers {
        receipts,
        notifications: notify.as_ref().map(|n| n.receiver().clone()),
    };
    // The run ends on Ctrl-C and SIGTERM too, and at the deadline; its errors wait until
    // the subscription is gone.
    let deadline = cli
        .deadline
        .unwrap_or(cli.duration + cli.drain_timeout + Duration::from_secs(30));
    let run_stop = stop.child_token();
    let timer = {
        let t = run_stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(deadline).await;
            eprintln!("the run reached its deadline of {deadline:?}; stopping it");
            t.cancel();
        })
    };
    let summary = tokio::time::timeout(
        deadline + DEADLINE_GRACE,
        run_observed(cfg, target, observers, run_stop.clone()),
    )
    .await
    .unwrap_or_else(|_| {
        Err(anyhow::anyhow!(
            "the run did not end within {DEADLINE_GRACE:?} of its deadline ({deadline:?}); abandoned"
        ))
    });
    let deadline_hit = run_stop.is_cancelled() && !stop.is_cancelled();
    timer.abort();
    if let Some(n) = notify
        && let Err(e) = n.close().await
    {
        eprintln!("warning: {e:#}");
    }
    let summary = summary?;
    if let Some(t) = &transport {
        t.close().await;
    }
    let files = write_outputs(&summary, &cli.out)?;
    eprintln!("{summary}");
    for f in files {
        eprintln!("wrote {}", f.display());
    }
    if cli.json {
        println!("{}", summary.to_json()?);
    }
    anyhow::ensure!(
        !deadline_hit,
        "the run reached its deadline of {deadline:?} (--deadline)"
    );
    Ok(())
}

/// How long a run stopped at its deadline may take to end.
const DEADLINE_GRACE: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("loadgen").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn notify_flags_make_the_subscription_config() {
        assert!(parse(&[]).notify_config().is_none());
        let cfg = parse(&["--notify-listen", "0.0.0.0:8099", "--device-prefix", "m-"])
            .notify_config()
            .unwrap();
        assert_eq!(cfg.listen, "0.0.0.0:8099".parse().unwrap());
        assert_eq!(cfg.notify_url, None);
        assert_eq!(cfg.router_url, "http://127.0.0.1:8090");
        assert_eq!(cfg.api_key, "demo-key-change-me");
        assert_eq!(cfg.device_prefix, "m-");
        assert_eq!(
            (cfg.batch_count, cfg.batch_wait),
            (500, Duration::from_millis(100))
        );
        let cfg = parse(&[
            "--notify-listen",
            "127.0.0.1:0",
            "--notify-url",
            "http://10.0.0.5:8099/notify",
            "--router-url",
            "http://router:8090",
            "--notify-batch",
            "50",
            "--notify-batch-wait",
            "1s",
        ])
        .notify_config()
        .unwrap();
        assert_eq!(
            cfg.notify_url.as_deref(),
            Some("http://10.0.0.5:8099/notify")
        );
        assert_eq!(cfg.router_url, "http://router:8090");
        assert_eq!(
            (cfg.batch_count, cfg.batch_wait),
            (50, Duration::from_secs(1))
        );
        // A notify URL alone would subscribe nobody.
        assert!(Cli::try_parse_from(["loadgen", "--notify-url", "http://a/notify"]).is_err());
    }

    #[test]
    fn profile_defaults_match_the_library_defaults() {
        assert_eq!(parse(&[]).load_profile(), Profile::Steady);
        assert_eq!(
            parse(&["--profile", "burst"]).load_profile(),
            Profile::burst()
        );
        assert_eq!(
            parse(&["--profile", "slots"]).load_profile(),
            Profile::slots()
        );
        assert_eq!(
            parse(&["--profile", "storm"]).load_profile(),
            Profile::storm()
        );
    }

    #[test]
    fn profile_flags_set_the_parameters() {
        let cli = parse(&[
            "--profile",
            "slots",
            "--burst-factor",
            "4",
            "--slot-period",
            "15m",
            "--slot-width",
            "90s",
        ]);
        assert_eq!(
            cli.load_profile(),
            Profile::Slots {
                period: Duration::from_secs(900),
                width: Duration::from_secs(90),
                factor: 4.0,
            }
        );
        let cli = parse(&[
            "--profile",
            "storm",
            "--outage-at",
            "5s",
            "--outage-for",
            "1m",
        ]);
        assert_eq!(
            cli.load_profile(),
            Profile::Storm {
                outage_at: Duration::from_secs(5),
                outage_for: Duration::from_secs(60),
                factor: 10.0,
            }
        );
    }
}
