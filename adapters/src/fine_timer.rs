//! Sleeps that end when they are due, not on tokio's next millisecond tick, for the simulated
//! provider's latencies.
//!
//! tokio's timer wheel has a resolution of one millisecond, and rounds a deadline up to its
//! next tick: a simulated latency of 0.5–1 ms took 1–2.5 ms (1.8 ms on average, measured), so
//! a provider configured at sub-millisecond latencies was simulated at twice them. A
//! [`FineSleep`] races tokio's sleep with a Linux `timerfd`, which the kernel fires to the
//! microsecond: one timer per runtime thread ([`Timers`]), armed for the earliest deadline
//! waiting (plus a slack of at most 100 µs, [`SLACK`], so that deadlines close together are
//! woken together), read by a task of that runtime that wakes whatever is due.
//!
//! Which one ends the sleep is decided by tokio's clock: the sleep is over when
//! `tokio::time::Instant::now()` has reached its deadline. With the clock running, that is when
//! the `timerfd` fires; with the clock paused (tests), tokio's own sleep ends it, at exactly its
//! deadline, as before. Where no `timerfd` can be set up, tokio's sleep alone serves.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use rustix::time::{Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec};
use tokio::io::unix::AsyncFd;
use tokio::time::{Instant, Sleep};

/// A sleep until a deadline, ended by whichever of tokio's timer and the runtime thread's
/// `timerfd` reaches it first (module docs).
pub(crate) struct FineSleep {
    deadline: Instant,
    coarse: Pin<Box<Sleep>>,
    /// The waker the fine timer was last asked to wake at `deadline`, if it was.
    registered: Option<Waker>,
}

impl FineSleep {
    /// A sleep until `deadline`.
    pub(crate) fn until(deadline: Instant) -> FineSleep {
        FineSleep {
            deadline,
            coarse: Box::pin(tokio::time::sleep_until(deadline)),
            registered: None,
        }
    }

    /// Sleeps until `deadline` instead.
    pub(crate) fn reset(&mut self, deadline: Instant) {
        if deadline != self.deadline {
            self.deadline = deadline;
            self.coarse.as_mut().reset(deadline);
            self.registered = None;
        }
    }
}

impl Future for FineSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let now = Instant::now();
        if now >= this.deadline || this.coarse.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        if !this.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            if let Some(timers) = Timers::of_this_thread() {
                // In the std clock's terms: the same as the deadline with the clock running;
                // with it paused, as far ahead as tokio's clock has to go.
                let at = std::time::Instant::now() + (this.deadline - now);
                timers.wake_at(at, cx.waker().clone());
            }
            this.registered = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// A runtime thread's fine timer: the wakers waiting, by when, and the `timerfd` armed for the
/// first of them.
struct Timers {
    waiting: Mutex<Waiting>,
    fd: AsyncFd<OwnedFd>,
    /// False once the task reading the `timerfd` is gone (its runtime shut down).
    alive: AtomicBool,
}

#[derive(Default)]
struct Waiting {
    wakers: BinaryHeap<Reverse<Due>>,
    /// When the `timerfd` is armed to fire, if it is.
    armed: Option<std::time::Instant>,
}

/// A waker and when to wake it, ordered by that time.
struct Due {
    at: std::time::Instant,
    waker: Waker,
}

impl PartialEq for Due {
    fn eq(&self, other: &Due) -> bool {
        self.at == other.at
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Due) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Due) -> std::cmp::Ordering {
        self.at.cmp(&other.at)
    }
}

/// How late after a sleep's deadline its timer may fire, so that the sleeps due within it end
/// together: a runtime thread's timer fires at most once per this, not once per answer. At 50
/// connections × 16 with a 0.5–1 ms provider it lowered the server's CPU per payment by about
/// 4% against firing at each deadline (`docs/BENCHMARKS.md`); it adds at most 100 µs to a
/// simulated latency, where the millisecond tick added up to a millisecond.
const SLACK: Duration = Duration::from_micros(100);

thread_local! {
    static TIMERS: RefCell<Option<Arc<Timers>>> = const { RefCell::new(None) };
}

impl Timers {
    /// This thread's timers, started on first use in the current runtime; none where a
    /// `timerfd` cannot be set up.
    fn of_this_thread() -> Option<Arc<Timers>> {
        TIMERS.with(|slot| {
            let mut slot = slot.borrow_mut();
            if let Some(timers) = slot.as_ref().filter(|t| t.alive.load(Ordering::Acquire)) {
                return Some(Arc::clone(timers));
            }
            let started = Timers::start();
            slot.clone_from(&started);
            started
        })
    }

    /// A `timerfd` registered with the current runtime, and the task that reads it. The
    /// runtime must have its I/O driver (every settlegate runtime does: tokio panics without it).
    fn start() -> Option<Arc<Timers>> {
        tokio::runtime::Handle::try_current().ok()?;
        let flags = TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC;
        let fd = rustix::time::timerfd_create(TimerfdClockId::Monotonic, flags).ok()?;
        // SAFETY: the `AsyncFd` owns the descriptor, open until it is dropped with it.
        let fd = unsafe { AsyncFd::register(fd) }.ok()?;
        let timers = Arc::new(Timers {
            waiting: Mutex::new(Waiting::default()),
            fd,
            alive: AtomicBool::new(true),
        });
        tokio::spawn(read_loop(Arc::clone(&timers)));
        Some(timers)
    }

    /// Wakes `waker` once `at` has passed: at most [`SLACK`] later, never before.
    fn wake_at(&self, at: std::time::Instant, waker: Waker) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        waiting.wakers.push(Reverse(Due { at, waker }));
        let fire = at + SLACK;
        if waiting.armed.is_none_or(|armed| fire < armed) {
            self.arm(&mut waiting, fire);
        }
    }

    /// Takes the wakers due by now, and arms the `timerfd` for the next one.
    fn take_due(&self) -> Vec<Waker> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        waiting.armed = None;
        let now = std::time::Instant::now();
        let mut due = Vec::new();
        while waiting.wakers.peek().is_some_and(|Reverse(d)| d.at <= now) {
            due.push(waiting.wakers.pop().expect("peeked").0.waker);
        }
        if let Some(next) = waiting.wakers.peek().map(|Reverse(d)| d.at) {
            self.arm(&mut waiting, next + SLACK);
        }
        due
    }

    /// Arms the `timerfd` to fire at `at` (at once if it has passed).
    fn arm(&self, waiting: &mut Waiting, at: std::time::Instant) {
        // A zero value would disarm it: a nanosecond is "at once".
        let left =
            at.saturating_duration_since(std::time::Instant::now()).max(Duration::from_nanos(1));
        let value = Itimerspec {
            it_interval: Timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: Timespec::try_from(left).unwrap_or(Timespec { tv_sec: 1, tv_nsec: 0 }),
        };
        match rustix::time::timerfd_settime(self.fd.get_ref(), TimerfdTimerFlags::empty(), &value) {
            Ok(_) => waiting.armed = Some(at),
            // Not expected; tokio's own sleep still ends every sleep, on its tick.
            Err(error) => tracing::warn!(%error, "the simulator's fine timer could not be armed"),
        }
    }
}

/// Marks its timers dead when dropped: the task reading them is gone (its runtime shut down),
/// so the next sleep on this thread starts timers of its own; the wakers left are woken, so
/// that nothing waits on a timer no one reads.
struct Reader(Arc<Timers>);

impl Drop for Reader {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::Release);
        let mut waiting = self.0.waiting.lock().unwrap_or_else(|e| e.into_inner());
        for Reverse(due) in std::mem::take(&mut waiting.wakers) {
            due.waker.wake();
        }
    }
}

/// Reads the `timerfd` each time it fires and wakes what is due.
async fn read_loop(timers: Arc<Timers>) {
    let reader = Reader(timers);
    let fd = &reader.0.fd;
    loop {
        let Ok(mut ready) = fd.readable().await else { return };
        let mut expirations = [0u8; 8];
        match ready
            .try_io(|fd| rustix::io::read(fd.get_ref(), &mut expirations).map_err(Into::into))
        {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return,
            // Not readable after all: wait again.
            Err(_would_block) => continue,
        }
        for waker in reader.0.take_due() {
            waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With the clock running, a sleep never ends before its deadline; many at once each end;
    /// a sleep moved to another deadline ends at the new one.
    #[tokio::test]
    async fn sleeps_end_at_their_deadlines_never_before() {
        let start = Instant::now();
        let deadlines: Vec<Duration> =
            (0..64).map(|i| Duration::from_micros(50 + 37 * i)).collect();
        let sleeps = deadlines.iter().map(|&after| async move {
            FineSleep::until(start + after).await;
            (after, start.elapsed())
        });
        for (after, slept) in futures::future::join_all(sleeps).await {
            assert!(slept >= after, "ended after {slept:?}, before {after:?}");
        }
        let mut moved = Box::pin(FineSleep::until(start + Duration::from_secs(60)));
        assert!(futures::poll!(moved.as_mut()).is_pending());
        let sooner = Instant::now() + Duration::from_micros(300);
        moved.as_mut().get_mut().reset(sooner);
        moved.await;
        assert!(Instant::now() >= sooner);
    }

    /// A thread's timer dies with its runtime; the next runtime on the thread starts its own.
    #[test]
    fn a_new_runtime_on_the_thread_gets_a_timer_of_its_own() {
        for _ in 0..3 {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let deadline = Instant::now() + Duration::from_micros(200);
                FineSleep::until(deadline).await;
                assert!(Instant::now() >= deadline);
                assert!(Timers::of_this_thread().is_some(), "a timerfd on this runtime");
            });
        }
    }

    /// With the clock paused, tokio's sleep ends it at exactly its deadline, as before.
    #[tokio::test(start_paused = true)]
    async fn with_the_clock_paused_a_sleep_ends_at_exactly_its_deadline() {
        let start = Instant::now();
        FineSleep::until(start + Duration::from_millis(7)).await;
        assert_eq!(start.elapsed(), Duration::from_millis(7));
    }
}
