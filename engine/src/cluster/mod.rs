//! The cluster: each shard is a partition whose log is a NATS JetStream stream, owned by one
//! node at a time and followed by warm standbys on the others (`docs/CLUSTER.md`).
//!
//! - **The replicated log is the source of truth.** The owner appends a partition's records, one
//!   message per group commit, each publish carrying `Nats-Expected-Last-Sequence`; a reply
//!   leaves only after the stream acknowledged the records it depends on (`cluster/append.rs`).
//! - **Fencing rests on the stream's sequence check alone.** A node taking a partition appends a
//!   fence record at the sequence it caught up to; the old owner's next append expects an older
//!   last sequence and is refused, so it drops the partition and answers `MOVED`.
//! - **Ownership** lives in a KV bucket changed only by compare-and-swap on its revision, and
//!   every node heartbeats into another (`cluster/control.rs`).
//! - **Standbys** tail every partition they do not own and apply the same commands through the
//!   same `ShardState::apply` (`cluster/tail.rs`), so a takeover only catches up the last messages.
//!
//! The cluster runs on a Tokio runtime of its own (two worker threads; a standby's decoding and
//! applying runs on its blocking pool): NATS traffic never competes with the server's runtime,
//! and the heartbeat is never late because a standby is catching up.

mod append;
mod cache;
mod control;
mod snapshots;
mod tail;

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};

use settlegate_types::histogram::{Histogram, HistogramSnapshot, COUNT_BOUNDS};

use crate::error::EngineError;
use crate::shard::{ReplicaCore, Reply};
use crate::wal::Job;

/// `[cluster]`: clustering on NATS JetStream. Absent: one node on its own data directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's name, unique in the cluster.
    pub node: String,
    /// NATS server URLs (any of the cluster's servers; the client fails over between them).
    pub nats: Vec<String>,
    /// The cluster's name: the prefix of its streams (`<name>-p<N>`) and KV buckets.
    pub name: String,
    /// The protocol address other nodes and clients reach this node at (given in `MOVED`).
    pub advertise: String,
    /// Copies of each partition's stream and of the KV buckets (1, 3 or 5).
    pub replicas: usize,
    /// How often this node writes its heartbeat and reads the ownership table.
    pub heartbeat_ms: u64,
    /// A node whose heartbeat has not changed for this long is taken for dead, and its
    /// partitions are taken over by their standbys.
    pub owner_timeout_ms: u64,
    /// Appends of one partition in flight at once (each one group commit).
    pub inflight_max: usize,
    /// How long an append may wait for the stream's acknowledgement before it is sent again
    /// (the same message, deduplicated by its ID); after `append_give_up_ms` of that, the
    /// partition is dropped.
    pub ack_timeout_ms: u64,
    /// See `ack_timeout_ms`.
    pub append_give_up_ms: u64,
    /// The owner stores a snapshot of a partition in the object store after this many records,
    /// and the stream is purged below the snapshot before it; 0: never (the stream keeps
    /// everything, and a node starting replays it all).
    pub snapshot_every_records: u64,
    /// A partition's stream is purged only below snapshots at least this old, so a standby
    /// lagging by less than this never finds what it needs next purged.
    pub purge_after_ms: u64,
    /// After start, how long a node waits (heartbeating) before it claims unowned partitions,
    /// so that nodes started together share them.
    pub settle_ms: u64,
    /// The restart cache (`cluster/cache.rs`): a directory where this node keeps each
    /// partition's stream as it saw it, so that on restart it reads from NATS only what came
    /// after. None: off (a node starting reads everything after the newest snapshot from NATS).
    pub cache_dir: Option<std::path::PathBuf>,
    /// The restart cache's size per partition, at most (the newest half of it at least is kept).
    pub cache_max_bytes: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node: String::new(),
            nats: vec!["nats://127.0.0.1:4222".into()],
            name: "settlegate".into(),
            advertise: String::new(),
            replicas: 3,
            heartbeat_ms: 250,
            owner_timeout_ms: 1500,
            inflight_max: 8,
            ack_timeout_ms: 2000,
            append_give_up_ms: 20_000,
            snapshot_every_records: 100_000,
            purge_after_ms: 60_000,
            settle_ms: 1000,
            cache_dir: None,
            cache_max_bytes: 256 << 20,
        }
    }
}

impl ClusterConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), String> {
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 32
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !name_ok(&self.node) {
            return Err("cluster.node: 1 to 32 letters, digits, '-' or '_'".into());
        }
        if !name_ok(&self.name) {
            return Err("cluster.name: 1 to 32 letters, digits, '-' or '_'".into());
        }
        if self.nats.is_empty() {
            return Err("cluster.nats: at least one NATS server URL".into());
        }
        if self.advertise.parse::<std::net::SocketAddr>().is_err() {
            return Err("cluster.advertise: the protocol address as IP:port".into());
        }
        if ![1, 3, 5].contains(&self.replicas) {
            return Err("cluster.replicas: 1, 3 or 5".into());
        }
        if self.heartbeat_ms == 0 || self.owner_timeout_ms < 3 * self.heartbeat_ms {
            return Err("cluster.owner_timeout_ms: at least 3 heartbeats".into());
        }
        if !(1..=64).contains(&self.inflight_max) {
            return Err("cluster.inflight_max: 1 to 64".into());
        }
        if self.ack_timeout_ms == 0 || self.append_give_up_ms < self.ack_timeout_ms {
            return Err("cluster.append_give_up_ms: at least ack_timeout_ms".into());
        }
        if !(1 << 20..=1 << 40).contains(&self.cache_max_bytes) {
            return Err("cluster.cache_max_bytes: 1 MiB to 1 TiB".into());
        }
        Ok(())
    }

    fn stream(&self, partition: usize) -> String {
        format!("{}-p{partition}", self.name)
    }

    fn subject(&self, partition: usize) -> String {
        format!("{}.p.{partition}", self.name)
    }
}

/// Where a partition stands on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// Tails the stream, applying what the owner appends; answers requests `MOVED`.
    Standby = 0,
    /// Claimed in the ownership table; catching up and fencing.
    Taking = 1,
    /// Owns it: admits requests and appends their records.
    Owner = 2,
    /// Owns it and is handing it to another node: new requests are answered `BUSY` while what
    /// was admitted finishes and is appended.
    Draining = 4,
    /// Handing it over: nothing more applies; what was appended is being acknowledged, then
    /// the hand-over record is appended and the table names the new owner.
    HandingOver = 5,
    /// Was the owner and was fenced (or could not append): its state here may hold changes
    /// never acknowledged, so this node neither serves nor takes the partition again until it
    /// restarts (and rebuilds it from the stream).
    Lost = 3,
}

impl Role {
    fn from_u8(value: u8) -> Role {
        match value {
            1 => Role::Taking,
            2 => Role::Owner,
            3 => Role::Lost,
            4 => Role::Draining,
            5 => Role::HandingOver,
            _ => Role::Standby,
        }
    }
}

/// Who owns a partition, as the ownership table says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// The owning node ("" once released).
    pub node: String,
    /// Its protocol address.
    pub addr: String,
    /// Raised by every takeover.
    pub epoch: u64,
    /// Set by a planned move: the stream sequence of the hand-over record. The old owner then
    /// names the target at the raised epoch itself, so the target only catches up to that
    /// record and fences, without a claim of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handed_at: Option<u64>,
}

/// A request for a partition this node does not own: where to send it instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    /// The partition (shard index).
    pub partition: u16,
    /// The owner's epoch as this node last saw it (0: none known).
    pub epoch: u64,
    /// The owner's protocol address ("" while no owner is known: retry after a moment).
    pub addr: String,
}

/// The sending end of a partition's queue of log jobs.
pub(crate) type JobQueue = tokio::sync::mpsc::UnboundedSender<Job<Vec<Reply>>>;

/// The retry-after hint of a request refused while its partition is handed over.
const HANDOVER_RETRY_MS: u32 = 10;

/// One partition's standing on this node.
struct Slot {
    role: AtomicU8,
    owner: RwLock<Option<Owner>>,
    /// The last stream sequence applied here (by the tail, or appended as owner).
    applied: AtomicU64,
    /// A standby's lag: messages in the stream after the last one it applied, as the stream
    /// said when it delivered that one.
    lag: AtomicU64,
    /// The ownership table's revision of this node's last claim of the partition.
    claimed: AtomicU64,
    /// The queue the shard's records go to; taken by the append task at takeover.
    jobs: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Job<Vec<Reply>>>>>,
    /// Asks the append task (while this node owns the partition) to hand it over.
    handover: Mutex<Option<tokio::sync::mpsc::UnboundedSender<append::HandOver>>>,
    /// The partition's restart cache, when `cluster.cache_dir` is set.
    cache: Mutex<Option<cache::Writer>>,
    /// What this node's appends measured.
    appends: AppendStats,
}

/// Every partition's standing, shared by the engine (admission) and the cluster's tasks.
pub(crate) struct Partitions {
    slots: Vec<Slot>,
    /// This node's name: an owner entry naming it, once the partition is lost here, is stale.
    node: String,
}

impl Partitions {
    fn role(&self, partition: usize) -> Role {
        Role::from_u8(self.slots[partition].role.load(Ordering::Acquire))
    }

    fn set_role(&self, partition: usize, role: Role) {
        self.slots[partition].role.store(role as u8, Ordering::Release);
    }

    /// Keeps the message at stream `sequence` of `partition` in its restart cache, if it has
    /// one: a message this node appended and the stream acknowledged, or one its tail applied
    /// (`records` empty for a fence or hand-over).
    fn cached(&self, partition: usize, sequence: u64, records: &append::Records) {
        let mut cache = self.slots[partition].cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cache) = cache.as_mut() {
            cache.record(sequence, records);
        }
    }

    /// Whether requests for `partition` are taken here; else `MOVED` (where to send them), or
    /// `BUSY` while it is handed over.
    pub(crate) fn admit(&self, partition: usize) -> Result<(), EngineError> {
        match self.role(partition) {
            Role::Owner => Ok(()),
            Role::Draining | Role::HandingOver => {
                Err(EngineError::Busy { retry_after_ms: HANDOVER_RETRY_MS })
            }
            _ => Err(EngineError::Moved(self.moved(partition))),
        }
    }

    /// Whether a batch may apply to `partition`'s state here: new work only while this node
    /// owns it, completions of admitted work also while it is handed over.
    pub(crate) fn applies(&self, partition: usize, completion: bool) -> bool {
        match self.role(partition) {
            Role::Owner => true,
            Role::Draining => completion,
            _ => false,
        }
    }

    /// Where requests for `partition` go, as far as this node knows.
    pub(crate) fn moved(&self, partition: usize) -> Moved {
        let owner = self.slots[partition].owner.read().unwrap_or_else(|e| e.into_inner()).clone();
        let (epoch, addr) = match owner {
            // Taking it: the owner this node knew is the one it replaces (dead, say); no
            // address, so the client asks again shortly, here or where the table says.
            Some(owner) if self.role(partition) == Role::Taking => (owner.epoch, String::new()),
            Some(owner) if !owner.node.is_empty() && owner.node != self.node => {
                (owner.epoch, owner.addr)
            }
            Some(owner) => (owner.epoch, String::new()),
            None => (0, String::new()),
        };
        Moved { partition: partition as u16, epoch, addr }
    }
}

/// A partition's standing, for metrics and tests.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionStatus {
    /// The partition.
    pub partition: usize,
    /// This node's role in it.
    pub role: Role,
    /// The owner as last read from the table.
    pub owner: Option<Owner>,
    /// The last stream sequence applied here.
    pub applied: u64,
    /// A standby's lag behind the stream, in messages (0 for the owner).
    pub lag: u64,
    /// What this node's appends to the partition's stream measured, while it owned it.
    pub appends: AppendFigures,
}

/// The append path's figures of one partition (`cluster/append.rs`), as `/metrics` shows them:
/// where a replicated write's time goes.
#[derive(Debug, Clone, PartialEq)]
pub struct AppendFigures {
    /// From a message's publish to its acknowledgement by the stream, in seconds.
    pub ack: HistogramSnapshot,
    /// Records per message.
    pub records: HistogramSnapshot,
    /// A message's size as published (compressed or not), in KiB.
    pub kib: HistogramSnapshot,
    /// Messages already in flight when one is published.
    pub in_flight: HistogramSnapshot,
}

/// The histograms behind [`AppendFigures`].
#[derive(Debug)]
pub(crate) struct AppendStats {
    pub(crate) ack: Histogram,
    pub(crate) records: Histogram,
    pub(crate) kib: Histogram,
    pub(crate) in_flight: Histogram,
}

impl Default for AppendStats {
    fn default() -> Self {
        AppendStats {
            ack: Histogram::latency(),
            records: Histogram::new(&COUNT_BOUNDS),
            kib: Histogram::new(&COUNT_BOUNDS),
            in_flight: Histogram::new(&COUNT_BOUNDS),
        }
    }
}

impl AppendStats {
    fn figures(&self) -> AppendFigures {
        AppendFigures {
            ack: self.ack.snapshot(),
            records: self.records.snapshot(),
            kib: self.kib.snapshot(),
            in_flight: self.in_flight.snapshot(),
        }
    }
}

/// A running cluster membership: its runtime and the partitions' standing.
pub(crate) struct Cluster {
    pub(crate) partitions: Arc<Partitions>,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    commands: tokio::sync::mpsc::UnboundedSender<control::Command>,
}

impl Cluster {
    /// The queues the shards' log handles send to, one per partition, and the receivers the
    /// cluster keeps until it owns each partition.
    pub(crate) fn queues(count: usize, node: &str) -> (Vec<JobQueue>, Arc<Partitions>) {
        let mut senders = Vec::with_capacity(count);
        let mut slots = Vec::with_capacity(count);
        for _ in 0..count {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            senders.push(tx);
            slots.push(Slot {
                role: AtomicU8::new(Role::Standby as u8),
                owner: RwLock::new(None),
                applied: AtomicU64::new(0),
                lag: AtomicU64::new(0),
                claimed: AtomicU64::new(0),
                jobs: Mutex::new(Some(rx)),
                handover: Mutex::new(None),
                cache: Mutex::new(None),
                appends: AppendStats::default(),
            });
        }
        (senders, Arc::new(Partitions { slots, node: node.to_owned() }))
    }

    /// Joins the cluster, first step: connects to NATS and makes sure the streams, buckets and
    /// the snapshots' object store exist. Then [`Joining::restore`] (before the shards start)
    /// and [`Joining::run`] (after).
    pub(crate) fn connect(
        config: ClusterConfig,
        partitions: Arc<Partitions>,
        vault: Arc<crate::vault::Vault>,
    ) -> Result<Joining, EngineError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("settlegate-cluster")
            .enable_all()
            .build()
            .map_err(|e| EngineError::Config(format!("cannot start the cluster runtime: {e}")))?;
        let context = control::Context::connect(&runtime, config, Arc::clone(&partitions), vault)?;
        Ok(Joining { runtime, context, partitions })
    }

    /// Hands `partition` (owned here) to node `to` (see `docs/CLUSTER.md`, "Planned moves").
    pub(crate) async fn move_partition(&self, partition: usize, to: &str) -> Result<(), String> {
        if partition >= self.partitions.slots.len() {
            return Err(format!("no partition {partition}"));
        }
        let (reply, done) = tokio::sync::oneshot::channel();
        let command = control::Command::Move { partition, to: to.to_owned(), reply };
        self.commands.send(command).map_err(|_| "the cluster stopped".to_owned())?;
        done.await.map_err(|_| "the cluster stopped".to_owned())?
    }

    /// Every partition's standing.
    pub(crate) fn status(&self) -> Vec<PartitionStatus> {
        let slots = &self.partitions.slots;
        (0..slots.len())
            .map(|partition| PartitionStatus {
                partition,
                role: self.partitions.role(partition),
                owner: slots[partition].owner.read().unwrap_or_else(|e| e.into_inner()).clone(),
                applied: slots[partition].applied.load(Ordering::Acquire),
                lag: match self.partitions.role(partition) {
                    Role::Standby => slots[partition].lag.load(Ordering::Acquire),
                    _ => 0,
                },
                appends: slots[partition].appends.figures(),
            })
            .collect()
    }

    /// Stops the cluster's tasks (appends in flight are dropped: their replies never leave).
    pub(crate) fn stop(&self) {
        let runtime = self.runtime.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(runtime) = runtime {
            runtime.shutdown_background();
        }
    }
}

/// A cluster joined but not yet running (see [`Cluster::connect`]).
pub(crate) struct Joining {
    runtime: tokio::runtime::Runtime,
    context: control::Context,
    partitions: Arc<Partitions>,
}

impl Joining {
    /// Restores each partition of `prepared` from its newest snapshot in the object store (if
    /// any), before the shards start; their tails start after the sequences restored.
    pub(crate) fn restore(
        &mut self,
        prepared: &mut crate::startup::Prepared,
        shared: &crate::shard::state::Shared,
    ) -> Result<(), EngineError> {
        let context = &self.context;
        control::Context::block_on(
            &self.runtime,
            context.restore(prepared.states_mut().collect()),
        )?;
        prepared.rebuild_derived(shared);
        Ok(())
    }

    /// Starts the tails, the heartbeat and the ownership loop, over the started shards.
    pub(crate) fn run(self, replicas: Vec<ReplicaCore>) -> Cluster {
        let (commands, queue) = tokio::sync::mpsc::unbounded_channel();
        self.runtime.spawn(control::run(self.context, replicas, queue));
        Cluster { partitions: self.partitions, runtime: Mutex::new(Some(self.runtime)), commands }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}
