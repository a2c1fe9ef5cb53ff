//! A soak: thousands of clients on WebSocket, raw TCP, Server-Sent Events and long polling
//! that come and go for a long time while publishers publish, every one of them checking what
//! it receives, and the server's resources sampled all along.
//!
//! Each client follows one channel in sessions: it subscribes (the first time fresh, then
//! `since` the last offset it has, with that offset's epoch), receives for a few seconds, and
//! then drops its connection without a word (no close frame, no unsubscribe) or leaves
//! cleanly, pauses, and comes back. Its checker holds the promise of the protocol: within an
//! epoch every offset once and in order, a resumption that says `recovered: true` continues
//! exactly after `since`, and a gap only where the server said `recovered: false`. At the end
//! (publishers stopped first), every client still connected has reached the last offset its
//! channel's publisher had acknowledged.
//!
//! Every `sample_every` the server's RSS, open descriptors, threads, connections and queued
//! bytes are read. After the warm-up, a memory or descriptor count that keeps growing (the
//! least-squares slope over the rest of the run, not a single high reading) fails the run, as
//! does any failed check.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::server::usage_of;

/// One server the clients use.
#[derive(Debug, Clone)]
pub struct Node {
    /// Its HTTP address (`127.0.0.1:PORT`).
    pub http_addr: String,
    /// Its raw TCP address.
    pub tcp_addr: String,
}

/// What a soak does.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// The servers: each session of a client goes to the next one (a soak has one; the chaos
    /// run several nodes of one cluster).
    pub nodes: Vec<Node>,
    /// The (first) server's process id, for RSS, descriptors and threads.
    pub pid: u32,
    /// How long clients come and go.
    pub duration: Duration,
    /// Clients at once (each in sessions, one channel each).
    pub clients: usize,
    /// Channels (`bench:soak-N`) the clients and publishers share.
    pub channels: usize,
    /// Publications per second, over all channels.
    pub rate: u32,
    /// How often the server's resources are read.
    pub sample_every: Duration,
    /// Samples before this are not judged (the server fills its pools and caches).
    pub warmup: Duration,
    /// A session lasts a random time up to this.
    pub max_session: Duration,
    /// How long after the publishers stop every connected client must have caught up.
    pub settle: Duration,
}

/// One reading of the server.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the start.
    pub at_seconds: f64,
    /// Resident memory.
    pub rss_bytes: u64,
    /// Open file descriptors.
    pub fds: u64,
    /// Threads.
    pub threads: u64,
    /// Open socket connections and event streams (`duplex_connections`).
    pub connections: u64,
    /// Long polls waiting (`duplex_long_polls`).
    pub long_polls: u64,
    /// Bytes queued for connections (`duplex_queued_bytes`).
    pub queued_bytes: u64,
}

/// What a soak found.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    /// Seconds it ran.
    pub seconds: f64,
    /// Clients at once.
    pub clients: usize,
    /// What the clients and the publisher counted.
    pub counts: LoadCounts,
    /// The server's readings.
    pub samples: Vec<Sample>,
    /// RSS growth over the judged part of the run, from the least-squares slope.
    pub rss_growth_bytes: f64,
    /// Descriptor growth over the judged part of the run.
    pub fd_growth: f64,
    /// Why the run failed; empty when it passed.
    pub failures: Vec<String>,
}

impl SoakReport {
    /// Whether every check held and nothing grew.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Counts shared by every client.
#[derive(Default)]
pub(crate) struct Stats {
    sessions: [AtomicU64; 4],
    resumed: AtomicU64,
    recovered: AtomicU64,
    not_recovered: AtomicU64,
    dropped: AtomicU64,
    delivered: AtomicU64,
    published: AtomicU64,
    publish_errors: AtomicU64,
    session_errors: AtomicU64,
    closed: [AtomicU64; 4],
    closes: std::sync::Mutex<Vec<String>>,
    violations: AtomicU64,
    /// The first failed checks, in words.
    examples: std::sync::Mutex<Vec<String>>,
    /// The first errors (sessions that could not start, failed publishes), in words.
    errors: std::sync::Mutex<Vec<String>>,
}

/// What the clients and the publisher counted.
#[derive(Debug, Clone, Serialize)]
pub struct LoadCounts {
    /// Sessions per transport: WebSocket, raw TCP, SSE, long polling.
    pub sessions: [u64; 4],
    /// Sessions that resumed `since` an earlier position.
    pub resumed: u64,
    /// Resumptions told `recovered: true`.
    pub recovered: u64,
    /// Told `recovered: false` (any reason).
    pub not_recovered: u64,
    /// Sessions ended by dropping the connection without closing.
    pub dropped: u64,
    /// Publications acknowledged.
    pub published: u64,
    /// Publishes refused or failed.
    pub publish_errors: u64,
    /// Publications delivered and checked.
    pub delivered: u64,
    /// Sessions that could not start or were refused.
    pub session_errors: u64,
    /// Sessions the server ended (a disconnect, a closed stream), per transport.
    pub closed: [u64; 4],
    /// The first of those, in words.
    pub closes: Vec<String>,
    /// Failed checks.
    pub violations: u64,
    /// The first failed checks, in words.
    pub examples: Vec<String>,
    /// The first sessions that could not start and publishes that failed, in words.
    pub errors: Vec<String>,
}

impl Stats {
    pub(crate) fn counts(&self) -> LoadCounts {
        LoadCounts {
            sessions: std::array::from_fn(|i| self.sessions[i].load(Ordering::Relaxed)),
            resumed: self.resumed.load(Ordering::Relaxed),
            recovered: self.recovered.load(Ordering::Relaxed),
            not_recovered: self.not_recovered.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            published: self.published.load(Ordering::Relaxed),
            publish_errors: self.publish_errors.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            session_errors: self.session_errors.load(Ordering::Relaxed),
            closed: std::array::from_fn(|i| self.closed[i].load(Ordering::Relaxed)),
            closes: self.closes.lock().map(|e| e.clone()).unwrap_or_default(),
            violations: self.violations.load(Ordering::Relaxed),
            examples: self.examples.lock().map(|e| e.clone()).unwrap_or_default(),
            errors: self.errors.lock().map(|e| e.clone()).unwrap_or_default(),
        }
    }

    fn violation(&self, text: String) {
        self.violations.fetch_add(1, Ordering::Relaxed);
        keep(&self.examples, text, 20);
    }

    fn session_error(&self, text: String) {
        self.session_errors.fetch_add(1, Ordering::Relaxed);
        keep(&self.errors, text, 5);
    }
}

/// Keeps the first `limit` of some problems' words.
fn keep(list: &std::sync::Mutex<Vec<String>>, text: String, limit: usize) {
    if let Ok(mut list) = list.lock()
        && list.len() < limit
    {
        list.push(text);
    }
}

/// Where a client is in its channel, and the checks on what arrives.
#[derive(Debug, Default, Clone)]
struct Position {
    epoch: Option<String>,
    last: u64,
    /// The current session was answered (its subscription is live): only then is the client
    /// held to having caught up when the run ends.
    live: bool,
}

impl Position {
    /// The `since` to resume from, once the client has a position.
    fn since(&self) -> Option<(u64, String)> {
        self.epoch.clone().map(|epoch| (self.last, epoch))
    }

    /// A subscription's answer (`result` of the reply, or SSE's `subscribed`), to a subscribe
    /// `since` `asked` (or fresh).
    fn on_reply(
        &mut self,
        result: &Value,
        asked: Option<&(u64, String)>,
        stats: &Stats,
        who: &str,
    ) {
        let offset = result["offset"].as_u64().unwrap_or(0);
        let epoch = result["epoch"].as_str().unwrap_or_default().to_owned();
        match (asked, result["recovered"].as_bool()) {
            (Some((since, asked_epoch)), Some(true)) => {
                stats.recovered.fetch_add(1, Ordering::Relaxed);
                // Offset 0 is "from the beginning", good in any epoch.
                if (*since > 0 && *asked_epoch != epoch) || offset < *since {
                    stats.violation(format!(
                        "{who}: recovered from {since}@{asked_epoch} into {offset}@{epoch}"
                    ));
                }
                // The replay follows: from `since` on.
                self.last = *since;
            }
            (Some(_), Some(false)) => {
                stats.not_recovered.fetch_add(1, Ordering::Relaxed);
                self.last = offset.saturating_sub(result["missed"].as_u64().unwrap_or(0));
            }
            (Some(_), None) => {
                stats.violation(format!("{who}: a resumption answered without `recovered`"));
                self.last = offset;
            }
            (None, _) => self.last = offset,
        }
        self.epoch = Some(epoch);
        self.live = true;
    }

    /// A publication at `offset` of the current epoch.
    fn on_message(&mut self, offset: u64, stats: &Stats, who: &str) {
        if offset == self.last + 1 {
            self.last = offset;
            stats.delivered.fetch_add(1, Ordering::Relaxed);
        } else if offset <= self.last {
            stats.violation(format!("{who}: offset {offset} again after {}", self.last));
        } else {
            stats.violation(format!(
                "{who}: a silent gap from {} to {offset}",
                self.last + 1
            ));
            self.last = offset;
        }
    }
}

/// How a client reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    WebSocket,
    Tcp,
    Sse,
    LongPoll,
}

impl Via {
    fn of(client: usize) -> Via {
        match client % 20 {
            0..=7 => Via::WebSocket,
            8..=13 => Via::Tcp,
            14..=16 => Via::Sse,
            _ => Via::LongPoll,
        }
    }

    fn index(self) -> usize {
        match self {
            Via::WebSocket => 0,
            Via::Tcp => 1,
            Via::Sse => 2,
            Via::LongPoll => 3,
        }
    }
}

/// The last acknowledged publication of each channel: (epoch, offset).
type Acked = Arc<Vec<std::sync::Mutex<Option<(String, u64)>>>>;

/// Runs a soak, calling `progress` with each sample.
pub async fn run_soak(
    options: &SoakOptions,
    progress: impl Fn(&Sample),
) -> anyhow::Result<SoakReport> {
    if options.clients == 0 || options.channels == 0 {
        bail!("a soak needs clients and channels");
    }
    // The readings go on connections of their own, not kept: the last one must see every
    // client connection gone.
    let probe = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let started = Instant::now();
    let before = read_sample(&probe, options, started).await?;
    let load = Load::start(options).await?;

    let mut samples = Vec::new();
    let mut ticker = tokio::time::interval(options.sample_every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = started + options.duration;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = tokio::time::sleep_until(end.into()) => break,
        }
        let sample = read_sample(&probe, options, started).await?;
        progress(&sample);
        samples.push(sample);
    }
    // Everyone left (the clients' kept-alive HTTP connections too): the server must let go of
    // every connection and descriptor it took for them (it may take it a moment to see the
    // last ones drop).
    let stats = load.finish().await?;
    let left_at = Instant::now();
    let settled = |s: &Sample| s.connections + s.long_polls == 0 && s.fds <= before.fds + 16;
    let mut last = read_sample(&probe, options, started).await?;
    while !settled(&last) && left_at.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        last = read_sample(&probe, options, started).await?;
    }
    progress(&last);

    // Judged: the readings after the warm-up while clients came and went.
    let judged: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at_seconds >= options.warmup.as_secs_f64())
        .collect();
    let (rss_growth, fd_growth) = (
        growth(&judged, |s| s.rss_bytes as f64),
        growth(&judged, |s| s.fds as f64),
    );
    let mut failures = Vec::new();
    let violations = stats.violations.load(Ordering::Relaxed);
    if violations > 0 {
        failures.push(format!("{violations} failed checks"));
    }
    if judged.len() < 3 {
        failures.push(format!(
            "only {} samples after the warm-up: run longer or sample more often",
            judged.len()
        ));
    } else {
        let mean_rss = judged.iter().map(|s| s.rss_bytes as f64).sum::<f64>() / judged.len() as f64;
        let mean_fds = judged.iter().map(|s| s.fds as f64).sum::<f64>() / judged.len() as f64;
        if rss_growth > (0.10 * mean_rss).max(8.0 * 1024.0 * 1024.0) {
            failures.push(format!(
                "memory grew {:.1} MiB after the warm-up (mean {:.1} MiB)",
                rss_growth / 1048576.0,
                mean_rss / 1048576.0
            ));
        }
        if fd_growth > (0.05 * mean_fds).max(32.0) {
            failures.push(format!(
                "descriptors grew by {fd_growth:.0} after the warm-up (mean {mean_fds:.0})"
            ));
        }
    }
    if !settled(&last) {
        failures.push(format!(
            "10 s after every client left: {} connections, {} long polls, {} descriptors (before the clients: {})",
            last.connections, last.long_polls, last.fds, before.fds
        ));
    }
    samples.push(last);
    let counts = stats.counts();
    if counts.published == 0 {
        failures.push("nothing was published".into());
    }
    if counts.session_errors * 100 > counts.sessions.iter().sum::<u64>() {
        failures.push(format!(
            "{} sessions could not start",
            counts.session_errors
        ));
    }
    Ok(SoakReport {
        seconds: started.elapsed().as_secs_f64(),
        clients: options.clients,
        counts,
        samples,
        rss_growth_bytes: rss_growth,
        fd_growth,
        failures,
    })
}

/// Publishers and clients at work over the nodes, until [`Load::finish`].
pub(crate) struct Load {
    settle: Duration,
    stats: Arc<Stats>,
    http: reqwest::Client,
    stop_publishing: watch::Sender<bool>,
    stop_clients: watch::Sender<bool>,
    publisher: tokio::task::JoinHandle<()>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Starts the publisher and the clients (their first connections spread over a moment).
    pub(crate) async fn start(options: &SoakOptions) -> anyhow::Result<Load> {
        let stats = Arc::new(Stats::default());
        let acked: Acked = Arc::new(
            (0..options.channels)
                .map(|_| std::sync::Mutex::new(None))
                .collect(),
        );
        // No timeout for the whole client: an event stream lasts as long as its session. Each
        // publish and poll has its own.
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()?;
        // Phase 1 ends the publishing; phase 2 (a little later, once what was acknowledged had
        // time to arrive) ends the clients, each checking it caught up.
        let (stop_publishing, publishing) = watch::channel(false);
        let (stop_clients, clients_stop) = watch::channel(false);
        let publisher = tokio::spawn(publish(
            http.clone(),
            options.clone(),
            acked.clone(),
            stats.clone(),
            publishing,
        ));
        let mut clients = Vec::with_capacity(options.clients);
        for client in 0..options.clients {
            let context = ClientContext {
                http: http.clone(),
                options: options.clone(),
                stats: stats.clone(),
                acked: acked.clone(),
                stop: clients_stop.clone(),
                client,
            };
            clients.push(tokio::spawn(run_client(context)));
            if client % 100 == 99 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(Load {
            settle: options.settle,
            stats,
            http,
            stop_publishing,
            stop_clients,
            publisher,
            clients,
        })
    }

    /// Stops publishing, gives what was acknowledged `settle` to arrive, then stops the clients
    /// (each checking it caught up) and closes their connections.
    pub(crate) async fn finish(self) -> anyhow::Result<Arc<Stats>> {
        self.stop_publishing.send_replace(true);
        self.publisher.await.context("the publisher")?;
        tokio::time::sleep(self.settle).await;
        self.stop_clients.send_replace(true);
        for client in self.clients {
            client.await.context("a client")?;
        }
        drop(self.http);
        Ok(self.stats)
    }
}

/// How much `value` grows over the span of `samples`: the least-squares slope times the span.
fn growth(samples: &[&Sample], value: impl Fn(&Sample) -> f64) -> f64 {
    let n = samples.len() as f64;
    if samples.len() < 2 {
        return 0.0;
    }
    let mean_t = samples.iter().map(|s| s.at_seconds).sum::<f64>() / n;
    let mean_v = samples.iter().map(|s| value(s)).sum::<f64>() / n;
    let (mut covariance, mut variance) = (0.0, 0.0);
    for sample in samples {
        let dt = sample.at_seconds - mean_t;
        covariance += dt * (value(sample) - mean_v);
        variance += dt * dt;
    }
    if variance == 0.0 {
        return 0.0;
    }
    let span = samples[samples.len() - 1].at_seconds - samples[0].at_seconds;
    covariance / variance * span
}

/// The server's resources now.
async fn read_sample(
    http: &reqwest::Client,
    options: &SoakOptions,
    started: Instant,
) -> anyhow::Result<Sample> {
    let pid = options.pid;
    let usage = usage_of(pid)?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let threads = status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    let metrics = http
        .get(format!("http://{}/metrics", options.nodes[0].http_addr))
        .send()
        .await?
        .text()
        .await?;
    // Every series of the metric, summed over its labels.
    let gauge = |name: &str| {
        metrics
            .lines()
            .filter_map(|line| {
                let rest = line.strip_prefix(name)?;
                let value = match rest.strip_prefix('{') {
                    Some(labelled) => labelled.split_once("} ")?.1,
                    None => rest.strip_prefix(' ')?,
                };
                value.trim().parse::<f64>().ok()
            })
            .sum::<f64>() as u64
    };
    Ok(Sample {
        at_seconds: started.elapsed().as_secs_f64(),
        rss_bytes: usage.rss_bytes,
        fds,
        threads,
        connections: gauge("duplex_connections"),
        long_polls: gauge("duplex_long_polls"),
        queued_bytes: gauge("duplex_queued_bytes"),
    })
}

/// The longest a publish or a poll (which waits 2 s at most) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

fn channel_name(index: usize) -> String {
    format!("bench:soak-{index}")
}

/// Publishes `rate` a second over the channels, round robin, over HTTP, until told to stop;
/// records what each channel's last acknowledged publication is.
async fn publish(
    http: reqwest::Client,
    options: SoakOptions,
    acked: Acked,
    stats: Arc<Stats>,
    mut stop: watch::Receiver<bool>,
) {
    let tick = Duration::from_millis(10);
    let per_tick = f64::from(options.rate) * tick.as_secs_f64();
    let mut owed = 0.0;
    let mut next = 0usize;
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        owed += per_tick;
        while owed >= 1.0 {
            owed -= 1.0;
            let index = next % options.channels;
            next += 1;
            let node = &options.nodes[next % options.nodes.len()];
            let url = format!(
                "http://{}/api/channels/{}/publish",
                node.http_addr,
                channel_name(index)
            );
            let answer = async {
                let response = http
                    .post(&url)
                    .timeout(REQUEST_TIMEOUT)
                    .json(&json!({"n": next}))
                    .send()
                    .await?;
                if !response.status().is_success() {
                    bail!("publish: {}", response.status());
                }
                Ok::<Value, anyhow::Error>(response.json().await?)
            };
            match answer.await {
                Ok(published) => {
                    stats.published.fetch_add(1, Ordering::Relaxed);
                    let offset = published["offset"].as_u64().unwrap_or(0);
                    let epoch = published["epoch"].as_str().unwrap_or_default().to_owned();
                    if let Ok(mut slot) = acked[index].lock() {
                        // Publishes on one channel are sequential here: the newest is the top.
                        *slot = Some((epoch, offset));
                    }
                }
                Err(error) => {
                    stats.publish_errors.fetch_add(1, Ordering::Relaxed);
                    keep(&stats.errors, format!("publisher: {error:#}"), 5);
                }
            }
        }
    }
}

struct ClientContext {
    http: reqwest::Client,
    options: SoakOptions,
    stats: Arc<Stats>,
    acked: Acked,
    stop: watch::Receiver<bool>,
    client: usize,
}

/// How a session ended.
enum Ended {
    /// Its time was up: leave (cleanly or not) and come back later.
    Lifetime,
    /// The run is over (the client checks it caught up, if its session was live).
    Stopped,
    /// The server closed it (a disconnect, a reset), as the words say: come back.
    Closed(String),
}

/// One client: sessions until the run stops.
async fn run_client(context: ClientContext) {
    let ClientContext {
        http,
        options,
        stats,
        acked,
        mut stop,
        client,
    } = context;
    let via = Via::of(client);
    let channel_index = client % options.channels;
    let channel = channel_name(channel_index);
    let who = format!("client {client} ({via:?}, {channel})");
    let mut position = Position::default();
    let mut rng = fastrand::Rng::with_seed(client as u64);
    let mut sessions = 0usize;
    loop {
        if *stop.borrow() {
            return;
        }
        let lifetime = options.max_session.mul_f64(rng.f64().max(0.1));
        // One in ten sessions starts fresh, as a new client would; the others resume.
        if rng.u8(..10) == 0 {
            position = Position::default();
        }
        position.live = false;
        let asked = position.since();
        if asked.is_some() {
            stats.resumed.fetch_add(1, Ordering::Relaxed);
        }
        stats.sessions[via.index()].fetch_add(1, Ordering::Relaxed);
        let abrupt = rng.bool();
        let node = &options.nodes[(client + sessions) % options.nodes.len()];
        sessions += 1;
        let session = Session {
            node,
            stats: &stats,
            http: &http,
            channel: &channel,
            who: &who,
            asked,
            lifetime,
            abrupt,
        };
        let ended = match via {
            Via::WebSocket => session.websocket(&mut position, &mut stop).await,
            Via::Tcp => session.tcp(&mut position, &mut stop).await,
            Via::Sse => session.sse(&mut position, &mut stop).await,
            Via::LongPoll => session.long_poll(&mut position, &mut stop).await,
        };
        match ended {
            Ok(Ended::Stopped) => {
                // Everything acknowledged in this channel has had time to arrive.
                let top = acked[channel_index]
                    .lock()
                    .ok()
                    .and_then(|slot| slot.clone());
                if let (Some((epoch, offset)), Some(mine)) = (top, &position.epoch)
                    && position.live
                    && *mine == epoch
                    && position.last < offset
                {
                    stats.violation(format!(
                        "{who}: at {} when the run ended, {offset} was acknowledged",
                        position.last
                    ));
                }
                return;
            }
            Ok(Ended::Lifetime) => {
                if abrupt && via != Via::LongPoll {
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(Ended::Closed(why)) => {
                stats.closed[via.index()].fetch_add(1, Ordering::Relaxed);
                keep(&stats.closes, format!("{who}: {why}"), 5);
            }
            Err(error) => {
                // The position stays: nothing out of order was taken, and the next session
                // resumes from it.
                stats.session_error(format!("{who}: {error:#}"));
            }
        }
        let pause = Duration::from_millis(rng.u64(0..2000));
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = stop.changed() => return,
        }
    }
}

/// One session's settings.
struct Session<'a> {
    node: &'a Node,
    stats: &'a Stats,
    http: &'a reqwest::Client,
    channel: &'a str,
    who: &'a str,
    asked: Option<(u64, String)>,
    lifetime: Duration,
    /// End by dropping the connection without a word (else leave cleanly).
    abrupt: bool,
}

impl Session<'_> {
    fn subscribe_frame(&self) -> Value {
        let mut frame = json!({"type": "subscribe", "id": 1, "channel": self.channel});
        if let Some((offset, epoch)) = &self.asked {
            frame["since"] = json!({"offset": offset, "epoch": epoch});
        }
        frame
    }

    /// A socket frame (WebSocket or raw TCP line): `Some` when the session ends.
    fn on_frame(&self, text: &str, position: &mut Position) -> anyhow::Result<Option<Ended>> {
        let frame: Value = serde_json::from_str(text).context("a frame that is not JSON")?;
        match frame["type"].as_str() {
            Some("reply") if frame["id"] == 1 => {
                position.on_reply(&frame["result"], self.asked.as_ref(), self.stats, self.who);
            }
            Some("message") => {
                let offset = frame["offset"]
                    .as_u64()
                    .context("a message without offset")?;
                position.on_message(offset, self.stats, self.who);
            }
            Some("error") => bail!("refused: {frame}"),
            Some("disconnect") => {
                return Ok(Some(Ended::Closed(format!("disconnect {}", frame["code"]))));
            }
            _ => {}
        }
        Ok(None)
    }

    async fn websocket(
        &self,
        position: &mut Position,
        stop: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<Ended> {
        let stream = TcpStream::connect(&self.node.http_addr).await?;
        let (mut socket, _) =
            tokio_tungstenite::client_async(format!("ws://{}/ws", self.node.http_addr), stream)
                .await?;
        socket
            .send(Message::text(self.subscribe_frame().to_string()))
            .await?;
        let deadline = tokio::time::sleep(self.lifetime);
        tokio::pin!(deadline);
        loop {
            let message = tokio::select! {
                message = socket.next() => message,
                () = &mut deadline => break,
                _ = stop.changed() => return Ok(Ended::Stopped),
            };
            match message {
                Some(Ok(Message::Text(text))) => {
                    if let Some(ended) = self.on_frame(&text, position)? {
                        return Ok(ended);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => return Ok(Ended::Closed(error.to_string())),
                None => return Ok(Ended::Closed("the stream ended".into())),
            }
        }
        if !self.abrupt {
            socket.close(None).await.ok();
        }
        Ok(Ended::Lifetime)
    }

    async fn tcp(
        &self,
        position: &mut Position,
        stop: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<Ended> {
        let stream = TcpStream::connect(&self.node.tcp_addr).await?;
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read);
        let mut line = self.subscribe_frame().to_string();
        line.push('\n');
        write.write_all(line.as_bytes()).await?;
        let deadline = tokio::time::sleep(self.lifetime);
        tokio::pin!(deadline);
        let mut line = String::new();
        loop {
            line.clear();
            let read = tokio::select! {
                read = lines.read_line(&mut line) => read,
                () = &mut deadline => break,
                _ = stop.changed() => return Ok(Ended::Stopped),
            };
            match read {
                Ok(0) => return Ok(Ended::Closed("the stream ended".into())),
                Err(error) => return Ok(Ended::Closed(error.to_string())),
                Ok(_) => {
                    if let Some(ended) = self.on_frame(line.trim_end(), position)? {
                        return Ok(ended);
                    }
                }
            }
        }
        if !self.abrupt {
            let unsubscribe = format!(
                "{{\"type\":\"unsubscribe\",\"id\":2,\"channel\":\"{}\"}}\n",
                self.channel
            );
            write.write_all(unsubscribe.as_bytes()).await.ok();
            write.shutdown().await.ok();
        }
        Ok(Ended::Lifetime)
    }

    async fn sse(
        &self,
        position: &mut Position,
        stop: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<Ended> {
        let mut url = format!(
            "http://{}/api/channels/{}/events",
            self.node.http_addr, self.channel
        );
        if let Some((offset, epoch)) = &self.asked {
            url.push_str(&format!("?since={offset}&epoch={epoch}"));
        }
        let response = self.http.get(&url).send().await?;
        if !response.status().is_success() {
            bail!("SSE: {}", response.status());
        }
        let mut body = response.bytes_stream();
        let mut buffer: Vec<u8> = Vec::new();
        let deadline = tokio::time::sleep(self.lifetime);
        tokio::pin!(deadline);
        loop {
            let chunk = tokio::select! {
                chunk = body.next() => chunk,
                () = &mut deadline => return Ok(Ended::Lifetime),
                _ = stop.changed() => return Ok(Ended::Stopped),
            };
            let Some(Ok(chunk)) = chunk else {
                return Ok(Ended::Closed("the event stream ended".into()));
            };
            buffer.extend_from_slice(&chunk);
            while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = buffer.drain(..end + 2).collect();
                let block = std::str::from_utf8(&block).context("SSE is UTF-8")?;
                let mut event = None;
                let mut data = None;
                for line in block.lines() {
                    if let Some(name) = line.strip_prefix("event: ") {
                        event = Some(name);
                    } else if let Some(text) = line.strip_prefix("data: ") {
                        data = Some(text);
                    }
                }
                let Some(data) = data else { continue };
                match event {
                    Some("subscribed") => {
                        let result: Value = serde_json::from_str(data)?;
                        position.on_reply(&result, self.asked.as_ref(), self.stats, self.who);
                    }
                    None => {
                        let frame: Value = serde_json::from_str(data)?;
                        let offset = frame["offset"].as_u64().context("no offset")?;
                        position.on_message(offset, self.stats, self.who);
                    }
                    Some("disconnect") => {
                        return Ok(Ended::Closed(format!("disconnect {data}")));
                    }
                    Some(_) => {}
                }
            }
        }
    }

    async fn long_poll(
        &self,
        position: &mut Position,
        stop: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<Ended> {
        let base = format!(
            "http://{}/api/channels/{}/poll",
            self.node.http_addr, self.channel
        );
        let deadline = Instant::now() + self.lifetime;
        let mut asked = self.asked.clone();
        let mut first = true;
        while Instant::now() < deadline {
            let url = match &asked {
                Some((offset, epoch)) => format!("{base}?since={offset}&epoch={epoch}&wait=2s"),
                None => base.clone(),
            };
            let response = tokio::select! {
                response = self.http.get(&url).timeout(REQUEST_TIMEOUT).send() => response?,
                _ = stop.changed() => return Ok(Ended::Stopped),
            };
            if !response.status().is_success() {
                bail!("poll: {}", response.status());
            }
            let page: Value = response.json().await?;
            let epoch = page["epoch"].as_str().unwrap_or_default().to_owned();
            match (&asked, page["recovered"].as_bool()) {
                (None, _) => {
                    // Where the channel stands: follow from here.
                    position.last = page["offset"].as_u64().unwrap_or(0);
                }
                (Some((since, asked_epoch)), Some(true)) => {
                    if first {
                        self.stats.recovered.fetch_add(1, Ordering::Relaxed);
                    }
                    if *since > 0 && *asked_epoch != epoch {
                        self.stats.violation(format!(
                            "{}: a poll recovered {since}@{asked_epoch} into epoch {epoch}",
                            self.who
                        ));
                    }
                }
                (Some(_), Some(false)) => {
                    self.stats.not_recovered.fetch_add(1, Ordering::Relaxed);
                    // Live from the first publication given, or from where the channel is.
                    position.last = match page["publications"][0]["offset"].as_u64() {
                        Some(offset) => offset - 1,
                        None => page["next"].as_u64().unwrap_or(0),
                    };
                }
                (Some(_), None) => {
                    self.stats.violation(format!(
                        "{}: a poll since answered without `recovered`",
                        self.who
                    ));
                }
            }
            position.epoch = Some(epoch.clone());
            for publication in page["publications"].as_array().into_iter().flatten() {
                let offset = publication["offset"].as_u64().context("no offset")?;
                position.on_message(offset, self.stats, self.who);
            }
            asked = Some((position.last, epoch));
            first = false;
            position.live = true;
        }
        Ok(Ended::Lifetime)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: f64, rss: u64) -> Sample {
        Sample {
            at_seconds: at,
            rss_bytes: rss,
            fds: 10,
            threads: 4,
            connections: 0,
            long_polls: 0,
            queued_bytes: 0,
        }
    }

    #[test]
    fn growth_is_the_trend_over_the_span_not_the_noise() {
        let flat: Vec<Sample> = (0..10)
            .map(|i| sample(f64::from(i), if i % 2 == 0 { 100 } else { 140 }))
            .collect();
        let flat: Vec<&Sample> = flat.iter().collect();
        assert!(growth(&flat, |s| s.rss_bytes as f64).abs() < 40.0);
        let rising: Vec<Sample> = (0..10)
            .map(|i| sample(f64::from(i), 100 + 10 * i as u64))
            .collect();
        let rising: Vec<&Sample> = rising.iter().collect();
        assert!((growth(&rising, |s| s.rss_bytes as f64) - 90.0).abs() < 1e-6);
    }

    #[test]
    fn the_checker_holds_the_protocol_to_its_word() {
        let stats = Stats::default();
        let mut position = Position::default();
        position.on_reply(&json!({"offset": 3, "epoch": "e"}), None, &stats, "t");
        position.on_message(4, &stats, "t");
        position.on_message(5, &stats, "t");
        assert_eq!(stats.violations.load(Ordering::Relaxed), 0);
        // Resumed and recovered: the replay continues after `since`.
        let asked = position.since().expect("a position");
        position.on_reply(
            &json!({"offset": 7, "epoch": "e", "recovered": true, "missed": 2}),
            Some(&asked),
            &stats,
            "t",
        );
        position.on_message(6, &stats, "t");
        position.on_message(7, &stats, "t");
        assert_eq!(stats.violations.load(Ordering::Relaxed), 0);
        // A repeat and a silent gap are violations.
        position.on_message(7, &stats, "t");
        position.on_message(9, &stats, "t");
        assert_eq!(stats.violations.load(Ordering::Relaxed), 2);
        // Not recovered: a new epoch given whole from its start is no violation.
        let asked = position.since().expect("a position");
        position.on_reply(
            &json!({"offset": 2, "epoch": "f", "recovered": false, "reason": "epoch_changed", "missed": 2}),
            Some(&asked),
            &stats,
            "t",
        );
        position.on_message(1, &stats, "t");
        position.on_message(2, &stats, "t");
        assert_eq!(stats.violations.load(Ordering::Relaxed), 2);
        assert_eq!(stats.not_recovered.load(Ordering::Relaxed), 1);
        // `recovered: true` into another epoch is a lie.
        let asked = position.since().expect("a position");
        position.on_reply(
            &json!({"offset": 5, "epoch": "g", "recovered": true}),
            Some(&asked),
            &stats,
            "t",
        );
        assert_eq!(stats.violations.load(Ordering::Relaxed), 3);
    }
}
