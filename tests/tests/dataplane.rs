//! The descriptor path of separate gateway and function-host processes (issue 10), run inside
//! one real `shoal node` with `--descriptor-channel loopback-tcp`: descriptors cross a TCP
//! socket, the host reads each slot through its own read-only mapping of the segment and returns
//! it by a release record. The committed models must be bit-identical to the in-process node's
//! and match the independent f64 oracle.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::Duration;

use half::bf16;
use shoal_functions::{DType, JobId, ModelManifest, ModelVersion, RoundId};
use shoal_proto::RoundOutcome;
use shoal_runtime::jobs;
use shoal_runtime::metrics::scrape;
use shoal_testkit::*;

fn manifest() -> Arc<ModelManifest> {
    shoal_testkit::manifest(&[
        ("fc.weight", DType::F32, &[32, 20]),
        ("fc.bias", DType::BF16, &[20]),
        ("steps", DType::I64, &[]),
    ])
}

/// f32 within 1e-6 relative, bf16 within its rounding, integers exactly (half to even).
fn assert_matches_oracle(model: &shoal_functions::Parameters, oracle: &[Vec<f64>]) {
    for (i, spec) in model.manifest().tensors().iter().enumerate() {
        for (e, (g, o)) in model.tensor_f64(i).iter().zip(&oracle[i]).enumerate() {
            let ok = match spec.dtype {
                DType::F32 => (g - o).abs() <= 1e-6 * o.abs().max(1e-30),
                DType::BF16 => (g - bf16::from_f64(*o).to_f64()).abs() <= 4e-3 * o.abs().max(1e-30),
                _ => *g == o.round_ties_even(),
            };
            assert!(ok, "{}[{e}]: committed {g}, oracle {o}", spec.name);
        }
    }
}

/// Runs two rounds of six clients on one node started with `extra`; the committed models'
/// bytes (FedAvg: each checked against the oracle) and the node's metrics.
async fn run(extra: &[&str], strategy: shoal_functions::StrategySpec) -> (Vec<Vec<u8>>, String) {
    let fedavg = matches!(strategy, shoal_functions::StrategySpec::Fedavg { .. });
    let nats = NatsServer::start().unwrap();
    let node = NodeProcess::start(&nats.url(), "dp", extra).await;
    let client = connect(&nats.url()).await;
    let m = manifest();
    let job = JobId::new("dp").unwrap();
    let mut spec = job_spec("dp", (*m).clone(), 6, 6, 60_000, 2);
    spec.strategy = strategy;
    jobs::create_job(&infra_of(&client).await, &spec, None).await.unwrap();
    let mut models = Vec::new();
    for round in 1..=2u64 {
        let state = client.wait_for_open_round(&job, RoundId(round), Duration::from_secs(30)).await.unwrap();
        let mut sent = Vec::new();
        for c in 0..6u64 {
            let n = 1 + (round * 37 + c * 101) % 900;
            sent.push(send_update(&client, &m, &job, &state, (c, round * 100 + c, n), c == 0).await);
        }
        let after = client
            .wait_for_round_closed(&job, RoundId(round), Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}\n{}", node.log()));
        assert!(
            matches!(after.last_outcome, Some(RoundOutcome::Committed { clients: 6, .. })),
            "round {round}: {:?}\n{}",
            after.last_outcome,
            node.log()
        );
        let bytes = client.fetch_model(&job, ModelVersion(round)).await.unwrap();
        let model = shoal_functions::Parameters::from_safetensors(Arc::clone(&m), &bytes).unwrap();
        if fedavg {
            assert_matches_oracle(&model, &weighted_mean_oracle(&sent));
        }
        models.push(bytes);
    }
    // Every slot sent over the channel comes back (whole-cohort rounds release theirs once the
    // commit has settled them), and nothing was refused on the way.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let text = node.metrics(&client.connection().client).await;
        let sent = scrape(&text, "shoal_descriptor_channel_descriptors_sent_total");
        if sent == scrape(&text, "shoal_descriptor_channel_releases_received_total") {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "slots never released:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let errors: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("shoal_descriptor_channel_errors_total") && !l.ends_with(" 0"))
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    (models, metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loopback_descriptor_channel_commits_the_in_process_nodes_models_bit_for_bit() {
    init_logging();
    let fedavg = shoal_functions::StrategySpec::Fedavg { server_learning_rate: 1.0 };
    let (in_process, plain) = run(&[], fedavg.clone()).await;
    let (over_tcp, channel) = run(&["--descriptor-channel", "loopback-tcp"], fedavg).await;
    // The channel carried every update (12) and returned every slot; the plain node used none.
    let counted = |text: &str, name: &str| scrape(text, name);
    assert_eq!(counted(&channel, "shoal_descriptor_channel_descriptors_sent_total"), Some(12.0));
    assert_eq!(counted(&channel, "shoal_descriptor_channel_releases_received_total"), Some(12.0));
    assert_eq!(counted(&plain, "shoal_descriptor_channel_descriptors_sent_total"), Some(0.0));
    assert_eq!(in_process.len(), 2);
    for (v, (a, b)) in in_process.iter().zip(&over_tcp).enumerate() {
        assert!(a == b, "model version {} differs between the two descriptor paths", v + 1);
    }
}

/// A whole-cohort strategy keeps every update's slot until the round closes (the host's views
/// are read-only mappings of the gateway's segments, released only then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_cohort_strategy_over_the_channel_commits_the_same_median() {
    init_logging();
    let median = shoal_functions::StrategySpec::Median;
    let (in_process, _) = run(&[], median.clone()).await;
    let (over_tcp, channel) = run(&["--descriptor-channel", "loopback-tcp"], median).await;
    assert!(in_process == over_tcp, "the medians differ between the two descriptor paths");
    assert_eq!(scrape(&channel, "shoal_descriptor_channel_releases_received_total"), Some(12.0));
}
