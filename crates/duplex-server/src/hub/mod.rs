//! The hub: channels, subscriptions and fan-out.
//!
//! Channels live in a sharded map ([`DashMap`]), each behind its own mutex: there is no global
//! lock on the fan-out path, and publishers to different channels never contend. A publication
//! takes its channel's lock to get the next offset, is encoded once, and is pushed to every
//! subscriber's bounded [`OutgoingQueue`] before the lock is released, which is what keeps each
//! channel totally ordered for every subscriber. Pushing never waits: a full queue applies the
//! namespace's slow-consumer policy, so a slow subscriber never delays the others.

pub mod namespace;
pub mod publication;
pub mod queue;

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use duplex_proto::ErrorCode;
use duplex_proto::frames::{Reply, Subscribed, to_json};
use indexmap::IndexMap;
use parking_lot::Mutex;

use crate::metrics::Metrics;
use namespace::{Namespace, Namespaces, PublishRule, SlowConsumerPolicy, SubscribeRule};
use publication::{Payload, Publication};
use queue::{LatestSlot, OutgoingQueue, Pushed};

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

/// Who is publishing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A connected client.
    Client,
    /// The server itself (records API, server API).
    Server,
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
}

impl HubError {
    /// The protocol error code.
    pub fn code(&self) -> ErrorCode {
        match self {
            HubError::InvalidChannel => ErrorCode::InvalidChannel,
            HubError::PermissionDenied(_) => ErrorCode::PermissionDenied,
            HubError::AlreadySubscribed => ErrorCode::AlreadySubscribed,
            HubError::NotSubscribed => ErrorCode::NotSubscribed,
            HubError::MessageTooLarge { .. } => ErrorCode::MessageTooLarge,
            HubError::BinaryNotAllowed => ErrorCode::BinaryNotAllowed,
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
pub struct Subscriber {
    /// The connection's queue.
    pub queue: Arc<OutgoingQueue>,
    /// The conflation slot, for `latest` namespaces.
    latest: Option<Arc<LatestSlot>>,
}

impl Subscriber {
    /// A subscriber that receives through `queue`.
    pub fn new(queue: Arc<OutgoingQueue>) -> Self {
        Subscriber {
            queue,
            latest: None,
        }
    }
}

#[derive(Debug)]
struct ChannelState {
    last_offset: u64,
    epoch: Arc<str>,
    subscribers: IndexMap<ConnectionId, Subscriber>,
    history: VecDeque<(Instant, Arc<Publication>)>,
    /// Set when the channel was removed from the map; whoever holds the Arc must look it up again.
    closed: bool,
}

/// One channel.
#[derive(Debug)]
struct Channel {
    name: Arc<str>,
    namespace: Arc<Namespace>,
    state: Mutex<ChannelState>,
}

impl Channel {
    fn new(name: &str, namespace: Arc<Namespace>) -> Self {
        Channel {
            name: name.into(),
            namespace,
            state: Mutex::new(ChannelState {
                last_offset: 0,
                epoch: new_epoch(),
                subscribers: IndexMap::new(),
                history: VecDeque::new(),
                closed: false,
            }),
        }
    }
}

fn new_epoch() -> Arc<str> {
    format!("{:08x}", rand_u64() as u32).into()
}

/// Channels and their subscribers.
#[derive(Debug)]
pub struct Hub {
    channels: DashMap<Arc<str>, Arc<Channel>>,
    namespaces: Namespaces,
    metrics: Arc<Metrics>,
}

impl Hub {
    /// An empty hub with these namespace rules.
    pub fn new(namespaces: Namespaces, metrics: Arc<Metrics>) -> Self {
        Hub {
            channels: DashMap::new(),
            namespaces,
            metrics,
        }
    }

    /// The namespace rules.
    pub fn namespaces(&self) -> &Namespaces {
        &self.namespaces
    }

    fn channel(&self, name: &str) -> Arc<Channel> {
        if let Some(channel) = self.channels.get(name) {
            return channel.clone();
        }
        self.channels
            .entry(name.into())
            .or_insert_with(|| {
                Arc::new(Channel::new(
                    name,
                    self.namespaces.for_channel(name).clone(),
                ))
            })
            .clone()
    }

    /// Removes a channel that has neither subscribers nor history.
    fn remove_if_unused(&self, name: &str) {
        self.channels.remove_if(name, |_, channel| {
            let mut state = channel.state.lock();
            let unused = state.subscribers.is_empty() && state.history.is_empty();
            if unused {
                state.closed = true;
            }
            unused
        });
    }

    /// Publishes on a channel and fans the publication out to its subscribers.
    pub fn publish(
        &self,
        channel_name: &str,
        payload: Payload,
        origin: Origin,
    ) -> Result<PublishOutcome, HubError> {
        if !duplex_proto::is_valid_channel(channel_name) {
            return Err(HubError::InvalidChannel);
        }
        let namespace = self.namespaces.for_channel(channel_name);
        if origin == Origin::Client && namespace.publish == PublishRule::Server {
            return Err(HubError::PermissionDenied(
                "only the server publishes in this namespace",
            ));
        }
        if matches!(payload, Payload::Binary(_)) && !namespace.binary {
            return Err(HubError::BinaryNotAllowed);
        }
        if payload.len() > namespace.max_message_size {
            return Err(HubError::MessageTooLarge {
                limit: namespace.max_message_size,
            });
        }
        loop {
            let channel = self.channel(channel_name);
            let mut state = channel.state.lock();
            if state.closed {
                continue;
            }
            state.last_offset += 1;
            let offset = state.last_offset;
            let publication = Arc::new(Publication::new(channel.name.clone(), offset, &payload));
            let policy = channel.namespace.slow_consumer;
            let (mut dropped, mut conflated, mut disconnected) = (0, 0, 0);
            for subscriber in state.subscribers.values() {
                match subscriber.queue.push_publication(
                    &publication,
                    policy,
                    subscriber.latest.as_ref(),
                ) {
                    Pushed::Queued | Pushed::Closed => {}
                    Pushed::DroppedOldest => dropped += 1,
                    Pushed::Conflated => conflated += 1,
                    Pushed::Disconnecting => disconnected += 1,
                }
            }
            let delivered = state.subscribers.len() as u64;
            let namespace = &channel.namespace;
            if namespace.history_size > 0 {
                let now = Instant::now();
                state.history.push_back((now, publication));
                trim_history(&mut state.history, namespace, now);
            }
            let outcome = PublishOutcome {
                offset,
                epoch: state.epoch.clone(),
            };
            let unused = state.subscribers.is_empty() && state.history.is_empty();
            drop(state);

            let metrics = &self.metrics;
            metrics.publications.inc();
            metrics.deliveries_queued.inc_by(delivered);
            if dropped > 0 {
                metrics.dropped.inc_by(dropped);
            }
            if conflated > 0 {
                metrics.conflated.inc_by(conflated);
            }
            if disconnected > 0 {
                metrics.slow_consumer_disconnects.inc_by(disconnected);
            }
            if unused {
                self.remove_if_unused(channel_name);
            }
            return Ok(outcome);
        }
    }

    /// Subscribes a connection, queueing the `reply` (with the channel's current offset and
    /// epoch) before any publication the subscription will receive.
    pub fn subscribe(
        &self,
        channel_name: &str,
        connection: ConnectionId,
        mut subscriber: Subscriber,
        reply_id: u64,
    ) -> Result<(), HubError> {
        if !duplex_proto::is_valid_channel(channel_name) {
            return Err(HubError::InvalidChannel);
        }
        let namespace = self.namespaces.for_channel(channel_name);
        if namespace.subscribe == SubscribeRule::TokenChannels {
            return Err(HubError::PermissionDenied(
                "this namespace needs a token that lists the channel",
            ));
        }
        if namespace.slow_consumer == SlowConsumerPolicy::Latest {
            subscriber.latest = Some(Arc::new(LatestSlot::default()));
        }
        loop {
            let channel = self.channel(channel_name);
            let mut state = channel.state.lock();
            if state.closed {
                continue;
            }
            if state.subscribers.contains_key(&connection) {
                return Err(HubError::AlreadySubscribed);
            }
            let reply = to_json(&Reply {
                id: reply_id,
                result: Subscribed {
                    channel: channel_name.into(),
                    offset: state.last_offset,
                    epoch: (*state.epoch).into(),
                },
            });
            subscriber.queue.push_control(Bytes::from(reply));
            state.subscribers.insert(connection, subscriber);
            self.metrics.subscriptions.inc();
            return Ok(());
        }
    }

    /// Ends a subscription.
    pub fn unsubscribe(
        &self,
        channel_name: &str,
        connection: ConnectionId,
    ) -> Result<(), HubError> {
        let Some(channel) = self.channels.get(channel_name).map(|c| c.clone()) else {
            return Err(HubError::NotSubscribed);
        };
        let mut state = channel.state.lock();
        if state.subscribers.swap_remove(&connection).is_none() {
            return Err(HubError::NotSubscribed);
        }
        self.metrics.subscriptions.dec();
        let unused = state.subscribers.is_empty() && state.history.is_empty();
        drop(state);
        if unused {
            self.remove_if_unused(channel_name);
        }
        Ok(())
    }

    /// How many channels exist.
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    /// Drops expired history and removes channels nobody uses; run periodically.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut unused = Vec::new();
        for entry in &self.channels {
            let channel = entry.value();
            let mut state = channel.state.lock();
            trim_history(&mut state.history, &channel.namespace, now);
            if state.subscribers.is_empty() && state.history.is_empty() {
                unused.push(channel.name.clone());
            }
        }
        for name in unused {
            self.remove_if_unused(&name);
        }
    }
}

/// Keeps at most `history_size` publications, none older than `history_ttl`.
fn trim_history(
    history: &mut VecDeque<(Instant, Arc<Publication>)>,
    namespace: &Namespace,
    now: Instant,
) {
    while history.len() > namespace.history_size {
        history.pop_front();
    }
    let ttl: Duration = namespace.history_ttl;
    while history
        .front()
        .is_some_and(|(at, _)| now.duration_since(*at) > ttl)
    {
        history.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn json(text: &str) -> Payload {
        Payload::Json(RawValue::from_string(text.into()).expect("json"))
    }

    fn hub() -> Hub {
        Hub::new(Namespaces::default(), Metrics::new())
    }

    #[tokio::test]
    async fn subscribers_get_every_publication_in_offset_order_after_the_reply() {
        let hub = hub();
        let queue = Arc::new(OutgoingQueue::new(100));
        let id = ConnectionId(1);
        hub.subscribe("chat:a", id, Subscriber::new(queue.clone()), 7)
            .expect("subscribe");
        for i in 0..3 {
            let outcome = hub
                .publish("chat:a", json(&i.to_string()), Origin::Client)
                .expect("publish");
            assert_eq!(outcome.offset, i + 1);
        }
        let mut batch = VecDeque::new();
        queue.next_batch(&mut batch).await;
        assert!(
            matches!(&batch[0], queue::Outgoing::Control(reply) if reply.starts_with(b"{\"type\":\"reply\",\"id\":7"))
        );
        let offsets: Vec<u64> = batch
            .iter()
            .filter_map(|item| match item {
                queue::Outgoing::Publication(p) => Some(p.offset()),
                _ => None,
            })
            .collect();
        assert_eq!(offsets, vec![1, 2, 3]);
    }

    #[test]
    fn namespace_rules_are_enforced() {
        let hub = hub();
        assert_eq!(
            hub.publish("records:posts", json("1"), Origin::Client),
            Err(HubError::PermissionDenied(
                "only the server publishes in this namespace"
            ))
        );
        assert!(
            hub.publish("records:posts", json("1"), Origin::Server)
                .is_ok()
        );
        assert_eq!(
            hub.publish(
                "chat:a",
                Payload::Binary(Bytes::from_static(b"x")),
                Origin::Client
            ),
            Err(HubError::BinaryNotAllowed)
        );
        assert!(
            hub.publish(
                "stream:a",
                Payload::Binary(Bytes::from_static(b"x")),
                Origin::Client
            )
            .is_ok()
        );
        assert_eq!(
            hub.publish("nocolon", json("1"), Origin::Client),
            Err(HubError::InvalidChannel)
        );
        let big = format!("\"{}\"", "x".repeat(70 * 1024));
        assert!(matches!(
            hub.publish("chat:a", json(&big), Origin::Client),
            Err(HubError::MessageTooLarge { .. })
        ));
    }

    #[test]
    fn channels_without_subscribers_or_history_are_removed() {
        let hub = hub();
        let queue = Arc::new(OutgoingQueue::new(10));
        hub.subscribe(
            "stream:a",
            ConnectionId(1),
            Subscriber::new(queue.clone()),
            1,
        )
        .expect("subscribe");
        assert_eq!(hub.channel_count(), 1);
        assert_eq!(
            hub.subscribe("stream:a", ConnectionId(1), Subscriber::new(queue), 2),
            Err(HubError::AlreadySubscribed)
        );
        hub.unsubscribe("stream:a", ConnectionId(1))
            .expect("unsubscribe");
        assert_eq!(hub.channel_count(), 0);
        assert_eq!(
            hub.unsubscribe("stream:a", ConnectionId(1)),
            Err(HubError::NotSubscribed)
        );
        // A channel with history stays until the history expires.
        hub.publish("chat:a", json("1"), Origin::Client)
            .expect("publish");
        assert_eq!(hub.channel_count(), 1);
    }
}
