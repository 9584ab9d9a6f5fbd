//! Prometheus metrics, served as text on `/metrics`.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use settlegate_types::histogram::HistogramSnapshot;

/// A batch's counts by label set, added to their family once per label set: one lock and one
/// lookup in the family for each, instead of one per request.
#[derive(Debug)]
pub struct BatchCounts<L> {
    counts: Vec<(L, u64)>,
}

impl<L> Default for BatchCounts<L> {
    fn default() -> Self {
        BatchCounts { counts: Vec::new() }
    }
}

impl<L: Clone + std::hash::Hash + Eq> BatchCounts<L> {
    /// Counts one under `labels`.
    pub fn add(&mut self, labels: L) {
        match self.counts.iter_mut().find(|(known, _)| *known == labels) {
            Some((_, n)) => *n += 1,
            None => self.counts.push((labels, 1)),
        }
    }

    /// Adds the counts to `family`.
    pub fn flush(self, family: &Family<L, Counter>) {
        for (labels, n) in self.counts {
            family.get_or_create(&labels).inc_by(n);
        }
    }
}

/// Labels of a request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Operation name.
    pub op: &'static str,
    /// Response status name.
    pub status: &'static str,
}

/// Labels of an authorization outcome counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `approved` or `declined`.
    pub result: &'static str,
    /// The decline's reason by name (`replayed_nonce`), `none` for approvals.
    pub reason: &'static str,
}

/// A reason code's name as a label value: its variant in snake case (`ReplayedNonce` →
/// `replayed_nonce`).
pub fn reason_name(reason: settlegate_engine::ReasonCode) -> &'static str {
    use std::sync::OnceLock;
    static NAMES: OnceLock<Vec<(u16, &'static str)>> = OnceLock::new();
    let names = NAMES.get_or_init(|| {
        settlegate_engine::ReasonCode::ALL
            .iter()
            .map(|reason| {
                let mut name = String::new();
                for (i, c) in format!("{reason:?}").chars().enumerate() {
                    if c.is_ascii_uppercase() && i > 0 {
                        name.push('_');
                    }
                    name.push(c.to_ascii_lowercase());
                }
                // Once per reason code, for the process's life.
                (reason.code(), &*Box::leak(name.into_boxed_str()))
            })
            .collect()
    });
    names.iter().find(|(code, _)| *code == reason.code()).map_or("unknown", |(_, name)| name)
}

/// Labels of a request's latency.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    /// Operation name.
    pub op: &'static str,
}

/// Labels of the connections gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// `unauthenticated`, `authenticated` or `draining`.
    pub state: &'static str,
}

/// Labels of a frame error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FrameErrorLabels {
    /// Frame error kind number.
    pub kind: u16,
}

/// Labels of `settlegate_build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    /// The crate's version.
    pub version: &'static str,
}

/// The process's own figures, read from `/proc` on each scrape (Linux; nothing elsewhere):
/// the usual `process_*` series.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(process) = process_figures() else { return Ok(()) };
        let figures: [(&str, &str, f64, MetricType); 4] = [
            ("cpu_seconds", "User and system CPU time", process.cpu_seconds, MetricType::Counter),
            ("resident_memory_bytes", "Resident memory", process.rss_bytes, MetricType::Gauge),
            ("open_fds", "Open file descriptors", process.open_fds, MetricType::Gauge),
            (
                "start_time_seconds",
                "Start time, seconds since the epoch",
                process.start_time,
                MetricType::Gauge,
            ),
        ];
        for (name, help, value, kind) in figures {
            let name = format!("process_{name}");
            match kind {
                MetricType::Counter => {
                    let metric = encoder.encode_descriptor(&name, help, None, kind)?;
                    ConstCounter::new(value).encode(metric)?;
                }
                _ => {
                    let metric = encoder.encode_descriptor(&name, help, None, kind)?;
                    ConstGauge::new(value).encode(metric)?;
                }
            }
        }
        Ok(())
    }
}

/// What `/proc/self` says of this process.
struct ProcessFigures {
    cpu_seconds: f64,
    rss_bytes: f64,
    open_fds: f64,
    start_time: f64,
}

fn process_figures() -> Option<ProcessFigures> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the command name, which may hold spaces: it ends at the last ')'.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<f64>().ok();
    let ticks = 100.0; // USER_HZ on Linux
    let page = 4096.0;
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("btime ")?.trim().parse::<f64>().ok())?;
    let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as f64;
    Some(ProcessFigures {
        cpu_seconds: (field(14)? + field(15)?) / ticks,
        rss_bytes: field(24)? * page,
        open_fds,
        start_time: boot + field(22)? / ticks,
    })
}

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    /// Requests by operation and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Authorization outcomes.
    pub outcomes: Family<OutcomeLabels, Counter>,
    /// Connections open now.
    pub connections_open: Gauge,
    /// Connections closed at once because the limit was reached.
    pub connections_rejected: Counter,
    /// Frames rejected, by error kind.
    pub frame_errors: Family<FrameErrorLabels, Counter>,
    /// Authorize requests per engine batch.
    pub authorize_batch_size: Histogram,
    /// Time from a request's read to its answer, by operation, in seconds.
    pub request_duration: Family<OpLabels, Histogram, fn() -> Histogram>,
    /// Open connections by state.
    pub connections: Family<ConnectionLabels, Gauge>,
}

/// A latency histogram of `settlegate_types::histogram`'s buckets (50 µs to 6.55 s).
fn latency_histogram() -> Histogram {
    Histogram::new(settlegate_types::histogram::LATENCY_BOUNDS.iter().copied())
}

impl Default for Metrics {
    fn default() -> Self {
        // The process's series go unprefixed (`process_*`, as every exporter names them),
        // the server's under `settlegate_`.
        let mut root = Registry::default();
        root.register_collector(Box::new(ProcessCollector));
        let registry = root.sub_registry_with_prefix("settlegate");
        let requests = Family::<RequestLabels, Counter>::default();
        let outcomes = Family::<OutcomeLabels, Counter>::default();
        let connections_open = Gauge::default();
        let connections_rejected = Counter::default();
        let frame_errors = Family::<FrameErrorLabels, Counter>::default();
        let authorize_batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 13));
        registry.register(
            "requests",
            "Protocol requests by operation and status",
            requests.clone(),
        );
        registry.register("authorizations", "Authorization outcomes", outcomes.clone());
        registry.register(
            "connections_open",
            "Open protocol connections",
            connections_open.clone(),
        );
        registry.register(
            "connections_rejected",
            "Connections closed at once at the connection limit",
            connections_rejected.clone(),
        );
        registry.register("frame_errors", "Frames rejected, by kind", frame_errors.clone());
        registry.register(
            "authorize_batch_size",
            "Authorize requests handed to the engine together",
            authorize_batch_size.clone(),
        );
        let request_duration =
            Family::<OpLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        registry.register(
            "request_duration_seconds",
            "Time from a request's read to its answer, by operation",
            request_duration.clone(),
        );
        let connections = Family::<ConnectionLabels, Gauge>::default();
        registry.register(
            "connections",
            "Open protocol connections by state (unauthenticated, authenticated, draining)",
            connections.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION") }).set(1);
        registry.register("build_info", "The running build (always 1)", build_info);
        Metrics {
            registry: root,
            requests,
            outcomes,
            connections_open,
            connections_rejected,
            frame_errors,
            authorize_batch_size,
            request_duration,
            connections,
        }
    }
}

impl Metrics {
    /// Every metric, with those `engine` keeps itself read on each scrape.
    pub fn for_engine(engine: &settlegate_engine::Engine) -> Metrics {
        let mut metrics = Metrics::default();
        let registry = metrics.registry.sub_registry_with_prefix("settlegate");
        registry.register_collector(Box::new(EngineCounters(engine.clone())));
        metrics
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String does not fail");
        out
    }
}

/// A gauge of a cluster partition's standing.
type PartitionGauge = fn(&settlegate_engine::cluster::PartitionStatus) -> i64;
/// Picks one of a partition's append histograms.
type AppendHistogram = fn(&settlegate_engine::cluster::AppendFigures) -> &HistogramSnapshot;

/// The counters the engine keeps, read when scraped.
struct EngineCounters(settlegate_engine::Engine);

impl std::fmt::Debug for EngineCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EngineCounters")
    }
}

/// A gauge's or counter's series: labels and value.
type Series = Vec<(Vec<(&'static str, String)>, f64)>;

/// Encodes a family of gauges (or counters) `name`, one series each.
fn encode_values(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    series: Series,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in series {
        let metric = family.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(value).encode(metric)?,
            _ => ConstGauge::new(value).encode(metric)?,
        }
    }
    Ok(())
}

/// Encodes a family of histograms `name`, one series each.
fn encode_histograms(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: Vec<(Vec<(&'static str, String)>, HistogramSnapshot)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, snapshot) in series {
        // The encoder takes each bucket's own count and adds them up itself, where a snapshot's
        // are cumulative already; and it writes `+Inf` for the largest float.
        let mut below = 0;
        let buckets: Vec<(f64, u64)> = snapshot
            .buckets
            .iter()
            .map(|&(bound, cumulative)| {
                let own = cumulative - below;
                below = cumulative;
                (if bound.is_infinite() { f64::MAX } else { bound }, own)
            })
            .collect();
        family
            .encode_family(&labels)?
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                snapshot.sum,
                snapshot.count,
                &buckets,
                None,
            )?;
    }
    Ok(())
}

impl EngineCounters {
    /// Each provider's link, breaker, calls in flight, timeouts, reversals pending and call
    /// latency. A provider whose adapter has no link (the simulator) is up, its breaker closed.
    fn encode_providers(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let providers = self.0.provider_states();
        let labels = |p: &settlegate_engine::ProviderState| {
            vec![("provider", p.code.to_string()), ("name", p.name.clone())]
        };
        type Figure = fn(&settlegate_engine::ProviderState) -> f64;
        let figures: [(&str, &str, MetricType, Figure); 5] = [
            (
                "provider_link_up",
                "1 while requests reach the provider (signed on, breaker closed)",
                MetricType::Gauge,
                |p| f64::from(u8::from(p.health.is_none_or(|h| h.link_up))),
            ),
            (
                "provider_breaker_open",
                "1 while the provider's circuit breaker is open",
                MetricType::Gauge,
                |p| f64::from(u8::from(p.health.is_some_and(|h| h.breaker_open))),
            ),
            ("provider_in_flight", "Calls to the provider in flight", MetricType::Gauge, |p| {
                p.in_flight as f64
            }),
            (
                "provider_timeouts",
                "Calls to the provider that timed out in its adapter",
                MetricType::Counter,
                |p| p.health.map_or(0.0, |h| h.timeouts as f64),
            ),
            (
                "provider_reversals_pending",
                "Reversals sent and neither acknowledged nor given up",
                MetricType::Gauge,
                |p| p.health.map_or(0.0, |h| h.reversals_pending as f64),
            ),
        ];
        for (name, help, kind, figure) in figures {
            let series = providers.iter().map(|p| (labels(p), figure(p))).collect();
            encode_values(encoder, name, help, kind, series)?;
        }
        // Store and forward: what each provider is owed, as the forwarder's last round found.
        let owed = self.0.owed_by_provider();
        let queue = |p: &settlegate_engine::ProviderState| {
            owed.iter()
                .find(|q| q.provider_code == p.code)
                .map_or((0, 0), |q| (q.depth, q.oldest_age_ms))
        };
        let depth = providers.iter().map(|p| (labels(p), queue(p).0 as f64)).collect();
        encode_values(
            encoder,
            "provider_owed_operations",
            "Captures, voids, refunds and reversals owed to the provider, not yet acknowledged",
            MetricType::Gauge,
            depth,
        )?;
        let age = providers.iter().map(|p| (labels(p), queue(p).1 as f64 / 1000.0)).collect();
        encode_values(
            encoder,
            "provider_owed_oldest_age_seconds",
            "How long the oldest operation owed to the provider has waited (0: none owed)",
            MetricType::Gauge,
            age,
        )?;
        let latency = providers.iter().map(|p| (labels(p), p.latency.clone())).collect();
        encode_histograms(
            encoder,
            "provider_call_duration_seconds",
            "Time of a call to the provider, from its permit to the answer or the timeout",
            latency,
        )
    }

    /// Each shard's queue depth and `BUSY` answers, and its log writer's fsyncs and groups.
    fn encode_shards(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let shards = self.0.shard_loads();
        let label = |i: usize| vec![("shard", i.to_string())];
        let queued = shards.iter().enumerate().map(|(i, s)| (label(i), s.queued as f64)).collect();
        encode_values(
            encoder,
            "shard_queue_depth",
            "Batches waiting in the shard's mailbox",
            MetricType::Gauge,
            queued,
        )?;
        let busy = shards.iter().enumerate().map(|(i, s)| (label(i), s.busy as f64)).collect();
        encode_values(
            encoder,
            "shard_busy",
            "Batches refused BUSY, the shard's mailbox full",
            MetricType::Counter,
            busy,
        )?;
        let fsync = shards
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((label(i), s.fsync.clone()?)))
            .collect();
        encode_histograms(
            encoder,
            "wal_fsync_duration_seconds",
            "Time of a log writer's fsync",
            fsync,
        )?;
        let groups = shards
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((label(i), s.group_records.clone()?)))
            .collect();
        encode_histograms(encoder, "wal_group_records", "Records written per group commit", groups)
    }
}

impl Collector for EngineCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let dropped = ConstCounter::new(self.0.completions_dropped());
        let metric = encoder.encode_descriptor(
            "completions_dropped",
            "Providers' completions dropped because their idempotency record was gone or \
             replaced (each payment declined as a provider timeout; an approval is reversed)",
            None,
            dropped.metric_type(),
        )?;
        dropped.encode(metric)?;
        self.encode_providers(&mut encoder)?;
        self.encode_shards(&mut encoder)?;
        let Some(partitions) = self.0.cluster_status() else { return Ok(()) };
        let gauges: [(&str, &str, PartitionGauge); 3] = [
            (
                "cluster_partition_owned",
                "1 where this node owns the partition (admits its requests), else 0",
                |p| i64::from(p.role == settlegate_engine::cluster::Role::Owner),
            ),
            (
                "cluster_partition_applied",
                "The last sequence of the partition's stream applied on this node",
                |p| p.applied as i64,
            ),
            (
                "cluster_standby_lag",
                "A standby's lag behind its partition's stream, in messages (0 where this node owns it)",
                |p| p.lag as i64,
            ),
        ];
        for (name, help, value) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for partition in &partitions {
                let labels = [("partition", partition.partition.to_string())];
                let metric = family.encode_family(&labels)?;
                ConstGauge::new(value(partition)).encode(metric)?;
            }
        }
        let histograms: [(&str, &str, AppendHistogram); 4] = [
            (
                "cluster_append_ack_seconds",
                "From an append's publish to the stream's acknowledgement (replicated and synced)",
                |a| &a.ack,
            ),
            ("cluster_append_records", "Records per message appended", |a| &a.records),
            ("cluster_append_kib", "A message's size as published, in KiB", |a| &a.kib),
            (
                "cluster_append_in_flight",
                "Messages of the partition already in flight when one is published",
                |a| &a.in_flight,
            ),
        ];
        for (name, help, of) in histograms {
            let series = partitions
                .iter()
                .map(|p| (vec![("partition", p.partition.to_string())], of(&p.appends).clone()))
                .collect();
            encode_histograms(&mut encoder, name, help, series)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_is_exposed_with_cumulative_buckets_that_end_at_its_count() {
        let histogram = settlegate_types::histogram::Histogram::new(&[1.0, 2.0, 4.0]);
        for value in [0.5, 1.5, 1.5, 3.0, 9.0] {
            histogram.record(value);
        }
        struct One(HistogramSnapshot);
        impl std::fmt::Debug for One {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("One")
            }
        }
        impl Collector for One {
            fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
                let series = vec![(vec![("partition", "0".to_owned())], self.0.clone())];
                encode_histograms(&mut encoder, "h", "a histogram", series)
            }
        }
        let mut registry = Registry::default();
        registry.register_collector(Box::new(One(histogram.snapshot())));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let bucket = |le: &str| {
            let prefix = format!("h_bucket{{le=\"{le}\",partition=\"0\"}} ");
            let line =
                text.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("{text}"));
            line[prefix.len()..].parse::<u64>().unwrap()
        };
        assert_eq!([bucket("1.0"), bucket("2.0"), bucket("4.0"), bucket("+Inf")], [1, 3, 4, 5]);
        assert!(text.contains("h_count{partition=\"0\"} 5"), "{text}");
    }

    #[test]
    fn batch_counts_add_up_per_label_set() {
        let metrics = Metrics::default();
        let mut counts = BatchCounts::default();
        let ok = RequestLabels { op: "authorize", status: "ok" };
        let busy = RequestLabels { op: "authorize", status: "busy" };
        for labels in [&ok, &busy, &ok, &ok] {
            counts.add(labels.clone());
        }
        counts.flush(&metrics.requests);
        metrics.requests.get_or_create(&ok).inc();
        assert_eq!(metrics.requests.get_or_create(&ok).get(), 4);
        assert_eq!(metrics.requests.get_or_create(&busy).get(), 1);
    }
}
