//! Round policy against a real node: a round without quorum at its deadline fails with
//! `QuorumNotMet` and the previous model stands; a round with quorum but not the full cohort
//! commits at its deadline; a job whose rounds keep failing ends as failed instead of waiting
//! forever.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use shoal_client::connect::ConnectOptions;
use shoal_client::{ShoalClient, UpdateRequest};
use shoal_functions::{ClientId, DType, JobId, ModelManifest, ModelVersion, RoundId, UpdateKind};
use shoal_proto::JobPhase;
use shoal_proto::RoundOutcome;
use shoal_runtime::jobs;
use shoal_testkit::*;

static CLUSTER: OnceLock<SharedCluster> = OnceLock::new();

fn manifest() -> Arc<ModelManifest> {
    shoal_testkit::manifest(&[("w", DType::F32, &[16])])
}

async fn client() -> ShoalClient {
    init_logging();
    let cluster = SharedCluster::get(&CLUSTER, &["--ack-wait-ms", "3000"]);
    ShoalClient::connect(&ConnectOptions { url: cluster.nats.url(), ..Default::default() }).await.unwrap()
}

#[tokio::test]
async fn quorum_not_met_keeps_the_model_and_a_partial_cohort_commits_at_the_deadline() {
    let c = client().await;
    let m = manifest();
    let job = JobId::new("quorum").unwrap();
    // Cohort 3, quorum 2, 1.5 s deadline, one model to commit.
    jobs::create_job(
        &shoal_testkit::infra_of(&c).await,
        &job_spec("quorum", (*m).clone(), 3, 2, 1500, 1),
        None,
    )
    .await
    .unwrap();

    // Round 1: one update only.
    let s1 = c.wait_for_open_round(&job, RoundId(1), Duration::from_secs(20)).await.unwrap();
    send_random(&c, &manifest(), &job, "a", &s1, 1, 10).await;
    let after1 = c.wait_for_round_closed(&job, RoundId(1), Duration::from_secs(20)).await.unwrap();
    assert_eq!(after1.last_outcome, Some(RoundOutcome::QuorumNotMet { accepted: 1, min_clients: 2 }));
    assert_eq!(after1.model_version, ModelVersion(0), "the previous model stands");
    assert!(c.fetch_model(&job, ModelVersion(1)).await.is_err(), "no version 1 was written");

    // Round 2 trains from version 0 again; two of three report: commit at the deadline.
    let s2 = c.wait_for_open_round(&job, RoundId(2), Duration::from_secs(20)).await.unwrap();
    assert_eq!(s2.model_version, ModelVersion(0));
    let sent = vec![
        send_random(&c, &manifest(), &job, "a", &s2, 2, 10).await,
        send_random(&c, &manifest(), &job, "b", &s2, 3, 30).await,
    ];
    let after2 = c.wait_for_round_closed(&job, RoundId(2), Duration::from_secs(20)).await.unwrap();
    assert!(matches!(after2.last_outcome, Some(RoundOutcome::Committed { clients: 2, .. })), "{after2:?}");
    assert_eq!(after2.model_version, ModelVersion(1));
    assert_eq!(after2.phase, JobPhase::Finished, "the failed round does not count towards `rounds`");
    let bytes = c.fetch_model(&job, ModelVersion(1)).await.unwrap();
    let model = shoal_functions::Parameters::from_safetensors(Arc::clone(&m), &bytes).unwrap();
    let oracle = weighted_mean_oracle(&sent);
    for (g, o) in model.tensor_f64(0).iter().zip(&oracle[0]) {
        assert!((g - o).abs() <= 1e-6 * o.abs().max(1e-30), "committed {g}, oracle {o}");
    }
}

#[tokio::test]
async fn a_job_whose_rounds_keep_failing_ends_failed() {
    let c = client().await;
    let m = manifest();
    let job = JobId::new("silent").unwrap();
    let mut spec = job_spec("silent", (*m).clone(), 2, 1, 300, 10);
    spec.max_failed_rounds = 3;
    jobs::create_job(&shoal_testkit::infra_of(&c).await, &spec, None).await.unwrap();
    let end = c
        .wait_for_state(&job, Duration::from_secs(20), "the job to end", |s| s.phase != JobPhase::Running)
        .await;
    // wait_for_state reports a job that ends as JobEnded; read the final state either way.
    drop(end);
    let state = c.job_state(&job).await.unwrap();
    assert!(matches!(state.phase, JobPhase::Failed { .. }), "{state:?}");
    assert_eq!(state.failed_rounds_in_a_row, 3);
    assert_eq!(state.round, RoundId(3));
    assert_eq!(state.model_version, ModelVersion(0));
}

/// A whole-cohort strategy through the node: the updates stay in shared memory until the round
/// closes, and the committed model is the coordinate-wise median computed here independently.
#[tokio::test]
async fn median_job_commits_the_coordinate_wise_median() {
    let c = client().await;
    let m = manifest();
    let job = JobId::new("median").unwrap();
    let mut spec = job_spec("median", (*m).clone(), 5, 5, 20_000, 1);
    spec.strategy = shoal_functions::StrategySpec::Median;
    jobs::create_job(&shoal_testkit::infra_of(&c).await, &spec, None).await.unwrap();
    let s = c.wait_for_open_round(&job, RoundId(1), Duration::from_secs(20)).await.unwrap();
    let mut sent = Vec::new();
    for (i, who) in ["a", "b", "c", "d", "e"].iter().enumerate() {
        sent.push(send_random(&c, &manifest(), &job, who, &s, 40 + i as u64, 1 + i as u64 * 100).await.0);
    }
    let after = c.wait_for_round_closed(&job, RoundId(1), Duration::from_secs(20)).await.unwrap();
    assert!(matches!(after.last_outcome, Some(RoundOutcome::Committed { clients: 5, .. })), "{after:?}");
    let bytes = c.fetch_model(&job, ModelVersion(1)).await.unwrap();
    let model = shoal_functions::Parameters::from_safetensors(Arc::clone(&m), &bytes).unwrap();
    for (e, got) in model.tensor_f64(0).iter().enumerate() {
        let mut column: Vec<f64> = sent.iter().map(|v| v[0][e]).collect();
        column.sort_by(f64::total_cmp);
        assert_eq!(*got, column[2], "element {e}: the median of five is the third value, weights ignored");
    }
}

/// An impossible strategy configuration is refused when the job is created, not mid-round.
#[tokio::test]
async fn impossible_strategy_configurations_fail_at_job_creation() {
    let c = client().await;
    let m = manifest();
    let mut spec = job_spec("krum-bad", (*m).clone(), 5, 5, 20_000, 1);
    spec.strategy = shoal_functions::StrategySpec::Krum { byzantine: 2 }; // needs n >= 2f + 3 = 7
    let e = jobs::create_job(&shoal_testkit::infra_of(&c).await, &spec, None).await.unwrap_err();
    assert!(e.to_string().contains("strategy"), "{e}");
    assert!(c.job_state(&JobId::new("krum-bad").unwrap()).await.is_err(), "no job was created");
}

/// Two live processes must not share a node id (they would share its shared memory): the second
/// waits for the first's membership lease to lapse, then gives up with a clear error.
#[tokio::test]
async fn a_second_process_with_a_live_node_id_is_refused() {
    let _ = client().await;
    let cluster = SharedCluster::get(&CLUSTER, &["--ack-wait-ms", "3000"]);
    let url = cluster.nats.url();
    let shm = tempfile::tempdir().unwrap();
    let shm_path = shm.path().display().to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(shoal_bin())
            .args([
                "node",
                "--http",
                "127.0.0.1:0",
                "--node-id",
                "shared",
                "--nats-url",
                &url,
                "--shm-dir",
                &shm_path,
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another process of node shared is running"), "{err}");
}

/// RFFL's per-client reward is served on request: it is the round's aggregate step kept on the
/// client's top-q_i entries (a sparsification of `v1 − v0`, read back from the model store).
#[tokio::test]
async fn rffl_rewards_are_served_per_client() {
    let c = client().await;
    let m = manifest();
    let job = JobId::new("rffl-reward").unwrap();
    let mut spec = job_spec("rffl-reward", (*m).clone(), 4, 4, 20_000, 2);
    spec.update_kind = UpdateKind::Delta;
    spec.strategy = shoal_functions::StrategySpec::Rffl {
        gamma: 1.0,
        alpha: 0.95,
        rth: 1.0 / 3.0,
        warmup_rounds: 10,
        altruism_degree: None,
        sparsify: true,
        mode: shoal_functions::spec::SpecMode::ReferenceCode,
    };
    jobs::create_job(&shoal_testkit::infra_of(&c).await, &spec, None).await.unwrap();
    let s = c.wait_for_open_round(&job, RoundId(1), Duration::from_secs(20)).await.unwrap();
    for (i, who) in ["a", "b", "c", "d"].iter().enumerate() {
        let m = manifest();
        let values = as_sent(&m, &random_values(&m, 70 + i as u64));
        c.publish_update(UpdateRequest {
            job: job.clone(),
            client: ClientId::new(*who).unwrap(),
            round: s.round,
            base_version: s.model_version,
            num_examples: 10 + 10 * i as u64,
            kind: UpdateKind::Delta,
            payload: payload(&m, &values),
            force_upload: false,
        })
        .await
        .unwrap();
    }
    let after = c.wait_for_round_closed(&job, RoundId(1), Duration::from_secs(20)).await.unwrap();
    assert!(matches!(after.last_outcome, Some(RoundOutcome::Committed { clients: 4, .. })), "{after:?}");
    let v1 = shoal_functions::Parameters::from_safetensors(
        Arc::clone(&m),
        &c.fetch_model(&job, ModelVersion(1)).await.unwrap(),
    )
    .unwrap()
    .tensor_f64(0);
    let reward = c.fetch_reward(&job, &ClientId::new("d").unwrap()).await.unwrap();
    let reward =
        shoal_functions::Parameters::from_safetensors(Arc::clone(&m), &reward).unwrap().tensor_f64(0);
    // v0 is zero, so v1 is the step u itself (in f32); the reward keeps some of its entries.
    let kept = reward.iter().filter(|&&r| r != 0.0).count();
    assert!(kept > 0, "the reward is empty");
    for (r, u) in reward.iter().zip(&v1) {
        assert!(*r == 0.0 || r == u, "reward entry {r} is not the step's {u}");
    }
    // Strangers and strategies without rewards get a reason, not a hang.
    assert!(c.fetch_reward(&job, &ClientId::new("stranger").unwrap()).await.is_err());
}

/// A `job create` interrupted after writing the spec (no state yet) can be run again; a second
/// create of a job that exists is refused.
#[tokio::test]
async fn an_interrupted_job_create_can_be_redone() {
    let c = client().await;
    let m = manifest();
    let spec = job_spec("half-made", (*m).clone(), 1, 1, 20_000, 1);
    // What an interrupted create leaves behind: the spec key only.
    shoal_testkit::infra_of(&c)
        .await
        .jobs
        .put("half-made.spec", bytes::Bytes::from(shoal_proto::encode(&spec)))
        .await
        .unwrap();
    assert!(c.job_state(&JobId::new("half-made").unwrap()).await.is_err(), "not a job yet");
    jobs::create_job(&shoal_testkit::infra_of(&c).await, &spec, None).await.unwrap();
    let e = jobs::create_job(&shoal_testkit::infra_of(&c).await, &spec, None).await.unwrap_err();
    assert!(matches!(e, shoal_client::Error::JobExists(_)), "{e}");
}
