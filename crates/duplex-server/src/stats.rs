//! Live figures of this node for the console (`GET /api/stats`): one sample a second of what
//! the server is doing, the last five minutes kept, so a page opened now draws its charts at
//! once. Rates are differences of the Prometheus counters between samples; the HTTP p99 comes
//! from a small histogram of the last second ([`LatencyWindow`]) that requests record into.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Buckets per power of two of the latency histogram (relative precision ≈ 19 %).
const SUB_BUCKETS: usize = 4;
/// Powers of two covered, from 1 µs to about 18 minutes.
const POWERS: usize = 30;

/// HTTP request latencies since the last sample, in logarithmic buckets: recording is one
/// atomic add, reading the p99 walks the buckets once a second.
#[derive(Debug)]
pub struct LatencyWindow {
    buckets: Vec<AtomicU64>,
}

impl Default for LatencyWindow {
    fn default() -> Self {
        LatencyWindow {
            buckets: (0..POWERS * SUB_BUCKETS)
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }
}

impl LatencyWindow {
    /// Counts one request that took `elapsed`.
    pub fn record(&self, elapsed: Duration) {
        let micros = elapsed.as_micros().clamp(1, u128::from(u64::MAX)) as u64;
        let power = 63 - micros.leading_zeros() as usize;
        // The two bits below the leading one pick the sub-bucket.
        let sub = if power >= 2 {
            ((micros >> (power - 2)) & 0b11) as usize
        } else {
            ((micros << (2 - power)) & 0b11) as usize
        };
        let index = (power * SUB_BUCKETS + sub).min(self.buckets.len() - 1);
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests since the last take, and the upper bound of their 99th percentile; resets.
    pub fn take(&self) -> (u64, Option<Duration>) {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.swap(0, Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return (0, None);
        }
        let rank = total - total / 100;
        let mut seen = 0;
        for (index, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let power = index / SUB_BUCKETS;
                let sub = (index % SUB_BUCKETS) as u64;
                // The bucket's upper bound: 2^power × (1 + (sub + 1) / 4).
                let upper = (1u64 << power) * (SUB_BUCKETS as u64 + sub + 1) / SUB_BUCKETS as u64;
                return (total, Some(Duration::from_micros(upper)));
            }
        }
        (total, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_p99_is_the_bucket_of_the_slowest_percent() {
        let window = LatencyWindow::default();
        for _ in 0..990 {
            window.record(Duration::from_micros(500));
        }
        for _ in 0..10 {
            window.record(Duration::from_millis(40));
        }
        let (count, p99) = window.take();
        assert_eq!(count, 1000);
        let p99 = p99.expect("requests were recorded");
        // 500 µs sits in [448, 512): the p99 is that bucket's bound, within a fifth of it.
        assert!(
            p99 >= Duration::from_micros(500) && p99 <= Duration::from_micros(600),
            "{p99:?}"
        );
        assert_eq!(window.take(), (0, None), "taking resets");
        for _ in 0..50 {
            window.record(Duration::from_millis(40));
        }
        window.record(Duration::from_micros(1));
        let (_, p99) = window.take();
        let p99 = p99.expect("some");
        assert!(
            p99 >= Duration::from_millis(40) && p99 <= Duration::from_millis(48),
            "{p99:?}"
        );
    }
}
