//! The HTTP side of the server: one axum router made of one module per resource.
//!
//! Every response passes through [`track_request`], which counts it and times it by route
//! template; unknown paths and methods answer with problem+json like every other error.

mod error;
mod ops;
mod records;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use tower_http::trace::TraceLayer;

pub use error::{ApiError, PROBLEM_JSON, Problem};
pub use records::{DEFAULT_LIMIT, MAX_FILTERS, MAX_LIMIT};

use crate::hub::Hub;
use crate::metrics::{HttpLabels, Metrics};
use crate::socket::SocketContext;
use crate::store::Store;

/// What every handler can reach.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) hub: Arc<Hub>,
    pub(crate) sockets: SocketContext,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) max_body: usize,
}

/// The whole HTTP API.
pub(crate) fn router(state: AppState) -> Router {
    let metrics = state.metrics.clone();
    Router::new()
        .merge(records::router())
        .merge(ops::router())
        .route("/ws", axum::routing::get(crate::socket::ws::upgrade))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.max_body))
        .with_state(state)
        .layer(middleware::from_fn_with_state(metrics, track_request))
        .layer(TraceLayer::new_for_http())
}

async fn not_found() -> ApiError {
    ApiError::NotFound("nothing is served at this path".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Counts and times every request by method, route template and status.
async fn track_request(
    State(metrics): State<Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = request.method().as_str().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    metrics.http_in_flight.inc();
    let response = next.run(request).await;
    metrics.http_in_flight.dec();
    let labels = HttpLabels {
        method,
        route,
        status: response.status().as_u16(),
    };
    metrics.http_requests.get_or_create(&labels).inc();
    metrics
        .http_duration
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
}
