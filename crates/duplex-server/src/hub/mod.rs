//! The hub: channels, subscriptions and fan-out.
//!
//! Channels live in a sharded map ([`DashMap`]), each behind its own mutex: there is no global
//! lock on the fan-out path, and publishers to different channels never contend. A publication
//! takes its channel's lock to get the next offset, is encoded once, and is pushed to every
//! subscriber's bounded [`OutgoingQueue`] before the lock is released, which is what keeps each
//! channel totally ordered for every subscriber. Pushing never waits: a full queue applies the
//! namespace's slow-consumer policy, so a slow subscriber never delays the others.

pub mod budget;
pub mod connection;
mod enforce;
pub mod namespace;
pub mod publication;
pub mod queue;

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use duplex_proto::frames::{Join, Leave, Reply, Since, Subscribed, Unsubscribed, to_json};
use duplex_proto::{DisconnectCode, ErrorCode};
use indexmap::IndexMap;
use parking_lot::Mutex;

use crate::broker::{
    Broker, BrokerEvents, BrokerHistory, HistoryRange, NodeInfo, Present, Retention,
};
use crate::metrics::Metrics;
use budget::ByteBudget;
use connection::ConnectionHandle;
use namespace::{Access, Caller, ClientAuth, Namespace, Namespaces, SlowConsumerPolicy};
use publication::{Payload, Publication};
use queue::{LatestSlot, OutgoingQueue, Pushed, QueueLimits};

/// Publication rates are measured over windows this long.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// A connection's id: random, shown as 16 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(pub u64);

impl ConnectionId {
    /// A fresh random id.
    pub fn random() -> Self {
        ConnectionId(rand_u64())
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

fn rand_u64() -> u64 {
    let (high, low) = uuid::Uuid::new_v4().as_u64_pair();
    high ^ low
}

/// Why the hub refused a request; each maps to one protocol error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    /// The channel name is not `namespace:name`.
    #[error("channel names are namespace:name")]
    InvalidChannel,
    /// The namespace forbids it.
    #[error("{0}")]
    PermissionDenied(&'static str),
    /// The namespace keeps no presence.
    #[error("presence is off in this namespace")]
    PresenceDisabled,
    /// Already subscribed.
    #[error("already subscribed to this channel")]
    AlreadySubscribed,
    /// Not subscribed.
    #[error("not subscribed to this channel")]
    NotSubscribed,
    /// The payload is over the namespace's limit.
    #[error("the publication is larger than the namespace's limit of {limit} bytes")]
    MessageTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// Binary payloads are not allowed in the namespace.
    #[error("this namespace does not take binary publications")]
    BinaryNotAllowed,
    /// The broker between nodes cannot be reached.
    #[error("{0}")]
    Unavailable(String),
    /// A publication's data is `null`, which the protocol reserves for "no data".
    #[error("a publication's data may be any JSON value but null")]
    NullData,
    /// The server holds as many channels as it may (`max_channels`).
    #[error("the server holds as many channels as it may ({limit}); try again later")]
    TooManyChannels {
        /// The limit.
        limit: usize,
    },
}

impl HubError {
    /// The protocol error code.
    pub fn code(&self) -> ErrorCode {
        match self {
            HubError::InvalidChannel => ErrorCode::InvalidChannel,
            HubError::PermissionDenied(_) | HubError::PresenceDisabled => {
                ErrorCode::PermissionDenied
            }
            HubError::AlreadySubscribed => ErrorCode::AlreadySubscribed,
            HubError::NotSubscribed => ErrorCode::NotSubscribed,
            HubError::MessageTooLarge { .. } => ErrorCode::MessageTooLarge,
            HubError::BinaryNotAllowed => ErrorCode::BinaryNotAllowed,
            HubError::Unavailable(_) => ErrorCode::Unavailable,
            HubError::TooManyChannels { .. } => ErrorCode::TooManyChannels,
            HubError::NullData => ErrorCode::BadRequest,
        }
    }
}

/// Where a publication landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishOutcome {
    /// Its offset.
    pub offset: u64,
    /// The channel's epoch.
    pub epoch: Arc<str>,
}

/// A connection's subscription as the channel sees it.
#[derive(Debug, Clone)]
struct Subscriber {
    connection: Arc<ConnectionHandle>,
    /// The conflation slot, for `latest` namespaces.
    latest: Option<Arc<LatestSlot>>,
    /// With a broker: publications that arrived while the subscription was reading the
    /// broker's history, sent after it.
    recovering: Option<Vec<Arc<Publication>>>,
    /// With a broker: the offset the subscription's reply named. The broker's broadcast of a
    /// publication can reach this node after a history read already counted it; such a
    /// publication is not sent twice.
    after: u64,
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

/// A page of a channel's history.
#[derive(Debug, Clone)]
pub struct HistoryPage {
    /// Publications in offset order.
    pub publications: Vec<Arc<Publication>>,
    /// The channel's last offset.
    pub offset: u64,
    /// The channel's epoch.
    pub epoch: Arc<str>,
    /// With `since`: whether nothing after it was lost (or why it was).
    pub recovered: Option<Result<(), NotRecovered>>,
}

/// A channel as `GET /api/channels` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelSummary {
    /// The channel's name.
    pub name: Arc<str>,
    /// Its subscribers.
    pub subscribers: usize,
    /// Its last offset.
    pub offset: u64,
    /// Its epoch.
    pub epoch: Arc<str>,
    /// Publications per second over the last complete window.
    pub rate: f64,
}

#[derive(Debug)]
struct ChannelState {
    last_offset: u64,
    epoch: Arc<str>,
    subscribers: IndexMap<ConnectionId, Subscriber>,
    history: VecDeque<(Instant, Arc<Publication>)>,
    /// The bytes of `history`.
    history_bytes: usize,
    /// Set when the channel was removed from the map; whoever holds the Arc must look it up again.
    closed: bool,
    /// The newest publication, kept even when the namespace keeps no history, so that pollers
    /// of such channels still get the latest state; and when it was published.
    latest: Option<(Instant, Arc<Publication>)>,
    /// Long polls waiting on this channel; they keep it (and its epoch) alive like subscribers.
    watchers: usize,
    /// With a broker: whether `last_offset` and `epoch` follow the broker's stream (set by the
    /// first publication delivered or the first history read), so a gap can be told.
    synced: bool,
    rate_window_start: Instant,
    rate_window_count: u64,
    rate: f64,
}

impl ChannelState {
    fn count_publication(&mut self, now: Instant) {
        let elapsed = now.duration_since(self.rate_window_start);
        if elapsed >= RATE_WINDOW {
            self.rate = self.rate_window_count as f64 / elapsed.as_secs_f64();
            self.rate_window_start = now;
            self.rate_window_count = 0;
        }
        self.rate_window_count += 1;
    }

    fn current_rate(&self, now: Instant) -> f64 {
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
    fn recoverable(&self, since: &Since) -> Result<(), NotRecovered> {
        recoverable(
            since,
            self.last_offset,
            &self.epoch,
            self.oldest_available(),
        )
    }

    /// Whether a reader (history, polls) that has everything up to `since` misses nothing.
    fn readable_since(&self, since: &Since) -> Result<(), NotRecovered> {
        readable_since(
            since,
            self.last_offset,
            &self.epoch,
            self.oldest_available(),
        )
    }

    /// The offset of the oldest publication that can still be sent.
    fn oldest_available(&self) -> Option<u64> {
        match self.history.front() {
            Some((_, first)) => Some(first.offset()),
            None => self.latest.as_ref().map(|(_, p)| p.offset()),
        }
    }

    fn publications_after(&self, offset: u64) -> Box<dyn Iterator<Item = &Arc<Publication>> + '_> {
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

    fn unused(&self) -> bool {
        self.subscribers.is_empty() && self.history.is_empty() && self.watchers == 0
    }

    /// The bytes this channel holds for clients: its history, and its latest publication when
    /// that is not in history (namespaces without history, or history expired).
    fn held_bytes(&self) -> usize {
        let latest_apart = match (&self.latest, self.history.back()) {
            (Some((_, latest)), Some((_, newest))) if Arc::ptr_eq(latest, newest) => 0,
            (Some((_, latest)), _) => latest.size(),
            (None, _) => 0,
        };
        self.history_bytes + latest_apart
    }

    /// When the oldest publication it holds was published.
    fn oldest_held(&self) -> Option<Instant> {
        match (self.history.front(), &self.latest) {
            (Some((at, _)), _) => Some(*at),
            (None, Some((at, _))) => Some(*at),
            (None, None) => None,
        }
    }

    /// Drops the oldest publication it holds; false when it holds none.
    fn drop_oldest_held(&mut self) -> bool {
        if let Some((_, oldest)) = self.history.pop_front() {
            self.history_bytes -= oldest.size();
            return true;
        }
        self.latest.take().is_some()
    }

    /// Appends to history.
    fn remember(&mut self, at: Instant, publication: Arc<Publication>) {
        self.history_bytes += publication.size();
        self.history.push_back((at, publication));
    }

    /// Keeps at most `history_size` publications and `history_bytes` bytes (the newest always
    /// stays), none older than `history_ttl`.
    fn trim_history(&mut self, namespace: &Namespace, now: Instant) {
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
fn recoverable(
    since: &Since,
    top: u64,
    epoch: &str,
    oldest: Option<u64>,
) -> Result<(), NotRecovered> {
    // Offset 0 means "from the beginning": nothing was ever received, so any epoch will do,
    // as long as the channel still has its first publication (or none yet).
    if since.offset() == 0 {
        return match oldest {
            Some(first) if first > 1 => Err(NotRecovered::HistoryTrimmed),
            None if top > 0 => Err(NotRecovered::HistoryTrimmed),
            _ => Ok(()),
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

/// Whether a reader (history, polls) that has everything up to `since` misses nothing. A bare
/// offset, without an epoch (HTTP `?since=` alone), is checked against history only.
fn readable_since(
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
struct Channel {
    name: Arc<str>,
    namespace: Arc<Namespace>,
    state: Mutex<ChannelState>,
    /// Wakes long polls when a publication arrives.
    published: tokio::sync::Notify,
}

impl Channel {
    fn new(name: &str, namespace: Arc<Namespace>) -> Self {
        Channel {
            name: name.into(),
            namespace,
            published: tokio::sync::Notify::new(),
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

fn new_epoch() -> Arc<str> {
    format!("{:08x}", rand_u64() as u32).into()
}

/// Channels, their subscribers, and the connections of this node.
#[derive(Debug)]
pub struct Hub {
    channels: DashMap<Arc<str>, Arc<Channel>>,
    connections: DashMap<ConnectionId, Arc<ConnectionHandle>>,
    namespaces: Namespaces,
    metrics: Arc<Metrics>,
    /// The broker between nodes; `None` is the in-process (`memory`) broker.
    broker: Option<Arc<dyn Broker>>,
    /// This node, as `GET /api/nodes` and the registry describe it.
    node: NodeInfo,
    limits: HubLimits,
    /// How many channels `channels` holds (DashMap's own count locks every shard).
    channel_count: AtomicUsize,
    /// Bytes of publications and control frames queued for connections.
    queue_budget: Arc<ByteBudget>,
    /// Bytes of channel history (and latest publications) kept on this node.
    history_budget: Arc<ByteBudget>,
}

/// What the hub holds at most, in total, whatever clients do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubLimits {
    /// Channels on this node (`max_channels`).
    pub max_channels: usize,
    /// Bytes queued for connections, a publication shared by many queues counted once
    /// (`max_queued_bytes`).
    pub max_queued_bytes: usize,
    /// Bytes of history kept in memory (`max_history_bytes`).
    pub max_history_bytes: usize,
}

impl Default for HubLimits {
    fn default() -> Self {
        HubLimits {
            max_channels: 100_000,
            max_queued_bytes: 128 * 1024 * 1024,
            max_history_bytes: 128 * 1024 * 1024,
        }
    }
}

/// Fan-out counts of one publication.
#[derive(Default)]
struct FanOut {
    delivered: u64,
    dropped: u64,
    conflated: u64,
    disconnected: u64,
}

impl Hub {
    /// An empty hub with these namespace rules, on the in-process broker.
    pub fn new(namespaces: Namespaces, metrics: Arc<Metrics>) -> Self {
        Hub::with_broker(
            namespaces,
            metrics,
            None,
            NodeInfo::default(),
            HubLimits::default(),
        )
    }

    /// An empty hub whose channels cross nodes through `broker`.
    pub fn with_broker(
        namespaces: Namespaces,
        metrics: Arc<Metrics>,
        broker: Option<Arc<dyn Broker>>,
        node: NodeInfo,
        limits: HubLimits,
    ) -> Self {
        Hub {
            channels: DashMap::new(),
            connections: DashMap::new(),
            namespaces,
            metrics,
            broker,
            node,
            limits,
            channel_count: AtomicUsize::new(0),
            queue_budget: ByteBudget::new(limits.max_queued_bytes),
            history_budget: ByteBudget::new(limits.max_history_bytes),
        }
    }

    /// A new connection's outgoing queue, counting in this hub's queue budget.
    pub fn outgoing_queue(&self, limits: QueueLimits) -> OutgoingQueue {
        OutgoingQueue::with_limits(limits, Some(self.queue_budget.clone()))
    }

    /// Bytes queued for connections now (shared publications counted once).
    pub fn queued_bytes(&self) -> usize {
        self.queue_budget.used()
    }

    /// Bytes of history kept now.
    pub fn history_bytes(&self) -> usize {
        self.history_budget.used()
    }

    /// The limits in effect.
    pub fn limits(&self) -> HubLimits {
        self.limits
    }

    /// The broker between nodes, if any.
    pub fn broker(&self) -> Option<&Arc<dyn Broker>> {
        self.broker.as_ref()
    }

    /// Makes a connection reachable by id.
    pub fn register(&self, connection: Arc<ConnectionHandle>) {
        self.connections.insert(connection.id, connection);
    }

    /// Ends a connection: unsubscribes it everywhere and fails its pending requests.
    pub fn deregister(&self, connection: &ConnectionHandle) {
        self.connections.remove(&connection.id);
        for channel in connection.take_subscriptions() {
            // The channel may already be gone; either way the subscription is.
            let _ = self.remove_subscriber(&channel, connection.id);
        }
        connection.abandon_requests();
    }

    /// A connection of this node.
    pub fn connection(&self, id: ConnectionId) -> Option<Arc<ConnectionHandle>> {
        self.connections.get(&id).map(|c| c.clone())
    }

    /// Calls `f` with every connection of this node.
    pub fn each_connection(&self, mut f: impl FnMut(&Arc<ConnectionHandle>)) {
        for connection in &self.connections {
            f(connection.value());
        }
    }

    /// How many connections this node holds.
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// Connections in id order, after `after`, at most `limit`.
    pub fn connections_page(
        &self,
        after: Option<ConnectionId>,
        limit: usize,
    ) -> Vec<Arc<ConnectionHandle>> {
        let mut all: Vec<Arc<ConnectionHandle>> = self
            .connections
            .iter()
            .filter(|c| after.is_none_or(|after| c.id > after))
            .map(|c| c.clone())
            .collect();
        all.sort_by_key(|c| c.id);
        all.truncate(limit);
        all
    }

    /// Every connection whose token named `user`.
    pub fn connections_of_user(&self, user: &str) -> Vec<Arc<ConnectionHandle>> {
        self.connections
            .iter()
            .filter(|c| c.user().as_deref() == Some(user))
            .map(|c| c.clone())
            .collect()
    }

    /// The namespace rules.
    pub fn namespaces(&self) -> &Namespaces {
        &self.namespaces
    }

    /// The live nodes: this one alone on the in-process broker.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, HubError> {
        match &self.broker {
            None => Ok(vec![self.node_info()]),
            Some(broker) => broker
                .nodes()
                .await
                .map_err(|e| HubError::Unavailable(e.to_string())),
        }
    }

    /// The channel named `name`, made if needed; refused when the server holds as many
    /// channels as it may.
    fn channel(&self, name: &str) -> Result<Arc<Channel>, HubError> {
        if let Some(channel) = self.channels.get(name) {
            return Ok(channel.clone());
        }
        if self.channel_count.load(Ordering::Relaxed) >= self.limits.max_channels {
            self.metrics.channel_refusals.inc();
            return Err(HubError::TooManyChannels {
                limit: self.limits.max_channels,
            });
        }
        let channel = match self.channels.entry(name.into()) {
            dashmap::Entry::Occupied(entry) => entry.get().clone(),
            dashmap::Entry::Vacant(entry) => {
                self.channel_count.fetch_add(1, Ordering::Relaxed);
                let channel = Arc::new(Channel::new(
                    name,
                    self.namespaces.for_channel(name).clone(),
                ));
                entry.insert(channel.clone());
                channel
            }
        };
        Ok(channel)
    }

    /// Removes a channel that has neither subscribers nor history.
    fn remove_if_unused(&self, name: &str) {
        let removed = self.channels.remove_if(name, |_, channel| {
            let mut state = channel.state.lock();
            let unused = state.unused();
            if unused {
                state.closed = true;
                self.history_budget.sub(state.held_bytes());
                state.latest = None;
            }
            unused
        });
        if removed.is_some() {
            self.channel_count.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Runs `change` on a channel's state and counts what it held before and after in the
    /// history budget.
    fn holding<R>(
        &self,
        state: &mut ChannelState,
        change: impl FnOnce(&mut ChannelState) -> R,
    ) -> R {
        let before = state.held_bytes();
        let result = change(state);
        self.history_budget.adjust(before, state.held_bytes());
        result
    }

    /// Publishes on a channel. On the in-process broker the publication is fanned out before
    /// this returns; with a broker, once the broker has it (every node, this one included,
    /// fans out what the broker sends).
    pub async fn publish(
        &self,
        channel_name: &str,
        payload: Payload,
        caller: Caller<'_>,
    ) -> Result<PublishOutcome, HubError> {
        if !duplex_proto::is_valid_channel(channel_name) {
            return Err(HubError::InvalidChannel);
        }
        let namespace = self.namespaces.for_channel(channel_name);
        check_access(namespace.publish, caller, channel_name, "publish")?;
        if matches!(payload, Payload::Binary(_)) && !namespace.binary {
            return Err(HubError::BinaryNotAllowed);
        }
        if matches!(&payload, Payload::Json(data) if data.get().trim() == "null") {
            return Err(HubError::NullData);
        }
        if payload.len() > namespace.max_message_size {
            return Err(HubError::MessageTooLarge {
                limit: namespace.max_message_size,
            });
        }
        match &self.broker {
            None => self.publish_here(channel_name, &payload),
            Some(broker) => {
                let (offset, epoch) = broker
                    .publish(channel_name, &payload, Retention::of(namespace))
                    .await
                    .map_err(|e| HubError::Unavailable(e.to_string()))?;
                Ok(PublishOutcome { offset, epoch })
            }
        }
    }

    /// The in-process broker: offset, fan-out and history under the channel's lock.
    fn publish_here(
        &self,
        channel_name: &str,
        payload: &Payload,
    ) -> Result<PublishOutcome, HubError> {
        if !self.channels.contains_key(channel_name)
            && self.namespaces.for_channel(channel_name).history_size == 0
        {
            // Nobody follows it and nothing would be kept: the channel would be made and
            // removed at once. Its first offset in a fresh epoch, without making it (so a
            // publisher to nobody is not held to `max_channels`).
            self.metrics.publications.inc();
            return Ok(PublishOutcome {
                offset: 1,
                epoch: new_epoch(),
            });
        }
        loop {
            let channel = self.channel(channel_name)?;
            let mut state = channel.state.lock();
            if state.closed {
                continue;
            }
            state.last_offset += 1;
            let offset = state.last_offset;
            let publication = Arc::new(Publication::counted(
                channel.name.clone(),
                offset,
                payload,
                &self.queue_budget,
            ));
            let namespace = &channel.namespace;
            let far_over = self.history_budget.is_far_over();
            let fan_out = self.holding(&mut state, |state| {
                let now = Instant::now();
                let fan_out = fan_out(&channel, state, &publication, now);
                if namespace.history_size > 0 {
                    state.remember(now, publication);
                    state.trim_history(namespace, now);
                    // The enforcer is behind: this channel gives up its oldest at once.
                    if far_over && state.history.len() > 1 {
                        state.drop_oldest_held();
                    }
                }
                fan_out
            });
            let outcome = PublishOutcome {
                offset,
                epoch: state.epoch.clone(),
            };
            let unused = state.unused();
            let watched = state.watchers > 0;
            drop(state);
            self.published(&channel, watched, &fan_out);
            if unused {
                self.remove_if_unused(channel_name);
            }
            return Ok(outcome);
        }
    }

    /// After a fan-out: wakes long polls and counts.
    fn published(&self, channel: &Channel, watched: bool, fan_out: &FanOut) {
        if watched {
            channel.published.notify_waiters();
        }
        let metrics = &self.metrics;
        metrics.publications.inc();
        metrics.deliveries_queued.inc_by(fan_out.delivered);
        if fan_out.dropped > 0 {
            metrics.dropped.inc_by(fan_out.dropped);
        }
        if fan_out.conflated > 0 {
            metrics.conflated.inc_by(fan_out.conflated);
        }
        if fan_out.disconnected > 0 {
            metrics
                .slow_consumer_disconnects
                .inc_by(fan_out.disconnected);
        }
    }

    /// With a broker: a publication the broker sent, from any node, in offset order. Channels
    /// nobody here follows are skipped. A gap in offsets or a new epoch means this node missed
    /// publications; its subscribers are disconnected with `insufficient_state` so that they
    /// resubscribe `since` their last offset and recover from the broker's history.
    pub fn deliver(&self, channel_name: &str, offset: u64, epoch: &str, payload: &Payload) {
        let Some(channel) = self.channels.get(channel_name).map(|c| c.clone()) else {
            return;
        };
        let mut state = channel.state.lock();
        if state.closed {
            return;
        }
        let same_epoch = *state.epoch == *epoch;
        if state.synced {
            if same_epoch && offset <= state.last_offset {
                return;
            }
            if !same_epoch || offset != state.last_offset + 1 {
                tracing::warn!(
                    channel = channel_name,
                    expected = state.last_offset + 1,
                    got = offset,
                    "missed publications from the broker; subscribers will recover"
                );
                self.lost_track(&mut state);
            }
        }
        state.synced = true;
        state.last_offset = offset;
        if !same_epoch {
            state.epoch = epoch.into();
        }
        let publication = Arc::new(Publication::counted(
            channel.name.clone(),
            offset,
            payload,
            &self.queue_budget,
        ));
        let fan_out = self.holding(&mut state, |state| {
            fan_out(&channel, state, &publication, Instant::now())
        });
        let watched = state.watchers > 0;
        drop(state);
        self.published(&channel, watched, &fan_out);
    }

    /// Disconnects every subscriber of a channel this node lost track of.
    fn lost_track(&self, state: &mut ChannelState) {
        for subscriber in state.subscribers.values() {
            subscriber
                .connection
                .queue
                .close(DisconnectCode::InsufficientState);
        }
        self.metrics
            .insufficient_state_disconnects
            .inc_by(state.subscribers.len() as u64);
    }

    /// With a broker: after the link to it broke, compares every followed channel with the
    /// broker's position and disconnects the subscribers of those that moved on meanwhile (or
    /// that the broker lost), so that they recover.
    pub async fn resync(&self) {
        let Some(broker) = &self.broker else {
            return;
        };
        let names: Vec<Arc<str>> = self
            .channels
            .iter()
            .filter(|c| c.state.lock().synced)
            .map(|c| c.name.clone())
            .collect();
        // The command connection may only now find its old socket broken: retry a little, and
        // if the broker still cannot say, have every subscriber recover (from a broker that
        // answers by then, recovery tells them nothing was lost if nothing was).
        let mut positions = vec![None; names.len()];
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=4 {
            match broker.positions(&names).await {
                Ok(found) => {
                    positions = found;
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, attempt, "cannot compare channels with the broker");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
        for (name, position) in names.iter().zip(positions) {
            let Some(channel) = self.channels.get(name).map(|c| c.clone()) else {
                continue;
            };
            let mut state = channel.state.lock();
            let current = match &position {
                Some((top, epoch)) => *top == state.last_offset && **epoch == *state.epoch,
                None => false,
            };
            if !current {
                self.lost_track(&mut state);
                state.synced = false;
            }
        }
    }

    /// Subscribes a connection, queueing the `reply` (with the channel's current offset and
    /// epoch) before any publication the subscription will receive. With `since`, the reply
    /// says whether every publication after it can be replayed, and those publications follow
    /// the reply, before any live one, and none is sent twice.
    pub async fn subscribe(
        &self,
        channel_name: &str,
        connection: &Arc<ConnectionHandle>,
        reply_id: u64,
        since: Option<&Since>,
    ) -> Result<(), HubError> {
        self.check_readable(channel_name, Caller::Client(&connection.auth()))?;
        match &self.broker {
            None => self.subscribe_here(channel_name, connection, reply_id, since),
            Some(broker) => {
                self.subscribe_through(broker, channel_name, connection, reply_id, since)
                    .await
            }
        }
    }

    fn new_subscriber(&self, channel_name: &str, connection: &Arc<ConnectionHandle>) -> Subscriber {
        let namespace = self.namespaces.for_channel(channel_name);
        Subscriber {
            connection: connection.clone(),
            latest: (namespace.slow_consumer == SlowConsumerPolicy::Latest)
                .then(|| Arc::new(LatestSlot::default())),
            recovering: None,
            after: 0,
        }
    }

    /// The in-process broker: reply and replay queued under the channel's lock, so no live
    /// publication can slip in between.
    fn subscribe_here(
        &self,
        channel_name: &str,
        connection: &Arc<ConnectionHandle>,
        reply_id: u64,
        since: Option<&Since>,
    ) -> Result<(), HubError> {
        let subscriber = self.new_subscriber(channel_name, connection);
        loop {
            let channel = self.channel(channel_name)?;
            let mut state = channel.state.lock();
            if state.closed {
                continue;
            }
            if state.subscribers.contains_key(&connection.id) {
                return Err(HubError::AlreadySubscribed);
            }
            let recovery = since.map(|since| state.recoverable(since));
            queue_reply(
                connection,
                reply_id,
                channel_name,
                state.last_offset,
                &state.epoch,
                since,
                recovery,
            );
            if let (Some(since), Some(Ok(()))) = (since, recovery) {
                for publication in state.publications_after(since.offset()) {
                    connection.queue.push_recovered(publication);
                }
            }
            if channel.namespace.presence {
                let join = join_frame(channel_name, connection);
                for other in state.subscribers.values() {
                    other.connection.queue.push_control(join.clone());
                }
            }
            state.subscribers.insert(connection.id, subscriber);
            connection.add_subscription(channel_name);
            self.metrics.subscriptions.inc();
            return Ok(());
        }
    }

    /// With a broker: the subscriber is added first and buffers what the broker sends while
    /// the broker's history is read; the reply, the missed publications and then the buffered
    /// ones after them are queued together.
    async fn subscribe_through(
        &self,
        broker: &Arc<dyn Broker>,
        channel_name: &str,
        connection: &Arc<ConnectionHandle>,
        reply_id: u64,
        since: Option<&Since>,
    ) -> Result<(), HubError> {
        let mut subscriber = self.new_subscriber(channel_name, connection);
        subscriber.recovering = Some(Vec::new());
        let channel = loop {
            let channel = self.channel(channel_name)?;
            let mut state = channel.state.lock();
            if state.closed {
                continue;
            }
            if state.subscribers.contains_key(&connection.id) {
                return Err(HubError::AlreadySubscribed);
            }
            state.subscribers.insert(connection.id, subscriber);
            connection.add_subscription(channel_name);
            self.metrics.subscriptions.inc();
            drop(state);
            break channel;
        };
        let range = match since {
            Some(since) => HistoryRange::After {
                offset: since.offset(),
                limit: Retention::of(&channel.namespace).size,
            },
            None => HistoryRange::None,
        };
        let read = broker
            .history(channel_name, range, Retention::of(&channel.namespace))
            .await;
        if !self.finish_subscription(&channel, connection, reply_id, since, read)? {
            return Ok(());
        }
        if channel.namespace.presence
            && let Err(error) = broker.join(channel_name, &present(connection)).await
        {
            tracing::warn!(%error, channel = channel_name, "cannot add presence to the broker");
        }
        Ok(())
    }

    /// Queues a subscription's reply, what it missed and what arrived meanwhile, once the
    /// broker's history is read; false when the connection closed meanwhile.
    fn finish_subscription(
        &self,
        channel: &Arc<Channel>,
        connection: &Arc<ConnectionHandle>,
        reply_id: u64,
        since: Option<&Since>,
        read: Result<BrokerHistory, crate::broker::BrokerError>,
    ) -> Result<bool, HubError> {
        let mut state = channel.state.lock();
        let Some(subscriber) = state.subscribers.get_mut(&connection.id) else {
            // The connection closed meanwhile.
            return Ok(false);
        };
        let buffered = subscriber.recovering.take().unwrap_or_default();
        if let Ok(history) = &read {
            subscriber.after = history.top.max(buffered.last().map_or(0, |p| p.offset()));
        }
        let history = match read {
            Ok(history) => history,
            Err(error) => {
                state.subscribers.swap_remove(&connection.id);
                connection.remove_subscription(&channel.name);
                self.metrics.subscriptions.dec();
                let unused = state.unused();
                drop(state);
                if unused {
                    self.remove_if_unused(&channel.name);
                }
                return Err(HubError::Unavailable(error.to_string()));
            }
        };
        let BrokerHistory {
            top,
            epoch,
            oldest,
            publications,
        } = history;
        let recovery = since.map(|since| recoverable(since, top, &epoch, oldest));
        queue_reply(
            connection,
            reply_id,
            &channel.name,
            top,
            &epoch,
            since,
            recovery,
        );
        if recovery == Some(Ok(())) {
            for stored in &publications {
                let publication = Publication::counted(
                    channel.name.clone(),
                    stored.offset,
                    &stored.payload,
                    &self.queue_budget,
                );
                connection.queue.push_recovered(&Arc::new(publication));
            }
        }
        let policy = channel.namespace.slow_consumer;
        let latest = state
            .subscribers
            .get(&connection.id)
            .and_then(|s| s.latest.clone());
        let fresh = buffered.iter().filter(|p| p.offset() > top);
        for (expected, publication) in (top + 1..).zip(fresh) {
            if publication.offset() != expected {
                // This node missed publications between the history read and what it buffered.
                connection.queue.close(DisconnectCode::InsufficientState);
                break;
            }
            connection
                .queue
                .push_publication(publication, policy, latest.as_ref());
        }
        if !state.synced {
            state.synced = true;
            state.last_offset = top;
            state.epoch = epoch;
        }
        Ok(true)
    }

    /// Ends a subscription.
    pub fn unsubscribe(
        &self,
        channel_name: &str,
        connection: &ConnectionHandle,
    ) -> Result<(), HubError> {
        if !connection.remove_subscription(channel_name) {
            return Err(HubError::NotSubscribed);
        }
        self.remove_subscriber(channel_name, connection.id)
    }

    /// Ends every subscription of `connection` that `auth` (its new token) no longer allows,
    /// telling the client with an `unsubscribed` push for each.
    pub fn end_disallowed_subscriptions(&self, connection: &ConnectionHandle, auth: &ClientAuth) {
        for channel in connection.subscriptions() {
            if self.check_readable(&channel, Caller::Client(auth)).is_ok() {
                continue;
            }
            if self.unsubscribe(&channel, connection).is_ok() {
                connection
                    .queue
                    .push_control(Bytes::from(to_json(&Unsubscribed {
                        channel: channel.as_str().into(),
                        code: ErrorCode::PermissionDenied,
                    })));
            }
        }
    }

    fn remove_subscriber(
        &self,
        channel_name: &str,
        connection: ConnectionId,
    ) -> Result<(), HubError> {
        let Some(channel) = self.channels.get(channel_name).map(|c| c.clone()) else {
            return Err(HubError::NotSubscribed);
        };
        let mut state = channel.state.lock();
        let Some(removed) = state.subscribers.swap_remove(&connection) else {
            return Err(HubError::NotSubscribed);
        };
        self.metrics.subscriptions.dec();
        if channel.namespace.presence {
            match &self.broker {
                Some(broker) => {
                    let broker = broker.clone();
                    let channel_name = channel_name.to_owned();
                    tokio::spawn(async move {
                        if let Err(error) = broker.leave(&channel_name, connection).await {
                            tracing::warn!(%error, channel = channel_name, "cannot remove presence from the broker");
                        }
                    });
                }
                None if !state.subscribers.is_empty() => {
                    let user = removed.connection.user();
                    let leave = Bytes::from(to_json(&Leave {
                        channel: channel_name,
                        client: &connection.to_string(),
                        user: user.as_deref(),
                    }));
                    for other in state.subscribers.values() {
                        other.connection.queue.push_control(leave.clone());
                    }
                }
                None => {}
            }
        }
        let unused = state.unused();
        drop(state);
        if unused {
            self.remove_if_unused(channel_name);
        }
        Ok(())
    }

    /// With a broker: a presence frame from any node for this node's subscribers.
    pub fn presence_event(&self, channel_name: &str, except: ConnectionId, frame: Bytes) {
        let Some(channel) = self.channels.get(channel_name).map(|c| c.clone()) else {
            return;
        };
        let state = channel.state.lock();
        for (id, subscriber) in &state.subscribers {
            // A subscription still reading history gets presence after its reply, by asking.
            if *id != except && subscriber.recovering.is_none() {
                subscriber.connection.queue.push_control(frame.clone());
            }
        }
    }

    /// Every (channel, client) this node holds presence for.
    pub fn local_presence(&self) -> Vec<(Arc<str>, Present)> {
        let mut all = Vec::new();
        for entry in &self.channels {
            let channel = entry.value();
            if !channel.namespace.presence {
                continue;
            }
            let state = channel.state.lock();
            for subscriber in state.subscribers.values() {
                all.push((channel.name.clone(), present(&subscriber.connection)));
            }
        }
        all
    }

    /// This node's description.
    pub fn node_info(&self) -> NodeInfo {
        NodeInfo {
            connections: self.connections.len() as u64,
            ..self.node.clone()
        }
    }

    /// Checks that `caller` may follow a channel (subscribe, poll, stream).
    pub fn check_readable(&self, channel_name: &str, caller: Caller<'_>) -> Result<(), HubError> {
        if !duplex_proto::is_valid_channel(channel_name) {
            return Err(HubError::InvalidChannel);
        }
        let namespace = self.namespaces.for_channel(channel_name);
        check_access(namespace.subscribe, caller, channel_name, "subscribe")
    }

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
                let page = match &self.broker {
                    None => {
                        let state = channel.state.lock();
                        let recovered = since.map(|since| state.readable_since(since));
                        let publications: Vec<Arc<Publication>> = match (since, recovered) {
                            (Some(since), Some(Ok(()) | Err(NotRecovered::HistoryTrimmed))) => {
                                state
                                    .publications_after(since.offset())
                                    .take(limit)
                                    .cloned()
                                    .collect()
                            }
                            _ => Vec::new(),
                        };
                        HistoryPage {
                            publications,
                            offset: state.last_offset,
                            epoch: state.epoch.clone(),
                            recovered,
                        }
                    }
                    Some(broker) => {
                        let range = match since {
                            Some(since) => HistoryRange::After {
                                offset: since.offset(),
                                limit,
                            },
                            None => HistoryRange::None,
                        };
                        let history = broker
                            .history(channel_name, range, Retention::of(&channel.namespace))
                            .await
                            .map_err(|e| HubError::Unavailable(e.to_string()))?;
                        let mut page = page_of(&channel.name, history, since);
                        if let Some(Err(reason)) = page.recovered
                            && reason != NotRecovered::HistoryTrimmed
                        {
                            page.publications.clear();
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

    /// Who is subscribed to a channel (namespaces with presence on), on every node.
    pub async fn presence(
        &self,
        channel_name: &str,
        caller: Caller<'_>,
    ) -> Result<Vec<Present>, HubError> {
        if !duplex_proto::is_valid_channel(channel_name) {
            return Err(HubError::InvalidChannel);
        }
        let namespace = self.namespaces.for_channel(channel_name);
        if !namespace.presence {
            return Err(HubError::PresenceDisabled);
        }
        check_access(
            namespace.read_presence,
            caller,
            channel_name,
            "read presence",
        )?;
        if let Some(broker) = &self.broker {
            return broker
                .presence(channel_name)
                .await
                .map_err(|e| HubError::Unavailable(e.to_string()));
        }
        let Some(channel) = self.channels.get(channel_name).map(|c| c.clone()) else {
            return Ok(Vec::new());
        };
        let state = channel.state.lock();
        Ok(state
            .subscribers
            .values()
            .map(|s| present(&s.connection))
            .collect())
    }

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
        if let Some(broker) = &self.broker {
            let range = match since {
                Some(since) => HistoryRange::After {
                    offset: since.offset(),
                    limit,
                },
                None => HistoryRange::Last(limit),
            };
            let history = broker
                .history(channel_name, range, Retention::of(namespace))
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

/// The hub as its broker's listener: `Arc<Hub>` is what the broker holds.
#[derive(Debug, Clone)]
pub struct HubEvents(pub Arc<Hub>);

impl BrokerEvents for HubEvents {
    fn deliver(&self, channel: &str, offset: u64, epoch: &str, payload: Payload) {
        self.0.deliver(channel, offset, epoch, &payload);
    }

    fn presence_event(&self, channel: &str, except: ConnectionId, frame: Bytes) {
        self.0.presence_event(channel, except, frame);
    }

    fn reconnected(&self) {
        let hub = self.0.clone();
        tokio::spawn(async move { hub.resync().await });
    }

    fn local_connection(&self, id: ConnectionId) -> Option<Arc<ConnectionHandle>> {
        self.0.connection(id)
    }

    fn local_presence(&self) -> Vec<(Arc<str>, Present)> {
        self.0.local_presence()
    }

    fn local_connections_of_user(&self, user: &str) -> Vec<Arc<ConnectionHandle>> {
        self.0.connections_of_user(user)
    }

    fn node_info(&self) -> NodeInfo {
        self.0.node_info()
    }
}

/// Pushes a publication to every subscriber of a channel (buffering it for those still reading
/// the broker's history) and records it as the channel's latest.
fn fan_out(
    channel: &Channel,
    state: &mut ChannelState,
    publication: &Arc<Publication>,
    now: Instant,
) -> FanOut {
    let policy = channel.namespace.slow_consumer;
    let mut counts = FanOut::default();
    for subscriber in state.subscribers.values_mut() {
        if let Some(buffer) = &mut subscriber.recovering {
            buffer.push(publication.clone());
            continue;
        }
        if publication.offset() <= subscriber.after {
            continue;
        }
        match subscriber.connection.queue.push_publication(
            publication,
            policy,
            subscriber.latest.as_ref(),
        ) {
            Pushed::Queued | Pushed::Closed => {}
            Pushed::Dropped(dropped) => counts.dropped += dropped as u64,
            Pushed::Conflated => counts.conflated += 1,
            Pushed::Disconnecting => counts.disconnected += 1,
        }
    }
    counts.delivered = state.subscribers.len() as u64;
    state.count_publication(now);
    state.latest = Some((now, publication.clone()));
    counts
}

/// Queues a subscription's `reply`.
fn queue_reply(
    connection: &ConnectionHandle,
    reply_id: u64,
    channel_name: &str,
    offset: u64,
    epoch: &str,
    since: Option<&Since>,
    recovery: Option<Result<(), NotRecovered>>,
) {
    let missed = match (since, recovery) {
        (Some(since), Some(Ok(()))) => offset - since.offset(),
        _ => 0,
    };
    let reply = to_json(&Reply {
        id: reply_id,
        result: Subscribed {
            channel: channel_name.into(),
            offset,
            epoch: epoch.into(),
            recovered: recovery.map(|r| r.is_ok()),
            missed: recovery.and_then(|r| r.ok()).map(|()| missed),
            reason: recovery.and_then(|r| r.err()).map(|e| e.as_str().into()),
        },
    });
    connection.queue.push_control(Bytes::from(reply));
}

/// A connection's `join` frame.
fn join_frame(channel_name: &str, connection: &ConnectionHandle) -> Bytes {
    let meta = connection.meta();
    let user = connection.user();
    Bytes::from(to_json(&Join {
        channel: channel_name,
        client: &connection.id.to_string(),
        user: user.as_deref(),
        meta: meta.as_deref(),
    }))
}

/// A connection as presence lists it.
fn present(connection: &ConnectionHandle) -> Present {
    Present {
        client: connection.id.to_string(),
        user: connection.user().map(|u| u.to_string()),
        meta: connection.meta().map(|m| m.as_ref().to_owned()),
    }
}

/// A history page from what the broker read.
fn page_of(channel: &Arc<str>, history: BrokerHistory, since: Option<&Since>) -> HistoryPage {
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

/// Refuses `caller` unless `access` lets it do `what` on `channel`.
fn check_access(
    access: Access,
    caller: Caller<'_>,
    channel: &str,
    what: &'static str,
) -> Result<(), HubError> {
    if access.allows(caller, channel) {
        return Ok(());
    }
    Err(HubError::PermissionDenied(match (access, what) {
        (Access::Server, "publish") => "only the server publishes in this namespace",
        (Access::Server, _) => "only the server may do this in this namespace",
        (Access::Authenticated, _) => "this needs a valid token in this namespace",
        (_, _) => "this needs a token whose channels claim lists the channel",
    }))
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

#[cfg(test)]
mod tests {
    use super::*;
    use queue::{Outgoing, OutgoingQueue};
    use serde_json::value::RawValue;

    fn json(text: &str) -> Payload {
        Payload::Json(RawValue::from_string(text.into()).expect("json"))
    }

    fn hub() -> Hub {
        Hub::new(Namespaces::default(), Metrics::new())
    }

    fn connection(id: u64) -> Arc<ConnectionHandle> {
        let queue = Arc::new(OutgoingQueue::new(100));
        Arc::new(ConnectionHandle::new(ConnectionId(id), "test", None, queue))
    }

    async fn drain(connection: &ConnectionHandle) -> VecDeque<Outgoing> {
        let mut batch = VecDeque::new();
        connection.queue.next_batch(&mut batch).await;
        batch
    }

    fn offsets(batch: &VecDeque<Outgoing>) -> Vec<u64> {
        batch
            .iter()
            .filter_map(|item| match item {
                Outgoing::Publication(p) => Some(p.offset()),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn subscribers_get_every_publication_in_offset_order_after_the_reply() {
        let hub = hub();
        let subscriber = connection(1);
        hub.subscribe("chat:a", &subscriber, 7, None)
            .await
            .expect("subscribe");
        for i in 0..3 {
            let outcome = hub
                .publish(
                    "chat:a",
                    json(&i.to_string()),
                    Caller::Client(&ClientAuth::default()),
                )
                .await
                .expect("publish");
            assert_eq!(outcome.offset, i + 1);
        }
        let batch = drain(&subscriber).await;
        assert!(
            matches!(&batch[0], Outgoing::Control(reply) if reply.starts_with(b"{\"type\":\"reply\",\"id\":7"))
        );
        assert_eq!(offsets(&batch), vec![1, 2, 3]);
    }

    #[tokio::test]
    async fn since_replays_missed_publications_after_the_reply() {
        let hub = hub();
        let epoch = hub
            .publish("chat:a", json("1"), Caller::Client(&ClientAuth::default()))
            .await
            .expect("publish")
            .epoch;
        for i in 2..=5 {
            hub.publish(
                "chat:a",
                json(&i.to_string()),
                Caller::Client(&ClientAuth::default()),
            )
            .await
            .expect("publish");
        }
        let subscriber = connection(1);
        let since = Since::Position {
            offset: 2,
            epoch: Some(epoch.to_string()),
        };
        hub.subscribe("chat:a", &subscriber, 1, Some(&since))
            .await
            .expect("subscribe");
        let batch = drain(&subscriber).await;
        let Outgoing::Control(reply) = &batch[0] else {
            panic!("reply first");
        };
        let reply: serde_json::Value = serde_json::from_slice(reply).expect("json");
        assert_eq!(reply["result"]["recovered"], true);
        assert_eq!(reply["result"]["missed"], 3);
        assert_eq!(offsets(&batch), vec![3, 4, 5]);
    }

    #[tokio::test]
    async fn recovery_is_refused_with_a_reason() {
        let hub = hub();
        let epoch = hub
            .publish("chat:a", json("1"), Caller::Client(&ClientAuth::default()))
            .await
            .expect("publish")
            .epoch
            .to_string();
        let state_of = |since: Since| {
            let channel = hub.channel("chat:a").expect("a channel");
            let state = channel.state.lock();
            state.recoverable(&since)
        };
        assert_eq!(
            state_of(Since::Position {
                offset: 1,
                epoch: Some("other".into())
            }),
            Err(NotRecovered::EpochChanged)
        );
        assert_eq!(state_of(Since::Offset(1)), Err(NotRecovered::EpochRequired));
        assert_eq!(
            state_of(Since::Position {
                offset: 9,
                epoch: Some(epoch.clone())
            }),
            Err(NotRecovered::OffsetAhead)
        );
        assert_eq!(
            state_of(Since::Position {
                offset: 0,
                epoch: Some(epoch.clone())
            }),
            Ok(())
        );
        // A namespace without history cannot recover anything but "nothing missed".
        let stream = hub
            .publish(
                "stream:a",
                Payload::Binary(Bytes::from_static(b"x")),
                Caller::Client(&ClientAuth::default()),
            )
            .await
            .expect("publish");
        assert_eq!(stream.offset, 1);
    }

    #[tokio::test]
    async fn namespace_rules_are_enforced() {
        let hub = hub();
        assert_eq!(
            hub.publish(
                "records:posts",
                json("1"),
                Caller::Client(&ClientAuth::default())
            )
            .await,
            Err(HubError::PermissionDenied(
                "only the server publishes in this namespace"
            ))
        );
        assert!(
            hub.publish("records:posts", json("1"), Caller::Server)
                .await
                .is_ok()
        );
        assert_eq!(
            hub.publish(
                "chat:a",
                Payload::Binary(Bytes::from_static(b"x")),
                Caller::Client(&ClientAuth::default())
            )
            .await,
            Err(HubError::BinaryNotAllowed)
        );
        assert!(
            hub.publish(
                "stream:a",
                Payload::Binary(Bytes::from_static(b"x")),
                Caller::Client(&ClientAuth::default())
            )
            .await
            .is_ok()
        );
        assert_eq!(
            hub.publish("nocolon", json("1"), Caller::Client(&ClientAuth::default()))
                .await,
            Err(HubError::InvalidChannel)
        );
        let big = format!("\"{}\"", "x".repeat(70 * 1024));
        assert!(matches!(
            hub.publish("chat:a", json(&big), Caller::Client(&ClientAuth::default()))
                .await,
            Err(HubError::MessageTooLarge { .. })
        ));
        assert_eq!(
            hub.presence("news:a", Caller::Server)
                .await
                .map(|p| p.len()),
            Err(HubError::PresenceDisabled)
        );
    }

    #[tokio::test]
    async fn channels_without_subscribers_or_history_are_removed() {
        let hub = hub();
        let subscriber = connection(1);
        hub.subscribe("stream:a", &subscriber, 1, None)
            .await
            .expect("subscribe");
        assert_eq!(hub.channel_count(), 1);
        assert_eq!(
            hub.subscribe("stream:a", &subscriber, 2, None).await,
            Err(HubError::AlreadySubscribed)
        );
        hub.unsubscribe("stream:a", &subscriber)
            .expect("unsubscribe");
        assert_eq!(hub.channel_count(), 0);
        assert_eq!(
            hub.unsubscribe("stream:a", &subscriber),
            Err(HubError::NotSubscribed)
        );
        // A channel with history stays until the history expires.
        hub.publish("chat:a", json("1"), Caller::Client(&ClientAuth::default()))
            .await
            .expect("publish");
        assert_eq!(hub.channel_count(), 1);
    }

    #[tokio::test]
    async fn presence_lists_subscribers_and_announces_joins_and_leaves() {
        let hub = hub();
        let first = connection(1);
        let second = connection(2);
        hub.subscribe("chat:room", &first, 1, None)
            .await
            .expect("subscribe");
        hub.subscribe("chat:room", &second, 1, None)
            .await
            .expect("subscribe");
        let ids: Vec<String> = hub
            .presence("chat:room", Caller::Server)
            .await
            .expect("presence")
            .into_iter()
            .map(|c| c.client)
            .collect();
        assert_eq!(
            ids,
            vec![ConnectionId(1).to_string(), ConnectionId(2).to_string()]
        );
        hub.deregister(&second);
        let batch = drain(&first).await;
        let frames: Vec<serde_json::Value> = batch
            .iter()
            .filter_map(|item| match item {
                Outgoing::Control(bytes) => serde_json::from_slice(bytes).ok(),
                _ => None,
            })
            .collect();
        assert_eq!(frames[1]["type"], "join");
        assert_eq!(frames[1]["client"], ConnectionId(2).to_string());
        assert_eq!(frames[2]["type"], "leave");
        assert_eq!(
            hub.presence("chat:room", Caller::Server)
                .await
                .expect("presence")
                .len(),
            1
        );
    }
}
