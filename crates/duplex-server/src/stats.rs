//! Live figures of this node for the console (`GET /api/stats`): one sample a second of what
//! the server is doing, the last five minutes kept, so a page opened now draws its charts at
//! once. Rates are differences of the Prometheus counters between samples; the HTTP p99 comes
//! from a small histogram of the last second ([`crate::latency::LatencyWindow`]) that requests record into.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::hub::Hub;
use crate::metrics::{Metrics, TransportLabels};

/// Samples kept: five minutes at one a second.
const KEPT: usize = 300;
/// Time between samples.
const EVERY: Duration = Duration::from_secs(1);

/// Socket connections by transport.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct ByTransport {
    websocket: i64,
    tcp: i64,
    sse: i64,
}

/// One second of this node.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Sample {
    /// When, in milliseconds since the Unix epoch.
    at: u64,
    connections: ByTransport,
    subscriptions: i64,
    channels: usize,
    publications_per_second: f64,
    deliveries_per_second: f64,
    /// Publications dropped, conflated away or costing a disconnect to slow consumers.
    slow_consumer_drops_per_second: f64,
    http_requests_per_second: f64,
    /// The slowest 1 % of the second's HTTP requests took at least this long (none: no
    /// request that second).
    http_p99_ms: Option<f64>,
    queued_bytes: usize,
    history_bytes: usize,
}

/// Counter values a rate is computed from.
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    publications: u64,
    deliveries: u64,
    drops: u64,
}

/// The samples of this node, and what it is.
#[derive(Debug)]
pub(crate) struct Stats {
    samples: Mutex<VecDeque<Sample>>,
    started: Instant,
    /// RFC 3339.
    pub(crate) started_at: String,
    /// `sqlite` or `postgres`.
    pub(crate) store: &'static str,
    /// `memory`, `redis` or `nats`.
    pub(crate) broker: &'static str,
}

impl Stats {
    pub(crate) fn new(started_at: String, store: &'static str, broker: &'static str) -> Arc<Self> {
        Arc::new(Stats {
            samples: Mutex::new(VecDeque::with_capacity(KEPT)),
            started: Instant::now(),
            started_at,
            store,
            broker,
        })
    }

    /// Seconds since the server started.
    pub(crate) fn uptime(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// The kept samples, oldest first.
    pub(crate) fn samples(&self) -> Vec<Sample> {
        self.samples.lock().iter().cloned().collect()
    }

    /// Takes a sample a second until `shutdown`.
    pub(crate) async fn run(
        self: Arc<Self>,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = (Instant::now(), totals(&metrics));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = (Instant::now(), totals(&metrics));
            let sample = self.sample(&hub, &metrics, last, now);
            last = now;
            let mut samples = self.samples.lock();
            if samples.len() == KEPT {
                samples.pop_front();
            }
            samples.push_back(sample);
        }
    }

    fn sample(
        &self,
        hub: &Hub,
        metrics: &Metrics,
        (before_at, before): (Instant, Totals),
        (now_at, now): (Instant, Totals),
    ) -> Sample {
        let seconds = now_at.duration_since(before_at).as_secs_f64().max(1e-3);
        let rate = |before: u64, now: u64| now.saturating_sub(before) as f64 / seconds;
        let connections = |transport| {
            metrics
                .connections
                .get_or_create(&TransportLabels { transport })
                .get()
        };
        let (requests, p99) = metrics.recent_http.take();
        Sample {
            at: unix_ms(),
            connections: ByTransport {
                websocket: connections("websocket"),
                tcp: connections("tcp"),
                sse: connections("sse"),
            },
            subscriptions: metrics.subscriptions.get(),
            channels: hub.channel_count(),
            publications_per_second: rate(before.publications, now.publications),
            deliveries_per_second: rate(before.deliveries, now.deliveries),
            slow_consumer_drops_per_second: rate(before.drops, now.drops),
            http_requests_per_second: requests as f64 / seconds,
            http_p99_ms: p99.map(|d| d.as_secs_f64() * 1000.0),
            queued_bytes: hub.queued_bytes(),
            history_bytes: hub.history_bytes(),
        }
    }
}

fn totals(metrics: &Metrics) -> Totals {
    Totals {
        publications: metrics.publications.get(),
        deliveries: metrics.deliveries_written.get(),
        drops: metrics.dropped.get()
            + metrics.conflated.get()
            + metrics.slow_consumer_disconnects.get(),
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
