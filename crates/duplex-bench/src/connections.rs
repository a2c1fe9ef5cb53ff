//! Connection capacity: opens N idle WebSocket connections and reads how much resident memory
//! the server gained per connection, and how fast they connected.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use serde::Serialize;

use crate::peers::Protocol;
use crate::server::usage_of;

/// What to run.
#[derive(Debug, Clone)]
pub struct ConnectionsOptions {
    /// `127.0.0.1:PORT` of the server's HTTP port.
    pub http_addr: String,
    /// The server: duplex, or a peer ([`Protocol`]).
    pub protocol: Protocol,
    /// The server's process id, for its memory.
    pub server_pid: u32,
    /// How many connections.
    pub connections: usize,
    /// How many connect at once.
    pub concurrency: usize,
    /// Connect from 127.0.0.1 … 127.0.0.N in turn (1: the system's choice).
    pub sources: u8,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionsReport {
    /// The server measured.
    pub protocol: Protocol,
    /// Connections held open.
    pub connections: usize,
    /// Connections per second while connecting.
    pub connect_rate: f64,
    /// Server resident memory before, in bytes.
    pub rss_before: u64,
    /// Server resident memory with every connection open, in bytes.
    pub rss_after: u64,
    /// (after − before) / connections.
    pub rss_per_connection: f64,
}

/// Opens the connections, measures, and closes them.
pub async fn run_connections(options: &ConnectionsOptions) -> anyhow::Result<ConnectionsReport> {
    let url = format!("ws://{}{}", options.http_addr, options.protocol.path());
    let protocol = options.protocol;
    let before = usage_of(options.server_pid)?.rss_bytes;
    let started = Instant::now();
    let mut open = Vec::with_capacity(options.connections);
    let server: std::net::SocketAddr = options.http_addr.parse()?;
    let sources = options.sources.max(1);
    let mut pending = futures_util::stream::iter((0..options.connections).map(|i| {
        let url = url.clone();
        async move {
            // Each loopback source address has its own ephemeral ports.
            let socket = tokio::net::TcpSocket::new_v4()?;
            if sources > 1 {
                let host = 1 + (i % usize::from(sources)) as u8;
                socket.bind(std::net::SocketAddr::from(([127, 0, 0, host], 0)))?;
            }
            let stream = socket.connect(server).await?;
            let (mut socket, _) = tokio_tungstenite::client_async(url.as_str(), stream).await?;
            set_up(&mut socket, protocol).await?;
            anyhow::Ok(socket)
        }
    }))
    .buffer_unordered(options.concurrency.max(1));
    while let Some(socket) = pending.next().await {
        open.push(socket?);
    }
    let connecting = started.elapsed();
    // Let the allocator settle: idle connections hold what they will hold.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = usage_of(options.server_pid)?.rss_bytes;
    let report = ConnectionsReport {
        protocol: options.protocol,
        connections: open.len(),
        connect_rate: open.len() as f64 / connecting.as_secs_f64().max(1e-9),
        rss_before: before,
        rss_after: after,
        rss_per_connection: after.saturating_sub(before) as f64 / open.len().max(1) as f64,
    };
    drop(open);
    Ok(report)
}

/// Waits until the server has fully set the connection up: duplex's `connected`; Socket.IO's
/// open packet, then the main namespace joined (`40` both ways); `ws` has nothing past the
/// upgrade.
async fn set_up<S>(
    socket: &mut tokio_tungstenite::WebSocketStream<S>,
    protocol: Protocol,
) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::SinkExt as _;
    use tokio_tungstenite::tungstenite::Message;
    async fn next_text<S>(
        socket: &mut tokio_tungstenite::WebSocketStream<S>,
    ) -> anyhow::Result<String>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        loop {
            match socket.next().await.context("closed early")?? {
                Message::Text(text) => return Ok(text.as_str().to_owned()),
                Message::Close(_) => anyhow::bail!("closed early"),
                _ => {}
            }
        }
    }
    match protocol {
        Protocol::Duplex => {
            next_text(socket).await?;
        }
        Protocol::Ws => {}
        Protocol::SocketIo => {
            let open = next_text(socket).await?;
            anyhow::ensure!(open.starts_with('0'), "no Engine.IO open packet: {open}");
            socket.send(Message::text("40")).await?;
            let connect = next_text(socket).await?;
            anyhow::ensure!(connect.starts_with("40"), "Socket.IO refused: {connect}");
        }
    }
    Ok(())
}
