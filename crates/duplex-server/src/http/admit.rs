//! The layer every route's requests pass through: it counts and times each request by method,
//! route template and status, and reads a request's body whole within `body_read_timeout`.
//!
//! One hand-written service rather than two `axum::middleware::from_fn`: each of those boxes a
//! clone of the route's service and its own future per request, about a twentieth of a small
//! GET's server time in `perf` (docs/benchmarks.md). A request without a body (every read) goes
//! straight to the route with one boxed future. CORS wraps this layer, so what it refuses (413,
//! 408) still carries the CORS headers.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::HttpBody as _;
use axum::extract::{MatchedPath, Request};
use axum::response::{IntoResponse as _, Response};
use http_body_util::BodyExt as _;

use super::error::ApiError;
use crate::metrics::{HttpLabels, Metrics, RouteLabel, method_label};

/// Makes [`Admit`] services.
#[derive(Debug, Clone)]
pub(super) struct AdmitLayer {
    limits: Arc<Limits>,
}

#[derive(Debug)]
struct Limits {
    metrics: Arc<Metrics>,
    max_body: usize,
    body_read_timeout: Duration,
}

impl AdmitLayer {
    pub(super) fn new(metrics: Arc<Metrics>, max_body: usize, body_read_timeout: Duration) -> Self {
        AdmitLayer {
            limits: Arc::new(Limits {
                metrics,
                max_body,
                body_read_timeout,
            }),
        }
    }
}

impl<S> tower::Layer<S> for AdmitLayer {
    type Service = Admit<S>;

    fn layer(&self, inner: S) -> Admit<S> {
        Admit {
            inner,
            limits: self.limits.clone(),
        }
    }
}

/// A route's service, counted and timed, with its request's body read in time.
#[derive(Debug, Clone)]
pub(super) struct Admit<S> {
    inner: S,
    limits: Arc<Limits>,
}

impl<S> tower::Service<Request> for Admit<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let tracked = Tracked::start(&self.limits.metrics, &request);
        if request.body().is_end_stream() {
            let response = self.inner.call(request);
            return Box::pin(async move { Ok(tracked.finish(response.await?)) });
        }
        // The body is read first: the service made ready goes with the request, a clone of it
        // stays for the next one.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let limits = self.limits.clone();
        Box::pin(async move {
            let response = match limits.read_body(request).await {
                Ok(request) => inner.call(request).await?,
                Err(refused) => refused,
            };
            Ok(tracked.finish(response))
        })
    }
}

impl Limits {
    /// The request with its whole body, or the answer to a body too large (413), too slow (408)
    /// or broken (400). Bodies are bounded by `max_body` and every handler that takes one reads
    /// it whole anyway.
    async fn read_body(&self, request: Request) -> Result<Request, Response> {
        let (parts, body) = request.into_parts();
        // One byte over the limit is enough to know the body is too large.
        let limited = http_body_util::Limited::new(body, self.max_body + 1);
        match tokio::time::timeout(self.body_read_timeout, limited.collect()).await {
            Ok(Ok(collected)) => {
                let body = axum::body::Body::from(collected.to_bytes());
                Ok(Request::from_parts(parts, body))
            }
            Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => {
                Err(ApiError::PayloadTooLarge {
                    limit: self.max_body,
                }
                .into_response())
            }
            Ok(Err(error)) => Err(ApiError::BadBody(format!(
                "the body could not be read: {error}"
            ))
            .into_response()),
            Err(_) => Err(ApiError::RequestTimeout(self.body_read_timeout).into_response()),
        }
    }
}

/// A request in flight: counted in `http_in_flight` until it is answered or dropped (a client
/// that goes away mid-request drops it).
struct Tracked {
    metrics: Arc<Metrics>,
    started: Instant,
    method: &'static str,
    route: RouteLabel,
}

impl Tracked {
    fn start(metrics: &Arc<Metrics>, request: &Request) -> Tracked {
        metrics.http_in_flight.inc();
        Tracked {
            metrics: metrics.clone(),
            started: Instant::now(),
            method: method_label(request.method()),
            route: RouteLabel(request.extensions().get::<MatchedPath>().cloned()),
        }
    }

    /// Counts and times the answer.
    fn finish(mut self, response: Response) -> Response {
        let elapsed = self.started.elapsed();
        let labels = HttpLabels {
            method: self.method,
            route: RouteLabel(self.route.0.take()),
            status: response.status().as_u16(),
        };
        let metrics = &self.metrics;
        metrics.http_requests.get_or_create(&labels).inc();
        metrics
            .http_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        metrics.recent_http.record(elapsed);
        response
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.metrics.http_in_flight.dec();
    }
}
