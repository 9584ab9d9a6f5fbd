//! The HTTP port: `/metrics` (Prometheus text), `/healthz` (the process is up), `/readyz`
//! (the server takes work: 503 while it recovers, while it drains after a shutdown signal,
//! while any shard is down, and while every provider's circuit breaker is open; `?verbose`
//! says which), `/digests` (each shard's state digest, to compare copies of a shard: see
//! `settlegate replay-shard`). HTTP listens before the engine starts, so all of it answers
//! while the engine recovers.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;

/// Where the server is in its life, as `/readyz` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// The engine is recovering its state (or loading demo data); nothing is served yet.
    Recovering = 0,
    /// Serving.
    Serving = 1,
    /// A shutdown began: no new connections; those open finish their work.
    Draining = 2,
}

/// What the HTTP handlers read.
pub struct HttpState {
    phase: AtomicU8,
    /// The server, once the engine has started.
    server: OnceLock<Arc<crate::connection::Shared>>,
    /// What `/metrics` shows before then: the build and the process.
    early: Metrics,
}

impl Default for HttpState {
    fn default() -> Self {
        HttpState {
            phase: AtomicU8::new(Phase::Recovering as u8),
            server: OnceLock::new(),
            early: Metrics::default(),
        }
    }
}

impl HttpState {
    /// The server is up: its metrics and engine are served from now on, and it is ready.
    pub fn serving(&self, server: Arc<crate::connection::Shared>) {
        let _ = self.server.set(server);
        self.phase.store(Phase::Serving as u8, Ordering::Release);
    }

    /// A shutdown began: not ready any more.
    pub fn draining(&self) {
        self.phase.store(Phase::Draining as u8, Ordering::Release);
    }

    fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Recovering,
            1 => Phase::Serving,
            _ => Phase::Draining,
        }
    }

    fn metrics(&self) -> &Metrics {
        self.server.get().map_or(&self.early, |server| &server.ctx.metrics)
    }

    fn engine(&self) -> Option<&settlegate_engine::Engine> {
        self.server.get().map(|server| &server.ctx.engine)
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
        .route("/cluster/move", axum::routing::post(move_partition))
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

/// Whether the server takes work, and why not: the first reason that holds, in this order:
/// recovering, draining, shards down, every provider's breaker open. With `?verbose`, the body
/// lists every check and its state, one a line.
async fn ready(State(state): State<Arc<HttpState>>, uri: axum::http::Uri) -> impl IntoResponse {
    let report = readiness(&state);
    let status = if report.ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let verbose = uri.query().is_some_and(|q| q.split('&').any(|p| p == "verbose"));
    let body = match (verbose, report.reason()) {
        (true, _) => report.verbose(),
        (false, None) => "ready\n".to_owned(),
        (false, Some(reason)) => format!("not ready: {reason}\n"),
    };
    (status, body)
}

/// The readiness checks, each with its state.
struct Readiness {
    phase: Phase,
    shards_down: Vec<usize>,
    /// Each provider: code, name, and its link when its adapter has one (`None`: no link).
    providers: Vec<(u32, String, Option<settlegate_adapters::ProviderHealth>)>,
}

fn readiness(state: &HttpState) -> Readiness {
    let (shards_down, providers) = match state.engine() {
        Some(engine) => (
            engine.unavailable_shards(),
            engine.provider_states().into_iter().map(|p| (p.code, p.name, p.health)).collect(),
        ),
        None => (Vec::new(), Vec::new()),
    };
    Readiness { phase: state.phase(), shards_down, providers }
}

impl Readiness {
    /// Every provider has a link and its breaker is open: no payment can go anywhere.
    fn all_breakers_open(&self) -> bool {
        !self.providers.is_empty()
            && self.providers.iter().all(|(_, _, h)| h.is_some_and(|h| h.breaker_open))
    }

    fn reason(&self) -> Option<String> {
        match self.phase {
            Phase::Recovering => return Some("recovering".into()),
            Phase::Draining => return Some("draining".into()),
            Phase::Serving => {}
        }
        if !self.shards_down.is_empty() {
            return Some(format!("shards down {:?}", self.shards_down));
        }
        self.all_breakers_open().then(|| "every provider's circuit breaker is open".into())
    }

    fn ready(&self) -> bool {
        self.reason().is_none()
    }

    fn verbose(&self) -> String {
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        let mut out = format!(
            "ready: {}\nrecovering: {}\ndraining: {}\nshards down: {}\n",
            yes_no(self.ready()),
            yes_no(self.phase == Phase::Recovering),
            yes_no(self.phase == Phase::Draining),
            if self.shards_down.is_empty() {
                "none".to_owned()
            } else {
                format!("{:?}", self.shards_down)
            },
        );
        out.push_str(&format!("all breakers open: {}\n", yes_no(self.all_breakers_open())));
        for (code, name, health) in &self.providers {
            let link = match health {
                None => "no link (in process)".to_owned(),
                Some(h) if h.breaker_open => "breaker open".to_owned(),
                Some(h) if h.link_up => "up".to_owned(),
                Some(_) => "connecting".to_owned(),
            };
            out.push_str(&format!("provider {code} ({name}): {link}\n"));
        }
        out
    }
}

/// Each shard's state digest, as JSON: `{"digests":[{"shard":0,"digest":"<16 hex digits>"},
/// ...]}` (`null` for a shard that stopped). Taken in each shard's turn.
async fn digests(State(state): State<Arc<HttpState>>) -> axum::response::Response {
    let Some(engine) = state.engine() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "recovering\n").into_response();
    };
    let digests = engine.shard_digests().await;
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
        .into_response()
}

/// Each partition's standing on this node, as JSON: `{"node":"n1","partitions":[{"partition":0,
/// "role":"owner","owner":"n1","epoch":2,"applied":1234},...]}`; 404 when the server is not a
/// cluster's node.
async fn cluster(State(state): State<Arc<HttpState>>) -> impl IntoResponse {
    let Some(engine) = state.engine() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain")],
            "recovering\n".to_owned(),
        );
    };
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
                "{{\"partition\":{},\"role\":\"{role}\",\"owner\":\"{owner}\",\"epoch\":{epoch},\"applied\":{},\"lag\":{}}}",
                p.partition, p.applied, p.lag
            )
        })
        .collect();
    let body = format!("{{\"node\":\"{}\",\"partitions\":[{}]}}\n", config.node, entries.join(","));
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body)
}

/// `POST /cluster/move?partition=N&to=NODE` on the partition's owner: a planned move (see
/// `docs/CLUSTER.md`). Answers once the partition is handed over: 200, or 409 with why not.
async fn move_partition(
    State(state): State<Arc<HttpState>>,
    uri: axum::http::Uri,
) -> impl IntoResponse {
    let query = uri.query().unwrap_or("");
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_owned)
    };
    let partition = param("partition").and_then(|p| p.parse::<usize>().ok());
    let (Some(partition), Some(to)) = (partition, param("to")) else {
        return (
            StatusCode::BAD_REQUEST,
            "usage: POST /cluster/move?partition=N&to=NODE\n".to_owned(),
        );
    };
    let Some(engine) = state.engine() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "recovering\n".to_owned());
    };
    match engine.move_partition(partition, &to).await {
        Ok(()) => (StatusCode::OK, format!("partition {partition} handed to {to}\n")),
        Err(why) => (StatusCode::CONFLICT, format!("{why}\n")),
    }
}
