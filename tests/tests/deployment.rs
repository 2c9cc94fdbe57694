//! How a deployment sits in NATS (issue 16, findings 5, 8 and 9):
//! - `--prefix` names every stream, bucket, consumer and subject: two deployments with
//!   different prefixes on one nats-server run a job of the same id side by side, each
//!   committing only its own clients' updates, and the CLI reaches each through its prefix;
//! - `--js-replicas 3` on a three-server JetStream cluster gives every stream and bucket three
//!   replicas (and a job's upload stream too), and a round commits; on a single server it is
//!   refused with a clear error;
//! - the gateway consumer's `max_ack_pending` is checked at job creation (and a node's flag
//!   updates an existing consumer);
//! - pulls are sized by bytes: 1 MiB inline updates with `--pull-batch 64` against a server
//!   whose `max_pending` is 8 MiB commit without the server cutting the node off; with pulls
//!   larger than `max_pending` it does, and `shoal_nats_disconnects_total` counts it.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(clippy::too_many_lines)] // a test reads as one scenario, top to bottom

use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_client::connect::ConnectOptions;
use shoal_client::ShoalClient;
use shoal_functions::{DType, JobId, ModelManifest, ModelVersion, Parameters, RoundId};
use shoal_proto::subjects::Subjects;
use shoal_proto::RoundOutcome;
use shoal_runtime::jobs;
use shoal_runtime::metrics::scrape;
use shoal_testkit::*;

async fn client_with_prefix(url: &str, prefix: &str) -> ShoalClient {
    ShoalClient::connect(&ConnectOptions { url: url.into(), prefix: prefix.into(), ..Default::default() })
        .await
        .unwrap()
}

async fn commit_one_round(
    c: &ShoalClient,
    m: &Arc<ModelManifest>,
    job: &JobId,
    who: &str,
    seed: u64,
) -> Vec<f64> {
    let s = c.wait_for_open_round(job, RoundId(1), Duration::from_secs(30)).await.unwrap();
    let (values, _) = send_random(c, m, job, who, &s, seed, 2).await;
    let after = c.wait_for_round_closed(job, RoundId(1), Duration::from_secs(30)).await.unwrap();
    assert!(matches!(after.last_outcome, Some(RoundOutcome::Committed { clients: 1, .. })), "{after:?}");
    let bytes = c.fetch_model(job, ModelVersion(1)).await.unwrap();
    let model = Parameters::from_safetensors(Arc::clone(m), &bytes).unwrap();
    assert_eq!(model.tensor_f64(0), values[0], "the job committed its own client's update");
    model.tensor_f64(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_prefixes_are_two_deployments_on_one_server() {
    init_logging();
    let nats = NatsServer::start().unwrap();
    let url = nats.url();
    let _default = NodeProcess::start(&url, "d1", &[]).await;
    let _other = NodeProcess::start(&url, "o1", &["--prefix", "other"]).await;
    let (cd, co) = (client_with_prefix(&url, "shoal").await, client_with_prefix(&url, "other").await);
    // Each deployment's resources exist under its own names.
    let js = &cd.connection().js;
    for stream in ["SHOAL_UPDATES", "OTHER_UPDATES", "KV_shoal-jobs", "KV_other-jobs", "OBJ_other-models"] {
        assert!(js.get_stream(stream).await.is_ok(), "stream {stream} missing");
    }
    // The same job id, with different models, in both.
    let (md, mo) = (manifest(&[("w", DType::F32, &[8])]), manifest(&[("w", DType::F32, &[5])]));
    let job = JobId::new("same").unwrap();
    jobs::create_job(&infra_of(&cd).await, &job_spec("same", (*md).clone(), 1, 1, 30_000, 1), None)
        .await
        .unwrap();
    jobs::create_job(&infra_of(&co).await, &job_spec("same", (*mo).clone(), 1, 1, 30_000, 1), None)
        .await
        .unwrap();
    let other_uploads = Subjects::new("other").uploads_stream(&job);
    assert_eq!(other_uploads, "OTHER_UPLOADS_same");
    assert!(js.get_stream(&other_uploads).await.is_ok() && js.get_stream("UPLOADS_same").await.is_ok());
    commit_one_round(&cd, &md, &job, "a", 1).await;
    commit_one_round(&co, &mo, &job, "a", 2).await;

    // The CLI reaches each deployment through its prefix.
    let out = |args: &[&str]| {
        let o =
            std::process::Command::new(shoal_bin()).args(args).args(["--nats-url", &url]).output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, text, err) = out(&["job", "status", "same", "--prefix", "other", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!((v["phase"].as_str(), v["models_bucket"].as_str()), (Some("finished"), Some("other-models")));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.safetensors");
    let (code, _, err) =
        out(&["model", "get", "--job", "same", "--prefix", "other", "-o", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), co.fetch_model(&job, ModelVersion(1)).await.unwrap());
    let (code, _, err) = out(&["job", "list", "--prefix", "Other"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("lower case"), "{err}");
    // The permissions a client of the other deployment gets name its buckets.
    let p = shoal_proto::permissions::client_permissions(
        "other",
        &job,
        &shoal_functions::ClientId::new("a").unwrap(),
    );
    assert!(p.publish.contains(&"$JS.API.DIRECT.GET.KV_other-jobs.$KV.other-jobs.same.state".to_string()));
    assert!(p.publish.contains(&"$JS.API.DIRECT.GET.OBJ_other-models".to_string()));
}

/// Free TCP ports on loopback (bound, then released).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    listeners.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_a_jetstream_cluster() {
    init_logging();
    // A single server holds one replica: asking for three is refused at start, clearly.
    let single = NatsServer::start().unwrap();
    let shm = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(shoal_bin())
        .args(["node", "--nats-url", &single.url(), "--js-replicas", "3", "--shm-dir"])
        .arg(shm.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("3 replica(s)") && err.contains("--js-replicas"), "{err}");
    drop(single);

    // Three servers in one JetStream cluster.
    let routes = free_ports(3);
    let route_list =
        routes.iter().map(|p| format!("nats-route://127.0.0.1:{p}")).collect::<Vec<_>>().join(", ");
    let servers: Vec<NatsServer> = (0..3)
        .map(|i| {
            let conf = format!(
                "server_name: r{i}\ncluster {{\n  name: shoal-r3\n  listen: 127.0.0.1:{}\n  routes: [{route_list}]\n}}\n",
                routes[i]
            );
            NatsServer::start_with(NatsOptions { extra_config: Some(conf), ..Default::default() }).unwrap()
        })
        .collect();
    let url = servers[0].url();
    // JetStream needs a meta leader before anything can be created.
    let probe = async_nats::connect(&url).await.unwrap();
    let js = async_nats::jetstream::new(probe);
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = js
            .get_or_create_stream(async_nats::jetstream::stream::Config {
                name: "PROBE".into(),
                subjects: vec!["probe.>".into()],
                num_replicas: 3,
                ..Default::default()
            })
            .await
            .is_ok();
        if ok {
            break;
        }
        assert!(Instant::now() < until, "the JetStream cluster did not form:\n{}", servers[0].log());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let _node = NodeProcess::start(&url, "r-node", &["--js-replicas", "3"]).await;
    let c = connect(&url).await;
    let m = manifest(&[("w", DType::F32, &[8])]);
    let job = JobId::new("r3").unwrap();
    jobs::create_job(&infra_of(&c).await, &job_spec("r3", (*m).clone(), 1, 1, 30_000, 1), None)
        .await
        .unwrap();
    commit_one_round(&c, &m, &job, "a", 3).await;
    for stream in [
        "SHOAL_UPDATES",
        "KV_shoal-jobs",
        "OBJ_shoal-models",
        "OBJ_shoal-updates",
        "KV_shoal-claims",
        "UPLOADS_r3",
    ] {
        let mut s = js.get_stream(stream).await.unwrap_or_else(|e| panic!("{stream}: {e}"));
        let info = s.info().await.unwrap();
        assert_eq!(info.config.num_replicas, 3, "{stream}");
        let cluster = info.cluster.as_ref().unwrap();
        assert_eq!(cluster.replicas.len() + 1, 3, "{stream}: a leader and two replicas");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_ack_pending_is_checked_at_job_creation() {
    init_logging();
    let nats = NatsServer::start().unwrap();
    let mut node =
        NodeProcess::start(&nats.url(), "ack", &["--max-ack-pending", "5", "--pull-batch", "5"]).await;
    let c = connect(&nats.url()).await;
    let infra = infra_of(&c).await;
    let consumer = || async {
        infra
            .updates
            .consumer_info(Subjects::default().gateway_consumer())
            .await
            .unwrap()
            .config
            .max_ack_pending
    };
    assert_eq!(consumer().await, 5);
    let m = manifest(&[("w", DType::F32, &[8])]);
    let e = jobs::create_job(&infra, &job_spec("big-round", (*m).clone(), 6, 6, 30_000, 1), None)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), shoal_client::ErrorKind::Spec);
    let text = e.to_string();
    assert!(
        text.contains("takes 6 updates") && text.contains("allows 5") && text.contains("--max-ack-pending"),
        "{text}"
    );
    assert!(c.job_state(&JobId::new("big-round").unwrap()).await.is_err(), "nothing was created");
    jobs::create_job(&infra, &job_spec("fits", (*m).clone(), 5, 5, 30_000, 1), None).await.unwrap();
    // A node started with another value brings the shared consumer to it.
    node.kill();
    let _node = NodeProcess::start(&nats.url(), "ack2", &["--max-ack-pending", "50"]).await;
    assert_eq!(consumer().await, 50);
    jobs::create_job(&infra, &job_spec("big-round", (*m).clone(), 6, 6, 30_000, 1), None).await.unwrap();
}

/// nats-server with 2 MiB messages and an 8 MiB `max_pending` per connection.
fn tight_server() -> NatsServer {
    NatsServer::start_with(NatsOptions {
        max_payload: Some(2 << 20),
        extra_config: Some("max_pending: 8MB\n".into()),
        ..Default::default()
    })
    .unwrap()
}

/// Publishes `n` updates of 1 MiB while the node is paused (SIGSTOP), then resumes it: the
/// node's outstanding pull request is filled at once while it cannot read, as when it falls
/// behind a burst.
async fn burst_into_a_paused_node(
    c: &ShoalClient,
    node: &NodeProcess,
    m: &Arc<ModelManifest>,
    job: &JobId,
    s: &shoal_proto::JobState,
    n: u32,
) {
    let pid = node.pid().unwrap() as libc::pid_t;
    // SAFETY: kill(2) with a pid this test spawned and valid signal numbers; no memory involved.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, libc::SIGSTOP)
    };
    for i in 0..n {
        send_random(c, m, job, &format!("c{i}"), s, u64::from(i), 1).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // SAFETY: as above.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, libc::SIGCONT)
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_are_sized_by_bytes_and_server_cut_offs_are_counted() {
    init_logging();
    let m = manifest(&[("w", DType::F32, &[1 << 18])]); // 1 MiB, inline
    let n = 40;
    // 64 updates per pull would be 64 MiB: the byte size (2 MiB) keeps it under max_pending.
    let nats = tight_server();
    let node = NodeProcess::start(&nats.url(), "bytes", &["--pull-batch", "64", "--pull-max-mib", "2"]).await;
    let c = connect(&nats.url()).await;
    let job = JobId::new("inline").unwrap();
    jobs::create_job(&infra_of(&c).await, &job_spec("inline", (*m).clone(), n, n, 60_000, 1), None)
        .await
        .unwrap();
    let s = c.wait_for_open_round(&job, RoundId(1), Duration::from_secs(20)).await.unwrap();
    burst_into_a_paused_node(&c, &node, &m, &job, &s, n).await;
    let after = c.wait_for_round_closed(&job, RoundId(1), Duration::from_secs(60)).await.unwrap();
    assert!(
        matches!(after.last_outcome, Some(RoundOutcome::Committed { clients, .. }) if clients == n),
        "{after:?}"
    );
    let metrics = node.metrics(&c.connection().client).await;
    assert_eq!(scrape(&metrics, "shoal_nats_disconnects_total"), Some(0.0), "{metrics}");
    assert!(!nats.log().contains("Slow Consumer"), "{}", nats.log());
    drop(node);
    drop(nats);

    // Pulls of 64 MiB against the same server: it cuts the node off, and the node counts it.
    let nats = tight_server();
    let node = NodeProcess::start(
        &nats.url(),
        "greedy",
        &["--pull-batch", "64", "--pull-max-mib", "64", "--ack-wait-ms", "2000"],
    )
    .await;
    let c = connect(&nats.url()).await;
    jobs::create_job(&infra_of(&c).await, &job_spec("inline", (*m).clone(), n, n, 60_000, 1), None)
        .await
        .unwrap();
    let s = c.wait_for_open_round(&job, RoundId(1), Duration::from_secs(20)).await.unwrap();
    burst_into_a_paused_node(&c, &node, &m, &job, &s, n).await;
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        // While the server has cut the node off, its metrics do not answer: ask again.
        let subject = format!("shoal.node.{}.metrics", node.node_id);
        let reply =
            tokio::time::timeout(Duration::from_secs(2), c.connection().client.request(subject, "".into()))
                .await;
        let metrics = match reply {
            Ok(Ok(m)) => String::from_utf8_lossy(&m.payload).into_owned(),
            _ => String::new(),
        };
        let cut = scrape(&metrics, "shoal_nats_disconnects_total").unwrap_or(0.0);
        if cut >= 1.0 {
            assert!(nats.log().contains("Slow Consumer Detected"), "{}", nats.log());
            eprintln!("64 MiB pulls against an 8 MiB max_pending: {cut} disconnects counted");
            break;
        }
        assert!(Instant::now() < until, "no disconnect counted\n{metrics}\n{}", nats.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
