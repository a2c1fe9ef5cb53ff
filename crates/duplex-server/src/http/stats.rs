//! What the console asks about the server: `GET /api/me` (which API key this is, and its
//! scopes) and `GET /api/stats` (this node's live figures and the nodes of the cluster).

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::get;
use serde::Serialize;

use super::AppState;
use super::error::ApiError;
use crate::api_keys::{Identity, Scope};

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/me", get(me))
        .route("/api/stats", get(stats))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct Me {
    /// No API key is configured: the server API is open to anyone who reaches it.
    open: bool,
    /// The key's name, when keys are configured.
    key: Option<String>,
    /// What the caller may do (`*`: everything).
    #[schema(value_type = Vec<String>)]
    scopes: Vec<Scope>,
}

/// Who the caller is as far as API keys go: 401 without a key when keys are configured, 403
/// with one that is not configured.
#[utoipa::path(get, path = "/api/me", tag = "operations",
    responses((status = 200, description = "`{open, key, scopes}`", body = Me),
              (status = 401, description = "Keys are configured and none was given", body = super::error::Problem),
              (status = 403, description = "Not a configured key", body = super::error::Problem)))]
pub(crate) async fn me(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Me>, ApiError> {
    match state.api_keys.identify(super::bearer(&headers)) {
        Identity::Open => Ok(Json(Me {
            open: true,
            key: None,
            scopes: vec![Scope::All],
        })),
        Identity::Key { name, scopes } => Ok(Json(Me {
            open: false,
            key: Some(name.to_owned()),
            scopes: scopes.to_vec(),
        })),
        Identity::Missing => Err(ApiError::Unauthorized),
        Identity::Unknown => Err(ApiError::Forbidden("the API key is not valid".into())),
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct StatsBody {
    version: &'static str,
    node: String,
    started_at: String,
    uptime_seconds: u64,
    store: &'static str,
    broker: &'static str,
    /// One sample a second of this node, oldest first, the last five minutes.
    #[schema(value_type = Vec<Object>)]
    samples: Vec<crate::stats::Sample>,
    /// The live nodes of the cluster (this one alone on the memory broker).
    #[schema(value_type = Vec<Object>)]
    nodes: Vec<crate::broker::NodeInfo>,
    /// Whether the node list could be read from the broker.
    nodes_error: Option<String>,
}

/// This node's live figures (one sample a second, five minutes kept: socket connections by
/// transport, subscriptions, channels, publications, deliveries and slow-consumer drops per
/// second, HTTP requests per second and their p99, bytes queued and kept in history) and the
/// cluster's nodes. Any valid API key may read it.
#[utoipa::path(get, path = "/api/stats", tag = "operations",
    responses((status = 200, description = "`{version, node, uptime_seconds, store, broker, samples, nodes}`", body = StatsBody),
              (status = 401, description = "Keys are configured and none was given", body = super::error::Problem)))]
pub(crate) async fn stats(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<StatsBody>, ApiError> {
    match state.api_keys.identify(super::bearer(&headers)) {
        Identity::Open | Identity::Key { .. } => {}
        Identity::Missing => return Err(ApiError::Unauthorized),
        Identity::Unknown => return Err(ApiError::Forbidden("the API key is not valid".into())),
    }
    let (nodes, nodes_error) = match state.hub.nodes().await {
        Ok(nodes) => (nodes, None),
        Err(error) => (vec![state.hub.node_info()], Some(error.to_string())),
    };
    let info = state.hub.node_info();
    Ok(Json(StatsBody {
        version: env!("CARGO_PKG_VERSION"),
        node: info.id,
        started_at: state.stats.started_at.clone(),
        uptime_seconds: state.stats.uptime(),
        store: state.stats.store,
        broker: state.stats.broker,
        samples: state.stats.samples(),
        nodes,
        nodes_error,
    }))
}
