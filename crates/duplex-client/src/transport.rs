//! One socket to the server, WebSocket or raw TCP (each with or without TLS), reading and writing
//! whole frames.

use std::sync::Arc;

use bytes::Bytes;
use duplex_proto::tcp::{
    Framing, TcpDecoder, TcpFrame, length_prefixed_binary, length_prefixed_text,
};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use tokio_util::codec::FramedRead;
use url::Url;

use crate::Error;

/// The largest frame this client reads.
const MAX_FRAME: usize = 16 * 1024 * 1024;

/// A frame from the server.
#[derive(Debug)]
pub(crate) enum Frame {
    /// A JSON text frame.
    Text(Bytes),
    /// A binary frame, kind byte first.
    Binary(Bytes),
}

pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

pub(crate) enum Transport {
    Ws(Box<WebSocketStream<MaybeTlsStream<TcpStream>>>),
    Tcp {
        read: FramedRead<ReadHalf<Box<dyn Io>>, TcpDecoder>,
        write: WriteHalf<Box<dyn Io>>,
    },
}

/// Where a URL says to connect: `ws://`, `wss://` (WebSocket), `tcp://`, `tcps://` (raw TCP).
pub(crate) fn check_url(url: &str) -> Result<Url, Error> {
    let parsed = Url::parse(url).map_err(|e| Error::InvalidUrl(format!("{url}: {e}")))?;
    match parsed.scheme() {
        "ws" | "wss" | "tcp" | "tcps" if parsed.host_str().is_some() => Ok(parsed),
        _ => Err(Error::InvalidUrl(format!(
            "{url}: use ws://HOST:PORT/ws, wss://…, tcp://HOST:PORT or tcps://HOST:PORT"
        ))),
    }
}

impl Transport {
    pub(crate) async fn open(
        url: &Url,
        tls: &Arc<rustls::ClientConfig>,
    ) -> Result<Transport, Error> {
        match url.scheme() {
            "ws" | "wss" => {
                let config = WebSocketConfig::default().max_message_size(Some(MAX_FRAME));
                let connector = Connector::Rustls(tls.clone());
                let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(
                    url.as_str(),
                    Some(config),
                    true,
                    Some(connector),
                )
                .await
                .map_err(|e| Error::Socket(format!("cannot open {url}: {e}")))?;
                Ok(Transport::Ws(Box::new(ws)))
            }
            _ => {
                let host = url.host_str().unwrap_or("127.0.0.1");
                let port = url.port().unwrap_or(7070);
                let stream = TcpStream::connect((host, port))
                    .await
                    .map_err(|e| Error::Socket(format!("cannot open {url}: {e}")))?;
                stream.set_nodelay(true).ok();
                let io: Box<dyn Io> = if url.scheme() == "tcps" {
                    let name = rustls_pki_types::ServerName::try_from(host.to_owned())
                        .map_err(|e| Error::InvalidUrl(format!("{host}: {e}")))?;
                    let tls = tokio_rustls::TlsConnector::from(tls.clone())
                        .connect(name, stream)
                        .await
                        .map_err(|e| Error::Tls(format!("handshake with {url}: {e}")))?;
                    Box::new(tls)
                } else {
                    Box::new(stream)
                };
                let (read, write) = tokio::io::split(io);
                Ok(Transport::Tcp {
                    read: FramedRead::new(read, TcpDecoder::new(MAX_FRAME)),
                    write,
                })
            }
        }
    }

    /// Whether this is raw TCP (which switches to length-prefixed framing for binary frames).
    pub(crate) fn is_tcp(&self) -> bool {
        matches!(self, Transport::Tcp { .. })
    }

    /// From the next frame on, reads length-prefixed frames (after the server's `framing` reply).
    pub(crate) fn switch_to_length_prefixed(&mut self) {
        if let Transport::Tcp { read, .. } = self {
            read.decoder_mut().framing = Framing::LengthPrefixed;
        }
    }

    fn length_prefixed(&self) -> bool {
        match self {
            Transport::Tcp { read, .. } => read.decoder().framing == Framing::LengthPrefixed,
            Transport::Ws(_) => false,
        }
    }

    pub(crate) async fn send_text(&mut self, json: String) -> Result<(), Error> {
        let lost = |e: &dyn std::fmt::Display| Error::Socket(format!("write: {e}"));
        let length_prefixed = self.length_prefixed();
        match self {
            Transport::Ws(ws) => ws.send(Message::text(json)).await.map_err(|e| lost(&e)),
            Transport::Tcp { write, .. } => {
                let bytes = if length_prefixed {
                    length_prefixed_text(json.as_bytes())
                } else {
                    let mut line = json.into_bytes();
                    line.push(b'\n');
                    line
                };
                write.write_all(&bytes).await.map_err(|e| lost(&e))?;
                write.flush().await.map_err(|e| lost(&e))
            }
        }
    }

    /// Sends a binary frame (kind byte first).
    pub(crate) async fn send_binary(&mut self, frame: Vec<u8>) -> Result<(), Error> {
        let lost = |e: &dyn std::fmt::Display| Error::Socket(format!("write: {e}"));
        match self {
            Transport::Ws(ws) => ws.send(Message::binary(frame)).await.map_err(|e| lost(&e)),
            Transport::Tcp { write, .. } => {
                write
                    .write_all(&length_prefixed_binary(&frame))
                    .await
                    .map_err(|e| lost(&e))?;
                write.flush().await.map_err(|e| lost(&e))
            }
        }
    }

    /// The next frame; `None` when the server closed the connection.
    pub(crate) async fn next(&mut self) -> Option<Result<Frame, Error>> {
        match self {
            Transport::Ws(ws) => loop {
                match ws.next().await? {
                    Ok(Message::Text(text)) => return Some(Ok(Frame::Text(Bytes::from(text)))),
                    Ok(Message::Binary(bytes)) => return Some(Ok(Frame::Binary(bytes))),
                    Ok(Message::Ping(_)) => {
                        // tungstenite queues the pong; push it out now.
                        if let Err(e) = ws.flush().await {
                            return Some(Err(Error::Socket(format!("write: {e}"))));
                        }
                    }
                    Ok(Message::Close(_)) => return None,
                    Ok(_) => {}
                    Err(e) => return Some(Err(Error::Socket(format!("read: {e}")))),
                }
            },
            Transport::Tcp { read, .. } => match read.next().await? {
                Ok(TcpFrame::Text(text)) => Some(Ok(Frame::Text(text))),
                Ok(TcpFrame::Binary(bytes)) => Some(Ok(Frame::Binary(bytes))),
                Err(e) => Some(Err(Error::Socket(format!("read: {e}")))),
            },
        }
    }

    /// Closes politely, ignoring errors (the peer may be gone).
    pub(crate) async fn close(&mut self) {
        match self {
            Transport::Ws(ws) => {
                let _ = ws.close().await;
            }
            Transport::Tcp { write, .. } => {
                let _ = write.shutdown().await;
            }
        }
    }
}
