//! Fan-out: N subscribers follow one channel while a publisher sends R messages a second of S
//! bytes; reports deliveries per second and publish-to-receipt latency.
//!
//! The publisher is open-loop: publication `i` is due at `start + i / R` and carries that due
//! time, so a server that falls behind shows as latency instead of silently slowing the
//! publisher (no coordinated omission). It runs on a thread of its own and sleeps with the
//! operating system's timer, so a publication leaves within tens of microseconds of its due
//! time instead of tokio's 1 ms timer grain.
//!
//! The client must cost less than the server it measures, or it measures itself: WebSocket
//! subscribers speak the little of RFC 6455 they need ([`crate::lean_ws`]), read whatever the
//! socket holds in one call and look at each frame in place for the only two numbers they need
//! (offset and due time); they run on a runtime of their own (`client_threads` workers;
//! `duplex bench fanout --client-threads`, 2 by default).
//! [`Transport::Floor`] measures the same subscribers against no server at all: the kernel's
//! share of every figure.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

use crate::lean_ws;

/// How subscribers connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// WebSocket at `/ws`.
    Websocket,
    /// Raw TCP in line mode.
    Tcp,
    /// No server: plain threads write each publication to loopback sockets with one `write`
    /// per socket, read by the same subscribers — what the kernel alone costs ([`run_floor`]).
    Floor,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct FanoutOptions {
    /// `127.0.0.1:PORT` of the server's HTTP port.
    pub http_addr: String,
    /// `127.0.0.1:PORT` of the server's raw TCP port.
    pub tcp_addr: String,
    /// How many subscribers.
    pub subscribers: usize,
    /// Publications per second.
    pub rate: u32,
    /// Payload size in bytes (approximate: the JSON data object is padded to it).
    pub size: usize,
    /// How long the publisher publishes.
    pub duration: Duration,
    /// Subscriber transport.
    pub transport: Transport,
    /// Threads the subscribers run on.
    pub client_threads: usize,
    /// `127.0.0.1:PORT` of the HTTP port the publisher uses, when it is another node of the
    /// same cluster (cross-node delivery); `None`: the subscribers' server.
    pub publish_addr: Option<String>,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutReport {
    /// Subscriber transport.
    pub transport: Transport,
    /// Subscribers.
    pub subscribers: usize,
    /// Publications per second asked for.
    pub rate: u32,
    /// Payload bytes.
    pub size: usize,
    /// Publications sent.
    pub publications: u64,
    /// Messages received by all subscribers.
    pub deliveries: u64,
    /// Deliveries per second over the publishing time.
    pub deliveries_per_second: f64,
    /// Latency percentiles in milliseconds.
    pub latency_ms: Percentiles,
    /// Publications a subscriber never received (gaps and a missing tail).
    pub missed: u64,
    /// Publications a subscriber received twice or out of order.
    pub duplicated: u64,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

#[derive(Debug)]
struct SubscriberStats {
    received: u64,
    missed: u64,
    duplicated: u64,
    last_offset: u64,
    latency_us: Histogram<u64>,
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The unsigned integer after `key` in `text`.
fn number_after(text: &[u8], key: &[u8]) -> Option<u64> {
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
    fn new() -> anyhow::Result<Self> {
        Ok(SubscriberStats {
            received: 0,
            missed: 0,
            duplicated: 0,
            last_offset: 0,
            latency_us: Histogram::new_with_bounds(1, 600_000_000, 2)?,
        })
    }

    /// Counts publications after the last one received as missed.
    fn count_missing_tail(&mut self, last: u64) {
        if self.last_offset < last {
            self.missed += last - self.last_offset;
        }
    }

    /// Records one `message` frame.
    fn record(&mut self, frame: &[u8]) {
        let (Some(offset), Some(sent)) = (
            number_after(frame, b"\"offset\":"),
            number_after(frame, b"\"t\":"),
        ) else {
            return;
        };
        self.received += 1;
        if offset <= self.last_offset {
            self.duplicated += 1;
            return;
        }
        self.missed += offset - self.last_offset - 1;
        self.last_offset = offset;
        let latency = now_micros().saturating_sub(sent).max(1);
        let _ = self.latency_us.record(latency.min(600_000_000));
    }
}

/// A WebSocket subscriber on the lean client ([`crate::lean_ws`]): one read takes whatever
/// the socket holds, and every frame in it is looked at in place.
async fn ws_subscriber(
    addr: String,
    channel: String,
    ready: tokio::sync::mpsc::Sender<()>,
    last: u64,
    stop: tokio::sync::watch::Receiver<u64>,
) -> anyhow::Result<SubscriberStats> {
    let mut socket = LeanSocket::connect(&addr).await?;
    let subscribe = format!(r#"{{"type":"subscribe","id":1,"channel":"{channel}"}}"#);
    socket.send(lean_ws::OP_TEXT, subscribe.as_bytes()).await?;
    loop {
        let (opcode, payload) = socket
            .next_frame()
            .await?
            .context("closed before the reply")?;
        let payload = &socket.buf[payload];
        if opcode == lean_ws::OP_TEXT && contains(payload, b"\"reply\"") {
            break;
        }
        if opcode == lean_ws::OP_TEXT && contains(payload, b"\"error\"") {
            bail!("subscribe failed: {}", String::from_utf8_lossy(payload));
        }
    }
    ready.send(()).await.ok();
    drop(ready);
    let mut stats = SubscriberStats::new()?;
    let mut stop = stop;
    'read: while stats.last_offset < last {
        // Every whole frame already read, then one more read.
        while let Some((opcode, payload)) = socket.buffered_frame()? {
            match opcode {
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

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A client WebSocket over a tokio `TcpStream`: a read buffer and the position of the next
/// unread frame in it.
struct LeanSocket {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Where the next unread frame starts in `buf`.
    at: usize,
}

impl LeanSocket {
    /// Connects and upgrades `GET /ws` on `addr`.
    async fn connect(addr: &str) -> anyhow::Result<LeanSocket> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        stream
            .write_all(lean_ws::upgrade_request(addr, "/ws").as_bytes())
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

    async fn send(&mut self, opcode: u8, payload: &[u8]) -> anyhow::Result<()> {
        let mut frame = Vec::with_capacity(payload.len() + 14);
        lean_ws::client_frame(&mut frame, opcode, payload);
        self.stream.write_all(&frame).await?;
        Ok(())
    }

    /// The next whole frame in the buffer (opcode, where its payload is), if any.
    fn buffered_frame(&mut self) -> anyhow::Result<Option<(u8, std::ops::Range<usize>)>> {
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
    async fn next_frame(&mut self) -> anyhow::Result<Option<(u8, std::ops::Range<usize>)>> {
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
    async fn fill(&mut self) -> anyhow::Result<bool> {
        use tokio::io::AsyncReadExt as _;
        self.buf.drain(..self.at);
        self.at = 0;
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(self.buf.capacity().max(16 * 1024));
        }
        Ok(self.stream.read_buf(&mut self.buf).await? > 0)
    }
}

/// The publisher, on a thread of its own with a blocking socket: it sleeps to each due time with
/// the operating system's timer (tokio's has a 1 ms grain, which would add up to a millisecond
/// to every latency) and writes the frame. A second thread reads and drops the replies.
fn publish(
    addr: &str,
    channel: &str,
    publications: u64,
    rate: u32,
    size: usize,
) -> anyhow::Result<Published> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    stream.write_all(lean_ws::upgrade_request(addr, "/ws").as_bytes())?;
    let mut head = Vec::new();
    let mut chunk = [0u8; 4096];
    while lean_ws::upgrade_response(&head)?.is_none() {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!("the publisher's connection closed during the upgrade");
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let mut replies = stream.try_clone()?;
    let drain =
        std::thread::spawn(move || while matches!(replies.read(&mut chunk), Ok(n) if n > 0) {});

    let padding = "x".repeat(size.saturating_sub(24));
    let mut text = String::with_capacity(size + 128);
    let mut frame = Vec::with_capacity(size + 256);
    let timing = Timing::new(rate);
    for i in 0..publications {
        timing.sleep_until_due(i);
        let due_micros = timing.start_micros + timing.due(i).as_micros() as u64;
        text.clear();
        use std::fmt::Write as _;
        let _ = write!(
            text,
            r#"{{"type":"publish","id":{i},"channel":"{channel}","data":{{"t":{due_micros},"p":"{padding}"}}}}"#
        );
        frame.clear();
        lean_ws::client_frame(&mut frame, lean_ws::OP_TEXT, text.as_bytes());
        // Sent at once: each publication leaves at its due time.
        stream.write_all(&frame)?;
    }
    Ok(Published {
        publishing: timing.start.elapsed(),
        stream,
        drain,
    })
}

/// A publisher done publishing; its connection stays open until [`Published::close`] so that
/// the server does not count a closing publisher against the tail of the run.
struct Published {
    /// From the first due time to the last write.
    publishing: Duration,
    stream: std::net::TcpStream,
    drain: std::thread::JoinHandle<()>,
}

impl Published {
    fn close(self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        let _ = self.drain.join();
    }
}

async fn tcp_subscriber(
    addr: String,
    channel: String,
    ready: tokio::sync::mpsc::Sender<()>,
    last: u64,
    stop: tokio::sync::watch::Receiver<u64>,
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
    let stats = read_lines(lines, last, stop).await;
    drop(write);
    stats
}

/// Reads `message` lines until offset `last` (or `stop`), recording each.
async fn read_lines<R: tokio::io::AsyncRead + Unpin>(
    mut lines: BufReader<R>,
    last: u64,
    mut stop: tokio::sync::watch::Receiver<u64>,
) -> anyhow::Result<SubscriberStats> {
    let mut stats = SubscriberStats::new()?;
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

/// Runs one fan-out measurement.
///
/// The subscribers run on a runtime of their own (`client_threads` workers) and the publisher
/// on a thread of its own, so the publisher's timing does not depend on how busy the
/// subscribers are.
pub async fn run_fanout(options: &FanoutOptions) -> anyhow::Result<FanoutReport> {
    if options.transport == Transport::Floor {
        return run_floor(options).await;
    }
    let channel = format!("bench:fanout-{}", now_micros());
    let publications = publications_of(options)?;
    let runtime = subscribers_runtime(options.client_threads)?;
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(options.subscribers.max(1));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(0u64);
    let mut subscribers = Vec::with_capacity(options.subscribers);
    for _ in 0..options.subscribers {
        let ready = ready_tx.clone();
        let stop = stop_rx.clone();
        let channel = channel.clone();
        subscribers.push(match options.transport {
            Transport::Websocket => runtime.spawn(ws_subscriber(
                options.http_addr.clone(),
                channel,
                ready,
                publications,
                stop,
            )),
            // (The floor returned above; it reads as raw TCP does.)
            Transport::Tcp | Transport::Floor => runtime.spawn(tcp_subscriber(
                options.tcp_addr.clone(),
                channel,
                ready,
                publications,
                stop,
            )),
        });
    }
    drop(ready_tx);
    let driven = Driven::start(runtime)?;
    let measured = async {
        crate::runs::wait_ready(&mut ready_rx, options.subscribers, "subscribers").await?;
        // The publisher: open-loop, each publication stamped with its due time.
        let publish_addr = options
            .publish_addr
            .clone()
            .unwrap_or_else(|| options.http_addr.clone());
        let (rate, size) = (options.rate, options.size);
        let channel = channel.clone();
        let published = tokio::task::spawn_blocking(move || {
            publish(&publish_addr, &channel, publications, rate, size)
        })
        .await??;
        // Let the tail arrive, but not forever.
        let all = crate::runs::collect_within(subscribers, Duration::from_secs(5), || {
            stop_tx.send(1).ok();
        })
        .await;
        let publishing = published.publishing;
        tokio::task::spawn_blocking(move || published.close()).await?;
        anyhow::Ok((all?, publishing))
    }
    .await;
    driven.finish();
    let (all, publishing) = measured?;
    report_of(options, publications, publishing, &all)
}

/// How many publications a run sends.
fn publications_of(options: &FanoutOptions) -> anyhow::Result<u64> {
    let publications = (u128::from(options.rate) * options.duration.as_millis() / 1000) as u64;
    if publications == 0 {
        bail!("rate × duration is less than one publication");
    }
    Ok(publications)
}

/// The subscribers' runtime: `threads` workers of its own.
fn subscribers_runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name("bench-subscriber")
        .enable_all()
        .build()
        .context("cannot start the subscribers' runtime")
}

/// A runtime driven by a thread of its own until [`Driven::finish`], which drops it (and any
/// task still on it).
struct Driven {
    done: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Driven {
    fn start(runtime: tokio::runtime::Runtime) -> anyhow::Result<Driven> {
        let (done, stop) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bench-subscribers".into())
            .spawn(move || {
                let _ = runtime.block_on(stop);
            })?;
        Ok(Driven { done, thread })
    }

    fn finish(self) {
        let _ = self.done.send(());
        let _ = self.thread.join();
    }
}

/// The floor under every fan-out figure on this machine: no server at all. Plain threads (one
/// per core, as a server's runtime has) write each publication — a `message` line as duplex's
/// raw TCP sends it, stamped with its due time — to every loopback socket with one blocking
/// `write` each, what fell due during a turn going out together; the subscribers read lines as
/// [`Transport::Tcp`]'s do. Whatever a server adds (framing, queues, wake-ups) comes on top.
async fn run_floor(options: &FanoutOptions) -> anyhow::Result<FanoutReport> {
    let publications = publications_of(options)?;
    let runtime = subscribers_runtime(options.client_threads)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(0u64);
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut sockets = Vec::with_capacity(options.subscribers);
    let mut subscribers = Vec::with_capacity(options.subscribers);
    for _ in 0..options.subscribers {
        let client = std::net::TcpStream::connect(addr)?;
        client.set_nodelay(true)?;
        client.set_nonblocking(true)?;
        let (server, _) = listener.accept()?;
        server.set_nodelay(true)?;
        sockets.push(server);
        let stop = stop_rx.clone();
        subscribers.push(runtime.spawn(async move {
            let stream = TcpStream::from_std(client)?;
            read_lines(
                BufReader::with_capacity(16 * 1024, stream),
                publications,
                stop,
            )
            .await
        }));
    }
    let driven = Driven::start(runtime)?;
    let (rate, size) = (options.rate, options.size);
    let measured = async {
        let publishing =
            tokio::task::spawn_blocking(move || write_floor(sockets, publications, rate, size))
                .await??;
        let all = crate::runs::collect_within(subscribers, Duration::from_secs(5), || {
            stop_tx.send(1).ok();
        })
        .await?;
        anyhow::Ok((all, publishing))
    }
    .await;
    driven.finish();
    let (all, publishing) = measured?;
    report_of(options, publications, publishing, &all)
}

/// The floor's writers: one thread per core, each with its share of the sockets.
fn write_floor(
    mut sockets: Vec<std::net::TcpStream>,
    publications: u64,
    rate: u32,
    size: usize,
) -> anyhow::Result<Duration> {
    let writers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let share = sockets.len().div_ceil(writers).max(1);
    let timing = Timing::new(rate);
    let padding = "x".repeat(size.saturating_sub(24));
    std::thread::scope(|scope| {
        let writers: Vec<_> = sockets
            .chunks_mut(share)
            .map(|share| scope.spawn(|| floor_turns(share, publications, &timing, &padding)))
            .collect();
        for writer in writers {
            writer
                .join()
                .map_err(|_| anyhow::anyhow!("a floor writer panicked"))??;
        }
        anyhow::Ok(())
    })?;
    Ok(timing.start.elapsed())
}

/// When publication `i` is due: `start + i × interval`.
struct Timing {
    start: Instant,
    start_micros: u64,
    interval: Duration,
}

impl Timing {
    /// Publication 0 is due now.
    fn new(rate: u32) -> Timing {
        Timing {
            start: Instant::now(),
            start_micros: now_micros(),
            interval: Duration::from_secs(1) / rate.max(1),
        }
    }

    /// How long after the start publication `i` is due.
    fn due(&self, i: u64) -> Duration {
        self.interval * u32::try_from(i).unwrap_or(u32::MAX)
    }

    /// Sleeps (on the OS timer) until publication `i` is due.
    fn sleep_until_due(&self, i: u64) {
        let wait = (self.start + self.due(i)).saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

/// One floor writer: sleeps to the next due time, then writes everything due by then to each
/// of its sockets in one `write`.
fn floor_turns(
    sockets: &mut [std::net::TcpStream],
    publications: u64,
    timing: &Timing,
    padding: &str,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut lines = Vec::new();
    let mut next = 0;
    while next < publications {
        timing.sleep_until_due(next);
        let due_now = timing.start.elapsed().as_nanos() / timing.interval.as_nanos().max(1);
        let due_now = (due_now as u64 + 1).min(publications);
        lines.clear();
        for i in next..due_now {
            let t = timing.start_micros + timing.due(i).as_micros() as u64;
            let offset = i + 1;
            writeln!(
                lines,
                r#"{{"type":"message","channel":"floor","offset":{offset},"data":{{"t":{t},"p":"{padding}"}}}}"#
            )?;
        }
        next = due_now;
        for socket in sockets.iter_mut() {
            socket.write_all(&lines)?;
        }
    }
    Ok(())
}

/// Sums what every subscriber recorded.
fn report_of(
    options: &FanoutOptions,
    publications: u64,
    publishing: Duration,
    all: &[SubscriberStats],
) -> anyhow::Result<FanoutReport> {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 2)?;
    let (mut deliveries, mut missed, mut duplicated) = (0, 0, 0);
    for stats in all {
        histogram.add(&stats.latency_us)?;
        deliveries += stats.received;
        missed += stats.missed;
        duplicated += stats.duplicated;
    }
    let ms = |micros: u64| micros as f64 / 1000.0;
    Ok(FanoutReport {
        transport: options.transport,
        subscribers: options.subscribers,
        rate: options.rate,
        size: options.size,
        publications,
        deliveries,
        deliveries_per_second: deliveries as f64 / publishing.as_secs_f64().max(1e-9),
        latency_ms: Percentiles {
            p50: ms(histogram.value_at_quantile(0.50)),
            p90: ms(histogram.value_at_quantile(0.90)),
            p99: ms(histogram.value_at_quantile(0.99)),
            max: ms(histogram.max()),
        },
        missed,
        duplicated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_read_after_their_keys() {
        let frame = br#"{"type":"message","channel":"b:f","offset":42,"data":{"t":1700000000000001,"p":"x"}}"#;
        assert_eq!(number_after(frame, b"\"offset\":"), Some(42));
        assert_eq!(number_after(frame, b"\"t\":"), Some(1_700_000_000_000_001));
        assert_eq!(number_after(frame, b"\"missing\":"), None);
    }

    #[test]
    fn gaps_and_repeats_are_counted() {
        let mut stats = SubscriberStats::new().expect("histogram");
        for offset in [1, 2, 4, 4, 3, 5] {
            let frame = format!(r#"{{"offset":{offset},"data":{{"t":1}}}}"#);
            stats.record(frame.as_bytes());
        }
        assert_eq!(stats.received, 6);
        assert_eq!(stats.missed, 1);
        assert_eq!(stats.duplicated, 2);
        assert_eq!(stats.last_offset, 5);
    }
}
