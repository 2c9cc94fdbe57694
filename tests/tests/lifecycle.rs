//! The everyday commands against a real node on a real nats-server (issue 16, findings 1–3):
//! - `shoal model get` writes exactly the committed object's bytes (read back through the
//!   object-store API, an independent path), for the latest and a given version, to a file and
//!   to stdout; a version not committed yet exits 75 ("not ready") and leaves no file;
//! - `shoal job status --json` and `shoal job list --json` parse, and report the open round's
//!   received/expected counts, its deadline, the serving node and the last outcome; a failed
//!   job exits 3;
//! - `shoal job cancel` stops a running job within one deadline: the top releases the job at
//!   once, no round opens or commits after it, the held update is refused, and a new update is
//!   refused as `job_not_running`;
//! - `shoal job delete` asks for confirmation, frees the id (models, KV keys, upload stream,
//!   claims), and a job created again under the same id (with another model) runs and commits
//!   with the same client;
//! - `shoal client --wait` says what it waits for.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(clippy::too_many_lines)] // a test reads as one scenario, top to bottom

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use shoal_client::jobs::top_holder;
use shoal_client::ShoalClient;
use shoal_functions::{DType, JobId, ModelManifest, ModelVersion, RoundId};
use shoal_proto::{JobPhase, RejectReason, RoundOutcome};
use shoal_runtime::jobs;
use shoal_testkit::*;

static CLUSTER: OnceLock<SharedCluster> = OnceLock::new();
const NODE: &str = "shared";

fn cluster() -> &'static SharedCluster {
    init_logging();
    SharedCluster::get(&CLUSTER, &["--ack-wait-ms", "3000"])
}

async fn client() -> ShoalClient {
    connect(&cluster().nats.url()).await
}

/// Runs `shoal <args> --nats-url <cluster>` with `stdin` as its input; (exit code, stdout,
/// stderr).
async fn shoal_with_stdin(args: &[&str], stdin: &[u8]) -> (i32, Vec<u8>, String) {
    use tokio::io::AsyncWriteExt as _;
    let mut child = tokio::process::Command::new(shoal_bin())
        .args(args)
        .args(["--nats-url", &cluster().nats.url()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).await.unwrap();
    drop(input);
    let out = child.wait_with_output().await.unwrap();
    (out.status.code().unwrap_or(-1), out.stdout, String::from_utf8_lossy(&out.stderr).into_owned())
}

async fn shoal(args: &[&str]) -> (i32, String, String) {
    let (code, out, err) = shoal_with_stdin(args, b"").await;
    (code, String::from_utf8_lossy(&out).into_owned(), err)
}

async fn json(args: &[&str]) -> serde_json::Value {
    let (code, out, err) = shoal(args).await;
    assert!(code == 0 || code == 3, "shoal {args:?} exited {code}:\n{out}\n{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("shoal {args:?} printed no JSON ({e}):\n{out}"))
}

async fn create(c: &ShoalClient, spec: &shoal_functions::JobSpec) {
    jobs::create_job(&infra_of(c).await, spec, None).await.unwrap();
}

/// A model of `n` f32 (one tensor).
fn model(n: usize) -> Arc<ModelManifest> {
    manifest(&[("w", DType::F32, &[n])])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_get_writes_the_committed_bytes() {
    let c = client().await;
    // 3 MiB: several 1 MiB chunks in the object store, so the chunked read is exercised.
    let m = model(3 << 18);
    let job = JobId::new("get").unwrap();
    create(&c, &job_spec("get", (*m).clone(), 2, 2, 60_000, 2)).await;
    let s1 = c.wait_for_open_round(&job, RoundId(1), Duration::from_secs(20)).await.unwrap();
    send_random(&c, &m, &job, "a", &s1, 1, 3).await;
    send_random(&c, &m, &job, "b", &s1, 2, 5).await;
    let after = c.wait_for_round_closed(&job, RoundId(1), Duration::from_secs(30)).await.unwrap();
    assert!(matches!(after.last_outcome, Some(RoundOutcome::Committed { .. })), "{after:?}");
    let infra = infra_of(&c).await;
    let committed = jobs::get_model_bytes(&infra, &job, ModelVersion(1)).await.unwrap();
    let initial = jobs::get_model_bytes(&infra, &job, ModelVersion(0)).await.unwrap();
    assert_ne!(committed, initial);

    let dir = tempfile::tempdir().unwrap();
    let latest = dir.path().join("latest.safetensors");
    let (code, out, err) = shoal(&["model", "get", "--job", "get", "-o", latest.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(std::fs::read(&latest).unwrap(), committed, "the latest version's bytes");
    assert!(out.contains("model version 1 of job get") && out.contains("sha256"), "{out}");
    let v0 = dir.path().join("v0.safetensors");
    let (code, ..) =
        shoal(&["model", "get", "--job", "get", "--version", "0", "-o", v0.to_str().unwrap()]).await;
    assert_eq!(code, 0);
    assert_eq!(std::fs::read(&v0).unwrap(), initial);
    let (code, stdout, _) =
        shoal_with_stdin(&["model", "get", "--job", "get", "--latest", "-o", "-"], b"").await;
    assert_eq!(code, 0);
    assert_eq!(stdout, committed, "to stdout");

    // Version 2 is not committed: exit 75, a typed message, no file.
    let v2 = dir.path().join("v2.safetensors");
    let (code, _, err) =
        shoal(&["model", "get", "--job", "get", "--version", "2", "-o", v2.to_str().unwrap()]).await;
    assert_eq!(code, 75, "{err}");
    assert!(err.contains("not committed yet") && err.contains("version 1"), "{err}");
    assert!(!v2.exists() && !dir.path().join("v2.safetensors.part").exists());
    // The SDK's error is typed too.
    let e = c.fetch_model(&job, ModelVersion(2)).await.unwrap_err();
    assert_eq!(e.kind(), shoal_client::ErrorKind::ModelNotReady, "{e}");
    // An unknown job is an error, not "not ready".
    let (code, _, err) = shoal(&["model", "get", "--job", "nope", "-o", v2.to_str().unwrap()]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("does not exist"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_list_print_json_with_the_open_round() {
    let c = client().await;
    let m = model(64);
    let job = JobId::new("stat").unwrap();
    create(&c, &job_spec("stat", (*m).clone(), 3, 2, 60_000, 5)).await;
    let s1 = c.wait_for_open_round(&job, RoundId(1), Duration::from_secs(20)).await.unwrap();
    send_random(&c, &m, &job, "a", &s1, 1, 3).await;
    // The node reports the update in its next progress message (every 500 ms).
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let v = json(&["job", "status", "stat", "--json"]).await;
        if v["received"] == 1 || Instant::now() > deadline {
            break v;
        }
    };
    assert_eq!(status["phase"], "running");
    assert_eq!(status["round"], 1);
    assert_eq!(status["round_open"], true);
    assert_eq!(status["received"], 1, "{status}");
    assert_eq!(status["expected"], 3);
    assert_eq!(status["min_clients"], 2);
    assert_eq!(status["model_version"], 0);
    assert_eq!(status["model_object"], "stat/0");
    assert_eq!(status["top"], NODE);
    assert_eq!(status["serving_nodes"], serde_json::json!([NODE]));
    assert_eq!(status["received_by_node"][NODE], 1);
    let deadline_at = status["deadline_at_ms"].as_u64().unwrap();
    assert_eq!(deadline_at, s1.deadline_at_ms);
    let left = status["deadline_in_ms"].as_i64().unwrap();
    assert!((0..=60_000).contains(&left), "{left}");
    assert!(status["deadline"].as_str().unwrap().ends_with('Z'));
    // The text form says the same.
    let (code, text, _) = shoal(&["job", "status", "stat"]).await;
    assert_eq!(code, 0);
    assert!(text.contains("1 of 3 updates") && text.contains(&format!("{NODE} (top)")), "{text}");

    // A job whose rounds fail ends failed: status exits 3 and says why.
    let failing = JobId::new("stat-fail").unwrap();
    let mut spec = job_spec("stat-fail", (*m).clone(), 2, 1, 300, 5);
    spec.max_failed_rounds = 1;
    create(&c, &spec).await;
    let end = c
        .wait_for_state(&failing, Duration::from_secs(20), "failure", |s| s.phase != JobPhase::Running)
        .await;
    assert!(matches!(&end, Ok(_) | Err(shoal_client::Error::JobEnded { .. })), "{end:?}");
    let (code, out, err) = shoal(&["job", "status", "stat-fail", "--json"]).await;
    assert_eq!(code, 3, "{out}\n{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["phase"], "failed");
    assert!(v["reason"].as_str().unwrap().contains("committed nothing"), "{v}");
    assert_eq!(v["last_outcome"]["outcome"], "quorum_not_met");
    assert!(err.contains("job stat-fail failed"), "{err}");

    // `job list --json`: both jobs, parsed.
    let list = json(&["job", "list", "--json"]).await;
    let rows = list.as_array().unwrap();
    let row =
        |id: &str| rows.iter().find(|r| r["job"] == id).unwrap_or_else(|| panic!("{id} not listed: {list}"));
    assert_eq!(row("stat")["phase"], "running");
    assert_eq!(row("stat")["round_open"], true);
    assert_eq!(row("stat")["rounds"], 5);
    assert_eq!(row("stat")["strategy"], "fedavg");
    assert_eq!(row("stat-fail")["phase"], "failed");
    let (code, text, _) = shoal(&["job", "list"]).await;
    assert_eq!(code, 0);
    assert!(text.lines().any(|l| l.starts_with("stat ") && l.contains("running")), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_job_within_one_deadline() {
    let c = client().await;
    let m = model(64);
    let job = JobId::new("cancel").unwrap();
    let deadline = Duration::from_secs(8);
    create(&c, &job_spec("cancel", (*m).clone(), 3, 1, deadline.as_millis() as u64, 5)).await;
    let s1 = c.wait_for_open_round(&job, RoundId(1), Duration::from_secs(20)).await.unwrap();
    let mut notices = rejections(&c.connection().client, "cancel").await;
    send_random(&c, &m, &job, "a", &s1, 1, 3).await;
    // Wait until the node holds it (it reports 1 received), so the cancel finds it staged.
    let until = Instant::now() + Duration::from_secs(10);
    while json(&["job", "status", "cancel", "--json"]).await["received"] != 1 {
        assert!(Instant::now() < until, "the update was never staged");
    }
    let infra = infra_of(&c).await;
    let stale = shoal_proto::config::Timings::default().lease_stale();
    assert!(top_holder(&infra, &job, stale).await.unwrap().is_some());

    let cancelled_at = Instant::now();
    let (code, out, err) = shoal(&["job", "cancel", "cancel", "--reason", "test"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("job cancel cancelled in round 1"), "{out}");
    // The top stops at once (it releases the job's top lease), well within one deadline.
    while top_holder(&infra, &job, stale).await.unwrap().is_some() {
        assert!(cancelled_at.elapsed() < deadline, "the top still serves the job after one deadline");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stopped = cancelled_at.elapsed();
    // The update it held for the open round is refused, and the work queue empties.
    let n = next_rejection(&mut notices).await;
    assert_eq!(n.reason, RejectReason::LateUpdate, "{n:?}");
    assert_stream_drains(&c, deadline).await;
    // A new update is refused as job_not_running.
    send_random(&c, &m, &job, "b", &s1, 2, 3).await;
    let n = next_rejection(&mut notices).await;
    assert_eq!(n.reason, RejectReason::JobNotRunning, "{n:?}");
    // Past the round's deadline: nothing committed, no round opened, still cancelled.
    tokio::time::sleep(deadline.saturating_sub(cancelled_at.elapsed()) + Duration::from_secs(1)).await;
    let state = c.job_state(&job).await.unwrap();
    assert_eq!(state.phase, JobPhase::Cancelled { reason: "test".into() });
    assert_eq!((state.round, state.model_version), (RoundId(1), ModelVersion(0)));
    assert!(c.fetch_model(&job, ModelVersion(1)).await.is_err(), "a model was committed after the cancel");
    // Cancelling again says so and changes nothing.
    let (code, out, _) = shoal(&["job", "cancel", "cancel"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("had already ended"), "{out}");
    eprintln!(
        "cancel: the top stopped {} ms after `shoal job cancel` (deadline {} s)",
        stopped.as_millis(),
        deadline.as_secs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_frees_the_id_and_the_job_can_be_created_again() {
    let c = client().await;
    let m = model(64);
    let job = JobId::new("reuse").unwrap();
    create(&c, &job_spec("reuse", (*m).clone(), 1, 1, 60_000, 3)).await;
    let s1 = c.wait_for_open_round(&job, RoundId(1), Duration::from_secs(20)).await.unwrap();
    send_random(&c, &m, &job, "a", &s1, 1, 3).await;
    c.wait_for_round_closed(&job, RoundId(1), Duration::from_secs(20)).await.unwrap();
    // Round 2 is open: client "a" is staged there, then the job is deleted while running.
    let s2 = c.wait_for_open_round(&job, RoundId(2), Duration::from_secs(20)).await.unwrap();
    let infra = infra_of(&c).await;
    assert!(infra
        .js
        .get_stream(shoal_proto::subjects::Subjects::default().uploads_stream(&job))
        .await
        .is_ok());

    // No confirmation, no deletion.
    let (code, _, err) = shoal_with_stdin(&["job", "delete", "reuse"], b"n\n").await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("Delete? [y/N]") && err.contains("not deleted"), "{err}");
    assert_eq!(c.job_state(&job).await.unwrap().phase, JobPhase::Running);
    // Confirmed on stdin: the running job is cancelled, then deleted.
    let (code, out, err) = shoal_with_stdin(&["job", "delete", "reuse"], b"y\n").await;
    assert_eq!(code, 0, "{err}");
    let out = String::from_utf8_lossy(&out);
    assert!(err.contains("job reuse cancelled") && out.contains("job reuse deleted"), "{out}\n{err}");
    assert!(out.contains("its upload stream"), "{out}");
    let e = c.job_state(&job).await.unwrap_err();
    assert_eq!(e.kind(), shoal_client::ErrorKind::UnknownJob);
    assert_eq!(c.job_spec(&job).await.unwrap_err().kind(), shoal_client::ErrorKind::UnknownJob);
    let mut objects = infra.models.list().await.unwrap();
    while let Some(o) = objects.next().await {
        let o = o.unwrap();
        assert!(o.deleted || !o.name.starts_with("reuse/"), "model object {} left", o.name);
    }
    assert!(infra
        .js
        .get_stream(shoal_proto::subjects::Subjects::default().uploads_stream(&job))
        .await
        .is_err());
    let claims = infra.claims(Duration::from_secs(600)).await.unwrap();
    let mut keys = claims.keys().await.unwrap();
    while let Some(k) = keys.next().await {
        assert!(!k.unwrap().starts_with("reuse."), "a claim of the deleted job is left");
    }
    assert_eq!(
        top_holder(&infra, &job, shoal_proto::config::Timings::default().lease_stale()).await.unwrap(),
        None
    );
    // Deleting it again: unknown.
    let (code, _, err) = shoal(&["job", "delete", "reuse", "--yes"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("does not exist"), "{err}");

    // The id is free: a new job under it, with another model, runs from round 1 and commits
    // client "a" again (its claim, the node's record of what it staged, and the old job's
    // closed rounds are gone).
    let m2 = model(32);
    create(&c, &job_spec("reuse", (*m2).clone(), 1, 1, 60_000, 1)).await;
    let n1 = c.wait_for_open_round(&job, RoundId(1), Duration::from_secs(20)).await.unwrap();
    assert_eq!((n1.round, n1.model_version), (RoundId(1), ModelVersion(0)));
    let sent = send_random(&c, &m2, &job, "a", &n1, 7, 2).await;
    let end = c.wait_for_round_closed(&job, RoundId(1), Duration::from_secs(20)).await.unwrap();
    assert_eq!(end.phase, JobPhase::Finished, "{end:?}");
    assert!(matches!(end.last_outcome, Some(RoundOutcome::Committed { clients: 1, .. })), "{end:?}");
    let bytes = c.fetch_model(&job, ModelVersion(1)).await.unwrap();
    let model = shoal_functions::Parameters::from_safetensors(Arc::clone(&m2), &bytes).unwrap();
    assert_eq!(model.tensor_f64(0), weighted_mean_oracle(&[sent])[0]);
    let _ = s2;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_wait_says_what_it_waits_for() {
    let c = client().await;
    let m = model(16);
    let job = JobId::new("waiting").unwrap();
    create(&c, &job_spec("waiting", (*m).clone(), 2, 1, 6000, 1)).await;
    c.wait_for_open_round(&job, RoundId(1), Duration::from_secs(20)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("u.safetensors");
    std::fs::write(&file, payload(&m, &as_sent(&m, &random_values(&m, 3)))).unwrap();
    let (code, out, err) = shoal(&[
        "client",
        "--job",
        "waiting",
        "--client-id",
        "w1",
        "--num-examples",
        "4",
        "--wait",
        "--update",
        file.to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("waiting for round 1 of job waiting to close (deadline in"), "{err}");
    assert!(out.contains("round 1 closed: committed model version 1"), "{out}");
    assert!(!err.contains(" INFO "), "connection INFO lines on stderr:\n{err}");
}
