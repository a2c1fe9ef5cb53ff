//! WebSocket at `GET /ws`: JSON text frames and binary frames, over axum's tungstenite.
//!
//! Buffers are sized deliberately (tungstenite would otherwise read into 128 KiB per
//! connection); the keepalive sweeper ([`super::keepalive`]) pings, and anything the client
//! sends resets the idle timeout.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use bytes::Bytes;
use duplex_proto::DisconnectCode;
use duplex_proto::frames::{Disconnect, to_json};
use futures_util::{SinkExt as _, StreamExt as _};

use super::{Session, SocketContext, Transport};
use crate::http::{ApiError, AppState};
use crate::hub::publication::Publication;
use crate::hub::queue::Outgoing;

const READ_BUFFER: usize = 512;
const WRITE_FLUSH_THRESHOLD: usize = 16 * 1024;
const MAX_WRITE_BUFFER: usize = 4 * 1024 * 1024;

/// Upgrades `GET /ws` to a WebSocket connection.
pub(crate) async fn upgrade(
    State(state): State<AppState>,
    ConnectInfo(remote): ConnectInfo<std::net::SocketAddr>,
    headers: axum::http::HeaderMap,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    crate::http::check_origin(&state, &headers)?;
    // Browsers cannot set headers on a WebSocket: a token may come as `?token=`.
    let token = form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
        .find(|(key, _)| key == "token")
        .map(|(_, value)| value.into_owned());
    let auth = match token {
        Some(token) => Some(crate::http::verify_token(&state, &token)?),
        None => None,
    };
    let upgrade = upgrade.map_err(|rejection| ApiError::UpgradeRequired(rejection.body_text()))?;
    let context = state.sockets.clone();
    let slot = context.slots.acquire(Some(remote.ip())).map_err(|limit| {
        context.metrics.connection_refusals.inc();
        ApiError::TooManyConnections(limit.to_string())
    })?;
    let max_frame = context.limits.max_frame;
    Ok(upgrade
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_FLUSH_THRESHOLD)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(max_frame)
        .max_frame_size(max_frame)
        .on_upgrade(move |socket| {
            let tracker = context.tracker.clone();
            tracker.track_future(serve(socket, remote, context, slot, auth))
        }))
}

/// One task per connection reads frames and writes queued ones (the sweeper's pings included)
/// in batches; reads and writes take turns on the one socket (a read is cancel-safe: tungstenite keeps a partial frame
/// in its buffer), which costs less memory than a reader and a writer task with a split socket.
async fn serve(
    mut socket: WebSocket,
    remote: std::net::SocketAddr,
    context: Arc<SocketContext>,
    slot: super::slots::Slot,
    auth: Option<crate::hub::namespace::ClientAuth>,
) {
    let mut session = Session::start(context.clone(), Transport::WebSocket, Some(remote), slot);
    if let Some(auth) = auth {
        session.authenticate(auth);
    }
    let queue = session.queue().clone();
    let connection = session.connection().clone();
    // Pings, the idle timeout, token expiry and shutdown come from the keepalive sweeper as a
    // closing queue or a queued ping; registered above, so a shutdown that began before is
    // seen here and one that begins after reaches this connection through the sweeper.
    if context.shutdown.is_cancelled() {
        queue.close(DisconnectCode::Shutdown);
    }
    let mut batch = VecDeque::new();
    let closing = loop {
        let waiting = session.is_waiting();
        tokio::select! {
            // A request waiting on the broker: no frame is read until it is answered.
            () = session.finish_waiting(), if waiting => {}
            closing = queue.next_batch(&mut batch) => {
                if write_batch(&mut socket, &mut batch, &context).await.is_err() {
                    break None;
                }
                if closing.is_some() {
                    break closing;
                }
            }
            incoming = socket.next(), if !waiting => {
                connection.touch();
                match incoming {
                    None | Some(Ok(Message::Close(_))) => break None,
                    Some(Ok(Message::Text(text))) => {
                        session.on_text(text.as_str());
                    }
                    Some(Ok(Message::Binary(frame))) => session.on_binary(frame),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Err(error)) => match disconnect_code_for(error) {
                        Some(code) => {
                            queue.close(code);
                            break Some(code);
                        }
                        None => break None,
                    },
                }
            }
        }
    };
    // Unsubscribe first, so the hub stops queueing for us, then say goodbye in bounded time:
    // what was queued before the close (replies, last publications) goes first.
    drop(session);
    if let Some(code) = closing {
        let goodbye = async {
            queue.next_batch(&mut batch).await;
            if write_batch(&mut socket, &mut batch, &context).await.is_ok() {
                say_goodbye(&mut socket, code, &context).await;
            }
        };
        let _ = tokio::time::timeout(super::CLOSE_GRACE, goodbye).await;
    }
}

/// Writes a batch of queued frames and flushes once.
async fn write_batch(
    socket: &mut WebSocket,
    batch: &mut VecDeque<Outgoing>,
    context: &SocketContext,
) -> Result<(), axum::Error> {
    let mut publications = 0;
    for item in batch.drain(..) {
        let message = match item {
            Outgoing::Publication(publication) => {
                publications += 1;
                publication_message(&publication)
            }
            Outgoing::Latest(slot) => match slot.take() {
                Some(publication) => {
                    publications += 1;
                    publication_message(&publication)
                }
                None => continue,
            },
            Outgoing::Control(frame) => Message::Text(
                Utf8Bytes::try_from(frame).expect("control frames are serde_json output"),
            ),
            Outgoing::SwitchToLengthPrefixed => continue,
            Outgoing::Ping => Message::Ping(Bytes::new()),
        };
        socket.feed(message).await?;
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
