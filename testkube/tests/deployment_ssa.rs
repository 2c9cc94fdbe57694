//! A per-node function-host Deployment written the way the operator will write it (server-side
//! apply, field manager `shoal-operator`) is stored with its node affinity and replicas. No
//! controller runs, so the assertions are on the stored object.

mod common;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};

fn deployment(replicas: i32) -> anyhow::Result<Deployment> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "fh-job1-node-a", "namespace": "default", "labels": {"shoal.dev/node": "node-a"}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "fh-job1-node-a"}},
            "template": {
                "metadata": {"labels": {"app": "fh-job1-node-a"}},
                "spec": {
                    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [{"matchExpressions": [
                            {"key": "kubernetes.io/hostname", "operator": "In", "values": ["node-a"]}
                        ]}]
                    }}},
                    "containers": [{"name": "function-host", "image": "shoal:test"}]
                }
            }
        }
    }))?)
}

fn hostnames(stored: &Deployment) -> Vec<String> {
    let affinity = stored.spec.template.spec.as_ref().and_then(|p| p.affinity.as_ref());
    let required = affinity
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| n.required_during_scheduling_ignored_during_execution.as_ref());
    let mut values = Vec::new();
    for term in required.map(|r| r.node_selector_terms.as_slice()).unwrap_or_default() {
        for expr in term.match_expressions.iter().flatten() {
            if expr.key == "kubernetes.io/hostname" && expr.operator == "In" {
                values.extend(expr.values.iter().flatten().cloned());
            }
        }
    }
    values
}

#[tokio::test]
async fn an_applied_deployment_is_stored_with_affinity_replicas_and_manager() -> anyhow::Result<()> {
    let plane = common::start().await?;
    let deployments: Api<Deployment> = Api::namespaced(plane.client(), "default");
    let params = PatchParams::apply("shoal-operator").force();

    deployments.patch("fh-job1-node-a", &params, &Patch::Apply(&deployment(3)?)).await?;
    let stored = deployments.get("fh-job1-node-a").await?;
    assert_eq!(stored.spec.replicas, Some(3));
    assert_eq!(hostnames(&stored), ["node-a"]);
    let managers: Vec<(String, String)> = stored
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .map(|m| (m.manager.clone().unwrap_or_default(), m.operation.clone().unwrap_or_default()))
        .collect();
    assert_eq!(managers, [("shoal-operator".to_owned(), "Apply".to_owned())]);

    // Re-applying with new replicas is an update of the same object, not a new one.
    deployments.patch("fh-job1-node-a", &params, &Patch::Apply(&deployment(5)?)).await?;
    let updated = deployments.get("fh-job1-node-a").await?;
    assert_eq!(updated.spec.replicas, Some(5));
    assert_eq!(updated.metadata.uid, stored.metadata.uid);
    assert_eq!(updated.metadata.generation, Some(2));

    // Nothing reconciles here: no ReplicaSet controller, so no status and no pods.
    assert!(updated.status.is_none_or(|s| s.replicas.unwrap_or(0) == 0));
    let pods = Api::<Pod>::namespaced(plane.client(), "default").list(&ListParams::default()).await?;
    assert!(pods.items.is_empty());
    Ok(())
}
