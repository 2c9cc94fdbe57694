//! The operator's HTTP listener (on `0.0.0.0`, R4.6): `/metrics` (Prometheus text), `/healthz`
//! (the process runs), `/readyz` (connected to NATS, the CRD is installed), and `/` (which
//! replica this is, whether it leads, when it last reconciled).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::sync::RwLock;
use tokio_util::sync::CancellationToken;

use crate::controller::Diagnostics;
use crate::metrics::Metrics;

/// What the endpoints report.
#[derive(Debug, Clone)]
pub struct Health {
    /// Set once NATS is connected and the CRD is found.
    pub ready: Arc<AtomicBool>,
    /// Set while this replica holds the leader lease.
    pub leader: Arc<AtomicBool>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// The controller's diagnostics (set once it runs).
    pub diagnostics: Arc<RwLock<Option<Arc<RwLock<Diagnostics>>>>>,
}

impl Health {
    /// Not ready, not leading.
    pub fn new(metrics: Arc<Metrics>) -> Health {
        Health {
            ready: Arc::new(AtomicBool::new(false)),
            leader: Arc::new(AtomicBool::new(false)),
            metrics,
            diagnostics: Arc::new(RwLock::new(None)),
        }
    }
}

/// The router.
pub fn router(health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/", get(index))
        .with_state(health)
}

async fn metrics(State(h): State<Health>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        h.metrics.encode(),
    )
}

async fn readyz(State(h): State<Health>) -> impl IntoResponse {
    if h.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: connecting to NATS or the API server")
    }
}

async fn index(State(h): State<Health>) -> impl IntoResponse {
    let leader = h.leader.load(Ordering::Relaxed);
    let last = match &*h.diagnostics.read().await {
        Some(d) => d.read().await.last_event.to_string(),
        None => "never".to_owned(),
    };
    format!("shoal-operator\nleader: {leader}\nlast reconcile: {last}\n")
}

/// Serves `router(health)` on `addr` until `cancel`.
///
/// # Errors
/// Binding `addr` failed.
pub async fn serve(addr: SocketAddr, health: Health, cancel: CancellationToken) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, router(health)).with_graceful_shutdown(cancel.cancelled_owned()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        (code, out)
    }

    #[tokio::test]
    async fn endpoints_answer_on_the_bound_port() {
        let metrics = Arc::new(Metrics::default());
        metrics.reconciliations.inc();
        let health = Health::new(metrics);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let app = router(health.clone());
        let stop = cancel.clone();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await
        });
        assert_eq!(get(addr, "/healthz").await.0, 200);
        assert_eq!(get(addr, "/readyz").await.0, 503);
        health.ready.store(true, Ordering::Relaxed);
        assert_eq!(get(addr, "/readyz").await.0, 200);
        let (code, body) = get(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(body.contains("shoal_operator_reconciliations_total 1"), "{body}");
        cancel.cancel();
        task.await.unwrap().unwrap();
    }
}
