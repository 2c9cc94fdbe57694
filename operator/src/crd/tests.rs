use std::path::Path;

use kube::CustomResourceExt;
use serde_json::{json, Value};

use super::*;

fn committed_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(CRD_PATH)
}

/// CI's freshness check: the committed CRD is exactly what `crdgen` prints. Regenerate with
/// `cargo run -p shoal-operator --bin crdgen > charts/shoal/files/crds/federatedjob.yaml`.
#[test]
fn committed_crd_matches_crdgen() {
    let committed = std::fs::read_to_string(committed_path())
        .unwrap_or_else(|e| panic!("{}: {e}; run crdgen", committed_path().display()));
    let generated = crd_yaml().unwrap();
    assert!(
        committed == generated,
        "{CRD_PATH} is stale: run `cargo run -p shoal-operator --bin crdgen > {CRD_PATH}`"
    );
}

#[test]
fn crd_names_columns_and_subresources() {
    let crd = serde_json::to_value(FederatedJob::crd()).unwrap();
    assert_eq!(crd["metadata"]["name"], "federatedjobs.shoal.dev");
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["fj"]));
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert_eq!(version["subresources"]["status"], json!({}));
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(columns, ["Phase", "Round", "ModelVersion", "Updates", "Hosts", "Age"]);
    let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(spec["required"], json!(["jobSpec"]));
    let auto = &spec["properties"]["autoscaling"]["properties"];
    for field in ["minHosts", "maxHosts", "target", "stableWindow", "panicWindowPercentage", "behavior"] {
        assert!(auto.get(field).is_some(), "autoscaling.{field} missing");
    }
    let conditions =
        &version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
}

fn example() -> Value {
    json!({
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "mnist", "namespace": "fl"},
        "spec": {
            "jobSpec": {
                "job": "mnist",
                "manifest": {"tensors": [{"name": "w", "dtype": "F32", "shape": [10]}]},
                "strategy": {"name": "fedavg"},
                "round_policy": {"mode": "sync", "cohort_size": 4, "min_clients": 2, "deadline_ms": 60000},
                "rounds": 3
            },
            "hierarchy": {"fanIn": 4},
            "placement": {"strategy": "bestFit", "tolerations": [{"key": "edge", "operator": "Exists"}]},
            "autoscaling": {"maxHosts": 40, "stableWindow": "30s"},
            "podTemplate": {"resources": {"limits": {"cpu": "2"}}}
        }
    })
}

#[test]
fn an_example_parses_and_fills_defaults() {
    let fj: FederatedJob = serde_json::from_value(example()).unwrap();
    assert_eq!(fj.spec.autoscaling.max_hosts, 40);
    assert_eq!(fj.spec.autoscaling.min_hosts, 0, "default");
    assert_eq!(fj.spec.autoscaling.tick_interval.get(), std::time::Duration::from_secs(2));
    assert_eq!(fj.spec.effective_job_spec().unwrap().fan_in, 4);
    assert!(!fj.spec.suspend);
    let mut clash = fj.spec.clone();
    clash.job_spec.fan_in = 2;
    let err = clash.effective_job_spec().unwrap_err();
    assert!(err.contains("spec.hierarchy.fanIn"), "{err}");
}
