//! Validation at the edge (issue 16, findings 4 and 10):
//! - nonsensical `shoal node` flags (`--shm-budget-mib 0`, `--pull-batch 0`, `--ack-wait-ms 0`,
//!   ...) end the command at once with an error naming the flag;
//! - a job spec with a zero-sized tensor dimension is refused by `shoal job create`;
//! - the shared-memory budget is a real cap: a model larger than the budget is refused when the
//!   job starts (its state becomes `failed`, naming the budget) and nothing is mapped; a
//!   whole-cohort round that cannot fit in the budget is refused the same way, while one that
//!   fits runs.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::{Duration, Instant};

use shoal_functions::{DType, JobId, StrategySpec};
use shoal_proto::JobPhase;
use shoal_runtime::jobs;
use shoal_testkit::*;

/// Runs `shoal <args>` to completion; (success, stdout, stderr).
fn shoal(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(shoal_bin()).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn nonsensical_node_flags_are_refused_naming_the_flag() {
    let shm = tempfile::tempdir().unwrap();
    let dir = shm.path().display().to_string();
    // No nats-server runs at this URL: the flags are refused before connecting.
    let base = ["node", "--nats-url", "nats://127.0.0.1:1", "--shm-dir", dir.as_str()];
    for (flag, value, says) in [
        ("--shm-budget-mib", "0", "at least 1 MiB"),
        ("--pull-batch", "0", "at least 1"),
        ("--ack-wait-ms", "0", "below the minimum of 300 ms"),
        ("--ack-wait-ms", "299", "below the minimum"),
        ("--collect-timeout-ms", "5", "below the minimum of 100 ms"),
        ("--idle-timeout-ms", "0", "between 1 and"),
        ("--max-ack-pending", "0", "at least 1"),
        ("--pull-max-mib", "0", "between 1 and 1024"),
        ("--js-replicas", "0", "between 1 and 5"),
        ("--models-max-mib", "0", "at least 1 MiB"),
        ("--prefix", "a.b", "one subject token"),
        ("--prefix", "Other", "lower case"),
    ] {
        let mut args = base.to_vec();
        args.extend([flag, value]);
        let started = Instant::now();
        let (ok, _, err) = shoal(&args);
        assert!(!ok, "{flag} {value} accepted");
        assert!(err.contains(&format!("invalid flag {flag}")) && err.contains(says), "{flag} {value}: {err}");
        assert!(started.elapsed() < Duration::from_secs(5), "{flag} {value}: refused only after connecting");
    }
    // clap refuses what is not a number at all, and --max-jobs 0.
    let mut args = base.to_vec();
    args.extend(["--max-jobs", "0"]);
    assert!(!shoal(&args).0);
    let mut args = base.to_vec();
    args.extend(["--shm-budget-mib", "-1"]);
    assert!(!shoal(&args).0);
}

#[test]
fn a_zero_sized_dimension_is_refused_at_job_creation() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("job.json");
    std::fs::write(
        &spec,
        r#"{"job": "zero", "manifest": {"tensors": [
            {"name": "fc.weight", "dtype": "F32", "shape": [10, 0]},
            {"name": "fc.bias", "dtype": "F32", "shape": [10]}]},
          "strategy": {"name": "fedavg", "server_learning_rate": 1.0},
          "round_policy": {"mode": "sync", "cohort_size": 2, "min_clients": 2, "deadline_ms": 60000},
          "rounds": 1}"#,
    )
    .unwrap();
    let path = spec.display().to_string();
    let (ok, _, err) = shoal(&["job", "create", "--nats-url", "nats://127.0.0.1:1", "--spec", &path]);
    assert!(!ok);
    assert!(err.contains("\"fc.weight\"") && err.contains("dimension 1 is 0"), "{err}");
}

/// Waits until `job` is no longer running; returns its phase.
async fn ended(client: &shoal_client::ShoalClient, job: &JobId) -> JobPhase {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let state = client.job_state(job).await.unwrap();
        if state.phase != JobPhase::Running {
            return state.phase;
        }
        assert!(Instant::now() < deadline, "job {job} still running: {state:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn segments(node: &NodeProcess) -> usize {
    std::fs::read_dir(node.shm_dir())
        .map(|d| {
            d.filter(|e| e.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == "seg"))).count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_memory_budget_is_a_real_cap() {
    init_logging();
    let nats = NatsServer::start().unwrap();
    let node = NodeProcess::start(&nats.url(), "budget", &["--shm-budget-mib", "4"]).await;
    let client = connect(&nats.url()).await;
    let infra = infra_of(&client).await;

    // A 16 MiB model (4M f32) on a 4 MiB budget: refused at start, naming the budget.
    let big = manifest(&[("w", DType::F32, &[4 << 20])]);
    let job = JobId::new("too-big").unwrap();
    jobs::create_job(&infra, &job_spec("too-big", (*big).clone(), 2, 2, 60_000, 1), None).await.unwrap();
    let JobPhase::Failed { reason } = ended(&client, &job).await else { panic!("not failed") };
    assert!(
        reason.contains("--shm-budget-mib") && reason.contains("4.0 MiB") && reason.contains("holds 0"),
        "{reason}"
    );
    // An update sent anyway is refused, and nothing was ever mapped for it.
    let state = client.job_state(&job).await.unwrap();
    let m = big.clone();
    let e = client
        .publish_update(shoal_client::UpdateRequest {
            job: job.clone(),
            client: shoal_functions::ClientId::new("c1").unwrap(),
            round: state.round,
            base_version: state.model_version,
            num_examples: 1,
            kind: shoal_functions::UpdateKind::Parameters,
            payload: payload(&m, &random_values(&m, 1)),
            force_upload: false,
        })
        .await;
    assert!(e.is_ok(), "the SDK publishes; the node refuses: {e:?}");
    assert_eq!(segments(&node), 0, "a segment was mapped for a job over the budget");

    // Median over a cohort of 5 updates of 1 MiB needs 5 slots at once: a 4 MiB budget holds 3.
    let one_mib = manifest(&[("w", DType::F32, &[1 << 18])]);
    let mut spec = job_spec("median-5", (*one_mib).clone(), 5, 5, 60_000, 1);
    spec.strategy = StrategySpec::Median;
    jobs::create_job(&infra, &spec, None).await.unwrap();
    let JobPhase::Failed { reason } = ended(&client, &spec.job).await else { panic!("not failed") };
    assert!(reason.contains("needs 5 shared-memory slot(s)") && reason.contains("holds 3"), "{reason}");
    // The same with a cohort of 3 fits and runs: round 1 opens.
    let mut spec = job_spec("median-3", (*one_mib).clone(), 3, 3, 60_000, 1);
    spec.strategy = StrategySpec::Median;
    jobs::create_job(&infra, &spec, None).await.unwrap();
    client
        .wait_for_open_round(&spec.job, shoal_functions::RoundId(1), Duration::from_secs(20))
        .await
        .unwrap();
    // A streaming job needs one slot: a 1 MiB model runs on the 4 MiB budget whatever its cohort.
    let job = JobId::new("fedavg-9").unwrap();
    jobs::create_job(&infra, &job_spec("fedavg-9", (*one_mib).clone(), 9, 9, 60_000, 1), None).await.unwrap();
    client.wait_for_open_round(&job, shoal_functions::RoundId(1), Duration::from_secs(20)).await.unwrap();
    let log = node.log();
    assert!(log.contains("job refused"), "{log}");
}
