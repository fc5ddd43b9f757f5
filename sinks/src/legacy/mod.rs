//! The layout Sluice stored readings in before the Delta table: a directory of
//! `tenant=<t>/date=YYYY-MM-DD/hour=HH/part-*.parquet` files whose footers list their batch
//! ids. Kept to read and convert such directories (`sluice store migrate`); nothing writes
//! it any more.

pub mod migrate;
pub mod query;
pub mod store;
