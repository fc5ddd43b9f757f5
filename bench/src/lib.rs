//! What the benchmark binaries share: the broker flag and storage sinks in a scratch
//! directory. Each binary (`src/*.rs` with a `[[bin]]` entry) measures one thing and prints
//! the table `BENCHMARKS.md` quotes.

use clap::Args;
use sluice_processors::Sinks;
use sluice_sinks::latest::LatestStore;
use sluice_sinks::table::{ReadingsTable, TableConfig};

/// The broker every benchmark talks to.
#[derive(Debug, Clone, Args)]
pub struct BrokerArg {
    /// Broker URL.
    #[arg(
        long,
        env = "AMQP_ADDR",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
}

/// Storage sinks for a benchmark: the readings table in a fresh temporary directory
/// (removed when the returned guard drops) and latest values in memory.
pub async fn scratch_sinks() -> anyhow::Result<(tempfile::TempDir, Sinks)> {
    let dir = tempfile::tempdir()?;
    let store = dir
        .path()
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("temporary directory is not UTF-8"))?
        .to_owned();
    let sinks = Sinks {
        table: ReadingsTable::open(TableConfig {
            store,
            ..TableConfig::default()
        })
        .await?,
        latest: LatestStore::memory(),
    };
    Ok((dir, sinks))
}
