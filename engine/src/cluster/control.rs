//! Membership and ownership: this node's heartbeat, the ownership table, and takeovers.
//!
//! Two KV buckets: `<name>-nodes` (each node's heartbeat, rewritten every `heartbeat_ms`) and
//! `<name>-owners` (key `p<N>`: the owning node, its address and epoch). The table is changed
//! only by compare-and-swap on the key's revision, so two nodes never both win a claim; but
//! safety does not rest on the table: it rests on the fence a new owner appends to the stream.
//!
//! A heartbeat is judged by whether its revision changed within `owner_timeout_ms` of this
//! node's own clock, so clocks of different machines never need to agree.
//!
//! A partition is taken over when it has no owner, or its owner's heartbeat is stale, by the
//! live node that can take it (not [`Role::Lost`] there) and has applied the most of its stream,
//! ties broken in rendezvous order (a hash of partition and node name): a node just restarted
//! and still replaying is passed over, and a dead node's partitions spread over the others.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv, stream};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use super::append::{self, Appender, FENCE_HEADER};
use super::tail::Tail;
use super::{ClusterConfig, Owner, Partitions, Role};
use crate::error::EngineError;
use crate::shard::{Envelope, ReplicaCore};
use crate::vault::Vault;
use crate::wal::Job;

/// A node's heartbeat value.
#[derive(Debug, Serialize, Deserialize)]
struct Heartbeat {
    addr: String,
    /// Partitions this node cannot take ([`Role::Lost`] here).
    lost: Vec<usize>,
    /// The last sequence this node applied, per partition: the most caught-up standby takes a
    /// partition over (a node just restarted, still replaying, is passed over).
    #[serde(default)]
    applied: Vec<u64>,
}

/// Everything the control loop works with.
pub(super) struct Context {
    config: Arc<ClusterConfig>,
    js: jetstream::Context,
    streams: Vec<stream::Stream>,
    owners: kv::Store,
    nodes: kv::Store,
    partitions: Arc<Partitions>,
    replicas: Vec<ReplicaCore>,
    vault: Arc<Vault>,
    /// Each partition's tail while it runs.
    tails: Mutex<Vec<Option<JoinHandle<()>>>>,
    /// The partitions' snapshots.
    pub(super) store: async_nats::jetstream::object_store::ObjectStore,
    /// Drawn at start: in a fence's message ID, so that a fence of this process is never taken
    /// for a duplicate of one an earlier run of this node appended at the same epoch (a planned
    /// move's target fences at the epoch the table gives it, and may restart before it does).
    incarnation: u64,
}

/// What the control loop knows of the other nodes.
struct Membership {
    started: Instant,
    /// Per node: the heartbeat revision last seen, when it was first seen, and the heartbeat.
    seen: HashMap<String, (u64, Instant, Heartbeat)>,
}

fn nats_error(what: &str) -> impl FnOnce(async_nats::Error) -> EngineError + '_ {
    move |e| EngineError::Config(format!("cluster: {what}: {e}"))
}

impl Context {
    /// Connects, and creates what does not exist yet: a stream per partition (file storage,
    /// `replicas` copies) and the two buckets.
    pub(super) fn connect(
        runtime: &tokio::runtime::Runtime,
        config: ClusterConfig,
        partitions: Arc<Partitions>,
        vault: Arc<Vault>,
    ) -> Result<Context, EngineError> {
        // On a thread of its own: the caller may be inside another Tokio runtime, where
        // blocking on this one is not allowed.
        let handle = runtime.handle().clone();
        let connecting = async move {
            let options = async_nats::ConnectOptions::new()
                .name(format!("settlegate-{}", config.node))
                .connection_timeout(Duration::from_secs(5))
                .retry_on_initial_connect();
            let client =
                tokio::time::timeout(Duration::from_secs(30), options.connect(config.nats.clone()))
                    .await
                    .map_err(|_| {
                        EngineError::Config(format!(
                            "cluster: cannot reach NATS at {:?} in 30 s",
                            config.nats
                        ))
                    })?
                    .map_err(|e| nats_error("connecting to NATS")(e.into()))?;
            let mut js = jetstream::new(client);
            js.set_timeout(Duration::from_millis(config.ack_timeout_ms));
            let replicas_n = config.replicas;
            let mut streams = Vec::with_capacity(partitions.slots.len());
            for partition in 0..partitions.slots.len() {
                let config = stream::Config {
                    name: config.stream(partition),
                    subjects: vec![config.subject(partition)],
                    storage: stream::StorageType::File,
                    num_replicas: replicas_n,
                    duplicate_window: Duration::from_secs(120),
                    ..Default::default()
                };
                // A cluster just started may refuse a replicated stream for a moment (10005, no
                // suitable peers): retried for up to 30 s.
                let started = Instant::now();
                let stream = loop {
                    match js.get_or_create_stream(config.clone()).await {
                        Ok(stream) => break stream,
                        Err(error) if started.elapsed() < Duration::from_secs(30) => {
                            tracing::info!(%error, "creating a partition's stream; retrying");
                            tokio::time::sleep(Duration::from_millis(250)).await;
                        }
                        Err(error) => {
                            return Err(nats_error("creating a partition's stream")(error.into()))
                        }
                    }
                };
                streams.push(stream);
            }
            let bucket = |name: String| kv::Config {
                bucket: name,
                history: 1,
                storage: stream::StorageType::File,
                num_replicas: replicas_n,
                ..Default::default()
            };
            let owners = key_value(&js, bucket(format!("{}-owners", config.name))).await?;
            let nodes = key_value(&js, bucket(format!("{}-nodes", config.name))).await?;
            let store = object_store(&js, &config).await?;
            let tails = Mutex::new((0..partitions.slots.len()).map(|_| None).collect());
            Ok(Context {
                config: Arc::new(config),
                js,
                streams,
                owners,
                nodes,
                partitions,
                replicas: Vec::new(),
                vault,
                tails,
                store,
                incarnation: rand::random(),
            })
        };
        std::thread::scope(|scope| {
            scope
                .spawn(|| handle.block_on(connecting))
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

/// Opens the snapshots' object store, creating it if no node has yet.
async fn object_store(
    js: &jetstream::Context,
    config: &ClusterConfig,
) -> Result<async_nats::jetstream::object_store::ObjectStore, EngineError> {
    let name = super::snapshots::bucket(config);
    if let Ok(store) = js.get_object_store(&name).await {
        return Ok(store);
    }
    let bucket = async_nats::jetstream::object_store::Config {
        bucket: name.clone(),
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        ..Default::default()
    };
    match js.create_object_store(bucket).await {
        Ok(store) => Ok(store),
        // Another node created it meanwhile.
        Err(_) => js
            .get_object_store(&name)
            .await
            .map_err(|e| nats_error("opening the snapshots' object store")(e.into())),
    }
}

impl Context {
    /// Restores each partition from its newest snapshot, if it has one, into `states` (before
    /// the shards start), then from its restart cache the messages after the snapshot that this
    /// node kept (`cluster.cache_dir`): the tails then start after the sequence each reached. A
    /// stream purged past a snapshot's sequence (a gap) is refused.
    pub(super) async fn restore(
        &self,
        states: Vec<&mut crate::shard::ShardState>,
    ) -> Result<(), EngineError> {
        let count = states.len();
        for (partition, state) in states.into_iter().enumerate() {
            let failed = |what: &str, e: String| {
                EngineError::Storage(format!("partition {partition}'s snapshot: {what}: {e}"))
            };
            let mut stream = self.streams[partition].clone();
            let info = stream.info().await.map_err(|e| failed("its stream", e.to_string()))?;
            let (first, last) = (info.state.first_sequence, info.state.last_sequence);
            let created = info.created.unix_timestamp_nanos().to_string();
            let newest = super::snapshots::newest(&self.store, partition)
                .await
                .map_err(|e| failed("reading it", e.to_string()))?;
            let mut applied = 0;
            if let Some((sequence, bytes)) = newest {
                let label = std::path::PathBuf::from(format!("object p{partition}-{sequence}"));
                let (_, snapshot) =
                    crate::wal::snapshot::read_bytes(&label, &bytes, partition, count)
                        .map_err(|e| failed("decoding it", e.to_string()))?;
                snapshot.restore(state).map_err(|e| failed("restoring it", e.to_string()))?;
                if first > sequence + 1 {
                    return Err(failed(
                        "its stream",
                        format!("starts at {first}, past the snapshot's sequence {sequence}"),
                    ));
                }
                applied = sequence;
                tracing::info!(
                    partition,
                    sequence,
                    bytes = bytes.len(),
                    "partition restored from its snapshot"
                );
            }
            if let Some(dir) = &self.config.cache_dir {
                let read = super::cache::read(dir, partition, &created, applied, last);
                let joined = !read.messages.is_empty();
                let reached = self.replay_cached(state, read, partition, applied)?;
                let writer = super::cache::Writer::new(
                    dir,
                    partition,
                    &created,
                    self.config.cache_max_bytes,
                    reached,
                    joined,
                );
                applied = reached;
                *self.partitions.slots[partition].cache.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(writer);
            }
            self.partitions.slots[partition].applied.store(applied, Ordering::Release);
        }
        Ok(())
    }

    /// Applies the messages `read` from `partition`'s restart cache to `state`, whose last
    /// applied sequence is `applied`; returns the last sequence applied then.
    fn replay_cached(
        &self,
        state: &mut crate::shard::ShardState,
        read: super::cache::Read,
        partition: usize,
        applied: u64,
    ) -> Result<u64, EngineError> {
        let mut reached = applied;
        let mut records = 0usize;
        for (sequence, message) in &read.messages {
            let decoded = super::tail::envelopes_of(message, &self.vault);
            // The cache passed its checksums, so a record that does not decode is this
            // build's to refuse, as the stream's copy would be.
            let envelopes = decoded.map_err(|e| {
                EngineError::Storage(format!(
                    "partition {partition}'s restart cache, message {sequence}: {e}"
                ))
            })?;
            records += envelopes.len();
            for envelope in envelopes {
                _ = state.replay(envelope);
            }
            reached = *sequence;
        }
        tracing::info!(
            partition,
            from = applied + 1,
            to = reached,
            messages = read.messages.len(),
            records,
            stopped = read.stopped.as_deref().unwrap_or(""),
            "partition replayed from its restart cache; the rest comes from the stream"
        );
        Ok(reached)
    }

    /// Runs `f` on `runtime` from a thread of its own (the caller may be inside another Tokio
    /// runtime, where blocking on this one is not allowed).
    pub(super) fn block_on<T: Send>(
        runtime: &tokio::runtime::Runtime,
        f: impl std::future::Future<Output = T> + Send,
    ) -> T {
        let handle = runtime.handle().clone();
        std::thread::scope(|scope| {
            scope
                .spawn(|| handle.block_on(f))
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

/// Opens a bucket, creating it if no node has yet.
///
/// Its reads go to the bucket's stream leader: the client makes buckets with direct gets,
/// which any replica answers, and a lagging replica's heartbeats would make a live node look
/// dead (a node resuming from a pause took partitions from a live owner that way). The bucket
/// is changed to `allow_direct: false` if need be, then opened again.
async fn key_value(js: &jetstream::Context, config: kv::Config) -> Result<kv::Store, EngineError> {
    let name = config.bucket.clone();
    let opened = match js.get_key_value(&name).await {
        Ok(store) => Ok(store),
        Err(_) => match js.create_key_value(config).await {
            Ok(store) => Ok(store),
            // Another node created it meanwhile.
            Err(_) => js.get_key_value(&name).await,
        },
    };
    let failed = |e: async_nats::Error| nats_error("opening a bucket")(e);
    let store = opened.map_err(|e| failed(e.into()))?;
    let mut stream = js.get_stream(&store.stream_name).await.map_err(|e| failed(e.into()))?;
    let mut stream_config = stream.info().await.map_err(|e| failed(e.into()))?.config.clone();
    if !stream_config.allow_direct {
        return Ok(store);
    }
    stream_config.allow_direct = false;
    js.update_stream(stream_config).await.map_err(|e| failed(e.into()))?;
    js.get_key_value(&name).await.map_err(|e| failed(e.into()))
}

/// What the engine asks of the control loop.
pub(crate) enum Command {
    /// A planned move of `partition`, owned here, to node `to`.
    Move { partition: usize, to: String, reply: tokio::sync::oneshot::Sender<Result<(), String>> },
}

/// The control loop: tails every partition, starts the heartbeat, then looks at the ownership
/// table every `heartbeat_ms` and whenever it changes. Takeovers and hand-overs run as tasks of
/// their own, so that a slow one (a stream electing its leader) delays neither the heartbeat
/// nor the other partitions.
pub(super) async fn run(
    mut cx: Context,
    replicas: Vec<ReplicaCore>,
    mut commands: tokio::sync::mpsc::UnboundedReceiver<Command>,
) {
    cx.replicas = replicas;
    let cx = Arc::new(cx);
    for partition in 0..cx.partitions.slots.len() {
        cx.start_tail(partition);
    }
    tokio::spawn(Arc::clone(&cx).heartbeat());
    let mut membership = Membership { started: Instant::now(), seen: HashMap::new() };
    let mut tick = tokio::time::interval(Duration::from_millis(cx.config.heartbeat_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A change of the table (a hand-over naming this node, say) is acted on at once.
    let mut changes = cx.owners.watch_all().await.ok();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            change = async { changes.as_mut()?.next().await }, if changes.is_some() => {
                match change {
                    Some(Ok(entry)) => {
                        // A hand-over naming this node is taken from the change itself, without
                        // waiting for a round to read every heartbeat and partition first.
                        let settled = membership.started.elapsed()
                            >= Duration::from_millis(cx.config.settle_ms);
                        if settled && cx.take_if_named(&entry) {
                            continue;
                        }
                    }
                    _ => changes = cx.owners.watch_all().await.ok(),
                }
            }
            command = commands.recv() => match command {
                Some(Command::Move { partition, to, reply }) => {
                    let cx = Arc::clone(&cx);
                    tokio::spawn(async move { _ = reply.send(cx.hand_over(partition, &to).await) });
                    continue;
                }
                None => return,
            },
        }
        if let Err(error) = cx.round(&mut membership).await {
            tracing::warn!(%error, "cluster control round failed; retrying");
        }
    }
}

/// Rendezvous order: the node of highest hash takes the partition.
fn rendezvous(partition: usize, node: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (partition, node).hash(&mut hasher);
    hasher.finish()
}

impl Context {
    /// Writes this node's heartbeat every `heartbeat_ms`, whatever else the node is doing.
    async fn heartbeat(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.config.heartbeat_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let lost: Vec<usize> = (0..self.partitions.slots.len())
                .filter(|&p| self.partitions.role(p) == Role::Lost)
                .collect();
            let applied =
                self.partitions.slots.iter().map(|slot| slot.applied.load(Ordering::Acquire));
            let beat =
                Heartbeat { addr: self.config.advertise.clone(), lost, applied: applied.collect() };
            let value = serde_json::to_vec(&beat).expect("a heartbeat serializes");
            if let Err(error) = self.nodes.put(&self.config.node, value.into()).await {
                tracing::warn!(%error, "heartbeat not written");
            }
        }
    }

    fn start_tail(&self, partition: usize) {
        let tail = Tail {
            stream: self.streams[partition].clone(),
            partitions: Arc::clone(&self.partitions),
            partition,
            core: self.replicas[partition].clone(),
            vault: Arc::clone(&self.vault),
            store: self.store.clone(),
            count: self.partitions.slots.len(),
        };
        self.tails.lock().unwrap_or_else(|e| e.into_inner())[partition] =
            Some(tokio::spawn(tail.run()));
    }

    fn tail_running(&self, partition: usize) -> bool {
        let tails = self.tails.lock().unwrap_or_else(|e| e.into_inner());
        tails[partition].as_ref().is_some_and(|t| !t.is_finished())
    }

    async fn stop_tail(&self, partition: usize) {
        let tail = self.tails.lock().unwrap_or_else(|e| e.into_inner())[partition].take();
        if let Some(tail) = tail {
            tail.abort();
            let _ = tail.await;
        }
    }

    async fn round(self: &Arc<Self>, m: &mut Membership) -> Result<(), async_nats::Error> {
        self.read_heartbeats(m).await?;
        let timeout = Duration::from_millis(self.config.owner_timeout_ms);
        let me = self.config.node.clone();
        let live: Vec<(&String, &Heartbeat)> = m
            .seen
            .iter()
            .filter(|(node, (_, at, _))| **node == me || at.elapsed() < timeout)
            .map(|(node, (_, _, beat))| (node, beat))
            .collect();
        let live_names: Vec<String> = live.iter().map(|(n, _)| (*n).clone()).collect();
        let mut to_take = Vec::new();
        for partition in 0..self.partitions.slots.len() {
            let key = format!("p{partition}");
            let entry = self.owners.entry(&key).await?;
            let (owner, revision) = match &entry {
                Some(entry) if entry.operation == kv::Operation::Put => {
                    (serde_json::from_slice::<Owner>(&entry.value).ok(), entry.revision)
                }
                Some(entry) => (None, entry.revision),
                None => (None, 0),
            };
            *self.partitions.slots[partition].owner.write().unwrap_or_else(|e| e.into_inner()) =
                owner.clone();
            let role = self.partitions.role(partition);
            let owner_node = owner.as_ref().map(|o| o.node.as_str()).unwrap_or("");
            match role {
                // A read older than this node's own claim (KV reads may come from a replica
                // that lags) says nothing.
                Role::Owner
                    if owner_node != me
                        && revision
                            > self.partitions.slots[partition].claimed.load(Ordering::Acquire) =>
                {
                    // Taken over while this node was away (paused, partitioned): its next
                    // append would be refused anyway; stop admitting now.
                    tracing::warn!(
                        partition,
                        owner = owner_node,
                        "partition taken over by another node"
                    );
                    self.partitions.set_role(partition, Role::Lost);
                }
                Role::Lost if owner_node == me => {
                    // Hand it to a standby: released, epoch kept.
                    let released = Owner {
                        node: String::new(),
                        addr: String::new(),
                        epoch: owner.as_ref().map_or(0, |o| o.epoch),
                        handed_at: None,
                    };
                    let _ = self
                        .owners
                        .update(&key, serde_json::to_vec(&released)?.into(), revision)
                        .await;
                }
                Role::Standby => {
                    let owner_live = !owner_node.is_empty()
                        && owner_node != me
                        && live_names.iter().any(|n| n == owner_node);
                    if owner_live
                        || m.started.elapsed() < Duration::from_millis(self.config.settle_ms)
                    {
                        continue;
                    }
                    // This node was the owner before it restarted: take it back at once.
                    let mine = owner_node == me;
                    let first = live
                        .iter()
                        .filter(|(node, beat)| **node == me || !beat.lost.contains(&partition))
                        .filter(|(node, _)| node.as_str() != owner_node || mine)
                        .max_by_key(|(node, beat)| {
                            let applied = beat.applied.get(partition).copied().unwrap_or(0);
                            (applied, rendezvous(partition, node))
                        })
                        .map(|(node, _)| node.as_str());
                    if mine || first == Some(me.as_str()) {
                        // Named by a planned move: the epoch is raised already.
                        let handed = owner.as_ref().filter(|_| mine).and_then(|o| o.handed_at);
                        to_take.push((partition, revision, owner.map_or(0, |o| o.epoch), handed));
                    }
                }
                _ => {}
            }
        }
        for (partition, revision, epoch, handed) in to_take {
            self.spawn_take(partition, revision, epoch, handed);
        }
        Ok(())
    }

    /// Takes the partition a change of the table names this node the owner of, if this node
    /// is its standby here (a planned hand-over to this node, or this node's own restart
    /// claim); returns whether it did. The same decision a round makes for such an entry.
    fn take_if_named(self: &Arc<Self>, entry: &kv::Entry) -> bool {
        let Some(partition) = entry.key.strip_prefix('p').and_then(|n| n.parse::<usize>().ok())
        else {
            return false;
        };
        if partition >= self.partitions.slots.len()
            || entry.operation != kv::Operation::Put
            || self.partitions.role(partition) != Role::Standby
        {
            return false;
        }
        match serde_json::from_slice::<Owner>(&entry.value) {
            Ok(owner) if owner.node == self.config.node => {
                self.spawn_take(partition, entry.revision, owner.epoch, owner.handed_at);
                true
            }
            _ => false,
        }
    }

    /// Takes `partition` in a task of its own ([`Context::take`]); a takeover that fails
    /// before its fence leaves this node its standby.
    fn spawn_take(
        self: &Arc<Self>,
        partition: usize,
        revision: u64,
        epoch: u64,
        handed: Option<u64>,
    ) {
        // Marked before the task starts, so the next round does not start another.
        self.partitions.set_role(partition, Role::Taking);
        let cx = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(error) = cx.take(partition, revision, epoch, handed).await {
                tracing::warn!(partition, %error, "takeover failed");
                if cx.partitions.role(partition) == Role::Taking {
                    // Not fenced: still a standby (the table may name this node; the next
                    // round then takes it again, at a new epoch).
                    cx.partitions.set_role(partition, Role::Standby);
                    if !cx.tail_running(partition) {
                        cx.start_tail(partition);
                    }
                }
            }
        });
    }

    async fn read_heartbeats(&self, m: &mut Membership) -> Result<(), async_nats::Error> {
        let mut keys = self.nodes.keys().await?;
        let mut names = Vec::new();
        while let Some(key) = keys.next().await {
            names.push(key?);
        }
        for name in names {
            let Some(entry) = self.nodes.entry(&name).await? else { continue };
            let Ok(beat) = serde_json::from_slice::<Heartbeat>(&entry.value) else { continue };
            match m.seen.get_mut(&name) {
                Some(seen) if seen.0 == entry.revision => {}
                Some(seen) => *seen = (entry.revision, Instant::now(), beat),
                // First sight: judged live only once it changes, unless it is this node.
                None => {
                    let at = if name == self.config.node {
                        Instant::now()
                    } else {
                        Instant::now() - Duration::from_millis(self.config.owner_timeout_ms)
                    };
                    m.seen.insert(name, (entry.revision, at, beat));
                }
            }
        }
        Ok(())
    }

    /// Hands `partition`, owned here, to node `to`: new requests are answered `BUSY`; the
    /// payments waiting for their providers finish (for up to the request deadline); then
    /// nothing more applies, everything appended is acknowledged, the hand-over record is
    /// appended, and the table names `to`, which fences and takes it at once. This node follows
    /// the partition as a standby from there.
    pub(super) async fn hand_over(&self, partition: usize, to: &str) -> Result<(), String> {
        let started = Instant::now();
        if self.partitions.role(partition) != Role::Owner {
            return Err(format!("partition {partition} is not owned by this node"));
        }
        let beat = match self.nodes.entry(to).await.map_err(|e| e.to_string())? {
            Some(entry) => {
                serde_json::from_slice::<Heartbeat>(&entry.value).map_err(|e| e.to_string())?
            }
            None => return Err(format!("no node {to:?} in the cluster")),
        };
        if to == self.config.node || beat.lost.contains(&partition) {
            return Err(format!("node {to:?} cannot take partition {partition}"));
        }
        let key = format!("p{partition}");
        let entry = self.owners.entry(&key).await.map_err(|e| e.to_string())?;
        let Some(entry) = entry else { return Err("the partition has no owner entry".into()) };
        let owner: Owner = serde_json::from_slice(&entry.value).map_err(|e| e.to_string())?;
        if owner.node != self.config.node {
            return Err(format!("the table names {:?} as the owner", owner.node));
        }
        let slot = &self.partitions.slots[partition];
        let core = self.replicas[partition].clone();
        self.partitions.set_role(partition, Role::Draining);
        let waited = Instant::now();
        while tokio::task::block_in_place(|| core.has_pending())
            && waited.elapsed() < Duration::from_secs(5)
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.partitions.set_role(partition, Role::HandingOver);
        // From here no batch applies (the gate is checked under the shard's lock).
        tokio::task::block_in_place(|| core.barrier());
        let asks = slot.handover.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(asks) = asks else { return Err("the partition has no append task".into()) };
        let (reply, handed) = tokio::sync::oneshot::channel();
        let _ = asks.send(append::HandOver { to: to.to_owned(), reply });
        let handed = handed.await.map_err(|_| "the append task stopped".to_owned())??;
        // The target at the raised epoch, with the hand-over record's sequence: it fences
        // after that record without claiming the partition first.
        let next = Owner {
            node: to.to_owned(),
            addr: beat.addr,
            epoch: owner.epoch + 1,
            handed_at: Some(handed.sequence),
        };
        let value = serde_json::to_vec(&next).map_err(|e| e.to_string())?;
        if let Err(error) = self.owners.update(&key, value.into(), entry.revision).await {
            self.partitions.set_role(partition, Role::Lost);
            return Err(format!("the table could not name {to:?}: {error}"));
        }
        *slot.owner.write().unwrap_or_else(|e| e.into_inner()) = Some(next);
        slot.applied.store(handed.sequence, Ordering::Release);
        *slot.jobs.lock().unwrap_or_else(|e| e.into_inner()) = Some(handed.jobs);
        self.partitions.set_role(partition, Role::Standby);
        self.start_tail(partition);
        tracing::info!(
            partition,
            to,
            sequence = handed.sequence,
            took_ms = started.elapsed().as_millis() as u64,
            "partition handed over"
        );
        Ok(())
    }

    /// Takes `partition`: claims it in the table (CAS on `revision`) at `epoch + 1`, catches up
    /// to the stream's end, appends the fence at the sequence caught up to, resolves the
    /// payments the old owner left in flight, and only then admits requests. After a planned
    /// move (`handed`: the hand-over record's sequence) the table names this node at `epoch`
    /// already (entry `revision`): no claim, and the catch-up is to that record.
    async fn take(
        &self,
        partition: usize,
        revision: u64,
        epoch: u64,
        handed: Option<u64>,
    ) -> Result<(), async_nats::Error> {
        let key = format!("p{partition}");
        let epoch = if handed.is_some() { epoch } else { epoch + 1 };
        let claim = Owner {
            node: self.config.node.clone(),
            addr: self.config.advertise.clone(),
            epoch,
            handed_at: None,
        };
        let claimed = match handed {
            Some(_) => revision,
            None => {
                let value: bytes::Bytes = serde_json::to_vec(&claim)?.into();
                if revision == 0 {
                    self.owners.create(&key, value).await?
                } else {
                    self.owners.update(&key, value, revision).await?
                }
            }
        };
        self.partitions.slots[partition].claimed.store(claimed, Ordering::Release);
        // Where the stream ends, as far as this node knows without asking it.
        let mut known_end = handed;
        let started = Instant::now();
        let deadline = Duration::from_secs(30);
        let slot = &self.partitions.slots[partition];
        let fenced = loop {
            if started.elapsed() > deadline {
                return Err("could not catch up and fence in 30 s".into());
            }
            let last = match known_end.take() {
                Some(sequence) => sequence,
                None => self.streams[partition].clone().info().await?.state.last_sequence,
            };
            while slot.applied.load(Ordering::Acquire) < last {
                if !self.tail_running(partition) {
                    return Err("the partition's tail stopped".into());
                }
                if started.elapsed() > deadline {
                    return Err("could not catch up in 30 s".into());
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            self.stop_tail(partition).await;
            let applied = slot.applied.load(Ordering::Acquire);
            let fence = async_nats::jetstream::message::PublishMessage::build()
                .expected_last_sequence(applied)
                .message_id(format!(
                    "{}-{partition}-fence-{epoch}-{:016x}",
                    self.config.name, self.incarnation
                ))
                .header(FENCE_HEADER, format!("{} {epoch}", self.config.node).as_str());
            let acked = match self.js.send_publish(self.config.subject(partition), fence).await {
                Ok(ack) => ack.await,
                Err(error) => Err(error),
            };
            match acked {
                Ok(ack) => break ack.sequence,
                Err(error) => {
                    // Appended to meanwhile (a zombie owner's last appends), or no answer:
                    // catch up again and fence at the new end.
                    tracing::info!(partition, %error, "fence not appended; catching up again");
                    self.start_tail(partition);
                }
            }
        };
        self.partitions.cached(partition, fenced, &super::append::Records::default());
        slot.applied.store(fenced, Ordering::Release);
        let jobs = slot.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(jobs) = jobs else {
            return Err("the partition's queue was taken already".into());
        };
        let appender = Appender {
            js: self.js.clone(),
            config: Arc::clone(&self.config),
            partitions: Arc::clone(&self.partitions),
            partition,
            epoch,
            count: self.partitions.slots.len(),
            store: self.store.clone(),
            acked: tokio::sync::watch::Sender::new(fenced),
        };
        let (asks, handovers) = tokio::sync::mpsc::unbounded_channel();
        *slot.handover.lock().unwrap_or_else(|e| e.into_inner()) = Some(asks);
        tokio::spawn(appender.run(jobs, handovers, fenced));
        // Fenced: from here a failure cannot return the partition to a standby (its queue went
        // to the appender), so it is lost here.
        let lost = |why: &str| {
            self.partitions.set_role(partition, Role::Lost);
            async_nats::Error::from(why.to_owned())
        };
        // Payments the old owner left at their providers end as a crash's do: declined, logged.
        let resolved: Vec<Envelope> = self.replicas[partition].resolve_pending(now_ms());
        if !resolved.is_empty() {
            tracing::warn!(
                partition,
                count = resolved.len(),
                "authorizations in flight at the old owner declined as provider timeouts"
            );
            let mut records = crate::wal::Records::with_capacity(0, 0);
            resolved.iter().for_each(|envelope| records.push(&envelope.to_bytes()));
            let (reply, durable) = tokio::sync::oneshot::channel();
            self.replicas[partition].submit(Job::Records { records, reply, replies: Vec::new() });
            durable
                .await
                .map_err(|_| lost("the resolution of in-flight payments was not appended"))?;
        }
        *slot.owner.write().unwrap_or_else(|e| e.into_inner()) = Some(claim);
        self.partitions.set_role(partition, Role::Owner);
        tracing::info!(
            partition,
            epoch,
            sequence = fenced,
            took_ms = started.elapsed().as_millis() as u64,
            "partition taken"
        );
        Ok(())
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
