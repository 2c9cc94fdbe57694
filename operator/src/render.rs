//! What the operator writes to the API server, as pure functions: one function-host
//! Deployment per (job, node) (reference/kubernetes.md R3.6), its name and labels.
//!
//! The process contract rendered here: container command `shoal function-host --node-id
//! $(NODE_NAME) --job <job> --nats-url <url> --shm-dir /dev/shm/shoal --http 0.0.0.0:9465`,
//! `NODE_NAME` from the downward API, NATS credentials as `SHOAL_NATS_*` from a Secret, required
//! node affinity `kubernetes.io/hostname In [<node>]`, `replicas` = the autoscaler's hosts for
//! that node, probes `/healthz` and `/readyz` on port `http`, the node's shm directory mounted
//! read-only, a restricted security context, the Shoal labels and an ownerReference to the
//! `FederatedJob`. `spec.placement` and `spec.podTemplate` merge in, the latter over the
//! operator's function-host defaults (`--function-host-template`, the chart's `functionHost`),
//! see [`merged_template`].

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    HostPathVolumeSource, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile,
    SecretKeySelector, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;

use crate::config::{OperatorConfig, HOST_HTTP_PORT, NATS_SECRET_KEYS, SHM_DIR};
use crate::crd::{FederatedJob, FunctionHostTemplate};
use crate::node::NodeName;

/// `app.kubernetes.io/name`.
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
/// `app.kubernetes.io/component`.
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
/// `app.kubernetes.io/managed-by`.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The job label (the job id, or a hashed form when it is not a valid label value).
pub const LABEL_JOB: &str = "shoal.dev/job";
/// The node label (the node name, or a hashed form when longer than 63 characters).
pub const LABEL_NODE: &str = "shoal.dev/node";
/// Annotation holding the full node name of a Deployment (labels are limited to 63 characters).
pub const ANNOTATION_NODE: &str = "shoal.dev/node-name";
/// The function-host component name.
pub const COMPONENT: &str = "function-host";

/// FNV-1a, 32 bits: a stable short hash for names that must be shortened.
fn fnv1a(text: &str) -> u32 {
    text.bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

/// `text` if it is a valid label value (≤ 63 characters from `[A-Za-z0-9_.-]`, alphanumeric at
/// both ends), else its first characters (made valid) + `-` + 8 hex digits of its hash.
pub fn label_value(text: &str) -> String {
    let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let ends_ok = |s: &str| {
        s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && s.chars().last().is_some_and(|c| c.is_ascii_alphanumeric())
    };
    if text.len() <= 63 && text.chars().all(valid_char) && ends_ok(text) {
        return text.to_owned();
    }
    let cleaned: String = text.chars().filter(|c| valid_char(*c)).take(54).collect();
    let cleaned = cleaned.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    format!("{cleaned}{}{:08x}", if cleaned.is_empty() { "" } else { "-" }, fnv1a(text))
}

/// The Deployment of `fj`'s function hosts on `node`: `<fj>-<node>` when that is a DNS label
/// (≤ 63 characters, dots of the node name as dashes), else shortened with a hash.
pub fn deployment_name(fj_name: &str, node: &NodeName) -> String {
    let full = format!("{fj_name}-{}", node.as_str().replace('.', "-"));
    if full.len() <= 63 {
        return full;
    }
    let head: String = full.chars().take(54).collect();
    format!("{}-{:08x}", head.trim_end_matches('-'), fnv1a(&full))
}

/// The labels selecting every function host of job `job` (the `shoal.dev/job` value is
/// [`label_value`] of the job id).
pub fn job_selector(job: &str) -> String {
    format!("{LABEL_COMPONENT}={COMPONENT},{LABEL_JOB}={}", label_value(job))
}

/// A job's `spec.podTemplate` over the operator's defaults, field by field: the job's value wins
/// for a single value (image, pull policy, resources, priority class, service account); maps
/// (labels, annotations, nodeSelector) are merged with the job's keys winning; lists are the
/// defaults' then the job's (tolerations, pull secrets not already named; env without the
/// defaults' variables the job sets itself). The pod's nodeSelector layers the defaults, then
/// `spec.placement`, then the job's podTemplate.
pub fn merged_template(defaults: &FunctionHostTemplate, job: &FunctionHostTemplate) -> FunctionHostTemplate {
    let merge_map = |d: &BTreeMap<String, String>, j: &BTreeMap<String, String>| {
        let mut m = d.clone();
        m.extend(j.iter().map(|(k, v)| (k.clone(), v.clone())));
        m
    };
    let mut image_pull_secrets = defaults.image_pull_secrets.clone();
    for s in &job.image_pull_secrets {
        if !image_pull_secrets.iter().any(|d| d.name == s.name) {
            image_pull_secrets.push(s.clone());
        }
    }
    let mut env: Vec<_> =
        defaults.env.iter().filter(|d| !job.env.iter().any(|j| j.name == d.name)).cloned().collect();
    env.extend(job.env.iter().cloned());
    let mut tolerations = defaults.tolerations.clone();
    tolerations.extend(job.tolerations.iter().cloned());
    FunctionHostTemplate {
        labels: merge_map(&defaults.labels, &job.labels),
        annotations: merge_map(&defaults.annotations, &job.annotations),
        image: job.image.clone().or_else(|| defaults.image.clone()),
        image_pull_policy: job.image_pull_policy.clone().or_else(|| defaults.image_pull_policy.clone()),
        image_pull_secrets,
        resources: job.resources.clone().or_else(|| defaults.resources.clone()),
        env,
        tolerations,
        node_selector: merge_map(&defaults.node_selector, &job.node_selector),
        priority_class_name: job.priority_class_name.clone().or_else(|| defaults.priority_class_name.clone()),
        service_account_name: job
            .service_account_name
            .clone()
            .or_else(|| defaults.service_account_name.clone()),
    }
}

/// The Deployment running `replicas` function hosts of `fj` on `node`.
pub fn function_host_deployment(
    fj: &FederatedJob,
    node: &NodeName,
    replicas: u32,
    cfg: &OperatorConfig,
) -> Deployment {
    let job = fj.spec.job_spec.job.as_str();
    let selector: BTreeMap<String, String> = [
        (LABEL_COMPONENT, COMPONENT.to_owned()),
        (LABEL_JOB, label_value(job)),
        (LABEL_NODE, label_value(node.as_str())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let mut labels = selector.clone();
    labels.insert(LABEL_NAME.into(), "shoal".into());
    labels.insert(LABEL_MANAGED_BY.into(), crate::config::FIELD_MANAGER.into());
    let template = merged_template(&cfg.host_defaults, &fj.spec.pod_template);
    let mut pod_labels = template.labels.clone();
    pod_labels.extend(labels.clone());
    let name = deployment_name(fj.metadata.name.as_deref().unwrap_or_default(), node);
    Deployment {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: fj.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: Some([(ANNOTATION_NODE.to_owned(), node.to_string())].into()),
            owner_references: fj.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: DeploymentSpec {
            replicas: Some(i32::try_from(replicas).unwrap_or(i32::MAX)),
            selector: LabelSelector { match_labels: Some(selector), ..LabelSelector::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: non_empty(template.annotations.clone()),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec(fj, &template, node, cfg)),
            },
            ..DeploymentSpec::default()
        },
        status: None,
    }
}

fn non_empty<K, V>(map: BTreeMap<K, V>) -> Option<BTreeMap<K, V>> {
    (!map.is_empty()).then_some(map)
}

fn pod_spec(fj: &FederatedJob, t: &FunctionHostTemplate, node: &NodeName, cfg: &OperatorConfig) -> PodSpec {
    // The operator's defaults, then the job's placement, then the job's podTemplate.
    let mut node_selector = cfg.host_defaults.node_selector.clone();
    node_selector.extend(fj.spec.placement.node_selector.clone());
    node_selector.extend(fj.spec.pod_template.node_selector.clone());
    let mut tolerations = fj.spec.placement.tolerations.clone();
    tolerations.extend(t.tolerations.iter().cloned());
    PodSpec {
        containers: vec![container(fj, t, cfg)],
        affinity: Some(Affinity {
            node_affinity: Some(NodeAffinity {
                required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_expressions: Some(vec![NodeSelectorRequirement {
                            key: "kubernetes.io/hostname".into(),
                            operator: "In".into(),
                            values: Some(vec![node.to_string()]),
                        }]),
                        ..NodeSelectorTerm::default()
                    }],
                }),
                ..NodeAffinity::default()
            }),
            ..Affinity::default()
        }),
        node_selector: non_empty(node_selector),
        tolerations: (!tolerations.is_empty()).then_some(tolerations),
        image_pull_secrets: (!t.image_pull_secrets.is_empty()).then(|| t.image_pull_secrets.clone()),
        priority_class_name: t.priority_class_name.clone(),
        service_account_name: t.service_account_name.clone(),
        automount_service_account_token: Some(false),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            seccomp_profile: Some(runtime_default()),
            ..PodSecurityContext::default()
        }),
        volumes: Some(vec![Volume {
            name: "shm".into(),
            host_path: Some(HostPathVolumeSource { path: SHM_DIR.into(), type_: Some("Directory".into()) }),
            ..Volume::default()
        }]),
        ..PodSpec::default()
    }
}

fn runtime_default() -> SeccompProfile {
    SeccompProfile { type_: "RuntimeDefault".into(), ..SeccompProfile::default() }
}

fn container(fj: &FederatedJob, t: &FunctionHostTemplate, cfg: &OperatorConfig) -> Container {
    let job = fj.spec.job_spec.job.to_string();
    let command = [
        "shoal",
        "function-host",
        "--node-id",
        "$(NODE_NAME)",
        "--job",
        &job,
        "--nats-url",
        &cfg.nats_url,
        "--shm-dir",
        SHM_DIR,
        "--http",
        &format!("0.0.0.0:{HOST_HTTP_PORT}"),
    ]
    .map(str::to_owned)
    .to_vec();
    let mut env = vec![EnvVar {
        name: "NODE_NAME".into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: "spec.nodeName".into(), ..Default::default() }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }];
    if let Some(secret) = &cfg.nats_credentials_secret {
        env.extend(NATS_SECRET_KEYS.iter().map(|key| EnvVar {
            name: (*key).into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: secret.clone(),
                    key: (*key).into(),
                    optional: Some(true),
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        }));
    }
    let reserved = |name: &str| name == "NODE_NAME" || name.starts_with("SHOAL_NATS_");
    env.extend(t.env.iter().filter(|e| !reserved(&e.name)).cloned());
    let probe = |path: &str| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(5),
        ..Probe::default()
    };
    Container {
        name: COMPONENT.into(),
        image: Some(t.image.clone().unwrap_or_else(|| cfg.image.clone())),
        image_pull_policy: t.image_pull_policy.clone(),
        command: Some(command),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: HOST_HTTP_PORT,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        liveness_probe: Some(probe("/healthz")),
        readiness_probe: Some(probe("/readyz")),
        resources: t.resources.clone(),
        volume_mounts: Some(vec![VolumeMount {
            name: "shm".into(),
            mount_path: SHM_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        }]),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Capabilities::default() }),
            seccomp_profile: Some(runtime_default()),
            ..SecurityContext::default()
        }),
        ..Container::default()
    }
}

#[cfg(test)]
mod tests;
