//! The web pages embedded in the binary: the console at `/console/` (and `/`, which redirects
//! there) and the example applications at `/examples/`. Nothing is fetched from elsewhere at
//! run time; the pages are plain ES modules that use `/duplex.js` and the public APIs.
//!
//! Files come from `web/` (embedded in release builds, read from the folder in debug builds
//! so a page can be edited and reloaded). A path under `/console/` that is not a file is a page
//! of the console's own router, so deep links (`/console/channels/chat:lobby`) reload to the
//! same view: they get the console's `index.html`. Under `/examples/`, `/examples/NAME` is the
//! application's page.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use rust_embed::RustEmbed;

use super::AppState;
use super::error::ApiError;

#[derive(RustEmbed)]
#[folder = "web/"]
struct Assets;

/// Which pages this server serves (`--console`, `--examples`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pages {
    pub(crate) console: bool,
    pub(crate) examples: bool,
}

/// The routes of the pages that are on.
pub(crate) fn router(pages: Pages) -> Router<AppState> {
    let mut router = Router::new();
    if pages.console {
        router = router
            .route("/", get(|| async { Redirect::to("/console/") }))
            .route("/console", get(|| async { Redirect::to("/console/") }))
            .route("/console/", get(console))
            .route("/console/{*path}", get(console));
    }
    if pages.examples {
        router = router
            .route("/examples", get(|| async { Redirect::to("/examples/") }))
            .route("/examples/", get(examples))
            .route("/examples/{*path}", get(examples));
    }
    router
}

async fn console(
    State(_): State<AppState>,
    path: Option<Path<String>>,
    headers: HeaderMap,
) -> Response {
    let path = path.map(|Path(p)| p).unwrap_or_default();
    if let Some(response) = asset(&format!("console/{path}"), &headers) {
        return response;
    }
    // Not a file: a view of the console's own router (channel names may hold dots).
    let view = ["channels", "records", "connections"]
        .iter()
        .any(|view| path == *view || path.starts_with(&format!("{view}/")));
    if path.is_empty() || view {
        asset("console/index.html", &headers).unwrap_or_else(not_found)
    } else {
        not_found()
    }
}

async fn examples(
    State(_): State<AppState>,
    path: Option<Path<String>>,
    headers: HeaderMap,
) -> Response {
    let path = path.map(|Path(p)| p).unwrap_or_default();
    let path = path.trim_end_matches('/');
    if path.is_empty() {
        return asset("examples/index.html", &headers).unwrap_or_else(not_found);
    }
    asset(&format!("examples/{path}"), &headers)
        // `/examples/chat` is the chat's page.
        .or_else(|| asset(&format!("examples/{path}/index.html"), &headers))
        .unwrap_or_else(not_found)
}

fn not_found() -> Response {
    ApiError::NotFound("nothing is served at this path".into()).into_response()
}

/// An embedded file, with its type and an `ETag`; 304 when the browser's copy is current.
fn asset(path: &str, headers: &HeaderMap) -> Option<Response> {
    if path.split('/').any(|part| part == "..") {
        return None;
    }
    let file = Assets::get(path)?;
    let etag = format!(
        "\"{}\"",
        file.metadata
            .sha256_hash()
            .iter()
            .take(12)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let etag = HeaderValue::from_str(&etag).ok()?;
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|given| given == etag)
    {
        return Some((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    Some(
        (
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(content_type(path)),
                ),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
                (header::ETAG, etag),
                (
                    header::HeaderName::from_static("x-content-type-options"),
                    HeaderValue::from_static("nosniff"),
                ),
            ],
            file.data.into_owned(),
        )
            .into_response(),
    )
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("json") => "application/json",
        Some("ico") => "image/x-icon",
        _ => "application/octet-stream",
    }
}
