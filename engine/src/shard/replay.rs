//! The per-device anti-replay window (the scheme of IPsec's RFC 4303 §3.4.3).
//!
//! Counters must be fresh, but pipelined requests from one device may arrive slightly out of
//! order, so a counter up to [`REPLAY_WINDOW`] below the highest seen is accepted once.

use serde::{Deserialize, Serialize};

use crate::limits::REPLAY_WINDOW;

/// The highest counter seen and a bitmap of the [`REPLAY_WINDOW`] counters below it.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct ReplayWindow {
    /// Highest counter accepted so far (meaningful once `seen` is set).
    high: u64,
    /// Bit `i` set: counter `high - i` was accepted.
    bits: u64,
    seen: bool,
}

impl ReplayWindow {
    /// The window a snapshot recorded.
    pub(crate) fn from_parts(high: u64, bits: u64, seen: bool) -> ReplayWindow {
        ReplayWindow { high, bits, seen }
    }

    /// Whether `counter` would be accepted (does not record it).
    pub fn fresh(&self, counter: u64) -> bool {
        if !self.seen || counter > self.high {
            return true;
        }
        let age = self.high - counter;
        age < REPLAY_WINDOW && self.bits & (1 << age) == 0
    }

    /// Records `counter` as used. Call only after [`ReplayWindow::fresh`] said yes.
    pub fn record(&mut self, counter: u64) {
        debug_assert!(self.fresh(counter));
        if !self.seen {
            *self = ReplayWindow { high: counter, bits: 1, seen: true };
        } else if counter > self.high {
            let shift = counter - self.high;
            self.bits = if shift >= REPLAY_WINDOW { 0 } else { self.bits << shift };
            self.bits |= 1;
            self.high = counter;
        } else {
            self.bits |= 1 << (self.high - counter);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window() {
        let mut window = ReplayWindow::default();
        assert!(window.fresh(10));
        window.record(10);
        assert!(!window.fresh(10));
        assert!(window.fresh(9), "reordered but unseen");
        window.record(9);
        assert!(!window.fresh(9));
        window.record(100);
        assert!(!window.fresh(36), "older than the window");
        assert!(window.fresh(37));
        assert!(!window.fresh(100));
        window.record(1000);
        assert!(!window.fresh(100));
    }
}
