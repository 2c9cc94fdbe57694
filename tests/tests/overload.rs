//! Overload and backpressure (bug-cases.md rows 17–19 and 35–38):
//! - a burst of 200 updates of 1 MiB into a deliberately slow aggregator (`--fold-delay-ms 50`)
//!   loses nothing: JetStream holds the backlog while the node's pull batches and its
//!   shared-memory budget hold it back, no slow-consumer event happens (client side, counted
//!   in `shoal_slow_consumer_events_total`, or server side), and the committed model equals
//!   the f64 oracle over all 200;
//! - a connection whose subscription overflows counts its slow-consumer events;
//! - 300 rounds of a 1 MiB model keep the node's resident memory flat: growth per round after
//!   warm-up under 5 % of the model size.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(clippy::too_many_lines)] // a test reads as one scenario, top to bottom

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use shoal_client::connect::{self, ConnectOptions};
use shoal_client::{ShoalClient, UpdateRequest};
use shoal_functions::{
    ClientId, DType, JobId, ModelManifest, ModelVersion, Parameters, RoundId, TensorSpec, UpdateKind,
};
use shoal_proto::subjects;
use shoal_proto::JobPhase;
use shoal_proto::RoundOutcome;
use shoal_runtime::jobs;
use shoal_runtime::metrics::scrape;
use shoal_testkit::*;

const MIB: usize = 1 << 20;

/// One tensor of 262,144 f32: 1 MiB.
fn one_mib_manifest() -> Arc<ModelManifest> {
    Arc::new(ModelManifest::new(vec![TensorSpec::new("w", DType::F32, vec![MIB / 4])]).unwrap())
}

/// nats-server with a 2 MiB `max_payload`, so that 1 MiB updates travel inline (as the pull
/// batches of row 35 do).
fn big_payload_nats() -> NatsServer {
    NatsServer::start_with(NatsOptions { max_payload: Some(2 * MIB as u64), ..Default::default() }).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_200_one_mib_updates_into_a_slow_aggregator_loses_nothing() {
    init_logging();
    let nats = big_payload_nats();
    let args =
        ["--fold-delay-ms", "50", "--pull-batch", "16", "--shm-budget-mib", "32", "--ack-wait-ms", "5000"];
    let node = NodeProcess::start(&nats.url(), "o1", &args).await;
    let client =
        ShoalClient::connect(&ConnectOptions { url: nats.url(), ..Default::default() }).await.unwrap();
    let m = one_mib_manifest();
    let job = JobId::new("burst").unwrap();
    jobs::create_job(
        &shoal_testkit::infra_of(&client).await,
        &job_spec("burst", (*m).clone(), 200, 200, 300_000, 1),
        None,
    )
    .await
    .unwrap();
    let open = client.wait_for_open_round(&job, RoundId(1), Duration::from_secs(20)).await.unwrap();
    let rss_idle = node.rss_bytes().unwrap();

    // Samples while the burst drains: updates not yet delivered to the node, and its memory.
    let sampler = {
        let (infra, pid) = (shoal_testkit::infra_of(&client).await, node.pid().unwrap());
        tokio::spawn(async move {
            let (mut max_undelivered, mut max_rss) = (0u64, 0u64);
            let mut stream = infra.updates.clone();
            loop {
                if let Ok(c) = stream.consumer_info(subjects::GATEWAY_CONSUMER).await {
                    max_undelivered = max_undelivered.max(c.num_pending);
                }
                max_rss = max_rss.max(rss_bytes(pid).unwrap_or(0));
                let messages = stream.info().await.map(|i| i.state.messages).unwrap_or(1);
                if messages == 0 && max_undelivered > 0 {
                    return (max_undelivered, max_rss);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    // 200 clients publish at once (8 in flight); the oracle accumulates Σ w·x in f64.
    let mut oracle = vec![0.0f64; MIB / 4];
    let mut total_weight = 0.0;
    let mut requests = Vec::new();
    for c in 0..200u64 {
        let values = as_sent(&m, &random_values(&m, 5000 + c));
        let n = 1 + c % 17;
        for (o, v) in oracle.iter_mut().zip(&values[0]) {
            *o += n as f64 * v;
        }
        total_weight += n as f64;
        requests.push(UpdateRequest {
            job: job.clone(),
            client: ClientId::new(format!("b{c}")).unwrap(),
            round: open.round,
            base_version: open.model_version,
            num_examples: n,
            kind: UpdateKind::Parameters,
            payload: payload(&m, &values),
            force_upload: false,
        });
    }
    // The messages are built (and hashed) first, as the SDK builds them, so that the burst is
    // only the publishing.
    let messages: Vec<(String, async_nats::HeaderMap, bytes::Bytes)> = requests
        .into_iter()
        .map(|u| {
            let digest = hex::encode(sha2::Digest::finalize(sha2::Digest::chain_update(
                sha2::Sha256::default(),
                &u.payload,
            )));
            let mut h = async_nats::HeaderMap::new();
            let id = shoal_proto::headers::update_msg_id(&shoal_proto::headers::MsgIdFields {
                job: &u.job,
                round: u.round,
                client: &u.client,
                base_version: u.base_version,
                num_examples: u.num_examples,
                kind: u.kind,
                transport: shoal_proto::headers::Transport::Inline,
                payload_sha256: &digest,
            });
            h.insert("Nats-Msg-Id", id.as_str());
            h.insert(shoal_proto::headers::HDR_ROUND, u.round.to_string().as_str());
            h.insert(shoal_proto::headers::HDR_BASE_VERSION, u.base_version.to_string().as_str());
            h.insert(shoal_proto::headers::HDR_NUM_EXAMPLES, u.num_examples.to_string().as_str());
            h.insert(shoal_proto::headers::HDR_KIND, u.kind.as_str());
            (client.connection().subjects.update(&u.job, &u.client), h, u.payload)
        })
        .collect();
    let started = Instant::now();
    let mut acks = Vec::new();
    for (subject, headers, body) in messages {
        acks.push(client.connection().js.publish_with_headers(subject, headers, body).await.unwrap());
    }
    for ack in acks {
        assert!(!ack.await.unwrap().duplicate);
    }
    let published = started.elapsed();

    let after = client
        .wait_for_round_closed(&job, RoundId(1), Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", node.log()));
    assert_eq!(
        after.last_outcome,
        Some(RoundOutcome::Committed { version: ModelVersion(1), clients: 200, total_weight }),
        "{}",
        node.log()
    );
    let model = Parameters::from_safetensors(
        Arc::clone(&m),
        &client.fetch_model(&job, ModelVersion(1)).await.unwrap(),
    )
    .unwrap();
    for (e, (g, o)) in model.tensor_f64(0).iter().zip(&oracle).enumerate() {
        let o = o / total_weight;
        assert!((g - o).abs() <= 1e-6 * o.abs().max(1e-3), "w[{e}]: committed {g}, oracle {o}");
    }
    let (max_undelivered, max_rss) =
        tokio::time::timeout(Duration::from_secs(30), sampler).await.unwrap().unwrap();
    let text = node.metrics(&client.connection().client).await;
    let slow = scrape(&text, "shoal_slow_consumer_events_total");
    assert_eq!(slow, Some(0.0), "client-side slow consumer events\n{text}");
    assert!(!nats.log().contains("Slow Consumer"), "server-side slow consumer:\n{}", nats.log());
    assert_eq!(scrape(&text, "shoal_updates_staged_total"), Some(200.0), "{text}");
    assert_eq!(scrape(&text, "shoal_updates_rejected_total{reason=\"late_update\"}"), Some(0.0), "{text}");
    // Backpressure: while the aggregator was slow, updates waited in JetStream, not in the node.
    assert!(max_undelivered >= 50, "at most {max_undelivered} updates ever waited in JetStream");
    // The node holds 31 shared-memory slots of 1 MiB (the 32 MiB budget, header pages counted),
    // the pull batches in flight (16 messages each) and what its allocator keeps: less
    // than the 200 MiB of the burst, which it would exceed had it pulled the burst in.
    let held = max_rss.saturating_sub(rss_idle);
    assert!(held < 200 * MIB as u64, "the node's RSS grew by {} MiB during the burst", held >> 20);
    eprintln!(
        "burst: 200 × 1 MiB published in {:.1} s, committed after {:.1} s (fold delay alone: 10 s); \
         up to {max_undelivered} updates waited in JetStream; node RSS {} MiB idle, {} MiB at peak; \
         slow-consumer events: 0 client side, 0 server side",
        published.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        rss_idle >> 20,
        max_rss >> 20
    );
}

/// Row 38: a subscription with room for 16 messages that is not read while 5,000 arrive
/// overflows; the connection's event callback counts the slow-consumer event (the counter a
/// node exports as `shoal_slow_consumer_events_total`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_events_are_counted() {
    init_logging();
    let nats = NatsServer::start().unwrap();
    let counter = shoal_runtime::metrics::Counter::default();
    let opts = ConnectOptions {
        url: nats.url(),
        subscription_capacity: Some(16),
        slow_consumer_events: Some(counter.clone()),
        ..Default::default()
    };
    let (slow, _) = connect::connect_client(&opts).await.unwrap();
    let mut sub = slow.subscribe("flood").await.unwrap();
    slow.flush().await.unwrap();
    let fast = async_nats::connect(nats.url()).await.unwrap();
    for i in 0..5000u32 {
        fast.publish("flood", i.to_le_bytes().to_vec().into()).await.unwrap();
    }
    fast.flush().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while counter.get() == 0 {
        assert!(Instant::now() < deadline, "no slow-consumer event counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut got = 0;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
        got += 1;
    }
    assert!(got < 5000, "nothing was dropped ({got} received), yet an event was counted");
    eprintln!("slow consumer: {} events counted, {got} of 5000 messages received", counter.get());
}

/// Rows 17–19: 300 rounds of a 1 MiB model with two clients (one through the object store).
/// The node's RSS is read after 50 rounds of warm-up and after round 300: its growth per round
/// must stay under 5 % of the model size (52,429 bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resident_memory_stays_flat_over_300_rounds() {
    init_logging();
    const ROUNDS: u64 = 300;
    const WARM_UP: u64 = 50;
    let nats = big_payload_nats();
    let node = NodeProcess::start(&nats.url(), "soak", &["--ack-wait-ms", "5000"]).await;
    let client =
        ShoalClient::connect(&ConnectOptions { url: nats.url(), ..Default::default() }).await.unwrap();
    let m = one_mib_manifest();
    let job = JobId::new("soak").unwrap();
    jobs::create_job(
        &shoal_testkit::infra_of(&client).await,
        &job_spec("soak", (*m).clone(), 2, 2, 60_000, ROUNDS),
        None,
    )
    .await
    .unwrap();
    let values: Vec<Vec<Vec<f64>>> = (0..2).map(|c| as_sent(&m, &random_values(&m, 900 + c))).collect();
    let payloads: Vec<_> = values.iter().map(|v| payload(&m, v)).collect();
    let started = Instant::now();
    let mut rss_warm = 0;
    let mut samples = Vec::new();
    for round in 1..=ROUNDS {
        let open = client
            .wait_for_open_round(&job, RoundId(round), Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}\n{}", node.log()));
        for c in 0..2u64 {
            client
                .publish_update(UpdateRequest {
                    job: job.clone(),
                    client: ClientId::new(format!("s{c}")).unwrap(),
                    round: open.round,
                    base_version: open.model_version,
                    num_examples: 1 + c * 2,
                    kind: UpdateKind::Parameters,
                    payload: payloads[c as usize].clone(),
                    force_upload: c == 0,
                })
                .await
                .unwrap();
        }
        if round % 50 == 0 {
            // Measured once the round has committed.
            client.wait_for_round_closed(&job, RoundId(round), Duration::from_secs(30)).await.unwrap();
            let rss = node.rss_bytes().unwrap();
            samples.push((round, rss >> 10));
            if round == WARM_UP {
                rss_warm = rss;
            }
        }
    }
    let end = client.wait_for_round_closed(&job, RoundId(ROUNDS), Duration::from_secs(30)).await.unwrap();
    assert_eq!((end.phase, end.model_version), (JobPhase::Finished, ModelVersion(ROUNDS)));
    let rss_end = node.rss_bytes().unwrap();
    let model = Parameters::from_safetensors(
        Arc::clone(&m),
        &client.fetch_model(&job, ModelVersion(ROUNDS)).await.unwrap(),
    )
    .unwrap();
    let oracle = weighted_mean_oracle(&[(values[0].clone(), 1.0), (values[1].clone(), 3.0)]);
    for (e, (g, o)) in model.tensor_f64(0).iter().zip(&oracle[0]).enumerate() {
        assert!((g - o).abs() <= 1e-6 * o.abs().max(1e-3), "w[{e}]: committed {g}, oracle {o}");
    }
    let per_round = (rss_end as f64 - rss_warm as f64) / (ROUNDS - WARM_UP) as f64;
    let bound = 0.05 * MIB as f64;
    eprintln!(
        "soak: {ROUNDS} rounds of a 1 MiB model in {:.1} s; node RSS {:.1} MiB after round {WARM_UP}, \
         {:.1} MiB after round {ROUNDS}: {per_round:.0} bytes per round (bound {bound:.0}); \
         (round, KiB) {samples:?}",
        started.elapsed().as_secs_f64(),
        rss_warm as f64 / MIB as f64,
        rss_end as f64 / MIB as f64
    );
    assert!(per_round < bound, "RSS grew {per_round:.0} bytes per round (bound {bound:.0})");
}
