//! Fold-while-staging (issue 16, memory): an update on the upload path is folded piece by piece
//! while the gateway stages its chunks, so a node never holds a whole update next to the f64
//! accumulator. Real `shoal node` processes, a real nats-server.
//!
//! - The same round gives byte-identical models with fold-while-staging on (every upload
//!   streamed: `--fold-while-staging-min-mib 0`) and off, both equal to the f64 oracle.
//! - A bad upload (a digest that does not match its chunks, a NaN in its last tensor) is refused
//!   by the first read, before anything of it is folded: no partial is given up, and the
//!   client's corrected retry is taken.
//! - An upload whose chunks change between the two reads (re-published by its client in that
//!   window, `SHOAL_TEST_STREAM_VERIFIED_HOLD_MS`; the gateway holds its verdict until the host
//!   has folded every byte, `SHOAL_TEST_STREAM_VERDICT_HOLD_MS`) spoils the node's partial: the
//!   two updates folded before it go back to JetStream and are folded again, the changed one is
//!   refused as `digest_mismatch` and its claim given up, so the client's next update is taken
//!   (not `duplicate`); the round commits the three good updates once, equal to the oracle.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use shoal_functions::{ClientId, DType, JobId, ModelManifest, ModelVersion, RoundId};
use shoal_proto::{RejectReason, RoundOutcome};
use shoal_runtime::jobs;
use shoal_runtime::metrics::scrape;
use shoal_testkit::*;

fn manifest() -> Arc<ModelManifest> {
    // 120 KiB of f32 in two tensors; 16 KiB chunks: each update arrives in 8 chunks.
    shoal_testkit::manifest(&[("fc.weight", DType::F32, &[96, 300]), ("fc.bias", DType::F32, &[300])])
}

fn spec(job: &str, m: &ModelManifest, cohort: u32) -> shoal_proto::JobSpec {
    let mut s = job_spec(job, m.clone(), cohort, cohort, 60_000, 1);
    s.chunk_bytes = Some(16 << 10);
    s
}

/// Waits until the node's counter `name` reaches `at_least`.
async fn wait_metric(node: &NodeProcess, nc: &async_nats::Client, name: &str, at_least: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = node.metrics(nc).await;
        if scrape(&text, name).unwrap_or(0.0) >= at_least {
            return text;
        }
        assert!(Instant::now() < deadline, "{name} never reached {at_least}:\n{text}\n{}", node.log());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits for round 1 to commit exactly the updates `sent` (count and total weight) and checks
/// the model against the f64 oracle; returns the model's bytes.
async fn committed(
    client: &shoal_client::ShoalClient,
    node: &NodeProcess,
    job: &JobId,
    m: &Arc<ModelManifest>,
    sent: &[(Vec<Vec<f64>>, f64)],
    context: &str,
) -> Vec<u8> {
    let after = client.wait_for_round_closed(job, RoundId(1), Duration::from_secs(30)).await.unwrap();
    let want: f64 = sent.iter().map(|(_, w)| w).sum();
    match after.last_outcome {
        Some(RoundOutcome::Committed { clients, total_weight, .. }) => {
            assert_eq!((clients as usize, total_weight), (sent.len(), want), "{context}");
        }
        other => panic!("{context}: {other:?}\n{}", node.log()),
    }
    let bytes = client.fetch_model(job, ModelVersion(1)).await.unwrap();
    let model = shoal_functions::Parameters::from_safetensors(Arc::clone(m), &bytes).unwrap();
    assert_model_near(&model, &weighted_mean_oracle(sent), context);
    bytes
}

/// One round of five uploads on a node started with `flags`: the model's bytes (checked
/// against the oracle) and the node's metrics.
async fn one_round(flags: &[&str]) -> (Vec<u8>, String) {
    let nats = NatsServer::start().unwrap();
    let node = NodeProcess::start(&nats.url(), "fws", flags).await;
    let client = connect(&nats.url()).await;
    let m = manifest();
    let job = JobId::new("fws").unwrap();
    jobs::create_job(&infra_of(&client).await, &spec("fws", &m, 5), None).await.unwrap();
    let state = client.wait_for_open_round(&job, RoundId(1), Duration::from_secs(30)).await.unwrap();
    let mut sent = Vec::new();
    for c in 0..5u64 {
        sent.push(send_update(&client, &m, &job, &state, (c, 70 + c, 1 + c * 13), true).await);
    }
    let bytes = committed(&client, &node, &job, &m, &sent, &format!("flags {flags:?}")).await;
    let text = node.metrics(&client.connection().client).await;
    (bytes, text)
}

/// Publishes `payload` as `client`'s upload for round 1 and the update message declaring it
/// (with `digest`, or the payload's own), bypassing the SDK's checks.
async fn publish_upload(
    client: &shoal_client::ShoalClient,
    job: &JobId,
    who: &str,
    p: &Bytes,
    digest: Option<&str>,
) {
    use sha2::Digest;
    let conn = client.connection();
    let owner = (job, &ClientId::new(who).unwrap(), RoundId(1));
    let chunk = client.limits(job).await.unwrap().chunk_bytes;
    let real = hex::encode(sha2::Sha256::digest(p.as_ref()));
    let up = shoal_client::uploads::publish(&conn.js, &conn.subjects, owner, p, chunk, &real).await.unwrap();
    let mut h = async_nats::HeaderMap::new();
    for (k, v) in [("Shoal-Round", "1"), ("Shoal-Base-Version", "0"), ("Shoal-Num-Examples", "7")] {
        h.insert(k, v);
    }
    h.insert("Shoal-Kind", "parameters");
    h.insert("Shoal-Upload-Chunks", up.chunks.to_string().as_str());
    h.insert("Shoal-Upload-Bytes", up.bytes.to_string().as_str());
    h.insert("Shoal-Digest", format!("sha256:{}", digest.unwrap_or(&real)).as_str());
    let subject = format!("shoal.{job}.update.{who}");
    conn.js.publish_with_headers(subject, h, Bytes::new()).await.unwrap().await.unwrap();
}

#[tokio::test]
async fn folding_uploads_while_they_are_staged_commits_the_same_model_bit_for_bit() {
    let (streamed, on) = one_round(&["--fold-while-staging-min-mib", "0"]).await;
    assert_eq!(scrape(&on, "shoal_updates_folded_while_staged_total"), Some(5.0), "{on}");
    let (whole, off) = one_round(&["--fold-while-staging-min-mib", "off"]).await;
    assert_eq!(scrape(&off, "shoal_updates_folded_while_staged_total"), Some(0.0), "{off}");
    assert!(streamed == whole, "fold-while-staging changed the model's bytes");
}

#[tokio::test]
async fn an_upload_changed_between_its_two_reads_spoils_the_partial_and_loses_nothing() {
    let nats = NatsServer::start().unwrap();
    let node = NodeProcess::start_with(
        &nats.url(),
        "fws-bad",
        &["--fold-while-staging-min-mib", "0"],
        &[("SHOAL_TEST_STREAM_VERIFIED_HOLD_MS", "1500"), ("SHOAL_TEST_STREAM_VERDICT_HOLD_MS", "400")],
        None,
    )
    .await;
    let client = connect(&nats.url()).await;
    let nc = client.connection().client.clone();
    let m = manifest();
    let job = JobId::new("fws-bad").unwrap();
    jobs::create_job(&infra_of(&client).await, &spec("fws-bad", &m, 3), None).await.unwrap();
    let state = client.wait_for_open_round(&job, RoundId(1), Duration::from_secs(30)).await.unwrap();
    let mut refused = rejections(&nc, "fws-bad").await;
    let mut sent = Vec::new();
    for c in 0..2u64 {
        sent.push(send_update(&client, &m, &job, &state, (c, 40 + c, 3 + c), true).await);
    }
    wait_metric(&node, &nc, "shoal_updates_folded_while_staged_total", 2.0).await;

    // client-2's upload passes the first read; then its chunks are published again with other
    // bytes, which the second read folds and the digest refuses.
    publish_upload(&client, &job, "client-2", &payload(&m, &as_sent(&m, &random_values(&m, 42))), None).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let other = payload(&m, &as_sent(&m, &random_values(&m, 43)));
    let conn = client.connection();
    let owner = (&job, &ClientId::new("client-2").unwrap(), RoundId(1));
    let chunk = client.limits(&job).await.unwrap().chunk_bytes;
    shoal_client::uploads::publish(&conn.js, &conn.subjects, owner, &other, chunk, "unused").await.unwrap();
    let notice = next_rejection(&mut refused).await;
    assert_eq!(notice.reason, RejectReason::DigestMismatch, "{notice:?}\n{}", node.log());

    // The partial was given up and its two updates folded again.
    let text = wait_metric(&node, &nc, "shoal_updates_folded_while_staged_total", 4.0).await;
    assert_eq!(scrape(&text, "shoal_partials_spoiled_total"), Some(1.0), "{text}\n{}", node.log());

    // The client's next update is taken: the refused update's claim was given up.
    sent.push(send_update(&client, &m, &job, &state, (2, 44, 7), true).await);
    committed(&client, &node, &job, &m, &sent, "after a spoiled partial").await;
    let text = node.metrics(&nc).await;
    assert_eq!(scrape(&text, "shoal_updates_folded_while_staged_total"), Some(5.0), "{text}");
    assert_eq!(scrape(&text, "shoal_partials_spoiled_total"), Some(1.0), "{text}");
}

/// Bad uploads are refused by the first read, before any of their bytes is folded: a NaN in
/// the last f32 of the tensor written last, and a digest that does not match the chunks. No
/// partial is given up, the corrected retries are taken, and the round commits the good
/// updates once.
#[tokio::test]
async fn bad_uploads_are_refused_before_anything_of_them_is_folded() {
    let nats = NatsServer::start().unwrap();
    let node = NodeProcess::start(&nats.url(), "fws-nan", &["--fold-while-staging-min-mib", "0"]).await;
    let client = connect(&nats.url()).await;
    let nc = client.connection().client.clone();
    let m = manifest();
    let job = JobId::new("fws-nan").unwrap();
    jobs::create_job(&infra_of(&client).await, &spec("fws-nan", &m, 3), None).await.unwrap();
    let state = client.wait_for_open_round(&job, RoundId(1), Duration::from_secs(30)).await.unwrap();
    let mut refused = rejections(&nc, "fws-nan").await;
    let mut sent = vec![send_update(&client, &m, &job, &state, (0, 50, 4), true).await];
    wait_metric(&node, &nc, "shoal_updates_folded_while_staged_total", 1.0).await;
    // The last element of the tensor written last (`fc.weight`: safetensors orders by name).
    let mut values = as_sent(&m, &random_values(&m, 51));
    *values[0].last_mut().unwrap() = f64::NAN;
    publish_upload(&client, &job, "client-1", &payload(&m, &values), None).await;
    let notice = next_rejection(&mut refused).await;
    assert_eq!(notice.reason, RejectReason::NonFinite, "{notice:?}\n{}", node.log());
    let good = payload(&m, &as_sent(&m, &random_values(&m, 53)));
    publish_upload(&client, &job, "client-2", &good, Some(&"0".repeat(64))).await;
    let notice = next_rejection(&mut refused).await;
    assert_eq!(notice.reason, RejectReason::DigestMismatch, "{notice:?}\n{}", node.log());
    sent.push(send_update(&client, &m, &job, &state, (1, 52, 7), true).await);
    sent.push(send_update(&client, &m, &job, &state, (2, 54, 2), true).await);
    committed(&client, &node, &job, &m, &sent, "after two bad uploads").await;
    let text = node.metrics(&nc).await;
    assert_eq!(scrape(&text, "shoal_partials_spoiled_total"), Some(0.0), "{text}");
    assert_eq!(scrape(&text, "shoal_updates_folded_while_staged_total"), Some(3.0), "{text}");
}
