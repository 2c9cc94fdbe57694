//! Several `shoal node` processes on one NATS server: leaves on every node, one top per job,
//! partials across nodes. Every committed model is checked against an independent value (an f64
//! oracle, or the strategy run in this process on the same updates: the single-node result).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_client::connect::ConnectOptions;
use shoal_client::{ShoalClient, UpdateRequest};
use shoal_functions::{
    ClientId, DType, JobId, ModelManifest, ModelVersion, Parameters, RoundId, StrategySpec, UpdateKind,
    UpdateView,
};
use shoal_proto::RoundOutcome;
use shoal_runtime::jobs;
use shoal_runtime::metrics::scrape;
use shoal_testkit::*;

const NODE_ARGS: &[&str] = &["--ack-wait-ms", "3000", "--pull-batch", "1", "--collect-timeout-ms", "3000"];

fn manifest() -> Arc<ModelManifest> {
    shoal_testkit::manifest(&[("fc.weight", DType::F32, &[64, 40]), ("fc.bias", DType::F32, &[40])])
}

async fn connect(url: &str) -> ShoalClient {
    ShoalClient::connect(&ConnectOptions { url: url.into(), ..Default::default() }).await.unwrap()
}

async fn three_nodes(url: &str) -> Vec<NodeProcess> {
    let mut nodes = Vec::new();
    for id in ["n1", "n2", "n3"] {
        nodes.push(NodeProcess::start(url, id, NODE_ARGS).await);
    }
    nodes
}

async fn total(nodes: &[NodeProcess], client: &ShoalClient, metric: &str) -> f64 {
    let mut sum = 0.0;
    for n in nodes {
        sum += scrape(&n.metrics(&client.connection().client).await, metric).unwrap_or(0.0);
    }
    sum
}

/// Publishes `values` as client `c`'s update for round 1, trained on version 0.
async fn publish(
    client: &ShoalClient,
    job: &JobId,
    c: &str,
    n: u64,
    kind: UpdateKind,
    values: &[Vec<f64>],
    m: &Arc<ModelManifest>,
) {
    client
        .publish_update(UpdateRequest {
            job: job.clone(),
            client: ClientId::new(c).unwrap(),
            round: RoundId(1),
            base_version: ModelVersion(0),
            num_examples: n,
            kind,
            payload: payload(m, values),
            force_upload: false,
        })
        .await
        .unwrap();
}

async fn model(client: &ShoalClient, job: &JobId, m: &Arc<ModelManifest>, v: u64) -> Parameters {
    let bytes = client.fetch_model(job, ModelVersion(v)).await.unwrap();
    Parameters::from_safetensors(Arc::clone(m), &bytes).unwrap()
}

fn assert_close(got: &Parameters, want: &[Vec<f64>], what: &str) {
    for (i, w) in want.iter().enumerate() {
        for (e, (g, o)) in got.tensor_f64(i).iter().zip(w).enumerate() {
            assert!(
                (g - o).abs() <= 1e-6 * o.abs().max(1e-3),
                "{what}: tensor {i}[{e}] committed {g}, want {o}"
            );
        }
    }
}

fn logs(nodes: &[NodeProcess]) -> String {
    nodes.iter().map(|n| format!("--- {} ---\n{}", n.node_id, n.log())).collect()
}

async fn committed(client: &ShoalClient, job: &JobId, round: u64, nodes: &[NodeProcess]) -> (u32, f64) {
    let st = client.wait_for_round_closed(job, RoundId(round), Duration::from_secs(60)).await.unwrap();
    match st.last_outcome {
        Some(RoundOutcome::Committed { clients, total_weight, .. }) => (clients, total_weight),
        other => panic!("round {round} did not commit: {other:?}\n{}", logs(nodes)),
    }
}

/// FedAvg over 3 nodes equals the f64 oracle, and only partials cross nodes: the bytes sent
/// between nodes are bounded by one f64 partial per remote node whatever the number of clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_fedavg_matches_the_oracle_and_moves_only_partials() {
    init_logging();
    let nats = NatsServer::start().unwrap();
    let nodes = three_nodes(&nats.url()).await;
    let client = connect(&nats.url()).await;
    let m = manifest();
    let partial_bytes = (m.numel() * 8) as f64;
    let mut moved = Vec::new();
    for (name, cohort) in [("small", 6u32), ("large", 36)] {
        let job = JobId::new(name).unwrap();
        jobs::create_job(
            &shoal_testkit::infra_of(&client).await,
            &job_spec(name, (*m).clone(), cohort, cohort, 60_000, 1),
            None,
        )
        .await
        .unwrap();
        client.wait_for_open_round(&job, RoundId(1), Duration::from_secs(30)).await.unwrap();
        let sent_before = total(&nodes, &client, "shoal_partial_bytes_sent_total").await;
        let mut staged_before = Vec::new();
        for n in &nodes {
            staged_before.push(
                scrape(&n.metrics(&client.connection().client).await, "shoal_updates_staged_total")
                    .unwrap_or(0.0),
            );
        }
        let mut sent = Vec::new();
        for c in 0..cohort as u64 {
            let values = as_sent(&m, &random_values(&m, 1000 * cohort as u64 + c));
            let n = 1 + (c * 37) % 500;
            publish(&client, &job, &format!("c{c}"), n, UpdateKind::Parameters, &values, &m).await;
            sent.push((values, n as f64));
        }
        let (clients, weight) = committed(&client, &job, 1, &nodes).await;
        assert_eq!(clients, cohort);
        assert_eq!(weight, sent.iter().map(|(_, w)| w).sum::<f64>());
        assert_close(&model(&client, &job, &m, 1).await, &weighted_mean_oracle(&sent), name);
        let bytes = total(&nodes, &client, "shoal_partial_bytes_sent_total").await - sent_before;
        let mut staged = Vec::new();
        for (n, b) in nodes.iter().zip(&staged_before) {
            staged.push(
                scrape(&n.metrics(&client.connection().client).await, "shoal_updates_staged_total").unwrap()
                    - b,
            );
        }
        eprintln!("{name}: {cohort} clients, staged per node {staged:?}, cross-node partial bytes {bytes}");
        assert_eq!(staged.iter().sum::<f64>(), f64::from(cohort));
        // At most one f64 partial (plus its small header) from each of the two other nodes.
        assert!(bytes <= 2.0 * (partial_bytes + 1024.0), "{name}: {bytes} cross-node bytes");
        moved.push((bytes, staged));
        assert_stream_drains(&client, Duration::from_secs(15)).await;
    }
    // The large job's updates landed on several nodes, so partials did cross nodes; their bytes
    // are far below the bytes of the updates staged on the nodes other than the top.
    let (bytes, staged) = &moved[1];
    assert!(staged.iter().filter(|&&s| s > 0.0).count() >= 2, "updates did not spread: {staged:?}");
    assert!(*bytes >= partial_bytes, "no partial crossed nodes");
    let update_bytes = (m.data_bytes()) as f64;
    let remote_updates = staged.iter().sum::<f64>() - staged.iter().cloned().fold(0.0, f64::max);
    assert!(
        *bytes < remote_updates * update_bytes,
        "{bytes} >= {} update bytes",
        remote_updates * update_bytes
    );
    // Same bound for 6 and 36 clients: the bytes do not grow with the cohort.
    assert!(moved[1].0 <= 2.0 * (partial_bytes + 1024.0) && moved[0].0 <= 2.0 * (partial_bytes + 1024.0));
}

/// The node holding a job's top lease is SIGKILLed mid-round; another node takes the lease and
/// completes the round from the updates still staged on the live nodes and the dead node's
/// updates, redelivered by JetStream. The model equals the oracle over all of them, the round
/// commits once, and the work queue drains (nothing lost, nothing applied twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_top_mid_round_loses_nothing() {
    init_logging();
    let nats = NatsServer::start().unwrap();
    let mut nodes = three_nodes(&nats.url()).await;
    let client = connect(&nats.url()).await;
    let m = manifest();
    let job = JobId::new("topkill").unwrap();
    jobs::create_job(
        &shoal_testkit::infra_of(&client).await,
        &job_spec("topkill", (*m).clone(), 9, 9, 120_000, 2),
        None,
    )
    .await
    .unwrap();
    client.wait_for_open_round(&job, RoundId(1), Duration::from_secs(30)).await.unwrap();
    let mut sent = Vec::new();
    for c in 0..6u64 {
        let values = as_sent(&m, &random_values(&m, 50 + c));
        publish(&client, &job, &format!("c{c}"), 10 + c, UpdateKind::Parameters, &values, &m).await;
        sent.push((values, (10 + c) as f64));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while total(&nodes, &client, "shoal_updates_staged_total").await < 6.0 {
        assert!(Instant::now() < deadline, "updates not staged\n{}", logs(&nodes));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lease =
        shoal_testkit::infra_of(&client).await.jobs.get("topkill.top").await.unwrap().expect("a top lease");
    let top: shoal_runtime::cluster::lease::Lease = shoal_proto::decode("lease", &lease).unwrap();
    let victim = nodes.iter().position(|n| n.node_id == top.node.as_str()).unwrap();
    let held =
        scrape(&nodes[victim].metrics(&client.connection().client).await, "shoal_updates_staged_total")
            .unwrap();
    assert!(held > 0.0, "the top's node staged nothing: the test would not exercise redelivery");
    nodes[victim].kill();
    for c in 6..9u64 {
        let values = as_sent(&m, &random_values(&m, 50 + c));
        publish(&client, &job, &format!("c{c}"), 10 + c, UpdateKind::Parameters, &values, &m).await;
        sent.push((values, (10 + c) as f64));
    }
    let (clients, weight) = committed(&client, &job, 1, &nodes).await;
    assert_eq!(clients, 9, "{}", logs(&nodes));
    assert_eq!(weight, sent.iter().map(|(_, w)| w).sum::<f64>());
    assert_close(&model(&client, &job, &m, 1).await, &weighted_mean_oracle(&sent), "after the top died");
    let lease =
        shoal_testkit::infra_of(&client).await.jobs.get("topkill.top").await.unwrap().expect("a top lease");
    let new_top: shoal_runtime::cluster::lease::Lease = shoal_proto::decode("lease", &lease).unwrap();
    assert_ne!(new_top.node, top.node);
    let state = client.job_state(&job).await.unwrap();
    assert_eq!((state.round, state.model_version), (RoundId(2), ModelVersion(1)), "committed exactly once");
    assert_stream_drains(&client, Duration::from_secs(15)).await;
}

/// Runs one round of `strategy` on 3 nodes and checks the committed model against the same
/// updates' single-node result, computed in this process by the strategy itself. Returns per
/// node (updates staged, slice and shard-result bytes sent, received).
async fn whole_cohort_round(name: &str, strategy: StrategySpec, kind: UpdateKind) -> Vec<(f64, f64, f64)> {
    let nats = NatsServer::start().unwrap();
    let nodes = three_nodes(&nats.url()).await;
    let client = connect(&nats.url()).await;
    let m = manifest();
    let job = JobId::new(name).unwrap();
    let mut spec = job_spec(name, (*m).clone(), 7, 7, 60_000, 1);
    spec.strategy = strategy;
    spec.update_kind = kind;
    jobs::create_job(&shoal_testkit::infra_of(&client).await, &spec, None).await.unwrap();
    client.wait_for_open_round(&job, RoundId(1), Duration::from_secs(30)).await.unwrap();
    let mut sent = Vec::new();
    for c in 0..7u64 {
        let mut values = as_sent(&m, &random_values(&m, 7000 + c));
        if c == 6 {
            // One outlier far from the others.
            values.iter_mut().flatten().for_each(|v| *v = -10.0 * *v + 3.0);
            values = as_sent(&m, &values);
        }
        let n = 5 + c * 3;
        publish(&client, &job, &format!("c{c}"), n, kind, &values, &m).await;
        sent.push((format!("c{c}"), values, n as f64));
    }
    committed(&client, &job, 1, &nodes).await;
    let got = model(&client, &job, &m, 1).await;
    // The single-node result: the strategy on the same updates, in this process.
    let slots: Vec<(ClientId, Vec<u8>, f64)> = sent
        .iter()
        .map(|(c, v, w)| {
            let mut slot = vec![0u8; m.slot_bytes() + 64];
            let off = slot.as_ptr().align_offset(64);
            shoal_functions::tensor::stage_update(&m, &payload(&m, v), &mut slot[off..off + m.slot_bytes()])
                .unwrap();
            (ClientId::new(c.as_str()).unwrap(), slot[off..off + m.slot_bytes()].to_vec(), *w)
        })
        .collect();
    let aligned: Vec<Vec<u64>> = slots.iter().map(|(_, b, _)| bytemuck_words(b)).collect();
    let views: Vec<UpdateView<'_>> = slots
        .iter()
        .zip(&aligned)
        .map(|((c, _, w), words)| UpdateView { manifest: &m, bytes: as_bytes(words), weight: *w, client: c })
        .collect();
    let global = Parameters::zeros(Arc::clone(&m));
    let want =
        shoal_functions::factory::build_strategy(&spec).unwrap().aggregate_cohort(&views, &global).unwrap();
    let want: Vec<Vec<f64>> = (0..m.tensors().len()).map(|i| want.tensor_f64(i)).collect();
    assert_close(&got, &want, name);
    let mut per_node = Vec::new();
    for n in &nodes {
        let t = n.metrics(&client.connection().client).await;
        let get = |k: &str| scrape(&t, k).unwrap_or(0.0);
        per_node.push((
            get("shoal_updates_staged_total"),
            get("shoal_shard_bytes_sent_total"),
            get("shoal_shard_bytes_received_total"),
        ));
    }
    eprintln!("{name}: (staged, shard bytes sent, received) per node {per_node:?}");
    assert_stream_drains(&client, Duration::from_secs(15)).await;
    per_node
}

/// Median, trimmed mean and Krum run as a coordinate-sharded exchange: the updates stay where
/// they were staged (on several nodes) and every node owns a shard, so every node receives
/// slices; no node receives a whole update's bytes from another.
fn assert_sharded(per_node: &[(f64, f64, f64)], m: &ModelManifest) {
    assert!(per_node.iter().filter(|n| n.0 > 0.0).count() >= 2, "updates did not spread: {per_node:?}");
    let update = m.data_bytes() as f64;
    for (staged, _, received) in per_node {
        assert!(*received > 0.0, "a shard owner received nothing: {per_node:?}");
        // Its third of the other nodes' updates (half, to allow for uneven shards), plus at most
        // one model's worth of shard results and distances on the top.
        let others = per_node.iter().map(|n| n.0).sum::<f64>() - staged;
        let bound = others * update / 2.0 + update + 4096.0;
        assert!(*received <= bound, "more than a shard's bytes: {per_node:?}");
    }
}

/// RFFL and Bristle run the two-phase protocol (tests/twophase.rs): their updates stay on the
/// nodes that staged them (several), and no update slices move.
fn assert_two_phase(per_node: &[(f64, f64, f64)]) {
    assert!(per_node.iter().filter(|n| n.0 > 0.0).count() >= 2, "updates did not spread: {per_node:?}");
    assert!(per_node.iter().all(|n| n.1 == 0.0 && n.2 == 0.0), "update slices moved: {per_node:?}");
}

fn bytemuck_words(b: &[u8]) -> Vec<u64> {
    let mut w = vec![0u64; b.len().div_ceil(8)];
    for (i, chunk) in b.chunks(8).enumerate() {
        let mut x = [0u8; 8];
        x[..chunk.len()].copy_from_slice(chunk);
        w[i] = u64::from_le_bytes(x);
    }
    w
}

fn as_bytes(w: &[u64]) -> &[u8] {
    // SAFETY: u64 has no padding; the byte view covers exactly the vector's memory.
    unsafe { std::slice::from_raw_parts(w.as_ptr().cast::<u8>(), w.len() * 8) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_median_equals_single_node() {
    init_logging();
    let per_node = whole_cohort_round("median3", StrategySpec::Median, UpdateKind::Parameters).await;
    assert_sharded(&per_node, &manifest());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_trimmed_mean_equals_single_node() {
    init_logging();
    let per_node =
        whole_cohort_round("trim3", StrategySpec::TrimmedMean { beta: 0.2 }, UpdateKind::Parameters).await;
    assert_sharded(&per_node, &manifest());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_multi_krum_equals_single_node() {
    init_logging();
    let spec = StrategySpec::MultiKrum { byzantine: 1, keep: 3 };
    let per_node = whole_cohort_round("mkrum3", spec, UpdateKind::Parameters).await;
    assert_sharded(&per_node, &manifest());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_krum_equals_single_node() {
    init_logging();
    let per_node =
        whole_cohort_round("krum3", StrategySpec::Krum { byzantine: 1 }, UpdateKind::Parameters).await;
    assert_sharded(&per_node, &manifest());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_rffl_equals_single_node() {
    init_logging();
    let rffl: StrategySpec = serde_json::from_str(r#"{"name":"rffl"}"#).unwrap();
    assert_two_phase(&whole_cohort_round("rffl3", rffl, UpdateKind::Delta).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_bristle_equals_single_node() {
    init_logging();
    let bristle: StrategySpec = serde_json::from_str(r#"{"name":"bristle","beta":4}"#).unwrap();
    assert_two_phase(&whole_cohort_round("bristle3", bristle, UpdateKind::Delta).await);
}

/// With `fan_in: 2` over nodes n1, n2, n3, n1 is the middle of {n1, n2}: n2's partial goes to
/// n1, which merges it with its own and sends one partial up. The model still equals the oracle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_middle_merges_its_group_before_the_top() {
    init_logging();
    let nats = NatsServer::start().unwrap();
    let nodes = three_nodes(&nats.url()).await;
    let client = connect(&nats.url()).await;
    let m = manifest();
    let job = JobId::new("fanin").unwrap();
    let mut spec = job_spec("fanin", (*m).clone(), 12, 12, 60_000, 1);
    spec.fan_in = 2;
    jobs::create_job(&shoal_testkit::infra_of(&client).await, &spec, None).await.unwrap();
    client.wait_for_open_round(&job, RoundId(1), Duration::from_secs(30)).await.unwrap();
    let mut sent = Vec::new();
    for c in 0..12u64 {
        let values = as_sent(&m, &random_values(&m, 300 + c));
        publish(&client, &job, &format!("c{c}"), 3 + c, UpdateKind::Parameters, &values, &m).await;
        sent.push((values, (3 + c) as f64));
    }
    let (clients, _) = committed(&client, &job, 1, &nodes).await;
    assert_eq!(clients, 12);
    assert_close(&model(&client, &job, &m, 1).await, &weighted_mean_oracle(&sent), "fan-in 2");
    let metric = |text: &str, name: &str| scrape(text, name).unwrap_or(0.0);
    let mut per_node = Vec::new();
    for n in &nodes {
        let t = n.metrics(&client.connection().client).await;
        per_node.push((
            metric(&t, "shoal_updates_staged_total"),
            metric(&t, "shoal_partial_bytes_sent_total"),
            metric(&t, "shoal_partial_bytes_received_total"),
        ));
    }
    eprintln!("(staged, sent, received) per node: {per_node:?}");
    assert!(per_node[1].0 > 0.0, "n2 staged nothing: {per_node:?}");
    // n2's partial went to its middle n1, not to the top.
    assert!(per_node[0].2 >= (m.numel() * 8) as f64, "the middle n1 received no partial: {per_node:?}");
}

/// One update per client and round, cluster-wide: a client sending three different updates
/// for one round (so JetStream's message-id dedupe does not apply) through a three-node
/// cluster gets exactly one accepted, whichever nodes pull them; the others are `duplicate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_update_is_a_duplicate_on_every_node() {
    init_logging();
    let nats = NatsServer::start().unwrap();
    let nodes = three_nodes(&nats.url()).await;
    let client = connect(&nats.url()).await;
    let m = manifest();
    let job = JobId::new("dup").unwrap();
    jobs::create_job(
        &shoal_testkit::infra_of(&client).await,
        &job_spec("dup", (*m).clone(), 3, 3, 60_000, 1),
        None,
    )
    .await
    .unwrap();
    client.wait_for_open_round(&job, RoundId(1), Duration::from_secs(30)).await.unwrap();
    let mut refused = rejections(&client.connection().client, "dup").await;
    let honest: Vec<(Vec<Vec<f64>>, f64)> =
        (0..2).map(|c| (as_sent(&m, &random_values(&m, 40 + c)), 5.0)).collect();
    let evil: Vec<Vec<Vec<f64>>> = (0..3).map(|k| as_sent(&m, &random_values(&m, 90 + k))).collect();
    for v in &evil {
        publish(&client, &job, "evil", 5, UpdateKind::Parameters, v, &m).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (c, (v, w)) in honest.iter().enumerate() {
        publish(&client, &job, &format!("h{c}"), *w as u64, UpdateKind::Parameters, v, &m).await;
    }
    let (clients, weight) = committed(&client, &job, 1, &nodes).await;
    assert_eq!((clients, weight), (3, 15.0), "{}", logs(&nodes));
    let mut reasons = Vec::new();
    for _ in 0..2 {
        let n = next_rejection(&mut refused).await;
        reasons.push((n.client.to_string(), n.reason));
    }
    let dup = shoal_runtime::error::RejectReason::Duplicate;
    assert_eq!(reasons, vec![("evil".to_string(), dup), ("evil".to_string(), dup)]);
    // The model is the mean of the honest two and one of evil's three.
    let got = model(&client, &job, &m, 1).await;
    let matches = evil.iter().filter(|v| {
        let mut all = honest.clone();
        all.push(((*v).clone(), 5.0));
        let want = weighted_mean_oracle(&all);
        want.iter().enumerate().all(|(i, w)| {
            got.tensor_f64(i).iter().zip(w).all(|(g, o)| (g - o).abs() <= 1e-6 * o.abs().max(1e-3))
        })
    });
    assert_eq!(matches.count(), 1, "the model is not honest + exactly one of evil's updates");
}

/// A node that is not the top stops (SIGTERM) mid-round, holding an update: the round does not
/// close early on its stale progress; its update comes back through JetStream and the round
/// commits all four, before its (long) deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_leaving_mid_round_loses_nothing() {
    init_logging();
    let nats = NatsServer::start().unwrap();
    let mut nodes = three_nodes(&nats.url()).await;
    let client = connect(&nats.url()).await;
    let m = manifest();
    let job = JobId::new("leave").unwrap();
    jobs::create_job(
        &shoal_testkit::infra_of(&client).await,
        &job_spec("leave", (*m).clone(), 4, 4, 120_000, 1),
        None,
    )
    .await
    .unwrap();
    client.wait_for_open_round(&job, RoundId(1), Duration::from_secs(30)).await.unwrap();
    let mut sent = Vec::new();
    for c in 0..3u64 {
        let values = as_sent(&m, &random_values(&m, 600 + c));
        publish(&client, &job, &format!("u{c}"), 2 + c, UpdateKind::Parameters, &values, &m).await;
        sent.push((values, (2 + c) as f64));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let lease =
        shoal_testkit::infra_of(&client).await.jobs.get("leave.top").await.unwrap().expect("a top lease");
    let top: shoal_runtime::cluster::lease::Lease = shoal_proto::decode("lease", &lease).unwrap();
    let mut victim = None;
    for (i, n) in nodes.iter().enumerate() {
        let staged = scrape(&n.metrics(&client.connection().client).await, "shoal_updates_staged_total")
            .unwrap_or(0.0);
        if n.node_id != top.node.as_str() && staged > 0.0 {
            victim = Some(i);
        }
    }
    let victim = victim.expect("a node other than the top holds an update");
    assert!(nodes[victim].terminate().success());
    let values = as_sent(&m, &random_values(&m, 603));
    publish(&client, &job, "u3", 5, UpdateKind::Parameters, &values, &m).await;
    sent.push((values, 5.0));
    let (clients, weight) = committed(&client, &job, 1, &nodes).await;
    assert_eq!((clients, weight), (4, 14.0), "{}", logs(&nodes));
    assert_close(&model(&client, &job, &m, 1).await, &weighted_mean_oracle(&sent), "after a node left");
    assert_stream_drains(&client, Duration::from_secs(15)).await;
}
