//! Snapshots of partitions in the JetStream object store, so that a stream need not keep its
//! whole history and a node starting need not replay it.
//!
//! The owner's shard captures its state every `snapshot_every_records` records (the capture
//! rides the partition's queue, after the records it covers, as on a single node). The append
//! task knows the stream sequence of the last message published before it: the sequence the
//! snapshot covers. The snapshot is stored only once the stream has acknowledged that far (a
//! capture may hold changes an owner fenced meanwhile never got appended: then it is dropped),
//! as the object `p<N>-<sequence>` of bucket `<name>-snapshots`, in the single node's snapshot
//! format (`wal/snapshot.rs`). Then the stream is purged below the newest *other* snapshot that
//! is at least `purge_after_ms` old, and older objects of the partition are deleted: a standby
//! lagging by less than that (a consumer being made again after a NATS server died, say) still
//! finds every message it needs.
//!
//! A node starting restores each partition from its newest object and tails the stream from
//! the sequence after it. Objects are named by sequence and never overwritten, so a fenced
//! owner storing an older snapshot late cannot hide a newer one.

use std::io::Cursor;
use std::sync::Arc;

use async_nats::jetstream::{self, object_store::ObjectStore};
use futures::StreamExt;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use super::ClusterConfig;
use crate::wal::{snapshot, SnapshotPayload};

/// The bucket of a cluster's snapshots.
pub(super) fn bucket(config: &ClusterConfig) -> String {
    format!("{}-snapshots", config.name)
}

fn object_name(partition: usize, sequence: u64) -> String {
    format!("p{partition}-{sequence:020}")
}

/// The sequence a partition's object names, if it is one of `partition`'s.
fn sequence_of(name: &str, partition: usize) -> Option<u64> {
    name.strip_prefix(&format!("p{partition}-"))?.parse().ok()
}

/// `partition`'s stored snapshots, ascending by sequence: each one's sequence, and when it was
/// stored (UNIX seconds).
pub(super) async fn stored(
    store: &ObjectStore,
    partition: usize,
) -> Result<Vec<(u64, Option<i64>)>, async_nats::Error> {
    let mut list = store.list().await?;
    let mut snapshots = Vec::new();
    while let Some(info) = list.next().await {
        let info = info?;
        if info.deleted {
            continue;
        }
        if let Some(sequence) = sequence_of(&info.name, partition) {
            snapshots.push((sequence, info.modified.map(|at| at.unix_timestamp())));
        }
    }
    snapshots.sort_unstable();
    Ok(snapshots)
}

/// `partition`'s newest snapshot: the sequence it covers and its bytes (the single node's
/// snapshot file format).
pub(super) async fn newest(
    store: &ObjectStore,
    partition: usize,
) -> Result<Option<(u64, Vec<u8>)>, async_nats::Error> {
    let Some(&(sequence, _)) = stored(store, partition).await?.last() else { return Ok(None) };
    let mut object = store.get(object_name(partition, sequence)).await?;
    let mut bytes = Vec::new();
    object.read_to_end(&mut bytes).await?;
    Ok(Some((sequence, bytes)))
}

/// A capture of a partition's state, to store once the stream holds what it covers.
pub(super) struct Pending {
    pub(super) js: jetstream::Context,
    pub(super) store: ObjectStore,
    pub(super) config: Arc<ClusterConfig>,
    pub(super) partition: usize,
    pub(super) count: usize,
    /// The stream sequence of the last message the capture covers.
    pub(super) covered: u64,
    pub(super) payload: SnapshotPayload,
}

impl Pending {
    /// Stores the snapshot once `acked` (the append task's last acknowledged sequence) reaches
    /// what it covers; drops it if the append task stops first.
    pub(super) async fn store(self, mut acked: watch::Receiver<u64>) {
        let (partition, covered) = (self.partition, self.covered);
        if acked.wait_for(|acked| *acked >= covered).await.is_err() {
            tracing::info!(
                partition,
                covered,
                "snapshot dropped: its changes were not all acknowledged"
            );
            return;
        }
        let started = std::time::Instant::now();
        let (payload, count) = (self.payload, self.count);
        let encoded = tokio::task::spawn_blocking(move || {
            snapshot::encode(&payload(rkyv::util::AlignedVec::new()), partition, count, covered)
        })
        .await;
        let Ok(bytes) = encoded else { return };
        let size = bytes.len();
        let name = object_name(partition, covered);
        if let Err(error) = self.store.put(name.as_str(), &mut Cursor::new(bytes)).await {
            tracing::warn!(partition, covered, %error, "snapshot not stored");
            return;
        }
        // Purged below the newest other snapshot old enough that no standby still needs what
        // precedes it.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let age_min = (self.config.purge_after_ms / 1000) as i64;
        let snapshots = stored(&self.store, partition).await.unwrap_or_default();
        let floor = snapshots
            .iter()
            .filter(|(sequence, at)| {
                *sequence < covered && at.is_some_and(|at| now - at >= age_min)
            })
            .map(|(sequence, _)| *sequence)
            .max();
        if let Some(floor) = floor {
            let purged = match self.js.get_stream(self.config.stream(partition)).await {
                Ok(stream) => {
                    stream.purge().sequence(floor).await.map(|_| ()).map_err(|e| e.to_string())
                }
                Err(error) => Err(error.to_string()),
            };
            if let Err(error) = purged {
                tracing::warn!(partition, below = floor, error, "stream not purged");
            }
            for (old, _) in snapshots.into_iter().filter(|(sequence, _)| *sequence < floor) {
                let _ = self.store.delete(object_name(partition, old)).await;
            }
        }
        tracing::info!(
            partition,
            covered,
            bytes = size,
            took_ms = started.elapsed().as_millis() as u64,
            "snapshot stored"
        );
    }
}
