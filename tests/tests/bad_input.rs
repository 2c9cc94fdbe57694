//! Every kind of bad update is refused with a typed reason that is counted, published to the
//! client, and does not stop the round: each test sends one bad update into a job whose cohort is
//! two good clients, and the round then commits exactly the good clients' weighted mean.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use shoal_client::connect::ConnectOptions;
use shoal_client::{ShoalClient, UpdateRequest};
use shoal_functions::{ClientId, DType, JobId, ModelManifest, ModelVersion, RoundId, TensorSpec, UpdateKind};
use shoal_proto::JobState;
use shoal_proto::RoundOutcome;
use shoal_runtime::{jobs, metrics, RejectReason};
use shoal_testkit::*;

static CLUSTER: OnceLock<SharedCluster> = OnceLock::new();
const NODE_ARGS: &[&str] = &["--ack-wait-ms", "5000"];
/// The jobs' `inline_limit_bytes`: larger payloads must take the upload path.
const INLINE_LIMIT: u64 = 4096;

fn manifest() -> Arc<ModelManifest> {
    shoal_testkit::manifest(&[("w", DType::F32, &[2, 4]), ("n", DType::I64, &[1])])
}

fn other_manifest(specs: Vec<TensorSpec>) -> Arc<ModelManifest> {
    Arc::new(ModelManifest::new(specs).unwrap())
}

struct Case {
    client: ShoalClient,
    job: JobId,
    state: JobState,
    m: Arc<ModelManifest>,
    rejected: async_nats::Subscriber,
}

impl Case {
    /// A fresh job (cohort 2, quorum 2, `rounds` rounds) on the shared node, round 1 open.
    async fn new(name: &str, rounds: u64) -> Case {
        init_logging();
        let cluster = SharedCluster::get(&CLUSTER, NODE_ARGS);
        let client = ShoalClient::connect(&ConnectOptions { url: cluster.nats.url(), ..Default::default() })
            .await
            .unwrap();
        let m = manifest();
        let job = JobId::new(name).unwrap();
        let rejected = rejections(&client.connection().client, name).await;
        jobs::create_job(
            &shoal_testkit::infra_of(&client).await,
            &shoal_proto::JobSpec {
                inline_limit_bytes: Some(INLINE_LIMIT),
                ..job_spec(name, (*m).clone(), 2, 2, 30_000, rounds)
            },
            None,
        )
        .await
        .unwrap();
        let state = client.wait_for_open_round(&job, RoundId(1), Duration::from_secs(20)).await.unwrap();
        Case { client, job, state, m, rejected }
    }

    fn headers(&self, round: u64, base: u64, n: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("Shoal-Round", round.to_string().as_str());
        h.insert("Shoal-Base-Version", base.to_string().as_str());
        h.insert("Shoal-Num-Examples", n);
        h.insert("Shoal-Kind", "parameters");
        h
    }

    /// Publishes raw bytes with raw headers as client `who`, bypassing the SDK's checks.
    async fn raw(&self, job: &str, who: &str, headers: HeaderMap, payload: Bytes) {
        let subject = format!("shoal.{job}.update.{who}");
        self.client
            .connection()
            .js
            .publish_with_headers(subject, headers, payload)
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// A well-formed payload for this job's manifest.
    fn good_payload(&self, seed: u64) -> (Vec<Vec<f64>>, Bytes) {
        let v = as_sent(&self.m, &random_values(&self.m, seed));
        let p = payload(&self.m, &v);
        (v, p)
    }

    async fn expect_rejection(&mut self, reason: RejectReason) {
        let notice = next_rejection(&mut self.rejected).await;
        assert_eq!(notice.reason, reason, "{notice:?}");
    }

    /// Two good clients complete the round; the committed model is their weighted mean, and the
    /// node counted `reason` at least once.
    async fn round_goes_on(&self, reason: RejectReason) {
        self.complete_round().await;
        self.assert_counted(reason).await;
    }

    async fn assert_counted(&self, reason: RejectReason) {
        let cluster = SharedCluster::get(&CLUSTER, NODE_ARGS);
        let text = cluster.node.metrics(&self.client.connection().client).await;
        let key = format!("shoal_updates_rejected_total{{reason=\"{}\"}}", reason.as_str());
        assert!(metrics::scrape(&text, &key).unwrap_or(0.0) >= 1.0, "{key} not counted:\n{text}");
    }

    async fn complete_round(&self) {
        let mut sent = Vec::new();
        for (c, n) in [("good-a", 3u64), ("good-b", 5u64)] {
            let (values, p) = self.good_payload(c.len() as u64 * 31 + n);
            self.client
                .publish_update(UpdateRequest {
                    job: self.job.clone(),
                    client: ClientId::new(c).unwrap(),
                    round: self.state.round,
                    base_version: self.state.model_version,
                    num_examples: n,
                    kind: UpdateKind::Parameters,
                    payload: p,
                    force_upload: false,
                })
                .await
                .unwrap();
            sent.push((values, n as f64));
        }
        self.expect_commit(&sent).await;
    }

    async fn expect_commit(&self, sent: &[(Vec<Vec<f64>>, f64)]) {
        let after =
            self.client.wait_for_round_closed(&self.job, RoundId(1), Duration::from_secs(20)).await.unwrap();
        assert!(
            matches!(after.last_outcome, Some(RoundOutcome::Committed { clients: 2, .. })),
            "{:?}",
            after.last_outcome
        );
        let bytes = self.client.fetch_model(&self.job, ModelVersion(1)).await.unwrap();
        let model = shoal_functions::Parameters::from_safetensors(Arc::clone(&self.m), &bytes).unwrap();
        let oracle = weighted_mean_oracle(sent);
        for (g, o) in model.tensor_f64(0).iter().zip(&oracle[0]) {
            assert!((g - o).abs() <= 1e-6 * o.abs().max(1e-30), "committed {g}, oracle {o}");
        }
        assert_eq!(model.tensor_f64(1)[0], oracle[1][0].round_ties_even());
    }

    /// Sends one bad update with valid headers and the given payload; expects `reason`.
    async fn bad_payload(mut self, payload: Bytes, reason: RejectReason) {
        let h = self.headers(1, 0, "7");
        self.raw(self.job.as_str(), "bad", h, payload).await;
        self.expect_rejection(reason).await;
        self.round_goes_on(reason).await;
    }

    /// Sends a good payload with the given header values as client `bad`.
    async fn bad_headers_only(&self, round: u64, base: u64, n: &str) {
        let (_, p) = self.good_payload(99);
        let h = self.headers(round, base, n);
        self.raw(self.job.as_str(), "bad", h, p).await;
    }

    /// Sends one good payload with the given header values; expects `reason`.
    async fn bad_headers(mut self, round: u64, base: u64, n: &str, reason: RejectReason) {
        self.bad_headers_only(round, base, n).await;
        self.expect_rejection(reason).await;
        self.round_goes_on(reason).await;
    }
}

#[tokio::test]
async fn shape_differs_from_the_manifest() {
    let c = Case::new("bad-shape", 1).await;
    let m = other_manifest(vec![
        TensorSpec::new("w", DType::F32, vec![4, 2]),
        TensorSpec::new("n", DType::I64, vec![1]),
    ]);
    let p = payload(&m, &random_values(&m, 1));
    c.bad_payload(p, RejectReason::SchemaMismatch).await;
}

#[tokio::test]
async fn dtype_differs_from_the_manifest() {
    let c = Case::new("bad-dtype", 1).await;
    let m = other_manifest(vec![
        TensorSpec::new("w", DType::F64, vec![2, 4]),
        TensorSpec::new("n", DType::I64, vec![1]),
    ]);
    let p = payload(&m, &random_values(&m, 1));
    c.bad_payload(p, RejectReason::SchemaMismatch).await;
}

#[tokio::test]
async fn tensor_missing() {
    let c = Case::new("bad-missing", 1).await;
    let m = other_manifest(vec![TensorSpec::new("w", DType::F32, vec![2, 4])]);
    let p = payload(&m, &random_values(&m, 1));
    c.bad_payload(p, RejectReason::SchemaMismatch).await;
}

#[tokio::test]
async fn tensor_extra() {
    let c = Case::new("bad-extra", 1).await;
    let m = other_manifest(vec![
        TensorSpec::new("w", DType::F32, vec![2, 4]),
        TensorSpec::new("n", DType::I64, vec![1]),
        TensorSpec::new("smuggled", DType::F32, vec![1]),
    ]);
    let p = payload(&m, &random_values(&m, 1));
    c.bad_payload(p, RejectReason::TooManyTensors).await;
}

#[tokio::test]
async fn nan_values() {
    let c = Case::new("bad-nan", 1).await;
    let mut v = random_values(&c.m, 2);
    v[0][3] = f64::NAN;
    let p = payload(&c.m, &v);
    c.bad_payload(p, RejectReason::NonFinite).await;
}

#[tokio::test]
async fn infinite_values() {
    let c = Case::new("bad-inf", 1).await;
    let mut v = random_values(&c.m, 2);
    v[0][0] = f64::NEG_INFINITY;
    let p = payload(&c.m, &v);
    c.bad_payload(p, RejectReason::NonFinite).await;
}

#[tokio::test]
async fn truncated_safetensors() {
    let c = Case::new("bad-truncated", 1).await;
    let (_, p) = c.good_payload(3);
    let cut = p.slice(..p.len() - 5);
    c.bad_payload(cut, RejectReason::Malformed).await;
}

#[tokio::test]
async fn garbage_header_length() {
    let c = Case::new("bad-garbage", 1).await;
    let mut p = vec![0xffu8; 64];
    p[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    c.bad_payload(Bytes::from(p), RejectReason::Malformed).await;
}

#[tokio::test]
async fn inline_payload_over_the_jobs_inline_limit() {
    let c = Case::new("bad-oversize", 1).await;
    c.bad_payload(Bytes::from(vec![0u8; INLINE_LIMIT as usize + 1]), RejectReason::PayloadTooLarge).await;
}

#[tokio::test]
async fn zero_num_examples() {
    Case::new("bad-zero-weight", 1).await.bad_headers(1, 0, "0", RejectReason::InvalidWeight).await;
}

#[tokio::test]
async fn negative_num_examples() {
    Case::new("bad-negative-weight", 1).await.bad_headers(1, 0, "-3", RejectReason::InvalidWeight).await;
}

#[tokio::test]
async fn absurd_num_examples() {
    // Above the job's max_num_examples (10^9).
    Case::new("bad-absurd-weight", 1)
        .await
        .bad_headers(1, 0, "1000000000000", RejectReason::InvalidWeight)
        .await;
}

#[tokio::test]
async fn non_numeric_num_examples() {
    Case::new("bad-nan-weight", 1).await.bad_headers(1, 0, "NaN", RejectReason::InvalidWeight).await;
}

#[tokio::test]
async fn wrong_round() {
    Case::new("bad-round", 1).await.bad_headers(5, 0, "7", RejectReason::WrongRound).await;
}

#[tokio::test]
async fn wrong_base_version() {
    Case::new("bad-base", 1).await.bad_headers(1, 3, "7", RejectReason::WrongBaseVersion).await;
}

#[tokio::test]
async fn missing_round_header() {
    let mut c = Case::new("bad-headers", 1).await;
    let (_, p) = c.good_payload(5);
    let mut h = HeaderMap::new();
    h.insert("Shoal-Num-Examples", "7");
    c.raw(c.job.as_str(), "bad", h, p).await;
    c.expect_rejection(RejectReason::MalformedHeaders).await;
    c.round_goes_on(RejectReason::MalformedHeaders).await;
}

#[tokio::test]
async fn unknown_job() {
    let mut c = Case::new("bad-unknown-job-host", 1).await;
    let mut rejected = rejections(&c.client.connection().client, "no-such-job").await;
    let (_, p) = c.good_payload(5);
    let h = c.headers(1, 0, "7");
    c.raw("no-such-job", "someone", h, p).await;
    let notice = next_rejection(&mut rejected).await;
    assert_eq!(notice.reason, RejectReason::UnknownJob);
    c.round_goes_on(RejectReason::UnknownJob).await;
    // Nothing was waiting on c.rejected.
    assert!(tokio::time::timeout(Duration::from_millis(100), next_rejection(&mut c.rejected)).await.is_err());
}

#[tokio::test]
async fn duplicate_from_the_same_client_keeps_the_first() {
    let mut c = Case::new("bad-duplicate", 1).await;
    let (first, p1) = c.good_payload(10);
    let (_, p2) = c.good_payload(11);
    let mut h = c.headers(1, 0, "4");
    h.insert("Nats-Msg-Id", format!("{}.1.good-a.{:016x}", c.job, 1).as_str());
    c.raw(c.job.as_str(), "good-a", h, p1).await;
    let mut h = c.headers(1, 0, "4");
    // A different message, not a retry JetStream would dedupe.
    h.insert("Nats-Msg-Id", format!("{}.1.good-a.{:016x}", c.job, 2).as_str());
    c.raw(c.job.as_str(), "good-a", h, p2).await;
    c.expect_rejection(RejectReason::Duplicate).await;
    let (second_client, p) = c.good_payload(12);
    c.client
        .publish_update(UpdateRequest {
            job: c.job.clone(),
            client: ClientId::new("good-b").unwrap(),
            round: RoundId(1),
            base_version: ModelVersion(0),
            num_examples: 6,
            kind: UpdateKind::Parameters,
            payload: p,
            force_upload: false,
        })
        .await
        .unwrap();
    c.expect_commit(&[(first, 4.0), (second_client, 6.0)]).await;
}

#[tokio::test]
async fn update_for_a_closed_round() {
    let mut c = Case::new("bad-late", 2).await;
    c.complete_round().await;
    c.client.wait_for_open_round(&c.job, RoundId(2), Duration::from_secs(20)).await.unwrap();
    // A straggler reports for round 1 after it closed (trained from version 0).
    c.bad_headers_only(1, 0, "7").await;
    c.expect_rejection(RejectReason::LateUpdate).await;
    c.assert_counted(RejectReason::LateUpdate).await;
}

/// Client `bad` declares an upload whose chunks `good-a-victim` published: the node reads only
/// the sender's own upload subjects, so there is nothing to read.
#[tokio::test]
async fn an_upload_is_read_from_the_senders_own_subjects_only() {
    let c = Case::new("bad-upload-owner", 1).await;
    upload_case(c, "good-a-victim", None, RejectReason::ObjectUnavailable).await;
}

#[tokio::test]
async fn upload_digest_mismatch() {
    let c = Case::new("bad-upload-digest", 1).await;
    upload_case(c, "bad", Some(&"0".repeat(64)), RejectReason::DigestMismatch).await;
}

#[tokio::test]
async fn upload_missing() {
    let mut c = Case::new("bad-upload-missing", 1).await;
    let mut h = c.headers(1, 0, "7");
    h.insert("Shoal-Upload-Chunks", "1");
    h.insert("Shoal-Upload-Bytes", "100");
    h.insert("Shoal-Digest", format!("sha256:{}", "0".repeat(64)).as_str());
    c.raw(c.job.as_str(), "bad", h, Bytes::new()).await;
    c.expect_rejection(RejectReason::ObjectUnavailable).await;
    c.round_goes_on(RejectReason::ObjectUnavailable).await;
}

#[tokio::test]
async fn upload_headers_without_a_digest() {
    let mut c = Case::new("bad-upload-headers", 1).await;
    let mut h = c.headers(1, 0, "7");
    h.insert("Shoal-Upload-Chunks", "1");
    h.insert("Shoal-Upload-Bytes", "100");
    c.raw(c.job.as_str(), "bad", h, Bytes::new()).await;
    c.expect_rejection(RejectReason::MalformedHeaders).await;
    c.round_goes_on(RejectReason::MalformedHeaders).await;
}

/// The object-store form of large updates is retired: naming an object is malformed.
#[tokio::test]
async fn the_retired_object_header() {
    let mut c = Case::new("bad-object-header", 1).await;
    let mut h = c.headers(1, 0, "7");
    h.insert("Shoal-Object", format!("{}/1/bad", c.job).as_str());
    h.insert("Shoal-Digest", format!("sha256:{}", "0".repeat(64)).as_str());
    c.raw(c.job.as_str(), "bad", h, Bytes::new()).await;
    c.expect_rejection(RejectReason::MalformedHeaders).await;
    c.round_goes_on(RejectReason::MalformedHeaders).await;
}

/// A message id naming another client (which would make JetStream drop that client's update as
/// a duplicate) is refused as unauthorized.
#[tokio::test]
async fn a_message_id_of_another_client() {
    let mut c = Case::new("bad-msg-id", 1).await;
    let (_, p) = c.good_payload(21);
    let mut h = c.headers(1, 0, "7");
    h.insert("Nats-Msg-Id", format!("{}.1.good-a.{:016x}", c.job, 7).as_str());
    c.raw(c.job.as_str(), "bad", h, p).await;
    c.expect_rejection(RejectReason::Unauthorized).await;
    c.round_goes_on(RejectReason::Unauthorized).await;
}

/// Publishes a valid payload as `owner`'s upload chunks for round 1 (as the SDK does), then a
/// message as client `bad` declaring that upload (with `digest`, or the payload's real one).
async fn upload_case(mut c: Case, owner: &str, digest: Option<&str>, reason: RejectReason) {
    use sha2::Digest;
    let (_, p) = c.good_payload(20);
    let real = hex::encode(sha2::Sha256::digest(&p));
    let conn = c.client.connection();
    let who = (&c.job, &ClientId::new(owner).unwrap(), RoundId(1));
    let chunk = c.client.limits(&c.job).await.unwrap().chunk_bytes;
    let up = shoal_client::uploads::publish(&conn.js, &conn.subjects, who, &p, chunk, &real).await.unwrap();
    let mut h = c.headers(1, 0, "7");
    h.insert("Shoal-Upload-Chunks", up.chunks.to_string().as_str());
    h.insert("Shoal-Upload-Bytes", up.bytes.to_string().as_str());
    h.insert("Shoal-Digest", format!("sha256:{}", digest.unwrap_or(&real)).as_str());
    c.raw(c.job.as_str(), "bad", h, Bytes::new()).await;
    c.expect_rejection(reason).await;
    c.round_goes_on(reason).await;
}

/// The SDK tells a waiting client that its update was refused, and a byte-identical retry is
/// reported as a duplicate instead of vanishing; a corrected update after a rejection is taken.
#[tokio::test]
async fn the_sdk_reports_refusals_and_takes_a_corrected_retry() {
    let c = Case::new("sdk-refusal", 1).await;
    let me = ClientId::new("good-a").unwrap();
    let mut nan = random_values(&c.m, 50);
    nan[0][0] = f64::NAN;
    let request = |payload: Bytes| UpdateRequest {
        job: c.job.clone(),
        client: me.clone(),
        round: RoundId(1),
        base_version: ModelVersion(0),
        num_examples: 3,
        kind: UpdateKind::Parameters,
        payload,
        force_upload: false,
    };
    let mut refusals = c.client.rejections(&c.job, &me).await.unwrap();
    c.client.publish_update(request(payload(&c.m, &nan))).await.unwrap();
    let e = c
        .client
        .wait_for_outcome(&c.job, RoundId(1), &mut refusals, Duration::from_secs(20))
        .await
        .unwrap_err();
    assert!(matches!(e, shoal_client::Error::Rejected(RejectReason::NonFinite)), "{e}");
    // The same bytes again: JetStream's dedupe drops them, and the SDK says so.
    let e = c.client.publish_update(request(payload(&c.m, &nan))).await.unwrap_err();
    assert!(matches!(e, shoal_client::Error::Rejected(RejectReason::Duplicate)), "{e}");
    // A corrected update goes through and counts.
    let (good, p) = c.good_payload(51);
    c.client.publish_update(request(p)).await.unwrap();
    let (second, p2) = c.good_payload(52);
    c.client
        .publish_update(UpdateRequest {
            client: ClientId::new("good-b").unwrap(),
            num_examples: 5,
            ..request(p2)
        })
        .await
        .unwrap();
    c.expect_commit(&[(good, 3.0), (second, 5.0)]).await;
}
