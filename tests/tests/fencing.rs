//! Fencing (issue 15, finding 1; DESIGN.md §6; docs/reliability.md): a node that is alive but
//! stops (SIGSTOP longer than the lease's stale time plus the ack wait) has its held updates
//! redelivered and claimed by another node; when it resumes, nothing it held may count, and no
//! update may be applied twice. Likewise for the job's top, and for a nats-server restart inside
//! a round (the claims are in memory then: the same update can be claimed afresh by another node).
//!
//! Each scenario plays one round of a FedAvg job on three node processes with a short ack wait.
//! Client `c` sends with weight 2^c, so the committed `total_weight` names the set of updates
//! the round folded, and `clients` equals its popcount only if no update was folded twice. The
//! test then checks, from the commit record alone:
//! - the committed model equals the f64 oracle over exactly that set;
//! - no stream sequence is named twice, and the record names as many as the round counted;
//! - every update sent is folded or refused with a typed notice, never both, never neither.
//!
//! The pause must hit a node that holds some of the round's updates: the test publishes one
//! update at a time and reads the claims until the chosen node holds one (the claims bucket says
//! which node staged what), so the double-claim path is exercised every run.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(clippy::too_many_lines)] // a test reads as one scenario, top to bottom

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use shoal_client::connect::ConnectOptions;
use shoal_client::Error;
use shoal_client::{ShoalClient, UpdateRequest};
use shoal_functions::{ClientId, DType, JobId, ModelManifest, Parameters, RoundId, UpdateKind};
use shoal_proto::cluster::ClaimValue;
use shoal_proto::{RejectNotice, RoundOutcome};
use shoal_runtime::RejectReason;
use shoal_testkit::*;

/// Ack wait 2 s, lease stale 3 s (default): a 6 s pause outlasts both.
const NODE_ARGS: &[&str] = &["--ack-wait-ms", "2000", "--pull-batch", "1", "--collect-timeout-ms", "1000"];
const PAUSE: Duration = Duration::from_secs(6);
const CLIENTS: u32 = 6;
const SEED: u64 = 15;

fn manifest() -> Arc<ModelManifest> {
    shoal_testkit::manifest(&[("fc.weight", DType::F32, &[16, 8]), ("fc.bias", DType::F32, &[8])])
}

fn values(m: &Arc<ModelManifest>, round: u64, client: u32) -> Vec<Vec<f64>> {
    as_sent(m, &random_values(m, SEED ^ (round << 16) ^ u64::from(client)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGSTOP a node that is not the top, while it holds staged updates of the open round.
    PauseLeaf,
    /// SIGSTOP the top's node while it holds staged updates of the open round.
    PauseTop,
    /// Restart nats-server (same port, same store) inside the round.
    RestartNats,
}

struct Cluster {
    nats: NatsServer,
    url: String,
    nodes: Vec<NodeProcess>,
    client: ShoalClient,
    notices: Arc<Mutex<Vec<RejectNotice>>>,
    job: String,
}

impl Cluster {
    async fn start(job: &str) -> Cluster {
        init_logging();
        let nats = NatsServer::start().unwrap();
        let url = nats.url();
        let mut nodes = Vec::new();
        for id in ["p1", "p2", "p3"] {
            nodes.push(NodeProcess::start(&url, id, NODE_ARGS).await);
        }
        let client =
            ShoalClient::connect(&ConnectOptions { url: url.clone(), ..Default::default() }).await.unwrap();
        let m = manifest();
        let mut spec = job_spec(job, (*m).clone(), CLIENTS, 1, 20_000, 3);
        spec.max_failed_rounds = 10;
        shoal_runtime::jobs::create_job(&infra_of(&client).await, &spec, None).await.unwrap();
        let notices: Arc<Mutex<Vec<RejectNotice>>> = Arc::default();
        {
            let mut sub = rejections(&client.connection().client, job).await;
            let notices = Arc::clone(&notices);
            tokio::spawn(async move {
                while let Some(msg) = sub.next().await {
                    if let Ok(n) = shoal_proto::decode::<RejectNotice>("notice", &msg.payload) {
                        notices.lock().unwrap().push(n);
                    }
                }
            });
        }
        Cluster { nats, url, nodes, client, notices, job: job.into() }
    }

    fn logs(&self) -> String {
        self.nodes.iter().map(|n| format!("--- {} ---\n{}", n.node_id, n.log())).collect()
    }

    /// The node holding the job's top lease.
    async fn top(&self) -> Option<String> {
        let v = infra_of(&self.client).await.jobs.get(format!("{}.top", self.job)).await.ok()??;
        let lease: shoal_runtime::cluster::lease::Lease = shoal_proto::decode("lease", &v).ok()?;
        Some(lease.node.to_string())
    }

    /// The node that claimed `client`'s update of `round`, if any yet.
    async fn holder(&self, round: RoundId, client: u32) -> Option<String> {
        let kv = infra_of(&self.client).await.claims(Duration::from_secs(24 * 3600)).await.ok()?;
        let key = shoal_proto::subjects::claim_key(
            &JobId::new(&self.job).unwrap(),
            round,
            &ClientId::new(format!("c{client}")).unwrap(),
        );
        let v = kv.get(key).await.ok()??;
        let c: ClaimValue = shoal_proto::decode("claim", &v).ok()?;
        Some(c.node.to_string())
    }

    /// Publishes client `k`'s update of `round` like a real client (retrying failures; a retry
    /// answered `duplicate` was stored by the first attempt).
    async fn publish(
        &self,
        m: &Arc<ModelManifest>,
        round: RoundId,
        base: shoal_functions::ModelVersion,
        k: u32,
    ) {
        let req = UpdateRequest {
            job: JobId::new(&self.job).unwrap(),
            client: ClientId::new(format!("c{k}")).unwrap(),
            round,
            base_version: base,
            num_examples: 1 << k,
            kind: UpdateKind::Parameters,
            payload: payload(m, &values(m, round.0, k)),
            force_upload: k == 0,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut attempt = 0;
        loop {
            match self.client.publish_update(req.clone()).await {
                Ok(_) => return,
                Err(Error::Rejected(RejectReason::Duplicate)) if attempt > 0 => return,
                Err(e) => {
                    assert!(Instant::now() < deadline, "publishing c{k} failed for 60 s: {e}");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }

    /// Plays one round with `fault`; returns the set of clients it folded.
    async fn round_with(&mut self, fault: Fault) -> BTreeSet<u32> {
        let m = manifest();
        let job = JobId::new(&self.job).unwrap();
        let (c, j) = (&self.client, &job);
        let state = retry("wait for an open round", move || async move {
            c.wait_for_state(j, Duration::from_secs(30), "a round to open", |s| s.is_open()).await
        })
        .await;
        let (round, base) = (state.round, state.model_version);
        let top = self.top().await.expect("a top holds the lease once a round is open");

        // Publish one update at a time until the node to pause holds one of them.
        let mut next = 0;
        let mut victim = None;
        while next < CLIENTS - 2 && victim.is_none() {
            self.publish(&m, round, base, next).await;
            next += 1;
            if fault == Fault::RestartNats {
                if next == 3 {
                    victim = Some(usize::MAX);
                }
                continue;
            }
            // Wait until the update is claimed, then see by whom.
            let deadline = Instant::now() + Duration::from_secs(10);
            let holder = loop {
                if let Some(h) = self.holder(round, next - 1).await {
                    break h;
                }
                assert!(Instant::now() < deadline, "c{} never claimed\n{}", next - 1, self.logs());
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            let wanted = match fault {
                Fault::PauseTop => holder == top,
                _ => holder != top,
            };
            if wanted {
                victim = self.nodes.iter().position(|n| n.node_id == holder);
            }
        }
        let victim = victim.unwrap_or_else(|| {
            panic!("after {next} updates no {fault:?} victim held one (top {top}); rerun\n{}", self.logs())
        });
        let held = next;
        if victim == usize::MAX {
            eprintln!("{fault:?}: round {round}, nats-server restarted after {held} updates");
            tokio::task::block_in_place(|| self.nats.restart()).unwrap();
            for k in next..CLIENTS {
                self.publish(&m, round, base, k).await;
            }
        } else {
            eprintln!(
                "{fault:?}: round {round}, pausing {} (top {top}) after {held} updates",
                self.nodes[victim].node_id
            );
            self.nodes[victim].pause();
            let paused = Instant::now();
            for k in next..CLIENTS - 1 {
                self.publish(&m, round, base, k).await;
            }
            tokio::time::sleep(PAUSE.saturating_sub(paused.elapsed())).await;
            self.nodes[victim].resume();
            // The round's last update comes after the paused node is back: the round is still
            // open then, and the resumed node would contribute what it held before the pause
            // (which another node has claimed and staged again meanwhile).
            tokio::time::sleep(Duration::from_secs(1)).await;
            self.publish(&m, round, base, CLIENTS - 1).await;
        }

        let closed = retry("wait for the round to close", move || async move {
            c.wait_for_round_closed(j, round, Duration::from_secs(60)).await
        })
        .await;
        let job_name = self.job.clone();
        let after = retry("read the commit", move || {
            let job_name = job_name.clone();
            async move {
                state_after(c, &job_name, round.0)
                    .await
                    .ok_or(Error::Timeout(Duration::ZERO, "the commit record"))
            }
        })
        .await;
        let record = after.last_commit.clone().expect("a commit record");
        let set: BTreeSet<u32> = match after.last_outcome {
            Some(RoundOutcome::Committed { version, clients, total_weight }) => {
                assert_eq!(version, base.next(), "{closed:?}");
                let set = folded_by_weight(
                    total_weight,
                    clients,
                    CLIENTS,
                    &format!("round {round}\n{}", self.logs()),
                );
                // The record names each stream sequence once (sorted disjoint ranges), and as
                // many as the round counted.
                let named: u64 = record.applied.iter().map(|(lo, hi)| hi - lo + 1).sum();
                assert!(record.applied.windows(2).all(|w| w[0].1 < w[1].0), "{:?}", record.applied);
                assert_eq!(named, u64::from(clients), "record {:?} vs {clients} updates", record.applied);
                let oracle = weighted_mean_oracle(
                    &set.iter().map(|&c| (values(&m, round.0, c), f64::from(1u32 << c))).collect::<Vec<_>>(),
                );
                let bytes =
                    retry("fetch the model", move || async move { c.fetch_model(j, version).await }).await;
                let model = Parameters::from_safetensors(Arc::clone(&m), &bytes).unwrap();
                assert_model_near(&model, &oracle, &format!("round {round}, oracle over {set:?},"));
                set
            }
            other => panic!("round {round}: unexpected outcome {other:?}\n{}", self.logs()),
        };
        // Each update is folded, or its client was told why not (after the notices settle).
        tokio::time::sleep(Duration::from_secs(1)).await;
        let notices = self.notices.lock().unwrap().clone();
        for k in 0..CLIENTS {
            let who = format!("c{k}");
            let told: Vec<_> = notices
                .iter()
                .filter(|n| n.client.as_str() == who && n.round == Some(round))
                .map(|n| (n.reason, n.detail.clone()))
                .collect();
            let inside = set.contains(&k);
            assert!(!inside || told.is_empty(), "{who} folded and told {told:?}\n{}", self.logs());
            assert!(
                inside || !told.is_empty(),
                "{who}'s update was neither folded nor refused: lost\n{}",
                self.logs()
            );
        }
        eprintln!("{fault:?}: round {round} folded {set:?} (record {:?})", record.applied);
        set
    }
}

/// Fencing events the nodes counted (a node that fenced itself restarted in-process, so its own
/// count starts again; its log says it fenced).
async fn fencing(cluster: &Cluster) -> (f64, usize) {
    let mut events = 0.0;
    for n in &cluster.nodes {
        let text = n.metrics(&cluster.client.connection().client).await;
        for line in text.lines().filter(|l| l.starts_with("shoal_fencing_events_total")) {
            events += line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        }
    }
    let fenced = cluster.nodes.iter().filter(|n| n.log().contains("fenced itself")).count();
    (events, fenced)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leaf_a_paused_top_and_a_nats_restart_apply_nothing_twice() {
    let mut cluster = Cluster::start("fencing").await;
    let started = Instant::now();
    let mut folded = Vec::new();
    let liveness = shoal_runtime::cluster::lease::Liveness::new(Duration::from_secs(3));
    for fault in [Fault::PauseLeaf, Fault::PauseTop, Fault::RestartNats] {
        folded.push(cluster.round_with(fault).await);
        // A node that fenced itself started again under the same process: all three serve.
        let deadline = Instant::now() + Duration::from_secs(20);
        while liveness.live_nodes(&infra_of(&cluster.client).await).await.map_or(0, |n| n.len()) < 3 {
            assert!(Instant::now() < deadline, "a node did not come back\n{}", cluster.logs());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let (events, fenced) = fencing(&cluster).await;
    // Both pauses outlast the fence window: each paused node stopped and started again.
    assert!(fenced >= 2, "{fenced} nodes logged that they fenced themselves\n{}", cluster.logs());
    eprintln!(
        "rounds folded {folded:?}; {fenced} node processes fenced themselves; {events} fencing events counted \
         by the live processes; {:.1} s; url {}",
        started.elapsed().as_secs_f64(),
        cluster.url
    );
}
