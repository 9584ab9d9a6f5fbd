//! A standby's side of a partition: an ordered consumer of the partition's stream from the
//! sequence after the last applied, whose records are applied to the shard's state through the
//! same `ShardState::apply` the owner used. The records carry everything applying them reads
//! outside the shard (`docs/ARCHITECTURE.md`, "A shard's state is a function of its own log"), so
//! the standby's state, digest included, is the owner's at the same sequence.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use futures::StreamExt;

use super::append::{self, FENCE_HEADER};
use super::{Partitions, Role};
use crate::shard::logged::Logged;
use crate::shard::ReplicaCore;
use crate::vault::Vault;
use crate::wal;

/// What one tail needs.
pub(super) struct Tail {
    pub(super) stream: async_nats::jetstream::stream::Stream,
    pub(super) partitions: Arc<Partitions>,
    pub(super) partition: usize,
    pub(super) core: ReplicaCore,
    pub(super) vault: Arc<Vault>,
    /// The partitions' snapshots, to start again from when the stream was purged past this
    /// standby.
    pub(super) store: async_nats::jetstream::object_store::ObjectStore,
    /// The partitions' count (in a snapshot's header).
    pub(super) count: usize,
}

/// The commands of a message's records (as the owner appended them, read in their format),
/// their keys opened with `vault`: what a standby's tail and a node's restart cache apply.
pub(super) fn envelopes_of(
    records: &append::Records,
    vault: &Vault,
) -> Result<Vec<crate::shard::Envelope>, String> {
    wal::unframe_records::<Logged>(&records.framed, records.format)?
        .into_iter()
        .map(|record| record.into_envelope(vault).map_err(|e| e.to_string()))
        .collect()
}

impl Tail {
    /// Applies the stream's messages after the last applied one, as they come, until the task is
    /// aborted (at a takeover) or a message cannot be applied.
    pub(super) async fn run(self) {
        let partition = self.partition;
        loop {
            let from = self.partitions.slots[partition].applied.load(Ordering::Acquire) + 1;
            match self.follow(from).await {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(partition, %error, "tail of the partition's stream interrupted; resuming");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            }
        }
    }

    async fn follow(&self, from: u64) -> Result<(), async_nats::Error> {
        let partition = self.partition;
        let consumer = self
            .stream
            .create_consumer(pull::OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: from },
                // Pulls expire after 2 s, with a server heartbeat every second: a consumer lost
                // with its server (the tail's consumer has one replica) is noticed and made again
                // in about 2 s, where the client's defaults (30 s, 15 s) would take half a minute.
                max_expires: std::time::Duration::from_secs(2),
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        let mut expected = from;
        while let Some(message) = messages.next().await {
            let message = message?;
            let info = message.info()?;
            let (sequence, lag) = (info.stream_sequence, info.pending);
            if sequence != expected {
                // Purged below a snapshot while this standby lagged behind it: what it missed is
                // gone. It starts again from the newest snapshot; either way the caller follows
                // again: from the snapshot's sequence once reloaded, else (the object store out
                // of reach for a moment) from where it was, which finds the gap and tries again.
                tracing::warn!(partition, expected, sequence, "the stream no longer holds what this standby needs next; reloading the newest snapshot");
                return Err(match self.reload().await {
                    Ok(()) => "reloaded from a snapshot".into(),
                    Err(error) => format!("reloading a snapshot failed: {error}").into(),
                });
            }
            expected = sequence + 1;
            self.partitions.slots[partition].lag.store(lag, Ordering::Release);
            let fence = message.headers.as_ref().and_then(|h| h.get(FENCE_HEADER)).is_some();
            let mut records = append::Records::default();
            if !fence {
                // Decoding (opening the keys records carry) and applying are CPU work: done on
                // the blocking pool, so that the cluster's runtime keeps its heartbeat on time
                // however long a standby's catch-up is.
                let (core, vault, headers, payload) = (
                    self.core.clone(),
                    Arc::clone(&self.vault),
                    message.headers.clone(),
                    message.payload.clone(),
                );
                let applied = tokio::task::spawn_blocking(move || {
                    let records = append::records_of(headers.as_ref(), &payload)?;
                    core.apply_replicated(envelopes_of(&records, &vault)?);
                    Ok::<append::Records, String>(records)
                })
                .await?;
                match applied {
                    Ok(applied) => records = applied,
                    Err(error) => {
                        // A record this build cannot apply: the standby stops here rather than
                        // diverge; it will not take the partition over.
                        tracing::error!(
                            partition,
                            sequence,
                            error,
                            "replicated record cannot be applied; this node stops following the partition"
                        );
                        self.partitions.set_role(partition, Role::Lost);
                        return Ok(());
                    }
                }
            }
            self.partitions.cached(partition, sequence, &records);
            self.partitions.slots[partition].applied.store(sequence, Ordering::Release);
        }
        Ok(())
    }

    /// Replaces the partition's state with its newest snapshot's, and its applied sequence with
    /// the snapshot's.
    async fn reload(&self) -> Result<(), String> {
        let newest = super::snapshots::newest(&self.store, self.partition).await;
        let Some((sequence, bytes)) = newest.map_err(|e| e.to_string())? else {
            return Err("no snapshot stored".into());
        };
        let (core, partition, count) = (self.core.clone(), self.partition, self.count);
        tokio::task::spawn_blocking(move || {
            let label = std::path::PathBuf::from(format!("object p{partition}-{sequence}"));
            let (_, snapshot) = crate::wal::snapshot::read_bytes(&label, &bytes, partition, count)
                .map_err(|e| e.to_string())?;
            core.reload(&snapshot)
        })
        .await
        .map_err(|e| e.to_string())??;
        self.partitions.slots[self.partition].applied.store(sequence, Ordering::Release);
        tracing::info!(partition, sequence, "standby reloaded from the newest snapshot");
        Ok(())
    }
}
