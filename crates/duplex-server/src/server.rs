//! The server: binds its listeners, then serves until a shutdown token is cancelled.
//!
//! Binding and serving are separate steps so a caller (the binary, a test, an embedder) can bind
//! port 0, learn the real address, and only then start serving.

use std::net::SocketAddr;
use std::sync::Arc;

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::http::{self, AppState};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::socket::{self, SocketContext};
use crate::store::{self, Store, StoreError};
use crate::write_deadline::WriteDeadline;

/// How often expired history is dropped and unused channels removed.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    /// TLS could not be set up.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// A configured file could not be used.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The broker could not be reached.
    #[error("cannot reach the broker: {0}")]
    Broker(#[from] crate::broker::BrokerError),
    /// Serving failed.
    #[error("server failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A duplex server with its listeners bound, ready to [`run`](Server::run).
pub struct Server {
    config: Config,
    http_listener: TcpListener,
    http_addr: SocketAddr,
    tcp_listener: TcpListener,
    tcp_addr: SocketAddr,
    store: Arc<dyn Store>,
    /// The store's committed writes, published on `records:{collection}` once running.
    record_events: store::RecordEvents,
    /// Channel history kept in the store, where the store keeps it.
    history: Option<store::history::OpenedHistory>,
    metrics: Arc<Metrics>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    tokens: Option<crate::auth::TokenVerifier>,
    broker: Option<Arc<dyn crate::broker::Broker>>,
    node: crate::broker::NodeInfo,
    /// The key list cursors are sealed with, kept in the store.
    cursor_secret: Vec<u8>,
    /// The store's webhook outbox, and what the webhooks share with the record writes.
    outbox: Arc<dyn crate::store::Outbox>,
    single_node_store: bool,
    webhook_budget: Option<Arc<crate::webhooks::Budget>>,
    webhook_wake: crate::webhooks::Wake,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("http_addr", &self.http_addr)
            .field("tcp_addr", &self.tcp_addr)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Opens the store and binds the listeners the configuration names.
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        let tls = match &config.tls {
            Some((cert, key)) => Some(crate::tls::acceptor(cert, key)?),
            None => None,
        };
        let tokens = match (&config.jwt_secret, &config.jwt_public_key) {
            (Some(secret), _) => Some(crate::auth::TokenVerifier::hs256(secret.as_bytes())),
            (None, Some(path)) => {
                let pem = std::fs::read(path).map_err(|e| {
                    ServerError::Config(format!("cannot read {}: {e}", path.display()))
                })?;
                Some(
                    crate::auth::TokenVerifier::public_key(&pem)
                        .map_err(|e| ServerError::Config(format!("{}: {e}", path.display())))?,
                )
            }
            (None, None) => None,
        };
        let node_id = config
            .node_id
            .clone()
            .unwrap_or_else(|| format!("{:016x}", crate::hub::ConnectionId::random().0));
        let metrics = Metrics::new();
        let webhook_wake = crate::webhooks::Wake::default();
        let webhook_budget = config
            .webhooks
            .as_ref()
            .map(|settings| Arc::new(crate::webhooks::Budget::new(settings.max_events)));
        let record_webhooks = match (&config.webhooks, &webhook_budget) {
            (Some(settings), Some(budget)) => {
                use crate::webhooks::EventKind;
                let ops = [
                    settings.wants(EventKind::RecordCreated),
                    settings.wants(EventKind::RecordUpdated),
                    settings.wants(EventKind::RecordDeleted),
                ];
                ops.contains(&true).then(|| store::RecordWebhooks {
                    node: node_id.clone(),
                    ops,
                    wake: webhook_wake.clone(),
                    budget: budget.clone(),
                    metrics: metrics.clone(),
                })
            }
            _ => None,
        };
        // Without a broker, the namespaces that say so keep their history in the store.
        let history_bounds: Option<store::HistoryBounds> =
            match config.broker.as_deref().unwrap_or("memory") {
                "" | "memory" => {
                    let namespaces = config.namespaces.clone();
                    Some(Arc::new(move |channel: &str| {
                        let namespace = namespaces.for_channel(channel);
                        namespace
                            .keeps_history_in_store()
                            .then(|| namespace.retention())
                    }))
                }
                _ => None,
            };
        let opened = store::open(&config.store_url(), record_webhooks, history_bounds).await?;
        let (store, record_events) = (opened.store, opened.events);
        let cursor_secret = store.secret("cursors").await?;
        let http_listener =
            TcpListener::bind(config.http)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: config.http,
                    source,
                })?;
        let http_addr = http_listener.local_addr()?;
        let tcp_listener =
            TcpListener::bind(config.tcp)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: config.tcp,
                    source,
                })?;
        let tcp_addr = tcp_listener.local_addr()?;
        let broker = crate::broker::open(
            config.broker.as_deref().unwrap_or("memory"),
            node_id.clone(),
            config.presence_ttl,
            config.namespaces.max_history_size(),
        )
        .await?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let node = crate::broker::NodeInfo {
            id: node_id,
            http: format!("{scheme}://{http_addr}"),
            tcp: tcp_addr.to_string(),
            connections: 0,
            version: env!("CARGO_PKG_VERSION").into(),
            started_at: time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .expect("RFC 3339 formats the current time"),
        };
        Ok(Server {
            cursor_secret,
            broker,
            node,
            config,
            http_listener,
            http_addr,
            tcp_listener,
            tcp_addr,
            store,
            record_events,
            metrics,
            outbox: opened.outbox,
            history: opened.history,
            single_node_store: opened.single_node,
            webhook_budget,
            webhook_wake,
            tls,
            tokens,
        })
    }

    /// The address HTTP is served on (the real port when the configuration said 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The address raw TCP clients connect to.
    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp_addr
    }

    /// This node's id (as `GET /api/nodes` lists it).
    pub fn node_id(&self) -> &str {
        &self.node.id
    }

    /// The configuration the server was bound with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, lets in-flight requests
    /// finish (for at most the configured grace period) and closes the store.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ServerError> {
        let mut hub = Hub::with_broker(
            self.config.namespaces.clone(),
            self.metrics.clone(),
            self.broker.clone(),
            self.node.clone(),
            self.config.hub,
        );
        let (history, deliveries) = match self.history {
            // With a broker, history stays in the broker.
            Some(opened) if self.broker.is_none() => (Some(opened.store), Some(opened.deliveries)),
            _ => (None, None),
        };
        if let Some(history) = &history {
            hub = hub.with_stored_history(history.clone(), history.keeps_record_events());
        }
        let hub = Arc::new(hub);
        let deliverer =
            deliveries.map(|deliveries| tokio::spawn(hub.clone().deliver_stored(deliveries)));
        let tracker = TaskTracker::new();
        let announcer = tokio::spawn(crate::record_events::announce(
            hub.clone(),
            self.record_events,
        ));
        // The broker's links stop after the sockets have said goodbye (see below).
        let broker_shutdown = CancellationToken::new();
        let broker_task = self.broker.clone().map(|broker| {
            let events: Arc<dyn crate::broker::BrokerEvents> =
                Arc::new(crate::hub::HubEvents(hub.clone()));
            tokio::spawn(broker.run(events, broker_shutdown.clone()))
        });
        let webhooks = match (&self.config.webhooks, &self.webhook_budget) {
            (Some(settings), Some(budget)) => Some(
                crate::webhooks::start(
                    settings.clone(),
                    self.node.id.clone(),
                    self.outbox.clone(),
                    self.single_node_store,
                    budget.clone(),
                    self.webhook_wake.clone(),
                    self.metrics.clone(),
                )
                .await?,
            ),
            _ => None,
        };
        let (webhooks, webhook_tasks) = match webhooks {
            Some((webhooks, tasks)) => (Some(webhooks), Some(tasks)),
            None => (None, None),
        };
        let sockets =
            Arc::new(SocketContext {
                webhooks: webhooks.clone(),
                hub: hub.clone(),
                tokens: self.tokens.clone(),
                limits: Arc::new(self.config.sockets.clone()),
                metrics: self.metrics.clone(),
                shutdown: shutdown.clone(),
                tracker: tracker.clone(),
                hooks: self.config.hooks.clone().map(|settings| {
                    Arc::new(crate::hooks::Hooks::new(settings, self.metrics.clone()))
                }),
                slots: socket::slots::ConnectionSlots::new(
                    self.config.sockets.max_connections,
                    self.config.sockets.max_connections_per_ip,
                ),
            });
        tracker.spawn(socket::tcp::accept(
            self.tcp_listener,
            sockets.clone(),
            self.tls.clone(),
            self.config.write_timeout,
        ));
        tracker.spawn(sweep(hub.clone(), shutdown.clone()));
        if let Some(history) = history {
            tracker.spawn(expire_history(history, shutdown.clone()));
        }
        tracker.spawn(hub.clone().enforce_budgets(shutdown.clone()));
        let store_url = self.config.store_url();
        let stats = crate::stats::Stats::new(
            self.node.started_at.clone(),
            if store_url.starts_with("sqlite:") {
                "sqlite"
            } else {
                "postgres"
            },
            match self
                .config
                .broker
                .as_deref()
                .and_then(|b| b.split_once("://"))
            {
                Some(("redis" | "rediss", _)) => "redis",
                Some(("nats" | "tls", _)) => "nats",
                _ => "memory",
            },
        );
        tracker.spawn(
            stats
                .clone()
                .run(hub.clone(), self.metrics.clone(), shutdown.clone()),
        );
        tracker.spawn(socket::keepalive::run(
            hub.clone(),
            Arc::new(self.config.sockets.clone()),
            shutdown.clone(),
        ));
        let state = AppState::new(http::Shared {
            store: self.store.clone(),
            hub,
            sockets,
            metrics: self.metrics.clone(),
            max_body: self.config.max_body,
            body_read_timeout: self.config.body_read_timeout,
            api_keys: Arc::new(
                crate::api_keys::ApiKeys::new(
                    self.config.api_key.as_deref(),
                    &self.config.api_keys,
                )
                .map_err(ServerError::Config)?,
            ),
            allowed_origins: self.config.allowed_origins.clone().into(),
            cursors: Arc::new(crate::store::CursorKey::new(&self.cursor_secret)),
            stats,
            pages: http::Pages {
                console: self.config.console,
                examples: self.config.examples,
            },
        });
        let app = http::router(state);
        let grace = self.config.shutdown_grace;
        let http_connections = TaskTracker::new();
        serve_http(
            self.http_listener,
            app,
            shutdown.clone(),
            HttpTimeouts {
                header_read: self.config.header_read_timeout,
                write: self.config.write_timeout,
                write_timeouts: self
                    .metrics
                    .disconnect_counter(duplex_proto::DisconnectCode::WriteTimeout.as_str()),
            },
            http_connections.clone(),
            self.tls.clone(),
        )
        .await;
        // The grace period starts at shutdown and covers HTTP requests and socket connections:
        // upgraded WebSocket connections are tracked by the socket tracker, not by hyper.
        let deadline = tokio::time::sleep(grace);
        tokio::pin!(deadline);
        http_connections.close();
        tokio::select! {
            () = http_connections.wait() => {}
            () = &mut deadline => {
                tracing::warn!(?grace, "in-flight requests outlived the shutdown grace period");
            }
        }
        tracker.close();
        tokio::select! {
            () = tracker.wait() => {}
            () = &mut deadline => {
                tracing::warn!(?grace, "connections outlived the shutdown grace period");
            }
        }
        // Deregisters the node; socket goodbyes have run, so their `leave`s went out.
        broker_shutdown.cancel();
        if let Some(task) = broker_task {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        // Every connection said goodbye: their `disconnected` events go into the outbox before
        // the store closes.
        if let Some(tasks) = webhook_tasks {
            tasks.stop().await;
        }
        self.store.close().await;
        announcer.abort();
        if let Some(deliverer) = deliverer {
            deliverer.abort();
        }
        tracing::info!("server stopped");
        Ok(())
    }
}

/// How long an HTTP connection may take to send a request head and to take what is written to
/// it, and where connections the write deadline ends are counted.
struct HttpTimeouts {
    header_read: Duration,
    write: Duration,
    write_timeouts: prometheus_client::metrics::counter::Counter,
}

/// Accepts HTTP connections until shutdown, each served by hyper (HTTP/1.1 with upgrades for
/// WebSocket) with a header read timeout, so a client that trickles its request head
/// (slowloris) is cut off instead of holding a connection forever. With TLS, the handshake must
/// also finish within that time. At shutdown the listener is closed and every connection
/// finishes its in-flight request, then closes.
async fn serve_http(
    listener: TcpListener,
    app: axum::Router,
    shutdown: CancellationToken,
    timeouts: HttpTimeouts,
    connections: TaskTracker,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let HttpTimeouts {
        header_read: header_read_timeout,
        write: write_timeout,
        write_timeouts,
    } = timeouts;
    use axum::extract::ConnectInfo;
    use hyper::body::Incoming;
    use tower::ServiceExt as _;

    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait a little instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        // Below TLS and kept by an upgraded WebSocket: every write of the connection.
        let stream = WriteDeadline::new(stream, write_timeout).counting(write_timeouts.clone());
        let service = app
            .clone()
            .map_request(move |mut request: axum::http::Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                request.map(axum::body::Body::new)
            });
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            match tls {
                None => serve_http_connection(stream, service, shutdown, header_read_timeout).await,
                Some(acceptor) => {
                    match tokio::time::timeout(header_read_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            serve_http_connection(stream, service, shutdown, header_read_timeout)
                                .await;
                        }
                        Ok(Err(error)) => tracing::debug!(%error, %peer, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

/// Serves one HTTP connection (plain or TLS) until it ends or shutdown finishes it gracefully.
async fn serve_http_connection<IO, S>(
    io: IO,
    service: S,
    shutdown: CancellationToken,
    header_read_timeout: Duration,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<
            axum::http::Request<hyper::body::Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let connection = builder
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(service))
        .with_upgrades();
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                tracing::trace!(%error, "connection ended with an error");
            }
        }
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

/// Drops expired history and unused channels until shutdown.
/// Entries of the store's channel history deleted per transaction once expired.
const EXPIRE_BATCH: usize = 1000;

/// Deletes expired entries of the store's channel history, a bounded batch per transaction
/// and at most ten a sweep, so that a burst of expiries never holds the writer long (expired
/// entries are never read, whenever they are deleted).
async fn expire_history(
    history: Arc<dyn crate::store::history::HistoryStore>,
    shutdown: CancellationToken,
) {
    let mut interval = tokio::time::interval(SWEEP_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = interval.tick() => {
                for _ in 0..10 {
                    match history.expire(EXPIRE_BATCH).await {
                        Ok(deleted) if deleted == EXPIRE_BATCH => {}
                        Ok(_) => break,
                        Err(error) => {
                            tracing::warn!(%error, "cannot delete expired channel history");
                            break;
                        }
                    }
                }
            }
        }
    }
}

async fn sweep(hub: Arc<Hub>, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(SWEEP_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = interval.tick() => hub.sweep(),
        }
    }
}
