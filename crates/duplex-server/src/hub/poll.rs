//! Short and long polling: a poll reads what came after `since`; a long poll waits on the
//! channel's `Notify` until a publication arrives or its wait ends, holding the channel (and its
//! epoch) alive meanwhile.

use std::sync::Arc;
use std::time::Duration;

use duplex_proto::frames::Since;

use super::channel::{readable_since, replay_after};
use super::history::page_of;
use super::namespace::Caller;
use super::publication::Publication;
use super::{Channel, HistoryPage, Hub, HubError, NotRecovered, retention_of};
use crate::broker::HistoryRange;
use crate::metrics::Metrics;

impl Hub {
    /// Polls a channel: the first `limit` publications after `since`. With a `wait`, holds on
    /// until one arrives or the wait ends; a waiting poll costs a registration on the
    /// channel's `Notify` and nothing else until a publication wakes it.
    pub async fn poll(
        &self,
        channel_name: &str,
        since: Option<&Since>,
        limit: usize,
        wait: Duration,
        caller: Caller<'_>,
    ) -> Result<HistoryPage, HubError> {
        self.check_readable(channel_name, caller)?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let channel = self.channel(channel_name)?;
            let watcher = {
                let mut state = channel.state.lock();
                if state.closed {
                    continue;
                }
                state.watchers += 1;
                Watcher {
                    hub: self,
                    channel: &channel,
                }
            };
            loop {
                let notified = channel.published.notified();
                tokio::pin!(notified);
                // Registered before looking, so a publication between the look and the wait
                // still wakes us.
                notified.as_mut().enable();
                let page = match self.log_for(&channel.namespace) {
                    None => {
                        let state = channel.state.lock();
                        let recovered = since.map(|since| state.readable_since(since));
                        let from = since.zip(recovered).and_then(|(since, recovered)| {
                            poll_after(
                                since,
                                recovered,
                                state.last_offset,
                                state.oldest_available(),
                            )
                        });
                        let publications: Vec<Arc<Publication>> = match from {
                            Some(after) => state
                                .publications_after(after)
                                .take(limit)
                                .cloned()
                                .collect(),
                            None => Vec::new(),
                        };
                        HistoryPage {
                            publications,
                            offset: state.last_offset,
                            epoch: state.epoch.clone(),
                            recovered,
                        }
                    }
                    Some(log) => {
                        let range = match since {
                            Some(since) => HistoryRange::After {
                                offset: since.offset(),
                                limit,
                            },
                            None => HistoryRange::None,
                        };
                        let retention = retention_of(&channel.namespace);
                        let unavailable =
                            |e: crate::broker::BrokerError| HubError::Unavailable(e.to_string());
                        let mut history = log
                            .history(channel_name, range, retention)
                            .await
                            .map_err(unavailable)?;
                        if let Some(since) = since
                            && since.offset() > 0
                        {
                            let recovered =
                                readable_since(since, history.top, &history.epoch, history.oldest);
                            if poll_after(since, recovered, history.top, history.oldest) == Some(0)
                            {
                                // A new epoch, kept whole: read it from its first offset.
                                let range = HistoryRange::After { offset: 0, limit };
                                history = log
                                    .history(channel_name, range, retention)
                                    .await
                                    .map_err(unavailable)?;
                            }
                        }
                        let oldest = history.oldest;
                        let mut page = page_of(&channel.name, history, since);
                        let from = since.zip(page.recovered).and_then(|(since, recovered)| {
                            poll_after(since, recovered, page.offset, oldest)
                        });
                        match from {
                            Some(after) => page.publications.retain(|p| p.offset() > after),
                            None => page.publications.clear(),
                        }
                        page
                    }
                };
                let nothing_yet =
                    page.publications.is_empty() && matches!(page.recovered, Some(Ok(())));
                if !nothing_yet || tokio::time::Instant::now() >= deadline {
                    drop(watcher);
                    return Ok(page);
                }
                let waiting = WaitingPoll::new(&self.metrics);
                let woken = tokio::time::timeout_at(deadline, notified).await;
                drop(waiting);
                if woken.is_err() {
                    drop(watcher);
                    return Ok(page);
                }
            }
        }
    }
}

/// Counts a long poll as waiting for as long as it waits, however the wait ends.
struct WaitingPoll<'a>(&'a Metrics);

impl<'a> WaitingPoll<'a> {
    fn new(metrics: &'a Metrics) -> Self {
        metrics.long_polls.inc();
        WaitingPoll(metrics)
    }
}

impl Drop for WaitingPoll<'_> {
    fn drop(&mut self) {
        self.0.long_polls.dec();
    }
}

/// A long poll's hold on a channel: while it lives the channel is not dropped.
struct Watcher<'a> {
    hub: &'a Hub,
    channel: &'a Arc<Channel>,
}

impl Drop for Watcher<'_> {
    fn drop(&mut self) {
        let mut state = self.channel.state.lock();
        state.watchers -= 1;
        let unused = state.unused();
        drop(state);
        if unused {
            self.hub.remove_if_unused(&self.channel.name);
        }
    }
}

/// Where a poll's page starts, once `since` was checked: after `since` when nothing is missing
/// or when history was trimmed (the reader gets what is left, told so); from the first offset
/// of a new epoch kept whole (see [`replay_after`]); otherwise nothing (only where the channel
/// stands).
fn poll_after(
    since: &Since,
    recovered: Result<(), NotRecovered>,
    top: u64,
    oldest: Option<u64>,
) -> Option<u64> {
    match recovered {
        Err(NotRecovered::HistoryTrimmed) => Some(since.offset()),
        recovered => replay_after(since, recovered, top, oldest),
    }
}
