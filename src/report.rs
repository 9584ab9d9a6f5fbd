//! The reconciliation report over the protocol (`REPORT`, `docs/PROTOCOL.md`;
//! `docs/RECONCILIATION.md`, "Over the protocol").
//!
//! A report is built as `settlegate report` builds it, from the data directory by replay
//! (`settlegate_engine::report::report`, which writes nothing and reaches no provider), in a
//! blocking task: off the shard threads and the connection threads. One build at a time: a
//! request that would start another while one runs is answered `BUSY`. The last build (one
//! business day, every provider's rows, rendered as CSV lines) is kept for [`CACHE_MS`], so
//! that the pages of one day come from one build, and a partner paging through a day costs one
//! replay.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use settlegate_engine::report::{Report, ITEMS_HEADER, SUMMARY_HEADER};
use settlegate_engine::{EngineError, ReasonCode};
use settlegate_protocol::ops::report::{GetReport, ReportPage, ReportPart};

/// How long a build serves the requests for its business day.
pub const CACHE_MS: u64 = 30_000;

/// The retry-after hint of the `BUSY` answer while a build runs.
pub const BUSY_RETRY_AFTER_MS: u32 = 500;

/// The reports a server makes: one build at a time, the last one kept.
pub struct Reports {
    state: Arc<Mutex<State>>,
    keep: Duration,
}

#[derive(Default)]
struct State {
    building: bool,
    last: Option<Arc<Built>>,
}

/// One business day's report, every provider's, as CSV lines.
struct Built {
    day: String,
    generated_ms: i64,
    at: Instant,
    by_provider: BTreeMap<u32, Lines>,
}

#[derive(Default)]
struct Lines {
    summary: Vec<String>,
    items: Vec<String>,
}

impl Built {
    fn new(day: String, generated_ms: i64, report: Report) -> Built {
        let mut own: BTreeMap<u32, Report> = BTreeMap::new();
        for item in report.items {
            own.entry(item.provider_code).or_default().items.push(item);
        }
        let by_provider = own
            .into_iter()
            .map(|(code, own)| {
                (code, Lines { summary: own.summary_lines(), items: own.items_lines() })
            })
            .collect();
        Built { day, generated_ms, at: Instant::now(), by_provider }
    }

    fn page(&self, request: &GetReport) -> Result<ReportPage, EngineError> {
        let none = Lines::default();
        let lines = self.by_provider.get(&request.provider_code).unwrap_or(&none);
        let (header, lines) = match request.part {
            ReportPart::Summary => (SUMMARY_HEADER, &lines.summary),
            ReportPart::Items => (ITEMS_HEADER, &lines.items),
        };
        let total = u32::try_from(lines.len()).unwrap_or(u32::MAX);
        let from = lines.len().min(request.offset as usize);
        let page =
            ReportPage::fill(self.generated_ms, total, header, &lines[from..], request.rows_max);
        if page.lines.is_empty() && from < lines.len() {
            return Err(EngineError::Storage("a report row longer than a frame".into()));
        }
        Ok(page)
    }
}

/// Clears `building` when the build ends, however it ends.
struct Building(Arc<Mutex<State>>);

impl Drop for Building {
    fn drop(&mut self) {
        lock(&self.0).building = false;
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Default for Reports {
    fn default() -> Reports {
        Reports::keeping(Duration::from_millis(CACHE_MS))
    }
}

impl Reports {
    /// Reports whose builds serve their day for `keep`.
    pub fn keeping(keep: Duration) -> Reports {
        Reports { state: Arc::default(), keep }
    }

    /// The page `request` asks for: from the last build if it is of that day and recent,
    /// else from a new build by `build` (the report of the whole data directory, made at
    /// `now_ms`), run in a blocking task; `BUSY` while another build runs.
    pub async fn page(
        &self,
        request: &GetReport,
        now_ms: i64,
        build: impl FnOnce() -> Result<Report, EngineError> + Send + 'static,
    ) -> Result<ReportPage, EngineError> {
        {
            let mut state = lock(&self.state);
            match &state.last {
                Some(last) if last.day == request.business_day && last.at.elapsed() < self.keep => {
                    return last.page(request);
                }
                _ if state.building => {
                    return Err(EngineError::Busy { retry_after_ms: BUSY_RETRY_AFTER_MS });
                }
                _ => state.building = true,
            }
        }
        let building = Building(Arc::clone(&self.state));
        let day = request.business_day.clone();
        let task = tokio::task::spawn_blocking(move || {
            let building = building;
            let started = Instant::now();
            let report = build()?.on_day(&day);
            let items = report.items.len();
            let built = Arc::new(Built::new(day, now_ms, report));
            let elapsed_ms = started.elapsed().as_millis() as u64;
            tracing::info!(day = %built.day, items, elapsed_ms, "reconciliation report built");
            lock(&building.0).last = Some(Arc::clone(&built));
            Ok::<_, EngineError>(built)
        });
        let built = match task.await {
            Ok(Ok(built)) => built,
            Ok(Err(error)) => {
                tracing::error!(%error, "the reconciliation report could not be made");
                return Err(EngineError::Storage(
                    "the report could not be made (the server's log says why)".into(),
                ));
            }
            Err(error) => {
                tracing::error!(%error, "the reconciliation report's build failed");
                return Err(EngineError::Storage("the report's build failed".into()));
            }
        };
        built.page(request)
    }
}

/// Whether a server on `config` can make reports: it keeps a data directory (not in memory
/// only; a cluster node keeps none). If not, `REPORT` is refused with
/// [`ReasonCode::ReportUnavailable`].
pub fn available(config: &settlegate_engine::EngineConfig) -> Result<(), EngineError> {
    match config.durability.data_dir {
        Some(_) => Ok(()),
        None => Err(EngineError::Refused(ReasonCode::ReportUnavailable)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(day: &str, offset: u32, rows_max: u16) -> GetReport {
        GetReport {
            business_day: day.into(),
            provider_code: 1,
            part: ReportPart::Items,
            offset,
            rows_max,
        }
    }

    /// One build at a time (another request is `BUSY` meanwhile), its day served from it
    /// until it is too old.
    #[tokio::test]
    async fn one_build_at_a_time_and_its_day_kept() {
        let reports = Arc::new(Reports::keeping(Duration::from_millis(300)));
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let builds = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&builds);
        let first = {
            let reports = Arc::clone(&reports);
            tokio::spawn(async move {
                reports
                    .page(&request("2026-11-22", 0, 10), 1, move || {
                        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        wait.recv().unwrap();
                        Ok(Report::default())
                    })
                    .await
            })
        };
        while !lock(&reports.state).building {
            tokio::task::yield_now().await;
        }
        let busy = reports.page(&request("2026-11-23", 0, 10), 2, || unreachable!()).await;
        assert!(matches!(busy, Err(EngineError::Busy { retry_after_ms: BUSY_RETRY_AFTER_MS })));
        release.send(()).unwrap();
        let page = first.await.unwrap().unwrap();
        assert_eq!((page.generated_ms, page.total, page.lines.len()), (1, 0, 0));
        assert_eq!(page.header, ITEMS_HEADER);
        // The same day again: from the build.
        let again = reports.page(&request("2026-11-22", 5, 10), 3, || unreachable!()).await;
        assert_eq!(again.unwrap().generated_ms, 1);
        // Another day, or the same once the build is too old: a new build.
        let other = request("2026-11-23", 0, 10);
        let page = reports.page(&other, 4, || Ok(Report::default())).await;
        assert_eq!(page.unwrap().generated_ms, 4);
        tokio::time::sleep(Duration::from_millis(350)).await;
        let page = reports.page(&other, 5, || Ok(Report::default())).await;
        assert_eq!(page.unwrap().generated_ms, 5);
        assert_eq!(builds.load(std::sync::atomic::Ordering::SeqCst), 1);
        // A build that fails is an error, and frees the way for the next.
        let failed = reports
            .page(&request("2026-11-24", 0, 10), 6, || Err(EngineError::Storage("x".into())))
            .await;
        assert!(matches!(failed, Err(EngineError::Storage(_))));
        assert!(!lock(&reports.state).building);
    }
}
