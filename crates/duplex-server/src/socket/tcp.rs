//! Raw TCP: JSON lines a person can type into `nc`, switchable to length-prefixed frames that
//! carry binary payloads without base64 (see `duplex_proto::tcp`).

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use duplex_proto::DisconnectCode;
use duplex_proto::frames::{Disconnect, Keepalive, to_json};
use duplex_proto::tcp::{Framing, TcpDecoder, TcpFrame, TcpFrameError};
use futures_util::StreamExt as _;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::FramedRead;

use super::{After, Session, SocketContext, Transport, finish_writer};
use crate::hub::queue::{Outgoing, OutgoingQueue};
use crate::write_deadline::WriteDeadline;

/// A writer's buffer shrinks back to this after a burst, so idle connections stay small.
const IDLE_WRITE_BUFFER: usize = 4 * 1024;

/// Accepts raw TCP connections until shutdown.
pub(crate) async fn accept(
    listener: TcpListener,
    context: Arc<SocketContext>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    write_timeout: std::time::Duration,
) {
    loop {
        let accepted = tokio::select! {
            () = context.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                if let Err(error) = stream.set_nodelay(true) {
                    tracing::debug!(%error, "cannot set TCP_NODELAY");
                }
                match context.slots.acquire(Some(peer.ip())) {
                    Ok(slot) => {
                        let stream = WriteDeadline::new(stream, write_timeout).counting(
                            context
                                .metrics
                                .disconnect_counter(DisconnectCode::WriteTimeout.as_str()),
                        );
                        let context = context.clone();
                        let tls = tls.clone();
                        context.tracker.clone().spawn(async move {
                            match tls {
                                None => serve(stream, peer, context, slot).await,
                                Some(acceptor) => {
                                    let handshake = tokio::time::timeout(
                                        context.limits.idle_timeout,
                                        acceptor.accept(stream),
                                    );
                                    match handshake.await {
                                        Ok(Ok(stream)) => serve(stream, peer, context, slot).await,
                                        Ok(Err(error)) => {
                                            tracing::debug!(%error, %peer, "TLS handshake failed");
                                        }
                                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                                    }
                                }
                            }
                        });
                    }
                    Err(_) => {
                        context.metrics.connection_refusals.inc();
                        context.tracker.spawn(refuse(stream));
                    }
                }
            }
            Err(error) => {
                // Out of file descriptors and the like: wait a little instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Tells a connection over the limits why it is closed, without waiting on it for long.
async fn refuse(mut stream: TcpStream) {
    let mut line = to_json(&Disconnect::from(DisconnectCode::TooManyConnections));
    line.push(b'\n');
    let write = async {
        stream.write_all(&line).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), write).await;
}

async fn serve<S>(
    stream: S,
    peer: std::net::SocketAddr,
    context: Arc<SocketContext>,
    slot: super::slots::Slot,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let mut session = Session::start(context.clone(), Transport::Tcp, Some(peer), slot);
    let queue = session.queue().clone();
    let (read_half, write_half) = tokio::io::split(stream);
    let mut frames =
        FramedRead::with_capacity(read_half, TcpDecoder::new(context.limits.max_frame), 1024);
    let writer = tokio::spawn(write(write_half, queue.clone(), context.clone()));
    loop {
        if session.is_waiting() {
            let deadline = session.token_deadline();
            let waited = super::next_incoming(&context, &queue, deadline, async {
                session.finish_waiting().await;
                Some(())
            });
            if waited.await.is_none() {
                break;
            }
        }
        let deadline = session.token_deadline();
        let Some(next) = super::next_incoming(&context, &queue, deadline, frames.next()).await
        else {
            break;
        };
        match next {
            Ok(TcpFrame::Text(text)) => {
                if session.on_unchecked_text(&text) == After::SwitchToLengthPrefixed {
                    frames.decoder_mut().framing = Framing::LengthPrefixed;
                }
            }
            Ok(TcpFrame::Binary(frame)) => session.on_binary(frame),
            Err(TcpFrameError::TooLarge { .. }) => {
                queue.close(DisconnectCode::FrameTooLarge);
                break;
            }
            Err(TcpFrameError::Empty) => {
                queue.close(DisconnectCode::ProtocolError);
                break;
            }
            Err(TcpFrameError::Io(_)) => break,
        }
    }
    drop(session);
    finish_writer(writer, &queue).await;
}

fn push_control(buf: &mut Vec<u8>, framing: Framing, json: &[u8]) {
    match framing {
        Framing::Lines => {
            buf.extend_from_slice(json);
            buf.push(b'\n');
        }
        Framing::LengthPrefixed => {
            let len = u32::try_from(json.len() + 1).expect("control frames are small");
            buf.extend_from_slice(&len.to_be_bytes());
            buf.push(duplex_proto::tcp::KIND_TEXT);
            buf.extend_from_slice(json);
        }
    }
}

async fn write<W>(mut socket: W, queue: Arc<OutgoingQueue>, context: Arc<SocketContext>)
where
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut batch = VecDeque::new();
    let mut buf: Vec<u8> = Vec::with_capacity(IDLE_WRITE_BUFFER);
    let mut framing = Framing::Lines;
    let mut ping = tokio::time::interval(context.limits.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    let ping_frame = Bytes::from(to_json(&Keepalive::Ping));
    loop {
        let closing = tokio::select! {
            closing = queue.next_batch(&mut batch) => closing,
            _ = ping.tick() => {
                buf.clear();
                push_control(&mut buf, framing, &ping_frame);
                if socket.write_all(&buf).await.is_err() {
                    queue.close(DisconnectCode::SlowConsumer);
                    return;
                }
                continue;
            }
        };
        buf.clear();
        let mut publications = 0;
        // The batch's publications stay held (and counted in the queue budget) until written.
        let mut conflated = Vec::new();
        for item in &batch {
            let publication = match item {
                Outgoing::Publication(publication) => publication,
                Outgoing::Latest(slot) => match slot.take() {
                    Some(publication) => {
                        conflated.push(publication);
                        &conflated[conflated.len() - 1]
                    }
                    None => continue,
                },
                Outgoing::Control(frame) => {
                    push_control(&mut buf, framing, frame);
                    continue;
                }
                Outgoing::SwitchToLengthPrefixed => {
                    framing = Framing::LengthPrefixed;
                    continue;
                }
                Outgoing::Ping => continue,
            };
            publications += 1;
            match framing {
                Framing::Lines => buf.extend_from_slice(&publication.line()),
                Framing::LengthPrefixed => buf.extend_from_slice(&publication.length_prefixed()),
            }
        }
        if let Some(code) = closing {
            super::count_disconnect(&context.metrics, code);
            push_control(&mut buf, framing, &to_json(&Disconnect::from(code)));
        }
        if socket.write_all(&buf).await.is_err() {
            // Broken, or the client took nothing within the write deadline: the reader stops
            // too (a client that keeps sending while never reading is not kept).
            queue.close(DisconnectCode::SlowConsumer);
            return;
        }
        batch.clear();
        drop(conflated);
        context.metrics.deliveries_written.inc_by(publications);
        if closing.is_some() {
            let _ = socket.shutdown().await;
            return;
        }
        if buf.capacity() > 16 * IDLE_WRITE_BUFFER {
            buf = Vec::with_capacity(IDLE_WRITE_BUFFER);
        }
    }
}
