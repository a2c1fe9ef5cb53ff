//! A WebSocket connection (upgraded at `GET /ws` by [`crate::http`]): JSON text frames and
//! binary frames, framed by [`super::wire`].
//!
//! An idle connection holds its socket, its session and nothing else: no read buffer (the wire
//! keeps one only while a frame is split across reads), no write room and no batch (both given
//! back after a batch of control frames only, such as `connected` or a ping). The
//! keepalive sweeper ([`super::keepalive`]) pings, and anything the client sends resets the
//! idle timeout.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use duplex_proto::DisconnectCode;
use duplex_proto::frames::{Disconnect, to_json};
use tokio::io::{AsyncRead, AsyncWrite};

use super::wire::{Incoming, Wire, WireError};
use super::{Session, SocketContext, Transport};
use crate::hub::publication::Publication;
use crate::hub::queue::{Outgoing, OutgoingQueue};

/// One task per connection reads frames and writes queued ones (the sweeper's pings included)
/// in batches on the one socket, which costs less memory than a reader and a writer task with a
/// split socket.
///
/// The running part is [`Connection`], a future written by hand: an idle connection's task
/// holds the socket, the session and the batch, and nothing else (an `async fn` with a
/// `select!` kept every branch's future and the write future side by side, 1.6 KiB per task
/// measured). Only a connection that closes pays for its goodbye, boxed.
pub(crate) fn serve<S>(
    io: S,
    unread: Vec<u8>,
    remote: std::net::SocketAddr,
    context: Arc<SocketContext>,
    slot: super::slots::Slot,
    auth: Option<crate::hub::namespace::ClientAuth>,
    upgrade: Option<Box<crate::hooks::UpgradeContext>>,
) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut session = Session::start(context.clone(), Transport::WebSocket, Some(remote), slot);
    session.keep_upgrade(upgrade);
    if let Some(auth) = auth {
        session.connect_with(auth);
    }
    let queue = session.queue().clone();
    // Pings, the idle timeout, token expiry and shutdown come from the keepalive sweeper as a
    // closing queue or a queued ping; registered above, so a shutdown that began before is
    // seen here and one that begins after reaches this connection through the sweeper.
    if context.shutdown.is_cancelled() {
        queue.close(DisconnectCode::Shutdown);
    }
    let max_message = context.limits.max_frame;
    let mut connection = Connection {
        wire: Wire::new(io, unread, max_message),
        session,
        queue,
        context,
        batch: VecDeque::new(),
        unflushed: None,
        closing: None,
    };
    async move {
        let closing = (&mut connection).await;
        if let Some(code) = closing {
            connection.goodbye(code).await;
        }
    }
}

/// A running WebSocket connection: polled, it reads frames into the session, moves queued
/// frames to the socket and flushes, and completes when the connection must end — with the
/// code to say goodbye with, or `None` when the peer is gone.
pub(crate) struct Connection<S> {
    wire: Wire<S>,
    session: Session,
    queue: Arc<OutgoingQueue>,
    context: Arc<SocketContext>,
    /// Taken from the queue, not yet handed to the socket.
    batch: VecDeque<Outgoing>,
    /// Handed to the socket and not flushed yet: how many were publications.
    unflushed: Option<u64>,
    /// The queue is closing with this code: what it held is written, then the connection ends.
    closing: Option<DisconnectCode>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Future for Connection<S> {
    type Output = Option<DisconnectCode>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            // A request waiting on the broker: no frame is read until it is answered.
            let waiting = this.session.poll_waiting(cx).is_pending();
            match this.poll_write(cx) {
                Poll::Ready(Ok(code)) => return Poll::Ready(Some(code)),
                Poll::Ready(Err(_)) => return Poll::Ready(None),
                Poll::Pending => {}
            }
            if waiting {
                return Poll::Pending;
            }
            let incoming = match this.wire.poll_next(cx) {
                Poll::Ready(incoming) => incoming,
                Poll::Pending => return Poll::Pending,
            };
            this.session.connection().touch();
            match incoming {
                None => return Poll::Ready(None),
                Some(Ok(Incoming::Close)) => {
                    // The answer to the client's close goes if the socket takes it now.
                    let _ = this.wire.poll_flush(cx);
                    return Poll::Ready(None);
                }
                Some(Ok(Incoming::Text(text))) => {
                    this.session.on_text(&text);
                }
                Some(Ok(Incoming::Binary(frame))) => this.session.on_binary(frame),
                // A ping's pong is queued on the wire: written on the next turn.
                Some(Ok(Incoming::Control)) => {}
                Some(Err(error)) => {
                    let code = disconnect_code_for(&error);
                    tracing::debug!(%error, "WebSocket read ended");
                    if let Some(code) = code {
                        this.queue.close(code);
                    }
                    return Poll::Ready(code);
                }
            }
            // A frame was read: what it queued is written on the next turn.
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Connection<S> {
    /// Moves queued frames to the socket and flushes them. Ready with the queue's closing code
    /// once everything queued before the close is flushed (or at once if the socket takes
    /// nothing more), or with a write error; pending while waiting for the queue or the socket.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<DisconnectCode>> {
        loop {
            if self.batch.is_empty() && self.unflushed.is_none() && !self.wire.has_unwritten() {
                if let Some(code) = self.closing {
                    return Poll::Ready(Ok(code));
                }
                self.closing = ready!(self.queue.poll_batch(cx, &mut self.batch));
                continue;
            }
            if !self.batch.is_empty() {
                // The whole batch into one buffer, sized once, for one write.
                let publications = self.unflushed.get_or_insert(0);
                let bytes = self.batch.iter().map(frame_len).sum();
                self.wire.reserve(bytes);
                for item in self.batch.drain(..) {
                    queue_item(&mut self.wire, item, publications);
                }
            }
            match self.wire.poll_flush(cx) {
                Poll::Ready(flushed) => flushed?,
                Poll::Pending => return self.poll_blocked(cx),
            }
            match self.unflushed.take() {
                Some(0) | None => {
                    // Control frames only (`connected`, replies, pings): likely an idle
                    // connection, which keeps no batch and no write room. A busy one keeps
                    // both.
                    self.batch = VecDeque::new();
                    self.wire.release();
                }
                Some(publications) => {
                    self.context.metrics.deliveries_written.inc_by(publications);
                }
            }
        }
    }

    /// The socket takes nothing more (the client stopped reading): the connection still ends
    /// when its queue closes (`slow_consumer`, `idle_timeout`, `shutdown`…), and the goodbye's
    /// deadline bounds how long the rest may wait.
    fn poll_blocked(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<DisconnectCode>> {
        self.queue.poll_closing(cx).map(Ok)
    }

    /// Unsubscribes first, so the hub stops queueing for this connection, then says goodbye
    /// in bounded time: what was queued before the close (replies, last publications) goes
    /// first. Boxed: only a closing connection pays for it.
    fn goodbye(self, code: DisconnectCode) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let Connection {
            mut wire,
            session,
            queue,
            context,
            mut batch,
            ..
        } = self;
        drop(session);
        Box::pin(async move {
            let goodbye = async {
                // After what a blocked write left in the batch, not instead of it. The queue
                // is closing, so it only drains: its code comes with the last of it.
                let mut rest = VecDeque::new();
                loop {
                    let last = queue.next_batch(&mut rest).await;
                    batch.append(&mut rest);
                    if last.is_some() {
                        break;
                    }
                }
                if write_batch(&mut wire, &mut batch, &context).await.is_ok() {
                    say_goodbye(&mut wire, code, &context).await;
                }
            };
            let _ = tokio::time::timeout(super::CLOSE_GRACE, goodbye).await;
        })
    }
}

/// The bytes a queued item takes as a frame (0 for what a WebSocket does not send).
fn frame_len(item: &Outgoing) -> usize {
    let payload = match item {
        Outgoing::Publication(publication) => publication_len(publication),
        Outgoing::Latest(slot) => slot.size(),
        Outgoing::Control(frame) => frame.len(),
        Outgoing::SwitchToLengthPrefixed => return 0,
        Outgoing::Ping => 0,
    };
    Wire::<tokio::io::Empty>::frame_len(payload)
}

/// Queues the frame of a queued item on the wire, counting publications.
fn queue_item<S: AsyncRead + AsyncWrite + Unpin>(
    wire: &mut Wire<S>,
    item: Outgoing,
    publications: &mut u64,
) {
    match item {
        Outgoing::Publication(publication) => {
            *publications += 1;
            queue_publication(wire, &publication);
        }
        Outgoing::Latest(slot) => {
            if let Some(publication) = slot.take() {
                *publications += 1;
                queue_publication(wire, &publication);
            }
        }
        // Control frames are serde_json output: UTF-8.
        Outgoing::Control(frame) => wire.queue_text(&frame),
        Outgoing::SwitchToLengthPrefixed => {}
        Outgoing::Ping => wire.queue_ping(),
    }
}

/// Writes a batch of queued frames and flushes once.
async fn write_batch<S: AsyncRead + AsyncWrite + Unpin>(
    wire: &mut Wire<S>,
    batch: &mut VecDeque<Outgoing>,
    context: &SocketContext,
) -> std::io::Result<()> {
    let mut publications = 0;
    for item in batch.drain(..) {
        queue_item(wire, item, &mut publications);
    }
    wire.flush().await?;
    context.metrics.deliveries_written.inc_by(publications);
    Ok(())
}

/// The last frames of a connection the server closes: `disconnect`, then a close frame.
async fn say_goodbye<S: AsyncRead + AsyncWrite + Unpin>(
    wire: &mut Wire<S>,
    code: DisconnectCode,
    context: &SocketContext,
) {
    super::count_disconnect(&context.metrics, code);
    wire.queue_text(&to_json(&Disconnect::from(code)));
    wire.queue_close(code.websocket_close_code(), code.as_str());
    if wire.flush().await.is_ok() {
        let _ = wire.shutdown().await;
    }
}

/// Which read errors get a `disconnect` (the rest mean the peer is gone).
fn disconnect_code_for(error: &WireError) -> Option<DisconnectCode> {
    match error {
        WireError::TooLarge => Some(DisconnectCode::FrameTooLarge),
        WireError::Protocol(_) => Some(DisconnectCode::ProtocolError),
        WireError::Io(_) => None,
    }
}

fn publication_len(publication: &Publication) -> usize {
    match publication.ws_text() {
        Some(text) => text.len(),
        None => publication.binary_frame().len(),
    }
}

fn queue_publication<S: AsyncRead + AsyncWrite + Unpin>(
    wire: &mut Wire<S>,
    publication: &Publication,
) {
    match publication.ws_text() {
        Some(text) => wire.queue_text(text),
        None => wire.queue_binary(publication.binary_frame()),
    }
}

#[cfg(test)]
mod tests {
    use std::mem::size_of;

    /// What every idle WebSocket connection holds, inline and in its allocations (with the
    /// `Arc` counts, 16 bytes): kept within the allocator's size classes they fit today, so a
    /// field added here is a decision (docs/benchmarks.md, "Idle connections").
    #[test]
    fn an_idle_connection_keeps_within_its_memory_budget() {
        type Plain = crate::write_deadline::WriteDeadline<tokio::net::TcpStream>;
        let connection = size_of::<super::Connection<Plain>>();
        assert!(
            connection <= 448,
            "the connection future is {connection} bytes"
        );
        let handle = size_of::<crate::hub::connection::ConnectionHandle>() + 16;
        assert!(handle <= 256, "the connection handle is {handle} bytes");
        let queue = size_of::<crate::hub::queue::OutgoingQueue>() + 16;
        assert!(queue <= 160, "the outgoing queue is {queue} bytes");
    }
}
