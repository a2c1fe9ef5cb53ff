//! The NATS broker: JetStream for publications and history, key-value buckets for epochs,
//! presence and the node registry, and a core subject for everything else.
//!
//! | what | where |
//! |---|---|
//! | publications and history | stream `{p}_channels`, subject `{p}.ch.{hex(channel)}`, headers `Duplex-Offset`, `Duplex-Epoch` |
//! | a channel's epoch before its first publication | bucket `{p}_epochs`, key `hex(channel)` |
//! | a keyed publication's answer, for retries after it left the stream | bucket `{p}_once`, key `{hex(channel)}.{hex(key)}` → `{offset, epoch, digest}`, for the idempotency window |
//! | presence | bucket `{p}_presence`, key `{hex(channel)}.{client}` → `{present, expires_at}` |
//! | node registry | bucket `{p}_nodes`, key = node id, expiring after `presence_ttl` |
//! | presence frames, server requests | core subject `{p}.bus` ([`super::bus`]) |
//!
//! Offsets are allocated without a lock: a publisher reads the channel's last message and
//! publishes with `Nats-Expected-Last-Subject-Sequence` set to it, so of two racing publishers
//! one wins and the other reads again. Every node follows the stream with an ordered push
//! consumer, so all nodes deliver a channel in stream order, and a node that loses its link
//! resumes where it stopped (JetStream keeps what was published meanwhile). Namespaces' history
//! size and TTL are applied when history is read; the stream keeps at most the largest history
//! any namespace asks for, for a day.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use async_nats::{HeaderMap, connection::State};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use super::bus::{Bus, BusLink, new_epoch, now_ms, presence_messages, split_prefix};
use super::{
    Broker, BrokerError, BrokerEvents, BrokerHistory, ChannelLog, HistoryRange, NodeInfo, Once,
    Present, Retention, Stored, Told, UserAnswer, decode_payload, encode_payload,
};
use crate::model::{ClientAnswer, ConnectionId, Payload, RequestError};
use follow::keep_running;

mod follow;

const OFFSET: &str = "Duplex-Offset";
const EPOCH: &str = "Duplex-Epoch";
const EXPECTED_LAST: &str = "Nats-Expected-Last-Subject-Sequence";
/// JetStream's deduplication header: a message whose id the stream saw within its duplicate
/// window is not stored again, and the ack names the first one.
const MSG_ID: &str = "Nats-Msg-Id";
/// How long the stream keeps publications and the epochs bucket an unused epoch.
const KEEP: Duration = Duration::from_secs(24 * 60 * 60);
/// Publishers racing on one channel retry at most this often.
const PUBLISH_ATTEMPTS: usize = 32;
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

fn nats_error(error: impl std::fmt::Display) -> BrokerError {
    BrokerError(error.to_string())
}

fn hex(channel: &str) -> String {
    channel.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(token: &str) -> Option<String> {
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// A keyed publication's answer as the `_once` bucket keeps it.
#[derive(Debug, Serialize, Deserialize)]
struct Answered {
    offset: u64,
    epoch: String,
    digest: String,
}

/// A presence entry as the bucket keeps it.
#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    present: Present,
    expires_at: u64,
}

/// Channels between nodes through NATS with JetStream.
pub struct NatsBroker {
    client: async_nats::Client,
    stream: stream::Stream,
    context: jetstream::Context,
    epochs: kv::Store,
    /// Keyed publications' answers for the idempotency window: JetStream's duplicate window
    /// remembers a key for as long, but the stream may drop the publication sooner (a busy
    /// channel past its history size), and with it the offset a retry must be told.
    once: kv::Store,
    presence: kv::Store,
    nodes: kv::Store,
    prefix: String,
    bus_subject: String,
    node: String,
    presence_ttl: Duration,
    bus: Arc<Bus>,
    /// The last stream sequence this node delivered (at start, the stream's last), to resume
    /// after a broken consumer.
    delivered: AtomicU64,
    /// Bumped each time the client (re)connects: the channel consumer is then made anew at
    /// once, rather than when the old one's heartbeats are found missing.
    connected: tokio::sync::watch::Receiver<u64>,
}

impl std::fmt::Debug for NatsBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBroker")
            .field("prefix", &self.prefix)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// A key-value bucket, made as the client library would make it. The library's own
/// `create_key_value` first reads the account's limits, a reply it cannot parse from NATS 2.9,
/// so the bucket's stream is created directly.
async fn bucket(
    context: &jetstream::Context,
    name: String,
    max_age: Duration,
) -> Result<kv::Store, BrokerError> {
    context
        .get_or_create_stream(stream::Config {
            name: format!("KV_{name}"),
            subjects: vec![format!("$KV.{name}.>")],
            max_messages_per_subject: 1,
            max_age,
            storage: stream::StorageType::File,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            num_replicas: 1,
            // No older duplicate window than the bucket's TTL (NATS refuses a longer one).
            duplicate_window: max_age.min(Duration::from_secs(120)),
            ..Default::default()
        })
        .await
        .map_err(|e| BrokerError(format!("cannot create the bucket {name}: {e}")))?;
    context.get_key_value(&name).await.map_err(nats_error)
}

impl NatsBroker {
    /// Connects and makes sure the stream and buckets exist (failing when NATS cannot be
    /// reached now; later breaks are reconnected by the client).
    pub async fn connect(
        url: &str,
        node: String,
        presence_ttl: Duration,
        max_history: usize,
    ) -> Result<NatsBroker, BrokerError> {
        let (url, prefix) = split_prefix(url)?;
        let (connections, connected) = tokio::sync::watch::channel(0u64);
        let client = async_nats::ConnectOptions::new()
            .event_callback(move |event| {
                if matches!(event, async_nats::Event::Connected) {
                    connections.send_modify(|n| *n += 1);
                }
                std::future::ready(())
            })
            .connection_timeout(Duration::from_secs(2))
            .request_timeout(Some(Duration::from_secs(2)))
            // The client pings a quiet connection this often and drops it after two pings
            // unanswered: a connection that went dark (a NAT or a firewall forgot it) is
            // noticed within about three seconds instead of three minutes.
            .ping_interval(Duration::from_secs(1))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connect(url.as_str())
            .await
            .map_err(nats_error)?;
        // `retry_on_initial_connect` returns at once: wait for the first connection, bounded.
        let first = async {
            while client.connection_state() != State::Connected {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), first)
            .await
            .map_err(|_| BrokerError(format!("cannot connect to {url}")))?;
        let context = jetstream::new(client.clone());
        let stream = context
            .get_or_create_stream(stream::Config {
                name: format!("{prefix}_channels"),
                subjects: vec![format!("{prefix}.ch.>")],
                max_messages_per_subject: i64::try_from(max_history.max(1)).unwrap_or(i64::MAX),
                max_age: KEEP,
                storage: stream::StorageType::File,
                allow_direct: true,
                // How long a publication's idempotency key is remembered (JetStream's
                // default, said here so that it stays the window duplex documents).
                duplicate_window: crate::hub::idempotency::WINDOW,
                ..Default::default()
            })
            .await
            .map_err(nats_error)?;
        // Follow from here on: a consumer made again later resumes after what was delivered.
        let last_sequence = stream.cached_info().state.last_sequence;
        let epochs = bucket(&context, format!("{prefix}_epochs"), KEEP).await?;
        let once = bucket(
            &context,
            format!("{prefix}_once"),
            crate::hub::idempotency::WINDOW,
        )
        .await?;
        let presence = bucket(&context, format!("{prefix}_presence"), presence_ttl * 2).await?;
        let nodes = bucket(&context, format!("{prefix}_nodes"), presence_ttl).await?;
        Ok(NatsBroker {
            client,
            stream,
            context,
            epochs,
            once,
            presence,
            nodes,
            bus_subject: format!("{prefix}.bus"),
            prefix,
            bus: Arc::new(Bus::new(node.clone())),
            node,
            presence_ttl,
            delivered: AtomicU64::new(last_sequence),
            connected,
        })
    }

    fn subject(&self, channel: &str) -> String {
        format!("{}.ch.{}", self.prefix, hex(channel))
    }

    /// The epoch of a channel without publications, the same for every node.
    async fn epoch_of(&self, channel: &str) -> Result<Arc<str>, BrokerError> {
        let key = hex(channel);
        let fresh = new_epoch();
        match self.epochs.create(&key, Bytes::from(fresh.clone())).await {
            Ok(_) => Ok(fresh.into()),
            Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => {
                let value = self.epochs.get(&key).await.map_err(nats_error)?;
                let value = value.ok_or_else(|| BrokerError("an epoch vanished".into()))?;
                Ok(String::from_utf8_lossy(&value).into_owned().into())
            }
            Err(error) => Err(nats_error(error)),
        }
    }

    /// The channel's last message: (stream sequence, offset, epoch), or `None`.
    async fn last(&self, channel: &str) -> Result<Option<(u64, u64, Arc<str>)>, BrokerError> {
        match self
            .stream
            .direct_get_last_for_subject(self.subject(channel))
            .await
        {
            Ok(message) => {
                let (offset, epoch) = position(&message.headers)
                    .ok_or_else(|| BrokerError("a publication without offset".into()))?;
                Ok(Some((message.sequence, offset, epoch)))
            }
            Err(error) if error.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(error) => Err(nats_error(error)),
        }
    }

    async fn entries(&self, channel: &str) -> Result<Vec<(String, u64, Entry)>, BrokerError> {
        let prefix = format!("{}.", hex(channel));
        let mut keys = self.presence.keys().await.map_err(nats_error)?;
        let mut found = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(nats_error)?;
            if !key.starts_with(&prefix) {
                continue;
            }
            if let Some(entry) = self.presence.entry(&key).await.map_err(nats_error)?
                && entry.operation == kv::Operation::Put
                && let Ok(value) = serde_json::from_slice::<Entry>(&entry.value)
            {
                found.push((key, entry.revision, value));
            }
        }
        Ok(found)
    }

    async fn put_presence(&self, channel: &str, present: &Present) -> Result<(), BrokerError> {
        let entry = Entry {
            present: present.clone(),
            expires_at: now_ms() + self.presence_ttl.as_millis() as u64,
        };
        let value = serde_json::to_vec(&entry).map_err(nats_error)?;
        self.presence
            .put(format!("{}.{}", hex(channel), present.client), value.into())
            .await
            .map_err(nats_error)?;
        Ok(())
    }

    async fn heartbeat(&self, events: &Arc<dyn BrokerEvents>) -> Result<(), BrokerError> {
        let info = serde_json::to_vec(&events.node_info()).map_err(nats_error)?;
        self.nodes
            .put(&self.node, info.into())
            .await
            .map_err(nats_error)?;
        let mut channels: Vec<Arc<str>> = Vec::new();
        for (channel, present) in events.local_presence() {
            self.put_presence(&channel, &present).await?;
            channels.push(channel);
        }
        channels.sort();
        channels.dedup();
        for channel in channels {
            self.presence(&channel).await?;
        }
        Ok(())
    }
}

/// Offset and epoch from a publication's headers.
fn position(headers: &HeaderMap) -> Option<(u64, Arc<str>)> {
    let offset = headers.get(OFFSET)?.as_str().parse().ok()?;
    let epoch = headers.get(EPOCH)?.as_str();
    Some((offset, epoch.into()))
}

impl NatsBroker {
    /// Publishes with the next offset (racing publishers retry); with a message id `key`, a
    /// publication the stream already holds under that id within its duplicate window is not
    /// stored again, and its position and digest are read back.
    async fn publish_with(
        &self,
        channel: &str,
        payload: &Payload,
        told: Option<Told>,
        key: Option<(&str, &str)>,
    ) -> Result<Once, BrokerError> {
        let subject = self.subject(channel);
        let body = Bytes::from(encode_payload(payload));
        let msg_id = key.map(|(key, _)| format!("{}.{key}", hex(channel)));
        for _ in 0..PUBLISH_ATTEMPTS {
            let (sequence, offset, epoch) = match self.last(channel).await? {
                Some(last) => last,
                None => (0, 0, self.epoch_of(channel).await?),
            };
            let mut headers = HeaderMap::new();
            headers.insert(EXPECTED_LAST, sequence.to_string().as_str());
            headers.insert(OFFSET, (offset + 1).to_string().as_str());
            headers.insert(EPOCH, &*epoch);
            if let Some(msg_id) = &msg_id {
                headers.insert(MSG_ID, msg_id.as_str());
            }
            let ack = self
                .context
                .publish_with_headers(subject.clone(), headers, body.clone())
                .await
                .map_err(nats_error)?;
            match ack.await {
                Ok(ack) if ack.duplicate => {
                    return self
                        .earlier(channel, key.map_or("", |(key, _)| key), ack.sequence)
                        .await;
                }
                Ok(_) => {
                    if let Some(told) = told {
                        told(offset + 1);
                    }
                    if let Some((key, digest)) = key {
                        self.remember(channel, key, offset + 1, &epoch, digest);
                    }
                    return Ok(Once::Published {
                        offset: offset + 1,
                        epoch,
                    });
                }
                Err(error)
                    if error.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {}
                Err(error) => return Err(nats_error(error)),
            }
        }
        Err(BrokerError(format!(
            "{channel}: too many publishers raced for the next offset"
        )))
    }

    /// The `_once` bucket's key for `key` in `channel`.
    fn once_key(channel: &str, key: &str) -> String {
        format!("{}.{}", hex(channel), hex(key))
    }

    /// Keeps a keyed publication's answer for retries that come after the stream dropped it.
    /// Written after the answer, off its path: until the stream drops the publication (at
    /// least a history's worth of later ones) a retry reads the stream itself.
    fn remember(&self, channel: &str, key: &str, offset: u64, epoch: &str, digest: &str) {
        let answered = Answered {
            offset,
            epoch: epoch.to_owned(),
            digest: digest.to_owned(),
        };
        let value = serde_json::to_vec(&answered).expect("plain fields serialize");
        let (once, entry) = (self.once.clone(), Self::once_key(channel, key));
        tokio::spawn(async move {
            if let Err(error) = once.put(&entry, value.into()).await {
                tracing::warn!(%error, "cannot keep a keyed publication's answer");
            }
        });
    }

    /// The earlier publication of an idempotency key, which the stream names by `sequence`:
    /// read from the stream, or from the `_once` bucket once the stream dropped it.
    async fn earlier(&self, channel: &str, key: &str, sequence: u64) -> Result<Once, BrokerError> {
        match self.stream.direct_get(sequence).await {
            Ok(message) => {
                let (offset, epoch) = position(&message.headers).ok_or_else(|| {
                    BrokerError(format!("stream message {sequence} has no position"))
                })?;
                return Ok(Once::Earlier {
                    offset,
                    epoch,
                    digest: crate::hub::idempotency::digest_of_body(&message.payload),
                });
            }
            Err(error) if error.kind() == jetstream::stream::DirectGetErrorKind::NotFound => {}
            Err(error) => return Err(nats_error(error)),
        }
        let kept = self
            .once
            .get(Self::once_key(channel, key))
            .await
            .map_err(nats_error)?
            .ok_or_else(|| {
                BrokerError(
                    "the publication this idempotency key names has left history and its \
                     answer was not kept"
                        .into(),
                )
            })?;
        let answered: Answered = serde_json::from_slice(&kept)
            .map_err(|e| BrokerError(format!("a kept answer does not read: {e}")))?;
        Ok(Once::Earlier {
            offset: answered.offset,
            epoch: answered.epoch.into(),
            digest: answered.digest,
        })
    }
}

#[async_trait]
impl BusLink for NatsBroker {
    async fn send(&self, message: Vec<u8>) -> Result<(), BrokerError> {
        self.client
            .publish(self.bus_subject.clone(), message.into())
            .await
            .map_err(nats_error)
    }
}

#[async_trait]
impl Broker for NatsBroker {
    async fn run(self: Arc<Self>, events: Arc<dyn BrokerEvents>, shutdown: CancellationToken) {
        let heartbeat = async {
            let mut interval = tokio::time::interval(self.presence_ttl / 3);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    _ = interval.tick() => {
                        if let Err(error) = self.heartbeat(&events).await {
                            tracing::warn!(%error, "broker heartbeat failed");
                        }
                    }
                }
            }
            if let Err(error) = self.nodes.purge(&self.node).await {
                tracing::debug!(%error, "could not deregister the node");
            }
        };
        let channels = keep_running("NATS channel consumer broke", &shutdown, || {
            self.follow(&events, &shutdown)
        });
        let bus = keep_running("NATS bus subscription broke", &shutdown, || {
            self.follow_bus(&events, &shutdown)
        });
        tokio::join!(heartbeat, channels, bus);
    }

    async fn publish_once(
        &self,
        channel: &str,
        payload: &Payload,
        _retention: Retention,
        told: Option<Told>,
        key: &str,
        digest: &str,
    ) -> Result<Once, BrokerError> {
        self.publish_with(channel, payload, told, Some((key, digest)))
            .await
    }

    fn node_id(&self) -> &str {
        &self.node
    }

    async fn positions(
        &self,
        channels: &[Arc<str>],
    ) -> Result<Vec<Option<(u64, Arc<str>)>>, BrokerError> {
        let mut positions = Vec::with_capacity(channels.len());
        for channel in channels {
            positions.push(match self.last(channel).await? {
                Some((_, offset, epoch)) => Some((offset, epoch)),
                None => self
                    .epochs
                    .get(hex(channel))
                    .await
                    .map_err(nats_error)?
                    .map(|epoch| (0, String::from_utf8_lossy(&epoch).into_owned().into())),
            });
        }
        Ok(positions)
    }

    async fn join(&self, channel: &str, present: &Present) -> Result<(), BrokerError> {
        self.put_presence(channel, present).await?;
        let (join, _) = presence_messages(channel, present)?;
        self.send(join).await
    }

    async fn leave(&self, channel: &str, client: ConnectionId) -> Result<(), BrokerError> {
        let key = format!("{}.{client}", hex(channel));
        let Some(entry) = self.presence.entry(&key).await.map_err(nats_error)? else {
            return Ok(());
        };
        if entry.operation != kv::Operation::Put {
            return Ok(());
        }
        // Whoever deletes the entry sends the `leave`, once.
        if self
            .presence
            .delete_expect_revision(&key, Some(entry.revision))
            .await
            .is_ok()
            && let Ok(value) = serde_json::from_slice::<Entry>(&entry.value)
        {
            let (_, leave) = presence_messages(channel, &value.present)?;
            self.send(leave).await?;
        }
        Ok(())
    }

    async fn presence(&self, channel: &str) -> Result<Vec<Present>, BrokerError> {
        let now = now_ms();
        let mut present = Vec::new();
        for (key, revision, entry) in self.entries(channel).await? {
            if entry.expires_at > now {
                present.push(entry.present);
                continue;
            }
            // Expired (its node stopped refreshing it): whoever deletes it sends the `leave`.
            if self
                .presence
                .delete_expect_revision(&key, Some(revision))
                .await
                .is_ok()
            {
                let (_, leave) = presence_messages(channel, &entry.present)?;
                self.send(leave).await?;
            }
        }
        present.sort_by(|a, b| a.client.cmp(&b.client));
        Ok(present)
    }

    async fn request(
        &self,
        client: ConnectionId,
        data: &RawValue,
        timeout: Duration,
    ) -> Result<ClientAnswer, RequestError> {
        let nodes = self.nodes().await;
        self.bus.request(self, nodes, client, data, timeout).await
    }

    async fn request_user(
        &self,
        user: &str,
        data: &RawValue,
        timeout: Duration,
    ) -> Result<Vec<UserAnswer>, BrokerError> {
        let nodes = self.nodes().await;
        self.bus
            .request_user(self, nodes, user, data, timeout)
            .await
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, BrokerError> {
        let mut keys = self.nodes.keys().await.map_err(nats_error)?;
        let mut nodes = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(nats_error)?;
            if let Some(value) = self.nodes.get(&key).await.map_err(nats_error)?
                && let Ok(node) = serde_json::from_slice::<NodeInfo>(&value)
            {
                nodes.push(node);
            }
        }
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes)
    }

    async fn ready(&self) -> Result<(), BrokerError> {
        if self.client.connection_state() != State::Connected {
            return Err(BrokerError("not connected to NATS".into()));
        }
        self.client.flush().await.map_err(nats_error)
    }
}

#[async_trait]
impl ChannelLog for NatsBroker {
    async fn publish(
        &self,
        channel: &str,
        payload: &Payload,
        _retention: Retention,
        told: Option<Told>,
    ) -> Result<(u64, Arc<str>), BrokerError> {
        match self.publish_with(channel, payload, told, None).await? {
            Once::Published { offset, epoch } => Ok((offset, epoch)),
            Once::Earlier { .. } => Err(BrokerError(
                "the stream took a publication without a message id as a duplicate".into(),
            )),
        }
    }

    async fn history(
        &self,
        channel: &str,
        range: HistoryRange,
        retention: Retention,
    ) -> Result<BrokerHistory, BrokerError> {
        let Some((last_sequence, top, epoch)) = self.last(channel).await? else {
            return Ok(BrokerHistory {
                top: 0,
                epoch: self.epoch_of(channel).await?,
                oldest: None,
                publications: Vec::new(),
            });
        };
        if range == HistoryRange::None {
            // Only the position; `oldest` matters only with `since`, which reads a range.
            return Ok(BrokerHistory {
                top,
                epoch,
                oldest: Some(top),
                publications: Vec::new(),
            });
        }
        // The namespace's size and TTL, applied here.
        let floor = top.saturating_sub(retention.size as u64) + 1;
        let born_after = time::OffsetDateTime::now_utc() - retention.ttl;
        let subject = self.subject(channel);
        let mut kept: Vec<Stored> = Vec::new();
        let mut next = None;
        loop {
            let message = match self
                .stream
                .direct_get_next_for_subject(subject.clone(), next)
                .await
            {
                Ok(message) => message,
                Err(error) if error.kind() == stream::DirectGetErrorKind::NotFound => break,
                Err(error) => return Err(nats_error(error)),
            };
            let sequence = message.sequence;
            if let Some((offset, _)) = position(&message.headers)
                && offset >= floor
                && message.time >= born_after
                && let Some(payload) = decode_payload(&message.payload)
            {
                kept.push(Stored { offset, payload });
            }
            if sequence >= last_sequence {
                break;
            }
            next = Some(sequence + 1);
        }
        let oldest = kept.first().map(|s| s.offset);
        let publications = match range {
            HistoryRange::None => Vec::new(),
            HistoryRange::After { offset, limit } => kept
                .into_iter()
                .filter(|s| s.offset > offset)
                .take(limit)
                .collect(),
            HistoryRange::Last(limit) => {
                let skip = kept.len().saturating_sub(limit);
                kept.into_iter().skip(skip).collect()
            }
        };
        Ok(BrokerHistory {
            top,
            epoch,
            oldest,
            publications,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_become_subject_tokens_and_back() {
        for channel in ["chat:lobby", "a.b:c*d>e", "x:ünï"] {
            let token = hex(channel);
            assert!(token.chars().all(|c| c.is_ascii_hexdigit()));
            assert_eq!(unhex(&token).as_deref(), Some(channel));
        }
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("6"), None);
    }
}
