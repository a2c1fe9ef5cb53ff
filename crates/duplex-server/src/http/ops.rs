//! Operations endpoints: liveness, readiness, Prometheus metrics and the OpenAPI document; and
//! the browser client (`/duplex.js`, `/duplex.d.ts`), embedded in the binary.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use utoipa::OpenApi;

use super::AppState;
use super::error::ApiError;

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/duplex.js", get(browser_client))
        .route("/duplex.d.ts", get(browser_client_types))
}

/// The browser client, a dependency-free ES module.
const BROWSER_CLIENT: &str = include_str!("../../assets/duplex.js");
/// Its TypeScript declarations.
const BROWSER_CLIENT_TYPES: &str = include_str!("../../assets/duplex.d.ts");

async fn browser_client() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        BROWSER_CLIENT,
    )
        .into_response()
}

async fn browser_client_types() -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                "application/typescript; charset=utf-8",
            ),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        BROWSER_CLIENT_TYPES,
    )
        .into_response()
}

/// The OpenAPI description of the HTTP API, generated from the handlers.
#[derive(OpenApi)]
#[openapi(
    info(title = "duplex", description = "Records over HTTP and channels over sockets, on one server."),
    paths(
        super::records::list_collections,
        super::records::list_records,
        super::records::create_record,
        super::records::get_record,
        super::records::replace_record,
        super::records::patch_record,
        super::records::delete_record,
        super::channels::publish,
        super::channels::history,
        super::channels::presence,
        super::channels::list_channels,
        super::channels::channel_info,
        super::transports::poll,
        super::transports::events,
        super::connections::list_connections,
        super::connections::disconnect_connection,
        super::stats::me,
        super::stats::stats,
        super::connections::request_connection,
        super::connections::request_user,
        super::connections::list_nodes,
        healthz,
        readyz,
        metrics,
    ),
    components(schemas(super::error::Problem)),
    tags((name = "records", description = "JSON records in named collections"),
         (name = "channels", description = "Server API: publish, history, presence (API key when set)"),
         (name = "transports", description = "Channels over plain HTTP: short and long polling, Server-Sent Events"),
         (name = "connections", description = "Server API: connections and server-to-client requests (API key when set)"),
         (name = "operations", description = "Health, readiness and metrics"))
)]
pub(crate) struct ApiDoc;

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Up")))]
pub(crate) async fn healthz() -> &'static str {
    "ok\n"
}

/// The store and the broker answer, so requests can be served.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "Ready"),
              (status = 503, description = "The store or the broker is unreachable", body = super::error::Problem)))]
pub(crate) async fn readyz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    if let Err(error) = state.store.ping().await {
        tracing::warn!(%error, "readiness check failed");
        return Err(ApiError::Unavailable);
    }
    if let Some(broker) = state.hub.broker() {
        let answered =
            tokio::time::timeout(std::time::Duration::from_secs(2), broker.ready()).await;
        let error = match answered {
            Ok(Ok(())) => return Ok("ready\n"),
            Ok(Err(error)) => error.to_string(),
            Err(_) => "the broker did not answer within 2s".to_owned(),
        };
        tracing::warn!(%error, "readiness check failed");
        return Err(ApiError::BrokerUnavailable(error));
    }
    Ok("ready\n")
}

/// Prometheus metrics in the OpenMetrics text format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "OpenMetrics text")))]
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    let gauge = |value: usize| i64::try_from(value).unwrap_or(i64::MAX);
    let metrics = &state.metrics;
    metrics.channels.set(gauge(state.hub.channel_count()));
    metrics.queued_bytes.set(gauge(state.hub.queued_bytes()));
    metrics.history_bytes.set(gauge(state.hub.history_bytes()));
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn openapi() -> Response {
    let body = ApiDoc::openapi()
        .to_json()
        .expect("the generated document serialises");
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}
