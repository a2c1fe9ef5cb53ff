//! Minimal protocol clients for tests: every read has a timeout, so a missing frame fails the
//! test instead of hanging it.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use duplex_proto::tcp::{Framing, TcpDecoder, TcpFrame};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::codec::Decoder as _;

/// How long a test waits for any one event.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Polls `check` until it returns `Some`, failing after [`EVENT_TIMEOUT`].
pub async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    tokio::time::timeout(EVENT_TIMEOUT, async {
        loop {
            if let Some(value) = check().await {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

pub(crate) async fn http_get(url: &str) -> String {
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) = rest.split_once('/').expect("URL with a path");
    let mut stream = TcpStream::connect(host).await.expect("connect");
    let request = format!("GET /{path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    tokio::time::timeout(EVENT_TIMEOUT, stream.read_to_end(&mut response))
        .await
        .expect("response in time")
        .expect("read");
    let response = String::from_utf8(response).expect("utf-8");
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// The two things a protocol client does that the shared helpers build on.
trait JsonFrames {
    async fn send_json(&mut self, frame: Value);
    async fn next_json(&mut self) -> Value;
}

impl JsonFrames for WsClient {
    async fn send_json(&mut self, frame: Value) {
        WsClient::send_json(self, frame).await;
    }
    async fn next_json(&mut self) -> Value {
        WsClient::next_json(self).await
    }
}

impl JsonFrames for TcpClient {
    async fn send_json(&mut self, frame: Value) {
        TcpClient::send_json(self, frame).await;
    }
    async fn next_json(&mut self) -> Value {
        TcpClient::next_json(self).await
    }
}

/// Sends a request and returns the `reply` or `error` with its id, skipping other frames.
async fn request(client: &mut impl JsonFrames, mut frame: Value, id: u64) -> Value {
    frame["id"] = id.into();
    client.send_json(frame).await;
    loop {
        let value = client.next_json().await;
        if value["id"] == id && (value["type"] == "reply" || value["type"] == "error") {
            return value;
        }
    }
}

/// Subscribes and returns the reply, which must not be an error.
async fn subscribe(client: &mut impl JsonFrames, channel: &str, id: u64) -> Value {
    let frame = serde_json::json!({"type": "subscribe", "channel": channel});
    let reply = request(client, frame, id).await;
    assert_eq!(reply["type"], "reply", "{reply}");
    reply
}

/// What a WebSocket client received.
#[derive(Debug, Clone, PartialEq)]
pub enum WsEvent {
    /// A JSON text frame.
    Json(Value),
    /// A binary frame.
    Binary(Bytes),
    /// A close frame with its code.
    Close(Option<u16>),
    /// A ping from the server.
    Ping,
}

/// A WebSocket test client.
#[derive(Debug)]
pub struct WsClient {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The `connected` frame.
    pub connected: Value,
}

impl WsClient {
    /// Connects and reads `connected`.
    pub async fn connect(url: &str) -> WsClient {
        Self::connect_with_headers(url, &[]).await
    }

    /// Connects with extra request headers (such as `Cookie`) and reads `connected`.
    pub async fn connect_with_headers(url: &str, headers: &[(&str, &str)]) -> WsClient {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
        use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
        let mut request = url.into_client_request().expect("a WebSocket URL");
        for (name, value) in headers {
            request.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).expect("a header name"),
                HeaderValue::from_str(value).expect("a header value"),
            );
        }
        let (stream, _) =
            tokio::time::timeout(EVENT_TIMEOUT, tokio_tungstenite::connect_async(request))
                .await
                .expect("connect in time")
                .expect("WebSocket handshake");
        let mut client = WsClient {
            stream,
            connected: Value::Null,
        };
        client.connected = client.next_json().await;
        assert_eq!(client.connected["type"], "connected");
        client
    }

    /// Sends a JSON frame.
    pub async fn send_json(&mut self, frame: Value) {
        self.stream
            .send(Message::text(frame.to_string()))
            .await
            .expect("send");
    }

    /// Sends any message.
    pub async fn send(&mut self, message: Message) {
        self.stream.send(message).await.expect("send");
    }

    /// The next event, skipping pongs; `None` when the stream ended.
    pub async fn next_event(&mut self) -> Option<WsEvent> {
        loop {
            let message = tokio::time::timeout(EVENT_TIMEOUT, self.stream.next())
                .await
                .expect("a frame in time")?;
            return Some(match message {
                Ok(Message::Text(text)) => {
                    WsEvent::Json(serde_json::from_str(&text).expect("server sends JSON"))
                }
                Ok(Message::Binary(bytes)) => WsEvent::Binary(bytes),
                Ok(Message::Close(frame)) => WsEvent::Close(frame.map(|f| u16::from(f.code))),
                Ok(Message::Ping(_)) => WsEvent::Ping,
                Ok(Message::Pong(_) | Message::Frame(_)) => continue,
                Err(_) => return None,
            });
        }
    }

    /// The next JSON frame, skipping pings.
    pub async fn next_json(&mut self) -> Value {
        loop {
            match self.next_event().await {
                Some(WsEvent::Json(value)) => return value,
                Some(WsEvent::Ping) => continue,
                other => panic!("expected a JSON frame, got {other:?}"),
            }
        }
    }

    /// Sends a request and returns the `reply` or `error` with its id, skipping other frames.
    pub async fn request(&mut self, frame: Value, id: u64) -> Value {
        request(self, frame, id).await
    }

    /// Subscribes and returns the reply.
    pub async fn subscribe(&mut self, channel: &str, id: u64) -> Value {
        subscribe(self, channel, id).await
    }
}

/// A raw TCP test client.
#[derive(Debug)]
pub struct TcpClient {
    stream: TcpStream,
    buffer: BytesMut,
    decoder: TcpDecoder,
    /// The `connected` frame.
    pub connected: Value,
}

impl TcpClient {
    /// Connects and reads `connected`.
    pub async fn connect(addr: SocketAddr) -> TcpClient {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let mut client = TcpClient {
            stream,
            buffer: BytesMut::new(),
            decoder: TcpDecoder::new(64 * 1024 * 1024),
            connected: Value::Null,
        };
        client.connected = client.next_json().await;
        assert_eq!(client.connected["type"], "connected");
        client
    }

    /// Writes raw bytes.
    pub async fn write_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Writes raw bytes; false once the connection is closed or broken.
    pub async fn try_write_raw(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok()
    }

    /// Sends a JSON frame in the current framing.
    pub async fn send_json(&mut self, frame: Value) {
        let text = frame.to_string();
        match self.decoder.framing {
            Framing::Lines => {
                let mut line = text.into_bytes();
                line.push(b'\n');
                self.write_raw(&line).await;
            }
            Framing::LengthPrefixed => {
                let frame = duplex_proto::tcp::length_prefixed_text(text.as_bytes());
                self.write_raw(&frame).await;
            }
        }
    }

    /// The next frame; `None` at end of stream.
    pub async fn next_frame(&mut self) -> Option<TcpFrame> {
        tokio::time::timeout(EVENT_TIMEOUT, async {
            loop {
                if let Some(frame) = self
                    .decoder
                    .decode(&mut self.buffer)
                    .expect("valid framing")
                {
                    return Some(frame);
                }
                let read = self.stream.read_buf(&mut self.buffer).await.unwrap_or(0);
                if read == 0 {
                    return None;
                }
            }
        })
        .await
        .expect("a frame in time")
    }

    /// The next JSON frame, skipping keepalive pings.
    pub async fn next_json(&mut self) -> Value {
        loop {
            match self.next_frame().await {
                Some(TcpFrame::Text(text)) => {
                    let value: Value = serde_json::from_slice(&text).expect("server sends JSON");
                    if value["type"] == "ping" {
                        continue;
                    }
                    return value;
                }
                other => panic!("expected a JSON frame, got {other:?}"),
            }
        }
    }

    /// Sends a request and returns the `reply` or `error` with its id, skipping other frames.
    pub async fn request(&mut self, frame: Value, id: u64) -> Value {
        request(self, frame, id).await
    }

    /// Subscribes and returns the reply.
    pub async fn subscribe(&mut self, channel: &str, id: u64) -> Value {
        subscribe(self, channel, id).await
    }

    /// Switches both directions to length-prefixed framing.
    pub async fn switch_to_length_prefixed(&mut self, id: u64) {
        let reply = self
            .request(
                serde_json::json!({"type": "framing", "mode": "length_prefixed"}),
                id,
            )
            .await;
        assert_eq!(reply["type"], "reply", "{reply}");
        self.decoder.framing = Framing::LengthPrefixed;
    }
}
