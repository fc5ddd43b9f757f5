//! `sluice workers`: show or change the worker count of a running processors process
//! through its admin endpoint (see `sluice_processors::admin`).

use anyhow::{Context, Result, bail};
use sluice_processors::admin::WorkersRequest;
use sluice_processors::control::WorkersStatus;

use crate::args::{WorkersAction, WorkersArgs};

pub(crate) async fn run(args: WorkersArgs) -> Result<()> {
    let url = format!("{}/v1/workers", args.admin_url.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()?;
    let request = match args.action.unwrap_or(WorkersAction::Show) {
        WorkersAction::Show => client.get(&url),
        WorkersAction::Set { n } => client.put(&url).json(&WorkersRequest {
            workers: Some(n),
            autoscale: None,
        }),
        WorkersAction::Auto => client.put(&url).json(&WorkersRequest {
            workers: None,
            autoscale: Some(true),
        }),
    };
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot reach the admin endpoint at {url}"))?;
    let status = response.status();
    let body = response.text().await?;
    if !status.is_success() {
        bail!("{url}: {status}: {body}");
    }
    let s: WorkersStatus =
        serde_json::from_str(&body).with_context(|| format!("unexpected answer: {body}"))?;
    print!("{}", render(&s));
    Ok(())
}

fn render(s: &WorkersStatus) -> String {
    let mut out = format!(
        "group {}: {} workers running, {} desired, mode {}\n",
        s.group,
        s.workers,
        s.desired,
        serde_json::to_value(s.mode)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    );
    if let Some(a) = &s.autoscale {
        out += &format!(
            "autoscaler: min {} max {} step {} cooldown {} target {}\n",
            a.min, a.max, a.step, a.cooldown, a.target
        );
    }
    if let Some(d) = &s.last_decision {
        out += &format!(
            "last decision: {} -> {} ({}; wanted {}, backlog {}, {:.0} deliveries/s, busy {:.0}%)\n",
            d.from,
            d.to,
            d.reason,
            d.wanted,
            d.backlog,
            d.rate,
            d.busy * 100.0
        );
    }
    out
}
