//! The machine's own load over the measured window, read from `/proc/stat` (Linux): how busy
//! its CPUs were, and how much of their time the hypervisor gave to other guests (steal).
//!
//! On a shared virtual machine steal comes and goes with the neighbours, and a run during a
//! spell of it measures the host more than the target: its throughput drops and its tail
//! latency grows by milliseconds, for any server. The report says so, so that such a run is
//! not read as the target's.

use std::time::Duration;

/// Steal at or above this share of the machine's time is called out in the report.
pub const STEAL_NOTICE_PERCENT: f64 = 5.0;

/// The machine's CPU time, all CPUs together, in clock ticks since boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counters {
    /// Running: user, nice, system, interrupts.
    busy: u64,
    /// Idle or waiting for I/O.
    idle: u64,
    /// Taken by the hypervisor.
    steal: u64,
}

impl Counters {
    fn read() -> Option<Counters> {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        Counters::parse(text.lines().next()?)
    }

    /// Parses the first line of `/proc/stat`:
    /// `cpu user nice system idle iowait irq softirq steal ...`.
    fn parse(line: &str) -> Option<Counters> {
        let mut fields = line.split_whitespace();
        if fields.next()? != "cpu" {
            return None;
        }
        let ticks: Vec<u64> = fields.take(8).map(|f| f.parse().ok()).collect::<Option<_>>()?;
        let &[user, nice, system, idle, iowait, irq, softirq, steal] = ticks.as_slice() else {
            return None;
        };
        Some(Counters { busy: user + nice + system + irq + softirq, idle: idle + iowait, steal })
    }
}

/// How loaded the machine was over a window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostLoad {
    /// The machine's CPUs.
    pub cpus: usize,
    /// The share of all CPUs' time spent running anything (this process, the target, the
    /// rest), in per cent.
    pub busy_percent: f64,
    /// The share the hypervisor took for other guests, in per cent.
    pub steal_percent: f64,
}

impl HostLoad {
    fn between(start: Counters, end: Counters, cpus: usize) -> Option<HostLoad> {
        let busy = end.busy.checked_sub(start.busy)?;
        let idle = end.idle.checked_sub(start.idle)?;
        let steal = end.steal.checked_sub(start.steal)?;
        let total = (busy + idle + steal) as f64;
        (total > 0.0).then(|| HostLoad {
            cpus,
            busy_percent: 100.0 * busy as f64 / total,
            steal_percent: 100.0 * steal as f64 / total,
        })
    }

    /// Whether the hypervisor took enough that the run measured the host as much as the target.
    pub fn noisy(&self) -> bool {
        self.steal_percent >= STEAL_NOTICE_PERCENT
    }
}

/// Samples the machine when the measured window starts (after `warmup`) and when it ends
/// (`duration` later); `None` where `/proc/stat` cannot be read.
pub async fn watch(warmup: Duration, duration: Duration) -> Option<HostLoad> {
    tokio::time::sleep(warmup).await;
    let start = Counters::read()?;
    tokio::time::sleep(duration).await;
    let end = Counters::read()?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    HostLoad::between(start, end, cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_come_from_the_cpu_line() {
        let start = Counters::parse("cpu  100 0 50 800 50 0 0 0 0 0").unwrap();
        let end = Counters::parse("cpu  400 10 140 1000 60 5 5 80 0 0").unwrap();
        assert_eq!(start, Counters { busy: 150, idle: 850, steal: 0 });
        let load = HostLoad::between(start, end, 2).unwrap();
        // busy 410, idle 210, steal 80 of 700 ticks.
        assert!((load.busy_percent - 100.0 * 410.0 / 700.0).abs() < 1e-9);
        assert!((load.steal_percent - 100.0 * 80.0 / 700.0).abs() < 1e-9);
        assert!(load.noisy());
        let quiet = Counters { steal: start.steal, ..end };
        assert!(!HostLoad::between(start, quiet, 2).unwrap().noisy());
    }

    #[test]
    fn other_lines_and_short_lines_are_refused() {
        assert_eq!(Counters::parse("cpu0 1 2 3 4 5 6 7 8"), None);
        assert_eq!(Counters::parse("cpu 1 2 3"), None);
        assert_eq!(Counters::parse("cpu 1 2 x 4 5 6 7 8"), None);
        let start = Counters { busy: 10, idle: 10, steal: 10 };
        assert_eq!(HostLoad::between(start, start, 1), None, "no time passed");
        assert_eq!(HostLoad::between(start, Counters { busy: 5, ..start }, 1), None, "backwards");
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn this_machine_can_be_watched() {
        let load = watch(Duration::ZERO, Duration::from_millis(200)).await;
        let load = load.expect("/proc/stat is readable on Linux");
        assert!((0.0..=100.0).contains(&load.busy_percent), "{load:?}");
        assert!(load.busy_percent + load.steal_percent <= 100.0 + 1e-9, "{load:?}");
    }
}
