//! Replies on their way to a socket, counted in bytes: per connection and for the whole
//! server. A connection whose peer does not read its replies stops reading requests once its
//! unsent replies pass `reply_backlog_max`, or once the server's pass
//! `reply_backlog_total_max` while it holds more than a small share of them; one that makes no
//! room within the idle time is closed. So a client that pipelines without reading costs at
//! most its budget (and the requests it has in flight), never the server's memory.
//!
//! Each queued reply carries a [`Charge`] that gives its bytes back when it is dropped:
//! written, or thrown away with a closed connection, the count stays exact.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

/// A connection's own backlog below this never pauses it for the server's total: a reading
/// peer's replies leave as they come, and it must not wait on the ones that do not read.
const OWN_SHARE_MIN: usize = 64 * 1024;
/// How often a paused connection looks again for room. Pausing is the exception, so it polls
/// rather than having every write wake someone.
const ROOM_POLL: Duration = Duration::from_millis(2);

/// Unsent reply bytes.
#[derive(Debug, Default)]
pub struct Backlog(AtomicUsize);

impl Backlog {
    /// The bytes counted now.
    pub fn bytes(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// The byte budgets, from `[server]`.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// One connection's unsent replies before it stops reading.
    pub own_max: usize,
    /// The server's unsent replies before connections holding a share of them stop reading.
    pub total_max: usize,
}

/// Bytes taken from a connection's backlog and the server's, given back on drop.
#[derive(Debug)]
pub struct Charge {
    own: Arc<Backlog>,
    total: Arc<Backlog>,
    bytes: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.own.0.fetch_sub(self.bytes, Ordering::Relaxed);
        self.total.0.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// One reply (or several, encoded back to back) waiting for the writer.
#[derive(Debug)]
pub struct Queued {
    /// The encoded frames.
    pub bytes: Vec<u8>,
    _charge: Charge,
}

/// Counts bytes against a connection's backlog and the server's.
#[derive(Debug, Clone)]
pub struct Counter {
    own: Arc<Backlog>,
    total: Arc<Backlog>,
}

impl Counter {
    /// Counts `bytes` until the charge is dropped.
    pub fn charge(&self, bytes: usize) -> Charge {
        self.own.0.fetch_add(bytes, Ordering::Relaxed);
        self.total.0.fetch_add(bytes, Ordering::Relaxed);
        Charge { own: Arc::clone(&self.own), total: Arc::clone(&self.total), bytes }
    }
}

/// The sending side of a connection's reply queue.
#[derive(Debug, Clone)]
pub struct Outbox {
    queue: mpsc::UnboundedSender<Queued>,
    counter: Counter,
    budget: Budget,
}

impl Outbox {
    /// A queue for one connection, counted against the server's `total`; the receiver goes to
    /// the connection's writer.
    pub fn new(total: Arc<Backlog>, budget: Budget) -> (Outbox, mpsc::UnboundedReceiver<Queued>) {
        let (queue, receiver) = mpsc::unbounded_channel();
        (Outbox { queue, counter: Counter { own: Arc::default(), total }, budget }, receiver)
    }

    /// The counter alone, for the writer: it must not hold a sender of its own queue.
    pub fn counter(&self) -> Counter {
        self.counter.clone()
    }

    /// Counts `bytes` about to be written by someone other than the writer task; they are
    /// given back when the charge is dropped.
    pub fn charge(&self, bytes: usize) -> Charge {
        self.counter.charge(bytes)
    }

    /// Queues `bytes` for the writer without waiting; false when the writer has gone (the
    /// connection is closing and the bytes are dropped, uncounted).
    pub fn push(&self, bytes: Vec<u8>) -> bool {
        let charge = self.charge(bytes.len());
        self.queue.send(Queued { bytes, _charge: charge }).is_ok()
    }

    /// Whether nothing is queued for this connection's writer or being written by it.
    pub fn idle(&self) -> bool {
        self.counter.own.bytes() == 0
    }

    /// Whether this connection must stop reading until its replies drain.
    pub fn over(&self) -> bool {
        let own = self.counter.own.bytes();
        own > self.budget.own_max
            || (own > OWN_SHARE_MIN && self.counter.total.bytes() > self.budget.total_max)
    }

    /// Waits until the connection may read again; false if `deadline` came first (the peer
    /// has not taken its replies).
    pub async fn room(&self, deadline: Instant) -> bool {
        while self.over() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(ROOM_POLL).await;
        }
        true
    }
}
