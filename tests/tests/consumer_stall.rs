//! `bug-cases.md` row 37: a pull consumer that stops delivering is detected and recreated,
//! and no update is lost or counted twice. The stall is forced by deleting the gateway's
//! durable consumer under a running node.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_client::connect::ConnectOptions;
use shoal_client::{ShoalClient, UpdateRequest};
use shoal_functions::{
    ClientId, DType, JobId, ModelManifest, ModelVersion, Parameters, RoundId, TensorSpec, UpdateKind,
};
use shoal_proto::RoundOutcome;
use shoal_runtime::jobs;
use shoal_runtime::metrics::scrape;
use shoal_testkit::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_consumer_is_recreated_and_nothing_is_lost() {
    init_logging();
    let nats = NatsServer::start().unwrap();
    let node = NodeProcess::start(&nats.url(), "s1", &["--ack-wait-ms", "3000"]).await;
    let client =
        ShoalClient::connect(&ConnectOptions { url: nats.url(), ..Default::default() }).await.unwrap();
    let m = Arc::new(ModelManifest::new(vec![TensorSpec::new("w", DType::F32, vec![64])]).unwrap());
    let job = JobId::new("stall").unwrap();
    jobs::create_job(
        &shoal_testkit::infra_of(&client).await,
        &job_spec("stall", (*m).clone(), 3, 3, 60_000, 1),
        None,
    )
    .await
    .unwrap();
    client.wait_for_open_round(&job, RoundId(1), Duration::from_secs(30)).await.unwrap();
    let mut sent = Vec::new();
    let send = |c: u64| {
        let values = as_sent(&m, &random_values(&m, 70 + c));
        let req = UpdateRequest {
            job: job.clone(),
            client: ClientId::new(format!("c{c}")).unwrap(),
            round: RoundId(1),
            base_version: ModelVersion(0),
            num_examples: 1 + c,
            kind: UpdateKind::Parameters,
            payload: payload(&m, &values),
            force_upload: false,
        };
        (values, req)
    };
    let (v, r) = send(0);
    client.publish_update(r).await.unwrap();
    sent.push((v, 1.0));
    // Let the node take it, then pull the consumer out from under it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while scrape(&node.metrics(&client.connection().client).await, "shoal_updates_staged_total") < Some(1.0) {
        assert!(Instant::now() < deadline, "first update not staged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shoal_testkit::infra_of(&client).await.updates.delete_consumer("shoal-gateway").await.unwrap();
    for c in 1..3 {
        let (v, r) = send(c);
        client.publish_update(r).await.unwrap();
        sent.push((v, (1 + c) as f64));
    }
    let st = client.wait_for_round_closed(&job, RoundId(1), Duration::from_secs(60)).await.unwrap();
    match st.last_outcome {
        Some(RoundOutcome::Committed { clients, total_weight, .. }) => {
            assert_eq!((clients, total_weight), (3, 6.0), "{}", node.log())
        }
        other => panic!("{other:?}\n{}", node.log()),
    }
    let bytes = client.fetch_model(&job, ModelVersion(1)).await.unwrap();
    let got = Parameters::from_safetensors(Arc::clone(&m), &bytes).unwrap().tensor_f64(0);
    let want = &weighted_mean_oracle(&sent)[0];
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= 1e-6 * w.abs().max(1e-3), "committed {g}, oracle {w}");
    }
    let metrics = node.metrics(&client.connection().client).await;
    assert!(scrape(&metrics, "shoal_consumer_restarts_total") >= Some(1.0), "{metrics}");
    // Every message is acked in the end (a copy of the first, delivered by the new consumer,
    // is acked as already applied): the work queue drains.
    assert_stream_drains(&client, Duration::from_secs(20)).await;
}
