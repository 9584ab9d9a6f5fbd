//! What a connection measured: per operation, HDR histograms of latency corrected for
//! coordinated omission and uncorrected, counts of declines and errors by reason, and the
//! same second by second (answers, errors and a coarser corrected histogram per second of the
//! measured window).

use std::borrow::Cow;
use std::collections::BTreeMap;

use hdrhistogram::Histogram;

/// Significant figures kept by every histogram (0.1% resolution).
const SIGFIG: u8 = 3;
/// Significant figures of the per-second histograms (1% resolution: one per second, operation
/// and connection, kept small).
const SECOND_SIGFIG: u8 = 2;

/// What one second of the measured window saw, of one operation.
#[derive(Debug, Clone)]
pub struct Second {
    /// Corrected latency, in µs, of the requests answered in that second.
    pub latency_us: Histogram<u32>,
    /// Errors in that second.
    pub errors: u64,
}

impl Second {
    fn new() -> Second {
        Second {
            latency_us: Histogram::new(SECOND_SIGFIG).expect("2 significant figures is valid"),
            errors: 0,
        }
    }

    /// Adds `other` into this one.
    pub fn add(&mut self, other: &Second) {
        self.latency_us.add(&other.latency_us).expect("auto-resizing histograms add");
        self.errors += other.errors;
    }
}

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Served.
    Ok,
    /// Answered with a business decline (a reason code): a valid, timed response.
    Declined(u16),
    /// No valid answer (refused, busy, timed out, connection lost...): counted, not timed.
    Error(Cow<'static, str>),
}

/// One operation's measurements.
#[derive(Debug, Clone)]
pub struct OpTally {
    /// Latency in µs from when each request was due (the headline).
    pub corrected_us: Histogram<u64>,
    /// Latency in µs from when each request was actually sent.
    pub uncorrected_us: Histogram<u64>,
    /// Declines by reason code.
    pub declines: BTreeMap<u16, u64>,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// By second of the measured window (from its start, by when each answer came).
    pub seconds: Vec<Second>,
}

impl OpTally {
    fn new() -> OpTally {
        // Auto-resizing: each histogram grows only as far as the largest latency it sees.
        OpTally {
            corrected_us: Histogram::new(SIGFIG).expect("3 significant figures is valid"),
            uncorrected_us: Histogram::new(SIGFIG).expect("3 significant figures is valid"),
            declines: BTreeMap::new(),
            errors: BTreeMap::new(),
            seconds: Vec::new(),
        }
    }

    /// Second `second`, made if it is not yet.
    fn second(&mut self, second: usize) -> &mut Second {
        if self.seconds.len() <= second {
            self.seconds.resize_with(second + 1, Second::new);
        }
        &mut self.seconds[second]
    }

    /// Adds `other` into this one.
    pub fn add(&mut self, other: &OpTally) {
        self.corrected_us.add(&other.corrected_us).expect("auto-resizing histograms add");
        self.uncorrected_us.add(&other.uncorrected_us).expect("auto-resizing histograms add");
        for (reason, n) in &other.declines {
            *self.declines.entry(*reason).or_default() += n;
        }
        for (kind, n) in &other.errors {
            *self.errors.entry(kind.clone()).or_default() += n;
        }
        for (i, second) in other.seconds.iter().enumerate() {
            self.second(i).add(second);
        }
    }
}

/// Measurements of every operation of a run (or of one connection).
#[derive(Debug, Clone)]
pub struct Tally {
    /// By operation index (the mix's order).
    pub ops: Vec<OpTally>,
    /// Open loop: requests due in the measured window that were never sent, because the
    /// connection was still behind schedule when the run ended.
    pub unsent: u64,
}

impl Tally {
    /// An empty tally of `operations` operations.
    pub fn new(operations: usize) -> Tally {
        Tally { ops: (0..operations).map(|_| OpTally::new()).collect(), unsent: 0 }
    }

    /// Records one measured request, answered in second `second` of the measured window.
    /// Errors are counted but not timed: a refused or lost request's latency says nothing
    /// about the service.
    pub fn record(
        &mut self,
        op: usize,
        second: usize,
        corrected_us: u64,
        uncorrected_us: u64,
        outcome: &Outcome,
    ) {
        let tally = &mut self.ops[op];
        match outcome {
            Outcome::Error(kind) => {
                *tally.errors.entry(kind.to_string()).or_default() += 1;
                tally.second(second).errors += 1;
                return;
            }
            Outcome::Declined(reason) => *tally.declines.entry(*reason).or_default() += 1,
            Outcome::Ok => {}
        }
        // Histograms start at 1: a sub-microsecond answer counts as 1 µs.
        let _ = tally.corrected_us.record(corrected_us.max(1));
        let _ = tally.uncorrected_us.record(uncorrected_us.max(1));
        let _ = tally.second(second).latency_us.record(corrected_us.max(1));
    }

    /// Adds `other` into this one.
    pub fn add(&mut self, other: &Tally) {
        assert_eq!(self.ops.len(), other.ops.len(), "tallies of the same operations");
        for (mine, theirs) in self.ops.iter_mut().zip(&other.ops) {
            mine.add(theirs);
        }
        self.unsent += other.unsent;
    }

    /// All operations together.
    pub fn overall(&self) -> OpTally {
        let mut total = OpTally::new();
        for op in &self.ops {
            total.add(op);
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_time_declines_but_not_errors() {
        let mut tally = Tally::new(2);
        tally.record(0, 0, 100, 90, &Outcome::Ok);
        tally.record(0, 2, 0, 0, &Outcome::Declined(8));
        tally.record(1, 0, 5_000, 5_000, &Outcome::Error("busy".into()));
        assert_eq!(tally.ops[0].corrected_us.len(), 2);
        assert_eq!(tally.ops[0].corrected_us.min(), 1, "sub-microsecond counts as 1");
        assert_eq!(tally.ops[0].declines[&8], 1);
        assert_eq!(tally.ops[1].corrected_us.len(), 0);
        assert_eq!(tally.ops[1].errors["busy"], 1);
        let mut other = Tally::new(2);
        other.record(1, 1, 300, 300, &Outcome::Ok);
        other.unsent = 3;
        tally.add(&other);
        let overall = tally.overall();
        assert_eq!((overall.corrected_us.len(), overall.errors["busy"], tally.unsent), (3, 1, 3));
        // Second by second: answers timed in the second they came, errors counted there.
        let by_second: Vec<(u64, u64)> =
            overall.seconds.iter().map(|s| (s.latency_us.len(), s.errors)).collect();
        assert_eq!(by_second, [(1, 1), (1, 0), (1, 0)]);
        assert_eq!(tally.ops[0].seconds[2].latency_us.max(), 1);
    }
}
