//! The HTTP listener every Shoal process serves (DESIGN.md §7): `/metrics` (the Prometheus
//! text of [`Metrics`], OpenMetrics flavour as `prometheus-client` writes it), `/healthz` (the
//! process runs and answers) and `/readyz` (the process has what it needs to do its work: for
//! a node, NATS and its shared-memory directory).
//!
//! The listener is bound before the process connects anywhere, so a liveness probe answers
//! during a slow start while `/readyz` still says 503; [`Probe`] is how the process tells the
//! listener what it has. The NATS request/reply metrics subject stays beside it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// The content type of `/metrics` (what `prometheus-client`'s text encoder writes).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the endpoints report, set by the process as it starts and stops. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Probe {
    inner: Arc<ProbeInner>,
}

#[derive(Debug, Default)]
struct ProbeInner {
    ready: AtomicBool,
    /// Why the process is not ready (shown by `/readyz` with its 503).
    waiting_for: RwLock<&'static str>,
    metrics: RwLock<Option<Arc<Metrics>>>,
}

impl Probe {
    /// Not ready, waiting for `what`, no metrics yet.
    pub fn new(what: &'static str) -> Probe {
        let p = Probe::default();
        p.not_ready(what);
        p
    }

    /// The metrics `/metrics` serves, if set (a node instance started again in the same process
    /// keeps them, so counters survive the restart).
    pub fn metrics(&self) -> Option<Arc<Metrics>> {
        self.inner.metrics.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The metrics `/metrics` serves from now on.
    pub fn set_metrics(&self, metrics: Arc<Metrics>) {
        *self.inner.metrics.write().unwrap_or_else(|p| p.into_inner()) = Some(metrics);
    }

    /// `/readyz` answers 200 from now on.
    pub fn ready(&self) {
        self.inner.ready.store(true, Ordering::Release);
    }

    /// `/readyz` answers 503 from now on, saying it waits for `what`.
    pub fn not_ready(&self, what: &'static str) {
        self.inner.ready.store(false, Ordering::Release);
        *self.inner.waiting_for.write().unwrap_or_else(|p| p.into_inner()) = what;
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
    }

    fn metrics_text(&self) -> String {
        match &*self.inner.metrics.read().unwrap_or_else(|p| p.into_inner()) {
            Some(m) => m.encode(),
            None => "# EOF\n".to_owned(),
        }
    }

    fn waiting_for(&self) -> &'static str {
        *self.inner.waiting_for.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// The router of the three endpoints.
pub fn router(probe: Probe) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(probe)
}

async fn metrics(State(p): State<Probe>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], p.metrics_text())
}

async fn readyz(State(p): State<Probe>) -> impl IntoResponse {
    if p.is_ready() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: waiting for {}\n", p.waiting_for()))
    }
}

/// A bound, not yet serving HTTP listener.
#[derive(Debug)]
pub struct HttpListener {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
}

impl HttpListener {
    /// Binds `addr` (port 0: a free port, see [`Self::local_addr`]).
    ///
    /// # Errors
    /// [`Error::Io`] when the address cannot be bound (in use, not local, no permission).
    pub async fn bind(addr: SocketAddr) -> Result<HttpListener> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::io(format!("binding the HTTP listener on {addr} (--http)"), e))?;
        let addr = listener.local_addr().map_err(|e| Error::io("reading the HTTP listener's address", e))?;
        Ok(HttpListener { listener, addr })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves [`router`] until `cancel`; connections in flight finish their request.
    pub async fn serve(self, probe: Probe, cancel: CancellationToken) {
        let addr = self.addr;
        if let Err(e) =
            axum::serve(self.listener, router(probe)).with_graceful_shutdown(cancel.cancelled_owned()).await
        {
            tracing::error!(%addr, error = %e, "HTTP listener stopped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        (code, out)
    }

    #[tokio::test]
    async fn readiness_follows_the_probe_and_metrics_follow_the_registry() {
        let probe = Probe::new("NATS");
        let listener = HttpListener::bind("127.0.0.1:0".parse().expect("addr")).await.expect("bind");
        let addr = listener.local_addr();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(listener.serve(probe.clone(), cancel.clone()));
        assert_eq!(get(addr, "/healthz").await.0, 200);
        let (code, body) = get(addr, "/readyz").await;
        assert_eq!(code, 503);
        assert!(body.contains("waiting for NATS"), "{body}");
        let metrics = Arc::new(Metrics::default());
        metrics.updates_staged.inc();
        probe.set_metrics(Arc::clone(&metrics));
        probe.ready();
        assert_eq!(get(addr, "/readyz").await.0, 200);
        let (code, body) = get(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(body.contains("shoal_updates_staged_total 1"), "{body}");
        assert_eq!(get(addr, "/nothing").await.0, 404);
        probe.not_ready("shutdown");
        assert_eq!(get(addr, "/readyz").await.0, 503);
        cancel.cancel();
        task.await.expect("server task");
    }
}
