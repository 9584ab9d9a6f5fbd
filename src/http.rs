//! The HTTP port: `/metrics` (Prometheus text), `/healthz` (the process is up), `/readyz`
//! (the engine accepts work; 503 while starting or shutting down, or while any shard is
//! down), `/digests` (each shard's state digest, to compare copies of a shard: see
//! `settlegate replay-shard`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;

/// What the HTTP handlers read.
pub struct HttpState {
    /// Metrics to render.
    pub metrics: Arc<crate::connection::Shared>,
    /// Whether the server takes work.
    pub ready: AtomicBool,
}

impl HttpState {
    fn metrics(&self) -> &Metrics {
        &self.metrics.ctx.metrics
    }
}

/// Serves until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    state: Arc<HttpState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/digests", get(digests))
        .route("/cluster", get(cluster))
        .with_state(state);
    let stop = async move {
        let _ = shutdown.wait_for(|stopping| *stopping).await;
    };
    if let Err(error) = axum::serve(listener, router).with_graceful_shutdown(stop).await {
        tracing::error!(%error, "HTTP server failed");
    }
}

async fn metrics(State(state): State<Arc<HttpState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.metrics().render(),
    )
}

/// Ready while the server takes work and every shard does: a shard whose log writer failed
/// (or that stopped) makes the whole server not ready, naming the shards.
async fn ready(State(state): State<Arc<HttpState>>) -> impl IntoResponse {
    if !state.ready.load(Ordering::Acquire) {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_owned());
    }
    let down = state.metrics.ctx.engine.unavailable_shards();
    if down.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: shards down {down:?}\n"))
    }
}

/// Each shard's state digest, as JSON: `{"digests":[{"shard":0,"digest":"<16 hex digits>"},
/// ...]}` (`null` for a shard that stopped). Taken in each shard's turn.
async fn digests(State(state): State<Arc<HttpState>>) -> impl IntoResponse {
    let digests = state.metrics.ctx.engine.shard_digests().await;
    let entries: Vec<String> = digests
        .iter()
        .enumerate()
        .map(|(shard, digest)| match digest {
            Some(digest) => format!("{{\"shard\":{shard},\"digest\":\"{digest:016x}\"}}"),
            None => format!("{{\"shard\":{shard},\"digest\":null}}"),
        })
        .collect();
    (
        [(header::CONTENT_TYPE, "application/json")],
        format!("{{\"digests\":[{}]}}\n", entries.join(",")),
    )
}

/// Each partition's standing on this node, as JSON: `{"node":"n1","partitions":[{"partition":0,
/// "role":"owner","owner":"n1","epoch":2,"applied":1234},...]}`; 404 when the server is not a
/// cluster's node.
async fn cluster(State(state): State<Arc<HttpState>>) -> impl IntoResponse {
    let engine = &state.metrics.ctx.engine;
    let (Some(partitions), Some(config)) = (engine.cluster_status(), &engine.config().cluster)
    else {
        return (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain")],
            "not a cluster node\n".to_owned(),
        );
    };
    let entries: Vec<String> = partitions
        .iter()
        .map(|p| {
            let role = format!("{:?}", p.role).to_lowercase();
            let (owner, epoch) =
                p.owner.as_ref().map_or(("", 0), |o| (o.node.as_str(), o.epoch));
            format!(
                "{{\"partition\":{},\"role\":\"{role}\",\"owner\":\"{owner}\",\"epoch\":{epoch},\"applied\":{}}}",
                p.partition, p.applied
            )
        })
        .collect();
    let body = format!("{{\"node\":\"{}\",\"partitions\":[{}]}}\n", config.node, entries.join(","));
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body)
}
