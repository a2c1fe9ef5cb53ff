//! Prometheus metrics of one server instance.
//!
//! Each [`Server`](crate::Server) owns its own registry (no process-global recorder), so several
//! servers in one process, as in the tests, keep separate figures. Hot paths hold metric handles
//! directly; label lookups happen only per HTTP request.

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of an HTTP request metric.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct HttpLabels {
    /// The request method (`OTHER` for a method HTTP does not define).
    pub method: &'static str,
    /// The route template (`/api/collections/{collection}/records`), or `unmatched`.
    pub route: RouteLabel,
    /// The response status code.
    pub status: u16,
}

/// The route a request matched, as the router shares it (no copy of the text per request).
#[derive(Debug, Clone)]
pub struct RouteLabel(pub Option<axum::extract::MatchedPath>);

impl RouteLabel {
    /// The template, or `unmatched`.
    pub fn as_str(&self) -> &str {
        self.0.as_ref().map_or("unmatched", |path| path.as_str())
    }
}

impl PartialEq for RouteLabel {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for RouteLabel {}

impl std::hash::Hash for RouteLabel {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl EncodeLabelValue for RouteLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// A method's label: its name for the methods HTTP defines, `OTHER` for any other (so a client
/// cannot add label values at will).
pub fn method_label(method: &http::Method) -> &'static str {
    use http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

/// Labels of a connection metric.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TransportLabels {
    /// `websocket` or `tcp`.
    pub transport: &'static str,
}

/// Labels of a protocol code metric (`error` frames, `disconnect`s).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CodeLabels {
    /// The code, as the protocol writes it.
    pub code: &'static str,
}

/// Labels of a hook's latency.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct HookLabels {
    /// `connect`, `subscribe`, `publish`, `refresh` or `rpc`.
    pub hook: &'static str,
}

/// Labels of a hook call's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct HookResultLabels {
    /// The hook.
    pub hook: &'static str,
    /// `allowed`, `denied`, `failed_allowed` or `failed_denied` (failed: no valid answer in time).
    pub result: &'static str,
}

/// Labels of a count by reason.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why.
    pub reason: &'static str,
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
    /// Open socket connections by transport.
    pub connections: Family<TransportLabels, Gauge>,
    /// Active subscriptions.
    pub subscriptions: Gauge,
    /// Reads of a channel's history from the broker or the store made for subscriptions (one
    /// read serves every subscriber of the channel that comes back while it runs).
    pub history_reads: Counter,
    /// Publications accepted by the hub.
    pub publications: Counter,
    /// Publications queued to subscribers (one per subscriber per publication).
    pub deliveries_queued: Counter,
    /// Publication frames written to sockets.
    pub deliveries_written: Counter,
    /// Publications dropped from full queues (`drop_oldest`).
    pub dropped: Counter,
    /// Publications replaced by newer ones (`latest`).
    pub conflated: Counter,
    /// Connections closed because their queue filled (`disconnect`).
    pub slow_consumer_disconnects: Counter,
    /// Subscribers disconnected because this node missed publications from the broker.
    pub insufficient_state_disconnects: Counter,
    /// Client answers to server requests that matched no waiting request (late, repeated, unknown).
    pub unmatched_answers: Counter,
    /// Long polls waiting for a publication.
    pub long_polls: Gauge,
    /// Publications refused by a connection's rate limit.
    pub rate_limited: Counter,
    /// Connections refused by the connection limits.
    pub connection_refusals: Counter,
    /// `error` frames sent, by code.
    pub socket_errors: Family<CodeLabels, Counter>,
    /// Connections the server closed with a `disconnect`, by code.
    pub disconnects: Family<CodeLabels, Counter>,
    /// Channels on this node (set when metrics are read).
    pub channels: Gauge,
    /// Channels refused by `max_channels`.
    pub channel_refusals: Counter,
    /// Bytes queued for connections, shared publications counted once (set when read).
    pub queued_bytes: Gauge,
    /// Bytes of history kept in memory (set when read).
    pub history_bytes: Gauge,
    /// Publications dropped from the fullest queues because the queue budget was over.
    pub budget_sheds: Counter,
    /// History publications evicted, oldest first, because the history budget was over.
    pub history_evictions: Counter,
    /// Webhook events written to the outbox.
    pub webhook_queued: Counter,
    /// Webhook events the backend took.
    pub webhook_delivered: Counter,
    /// Webhook events in deliveries that failed (each retry counts them again).
    pub webhook_retried: Counter,
    /// Webhook events dropped: `full` (the outbox bound), `age` (`max_age`), `store` (the store
    /// failed while stopping).
    pub webhook_dropped: Family<ReasonLabels, Counter>,
    /// Webhook events waiting in this node's outbox.
    pub webhook_outbox: Gauge,
    /// Connections of lost nodes whose `disconnected` (`node_lost`) this node wrote.
    pub webhook_lost: Counter,
    /// Hook calls to the backend, by hook and result.
    pub hook_calls: Family<HookResultLabels, Counter>,
    /// Hook latency in seconds, by hook.
    pub hook_duration: Family<HookLabels, Histogram>,
    /// HTTP latencies since the console's last sample (not exported to Prometheus).
    pub recent_http: crate::latency::LatencyWindow,
}

/// Latency bucket bounds in seconds: 0.1 ms to 5 s in steps of 1, 2 and 5, so that the bounds
/// people set objectives at (1, 5, 10, 100 ms) are bucket edges.
const LATENCY_BUCKETS: [f64; 15] = [
    0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
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
        let connections = Family::<TransportLabels, Gauge>::default();
        registry.register(
            "connections",
            "Open socket connections by transport",
            connections.clone(),
        );
        let subscriptions = Gauge::default();
        registry.register(
            "subscriptions",
            "Active subscriptions",
            subscriptions.clone(),
        );
        let history_reads = Counter::default();
        registry.register(
            "history_reads",
            "Reads of channel history from the broker or the store for subscriptions",
            history_reads.clone(),
        );
        let publications = Counter::default();
        registry.register(
            "publications",
            "Publications accepted by the hub",
            publications.clone(),
        );
        let deliveries_queued = Counter::default();
        registry.register(
            "deliveries_queued",
            "Publications queued to subscribers",
            deliveries_queued.clone(),
        );
        let deliveries_written = Counter::default();
        registry.register(
            "deliveries_written",
            "Publication frames written to sockets",
            deliveries_written.clone(),
        );
        let dropped = Counter::default();
        registry.register(
            "dropped",
            "Publications dropped from full subscriber queues (drop_oldest)",
            dropped.clone(),
        );
        let conflated = Counter::default();
        registry.register(
            "conflated",
            "Publications replaced by newer ones before being sent (latest)",
            conflated.clone(),
        );
        let slow_consumer_disconnects = Counter::default();
        registry.register(
            "slow_consumer_disconnects",
            "Connections closed because their queue filled (disconnect)",
            slow_consumer_disconnects.clone(),
        );
        let insufficient_state_disconnects = Counter::default();
        registry.register(
            "insufficient_state_disconnects",
            "Subscribers disconnected to recover after this node missed publications from the broker",
            insufficient_state_disconnects.clone(),
        );
        let unmatched_answers = Counter::default();
        registry.register(
            "unmatched_answers",
            "Client answers to server requests that matched no waiting request",
            unmatched_answers.clone(),
        );
        let long_polls = Gauge::default();
        registry.register(
            "long_polls",
            "Long polls waiting for a publication",
            long_polls.clone(),
        );
        let rate_limited = Counter::default();
        registry.register(
            "rate_limited",
            "Publications refused by a connection's rate limit",
            rate_limited.clone(),
        );
        let connection_refusals = Counter::default();
        registry.register(
            "connection_refusals",
            "Connections refused by the connection limits",
            connection_refusals.clone(),
        );
        let socket_errors = Family::<CodeLabels, Counter>::default();
        registry.register(
            "socket_errors",
            "Error frames sent to socket clients, by code",
            socket_errors.clone(),
        );
        let disconnects = Family::<CodeLabels, Counter>::default();
        registry.register(
            "disconnects",
            "Connections the server closed with a disconnect, by code",
            disconnects.clone(),
        );
        let channels = Gauge::default();
        registry.register("channels", "Channels on this node", channels.clone());
        let channel_refusals = Counter::default();
        registry.register(
            "channel_refusals",
            "Channels refused because the node holds max_channels",
            channel_refusals.clone(),
        );
        let queued_bytes = Gauge::default();
        registry.register(
            "queued_bytes",
            "Bytes queued for connections (a publication shared by many queues counts once)",
            queued_bytes.clone(),
        );
        let history_bytes = Gauge::default();
        registry.register(
            "history_bytes",
            "Bytes of channel history kept in memory",
            history_bytes.clone(),
        );
        let budget_sheds = Counter::default();
        registry.register(
            "budget_sheds",
            "Publications dropped from the fullest queues because max_queued_bytes was reached",
            budget_sheds.clone(),
        );
        let history_evictions = Counter::default();
        registry.register(
            "history_evictions",
            "History publications evicted, oldest first, because max_history_bytes was reached",
            history_evictions.clone(),
        );
        let hook_calls = Family::<HookResultLabels, Counter>::default();
        registry.register(
            "hook_calls",
            "Hook calls to the application's backend, by hook and result",
            hook_calls.clone(),
        );
        let hook_duration =
            Family::<HookLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> _);
        registry.register(
            "hook_duration_seconds",
            "Hook call latency, by hook",
            hook_duration.clone(),
        );
        let webhook_queued = Counter::default();
        registry.register(
            "webhook_events_queued",
            "Webhook events written to the outbox",
            webhook_queued.clone(),
        );
        let webhook_delivered = Counter::default();
        registry.register(
            "webhook_events_delivered",
            "Webhook events the backend took",
            webhook_delivered.clone(),
        );
        let webhook_retried = Counter::default();
        registry.register(
            "webhook_events_retried",
            "Webhook events in deliveries that failed and will be retried",
            webhook_retried.clone(),
        );
        let webhook_dropped = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "webhook_events_dropped",
            "Webhook events dropped, by reason (full, age, store)",
            webhook_dropped.clone(),
        );
        let webhook_outbox = Gauge::default();
        registry.register(
            "webhook_outbox_events",
            "Webhook events waiting in this node's outbox",
            webhook_outbox.clone(),
        );
        let webhook_lost = Counter::default();
        registry.register(
            "webhook_lost_connections",
            "Connections of lost nodes whose disconnected (node_lost) this node wrote",
            webhook_lost.clone(),
        );
        Arc::new(Metrics {
            webhook_queued,
            webhook_delivered,
            webhook_retried,
            webhook_dropped,
            webhook_outbox,
            webhook_lost,
            hook_calls,
            hook_duration,
            recent_http: crate::latency::LatencyWindow::default(),
            channels,
            channel_refusals,
            queued_bytes,
            history_bytes,
            budget_sheds,
            history_evictions,
            socket_errors,
            disconnects,
            connection_refusals,
            rate_limited,
            long_polls,
            unmatched_answers,
            registry,
            http_requests,
            http_duration,
            http_in_flight,
            connections,
            subscriptions,
            history_reads,
            publications,
            deliveries_queued,
            deliveries_written,
            dropped,
            conflated,
            slow_consumer_disconnects,
            insufficient_state_disconnects,
        })
    }

    /// The counter of connections closed with `code`.
    pub fn disconnect_counter(&self, code: &'static str) -> Counter {
        self.disconnects.get_or_create(&CodeLabels { code }).clone()
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn render(&self) -> String {
        let mut text = String::with_capacity(8 * 1024);
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_outside_http_share_one_label() {
        assert_eq!(method_label(&http::Method::GET), "GET");
        assert_eq!(method_label(&http::Method::PATCH), "PATCH");
        let invented = http::Method::from_bytes(b"FETCHALL").expect("a token");
        assert_eq!(method_label(&invented), "OTHER");
    }

    #[test]
    fn an_unmatched_route_is_labelled_so() {
        let unmatched = RouteLabel(None);
        assert_eq!(unmatched.as_str(), "unmatched");
        assert_eq!(unmatched, RouteLabel(None));
    }
}
