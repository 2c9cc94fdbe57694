//! The operator against a real kube-apiserver v1.37 + etcd (`shoal-testkube`, binaries from
//! `tools/build-go-tools.sh`) and a real nats-server (`shoal-natsd`). No controller-manager or
//! scheduler runs: the tests assert the objects written.
//!
//! - the generated CRD installs; a valid FederatedJob is accepted and malformed ones are refused
//!   by the schema (the per-variant CEL rules included);
//! - the real `shoal-operator` binary, started with the test apiserver's kubeconfig, creates the
//!   job in NATS and, from `DemandReport`s the test publishes as two nodes' gateways would, the
//!   per-node Deployments with the right affinity and replicas; the status follows the job's
//!   rounds to `Finished` — the rounds are driven by **writing the job state transitions into
//!   KV as a node would** (open, commit, finish by compare-and-set), not by `shoal node`
//!   processes; deleting the FederatedJob runs the finalizer, which deletes the Deployments itself
//!   (no garbage collector runs) before the object goes; deleting a running one cancels its job.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::{json, Value};
use shoal_client::jobs::{self, CasOutcome};
use shoal_client::{ConnectOptions, Infra};
use shoal_natsd::NatsServer;
use shoal_operator::crd::{crd_yaml, FederatedJob, Phase};
use shoal_proto::{JobId, JobPhase, ModelVersion, RoundId, RoundOutcome};
use shoal_testkube::{apply_stream, ApplyOptions, ControlPlane};

use common::{eventually, federated_job, publish_demand, Killed};

async fn plane_with_crd() -> Result<ControlPlane> {
    let plane = ControlPlane::start().await?;
    apply_stream(&plane.client(), &crd_yaml()?, &ApplyOptions::new("shoal-test")).await?;
    let ns = serde_json::from_value::<Namespace>(json!({"metadata": {"name": "fl"}}))?;
    Api::<Namespace>::all(plane.client()).create(&PostParams::default(), &ns).await?;
    Ok(plane)
}

async fn create(api: &Api<FederatedJob>, value: Value) -> Result<FederatedJob, kube::Error> {
    let fj: FederatedJob = serde_json::from_value(value).map_err(kube::Error::SerdeError)?;
    api.create(&PostParams::default(), &fj).await
}

/// The schema refuses what it can express; the message names the rule.
#[tokio::test]
async fn the_crd_installs_and_its_schema_refuses_malformed_jobs() -> Result<()> {
    let plane = plane_with_crd().await?;
    let api: Api<FederatedJob> = Api::namespaced(plane.client(), "fl");
    let accepted = create(&api, federated_job("ok", "ok-job", 3)).await?;
    assert_eq!(accepted.spec.autoscaling.max_hosts, 20);
    assert_eq!(
        accepted.spec.autoscaling.stable_window.get(),
        Duration::from_secs(60),
        "defaulted by the schema"
    );
    let cases: [(&str, Value, &str); 5] = [
        ("krum-without-f", json!({"name": "krum"}), "name krum needs byzantine"),
        ("unknown-strategy", json!({"name": "fedsgd"}), "Unsupported value: \"fedsgd\""),
        ("bad-id", json!(null), "spec.jobSpec.job"),
        ("no-cohort", json!(null), "mode sync needs cohort_size, min_clients, deadline_ms"),
        ("zero-hosts", json!(null), "spec.autoscaling.maxHosts"),
    ];
    for (name, strategy, needle) in cases {
        let mut fj = federated_job(name, "j", 3);
        match name {
            "bad-id" => fj["spec"]["jobSpec"]["job"] = json!("not a subject token!"),
            "no-cohort" => {
                fj["spec"]["jobSpec"]["round_policy"] = json!({"mode": "sync", "deadline_ms": 1000})
            }
            "zero-hosts" => fj["spec"]["autoscaling"]["maxHosts"] = json!(0),
            _ => fj["spec"]["jobSpec"]["strategy"] = strategy,
        }
        // Deserialising the typed object would refuse some of these before the server sees
        // them, so send the raw JSON.
        let raw: Api<kube::api::DynamicObject> =
            Api::namespaced_with(plane.client(), "fl", &kube::api::ApiResource::erase::<FederatedJob>(&()));
        let object: kube::api::DynamicObject = serde_json::from_value(fj)?;
        match raw.create(&PostParams::default(), &object).await {
            Err(kube::Error::Api(s)) => {
                assert_eq!(s.code, 422, "{name}: {s:?}");
                assert!(s.message.contains(needle), "{name}: {}", s.message);
            }
            other => bail!("{name} was not refused: {other:?}"),
        }
    }
    Ok(())
}

fn start_operator(plane: &ControlPlane, nats: &NatsServer) -> Result<Killed> {
    let child = Command::new(env!("CARGO_BIN_EXE_shoal-operator"))
        .args(["run", "--nats-url", &nats.url(), "--http", "127.0.0.1:0", "--image", "shoal:test"])
        .args(["--lease-namespace", "fl", "--identity", "operator-test", "--round-deadline-grace", "5m"])
        .env("KUBECONFIG", plane.kubeconfig_path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start shoal-operator")?;
    Ok(Killed(child))
}

/// Moves the job's state as the top node would: open the round, commit it (the last commit
/// finishes the job).
async fn drive_round(infra: &Infra, job: &JobId, rounds: u64) -> Result<()> {
    for _ in 0..10 {
        let (mut state, revision) = jobs::load_state(&infra, job).await?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
        if !state.is_open() {
            state.opened_at_ms = now;
            state.deadline_at_ms = now + 600_000;
        } else {
            let version = state.model_version.0 + 1;
            state.model_version = ModelVersion(version);
            state.last_outcome = Some(RoundOutcome::Committed {
                version: ModelVersion(version),
                clients: 2,
                total_weight: 20.0,
            });
            if version >= rounds {
                state.phase = JobPhase::Finished;
            } else {
                state.round = RoundId(state.round.0 + 1);
                state.opened_at_ms = 0;
                state.deadline_at_ms = 0;
            }
        }
        if let CasOutcome::Written(_) = jobs::cas_state(infra, job, &state, revision).await? {
            return Ok(());
        }
    }
    bail!("the job state kept changing")
}

async fn status(api: &Api<FederatedJob>, name: &str) -> Option<shoal_operator::crd::FederatedJobStatus> {
    api.get(name).await.ok().and_then(|fj| fj.status)
}

#[tokio::test]
async fn the_operator_scales_follows_the_rounds_and_cleans_up() -> Result<()> {
    let plane = plane_with_crd().await?;
    let nats = NatsServer::start()?;
    let infra = Infra::connect(&ConnectOptions { url: nats.url(), ..ConnectOptions::default() }).await?;
    let _operator = start_operator(&plane, &nats)?;
    let api: Api<FederatedJob> = Api::namespaced(plane.client(), "fl");
    let deployments: Api<Deployment> = Api::namespaced(plane.client(), "fl");
    create(&api, federated_job("mnist", "mnist-job", 3)).await?;
    let job = JobId::new("mnist-job")?;
    eventually("the job in NATS", Duration::from_secs(30), || async {
        jobs::load_state(&infra, &job).await.ok()
    })
    .await?;
    let spec = jobs::load_spec(&infra, &job).await?;
    assert_eq!(spec.fan_in, 2, "hierarchy.fanIn reached the job spec");

    // Demand: node-a 20/s with 5 staged = 20/7 + 5/60 = 2.94 hosts; node-b 3/s with 1 staged =
    // 3/7 + 1/60 = 0.45 host. Best fit: node-a 2 whole hosts, node-b its leaf (spare 0.55);
    // node-a's remainder 0.94 fits no spare, so node-a opens a third: 3 + 1 = 4, which the
    // default +4 hosts / 15 s scale-up limit allows from zero.
    let demand = publish_demand(&infra, "mnist-job");
    let replicas = |name: &'static str| {
        let deployments = deployments.clone();
        async move { deployments.get(name).await.ok().and_then(|d| d.spec.replicas) }
    };
    let a = eventually("node-a's 3 hosts", Duration::from_secs(30), || async {
        replicas("mnist-node-a").await.filter(|r| *r == 3)
    })
    .await?;
    let b = eventually("node-b's host", Duration::from_secs(10), || async {
        replicas("mnist-node-b").await.filter(|r| *r == 1)
    })
    .await?;
    assert_eq!((a, b), (3, 1));
    let d = deployments.get("mnist-node-a").await?;
    let d = serde_json::to_value(&d)?;
    let term = &d["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
        ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]["matchExpressions"][0];
    assert_eq!(term, &json!({"key": "kubernetes.io/hostname", "operator": "In", "values": ["node-a"]}));
    assert_eq!(d["metadata"]["ownerReferences"][0]["name"], "mnist");
    let command = &d["spec"]["template"]["spec"]["containers"][0]["command"];
    assert_eq!((&command[4], &command[5]), (&json!("--job"), &json!("mnist-job")));
    let running = eventually("status Running with 4 desired hosts", Duration::from_secs(15), || async {
        status(&api, "mnist").await.filter(|s| s.phase == Some(Phase::Running) && s.desired_hosts == 4)
    })
    .await?;
    assert_eq!(running.hosts.as_deref(), Some("0/4"), "no controller-manager: no pod is ever ready");

    // Three rounds, each opened and committed in KV as a node would.
    for round in 1..=3u64 {
        drive_round(&infra, &job, 3).await?;
        eventually(&format!("round {round} open in the status"), Duration::from_secs(15), || async {
            status(&api, "mnist").await.filter(|s| s.round == Some(round) && s.round_deadline.is_some())
        })
        .await?;
        drive_round(&infra, &job, 3).await?;
        eventually(&format!("model version {round}"), Duration::from_secs(15), || async {
            status(&api, "mnist").await.filter(|s| s.model_version == Some(round))
        })
        .await?;
    }
    let done = eventually("Finished", Duration::from_secs(15), || async {
        status(&api, "mnist").await.filter(|s| s.phase == Some(Phase::Finished))
    })
    .await?;
    assert_eq!((done.round, done.model_version, done.updates), (Some(3), Some(3), Some(2)));
    let ready = done.conditions.iter().find(|c| c.type_ == "Ready").context("Ready condition")?;
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "JobFinished"));
    eventually("hosts scaled to zero after the job ended", Duration::from_secs(15), || async {
        (replicas("mnist-node-a").await == Some(0) && replicas("mnist-node-b").await == Some(0)).then_some(())
    })
    .await?;

    // Delete: the finalizer deletes the Deployments itself, then the object goes.
    api.delete("mnist", &DeleteParams::default()).await?;
    eventually("the FederatedJob gone", Duration::from_secs(15), || async {
        matches!(api.get("mnist").await, Err(kube::Error::Api(s)) if s.code == 404).then_some(())
    })
    .await?;
    let left = deployments.list(&ListParams::default()).await?;
    assert!(left.items.is_empty(), "{:?}", left.items.iter().map(|d| &d.metadata.name).collect::<Vec<_>>());
    let (state, _) = jobs::load_state(&infra, &job).await?;
    assert_eq!(state.phase, JobPhase::Finished, "a finished job is not cancelled");
    demand.abort();

    // Deleting a running job cancels it in NATS.
    create(&api, federated_job("live", "live-job", 5)).await?;
    let live = JobId::new("live-job")?;
    eventually("live-job in NATS", Duration::from_secs(15), || async {
        jobs::load_state(&infra, &live).await.ok()
    })
    .await?;
    eventually("the finalizer on live", Duration::from_secs(15), || async {
        api.get("live").await.ok().filter(|fj| !fj.metadata.finalizers.clone().unwrap_or_default().is_empty())
    })
    .await?;
    api.delete("live", &DeleteParams::default()).await?;
    eventually("live gone", Duration::from_secs(15), || async {
        matches!(api.get("live").await, Err(kube::Error::Api(s)) if s.code == 404).then_some(())
    })
    .await?;
    let (state, _) = jobs::load_state(&infra, &live).await?;
    assert_eq!(state.phase, JobPhase::Cancelled { reason: "the FederatedJob was deleted".into() });
    Ok(())
}
