//! The broker between nodes: what lets several duplex servers behind a load balancer serve the
//! same channels.
//!
//! With the default `memory` broker there is no [`Broker`] at all: the hub allocates offsets,
//! keeps history and presence in process, exactly as one node needs. With an external broker
//! (`--broker redis://…`) the hub hands these jobs to it:
//!
//! - a publication is sent to the broker, which allocates its offset and the channel's epoch
//!   atomically, appends it to the channel's history and broadcasts it; every node (the
//!   publisher's own included) fans out what it receives from the broker, so all nodes deliver
//!   every channel in the same order and a publication reaches each subscriber once;
//! - history and recovery (`since`) read the broker's history;
//! - presence lives in the broker with an expiry that live nodes refresh, so a dead node's
//!   clients disappear;
//! - server → client requests for a connection on another node travel through the broker;
//! - each node registers itself with a heartbeat (`GET /api/nodes`).
//!
//! A broker reports to the hub through [`BrokerEvents`]. The hub's code is the same for every
//! engine: one implementation of the trait per engine.

pub(crate) mod bus;
pub mod nats;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::future::BoxFuture;

use serde_json::value::RawValue;

use crate::model::{ClientAnswer, ConnectionId, Payload, RequestError};
pub use crate::model::{NodeInfo, Present, UserAnswer};

/// The broker failed or cannot be reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the broker is unavailable: {0}")]
pub struct BrokerError(pub String);

/// How long and how much of a channel's history the broker keeps (from its namespace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Publications kept (at least one: the latest, for pollers and `since` = last offset).
    pub size: usize,
    /// How long history lives after the channel's last publication.
    pub ttl: Duration,
    /// Bytes of payload kept (the newest publication always stays); the store honours it, the
    /// brokers keep `size` publications.
    pub bytes: usize,
}

/// A publication as the broker stored it.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Its offset.
    pub offset: u64,
    /// What it carries.
    pub payload: Payload,
}

/// A channel's position and the part of its history asked for.
#[derive(Debug, Clone)]
pub struct BrokerHistory {
    /// The channel's last offset.
    pub top: u64,
    /// The channel's epoch.
    pub epoch: Arc<str>,
    /// The offset of the oldest publication still kept, if any.
    pub oldest: Option<u64>,
    /// The publications asked for, in offset order.
    pub publications: Vec<Stored>,
}

/// Which part of a channel's history to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryRange {
    /// None: only the channel's position.
    None,
    /// The first `limit` publications after `offset`.
    After {
        /// Exclusive start.
        offset: u64,
        /// At most this many.
        limit: usize,
    },
    /// The last `limit` publications.
    Last(usize),
}

/// Called with a publication's offset as soon as it has one (see [`ChannelLog::publish`]).
pub type Told = Box<dyn FnOnce(u64) + Send>;

/// What a publish with an idempotency key did ([`Broker::publish_once`], or
/// [`ChannelLog::publish_keyed`] for the store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Once {
    /// It published.
    Published {
        /// The publication's offset.
        offset: u64,
        /// The channel's epoch.
        epoch: Arc<str>,
    },
    /// The key named a publication in this channel within its window: nothing was published.
    Earlier {
        /// That publication's offset.
        offset: u64,
        /// Its epoch.
        epoch: Arc<str>,
        /// The digest of what it carried (to tell a retry from another publication).
        digest: String,
    },
}

/// What a broker tells the hub of its node.
pub trait BrokerEvents: Send + Sync + 'static {
    /// A publication, in offset order per channel, from any node.
    fn deliver(&self, channel: &str, offset: u64, epoch: &str, payload: Payload);
    /// A presence frame (`join`/`leave`) for the local subscribers of `channel` other than
    /// `except`.
    fn presence_event(&self, channel: &str, except: ConnectionId, frame: Bytes);
    /// The broker link came back after a break: publications may have been missed.
    fn reconnected(&self);
    /// Asks a connection of this node and waits for its answer; `None` when the connection is
    /// not here.
    fn ask_local(
        &self,
        id: ConnectionId,
        data: Box<RawValue>,
        timeout: Duration,
    ) -> Option<BoxFuture<'static, Result<ClientAnswer, RequestError>>>;
    /// Asks every connection of this node whose token named `user`: one future per connection,
    /// each with the connection's id and its answer.
    fn ask_local_user(
        &self,
        user: &str,
        data: Arc<RawValue>,
        timeout: Duration,
    ) -> Vec<BoxFuture<'static, UserAnswer>>;
    /// Every (channel, client) pair this node holds presence for.
    fn local_presence(&self) -> Vec<(Arc<str>, Present)>;
    /// This node's description for the registry.
    fn node_info(&self) -> NodeInfo;
}

/// Where channels' offsets, epochs and history live when not in this process's memory: a
/// broker (for every namespace, across nodes), or the store (on one node, for the namespaces
/// whose history survives a restart: `history_storage = "store"`). The hub's code for either
/// is the same: it publishes through the log, reads history and recovers from it, and fans out
/// what the log delivers ([`BrokerEvents::deliver`]) in offset order.
#[async_trait]
pub trait ChannelLog: Send + Sync + std::fmt::Debug + 'static {
    /// Publishes: allocates the next offset (and the epoch) atomically, stores the publication
    /// in history and has it delivered to every node's hub (a broker broadcasts it; the store
    /// hands it to this node's hub after its commit, before this returns).
    ///
    /// `told` is called with the offset once the publication has one: by the store in the
    /// channel's order (what it records, such as a webhook's `published` event, is in that
    /// order), by a broker once it answered.
    async fn publish(
        &self,
        channel: &str,
        payload: &Payload,
        retention: Retention,
        told: Option<Told>,
    ) -> Result<(u64, Arc<str>), BrokerError>;

    /// [`publish`](Self::publish) with an idempotency `key` (and the payload's
    /// [`crate::hub::idempotency`] digest), for a log without a broker in front of it. A log
    /// that outlives the process (the store) keeps the key with the publication, in the same
    /// commit, for [`crate::hub::idempotency::WINDOW`], and a key it still keeps answers
    /// [`Once::Earlier`] with nothing published: retries are then recognised across a restart.
    /// By default the key is not kept (the hub's memory of keys is all there is).
    #[allow(clippy::too_many_arguments)]
    async fn publish_keyed(
        &self,
        channel: &str,
        payload: &Payload,
        retention: Retention,
        told: Option<Told>,
        key: &str,
        digest: &str,
    ) -> Result<Once, BrokerError> {
        let _ = (key, digest);
        let (offset, epoch) = self.publish(channel, payload, retention, told).await?;
        Ok(Once::Published { offset, epoch })
    }

    /// A channel's position and part of its history (kept as `retention` says). A channel
    /// the log does not know gets a fresh epoch here, so that every reader agrees on it.
    async fn history(
        &self,
        channel: &str,
        range: HistoryRange,
        retention: Retention,
    ) -> Result<BrokerHistory, BrokerError>;
}

/// An engine that carries channels between nodes.
#[async_trait]
pub trait Broker: ChannelLog {
    /// Runs the broker's links (subscription, heartbeats) until `shutdown`, reporting to
    /// `events`. Reconnects with backoff on its own.
    async fn run(
        self: Arc<Self>,
        events: Arc<dyn BrokerEvents>,
        shutdown: tokio_util::sync::CancellationToken,
    );

    /// [`ChannelLog::publish`] unless `key` named a publication in `channel` within
    /// [`crate::hub::idempotency::WINDOW`]: then that publication's position, and nothing is
    /// published. The check and the publication are one step in the broker, so a retry that
    /// reaches another node (or races the first attempt) is recognised. `digest` is the
    /// payload's [`crate::hub::idempotency`] digest, kept with the key. `told` is called only
    /// when it published.
    #[allow(clippy::too_many_arguments)]
    async fn publish_once(
        &self,
        channel: &str,
        payload: &Payload,
        retention: Retention,
        told: Option<Told>,
        key: &str,
        digest: &str,
    ) -> Result<Once, BrokerError>;

    /// This node's id.
    fn node_id(&self) -> &str;

    /// The channels' current positions (offset, epoch), `None` for channels the broker has lost.
    async fn positions(
        &self,
        channels: &[Arc<str>],
    ) -> Result<Vec<Option<(u64, Arc<str>)>>, BrokerError>;

    /// Adds a client to a channel's presence and tells every node's subscribers (`join`).
    async fn join(&self, channel: &str, present: &Present) -> Result<(), BrokerError>;

    /// Removes a client from a channel's presence and tells every node's subscribers.
    async fn leave(&self, channel: &str, client: ConnectionId) -> Result<(), BrokerError>;

    /// Who is in a channel, on every node; entries past their expiry are removed (and their
    /// `leave` sent) first.
    async fn presence(&self, channel: &str) -> Result<Vec<Present>, BrokerError>;

    /// Asks a connection on another node and waits for its answer.
    async fn request(
        &self,
        client: ConnectionId,
        data: &RawValue,
        timeout: Duration,
    ) -> Result<ClientAnswer, RequestError>;

    /// Asks every connection of `user` on the other nodes; each answer with its client id.
    async fn request_user(
        &self,
        user: &str,
        data: &RawValue,
        timeout: Duration,
    ) -> Result<Vec<UserAnswer>, BrokerError>;

    /// The live nodes.
    async fn nodes(&self) -> Result<Vec<NodeInfo>, BrokerError>;

    /// Whether the broker answers now.
    async fn ready(&self) -> Result<(), BrokerError>;
}

/// Opens the broker a `--broker` URL names; `memory` (or nothing) means none.
/// `max_history` is the largest history any namespace keeps.
pub async fn open(
    url: &str,
    node_id: String,
    presence_ttl: Duration,
    max_history: usize,
) -> Result<Option<Arc<dyn Broker>>, BrokerError> {
    if url.is_empty() || url == "memory" {
        return Ok(None);
    }
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        let broker = redis::RedisBroker::connect(url, node_id, presence_ttl).await?;
        return Ok(Some(Arc::new(broker)));
    }
    if url.starts_with("nats://") {
        let broker = nats::NatsBroker::connect(url, node_id, presence_ttl, max_history).await?;
        return Ok(Some(Arc::new(broker)));
    }
    Err(BrokerError(format!(
        "unknown broker {url:?}: use memory, redis://host:port or nats://host:port"
    )))
}

/// The wire form of a payload between nodes: a kind byte (`j` JSON, `b` bytes), then the
/// payload as it is.
pub(crate) fn encode_payload(payload: &Payload) -> Vec<u8> {
    let mut body = Vec::with_capacity(1 + payload.len());
    match payload {
        Payload::Json(raw) => {
            body.push(b'j');
            body.extend_from_slice(raw.get().as_bytes());
        }
        Payload::Binary(bytes) => {
            body.push(b'b');
            body.extend_from_slice(bytes);
        }
    }
    body
}

/// Reads what [`encode_payload`] wrote.
pub(crate) fn decode_payload(body: &[u8]) -> Option<Payload> {
    let (&kind, rest) = body.split_first()?;
    match kind {
        b'j' => {
            let text = std::str::from_utf8(rest).ok()?;
            RawValue::from_string(text.to_owned())
                .ok()
                .map(Payload::Json)
        }
        b'b' => Some(Payload::Binary(Bytes::copy_from_slice(rest))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_cross_between_nodes_unchanged() {
        let json = Payload::Json(RawValue::from_string("{\"a\":[1,2]}".into()).expect("json"));
        let Some(Payload::Json(back)) = decode_payload(&encode_payload(&json)) else {
            panic!("json comes back as json");
        };
        assert_eq!(back.get(), "{\"a\":[1,2]}");
        let bytes = Payload::Binary(Bytes::from_static(&[0, 255, 10]));
        let Some(Payload::Binary(back)) = decode_payload(&encode_payload(&bytes)) else {
            panic!("bytes come back as bytes");
        };
        assert_eq!(&back[..], &[0, 255, 10]);
        assert!(decode_payload(b"").is_none());
        assert!(decode_payload(b"x1").is_none());
        assert!(decode_payload(b"j{").is_none());
    }
}
