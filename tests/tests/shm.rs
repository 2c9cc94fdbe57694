//! The shared-memory directory under attack (issue 15; docs/reliability.md, "Shared memory"):
//! a directory others can write into is refused at start (never chmod-ed), and a segment
//! truncated under a running node stops it with a clear message instead of a bare SIGBUS crash,
//! losing nothing: its held update is delivered again and the round commits the oracle's model.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::time::Duration;

use shoal_client::{ShoalClient, UpdateRequest};
use shoal_functions::{ClientId, DType, JobId, ModelManifest, Parameters, UpdateKind};
use shoal_proto::RoundOutcome;
use shoal_testkit::*;

fn manifest() -> Arc<ModelManifest> {
    shoal_testkit::manifest(&[("w", DType::F32, &[4096])])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shm_directory_others_can_write_is_refused_and_left_alone() {
    init_logging();
    let nats = NatsServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let open = tmp.path().join("shared");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let out = tokio::task::spawn_blocking({
        let (url, open) = (nats.url(), open.clone());
        move || {
            std::process::Command::new(shoal_bin())
                .args(["node", "--http", "127.0.0.1:0", "--nats-url", &url, "--node-id", "s1", "--shm-dir"])
                .arg(&open)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the node started on a world-writable shm dir: {err}");
    assert!(
        err.contains("writable by group or others") && err.contains(&open.display().to_string()),
        "{err}"
    );
    let mode = std::fs::metadata(&open).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o1777, "the directory was chmod-ed");
    assert!(!open.join("s1").exists(), "the node created its directory inside a refused root");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_truncated_under_the_node_stops_it_cleanly_and_loses_nothing() {
    init_logging();
    let nats = NatsServer::start().unwrap();
    let url = nats.url();
    let mut node = NodeProcess::start(&url, "s1", &["--ack-wait-ms", "2000"]).await;
    let client =
        ShoalClient::connect(&shoal_client::ConnectOptions { url: url.clone(), ..Default::default() })
            .await
            .unwrap();
    let m = manifest();
    let job = JobId::new("shm").unwrap();
    let spec = job_spec("shm", (*m).clone(), 2, 2, 60_000, 1);
    shoal_runtime::jobs::create_job(&infra_of(&client).await, &spec, None).await.unwrap();
    let state = client.wait_for_state(&job, Duration::from_secs(20), "open", |s| s.is_open()).await.unwrap();
    let values: Vec<_> = (0..2u64).map(|k| as_sent(&m, &random_values(&m, 40 + k))).collect();
    let request = |k: usize| UpdateRequest {
        job: job.clone(),
        client: ClientId::new(format!("c{k}")).unwrap(),
        round: state.round,
        base_version: state.model_version,
        num_examples: 10 * (k as u64 + 1),
        kind: UpdateKind::Parameters,
        payload: payload(&m, &values[k]),
        force_upload: false,
    };
    client.publish_update(request(0)).await.unwrap();
    // Wait until the first update is staged (its segment exists), then truncate every segment.
    let dir = node.shm_dir();
    let segments = loop {
        let segs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "seg"))
            .collect();
        if !segs.is_empty() {
            break segs;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    for s in &segments {
        std::fs::OpenOptions::new().write(true).open(s).unwrap().set_len(0).unwrap();
    }
    // The second update is staged into the truncated segment: the node stops with the message.
    client.publish_update(request(1)).await.unwrap();
    let status =
        node.exited(Duration::from_secs(20)).await.expect("the node kept running on a truncated segment");
    assert_eq!(
        status.code(),
        Some(shoal_runtime::staging::SIGBUS_EXIT_CODE),
        "exit {status:?} (signal {:?})\n{}",
        status.signal(),
        node.log()
    );
    assert!(node.log().contains("shoal: SIGBUS: a shared-memory segment"), "{}", node.log());

    // Nothing lost: the next process of the node stages both again and the round commits them.
    node.restart(&url).await;
    let after = client.wait_for_round_closed(&job, state.round, Duration::from_secs(60)).await.unwrap();
    assert!(matches!(after.last_outcome, Some(RoundOutcome::Committed { clients: 2, .. })), "{after:?}");
    let model = Parameters::from_safetensors(
        Arc::clone(&m),
        &client.fetch_model(&job, after.model_version).await.unwrap(),
    )
    .unwrap();
    let oracle = weighted_mean_oracle(&[(values[0].clone(), 10.0), (values[1].clone(), 20.0)]);
    for (g, o) in model.tensor_f64(0).iter().zip(&oracle[0]) {
        assert!((g - o).abs() <= 1e-6 * o.abs().max(1e-3), "{g} vs oracle {o}");
    }
}
