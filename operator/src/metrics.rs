//! The operator's Prometheus metrics (served on `/metrics`). Label values are bounded: error
//! kinds and rejection reasons are `&'static str`; `job` and `node` are the cluster's jobs and
//! nodes.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::demand::ReportRejected;

/// `{error}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ErrorLabels {
    /// An [`crate::error::ErrorKind`] label.
    pub error: &'static str,
}

/// `{result}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ResultLabels {
    /// `accepted` or a [`ReportRejected`] label.
    pub result: &'static str,
}

/// `{namespace, job}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct JobLabels {
    /// The FederatedJob's namespace.
    pub namespace: String,
    /// The job id.
    pub job: String,
}

/// `{namespace, job, node}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct NodeLabels {
    /// The FederatedJob's namespace.
    pub namespace: String,
    /// The job id.
    pub job: String,
    /// The node.
    pub node: String,
}

/// Every metric of the operator, registered in [`Metrics::registry`].
#[derive(Debug)]
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    /// `shoal_operator_reconciliations_total`.
    pub reconciliations: Counter,
    /// `shoal_operator_reconcile_failures_total{error}`.
    pub failures: Family<ErrorLabels, Counter>,
    /// `shoal_operator_reconcile_duration_seconds`.
    pub duration: Histogram,
    /// `shoal_operator_demand_reports_total{result}`.
    pub demand_reports: Family<ResultLabels, Counter>,
    /// `shoal_operator_desired_hosts{namespace,job,node}`.
    pub desired_hosts: Family<NodeLabels, Gauge>,
    /// `shoal_operator_staged_backlog_updates{namespace,job}`: staged-but-unfolded updates, all
    /// nodes (R2.3, apart from `num_pending`).
    pub staged_backlog: Family<JobLabels, Gauge>,
    /// `shoal_operator_work_queue_pending_updates`: the work queue's `num_pending` (R2.3).
    pub num_pending: Gauge,
    /// `shoal_operator_autoscaler_panic{namespace,job}`: 1 in panic mode.
    pub panic: Family<JobLabels, Gauge>,
    /// `shoal_operator_leader`: 1 while this replica holds the leader lease.
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("shoal_operator");
        let reconciliations = Counter::default();
        registry.register("reconciliations", "FederatedJob reconciliations", reconciliations.clone());
        let failures = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_failures",
            "Reconciliations that failed, by error kind",
            failures.clone(),
        );
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        registry.register("reconcile_duration_seconds", "Time of one reconciliation", duration.clone());
        let demand_reports = Family::<ResultLabels, Counter>::default();
        registry.register(
            "demand_reports",
            "Node demand reports received, by result",
            demand_reports.clone(),
        );
        let desired_hosts = Family::<NodeLabels, Gauge>::default();
        registry.register(
            "desired_hosts",
            "Function hosts asked for per job and node",
            desired_hosts.clone(),
        );
        let staged_backlog = Family::<JobLabels, Gauge>::default();
        registry.register(
            "staged_backlog_updates",
            "Updates staged on nodes and not yet folded, per job",
            staged_backlog.clone(),
        );
        let num_pending = Gauge::default();
        registry.register(
            "work_queue_pending_updates",
            "Updates in the work queue not yet delivered to any gateway (num_pending)",
            num_pending.clone(),
        );
        let panic = Family::<JobLabels, Gauge>::default();
        registry.register("autoscaler_panic", "1 while a job's autoscaler is in panic mode", panic.clone());
        let leader = Gauge::default();
        registry.register("leader", "1 while this replica holds the leader lease", leader.clone());
        Metrics {
            registry,
            reconciliations,
            failures,
            duration,
            demand_reports,
            desired_hosts,
            staged_backlog,
            num_pending,
            panic,
            leader,
        }
    }
}

impl Metrics {
    /// Counts one demand report.
    pub fn demand_report(&self, rejected: Option<ReportRejected>) {
        let result = rejected.map_or("accepted", ReportRejected::as_str);
        self.demand_reports.get_or_create(&ResultLabels { result }).inc();
    }

    /// Counts a failed reconciliation.
    pub fn failure(&self, kind: crate::error::ErrorKind) {
        self.failures.get_or_create(&ErrorLabels { error: kind.as_str() }).inc();
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
