//! Fold-while-staging (issue 16, memory): an update on the upload path is folded piece by piece
//! while the gateway stages its chunks, so a node never holds a whole update next to the f64
//! accumulator. Real `shoal node` processes, a real nats-server.
//!
//! - The same round gives byte-identical models with fold-while-staging on (every upload
//!   streamed: `--fold-while-staging-min-mib 0`) and off, both equal to the f64 oracle.
//! - An upload refused after all of it was folded (a digest that does not match its chunks; the
//!   gateway holds its verdict until the host has folded every byte,
//!   `SHOAL_TEST_STREAM_VERDICT_HOLD_MS`) spoils the node's partial: the two updates folded
//!   before it go back to JetStream and are folded again, the bad one is refused as
//!   `digest_mismatch` and its claim given up, so the client's corrected retry is taken (not
//!   `duplicate`); the round commits the three good updates once, equal to the oracle.

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
    let after = client.wait_for_round_closed(&job, RoundId(1), Duration::from_secs(30)).await.unwrap();
    assert!(
        matches!(after.last_outcome, Some(RoundOutcome::Committed { clients: 5, .. })),
        "{:?}\n{}",
        after.last_outcome,
        node.log()
    );
    let bytes = client.fetch_model(&job, ModelVersion(1)).await.unwrap();
    let model = shoal_functions::Parameters::from_safetensors(Arc::clone(&m), &bytes).unwrap();
    assert_model_near(&model, &weighted_mean_oracle(&sent), &format!("flags {flags:?}"));
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
async fn an_upload_refused_after_it_was_folded_spoils_the_partial_and_loses_nothing() {
    let nats = NatsServer::start().unwrap();
    let node = NodeProcess::start_with(
        &nats.url(),
        "fws-bad",
        &["--fold-while-staging-min-mib", "0"],
        &[("SHOAL_TEST_STREAM_VERDICT_HOLD_MS", "400")],
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

    // client-2's good bytes as upload chunks, declared with another digest.
    let p = payload(&m, &as_sent(&m, &random_values(&m, 42)));
    publish_upload(&client, &job, "client-2", &p, Some(&"0".repeat(64))).await;
    let notice = next_rejection(&mut refused).await;
    assert_eq!(notice.reason, RejectReason::DigestMismatch, "{notice:?}");

    // The partial was given up and its two updates folded again.
    let text = wait_metric(&node, &nc, "shoal_updates_folded_while_staged_total", 4.0).await;
    assert_eq!(scrape(&text, "shoal_partials_spoiled_total"), Some(1.0), "{text}\n{}", node.log());

    // The corrected retry is taken: the refused update's claim was given up.
    sent.push(send_update(&client, &m, &job, &state, (2, 42, 7), true).await);
    let after = client.wait_for_round_closed(&job, RoundId(1), Duration::from_secs(30)).await.unwrap();
    let want: f64 = sent.iter().map(|(_, w)| w).sum();
    match after.last_outcome {
        Some(RoundOutcome::Committed { clients: 3, total_weight, .. }) => assert_eq!(total_weight, want),
        other => panic!("{other:?}\n{}", node.log()),
    }
    let bytes = client.fetch_model(&job, ModelVersion(1)).await.unwrap();
    let model = shoal_functions::Parameters::from_safetensors(Arc::clone(&m), &bytes).unwrap();
    assert_model_near(&model, &weighted_mean_oracle(&sent), "after a spoiled partial");
    let text = node.metrics(&nc).await;
    assert_eq!(scrape(&text, "shoal_updates_folded_while_staged_total"), Some(5.0), "{text}");
    assert_eq!(scrape(&text, "shoal_partials_spoiled_total"), Some(1.0), "{text}");
}

/// A NaN in an upload's last tensor is found by the host as it folds that piece, after the
/// gateway has read every chunk and checked the digest: the gateway waits for the host's word,
/// refuses the update as `non_finite` and gives up its claim; the corrected retry is taken and
/// the round commits the good updates once (whether or not the partial had to be folded again).
#[tokio::test]
async fn a_nan_found_while_folding_is_refused_and_the_corrected_retry_taken() {
    let nats = NatsServer::start().unwrap();
    let node = NodeProcess::start(&nats.url(), "fws-nan", &["--fold-while-staging-min-mib", "0"]).await;
    let client = connect(&nats.url()).await;
    let nc = client.connection().client.clone();
    let m = manifest();
    let job = JobId::new("fws-nan").unwrap();
    jobs::create_job(&infra_of(&client).await, &spec("fws-nan", &m, 2), None).await.unwrap();
    let state = client.wait_for_open_round(&job, RoundId(1), Duration::from_secs(30)).await.unwrap();
    let mut refused = rejections(&nc, "fws-nan").await;
    let mut sent = vec![send_update(&client, &m, &job, &state, (0, 50, 4), true).await];
    // The last element of the tensor written last (`fc.weight`: safetensors orders by name).
    let mut values = as_sent(&m, &random_values(&m, 51));
    *values[0].last_mut().unwrap() = f64::NAN;
    publish_upload(&client, &job, "client-1", &payload(&m, &values), None).await;
    let notice = next_rejection(&mut refused).await;
    assert_eq!(notice.reason, RejectReason::NonFinite, "{notice:?}\n{}", node.log());
    sent.push(send_update(&client, &m, &job, &state, (1, 52, 7), true).await);
    let after = client.wait_for_round_closed(&job, RoundId(1), Duration::from_secs(30)).await.unwrap();
    let want: f64 = sent.iter().map(|(_, w)| w).sum();
    match after.last_outcome {
        Some(RoundOutcome::Committed { clients: 2, total_weight, .. }) => assert_eq!(total_weight, want),
        other => panic!("{other:?}\n{}", node.log()),
    }
    let bytes = client.fetch_model(&job, ModelVersion(1)).await.unwrap();
    let model = shoal_functions::Parameters::from_safetensors(Arc::clone(&m), &bytes).unwrap();
    assert_model_near(&model, &weighted_mean_oracle(&sent), "after a NaN found while folding");
}
