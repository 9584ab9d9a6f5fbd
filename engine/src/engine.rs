//! The engine handle: starts the shard actors and offers every operation as an async call.
//!
//! A request's path: stateless checks (decode, keyed-hash verification, batched across cores)
//! on the caller's side, then the owning shard's checks and state change, then the provider
//! adapter, then the shard again to record the outcome, then the user's notice stream.

use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::dev::SendError;
use futures::future::join_all;
use rustc_hash::FxHasher;
use tokio::sync::{broadcast, oneshot};
use tokio::time::Instant;

use crate::age::{AgePolicy, AgeRecord, AgeRules, AgeVerdict, Basket};
use crate::clock::{Clock, SystemClock};
use crate::cluster::{Cluster, PartitionStatus};
use crate::codes::{self, CodeKey, CodeKind, CodePayload, CouponEffect};
use crate::config::EngineConfig;
use crate::error::EngineError;
use crate::geo::{self, AcceptedMethod, Candidate, Signal, Store, StoreDirectory};
use crate::ids::{AddMeansOptions, ProviderCode, RequestId};
use crate::keys::{DeviceIndex, DeviceKey, NewDeviceKey, Verified};
use crate::limits::STORE_RADIUS_MAX_M;
use crate::limits::{BATCH_SIZE_MAX, VERIFY_PARALLEL_MIN};
use crate::limits::{
    CODE_VALIDITY_MAX_MS, CODE_VALIDITY_MIN_MS, COUPON_USERS_MAX, ORDER_REF_LEN_MAX, SALE_ITEMS_MAX,
};
use crate::means::MeansInput;
use crate::notices::{DeliveryNotice, DeviceMessage};
use crate::notices::{Notice, Notices};
use crate::password::PasswordHasher;
use crate::providers::{Registry, TerminalConfirmation, TerminalEntry};
use crate::shard::state::{
    terminal_policies, Balance, CodeSpec, CodeState, Dispatch, IssuedCode, IssuedCoupon, MeansView,
    RedeemSpec, Redemption, Shared, StateConfig, TerminalContext,
};
use crate::shard::{
    AddedMeans, Batch, CodeCompletion, CodeRequest, CodeView, Command, Completion, Credentials,
    Delivery, Digest, Envelope, FlowReply, IssuedKey, KeptPlace, Op, Payment, Query, Reply,
    ShardHandle, Sizes, Swept, Turn,
};
use crate::startup::{build_registry, recover_shards, start_shards, stop_runtime, ActorRuntime};
use crate::types::{AuthOutcome, ClientRequestId, Currency, Idm, ReasonCode, UserKey};
use crate::vault::Vault;
use settlegate_types::histogram::HistogramSnapshot;

mod accounts;
mod age;
mod money;
mod payment_codes;
mod providers;
mod settlement;
mod stores;
mod wallet;

pub use accounts::{DeviceCredential, EnrollRequest, MeansAdded, MeansOrder};
pub use money::{CodeRefunded, CodeVoided, ForwardRound, OwedQueue};
pub use payment_codes::{CodeOutcome, IssueCodeRequest, RedeemRequest, SaleLines};
pub use settlement::{AuthorizeRequest, Authorizing, BasketOutcome, Standing};
pub use stores::EnteredStore;
pub use wallet::{BestBy, MethodAtStore, UsableMethods, UsableQuery};

struct Inner {
    shards: Vec<ShardHandle>,
    shared: Shared,
    notices: Notices,
    clock: Arc<dyn Clock>,
    hasher: PasswordHasher,
    /// A PHC string verified against when the user is unknown, so a login for an unknown
    /// user takes as long as one for a known user (no user enumeration by timing).
    dummy_phc: String,
    config: EngineConfig,
    runtime: Mutex<Option<ActorRuntime>>,
    /// This node's membership of a cluster (`[cluster]`); none for a single node.
    cluster: Option<Cluster>,
    /// The forwarder's memory between rounds ([`Engine::forward_owed`]).
    forwarding: Mutex<money::Forwarding>,
}

impl Inner {
    /// Stops the shard actors (joining their threads: blocking), then the cluster's tasks.
    fn stop(&self) {
        stop_runtime(&self.runtime, &self.shards);
        if let Some(cluster) = &self.cluster {
            cluster.stop();
        }
    }
}

impl Drop for Inner {
    /// The last [`Engine`] dropped stops the engine. Stopping joins the shard threads, so
    /// inside a Tokio runtime it is moved to the runtime's blocking pool (the executor's
    /// thread is not held up); outside one it happens here.
    fn drop(&mut self) {
        let runtime =
            self.runtime.get_mut().map(Option::take).unwrap_or_else(|e| e.into_inner().take());
        let Some(runtime) = runtime else {
            // Stopped already ([`Engine::shutdown`]).
            if let Some(cluster) = &self.cluster {
                cluster.stop();
            }
            return;
        };
        let shards = std::mem::take(&mut self.shards);
        let cluster = self.cluster.take();
        let stop = move || {
            stop_runtime(&Mutex::new(Some(runtime)), &shards);
            if let Some(cluster) = &cluster {
                cluster.stop();
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => drop(handle.spawn_blocking(stop)),
            Err(_) => stop(),
        }
    }
}

/// A shard's load ([`Engine::shard_loads`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ShardLoad {
    /// Batches waiting in its mailbox.
    pub queued: usize,
    /// Batches refused `BUSY` since start.
    pub busy: u64,
    /// Its log writer's fsyncs, in seconds (none without a local log).
    pub fsync: Option<HistogramSnapshot>,
    /// Records per group commit of its log writer (none without a local log).
    pub group_records: Option<HistogramSnapshot>,
}

/// A provider's standing ([`Engine::provider_states`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderState {
    /// Its code.
    pub code: u32,
    /// Its name.
    pub name: String,
    /// Calls in flight now.
    pub in_flight: usize,
    /// Its adapter's link; none for an adapter without one (the simulator).
    pub health: Option<settlegate_adapters::ProviderHealth>,
    /// How long its calls took, in seconds.
    pub latency: HistogramSnapshot,
}

/// The embeddable engine. Cheap to clone; all clones share one set of shards.
///
/// Its async methods need a Tokio runtime (timers bound provider calls; password hashing runs
/// on Tokio's blocking pool). The shard actors run on their own threads.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Starts an engine on the system clock.
    pub fn start(config: EngineConfig) -> Result<Engine, EngineError> {
        Engine::start_with_clock(config, Arc::new(SystemClock))
    }

    /// Starts an engine reading time from `clock`.
    pub fn start_with_clock(
        config: EngineConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Engine, EngineError> {
        Engine::start_with(config, clock, Vec::new())
    }

    /// Test hook: starts an engine whose providers named in `adapters` are served by the
    /// adapter given there instead of the one their config names (a test's provider that
    /// answers when the test says).
    #[cfg(feature = "test-hooks")]
    pub fn start_with_adapters(
        config: EngineConfig,
        clock: Arc<dyn Clock>,
        adapters: Vec<(u32, Arc<dyn settlegate_adapters::ProviderAdapter>)>,
    ) -> Result<Engine, EngineError> {
        Engine::start_with(config, clock, adapters)
    }

    fn start_with(
        config: EngineConfig,
        clock: Arc<dyn Clock>,
        adapters: Vec<(u32, Arc<dyn settlegate_adapters::ProviderAdapter>)>,
    ) -> Result<Engine, EngineError> {
        let (shared, state_config, hasher) = prepare(&config, adapters)?;
        let mut prepared = recover_shards(&config, &shared, state_config, clock.now_ms())?;
        let joining = match &config.cluster {
            Some(cluster) => {
                let partitions = prepared.replicate(cluster);
                let vault = Arc::clone(&shared.vault);
                let mut joining = Cluster::connect(cluster.clone(), partitions, vault)?;
                joining.restore(&mut prepared, &shared)?;
                Some(joining)
            }
            None => None,
        };
        let (shards, runtime) = start_shards(&config, prepared)?;
        let cluster =
            joining.map(|joining| joining.run(shards.iter().map(ShardHandle::replica).collect()));
        let dummy_phc = hasher.hash("settlegate-timing-equalizer");
        Ok(Engine {
            inner: Arc::new(Inner {
                shards,
                shared,
                notices: Notices::default(),
                clock,
                hasher,
                dummy_phc,
                config,
                runtime: Mutex::new(Some(runtime)),
                cluster,
                forwarding: Mutex::default(),
            }),
        })
    }

    /// Stops the engine: its shard actors finish the batch they are applying, their logs are
    /// flushed, and their threads are joined. Requests after this fail with
    /// [`EngineError::Stopped`]. The blocking part runs on Tokio's blocking pool, so awaiting
    /// this does not hold up the executor. Calling it again does nothing.
    ///
    /// Dropping the last clone of an [`Engine`] also stops it (in the background when inside a
    /// Tokio runtime); call this to know when it has stopped (before opening its data
    /// directory again, say).
    pub async fn shutdown(&self) {
        let engine = self.clone();
        if let Err(error) = tokio::task::spawn_blocking(move || engine.shutdown_blocking()).await {
            if error.is_panic() {
                std::panic::resume_unwind(error.into_panic());
            }
            // The runtime is shutting down and refused the task: stop here instead.
            self.shutdown_blocking();
        }
    }

    /// [`Engine::shutdown`] for a caller outside an async context: blocks the calling thread
    /// until the engine has stopped. Do not call it on an async executor's thread.
    pub fn shutdown_blocking(&self) {
        self.inner.stop();
    }

    /// The shards that take no more work: stopped (after [`Engine::shutdown`]), or whose log
    /// writer failed (a write or sync error: nothing more may be acknowledged). A server is
    /// ready only while this is empty. A shard that panics is not listed for long: the process
    /// aborts (see `docs/ARCHITECTURE.md`, "Failing fast").
    pub fn unavailable_shards(&self) -> Vec<usize> {
        (0..self.inner.shards.len()).filter(|&i| !self.inner.shards[i].is_available()).collect()
    }

    /// Each shard's load: batches waiting in its mailbox, and batches refused `BUSY` (its
    /// mailbox full) since start.
    pub fn shard_loads(&self) -> Vec<ShardLoad> {
        use std::sync::atomic::Ordering::Relaxed;
        let load = |s: &ShardHandle| ShardLoad {
            queued: s.queued.load(Relaxed),
            busy: s.busy.load(Relaxed),
            fsync: s.wal_stats.as_ref().map(|w| w.fsync.snapshot()),
            group_records: s.wal_stats.as_ref().map(|w| w.group_records.snapshot()),
        };
        self.inner.shards.iter().map(load).collect()
    }

    /// Each provider's calls in flight and the state of its adapter's link, in code order.
    pub fn provider_states(&self) -> Vec<ProviderState> {
        let registry = self.registry();
        let state = |p: &crate::providers::Provider| ProviderState {
            code: p.code,
            name: p.name.clone(),
            in_flight: p.adapter.in_flight(),
            health: p.adapter.health(),
            latency: p.adapter.latency(),
        };
        registry
            .codes()
            .into_iter()
            .filter_map(|c| registry.provider(c).map(|p| state(p)))
            .collect()
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.inner.shards.len()
    }

    /// The config in force.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// The providers.
    pub fn registry(&self) -> &Registry {
        &self.inner.shared.registry
    }

    /// The device key index (batch tag verification without the rest of the path).
    pub fn devices(&self) -> &DeviceIndex {
        &self.inner.shared.devices
    }

    /// The card vault (for adapters that must detokenize).
    pub fn vault(&self) -> &Arc<Vault> {
        &self.inner.shared.vault
    }

    /// The engine's clock reading.
    pub fn now_ms(&self) -> i64 {
        self.inner.clock.now_ms()
    }

    // ---- routing ------------------------------------------------------------------------

    /// The store terminal of a verified request, from the registry (see [`TerminalContext`]).
    fn terminal_context(&self, verified: &Verified, now_ms: i64) -> TerminalContext {
        let record = &verified.record;
        TerminalContext::resolve(
            &self.inner.shared.registry,
            record.provider_code,
            &record.terminal_id,
            now_ms,
        )
    }

    /// Claims `idm` for a device of `user` about to be provisioned ([`DeviceIndex::claim`]).
    fn claim_device(&self, idm: Idm, user: &UserKey) -> DeviceClaim<'_> {
        let devices = &self.inner.shared.devices;
        DeviceClaim { devices, idm, won: devices.claim(idm, user) }
    }

    fn shard_of(&self, owner_hash: u64) -> usize {
        shard_of_hash(owner_hash, self.inner.shards.len())
    }

    /// Each partition's standing on this node, when it is a cluster's node.
    pub fn cluster_status(&self) -> Option<Vec<PartitionStatus>> {
        self.inner.cluster.as_ref().map(Cluster::status)
    }

    /// Hands `partition`, owned by this cluster node, to node `to` (a planned move): requests
    /// for it are answered `BUSY` meanwhile, and `MOVED` to `to` after.
    pub async fn move_partition(&self, partition: usize, to: &str) -> Result<(), String> {
        match &self.inner.cluster {
            Some(cluster) => cluster.move_partition(partition, to).await,
            None => Err("not a cluster node".into()),
        }
    }

    /// Why a batch of `shard` got no replies: its partition moved to another node (its appends
    /// were refused, or it was never this node's), else the engine stopped.
    fn lost(&self, shard: usize) -> EngineError {
        match &self.inner.cluster {
            Some(cluster) => match cluster.partitions.admit(shard) {
                Err(refused) => refused,
                Ok(()) => EngineError::Stopped,
            },
            None => EngineError::Stopped,
        }
    }

    /// Admits `ops` to `shard` as one batch: applied on this thread if the shard is free, else
    /// kept back once and then queued ([`Submitted`]); refused as busy when the shard's mailbox
    /// is full.
    fn submit(&self, shard: usize, ops: Vec<Op>) -> Result<Submitted, EngineError> {
        if let Some(cluster) = &self.inner.cluster {
            cluster.partitions.admit(shard)?;
        }
        let (reply, receiver) = oneshot::channel();
        let handle = &self.inner.shards[shard];
        let batch = match handle.apply_if_idle(Batch { ops, reply, completion: false }) {
            Turn::Applied => return Ok(Submitted::applied(receiver)),
            Turn::Stopped => return Err(EngineError::Stopped),
            Turn::Queue(batch) => batch,
        };
        let place = match ShardHandle::applies_in_place(&batch) {
            true => handle.keep_back(self.inner.config.mailbox_capacity),
            false => None,
        };
        let Some(place) = place else {
            // Large, or as many admissions kept back as the mailbox holds: the mailbox.
            self.enqueue(shard, batch)?;
            return Ok(Submitted::applied(receiver));
        };
        Ok(Submitted::deferred(self.clone(), shard, batch, receiver, Some(place)))
    }

    /// Hands `batch` to `shard`'s mailbox: refused as busy when it is full, unless the batch
    /// is a completion (those are never refused: dropping one would lose an outcome).
    fn enqueue(&self, shard: usize, batch: Batch) -> Result<(), EngineError> {
        let handle = &self.inner.shards[shard];
        handle.queued.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if batch.completion {
            handle.addr.do_send(batch);
            return Ok(());
        }
        match handle.addr.try_send(batch) {
            Ok(()) => Ok(()),
            Err(SendError::Full(_)) => {
                handle.queued.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                handle.busy.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Err(EngineError::Busy { retry_after_ms: self.inner.config.busy_retry_after_ms })
            }
            Err(SendError::Closed(_)) => Err(EngineError::Stopped),
        }
    }

    /// As [`Engine::submit`], for work already admitted (completions, sweeps): never refused.
    fn submit_always(&self, shard: usize, ops: Vec<Op>) -> Submitted {
        let (reply, receiver) = oneshot::channel();
        if let Some(cluster) = &self.inner.cluster {
            // A completion for a partition this node no longer owns is not applied here (a
            // standby's state changes only by its stream): its reply is dropped, and its caller
            // answers MOVED. The new owner declined it at takeover.
            if !cluster.partitions.applies(shard, true) {
                return Submitted::applied(receiver);
            }
        }
        let handle = &self.inner.shards[shard];
        // A stopped shard drops the batch, and the receiver sees it closed.
        if let Turn::Queue(batch) = handle.apply_if_idle(Batch { ops, reply, completion: true }) {
            if ShardHandle::applies_in_place(&batch) {
                return Submitted::deferred(self.clone(), shard, batch, receiver, None);
            }
            let _ = self.enqueue(shard, batch);
        }
        Submitted::applied(receiver)
    }

    /// Applies or answers one `op` in `shard`, and takes its answer of type `T` out of the
    /// reply ([`Reply::into_flow`]).
    async fn call<T: FlowReply>(&self, shard: usize, op: Op) -> Result<T, EngineError> {
        let receiver = self.submit(shard, vec![op])?;
        let mut replies = receiver.await.map_err(|e| e.or_lost(self, shard))?;
        replies.pop().expect("one reply per op").into_flow()
    }

    /// Applies `command` in the shard of `owner_hash`, and takes its answer of type `T`.
    async fn apply_for<T: FlowReply>(
        &self,
        owner_hash: u64,
        client_request_id: Option<RequestId>,
        digest: u64,
        command: Command,
    ) -> Result<T, EngineError> {
        let client_request_id = client_request_id.map(RequestId::get);
        let envelope =
            Envelope { owner_hash, client_request_id, digest, now_ms: self.now_ms(), command };
        self.call(self.shard_of(owner_hash), Op::Apply(envelope)).await
    }

    async fn apply_for_user<T: FlowReply>(
        &self,
        user: &UserKey,
        client_request_id: Option<RequestId>,
        digest: u64,
        command: Command,
    ) -> Result<T, EngineError> {
        self.apply_for(user_hash(user), client_request_id, digest, command).await
    }

    /// Applies an idempotent change to a provider's state whose reply is done or a refusal.
    async fn change_provider(
        &self,
        provider_code: u32,
        client_request_id: RequestId,
        digest: u64,
        command: Command,
    ) -> Result<(), EngineError> {
        let owner_hash = digest_of(&("provider", provider_code));
        self.apply_for(owner_hash, Some(client_request_id), digest, command).await
    }

    async fn query_for_user<T: FlowReply>(
        &self,
        user: &UserKey,
        query: Query,
    ) -> Result<T, EngineError> {
        self.call(self.shard_of(user_hash(user)), Op::Query(query)).await
    }

    /// Providers' completions dropped since the engine started because the idempotency record
    /// they were for was gone (the count limit dropped it while its provider answered) or
    /// replaced (its client request ID used again after that): each such payment stands
    /// declined as a provider timeout, and a reversal of an approval among them is owed to its
    /// provider (store and forward), as after a crash. Each is also logged as a warning.
    pub fn completions_dropped(&self) -> u64 {
        self.inner.shared.completions_dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Users and idempotency records held by each shard.
    pub async fn shard_sizes(&self) -> Vec<(usize, usize)> {
        let sizes = join_all(self.inner.shards.iter().map(|s| s.addr.send(Sizes))).await;
        sizes.into_iter().map(|s| s.unwrap_or((0, 0))).collect()
    }

    /// Each shard's state digest, in shard order: a hash of everything the shard holds,
    /// independent of the order its maps were filled in (`shard/digest.rs`). Two copies of a
    /// shard with the same digest hold the same state; [`replay_shard`] computes it for a shard
    /// rebuilt from its own log alone. Each is taken in its shard's turn, after the commands
    /// applied before it. `None` for a shard that stopped.
    pub async fn shard_digests(&self) -> Vec<Option<u64>> {
        let digests = join_all(self.inner.shards.iter().map(|s| s.addr.send(Digest))).await;
        digests.into_iter().map(|d| d.ok().flatten()).collect()
    }

    /// Test hook: blocks the shard that owns `user` until the returned guard is dropped. It
    /// returns once the shard is blocked, so that every batch for it then goes to its mailbox.
    #[cfg(feature = "test-hooks")]
    pub fn stall_shard_of(&self, user: &UserKey) -> std::sync::mpsc::Sender<()> {
        let (release, stalled) = std::sync::mpsc::channel();
        let (held, holding) = std::sync::mpsc::channel();
        let shard = self.shard_of(user_hash(user));
        self.inner.shards[shard].addr.do_send(crate::shard::Stall(held, stalled));
        holding.recv().expect("the shard's actor runs");
        release
    }
}

/// An IDm claimed for a device being provisioned, held until its command is applied.
struct DeviceClaim<'a> {
    devices: &'a DeviceIndex,
    idm: Idm,
    /// Whether the IDm was free (the command carries it).
    won: bool,
}

impl DeviceClaim<'_> {
    /// Awaits the command's reply, then releases the claim if it was won (by then the device
    /// is in the index, or its provisioning was refused).
    async fn held_over<T>(
        self,
        reply: impl std::future::Future<Output = Result<T, EngineError>>,
    ) -> Result<T, EngineError> {
        let reply = reply.await;
        if self.won {
            self.devices.release(&self.idm);
        }
        reply
    }
}

/// Checks `config` and builds what the shards share (registry, indexes, vault) and the part of
/// the config they apply.
pub(crate) fn prepare(
    config: &EngineConfig,
    adapters: Vec<(u32, Arc<dyn settlegate_adapters::ProviderAdapter>)>,
) -> Result<(Shared, StateConfig, PasswordHasher), EngineError> {
    config.validate().map_err(EngineError::Config)?;
    let vault_key = match config.resolve_vault_key(None).map_err(EngineError::Config)? {
        Some(key) => *key.expose(),
        None if config.durability.data_dir.is_some() => {
            return Err(EngineError::Config(
                "a data directory needs a lasting vault key (set SETTLEGATE_VAULT_KEY, \
                 engine.vault_key_file or engine.vault.key_hex; embedded: \
                 EngineConfig::vault_key): what is logged is sealed with it"
                    .into(),
            ));
        }
        None => {
            tracing::warn!(
                "no vault key configured: using an ephemeral key; sealed card numbers \
                 will not survive a restart (set SETTLEGATE_VAULT_KEY, or EngineConfig::vault_key)"
            );
            *DeviceKey::random().expose()
        }
    };
    let vault = Arc::new(Vault::new(&vault_key));
    let registry = Arc::new(build_registry(config, &vault, adapters)?);
    let shared = Shared {
        devices: Arc::new(DeviceIndex::new(Arc::clone(&vault))),
        vault,
        registry,
        age: Arc::new(AgeRules::new(config.age.clone()).map_err(EngineError::Config)?),
        stores: Arc::new(StoreDirectory::default()),
        codes: Arc::new(CodeKey::derive(&vault_key)),
        code_issuer: config.code_issuer,
        completions_dropped: Arc::default(),
    };
    let state_config = StateConfig {
        timestamp_window_ms: config.timestamp_window_ms,
        key_grace_ms: config.key_grace_ms,
        login_failures_max: config.login_failures_max,
        lockout_ms: config.lockout_ms,
        idempotency_ttl_ms: config.idempotency_ttl_ms,
        idempotency_records_max: config.idempotency_records_max,
        owed_max: config.forwarding.owed_max_per_shard,
        refund_window_ms: config.forwarding.refund_window_ms.min(i64::MAX as u64) as i64,
        settled_max: config.forwarding.settled_max_per_shard,
    };
    let hasher = PasswordHasher::new(config.password).map_err(EngineError::Config)?;
    Ok((shared, state_config, hasher))
}

/// What [`replay_shard`] rebuilt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardReplay {
    /// The shard's index.
    pub shard: usize,
    /// Records applied from its log (after its snapshot, if any).
    pub records: usize,
    /// Its state digest ([`Engine::shard_digests`]).
    pub digest: u64,
}

/// Rebuilds shard `index` of the data directory in `config` from its own snapshot and log
/// alone, in this process, with no other shard loaded and nothing written (a torn tail is
/// skipped, not cut; stale files are left), and returns its digest: a replica rebuilding the
/// shard from its log reaches the state of the shard that wrote it. A log older than format
/// version 7 replays too, resolving what its records lack from the registries this shard alone
/// fills, so its digest may then differ from the engine's.
pub fn replay_shard(config: &EngineConfig, index: usize) -> Result<ShardReplay, EngineError> {
    let (shared, state_config, _) = prepare(config, Vec::new())?;
    let (state, records) = crate::startup::replay_one(config, &shared, state_config, index, false)?;
    Ok(ShardReplay { shard: index, records, digest: state.digest() })
}

fn declined(reason: ReasonCode) -> BasketOutcome {
    BasketOutcome { outcome: AuthOutcome::Declined(reason), verdict: None }
}

/// The routing hash of a geographic cell.
/// The shard, among `count`, of the requests of owner hash `hash`.
fn shard_of_hash(hash: u64, count: usize) -> usize {
    // Multiply-shift: uses the hash's high bits, which FxHash mixes best.
    ((hash as u128 * count as u128) >> 64) as usize
}

/// The shard (a cluster's partition), among `count`, that serves `user`'s requests: what a
/// router computes to send a request to its partition's owner (`docs/CLUSTER.md`).
pub fn shard_of_user(user: &UserKey, count: usize) -> usize {
    shard_of_hash(user_hash(user), count)
}

fn cell_hash(cell: u32) -> u64 {
    digest_of(&("cell", cell))
}

fn user_hash(user: &UserKey) -> u64 {
    digest_of(user)
}

/// A stable 64-bit digest (FxHash: deterministic across runs and machines).
fn digest_of<T: Hash + ?Sized>(value: &T) -> u64 {
    let mut hasher = FxHasher::default();
    value.hash(&mut hasher);
    hasher.finish()
}

/// The credential of a key issued now (in the clear: only a command replayed from the log
/// issues one sealed only, and nobody answers that).
fn credential_from(issued: IssuedKey, card_idm: Idm) -> Result<DeviceCredential, EngineError> {
    let Some(device_key) = issued.key.plain else {
        tracing::error!("a key issued for a request came back sealed only");
        return Err(EngineError::Stopped);
    };
    Ok(DeviceCredential { card_idm, key_version: issued.key_version, device_key })
}

/// The routing hashes and the idempotency digests are part of what a data directory holds: a
/// user's shard is chosen by hashing their key, and a retry finds its record by the digest of
/// its request. A change to a hashed type (a field added, a derive swapped for a hand-written
/// `Hash`, a `Debug` form changed where the digest hashes it) would send users to other shards
/// or turn every retry across an upgrade into a conflict. These values are pinned: a change
/// that moves one must say how existing data is carried over.
#[cfg(test)]
mod pinned {
    use super::*;
    use crate::age::{AgePolicy, Basket, BasketItem};
    use crate::codes::CouponEffect;
    use crate::engine::SaleLines;
    use crate::shard::state::{CodeSpec, RedeemSpec};
    use crate::types::UserIdType;

    fn values() -> Vec<(&'static str, u64)> {
        let user = UserKey::new(UserIdType::Mail, "pinned@example.com").unwrap();
        let jpy = Currency::try_from("JPY").unwrap();
        let basket = Basket {
            age_confirmation: true,
            items: vec![BasketItem {
                item_id: "BEER".into(),
                category: "alcohol".into(),
                quantity: 2,
                unit_amount_minor: 300,
            }],
        };
        let redeem = |lines| RedeemSpec {
            number: 7,
            amount_minor: 600,
            currency: jpy,
            terminal_id: "POS-1".into(),
            sale_at_ms: 1_700_000_000_000,
            lines,
            coupon: Some(9),
            order_ref: "ORDER-1".into(),
        };
        let store = Store {
            store_id: "S-1".into(),
            name: "Shop".into(),
            industry: "5411".into(),
            address: "1-1".into(),
            latitude: 35.5,
            longitude: 139.5,
            beacons: vec!["B-1".into()],
            wifi: vec!["W-1".into()],
            qr_code: None,
            accepts: vec![AcceptedMethod {
                kind: crate::types::MeansKind::EMoney,
                brand: "suica".into(),
            }],
        };
        let terminals = vec![TerminalEntry { terminal_id: "T-1".into(), service: None }];
        let spec =
            CodeSpec { validity_ms: 60_000, deliver_to: Some([1; 8]), order_ref: "O".into() };
        vec![
            ("user routing", user_hash(&user)),
            ("cell routing", cell_hash(12_345)),
            ("provider routing", digest_of(&("provider", 42u32))),
            ("code routing", digest_of(&("code", 7u64))),
            ("enroll", digest_of(&("enroll", &user, [1u8; 8]))),
            ("top-up", digest_of(&("top-up", &user, 2u32, 500u64, jpy))),
            ("basket payment", digest_of(&([5u8; 32], &basket))),
            ("code request", digest_of(&("code", [5u8; 32], &spec))),
            (
                "redemption of items",
                digest_of(&redeem(SaleLines::Items(vec![("X".into(), 1, 600)]))),
            ),
            ("redemption of a basket", digest_of(&redeem(SaleLines::Basket(basket.clone())))),
            ("store", digest_of(&("store", format!("{store:?}")))),
            ("terminals", digest_of(&("terminals", 42u32, format!("{terminals:?}")))),
            ("age policy", digest_of(&("age-policy", 42u32, "T-1", &Some(AgePolicy::default())))),
            (
                "coupon",
                digest_of(&(
                    "coupon",
                    42u32,
                    &user,
                    CouponEffect::Percent { bps: 500 },
                    1u32,
                    9i64,
                )),
            ),
        ]
    }

    #[test]
    fn routing_hashes_and_request_digests_do_not_move() {
        let pinned: &[(&str, u64)] = &[
            ("user routing", 0xf834_901c_dd36_dfaa),
            ("cell routing", 0xe96d_ecbc_e6ee_9021),
            ("provider routing", 0x03d7_d926_1f95_7e6c),
            ("code routing", 0x5f00_fcc2_e0e7_e3bd),
            ("enroll", 0xcf85_cfe9_3262_1993),
            ("top-up", 0xe5d1_33c6_0450_62ca),
            ("basket payment", 0x6f9f_15ba_f364_02e4),
            ("code request", 0x6ec2_b5a6_152f_7323),
            ("redemption of items", 0x5ac8_2648_a1d7_2b5f),
            ("redemption of a basket", 0x6f59_8d30_8180_3f18),
            ("store", 0xb80b_6311_070d_bb0c),
            ("terminals", 0x5e94_2b95_6352_0ee9),
            ("age policy", 0x32f7_f107_c139_ed7b),
            ("coupon", 0x14c5_eebd_d60c_b1aa),
        ];
        assert_eq!(values(), pinned);
    }
}

/// A batch handed to its shard, as a future of its replies.
///
/// A small batch that found its shard busy is not handed to the shard's thread at once. It is
/// kept back, waiting for the shard's turn: the holder wakes it as it lets go
/// ([`ShardHandle::apply_or_wait`]), and it applies on its caller's thread too. Only after
/// [`KEPT_BACK_LOOKS`] looks that found the shard taken again does it go to the mailbox, whose
/// hand-over costs two thread wake-ups. On the durable path this took the shard's actor thread
/// from 35 to 7 ticks in 4 s and 4–6% off the server's CPU per payment (`docs/BENCHMARKS.md`).
/// No more admissions are kept back than the mailbox holds ([`ShardHandle::keep_back`]): past
/// that, they go to the mailbox and, when it is full, are refused as busy, so a shard held long
/// still answers busy instead of growing a queue.
///
/// A `Submitted` dropped while its batch is kept back hands the batch to the mailbox then: a
/// batch once submitted is applied (or refused as busy) whether or not its caller still waits,
/// as it was when every busy shard's batch went to the mailbox at once. A completion dropped
/// would lose its provider's outcome.
pub(crate) struct Submitted {
    receiver: oneshot::Receiver<Vec<Reply>>,
    deferred: Option<Deferred>,
}

/// A batch kept back, waiting for its shard's turn.
struct Deferred {
    engine: Engine,
    shard: usize,
    batch: Batch,
    /// How often it has looked for its turn since it was kept back.
    looks: u8,
    /// An admission's place among those kept back (none for work already admitted).
    _place: Option<KeptPlace>,
}

/// How often a batch kept back looks for its shard's turn (each time woken by the holder
/// letting go) before it goes to the shard's mailbox: another caller may have taken the turn
/// first each time.
const KEPT_BACK_LOOKS: u8 = 3;

/// Why a submitted batch has no replies.
#[derive(Debug)]
pub(crate) enum Unanswered {
    /// The shard stopped, or dropped the batch unanswered.
    Lost,
    /// Refused when it was offered again: the shard's mailbox was full.
    Refused(EngineError),
}

impl Unanswered {
    /// The error a caller answers: a refusal as it is, a lost batch as [`Engine::lost`] says.
    pub(crate) fn or_lost(self, engine: &Engine, shard: usize) -> EngineError {
        match self {
            Unanswered::Lost => engine.lost(shard),
            Unanswered::Refused(error) => error,
        }
    }
}

impl Submitted {
    /// A batch applied or queued already: its replies come on `receiver`.
    fn applied(receiver: oneshot::Receiver<Vec<Reply>>) -> Submitted {
        Submitted { receiver, deferred: None }
    }

    /// A batch that found `shard` busy, kept back to wait for its turn.
    fn deferred(
        engine: Engine,
        shard: usize,
        batch: Batch,
        receiver: oneshot::Receiver<Vec<Reply>>,
        place: Option<KeptPlace>,
    ) -> Submitted {
        let deferred = Deferred { engine, shard, batch, looks: 0, _place: place };
        Submitted { receiver, deferred: Some(deferred) }
    }
}

impl Deferred {
    /// Offers the batch to its shard again, and hands it to the mailbox if the shard is busy.
    fn offer(self) -> Result<(), Unanswered> {
        let Deferred { engine, shard, batch, .. } = self;
        match engine.inner.shards[shard].apply_if_idle(batch) {
            Turn::Applied => Ok(()),
            Turn::Stopped => Err(Unanswered::Lost),
            Turn::Queue(batch) => engine.enqueue(shard, batch).map_err(Unanswered::Refused),
        }
    }
}

impl std::future::Future for Submitted {
    type Output = Result<Vec<Reply>, Unanswered>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = &mut *self;
        if let Some(mut deferred) = this.deferred.take() {
            if deferred.looks < KEPT_BACK_LOOKS {
                deferred.looks += 1;
                let Deferred { engine, shard, batch, looks, _place } = deferred;
                match engine.inner.shards[shard].apply_or_wait(batch, cx.waker()) {
                    Turn::Applied => {}
                    Turn::Stopped => return std::task::Poll::Ready(Err(Unanswered::Lost)),
                    Turn::Queue(batch) => {
                        // Woken when the shard's holder lets go.
                        this.deferred = Some(Deferred { engine, shard, batch, looks, _place });
                        return std::task::Poll::Pending;
                    }
                }
            } else if let Err(unanswered) = deferred.offer() {
                return std::task::Poll::Ready(Err(unanswered));
            }
        }
        std::pin::Pin::new(&mut this.receiver).poll(cx).map_err(|_| Unanswered::Lost)
    }
}

impl Drop for Submitted {
    fn drop(&mut self) {
        if let Some(deferred) = self.deferred.take() {
            // Applied or queued all the same; nobody waits for the replies.
            let _ = deferred.offer();
        }
    }
}
