//! The server: binds its listeners, then serves until a shutdown token is cancelled.
//!
//! Binding and serving are separate steps so a caller (the binary, a test, an embedder) can bind
//! port 0, learn the real address, and only then start serving.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::http::{self, AppState};
use crate::metrics::Metrics;
use crate::store::{self, Store, StoreError};

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
        Ok(Server {
            config,
            http_listener,
            http_addr,
            store,
            metrics: Metrics::new(),
        })
    }

    /// The address HTTP is served on (the real port when the configuration said 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The configuration the server was bound with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, lets in-flight requests
    /// finish (for at most the configured grace period) and closes the store.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ServerError> {
        let state = AppState {
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            max_body: self.config.max_body,
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
        let outcome = tokio::select! {
            outcome = serve => outcome.map_err(ServerError::from),
            () = async {
                shutdown.cancelled().await;
                tokio::time::sleep(grace).await;
            } => {
                tracing::warn!(?grace, "in-flight requests outlived the shutdown grace period");
                Ok(())
            }
        };
        self.store.close().await;
        tracing::info!("server stopped");
        outcome
    }
}
