//! Asynchronous round modes in the runtime (two node processes): FedBuff commits every K updates
//! with staleness weights s(τ) = 1/√(1+τ) and flushes a buffer that never fills after
//! `max_wait`; FedFix commits once per period with d_i = ⌈τ_i/Δt⌉·p_i. Expected models are
//! computed here in f64 from the formulas of `reference/algorithms.md` §C.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_client::connect::ConnectOptions;
use shoal_client::{ShoalClient, UpdateRequest};
use shoal_functions::{ClientId, DType, JobId, ModelManifest, ModelVersion, Parameters, RoundId, UpdateKind};
use shoal_proto::RoundOutcome;
use shoal_runtime::clock::now_ms;
use shoal_runtime::jobs;
use shoal_testkit::*;

const NODE_ARGS: &[&str] = &["--ack-wait-ms", "3000", "--pull-batch", "1", "--collect-timeout-ms", "3000"];

fn manifest() -> Arc<ModelManifest> {
    shoal_testkit::manifest(&[("w", DType::F32, &[300])])
}

async fn setup() -> (NatsServer, Vec<NodeProcess>, ShoalClient) {
    init_logging();
    let nats = NatsServer::start().unwrap();
    let mut nodes = Vec::new();
    for id in ["a1", "a2"] {
        nodes.push(NodeProcess::start(&nats.url(), id, NODE_ARGS).await);
    }
    let client =
        ShoalClient::connect(&ConnectOptions { url: nats.url(), ..Default::default() }).await.unwrap();
    (nats, nodes, client)
}

/// Sends delta `d` from `client`, trained on version `base`, for header round `round`.
async fn send(
    c: &ShoalClient,
    job: &JobId,
    client: &str,
    round: u64,
    base: u64,
    d: &[f64],
    m: &Arc<ModelManifest>,
) {
    c.publish_update(UpdateRequest {
        job: job.clone(),
        client: ClientId::new(client).unwrap(),
        round: RoundId(round),
        base_version: ModelVersion(base),
        num_examples: 10,
        kind: UpdateKind::Delta,
        payload: payload(m, &[d.to_vec()]),
        force_upload: false,
    })
    .await
    .unwrap();
}

fn delta(seed: u64, m: &Arc<ModelManifest>) -> Vec<f64> {
    as_sent(m, &random_values(m, seed)).remove(0)
}

async fn model(c: &ShoalClient, job: &JobId, m: &Arc<ModelManifest>, v: u64) -> Vec<f64> {
    let bytes = c.fetch_model(job, ModelVersion(v)).await.unwrap();
    Parameters::from_safetensors(Arc::clone(m), &bytes).unwrap().tensor_f64(0)
}

fn assert_close(got: &[f64], want: &[f64], what: &str) {
    for (e, (g, w)) in got.iter().zip(want).enumerate() {
        // The committed model is f32: one f32 rounding of the f64 result.
        assert!((g - w).abs() <= 1e-6 * w.abs().max(1e-3), "{what}[{e}]: committed {g}, expected {w}");
    }
}

/// The f64 values rounded to f32, as a committed f32 model stores them.
fn f32_rounded(x: &[f64]) -> Vec<f64> {
    x.iter().map(|&v| f64::from(v as f32)).collect()
}

fn logs(nodes: &[NodeProcess]) -> String {
    nodes.iter().map(|n| format!("--- {} ---\n{}", n.node_id, n.log())).collect()
}

async fn wait_version(c: &ShoalClient, job: &JobId, v: u64, nodes: &[NodeProcess]) -> shoal_proto::JobState {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = c.job_state(job).await.unwrap();
        if s.model_version.0 >= v {
            return s;
        }
        assert!(Instant::now() < deadline, "version {v} never committed: {s:?}\n{}", logs(nodes));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn fedbuff_spec(job: &str, m: &Arc<ModelManifest>, k: u32, max_wait_ms: u64) -> shoal_functions::JobSpec {
    let mut spec = job_spec(job, (**m).clone(), 1, 1, 1000, 10);
    spec.update_kind = UpdateKind::Delta;
    spec.strategy = serde_json::from_value(serde_json::json!({
        "name": "fedbuff", "buffer_size": k,
        "staleness": {"kind": "polynomial", "exponent": 0.5},
        "normalisation": "by_buffer_size", "example_weight": "equal", "server_lr": 1.0
    }))
    .unwrap();
    spec.round_policy = serde_json::from_value(serde_json::json!({
        "mode": "buffered", "max_wait_ms": max_wait_ms, "max_staleness": 4
    }))
    .unwrap();
    spec
}

/// K = 3: a commit happens on the third update, not before; stale updates (trained on an older
/// version, sent for a closed round) are folded with s(τ) = 1/√(1+τ), never rejected:
/// θ₂ = θ₁ + (s(1)Δ_s1 + s(0)Δ_f1 + s(1)Δ_s2)/3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedbuff_commits_every_k_updates_with_staleness_weights() {
    let (_nats, nodes, c) = setup().await;
    let m = manifest();
    let job = JobId::new("buff").unwrap();
    jobs::create_job(&shoal_testkit::infra_of(&c).await, &fedbuff_spec("buff", &m, 3, 60_000), None)
        .await
        .unwrap();
    c.wait_for_open_round(&job, RoundId(1), Duration::from_secs(30)).await.unwrap();
    let d: Vec<Vec<f64>> = (0..6).map(|i| delta(900 + i, &m)).collect();

    // Three fast clients on version 0; the slow ones start training on version 0 as well.
    send(&c, &job, "fast1", 1, 0, &d[0], &m).await;
    send(&c, &job, "fast2", 1, 0, &d[1], &m).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = c.job_state(&job).await.unwrap();
    assert_eq!(s.model_version, ModelVersion(0), "committed before the buffer held K updates");
    send(&c, &job, "fast3", 1, 0, &d[2], &m).await;
    wait_version(&c, &job, 1, &nodes).await;
    let theta1: Vec<f64> = (0..300).map(|e| (d[0][e] + d[1][e] + d[2][e]) / 3.0).collect();
    assert_close(&model(&c, &job, &m, 1).await, &theta1, "θ1");
    // The next step starts from θ1 as stored (f32).
    let theta1 = f32_rounded(&theta1);

    // The slow clients deliver for round 1 (closed) from version 0: staleness 1.
    send(&c, &job, "slow1", 1, 0, &d[3], &m).await;
    send(&c, &job, "fast1", 2, 1, &d[4], &m).await;
    send(&c, &job, "slow2", 1, 0, &d[5], &m).await;
    let st = wait_version(&c, &job, 2, &nodes).await;
    let s1 = 1.0 / 2f64.sqrt();
    let theta2: Vec<f64> =
        (0..300).map(|e| theta1[e] + (s1 * d[3][e] + d[4][e] + s1 * d[5][e]) / 3.0).collect();
    assert_close(&model(&c, &job, &m, 2).await, &theta2, "θ2");
    match st.last_outcome {
        Some(RoundOutcome::Committed { clients, total_weight, .. }) => {
            assert_eq!(clients, 3);
            assert!((total_weight - (1.0 + 2.0 * s1)).abs() < 1e-12, "total weight {total_weight}");
        }
        other => panic!("{other:?}"),
    }
    let rejected: f64 = {
        let mut n = 0.0;
        for node in &nodes {
            let text = node.metrics(&c.connection().client).await;
            n +=
                shoal_runtime::metrics::scrape(&text, "shoal_updates_rejected_total{reason=\"late_update\"}")
                    .unwrap_or(0.0);
        }
        n
    };
    assert_eq!(rejected, 0.0, "stale updates must be folded, not rejected");
}

/// A buffer that never fills is flushed `max_wait` after it opened, divided by K as a full one
/// (`ByBufferSize`): θ₁ = θ₀ + Δ/3 (bug-cases.md row 25).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedbuff_flushes_a_buffer_that_never_fills_after_max_wait() {
    let (_nats, nodes, c) = setup().await;
    let m = manifest();
    let job = JobId::new("flush").unwrap();
    jobs::create_job(&shoal_testkit::infra_of(&c).await, &fedbuff_spec("flush", &m, 3, 1500), None)
        .await
        .unwrap();
    let open = c.wait_for_open_round(&job, RoundId(1), Duration::from_secs(30)).await.unwrap();
    // An update for a round far ahead is refused at once (not handed back forever).
    let mut refused = rejections(&c.connection().client, "flush").await;
    send(&c, &job, "ahead", 999_999, 0, &delta(78, &m), &m).await;
    let notice = next_rejection(&mut refused).await;
    assert_eq!(
        (notice.client.as_str(), notice.reason),
        ("ahead", shoal_runtime::error::RejectReason::WrongRound),
        "{notice:?}\n{}",
        logs(&nodes)
    );
    let d = delta(77, &m);
    send(&c, &job, "only", 1, 0, &d, &m).await;
    wait_version(&c, &job, 1, &nodes).await;
    assert!(now_ms() >= open.opened_at_ms + 1500, "flushed before max_wait");
    let want: Vec<f64> = d.iter().map(|x| x / 3.0).collect();
    assert_close(&model(&c, &job, &m, 1).await, &want, "flushed θ1");
}

/// FedFix, Δt = 2 ticks of 1 s: clients with τ = 1, 3, 2 ticks and p_i = 1/3 get
/// d = ⌈τ/Δt⌉·p = 1/3, 2/3, 1/3. A commit happens at the end of each period with what arrived:
/// θ₁ = θ₀ + (1/3)Δ_a + (2/3)Δ_b; an empty period commits nothing; the slow client c, trained
/// on version 0, is folded in the third period with its FedFix weight: θ₂ = θ₁ + (1/3)Δ_c.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedfix_commits_once_per_period() {
    let (_nats, nodes, c) = setup().await;
    let m = manifest();
    let job = JobId::new("fix").unwrap();
    let mut spec = job_spec("fix", (*m).clone(), 1, 1, 1000, 2);
    spec.update_kind = UpdateKind::Delta;
    spec.max_failed_rounds = 10;
    spec.strategy = serde_json::from_value(serde_json::json!({
        "name": "fedfix", "period_ticks": 2,
        "clients": [
            {"client": "a", "compute_ticks": 1},
            {"client": "b", "compute_ticks": 3},
            {"client": "c", "compute_ticks": 2}
        ]
    }))
    .unwrap();
    spec.round_policy = serde_json::from_value(
        serde_json::json!({"mode": "periodic", "period_ms": 2000, "max_staleness": 3}),
    )
    .unwrap();
    jobs::create_job(&shoal_testkit::infra_of(&c).await, &spec, None).await.unwrap();
    let open = c.wait_for_open_round(&job, RoundId(1), Duration::from_secs(30)).await.unwrap();
    assert_eq!(open.deadline_at_ms - open.opened_at_ms, 2000);
    let d: Vec<Vec<f64>> = (0..3).map(|i| delta(500 + i, &m)).collect();
    send(&c, &job, "a", 1, 0, &d[0], &m).await;
    send(&c, &job, "b", 1, 0, &d[1], &m).await;
    let st = wait_version(&c, &job, 1, &nodes).await;
    assert!(now_ms() >= open.deadline_at_ms, "committed before the period ended");
    assert_eq!(st.round, RoundId(2));
    let theta1: Vec<f64> = (0..300).map(|e| d[0][e] / 3.0 + 2.0 * d[1][e] / 3.0).collect();
    assert_close(&model(&c, &job, &m, 1).await, &theta1, "θ1");
    let theta1 = f32_rounded(&theta1);

    // Period 2 passes empty: nothing is committed, the round advances.
    let s3 = c.wait_for_open_round(&job, RoundId(3), Duration::from_secs(30)).await.unwrap();
    assert_eq!(s3.model_version, ModelVersion(1));
    assert!(
        matches!(s3.last_outcome, Some(RoundOutcome::QuorumNotMet { accepted: 0, .. })),
        "{:?}",
        s3.last_outcome
    );
    send(&c, &job, "c", 1, 0, &d[2], &m).await;
    wait_version(&c, &job, 2, &nodes).await;
    let theta2: Vec<f64> = (0..300).map(|e| theta1[e] + d[2][e] / 3.0).collect();
    assert_close(&model(&c, &job, &m, 2).await, &theta2, "θ2");
}

/// `{w [8], bn.running_mean [3] (statistic), bn.running_var [3] (variance),
/// bn.num_batches_tracked [] (i64, max)}`.
fn bn_manifest() -> Arc<ModelManifest> {
    use shoal_functions::{AggregationPolicy, TensorSpec};
    let spec =
        |name: &str, dtype, shape: Vec<usize>, policy| TensorSpec { name: name.into(), dtype, shape, policy };
    Arc::new(
        ModelManifest::new(vec![
            spec("w", DType::F32, vec![8], AggregationPolicy::Mean),
            spec("bn.running_mean", DType::F32, vec![3], AggregationPolicy::Statistic),
            spec("bn.running_var", DType::F32, vec![3], AggregationPolicy::Variance),
            spec("bn.num_batches_tracked", DType::I64, vec![], AggregationPolicy::Max),
        ])
        .unwrap(),
    )
}

/// Running statistics through FedBuff with stale clients on two nodes (issue 14 §3): K = 4,
/// s(τ) = 1/√(1+τ), η_g = 0.5, clients trained from versions up to 3 behind. Over 6 commits,
/// checked against f64 values computed here from the policies' definitions:
/// - `bn.running_mean` and `bn.running_var` are the s(τ)-weighted means of the values the
///   clients computed (their base plus their delta), never scaled by η_g or divided by K, and
///   `running_var` is finite and ≥ 0 — the leaves rebase each stale delta's statistics from
///   the client's base to the current model before their partial leaves the node;
/// - `w` = θ + η_g · Σ s(τ_k) Δ_k / K; the counter = θ + max_k Δ_k (its `max` policy);
/// - the committed file holds exactly the four keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedbuff_with_stale_clients_keeps_running_statistics_at_the_weighted_mean() {
    use rand::{Rng, SeedableRng};
    const K: usize = 4;
    let (_nats, nodes, c) = setup().await;
    let m = bn_manifest();
    let job = JobId::new("bnbuff").unwrap();
    let mut spec = fedbuff_spec("bnbuff", &m, K as u32, 60_000);
    spec.strategy = serde_json::from_value(serde_json::json!({
        "name": "fedbuff", "buffer_size": K,
        "staleness": {"kind": "polynomial", "exponent": 0.5},
        "normalisation": "by_buffer_size", "example_weight": "equal", "server_lr": 0.5
    }))
    .unwrap();
    let initial = vec![vec![0.0; 8], vec![0.5; 3], vec![0.3; 3], vec![7.0]];
    let initial = Parameters::from_f64(Arc::clone(&m), &initial).unwrap();
    jobs::create_job(&shoal_testkit::infra_of(&c).await, &spec, Some(&initial)).await.unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(14);
    let version = |c: &ShoalClient, v: u64| {
        let (c, job, m) = (c.clone(), job.clone(), Arc::clone(&m));
        async move {
            let bytes = c.fetch_model(&job, ModelVersion(v)).await.unwrap();
            let p = Parameters::from_safetensors(Arc::clone(&m), &bytes).unwrap();
            let values: Vec<Vec<f64>> = (0..4).map(|i| p.tensor_f64(i)).collect();
            (values, bytes)
        }
    };
    let mut history = vec![version(&c, 0).await.0];
    let mut stale_rounds = 0;
    for r in 1..=6u64 {
        c.wait_for_open_round(&job, RoundId(r), Duration::from_secs(30)).await.unwrap();
        let current = r - 1;
        let theta = history[current as usize].clone();
        let mut stats_num = [vec![0.0; 3], vec![0.0; 3]];
        let (mut total, mut w_sum, mut count_max) = (0.0, vec![0.0; 8], i64::MIN);
        for k in 0..K {
            // Client 0 is as stale as the job allows (3, or all the history there is).
            let tau = if k == 0 { current.min(3) } else { rng.gen_range(0..=current.min(3)) };
            let base = &history[(current - tau) as usize];
            let w: Vec<f64> = base[0].iter().map(|x| x + rng.gen_range(-0.5..0.5)).collect();
            let mean: Vec<f64> = (0..3).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let var: Vec<f64> = (0..3)
                .map(|e| if e == 0 { rng.gen_range(0.0..1e-4) } else { rng.gen_range(0.0..0.2) })
                .collect();
            let count = vec![base[3][0] + f64::from(rng.gen_range(1u32..50))];
            let computed = [w, mean, var, count];
            let d: Vec<Vec<f64>> = computed
                .iter()
                .zip(base)
                .map(|(v, b)| v.iter().zip(b).map(|(x, y)| x - y).collect())
                .collect();
            let d = as_sent(&m, &d);
            let s = 1.0 / (1.0 + tau as f64).sqrt();
            total += s;
            for (i, num) in stats_num.iter_mut().enumerate() {
                for e in 0..3 {
                    num[e] += s * (base[i + 1][e] + d[i + 1][e]);
                }
            }
            for e in 0..8 {
                w_sum[e] += s * d[0][e];
            }
            count_max = count_max.max(d[3][0] as i64);
            c.publish_update(UpdateRequest {
                job: job.clone(),
                client: ClientId::new(format!("c{k}")).unwrap(),
                round: RoundId(r),
                base_version: ModelVersion(current - tau),
                num_examples: 10,
                kind: UpdateKind::Delta,
                payload: payload(&m, &d),
                force_upload: false,
            })
            .await
            .unwrap();
            if tau > 0 && k == 0 {
                stale_rounds += 1;
            }
        }
        let st = wait_version(&c, &job, r, &nodes).await;
        match st.last_outcome {
            Some(RoundOutcome::Committed { clients, .. }) => assert_eq!(clients as usize, K),
            other => panic!("round {r}: {other:?}\n{}", logs(&nodes)),
        }
        let (got, bytes) = version(&c, r).await;
        let names: std::collections::BTreeSet<String> =
            safetensors::SafeTensors::deserialize(&bytes).unwrap().names().into_iter().cloned().collect();
        let want_names: std::collections::BTreeSet<String> =
            m.tensors().iter().map(|t| t.name.to_string()).collect();
        assert_eq!(names, want_names, "round {r}: key set");
        let w_want: Vec<f64> = (0..8).map(|e| theta[0][e] + 0.5 * w_sum[e] / K as f64).collect();
        assert_close(&got[0], &w_want, &format!("round {r}: w"));
        let mean_want: Vec<f64> = stats_num[0].iter().map(|x| x / total).collect();
        assert_close(&got[1], &mean_want, &format!("round {r}: bn.running_mean\n{}", logs(&nodes)));
        let var_want: Vec<f64> = stats_num[1].iter().map(|x| (x / total).max(0.0)).collect();
        assert!(got[2].iter().all(|v| v.is_finite() && *v >= 0.0), "round {r}: running_var {:?}", got[2]);
        assert_close(&got[2], &var_want, &format!("round {r}: bn.running_var"));
        assert_eq!(got[3][0] as i64, theta[3][0] as i64 + count_max, "round {r}: num_batches_tracked");
        eprintln!("round {r}: running_var {:?} (weighted mean {:?})", got[2], var_want);
        history.push(got);
    }
    assert!(stale_rounds >= 5, "stale clients in {stale_rounds} rounds");
}
