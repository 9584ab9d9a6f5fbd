//! Drives load: one task per connection keeping up to `pipeline` requests in flight, either as
//! fast as they complete (closed loop) or on a fixed schedule (open loop, `--rate`).
//!
//! # Open loop and coordinated omission
//!
//! At `--rate R` over `C` connections, connection `c` owes its `k`-th request at
//! `start + (c + k·C) / R`: each connection runs at `R / C` and the connections interleave,
//! so the whole run sends at `R`. As in wrk2, a request's latency is measured from when it was
//! *due*, not from when it went out: when the server stalls and all of a connection's slots
//! are taken, the requests falling due meanwhile wait, are sent late once a slot frees, and
//! that wait counts. A closed loop (or an uncorrected histogram) would instead send fewer
//! requests during the stall and hide it: the stall shows as one slow request rather than as
//! every request that fell due during it.
//!
//! One refinement: a request whose connection had a slot free when it fell due is charged from
//! its actual send. Tokio's timers tick in milliseconds, so a connection waiting for its next
//! due time wakes up to a millisecond late; that lateness is the load generator's, not the
//! server's, and would otherwise put a floor of about 1 ms under every corrected percentile.
//! Both histograms are recorded; the corrected one is the headline.
//!
//! # Pacing
//!
//! With [`Pacing::Timer`] (the default) every connection whose request falls due within the
//! same millisecond wakes on the same timer tick, so the server receives the rate as one burst
//! per millisecond, and requests late in a burst wait for the ones before them on both sides.
//! [`Pacing::Spin`] instead yields to the runtime until the due time when it is less than
//! [`SPIN_WITHIN`] away, so requests go out within microseconds of when they are due, evenly
//! spread; it keeps the load generator's core busy, so give loadgen a core of its own
//! (`taskset`) or it takes CPU from the server it measures.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt as _};
use tokio::time::Instant;

use crate::mix::Chooser;
use crate::tally::{Outcome, Tally};

/// After the measured window, a connection still behind schedule stops sending this late.
const OVERRUN_MAX: Duration = Duration::from_millis(100);

/// With [`Pacing::Spin`], a due time nearer than this is waited for by yielding, not by a timer.
pub const SPIN_WITHIN: Duration = Duration::from_millis(2);

/// How an open-loop connection waits for its next request's due time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Pacing {
    /// Tokio's timer (millisecond ticks: the rate arrives in bursts, one per millisecond).
    #[default]
    Timer,
    /// Yield until due (microsecond spacing, a busy core); see the module docs.
    #[value(help = "Yield until due (microsecond spacing, but loadgen keeps a core busy)")]
    Spin,
}

impl Pacing {
    /// The flag's value, as reports give it.
    pub fn label(self) -> &'static str {
        match self {
            Pacing::Timer => "timer",
            Pacing::Spin => "spin",
        }
    }

    /// Waits until `at` (already past: returns at once).
    pub(crate) async fn until(self, at: Instant) {
        match self {
            Pacing::Spin if at.saturating_duration_since(Instant::now()) < SPIN_WITHIN => {
                while Instant::now() < at {
                    tokio::task::yield_now().await;
                }
            }
            Pacing::Spin | Pacing::Timer => tokio::time::sleep_until(at).await,
        }
    }
}

/// How a closed loop keeps its connections busy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClosedLoop {
    /// Each connection writes `--pipeline` requests in one write, waits for all their
    /// responses, then writes the next batch (`redis-benchmark -P`; [`crate::lanes`]).
    #[value(help = "Each connection writes `--pipeline` requests in one write, waits for all \
                    their answers, then writes the next batch (as `redis-benchmark -P`)")]
    Batch,
    /// Each connection keeps `--pipeline` requests in flight, sending one as each answer
    /// arrives (this module's per-request loop).
    #[value(help = "Each connection keeps `--pipeline` requests in flight, sending one as \
                    each answer arrives")]
    Window,
}

impl ClosedLoop {
    /// The flag's value, as reports give it.
    pub fn label(self) -> &'static str {
        match self {
            ClosedLoop::Batch => "batch",
            ClosedLoop::Window => "window",
        }
    }
}

/// What a workload does for one request. A slot is the state of one in-flight position of a
/// connection (for authorize: the users it owns, so a device never has two requests in flight).
pub trait Execute: Send + Sync + 'static {
    /// Per-slot state.
    type Slot: Send + 'static;

    /// The state of slot `slot` of connection `connection`.
    fn slot(&self, connection: usize, slot: usize) -> Self::Slot;

    /// Sends one request of operation `op` (an index into the mix) and waits for its answer.
    fn execute<'a>(
        &'a self,
        op: usize,
        slot: &'a mut Self::Slot,
    ) -> impl Future<Output = Outcome> + Send + 'a;
}

/// The shape of a run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Connections (embedded: concurrent submitters); each is one task.
    pub connections: usize,
    /// Requests in flight per connection.
    pub pipeline: usize,
    /// Run before measuring; its samples are discarded.
    pub warmup: Duration,
    /// Measured.
    pub duration: Duration,
    /// Open loop at this many requests per second overall; closed loop when `None`.
    pub rate_per_s: Option<f64>,
    /// How the open loop waits for due times.
    pub pacing: Pacing,
    /// The closed loop's kind (`None` with a rate). This module runs [`ClosedLoop::Window`];
    /// the caller sends [`ClosedLoop::Batch`] runs (and open loops that fit) to [`crate::lanes`].
    pub closed_loop: Option<ClosedLoop>,
    /// A request without an answer by then counts as a `timeout` error.
    pub timeout: Duration,
    /// Seed of the operation choice.
    pub seed: u64,
    /// Weight of each operation (the mix).
    pub weights: Vec<u32>,
}

/// Counters the progress line reads while the run goes on.
#[derive(Debug, Default)]
pub struct Live {
    /// Answers received (warm-up included).
    pub completed: AtomicU64,
    /// Of which declines.
    pub declined: AtomicU64,
    /// Errors.
    pub errors: AtomicU64,
}

/// The run's time line.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    /// When the run (its warm-up first) started: the open loop's schedule starts here.
    pub(crate) start: Instant,
    /// Answers to requests sent (closed loop) or due (open loop) from here on are measured.
    pub(crate) measure_from: Instant,
    /// Nothing is sent (closed loop) or due (open loop) from here on.
    pub(crate) stop_at: Instant,
}

impl Window {
    /// The time line of `plan`, starting now.
    pub(crate) fn starting_now(plan: &Plan) -> Window {
        let start = Instant::now();
        let measure_from = start + plan.warmup;
        Window { start, measure_from, stop_at: measure_from + plan.duration }
    }
}

/// Runs `plan` against `exec` and returns what every connection measured, added up.
pub async fn drive<E: Execute>(exec: Arc<E>, plan: Arc<Plan>, live: Arc<Live>) -> Tally {
    let window = Window::starting_now(&plan);
    let tasks: Vec<_> = (0..plan.connections)
        .map(|c| tokio::spawn(connection(exec.clone(), plan.clone(), window, c, live.clone())))
        .collect();
    let mut total = Tally::new(plan.weights.len());
    for task in tasks {
        total.add(&task.await.expect("a connection task panicked"));
    }
    total
}

/// The open-loop schedule of one connection.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    rate_per_s: f64,
    connections: u64,
    connection: u64,
}

impl Schedule {
    /// Connection `connection` of `connections` sharing `rate_per_s`.
    pub fn new(rate_per_s: f64, connections: usize, connection: usize) -> Schedule {
        assert!(rate_per_s > 0.0 && connection < connections, "a valid schedule");
        Schedule { rate_per_s, connections: connections as u64, connection: connection as u64 }
    }

    /// When this connection's `k`-th request is due, after the start of the run.
    pub fn due_after_start(&self, k: u64) -> Duration {
        Duration::from_secs_f64((self.connection + k * self.connections) as f64 / self.rate_per_s)
    }
}

/// Where a request's latency is measured from: when it was due, unless the connection already
/// had a free slot then (`free_since` at or before `due`), in which case from its send; see
/// the module docs.
pub fn latency_start(due: Instant, free_since: Option<Instant>, sent: Instant) -> Instant {
    match free_since {
        Some(free) if free <= due => sent,
        _ => due,
    }
}

/// One connection's sending rule, shared by this module's loop and [`crate::lanes`]: when the
/// next request may go, which slot it takes, and where its latency counts from (the
/// coordinated-omission correction).
pub(crate) struct Cadence<S> {
    /// Open loop: the connection's schedule; closed loop: none.
    schedule: Option<Schedule>,
    window: Window,
    /// Closed loop in batches: a batch starts only once every slot is back.
    batch: bool,
    /// Closed loop in batches: a batch is being sent (slots are still being taken).
    filling: bool,
    slots: usize,
    free: Vec<S>,
    /// Since when a slot has been free (none while every slot is taken).
    free_since: Option<Instant>,
    /// The open loop's next request, by number.
    next_k: u64,
}

/// What a request carries from its send to its answer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket {
    /// Where its latency counts from (its send; in the open loop, possibly when it was due).
    start: Instant,
    sent: Instant,
    measured: bool,
    /// The start of the measured window: the answer's second counts from here.
    measure_from: Instant,
}

impl<S> Cadence<S> {
    /// Connection `c` of `plan`, its slots made by `slot`.
    pub(crate) fn new(plan: &Plan, window: Window, c: usize, slot: impl FnMut(usize) -> S) -> Self {
        Cadence {
            schedule: plan.rate_per_s.map(|rate| Schedule::new(rate, plan.connections, c)),
            window,
            batch: plan.closed_loop == Some(ClosedLoop::Batch),
            filling: false,
            slots: plan.pipeline,
            free: (0..plan.pipeline).rev().map(slot).collect(),
            free_since: Some(window.start),
            next_k: 0,
        }
    }

    /// When the next request is due, while the run still sends one.
    fn due(&self, now: Instant) -> Option<Instant> {
        let stop_at = self.window.stop_at;
        match &self.schedule {
            None => {
                let batch_ready = !self.batch || self.filling || self.free.len() == self.slots;
                (now < stop_at && batch_ready).then_some(now)
            }
            Some(schedule) => {
                let due = self.window.start + schedule.due_after_start(self.next_k);
                (due < stop_at && now < stop_at + OVERRUN_MAX).then_some(due)
            }
        }
    }

    /// The slot and ticket of the request to send now, if one is due and a slot is free.
    pub(crate) fn take(&mut self, now: Instant) -> Option<(S, Ticket)> {
        let due = self.due(now).filter(|due| *due <= now)?;
        let slot = self.free.pop()?;
        let (start, measured) = match self.schedule {
            None => (now, now >= self.window.measure_from),
            Some(_) => (latency_start(due, self.free_since, now), due >= self.window.measure_from),
        };
        self.filling = !self.free.is_empty();
        if self.free.is_empty() {
            self.free_since = None;
        }
        self.next_k += 1;
        let measure_from = self.window.measure_from;
        Some((slot, Ticket { start, sent: now, measured, measure_from }))
    }

    /// Until when to wait for the next request's due time, if one is still to come and a slot
    /// is free for it.
    pub(crate) fn timer(&self, now: Instant) -> Option<Instant> {
        self.due(now).filter(|_| !self.free.is_empty())
    }

    /// A slot back, its request answered at `at`.
    pub(crate) fn give_back(&mut self, slot: S, at: Instant) {
        if self.free.is_empty() {
            self.free_since = Some(at);
        }
        self.free.push(slot);
    }

    /// Open loop: requests due in the measured window that were never sent.
    pub(crate) fn unsent(&self) -> u64 {
        self.schedule.map_or(0, |schedule| unsent(&schedule, self.window, self.next_k))
    }
}

impl Ticket {
    /// When the request went out.
    pub(crate) fn sent(&self) -> Instant {
        self.sent
    }

    /// Counts `outcome` of operation `op`, answered at `finished`, and records it if measured.
    pub(crate) fn settle(
        self,
        tally: &mut Tally,
        live: &Live,
        op: usize,
        outcome: &Outcome,
        finished: Instant,
    ) {
        count_live(live, outcome);
        if self.measured {
            let micros = |from: Instant| finished.duration_since(from).as_micros() as u64;
            let second = finished.saturating_duration_since(self.measure_from).as_secs() as usize;
            tally.record(op, second, micros(self.start), micros(self.sent), outcome);
        }
    }
}

/// What a request that went out carries until its answer.
struct Sent<S> {
    slot: S,
    op: usize,
    outcome: Outcome,
    ticket: Ticket,
}

async fn connection<E: Execute>(
    exec: Arc<E>,
    plan: Arc<Plan>,
    window: Window,
    c: usize,
    live: Arc<Live>,
) -> Tally {
    let exec = &*exec;
    let mut cadence = Cadence::new(&plan, window, c, |s| exec.slot(c, s));
    let mut chooser = Chooser::new(&plan.weights, plan.seed, c as u64);
    let mut tally = Tally::new(plan.weights.len());
    let mut in_flight = FuturesUnordered::new();
    loop {
        let now = Instant::now();
        if let Some((slot, ticket)) = cadence.take(now) {
            let op = chooser.next_index();
            let timeout = plan.timeout;
            in_flight.push(async move {
                let mut slot = slot;
                let outcome = tokio::time::timeout(timeout, exec.execute(op, &mut slot))
                    .await
                    .unwrap_or(Outcome::Error("timeout".into()));
                Sent { slot, op, outcome, ticket }
            });
            continue;
        }
        let timer = cadence.timer(now);
        if timer.is_none() && in_flight.is_empty() {
            break;
        }
        tokio::select! {
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                let finished = Instant::now();
                done.ticket.settle(&mut tally, &live, done.op, &done.outcome, finished);
                cadence.give_back(done.slot, finished);
            }
            () = plan.pacing.until(timer.unwrap_or(now)), if timer.is_some() => {}
        }
    }
    tally.unsent = cadence.unsent();
    tally
}

/// Requests due in the measured window from the `next_k`-th on, never sent.
fn unsent(schedule: &Schedule, window: Window, mut next_k: u64) -> u64 {
    let mut count = 0;
    loop {
        let due = window.start + schedule.due_after_start(next_k);
        if due >= window.stop_at {
            return count;
        }
        count += u64::from(due >= window.measure_from);
        next_k += 1;
    }
}

/// Counts an answer on the progress line's counters.
pub fn count_live(live: &Live, outcome: &Outcome) {
    live.completed.fetch_add(1, Ordering::Relaxed);
    match outcome {
        Outcome::Ok => {}
        Outcome::Declined(_) => {
            live.declined.fetch_add(1, Ordering::Relaxed);
        }
        Outcome::Error(_) => {
            live.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server answering every request after `service`, except request number `stall_at`,
    /// which takes `stall`. It notes when each request went out.
    struct Stalling {
        calls: AtomicU64,
        stall_at: u64,
        stall: Duration,
        service: Duration,
        sends: std::sync::Mutex<Vec<Instant>>,
    }

    impl Execute for Stalling {
        type Slot = ();
        fn slot(&self, _connection: usize, _slot: usize) {}
        fn execute<'a>(
            &'a self,
            _op: usize,
            _slot: &'a mut (),
        ) -> impl Future<Output = Outcome> + Send + 'a {
            let n = self.calls.fetch_add(1, Ordering::Relaxed);
            self.sends.lock().expect("lock").push(Instant::now());
            let wait = if n == self.stall_at { self.stall } else { self.service };
            async move {
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                Outcome::Ok
            }
        }
    }

    fn plan(rate_per_s: Option<f64>) -> Arc<Plan> {
        Arc::new(Plan {
            connections: 1,
            pipeline: 1,
            warmup: Duration::from_millis(500),
            duration: Duration::from_secs(5),
            rate_per_s,
            pacing: Pacing::Timer,
            closed_loop: rate_per_s.is_none().then_some(ClosedLoop::Window),
            timeout: Duration::from_secs(10),
            seed: 1,
            weights: vec![1],
        })
    }

    /// A server answering in `service`, except request `stall_at`, which takes `stall`.
    fn server(service: Duration, stall_at: u64, stall: Duration) -> Arc<Stalling> {
        Arc::new(Stalling {
            calls: AtomicU64::new(0),
            stall_at,
            stall,
            service,
            sends: std::sync::Mutex::default(),
        })
    }

    fn stalling(stall_at: u64) -> Arc<Stalling> {
        server(Duration::from_millis(1), stall_at, Duration::from_secs(1))
    }

    fn above(histogram: &hdrhistogram::Histogram<u64>, micros: u64) -> u64 {
        histogram
            .iter_recorded()
            .filter(|v| v.value_iterated_to() > micros)
            .map(|v| v.count_at_value())
            .sum()
    }

    /// The wrk2 property, on a virtual clock: a 1 s stall at 100 requests/s must show in the
    /// corrected histogram as the ~100 requests that fell due during it, and in the
    /// uncorrected one as a single slow request.
    #[tokio::test(start_paused = true)]
    async fn open_loop_charges_a_stall_to_every_request_due_during_it() {
        // Request 150 is due at 1.5 s, inside the measured window.
        let tally = drive(stalling(150), plan(Some(100.0)), Arc::default()).await;
        let op = &tally.ops[0];
        assert_eq!(op.corrected_us.len(), 500, "5 s at 100/s, warm-up excluded");
        assert_eq!(op.uncorrected_us.len(), 500);
        assert_eq!(tally.unsent, 0);
        assert_eq!(above(&op.uncorrected_us, 10_000), 1, "uncorrected: only the stalled one");
        assert!(op.uncorrected_us.value_at_quantile(0.99) <= 2_000);
        // The 100 requests due during the stall, and the ~11 due while the backlog drained
        // (1 ms each, one every 10 ms).
        let late = above(&op.corrected_us, 10_000);
        assert!((100..=115).contains(&late), "corrected: every request due in the stall: {late}");
        assert!(op.corrected_us.value_at_quantile(0.99) >= 900_000);
        assert!(op.corrected_us.max() >= 1_000_000);
    }

    /// Spin pacing (on the real clock: a paused clock never advances while a task spins)
    /// sends every request of the schedule, and never one before it is due.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spin_pacing_sends_the_whole_schedule_and_never_early() {
        let rate = 2_000.0;
        let plan = Arc::new(Plan {
            warmup: Duration::from_millis(100),
            duration: Duration::from_millis(400),
            pacing: Pacing::Spin,
            pipeline: 4,
            ..(*plan(Some(rate))).clone()
        });
        let server = server(Duration::ZERO, u64::MAX, Duration::ZERO);
        let before = Instant::now();
        let tally = drive(Arc::clone(&server), plan, Arc::default()).await;
        assert_eq!(tally.unsent, 0);
        assert_eq!(tally.ops[0].corrected_us.len(), 800, "400 ms at 2,000/s");
        let sends = server.sends.lock().expect("lock");
        assert_eq!(sends.len(), 1_000, "warm-up and measured window");
        for (k, sent) in sends.iter().enumerate() {
            let due = Schedule::new(rate, 1, 0).due_after_start(k as u64);
            assert!(sent.duration_since(before) >= due, "request {k} went out before it was due");
        }
    }

    /// A closed loop cannot see the stall: it stops sending while it waits.
    #[tokio::test(start_paused = true)]
    async fn closed_loop_records_uncorrected_latency_only() {
        // About 1 ms a request: request 1000 is well inside the measured window.
        let tally = drive(stalling(1_000), plan(None), Arc::default()).await;
        let op = &tally.ops[0];
        assert_eq!(above(&op.corrected_us, 10_000), 1);
        assert_eq!(op.corrected_us.len(), op.uncorrected_us.len());
        assert_eq!(op.corrected_us.max(), op.uncorrected_us.max());
    }

    /// A server too slow for the rate leaves requests unsent at the end, and says so.
    #[tokio::test(start_paused = true)]
    async fn open_loop_counts_what_it_could_not_send() {
        let slow = server(Duration::from_millis(20), u64::MAX, Duration::ZERO);
        let tally = drive(slow, plan(Some(100.0)), Arc::default()).await;
        assert!(tally.unsent > 200, "{}", tally.unsent);
        assert!(tally.ops[0].corrected_us.value_at_quantile(0.5) > 1_000_000);
    }

    #[test]
    fn schedule_interleaves_connections() {
        let dues: Vec<Duration> = (0..2)
            .flat_map(|k| (0..4).map(move |c| Schedule::new(1_000.0, 4, c).due_after_start(k)))
            .collect();
        let expected: Vec<Duration> = (0..8).map(Duration::from_millis).collect();
        assert_eq!(dues, expected);
    }

    #[test]
    fn latency_counts_from_due_unless_a_slot_was_waiting() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(latency_start(at(10), None, at(50)), at(10), "all slots busy: from due");
        assert_eq!(latency_start(at(10), Some(at(30)), at(50)), at(10), "freed after due");
        assert_eq!(latency_start(at(10), Some(at(5)), at(11)), at(11), "timer lateness");
        assert_eq!(latency_start(at(10), Some(at(10)), at(10)), at(10));
    }
}
