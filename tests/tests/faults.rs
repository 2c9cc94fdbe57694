//! Durability under faults (DESIGN.md §6; bug-cases.md rows 15 and 30): a seeded fault injector
//! runs one trial per round of a FedAvg job served by three node processes. In each trial it
//! hits one process at a random point of the round — SIGKILLs a node (gateway + function host +
//! leaf, and the job's top when it holds the top lease), two nodes at once, or nats-server
//! (restarted on the same port with the same JetStream store), or SIGSTOPs a node for longer
//! than the lease's stale time plus the ack wait — and restarts (or SIGCONTs) it. The clients behave as real ones: a publish
//! that fails is retried, and a client told `late_update` trains again for the next round.
//!
//! How the test knows what each round acknowledged, without Shoal's help: client `c` sends with
//! weight 2^c, so the committed `total_weight` names the set of updates the round folded (one
//! bit per client), and `clients` equals its popcount only if no update was folded twice (a
//! second 2^c carries into another bit). Then:
//! - every committed model equals the f64 oracle over exactly that set;
//! - every update sent is either in its round's set or refused with a typed notice: never both
//!   (a client told "late" sends its data again) and never neither (lost);
//! - the job commits its last round and the work queue drains.
//!
//! `SHOAL_FAULT_SEED` replays another seed.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(clippy::too_many_lines)] // a test reads as one scenario, top to bottom

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::{Rng, SeedableRng};
use shoal_client::connect::ConnectOptions;
use shoal_client::Error;
use shoal_client::{ShoalClient, UpdateRequest};
use shoal_functions::{ClientId, DType, JobId, ModelManifest, ModelVersion, Parameters, RoundId, UpdateKind};
use shoal_proto::JobPhase;
use shoal_proto::RejectNotice;
use shoal_proto::RoundOutcome;
use shoal_runtime::{jobs, RejectReason};
use shoal_testkit::*;

const NODE_ARGS: &[&str] = &["--ack-wait-ms", "1500", "--pull-batch", "1", "--collect-timeout-ms", "1000"];
const CLIENTS: u32 = 6;
const TRIALS: u64 = 20;
const JOB: &str = "faults";

fn manifest() -> Arc<ModelManifest> {
    shoal_testkit::manifest(&[("fc.weight", DType::F32, &[32, 16]), ("fc.bias", DType::F32, &[16])])
}

/// What was killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Victim {
    /// The node holding the job's top lease.
    TopNode,
    /// Another node.
    OtherNode,
    /// nats-server (restarted at once, same port and store).
    Nats,
    /// A node SIGSTOPped for longer than the lease's stale time plus the ack wait, then
    /// SIGCONTinued: it must fence itself, and nothing it held may count twice.
    PausedNode,
    /// Two of the three nodes at once (one of them may be the top).
    TwoNodes,
}

/// How long a paused node stays stopped: beyond the lease's stale time (3 s) and the ack wait.
const PAUSE: Duration = Duration::from_millis(4500);

fn values(m: &Arc<ModelManifest>, seed: u64, round: u64, client: u32) -> Vec<Vec<f64>> {
    as_sent(m, &random_values(m, seed ^ (round << 16) ^ u64::from(client)))
}

/// Publishes like a real client: retries a failed publish; a retry answered `duplicate` means
/// the first attempt was stored (JetStream dedupes it by `Nats-Msg-Id`). Returns (retries,
/// whether a retry was answered `duplicate`).
async fn publish(client: &ShoalClient, req: UpdateRequest) -> (u32, bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut attempt = 0;
    loop {
        match client.publish_update(req.clone()).await {
            Ok(_) => return (attempt, false),
            Err(Error::Rejected(RejectReason::Duplicate)) if attempt > 0 => return (attempt, true),
            Err(e) => {
                assert!(Instant::now() < deadline, "publishing {} failed for 60 s: {e}", req.client);
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// The messages still in the updates stream: (stream sequence, subject, round header).
async fn leftovers(client: &ShoalClient) -> Vec<(u64, String, String)> {
    let mut stream = shoal_testkit::infra_of(client).await.updates.clone();
    let Ok(info) = stream.info().await else { return Vec::new() };
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    let mut out = Vec::new();
    for seq in first..=last {
        if let Ok(m) = stream.get_raw_message(seq).await {
            let round =
                m.headers.get(shoal_proto::headers::HDR_ROUND).map(|v| v.to_string()).unwrap_or_default();
            out.push((seq, m.subject.to_string(), round));
        }
    }
    out
}

fn logs(nodes: &[NodeProcess]) -> String {
    nodes.iter().map(|n| format!("--- {} ---\n{}", n.node_id, n.log())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_kills_of_nodes_tops_and_nats_lose_nothing_and_apply_nothing_twice() {
    init_logging();
    let started = Instant::now();
    let seed: u64 = std::env::var("SHOAL_FAULT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20_261_129);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut nats = NatsServer::start().unwrap();
    let url = nats.url();
    let mut nodes = Vec::new();
    for id in ["f1", "f2", "f3"] {
        nodes.push(NodeProcess::start(&url, id, NODE_ARGS).await);
    }
    let client =
        ShoalClient::connect(&ConnectOptions { url: url.clone(), ..Default::default() }).await.unwrap();
    let m = manifest();
    let job = JobId::new(JOB).unwrap();
    let mut spec = job_spec(JOB, (*m).clone(), CLIENTS, 1, 6000, TRIALS);
    spec.max_failed_rounds = 50;
    jobs::create_job(&shoal_testkit::infra_of(&client).await, &spec, None).await.unwrap();

    // Every rejection notice, collected from the start.
    let notices: Arc<Mutex<Vec<RejectNotice>>> = Arc::default();
    {
        let mut sub = rejections(&client.connection().client, JOB).await;
        let notices = Arc::clone(&notices);
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                if let Ok(n) = shoal_proto::decode::<RejectNotice>("notice", &msg.payload) {
                    notices.lock().unwrap().push(n);
                }
            }
        });
    }

    let mut sent: BTreeSet<(u64, u32)> = BTreeSet::new();
    let mut folded: BTreeMap<u64, BTreeSet<u32>> = BTreeMap::new();
    let mut kills: BTreeMap<Victim, u32> = BTreeMap::new();
    let mut trials = 0u64;
    let (mut publish_retries, mut duplicates_on_retry) = (0u32, 0u32);
    let (c, j) = (&client, &job);
    loop {
        let state = retry("wait for an open round", move || async move {
            match c.wait_for_state(j, Duration::from_secs(30), "a round to open", |s| s.is_open()).await {
                Err(Error::JobEnded { .. }) => c.job_state(j).await,
                other => other,
            }
        })
        .await;
        if state.phase != JobPhase::Running {
            break;
        }
        assert!(trials < TRIALS + 10, "the job needs too many rounds: {state:?}\n{}", logs(&nodes));
        trials += 1;
        let (round, base) = (state.round, state.model_version);

        // The fault: which process, after how many of the round's updates, after what delay.
        // After the last update the delay is longer, so the kill can also land during the
        // collection, the commit or the leaves' acks.
        let at = rng.gen_range(0..=CLIENTS);
        let delay = Duration::from_millis(rng.gen_range(0..if at == CLIENTS { 1200 } else { 300 }));
        // 0..3: that node; 3: nats-server; 4: pause a node; 5: kill two nodes.
        let kind = rng.gen_range(0..nodes.len() + 3);
        let target = if kind < nodes.len() { kind } else { rng.gen_range(0..nodes.len()) };
        let mut restart_node = Vec::new();
        let mut paused: Option<(usize, Instant)> = None;
        for k in 0..=CLIENTS {
            if k == at {
                tokio::time::sleep(delay).await;
                let victim = if kind == nodes.len() {
                    tokio::task::block_in_place(|| nats.restart()).unwrap();
                    Victim::Nats
                } else if kind == nodes.len() + 1 {
                    nodes[target].pause();
                    paused = Some((target, Instant::now()));
                    Victim::PausedNode
                } else if kind == nodes.len() + 2 {
                    let second = (target + 1) % nodes.len();
                    nodes[target].kill();
                    nodes[second].kill();
                    restart_node = vec![target, second];
                    Victim::TwoNodes
                } else {
                    let top = shoal_testkit::infra_of(&client)
                        .await
                        .jobs
                        .get(format!("{JOB}.top"))
                        .await
                        .ok()
                        .flatten();
                    let top: Option<shoal_runtime::cluster::lease::Lease> =
                        top.and_then(|b| shoal_proto::decode("lease", &b).ok());
                    nodes[target].kill();
                    restart_node = vec![target];
                    if top.is_some_and(|l| l.node.as_str() == nodes[target].node_id) {
                        Victim::TopNode
                    } else {
                        Victim::OtherNode
                    }
                };
                *kills.entry(victim).or_default() += 1;
                eprintln!(
                    "trial {trials}: round {round}, {victim:?} ({}) killed after {at} updates + {delay:?}",
                    if kind == nodes.len() { "nats-server" } else { nodes[target].node_id.as_str() }
                );
            }
            if k == CLIENTS {
                break;
            }
            let req = UpdateRequest {
                job: job.clone(),
                client: ClientId::new(format!("c{k}")).unwrap(),
                round,
                base_version: base,
                num_examples: 1 << k,
                kind: UpdateKind::Parameters,
                payload: payload(&m, &values(&m, seed, round.0, k)),
                force_upload: k == 0,
            };
            let (retries, duplicate) = publish(&client, req).await;
            publish_retries += retries;
            duplicates_on_retry += u32::from(duplicate);
            sent.insert((round.0, k));
        }
        if let Some((i, at)) = paused {
            tokio::time::sleep(PAUSE.saturating_sub(at.elapsed())).await;
            nodes[i].resume();
        }
        let restarted = async {
            for i in restart_node {
                nodes[i].restart(&url).await;
            }
        };
        let closed = retry("wait for the round to close", move || async move {
            c.wait_for_round_closed(j, round, Duration::from_secs(60)).await
        });
        tokio::join!(restarted, closed);

        // What the round folded, from its commit alone.
        let after = retry("read the commit", move || async move {
            state_after(c, JOB, round.0).await.ok_or(Error::Timeout(Duration::ZERO, "the commit record"))
        })
        .await;
        let set: BTreeSet<u32> = match after.last_outcome {
            Some(RoundOutcome::Committed { version, clients, total_weight }) => {
                assert_eq!(version, base.next(), "round {round} committed a version out of order");
                let set = folded_by_weight(
                    total_weight,
                    clients,
                    CLIENTS,
                    &format!("round {round}\n{}", logs(&nodes)),
                );
                let oracle = weighted_mean_oracle(
                    &set.iter()
                        .map(|&c| (values(&m, seed, round.0, c), f64::from(1u32 << c)))
                        .collect::<Vec<_>>(),
                );
                let bytes =
                    retry("fetch the model", move || async move { c.fetch_model(j, version).await }).await;
                let model = Parameters::from_safetensors(Arc::clone(&m), &bytes).unwrap();
                assert_model_near(&model, &oracle, &format!("round {round}, oracle over {set:?},"));
                set
            }
            Some(RoundOutcome::QuorumNotMet { accepted: 0, .. }) => {
                eprintln!("round {round} folded nothing; node logs:\n{}", logs(&nodes));
                BTreeSet::new()
            }
            other => panic!("round {round}: unexpected outcome {other:?}\n{}", logs(&nodes)),
        };
        eprintln!("trial {trials}: round {round} folded {set:?}");
        folded.insert(round.0, set);
    }

    let end = client.job_state(&job).await.unwrap();
    assert_eq!(end.phase, JobPhase::Finished, "{end:?}");
    assert_eq!(end.model_version, ModelVersion(TRIALS), "the job committed its last round");

    // Every update is settled: acked after its commit, or refused (terminated); nothing waits
    // for a delivery. nats-server 2.9 keeps a work queue's stream and its consumer's acks in
    // separate files, and a SIGKILL can lose either's last writes: a message acked just before
    // the kill may stay in the stream although the consumer counts it as acked (it is never
    // delivered again), and an ack pending entry may outlive its message. So without a
    // nats-server kill the stream must be empty; with one, every message left must belong to an
    // update already settled (checked with all the others below).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = None;
    let mut stable = 0;
    loop {
        let stream = shoal_testkit::infra_of(&client)
            .await
            .updates
            .clone()
            .info()
            .await
            .map(|i| i.state.messages)
            .ok();
        let consumer = shoal_testkit::infra_of(&client)
            .await
            .updates
            .clone()
            .consumer_info(shoal_proto::subjects::GATEWAY_CONSUMER)
            .await
            .ok()
            .map(|i| (i.num_pending, i.num_ack_pending, i.delivered.stream_sequence));
        let now = (stream, consumer);
        stable = if Some(now) == last { stable + 1 } else { 0 };
        last = Some(now);
        if stream == Some(0)
            || (kills.contains_key(&Victim::Nats) && stable >= 30 && consumer.is_some_and(|c| c.0 == 0))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "updates never settled: stream, (consumer pending, ack pending, delivered) = {now:?}; left {:?}\n{}",
            leftovers(&client).await,
            logs(&nodes)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left = leftovers(&client).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Each update either went into its round's model or its client was told why not.
    let notices = notices.lock().unwrap().clone();
    let mut late = 0;
    for &(round, c) in &sent {
        let who = format!("c{c}");
        let told: Vec<&RejectNotice> =
            notices.iter().filter(|n| n.client.as_str() == who && n.round == Some(RoundId(round))).collect();
        let inside = folded.get(&round).is_some_and(|s| s.contains(&c));
        assert!(
            !inside || told.is_empty(),
            "round {round} folded {who}'s update, and {who} was also told {:?}: it would send its data again",
            told.iter().map(|n| (n.reason, n.detail.as_str())).collect::<Vec<_>>()
        );
        assert!(
            inside || !told.is_empty(),
            "{who}'s update for round {round} was neither folded nor refused: lost"
        );
        if !inside {
            // Late for its round, or for the job when its round was the last one.
            let late_reasons = [RejectReason::LateUpdate, RejectReason::JobNotRunning];
            assert!(told.iter().all(|n| late_reasons.contains(&n.reason)), "{told:?}");
            late += 1;
        }
    }
    let mut reacked = 0.0;
    for n in &nodes {
        let text = n.metrics(&client.connection().client).await;
        reacked +=
            shoal_runtime::metrics::scrape(&text, "shoal_updates_already_applied_total").unwrap_or(0.0);
    }
    eprintln!(
        "seed {seed}: {trials} trials, kills {kills:?}, {} updates sent, {} folded, {late} refused as late, \
         {reacked} copies of applied updates acked by the nodes alive at the end, {publish_retries} publish \
         retries ({duplicates_on_retry} answered duplicate: stored by the first attempt), {} settled \
         messages left in the stream by nats-server kills, {:.1} s",
        sent.len(),
        sent.len() - late,
        left.len(),
        started.elapsed().as_secs_f64()
    );
}
