//! RFFL and Bristle across nodes by the two-phase protocol (DESIGN.md §5): several `shoal node`
//! processes on one nats-server, the updates staged wherever the work queue delivers them.
//!
//! - Every committed model over 1, 2, 3 and 5 nodes equals the single-node result (the same
//!   strategy run in this process with `shoal_functions` on the same updates, from its own
//!   previous result) within 1e-6 relative: RFFL in both modes over 3 rounds, with the rewards
//!   each client fetches after the last round; Bristle (without the integrator, which `shoal
//!   node` processes have no evaluator for) over 2 rounds.
//! - With 3 nodes, every node stages and reads its own share (`shoal_updates_staged_total`,
//!   `shoal_twophase_updates_total`), and the bytes that cross nodes grow with the number of
//!   clients by per-client scalars only: two runs with 6 and 14 clients and the same model
//!   differ by far less than one update's bytes per extra client.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::Duration;

use shoal_client::{ShoalClient, UpdateRequest};
use shoal_functions::{
    ClientId, DType, JobId, JobSpec, ModelManifest, ModelVersion, Parameters, RoundId, Strategy,
    StrategySpec, UpdateKind, UpdateView,
};
use shoal_proto::RoundOutcome;
use shoal_runtime::jobs;
use shoal_runtime::metrics::scrape;
use shoal_testkit::*;

const NODE_ARGS: &[&str] = &["--ack-wait-ms", "3000", "--pull-batch", "1", "--collect-timeout-ms", "3000"];

/// 2 600 parameters (10 400 bytes per update as f32).
fn manifest() -> Arc<ModelManifest> {
    shoal_testkit::manifest(&[("fc.weight", DType::F32, &[64, 40]), ("fc.bias", DType::F32, &[40])])
}

async fn cluster(url: &str, k: usize) -> Vec<NodeProcess> {
    let mut nodes = Vec::new();
    for i in 1..=k {
        nodes.push(NodeProcess::start(url, &format!("n{i}"), NODE_ARGS).await);
    }
    nodes
}

fn logs(nodes: &[NodeProcess]) -> String {
    nodes.iter().map(|n| format!("--- {} ---\n{}", n.node_id, n.log())).collect()
}

async fn sum_metric(nodes: &[NodeProcess], client: &ShoalClient, metric: &str) -> Vec<f64> {
    let mut out = Vec::new();
    for n in nodes {
        out.push(scrape(&n.metrics(&client.connection().client).await, metric).unwrap_or(0.0));
    }
    out
}

fn rffl(mode: &str) -> StrategySpec {
    serde_json::from_str(&format!(r#"{{"name":"rffl","mode":"{mode}","gamma":1.0}}"#)).unwrap()
}

fn bristle() -> StrategySpec {
    serde_json::from_str(r#"{"name":"bristle","beta":4}"#).unwrap()
}

/// Staged bytes of `values` in a 64-byte-aligned buffer (what the nodes read in shared memory).
struct Staged {
    client: ClientId,
    words: Vec<u64>,
    weight: f64,
}

fn stage(m: &Arc<ModelManifest>, client: &str, values: &[Vec<f64>], weight: f64) -> Staged {
    let mut words = vec![0u64; m.slot_bytes().div_ceil(8)];
    // SAFETY: u64 has no padding; the byte view covers exactly the vector's memory.
    let bytes = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 8) };
    shoal_functions::tensor::stage_update(m, &payload(m, values), &mut bytes[..m.slot_bytes()]).unwrap();
    Staged { client: ClientId::new(client).unwrap(), words, weight }
}

fn view<'a>(m: &'a ModelManifest, s: &'a Staged) -> UpdateView<'a> {
    // SAFETY: as in `stage`.
    let bytes = unsafe { std::slice::from_raw_parts(s.words.as_ptr().cast::<u8>(), s.words.len() * 8) };
    UpdateView { manifest: m, bytes: &bytes[..m.slot_bytes()], weight: s.weight, client: &s.client }
}

/// `|a − b| ≤ 1e-6 · max(|a|, |b|)` (plus a floor for values near 0).
fn assert_params_close(got: &Parameters, want: &Parameters, what: &str) {
    for i in 0..want.manifest().tensors().len() {
        for (e, (g, o)) in got.tensor_f64(i).iter().zip(want.tensor_f64(i)).enumerate() {
            assert!(
                (g - o).abs() <= 1e-6 * o.abs().max(g.abs()).max(1e-3),
                "{what}: tensor {i}[{e}] = {g}, want {o}"
            );
        }
    }
}

/// Client `c`'s delta in round `r`: a common direction plus its own noise; client 0 is a free
/// rider (noise only, small), so reputations differ.
fn delta(m: &Arc<ModelManifest>, c: usize, r: u64) -> Vec<Vec<f64>> {
    let common = random_values(m, 4242 + r);
    let own = random_values(m, 1000 * r + c as u64);
    let values: Vec<Vec<f64>> = common
        .iter()
        .zip(&own)
        .map(|(a, b)| {
            a.iter().zip(b).map(|(x, y)| if c == 0 { 0.05 * y } else { 0.2 * x + 0.1 * y }).collect()
        })
        .collect();
    as_sent(m, &values)
}

/// Runs `rounds` rounds of job `name` with `clients` clients on `nodes` and checks every
/// committed model (and, for RFFL, every client's reward after the last round) against the
/// strategy run in this process on the same updates.
/// Publishes round `r` of `job`: clients `c0..` send [`delta`] with `num_examples` 5 + 3c on
/// base version r − 1; returns what the single-node oracle folds.
async fn publish_deltas(
    client: &ShoalClient,
    m: &Arc<ModelManifest>,
    job: &JobId,
    r: u64,
    clients: usize,
) -> Vec<Staged> {
    let mut staged = Vec::new();
    for c in 0..clients {
        let values = delta(m, c, r);
        let n = 5 + 3 * c as u64;
        client
            .publish_update(UpdateRequest {
                job: job.clone(),
                client: ClientId::new(format!("c{c}")).unwrap(),
                round: RoundId(r),
                base_version: ModelVersion(r - 1),
                num_examples: n,
                kind: UpdateKind::Delta,
                payload: payload(m, &values),
                force_upload: false,
            })
            .await
            .unwrap();
        staged.push(stage(m, &format!("c{c}"), &values, n as f64));
    }
    staged
}

async fn run_job(
    client: &ShoalClient,
    nodes: &[NodeProcess],
    name: &str,
    strategy: StrategySpec,
    clients: usize,
    rounds: u64,
) {
    let m = manifest();
    let job = JobId::new(name).unwrap();
    // One round more than played: the top serves the rewards of the last round while the job
    // runs; it is cancelled after.
    let mut spec: JobSpec = job_spec(name, (*m).clone(), clients as u32, clients as u32, 60_000, rounds + 1);
    spec.strategy = strategy;
    spec.update_kind = UpdateKind::Delta;
    jobs::create_job(&infra_of(client).await, &spec, None).await.unwrap();
    let mut oracle = shoal_functions::factory::build_strategy(&spec).unwrap();
    let mut global = Parameters::zeros(Arc::clone(&m));
    for r in 1..=rounds {
        client.wait_for_open_round(&job, RoundId(r), Duration::from_secs(60)).await.unwrap();
        let staged = publish_deltas(client, &m, &job, r, clients).await;
        let st = client.wait_for_round_closed(&job, RoundId(r), Duration::from_secs(60)).await.unwrap();
        match st.last_outcome {
            Some(RoundOutcome::Committed { clients: got, .. }) => assert_eq!(got as usize, clients),
            other => panic!("{name} round {r} did not commit: {other:?}\n{}", logs(nodes)),
        }
        let views: Vec<UpdateView<'_>> = staged.iter().map(|s| view(&m, s)).collect();
        let want = oracle.aggregate_cohort(&views, &global).unwrap();
        let bytes = client.fetch_model(&job, ModelVersion(r)).await.unwrap();
        let got = Parameters::from_safetensors(Arc::clone(&m), &bytes).unwrap();
        assert_params_close(&got, &want, &format!("{name} on {} nodes, round {r}", nodes.len()));
        global = want;
    }
    for c in 0..clients {
        let id = ClientId::new(format!("c{c}")).unwrap();
        let Some(want) = oracle.client_reward(&id) else { continue };
        let want = want.unwrap();
        let bytes = client.fetch_reward(&job, &id).await.unwrap();
        let got = Parameters::from_safetensors(Arc::clone(&m), &bytes).unwrap();
        assert_params_close(&got, &want, &format!("{name}: reward of {id}"));
    }
    shoal_client::jobs::cancel_job(&infra_of(client).await, &job, "test done").await.unwrap();
}

/// The three jobs (RFFL in both modes, Bristle) on `k` nodes.
async fn equals_single_node(k: usize) -> (Vec<NodeProcess>, ShoalClient, NatsServer) {
    let nats = NatsServer::start().unwrap();
    let nodes = cluster(&nats.url(), k).await;
    let client = connect(&nats.url()).await;
    run_job(&client, &nodes, &format!("rffl-ref-{k}"), rffl("reference-code"), 7, 3).await;
    run_job(&client, &nodes, &format!("rffl-paper-{k}"), rffl("paper"), 7, 3).await;
    run_job(&client, &nodes, &format!("bristle-{k}"), bristle(), 7, 2).await;
    (nodes, client, nats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_and_two_nodes_equal_single_node() {
    init_logging();
    equals_single_node(1).await;
    let (nodes, client, _nats) = equals_single_node(2).await;
    let staged = sum_metric(&nodes, &client, "shoal_updates_staged_total").await;
    assert!(staged.iter().all(|s| *s > 0.0), "updates did not spread: {staged:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_equal_single_node() {
    init_logging();
    let (nodes, client, _nats) = equals_single_node(5).await;
    let staged = sum_metric(&nodes, &client, "shoal_updates_staged_total").await;
    assert!(staged.iter().filter(|s| **s > 0.0).count() >= 3, "updates did not spread: {staged:?}");
}

/// Bytes sent between nodes: partials of the collection (client ids, weights and stream
/// sequences of the cohort, no tensors for whole-cohort jobs) and two-phase steps.
async fn cross_node_bytes(nodes: &[NodeProcess], client: &ShoalClient) -> f64 {
    let a = sum_metric(nodes, client, "shoal_partial_bytes_sent_total").await;
    let b = sum_metric(nodes, client, "shoal_twophase_bytes_sent_total").await;
    a.iter().chain(&b).sum()
}

/// With 3 nodes: models equal the single-node ones, every node stages and reads its own share,
/// and the cross-node bytes per extra client are per-client scalars, not update bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_spread_the_work_and_move_only_scalars() {
    init_logging();
    let (nodes, client, _nats) = equals_single_node(3).await;
    let staged = sum_metric(&nodes, &client, "shoal_updates_staged_total").await;
    let read = sum_metric(&nodes, &client, "shoal_twophase_updates_total").await;
    eprintln!("per node: staged {staged:?}, read in two-phase steps {read:?}");
    // 7 clients × (3 + 3 + 2) rounds, each read once in phase 1 (more after a retry).
    assert_eq!(staged.iter().sum::<f64>(), 56.0, "{staged:?}");
    assert!(read.iter().sum::<f64>() >= 56.0, "{read:?}");
    for (s, r) in staged.iter().zip(&read) {
        assert!(*s > 0.0 && *r > 0.0, "a node did not stage or read its share: {staged:?} {read:?}");
    }
    let m = manifest();
    let update = m.data_bytes() as f64;
    let mut per_job = Vec::new();
    for (name, spec) in [("rffl", rffl("reference-code")), ("bristle", bristle())] {
        let mut bytes = Vec::new();
        for clients in [6usize, 14] {
            let before = cross_node_bytes(&nodes, &client).await;
            run_job(&client, &nodes, &format!("{name}-bytes-{clients}"), spec.clone(), clients, 1).await;
            bytes.push(cross_node_bytes(&nodes, &client).await - before);
        }
        let per_client = (bytes[1] - bytes[0]) / 8.0;
        eprintln!("{name}: cross-node bytes {bytes:?} for 6 and 14 clients: {per_client:.0} B per extra client, update {update} B");
        per_job.push(per_client);
        // Per client: id, weight, node and sequence in the collection, a few scalars per phase.
        assert!(per_client < 400.0, "{name}: {per_client} bytes per extra client");
        assert!(per_client < update / 20.0, "{name}: update bytes cross nodes ({per_client} per client)");
    }
}

/// A leaf SIGKILLed between the two phases of an RFFL round (issue 14): node n3 joins a 2-node
/// cluster after the top is chosen, with [`shoal_runtime::cluster::twophase::HOLD_ENV`] set so
/// that it waits 30 s after its phase-1 answer; the test kills it as soon as its log says it
/// holds (deterministically between the phases). The top's phase-2 wait fails, it collects
/// again, the dead node's updates reach the survivors (adopted, or redelivered after the 3 s
/// ack wait) and both phases run again: every committed model equals
/// the single-node oracle (an update folded twice or lost would change RFFL's weights), every
/// commit counts each client once, and the rewards after the last round match.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_killed_between_the_phases_changes_nothing() {
    const CLIENTS: usize = 8;
    const ROUNDS: u64 = 4;
    init_logging();
    let nats = NatsServer::start().unwrap();
    let url = nats.url();
    let mut nodes = cluster(&url, 2).await;
    let client = connect(&url).await;
    let m = manifest();
    let name = "rffl-leafkill";
    let job = JobId::new(name).unwrap();
    let mut spec: JobSpec = job_spec(name, (*m).clone(), CLIENTS as u32, CLIENTS as u32, 60_000, ROUNDS + 1);
    spec.strategy = rffl("reference-code");
    spec.update_kind = UpdateKind::Delta;
    jobs::create_job(&infra_of(&client).await, &spec, None).await.unwrap();
    client.wait_for_open_round(&job, RoundId(1), Duration::from_secs(60)).await.unwrap();
    // The top is n1 or n2 now; n3 only leads a leaf.
    let hold = [(shoal_runtime::cluster::twophase::HOLD_ENV, "30000")];
    nodes.push(NodeProcess::start_with(&url, "n3", NODE_ARGS, &hold, None).await);
    let mut oracle = shoal_functions::factory::build_strategy(&spec).unwrap();
    let mut global = Parameters::zeros(Arc::clone(&m));
    let mut killed_in = None;
    for r in 1..=ROUNDS {
        client.wait_for_open_round(&job, RoundId(r), Duration::from_secs(60)).await.unwrap();
        let staged = publish_deltas(&client, &m, &job, r, CLIENTS).await;
        if killed_in.is_none() {
            // n3 holds after its phase-1 answer if it staged any of this round's updates;
            // otherwise the round commits without it and the next round tries again.
            loop {
                if nodes[2].log().contains("phase 1 answered; holding") {
                    nodes[2].kill();
                    killed_in = Some(r);
                    eprintln!("round {r}: n3 SIGKILLed between its phase-1 answer and phase 2");
                    break;
                }
                if state_after(&client, name, r).await.is_some() {
                    eprintln!("round {r}: n3 staged none of the round's updates; trying the next round");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let st = client.wait_for_round_closed(&job, RoundId(r), Duration::from_secs(60)).await.unwrap();
        match st.last_outcome {
            Some(RoundOutcome::Committed { clients: got, .. }) => {
                assert_eq!(got as usize, CLIENTS, "round {r}: each client once\n{}", logs(&nodes));
            }
            other => panic!("round {r} did not commit: {other:?}\n{}", logs(&nodes)),
        }
        let views: Vec<UpdateView<'_>> = staged.iter().map(|s| view(&m, s)).collect();
        let want = oracle.aggregate_cohort(&views, &global).unwrap();
        let bytes = client.fetch_model(&job, ModelVersion(r)).await.unwrap();
        let got = Parameters::from_safetensors(Arc::clone(&m), &bytes).unwrap();
        assert_params_close(&got, &want, &format!("{name} round {r}"));
        global = want;
    }
    let killed_in = killed_in.expect("n3 never staged an update in 4 rounds of 8 clients");
    for c in 0..CLIENTS {
        let id = ClientId::new(format!("c{c}")).unwrap();
        let want = oracle.client_reward(&id).unwrap().unwrap();
        let bytes = client.fetch_reward(&job, &id).await.unwrap();
        let got = Parameters::from_safetensors(Arc::clone(&m), &bytes).unwrap();
        assert_params_close(&got, &want, &format!("{name}: reward of {id}"));
    }
    // The top saw the exchange fail and collected again; the dead node's updates reached the
    // survivors by adoption or by JetStream's redelivery (ack wait 3 s here), whichever first.
    let top_log: String = nodes[..2].iter().map(|n| n.log()).collect();
    for line in top_log.lines().filter(|l| {
        l.contains("collecting again")
            || l.contains("adopt")
            || l.contains(&format!("round={killed_in} outcome"))
    }) {
        eprintln!("{line}");
    }
    assert!(
        top_log.contains("collecting again"),
        "round {killed_in}: no second collection\n{}",
        logs(&nodes)
    );
    shoal_client::jobs::cancel_job(&infra_of(&client).await, &job, "test done").await.unwrap();
}
