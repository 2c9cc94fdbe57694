//! The demand signal: every node's gateway publishes a [`DemandReport`] on
//! `<prefix>.node.<node>.demand` each tick (R2.3: the work queue's `num_pending`, and per job the
//! arrival-rate EWMA and the staged-but-unfolded backlog). [`DemandBook`] keeps the latest
//! report of each node; [`DemandBook::observe`] turns the fresh ones into the autoscaler's
//! per-node observations for one job. [`subscribe`] is the NATS side.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use shoal_proto::cluster::DemandReport;
use shoal_proto::subjects::Subjects;
use shoal_proto::JobId;
use tokio_util::sync::CancellationToken;

use crate::autoscaler::NodeObservation;
use crate::metrics::Metrics;
use crate::node::NodeName;

/// Why a demand report was not recorded (a bounded metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportRejected {
    /// Not a msgpack `DemandReport` of this protocol version.
    Malformed,
    /// The node id is not a Kubernetes node name, so no Deployment could be pinned to it.
    InvalidNode,
    /// The subject's node token differs from the report's node.
    SubjectMismatch,
}

impl ReportRejected {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ReportRejected::Malformed => "malformed",
            ReportRejected::InvalidNode => "invalid_node",
            ReportRejected::SubjectMismatch => "subject_mismatch",
        }
    }
}

/// What the fresh reports say about one job.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JobDemandView {
    /// One observation per freshly reporting node (zeros where the node does not serve the
    /// job): the autoscaler's cluster for round-robin, and where fit strategies may place.
    pub nodes: Vec<NodeObservation>,
    /// The work queue's `num_pending` (the largest fresh value; the same cluster-wide number
    /// from every node). The stream is shared by every job, so this is attributed to each job.
    pub num_pending: u64,
    /// Fresh reports in all.
    pub reporting_nodes: usize,
    /// Fresh reports that list this job.
    pub nodes_serving_job: usize,
}

/// The latest demand report of every node.
#[derive(Debug, Default)]
pub struct DemandBook {
    latest: RwLock<BTreeMap<NodeName, (Instant, DemandReport)>>,
}

impl DemandBook {
    /// Records `report` received at `at` on `subject` (`None`: subject not checked).
    ///
    /// # Errors
    /// [`ReportRejected`] when the node is not a Kubernetes node name or does not match the
    /// subject's node token.
    pub fn record(
        &self,
        subject: Option<&str>,
        report: DemandReport,
        at: Instant,
    ) -> Result<(), ReportRejected> {
        let node = NodeName::new(report.node.as_str()).map_err(|_| ReportRejected::InvalidNode)?;
        if let Some(subject) = subject {
            let token = subject.split('.').rev().nth(1);
            if token != Some(report.node.as_str()) {
                return Err(ReportRejected::SubjectMismatch);
            }
        }
        if let Ok(mut latest) = self.latest.write() {
            latest.insert(node, (at, report));
        }
        Ok(())
    }

    /// Decodes and records one message's payload.
    ///
    /// # Errors
    /// As [`DemandBook::record`], and [`ReportRejected::Malformed`].
    pub fn record_bytes(&self, subject: &str, payload: &[u8], at: Instant) -> Result<(), ReportRejected> {
        let report: DemandReport =
            shoal_proto::decode("demand report", payload).map_err(|_| ReportRejected::Malformed)?;
        self.record(Some(subject), report, at)
    }

    /// The fresh reports (received less than `stale_after` before `now`) as observations of
    /// `job`.
    pub fn observe(&self, job: &JobId, now: Instant, stale_after: Duration) -> JobDemandView {
        let mut view = JobDemandView::default();
        let Ok(latest) = self.latest.read() else { return view };
        for (node, (at, report)) in latest.iter() {
            if now.saturating_duration_since(*at) >= stale_after {
                continue;
            }
            view.reporting_nodes += 1;
            view.num_pending = view.num_pending.max(report.num_pending);
            let mine = report.jobs.iter().find(|j| j.job == *job);
            if mine.is_some() {
                view.nodes_serving_job += 1;
            }
            view.nodes.push(NodeObservation {
                node: node.clone(),
                arrivals_per_second: mine
                    .map(|j| j.arrivals_per_second)
                    .filter(|r| r.is_finite() && *r > 0.0)
                    .unwrap_or(0.0),
                backlog: mine.map_or(0, |j| j.backlog),
            });
        }
        view
    }
}

/// Subscribes to every node's demand reports and records them in `book` until `cancel`.
///
/// # Errors
/// The subscription's NATS error.
pub async fn subscribe(
    client: async_nats::Client,
    subjects: &Subjects,
    book: Arc<DemandBook>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, async_nats::SubscribeError> {
    let mut sub = client.subscribe(subjects.all_demand()).await?;
    Ok(tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                () = cancel.cancelled() => break,
                msg = sub.next() => match msg { Some(m) => m, None => break },
            };
            let result = book.record_bytes(msg.subject.as_str(), &msg.payload, Instant::now());
            metrics.demand_report(result.err());
        }
    }))
}

#[cfg(test)]
mod tests {
    use shoal_proto::cluster::JobDemand;
    use shoal_proto::NodeId;

    use super::*;

    fn report(node: &str, jobs: &[(&str, f64, u64)], pending: u64) -> DemandReport {
        DemandReport {
            node: NodeId::new(node).unwrap(),
            at_ms: 0,
            num_pending: pending,
            jobs: jobs
                .iter()
                .map(|(j, r, b)| JobDemand {
                    job: JobId::new(*j).unwrap(),
                    arrivals_per_second: *r,
                    backlog: *b,
                    hosts: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn fresh_reports_become_observations_of_one_job() {
        let book = DemandBook::default();
        let t0 = Instant::now();
        let stale = Duration::from_secs(6);
        book.record(None, report("node-a", &[("j", 20.0, 5), ("k", 1.0, 0)], 3), t0).unwrap();
        book.record(None, report("node-b", &[("k", 2.0, 1)], 7), t0).unwrap();
        book.record(None, report("node-c", &[("j", f64::NAN, 2)], 1), t0 - Duration::from_secs(10)).ok();
        let view = book.observe(&JobId::new("j").unwrap(), t0 + Duration::from_secs(1), stale);
        assert_eq!(view.reporting_nodes, 2, "node-c's report was stale");
        assert_eq!(view.nodes_serving_job, 1);
        assert_eq!(view.num_pending, 7);
        let nodes: Vec<(&str, f64, u64)> =
            view.nodes.iter().map(|n| (n.node.as_str(), n.arrivals_per_second, n.backlog)).collect();
        assert_eq!(nodes, [("node-a", 20.0, 5), ("node-b", 0.0, 0)]);
        // A NaN rate is read as no arrivals.
        book.record(None, report("node-c", &[("j", f64::NAN, 2)], 1), t0).unwrap();
        let view = book.observe(&JobId::new("j").unwrap(), t0, stale);
        assert_eq!(view.nodes[2].arrivals_per_second, 0.0);
    }

    #[test]
    fn bad_reports_are_rejected_not_recorded() {
        let book = DemandBook::default();
        let t0 = Instant::now();
        assert_eq!(
            book.record_bytes("shoal.node.a.demand", b"\x00garbage", t0),
            Err(ReportRejected::Malformed)
        );
        let upper = shoal_proto::encode(&report("Node_A", &[], 0));
        assert_eq!(
            book.record_bytes("shoal.node.Node_A.demand", &upper, t0),
            Err(ReportRejected::InvalidNode)
        );
        let spoof = shoal_proto::encode(&report("node-a", &[], 0));
        assert_eq!(
            book.record_bytes("shoal.node.node-b.demand", &spoof, t0),
            Err(ReportRejected::SubjectMismatch)
        );
        assert_eq!(book.record_bytes("shoal.node.node-a.demand", &spoof, t0), Ok(()));
        assert_eq!(book.observe(&JobId::new("j").unwrap(), t0, Duration::from_secs(1)).reporting_nodes, 1);
    }
}
