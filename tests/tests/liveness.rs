//! Liveness (bug-cases.md rows 20–23; row 25 is `async_rounds.rs`
//! `fedbuff_flushes_a_buffer_that_never_fills_after_max_wait`): nothing waits forever.
//! - A selected client that never reports: the round closes at its deadline with the others
//!   (quorum met) or fails with `QuorumNotMet` (quorum not met); the previous model stands.
//! - Every client dies: the rounds fail at their deadlines, the job ends `Failed` after
//!   `max_failed_rounds`, a waiting client is told so at once, and the node releases the job's
//!   aggregators and shared memory.
//! - A client that reconnects after its round closed is told `late_update` for that round, is
//!   counted, and takes part in the next round.
//! - Every round event is dropped (the server refuses the node's publishes to the job's round
//!   subject): clients still follow the rounds by polling the job state, and the job finishes.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use shoal_client::auth::NatsAuth;
use shoal_client::connect::ConnectOptions;
use shoal_client::Error;
use shoal_client::ShoalClient;
use shoal_functions::{ClientId, DType, JobId, ModelManifest, ModelVersion, Parameters, RoundId};
use shoal_proto::JobPhase;
use shoal_proto::RoundOutcome;
use shoal_runtime::clock::now_ms;
use shoal_runtime::metrics::scrape;
use shoal_runtime::{jobs, RejectReason};
use shoal_testkit::*;

const NODE_ARGS: &[&str] = &["--ack-wait-ms", "3000", "--idle-timeout-ms", "1000"];

fn manifest() -> Arc<ModelManifest> {
    shoal_testkit::manifest(&[("w", DType::F32, &[64])])
}

async fn connect(url: &str) -> ShoalClient {
    ShoalClient::connect(&ConnectOptions { url: url.into(), ..Default::default() }).await.unwrap()
}

async fn assert_model(c: &ShoalClient, job: &JobId, version: u64, sent: &[(Vec<Vec<f64>>, f64)]) {
    let bytes = c.fetch_model(job, ModelVersion(version)).await.unwrap();
    let model = Parameters::from_safetensors(manifest(), &bytes).unwrap();
    let oracle = weighted_mean_oracle(sent);
    for (e, (g, o)) in model.tensor_f64(0).iter().zip(&oracle[0]).enumerate() {
        assert!((g - o).abs() <= 1e-6 * o.abs().max(1e-3), "v{version}[{e}]: committed {g}, oracle {o}");
    }
}

/// Row 20: five clients are selected and one never publishes. With a quorum of four the round
/// commits the four at its deadline (not before: the cohort never completes); with a quorum of
/// five it fails with `QuorumNotMet { accepted: 4, min_clients: 5 }` and version 0 stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_selected_client_that_never_reports_closes_the_round_at_its_deadline() {
    init_logging();
    let nats = NatsServer::start().unwrap();
    let node = NodeProcess::start(&nats.url(), "l1", NODE_ARGS).await;
    let c = connect(&nats.url()).await;
    let m = manifest();
    for (name, min) in [("quorum4", 4u32), ("quorum5", 5)] {
        let job = JobId::new(name).unwrap();
        jobs::create_job(
            &shoal_testkit::infra_of(&c).await,
            &job_spec(name, (*m).clone(), 5, min, 2000, 1),
            None,
        )
        .await
        .unwrap();
        let open = c.wait_for_open_round(&job, RoundId(1), Duration::from_secs(20)).await.unwrap();
        let mut sent = Vec::new();
        for (i, who) in ["c1", "c2", "c3", "c4"].iter().enumerate() {
            sent.push(send_random(&c, &manifest(), &job, who, &open, 10 + i as u64, 3 + i as u64).await);
        }
        // c5 never publishes.
        let after = c.wait_for_round_closed(&job, RoundId(1), Duration::from_secs(30)).await.unwrap();
        let closed_at = now_ms();
        assert!(closed_at >= open.deadline_at_ms, "closed before the deadline without the full cohort");
        assert!(
            closed_at < open.deadline_at_ms + 10_000,
            "closed {} ms after the deadline",
            closed_at - open.deadline_at_ms
        );
        if min == 4 {
            assert_eq!(
                after.last_outcome,
                Some(RoundOutcome::Committed {
                    version: ModelVersion(1),
                    clients: 4,
                    total_weight: 3.0 + 4.0 + 5.0 + 6.0
                })
            );
            assert_eq!(after.phase, JobPhase::Finished);
            assert_model(&c, &job, 1, &sent).await;
        } else {
            assert_eq!(after.last_outcome, Some(RoundOutcome::QuorumNotMet { accepted: 4, min_clients: 5 }));
            assert_eq!(after.model_version, ModelVersion(0), "the previous model stands");
            assert!(c.fetch_model(&job, ModelVersion(1)).await.is_err(), "no version 1 was written");
        }
    }
    let text = node.metrics(&c.connection().client).await;
    assert_eq!(
        scrape(&text, "shoal_rounds_total{job=\"quorum4\",outcome=\"committed\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        scrape(&text, "shoal_rounds_total{job=\"quorum5\",outcome=\"quorum_not_met\"}"),
        Some(1.0),
        "{text}"
    );
}

/// Row 21: after round 1 commits, every client dies. Rounds 2, 3 and 4 fail at their 800 ms
/// deadlines with `QuorumNotMet { accepted: 0, min_clients: 2 }`; the job ends `Failed` at
/// round 4 with version 1 (3 = `max_failed_rounds` failures in a row). A client still waiting
/// for round 5 is told the job ended; the node stops the job's top, its aggregators and unmaps
/// its shared memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_client_dies_the_job_fails_and_releases_its_resources() {
    init_logging();
    let nats = NatsServer::start().unwrap();
    let node = NodeProcess::start(&nats.url(), "l2", NODE_ARGS).await;
    let admin = connect(&nats.url()).await;
    let m = manifest();
    let job = JobId::new("zombie").unwrap();
    let mut spec = job_spec("zombie", (*m).clone(), 3, 2, 800, 10);
    spec.max_failed_rounds = 3;
    jobs::create_job(&shoal_testkit::infra_of(&admin).await, &spec, None).await.unwrap();
    let started = Instant::now();
    {
        // Three clients, each with its own connection; they report in round 1, then die.
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(connect(&nats.url()).await);
        }
        let open = clients[0].wait_for_open_round(&job, RoundId(1), Duration::from_secs(20)).await.unwrap();
        let mut sent = Vec::new();
        for (i, c) in clients.iter().enumerate() {
            sent.push(send_random(c, &manifest(), &job, &format!("z{i}"), &open, 30 + i as u64, 7).await);
        }
        let after =
            clients[0].wait_for_round_closed(&job, RoundId(1), Duration::from_secs(20)).await.unwrap();
        assert!(matches!(after.last_outcome, Some(RoundOutcome::Committed { clients: 3, .. })), "{after:?}");
        assert_model(&admin, &job, 1, &sent).await;
        clients[0].wait_for_open_round(&job, RoundId(2), Duration::from_secs(20)).await.unwrap();
    } // every client's connection drops here, mid-round 2
    let waiting = admin.wait_for_open_round(&job, RoundId(5), Duration::from_secs(60)).await;
    assert!(matches!(waiting, Err(Error::JobEnded { .. })), "{waiting:?}");
    let end = admin.job_state(&job).await.unwrap();
    assert!(matches!(end.phase, JobPhase::Failed { .. }), "{end:?}");
    assert_eq!((end.round, end.model_version, end.failed_rounds_in_a_row), (RoundId(4), ModelVersion(1), 3));
    assert_eq!(end.last_outcome, Some(RoundOutcome::QuorumNotMet { accepted: 0, min_clients: 2 }));
    let took = started.elapsed();
    assert!(took < Duration::from_secs(30), "the job took {took:?} to fail");
    // Resources: no top, no leaf aggregator (idle timeout 1 s), no shared-memory segment.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = node.metrics(&admin.connection().client).await;
        let top = scrape(&text, "shoal_aggregators{tier=\"top\"}");
        let leaf = scrape(&text, "shoal_aggregators{tier=\"leaf\"}");
        let segments = std::fs::read_dir(node.shm_dir()).map(|d| d.count()).unwrap_or(0);
        if top == Some(0.0) && leaf == Some(0.0) && segments == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "resources held after the job failed: top {top:?}, leaf {leaf:?}, {segments} segments"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("the job failed {:.1} s after it was created; resources released", took.as_secs_f64());
}

/// Row 22: client `slow` reads round 1, loses its connection while it trains, and reconnects
/// after round 1 closed (the others committed it). Its update for round 1 is refused as
/// `late_update` naming round 1, counted once in the node's metrics; it then trains on version
/// 1 and its round-2 update commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reconnecting_after_its_round_closed_is_told_late_update() {
    init_logging();
    let nats = NatsServer::start().unwrap();
    let node = NodeProcess::start(&nats.url(), "l3", NODE_ARGS).await;
    let fast = connect(&nats.url()).await;
    let m = manifest();
    let job = JobId::new("reconnect").unwrap();
    jobs::create_job(
        &shoal_testkit::infra_of(&fast).await,
        &job_spec("reconnect", (*m).clone(), 2, 2, 60_000, 2),
        None,
    )
    .await
    .unwrap();
    let round1 = {
        let slow = connect(&nats.url()).await;
        slow.wait_for_open_round(&job, RoundId(1), Duration::from_secs(20)).await.unwrap()
    }; // the slow client's connection is gone while it trains
    let sent1 = vec![
        send_random(&fast, &manifest(), &job, "a", &round1, 41, 5).await,
        send_random(&fast, &manifest(), &job, "b", &round1, 42, 9).await,
    ];
    let after1 = fast.wait_for_round_closed(&job, RoundId(1), Duration::from_secs(20)).await.unwrap();
    assert!(matches!(after1.last_outcome, Some(RoundOutcome::Committed { clients: 2, .. })), "{after1:?}");
    assert_model(&fast, &job, 1, &sent1).await;

    // The slow client reconnects and delivers its round-1 update.
    let slow = connect(&nats.url()).await;
    let me = ClientId::new("slow").unwrap();
    let mut notices = slow.rejections(&job, &me).await.unwrap();
    send_random(&slow, &manifest(), &job, "slow", &round1, 43, 7).await;
    // (Not `wait_for_outcome`: the round has closed already, so its state would race the
    // notice.)
    let m1 = tokio::time::timeout(Duration::from_secs(15), notices.next()).await;
    let notice: shoal_proto::RejectNotice = match m1 {
        Ok(Some(m)) => shoal_proto::decode("notice", &m.payload).unwrap(),
        other => panic!("no late_update notice: {other:?}\n{}", node.log()),
    };
    assert_eq!((notice.reason, notice.round), (RejectReason::LateUpdate, Some(RoundId(1))), "{notice:?}");
    let text = node.metrics(&slow.connection().client).await;
    assert_eq!(scrape(&text, "shoal_updates_rejected_total{reason=\"late_update\"}"), Some(1.0), "{text}");

    // It trains on version 1 and takes part in round 2.
    let round2 = slow.wait_for_open_round(&job, RoundId(2), Duration::from_secs(20)).await.unwrap();
    assert_eq!(round2.model_version, ModelVersion(1));
    let sent2 = vec![
        send_random(&slow, &manifest(), &job, "slow", &round2, 44, 7).await,
        send_random(&fast, &manifest(), &job, "a", &round2, 45, 5).await,
    ];
    let after2 =
        slow.wait_for_outcome(&job, RoundId(2), &mut notices, Duration::from_secs(20)).await.unwrap();
    assert!(matches!(after2.last_outcome, Some(RoundOutcome::Committed { clients: 2, .. })), "{after2:?}");
    assert_model(&fast, &job, 2, &sent2).await;
}

/// Row 23: nats-server refuses the node's publishes to `shoal.lost.round`, so every
/// `round_opened`, `round_closed` and `job_ended` event of the job is lost. The clients follow
/// the three rounds by polling the job state (the SDK reads it at least every
/// `client::STATE_POLL`), and every model equals the oracle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_resync_by_polling_when_every_round_event_is_dropped() {
    init_logging();
    let authorization = r#"authorization {
  users = [
    { user: "node", password: "node-pw", permissions: { publish: { allow: [">"], deny: ["shoal.lost.round"] }, subscribe: { allow: [">"] } } }
    { user: "admin", password: "admin-pw" }
  ]
}"#;
    let nats = NatsServer::start_with(NatsOptions {
        authorization: Some(authorization.into()),
        ..Default::default()
    })
    .unwrap();
    let admin_opts = ConnectOptions {
        url: nats.url(),
        auth: NatsAuth::user_password("admin", "admin-pw"),
        ..Default::default()
    };
    let node = NodeProcess::start_with(
        &nats.url(),
        "l4",
        NODE_ARGS,
        &[("SHOAL_NATS_USER", "node"), ("SHOAL_NATS_PASSWORD", "node-pw")],
        Some(admin_opts.clone()),
    )
    .await;
    let c = ShoalClient::connect(&admin_opts).await.unwrap();
    let mut events = c.connection().client.subscribe("shoal.lost.round").await.unwrap();
    c.connection().client.flush().await.unwrap();
    let m = manifest();
    let job = JobId::new("lost").unwrap();
    jobs::create_job(
        &shoal_testkit::infra_of(&c).await,
        &job_spec("lost", (*m).clone(), 2, 2, 60_000, 3),
        None,
    )
    .await
    .unwrap();
    for round in 1..=3u64 {
        let open = c.wait_for_open_round(&job, RoundId(round), Duration::from_secs(20)).await.unwrap();
        assert_eq!(open.model_version, ModelVersion(round - 1));
        let sent = vec![
            send_random(&c, &manifest(), &job, "p", &open, 60 + round, 2).await,
            send_random(&c, &manifest(), &job, "q", &open, 70 + round, 6).await,
        ];
        let after = c
            .wait_for_round_closed(&job, RoundId(round), Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", node.log()));
        assert_eq!(
            after.last_outcome,
            Some(RoundOutcome::Committed { version: ModelVersion(round), clients: 2, total_weight: 8.0 })
        );
        assert_model(&c, &job, round, &sent).await;
    }
    assert_eq!(c.job_state(&job).await.unwrap().phase, JobPhase::Finished);
    // The events really were dropped: none reached a subscriber.
    let got = tokio::time::timeout(Duration::from_millis(500), events.next()).await;
    assert!(got.is_err(), "a round event got through: {got:?}");
    assert!(
        node.log().contains("Permissions Violation for Publish to \"shoal.lost.round\""),
        "{}",
        node.log()
    );
}

/// Nodes (and tools) started at the same moment against a fresh server all come up: stream and
/// bucket creation tolerates a concurrent creator, also one whose config differs (here: each
/// process asks for a different duplicate window, so JetStream refuses every create but the
/// first) — the losers open the stream the winner created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_starting_together_all_provision_or_open_the_same_streams() {
    init_logging();
    for trial in 0..4 {
        let nats = NatsServer::start().unwrap();
        let url = nats.url();
        let starts = (0..6u64).map(|i| {
            let url = url.clone();
            async move {
                let opts = shoal_client::ConnectOptions {
                    url,
                    duplicate_window: Duration::from_secs(60 * (i + 1)),
                    ..Default::default()
                };
                let infra = shoal_client::Infra::connect(&opts).await?;
                infra.claims(Duration::from_secs(3600)).await.map(|_| ())
            }
        });
        for (i, r) in futures::future::join_all(starts).await.into_iter().enumerate() {
            assert!(r.is_ok(), "trial {trial}: process {i} failed to start: {:?}", r.err());
        }
    }
}
