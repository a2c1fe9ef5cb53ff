//! The subscribers of a fan-out run: lean WebSocket and raw TCP readers that look at each frame
//! in place for its offset and due time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

use crate::lean_ws;
use crate::peers::Protocol;

/// When the run's first and last publications are due (wall-clock microseconds), set by the
/// publisher as it starts: 0 until then.
#[derive(Debug, Clone, Default)]
pub(crate) struct DueTimes(Arc<(AtomicU64, AtomicU64)>);

impl DueTimes {
    pub(crate) fn set(&self, first_micros: u64, last_micros: u64) {
        self.0.0.store(first_micros, Ordering::Release);
        self.0.1.store(last_micros, Ordering::Release);
    }

    pub(crate) fn first(&self) -> u64 {
        self.0.0.load(Ordering::Acquire)
    }

    pub(crate) fn last(&self) -> u64 {
        self.0.1.load(Ordering::Acquire)
    }
}

#[derive(Debug)]
pub(super) struct SubscriberStats {
    /// Publications received in order, each once (duplicates and late repeats not counted).
    pub(super) received: u64,
    pub(super) missed: u64,
    /// Publications received again, or after a later one.
    pub(super) duplicated: u64,
    /// Of `received`, those that arrived after the last publication was due.
    pub(super) after_publishing: u64,
    /// When the latest of `received` arrived (wall-clock microseconds; 0: none).
    pub(super) last_at_micros: u64,
    pub(super) last_offset: u64,
    pub(super) latency_us: Histogram<u64>,
    due: DueTimes,
}

pub(super) fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The unsigned integer after `key` in `text`.
pub(super) fn number_after(text: &[u8], key: &[u8]) -> Option<u64> {
    let start = text.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = text[start..].iter().take_while(|b| b.is_ascii_digit());
    let mut value: u64 = 0;
    let mut any = false;
    for digit in digits {
        value = value
            .checked_mul(10)?
            .checked_add(u64::from(digit - b'0'))?;
        any = true;
    }
    any.then_some(value)
}

impl SubscriberStats {
    pub(super) fn new(due: DueTimes) -> anyhow::Result<Self> {
        Ok(SubscriberStats {
            received: 0,
            missed: 0,
            duplicated: 0,
            after_publishing: 0,
            last_at_micros: 0,
            last_offset: 0,
            latency_us: Histogram::new_with_bounds(1, 600_000_000, 2)?,
            due,
        })
    }

    /// Counts publications after the last one received as missed.
    pub(super) fn count_missing_tail(&mut self, last: u64) {
        if self.last_offset < last {
            self.missed += last - self.last_offset;
        }
    }

    /// Records one `message` frame.
    pub(super) fn record(&mut self, frame: &[u8]) {
        let (Some(offset), Some(sent)) = (
            number_after(frame, b"\"offset\":"),
            number_after(frame, b"\"t\":"),
        ) else {
            return;
        };
        if offset <= self.last_offset {
            self.duplicated += 1;
            return;
        }
        self.received += 1;
        self.missed += offset - self.last_offset - 1;
        self.last_offset = offset;
        let now = now_micros();
        self.last_at_micros = now;
        let last_due = self.due.last();
        if last_due != 0 && now > last_due {
            self.after_publishing += 1;
        }
        let latency = now.saturating_sub(sent).max(1);
        let _ = self.latency_us.record(latency.min(600_000_000));
    }
}

/// A WebSocket subscriber on the lean client ([`crate::lean_ws`]): one read takes whatever
/// the socket holds, and every frame in it is looked at in place. It speaks `protocol`'s
/// handshake (duplex, or a peer's: [`Protocol`]).
pub(super) async fn ws_subscriber(
    addr: String,
    protocol: Protocol,
    channel: String,
    ready: tokio::sync::mpsc::Sender<()>,
    last: u64,
    stop: tokio::sync::watch::Receiver<u64>,
    due: DueTimes,
) -> anyhow::Result<SubscriberStats> {
    let mut socket = LeanSocket::connect(&addr, protocol.path()).await?;
    join(&mut socket, protocol, &channel).await?;
    ready.send(()).await.ok();
    drop(ready);
    let mut stats = SubscriberStats::new(due)?;
    let mut stop = stop;
    'read: while stats.last_offset < last {
        // Every whole frame already read, then one more read.
        while let Some((opcode, payload)) = socket.buffered_frame()? {
            match opcode {
                lean_ws::OP_TEXT if protocol.is_ping(&socket.buf[payload.clone()]) => {
                    socket.send(lean_ws::OP_TEXT, b"3").await?;
                }
                lean_ws::OP_TEXT => stats.record(&socket.buf[payload]),
                lean_ws::OP_PING => {
                    let data = socket.buf[payload].to_vec();
                    socket.send(lean_ws::OP_PONG, &data).await?;
                }
                lean_ws::OP_CLOSE => break 'read,
                _ => {}
            }
        }
        if stats.last_offset >= last {
            break;
        }
        tokio::select! {
            read = socket.fill() => if !read? { break },
            _ = stop.changed() => break,
        }
    }
    stats.count_missing_tail(last);
    Ok(stats)
}

/// Subscribes to `channel` the way `protocol` does, returning once the server confirmed it
/// (`ws` has no subscription: every open client receives).
async fn join(socket: &mut LeanSocket, protocol: Protocol, channel: &str) -> anyhow::Result<()> {
    match protocol {
        Protocol::Duplex => {
            let subscribe = format!(r#"{{"type":"subscribe","id":1,"channel":"{channel}"}}"#);
            socket.send(lean_ws::OP_TEXT, subscribe.as_bytes()).await?;
            let reply = socket
                .text_where(protocol, |text| {
                    contains(text, b"\"reply\"") || contains(text, b"\"error\"")
                })
                .await?;
            if contains(&reply, b"\"error\"") {
                bail!("subscribe failed: {}", String::from_utf8_lossy(&reply));
            }
        }
        Protocol::Ws => {}
        Protocol::SocketIo => {
            // The Engine.IO open packet, then the main namespace, then the room.
            socket
                .text_where(protocol, |text| text.starts_with(b"0"))
                .await?;
            socket.send(lean_ws::OP_TEXT, b"40").await?;
            let connect = socket
                .text_where(protocol, |text| text.starts_with(b"4"))
                .await?;
            if !connect.starts_with(b"40") {
                bail!(
                    "Socket.IO refused the namespace: {}",
                    String::from_utf8_lossy(&connect)
                );
            }
            let subscribe = format!(r#"421["subscribe","{channel}"]"#);
            socket.send(lean_ws::OP_TEXT, subscribe.as_bytes()).await?;
            socket
                .text_where(protocol, |text| text.starts_with(b"431"))
                .await?;
        }
    }
    Ok(())
}

pub(super) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A client WebSocket over a tokio `TcpStream`: a read buffer and the position of the next
/// unread frame in it.
pub(super) struct LeanSocket {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Where the next unread frame starts in `buf`.
    at: usize,
}

impl LeanSocket {
    /// Connects and upgrades `GET path` on `addr`.
    pub(super) async fn connect(addr: &str, path: &str) -> anyhow::Result<LeanSocket> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        stream
            .write_all(lean_ws::upgrade_request(addr, path).as_bytes())
            .await?;
        let mut socket = LeanSocket {
            stream,
            buf: Vec::with_capacity(16 * 1024),
            at: 0,
        };
        loop {
            if !socket.fill().await? {
                bail!("closed during the upgrade");
            }
            if let Some(head) = lean_ws::upgrade_response(&socket.buf)? {
                socket.at = head;
                return Ok(socket);
            }
        }
    }

    /// The next text frame that `wanted` accepts, answering pings on the way and skipping
    /// other frames; an error if the server closes first.
    async fn text_where(
        &mut self,
        protocol: Protocol,
        wanted: impl Fn(&[u8]) -> bool,
    ) -> anyhow::Result<Vec<u8>> {
        loop {
            let (opcode, payload) = self
                .next_frame()
                .await?
                .context("closed during the handshake")?;
            let text = &self.buf[payload];
            match opcode {
                lean_ws::OP_TEXT if wanted(text) => return Ok(text.to_vec()),
                lean_ws::OP_TEXT if protocol.is_ping(text) => {
                    self.send(lean_ws::OP_TEXT, b"3").await?;
                }
                lean_ws::OP_CLOSE => bail!("closed during the handshake"),
                _ => {}
            }
        }
    }

    pub(super) async fn send(&mut self, opcode: u8, payload: &[u8]) -> anyhow::Result<()> {
        let mut frame = Vec::with_capacity(payload.len() + 14);
        lean_ws::client_frame(&mut frame, opcode, payload);
        self.stream.write_all(&frame).await?;
        Ok(())
    }

    /// The next whole frame in the buffer (opcode, where its payload is), if any.
    pub(super) fn buffered_frame(
        &mut self,
    ) -> anyhow::Result<Option<(u8, std::ops::Range<usize>)>> {
        let Some(frame) = lean_ws::server_frame(&self.buf[self.at..])? else {
            return Ok(None);
        };
        if !frame.fin || frame.opcode == 0 {
            bail!("the bench client does not read fragmented messages");
        }
        let payload = self.at + frame.payload.start..self.at + frame.payload.end;
        self.at = payload.end;
        Ok(Some((frame.opcode, payload)))
    }

    /// The next frame, reading as needed; `None` once the server closed the connection.
    pub(super) async fn next_frame(
        &mut self,
    ) -> anyhow::Result<Option<(u8, std::ops::Range<usize>)>> {
        loop {
            if let Some(frame) = self.buffered_frame()? {
                return Ok(Some(frame));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// Drops what was read, then reads once more; false at end of stream.
    pub(super) async fn fill(&mut self) -> anyhow::Result<bool> {
        use tokio::io::AsyncReadExt as _;
        self.buf.drain(..self.at);
        self.at = 0;
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(self.buf.capacity().max(16 * 1024));
        }
        Ok(self.stream.read_buf(&mut self.buf).await? > 0)
    }
}

pub(super) async fn tcp_subscriber(
    addr: String,
    channel: String,
    ready: tokio::sync::mpsc::Sender<()>,
    last: u64,
    stop: tokio::sync::watch::Receiver<u64>,
    due: DueTimes,
) -> anyhow::Result<SubscriberStats> {
    let stream = TcpStream::connect(&addr).await?;
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::with_capacity(16 * 1024, read);
    let subscribe = format!("{{\"type\":\"subscribe\",\"id\":1,\"channel\":\"{channel}\"}}\n");
    write.write_all(subscribe.as_bytes()).await?;
    let mut line = Vec::new();
    loop {
        line.clear();
        if lines.read_until(b'\n', &mut line).await? == 0 {
            bail!("closed before the reply");
        }
        if line.windows(7).any(|w| w == b"\"reply\"") {
            break;
        }
    }
    ready.send(()).await.ok();
    drop(ready);
    let stats = read_lines(lines, last, stop, due).await;
    drop(write);
    stats
}

/// Reads `message` lines until offset `last` (or `stop`), recording each.
pub(super) async fn read_lines<R: tokio::io::AsyncRead + Unpin>(
    mut lines: BufReader<R>,
    last: u64,
    mut stop: tokio::sync::watch::Receiver<u64>,
    due: DueTimes,
) -> anyhow::Result<SubscriberStats> {
    let mut stats = SubscriberStats::new(due)?;
    let mut line = Vec::new();
    while stats.last_offset < last {
        line.clear();
        tokio::select! {
            read = lines.read_until(b'\n', &mut line) => match read {
                Ok(n) if n > 0 => {
                    if line.starts_with(b"{\"type\":\"message\"") {
                        stats.record(&line);
                    }
                }
                _ => break,
            },
            _ = stop.changed() => break,
        }
    }
    stats.count_missing_tail(last);
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn numbers_are_read_after_their_keys() {
        let frame = br#"{"type":"message","channel":"b:f","offset":42,"data":{"t":1700000000000001,"p":"x"}}"#;
        assert_eq!(number_after(frame, b"\"offset\":"), Some(42));
        assert_eq!(number_after(frame, b"\"t\":"), Some(1_700_000_000_000_001));
        assert_eq!(number_after(frame, b"\"missing\":"), None);
    }

    #[test]
    pub(super) fn gaps_and_repeats_are_counted_apart_from_deliveries() {
        let mut stats = SubscriberStats::new(DueTimes::default()).expect("histogram");
        for offset in [1, 2, 4, 4, 3, 5] {
            let frame = format!(r#"{{"offset":{offset},"data":{{"t":1}}}}"#);
            stats.record(frame.as_bytes());
        }
        // 4 again and 3 after 4 are not deliveries: four publications arrived in order.
        assert_eq!(stats.received, 4);
        assert_eq!(stats.missed, 1);
        assert_eq!(stats.duplicated, 2);
        assert_eq!(stats.last_offset, 5);
        assert_eq!(stats.after_publishing, 0, "no publisher said when it ends");
        assert!(stats.last_at_micros > 0);
    }

    #[test]
    pub(super) fn deliveries_after_the_last_due_time_are_counted_as_such() {
        let due = DueTimes::default();
        let mut stats = SubscriberStats::new(due.clone()).expect("histogram");
        due.set(1, now_micros() + 60_000_000);
        stats.record(br#"{"offset":1,"data":{"t":1}}"#);
        due.set(1, now_micros().saturating_sub(1));
        stats.record(br#"{"offset":2,"data":{"t":1}}"#);
        stats.record(br#"{"offset":3,"data":{"t":1}}"#);
        assert_eq!((stats.received, stats.after_publishing), (3, 2));
    }
}
