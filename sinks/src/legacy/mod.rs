//! The layout Sluice stored readings in before the Delta table: a directory of
//! `tenant=<t>/date=YYYY-MM-DD/hour=HH/part-*.parquet` files. Kept only to convert such
//! directories (`sluice store migrate`); nothing writes or queries it any more.

pub mod migrate;
