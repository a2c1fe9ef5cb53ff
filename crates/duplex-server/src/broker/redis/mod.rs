//! The Redis broker.
//!
//! Keys (all under the URL's `prefix`, default `duplex`):
//!
//! | key | type | what |
//! |---|---|---|
//! | `{p}:h:{channel}:meta` | hash `epoch`, `top` | the channel's epoch and last offset |
//! | `{p}:h:{channel}:log` | stream, ids `{offset}-0`, field `d` | history, `MAXLEN` and TTL from the namespace |
//! | `{p}:p:{channel}` | hash client → JSON | presence |
//! | `{p}:p:{channel}:exp` | sorted set client → expiry (ms) | presence expiry, refreshed by live nodes |
//! | `{p}:p:{channel}:leave` | hash client → bus message | the `leave` to send when the entry goes |
//! | `{p}:i:{channel}:{key}` | string `offset:epoch:digest`, expires | a publication's idempotency key |
//! | `{p}:nodes` | sorted set node → last heartbeat (ms) | the node registry |
//! | `{p}:node:{id}` | string, JSON, expires | a node's description |
//!
//! Everything between nodes travels on one pub/sub channel, `{p}:bus`, as messages whose first
//! byte says what they are: `p` a publication (`p{offset}:{epoch}:` then the body written by
//! [`publication_body`]), `e` a presence frame, `q` a server request for a connection on some
//! node, `a` its answer. Publishing is one Lua script, so offset allocation, the history append
//! and the broadcast happen atomically and in the same order for every node; pub/sub loses
//! what is sent while a node's link is down, which the node notices (a gap in offsets, or the
//! link coming back) and repairs from history by having its subscribers recover.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use super::bus::{
    Bus, BusLink, jitter_ms, new_epoch, now_ms, presence_messages, split_channel, split_prefix,
};
use super::{
    Broker, BrokerError, BrokerEvents, BrokerHistory, ChannelLog, HistoryRange, NodeInfo, Once,
    Present, Retention, Stored, Told, UserAnswer, decode_payload, encode_payload,
};
use crate::model::{ClientAnswer, ConnectionId, Payload, RequestError};
use scripts::Scripts;

mod scripts;

/// How long a channel's epoch and last offset outlive its last publication.
const META_TTL_SECONDS: u64 = 24 * 60 * 60;
/// Backoff between attempts to re-establish the pub/sub link. Short at its longest: while the
/// link is down this node's subscribers miss what others publish (they recover once it is
/// back), so it comes back within about a second of Redis answering again. An attempt is one
/// connection and a `SUBSCRIBE`: a few a second cost a Redis nothing.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(1);

/// How often the pub/sub link is asked for a `PING` while it is quiet, and how long its answer
/// may take: a link that went dark (a NAT or a firewall forgot it; nothing ever arrives, no
/// reset either) would otherwise wait for messages for ever while the other nodes publish.
const LINK_PING_EVERY: Duration = Duration::from_secs(1);
const LINK_PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Channels, history, presence and requests between nodes through Redis.
pub struct RedisBroker {
    client: redis::Client,
    /// Commands' connection: replaced when the link goes dark (see [`RedisBroker::renew`]).
    connection: parking_lot::RwLock<ConnectionManager>,
    config: ConnectionManagerConfig,
    prefix: String,
    bus: String,
    node: String,
    presence_ttl: Duration,
    scripts: Scripts,
    bus_state: Arc<Bus>,
    /// Whether the pub/sub link is up.
    linked: AtomicBool,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("prefix", &self.prefix)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

fn broker_error(error: redis::RedisError) -> BrokerError {
    BrokerError(error.to_string())
}

/// `u16 channel length | channel | payload kind | payload`: what a `p` message carries after
/// its offset and epoch, and what history stores.
fn publication_body(channel: &str, payload: &Payload) -> Vec<u8> {
    let mut body = Vec::with_capacity(3 + channel.len() + payload.len());
    let len = u16::try_from(channel.len()).unwrap_or(u16::MAX);
    body.extend_from_slice(&len.to_be_bytes());
    body.extend_from_slice(&channel.as_bytes()[..usize::from(len)]);
    body.extend_from_slice(&encode_payload(payload));
    body
}

impl RedisBroker {
    /// Connects (failing when Redis cannot be reached now; later breaks are reconnected).
    pub async fn connect(
        url: &str,
        node: String,
        presence_ttl: Duration,
    ) -> Result<RedisBroker, BrokerError> {
        let (url, prefix) = split_prefix(url)?;
        let client = redis::Client::open(url.as_str()).map_err(broker_error)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let connection = client
            .get_connection_manager_with_config(config.clone())
            .await
            .map_err(broker_error)?;
        Ok(RedisBroker {
            client,
            connection: parking_lot::RwLock::new(connection),
            config,
            bus: format!("{prefix}:bus"),
            prefix,
            node: node.clone(),
            presence_ttl,
            scripts: Scripts::new(),
            bus_state: Arc::new(Bus::new(node.clone())),
            linked: AtomicBool::new(false),
        })
    }

    /// The commands' connection (a handle: cheap to clone, shared by every command).
    fn connection(&self) -> ConnectionManager {
        self.connection.read().clone()
    }

    /// Replaces the commands' connection with a new one. Its manager reconnects by itself when
    /// the connection breaks, but not when it goes dark (a NAT or a firewall forgot it: no
    /// reset, no close): every command then times out, for as long as TCP takes to give up on
    /// it (many minutes). Called when the pub/sub link stops answering its pings or a heartbeat
    /// fails; commands in flight finish on the old one.
    async fn renew(&self) {
        let made = tokio::time::timeout(
            LINK_PING_TIMEOUT,
            self.client
                .get_connection_manager_with_config(self.config.clone()),
        )
        .await;
        match made {
            Ok(Ok(connection)) => *self.connection.write() = connection,
            Ok(Err(error)) => tracing::debug!(%error, "cannot renew the commands' connection yet"),
            Err(_) => tracing::debug!("cannot renew the commands' connection yet: no answer"),
        }
    }

    fn idempotency_key(&self, channel: &str, key: &str) -> String {
        format!("{}:i:{channel}:{key}", self.prefix)
    }

    /// Runs the publish script, with an idempotency key (and its digest) when given: the
    /// script's answer, `(offset, epoch)` or `(0, "offset:epoch:digest")` of an earlier one.
    async fn run_publish(
        &self,
        channel: &str,
        payload: &Payload,
        retention: Retention,
        key: Option<(&str, &str)>,
    ) -> Result<(u64, String), BrokerError> {
        let mut invocation = self.scripts.publish.prepare_invoke();
        invocation
            .key(self.meta_key(channel))
            .key(self.log_key(channel))
            .arg(&self.bus)
            .arg(publication_body(channel, payload))
            .arg(retention.size)
            .arg(retention.ttl.as_millis() as u64)
            .arg(META_TTL_SECONDS)
            .arg(new_epoch());
        if let Some((key, digest)) = key {
            invocation
                .key(self.idempotency_key(channel, key))
                .arg(digest)
                .arg(crate::hub::idempotency::WINDOW.as_millis() as u64);
        }
        invocation
            .invoke_async(&mut self.connection())
            .await
            .map_err(broker_error)
    }

    fn meta_key(&self, channel: &str) -> String {
        format!("{}:h:{channel}:meta", self.prefix)
    }

    fn log_key(&self, channel: &str) -> String {
        format!("{}:h:{channel}:log", self.prefix)
    }

    fn presence_keys(&self, channel: &str) -> [String; 3] {
        let base = format!("{}:p:{channel}", self.prefix);
        [base.clone(), format!("{base}:exp"), format!("{base}:leave")]
    }

    fn nodes_key(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    fn node_key(&self, id: &str) -> String {
        format!("{}:node:{id}", self.prefix)
    }

    async fn join_with(
        &self,
        channel: &str,
        present: &Present,
        announce: bool,
    ) -> Result<(), BrokerError> {
        let info = serde_json::to_string(present).map_err(|e| BrokerError(e.to_string()))?;
        let (join, leave) = presence_messages(channel, present)?;
        let join = if announce { join } else { Vec::new() };
        let keys = self.presence_keys(channel);
        let mut invocation = self.scripts.join.prepare_invoke();
        for key in &keys {
            invocation.key(key);
        }
        invocation
            .arg(&present.client)
            .arg(info)
            .arg(leave)
            .arg(self.presence_ttl.as_millis() as u64)
            .arg(&self.bus)
            .arg(join);
        let _: i64 = invocation
            .invoke_async(&mut self.connection())
            .await
            .map_err(broker_error)?;
        Ok(())
    }

    /// Registers this node, refreshes its clients' presence and sends the `leave` of entries
    /// that expired (a dead node's clients) in the channels this node follows.
    async fn heartbeat(&self, events: &Arc<dyn BrokerEvents>) -> Result<(), BrokerError> {
        let info =
            serde_json::to_string(&events.node_info()).map_err(|e| BrokerError(e.to_string()))?;
        let ttl = self.presence_ttl.as_millis() as u64;
        let now = now_ms();
        let mut connection = self.connection();
        redis::pipe()
            .zadd(self.nodes_key(), &self.node, now)
            .ignore()
            .pset_ex(self.node_key(&self.node), info, ttl)
            .ignore()
            .zrembyscore(self.nodes_key(), "-inf", now.saturating_sub(ttl))
            .ignore()
            .query_async::<()>(&mut connection)
            .await
            .map_err(broker_error)?;
        let present = events.local_presence();
        let mut channels: Vec<Arc<str>> = Vec::new();
        for (channel, present) in &present {
            self.join_with(channel, present, false).await?;
            if channels.last() != Some(channel) {
                channels.push(channel.clone());
            }
        }
        channels.dedup();
        for channel in channels {
            self.presence(&channel).await?;
        }
        Ok(())
    }

    async fn deregister(&self) {
        let mut connection = self.connection();
        let result = redis::pipe()
            .zrem(self.nodes_key(), &self.node)
            .ignore()
            .del(self.node_key(&self.node))
            .ignore()
            .query_async::<()>(&mut connection)
            .await;
        if let Err(error) = result {
            tracing::debug!(%error, "could not deregister the node");
        }
    }

    /// One bus message: a publication, or what [`Bus`] handles.
    fn on_message(
        self: &Arc<Self>,
        link: &Arc<dyn BusLink>,
        events: &Arc<dyn BrokerEvents>,
        message: &[u8],
    ) {
        if let Some(rest) = message.strip_prefix(b"p") {
            match parse_publication(rest) {
                Some((offset, epoch, channel, payload)) => {
                    events.deliver(channel, offset, epoch, payload);
                }
                None => tracing::warn!("unreadable publication on the broker bus"),
            }
        } else if !self.bus_state.on_message(link, events, message) {
            tracing::warn!("unknown message on the broker bus");
        }
    }

    /// Holds the pub/sub link until it breaks or shutdown; true on shutdown.
    async fn follow(
        self: &Arc<Self>,
        events: &Arc<dyn BrokerEvents>,
        shutdown: &CancellationToken,
        linked_before: bool,
    ) -> Result<bool, BrokerError> {
        let pubsub = tokio::time::timeout(LINK_PING_TIMEOUT, async {
            let mut pubsub = self.client.get_async_pubsub().await?;
            pubsub.subscribe(&self.bus).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await
        .map_err(|_| BrokerError("the pub/sub link did not answer".into()))?
        .map_err(broker_error)?;
        self.linked.store(true, Ordering::Release);
        if linked_before {
            tracing::info!("broker link restored");
            events.reconnected();
        }
        let (mut sink, mut messages) = pubsub.split();
        let link: Arc<dyn BusLink> = self.clone();
        let quiet = tokio::time::sleep(LINK_PING_EVERY);
        tokio::pin!(quiet);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(true),
                message = messages.next() => match message {
                    Some(message) => {
                        self.on_message(&link, events, message.get_payload_bytes());
                        quiet.as_mut().reset(tokio::time::Instant::now() + LINK_PING_EVERY);
                    }
                    None => return Err(BrokerError("the pub/sub link closed".into())),
                },
                () = &mut quiet => {
                    // Messages meanwhile wait in the link's buffer; a live link answers in
                    // well under a millisecond.
                    match tokio::time::timeout(LINK_PING_TIMEOUT, sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(error)) => return Err(broker_error(error)),
                        Err(_) => {
                            return Err(BrokerError(format!(
                                "the pub/sub link did not answer a PING within {LINK_PING_TIMEOUT:?}"
                            )));
                        }
                    }
                    quiet.as_mut().reset(tokio::time::Instant::now() + LINK_PING_EVERY);
                }
            }
        }
    }
}

#[async_trait]
impl BusLink for RedisBroker {
    async fn send(&self, message: Vec<u8>) -> Result<(), BrokerError> {
        let _: i64 = self
            .connection()
            .publish(&self.bus, message)
            .await
            .map_err(broker_error)?;
        Ok(())
    }
}

/// The wait after `delay` between two attempts to link.
fn next_delay(delay: Duration) -> Duration {
    (delay * 2).min(RECONNECT_MAX)
}

/// `{offset}:{epoch}:{body}` → offset, epoch, channel, payload.
fn parse_publication(rest: &[u8]) -> Option<(u64, &str, &str, Payload)> {
    let colon = rest.iter().position(|&b| b == b':')?;
    let offset: u64 = std::str::from_utf8(&rest[..colon]).ok()?.parse().ok()?;
    let rest = &rest[colon + 1..];
    let colon = rest.iter().position(|&b| b == b':')?;
    let epoch = std::str::from_utf8(&rest[..colon]).ok()?;
    let (channel, payload) = split_channel(&rest[colon + 1..])?;
    Some((offset, epoch, channel, decode_payload(payload)?))
}

/// An idempotency entry `offset:epoch:digest` → [`Once::Earlier`].
fn parse_earlier(entry: &str) -> Option<Once> {
    let mut parts = entry.splitn(3, ':');
    let offset = parts.next()?.parse().ok()?;
    let epoch = parts.next()?;
    let digest = parts.next()?;
    Some(Once::Earlier {
        offset,
        epoch: epoch.into(),
        digest: digest.to_owned(),
    })
}

/// A stream entry id `{offset}-0` → offset.
fn entry_offset(id: &str) -> Option<u64> {
    id.split('-').next()?.parse().ok()
}

type Entry = (String, Vec<Vec<u8>>);

#[async_trait]
impl Broker for RedisBroker {
    async fn run(self: Arc<Self>, events: Arc<dyn BrokerEvents>, shutdown: CancellationToken) {
        let heartbeat = {
            let broker = self.clone();
            let events = events.clone();
            let shutdown = shutdown.clone();
            async move {
                let mut interval = tokio::time::interval(broker.presence_ttl / 3);
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        _ = interval.tick() => {
                            if let Err(error) = broker.heartbeat(&events).await {
                                tracing::warn!(%error, "broker heartbeat failed");
                                broker.renew().await;
                            }
                        }
                    }
                }
                broker.deregister().await;
            }
        };
        let link = async {
            let mut delay = RECONNECT_MIN;
            let mut linked_before = false;
            loop {
                match self.follow(&events, &shutdown, linked_before).await {
                    Ok(true) => return,
                    Ok(false) => {}
                    Err(error) => {
                        if self.linked.swap(false, Ordering::AcqRel) {
                            tracing::warn!(%error, "broker link lost; reconnecting");
                            delay = RECONNECT_MIN;
                            // What broke the pub/sub link may have taken the commands' one
                            // silently with it.
                            self.renew().await;
                        }
                    }
                }
                linked_before = true;
                let jitter = Duration::from_millis(jitter_ms(delay));
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(delay + jitter) => {}
                }
                delay = next_delay(delay);
            }
        };
        tokio::join!(heartbeat, link);
    }

    async fn publish_once(
        &self,
        channel: &str,
        payload: &Payload,
        retention: Retention,
        told: Option<Told>,
        key: &str,
        digest: &str,
    ) -> Result<Once, BrokerError> {
        let (offset, epoch) = self
            .run_publish(channel, payload, retention, Some((key, digest)))
            .await?;
        if offset == 0 {
            return parse_earlier(&epoch)
                .ok_or_else(|| BrokerError(format!("unreadable idempotency entry {epoch:?}")));
        }
        if let Some(told) = told {
            told(offset);
        }
        Ok(Once::Published {
            offset,
            epoch: epoch.into(),
        })
    }

    fn node_id(&self) -> &str {
        &self.node
    }

    async fn positions(
        &self,
        channels: &[Arc<str>],
    ) -> Result<Vec<Option<(u64, Arc<str>)>>, BrokerError> {
        if channels.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for channel in channels {
            pipe.cmd("HMGET")
                .arg(self.meta_key(channel))
                .arg("top")
                .arg("epoch");
        }
        let rows: Vec<(Option<u64>, Option<String>)> = pipe
            .query_async(&mut self.connection())
            .await
            .map_err(broker_error)?;
        Ok(rows
            .into_iter()
            .map(|row| match row {
                (Some(top), Some(epoch)) => Some((top, epoch.into())),
                _ => None,
            })
            .collect())
    }

    async fn join(&self, channel: &str, present: &Present) -> Result<(), BrokerError> {
        self.join_with(channel, present, true).await
    }

    async fn leave(&self, channel: &str, client: ConnectionId) -> Result<(), BrokerError> {
        let keys = self.presence_keys(channel);
        let mut invocation = self.scripts.leave.prepare_invoke();
        for key in &keys {
            invocation.key(key);
        }
        invocation.arg(client.to_string()).arg(&self.bus);
        let _: i64 = invocation
            .invoke_async(&mut self.connection())
            .await
            .map_err(broker_error)?;
        Ok(())
    }

    async fn presence(&self, channel: &str) -> Result<Vec<Present>, BrokerError> {
        let keys = self.presence_keys(channel);
        let mut invocation = self.scripts.presence.prepare_invoke();
        for key in &keys {
            invocation.key(key);
        }
        invocation.arg(&self.bus);
        let rows: Vec<String> = invocation
            .invoke_async(&mut self.connection())
            .await
            .map_err(broker_error)?;
        let mut present: Vec<Present> = rows
            .iter()
            .filter_map(|row| serde_json::from_str(row).ok())
            .collect();
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
        self.bus_state
            .request(self, nodes, client, data, timeout)
            .await
    }

    async fn request_user(
        &self,
        user: &str,
        data: &RawValue,
        timeout: Duration,
    ) -> Result<Vec<UserAnswer>, BrokerError> {
        let nodes = self.nodes().await;
        self.bus_state
            .request_user(self, nodes, user, data, timeout)
            .await
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, BrokerError> {
        let since = now_ms().saturating_sub(self.presence_ttl.as_millis() as u64);
        let mut connection = self.connection();
        let ids: Vec<String> = connection
            .zrangebyscore(self.nodes_key(), since, "+inf")
            .await
            .map_err(broker_error)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.node_key(id)).collect();
        let infos: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut connection)
            .await
            .map_err(broker_error)?;
        let mut nodes: Vec<NodeInfo> = infos
            .into_iter()
            .flatten()
            .filter_map(|info| serde_json::from_str(&info).ok())
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes)
    }

    async fn ready(&self) -> Result<(), BrokerError> {
        if !self.linked.load(Ordering::Acquire) {
            return Err(BrokerError("the pub/sub link to Redis is down".into()));
        }
        let _: String = redis::cmd("PING")
            .query_async(&mut self.connection())
            .await
            .map_err(broker_error)?;
        Ok(())
    }
}

#[async_trait]
impl ChannelLog for RedisBroker {
    async fn publish(
        &self,
        channel: &str,
        payload: &Payload,
        retention: Retention,
        told: Option<Told>,
    ) -> Result<(u64, Arc<str>), BrokerError> {
        let (offset, epoch) = self.run_publish(channel, payload, retention, None).await?;
        if let Some(told) = told {
            told(offset);
        }
        Ok((offset, epoch.into()))
    }

    async fn history(
        &self,
        channel: &str,
        range: HistoryRange,
        _retention: Retention,
    ) -> Result<BrokerHistory, BrokerError> {
        let (mode, after, limit) = match range {
            HistoryRange::None => ("none", 0, 0),
            HistoryRange::After { offset, limit } => ("after", offset, limit),
            HistoryRange::Last(limit) => ("last", 0, limit),
        };
        let (top, epoch, oldest, entries): (u64, String, String, Vec<Entry>) = self
            .scripts
            .history
            .key(self.meta_key(channel))
            .key(self.log_key(channel))
            .arg(mode)
            .arg(after)
            .arg(META_TTL_SECONDS)
            .arg(new_epoch())
            .arg(limit)
            .invoke_async(&mut self.connection())
            .await
            .map_err(broker_error)?;
        let mut publications = Vec::with_capacity(entries.len());
        for (id, fields) in entries {
            let offset = entry_offset(&id);
            let body = fields.get(1).map(Vec::as_slice);
            let payload = body
                .and_then(split_channel)
                .and_then(|(_, payload)| decode_payload(payload));
            match (offset, payload) {
                (Some(offset), Some(payload)) => publications.push(Stored { offset, payload }),
                _ => return Err(BrokerError(format!("unreadable history entry {id}"))),
            }
        }
        if matches!(range, HistoryRange::Last(_)) {
            publications.reverse();
        }
        Ok(BrokerHistory {
            top,
            epoch: epoch.into(),
            oldest: entry_offset(&oldest),
            publications,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_link_is_retried_at_least_every_second() {
        let mut delay = RECONNECT_MIN;
        let mut waited = Duration::ZERO;
        for _ in 0..20 {
            waited += delay + Duration::from_millis(jitter_ms(delay));
            delay = next_delay(delay);
            assert!(delay <= Duration::from_secs(1));
        }
        // Twenty attempts within about 20 s: a broker back after any outage is found within a
        // second (plus jitter).
        assert!(waited < Duration::from_secs(25), "{waited:?}");
        assert_eq!(
            next_delay(Duration::from_millis(100)),
            Duration::from_millis(200)
        );
    }

    #[test]
    fn an_idempotency_entry_reads_back() {
        assert_eq!(
            parse_earlier("12:0a1b2c3d:ff00"),
            Some(Once::Earlier {
                offset: 12,
                epoch: "0a1b2c3d".into(),
                digest: "ff00".into()
            })
        );
        assert_eq!(parse_earlier("x:e:d"), None);
        assert_eq!(parse_earlier("12:e"), None);
    }

    #[test]
    fn a_publication_message_reads_back() {
        let payload = Payload::Json(RawValue::from_string("[1]".into()).expect("json"));
        let mut message = b"42:0a1b2c3d:".to_vec();
        message.extend_from_slice(&publication_body("chat:a:b", &payload));
        let (offset, epoch, channel, payload) = parse_publication(&message).expect("parses");
        assert_eq!((offset, epoch, channel), (42, "0a1b2c3d", "chat:a:b"));
        assert!(matches!(payload, Payload::Json(raw) if raw.get() == "[1]"));
        assert!(parse_publication(b"x:e:").is_none());
        assert!(parse_publication(b"1:e:\x00\x09chat").is_none());
    }
}
