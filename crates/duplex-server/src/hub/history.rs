//! Reading channels: a channel's history (from this node or the broker), the list of channels
//! and one channel's figures, and the sweep that drops expired history and unused channels.

use std::sync::Arc;
use std::time::Instant;

use duplex_proto::frames::Since;

use std::sync::atomic::Ordering;

use super::channel::readable_since;
use super::namespace::Caller;
use super::publication::Publication;
use super::{ChannelSummary, HistoryPage, Hub, HubError, NotRecovered, check_access, retention_of};
use crate::broker::{BrokerHistory, HistoryRange};

impl Hub {
    /// A page of a channel's history: with `since`, the first `limit` publications after it;
    /// without, the last `limit`.
    pub async fn history(
        &self,
        channel_name: &str,
        since: Option<&Since>,
        limit: usize,
        caller: Caller<'_>,
    ) -> Result<HistoryPage, HubError> {
        if !duplex_proto::is_valid_channel(channel_name) {
            return Err(HubError::InvalidChannel);
        }
        let namespace = self.namespaces.for_channel(channel_name);
        check_access(namespace.read_history, caller, channel_name, "read history")?;
        if let Some(log) = self.log_for(namespace) {
            let range = match since {
                Some(since) => HistoryRange::After {
                    offset: since.offset(),
                    limit,
                },
                None => HistoryRange::Last(limit),
            };
            let history = log
                .history(channel_name, range, retention_of(namespace))
                .await
                .map_err(|e| HubError::Unavailable(e.to_string()))?;
            return Ok(page_of(&Arc::from(channel_name), history, since));
        }
        let Some(channel) = self.channels.get(channel_name).map(|c| c.clone()) else {
            // Nothing was ever kept: an empty channel in a fresh epoch.
            let recovered = since.map(|since| {
                if since.offset() == 0 {
                    Ok(())
                } else {
                    Err(NotRecovered::EpochChanged)
                }
            });
            return Ok(HistoryPage {
                publications: Vec::new(),
                offset: 0,
                epoch: "".into(),
                recovered,
            });
        };
        let mut state = channel.state.lock();
        self.holding(&mut state, |state| {
            state.trim_history(&channel.namespace, Instant::now());
        });
        let publications: Vec<Arc<Publication>> = match since {
            Some(since) => state
                .publications_after(since.offset())
                .take(limit)
                .cloned()
                .collect(),
            None => {
                let skip = state.history.len().saturating_sub(limit);
                state
                    .history
                    .iter()
                    .skip(skip)
                    .map(|(_, p)| p.clone())
                    .collect()
            }
        };
        let recovered = since.map(|since| state.readable_since(since));
        Ok(HistoryPage {
            publications,
            offset: state.last_offset,
            epoch: state.epoch.clone(),
            recovered,
        })
    }

    /// Channels by name, after `after`, whose name contains `search`, at most `limit`: each
    /// with its subscribers, offset, epoch and publication rate.
    pub fn channels_page(
        &self,
        after: Option<&str>,
        search: Option<&str>,
        limit: usize,
    ) -> Vec<ChannelSummary> {
        let mut names: Vec<Arc<str>> = self
            .channels
            .iter()
            .map(|entry| entry.key().clone())
            .filter(|name| after.is_none_or(|after| &**name > after))
            .filter(|name| search.is_none_or(|search| name.contains(search)))
            .collect();
        names.sort_unstable();
        let now = Instant::now();
        names
            .into_iter()
            .filter_map(|name| {
                let channel = self.channels.get(&name)?.clone();
                let state = channel.state.lock();
                Some(ChannelSummary {
                    name: channel.name.clone(),
                    subscribers: state.subscribers.len(),
                    offset: state.last_offset,
                    epoch: state.epoch.clone(),
                    rate: state.current_rate(now),
                })
            })
            .take(limit)
            .collect()
    }

    /// One channel's figures, when it is active on this node.
    pub fn channel_summary(&self, name: &str) -> Option<ChannelSummary> {
        let channel = self.channels.get(name)?.clone();
        let state = channel.state.lock();
        Some(ChannelSummary {
            name: channel.name.clone(),
            subscribers: state.subscribers.len(),
            offset: state.last_offset,
            epoch: state.epoch.clone(),
            rate: state.current_rate(Instant::now()),
        })
    }

    /// How many channels exist.
    pub fn channel_count(&self) -> usize {
        self.channel_count.load(Ordering::Relaxed)
    }

    /// Drops expired history and removes channels nobody uses; run periodically.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut unused = Vec::new();
        for entry in &self.channels {
            let channel = entry.value();
            let mut state = channel.state.lock();
            self.holding(&mut state, |state| {
                state.trim_history(&channel.namespace, now)
            });
            if state.unused() {
                unused.push(channel.name.clone());
            }
        }
        for name in unused {
            self.remove_if_unused(&name);
        }
    }
}

/// A history page from what the broker read.
pub(super) fn page_of(
    channel: &Arc<str>,
    history: BrokerHistory,
    since: Option<&Since>,
) -> HistoryPage {
    let recovered =
        since.map(|since| readable_since(since, history.top, &history.epoch, history.oldest));
    HistoryPage {
        publications: history
            .publications
            .iter()
            .map(|stored| {
                Arc::new(Publication::new(
                    channel.clone(),
                    stored.offset,
                    &stored.payload,
                ))
            })
            .collect(),
        offset: history.top,
        epoch: history.epoch,
        recovered,
    }
}
