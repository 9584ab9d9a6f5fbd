//! Starting an engine: the provider registry from config, every shard's state (fresh, or
//! recovered from the data directory: snapshots, then the logs after them), and the actix
//! system with one arbiter thread per shard.

use std::sync::{Arc, Mutex};

use actix::{Arbiter, System};
use settlegate_adapters::Guarded;
use tokio::sync::oneshot;

use crate::config::EngineConfig;
use crate::error::EngineError;
use crate::providers::{Provider, Registry};
use crate::shard::logged::Logged;
use crate::shard::state::{RegistryWrite, Reply, Shared, StateConfig};
use crate::shard::{Envelope, ShardCore, ShardHandle, ShardState, ShardWal};
use crate::vault::Vault;
use crate::wal::record::RecordError;
use crate::wal::snapshot;
use crate::wal::{self, StorageError};

/// The actor system and the threads to join when it stops.
pub(crate) struct ActorRuntime {
    system: System,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Log writer threads; they finish (flush, sync) once the shards holding them are gone.
    wal_threads: Vec<std::thread::JoinHandle<()>>,
}

/// Stops the actor system (if running) and joins its threads, then stops every shard (a batch
/// being applied on a caller's thread finishes first), then joins the log writers, which flush
/// what was queued once their shards are gone.
pub(crate) fn stop_runtime(runtime: &Mutex<Option<ActorRuntime>>, shards: &[ShardHandle]) {
    let taken = runtime.lock().map(|mut guard| guard.take());
    if let Ok(Some(mut runtime)) = taken {
        runtime.system.stop();
        if let Some(thread) = runtime.thread.take() {
            let _ = thread.join();
        }
        shards.iter().for_each(ShardHandle::stop);
        for thread in runtime.wal_threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Builds the registry, handing the adapters the vault: a card adapter (`kind = "iso8583"`)
/// detokenizes with it, inside the adapter only. A provider named in `adapters` is served by
/// the adapter given there (a test hook; empty otherwise).
pub(crate) fn build_registry(
    config: &EngineConfig,
    vault: &Arc<Vault>,
    mut adapters: Vec<(u32, Arc<dyn settlegate_adapters::ProviderAdapter>)>,
) -> Result<Registry, EngineError> {
    let mut providers = Vec::with_capacity(config.providers.len());
    for p in &config.providers {
        let given = adapters.iter().position(|(code, _)| *code == p.code);
        let adapter = match given {
            Some(at) => adapters.swap_remove(at).1,
            None => settlegate_adapters::build_with(&p.adapter, Arc::clone(vault) as _)
                .map_err(|e| EngineError::Config(format!("provider {}: {e}", p.code)))?,
        };
        let provider = Provider::new(p.code, p.name.clone(), Guarded::new(adapter, p.limits));
        provider
            .register_terminals(p.terminals.clone())
            .map_err(|r| EngineError::Config(format!("provider {} terminals: {r}", p.code)))?;
        providers.push(provider);
    }
    Ok(Registry::new(providers))
}

/// Shard states ready to run: recovered from their logs when durability is configured.
pub(crate) struct Prepared {
    states: Vec<(ShardState, Option<ShardWal>)>,
    wal_threads: Vec<std::thread::JoinHandle<()>>,
    /// A cluster node's partitions, which say whether a batch may apply.
    gate: Option<Arc<crate::cluster::Partitions>>,
}

impl Prepared {
    /// Gives every shard a log whose records go to its partition's replicated log (a cluster
    /// node's shards start fresh and are filled by their streams), and returns the partitions'
    /// standing, which holds the other end of each queue.
    pub(crate) fn replicate(
        &mut self,
        cluster: &crate::cluster::ClusterConfig,
    ) -> Arc<crate::cluster::Partitions> {
        let node = &cluster.node;
        let count = self.states.len();
        let (senders, partitions) = crate::cluster::Cluster::queues(count, node);
        self.gate = Some(Arc::clone(&partitions));
        for (index, ((_, wal), jobs)) in self.states.iter_mut().zip(senders).enumerate() {
            let handle = wal::WalHandle::replicated(jobs, index, count);
            let snapshot_every = cluster.snapshot_every_records;
            *wal = Some(ShardWal {
                handle,
                generation: 0,
                since_snapshot: 0,
                snapshot_every,
                last_snapshot_bytes: Arc::default(),
                scratch: Default::default(),
            });
        }
        partitions
    }
}

impl Prepared {
    /// Every shard's state, by index.
    pub(crate) fn states_mut(&mut self) -> impl Iterator<Item = &mut ShardState> {
        self.states.iter_mut().map(|(state, _)| state)
    }

    /// Rebuilds what is derived from every shard's state (the directory of stores), after
    /// states were restored from snapshots.
    pub(crate) fn rebuild_derived(&mut self, shared: &Shared) {
        let mut states: Vec<&mut ShardState> = self.states_mut().collect();
        let mut indexes: Vec<&mut crate::geo::StoreIndex> =
            states.iter_mut().map(|state| &mut state.stores).collect();
        crate::geo::rebuild_directory(&shared.stores, &mut indexes);
    }
}

/// Builds every shard's state: fresh, or replayed from the data directory's logs, with the
/// authorizations a crash left at their providers resolved (and that resolution logged) before
/// any new request is taken.
pub(crate) fn recover_shards(
    config: &EngineConfig,
    shared: &Shared,
    state_config: StateConfig,
    now_ms: i64,
) -> Result<Prepared, EngineError> {
    let storage = |e: StorageError| EngineError::Storage(e.to_string());
    let count = config.shard_count_in_force().map_err(storage)?;
    let mut states: Vec<ShardState> =
        (0..count).map(|i| ShardState::new(i as u8, shared.clone(), state_config)).collect();
    let Some(dir) = &config.durability.data_dir else {
        let states = states.into_iter().map(|state| (state, None)).collect();
        return Ok(Prepared { states, wal_threads: Vec::new(), gate: None });
    };
    // Created private (a warning if it is open to every user); stale temporary files removed.
    wal::prepare_dir(dir, count).map_err(storage)?;
    let started = std::time::Instant::now();
    // Snapshots load in parallel, one thread per shard: they share nothing but the
    // concurrent device and vault maps. The logs after them replay in order below.
    let reading = reading_for(dir, count, true);
    let loaded: Vec<Result<LoadedShard, EngineError>> = std::thread::scope(|scope| {
        let loaders: Vec<_> = states
            .iter_mut()
            .enumerate()
            .map(|(index, state)| {
                named(format!("sg-recover-{index}"))
                    .spawn_scoped(scope, move || load_shard(dir, index, count, state, reading))
                    .expect("a recovery thread starts")
            })
            .collect();
        loaders.into_iter().map(|l| l.join().expect("snapshot loader panicked")).collect()
    });
    let loaded = loaded.into_iter().collect::<Result<Vec<_>, _>>()?;
    let mut logs = Vec::with_capacity(count);
    let mut generations = Vec::with_capacity(count);
    let mut envelopes = Vec::with_capacity(count);
    let mut consolidate = Vec::with_capacity(count);
    let mut rewrites = Vec::with_capacity(count);
    let mut since_snapshot = Vec::with_capacity(count);
    let mut streamed = 0;
    let apply_cpu_ms = loaded.iter().map(|shard| shard.apply_cpu.as_millis()).max().unwrap_or(0);
    for (index, shard) in loaded.iter().enumerate() {
        if shard.stale_prev {
            let prev = wal::shard_prev_log_path(dir, index);
            match std::fs::remove_file(&prev) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(EngineError::Storage(format!("{}: {e}", prev.display()))),
            }
        }
    }
    for shard in loaded {
        consolidate.push(shard.consolidate);
        // A log of an older format, or one that follows a previous log (a snapshot cut short),
        // is rewritten in this format, whole, before anything is appended to it (below).
        let old = shard.log.version.is_some_and(|v| v < wal::FORMAT_VERSION);
        rewrites.push(shard.rewrite.or_else(|| (old || shard.consolidate).then(Vec::new)));
        since_snapshot.push((shard.envelopes.len() + shard.applied) as u64);
        streamed += shard.applied;
        logs.push(shard.log);
        generations.push(shard.generation);
        envelopes.push(shard.envelopes);
    }
    // What an older record lacks is resolved against the registries, the stores' directory
    // among them, as the snapshots left them.
    rebuild_store_directory(shared, &mut states);
    let loaded_ms = started.elapsed().as_millis() as u64;
    // The logs read whole replay now; their records to rewrite are encoded as they are applied
    // (what an older record lacked filled in), those streamed were encoded already.
    let encode: Vec<bool> =
        rewrites.iter().zip(&envelopes).map(|(r, e)| r.is_some() && !e.is_empty()).collect();
    let (replayed, encoded) = replay(&mut states, envelopes, &encode);
    let replayed = replayed + streamed;
    let converted: Vec<Option<Vec<rkyv::util::AlignedVec>>> = rewrites
        .into_iter()
        .zip(encoded)
        .map(|(rewrite, encoded)| rewrite.map(|records| encoded.unwrap_or(records)))
        .collect();
    rebuild_store_directory(shared, &mut states);
    let mut prepared =
        Prepared { states: Vec::with_capacity(count), wal_threads: Vec::new(), gate: None };
    for (index, ((mut state, log), converted)) in
        states.into_iter().zip(&logs).zip(converted).enumerate()
    {
        let path = wal::shard_log_path(dir, index);
        if log.torn_bytes > 0 {
            // Cut from the log, but never destroyed: kept beside it, for whoever looks.
            let kept = wal::keep_cut_tail(dir, index, log.valid_len, now_ms).map_err(storage)?;
            match kept {
                Some((side, bytes)) if log.older_bytes => tracing::warn!(
                    path = %path.display(),
                    offset = log.valid_len,
                    cut = log.torn_bytes,
                    bytes,
                    kept_in = %side.display(),
                    "the log's file held an older log's bytes after its last record (a log is written over the file of the log before the last); they were cut, and the first of them kept in a side file"
                ),
                Some((side, bytes)) => tracing::error!(
                    path = %path.display(),
                    offset = log.valid_len,
                    cut = log.torn_bytes,
                    bytes,
                    kept_in = %side.display(),
                    "a torn last record was cut off the log (a write the crash interrupted, never acknowledged); its bytes are kept in a side file"
                ),
                None => {}
            }
        }
        let generation = generations[index];
        let mut valid_len = log.valid_len;
        if let Some(records) = converted {
            valid_len =
                wal::rewrite_log(dir, index, count, generation, &records).map_err(storage)?;
            if consolidate[index] {
                // Its records are in the log now.
                let prev = wal::shard_prev_log_path(dir, index);
                std::fs::remove_file(&prev)
                    .map_err(|e| EngineError::Storage(format!("{}: {e}", prev.display())))?;
            }
            tracing::info!(
                path = %path.display(),
                from_version = log.version,
                records = records.len(),
                "log converted to this build's format"
            );
        }
        let (handle, thread) =
            wal::open_writer(dir, valid_len, index, count, generation, &config.durability)
                .map_err(storage)?;
        let resolved = state.resolve_pending(now_ms);
        if !resolved.is_empty() {
            tracing::warn!(
                shard = index,
                count = resolved.len(),
                "authorizations in flight at the crash declined as provider timeouts"
            );
            let mut records = wal::Records::with_capacity(generation, 0);
            resolved.iter().for_each(|envelope| records.push(&envelope.to_bytes()));
            let (reply, durable) = oneshot::channel();
            handle.submit(wal::Job::Records { records, reply, replies: Vec::new() });
            // Engine::start may run inside a Tokio runtime; the writer is its own OS thread, so
            // blocking on its answer here cannot deadlock.
            futures::executor::block_on(durable)
                .map_err(|_| EngineError::Storage(format!("{}: write failed", path.display())))?;
        }
        let shard_wal = ShardWal {
            handle,
            generation,
            since_snapshot: since_snapshot[index],
            snapshot_every: config.durability.snapshot_every_records,
            last_snapshot_bytes: Arc::default(),
            scratch: Default::default(),
        };
        prepared.states.push((state, Some(shard_wal)));
        prepared.wal_threads.push(thread);
    }
    let elapsed_ms = started.elapsed().as_millis() as u64;
    tracing::info!(
        records = replayed,
        snapshots_loaded_ms = loaded_ms,
        apply_cpu_ms,
        elapsed_ms,
        dir = %dir.display(),
        "recovered"
    );
    Ok(prepared)
}

/// Rebuilds the directory of stores from every shard's store index (see
/// [`crate::geo::rebuild_directory`]).
fn rebuild_store_directory(shared: &Shared, states: &mut [ShardState]) {
    let mut indexes: Vec<&mut crate::geo::StoreIndex> =
        states.iter_mut().map(|state| &mut state.stores).collect();
    crate::geo::rebuild_directory(&shared.stores, &mut indexes);
}

/// A shard's snapshot loaded, and the log after it read.
struct LoadedShard {
    /// The log's extent (`valid_len` 0 when it must start afresh).
    log: wal::ReadLog<Logged>,
    /// The log's records as commands, in order: what remains to replay (none once streamed).
    envelopes: Vec<Envelope>,
    /// Commands applied already, while the log was read ([`Reading::Stream`]). With
    /// `envelopes`, the records the log holds after the snapshot (those of the previous log
    /// too, when the two are rewritten as one): where the count toward the next snapshot starts.
    applied: usize,
    /// The CPU time the shard's thread spent applying commands while the log was read (zero
    /// when read whole): the replay's own cost, apart from waiting for the reader or the
    /// machine's other load.
    apply_cpu: std::time::Duration,
    /// The records to rewrite the log with, encoded while they were applied (a previous log
    /// and the log joined, read as a stream).
    rewrite: Option<Vec<rkyv::util::AlignedVec>>,
    /// The generation to keep writing.
    generation: u64,
    /// Whether `envelopes` joins the previous log and the log (a snapshot cut short): they are
    /// rewritten as one log before anything is appended.
    consolidate: bool,
    /// Whether a previous log older than the snapshot is there, to remove.
    stale_prev: bool,
}

/// The CPU time the calling thread has used (zero where the system does not tell).
fn thread_cpu() -> std::time::Duration {
    #[cfg(target_os = "linux")]
    {
        let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `now` is a valid timespec to write; the clock ID is a constant Linux has.
        if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) } == 0 {
            return std::time::Duration::new(now.tv_sec as u64, now.tv_nsec as u32);
        }
    }
    std::time::Duration::ZERO
}

/// Lowers the calling thread's priority below the shards' (nice 10, on Linux): a replay's
/// helpers (its log's reader, its registry writer) need less than a core between them, and
/// must not take the shard's, whose thread is the replay's critical path.
fn yield_to_shards() {
    #[cfg(target_os = "linux")]
    // SAFETY: `gettid` has no preconditions; `setpriority` on this thread only lowers its own
    // priority, which any thread may do (a refusal is harmless: the thread keeps its own).
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10);
    }
}

/// A thread builder with `name` (what a profiler or `top -H` shows).
fn named(name: String) -> std::thread::Builder {
    std::thread::Builder::new().name(name)
}

/// How recovery reads the shards' logs.
#[derive(Debug, Clone, Copy)]
enum Reading {
    /// Every log is of a format whose commands all carry what they read outside their shard
    /// ([`RESOLVED_FORMAT`] on): each shard applies its log while a thread of its own reads it,
    /// mapped in place (`map`, recovery) or read into memory first (a reader beside a running
    /// engine, which must not map a file it does not own).
    Stream { map: bool },
    /// Some log is older: every log is read whole first, then the shards replay in time order
    /// ([`replay`]).
    Whole,
}

/// The first log format whose every command carries what it reads outside its shard (format 8
/// had such commands too, but a log converted from an older format could hold some without).
const RESOLVED_FORMAT: u16 = 9;

/// Commands handed from a log's reader to the shard applying them, at a time.
const REPLAY_CHUNK: usize = 1024;

/// Chunks kept to be filled again at most (the reader runs ahead of the shard by more only
/// while a snapshot loads, and then allocates).
const CHUNKS_RECYCLED: usize = 64;

/// How recovery reads the logs in `dir`: streamed if every log and previous log is missing or
/// of [`RESOLVED_FORMAT`] on (a header that cannot be read is left for the reading to report).
fn reading_for(dir: &std::path::Path, count: usize, map: bool) -> Reading {
    let resolved = |path: std::path::PathBuf, index: usize| {
        matches!(
            wal::read_log_header(&path, index, count),
            Ok(None) | Ok(Some((RESOLVED_FORMAT.., _)))
        )
    };
    let all = (0..count).all(|index| {
        resolved(wal::shard_log_path(dir, index), index)
            && resolved(wal::shard_prev_log_path(dir, index), index)
    });
    if all {
        Reading::Stream { map }
    } else {
        Reading::Whole
    }
}

/// Loads shard `index`'s snapshot into `state` and reads the log that follows it: applied to
/// `state` as it is read ([`Reading::Stream`]), or returned to replay ([`Reading::Whole`]).
fn load_shard(
    dir: &std::path::Path,
    index: usize,
    count: usize,
    state: &mut ShardState,
    reading: Reading,
) -> Result<LoadedShard, EngineError> {
    let storage = |e: StorageError| EngineError::Storage(e.to_string());
    let snapshot_path = wal::shard_snapshot_path(dir, index);
    let log_path = wal::shard_log_path(dir, index);
    let prev_path = wal::shard_prev_log_path(dir, index);
    let header = match reading {
        Reading::Stream { .. } => wal::read_log_header(&log_path, index, count).map_err(storage)?,
        Reading::Whole => None,
    };
    // The log is read (and checked) on its own thread while the snapshot loads: for a shard
    // whose log is long, the two together take as long as the longer one. Streamed, its
    // commands come in chunks, applied once the snapshot is in place while the rest is read.
    let vault = Arc::clone(&state.shared.vault);
    let (chunks, applying) = crossbeam::channel::unbounded::<Vec<Envelope>>();
    // Chunks applied go back to the reader to be filled again: a chunk is a large allocation,
    // and freeing one makes the allocator hand its pages back to the system and fault them in
    // again.
    let (recycle, recycled) = crossbeam::channel::bounded::<Vec<Envelope>>(CHUNKS_RECYCLED);
    std::thread::scope(|scope| {
        let (log_path, vault) = (&log_path, &vault);
        let log_reader = named(format!("sg-log-read-{index}"));
        let log_reader = log_reader.spawn_scoped(scope, move || match reading {
            Reading::Whole => read_commands(log_path, index, count, vault),
            Reading::Stream { map } => {
                // It runs beside the shard applying what it reads.
                yield_to_shards();
                stream_commands(log_path, (index, count), vault, map, (chunks, recycled))
                    .map(|log| (log, Vec::new()))
            }
        });
        let log_reader = log_reader.expect("a log reader thread starts");
        let prev_path = &prev_path;
        let prev_reader = scope.spawn(move || read_commands(prev_path, index, count, vault));
        let snapshot = snapshot::read(&snapshot_path, index, count).map_err(storage);
        let restored = match &snapshot {
            Ok(Some((_, snap))) => restore(snap, state, &snapshot_path),
            _ => Ok(()),
        };
        let prev = prev_reader.join().expect("log reader panicked");
        let mut log_reader = Some(log_reader);
        let whole = match reading {
            Reading::Whole => log_reader.take().map(|r| r.join().expect("log reader panicked")),
            Reading::Stream { .. } => None,
        };
        let log_generation = match &whole {
            Some(Ok((log, _))) => log.generation,
            Some(Err(_)) => None,
            None => header.map(|(_, generation)| generation),
        };
        let paths = (snapshot_path.as_path(), log_path.as_path(), prev_path.as_path());
        let plan = plan_replay(paths, snapshot, restored, prev, log_generation);
        match whole {
            Some(log) => {
                let plan = plan?;
                let (mut log, mut envelopes) = log?;
                plan.settle(&mut log);
                if !plan.keep_log {
                    envelopes.clear();
                }
                let (generation, mut all) = (plan.generation, plan.prev_envelopes);
                all.append(&mut envelopes);
                Ok(LoadedShard {
                    log,
                    envelopes: all,
                    applied: 0,
                    apply_cpu: std::time::Duration::ZERO,
                    rewrite: None,
                    generation,
                    consolidate: plan.prev_needed,
                    stale_prev: plan.stale_prev,
                })
            }
            None => {
                let mut plan = match plan {
                    Ok(plan) => plan,
                    Err(error) => {
                        // Stops the reader at its next chunk.
                        drop(applying);
                        return Err(error);
                    }
                };
                // Joined with the log, the previous one is rewritten with it (`recover_shards`).
                let mut rewrite = plan.prev_needed.then(Vec::new);
                let mut prev = std::mem::take(&mut plan.prev_envelopes);
                let cpu_before = thread_cpu();
                // The commands' writes to the shared registries (device keys, sealed card
                // numbers) are made in order by a thread of their own while the shard applies
                // the commands that follow (nothing a command does reads them back), and the
                // replies nobody reads are dropped there, their memory freed off the shard's
                // thread. It is not joined: it says when it is done, then ends (handing what it
                // freed back to the system) while recovery goes on.
                let (writes, to_write) =
                    crossbeam::channel::unbounded::<(Vec<RegistryWrite>, Vec<Reply>)>();
                let (done, written) = crossbeam::channel::bounded::<()>(1);
                let shared = state.shared.clone();
                let writer = named(format!("sg-registry-{index}")).spawn(move || {
                    yield_to_shards();
                    for (batch, replies) in to_write {
                        batch.into_iter().for_each(|write| write.apply(&shared));
                        drop(replies);
                    }
                    let _ = done.send(());
                });
                writer.expect("a registry writer thread starts");
                state.defer_registry(true);
                state.idem.prefault();
                let mut replies = Vec::with_capacity(REPLAY_CHUNK);
                let mut apply = |state: &mut ShardState, envelopes: &mut Vec<Envelope>| {
                    let keep = |reply| replies.push(reply);
                    let applied = apply_keeping(state, envelopes, &mut rewrite, keep);
                    let batch = std::mem::take(state.deferred.as_mut().expect("deferred"));
                    let replies = std::mem::replace(&mut replies, Vec::with_capacity(REPLAY_CHUNK));
                    let sent = writes.send((batch, replies));
                    sent.expect("the registry writer runs until told to stop");
                    applied
                };
                let mut applied = apply(state, &mut prev);
                for mut chunk in applying {
                    // A log older than the snapshot is still read whole (and checked), not
                    // applied.
                    if plan.keep_log {
                        applied += apply(state, &mut chunk);
                    }
                    chunk.clear();
                    let _ = recycle.try_send(chunk);
                }
                state.defer_registry(false);
                drop(writes);
                // An error: the writer panicked, and its panic is reported.
                written.recv().map_err(|_| {
                    EngineError::Storage("the registry writer of a replay failed".to_owned())
                })?;
                let apply_cpu = thread_cpu().saturating_sub(cpu_before);
                let reader = log_reader.expect("streamed, so not joined yet");
                let (mut log, _) = reader.join().expect("log reader panicked")?;
                plan.settle(&mut log);
                Ok(LoadedShard {
                    log,
                    envelopes: Vec::new(),
                    applied,
                    apply_cpu,
                    rewrite,
                    generation: plan.generation,
                    consolidate: plan.prev_needed,
                    stale_prev: plan.stale_prev,
                })
            }
        }
    })
}

/// Applies `envelopes` to `state` in order, each encoded into `rewrite` first if given, while
/// the idempotency records of those a few ahead are brought into the cache. Returns how many.
fn apply_in_order(
    state: &mut ShardState,
    envelopes: &mut Vec<Envelope>,
    rewrite: &mut Option<Vec<rkyv::util::AlignedVec>>,
) -> usize {
    apply_keeping(state, envelopes, rewrite, drop)
}

/// [`apply_in_order`], each command's reply handed to `discard` (nobody reads a replay's
/// replies: a caller may drop them elsewhere).
fn apply_keeping(
    state: &mut ShardState,
    envelopes: &mut Vec<Envelope>,
    rewrite: &mut Option<Vec<rkyv::util::AlignedVec>>,
    mut discard: impl FnMut(Reply),
) -> usize {
    /// How far ahead: enough for a miss to arrive before its command is applied.
    const AHEAD: usize = 8;
    let count = envelopes.len();
    envelopes.iter().take(AHEAD).for_each(|envelope| state.prefetch(envelope));
    let mut envelopes = envelopes.drain(..);
    while let Some(envelope) = envelopes.next() {
        if let Some(ahead) = envelopes.as_slice().get(AHEAD - 1) {
            state.prefetch(ahead);
        }
        if let Some(rewrite) = rewrite {
            rewrite.push(envelope.to_bytes());
        }
        discard(state.replay(envelope));
    }
    count
}

/// What to replay after a shard's snapshot: decided from the snapshot, the previous log and
/// the log's generation.
struct ReplayPlan {
    /// The generation to keep writing.
    generation: u64,
    /// Whether the previous log is replayed first (a snapshot cut short).
    prev_needed: bool,
    /// The previous log's commands (empty unless needed).
    prev_envelopes: Vec<Envelope>,
    /// Whether the log follows the snapshot; if not, it starts afresh.
    keep_log: bool,
    /// Whether a previous log older than the snapshot is there, to remove.
    stale_prev: bool,
}

impl ReplayPlan {
    /// The log's extent as the plan has it: of the snapshot's generation when the previous log
    /// joins it, and empty (started afresh) when the snapshot covers it.
    fn settle(&self, log: &mut wal::ReadLog<Logged>) {
        if self.prev_needed {
            log.generation = Some(self.generation);
        }
        if !self.keep_log {
            log.valid_len = 0;
            log.torn_bytes = 0;
        }
    }
}

/// Decides what follows shard's `snapshot` (`restored` into its state, or why not): the
/// previous log `prev` first or not, and the log of generation `log_generation` or not.
fn plan_replay(
    (snapshot_path, log_path, prev_path): (&std::path::Path, &std::path::Path, &std::path::Path),
    snapshot: Result<Option<(u64, snapshot::Snapshot)>, EngineError>,
    restored: Result<(), EngineError>,
    prev: Result<(wal::ReadLog<Logged>, Vec<Envelope>), EngineError>,
    log_generation: Option<u64>,
) -> Result<ReplayPlan, EngineError> {
    let (prev, prev_envelopes) = prev?;
    // The previous log (`wal::rotate`) is needed when the snapshot that was to cover it is not
    // in place: it follows the snapshot there is (or none), and the log is missing (a crash
    // between the rename and the new log) or of the next generation. Otherwise it is older
    // than the snapshot, and removed.
    let base = snapshot.as_ref().ok().and_then(|s| s.as_ref()).map_or(0, |(g, _)| *g);
    let prev_needed = prev.generation == Some(base)
        && match log_generation {
            None => true,
            Some(generation) => generation == base + 1,
        };
    // A previous log older than the snapshot is removed by recovery (`recover_shards`), never
    // here: a replay of a live directory (`replay_shard`) writes nothing.
    let stale_prev = prev.generation.is_some() && !prev_needed;
    let prev_envelopes = if prev_needed {
        if prev.torn_bytes > 0 {
            // It was synced whole before its rename: a short one is not a torn write.
            return Err(EngineError::Storage(format!(
                "{}: the previous log ends in a torn record",
                prev_path.display()
            )));
        }
        tracing::warn!(
            path = %prev_path.display(),
            records = prev_envelopes.len(),
            "a snapshot was cut short by a crash: the log it was to cover is replayed"
        );
        // Replayed first, then rewritten with the log's records as one log of the snapshot's
        // generation (`recover_shards`), before the previous log is removed.
        prev_envelopes
    } else {
        Vec::new()
    };
    // With the previous log replayed first, the log follows it as one log of the snapshot's
    // generation.
    let log_generation = if prev_needed { Some(base) } else { log_generation };
    let plan = |generation, keep_log| ReplayPlan {
        generation,
        prev_needed,
        prev_envelopes,
        keep_log,
        stale_prev,
    };
    let Some((snapshot_generation, snap)) = snapshot? else {
        return match log_generation {
            None | Some(0) => Ok(plan(0, true)),
            Some(generation) => Err(EngineError::Storage(format!(
                "{}: log generation {generation} follows a snapshot, but {} is missing",
                log_path.display(),
                snapshot_path.display()
            ))),
        };
    };
    restored?;
    // The payload is no longer needed: free it before the replay allocates.
    drop(snap);
    match log_generation {
        Some(generation) if generation == snapshot_generation => Ok(plan(snapshot_generation, true)),
        Some(generation) if generation > snapshot_generation => Err(EngineError::Storage(format!(
            "{}: log generation {generation} is newer than snapshot generation {snapshot_generation}: a newer snapshot is missing",
            log_path.display()
        ))),
        // No log, or an older one that the snapshot already covers (a crash between writing
        // the snapshot and starting the new log): start the log afresh.
        _ => Ok(plan(snapshot_generation, false)),
    }
}

/// Reads a shard's log and turns its records into commands (opening the keys they carry
/// sealed), so that the replay, which must run shard by shard in time order, only applies.
fn read_commands(
    path: &std::path::Path,
    index: usize,
    count: usize,
    vault: &Vault,
) -> Result<(wal::ReadLog<Logged>, Vec<Envelope>), EngineError> {
    let mut log = wal::read_records::<Logged>(path, index, count)
        .map_err(|e| EngineError::Storage(e.to_string()))?;
    let records = std::mem::take(&mut log.records);
    let mut commands = Commands { vault, key_checked: false };
    let envelopes = records
        .into_iter()
        .enumerate()
        .map(|(i, record)| {
            commands
                .of(record)
                .map_err(|e| EngineError::Storage(format!("{}: record {i}: {e}", path.display())))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((log, envelopes))
}

/// Turns a log's records into commands, and checks the first device key one carries against
/// the vault key (`Command::check_key`).
struct Commands<'a> {
    vault: &'a Vault,
    key_checked: bool,
}

impl Commands<'_> {
    fn of(&mut self, record: Logged) -> Result<Envelope, RecordError> {
        let envelope = record.into_envelope(self.vault)?;
        if !self.key_checked {
            self.key_checked = envelope.command.check_key(self.vault)?;
        }
        Ok(envelope)
    }
}

/// Reads shard `index` of `count`'s log of [`RESOLVED_FORMAT`] on, sending its commands to
/// `chunks` [`REPLAY_CHUNK`] at a time (filling again those that come back on `recycled`);
/// stops early once nobody receives them. Returns the log's extent (its `records` empty).
fn stream_commands(
    path: &std::path::Path,
    (index, count): (usize, usize),
    vault: &Vault,
    map: bool,
    (chunks, recycled): (
        crossbeam::channel::Sender<Vec<Envelope>>,
        crossbeam::channel::Receiver<Vec<Envelope>>,
    ),
) -> Result<wal::ReadLog<Logged>, EngineError> {
    let storage = |e: StorageError| EngineError::Storage(e.to_string());
    let bytes =
        if map { wal::map_log(path) } else { wal::read_log_bytes(path) }.map_err(storage)?;
    let corrupt = |offset: u64, detail: String| StorageError::Corrupt {
        path: path.to_owned(),
        offset,
        detail,
    };
    let mut chunk = Vec::with_capacity(REPLAY_CHUNK);
    let mut stopped = false;
    let mut commands = Commands { vault, key_checked: false };
    let log = wal::parse_records_with::<Logged>(path, &bytes, index, count, |offset, record| {
        let envelope = commands.of(record).map_err(|e| corrupt(offset, e.to_string()))?;
        if !envelope.command.is_resolved() {
            let detail = "a command without what it read outside its shard, in a log whose \
                          format promises it"
                .to_owned();
            return Err(corrupt(offset, detail));
        }
        chunk.push(envelope);
        if chunk.len() == REPLAY_CHUNK {
            let empty = recycled.try_recv().unwrap_or_else(|_| Vec::with_capacity(REPLAY_CHUNK));
            let full = std::mem::replace(&mut chunk, empty);
            if chunks.send(full).is_err() {
                stopped = true;
                return Err(corrupt(offset, "recovery stopped".to_owned()));
            }
        }
        Ok(())
    });
    if stopped {
        // Nobody applies the rest: recovery failed on something else, and reports that.
        return Err(EngineError::Storage(format!("{}: reading stopped", path.display())));
    }
    let log = log.map_err(storage)?;
    if !chunk.is_empty() {
        let _ = chunks.send(chunk);
    }
    Ok(log)
}

fn restore(
    snap: &snapshot::Snapshot,
    state: &mut ShardState,
    path: &std::path::Path,
) -> Result<(), EngineError> {
    snap.restore(state).map_err(|e| EngineError::Storage(format!("{}: {e}", path.display())))
}

/// Applies every shard's commands read whole ([`Reading::Whole`]). A command of format
/// version 8 or later carries all it reads outside its shard, so when every command does, each
/// shard replays its own log on a thread of its own, in parallel. Records older than that lack
/// some of it (whether an IDm or a store's signals were free, a store terminal's registry
/// entry); while any log holds one, the shards replay on one thread, interleaved by the
/// commands' timestamps so that cross-shard effects (a device IDm claimed first) replay as they
/// happened, and what such a command lacks is resolved from the registries just before it is
/// applied. The commands of each shard whose `encode` is set are encoded as they are applied,
/// resolved (to rewrite its log in this build's format). Returns the number of commands
/// applied, and the encoded records.
fn replay(
    states: &mut [ShardState],
    logs: Vec<Vec<Envelope>>,
    encode: &[bool],
) -> (usize, Vec<Option<Vec<rkyv::util::AlignedVec>>>) {
    let applied = logs.iter().map(Vec::len).sum();
    let mut encoded: Vec<_> = encode.iter().map(|&e| e.then(Vec::new)).collect();
    if logs.iter().flatten().all(|envelope| envelope.command.is_resolved()) {
        std::thread::scope(|scope| {
            for ((state, log), encoded) in states.iter_mut().zip(logs).zip(&mut encoded) {
                scope.spawn(move || apply_in_order(state, &mut { log }, encoded));
            }
        });
        return (applied, encoded);
    }
    let mut logs: Vec<_> = logs.into_iter().map(|log| log.into_iter().peekable()).collect();
    loop {
        let next = (0..logs.len())
            .filter_map(|i| logs[i].peek().map(|envelope| (envelope.now_ms, i)))
            .min();
        let Some((_, shard)) = next else { return (applied, encoded) };
        let mut envelope = logs[shard].next().expect("peeked");
        envelope.command.resolve(&states[shard].shared, envelope.now_ms);
        if let Some(encoded) = &mut encoded[shard] {
            encoded.push(envelope.to_bytes());
        }
        states[shard].replay(envelope);
    }
}

/// Rebuilds shard `index` alone from its snapshot and log (see [`crate::replay_shard`]):
/// nothing is written to the data directory. Returns the state and the records applied.
pub(crate) fn replay_one(
    config: &EngineConfig,
    shared: &Shared,
    state_config: StateConfig,
    index: usize,
    journaled: bool,
) -> Result<(ShardState, usize), EngineError> {
    let storage = |e: StorageError| EngineError::Storage(e.to_string());
    let Some(dir) = &config.durability.data_dir else {
        return Err(EngineError::Config(
            "replaying a shard needs engine.durability.data_dir".into(),
        ));
    };
    let count = config.shard_count_in_force().map_err(storage)?;
    if index >= count {
        return Err(EngineError::Config(format!(
            "shard {index} does not exist: the data directory has {count} shards"
        )));
    }
    // A running server may finish a snapshot while the files are read (its snapshot, previous
    // log and log read at slightly different moments): a view that does not fit together is
    // read again.
    // Read into memory, never mapped: the running engine owns the files.
    let reading = reading_for(dir, count, false);
    let mut attempts = 0;
    let (state, loaded) = loop {
        let mut state = ShardState::new(index as u8, shared.clone(), state_config);
        state.money.journal = journaled.then(Vec::new);
        match load_shard(dir, index, count, &mut state, reading) {
            Ok(loaded) => break (state, loaded),
            Err(EngineError::Storage(_)) if attempts < 20 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(error) => return Err(error),
        }
    };
    let mut states = [state];
    let (applied, _) = replay(&mut states, vec![loaded.envelopes], &[false]);
    let [state] = states;
    Ok((state, applied + loaded.applied))
}

pub(crate) fn start_shards(
    config: &EngineConfig,
    prepared: Prepared,
) -> Result<(Vec<ShardHandle>, ActorRuntime), EngineError> {
    let mailbox_capacity = config.mailbox_capacity;
    let states = prepared.states;
    let gate = prepared.gate;
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name("settlegate-actors".into())
        .spawn(move || {
            let system = System::new();
            let (arbiters, addrs): (Vec<Arbiter>, Vec<ShardHandle>) = system.block_on(async move {
                states
                    .into_iter()
                    .map(|(state, wal)| {
                        let arbiter = Arbiter::new();
                        let core = ShardCore::new(state, wal, gate.clone());
                        let shard = ShardHandle::start(&arbiter.handle(), core, mailbox_capacity);
                        (arbiter, shard)
                    })
                    .unzip()
            });
            let _ = tx.send((addrs, System::current()));
            let _ = system.run();
            for arbiter in arbiters {
                arbiter.stop();
                let _ = arbiter.join();
            }
        })
        .map_err(|e| EngineError::Config(format!("cannot start actor thread: {e}")))?;
    let (addrs, system) =
        rx.recv().map_err(|_| EngineError::Config("actor system failed to start".into()))?;
    Ok((addrs, ActorRuntime { system, thread: Some(thread), wal_threads: prepared.wal_threads }))
}
