//! One test per row of `reference/bug-cases.md` (failures other FL frameworks and NATS clients
//! reported), each with the row's input and the value we expect written out by hand. The table
//! mapping rows to tests, and the rows covered elsewhere, is `docs/bug-cases.md`.
//!
//! Most tests share one nats-server and one `shoal node` (each uses its own job); the ones that
//! stop the broker or limit the node's jobs start their own. Rows whose behaviour lives in the
//! pure kernels (FedYogi's v_t, FedBuff's normalisation, Krum's configuration) call
//! `shoal-functions` directly with the row's input.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::HashMap;
use std::future::Future as _;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use shoal_client::connect::ConnectOptions;
use shoal_client::{uploads, Error};
use shoal_client::{ShoalClient, Transport, UpdateRequest};
use shoal_functions::{
    AggregationPolicy, ClientId, DType, ErrorKind, JobId, JobSpec, ModelManifest, ModelVersion, Parameters,
    PartialAggregate, RoundId, Strategy, StrategySpec, TensorSpec, UpdateKind,
};
use shoal_proto::headers::{self, Upload};
use shoal_proto::subjects;
use shoal_proto::JobState;
use shoal_proto::RejectNotice;
use shoal_proto::RoundOutcome;
use shoal_runtime::{jobs, metrics, RejectReason};
use shoal_testkit::*;

static CLUSTER: OnceLock<SharedCluster> = OnceLock::new();
/// The node's inline limit is the server's max_payload (1 MiB, nats-server's default).
const NODE_ARGS: &[&str] = &["--ack-wait-ms", "5000"];
const T: Duration = Duration::from_secs(30);
/// nats-server's default `max_payload`.
const MAX_PAYLOAD: usize = 1_048_576;

fn cluster() -> &'static SharedCluster {
    init_logging();
    SharedCluster::get(&CLUSTER, NODE_ARGS)
}

async fn connect(url: &str) -> ShoalClient {
    ShoalClient::connect(&ConnectOptions { url: url.to_owned(), ..Default::default() }).await.unwrap()
}

fn manifest(specs: Vec<TensorSpec>) -> Arc<ModelManifest> {
    Arc::new(ModelManifest::new(specs).unwrap())
}

fn t(name: &str, dtype: DType, shape: &[usize]) -> TensorSpec {
    TensorSpec::new(name, dtype, shape.to_vec())
}

fn with_policy(mut s: TensorSpec, policy: AggregationPolicy) -> TensorSpec {
    s.policy = policy;
    s
}

fn cid(s: &str) -> ClientId {
    ClientId::new(s).unwrap()
}

/// One job on a node, round 1 open, with every rejection notice of the job subscribed.
struct Job {
    c: ShoalClient,
    id: JobId,
    m: Arc<ModelManifest>,
    rejected: async_nats::Subscriber,
}

impl Job {
    /// A sync FedAvg job on the shared node; `edit` adjusts the spec.
    async fn new(
        name: &str,
        m: &Arc<ModelManifest>,
        (cohort, min, deadline_ms): (u32, u32, u64),
        edit: impl FnOnce(&mut JobSpec),
    ) -> Job {
        let c = connect(&cluster().nats.url()).await;
        let mut spec = job_spec(name, (**m).clone(), cohort, min, deadline_ms, 1);
        edit(&mut spec);
        Job::create(c, spec, None).await
    }

    async fn create(c: ShoalClient, spec: JobSpec, initial: Option<&Parameters>) -> Job {
        let rejected = rejections(&c.connection().client, spec.job.as_str()).await;
        jobs::create_job(&shoal_testkit::infra_of(&c).await, &spec, initial).await.unwrap();
        let id = spec.job.clone();
        c.wait_for_open_round(&id, RoundId(1), T).await.unwrap();
        Job { c, id, m: Arc::new(spec.manifest.clone()), rejected }
    }

    fn request(&self, who: &str, n: u64, payload: Bytes) -> UpdateRequest {
        UpdateRequest {
            job: self.id.clone(),
            client: cid(who),
            round: RoundId(1),
            base_version: ModelVersion(0),
            num_examples: n,
            kind: UpdateKind::Parameters,
            payload,
            force_upload: false,
        }
    }

    /// Publishes `values` (rounded to the manifest's dtypes) through the SDK; returns them as
    /// sent, with the weight, for the oracle.
    async fn send(&self, who: &str, n: u64, values: &[Vec<f64>]) -> (Vec<Vec<f64>>, f64) {
        let sent = as_sent(&self.m, values);
        self.c.publish_update(self.request(who, n, payload(&self.m, &sent))).await.unwrap();
        (sent, n as f64)
    }

    /// Headers of round 1, base version 0, with `Shoal-Num-Examples: n` as given.
    fn headers(n: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("Shoal-Round", "1");
        h.insert("Shoal-Base-Version", "0");
        h.insert("Shoal-Num-Examples", n);
        h.insert("Shoal-Kind", "parameters");
        h
    }

    /// Publishes raw headers and bytes as client `who`, bypassing the SDK's checks.
    async fn raw(&self, who: &str, h: HeaderMap, payload: Bytes) {
        let subject = self.c.connection().subjects.update(&self.id, &cid(who));
        self.c.connection().js.publish_with_headers(subject, h, payload).await.unwrap().await.unwrap();
    }

    /// Waits for one notice per `(client, reason)` (in any order); returns them by client.
    async fn expect_rejections(&mut self, want: &[(&str, RejectReason)]) -> HashMap<String, RejectNotice> {
        let mut got = HashMap::new();
        while got.len() < want.len() {
            let n = next_rejection(&mut self.rejected).await;
            got.insert(n.client.to_string(), n);
        }
        for (who, reason) in want {
            let n = got.get(*who).unwrap_or_else(|| panic!("no notice for {who}: {got:?}"));
            assert_eq!(n.reason, *reason, "{n:?}");
        }
        got
    }

    async fn closed(&self, round: u64) -> JobState {
        self.c.wait_for_round_closed(&self.id, RoundId(round), T).await.unwrap()
    }

    /// Waits for round 1 to commit from `clients` updates of total weight `weight`; returns
    /// model version 1.
    async fn committed(&self, clients: u32, weight: f64) -> Parameters {
        let after = self.closed(1).await;
        match after.last_outcome {
            Some(RoundOutcome::Committed { clients: c, total_weight, .. }) => {
                assert_eq!((c, total_weight), (clients, weight), "{after:?}")
            }
            other => panic!("round 1 did not commit: {other:?}"),
        }
        self.model(1).await
    }

    async fn model(&self, version: u64) -> Parameters {
        let bytes = self.c.fetch_model(&self.id, ModelVersion(version)).await.unwrap();
        Parameters::from_safetensors(Arc::clone(&self.m), &bytes).unwrap()
    }

    /// No notice arrived for this job beyond those already read.
    fn no_more_rejections(&mut self) {
        let mut quiet = std::pin::pin!(self.rejected.next());
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        if let std::task::Poll::Ready(Some(m)) = quiet.as_mut().poll(&mut cx) {
            let n: RejectNotice = shoal_proto::decode("notice", &m.payload).unwrap();
            panic!("unexpected rejection {n:?}");
        }
    }
}

/// `shoal_updates_rejected_total{reason}` on `node` is at least 1.
async fn assert_counted(node: &NodeProcess, c: &ShoalClient, reason: RejectReason) {
    let text = node.metrics(&c.connection().client).await;
    let key = format!("shoal_updates_rejected_total{{reason=\"{}\"}}", reason.as_str());
    assert!(metrics::scrape(&text, &key).unwrap_or(0.0) >= 1.0, "{key} not counted:\n{text}");
}

/// f32 results against f64 expectations: equal to within f32 rounding.
fn assert_f32_close(got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-6 * w.abs().max(1e-30), "element {i}: committed {g}, expected {w}");
    }
}

// =============================================================================================
// A. Aggregation numerics, weights and dtypes
// =============================================================================================

/// Row 1 (Flower #7645): every update reports `num_examples = 0`. Both are refused at ingest as
/// `invalid_weight`, the round then has no update, fails at its deadline as `quorum_not_met`
/// (accepted 0), no model version 1 is written and version 0 (the initial [0.5, -0.5]) stands.
/// The kernel behind it: a partial with nothing folded is the typed `ZeroTotalWeight`, and a
/// weight of 0 is refused before folding, never a NaN model.
#[tokio::test]
async fn a01_all_zero_weights_refused_and_the_previous_model_stands() {
    let m = manifest(vec![t("w", DType::F32, &[2])]);
    let c = connect(&cluster().nats.url()).await;
    let spec = job_spec("a01-zero-weights", (*m).clone(), 2, 2, 1500, 1);
    let initial = Parameters::from_f64(Arc::clone(&m), &[vec![0.5, -0.5]]).unwrap();
    let mut job = Job::create(c, spec, Some(&initial)).await;
    job.raw("a", Job::headers("0"), payload(&m, &[vec![1.0, 2.0]])).await;
    job.raw("b", Job::headers("0"), payload(&m, &[vec![3.0, 4.0]])).await;
    job.expect_rejections(&[("a", RejectReason::InvalidWeight), ("b", RejectReason::InvalidWeight)]).await;
    let after = job.closed(1).await;
    assert_eq!(after.last_outcome, Some(RoundOutcome::QuorumNotMet { accepted: 0, min_clients: 2 }));
    assert_eq!(after.model_version, ModelVersion(0));
    assert!(job.c.fetch_model(&job.id, ModelVersion(1)).await.is_err(), "no model was published");
    assert_eq!(job.model(0).await.tensor_f64(0), vec![0.5, -0.5]);
    assert_counted(&cluster().node, &job.c, RejectReason::InvalidWeight).await;

    // The same inputs against the kernel: weight 0 is refused, an empty total is typed.
    let mut fedavg = shoal_functions::FedAvg::parameters();
    let a = Parameters::from_f64(Arc::clone(&m), &[vec![1.0, 2.0]]).unwrap();
    let mut partial = PartialAggregate::new(Arc::clone(&m));
    let e = fedavg.fold(&mut partial, &a.as_update(&cid("a"), 0.0)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidWeight);
    let e = fedavg.finish(&partial, &initial).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ZeroTotalWeight);
    assert_eq!(e.to_string(), "total weight 0 is not positive (0 updates folded)");
}

/// Row 2 (Flower #7693): Shoal has no separate evaluation-metrics channel; a metric a client
/// reports travels as a tensor under the same weight rules. Two replies `{loss: 2.0, n: 0}` and
/// `{loss: 3.0, n: 0}` are refused as `invalid_weight`, the node stays up and the round is not
/// aborted: two later replies `{2.0, n: 1}` and `{4.0, n: 3}` commit loss (1·2 + 3·4)/4 = 3.5.
#[tokio::test]
async fn a02_zero_weight_metrics_refused_and_the_round_goes_on() {
    let m = manifest(vec![t("loss", DType::F32, &[])]);
    let mut job = Job::new("a02-metrics", &m, (2, 2, 30_000), |_| {}).await;
    job.raw("a", Job::headers("0"), payload(&m, &[vec![2.0]])).await;
    job.raw("b", Job::headers("0"), payload(&m, &[vec![3.0]])).await;
    job.expect_rejections(&[("a", RejectReason::InvalidWeight), ("b", RejectReason::InvalidWeight)]).await;
    job.send("c", 1, &[vec![2.0]]).await;
    job.send("d", 3, &[vec![4.0]]).await;
    let model = job.committed(2, 4.0).await;
    assert_eq!(model.tensor_f64(0), vec![3.5]);
}

/// Row 3 (Flower #7708): weights 0, −1, NaN and 1e308 are refused at ingest, and so is every
/// spelling that is not plain decimal digits (`+100`, `1e3`, `7.0`, `0x10`, `7 0`, 2^64, empty)
/// and a weight above the job's `max_num_examples` (1000 here). ` 7 ` is 7: spaces around a
/// header value are header syntax, stripped by the NATS client before Shoal reads it. A round
/// header `+1` is `malformed_headers`. The round then commits from the two valid weights 7 and
/// 1000 (the maximum itself is allowed): (7·[1, 2] + 1000·[3, 4]) / 1007.
#[tokio::test]
async fn a03_invalid_num_examples_refused_at_ingest() {
    let m = manifest(vec![t("w", DType::F32, &[2])]);
    let mut job = Job::new("a03-weights", &m, (2, 2, 30_000), |s| s.max_num_examples = 1000).await;
    let bad =
        ["0", "-1", "NaN", "1e308", "+100", "1e3", "7.0", "0x10", "7 0", "18446744073709551616", "", "1001"];
    let mut want = Vec::new();
    let names: Vec<String> = (0..bad.len()).map(|i| format!("bad-{i}")).collect();
    for (n, who) in bad.iter().zip(&names) {
        job.raw(who, Job::headers(n), payload(&m, &[vec![9.0, 9.0]])).await;
        want.push((who.as_str(), RejectReason::InvalidWeight));
    }
    let mut h = Job::headers("5");
    h.insert("Shoal-Round", "+1");
    job.raw("bad-round", h, payload(&m, &[vec![9.0, 9.0]])).await;
    want.push(("bad-round", RejectReason::MalformedHeaders));
    job.expect_rejections(&want).await;

    job.raw("good-a", Job::headers(" 7 "), payload(&m, &[vec![1.0, 2.0]])).await;
    job.raw("good-b", Job::headers("1000"), payload(&m, &[vec![3.0, 4.0]])).await;
    let model = job.committed(2, 1007.0).await;
    assert_f32_close(&model.tensor_f64(0), &[3007.0 / 1007.0, 4014.0 / 1007.0]);
    job.no_more_rejections();
}

/// Row 5 (Flower PR #885): FedYogi over 5 rounds of deltas that alternate in sign, element e of
/// magnitude 10^(e−8) (1e-8 … 1e3), τ = 1e-3: v_t ≥ 0 and the model finite every round. After
/// round 1, v = 0 − (1 − β₂)·Δ²·sign(0 − Δ²) = 0.01·Δ² (1e4 for Δ = 1e3).
#[test]
fn a05_fedyogi_alternating_deltas_keep_v_nonnegative_and_the_model_finite() {
    use shoal_functions::server_opt::{ServerOptimizer, ServerOptimizerSpec};
    let m = manifest(vec![t("w", DType::F64, &[12])]);
    let mut opt = ServerOptimizer::new(ServerOptimizerSpec::fedyogi()).unwrap();
    let mut x = Parameters::zeros(Arc::clone(&m));
    for round in 0..5 {
        let sign = if round % 2 == 0 { 1.0 } else { -1.0 };
        let xs = x.tensor_f64(0);
        let agg: Vec<f64> = (0..12).map(|e| xs[e] + sign * 10f64.powi(e as i32 - 8)).collect();
        let agg = Parameters::from_f64(Arc::clone(&m), &[agg]).unwrap();
        x = opt.step(&x, &agg).unwrap();
        let v = opt.second_moment().unwrap();
        assert!(v.iter().all(|v| v.is_finite() && *v >= 0.0), "round {round}: v = {v:?}");
        assert!(x.tensor_f64(0).iter().all(|y| y.is_finite()), "round {round}");
        if round == 0 {
            assert!((v[11] - 1e4).abs() <= 1e-12 * 1e4, "v after round 1 = {}", v[11]);
            assert!((v[0] - 1e-18).abs() <= 1e-30, "v after round 1 = {}", v[0]);
        }
    }
}

/// Row 6 (Flower #2342): a job declares a cohort of 10 but only 2 updates arrive. Shoal has no
/// DP noise to calibrate; the average is calibrated on the updates that arrived: with quorum 2
/// the round commits at its deadline from the 2, weight 1 + 3, model (1·[1, 2] + 3·[3, 4])/4 =
/// [2.5, 3.5]; with quorum 10 it fails as `quorum_not_met` (2 of 10). Output always finite.
#[tokio::test]
async fn a06_declared_cohort_larger_than_the_arrivals() {
    let m = manifest(vec![t("w", DType::F32, &[2])]);
    let (small, strict) = tokio::join!(
        Job::new("a06-quorum-2", &m, (10, 2, 3000), |_| {}),
        Job::new("a06-quorum-10", &m, (10, 10, 3000), |_| {}),
    );
    for job in [&small, &strict] {
        job.send("a", 1, &[vec![1.0, 2.0]]).await;
        job.send("b", 3, &[vec![3.0, 4.0]]).await;
    }
    assert_eq!(small.committed(2, 4.0).await.tensor_f64(0), vec![2.5, 3.5]);
    let after = strict.closed(1).await;
    assert_eq!(after.last_outcome, Some(RoundOutcome::QuorumNotMet { accepted: 2, min_clients: 10 }));
}

/// Row 7 (Flower #4828): Shoal has no DP stage; its float-only server stage is the server
/// optimizer. U(a, 1, 5, {w: f32[3] = [0.5, −1, 2], steps: i64[] = 7}) through FedAdam
/// (η 0.1, β₁ 0.9, β₂ 0.99, τ 1e-9, Flower's bias correction) from a zero model: `steps` stays
/// the integer 7 (it is never put through float arithmetic), and each w moves by
/// η·√(1−β₂²)/(1−β₁²) · 0.1·Δ / (0.1·|Δ| + τ) ≈ ±0.0742.
#[tokio::test]
async fn a07_integer_tensors_are_not_put_through_the_float_server_stage() {
    let m = manifest(vec![t("w", DType::F32, &[3]), t("steps", DType::I64, &[])]);
    let job = Job::new("a07-int-server-opt", &m, (1, 1, 30_000), |s| {
        s.server_optimizer = Some(shoal_functions::server_opt::ServerOptimizerSpec::fedadam());
    })
    .await;
    job.send("a", 5, &[vec![0.5, -1.0, 2.0], vec![7.0]]).await;
    let model = job.committed(1, 5.0).await;
    assert_eq!(model.tensor_f64(1), vec![7.0]);
    assert!(matches!(model.tensor(1), shoal_functions::tensor::TensorData::I64(&[7])));
    let eta = 0.1 * (1.0f64 - 0.99 * 0.99).sqrt() / (1.0 - 0.9 * 0.9);
    let want: Vec<f64> = [0.5f64, -1.0, 2.0].iter().map(|d| eta * 0.1 * d / (0.1 * d.abs() + 1e-9)).collect();
    assert_f32_close(&model.tensor_f64(0), &want);
    assert!((want[0] - 0.074_245_8).abs() < 1e-6, "{want:?}");
}

/// Row 8 (NVFlare #156): four clients with `bn.num_batches_tracked` 10, 20, 30, 40 (i64
/// scalars). Under the declared `max` policy the model holds 40; a counter under `mean` holds
/// the round-half-even mean 25. Both stay i64; `conv` (f32[64]) is the weighted mean.
#[tokio::test]
async fn a08_integer_counters_follow_the_declared_policy_and_keep_their_dtype() {
    let m = manifest(vec![
        t("conv", DType::F32, &[64]),
        with_policy(t("bn.num_batches_tracked", DType::I64, &[]), AggregationPolicy::Max),
        t("bn.mean_counter", DType::I64, &[]),
    ]);
    let job = Job::new("a08-bn-counters", &m, (4, 4, 30_000), |_| {}).await;
    let mut sent = Vec::new();
    for (i, who) in ["a", "b", "c", "d"].iter().enumerate() {
        let counter = 10.0 * (i + 1) as f64;
        let conv = random_values(&m, 80 + i as u64).swap_remove(0);
        sent.push(job.send(who, 1, &[conv, vec![counter], vec![counter]]).await);
    }
    let model = job.committed(4, 4.0).await;
    assert_f32_close(&model.tensor_f64(0), &weighted_mean_oracle(&sent)[0]);
    assert!(matches!(model.tensor(1), shoal_functions::tensor::TensorData::I64(&[40])));
    assert!(matches!(model.tensor(2), shoal_functions::tensor::TensorData::I64(&[25])));
}

/// Row 9 (flame PR #335): i64 [10] and [21] with equal weights give 16 (15.5 rounded half to
/// even), not 15 (per-term truncation) nor 0 (Flower's in-place path).
#[tokio::test]
async fn a09_int64_mean_rounds_half_to_even_not_per_term() {
    let m = manifest(vec![t("n", DType::I64, &[1])]);
    let job = Job::new("a09-int-mean", &m, (2, 2, 30_000), |_| {}).await;
    job.send("a", 1, &[vec![10.0]]).await;
    job.send("b", 1, &[vec![21.0]]).await;
    assert_eq!(job.committed(2, 2.0).await.tensor_f64(0), vec![16.0]);
}

/// Row 10 (NVFlare PR #3273): bf16 updates are decoded, accumulated in f64 and rounded once
/// to bf16. a = [1, 1, 100, −3] (n 1), b = [1.0078125, 1.015625, 101, −2.984375] (n 3): the
/// f64 means [1.005859375, 1.01171875, 100.75, −2.98828125] round to [1.0078125, 1.015625
/// (a tie, to the even mantissa), 101 (a tie, to even), −2.984375], each within one bf16 ulp.
/// The same two bytes per element declared as F16 are refused as `schema_mismatch`, never
/// reinterpreted.
#[tokio::test]
async fn a10_bf16_is_decoded_accumulated_and_rounded_once() {
    let m = manifest(vec![t("w", DType::BF16, &[4])]);
    let mut job = Job::new("a10-bf16", &m, (2, 2, 30_000), |_| {}).await;
    let f16 = manifest(vec![t("w", DType::F16, &[4])]);
    job.raw("f16", Job::headers("2"), payload(&f16, &[vec![1.0, 1.0, 100.0, -3.0]])).await;
    job.expect_rejections(&[("f16", RejectReason::SchemaMismatch)]).await;
    job.send("a", 1, &[vec![1.0, 1.0, 100.0, -3.0]]).await;
    job.send("b", 3, &[vec![1.0078125, 1.015625, 101.0, -2.984375]]).await;
    let got = job.committed(2, 4.0).await.tensor_f64(0);
    assert_eq!(got, vec![1.0078125, 1.015625, 101.0, -2.984375]);
    let oracle = [1.005859375, 1.01171875, 100.75, -2.98828125];
    let ulp = [0.0078125, 0.0078125, 0.5, 0.015625];
    for i in 0..4 {
        assert!((got[i] - oracle[i]).abs() <= ulp[i], "element {i}");
    }
}

/// Row 11 (MediSwarm #529): 5 honest updates (a common centre plus 1 % noise, n = 100…500)
/// and one site (n = 190) sending its update ×1000. FedAvg has no anomaly flag in Shoal (its
/// breakdown point is 0: the attacker's 190/1690 share moves it ~112× the honest norm away);
/// the robust strategies are Shoal's answer. Through the node, the coordinate-wise median is
/// the mean of the 3rd and 4th values per coordinate (computed here) and lies within 5 % of
/// the honest mean; Krum (f = 1) and the trimmed mean (β = 0.2) too.
#[tokio::test]
async fn a11_a_scaled_update_moves_fedavg_but_not_the_robust_rules() {
    use rand::{Rng, SeedableRng};
    let m = manifest(vec![t("w", DType::F32, &[1000])]);
    let job = Job::new("a11-scaled", &m, (6, 6, 30_000), |s| s.strategy = StrategySpec::Median).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let centre: Vec<f64> = (0..1000).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let mut honest = Vec::new();
    for (i, who) in ["h1", "h2", "h3", "h4", "h5"].iter().enumerate() {
        let v: Vec<f64> = centre.iter().map(|c| c + 0.01 * rng.gen_range(-1.0..1.0)).collect();
        honest.push(job.send(who, 100 * (i as u64 + 1), &[v]).await);
    }
    let scaled: Vec<f64> = honest[0].0[0].iter().map(|x| x * 1000.0).collect();
    let attacker = job.send("x", 190, &[scaled]).await;
    let model = job.committed(6, 1690.0).await.tensor_f64(0);
    let honest_mean = weighted_mean_oracle(&honest).swap_remove(0);
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let rel = |agg: &[f64]| {
        norm(&agg.iter().zip(&honest_mean).map(|(a, h)| a - h).collect::<Vec<_>>()) / norm(&honest_mean)
    };
    for e in 0..1000 {
        let mut col: Vec<f64> = honest.iter().chain([&attacker]).map(|(v, _)| v[0][e]).collect();
        col.sort_by(f64::total_cmp);
        let want = (col[2] + col[3]) / 2.0;
        assert!((model[e] - want).abs() <= 1e-6 * want.abs().max(1e-30), "element {e}");
    }
    assert!(rel(&model) < 0.05, "median: {}", rel(&model));
    let mut all = honest.clone();
    all.push(attacker.clone());
    assert!(rel(&weighted_mean_oracle(&all)[0]) > 100.0, "FedAvg is not robust");

    // Krum and the trimmed mean on the same cohort (kernels).
    let params: Vec<(Parameters, ClientId, f64)> = all
        .iter()
        .enumerate()
        .map(|(i, (v, n))| (Parameters::from_f64(Arc::clone(&m), v).unwrap(), cid(&format!("c{i}")), *n))
        .collect();
    let views: Vec<_> = params.iter().map(|(p, c, n)| p.as_update(c, *n)).collect();
    let zeros = Parameters::zeros(Arc::clone(&m));
    let mut krum = shoal_functions::robust::Krum::new(1, 1, 6).unwrap();
    assert!(rel(&krum.aggregate_cohort(&views, &zeros).unwrap().tensor_f64(0)) < 0.05);
    let mut trimmed = shoal_functions::robust::TrimmedMean::new(0.2, 6).unwrap();
    assert!(rel(&trimmed.aggregate_cohort(&views, &zeros).unwrap().tensor_f64(0)) < 0.05);
}

// =============================================================================================
// B. Size limits, memory and large models
// =============================================================================================

/// An update of `n` f32 values as safetensors, with its values as sent.
fn big_update(m: &Arc<ModelManifest>, seed: u64) -> (Vec<Vec<f64>>, Bytes) {
    let v = as_sent(m, &random_values(m, seed));
    let p = payload(m, &v);
    (v, p)
}

/// Row 12 (Flower #3006): the job's limit is exactly the size L of its valid updates (1.2 MB,
/// over the server's 1 MiB max_payload). Valid updates of L bytes travel on the upload path
/// and commit. An update of L + 1 bytes is refused: by the SDK at once with
/// `PayloadTooLarge { size: L + 1, limit: L }` before anything is sent, and by the gateway, for
/// a client that bypasses the SDK, as `payload_too_large` from the upload's declared size
/// before any chunk is read. Never a silent drop, never a time-out. (~520 MB is not run here:
/// the same path, 1 MiB chunks.)
#[tokio::test]
async fn b12_limit_plus_one_refused_at_once_and_a_large_update_travels_by_upload() {
    let m = manifest(vec![t("w", DType::F32, &[300_000])]);
    let (_, probe) = big_update(&m, 1);
    let limit = probe.len();
    let mut job =
        Job::new("b12-limit", &m, (2, 2, 30_000), |s| s.max_update_bytes = Some(limit as u64)).await;
    let mut over = probe.to_vec();
    over.push(0);
    let over = Bytes::from(over);
    let started = Instant::now();
    let e = job.c.publish_update(job.request("x", 1, over.clone())).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2), "a size error is immediate");
    assert!(
        matches!(e, Error::PayloadTooLarge { what: "update", size, limit: l, .. } if size == limit + 1 && l == limit),
        "{e}"
    );
    // Bypassing the SDK: the chunks are written, the gateway refuses the upload from its
    // declared size before reading any of them.
    let up = upload_chunks(&job, "y", &over).await;
    upload_message(&job, "y", &up).await;
    let notices = job.expect_rejections(&[("y", RejectReason::PayloadTooLarge)]).await;
    assert!(notices["y"].detail.contains(&format!("of {} bytes exceeds the limit of {limit}", limit + 1)));
    let mut sent = Vec::new();
    for (who, n, seed) in [("a", 2u64, 2u64), ("b", 6, 3)] {
        let (v, p) = big_update(&m, seed);
        assert_eq!(p.len(), limit);
        let via = job.c.publish_update(job.request(who, n, p)).await.unwrap();
        assert_eq!(via, Transport::Upload);
        sent.push((v, n as f64));
    }
    let model = job.committed(2, 8.0).await;
    assert_f32_close(&model.tensor_f64(0), &weighted_mean_oracle(&sent)[0]);
    assert_counted(&cluster().node, &job.c, RejectReason::PayloadTooLarge).await;
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(b))
}

/// Publishes `payload` as `who`'s upload chunks for round 1, as the SDK does.
async fn upload_chunks(job: &Job, who: &str, payload: &Bytes) -> Upload {
    let conn = job.c.connection();
    let chunk = job.c.limits(&job.id).await.unwrap().chunk_bytes;
    let who = (&job.id, &cid(who), RoundId(1));
    uploads::publish(&conn.js, &conn.subjects, who, payload, chunk, &sha256_hex(payload)).await.unwrap()
}

/// Publishes `who`'s update message for round 1 naming the upload `up`.
async fn upload_message(job: &Job, who: &str, up: &Upload) {
    let mut h = Job::headers("1");
    h.insert(headers::HDR_UPLOAD_CHUNKS, up.chunks.to_string().as_str());
    h.insert(headers::HDR_UPLOAD_BYTES, up.bytes.to_string().as_str());
    h.insert(headers::HDR_DIGEST, format!("sha256:{}", up.sha256).as_str());
    job.raw(who, h, Bytes::new()).await;
}

/// Row 14 (FATE #877): a 3.2 MB update over a transport with a 1 MiB per-message cap goes on
/// the upload path in chunks (the message names count, length and SHA-256), is reassembled
/// and checked, and commits. An upload whose last chunk is lost is refused as
/// `object_unavailable` naming "chunk 4 of 4", one that lost every chunk naming "chunk 1 of 4"
/// (the gateway used to wait for it forever, stalling every job); one whose chunks are other
/// bytes is refused as `digest_mismatch`; one whose declared count does not match its length
/// as `malformed`. The round then commits.
#[tokio::test]
async fn b14_chunked_update_is_reassembled_and_a_missing_chunk_is_typed() {
    let m = manifest(vec![t("w", DType::F32, &[800_000])]);
    let mut job = Job::new("b14-chunks", &m, (2, 2, 30_000), |_| {}).await;
    let infra = shoal_testkit::infra_of(&job.c).await;
    let chunk = job.c.limits(&job.id).await.unwrap().chunk_bytes;
    let stream = infra.js.get_stream(subjects::Subjects::default().uploads_stream(&job.id)).await.unwrap();

    // x: the last of its 4 chunks is lost.
    let (_, px) = big_update(&m, 10);
    assert_eq!((px.len() as u64).div_ceil(chunk), 4, "{} bytes in chunks of {chunk}", px.len());
    let up_x = upload_chunks(&job, "x", &px).await;
    assert_eq!((up_x.chunks, up_x.bytes), (4, px.len() as u64));
    let last_x = infra.subjects.upload_chunk(&job.id, &cid("x"), RoundId(1), 3);
    let last = stream.direct_get_last_for_subject(last_x).await.unwrap();
    stream.delete_message(last.sequence).await.unwrap();
    upload_message(&job, "x", &up_x).await;

    // w: every chunk is lost.
    let (_, pw) = big_update(&m, 15);
    let up_w = upload_chunks(&job, "w", &pw).await;
    stream.purge().filter(infra.subjects.upload_chunks(&job.id, &cid("w"), RoundId(1))).await.unwrap();
    upload_message(&job, "w", &up_w).await;

    // z: the message declares one payload's digest, the chunks hold another's bytes.
    let (_, pz) = big_update(&m, 11);
    let (_, other) = big_update(&m, 12);
    let mut up_z = upload_chunks(&job, "z", &other).await;
    up_z.sha256 = sha256_hex(&pz);
    upload_message(&job, "z", &up_z).await;

    // v: 4 chunks' worth of bytes declared as 3 chunks.
    let (_, pv) = big_update(&m, 16);
    let mut up_v = upload_chunks(&job, "v", &pv).await;
    up_v.chunks = 3;
    upload_message(&job, "v", &up_v).await;

    let notices = job
        .expect_rejections(&[
            ("x", RejectReason::ObjectUnavailable),
            ("w", RejectReason::ObjectUnavailable),
            ("z", RejectReason::DigestMismatch),
            ("v", RejectReason::Malformed),
        ])
        .await;
    assert!(notices["x"].detail.contains("chunk 4 of 4 is missing"), "{:?}", notices["x"]);
    assert!(notices["w"].detail.contains("chunk 1 of 4 is missing"), "{:?}", notices["w"]);
    assert!(notices["v"].detail.contains("3 chunks declared"), "{:?}", notices["v"]);

    let mut sent = Vec::new();
    for (who, n, seed) in [("a", 1u64, 13u64), ("b", 4, 14)] {
        let (v, p) = big_update(&m, seed);
        assert_eq!(job.c.publish_update(job.request(who, n, p)).await.unwrap(), Transport::Upload);
        sent.push((v, n as f64));
    }
    let model = job.committed(2, 5.0).await;
    assert_f32_close(&model.tensor_f64(0), &weighted_mean_oracle(&sent)[0]);
    // The settled uploads (refused and committed) are purged.
    let deadline = Instant::now() + Duration::from_secs(10);
    while stream.clone().info().await.unwrap().state.messages > 0 {
        assert!(Instant::now() < deadline, "upload chunks left behind");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Row 15 (FLIP #684): a client whose upload was received retries it (same bytes). The upload
/// travels in chunks of about 1 MiB, each acknowledged on its own (no whole-upload time-out to guess).
/// JetStream acknowledges the retry as a duplicate of what it holds (the SDK reports
/// `Rejected(Duplicate)`), the update counts once (total weight 2 + 5 = 7, the oracle of the
/// two clients), and the job is not wedged: round 2 opens from version 1.
#[tokio::test]
async fn b15_a_retried_upload_is_acknowledged_and_counted_once() {
    let m = manifest(vec![t("w", DType::F32, &[300_000])]);
    let c = connect(&cluster().nats.url()).await;
    let spec = job_spec("b15-retry", (*m).clone(), 2, 2, 30_000, 2);
    let job = Job::create(c, spec, None).await;
    let (va, pa) = big_update(&m, 20);
    assert_eq!(job.c.publish_update(job.request("a", 2, pa.clone())).await.unwrap(), Transport::Upload);
    let e = job.c.publish_update(job.request("a", 2, pa)).await.unwrap_err();
    assert!(matches!(e, Error::Rejected(RejectReason::Duplicate)), "{e}");
    let (vb, pb) = big_update(&m, 21);
    job.c.publish_update(job.request("b", 5, pb)).await.unwrap();
    let model = job.committed(2, 7.0).await;
    assert_f32_close(&model.tensor_f64(0), &weighted_mean_oracle(&[(va, 2.0), (vb, 5.0)])[0]);
    let s = job.c.wait_for_open_round(&job.id, RoundId(2), T).await.unwrap();
    assert_eq!((s.round, s.model_version), (RoundId(2), ModelVersion(1)));
}

// =============================================================================================
// C. Liveness, stale and late updates
// =============================================================================================

/// Row 26 (FedScale PR #162): deltas [1], [1], [1] at staleness 0, 1, 3 with s(τ) = 1/√(1+τ),
/// K = 3. Shoal's default (`by_buffer_size`, the FedBuff paper's Algorithm 1) steps
/// Σ s_i Δ_i / K = (1 + 0.7071 + 0.5)/3 = 0.7357; the documented alternative `by_weight_sum`
/// steps Σ s_i Δ_i / Σ s_i = 1.0.
#[test]
fn c26_fedbuff_normalisation_is_the_documented_formula() {
    use shoal_functions::asynchronous::{FedBuff, FedBuffNormalisation};
    let m = manifest(vec![t("w", DType::F64, &[1])]);
    let one = Parameters::from_f64(Arc::clone(&m), &[vec![1.0]]).unwrap();
    let step = |mut fedbuff: FedBuff| {
        let ids = [cid("a"), cid("b"), cid("c")];
        let mut partial = PartialAggregate::new(Arc::clone(&m));
        for (id, tau) in ids.iter().zip([0u64, 1, 3]) {
            let w = Strategy::update_weight(&fedbuff, id, 1, tau).unwrap();
            fedbuff.fold(&mut partial, &one.as_update(id, w)).unwrap();
        }
        fedbuff.finish(&partial, &Parameters::zeros(Arc::clone(&m))).unwrap().tensor_f64(0)[0]
    };
    let default = FedBuff::new(3);
    assert_eq!(default.normalisation, FedBuffNormalisation::ByBufferSize);
    let by_k = step(default);
    assert!((by_k - 0.7357).abs() < 5e-5, "{by_k}");
    assert!((by_k - (1.0 + 0.5f64.sqrt() + 0.5) / 3.0).abs() < 1e-12);
    let by_w = step(FedBuff { normalisation: FedBuffNormalisation::ByWeightSum, ..default });
    assert!((by_w - 1.0).abs() < 1e-12, "{by_w}");
}

/// Safetensors bytes with a `__metadata__` block.
fn with_metadata(m: &Arc<ModelManifest>, values: &[Vec<f64>], meta: &[(&str, &str)]) -> Bytes {
    let p = Parameters::from_f64(Arc::clone(m), values).unwrap();
    let bytes = p.as_bytes();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = m
        .tensors()
        .iter()
        .zip(m.slots())
        .map(|(t, s)| {
            let v = safetensors::tensor::TensorView::new(
                shoal_functions::tensor::dtype_to_safetensors(t.dtype),
                t.shape.clone(),
                &bytes[s.byte_offset..s.byte_offset + s.byte_len],
            )
            .unwrap();
            (t.name.clone(), v)
        })
        .collect();
    let meta: HashMap<String, String> = meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Bytes::from(safetensors::serialize(views, &Some(meta)).unwrap())
}

/// Row 29 (PySyft #4481): an update is a map of named tensors checked against the manifest; no
/// model class is built and no client code runs. An update whose safetensors metadata names a
/// model class and a `__reduce__` hook is aggregated from its tensors alone; a pickle
/// (`\x80\x04\x95…`) is refused as `malformed`. The round commits (1·[1, 2] + 1·[3, 5])/2 =
/// [2, 3.5].
#[tokio::test]
async fn c29_updates_are_named_tensors_and_no_code_runs() {
    let m = manifest(vec![t("w", DType::F32, &[2])]);
    let mut job = Job::new("c29-no-code", &m, (2, 2, 30_000), |_| {}).await;
    let pickle = Bytes::from_static(
        b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94.",
    );
    job.raw("pickler", Job::headers("1"), pickle).await;
    job.expect_rejections(&[("pickler", RejectReason::Malformed)]).await;
    let meta = [("model_class", "torchvision.models.resnet50"), ("__reduce__", "os.system('id')")];
    job.raw("a", Job::headers("1"), with_metadata(&m, &[vec![1.0, 2.0]], &meta)).await;
    job.send("b", 1, &[vec![3.0, 5.0]]).await;
    assert_eq!(job.committed(2, 2.0).await.tensor_f64(0), vec![2.0, 3.5]);
}

// =============================================================================================
// D. NATS transport
// =============================================================================================

/// Row 30 (nats.rs #182): with the broker stopped, three updates are published. Each publish
/// fails with an error the caller sees (the SDK waits for JetStream's ack; none comes), none
/// returns Ok. After the restart the client retries each; a retry that finds its message
/// already delivered is a `duplicate`, so each update counts once: the round (cohort 3)
/// commits weight 1 + 2 + 3 = 6 and the oracle of the three.
#[tokio::test]
async fn d30_publishes_while_the_broker_is_down_fail_visibly_and_retries_count_once() {
    init_logging();
    let mut nats = NatsServer::start().unwrap();
    let node = NodeProcess::start(&nats.url(), "d30", &["--ack-wait-ms", "3000"]).await;
    let c = connect(&nats.url()).await;
    let m = manifest(vec![t("w", DType::F32, &[4])]);
    let job = Job::create(c, job_spec("d30-outage", (*m).clone(), 3, 3, 120_000, 1), None).await;
    job.c.update_limit(&job.id).await.unwrap();
    let updates: Vec<(String, u64, Vec<Vec<f64>>)> =
        (1..=3u64).map(|i| (format!("c{i}"), i, as_sent(&m, &random_values(&m, 30 + i)))).collect();
    nats.kill();
    let attempts = updates.iter().map(|(who, n, v)| {
        let r = job.request(who, *n, payload(&m, v));
        let c = job.c.clone();
        async move { tokio::time::timeout(Duration::from_secs(20), c.publish_update(r)).await }
    });
    for (i, r) in futures::future::join_all(attempts).await.into_iter().enumerate() {
        let r = r.unwrap_or_else(|_| panic!("publish {i} hung with the broker down"));
        assert!(r.is_err(), "publish {i} returned {r:?} with the broker down");
    }
    nats.restart().unwrap();
    for (who, n, v) in &updates {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match job.c.publish_update(job.request(who, *n, payload(&m, v))).await {
                Ok(_) | Err(Error::Rejected(RejectReason::Duplicate)) => break,
                Err(e) if Instant::now() < deadline => {
                    tracing::info!(error = %e, "retrying after the restart");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => panic!("{who}: {e}\nnode log:\n{}", node.log()),
            }
        }
    }
    let sent: Vec<(Vec<Vec<f64>>, f64)> = updates.iter().map(|(_, n, v)| (v.clone(), *n as f64)).collect();
    let after = job.c.wait_for_round_closed(&job.id, RoundId(1), Duration::from_secs(60)).await;
    let after = after.unwrap_or_else(|e| panic!("{e}\nnode log:\n{}", node.log()));
    assert!(
        matches!(after.last_outcome, Some(RoundOutcome::Committed { clients: 3, total_weight, .. }) if total_weight == 6.0),
        "{after:?}"
    );
    assert_f32_close(&job.model(1).await.tensor_f64(0), &weighted_mean_oracle(&sent)[0]);
}

/// A U8 manifest whose updates encode to exactly `size` bytes of safetensors.
fn manifest_of_size(size: usize) -> Arc<ModelManifest> {
    let mut n = size - 128;
    for _ in 0..8 {
        let m = manifest(vec![t("w", DType::U8, &[n])]);
        let len = payload(&m, &[vec![0.0; n]]).len();
        if len == size {
            return m;
        }
        n = (n as isize + size as isize - len as isize) as usize;
    }
    panic!("no U8 manifest encodes to {size} bytes");
}

/// Row 31 (nats.rs #1093): a write larger than the server's 1 MiB max_payload.
/// - An update of exactly 1,048,577 bytes: the SDK checks it against the server's INFO
///   `max_payload` and sends it through the object store; it commits.
/// - A job spec whose encoding exceeds 1,048,576 bytes (a KV put): `create_job` refuses it at
///   once with `PayloadTooLarge { limit: 1048576 }` and writes nothing, while another client's
///   publish in flight at the same moment goes through.
#[tokio::test]
async fn d31_over_max_payload_is_an_immediate_typed_error_or_an_upload() {
    let m = manifest_of_size(MAX_PAYLOAD + 1);
    let job = Job::new("d31-over-max-payload", &m, (2, 2, 30_000), |_| {}).await;
    assert_eq!(job.c.connection().max_payload(), MAX_PAYLOAD);
    let va = as_sent(&m, &random_values(&m, 40));
    let pa = payload(&m, &va);
    assert_eq!(pa.len(), 1_048_577);
    assert_eq!(job.c.publish_update(job.request("a", 1, pa)).await.unwrap(), Transport::Upload);

    let names: Vec<TensorSpec> = (0..20_000)
        .map(|i| t(&format!("encoder.layer_{i:05}.attention.output.dense.weight"), DType::F32, &[1]))
        .collect();
    let huge = job_spec("d31-huge-spec", ModelManifest::new(names).unwrap(), 1, 1, 30_000, 1);
    let vb = as_sent(&m, &random_values(&m, 41));
    let started = Instant::now();
    let infra = shoal_testkit::infra_of(&job.c).await;
    let (created, published) = tokio::join!(
        jobs::create_job(&infra, &huge, None),
        job.c.publish_update(job.request("b", 3, payload(&m, &vb))),
    );
    let e = created.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "not a time-out");
    assert!(
        matches!(e, Error::PayloadTooLarge { what: "job spec", size, limit: MAX_PAYLOAD, .. } if size > MAX_PAYLOAD),
        "{e}"
    );
    assert!(matches!(job.c.job_state(&huge.job).await, Err(Error::UnknownJob(_))));
    published.unwrap();
    let want: Vec<f64> =
        va[0].iter().zip(&vb[0]).map(|(a, b)| ((a + 3.0 * b) / 4.0).round_ties_even()).collect();
    assert_eq!(job.committed(2, 4.0).await.tensor_f64(0), want);
}

/// Row 32 (nats.net #376): an oversized publish immediately followed by 10 normal updates. The
/// oversized one (2 MiB against the job's default limit 16 + 65,536 + 262 = 65,814 bytes) is
/// refused by the SDK before it reaches the socket, and a raw JetStream publish of the same
/// 2 MiB on the same connection is refused by the client library against max_payload; the
/// connection stays up and all 10 updates commit (cohort 10, weights 1…10, total 55).
#[tokio::test]
async fn d32_an_oversized_publish_does_not_take_the_next_ten_with_it() {
    let m = manifest(vec![t("w", DType::F32, &[4])]);
    let mut job = Job::new("d32-burst", &m, (10, 10, 30_000), |_| {}).await;
    let big = Bytes::from(vec![7u8; 2 << 20]);
    let e = job.c.publish_update(job.request("big", 1, big.clone())).await.unwrap_err();
    assert!(
        matches!(e, Error::PayloadTooLarge { what: "update", size: 2_097_152, limit: 65_814, .. }),
        "{e}"
    );
    let subject = job.c.connection().subjects.update(&job.id, &cid("big"));
    match job.c.connection().js.publish_with_headers(subject, Job::headers("1"), big).await {
        Err(e) => assert_eq!(e.kind(), async_nats::jetstream::context::PublishErrorKind::MaxPayloadExceeded),
        Ok(_) => panic!("a 2 MiB message went to the socket"),
    }
    let mut sent = Vec::new();
    for i in 0..10u64 {
        sent.push(job.send(&format!("c{i}"), i + 1, &random_values(&m, 50 + i)).await);
    }
    let model = job.committed(10, 55.0).await;
    assert_f32_close(&model.tensor_f64(0), &weighted_mean_oracle(&sent)[0]);
    job.no_more_rejections();
}

/// Row 33 (dynamo #9734): a request over a limit is reported as a size error, not a time-out.
/// - A raw update of 100,000 bytes (under max_payload) for a job with `max_update_bytes`
///   4096: the gateway's answer on `shoal.<job>.rejected.<client>` is `payload_too_large`
///   ("update of 100000 bytes exceeds the job's max_update_bytes 4096"), counted in
///   `shoal_updates_rejected_total{reason="payload_too_large"}`, within seconds.
/// - The same through the SDK: `PayloadTooLarge { size: 100000, limit: 4096 }` at once.
/// - A 2 MiB request to the node's control subject: the NATS client's `MaxPayloadExceeded`, not
///   `TimedOut`.
#[tokio::test]
async fn d33_oversized_control_plane_requests_are_size_errors_not_timeouts() {
    let m = manifest(vec![t("w", DType::F32, &[4])]);
    let mut job = Job::new("d33-size-class", &m, (2, 2, 30_000), |s| s.max_update_bytes = Some(4096)).await;
    let started = Instant::now();
    job.raw("x", Job::headers("1"), Bytes::from(vec![0u8; 100_000])).await;
    let notices = job.expect_rejections(&[("x", RejectReason::PayloadTooLarge)]).await;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(notices["x"].detail.contains("update of 100000 bytes exceeds the job's max_update_bytes 4096"));
    assert_counted(&cluster().node, &job.c, RejectReason::PayloadTooLarge).await;
    let e = job.c.publish_update(job.request("y", 1, Bytes::from(vec![0u8; 100_000]))).await.unwrap_err();
    assert!(matches!(e, Error::PayloadTooLarge { size: 100_000, limit: 4096, .. }), "{e}");
    let subject = format!("shoal.node.{}.metrics", cluster().node.node_id);
    let e = job.c.connection().client.request(subject, Bytes::from(vec![0u8; 2 << 20])).await.unwrap_err();
    assert_eq!(e.kind(), async_nats::RequestErrorKind::MaxPayloadExceeded);
    job.send("a", 1, &[vec![1.0, 2.0, 3.0, 4.0]]).await;
    job.send("b", 1, &[vec![3.0, 4.0, 5.0, 6.0]]).await;
    assert_eq!(job.committed(2, 2.0).await.tensor_f64(0), vec![2.0, 3.0, 4.0, 5.0]);
}

// =============================================================================================
// E. Cross-check findings (flwr 1.42.0)
// =============================================================================================

/// C1: i64 [10] and [20], equal weights: 15, never Flower in-place's 0.
#[tokio::test]
async fn e_c1_int64_fifty_fifty_is_15_not_0() {
    let m = manifest(vec![t("n", DType::I64, &[1])]);
    let job = Job::new("c1-int-mean", &m, (2, 2, 30_000), |_| {}).await;
    job.send("a", 1, &[vec![10.0]]).await;
    job.send("b", 1, &[vec![20.0]]).await;
    assert_eq!(job.committed(2, 2.0).await.tensor_f64(0), vec![15.0]);
}

/// C2: f16 [1.0] twice with n = 100,000 each: exactly 1.0 (weights normalised, accumulated in
/// f64), never Flower's float16 overflow to NaN.
#[tokio::test]
async fn e_c2_f16_with_large_weights_is_exactly_one() {
    let m = manifest(vec![t("w", DType::F16, &[1])]);
    let job = Job::new("c2-f16-weights", &m, (2, 2, 30_000), |_| {}).await;
    job.send("a", 100_000, &[vec![1.0]]).await;
    job.send("b", 100_000, &[vec![1.0]]).await;
    assert_eq!(job.committed(2, 200_000.0).await.tensor_f64(0), vec![1.0]);
}

/// C3: Multi-Krum keeping m > k updates is refused when the job is created (`keep` 4 or 5 with
/// 3 clients), never wrapped around; keep = k = 3 is taken and averages all three: Flower
/// vector 25, 1, 2, 3 with m = 3 give 2.0.
#[tokio::test]
async fn e_c3_multi_krum_keep_above_the_cohort_is_refused_at_creation() {
    let m = manifest(vec![t("w", DType::F32, &[1])]);
    let c = connect(&cluster().nats.url()).await;
    for keep in [4, 5] {
        let mut spec = job_spec(&format!("c3-keep-{keep}"), (*m).clone(), 3, 3, 30_000, 1);
        spec.strategy = StrategySpec::MultiKrum { byzantine: 0, keep };
        let e = jobs::create_job(&shoal_testkit::infra_of(&c).await, &spec, None).await.unwrap_err();
        assert!(matches!(e, Error::Spec(_)), "{e}");
        assert!(matches!(c.job_state(&spec.job).await, Err(Error::UnknownJob(_))));
    }
    let mut krum = shoal_functions::robust::Krum::new(0, 3, 3).unwrap();
    let ps: Vec<Parameters> =
        [1.0, 2.0, 3.0].iter().map(|v| Parameters::from_f64(Arc::clone(&m), &[vec![*v]]).unwrap()).collect();
    let ids = [cid("a"), cid("b"), cid("c")];
    let views: Vec<_> = ps.iter().zip(&ids).map(|(p, c)| p.as_update(c, 1.0)).collect();
    let out = krum.aggregate_cohort(&views, &Parameters::zeros(Arc::clone(&m))).unwrap();
    assert_eq!(out.tensor_f64(0), vec![2.0]);
}

/// C4: Bulyan without its parameter (`{"name": "bulyan"}`) is refused when the spec is read,
/// and Bulyan with f = 1 over 6 clients (it needs 4f + 3 = 7) when the job is created; neither
/// reaches a round.
#[tokio::test]
async fn e_c4_bulyan_without_its_parameters_is_refused_at_creation() {
    let m = manifest(vec![t("w", DType::F32, &[1])]);
    let text = serde_json::json!({
        "job": "c4-bulyan", "manifest": &*m, "strategy": {"name": "bulyan"},
        "round_policy": {"mode": "sync", "cohort_size": 7, "min_clients": 7, "deadline_ms": 1000},
        "rounds": 1
    });
    let e = serde_json::from_value::<JobSpec>(text).unwrap_err();
    assert!(e.to_string().contains("byzantine"), "{e}");
    let c = connect(&cluster().nats.url()).await;
    let mut spec = job_spec("c4-bulyan", (*m).clone(), 6, 6, 30_000, 1);
    spec.strategy = StrategySpec::Bulyan { byzantine: 1 };
    let e = jobs::create_job(&shoal_testkit::infra_of(&c).await, &spec, None).await.unwrap_err();
    assert!(matches!(e, Error::Spec(_)), "{e}");
    assert!(matches!(c.job_state(&spec.job).await, Err(Error::UnknownJob(_))));
}

/// C5: identical keys with shapes (2,) and (3,): the (3,) update is refused at ingest as
/// `schema_mismatch` and the round commits from the others: ([1, 2] + [3, 4])/2 = [2, 3].
#[tokio::test]
async fn e_c5_same_keys_other_shape_refused_and_the_round_continues() {
    let m = manifest(vec![t("w", DType::F32, &[2])]);
    let mut job = Job::new("c5-shapes", &m, (2, 2, 30_000), |_| {}).await;
    let three = manifest(vec![t("w", DType::F32, &[3])]);
    job.raw("wide", Job::headers("1"), payload(&three, &[vec![1.0, 2.0, 3.0]])).await;
    let n = job.expect_rejections(&[("wide", RejectReason::SchemaMismatch)]).await;
    assert!(n["wide"].detail.contains("shape [3]"), "{:?}", n["wide"]);
    job.send("a", 1, &[vec![1.0, 2.0]]).await;
    job.send("b", 1, &[vec![3.0, 4.0]]).await;
    assert_eq!(job.committed(2, 2.0).await.tensor_f64(0), vec![2.0, 3.0]);
}

// =============================================================================================
// Limits (issue 5 part 7)
// =============================================================================================

/// `max_update_bytes` defaults to the data bytes plus the header allowance: for w: f32[2] and
/// n: i64[1], 16 + 65,536 + 2·(256 + 6·1) = 66,076 bytes. 66,077 bytes are `payload_too_large`
/// (SDK and gateway); 66,076 bytes of junk pass the size check and are `malformed`.
#[tokio::test]
async fn limit_max_update_bytes_defaults_to_data_plus_header_allowance() {
    let m = manifest(vec![t("w", DType::F32, &[2]), t("n", DType::I64, &[1])]);
    let mut job = Job::new("limit-update-bytes", &m, (1, 1, 30_000), |_| {}).await;
    assert_eq!(job.c.update_limit(&job.id).await.unwrap(), 66_076);
    let e = job.c.publish_update(job.request("sdk", 1, Bytes::from(vec![0u8; 66_077]))).await.unwrap_err();
    assert!(matches!(e, Error::PayloadTooLarge { size: 66_077, limit: 66_076, .. }), "{e}");
    job.raw("over", Job::headers("1"), Bytes::from(vec![0u8; 66_077])).await;
    job.raw("at", Job::headers("1"), Bytes::from(vec![0u8; 66_076])).await;
    job.expect_rejections(&[("over", RejectReason::PayloadTooLarge), ("at", RejectReason::Malformed)]).await;
    job.send("a", 4, &[vec![1.5, -2.0], vec![3.0]]).await;
    let model = job.committed(1, 4.0).await;
    assert_eq!((model.tensor_f64(0), model.tensor_f64(1)), (vec![1.5, -2.0], vec![3.0]));
}

/// A job's "max tensors" is its manifest's tensor count: a payload whose header declares 1,000
/// tensors against a manifest of 2 is refused as `too_many_tensors` ("declares 3 or more
/// tensors; the manifest has 2": the header scan stops at the first tensor over the limit,
/// before the JSON is parsed).
#[tokio::test]
async fn limit_max_tensors_is_the_manifest_count() {
    let m = manifest(vec![t("w", DType::F32, &[2]), t("n", DType::I64, &[1])]);
    let mut job = Job::new("limit-tensors", &m, (1, 1, 30_000), |_| {}).await;
    let entries: Vec<String> = (0..1000)
        .map(|i| format!(r#""t{i}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{}]}}"#, i + 1))
        .collect();
    let header = format!("{{{}}}", entries.join(","));
    let mut p = (header.len() as u64).to_le_bytes().to_vec();
    p.extend_from_slice(header.as_bytes());
    p.extend_from_slice(&[0u8; 1000]);
    job.raw("many", Job::headers("1"), Bytes::from(p)).await;
    let n = job.expect_rejections(&[("many", RejectReason::TooManyTensors)]).await;
    assert!(n["many"].detail.contains("declares 3 or more tensors; the manifest has 2"), "{:?}", n["many"]);
    assert_counted(&cluster().node, &job.c, RejectReason::TooManyTensors).await;
    job.send("a", 1, &[vec![1.0, 2.0], vec![5.0]]).await;
    job.committed(1, 1.0).await;
}

/// `max_clients_per_round` 2 in a round of cohort 3: a and b are taken, c is refused as
/// `cohort_full`, and the round commits at its deadline from a and b: (1·[1, 2] + 3·[3, 4])/4.
#[tokio::test]
async fn limit_max_clients_per_round_refuses_the_next_client() {
    let m = manifest(vec![t("w", DType::F32, &[2])]);
    let mut job = Job::new("limit-cohort", &m, (3, 2, 2500), |s| s.max_clients_per_round = Some(2)).await;
    job.send("a", 1, &[vec![1.0, 2.0]]).await;
    job.send("b", 3, &[vec![3.0, 4.0]]).await;
    // The gateway handles the job's messages in stream order: a and b are staged before c.
    job.send("c", 5, &[vec![9.0, 9.0]]).await;
    job.expect_rejections(&[("c", RejectReason::CohortFull)]).await;
    assert_eq!(job.committed(2, 4.0).await.tensor_f64(0), vec![2.5, 3.5]);
    assert_counted(&cluster().node, &job.c, RejectReason::CohortFull).await;
}

/// `shoal node --max-jobs 1`: of two jobs, the node serves the first; the second waits
/// (`shoal_jobs_waiting` 1, `shoal_jobs_refused_total` 1, logged once), no round of it opens
/// and its updates are refused as `node_at_capacity`. When the first job finishes the second
/// starts and commits its update ([4, 2]).
#[tokio::test]
async fn limit_max_jobs_queues_the_job_and_refuses_its_updates_until_a_slot_frees() {
    init_logging();
    let nats = NatsServer::start().unwrap();
    let node = NodeProcess::start(&nats.url(), "capped", &["--ack-wait-ms", "3000", "--max-jobs", "1"]).await;
    let m = manifest(vec![t("w", DType::F32, &[2])]);
    let first =
        Job::create(connect(&nats.url()).await, job_spec("cap-first", (*m).clone(), 1, 1, 60_000, 1), None)
            .await;
    let c = connect(&nats.url()).await;
    let spec = job_spec("cap-second", (*m).clone(), 1, 1, 60_000, 1);
    let mut second_rejected = rejections(&c.connection().client, "cap-second").await;
    jobs::create_job(&shoal_testkit::infra_of(&c).await, &spec, None).await.unwrap();
    let scrape = |text: &str, key: &str| metrics::scrape(text, key).unwrap_or(-1.0);
    let deadline = Instant::now() + T;
    loop {
        let text = node.metrics(&c.connection().client).await;
        if scrape(&text, "shoal_jobs_waiting") == 1.0 {
            assert_eq!(scrape(&text, "shoal_jobs_served"), 1.0, "{text}");
            assert_eq!(scrape(&text, "shoal_jobs_refused_total"), 1.0, "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "the second job never waited:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(c.job_state(&spec.job).await.unwrap().opened_at_ms, 0, "no round of it opened");
    let request = |v: f64| UpdateRequest {
        job: spec.job.clone(),
        client: cid("s"),
        round: RoundId(1),
        base_version: ModelVersion(0),
        num_examples: 1,
        kind: UpdateKind::Parameters,
        payload: payload(&m, &[vec![v, 2.0]]),
        force_upload: false,
    };
    c.publish_update(request(3.0)).await.unwrap();
    let notice = next_rejection(&mut second_rejected).await;
    assert_eq!(notice.reason, RejectReason::NodeAtCapacity, "{notice:?}");
    assert_counted(&node, &c, RejectReason::NodeAtCapacity).await;
    assert_eq!(node.log().matches("node at capacity").count(), 1, "logged once:\n{}", node.log());

    first.send("f", 1, &[vec![1.0, 1.0]]).await;
    first.committed(1, 1.0).await;
    let opened = c.wait_for_open_round(&spec.job, RoundId(1), T).await;
    opened.unwrap_or_else(|e| panic!("the waiting job did not start: {e}\n{}", node.log()));
    // Other bytes than the refused update's: JetStream would drop a byte-identical retry as a
    // duplicate within its window.
    c.publish_update(request(4.0)).await.unwrap();
    let after = c.wait_for_round_closed(&spec.job, RoundId(1), T).await.unwrap();
    assert!(matches!(after.last_outcome, Some(RoundOutcome::Committed { clients: 1, .. })), "{after:?}");
    let bytes = c.fetch_model(&spec.job, ModelVersion(1)).await.unwrap();
    let model = Parameters::from_safetensors(Arc::clone(&m), &bytes).unwrap();
    assert_eq!(model.tensor_f64(0), vec![4.0, 2.0]);
}

// =============================================================================================
// Found while fixing the rows
// =============================================================================================

/// The job watch hands a job to the node (which starts its leaf and top) even when the gateway
/// put the job into the directory first, reading it from KV for an update that arrived before
/// the watch's entry. Before the fix the watch took such a job for one it had started, and the
/// job never got a leaf or a top on that node.
#[tokio::test]
async fn the_job_watch_starts_a_job_the_gateway_saw_first() {
    let m = manifest(vec![t("w", DType::F32, &[1])]);
    let c = connect(&cluster().nats.url()).await;
    let spec = job_spec("watch-race", (*m).clone(), 1, 1, 30_000, 1);
    jobs::create_job(&shoal_testkit::infra_of(&c).await, &spec, None).await.unwrap();
    // What `Gateway::job_entry` does for an update of a job it has not seen yet.
    let dir = jobs::JobDirectory::default();
    let (state, rev) = jobs::load_state(&c.connection(), &spec.job).await.unwrap();
    dir.observe_state(&spec.job, Some(Arc::new(spec.clone())), state, rev);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let cancel = tokio_util::sync::CancellationToken::new();
    let watch = tokio::spawn(jobs::watch_jobs(
        shoal_testkit::infra_of(&c).await,
        dir,
        Default::default(),
        cancel.clone(),
        move |j| {
            let _ = tx.send(j);
        },
    ));
    let started = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(j) = rx.recv().await {
            if j == spec.job {
                return true;
            }
        }
        false
    })
    .await;
    cancel.cancel();
    watch.await.unwrap().unwrap();
    assert_eq!(started, Ok(true), "the watch never handed over the job");
}
