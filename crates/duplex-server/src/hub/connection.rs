//! A connected client as the rest of the server sees it: who it is (for presence and the
//! connections API), its outgoing queue, and the table of requests the server asked it.
//!
//! Server → client requests follow socketioxide's ack table: an id counter, id → `oneshot`, a
//! timeout, and the entry removed on every exit path (answer, timeout, the caller giving up,
//! the connection closing).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use duplex_proto::frames::{ServerRequest, to_json};
use parking_lot::Mutex;
use serde_json::value::RawValue;
use tokio::sync::oneshot;

pub use crate::model::{ClientAnswer, RequestError};

use super::ConnectionId;
use super::namespace::ClientAuth;
use super::queue::OutgoingQueue;

/// The most server requests one connection may have unanswered.
pub const MAX_PENDING_REQUESTS: usize = 1024;

/// Presence metadata by channel.
type MetaByChannel = HashMap<String, Arc<RawValue>>;

/// One connected client.
#[derive(Debug)]
pub struct ConnectionHandle {
    /// Its id.
    pub id: ConnectionId,
    /// `websocket` or `tcp`.
    pub transport: &'static str,
    /// Where it connected from.
    pub remote: Option<SocketAddr>,
    /// When it connected (formatted only when someone lists connections).
    connected_at: time::OffsetDateTime,
    /// Its outgoing queue.
    pub queue: Arc<OutgoingQueue>,
    auth: Mutex<Arc<ClientAuth>>,
    meta: Mutex<Option<Arc<RawValue>>>,
    /// What presence shows in particular channels instead of `meta` (the `subscribe` hook's
    /// answers); allocated only once there is one.
    channel_meta: Mutex<Option<Box<MetaByChannel>>>,
    subscriptions: Mutex<BTreeSet<String>>,
    /// Server → client requests awaiting their answer (a `BTreeMap`: half a `HashMap`'s
    /// size when empty, which it almost always is).
    pending: Mutex<BTreeMap<u64, oneshot::Sender<ClientAnswer>>>,
    next_request: AtomicU64,
    /// What the keepalive sweeper reads, in milliseconds of [`clock_ms`].
    liveness: Liveness,
}

/// When a connection was last heard from and pinged, and when its token runs out.
#[derive(Debug)]
struct Liveness {
    last_seen: AtomicU64,
    last_ping: AtomicU64,
    /// 0: no token deadline.
    token_deadline: AtomicU64,
}

/// Milliseconds on a monotonic clock shared by the process (from its first use).
pub fn clock_ms() -> u64 {
    static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(std::time::Instant::now);
    // +1 so that 0 never means a real instant.
    base.elapsed().as_millis() as u64 + 1
}

impl ConnectionHandle {
    /// A handle for a new connection.
    pub fn new(
        id: ConnectionId,
        transport: &'static str,
        remote: Option<SocketAddr>,
        queue: Arc<OutgoingQueue>,
    ) -> Self {
        let connected_at = time::OffsetDateTime::now_utc();
        ConnectionHandle {
            id,
            transport,
            remote,
            connected_at,
            queue,
            auth: Mutex::new(ClientAuth::anonymous()),
            meta: Mutex::new(None),
            channel_meta: Mutex::new(None),
            subscriptions: Mutex::new(BTreeSet::new()),
            pending: Mutex::new(BTreeMap::new()),
            next_request: AtomicU64::new(1),
            liveness: Liveness {
                last_seen: AtomicU64::new(clock_ms()),
                last_ping: AtomicU64::new(clock_ms()),
                token_deadline: AtomicU64::new(0),
            },
        }
    }

    /// When it connected, RFC 3339.
    pub fn connected_at(&self) -> String {
        self.connected_at
            .format(&time::format_description::well_known::Rfc3339)
            .expect("RFC 3339 formats any time after 1970")
    }

    /// Something arrived from the client.
    pub fn touch(&self) {
        self.liveness.last_seen.store(clock_ms(), Ordering::Relaxed);
    }

    /// When the client was last heard from ([`clock_ms`]).
    pub fn last_seen(&self) -> u64 {
        self.liveness.last_seen.load(Ordering::Relaxed)
    }

    /// Records that a ping is due at `now` when the last one is `interval` old; true then.
    pub fn ping_due(&self, now: u64, interval: u64) -> bool {
        let last = self.liveness.last_ping.load(Ordering::Relaxed);
        now.saturating_sub(last) >= interval
            && self
                .liveness
                .last_ping
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Sets when the connection's token runs out ([`clock_ms`]), or clears it.
    pub fn set_token_deadline(&self, deadline: Option<u64>) {
        self.liveness
            .token_deadline
            .store(deadline.unwrap_or(0), Ordering::Relaxed);
    }

    /// When the connection's token runs out ([`clock_ms`]), if it has one.
    pub fn token_deadline(&self) -> Option<u64> {
        match self.liveness.token_deadline.load(Ordering::Relaxed) {
            0 => None,
            deadline => Some(deadline),
        }
    }

    /// The user its token named, if any.
    pub fn user(&self) -> Option<Arc<str>> {
        self.auth.lock().user.clone()
    }

    /// What its token says (anonymous without one).
    pub fn auth(&self) -> Arc<ClientAuth> {
        self.auth.lock().clone()
    }

    /// Sets what a verified token says.
    pub fn set_auth(&self, auth: ClientAuth) {
        *self.auth.lock() = Arc::new(auth);
    }

    /// The metadata it gave in `connect`.
    pub fn meta(&self) -> Option<Arc<RawValue>> {
        self.meta.lock().clone()
    }

    /// Sets the metadata.
    pub fn set_meta(&self, meta: Option<Arc<RawValue>>) {
        *self.meta.lock() = meta;
    }

    /// What presence shows for it in `channel`: the channel's own metadata, else its own.
    pub fn meta_in(&self, channel: &str) -> Option<Arc<RawValue>> {
        if let Some(by_channel) = &*self.channel_meta.lock()
            && let Some(meta) = by_channel.get(channel)
        {
            return Some(meta.clone());
        }
        self.meta()
    }

    /// Sets (or with `None` clears) what presence shows for it in `channel`.
    pub fn set_channel_meta(&self, channel: &str, meta: Option<Arc<RawValue>>) {
        let mut by_channel = self.channel_meta.lock();
        match meta {
            Some(meta) => {
                by_channel
                    .get_or_insert_with(Box::default)
                    .insert(channel.to_owned(), meta);
            }
            None => {
                if let Some(map) = by_channel.as_mut() {
                    map.remove(channel);
                    if map.is_empty() {
                        *by_channel = None;
                    }
                }
            }
        }
    }

    /// Its subscriptions, by name.
    pub fn subscriptions(&self) -> Vec<String> {
        self.subscriptions.lock().iter().cloned().collect()
    }

    pub(crate) fn subscription_count(&self) -> usize {
        self.subscriptions.lock().len()
    }

    pub(crate) fn is_subscribed(&self, channel: &str) -> bool {
        self.subscriptions.lock().contains(channel)
    }

    pub(crate) fn add_subscription(&self, channel: &str) {
        self.subscriptions.lock().insert(channel.to_owned());
    }

    pub(crate) fn remove_subscription(&self, channel: &str) -> bool {
        self.subscriptions.lock().remove(channel)
    }

    pub(crate) fn take_subscriptions(&self) -> BTreeSet<String> {
        std::mem::take(&mut *self.subscriptions.lock())
    }

    /// Asks the client and waits for its answer.
    pub async fn request(
        &self,
        data: &RawValue,
        timeout: Duration,
    ) -> Result<ClientAnswer, RequestError> {
        if self.queue.is_closing() {
            return Err(RequestError::Closed);
        }
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        {
            let mut pending = self.pending.lock();
            if pending.len() >= MAX_PENDING_REQUESTS {
                return Err(RequestError::TooManyPending);
            }
            pending.insert(id, sender);
        }
        // Removes the entry however this function ends, including the caller dropping it.
        let _entry = PendingEntry { handle: self, id };
        self.queue
            .push_control(Bytes::from(to_json(&ServerRequest { id, data })));
        match tokio::time::timeout(timeout, receiver).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(RequestError::Closed),
            Err(_) => Err(RequestError::Timeout),
        }
    }

    /// Delivers a client's answer; false when no request with that id is waiting (late,
    /// duplicated or unknown).
    pub fn answer(&self, id: u64, answer: ClientAnswer) -> bool {
        let sender = self.pending.lock().remove(&id);
        match sender {
            Some(sender) => sender.send(answer).is_ok(),
            None => false,
        }
    }

    /// Fails every waiting request: the connection is closing.
    pub(crate) fn abandon_requests(&self) {
        self.pending.lock().clear();
    }
}

struct PendingEntry<'a> {
    handle: &'a ConnectionHandle,
    id: u64,
}

impl Drop for PendingEntry<'_> {
    fn drop(&mut self) {
        self.handle.pending.lock().remove(&self.id);
    }
}
