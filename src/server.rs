//! The server: binds the listeners, accepts connections under a cap, runs TLS handshakes,
//! and shuts down gracefully (stop accepting, let connections finish their in-flight work).
//!
//! Connections live on the connection threads (`io_threads`), each running a single-threaded
//! runtime of its own: a connection is handed to one thread when it is accepted (round robin)
//! and stays there, with its socket registered in that thread's poller and every task it
//! spawns (its writer, its batches) on that thread. Nothing is stolen or woken across
//! threads, as in the multi-threaded runtime it replaced, where each connection's wake-ups
//! went to whichever worker was free (`docs/BENCHMARKS-HISTORY.md`). The accept loop, HTTP and the
//! code sweeper run on the caller's runtime.

use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use settlegate_engine::Engine;
use settlegate_protocol::frame::BODY_LEN_MAX;
use settlegate_protocol::threads::{self, RuntimeThreads};
use settlegate_protocol::ServerInfo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::connection::{self, ConnectionLimits, Shared};
use crate::handler::Context;
use crate::http::{self, HttpState};
use crate::identity::Identities;
use crate::metrics::Metrics;

/// A running server.
pub struct RunningServer {
    /// Where the protocol listens.
    pub addr: SocketAddr,
    /// Where HTTP listens.
    pub http_addr: SocketAddr,
    /// Whether TLS is on.
    pub tls: bool,
    /// The engine (shared with in-process callers).
    pub engine: Engine,
    shutdown: watch::Sender<bool>,
    /// Stops HTTP: after the drain, so that `/readyz` answers 503 through it.
    http_shutdown: watch::Sender<bool>,
    accept_task: tokio::task::JoinHandle<()>,
    http_task: tokio::task::JoinHandle<()>,
    http_state: Arc<HttpState>,
}

/// Starts HTTP (answering 503 on `/readyz` meanwhile), the engine (its recovery), then the
/// protocol listener. Returns once the server takes work.
pub async fn start(config: Config) -> anyhow::Result<RunningServer> {
    start_observed(config, |_| {}).await
}

/// [`start`], telling `http_up` where HTTP listens as soon as it does, before the engine
/// recovers (for tests and supervisors that watch the start).
pub async fn start_observed(
    config: Config,
    http_up: impl FnOnce(SocketAddr),
) -> anyhow::Result<RunningServer> {
    let server_config = config.server.clone();
    let tls = server_config.tls.as_ref().map(crate::tls::acceptor).transpose()?;
    let http_listener = TcpListener::bind(server_config.http_listen)
        .await
        .with_context(|| format!("binding {}", server_config.http_listen))?;
    let http_addr = http_listener.local_addr()?;
    let http_state = Arc::new(HttpState::default());
    let (http_shutdown, http_shutdown_rx) = watch::channel(false);
    let http_task =
        tokio::spawn(http::serve(http_listener, Arc::clone(&http_state), http_shutdown_rx));
    http_up(http_addr);
    let started = async {
        // Recovery reads and applies the logs: blocking work, off the runtime HTTP runs on.
        // The vault key from the environment or its file (`docs/CONFIG.md`), read here too.
        let engine_config = config.engine.clone();
        let engine = tokio::task::spawn_blocking(move || {
            let engine_config = crate::config::engine_config_from_env(&engine_config)
                .map_err(settlegate_engine::EngineError::Config)?;
            Engine::start(engine_config)
        })
        .await
        .context("starting the engine")?
        .context("starting the engine")?;
        crate::demo::load(&engine, config.demo.users).await.context("loading demo data")?;
        if config.demo.stores {
            crate::demo::load_stores(&engine).await.context("loading demo stores")?;
        }
        let listener = TcpListener::bind(server_config.listen)
            .await
            .with_context(|| format!("binding {}", server_config.listen))?;
        anyhow::Ok((engine, listener))
    };
    let (engine, listener) = match started.await {
        Ok(started) => started,
        Err(error) => {
            let _ = http_shutdown.send(true);
            let _ = http_task.await;
            return Err(error);
        }
    };
    let limits = ConnectionLimits {
        in_flight_max: server_config.in_flight_max,
        idle_timeout: Duration::from_millis(server_config.idle_timeout_ms),
        frame_read_timeout: Duration::from_millis(server_config.frame_read_timeout_ms),
        auth_timeout: Duration::from_millis(server_config.auth_timeout_ms),
        replies: crate::outbox::Budget {
            own_max: server_config.reply_backlog_max_bytes,
            total_max: server_config.reply_backlog_total_max_bytes,
        },
    };
    let info = ServerInfo {
        server_version: env!("CARGO_PKG_VERSION").into(),
        protocol_version: 1,
        shards: engine.shard_count() as u16,
        body_length_max: BODY_LEN_MAX as u32,
        in_flight_max: server_config.in_flight_max as u16,
        providers: engine
            .registry()
            .codes()
            .into_iter()
            .filter_map(|code| engine.registry().provider(code).map(|p| (code, p.name.clone())))
            .collect(),
    };
    let shared = Arc::new(Shared {
        ctx: Context {
            engine: engine.clone(),
            metrics: Metrics::for_engine(&engine),
            info,
            reports: Default::default(),
        },
        identities: Identities::new(&server_config.identities),
        limits,
        replies: Arc::default(),
    });
    let (shutdown, shutdown_rx) = watch::channel(false);
    let addr = listener.local_addr()?;
    http_state.serving(Arc::clone(&shared));
    let sweep_interval = Duration::from_millis(server_config.code_sweep_interval_ms.max(10));
    let sweeper = engine.clone();
    tokio::spawn(every(sweep_interval, shutdown_rx.clone(), move || sweep_codes(sweeper.clone())));
    let forward_interval = Duration::from_millis(engine.config().forwarding.interval_ms);
    let forwarder = engine.clone();
    tokio::spawn(every(forward_interval, shutdown_rx.clone(), move || {
        forward_owed(forwarder.clone())
    }));
    let threads = RuntimeThreads::start("sg-conn", server_config.io_thread_count())
        .context("starting the connection threads")?;
    let accept_task = tokio::spawn(accept_loop(
        listener,
        threads,
        tls.clone(),
        shared,
        Slots {
            connections: Arc::new(Semaphore::new(server_config.connections_max)),
            unauthenticated: Arc::new(Semaphore::new(server_config.unauthenticated_cap())),
        },
        Duration::from_millis(server_config.shutdown_grace_ms),
        shutdown_rx,
    ));
    Ok(RunningServer {
        addr,
        http_addr,
        tls: tls.is_some(),
        engine,
        shutdown,
        http_shutdown,
        accept_task,
        http_task,
        http_state,
    })
}

impl RunningServer {
    /// Stops accepting, lets connections finish their in-flight requests (up to the grace
    /// time) while `/readyz` answers 503 (draining), then stops the engine and HTTP.
    pub async fn shutdown(self) {
        self.http_state.draining();
        let _ = self.shutdown.send(true);
        let _ = self.accept_task.await;
        self.engine.shutdown().await;
        let _ = self.http_shutdown.send(true);
        let _ = self.http_task.await;
    }
}

/// The connection caps: every open connection holds a place in `connections`, and until it
/// authenticates one in `unauthenticated` too, so that connections without a key (slow
/// senders among them) never hold more than `unauthenticated_max` of the places and cannot
/// keep authenticated partners out.
struct Slots {
    connections: Arc<Semaphore>,
    unauthenticated: Arc<Semaphore>,
}

async fn accept_loop(
    listener: TcpListener,
    mut threads: RuntimeThreads,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    slots: Slots,
    grace: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = Arc::clone(&slots.connections).try_acquire_owned() else {
                    shared.ctx.metrics.connections_rejected.inc();
                    tracing::warn!(%peer, "connection limit reached; closing");
                    continue;
                };
                let Ok(unauthenticated) = Arc::clone(&slots.unauthenticated).try_acquire_owned()
                else {
                    shared.ctx.metrics.connections_rejected.inc();
                    tracing::warn!(%peer, "unauthenticated connection limit reached; closing");
                    continue;
                };
                let _ = stream.set_nodelay(true);
                // Out of this runtime's poller, into the connection thread's.
                let Ok(stream) = threads::release(stream) else { continue };
                let shared = Arc::clone(&shared);
                let tls = tls.clone();
                let shutdown = shutdown.clone();
                let connection = async move {
                    let Ok(stream) = threads::adopt(stream) else { return };
                    shared.ctx.metrics.connections_open.inc();
                    open_connection(stream, tls, Arc::clone(&shared), unauthenticated, shutdown)
                        .await;
                    shared.ctx.metrics.connections_open.dec();
                    drop(slot);
                };
                connections.spawn_on(connection, threads.next_runtime());
            }
        }
    }
    drop(listener);
    let drained =
        tokio::time::timeout(grace, async { while connections.join_next().await.is_some() {} })
            .await;
    if drained.is_err() {
        tracing::warn!("shutdown grace ran out; aborting the remaining connections");
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
    // Every connection has finished: the threads have nothing left to run.
    let _ = tokio::task::spawn_blocking(move || threads.stop()).await;
}

async fn open_connection(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    unauthenticated: OwnedSemaphorePermit,
    shutdown: watch::Receiver<bool>,
) {
    let Some(tls) = tls else {
        connection::serve(stream, shared, None, Some(unauthenticated), shutdown).await;
        return;
    };
    let handshake = tokio::time::timeout(shared.limits.auth_timeout, tls.accept(stream)).await;
    let stream = match handshake {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            tracing::debug!(%error, "TLS handshake failed");
            return;
        }
        Err(_) => return,
    };
    let identity = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|cert| shared.identities.by_certificate(cert.as_ref()));
    connection::serve(stream, shared, identity, Some(unauthenticated), shutdown).await;
}

/// Runs `round` every `interval` until shutdown, or until a round says to stop.
async fn every<F: std::future::Future<Output = ControlFlow<()>>>(
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
    mut round: impl FnMut() -> F,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = ticker.tick() => if round().await.is_break() {
                return;
            },
        }
    }
}

/// The forwarder: sends the operations owed to providers (captures, voids, refunds,
/// reversals), one round per tick (`docs/ARCHITECTURE.md`, "Store and forward").
async fn forward_owed(engine: settlegate_engine::Engine) -> ControlFlow<()> {
    match engine.forward_owed().await {
        Ok(round) if round.acknowledged > 0 || round.failed > 0 => {
            tracing::debug!(?round, "forwarder round");
        }
        Ok(_) => {}
        Err(settlegate_engine::EngineError::Stopped) => return ControlFlow::Break(()),
        Err(error) => tracing::debug!(%error, "forwarder round cut short"),
    }
    ControlFlow::Continue(())
}

/// Expires payment codes past their expiry and releases their holds.
async fn sweep_codes(engine: settlegate_engine::Engine) -> ControlFlow<()> {
    match engine.sweep_codes().await {
        Ok(0) => {}
        Ok(count) => tracing::info!(count, "payment codes expired; holds released"),
        Err(error) => {
            tracing::debug!(%error, "code sweep stopped");
            return ControlFlow::Break(());
        }
    }
    ControlFlow::Continue(())
}
