//! One channel's state: its offsets and epoch, its subscribers, its history window and what it
//! holds in memory, and the recovery decision — whether everything after a client's `since` can
//! still be replayed, or why not.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use duplex_proto::frames::Since;
use indexmap::IndexMap;
use parking_lot::Mutex;

use super::connection::ConnectionHandle;
use super::namespace::Namespace;
use super::publication::Publication;
use super::queue::LatestSlot;
use crate::model::ConnectionId;

/// Publication rates are measured over windows this long.
pub(super) const RATE_WINDOW: Duration = Duration::from_secs(10);

/// A connection's subscription as the channel sees it.
#[derive(Debug, Clone)]
pub(super) struct Subscriber {
    pub(super) connection: Arc<ConnectionHandle>,
    /// The conflation slot, for `latest` namespaces.
    pub(super) latest: Option<Arc<LatestSlot>>,
    /// With a broker: publications that arrived while the subscription was reading the
    /// broker's history, sent after it.
    pub(super) recovering: Option<Vec<Arc<Publication>>>,
    /// With a broker: the offset the subscription's reply named. The broker's broadcast of a
    /// publication can reach this node after a history read already counted it; such a
    /// publication is not sent twice.
    pub(super) after: u64,
}

/// Why a `since` could not be honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotRecovered {
    /// The channel's epoch is not the one the client knew: history was lost.
    EpochChanged,
    /// The client gave no epoch, so its offset cannot be trusted.
    EpochRequired,
    /// The offset is beyond the channel's last offset.
    OffsetAhead,
    /// Publications after the offset were trimmed from history (or none is kept).
    HistoryTrimmed,
}

impl NotRecovered {
    /// The reason as the protocol writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            NotRecovered::EpochChanged => "epoch_changed",
            NotRecovered::EpochRequired => "epoch_required",
            NotRecovered::OffsetAhead => "offset_ahead",
            NotRecovered::HistoryTrimmed => "history_trimmed",
        }
    }
}

#[derive(Debug)]
pub(super) struct ChannelState {
    pub(super) last_offset: u64,
    pub(super) epoch: Arc<str>,
    pub(super) subscribers: IndexMap<ConnectionId, Subscriber>,
    pub(super) history: VecDeque<(Instant, Arc<Publication>)>,
    /// The bytes of `history`.
    pub(super) history_bytes: usize,
    /// Set when the channel was removed from the map; whoever holds the Arc must look it up again.
    pub(super) closed: bool,
    /// The newest publication, kept even when the namespace keeps no history, so that pollers
    /// of such channels still get the latest state; and when it was published.
    pub(super) latest: Option<(Instant, Arc<Publication>)>,
    /// Long polls waiting on this channel; they keep it (and its epoch) alive like subscribers.
    pub(super) watchers: usize,
    /// With a broker: whether `last_offset` and `epoch` follow the broker's stream (set by the
    /// first publication delivered or the first history read), so a gap can be told.
    pub(super) synced: bool,
    pub(super) rate_window_start: Instant,
    pub(super) rate_window_count: u64,
    pub(super) rate: f64,
}

impl ChannelState {
    pub(super) fn count_publication(&mut self, now: Instant) {
        let elapsed = now.duration_since(self.rate_window_start);
        if elapsed >= RATE_WINDOW {
            self.rate = self.rate_window_count as f64 / elapsed.as_secs_f64();
            self.rate_window_start = now;
            self.rate_window_count = 0;
        }
        self.rate_window_count += 1;
    }

    pub(super) fn current_rate(&self, now: Instant) -> f64 {
        let elapsed = now.duration_since(self.rate_window_start);
        if elapsed >= RATE_WINDOW * 2 {
            0.0
        } else if elapsed >= RATE_WINDOW {
            self.rate_window_count as f64 / elapsed.as_secs_f64()
        } else {
            self.rate
        }
    }

    /// Whether every publication after `since` is still in history.
    pub(super) fn recoverable(&self, since: &Since) -> Result<(), NotRecovered> {
        recoverable(
            since,
            self.last_offset,
            &self.epoch,
            self.oldest_available(),
        )
    }

    /// Whether a reader (history, polls) that has everything up to `since` misses nothing.
    pub(super) fn readable_since(&self, since: &Since) -> Result<(), NotRecovered> {
        readable_since(
            since,
            self.last_offset,
            &self.epoch,
            self.oldest_available(),
        )
    }

    /// The offset of the oldest publication that can still be sent.
    pub(super) fn oldest_available(&self) -> Option<u64> {
        match self.history.front() {
            Some((_, first)) => Some(first.offset()),
            None => self.latest.as_ref().map(|(_, p)| p.offset()),
        }
    }

    pub(super) fn publications_after(
        &self,
        offset: u64,
    ) -> Box<dyn Iterator<Item = &Arc<Publication>> + '_> {
        if self.history.is_empty() {
            return Box::new(
                self.latest
                    .iter()
                    .map(|(_, p)| p)
                    .filter(move |p| p.offset() > offset),
            );
        }
        Box::new(
            self.history
                .iter()
                .map(|(_, publication)| publication)
                .filter(move |publication| publication.offset() > offset),
        )
    }

    pub(super) fn unused(&self) -> bool {
        self.subscribers.is_empty() && self.history.is_empty() && self.watchers == 0
    }

    /// The bytes this channel holds for clients: its history, and its latest publication when
    /// that is not in history (namespaces without history, or history expired).
    pub(super) fn held_bytes(&self) -> usize {
        let latest_apart = match (&self.latest, self.history.back()) {
            (Some((_, latest)), Some((_, newest))) if Arc::ptr_eq(latest, newest) => 0,
            (Some((_, latest)), _) => latest.size(),
            (None, _) => 0,
        };
        self.history_bytes + latest_apart
    }

    /// When the oldest publication it holds was published.
    pub(super) fn oldest_held(&self) -> Option<Instant> {
        match (self.history.front(), &self.latest) {
            (Some((at, _)), _) => Some(*at),
            (None, Some((at, _))) => Some(*at),
            (None, None) => None,
        }
    }

    /// Drops the oldest publication it holds; false when it holds none.
    pub(super) fn drop_oldest_held(&mut self) -> bool {
        if let Some((_, oldest)) = self.history.pop_front() {
            self.history_bytes -= oldest.size();
            return true;
        }
        self.latest.take().is_some()
    }

    /// Appends to history.
    pub(super) fn remember(&mut self, at: Instant, publication: Arc<Publication>) {
        self.history_bytes += publication.size();
        self.history.push_back((at, publication));
    }

    /// Keeps at most `history_size` publications and `history_bytes` bytes (the newest always
    /// stays), none older than `history_ttl`.
    pub(super) fn trim_history(&mut self, namespace: &Namespace, now: Instant) {
        while self.history.len() > namespace.history_size
            || (self.history.len() > 1 && self.history_bytes > namespace.history_bytes)
            || self
                .history
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) > namespace.history_ttl)
        {
            let Some((_, oldest)) = self.history.pop_front() else {
                break;
            };
            self.history_bytes -= oldest.size();
        }
    }
}

/// Whether every publication after `since` can be sent, for a channel at `top` in `epoch` whose
/// oldest kept publication is `oldest`.
pub(super) fn recoverable(
    since: &Since,
    top: u64,
    epoch: &str,
    oldest: Option<u64>,
) -> Result<(), NotRecovered> {
    // Offset 0 means "from the beginning": nothing was ever received, so any epoch will do,
    // as long as the channel still has its first publication (or none yet).
    if since.offset() == 0 {
        return if whole(top, oldest) {
            Ok(())
        } else {
            Err(NotRecovered::HistoryTrimmed)
        };
    }
    let Some(known) = since.epoch() else {
        return Err(NotRecovered::EpochRequired);
    };
    if known != epoch {
        return Err(NotRecovered::EpochChanged);
    }
    let offset = since.offset();
    if offset > top {
        return Err(NotRecovered::OffsetAhead);
    }
    if offset == top {
        return Ok(());
    }
    match oldest {
        Some(first) if first <= offset + 1 => Ok(()),
        _ => Err(NotRecovered::HistoryTrimmed),
    }
}

/// Whether a channel at `top` whose oldest kept publication is `oldest` still keeps every
/// publication of its epoch, from offset 1.
fn whole(top: u64, oldest: Option<u64>) -> bool {
    match oldest {
        Some(first) => first <= 1,
        None => top == 0,
    }
}

/// Where the publications sent after a subscription's reply (or in a poll's page) start, once
/// `since` was checked (`recovery`): right after `since` when everything after it is kept; from
/// the first offset when the channel started a new epoch (its history was lost: a broker that
/// restarted empty, a channel dropped while unused) and still keeps every publication of that
/// epoch. What is lost then is only the old epoch's tail, which `recovered: false` says; the new
/// epoch's publications, acknowledged to their publishers, are not skipped. `None`: nothing is
/// replayed, the subscription is live from `top`.
pub(super) fn replay_after(
    since: &Since,
    recovery: Result<(), NotRecovered>,
    top: u64,
    oldest: Option<u64>,
) -> Option<u64> {
    match recovery {
        Ok(()) => Some(since.offset()),
        Err(NotRecovered::EpochChanged) if whole(top, oldest) => Some(0),
        Err(_) => None,
    }
}

/// Whether a reader (history, polls) that has everything up to `since` misses nothing. A bare
/// offset, without an epoch (HTTP `?since=` alone), is checked against history only.
pub(super) fn readable_since(
    since: &Since,
    top: u64,
    epoch: &str,
    oldest: Option<u64>,
) -> Result<(), NotRecovered> {
    match since.epoch() {
        Some(_) => recoverable(since, top, epoch, oldest),
        None => recoverable(
            &Since::Position {
                offset: since.offset(),
                epoch: Some(epoch.to_owned()),
            },
            top,
            epoch,
            oldest,
        ),
    }
}

/// One channel.
#[derive(Debug)]
pub(super) struct Channel {
    pub(super) name: Arc<str>,
    pub(super) namespace: Arc<Namespace>,
    pub(super) state: Mutex<ChannelState>,
    /// Wakes long polls when a publication arrives.
    pub(super) published: tokio::sync::Notify,
    /// The broker's (or the store's) history, read once for the subscribers that resubscribe
    /// together.
    pub(super) history_reads: super::shared_read::SharedReads,
}

impl Channel {
    pub(super) fn new(name: &str, namespace: Arc<Namespace>) -> Self {
        Channel {
            name: name.into(),
            namespace,
            published: tokio::sync::Notify::new(),
            history_reads: super::shared_read::SharedReads::default(),
            state: Mutex::new(ChannelState {
                last_offset: 0,
                epoch: new_epoch(),
                subscribers: IndexMap::new(),
                history: VecDeque::new(),
                history_bytes: 0,
                closed: false,
                latest: None,
                watchers: 0,
                synced: false,
                rate_window_start: Instant::now(),
                rate_window_count: 0,
                rate: 0.0,
            }),
        }
    }
}

pub(super) fn new_epoch() -> Arc<str> {
    format!("{:08x}", crate::model::rand_u64() as u32).into()
}
