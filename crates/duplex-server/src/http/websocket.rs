//! `GET /ws`: checks the origin and the token of a browser's or a client's request, takes a place
//! under the connection limits, and upgrades it to a WebSocket that [`crate::socket`] serves.
//!
//! The handshake (RFC 6455 §4.2) is answered here rather than by axum's `WebSocketUpgrade`,
//! whose socket is tungstenite's with its per-connection buffers: the upgraded stream goes to
//! [`crate::socket::wire`], which holds none while a connection is idle.

use axum::extract::{ConnectInfo, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;

use super::{ApiError, AppState};
use crate::socket::ws::serve;
use crate::write_deadline::WriteDeadline;

/// Upgrades `GET /ws` to a WebSocket connection.
pub(crate) async fn upgrade(
    State(state): State<AppState>,
    ConnectInfo(remote): ConnectInfo<std::net::SocketAddr>,
    RawQuery(query): RawQuery,
    mut request: Request,
) -> Result<Response, ApiError> {
    let headers = request.headers();
    super::check_origin(&state, headers)?;
    // Browsers cannot set headers on a WebSocket: a token may come as `?token=`.
    let token = form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
        .find(|(key, _)| key == "token")
        .map(|(_, value)| value.into_owned());
    let auth = match token {
        Some(token) => Some(super::verify_token(&state, &token)?),
        None => None,
    };
    let accept = accept_key(headers).map_err(|why| ApiError::UpgradeRequired(why.to_owned()))?;
    let on_upgrade = request
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
        .ok_or_else(|| {
            ApiError::UpgradeRequired("this connection cannot be upgraded".to_owned())
        })?;
    let headers = request.headers();
    let context = state.sockets.clone();
    let slot = context.slots.acquire(Some(remote.ip())).map_err(|limit| {
        context.metrics.connection_refusals.inc();
        ApiError::TooManyConnections(limit.to_string())
    })?;
    let upgrade_context = context
        .hooks
        .as_ref()
        .filter(|hooks| hooks.on(crate::hooks::Hook::Connect))
        .and_then(|hooks| crate::hooks::upgrade_context(hooks.settings(), headers));
    let tracker = context.tracker.clone();
    // One box for what the connection starts with, freed once it has started: the task's
    // future keeps its captures for its whole life, so they are kept small.
    let start = Box::new(Start {
        remote,
        context,
        slot,
        auth,
        upgrade: upgrade_context,
    });
    tracker.spawn(connection_task(on_upgrade, start));
    let mut response = Response::new(axum::body::Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let response_headers = response.headers_mut();
    response_headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    response_headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    response_headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    Ok(response)
}

/// What a WebSocket connection's task runs: the upgrade, then the connection. Its size is
/// every idle connection's task (tested below).
async fn connection_task(on_upgrade: hyper::upgrade::OnUpgrade, start: Box<Start>) {
    // The client may not wait for the 101 before its first frame: whatever hyper read past the
    // request comes with the upgraded stream.
    let Ok(upgraded) = on_upgrade.await else {
        return;
    };
    serving(upgraded, *start).await;
}

/// The connection's future, from its upgraded stream. A function of its own, so that the
/// task holds only this future while the connection lives: matched inside the task, hyper's
/// `Parts` (the socket and the read buffer's handle) kept their room in the task's future
/// beside the connection's, 560 bytes instead of 464 (`size_of_val`, release build).
fn serving(
    upgraded: hyper::upgrade::Upgraded,
    start: Start,
) -> futures_util::future::Either<
    impl Future<Output = ()> + Send,
    std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
> {
    let Start {
        remote,
        context,
        slot,
        auth,
        upgrade,
    } = start;
    // A plain connection's socket is taken out of hyper's box; a TLS one is read through it
    // (hyper keeps what it read past the request for the first read), boxed: it is the larger
    // future, and every plain connection's task would be sized to it.
    type Plain = hyper_util::rt::TokioIo<WriteDeadline<tokio::net::TcpStream>>;
    match upgraded.downcast::<Plain>() {
        Ok(parts) => {
            // hyper's read buffer (8 KiB) must not live as long as the connection: only what
            // it held past the request is copied out, and it is dropped here.
            let (io, unread) = {
                let read_buf = parts.read_buf;
                (parts.io.into_inner(), read_buf.to_vec())
            };
            futures_util::future::Either::Left(serve(
                io, unread, remote, context, slot, auth, upgrade,
            ))
        }
        Err(upgraded) => {
            let io = hyper_util::rt::TokioIo::new(upgraded);
            futures_util::future::Either::Right(Box::pin(serve(
                io,
                Vec::new(),
                remote,
                context,
                slot,
                auth,
                upgrade,
            )))
        }
    }
}

/// What a connection starts with, from its upgrade request.
struct Start {
    remote: std::net::SocketAddr,
    context: std::sync::Arc<crate::socket::SocketContext>,
    slot: crate::socket::slots::Slot,
    auth: Option<crate::hub::namespace::ClientAuth>,
    upgrade: Option<Box<crate::hooks::UpgradeContext>>,
}

/// The `Sec-WebSocket-Accept` value for a valid upgrade request, or what is wrong with it.
fn accept_key(headers: &HeaderMap) -> Result<HeaderValue, &'static str> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value.to_str().is_ok_and(|value| {
                value
                    .split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    if !has_token(header::CONNECTION, "upgrade") {
        return Err("Connection header did not include 'upgrade'");
    }
    if !has_token(header::UPGRADE, "websocket") {
        return Err("`Upgrade` header did not include 'websocket'");
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        return Err("`Sec-WebSocket-Version` header did not include '13'");
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or("`Sec-WebSocket-Key` header missing")?;
    HeaderValue::from_str(&tungstenite::handshake::derive_accept_key(key.as_bytes()))
        .map_err(|_| "`Sec-WebSocket-Key` header invalid")
}

#[cfg(test)]
mod tests {
    /// The size of what a function returns, without calling it.
    fn size_of_output<A, B, R>(_: fn(A, B) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// What a WebSocket connection's task holds for the connection's whole life
    /// ([`super::connection_task`]) is the future [`super::serving`] returns: the connection
    /// and little else (with hyper's `Parts` kept beside it, as the match once did inside the
    /// task, this test reads 584 bytes against 480 allowed). Its size decides the
    /// size class of every task (1.86–1.95 KiB per idle connection since; 2.02–2.20 KiB when
    /// the task kept hyper's `Parts` beside it, docs/benchmarks.md "Idle connections").
    #[test]
    fn a_connection_task_holds_the_connection_and_little_else() {
        type Plain = crate::write_deadline::WriteDeadline<tokio::net::TcpStream>;
        let connection = std::mem::size_of::<crate::socket::ws::Connection<Plain>>();
        let serving = size_of_output(super::serving);
        let task = size_of_output(super::connection_task);
        assert!(
            serving <= connection + 48 && task <= connection + 64,
            "the task's future is {task} bytes and the connection's {serving} for a connection \
             of {connection}"
        );
    }
}
