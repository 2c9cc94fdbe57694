use serde_json::{json, Value};

use super::*;
use crate::crd::FederatedJob;

pub(crate) fn fj() -> FederatedJob {
    let mut fj: FederatedJob = serde_json::from_value(json!({
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "mnist", "namespace": "fl", "uid": "0b5e-uid", "generation": 1},
        "spec": {
            "jobSpec": {
                "job": "mnist-job",
                "manifest": {"tensors": [{"name": "w", "dtype": "F32", "shape": [10]}]},
                "round_policy": {"mode": "sync", "cohort_size": 4, "min_clients": 2, "deadline_ms": 60000},
                "rounds": 3
            },
            "placement": {"nodeSelector": {"pool": "fl"}, "tolerations": [{"key": "edge", "operator": "Exists"}]},
            "podTemplate": {
                "image": "registry.local/shoal:1",
                "resources": {"limits": {"cpu": "2"}},
                "labels": {"team": "a", "shoal.dev/job": "overridden?"},
                "env": [{"name": "RUST_LOG", "value": "debug"}, {"name": "NODE_NAME", "value": "spoof"}]
            }
        }
    }))
    .unwrap();
    fj.metadata.uid = Some("0b5e-uid".into());
    fj
}

fn render(replicas: u32) -> Value {
    let cfg = OperatorConfig {
        nats_url: "nats://nats.shoal:4222".into(),
        nats_credentials_secret: Some("shoal-nats".into()),
        ..OperatorConfig::default()
    };
    serde_json::to_value(function_host_deployment(&fj(), &NodeName::new("node-a").unwrap(), replicas, &cfg))
        .unwrap()
}

#[test]
fn the_deployment_follows_the_process_contract() {
    let d = render(3);
    assert_eq!(d["metadata"]["name"], "mnist-node-a");
    assert_eq!(d["metadata"]["namespace"], "fl");
    assert_eq!(d["spec"]["replicas"], 3);
    let owner = &d["metadata"]["ownerReferences"][0];
    assert_eq!(
        (owner["kind"].as_str(), owner["name"].as_str(), owner["uid"].as_str()),
        (Some("FederatedJob"), Some("mnist"), Some("0b5e-uid"))
    );
    assert_eq!(owner["controller"], true);
    let labels = &d["metadata"]["labels"];
    assert_eq!(labels["app.kubernetes.io/name"], "shoal");
    assert_eq!(labels["app.kubernetes.io/component"], "function-host");
    assert_eq!(labels["shoal.dev/job"], "mnist-job");
    assert_eq!(labels["shoal.dev/node"], "node-a");
    let pod = &d["spec"]["template"];
    assert_eq!(pod["metadata"]["labels"]["team"], "a");
    assert_eq!(pod["metadata"]["labels"]["shoal.dev/job"], "mnist-job", "the operator's labels win");
    let spec = &pod["spec"];
    let term = &spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"][0];
    assert_eq!(
        term["matchExpressions"],
        json!([{"key": "kubernetes.io/hostname", "operator": "In", "values": ["node-a"]}])
    );
    assert_eq!(spec["nodeSelector"], json!({"pool": "fl"}));
    assert_eq!(spec["tolerations"], json!([{"key": "edge", "operator": "Exists"}]));
    assert_eq!(
        spec["volumes"],
        json!([{"name": "shm", "hostPath": {"path": "/dev/shm/shoal", "type": "Directory"}}])
    );
    let c = &spec["containers"][0];
    assert_eq!(c["image"], "registry.local/shoal:1");
    assert_eq!(
        c["command"],
        json!([
            "shoal",
            "function-host",
            "--node-id",
            "$(NODE_NAME)",
            "--job",
            "mnist-job",
            "--nats-url",
            "nats://nats.shoal:4222",
            "--shm-dir",
            "/dev/shm/shoal",
            "--http",
            "0.0.0.0:9465"
        ])
    );
    let env: Vec<&Value> = c["env"].as_array().unwrap().iter().collect();
    assert_eq!(
        env[0],
        &json!({"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}})
    );
    let names: Vec<&str> = env.iter().filter_map(|e| e["name"].as_str()).collect();
    assert_eq!(
        names,
        ["NODE_NAME", "SHOAL_NATS_USER", "SHOAL_NATS_PASSWORD", "SHOAL_NATS_TOKEN", "RUST_LOG"],
        "a spoofed NODE_NAME is dropped"
    );
    assert_eq!(
        env[2]["valueFrom"]["secretKeyRef"],
        json!({"name": "shoal-nats", "key": "SHOAL_NATS_PASSWORD", "optional": true})
    );
    assert_eq!(c["ports"], json!([{"name": "http", "containerPort": 9465, "protocol": "TCP"}]));
    assert_eq!(c["readinessProbe"]["httpGet"], json!({"path": "/readyz", "port": "http"}));
    assert_eq!(c["livenessProbe"]["httpGet"], json!({"path": "/healthz", "port": "http"}));
    assert_eq!(c["volumeMounts"], json!([{"name": "shm", "mountPath": "/dev/shm/shoal", "readOnly": true}]));
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(c["resources"]["limits"]["cpu"], "2");
}

#[test]
fn long_and_dotted_names_stay_valid() {
    let node = NodeName::new("ip-10-0-0-1.eu-west-1.compute.internal").unwrap();
    let name = deployment_name("mnist", &node);
    assert_eq!(name, "mnist-ip-10-0-0-1-eu-west-1-compute-internal");
    let long = NodeName::new(format!("{}.example", "a".repeat(70))).unwrap();
    let name = deployment_name("mnist", &long);
    assert!(name.len() <= 63 && name.starts_with("mnist-aaaa"), "{name}");
    assert_ne!(deployment_name("mnist", &long), deployment_name("mnist2", &long));
    assert_eq!(label_value("node-a"), "node-a");
    let hashed = label_value(&"b".repeat(80));
    assert!(hashed.len() <= 63 && hashed.starts_with("bbbb"), "{hashed}");
    assert_eq!(label_value("_job"), format!("job-{:08x}", fnv1a("_job")));
    assert_eq!(
        job_selector("mnist-job"),
        "app.kubernetes.io/component=function-host,shoal.dev/job=mnist-job"
    );
}

/// The operator's function-host defaults (the chart's `functionHost.template`) sit under each
/// job's podTemplate: the job wins per field, maps merge, lists append.
#[test]
fn the_job_template_overrides_the_operator_defaults_field_by_field() {
    let defaults: FunctionHostTemplate = serde_json::from_value(json!({
        "labels": {"team": "platform", "tier": "fl"},
        "image": "registry.local/shoal:default",
        "imagePullPolicy": "IfNotPresent",
        "imagePullSecrets": [{"name": "regcred"}],
        "resources": {"requests": {"cpu": "500m"}},
        "env": [{"name": "RUST_LOG", "value": "info"}, {"name": "MALLOC_ARENA_MAX", "value": "2"}],
        "tolerations": [{"key": "gpu", "operator": "Exists"}],
        "nodeSelector": {"disk": "ssd", "pool": "default"},
        "priorityClassName": "shoal-hosts"
    }))
    .unwrap();
    let cfg = OperatorConfig { host_defaults: defaults, ..OperatorConfig::default() };
    let d = serde_json::to_value(function_host_deployment(&fj(), &NodeName::new("node-a").unwrap(), 1, &cfg))
        .unwrap();
    let pod = &d["spec"]["template"];
    assert_eq!(pod["metadata"]["labels"]["team"], "a", "the job's label wins");
    assert_eq!(pod["metadata"]["labels"]["tier"], "fl", "a default label stays");
    let spec = &pod["spec"];
    assert_eq!(spec["priorityClassName"], "shoal-hosts");
    assert_eq!(spec["imagePullSecrets"], json!([{"name": "regcred"}]));
    assert_eq!(spec["nodeSelector"], json!({"disk": "ssd", "pool": "fl"}), "placement's pool wins");
    assert_eq!(
        spec["tolerations"],
        json!([{"key": "edge", "operator": "Exists"}, {"key": "gpu", "operator": "Exists"}])
    );
    let c = &spec["containers"][0];
    assert_eq!(c["image"], "registry.local/shoal:1", "the job's image wins");
    assert_eq!(c["imagePullPolicy"], "IfNotPresent");
    assert_eq!(c["resources"], json!({"limits": {"cpu": "2"}}), "resources are one value: the job's");
    let env: Vec<(String, String)> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?.to_owned(), e["value"].as_str()?.to_owned())))
        .collect();
    assert!(env.contains(&("RUST_LOG".into(), "debug".into())), "{env:?}");
    assert!(!env.contains(&("RUST_LOG".into(), "info".into())), "{env:?}");
    assert!(env.contains(&("MALLOC_ARENA_MAX".into(), "2".into())), "{env:?}");
}

/// A job without a podTemplate gets the defaults as they are.
#[test]
fn defaults_alone_fill_every_field() {
    let defaults: FunctionHostTemplate = serde_json::from_value(
        json!({"image": "registry.local/shoal:default", "serviceAccountName": "hosts"}),
    )
    .unwrap();
    let merged = merged_template(&defaults, &FunctionHostTemplate::default());
    assert_eq!(merged, defaults);
}
