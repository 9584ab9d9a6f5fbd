//! `settlegate route`: the cluster's first tier (seed 002's two-tier settlement). Partners keep
//! one address, the router's; it sends each request to the node that owns the request's
//! partition, over the same binary protocol (`docs/CLUSTER.md`, "The router").
//!
//! The router is stateless and trusts the nodes with everything else: it watches the ownership
//! table (the cluster's `<name>-owners` KV bucket), finds a request's partition the way the
//! engine does (the user's, the signing user's, or the payment code's issue number, from
//! [`Operation::route`](settlegate_protocol::Operation::route)), and forwards its frame
//! unchanged on a connection of this partner's own to that node. `AUTH` frames are forwarded
//! too, and replayed on every node connection opened later, so each node authenticates and
//! authorizes the partner itself; the router holds no keys. Answers come back unchanged, except
//! `MOVED`: the router sends the request again to the node it names (or, with no address, to
//! the table's owner after a pause), and on a node connection lost it sends the requests in
//! flight on it again; both at most [`ATTEMPTS_MAX`] times, after which the partner gets the
//! last answer, or `SHUTTING_DOWN`. Resending is safe: every request that changes state carries
//! a client request ID.
//!
//! Limits on the partner side: the server's `connections_max` (past it, a connection is closed
//! at once), its `idle_timeout_ms` (a connection with nothing to read for that long is closed),
//! and 1,024 requests in flight per connection (reading waits). The nodes enforce the rest of
//! the protocol's limits on what the router forwards.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use futures::future::BoxFuture;
use futures::StreamExt;
use settlegate_engine::cluster::{ClusterConfig, Owner};
use settlegate_protocol::frame::{self, Frame, FLAG_PUSH};
use settlegate_protocol::messages::{opcode, status, Request, Response};
use settlegate_protocol::ops::Route;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::config::Config;

/// How many times one request is sent (first send included) before the partner gets the last
/// answer.
pub const ATTEMPTS_MAX: u32 = 30;
/// The longest pause between two sends of one request: with [`ATTEMPTS_MAX`], a request is
/// retried for about 14 s, past a NATS stream's leader election (4–9 s).
const PAUSE_MAX: Duration = Duration::from_millis(500);
/// How long a node the router could not reach is passed over for requests of no partition.
const DOWN_FOR: Duration = Duration::from_secs(2);
/// The request ID of an `AUTH` the router replays on a node connection: its answer is not the
/// partner's.
const REPLAY_ID: u64 = u64::MAX;
/// Requests in flight per partner connection before the router stops reading from it.
const IN_FLIGHT_MAX: usize = 1024;

/// Where each partition is served, as the ownership table says.
struct Table {
    owners: RwLock<Vec<Option<SocketAddr>>>,
    /// Nodes the router lately could not reach, and when.
    down: Mutex<HashMap<SocketAddr, std::time::Instant>>,
    /// Counts the table's changes: a request waiting to be sent again goes at once when the
    /// table names a new owner, not at the end of its pause.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Table {
    fn new(count: usize) -> Table {
        Table {
            owners: RwLock::new(vec![None; count]),
            down: Mutex::default(),
            changes: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Waits for `pause`, or less if the table changes meanwhile.
    async fn pause(&self, pause: Duration) {
        let mut changes = self.changes.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = changes.changed() => {}
        }
    }

    fn owner(&self, partition: usize) -> Option<SocketAddr> {
        self.owners.read().unwrap_or_else(|e| e.into_inner()).get(partition).copied().flatten()
    }

    /// Some owner not lately unreachable: for a request with no partition of its own.
    fn any(&self) -> Option<SocketAddr> {
        let owners = self.owners.read().unwrap_or_else(|e| e.into_inner());
        let down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        let up = |addr: &&SocketAddr| down.get(*addr).is_none_or(|at| at.elapsed() > DOWN_FOR);
        owners.iter().flatten().find(up).or_else(|| owners.iter().flatten().next()).copied()
    }

    /// 200 once every partition has an owner; 503 naming those without.
    fn readiness(&self) -> (axum::http::StatusCode, String) {
        let owners = self.owners.read().unwrap_or_else(|e| e.into_inner());
        let unowned: Vec<usize> = (0..owners.len()).filter(|&p| owners[p].is_none()).collect();
        if unowned.is_empty() {
            (axum::http::StatusCode::OK, "ready\n".into())
        } else {
            let status = axum::http::StatusCode::SERVICE_UNAVAILABLE;
            (status, format!("not ready: partitions without an owner {unowned:?}\n"))
        }
    }

    /// Whether `node` was lately unreachable.
    fn is_down(&self, node: SocketAddr) -> bool {
        let down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        down.get(&node).is_some_and(|at| at.elapsed() <= DOWN_FOR)
    }

    fn mark_down(&self, node: SocketAddr) {
        self.down.lock().unwrap_or_else(|e| e.into_inner()).insert(node, std::time::Instant::now());
    }

    fn partition_of(&self, frame: &Frame) -> Option<usize> {
        let count = self.owners.read().unwrap_or_else(|e| e.into_inner()).len();
        let request = Request::decode(frame.opcode, &frame.body).ok()?;
        match request.route() {
            Route::User(user) => Some(settlegate_engine::shard_of_user(user, count)),
            Route::Signed(bytes) => {
                let (record, _, _) = settlegate_engine::InherentId::decode(bytes).ok()?;
                Some(settlegate_engine::shard_of_user(&record.user, count))
            }
            Route::Code(number) => Some(settlegate_engine::codes::shard_of_number(number))
                .filter(|partition| *partition < count),
            Route::Any => None,
        }
    }
}

/// A running router.
pub struct RunningRouter {
    /// The protocol address partners connect to.
    pub addr: SocketAddr,
    /// `/healthz`, and `/readyz`: 503 until every partition has an owner.
    pub http_addr: SocketAddr,
}

/// Starts a router: the config's `[server] listen`, `[cluster]` (its `nats` and `name`) and
/// `[engine] shards` (the partition count).
pub async fn start(config: Config) -> anyhow::Result<RunningRouter> {
    let cluster = config.cluster.clone().context("a router needs the cluster's [cluster] table")?;
    let count = config.engine.shards;
    anyhow::ensure!(count > 0, "a router needs the partition count: [engine] shards");
    let table = Arc::new(Table::new(count));
    watch_owners(&cluster, Arc::clone(&table)).await?;
    let listener = TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("binding {}", config.server.listen))?;
    let addr = listener.local_addr()?;
    let http_listener = TcpListener::bind(config.server.http_listen)
        .await
        .with_context(|| format!("binding {}", config.server.http_listen))?;
    let http_addr = http_listener.local_addr()?;
    let health = Arc::clone(&table);
    let router =
        axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok\n" })).route(
            "/readyz",
            axum::routing::get(move || {
                let table = Arc::clone(&health);
                async move { table.readiness() }
            }),
        );
    tokio::spawn(async move {
        if let Err(error) = axum::serve(http_listener, router).await {
            tracing::error!(%error, "the router's HTTP server failed");
        }
    });
    // The server's limits, for the partner side: connections at most, and a connection with no
    // frame for the idle time is closed.
    let slots = Arc::new(tokio::sync::Semaphore::new(config.server.connections_max));
    let idle = Duration::from_millis(config.server.idle_timeout_ms);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            // Past the limit, closed at once.
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else { continue };
            let _ = stream.set_nodelay(true);
            let table = Arc::clone(&table);
            tokio::spawn(async move {
                serve(stream, table, idle).await;
                drop(slot);
            });
        }
    });
    Ok(RunningRouter { addr, http_addr })
}

/// Loads the ownership table and keeps it current.
async fn watch_owners(cluster: &ClusterConfig, table: Arc<Table>) -> anyhow::Result<()> {
    let client = tokio::time::timeout(
        Duration::from_secs(30),
        async_nats::ConnectOptions::new()
            .name("settlegate-router")
            .retry_on_initial_connect()
            .connect(cluster.nats.clone()),
    )
    .await
    .context("NATS not reachable in 30 s")??;
    let js = async_nats::jetstream::new(client);
    let bucket = format!("{}-owners", cluster.name);
    let started = std::time::Instant::now();
    let owners = loop {
        match js.get_key_value(&bucket).await {
            Ok(owners) => break owners,
            // No node has made it yet.
            Err(_) if started.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(error) => return Err(error).context("the cluster's ownership table"),
        }
    };
    let mut changes = owners.watch_with_history(">").await?;
    tokio::spawn(async move {
        while let Some(Ok(entry)) = changes.next().await {
            let Some(partition) = entry.key.strip_prefix('p').and_then(|p| p.parse::<usize>().ok())
            else {
                continue;
            };
            let owner = serde_json::from_slice::<Owner>(&entry.value).ok();
            let addr = owner.filter(|o| !o.node.is_empty()).and_then(|o| o.addr.parse().ok());
            {
                let mut owners = table.owners.write().unwrap_or_else(|e| e.into_inner());
                if let Some(slot) = owners.get_mut(partition) {
                    *slot = addr;
                }
            }
            table.changes.send_modify(|count| *count += 1);
        }
        tracing::error!("the ownership table's watch ended; the router routes by the last table");
    });
    Ok(())
}

/// A request forwarded and not yet answered.
struct InFlight {
    frame: Arc<Frame>,
    node: SocketAddr,
    attempts: u32,
}

/// One partner connection: its node connections and its requests in flight.
struct Conn {
    table: Arc<Table>,
    to_partner: mpsc::Sender<Vec<u8>>,
    state: Mutex<ConnState>,
}

#[derive(Default)]
struct ConnState {
    in_flight: HashMap<u64, InFlight>,
    nodes: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
    /// The partner's last `AUTH`, replayed on node connections opened after it.
    auth: Option<Arc<Frame>>,
}

async fn serve(stream: TcpStream, table: Arc<Table>, idle: Duration) {
    let (mut reader, mut writer) = stream.into_split();
    let (to_partner, mut outgoing) = mpsc::channel::<Vec<u8>>(1024);
    tokio::spawn(async move {
        while let Some(bytes) = outgoing.recv().await {
            if writer.write_all(&bytes).await.is_err() {
                return;
            }
        }
    });
    let conn = Arc::new(Conn { table, to_partner, state: Mutex::default() });
    let mut buffer = Vec::with_capacity(64 * 1024);
    loop {
        let mut used = 0;
        loop {
            match frame::decode(&buffer[used..]) {
                Ok(Some((frame, len))) => {
                    used += len;
                    Arc::clone(&conn).forward(Arc::new(frame), None, 1).await;
                }
                Ok(None) => break,
                Err(error) => {
                    let detail = error.to_string();
                    let mut out = Vec::new();
                    Response::FrameError { kind: error as u16, detail }
                        .encode_frame(0, 0, &mut out);
                    let _ = conn.to_partner.send(out).await;
                    return;
                }
            }
        }
        buffer.drain(..used);
        while conn.state.lock().unwrap_or_else(|e| e.into_inner()).in_flight.len() >= IN_FLIGHT_MAX
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        match tokio::time::timeout(idle, reader.read_buf(&mut buffer)).await {
            Ok(Ok(0) | Err(_)) | Err(_) => return,
            Ok(Ok(_)) => {}
        }
    }
}

impl Conn {
    /// Takes the request `id` off the requests in flight.
    fn take(&self, id: u64) -> Option<InFlight> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).in_flight.remove(&id)
    }

    /// Sends `frame` (attempt `attempt`) to `target`, or to its partition's owner.
    fn forward(
        self: Arc<Self>,
        frame: Arc<Frame>,
        target: Option<SocketAddr>,
        attempt: u32,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let partition = self.table.partition_of(&frame);
            let mut node = target
                .or_else(|| partition.and_then(|p| self.table.owner(p)))
                .or_else(|| partition.is_none().then(|| self.table.any()).flatten());
            // No owner known (a takeover under way): wait a little for the table.
            for _ in 0..20 {
                if node.is_some() {
                    break;
                }
                self.table.pause(Duration::from_millis(50)).await;
                node = partition.and_then(|p| self.table.owner(p)).or_else(|| self.table.any());
            }
            let Some(node) = node else {
                return self.answer(&frame, Response::ShuttingDown).await;
            };
            if frame.opcode == opcode::AUTH && attempt == 1 {
                let replays: Vec<mpsc::Sender<Vec<u8>>> = {
                    let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                    state.auth = Some(Arc::clone(&frame));
                    state
                        .nodes
                        .iter()
                        .filter(|(a, _)| **a != node)
                        .map(|(_, s)| s.clone())
                        .collect()
                };
                for other in replays {
                    let _ = other.send(replay(&frame)).await;
                }
            }
            let Some(sender) = Arc::clone(&self).node(node).await else {
                return Arc::clone(&self).retry(frame, attempt, Response::ShuttingDown).await;
            };
            self.state.lock().unwrap_or_else(|e| e.into_inner()).in_flight.insert(
                frame.request_id,
                InFlight { frame: Arc::clone(&frame), node, attempts: attempt },
            );
            if sender.send(frame.to_bytes()).await.is_err() {
                let taken = self.take(frame.request_id);
                if taken.is_some() {
                    self.retry(frame, attempt, Response::ShuttingDown).await;
                }
            }
        })
    }

    /// Sends `frame` again after a pause, to its partition's owner; after [`ATTEMPTS_MAX`]
    /// sends, answers the partner `last`.
    fn retry(
        self: Arc<Self>,
        frame: Arc<Frame>,
        attempt: u32,
        last: Response,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            if attempt >= ATTEMPTS_MAX {
                return self.answer(&frame, last).await;
            }
            self.table.pause(Duration::from_millis(25 << attempt.min(5)).min(PAUSE_MAX)).await;
            self.forward(frame, None, attempt + 1).await;
        })
    }

    async fn answer(&self, frame: &Frame, response: Response) {
        let mut out = Vec::new();
        response.encode_frame(frame.opcode, frame.request_id, &mut out);
        let _ = self.to_partner.send(out).await;
    }

    /// This partner's connection to `node`, made (and authenticated as the partner last did)
    /// if need be.
    fn node(
        self: Arc<Self>,
        node: SocketAddr,
    ) -> BoxFuture<'static, Option<mpsc::Sender<Vec<u8>>>> {
        Box::pin(async move {
            if let Some(sender) =
                self.state.lock().unwrap_or_else(|e| e.into_inner()).nodes.get(&node)
            {
                return Some(sender.clone());
            }
            let connected =
                tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(node)).await;
            let Ok(Ok(stream)) = connected else {
                self.table.mark_down(node);
                return None;
            };
            let _ = stream.set_nodelay(true);
            let (mut reader, mut writer) = stream.into_split();
            let (sender, mut outgoing) = mpsc::channel::<Vec<u8>>(1024);
            let auth = {
                let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(existing) = state.nodes.get(&node) {
                    return Some(existing.clone());
                }
                state.nodes.insert(node, sender.clone());
                state.auth.clone()
            };
            if let Some(auth) = auth {
                let _ = sender.send(replay(&auth)).await;
            }
            tokio::spawn(async move {
                while let Some(bytes) = outgoing.recv().await {
                    if writer.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
            });
            let conn = Arc::clone(&self);
            tokio::spawn(async move {
                let mut buffer = Vec::with_capacity(64 * 1024);
                'read: loop {
                    let mut used = 0;
                    while let Ok(Some((frame, len))) = frame::decode(&buffer[used..]) {
                        used += len;
                        Arc::clone(&conn).answered(frame).await;
                    }
                    buffer.drain(..used);
                    match reader.read_buf(&mut buffer).await {
                        Ok(0) | Err(_) => break 'read,
                        Ok(_) => {}
                    }
                }
                conn.lost(node).await;
            });
            Some(sender)
        })
    }

    /// A node's answer: to the partner, unless it is `MOVED` (sent again where it says) or
    /// the answer to a replayed `AUTH`.
    fn answered(self: Arc<Self>, frame: Frame) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            if frame.request_id == REPLAY_ID && frame.opcode == opcode::AUTH {
                return;
            }
            let push = frame.flags & FLAG_PUSH != 0;
            if !push {
                let taken = self.take(frame.request_id);
                if let (Some(request), true) = (&taken, frame.status == status::MOVED) {
                    let moved = Response::decode(frame.opcode, frame.status, &frame.body);
                    // A node that names one lately unreachable (the owner it is taking the
                    // partition from, say) is not followed there: the table says where.
                    let target = match &moved {
                        Ok(Response::Moved { address, .. }) => address.parse().ok(),
                        _ => None,
                    }
                    .filter(|node| !self.table.is_down(*node));
                    if request.attempts < ATTEMPTS_MAX {
                        let (again, attempt) = (Arc::clone(&request.frame), request.attempts + 1);
                        tokio::spawn(async move {
                            if target.is_none() {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            self.forward(again, target, attempt).await
                        });
                        return;
                    }
                }
            }
            let _ = self.to_partner.send(frame.to_bytes()).await;
        })
    }

    /// The connection to `node` closed: its requests in flight are sent again.
    fn lost(self: Arc<Self>, node: SocketAddr) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let orphans: Vec<InFlight> = {
                let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                state.nodes.remove(&node);
                self.table.mark_down(node);
                let ids: Vec<u64> = state
                    .in_flight
                    .iter()
                    .filter(|(_, r)| r.node == node)
                    .map(|(id, _)| *id)
                    .collect();
                ids.into_iter().filter_map(|id| state.in_flight.remove(&id)).collect()
            };
            for request in orphans {
                let conn = Arc::clone(&self);
                tokio::spawn(conn.retry(request.frame, request.attempts, Response::ShuttingDown));
            }
        })
    }
}

/// `frame` (an `AUTH`) with the request ID whose answer the router drops.
fn replay(frame: &Frame) -> Vec<u8> {
    Frame { request_id: REPLAY_ID, ..frame.clone() }.to_bytes()
}
