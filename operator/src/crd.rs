//! The `FederatedJob` custom resource (`shoal.dev/v1alpha1`, short name `fj`): one FL job run by
//! Shoal, with its scaling and placement policy, and the status the operator mirrors from the
//! job's state in NATS.
//!
//! `spec.jobSpec` is [`shoal_proto::JobSpec`] **nested, not flattened**, for three reasons:
//! it is exactly the document `shoal job create --spec` takes (snake_case field names, the wire
//! spelling), so a user can paste one into the other; serde cannot combine `flatten` with the
//! `deny_unknown_fields` that `JobSpec` uses to refuse typos; and the Kubernetes-facing fields
//! around it keep the camelCase convention of every other CRD. Its schema is made structural by
//! [`schema::job_spec`] (tagged unions become one object with a discriminator enum and CEL rules
//! for each variant's required fields).
//!
//! `crdgen` writes [`crd_yaml`] to `charts/shoal/files/crds/federatedjob.yaml`, the one committed copy;
//! a test fails when it differs.

pub mod schema;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, LocalObjectReference, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use shoal_proto::JobSpec;

use crate::policy::{AutoscalingPolicy, PlacementPolicy, ScalingSpec};

/// The API group of Shoal's custom resources.
pub const GROUP: &str = "shoal.dev";
/// The finalizer the operator puts on every `FederatedJob`: deleting one first cancels the job
/// in NATS and deletes the function-host Deployments it owns.
pub const FINALIZER: &str = "federatedjobs.shoal.dev/cleanup";
/// Where `crdgen`'s output is committed (relative to the repository root).
pub const CRD_PATH: &str = "charts/shoal/files/crds/federatedjob.yaml";

/// A federated-learning job run by Shoal: the job spec (model manifest, strategy, round
/// policy, limits), the aggregation hierarchy's fan-in, where and how many function hosts fold
/// its updates, and overrides of the function-host pods.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "shoal.dev",
    version = "v1alpha1",
    kind = "FederatedJob",
    plural = "federatedjobs",
    shortname = "fj",
    category = "shoal",
    doc = "A federated-learning job run by Shoal (`kubectl get fj`): the job spec, its scaling and placement policy, and the job's state mirrored from NATS.",
    namespaced,
    status = "FederatedJobStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase","description":"Pending, Running, Suspended, Finished, Failed or Invalid"}"#,
    printcolumn = r#"{"name":"Round","type":"integer","jsonPath":".status.round","description":"The open round (after the job ended: the last round run)"}"#,
    printcolumn = r#"{"name":"ModelVersion","type":"integer","jsonPath":".status.modelVersion","description":"The committed global model version"}"#,
    printcolumn = r#"{"name":"Updates","type":"integer","jsonPath":".status.updates","description":"Client updates folded into the last committed model"}"#,
    printcolumn = r#"{"name":"Hosts","type":"string","jsonPath":".status.hosts","description":"Ready/desired function hosts, all nodes"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct FederatedJobSpec {
    /// The job as `shoal job create --spec` takes it (`shoal_proto::JobSpec`, snake_case field
    /// names): `job` (the job id, 1-64 characters from [A-Za-z0-9_-]), `manifest`, `strategy`,
    /// `round_policy`, `rounds`, limits, `server_optimizer`. Immutable once the job is created
    /// in NATS (a changed spec sets `Ready=False reason=JobSpecChanged`).
    #[schemars(schema_with = "schema::job_spec")]
    pub job_spec: JobSpec,
    /// The aggregation hierarchy.
    #[serde(default)]
    pub hierarchy: Hierarchy,
    /// Where function hosts run (R1.4, R6.4).
    #[serde(default)]
    pub placement: PlacementPolicy,
    /// How many function hosts run (reference/kubernetes.md R2.1 names and defaults).
    #[serde(default)]
    pub autoscaling: AutoscalingPolicy,
    /// Overrides merged into every function-host pod of this job.
    #[serde(default)]
    pub pod_template: FunctionHostTemplate,
    /// Stop scaling: every function host of the job is scaled to zero and a job not yet
    /// created in NATS is not created. Updates stay queued in JetStream (gateways ack only on
    /// commit), so resuming loses nothing.
    #[serde(default)]
    pub suspend: bool,
}

/// `spec.hierarchy`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Hierarchy {
    /// Leaves per middle aggregator (DESIGN.md §7, R1.3); 0 or 1: every node's leaf sends its
    /// partial straight to the top. Sets the job spec's `fan_in`; giving both with different
    /// values is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1024))]
    pub fan_in: Option<u32>,
}

/// `spec.podTemplate`: what a user may change in the function-host pods the operator renders.
/// Everything else (command, probes, the shared-memory volume, the security context, the
/// hostname affinity) is the process contract and not overridable.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FunctionHostTemplate {
    /// Extra pod labels (the operator's own labels win on a clash).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra pod annotations (e.g. for a service mesh or a log shipper).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The function-host image; default: the operator's `--image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// `Always`, `IfNotPresent` or `Never`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["Always", "IfNotPresent", "Never"]))]
    pub image_pull_policy: Option<String>,
    /// Pull secrets for a private registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// CPU and memory of the function-host container (a host folds at memory speed: give it
    /// one core per `updatesPerSecondPerHost` it is sized for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Extra environment variables (after the operator's; `NODE_NAME` and `SHOAL_NATS_*` are
    /// the operator's and cannot be overridden).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Tolerations, added to `placement.tolerations`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node labels, merged over `placement.nodeSelector`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// The pods' priority class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// The pods' service account (default: the namespace's `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
}

/// The phase shown by `kubectl get fj`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    /// Accepted; the job is not in NATS yet (or NATS is unreachable).
    Pending,
    /// Rounds are running.
    Running,
    /// `spec.suspend` is set.
    Suspended,
    /// The last round committed.
    Finished,
    /// The job failed (too many failed rounds).
    Failed,
    /// The job was cancelled (`shoal job cancel`, or the FederatedJob deleted).
    Cancelled,
    /// The spec does not validate; see the `Ready` condition.
    Invalid,
}

impl Phase {
    /// The phase's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Running => "Running",
            Phase::Suspended => "Suspended",
            Phase::Finished => "Finished",
            Phase::Failed => "Failed",
            Phase::Cancelled => "Cancelled",
            Phase::Invalid => "Invalid",
        }
    }
}

/// `status`: the job's state in NATS and the autoscaler's view, written by the operator.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FederatedJobStatus {
    /// The `metadata.generation` this status reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Running, Suspended, Finished, Failed or Invalid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Why the job failed (`JobPhase::Failed`'s reason), when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    /// The open round (after the job ends: the last round run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<u64>,
    /// The committed global model version (clients train from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<u64>,
    /// When the open round opened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round_opened_at: Option<Time>,
    /// The open round's deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round_deadline: Option<Time>,
    /// How the previous round ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_outcome: Option<LastOutcome>,
    /// Client updates folded into the last committed model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updates: Option<u32>,
    /// The node whose function host holds the job's top lease (commits the models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_node: Option<String>,
    /// `ready/desired` function hosts over all nodes (the `Hosts` column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<String>,
    /// Function hosts asked for, all nodes.
    #[serde(default)]
    pub desired_hosts: u32,
    /// Function hosts ready, all nodes.
    #[serde(default)]
    pub ready_hosts: u32,
    /// The autoscaler's view (R2.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,
    /// `Ready`, `ScalingActive`, `ScalingLimited`, `RoundProgressing`, `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// `status.lastOutcome`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastOutcome {
    /// `Committed`, `QuorumNotMet` or `AggregationFailed`.
    pub outcome: String,
    /// The outcome in words.
    pub message: String,
}

/// `status.autoscaling` (R2.5).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    /// `Stable` or `Panic` (KPA's modes).
    pub mode: String,
    /// Function hosts asked for per node.
    #[serde(default)]
    pub desired_hosts_per_node: BTreeMap<String, u32>,
    /// Function hosts ready per node (the Deployments' `readyReplicas`).
    #[serde(default)]
    pub ready_hosts_per_node: BTreeMap<String, u32>,
    /// Smoothed update arrivals per node, updates/s (the autoscaler's EWMA of the gateways'
    /// reports).
    #[serde(default)]
    pub observed_rate_per_node: BTreeMap<String, f64>,
    /// Updates staged but not yet folded, all nodes, plus the work queue's `num_pending`.
    #[serde(default)]
    pub backlog: u64,
    /// The autoscaler's raw recommendation (before tolerance, stabilization and limits).
    #[serde(default)]
    pub recommendation: u32,
    /// When the host count last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
}

/// Condition types of `status.conditions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConditionType {
    /// The job exists in NATS and the operator manages it as its spec asks.
    Ready,
    /// The autoscaler is deciding the host count (HPA's condition name).
    ScalingActive,
    /// A limit holds the host count away from the recommendation (HPA's condition name).
    ScalingLimited,
    /// Rounds open and close within their deadlines.
    RoundProgressing,
    /// Something keeps the job from running as asked (hosts not ready, a competing
    /// autoscaler, no demand reports).
    Degraded,
}

impl ConditionType {
    /// Every type, in the order they are written.
    pub const ALL: [ConditionType; 5] = [
        ConditionType::Ready,
        ConditionType::ScalingActive,
        ConditionType::ScalingLimited,
        ConditionType::RoundProgressing,
        ConditionType::Degraded,
    ];

    /// The condition's `type`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::Ready => "Ready",
            ConditionType::ScalingActive => "ScalingActive",
            ConditionType::ScalingLimited => "ScalingLimited",
            ConditionType::RoundProgressing => "RoundProgressing",
            ConditionType::Degraded => "Degraded",
        }
    }
}

impl FederatedJobSpec {
    /// The scaling and placement policy (what the autoscaler and the simulator take).
    pub fn scaling(&self) -> ScalingSpec {
        ScalingSpec { autoscaling: self.autoscaling.clone(), placement: self.placement.clone() }
    }

    /// The job spec written to NATS: `jobSpec` with `fan_in` from `hierarchy.fanIn` when set.
    ///
    /// # Errors
    /// A message naming `spec.hierarchy.fanIn` when both it and `jobSpec.fan_in` are set and
    /// differ.
    pub fn effective_job_spec(&self) -> Result<JobSpec, String> {
        let mut spec = self.job_spec.clone();
        if let Some(fan_in) = self.hierarchy.fan_in {
            if spec.fan_in != 0 && spec.fan_in != fan_in {
                return Err(format!(
                    "spec.hierarchy.fanIn ({fan_in}) differs from spec.jobSpec.fan_in ({}); set one",
                    spec.fan_in
                ));
            }
            spec.fan_in = fan_in;
        }
        Ok(spec)
    }
}

/// The CRD as YAML (what `crdgen` prints and the chart ships).
///
/// # Errors
/// The YAML serializer's error (not expected for this fixed document).
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    let header = "# Generated by `cargo run -p shoal-operator --bin crdgen`; do not edit.\n";
    Ok(format!("{header}{}", serde_yaml::to_string(&FederatedJob::crd())?))
}

#[cfg(test)]
mod tests;
