//! What every load run does around its measurement: wait for its clients to be ready, then
//! collect their results, stopping the stragglers after a drain period.

use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Waits until every client said it is ready (or dropped its sender), for at most 60 s.
pub(crate) async fn wait_ready(
    ready: &mut mpsc::Receiver<()>,
    expected: usize,
    what: &str,
) -> anyhow::Result<()> {
    let mut count = 0;
    while tokio::time::timeout(Duration::from_secs(60), ready.recv())
        .await
        .with_context(|| format!("{what} did not start within 60 s"))?
        .is_some()
    {
        count += 1;
    }
    if count < expected {
        bail!("only {count} of {expected} {what} started");
    }
    Ok(())
}

/// Collects every client's result; those still running after `drain` are told to `stop`.
pub(crate) async fn collect_within<T>(
    clients: Vec<JoinHandle<anyhow::Result<T>>>,
    drain: Duration,
    stop: impl FnOnce(),
) -> anyhow::Result<Vec<T>> {
    let collect = async {
        let mut all = Vec::with_capacity(clients.len());
        for client in clients {
            all.push(client.await??);
        }
        anyhow::Ok(all)
    };
    tokio::pin!(collect);
    tokio::select! {
        all = &mut collect => all,
        () = tokio::time::sleep(drain) => {
            stop();
            collect.await
        }
    }
}
