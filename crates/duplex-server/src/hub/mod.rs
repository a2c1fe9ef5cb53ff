//! The hub: channels, subscriptions and fan-out.
//!
//! Channels live in a sharded map ([`DashMap`]), each behind its own mutex: there is no global
//! lock on the fan-out path, and publishers to different channels never contend. A publication
//! takes its channel's lock to get the next offset, is encoded once, and is pushed to every
//! subscriber's bounded [`OutgoingQueue`] before the lock is released, which is what keeps each
//! channel totally ordered for every subscriber. Pushing never waits: a full queue applies the
//! namespace's slow-consumer policy, so a slow subscriber never delays the others.

pub use crate::model::ConnectionId;

pub mod budget;
mod channel;
pub mod connection;
mod enforce;
mod fanout;
mod history;
pub mod idempotency;
pub mod namespace;
mod poll;
mod presence;
pub mod publication;
pub mod queue;
mod registry;
mod shared_read;
mod subscribe;
#[cfg(test)]
mod tests;

pub use channel::NotRecovered;
use channel::{Channel, ChannelState};

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use duplex_proto::ErrorCode;

use crate::broker::{Broker, BrokerEvents, ChannelLog, NodeInfo, Present, Retention};
use crate::metrics::Metrics;
use budget::ByteBudget;
use connection::ConnectionHandle;
use namespace::{Access, Caller, Namespace, Namespaces};
use publication::{Payload, Publication};
use queue::{OutgoingQueue, QueueLimits};

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
    /// An idempotency key is not 1 to 128 visible ASCII characters.
    #[error("an idempotency key is 1 to 128 visible ASCII characters (a UUID, say)")]
    InvalidIdempotencyKey,
    /// The key named a different publication in this channel, within its window.
    #[error(
        "this idempotency key was used for a different publication in this channel within the last 2 minutes; nothing was published"
    )]
    IdempotencyKeyReused,
    /// The key's publication is under way.
    #[error("a publication with this idempotency key is under way; retry when it has answered")]
    IdempotencyKeyInUse,
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
            HubError::InvalidIdempotencyKey => ErrorCode::InvalidIdempotencyKey,
            HubError::IdempotencyKeyReused => ErrorCode::IdempotencyKeyReused,
            HubError::IdempotencyKeyInUse => ErrorCode::IdempotencyKeyInUse,
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
    /// Whether this answers a retry with an idempotency key: the first publication's outcome,
    /// nothing published again.
    pub replayed: bool,
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

/// Channels, their subscribers, and the connections of this node.
#[derive(Debug)]
pub struct Hub {
    channels: DashMap<Arc<str>, Arc<Channel>>,
    connections: DashMap<ConnectionId, Arc<ConnectionHandle>>,
    namespaces: Namespaces,
    metrics: Arc<Metrics>,
    /// The broker between nodes; `None` is the in-process (`memory`) broker.
    broker: Option<Arc<dyn Broker>>,
    /// Without a broker: the store, the log of the channels whose namespace keeps history
    /// there (`history_storage = "store"`).
    stored: Option<Arc<dyn ChannelLog>>,
    /// Whether `records:` channels keep theirs there too (the store appends record events in
    /// their write's transaction).
    stored_records: bool,
    /// This node, as `GET /api/nodes` and the registry describe it.
    node: NodeInfo,
    limits: HubLimits,
    /// How many channels `channels` holds (DashMap's own count locks every shard).
    channel_count: AtomicUsize,
    /// Bytes of publications and control frames queued for connections.
    queue_budget: Arc<ByteBudget>,
    /// Bytes of channel history (and latest publications) kept on this node.
    history_budget: Arc<ByteBudget>,
    /// Without a broker: the idempotency keys of recent publications.
    keys: idempotency::Keys,
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
            stored: None,
            stored_records: false,
            broker,
            node,
            limits,
            channel_count: AtomicUsize::new(0),
            queue_budget: ByteBudget::new(limits.max_queued_bytes),
            history_budget: ByteBudget::new(limits.max_history_bytes),
            keys: idempotency::Keys::default(),
        }
    }

    /// Keeps the history of the namespaces with `history_storage = "store"` in `log` (the
    /// store), when there is no broker; the log hands what it committed to
    /// [`Hub::deliver_stored`].
    /// `records` says whether `records:` channels keep theirs there too.
    pub fn with_stored_history(mut self, log: Arc<dyn ChannelLog>, records: bool) -> Self {
        if self.broker.is_none() {
            self.stored = Some(log);
            self.stored_records = records;
        }
        self
    }

    /// Where a namespace's channels keep offsets and history when not in this process: the
    /// broker for all, or without one the store for those whose namespace says so; `None` is
    /// this process's memory.
    fn log_for(&self, namespace: &Namespace) -> Option<&dyn ChannelLog> {
        if let Some(broker) = &self.broker {
            return Some(&**broker);
        }
        let records = namespace.name == "records";
        if namespace.keeps_history_in_store() && (self.stored_records || !records) {
            self.stored.as_deref()
        } else {
            None
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

    fn ask_local(
        &self,
        id: ConnectionId,
        data: Box<serde_json::value::RawValue>,
        timeout: Duration,
    ) -> Option<
        futures_util::future::BoxFuture<
            'static,
            Result<crate::model::ClientAnswer, crate::model::RequestError>,
        >,
    > {
        let connection = self.0.connection(id)?;
        Some(Box::pin(
            async move { connection.request(&data, timeout).await },
        ))
    }

    fn local_presence(&self) -> Vec<(Arc<str>, Present)> {
        self.0.local_presence()
    }

    fn ask_local_user(
        &self,
        user: &str,
        data: Arc<serde_json::value::RawValue>,
        timeout: Duration,
    ) -> Vec<futures_util::future::BoxFuture<'static, crate::model::UserAnswer>> {
        self.0
            .connections_of_user(user)
            .into_iter()
            .map(|connection| {
                let data = data.clone();
                Box::pin(async move {
                    let answer = connection.request(&data, timeout).await;
                    (connection.id.to_string(), answer)
                }) as futures_util::future::BoxFuture<'static, _>
            })
            .collect()
    }

    fn node_info(&self) -> NodeInfo {
        self.0.node_info()
    }
}

/// How long and how much of a channel's history the log keeps, from its namespace.
fn retention_of(namespace: &Namespace) -> Retention {
    namespace.retention()
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
