//! A WebSocket connection (upgraded at `GET /ws` by [`crate::http`]): JSON text frames and
//! binary frames, over axum's tungstenite.
//!
//! Buffers are sized deliberately (tungstenite would otherwise read into 128 KiB per
//! connection); the keepalive sweeper ([`super::keepalive`]) pings, and anything the client
//! sends resets the idle timeout.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::Bytes;
use duplex_proto::DisconnectCode;
use duplex_proto::frames::{Disconnect, to_json};
use futures_util::{SinkExt as _, StreamExt as _};

use super::{Session, SocketContext, Transport};
use crate::hub::publication::Publication;
use crate::hub::queue::{Outgoing, OutgoingQueue};

/// tungstenite's read buffer (its default, 128 KiB, would be held by every idle connection).
pub(crate) const READ_BUFFER: usize = 512;
/// Queued frames are flushed once this much is buffered.
pub(crate) const WRITE_FLUSH_THRESHOLD: usize = 16 * 1024;
/// The most a connection's writes may buffer.
pub(crate) const MAX_WRITE_BUFFER: usize = 4 * 1024 * 1024;

/// One task per connection reads frames and writes queued ones (the sweeper's pings included)
/// in batches on the one socket, which costs less memory than a reader and a writer task with a
/// split socket.
///
/// The running part is [`Connection`], a future written by hand: an idle connection's task
/// holds the socket, the session and the batch, and nothing else (an `async fn` with a
/// `select!` kept every branch's future and the write future side by side, 1.6 KiB per task
/// measured). Only a connection that closes pays for its goodbye, boxed.
pub(crate) fn serve(
    socket: WebSocket,
    remote: std::net::SocketAddr,
    context: Arc<SocketContext>,
    slot: super::slots::Slot,
    auth: Option<crate::hub::namespace::ClientAuth>,
    upgrade: Option<Box<crate::hooks::UpgradeContext>>,
) -> impl Future<Output = ()> + Send {
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
    let mut connection = Connection {
        socket,
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
struct Connection {
    socket: WebSocket,
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

impl Future for Connection {
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
            let incoming = match this.socket.poll_next_unpin(cx) {
                Poll::Ready(incoming) => incoming,
                Poll::Pending => return Poll::Pending,
            };
            this.session.connection().touch();
            match incoming {
                None | Some(Ok(Message::Close(_))) => return Poll::Ready(None),
                Some(Ok(Message::Text(text))) => {
                    this.session.on_text(text.as_str());
                }
                Some(Ok(Message::Binary(frame))) => this.session.on_binary(frame),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Err(error)) => {
                    let code = disconnect_code_for(error);
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

impl Connection {
    /// Moves queued frames to the socket and flushes them. Ready with the queue's closing code
    /// once everything queued before the close is flushed (or at once if the socket takes
    /// nothing more), or with a write error; pending while waiting for the queue or the socket.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<DisconnectCode, axum::Error>> {
        loop {
            if self.batch.is_empty() && self.unflushed.is_none() {
                if let Some(code) = self.closing {
                    return Poll::Ready(Ok(code));
                }
                self.closing = ready!(self.queue.poll_batch(cx, &mut self.batch));
                continue;
            }
            while !self.batch.is_empty() {
                match self.socket.poll_ready_unpin(cx) {
                    Poll::Ready(ready) => ready?,
                    Poll::Pending => return self.poll_blocked(cx),
                }
                let publications = self.unflushed.get_or_insert(0);
                if let Some(message) = self
                    .batch
                    .pop_front()
                    .and_then(|item| message_of(item, publications))
                {
                    self.socket.start_send_unpin(message)?;
                }
            }
            match self.socket.poll_flush_unpin(cx) {
                Poll::Ready(flushed) => flushed?,
                Poll::Pending => return self.poll_blocked(cx),
            }
            if let Some(publications) = self.unflushed.take() {
                self.context.metrics.deliveries_written.inc_by(publications);
            }
        }
    }

    /// The socket takes nothing more (the client stopped reading): the connection still ends
    /// when its queue closes (`slow_consumer`, `idle_timeout`, `shutdown`…), and the goodbye's
    /// deadline bounds how long the rest may wait.
    fn poll_blocked(&mut self, cx: &mut Context<'_>) -> Poll<Result<DisconnectCode, axum::Error>> {
        self.queue.poll_closing(cx).map(Ok)
    }

    /// Unsubscribes first, so the hub stops queueing for this connection, then says goodbye
    /// in bounded time: what was queued before the close (replies, last publications) goes
    /// first. Boxed: only a closing connection pays for it.
    fn goodbye(self, code: DisconnectCode) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let Connection {
            mut socket,
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
                if write_batch(&mut socket, &mut batch, &context).await.is_ok() {
                    say_goodbye(&mut socket, code, &context).await;
                }
            };
            let _ = tokio::time::timeout(super::CLOSE_GRACE, goodbye).await;
        })
    }
}

/// The WebSocket message for a queued item, counting publications; `None` for what a
/// WebSocket does not send.
fn message_of(item: Outgoing, publications: &mut u64) -> Option<Message> {
    Some(match item {
        Outgoing::Publication(publication) => {
            *publications += 1;
            publication_message(&publication)
        }
        Outgoing::Latest(slot) => {
            let publication = slot.take()?;
            *publications += 1;
            publication_message(&publication)
        }
        Outgoing::Control(frame) => {
            Message::Text(Utf8Bytes::try_from(frame).expect("control frames are serde_json output"))
        }
        Outgoing::SwitchToLengthPrefixed => return None,
        Outgoing::Ping => Message::Ping(Bytes::new()),
    })
}

/// Writes a batch of queued frames and flushes once.
async fn write_batch(
    socket: &mut WebSocket,
    batch: &mut VecDeque<Outgoing>,
    context: &SocketContext,
) -> Result<(), axum::Error> {
    let mut publications = 0;
    for item in batch.drain(..) {
        if let Some(message) = message_of(item, &mut publications) {
            socket.feed(message).await?;
        }
    }
    socket.flush().await?;
    context.metrics.deliveries_written.inc_by(publications);
    Ok(())
}

/// The last frames of a connection the server closes: `disconnect`, then a close frame.
async fn say_goodbye(socket: &mut WebSocket, code: DisconnectCode, context: &SocketContext) {
    super::count_disconnect(&context.metrics, code);
    let disconnect = to_json(&Disconnect::from(code));
    let disconnect = Utf8Bytes::try_from(disconnect).expect("control frames are serde_json output");
    let _ = socket.send(Message::Text(disconnect)).await;
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code: code.websocket_close_code(),
            reason: Utf8Bytes::from_static(code.as_str()),
        })))
        .await;
}

/// Which read errors get a `disconnect` (the rest mean the peer is gone).
fn disconnect_code_for(error: axum::Error) -> Option<DisconnectCode> {
    let inner = error.into_inner();
    match inner.downcast_ref::<tungstenite::Error>()? {
        tungstenite::Error::Capacity(_) => Some(DisconnectCode::FrameTooLarge),
        // The peer went away without a close frame: gone, not a protocol error.
        tungstenite::Error::Protocol(
            tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
        ) => None,
        tungstenite::Error::Utf8(_) | tungstenite::Error::Protocol(_) => {
            Some(DisconnectCode::ProtocolError)
        }
        _ => None,
    }
}

fn publication_message(publication: &Publication) -> Message {
    match publication.ws_text() {
        Some(text) => Message::Text(text.clone()),
        None => Message::Binary(publication.binary_frame()),
    }
}
