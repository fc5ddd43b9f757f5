//! `autoscale-timeline`: the autoscaler under a burst, on real RabbitMQ.
//!
//! Runs a storage pool with the built-in autoscaler and pushes loadgen's `burst` profile
//! straight to the broker (steady, then `--factor` × the rate for `--burst-for`, then steady
//! again), then keeps watching until the pool is back at its minimum. Every second it
//! records the offered load, the partition backlog, the workers and the p99 of the
//! end-to-end latency of the rows committed in that second (from the commit receipts).
//! It writes the timeline as CSV and SVG and prints the figures of issue #4: time to drain
//! the backlog after the burst, time back to the minimum, direction changes per cooldown.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::Deserializer;
use plotters::prelude::*;
use sluice_bench::{BrokerArg, scratch_sinks};
use sluice_binding::producer::{Producer, ProducerConfig};
use sluice_binding::shutdown::CancellationToken;
use sluice_binding::topology::Topology;
use sluice_binding::transport::Transport;
use sluice_binding::transport::amqp::{AmqpConfig, AmqpTransport};
use sluice_loadgen::profile::Profile;
use sluice_loadgen::run::{LoadConfig, Target};
use sluice_processors::autoscale::{AutoscaleConfig, Target as ScaleTarget};
use sluice_processors::{PoolConfig, PoolControl};

/// The autoscaler under a burst.
#[derive(Debug, Parser)]
#[command(name = "autoscale-timeline", version)]
struct Cli {
    #[command(flatten)]
    broker: BrokerArg,
    /// Steady offered load, readings/s.
    #[arg(long, default_value_t = 100_000.0)]
    rate: f64,
    /// Burst factor.
    #[arg(long, default_value_t = 10.0)]
    factor: f64,
    /// Steady time before the burst.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    burst_at: Duration,
    /// Burst length.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    burst_for: Duration,
    /// Steady time after the burst (load keeps coming while the backlog drains).
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    after: Duration,
    /// Readings per batch.
    #[arg(long, default_value_t = 500)]
    batch_size: u32,
    /// Fewest workers.
    #[arg(long, default_value_t = 1)]
    min: usize,
    /// Most workers.
    #[arg(long, default_value_t = 4)]
    max: usize,
    /// Workers per decision.
    #[arg(long, default_value_t = 1)]
    step: usize,
    /// Cooldown.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    cooldown: Duration,
    /// Sampling interval of the autoscaler.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Target: `backlog:<per worker>` or `drain:<duration>`.
    #[arg(long, default_value = "backlog:200")]
    target: ScaleTarget,
    /// Least busy fraction of the workers for a scale-up.
    #[arg(long, default_value_t = 0.5)]
    min_busy: f64,
    /// Prefetch per partition queue.
    #[arg(long, default_value_t = 100)]
    prefetch: u16,
    /// Output prefix: writes `<out>.csv` and `<out>.svg`.
    #[arg(long, default_value = "bench/results/autoscale-timeline")]
    out: PathBuf,
}

/// Rows committed in one second and the latency histogram of those rows.
type CommitSecond = (u64, Histogram<u64>);
/// A panel: its label, its main series, an optional second series.
type Panel = (&'static str, Vec<(f64, f64)>, Option<Vec<(f64, f64)>>);

#[derive(Clone, Copy, Debug, Default)]
struct Second {
    offered: u64,
    committed: u64,
    backlog: u64,
    workers: usize,
    p99_ms: f64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let ns = format!("scale{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let topology = Topology::new(&ns, 4);
    let transport = Transport::Amqp(
        AmqpTransport::connect(AmqpConfig::new(vec![cli.broker.amqp_url.clone()], topology))
            .await?,
    );
    transport.declare(&["storage"]).await?;
    let mut receipts = transport.subscribe_receipts(4096).await?;

    let (_dir, sinks) = scratch_sinks().await?;
    let autoscale = AutoscaleConfig {
        min: cli.min,
        max: cli.max,
        step: cli.step,
        cooldown: cli.cooldown,
        interval: cli.interval,
        target: cli.target,
        min_busy: cli.min_busy,
    };
    let cfg = PoolConfig {
        workers: cli.min,
        autoscale: Some(autoscale.clone()),
        prefetch: cli.prefetch,
        ..PoolConfig::default()
    };
    let control = PoolControl::for_pool(&cfg);
    let stop = CancellationToken::new();
    let pool = tokio::spawn(sluice_processors::run(
        transport.clone(),
        sinks,
        cfg,
        control.clone(),
        stop.clone(),
    ));

    // Commits and their latency, per second since the start.
    let start = Instant::now();
    let seconds: Arc<Mutex<Vec<CommitSecond>>> = Arc::default();
    {
        let seconds = seconds.clone();
        tokio::spawn(async move {
            let mut de = Deserializer::new();
            while let Some(r) = receipts.recv().await {
                let s = start.elapsed().as_secs() as usize;
                let h: Option<Histogram<u64>> = de.deserialize(&mut r.latency.as_slice()).ok();
                let mut v = seconds.lock().unwrap_or_else(|p| p.into_inner());
                while v.len() <= s {
                    v.push((0, Histogram::new(3).expect("histogram")));
                }
                v[s].0 += r.rows;
                if let Some(h) = h {
                    let _ = v[s].1.add(&h);
                }
            }
        });
    }
    // Backlog and workers, per second.
    let samples: Arc<Mutex<Vec<(u64, usize)>>> = Arc::default();
    let sampler_stop = CancellationToken::new();
    {
        let (samples, transport, control, stop) = (
            samples.clone(),
            transport.clone(),
            control.clone(),
            sampler_stop.clone(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {
                        let backlog = transport
                            .backlog("storage")
                            .await
                            .map(|d| d.iter().map(|(_, n)| n).sum())
                            .unwrap_or(0);
                        let workers = control.status().workers;
                        samples.lock().unwrap_or_else(|p| p.into_inner()).push((backlog, workers));
                    }
                }
            }
        });
    }

    let producer = Arc::new(Producer::new(transport.clone(), ProducerConfig::default()));
    let load = LoadConfig {
        rate: cli.rate,
        batch_size: cli.batch_size,
        duration: Some(cli.burst_at + cli.burst_for + cli.after),
        count: None,
        concurrency: 256,
        tenant: "bench".to_owned(),
        progress: false,
        drain_timeout: Duration::ZERO,
        profile: Profile::Burst {
            at: cli.burst_at,
            length: cli.burst_for,
            factor: cli.factor,
        },
        ..LoadConfig::default()
    };
    let summary = sluice_loadgen::run::run(
        load,
        Target::Direct(producer),
        None,
        CancellationToken::new(),
    )
    .await?;
    let load_end = start.elapsed();
    eprintln!(
        "load done after {:.0} s: {} readings accepted; waiting for the pool to return to {}",
        load_end.as_secs_f64(),
        summary.accepted,
        cli.min
    );
    // Until back at the minimum with an empty backlog, or at most 10 cooldowns.
    let deadline = Instant::now() + cli.cooldown * 10;
    loop {
        let last = samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .copied();
        if last.is_some_and(|(b, w)| b == 0 && w == cli.min) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    sampler_stop.cancel();
    stop.cancel();
    let _ = pool.await?;
    transport.close().await;

    // Assemble the timeline.
    let samples = samples.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let commits = std::mem::take(&mut *seconds.lock().unwrap_or_else(|p| p.into_inner()));
    let offered = summary.timeline.seconds();
    let n = samples.len();
    let timeline: Vec<Second> = (0..n)
        .map(|s| Second {
            offered: offered.get(s).map_or(0, |o| o.offered),
            committed: commits.get(s).map_or(0, |c| c.0),
            backlog: samples[s].0,
            workers: samples[s].1,
            p99_ms: commits
                .get(s)
                .filter(|c| !c.1.is_empty())
                .map_or(0.0, |c| c.1.value_at_quantile(0.99) as f64 / 1e6),
        })
        .collect();

    // The figures.
    let burst_end = (cli.burst_at + cli.burst_for).as_secs() as usize;
    let drained = timeline
        .iter()
        .enumerate()
        .skip(burst_end)
        .find(|(_, s)| s.backlog <= 2 * u64::from(cli.prefetch))
        .map(|(i, _)| i - burst_end);
    let peak = timeline.iter().map(|s| s.workers).max().unwrap_or(0);
    let back_to_min = timeline
        .iter()
        .enumerate()
        .skip(burst_end)
        .find(|(i, s)| s.workers == cli.min && timeline[*i..].iter().all(|t| t.workers == cli.min))
        .map(|(i, _)| i - burst_end);
    let mut changes = Vec::new();
    for (i, w) in timeline.windows(2).enumerate() {
        // Workers 0: the pool had not started yet.
        if w[0].workers > 0 && w[1].workers != w[0].workers {
            changes.push((i + 1, w[1].workers > w[0].workers));
        }
    }
    let reversals: Vec<usize> = changes
        .windows(2)
        .filter(|c| c[0].1 != c[1].1)
        .map(|c| c[1].0)
        .collect();
    let cooldown_s = cli.cooldown.as_secs_f64();
    let max_reversals_per_cooldown = (0..n)
        .map(|t| {
            reversals
                .iter()
                .filter(|&&r| r >= t && (r as f64) < t as f64 + cooldown_s)
                .count()
        })
        .max()
        .unwrap_or(0);

    write_csv(&cli.out.with_extension("csv"), &timeline)?;
    plot(&cli.out.with_extension("svg"), &timeline, &cli)?;
    let fmt = |o: Option<usize>| o.map_or("not within the run".to_owned(), |s| format!("{s} s"));
    println!(
        "burst ×{} of {} s on {:.0} readings/s; autoscaler min {} max {} step {} cooldown {} interval {} target {} min-busy {}",
        cli.factor,
        cli.burst_for.as_secs(),
        cli.rate,
        cli.min,
        cli.max,
        cli.step,
        humantime::format_duration(cli.cooldown),
        humantime::format_duration(cli.interval),
        cli.target,
        cli.min_busy
    );
    println!("peak workers: {peak}");
    println!("backlog drained after the burst: {}", fmt(drained));
    println!("back to min after the burst: {}", fmt(back_to_min));
    println!(
        "worker changes: {} (up {}, down {}); direction changes: {}; most in one cooldown: {}",
        changes.len(),
        changes.iter().filter(|c| c.1).count(),
        changes.iter().filter(|c| !c.1).count(),
        reversals.len(),
        max_reversals_per_cooldown
    );
    println!(
        "accepted {} readings; committed {}",
        summary.accepted,
        timeline.iter().map(|s| s.committed).sum::<u64>()
    );
    eprintln!("wrote {}.csv and .svg", cli.out.display());
    Ok(())
}

fn write_csv(path: &Path, timeline: &[Second]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut out = String::from("second,offered,committed,backlog,workers,p99_ms\n");
    for (i, s) in timeline.iter().enumerate() {
        out += &format!(
            "{i},{},{},{},{},{:.1}\n",
            s.offered, s.committed, s.backlog, s.workers, s.p99_ms
        );
    }
    std::fs::write(path, out)?;
    Ok(())
}

/// Four panels over a shared time axis: offered and committed readings/s, backlog,
/// workers, p99 end-to-end latency.
fn plot(path: &Path, timeline: &[Second], cli: &Cli) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let root = SVGBackend::new(path, (900, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!(
            "Autoscaling under a ×{} burst of {} s (min {}, max {}, cooldown {} s)",
            cli.factor,
            cli.burst_for.as_secs(),
            cli.min,
            cli.max,
            cli.cooldown.as_secs()
        ),
        ("sans-serif", 20),
    )?;
    let panels = root.split_evenly((4, 1));
    let n = timeline.len().max(1) as f64;
    let series: [Panel; 4] = [
        (
            "k readings/s (blue offered, red committed)",
            timeline
                .iter()
                .enumerate()
                .map(|(i, s)| (i as f64, s.offered as f64 / 1e3))
                .collect(),
            Some(
                timeline
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (i as f64, s.committed as f64 / 1e3))
                    .collect(),
            ),
        ),
        (
            "backlog (messages)",
            timeline
                .iter()
                .enumerate()
                .map(|(i, s)| (i as f64, s.backlog as f64))
                .collect(),
            None,
        ),
        (
            "workers",
            timeline
                .iter()
                .enumerate()
                .map(|(i, s)| (i as f64, s.workers as f64))
                .collect(),
            None,
        ),
        (
            "p99 end to end (ms)",
            timeline
                .iter()
                .enumerate()
                .map(|(i, s)| (i as f64, s.p99_ms))
                .collect(),
            None,
        ),
    ];
    for (panel, (label, main, second)) in panels.iter().zip(series) {
        let top = main
            .iter()
            .chain(second.iter().flatten())
            .map(|p| p.1)
            .fold(1.0, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(panel)
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..n, 0.0..top)?;
        chart
            .configure_mesh()
            .y_desc(label)
            .x_desc("seconds")
            .draw()?;
        chart.draw_series(LineSeries::new(main, BLUE.stroke_width(2)))?;
        if let Some(s) = second {
            chart.draw_series(LineSeries::new(s, RED.stroke_width(2)))?;
        }
    }
    root.present()?;
    Ok(())
}
