//! The HTTP side of the server: one axum router made of one module per resource.
//!
//! Every response passes through [`admit`], which counts it and times it by route template
//! and reads its body in time; unknown paths and methods answer with problem+json like every
//! other error.

mod admit;
mod channels;
mod connections;
mod error;
mod ops;
mod records;
mod stats;
mod transports;
mod web;
mod websocket;

/// [`records`]' query parser, for the fuzz targets.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn parse_list_query_for_fuzzing(
    query: &str,
    cursors: &crate::store::CursorKey,
    collection: &str,
) -> Result<crate::store::ListQuery, error::ApiError> {
    records::parse_list_query(query, cursors, collection)
}

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{self as http, HeaderMap, HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use bytes::Bytes;
use tower_http::trace::TraceLayer;

pub use connections::{DEFAULT_REQUEST_TIMEOUT, MAX_REQUEST_TIMEOUT};
pub use error::{ApiError, PROBLEM_JSON, Problem};
pub use records::{DEFAULT_LIMIT, MAX_FILTERS, MAX_LIMIT};

use crate::api_keys::{ApiKeys, KeyCheck, Scope};
use crate::hub::Hub;
use crate::hub::namespace::ClientAuth;
use crate::metrics::Metrics;
use crate::socket::SocketContext;
use crate::store::Store;

/// What every handler can reach: one `Arc`, so handing it to a request is one increment.
#[derive(Debug, Clone)]
pub(crate) struct AppState(Arc<Shared>);

impl AppState {
    pub(crate) fn new(shared: Shared) -> AppState {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The server's parts, shared by every request.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) hub: Arc<Hub>,
    pub(crate) sockets: Arc<SocketContext>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) max_body: usize,
    /// How long a request body may take to arrive.
    pub(crate) body_read_timeout: Duration,
    /// The keys the server API requires (open when there are none).
    pub(crate) api_keys: Arc<ApiKeys>,
    /// Browser origins allowed besides the server's own (`*`: any).
    pub(crate) allowed_origins: Arc<[String]>,
    /// What list cursors are sealed with.
    pub(crate) cursors: Arc<crate::store::CursorKey>,
    /// This node's live figures, for the console.
    pub(crate) stats: Arc<crate::stats::Stats>,
    /// Which web pages are served.
    pub(crate) pages: web::Pages,
}

pub(crate) use web::Pages;

/// Checks a browser's `Origin` for WebSockets and event streams: none (not a browser), the
/// server's own host, or one listed in `allowed_origins`.
pub(crate) fn check_origin(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("");
    let allowed = &state.allowed_origins;
    if allowed.iter().any(|o| o == "*" || o == origin) {
        return Ok(());
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let same_origin = origin
        .split_once("://")
        .is_some_and(|(_, rest)| !host.is_empty() && rest == host);
    if same_origin {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "origin {origin:?} is not allowed; list it in allowed_origins"
        )))
    }
}

/// Verifies a connection token given over HTTP; 401 `invalid_token` (`token_expired`,
/// `token_not_yet_valid`) when refused.
pub(crate) fn verify_token(
    state: &AppState,
    token: &str,
) -> Result<crate::hub::namespace::ClientAuth, ApiError> {
    let verified = match &state.sockets.tokens {
        Some(verifier) => verifier.verify(token),
        None => Err(crate::auth::TokenError::NotConfigured),
    };
    verified.map_err(ApiError::Token)
}

/// The `Authorization: Bearer` value, if any.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Who is calling the records API: the server (an API key with the `records` scope), a client
/// with a verified token, or an anonymous client (no `Authorization`).
pub(crate) enum HttpCaller {
    /// An API key with the `records` scope.
    Server,
    /// A client, with what its token (if any) says.
    Client(ClientAuth),
}

impl HttpCaller {
    /// The hub's view of this caller.
    pub(crate) fn as_caller(&self) -> crate::hub::namespace::Caller<'_> {
        match self {
            HttpCaller::Server => crate::hub::namespace::Caller::Server,
            HttpCaller::Client(auth) => crate::hub::namespace::Caller::Client(auth),
        }
    }

    /// Reads the caller from `Authorization: Bearer`: an API key, else a connection token.
    pub(crate) fn from_headers(state: &AppState, headers: &HeaderMap) -> Result<Self, ApiError> {
        let Some(given) = bearer(headers) else {
            return Ok(HttpCaller::Client(ClientAuth::default()));
        };
        match state.api_keys.check(Some(given), Scope::Records) {
            KeyCheck::Granted => return Ok(HttpCaller::Server),
            KeyCheck::MissingScope => {
                return Err(ApiError::Forbidden(
                    "the API key lacks the records scope".into(),
                ));
            }
            KeyCheck::Open | KeyCheck::Unknown => {}
        }
        verify_token(state, given).map(HttpCaller::Client)
    }
}

/// CORS for the HTTP API: the listed origins (or any, with `*`) may call it from a browser.
fn cors(allowed_origins: &[String]) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let origin = if allowed_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            allowed_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok()),
        )
    };
    CorsLayer::new()
        .allow_origin(origin)
        .allow_methods([
            http::Method::GET,
            http::Method::POST,
            http::Method::PUT,
            http::Method::PATCH,
            http::Method::DELETE,
        ])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            header::IF_MATCH,
            header::IF_NONE_MATCH,
            http::HeaderName::from_static("last-event-id"),
        ])
        .expose_headers([header::ETAG, header::LOCATION])
}

/// The JSON media type.
pub(crate) const JSON: &str = "application/json";

/// Items in a page of the server API's lists when the caller names no `limit`.
const DEFAULT_PAGE: usize = 100;
/// The largest `limit` of those lists.
const MAX_PAGE: usize = 1000;

/// `limit`, `cursor` and (where a list takes it) `search` of a paginated list.
pub(crate) struct PageQuery {
    pub(crate) limit: usize,
    pub(crate) cursor: Option<String>,
    pub(crate) search: Option<String>,
}

/// Reads a list's `limit` (1 to 1000, default 100), `cursor` and, when `searchable`, `search`;
/// anything else is a 400.
pub(crate) fn parse_page_query(
    query: Option<&str>,
    searchable: bool,
) -> Result<PageQuery, ApiError> {
    let mut page = PageQuery {
        limit: DEFAULT_PAGE,
        cursor: None,
        search: None,
    };
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "limit" => {
                page.limit = value
                    .parse()
                    .ok()
                    .filter(|l| (1..=MAX_PAGE).contains(l))
                    .ok_or_else(|| {
                        ApiError::InvalidQuery(format!("limit must be from 1 to {MAX_PAGE}"))
                    })?;
            }
            "cursor" => page.cursor = Some(value.into_owned()),
            "search" if searchable => {
                page.search = Some(value.into_owned()).filter(|s| !s.is_empty())
            }
            other => {
                let expected = if searchable {
                    "limit, cursor or search"
                } else {
                    "limit or cursor"
                };
                return Err(ApiError::InvalidQuery(format!(
                    "unknown parameter {other:?}: expected {expected}"
                )));
            }
        }
    }
    Ok(page)
}

/// The cursor of a list that was not one this server issued.
pub(crate) fn foreign_cursor() -> ApiError {
    ApiError::InvalidQuery("cursor is not one this server issued".into())
}

/// Checks that the body's media type (parameters aside) is one of `accepted`.
pub(crate) fn check_media_type(
    headers: &HeaderMap,
    accepted: &[&'static str],
) -> Result<(), ApiError> {
    let media_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    if media_type.is_some_and(|m| accepted.contains(&m.as_str())) {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType {
            expected: accepted[0],
        })
    }
}

/// The body, or 413 with the configured limit.
pub(crate) fn body_bytes(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| match ApiError::from(rejection) {
        ApiError::PayloadTooLarge { .. } => ApiError::PayloadTooLarge {
            limit: state.max_body,
        },
        other => other,
    })
}

/// A span and a response line per request, at DEBUG, when the log takes `tower_http` at DEBUG
/// (`DUPLEX_LOG=debug` or `tower_http=debug`) as the server starts. Otherwise there is no layer
/// at all: making and filtering a span per request costs about a sixth of a small GET's time.
/// Failures are logged once either way, by `ApiError` (client-caused ones at debug).
fn traced() -> bool {
    tracing::enabled!(target: "tower_http::trace", tracing::Level::DEBUG)
}

/// The whole HTTP API.
pub(crate) fn router(state: AppState) -> Router {
    let origins = state.allowed_origins.clone();
    let scoped = |routes: Router<AppState>, scope: Scope| {
        routes.route_layer(middleware::from_fn_with_state(
            (state.clone(), scope),
            require_scope,
        ))
    };
    let server_api = Router::new()
        .merge(scoped(channels::publish_router(), Scope::ChannelsPublish))
        .merge(scoped(channels::read_router(), Scope::ChannelsRead))
        .merge(scoped(connections::router(), Scope::Connections));
    let router = Router::new()
        .merge(records::router())
        .merge(transports::router())
        .merge(server_api)
        .merge(stats::router())
        .merge(ops::router())
        .merge(web::router(state.pages))
        .route("/ws", axum::routing::get(websocket::upgrade))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // One layer for all three: each `Router::layer` wraps every route once more, and each
        // wrapping costs a boxed clone of the route's service per request.
        .layer(
            tower::ServiceBuilder::new()
                // Without allowed origins, every browser request is same-origin: no CORS work.
                // Outermost, so that a body refused by `admit` still carries the CORS headers
                // (preflights, answered here, are not counted in the request metrics).
                .layer(tower::util::option_layer(
                    (!origins.is_empty()).then(|| cors(&origins)),
                ))
                .layer(admit::AdmitLayer::new(
                    state.metrics.clone(),
                    state.max_body,
                    state.body_read_timeout,
                ))
                .layer(DefaultBodyLimit::max(state.max_body)),
        )
        .with_state(state);
    if traced() {
        router.layer(TraceLayer::new_for_http().on_failure(()))
    } else {
        router
    }
}

/// The server API answers only to a key with the route's scope, when keys are configured:
/// 401 `unauthorized` without one, 403 `forbidden` with an unknown key or one lacking the scope.
async fn require_scope(
    State((state, scope)): State<(AppState, Scope)>,
    request: Request,
    next: Next,
) -> Response {
    use axum::response::IntoResponse as _;
    let given = bearer(request.headers());
    match state.api_keys.check(given, scope) {
        KeyCheck::Open | KeyCheck::Granted => next.run(request).await,
        KeyCheck::Unknown if given.is_none() => ApiError::Unauthorized.into_response(),
        KeyCheck::Unknown => ApiError::Forbidden("the API key is not valid".into()).into_response(),
        KeyCheck::MissingScope => {
            ApiError::Forbidden(format!("the API key lacks the {} scope", scope.as_str()))
                .into_response()
        }
    }
}

async fn not_found() -> ApiError {
    ApiError::NotFound("nothing is served at this path".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
