//! Prometheus metrics of one server instance.
//!
//! Each [`Server`](crate::Server) owns its own registry (no process-global recorder), so several
//! servers in one process, as in the tests, keep separate figures. Hot paths hold metric handles
//! directly; label lookups happen only per HTTP request.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of an HTTP request metric.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct HttpLabels {
    /// The request method.
    pub method: String,
    /// The route template (`/api/collections/{collection}/records`), or `unmatched`.
    pub route: String,
    /// The response status code.
    pub status: u16,
}

/// The server's metrics and the registry that renders them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// HTTP requests served.
    pub http_requests: Family<HttpLabels, Counter>,
    /// HTTP request latency in seconds.
    pub http_duration: Family<HttpLabels, Histogram>,
    /// HTTP requests whose head has been read and whose response is not yet produced.
    pub http_in_flight: Gauge,
}

fn latency_histogram() -> Histogram {
    // 100µs to ~3.3s, doubling.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

impl Metrics {
    /// A fresh set of metrics.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("duplex");
        let http_requests = Family::<HttpLabels, Counter>::default();
        let http_duration =
            Family::<HttpLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> _);
        registry.register(
            "http_requests",
            "HTTP requests served, by method, route and status",
            http_requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency, by method, route and status",
            http_duration.clone(),
        );
        let http_in_flight = Gauge::default();
        registry.register(
            "http_requests_in_flight",
            "HTTP requests being handled",
            http_in_flight.clone(),
        );
        Arc::new(Metrics {
            registry,
            http_requests,
            http_duration,
            http_in_flight,
        })
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn render(&self) -> String {
        let mut text = String::with_capacity(8 * 1024);
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}
