//! Shard actors: each owns the users (and providers' terminal lists) whose key hashes to it,
//! and applies their commands one at a time.
//!
//! A shard's state and log writer (its [`ShardCore`]) sit behind a lock that says whose turn it
//! is to apply. A caller that finds its shard idle takes the turn and applies its batch on its
//! own thread, with no hand-over to the shard's thread and back: that hand-over cost two thread
//! wake-ups per batch and about a quarter of the server's CPU (`docs/BENCHMARKS-HISTORY.md`).
//! A caller that finds a shard without a log busy waits a little for its turn ([`BUSY_WAIT`],
//! about a small batch's time in the shard). When the shard stays busy (at once, for a shard
//! with a log), the engine keeps the batch back (`engine::Submitted`): it waits for the shard's
//! turn, woken when the holder lets go ([`CoreLock`]), and applies on its caller's thread. When
//! another caller took the turn first each time it looked, or the batch is large
//! ([`APPLY_IN_PLACE_MAX`]), or as many admissions are kept back as the mailbox holds, the batch
//! goes to the actor's mailbox, and the actor applies it on its own arbiter thread when its turn
//! comes. Either way commands are
//! applied one at a time, and a caller never waits longer than [`BUSY_WAIT`] for another's
//! batch: then it queues. A batch applied at once may overtake batches kept back or queued in
//! the mailbox; batches in flight together were never ordered (pipelined requests are answered
//! in any order).
//!
//! Admission into the mailbox uses `try_send` into a bounded mailbox: a full mailbox becomes an
//! explicit busy answer, never an unbounded queue. Completions of already-admitted work use
//! `do_send` (always queued) because dropping them would lose an outcome; they are bounded by
//! the admitted work itself.

pub(crate) mod archive;
mod digest;
pub(crate) mod idempotency;
pub(crate) mod image;
pub(crate) mod legacy;
pub(crate) mod logged;
pub(crate) mod replay;
pub(crate) mod state;

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, TryLockError};

use actix::{Actor, Addr, Context, Handler, Message, MessageResult};
use tokio::sync::oneshot;

use crate::types::{AuthOutcome, ReasonCode};
use crate::wal::{Job, Records, WalHandle};

/// A shard's side of durability: its writer and when to snapshot.
pub(crate) struct ShardWal {
    pub(crate) handle: WalHandle<Vec<Reply>>,
    /// Generation of the log being written (that of the last snapshot).
    pub(crate) generation: u64,
    /// Records since that snapshot.
    pub(crate) since_snapshot: u64,
    /// Snapshot after this many records; 0: never.
    pub(crate) snapshot_every: u64,
    /// The size of the last snapshot's payload: the next one's buffer is made that large at
    /// once, not grown by doubling (each growth a copy, and fresh pages to fault in).
    pub(crate) last_snapshot_bytes: Arc<AtomicUsize>,
    /// The buffer each record is encoded in before it is framed into its batch's
    /// [`Records`]: one for the shard's life, not one a record.
    pub(crate) scratch: rkyv::util::AlignedVec,
}

use crate::fail::fail_fast;
use image::Capture;
pub(crate) use state::{
    Acknowledged, AddedMeans, CodeCompletion, CodeRequest, CodeView, Command, Completion,
    Credentials, Delivery, Dispatch, Envelope, FlowReply, IssuedKey, Obligation, OwedView, Payment,
    Query, RefundedCode, Reply, ShardState, Swept, VoidedCode,
};

/// One unit of shard work.
#[derive(Debug)]
pub(crate) enum Op {
    Apply(Envelope),
    Query(Query),
}

/// Ops applied in order, with one reply for the whole batch.
pub(crate) struct Batch {
    pub(crate) ops: Vec<Op>,
    pub(crate) reply: oneshot::Sender<Vec<Reply>>,
    /// Completions of work the shard admitted earlier (a provider's answer, a sweep), which
    /// a cluster partition being handed over still takes; new work it does not.
    pub(crate) completion: bool,
}

impl Message for Batch {
    type Result = ();
}

/// A shard's core behind the lock that says whose turn it is (`None` once the engine
/// stopped), and the tasks waiting for a turn ([`ShardHandle::apply_or_wait`]), woken whenever
/// a holder lets go.
pub(crate) struct CoreLock {
    core: Mutex<Option<ShardCore>>,
    /// Whether `wakers` may hold a task: a holder letting go looks at this alone when none does.
    waiting: AtomicBool,
    wakers: Mutex<Vec<std::task::Waker>>,
    /// Admissions kept back waiting for a turn: no more than the mailbox holds may wait
    /// ([`ShardHandle::keep_back`]), so a shard held long answers busy as a full mailbox does.
    kept: Arc<AtomicUsize>,
}

/// An admission's place among those kept back for a shard's turn, given up when dropped.
pub(crate) struct KeptPlace(Arc<AtomicUsize>);

impl Drop for KeptPlace {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

type CoreCell = Arc<CoreLock>;

/// A turn at the shard: its core, until dropped; then the tasks waiting for a turn are woken.
pub(crate) struct Held<'a> {
    guard: Option<std::sync::MutexGuard<'a, Option<ShardCore>>>,
    lock: &'a CoreLock,
}

impl std::ops::Deref for Held<'_> {
    type Target = Option<ShardCore>;

    fn deref(&self) -> &Option<ShardCore> {
        self.guard.as_ref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for Held<'_> {
    fn deref_mut(&mut self) -> &mut Option<ShardCore> {
        self.guard.as_mut().expect("held until dropped")
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        // Let go first: a task woken finds the shard free.
        drop(self.guard.take());
        self.lock.wake_waiting();
    }
}

impl CoreLock {
    fn new(core: ShardCore) -> CoreLock {
        CoreLock {
            core: Mutex::new(Some(core)),
            waiting: AtomicBool::new(false),
            wakers: Mutex::new(Vec::new()),
            kept: Arc::default(),
        }
    }

    fn held<'a>(&'a self, guard: std::sync::MutexGuard<'a, Option<ShardCore>>) -> Held<'a> {
        Held { guard: Some(guard), lock: self }
    }

    /// Waits for the turn, as [`Mutex::lock`].
    fn lock(&self) -> std::sync::LockResult<Held<'_>> {
        match self.core.lock() {
            Ok(guard) => Ok(self.held(guard)),
            Err(poisoned) => Err(PoisonError::new(self.held(poisoned.into_inner()))),
        }
    }

    /// Takes the turn if it is free, as [`Mutex::try_lock`].
    fn try_lock(&self) -> std::sync::TryLockResult<Held<'_>> {
        match self.core.try_lock() {
            Ok(guard) => Ok(self.held(guard)),
            Err(TryLockError::WouldBlock) => Err(TryLockError::WouldBlock),
            Err(TryLockError::Poisoned(poisoned)) => {
                Err(TryLockError::Poisoned(PoisonError::new(self.held(poisoned.into_inner()))))
            }
        }
    }

    /// Has `waker` woken when the turn is next let go of. The caller looks at the lock again
    /// after this: a holder that let go before it found nobody waiting.
    fn wait_for_turn(&self, waker: &std::task::Waker) {
        let mut wakers = self.wakers.lock().unwrap_or_else(PoisonError::into_inner);
        if !wakers.iter().any(|w| w.will_wake(waker)) {
            wakers.push(waker.clone());
        }
        self.waiting.store(true, Ordering::SeqCst);
        drop(wakers);
        // Orders the store above before the caller's next look at the lock, against the
        // holder's fence in `wake_waiting`: either that look finds the turn free, or the holder
        // finds the task waiting.
        std::sync::atomic::fence(Ordering::SeqCst);
    }

    /// Wakes the tasks waiting for a turn (a holder has just let go).
    fn wake_waiting(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::Relaxed) && self.waiting.swap(false, Ordering::SeqCst) {
            let wakers =
                std::mem::take(&mut *self.wakers.lock().unwrap_or_else(PoisonError::into_inner));
            wakers.into_iter().for_each(std::task::Waker::wake);
        }
    }
}

/// A shard as the engine holds it: its actor's address and its core.
pub(crate) struct ShardHandle {
    pub(crate) addr: Addr<Shard>,
    core: CoreCell,
    /// Batches in the mailbox, not yet applied (for metrics).
    pub(crate) queued: Arc<AtomicUsize>,
    /// Batches refused as busy, the mailbox full (for metrics).
    pub(crate) busy: Arc<AtomicU64>,
    /// Set by the shard's log writer if it fails (none without a log).
    wal_failed: Option<Arc<AtomicBool>>,
    /// The log writer's figures (none without a log).
    pub(crate) wal_stats: Option<Arc<crate::wal::WalStats>>,
    /// How long a caller waits for the shard when it finds it busy: [`BUSY_WAIT`] for a shard
    /// in memory only on a machine of more than one core; none for one with a log (its own, or
    /// a cluster partition's stream), nor on a single core, where the batch being applied
    /// cannot go on while the caller spins.
    busy_wait: std::time::Duration,
}

/// The largest batch a caller applies on its own thread. A larger one goes to the shard's own
/// thread even when the shard is idle: the hand-over costs two thread wake-ups, tens of
/// microseconds, against about half a microsecond per operation, so it pays once a batch has
/// about this many operations, and a large batch spread over several shards is then applied by
/// their threads at the same time rather than one shard after another on the caller's.
pub(crate) const APPLY_IN_PLACE_MAX: usize = 64;

/// How long a caller that finds its shard busy waits for its turn (spinning) before it hands
/// its batch to the shard's own thread, for a shard in memory only. A small batch, such as a
/// group of provider answers' completions, takes the shard a few microseconds; handing it over
/// costs two thread wake-ups and, on a machine whose cores are all busy, a wait for the shard's
/// thread to be scheduled. With a provider answering after 0.5–1 ms, each payment comes to its
/// shard twice (reserved, then completed), and waiting up to this long took 7–17% more
/// payments a second through the same machine; with the zero-latency provider it changed
/// nothing measurable, and waiting up to 200 µs took CPU the load's other threads needed. A
/// shard with a log does not wait: there the time spun is taken from its log writer, whose
/// syncs then answer later (`docs/BENCHMARKS.md`).
pub(crate) const BUSY_WAIT: std::time::Duration = std::time::Duration::from_micros(20);

/// What became of a batch offered to a shard.
pub(crate) enum Turn {
    /// Applied on the caller's thread; its replies are in its reply channel.
    Applied,
    /// For the mailbox: the shard stayed busy with another batch for [`BUSY_WAIT`], or this
    /// one is larger than [`APPLY_IN_PLACE_MAX`].
    Queue(Batch),
    /// The engine stopped: the shard takes no more work. (A batch that panics while being
    /// applied ends the process, [`fail_fast`]; a poisoned lock is refused the same way.)
    Stopped,
}

impl ShardHandle {
    /// Starts shard actor over `core` in `arbiter`.
    pub(crate) fn start(
        arbiter: &actix::ArbiterHandle,
        core: ShardCore,
        mailbox_capacity: usize,
    ) -> ShardHandle {
        let wal_failed = core.wal.as_ref().map(|wal| Arc::clone(&wal.handle.failed));
        let wal_stats = core.wal.as_ref().map(|wal| Arc::clone(&wal.handle.stats));
        // Spinning only helps while the shard's holder runs on another core.
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let in_memory = core.wal.is_none() && core.gate.is_none();
        let busy_wait = if in_memory && cores > 1 { BUSY_WAIT } else { std::time::Duration::ZERO };
        let core = Arc::new(CoreLock::new(core));
        let queued = Arc::new(AtomicUsize::new(0));
        let actor =
            Shard { core: Arc::clone(&core), mailbox_capacity, queued: Arc::clone(&queued) };
        let addr = Shard::start_in_arbiter(arbiter, move |_| actor);
        ShardHandle { addr, core, queued, busy: Arc::default(), wal_failed, wal_stats, busy_wait }
    }

    /// Whether the shard takes work: not stopped, its lock not poisoned, its log writer (if
    /// any) alive. Does not wait for a batch being applied.
    pub(crate) fn is_available(&self) -> bool {
        if self.wal_failed.as_ref().is_some_and(|failed| failed.load(Ordering::Acquire)) {
            return false;
        }
        match self.core.try_lock() {
            Ok(core) => core.is_some(),
            // Busy applying a batch: alive.
            Err(TryLockError::WouldBlock) => true,
            Err(TryLockError::Poisoned(_)) => false,
        }
    }

    /// Applies `batch` on the calling thread if the batch is small and the shard is idle, or
    /// (in memory only) becomes idle within [`BUSY_WAIT`].
    pub(crate) fn apply_if_idle(&self, mut batch: Batch) -> Turn {
        if !Self::applies_in_place(&batch) {
            return Turn::Queue(batch);
        }
        let mut waiting_until = None;
        loop {
            batch = match self.try_apply(batch) {
                Turn::Queue(batch) => batch,
                turn => return turn,
            };
            if self.busy_wait.is_zero() {
                return Turn::Queue(batch);
            }
            let now = std::time::Instant::now();
            if now >= *waiting_until.get_or_insert(now + self.busy_wait) {
                return Turn::Queue(batch);
            }
            // A few pauses between looks at the lock and the clock: the other thread's batch is
            // microseconds long.
            for _ in 0..16 {
                std::hint::spin_loop();
            }
        }
    }

    /// A place among the admissions kept back for this shard's turn, if fewer than `limit` (the
    /// mailbox's capacity) hold one.
    pub(crate) fn keep_back(&self, limit: usize) -> Option<KeptPlace> {
        let kept = &self.core.kept;
        if kept.fetch_add(1, Ordering::Relaxed) >= limit {
            kept.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(KeptPlace(Arc::clone(kept)))
    }

    /// Whether `batch` is small enough to apply on a caller's thread ([`APPLY_IN_PLACE_MAX`]).
    pub(crate) fn applies_in_place(batch: &Batch) -> bool {
        batch.ops.len() <= APPLY_IN_PLACE_MAX
    }

    /// Applies `batch` on the calling thread if the shard is free. If it is busy, the batch is
    /// handed back, and `waker` is woken once the shard's holder lets go.
    pub(crate) fn apply_or_wait(&self, batch: Batch, waker: &std::task::Waker) -> Turn {
        match self.try_apply(batch) {
            Turn::Queue(batch) => {
                self.core.wait_for_turn(waker);
                self.try_apply(batch)
            }
            turn => turn,
        }
    }

    /// Applies `batch` on the calling thread if the shard is free, without waiting.
    fn try_apply(&self, batch: Batch) -> Turn {
        match self.core.try_lock() {
            Ok(mut core) => match core.as_mut() {
                Some(core) => {
                    core.run_or_abort(batch);
                    Turn::Applied
                }
                None => Turn::Stopped,
            },
            Err(TryLockError::WouldBlock) => Turn::Queue(batch),
            Err(TryLockError::Poisoned(_)) => Turn::Stopped,
        }
    }

    /// The shard's core as a standby applies to it (`cluster/tail.rs`).
    pub(crate) fn replica(&self) -> ReplicaCore {
        ReplicaCore(Arc::clone(&self.core))
    }

    /// Stops the shard once the batch being applied is done: its state and log writer are
    /// dropped (the writer then finishes what was queued), and later batches are refused.
    pub(crate) fn stop(&self) {
        // Taken under the lock, dropped (closing the log writer) after it.
        let core = self.core.lock().unwrap_or_else(PoisonError::into_inner).take();
        drop(core);
    }
}

/// A shard's core as a cluster's standby and takeover reach it: the records its partition's
/// owner appended are applied here, under the same lock the shard's own batches take.
#[derive(Clone)]
pub(crate) struct ReplicaCore(CoreCell);

impl ReplicaCore {
    /// Runs `f` on the core once it is this caller's turn; `None` once the shard stopped. A
    /// panic in `f` ends the process ([`fail_fast`]), as one in a batch does.
    fn with<T>(&self, f: impl FnOnce(&mut ShardCore) -> T) -> Option<T> {
        let mut core = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let core = core.as_mut()?;
        let index = core.state.index;
        match std::panic::catch_unwind(AssertUnwindSafe(|| f(core))) {
            Ok(value) => Some(value),
            Err(panic) => fail_fast(&format!("shard {index}"), panic.as_ref()),
        }
    }

    /// Applies commands another node appended to this partition's log; their replies were that
    /// node's to give.
    pub(crate) fn apply_replicated(&self, envelopes: Vec<Envelope>) {
        self.with(|core| {
            envelopes.into_iter().for_each(|envelope| _ = core.state.replay(envelope))
        });
    }

    /// Declines the payments left in flight at their providers, as recovery after a crash does
    /// ([`ShardState::resolve_pending`]); returns the completions applied, to be logged.
    pub(crate) fn resolve_pending(&self, now_ms: i64) -> Vec<Envelope> {
        self.with(|core| core.state.resolve_pending(now_ms)).unwrap_or_default()
    }

    /// Replaces the shard's state with `snapshot`'s (a standby that fell behind its stream's
    /// purge). The stores it holds are set in the shared directory again; entries of the
    /// registries that only the replaced state had stay until the node restarts.
    pub(crate) fn reload(&self, snapshot: &crate::wal::snapshot::Snapshot) -> Result<(), String> {
        self.with(|core| {
            let state = &core.state;
            let mut fresh = ShardState::new(state.index, state.shared.clone(), state.config);
            snapshot.restore(&mut fresh).map_err(|e| e.to_string())?;
            for (store, updated_ms) in fresh.stores.stores() {
                fresh.shared.stores.set(store, updated_ms);
            }
            core.state = fresh;
            Ok(())
        })
        .unwrap_or_else(|| Err("the shard stopped".into()))
    }

    /// Whether payments (or code requests) wait for their providers' answers here.
    pub(crate) fn has_pending(&self) -> bool {
        self.with(|core| !core.state.idem.pending().is_empty()).unwrap_or(false)
    }

    /// Returns once no batch is being applied: one that starts later sees whatever the caller
    /// changed before (the shard's lock orders them).
    pub(crate) fn barrier(&self) {
        self.with(|_| ());
    }

    /// Queues `job` on the shard's log (dropped, with its reply, if the shard has none).
    pub(crate) fn submit(&self, job: Job<Vec<Reply>>) {
        self.with(|core| {
            if let Some(wal) = &core.wal {
                wal.handle.submit(job);
            }
        });
    }
}

/// A shard's state and log writer: what applies its commands.
pub(crate) struct ShardCore {
    state: ShardState,
    /// The shard's log writer; none when state is in memory only.
    wal: Option<ShardWal>,
    /// A cluster partition's standing: checked under the shard's lock before a batch applies,
    /// so nothing applies here once the partition is not this node's (a standby's state changes
    /// only by its stream).
    gate: Option<Arc<crate::cluster::Partitions>>,
}

impl ShardCore {
    pub(crate) fn new(
        state: ShardState,
        wal: Option<ShardWal>,
        gate: Option<Arc<crate::cluster::Partitions>>,
    ) -> ShardCore {
        ShardCore { state, wal, gate }
    }

    /// Applies `batch` ([`ShardCore::run`]); a panic while doing so ends the process (see
    /// [`fail_fast`]).
    fn run_or_abort(&mut self, batch: Batch) {
        let index = self.state.index;
        if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| self.run(batch))) {
            fail_fast(&format!("shard {index}"), panic.as_ref());
        }
    }

    /// Applies one command, first encoding its log record when the shard has a log. A sweep
    /// with nothing due is not logged: replayed, it would change nothing, and logged it would
    /// have an idle shard write (and, under `fsync = always`, sync) a record every sweep.
    fn apply(&mut self, envelope: Envelope, records: &mut Records) -> Reply {
        #[cfg(all(feature = "test-hooks", debug_assertions))]
        test_hooks::panic_if_asked(&envelope);
        let idle_sweep = matches!(envelope.command, Command::SweepCodes)
            && !self.state.sweep_due(envelope.now_ms);
        if !idle_sweep {
            self.log(&envelope, records);
        }
        self.state.apply(envelope)
    }

    /// Encodes `envelope`'s record into the shard's one encoding buffer and frames it into
    /// `records`, when the shard has a log.
    fn log(&mut self, envelope: &Envelope, records: &mut Records) {
        if let Some(wal) = &mut self.wal {
            wal.scratch = envelope.encode_in(std::mem::take(&mut wal.scratch));
            records.push(&wal.scratch);
        }
    }

    /// Completes `dispatch`, reserved by the record just logged, with its provider's `outcome`,
    /// and logs that as [`Command::Decided`]: the outcome alone, from which a replay rebuilds
    /// the same completion ([`ShardState::replay`]).
    fn complete_decided(
        &mut self,
        dispatch: &Dispatch,
        outcome: AuthOutcome,
        now_ms: i64,
        records: &mut Records,
    ) -> Reply {
        let completion = dispatch.completion(outcome, now_ms);
        self.log(&Envelope { command: Command::Decided { outcome }, ..completion }, records);
        self.state.apply(completion)
    }

    /// A payment (or payment-code request) whose provider answers at once (an adapter that
    /// decides in process, such as the zero-latency simulator) is completed here, in the same
    /// step as its reservation: no trip back to the caller and into this shard again. Both
    /// commands are logged, in order, as if the caller had sent the completion. Any other
    /// dispatch goes back to the caller.
    fn decide_now(&mut self, dispatch: Box<Dispatch>, now_ms: i64, records: &mut Records) -> Reply {
        let provider = self.state.shared.registry.provider(dispatch.provider_code);
        let answer = provider.and_then(|p| p.adapter.decide_now(&dispatch.provider_request()));
        let Some(answer) = answer else {
            return match dispatch.code {
                Some(_) => CodeRequest::Dispatch(dispatch).into(),
                None => Payment::Dispatch(dispatch).into(),
            };
        };
        let outcome = dispatch.outcome_of(answer);
        let completed = self.complete_decided(&dispatch, outcome, now_ms, records);
        let timeout = ReasonCode::ProviderTimeout;
        // A completion that found no record (not expected: the record was made in this step)
        // stands declined whatever the provider said.
        if dispatch.code.is_none() {
            let dropped = matches!(completed.into_flow(), Ok(Completion::Dropped));
            if dropped {
                self.state.shared.completion_dropped(&dispatch, &outcome);
            }
            let outcome = if dropped { AuthOutcome::Declined(timeout) } else { outcome };
            return Payment::Decided(dispatch, outcome).into();
        }
        // A code request is answered as its completion answers it.
        match completed.into_flow() {
            Ok(CodeCompletion::Issued(issued)) => CodeRequest::Decided(issued).into(),
            Ok(CodeCompletion::Declined(reason)) => CodeRequest::Declined(reason).into(),
            Ok(CodeCompletion::Dropped) => {
                self.state.shared.completion_dropped(&dispatch, &outcome);
                CodeRequest::Declined(timeout).into()
            }
            Err(_) => CodeRequest::Declined(timeout).into(),
        }
    }

    /// Applies `batch` and sends its replies (through the log writer, when there is one).
    fn run(&mut self, batch: Batch) {
        if let Some(gate) = &self.gate {
            if !gate.applies(self.state.index as usize, batch.completion) {
                // Dropped with its reply: the caller answers MOVED (or BUSY while the partition
                // is handed over).
                return;
            }
        }
        for op in &batch.ops {
            if let Op::Apply(envelope) = op {
                self.state.prefetch(envelope);
            }
        }
        // A payment's records are at most about 600 bytes framed (400 when decided here); a
        // shard without a log frames none.
        let mut records = match &self.wal {
            Some(wal) => Records::with_capacity(wal.generation, batch.ops.len() * 640),
            None => Records::with_capacity(0, 0),
        };
        let replies = batch
            .ops
            .into_iter()
            .map(|op| match op {
                Op::Apply(envelope) => {
                    let now_ms = envelope.now_ms;
                    // Only a payment's (or code request's) reservation dispatches.
                    match self.apply(envelope, &mut records).into_dispatch() {
                        Ok(dispatch) => self.decide_now(dispatch, now_ms, &mut records),
                        Err(reply) => reply,
                    }
                }
                Op::Query(query) => self.state.query(query),
            })
            .collect();
        match &mut self.wal {
            // The writer releases the replies once the records are durable.
            Some(wal) => {
                wal.since_snapshot += records.len() as u64;
                wal.handle.submit(Job::Records { records, reply: batch.reply, replies });
                if wal.snapshot_every > 0 && wal.since_snapshot >= wal.snapshot_every {
                    // Captured between batches, so it holds exactly the records queued before it.
                    let generation = wal.generation + 1;
                    // The shard pays only for the capture; encoding and writing are the writer's.
                    let started = std::time::Instant::now();
                    let capture = Capture::take(&mut self.state);
                    tracing::info!(
                        shard = self.state.index,
                        generation,
                        paused_us = started.elapsed().as_micros() as u64,
                        "snapshot captured; the shard paused for the capture only"
                    );
                    let (index, count) = (wal.handle.index, wal.handle.count);
                    let last = Arc::clone(&wal.last_snapshot_bytes);
                    let payload = Box::new(move |buffer| {
                        let hint = last.load(Ordering::Relaxed);
                        let bytes = capture.encode(buffer, hint + hint / 16);
                        last.store(bytes.len(), Ordering::Relaxed);
                        bytes
                    });
                    wal.handle.submit(Job::Snapshot { payload, index, count, generation });
                    wal.generation = generation;
                    wal.since_snapshot = 0;
                }
            }
            // The requester may have gone away (its task was cancelled); the change stands.
            None => {
                let _ = batch.reply.send(replies);
            }
        }
    }
}

/// Test hook, only in debug builds with the `test-hooks` feature (the integration tests'
/// build): a shard panics on the command whose client request ID is
/// `SETTLEGATE_TEST_PANIC_ON_REQUEST` (hexadecimal), read once. Release builds, and builds
/// without the feature, hold no such code, so no request and no environment can reach it.
#[cfg(all(feature = "test-hooks", debug_assertions))]
mod test_hooks {
    use std::sync::OnceLock;

    pub(super) fn panic_if_asked(envelope: &super::Envelope) {
        static PANIC_ON: OnceLock<Option<u128>> = OnceLock::new();
        let panic_on = PANIC_ON.get_or_init(|| {
            let hex = std::env::var("SETTLEGATE_TEST_PANIC_ON_REQUEST").ok()?;
            u128::from_str_radix(&hex, 16).ok()
        });
        if panic_on.is_some() && envelope.client_request_id == *panic_on {
            panic!("test hook: shard panics on client request ID {:x}", panic_on.unwrap());
        }
    }
}

/// The actor around a [`ShardCore`]: applies what callers could not apply themselves.
pub(crate) struct Shard {
    core: CoreCell,
    mailbox_capacity: usize,
    /// As its handle's.
    queued: Arc<AtomicUsize>,
}

impl Shard {
    /// Waits for the shard's turn and runs `f` on its core; `None` once the shard stopped.
    fn with_core<T>(&self, f: impl FnOnce(&mut ShardCore) -> T) -> Option<T> {
        self.core.lock().ok()?.as_mut().map(f)
    }
}

impl Actor for Shard {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.mailbox_capacity);
    }
}

impl Handler<Batch> for Shard {
    type Result = ();

    fn handle(&mut self, batch: Batch, _ctx: &mut Context<Self>) {
        self.queued.fetch_sub(1, Ordering::Relaxed);
        // A stopped shard drops the batch: its caller sees the engine as stopped.
        self.with_core(|core| core.run_or_abort(batch));
    }
}

/// Sizes of a shard, for metrics and tests.
pub(crate) struct Sizes;

impl Message for Sizes {
    type Result = (usize, usize);
}

impl Handler<Sizes> for Shard {
    type Result = MessageResult<Sizes>;

    fn handle(&mut self, _: Sizes, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(self.with_core(|core| core.state.sizes()).unwrap_or((0, 0)))
    }
}

/// A shard's state digest (`shard/digest.rs`); none once the shard stopped.
pub(crate) struct Digest;

impl Message for Digest {
    type Result = Option<u64>;
}

impl Handler<Digest> for Shard {
    type Result = MessageResult<Digest>;

    fn handle(&mut self, _: Digest, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(self.with_core(|core| core.state.digest()))
    }
}

/// Test hook: holds the shard's turn on its thread until the sender side is dropped or
/// signalled, so a test can fill the mailbox deterministically. The first sender is told once
/// the turn is held.
#[cfg(feature = "test-hooks")]
pub(crate) struct Stall(
    pub(crate) std::sync::mpsc::Sender<()>,
    pub(crate) std::sync::mpsc::Receiver<()>,
);

#[cfg(feature = "test-hooks")]
impl Message for Stall {
    type Result = ();
}

#[cfg(feature = "test-hooks")]
impl Handler<Stall> for Shard {
    type Result = ();

    fn handle(&mut self, stall: Stall, _ctx: &mut Context<Self>) {
        let _turn = self.core.lock();
        let _ = stall.0.send(());
        let _ = stall.1.recv();
    }
}
