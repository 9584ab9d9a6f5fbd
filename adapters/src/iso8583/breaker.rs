//! The circuit breaker: a pure state machine, fed by the connection task.
//!
//! Closed, it counts consecutive failures (connection lost or refused, sign-on refused,
//! request or echo timeouts); any success resets the count. At `failures_to_open` it opens:
//! requests then fail fast, without touching the network, until `echoes_to_close` consecutive
//! echo tests (0800/0810) succeed. An echo that fails while open restarts that count.

/// What a recorded event changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    /// Nothing visible.
    None,
    /// The breaker just opened.
    Opened,
    /// The breaker just closed.
    Closed,
}

/// The breaker's state.
#[derive(Debug, Clone)]
pub(crate) struct Breaker {
    failures_to_open: u32,
    echoes_to_close: u32,
    failures: u32,
    echoes_ok: u32,
    open: bool,
}

impl Breaker {
    /// A closed breaker.
    pub(crate) fn new(failures_to_open: u32, echoes_to_close: u32) -> Breaker {
        assert!(failures_to_open > 0 && echoes_to_close > 0, "breaker thresholds are positive");
        Breaker { failures_to_open, echoes_to_close, failures: 0, echoes_ok: 0, open: false }
    }

    /// Whether requests must fail fast.
    pub(crate) fn is_open(&self) -> bool {
        self.open
    }

    /// A failure of the host or the link.
    pub(crate) fn failure(&mut self) -> Transition {
        self.echoes_ok = 0;
        if self.open {
            return Transition::None;
        }
        self.failures = self.failures.saturating_add(1);
        if self.failures >= self.failures_to_open {
            self.open = true;
            self.failures = 0;
            return Transition::Opened;
        }
        Transition::None
    }

    /// A request answered by the host (approved or declined: the host works).
    pub(crate) fn success(&mut self) {
        if !self.open {
            self.failures = 0;
        }
    }

    /// An echo test answered `00`.
    pub(crate) fn echo_ok(&mut self) -> Transition {
        if !self.open {
            self.failures = 0;
            return Transition::None;
        }
        self.echoes_ok += 1;
        if self.echoes_ok >= self.echoes_to_close {
            self.open = false;
            self.echoes_ok = 0;
            return Transition::Closed;
        }
        Transition::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_only() {
        let mut breaker = Breaker::new(3, 2);
        assert_eq!(breaker.failure(), Transition::None);
        assert_eq!(breaker.failure(), Transition::None);
        breaker.success();
        assert_eq!(breaker.failure(), Transition::None);
        assert_eq!(breaker.failure(), Transition::None);
        assert!(!breaker.is_open());
        assert_eq!(breaker.failure(), Transition::Opened);
        assert!(breaker.is_open());
        assert_eq!(breaker.failure(), Transition::None, "opens once");
    }

    #[test]
    fn closes_after_consecutive_echoes_and_a_failure_restarts_the_count() {
        let mut breaker = Breaker::new(1, 3);
        assert_eq!(breaker.failure(), Transition::Opened);
        breaker.success();
        assert!(breaker.is_open(), "a late reply does not close it");
        assert_eq!(breaker.echo_ok(), Transition::None);
        assert_eq!(breaker.echo_ok(), Transition::None);
        assert_eq!(breaker.failure(), Transition::None);
        assert_eq!(breaker.echo_ok(), Transition::None);
        assert_eq!(breaker.echo_ok(), Transition::None);
        assert_eq!(breaker.echo_ok(), Transition::Closed);
        assert!(!breaker.is_open());
        assert_eq!(breaker.failure(), Transition::Opened, "count restarted from zero");
    }
}
