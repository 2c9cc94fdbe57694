//! The per-node demand signal (issue 10 item 4): a real node publishes a `DemandReport` on
//! `shoal.node.<node>.demand` every tick, with per job the arrival-rate EWMA and the
//! staged-but-unfolded backlog, and the work-queue consumer's `num_pending`. The operator reads
//! the same subject (`operator/src/demand.rs`).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::{Duration, Instant};

use futures::StreamExt;
use shoal_client::UpdateRequest;
use shoal_functions::{ClientId, DType, JobId, RoundId, UpdateKind};
use shoal_proto::cluster::DemandReport;
use shoal_runtime::jobs;
use shoal_testkit::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_reports_arrivals_backlog_and_the_undelivered_queue() {
    init_logging();
    let nats = NatsServer::start().unwrap();
    // Two updates in flight at most (the rest wait in the work queue: num_pending), each folded
    // slowly (a backlog builds up).
    let node = NodeProcess::start(
        &nats.url(),
        "d1",
        &["--ack-wait-ms", "30000", "--max-ack-pending", "2", "--fold-delay-ms", "1500"],
    )
    .await;
    let client = connect(&nats.url()).await;
    let mut reports = client.connection().client.subscribe("shoal.node.d1.demand").await.unwrap();
    let m = manifest(&[("w", DType::F32, &[8])]);
    let job = JobId::new("dem").unwrap();
    let spec = job_spec("dem", (*m).clone(), 2, 2, 6_000, 2);
    jobs::create_job(&infra_of(&client).await, &spec, None).await.unwrap();
    let state = client.wait_for_open_round(&job, RoundId(1), Duration::from_secs(30)).await.unwrap();
    for c in 0..6u64 {
        client
            .publish_update(UpdateRequest {
                job: job.clone(),
                client: ClientId::new(format!("c{c}")).unwrap(),
                round: state.round,
                base_version: state.model_version,
                num_examples: 1,
                kind: UpdateKind::Parameters,
                payload: payload(&m, &as_sent(&m, &random_values(&m, c))),
                force_upload: false,
            })
            .await
            .unwrap();
    }

    // What the reports said, until the round closed and the queue drained.
    let (mut max_pending, mut max_backlog, mut max_rate) = (0, 0, 0.0f64);
    let mut idle = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while idle.is_none() {
        assert!(Instant::now() < deadline, "reports never settled; log:\n{}", node.log());
        let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(10), reports.next()).await else {
            panic!("no demand report for 10 s (every 2 s expected); log:\n{}", node.log());
        };
        let r: DemandReport = shoal_proto::decode("demand report", &msg.payload).unwrap();
        assert_eq!(r.node.as_str(), "d1");
        max_pending = max_pending.max(r.num_pending);
        let Some(j) = r.jobs.iter().find(|j| j.job == job) else { continue };
        assert!(j.arrivals_per_second.is_finite() && j.arrivals_per_second >= 0.0, "{r:?}");
        assert_eq!(j.hosts, 1, "the node's own function host");
        max_backlog = max_backlog.max(j.backlog);
        max_rate = max_rate.max(j.arrivals_per_second);
        let settled = client.job_state(&job).await.unwrap().round > RoundId(1);
        if settled && r.num_pending == 0 && j.backlog == 0 && max_backlog > 0 {
            idle = Some(j.arrivals_per_second);
        }
    }
    // 6 published, 2 delivered (max_ack_pending): the other 4 waited undelivered.
    assert_eq!(max_pending, 4, "num_pending counts the undelivered updates, not the held ones");
    assert!((1..=2).contains(&max_backlog), "backlog {max_backlog}: at most the two delivered updates");
    assert!(max_rate > 0.0, "arrivals were reported");
    let idle = idle.unwrap();
    assert!(idle < max_rate, "the rate decays once updates stop arriving ({idle} vs {max_rate})");
}
