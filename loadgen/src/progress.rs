//! The live progress line on stderr. Hidden when stderr is not a terminal (or with
//! `--no-progress`), so logs and pipes get only the final report.

use std::io::IsTerminal as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::driver::Live;
use crate::report::thousands;

/// How often the line is redrawn.
const TICK: Duration = Duration::from_millis(250);

/// A bar shown only on a terminal.
fn bar(length: u64, template: &str, enabled: bool) -> ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(length);
    bar.set_style(ProgressStyle::with_template(template).expect("a valid template"));
    bar
}

/// The dataset preparation's bar: one tick per user.
pub fn preparing(users: usize, enabled: bool) -> ProgressBar {
    let bar = bar(users as u64, "preparing dataset [{bar:30}] {pos}/{len} users {eta}", enabled);
    bar.enable_steady_tick(TICK);
    bar
}

/// The run's line: phase, time, answers, rate over the last tick, declines, errors.
pub struct RunProgress {
    bar: ProgressBar,
    task: tokio::task::JoinHandle<()>,
}

impl RunProgress {
    /// Starts redrawing from `live` until [`RunProgress::finish`].
    pub fn start(live: Arc<Live>, warmup: Duration, duration: Duration, enabled: bool) -> Self {
        let total = warmup + duration;
        let bar = bar(total.as_millis() as u64, "[{bar:20}] {wide_msg}", enabled);
        let task = if bar.is_hidden() {
            tokio::spawn(async {})
        } else {
            tokio::spawn(redraw(bar.clone(), live, warmup, total))
        };
        RunProgress { bar, task }
    }

    /// Stops and clears the line.
    pub fn finish(self) {
        self.task.abort();
        self.bar.finish_and_clear();
    }
}

async fn redraw(bar: ProgressBar, live: Arc<Live>, warmup: Duration, total: Duration) {
    let started = Instant::now();
    let mut last = (started, 0u64);
    let mut ticker = tokio::time::interval(TICK);
    loop {
        ticker.tick().await;
        let now = Instant::now();
        let elapsed = now - started;
        let completed = live.completed.load(Ordering::Relaxed);
        let rate = (completed - last.1) as f64 / (now - last.0).as_secs_f64().max(1e-3);
        last = (now, completed);
        let phase = if elapsed < warmup {
            "warm-up"
        } else if elapsed < total {
            "measuring"
        } else {
            "draining"
        };
        bar.set_position(elapsed.min(total).as_millis() as u64);
        bar.set_message(format!(
            "{phase} {:.1}/{:.1}s  {} answers  {}/s  {} declined  {} errors",
            elapsed.as_secs_f64(),
            total.as_secs_f64(),
            thousands(completed),
            thousands(rate.round() as u64),
            thousands(live.declined.load(Ordering::Relaxed)),
            thousands(live.errors.load(Ordering::Relaxed)),
        ));
    }
}
