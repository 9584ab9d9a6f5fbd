//! The cluster: each shard is a partition whose log is a NATS JetStream stream, owned by one
//! node at a time and followed by warm standbys on the others (`docs/CLUSTER.md`).
//!
//! - **The replicated log is the source of truth.** The owner appends a partition's records, one
//!   message per group commit, each publish carrying `Nats-Expected-Last-Sequence`; a reply
//!   leaves only after the stream acknowledged the records it depends on ([`append`]).
//! - **Fencing rests on the stream's sequence check alone.** A node taking a partition appends a
//!   fence record at the sequence it caught up to; the old owner's next append expects an older
//!   last sequence and is refused, so it drops the partition and answers `MOVED`.
//! - **Ownership** lives in a KV bucket changed only by compare-and-swap on its revision, and
//!   every node heartbeats into another ([`control`]).
//! - **Standbys** tail every partition they do not own and apply the same commands through the
//!   same `ShardState::apply` ([`tail`]), so a takeover only catches up the last messages.
//!
//! The cluster runs on a Tokio runtime of its own (one worker thread): NATS traffic never
//! competes with the shards' threads or with the server's runtime.

mod append;
mod control;
mod tail;

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};

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
    /// After start, how long a node waits (heartbeating) before it claims unowned partitions,
    /// so that nodes started together share them.
    pub settle_ms: u64,
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
            settle_ms: 1000,
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

/// One partition's standing on this node.
struct Slot {
    role: AtomicU8,
    owner: RwLock<Option<Owner>>,
    /// The last stream sequence applied here (by the tail, or appended as owner).
    applied: AtomicU64,
    /// The queue the shard's records go to; taken by the append task at takeover.
    jobs: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Job<Vec<Reply>>>>>,
}

/// Every partition's standing, shared by the engine (admission) and the cluster's tasks.
pub(crate) struct Partitions {
    slots: Vec<Slot>,
}

impl Partitions {
    fn role(&self, partition: usize) -> Role {
        Role::from_u8(self.slots[partition].role.load(Ordering::Acquire))
    }

    fn set_role(&self, partition: usize, role: Role) {
        self.slots[partition].role.store(role as u8, Ordering::Release);
    }

    /// Whether requests for `partition` are taken here; else where to send them.
    pub(crate) fn admit(&self, partition: usize) -> Result<(), Moved> {
        if self.role(partition) == Role::Owner {
            return Ok(());
        }
        Err(self.moved(partition))
    }

    /// Where requests for `partition` go, as far as this node knows.
    pub(crate) fn moved(&self, partition: usize) -> Moved {
        let owner = self.slots[partition].owner.read().unwrap_or_else(|e| e.into_inner()).clone();
        let (epoch, addr) = match owner {
            Some(owner) if !owner.node.is_empty() => (owner.epoch, owner.addr),
            Some(owner) => (owner.epoch, String::new()),
            None => (0, String::new()),
        };
        Moved { partition: partition as u16, epoch, addr }
    }
}

/// A partition's standing, for metrics and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionStatus {
    /// The partition.
    pub partition: usize,
    /// This node's role in it.
    pub role: Role,
    /// The owner as last read from the table.
    pub owner: Option<Owner>,
    /// The last stream sequence applied here.
    pub applied: u64,
}

/// A running cluster membership: its runtime and the partitions' standing.
pub(crate) struct Cluster {
    pub(crate) partitions: Arc<Partitions>,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
}

impl Cluster {
    /// The queues the shards' log handles send to, one per partition, and the receivers the
    /// cluster keeps until it owns each partition.
    pub(crate) fn queues(
        count: usize,
    ) -> (Vec<tokio::sync::mpsc::UnboundedSender<Job<Vec<Reply>>>>, Arc<Partitions>) {
        let mut senders = Vec::with_capacity(count);
        let mut slots = Vec::with_capacity(count);
        for _ in 0..count {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            senders.push(tx);
            slots.push(Slot {
                role: AtomicU8::new(Role::Standby as u8),
                owner: RwLock::new(None),
                applied: AtomicU64::new(0),
                jobs: Mutex::new(Some(rx)),
            });
        }
        (senders, Arc::new(Partitions { slots }))
    }

    /// Joins the cluster: connects to NATS, makes sure the streams and buckets exist, starts a
    /// tail of every partition, then the heartbeat and ownership loop.
    pub(crate) fn start(
        config: ClusterConfig,
        partitions: Arc<Partitions>,
        replicas: Vec<ReplicaCore>,
        vault: Arc<crate::vault::Vault>,
    ) -> Result<Cluster, EngineError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("settlegate-cluster")
            .enable_all()
            .build()
            .map_err(|e| EngineError::Config(format!("cannot start the cluster runtime: {e}")))?;
        let context =
            control::Context::connect(&runtime, config, partitions.clone(), replicas, vault)?;
        runtime.spawn(control::run(context));
        Ok(Cluster { partitions, runtime: Mutex::new(Some(runtime)) })
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

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}
