//! The runtime queries execute on: threads of their own, apart from the runtime that
//! serves HTTP (as InfluxDB 3 runs DataFusion). A DataFusion operator may compute for a
//! long time without yielding (a join producing rows from memory); on the serving runtime
//! it would hold a worker, delaying other answers and the very timer that is to cancel it.

use std::future::Future;

use tokio::runtime::{Handle, Runtime};
use tokio::task::JoinHandle;

/// Owns the query runtime; dropping it stops the runtime without waiting for its tasks.
#[derive(Debug)]
pub(crate) struct Executor {
    runtime: Option<Runtime>,
    handle: Handle,
}

impl Executor {
    /// A runtime of `threads` worker threads (0: one per core).
    pub(crate) fn new(threads: usize) -> std::io::Result<Self> {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            threads
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("sluice-query")
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        Ok(Self {
            runtime: Some(runtime),
            handle,
        })
    }

    /// Runs `task` on the query runtime.
    pub(crate) fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(task)
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        // A runtime must not be dropped (waiting for its threads) from async code.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
