//! Socket connections: the session logic shared by WebSocket ([`ws`]) and raw TCP ([`tcp`]).
//!
//! A WebSocket connection is one task (it owns the [`Session`], answers requests and drains the
//! connection's [`OutgoingQueue`] into one write per batch); a raw TCP connection is a reader
//! task and a writer task. One [`keepalive`] task pings WebSocket connections and closes idle,
//! expired and, at shutdown, all of them. The hub only ever pushes into a queue, so a slow
//! socket never blocks a publisher.
//!
//! [`session`] holds one connection's state and reads its frames; [`requests`] answers them,
//! one method per request kind.

pub(crate) mod keepalive;
mod requests;
mod session;
pub(crate) mod slots;
pub(crate) mod tcp;
pub(crate) mod wire;
pub(crate) mod ws;

pub(crate) use requests::{history_json, presence_json};
pub(crate) use session::{After, Session};

use std::sync::Arc;
use std::time::Duration;

use duplex_proto::DisconnectCode;
use duplex_proto::frames::Limits;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::hub::Hub;
use crate::hub::queue::{OutgoingQueue, QueueLimits};
use crate::metrics::{CodeLabels, Metrics, TransportLabels};

/// Publications a `history` request returns when it names no `limit`, and at most.
pub(crate) const HISTORY_DEFAULT_LIMIT: usize = 100;
/// The largest `limit` of a `history` request.
pub(crate) const HISTORY_MAX_LIMIT: usize = 1000;

/// After this many bad frames in a row a connection is closed with `too_many_errors`.
const MAX_BAD_FRAMES_IN_A_ROW: u32 = 20;

/// How long a closing connection's writer gets to send what is queued and the `disconnect`.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Per-connection limits, from the configuration.
#[derive(Debug, Clone)]
pub struct SocketLimits {
    /// Largest frame read, in bytes.
    pub max_frame: usize,
    /// Publications queued per connection before the slow-consumer policy applies.
    pub queue_size: usize,
    /// Bytes of publications queued per connection before the slow-consumer policy applies
    /// (whichever of this and `queue_size` is reached first).
    pub queue_bytes: usize,
    /// Subscriptions per connection.
    pub max_subscriptions: usize,
    /// Time between keepalive pings.
    pub ping_interval: Duration,
    /// Time without any frame from the client before it is disconnected.
    pub idle_timeout: Duration,
    /// Publications per second one connection may make (a token bucket refilled at this rate).
    pub publish_rate: u32,
    /// How many publications may come at once before the rate applies.
    pub publish_burst: u32,
    /// Socket connections (WebSocket, raw TCP, SSE) the server holds at most.
    pub max_connections: usize,
    /// Socket connections one IP address may hold.
    pub max_connections_per_ip: usize,
}

impl SocketLimits {
    pub(crate) fn announced(&self) -> Limits {
        Limits {
            max_frame: self.max_frame,
            max_subscriptions: self.max_subscriptions,
            queue: self.queue_size,
            idle_timeout_ms: u64::try_from(self.idle_timeout.as_millis()).unwrap_or(u64::MAX),
            ping_interval_ms: u64::try_from(self.ping_interval.as_millis()).unwrap_or(u64::MAX),
            publish_rate: self.publish_rate,
            publish_burst: self.publish_burst,
            queue_bytes: self.queue_bytes,
        }
    }

    /// The bounds of one connection's outgoing queue.
    pub(crate) fn queue(&self) -> QueueLimits {
        QueueLimits {
            publications: self.queue_size,
            bytes: self.queue_bytes,
        }
    }
}

/// What socket tasks share.
#[derive(Debug, Clone)]
pub(crate) struct SocketContext {
    pub(crate) hub: Arc<Hub>,
    pub(crate) tokens: Option<crate::auth::TokenVerifier>,
    pub(crate) limits: Arc<SocketLimits>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tracker: TaskTracker,
    pub(crate) slots: Arc<slots::ConnectionSlots>,
    /// The backend's hooks, when `[hooks]` is configured.
    pub(crate) hooks: Option<Arc<crate::hooks::Hooks>>,
    /// The webhooks, when `[webhooks]` is configured.
    pub(crate) webhooks: Option<Arc<crate::webhooks::Webhooks>>,
}

/// Which transport a connection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    WebSocket,
    Tcp,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::Tcp => "tcp",
        }
    }

    fn label(self) -> TransportLabels {
        TransportLabels {
            transport: self.name(),
        }
    }
}

/// When a token whose `exp` is `expires_at` runs out, on tokio's clock.
pub(crate) fn deadline_of(expires_at: Option<u64>) -> Option<tokio::time::Instant> {
    let expires_at = expires_at?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Some(tokio::time::Instant::now() + Duration::from_secs(expires_at.saturating_sub(now)))
}

/// A token's `exp` (seconds since the Unix epoch) on [`crate::hub::connection::clock_ms`].
fn clock_deadline(expires_at: u64) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    crate::hub::connection::clock_ms() + expires_at.saturating_sub(now) * 1000
}

/// Counts a `disconnect` the server sends.
pub(crate) fn count_disconnect(metrics: &Metrics, code: DisconnectCode) {
    metrics
        .disconnects
        .get_or_create(&CodeLabels {
            code: code.as_str(),
        })
        .inc();
}

/// Waits for a connection's next incoming item, unless the connection must end first: at
/// shutdown, when its queue closes, when its token expires or when nothing arrives within the
/// idle timeout. Returns `None` when the reader should stop (the close code, if any, is set).
pub(crate) async fn next_incoming<T>(
    context: &SocketContext,
    queue: &OutgoingQueue,
    token_deadline: Option<tokio::time::Instant>,
    next: impl std::future::Future<Output = Option<T>>,
) -> Option<T> {
    tokio::select! {
        () = context.shutdown.cancelled() => {
            queue.close(DisconnectCode::Shutdown);
            None
        }
        () = queue.closed() => None,
        () = token_expiry(token_deadline) => {
            queue.close(DisconnectCode::TokenExpired);
            None
        }
        next = tokio::time::timeout(context.limits.idle_timeout, next) => match next {
            Ok(next) => next,
            Err(_) => {
                queue.close(DisconnectCode::IdleTimeout);
                None
            }
        },
    }
}

/// Completes when the token deadline passes; never without one.
pub(crate) async fn token_expiry(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Waits for a closing connection's writer to finish, then gives up on it.
async fn finish_writer(writer: tokio::task::JoinHandle<()>, queue: &OutgoingQueue) {
    let mut writer = writer;
    if queue.is_closing() {
        if tokio::time::timeout(CLOSE_GRACE, &mut writer)
            .await
            .is_err()
        {
            writer.abort();
        }
    } else {
        writer.abort();
    }
}
