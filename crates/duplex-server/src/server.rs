//! The server: binds its listeners, then serves until a shutdown token is cancelled.
//!
//! Binding and serving are separate steps so a caller (the binary, a test, an embedder) can bind
//! port 0, learn the real address, and only then start serving.

use std::net::SocketAddr;
use std::sync::Arc;

use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::http::{self, AppState};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::socket::{self, SocketContext};
use crate::store::{self, Store, StoreError};

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
    /// Serving failed.
    #[error("server failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A duplex server with its listeners bound, ready to [`run`](Server::run).
#[derive(Debug)]
pub struct Server {
    config: Config,
    http_listener: TcpListener,
    http_addr: SocketAddr,
    tcp_listener: TcpListener,
    tcp_addr: SocketAddr,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

impl Server {
    /// Opens the store and binds the listeners the configuration names.
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        let store = store::open(&config.store_url()).await?;
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
        Ok(Server {
            config,
            http_listener,
            http_addr,
            tcp_listener,
            tcp_addr,
            store,
            metrics: Metrics::new(),
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

    /// The configuration the server was bound with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, lets in-flight requests
    /// finish (for at most the configured grace period) and closes the store.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ServerError> {
        let hub = Arc::new(Hub::new(
            self.config.namespaces.clone(),
            self.metrics.clone(),
        ));
        let tracker = TaskTracker::new();
        let sockets = Arc::new(SocketContext {
            hub: hub.clone(),
            tokens: self
                .config
                .jwt_secret
                .as_deref()
                .map(|secret| crate::auth::TokenVerifier::hs256(secret.as_bytes())),
            limits: Arc::new(self.config.sockets.clone()),
            metrics: self.metrics.clone(),
            shutdown: shutdown.clone(),
            tracker: tracker.clone(),
            slots: socket::slots::ConnectionSlots::new(
                self.config.sockets.max_connections,
                self.config.sockets.max_connections_per_ip,
            ),
        });
        tracker.spawn(socket::tcp::accept(self.tcp_listener, sockets.clone()));
        tracker.spawn(sweep(hub.clone(), shutdown.clone()));
        let state = AppState {
            store: self.store.clone(),
            hub,
            sockets,
            metrics: self.metrics.clone(),
            max_body: self.config.max_body,
            api_key: self.config.api_key.as_deref().map(Arc::from),
            allowed_origins: self.config.allowed_origins.clone().into(),
        };
        let app = http::router(state);
        let listener = self.http_listener.tap_io(|stream| {
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "cannot set TCP_NODELAY");
            }
        });
        let serve = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
        let grace = self.config.shutdown_grace;
        // The grace period starts at shutdown and covers HTTP requests and socket connections:
        // hyper does not track upgraded WebSocket connections, so the tracker does.
        let deadline = async {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
        };
        tokio::pin!(deadline);
        let outcome = tokio::select! {
            outcome = serve => outcome.map_err(ServerError::from),
            () = &mut deadline => {
                tracing::warn!(?grace, "in-flight requests outlived the shutdown grace period");
                Ok(())
            }
        };
        tracker.close();
        tokio::select! {
            () = tracker.wait() => {}
            () = &mut deadline => {
                tracing::warn!(?grace, "connections outlived the shutdown grace period");
            }
        }
        self.store.close().await;
        tracing::info!("server stopped");
        outcome
    }
}

/// Drops expired history and unused channels until shutdown.
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
