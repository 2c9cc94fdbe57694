//! End to end against a real nats-server and a real `shoal node` process: FedAvg over several
//! rounds equals an independent f64 oracle, through both the inline and the upload paths;
//! a node SIGKILLed mid-round loses nothing and applies nothing twice.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use half::bf16;
use shoal_client::connect::ConnectOptions;
use shoal_client::{ShoalClient, Transport, UpdateRequest};
use shoal_functions::{ClientId, DType, JobId, ModelManifest, ModelVersion, RoundId, UpdateKind};
use shoal_proto::RoundOutcome;
use shoal_runtime::jobs;
use shoal_testkit::*;

fn manifest() -> Arc<ModelManifest> {
    shoal_testkit::manifest(&[
        ("fc.weight", DType::F32, &[64, 40]),
        ("fc.bias", DType::BF16, &[40]),
        ("steps", DType::I64, &[]),
    ])
}

/// Checks a committed model against the oracle: f32 within 1e-6 relative, bf16 within its own
/// rounding (half an ulp, 2^-9 relative, plus slack), integers exactly (round half to even).
fn assert_matches_oracle(model: &shoal_functions::Parameters, oracle: &[Vec<f64>]) {
    for (i, spec) in model.manifest().tensors().iter().enumerate() {
        let got = model.tensor_f64(i);
        for (e, (g, o)) in got.iter().zip(&oracle[i]).enumerate() {
            let ok = match spec.dtype {
                DType::F32 => (g - o).abs() <= 1e-6 * o.abs().max(1e-30),
                DType::BF16 => (g - bf16::from_f64(*o).to_f64()).abs() <= 4e-3 * o.abs().max(1e-30),
                _ => *g == o.round_ties_even(),
            };
            assert!(ok, "{}[{e}]: committed {g}, oracle {o}", spec.name);
        }
    }
}

async fn connect(url: &str) -> ShoalClient {
    ShoalClient::connect(&ConnectOptions { url: url.into(), ..Default::default() }).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedavg_three_rounds_eight_clients_matches_f64_oracle() {
    init_logging();
    let nats = NatsServer::start().unwrap();
    let node = NodeProcess::start(&nats.url(), "n1", &["--ack-wait-ms", "3000"]).await;
    let client = connect(&nats.url()).await;
    let m = manifest();
    let job = JobId::new("e2e").unwrap();
    let spec = job_spec("e2e", (*m).clone(), 8, 8, 60_000, 3);
    jobs::create_job(&shoal_testkit::infra_of(&client).await, &spec, None).await.unwrap();
    let mut events = client.connection().client.subscribe("shoal.e2e.round").await.unwrap();

    for round in 1..=3u64 {
        let state = client.wait_for_open_round(&job, RoundId(round), Duration::from_secs(30)).await.unwrap();
        assert_eq!(state.round, RoundId(round));
        assert_eq!(state.model_version, ModelVersion(round - 1));
        let mut sent = Vec::new();
        for c in 0..8u64 {
            let values = as_sent(&m, &random_values(&m, round * 100 + c));
            let n = 1 + (round * 37 + c * 101) % 900;
            let via = client
                .publish_update(UpdateRequest {
                    job: job.clone(),
                    client: ClientId::new(format!("client-{c}")).unwrap(),
                    round: state.round,
                    base_version: state.model_version,
                    num_examples: n,
                    kind: UpdateKind::Parameters,
                    payload: payload(&m, &values),
                    force_upload: c < 2,
                })
                .await
                .unwrap();
            assert_eq!(via, if c < 2 { Transport::Upload } else { Transport::Inline });
            sent.push((values, n as f64));
        }
        let after =
            client.wait_for_round_closed(&job, RoundId(round), Duration::from_secs(30)).await.unwrap();
        match after.last_outcome {
            Some(RoundOutcome::Committed { version, clients, total_weight }) => {
                assert_eq!(version, ModelVersion(round));
                assert_eq!(clients, 8);
                assert_eq!(total_weight, sent.iter().map(|(_, w)| w).sum::<f64>());
            }
            other => panic!("round {round} did not commit: {other:?}\n{}", node.log()),
        }
        let bytes = client.fetch_model(&job, ModelVersion(round)).await.unwrap();
        let model = shoal_functions::Parameters::from_safetensors(Arc::clone(&m), &bytes).unwrap();
        assert_matches_oracle(&model, &weighted_mean_oracle(&sent));
    }
    let state = client.job_state(&job).await.unwrap();
    assert_eq!(state.phase, shoal_proto::JobPhase::Finished);
    // Old versions are pruned: a sync job keeps the last 3 (1, 2, 3); version 0 is deleted.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while client.fetch_model(&job, ModelVersion(0)).await.is_ok() {
        assert!(std::time::Instant::now() < deadline, "version 0 was not pruned");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for v in 1..=3 {
        assert!(client.fetch_model(&job, ModelVersion(v)).await.is_ok(), "version {v} must be kept");
    }

    // Round events were published in order: opened/closed per round, then the job's end.
    let mut kinds = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), events.next()).await {
        let e: shoal_proto::RoundEvent = shoal_proto::decode("event", &m.payload).unwrap();
        kinds.push(match e {
            shoal_proto::RoundEvent::RoundOpened { round, .. } => format!("open{round}"),
            shoal_proto::RoundEvent::RoundClosed { round, .. } => format!("close{round}"),
            shoal_proto::RoundEvent::JobEnded { .. } => "end".into(),
        });
    }
    assert_eq!(kinds, ["open1", "close1", "open2", "close2", "open3", "close3", "end"]);

    // Every update was acked (the work queue is empty) and the settled uploads were purged.
    assert_stream_drains(&client, Duration::from_secs(10)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut uploads = shoal_testkit::infra_of(&client)
            .await
            .js
            .get_stream(shoal_proto::subjects::Subjects::default().uploads_stream(&job))
            .await
            .unwrap();
        let left = uploads.info().await.unwrap().state.messages;
        if left == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "upload chunks left behind: {left}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = node.metrics(&client.connection().client).await;
    assert_eq!(
        shoal_runtime::metrics::scrape(&metrics, "shoal_updates_staged_total"),
        Some(24.0),
        "{metrics}"
    );
    // The finished job's shared-memory segments are unmapped and unlinked.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let segments = || std::fs::read_dir(node.shm_dir()).map(|d| d.count()).unwrap_or(0);
    while segments() > 0 {
        assert!(std::time::Instant::now() < deadline, "segments left after the job ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // One aggregator was started on demand for round 1 and reused warm for rounds 2 and 3.
    assert_eq!(shoal_runtime::metrics::scrape(&metrics, "shoal_aggregator_cold_starts_total"), Some(1.0));
    assert_eq!(shoal_runtime::metrics::scrape(&metrics, "shoal_aggregator_warm_reuses_total"), Some(2.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_restarts_and_commits_the_same_model() {
    init_logging();
    let nats = NatsServer::start().unwrap();
    let mut node = NodeProcess::start(&nats.url(), "n1", &["--ack-wait-ms", "1500"]).await;
    let client = connect(&nats.url()).await;
    let m = manifest();
    let job = JobId::new("crash").unwrap();
    jobs::create_job(
        &shoal_testkit::infra_of(&client).await,
        &job_spec("crash", (*m).clone(), 6, 6, 120_000, 1),
        None,
    )
    .await
    .unwrap();
    let state = client.wait_for_open_round(&job, RoundId(1), Duration::from_secs(30)).await.unwrap();

    let mut sent = Vec::new();
    let publish = |c: u64| {
        let values = as_sent(&m, &random_values(&m, 7000 + c));
        let n = 10 + c * 13;
        let req = UpdateRequest {
            job: job.clone(),
            client: ClientId::new(format!("c{c}")).unwrap(),
            round: state.round,
            base_version: state.model_version,
            num_examples: n,
            kind: UpdateKind::Parameters,
            payload: payload(&m, &values),
            force_upload: c == 0,
        };
        (req, (values, n as f64))
    };
    for c in 0..4 {
        let (req, s) = publish(c);
        client.publish_update(req).await.unwrap();
        sent.push(s);
    }
    // Wait until the node has staged and folded all four, then kill it before the round closes.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = node.metrics(&client.connection().client).await;
        if shoal_runtime::metrics::scrape(&text, "shoal_updates_staged_total") == Some(4.0) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "updates not staged: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node.kill();
    let mid = client.job_state(&job).await.unwrap();
    assert_eq!((mid.round, mid.model_version), (RoundId(1), ModelVersion(0)), "nothing committed yet");

    node.restart(&nats.url()).await;
    for c in 4..6 {
        let (req, s) = publish(c);
        client.publish_update(req).await.unwrap();
        sent.push(s);
    }
    let after = client
        .wait_for_round_closed(&job, RoundId(1), Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}\nnode log:\n{}", node.log()));
    assert!(
        matches!(after.last_outcome, Some(RoundOutcome::Committed { clients: 6, .. })),
        "{:?}\n{}",
        after.last_outcome,
        node.log()
    );
    assert_eq!(after.model_version, ModelVersion(1), "committed exactly once");
    let bytes = client.fetch_model(&job, ModelVersion(1)).await.unwrap();
    let model = shoal_functions::Parameters::from_safetensors(Arc::clone(&m), &bytes).unwrap();
    assert_matches_oracle(&model, &weighted_mean_oracle(&sent));
    // The restarted node re-staged the four redelivered updates plus the two new ones, and
    // rejected nothing as a duplicate.
    let text = node.metrics(&client.connection().client).await;
    assert_eq!(shoal_runtime::metrics::scrape(&text, "shoal_updates_staged_total"), Some(6.0), "{text}");
    assert_eq!(
        shoal_runtime::metrics::scrape(&text, "shoal_updates_rejected_total{reason=\"duplicate\"}"),
        Some(0.0)
    );
    assert_stream_drains(&client, Duration::from_secs(10)).await;
}

/// A clean shutdown (SIGTERM) hands the held updates back to JetStream at once: with a 60 s ack
/// wait, the restarted node still gets them immediately and commits the round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_held_updates_back() {
    init_logging();
    let nats = NatsServer::start().unwrap();
    let mut node = NodeProcess::start(&nats.url(), "n1", &["--ack-wait-ms", "60000"]).await;
    let client = connect(&nats.url()).await;
    let m = manifest();
    let job = JobId::new("term").unwrap();
    jobs::create_job(
        &shoal_testkit::infra_of(&client).await,
        &job_spec("term", (*m).clone(), 3, 3, 120_000, 1),
        None,
    )
    .await
    .unwrap();
    let state = client.wait_for_open_round(&job, RoundId(1), Duration::from_secs(30)).await.unwrap();
    let mut sent = Vec::new();
    let mut publish = |c: u64| {
        let values = as_sent(&m, &random_values(&m, 9000 + c));
        sent.push((values.clone(), 5.0));
        UpdateRequest {
            job: job.clone(),
            client: ClientId::new(format!("t{c}")).unwrap(),
            round: state.round,
            base_version: state.model_version,
            num_examples: 5,
            kind: UpdateKind::Parameters,
            payload: payload(&m, &values),
            force_upload: false,
        }
    };
    let (r0, r1) = (publish(0), publish(1));
    client.publish_update(r0).await.unwrap();
    client.publish_update(r1).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while shoal_runtime::metrics::scrape(
        &node.metrics(&client.connection().client).await,
        "shoal_updates_staged_total",
    ) != Some(2.0)
    {
        assert!(std::time::Instant::now() < deadline, "updates not staged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(node.terminate().success(), "clean shutdown exits 0");
    node.restart(&nats.url()).await;
    let r2 = publish(2);
    client.publish_update(r2).await.unwrap();
    // Well under the 60 s ack wait: only a hand-back makes the first two available this soon.
    let after = client
        .wait_for_round_closed(&job, RoundId(1), Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{e}\nnode log:\n{}", node.log()));
    assert!(matches!(after.last_outcome, Some(RoundOutcome::Committed { clients: 3, .. })), "{after:?}");
    let model = shoal_functions::Parameters::from_safetensors(
        Arc::clone(&m),
        &client.fetch_model(&job, ModelVersion(1)).await.unwrap(),
    )
    .unwrap();
    assert_matches_oracle(&model, &weighted_mean_oracle(&sent));
}
