//! The reconcile loop of `FederatedJob`s (kube-rs/controller-rs layout): one [`Context`], the
//! free functions [`reconcile`] and [`error_policy`], the finalizer
//! `federatedjobs.shoal.dev/cleanup`, server-side apply with field manager `shoal-operator`,
//! Events with reasons, and [`run`], the controller itself.
//!
//! One reconcile of a live `FederatedJob`, in order (the API calls are what the mocked API
//! server tests expect, call for call):
//! 1. validate the spec (`shoal_functions::factory::validate`, the policy's ranges, the fan-in);
//!    an invalid spec only gets its status and an `InvalidSpec` Event;
//! 2. NATS: create the job (idempotent: an existing job with the same spec is fine, a different
//!    one is `JobSpecChanged`), read its state and its top lease;
//! 3. `GET` the job's function-host Deployments, the namespace's HorizontalPodAutoscalers and
//!    KEDA ScaledObjects (a 404 there means KEDA is not installed);
//! 4. tick the job's autoscaler (at most once per `tickInterval`) with the fresh demand reports;
//! 5. server-side apply one Deployment per node (none for a Deployment another autoscaler
//!    targets), `DELETE` the Deployments of nodes that left;
//! 6. server-side apply the status (`/status`), then `POST` the Events (job created, scale
//!    decisions, condition transitions).
//!
//! Deletion (the finalizer's cleanup): cancel the job in NATS (its state's phase becomes
//! `Cancelled` by compare-and-set), delete
//! the Deployments (no controller-manager may be running to garbage-collect them), record a
//! `JobCancelled` Event; then the finalizer is removed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event};
use kube::{Resource, ResourceExt};
use serde_json::json;
use shoal_client::jobs::{self, CasOutcome};
use shoal_client::Infra;
use shoal_proto::{JobId, JobPhase, JobSpec, JobState};
use tokio::sync::RwLock;

use crate::autoscaler::{Autoscaler, Decision, Observation};
use crate::config::{OperatorConfig, FIELD_MANAGER};
use crate::crd::{ConditionType, FederatedJob, FINALIZER};
use crate::demand::DemandBook;
use crate::error::{Error, Result};
use crate::metrics::{JobLabels, Metrics, NodeLabels};
use crate::node::NodeName;
use crate::policy::ScalingSpec;
use crate::render::{self, ANNOTATION_NODE, LABEL_NODE};
use crate::status::{self, Facts, Problem, Scaling};

/// The operator's `reportingController` in Events.
pub const REPORTER: &str = "shoal-operator";

/// What `/` shows about the controller.
#[derive(Debug, Clone)]
pub struct Diagnostics {
    /// When the last reconcile started.
    pub last_event: Timestamp,
    /// The Events' reporter.
    pub reporter: Reporter,
}

impl Diagnostics {
    /// Diagnostics for reporter instance `instance` (the pod name).
    pub fn new(instance: Option<String>) -> Self {
        Diagnostics {
            last_event: Timestamp::now(),
            reporter: Reporter { controller: REPORTER.into(), instance },
        }
    }
}

/// The operator's NATS side: the job store and the demand reports.
#[derive(Debug, Clone)]
pub struct Nats {
    /// Shoal's streams and buckets (`shoal-client`).
    pub infra: Infra,
    /// The latest demand report of every node.
    pub demand: Arc<DemandBook>,
}

/// One job's autoscaler and what it decided last.
#[derive(Debug)]
struct JobScaler {
    policy: ScalingSpec,
    autoscaler: Autoscaler,
    origin: Instant,
    last_tick: Option<Instant>,
    last_scale: Option<Timestamp>,
    last: Option<Decision>,
}

/// Everything reconcile shares.
pub struct Context {
    /// The API server.
    pub client: kube::Client,
    /// Publishes Events (`events.k8s.io/v1`).
    pub recorder: Recorder,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// What `/` shows.
    pub diagnostics: Arc<RwLock<Diagnostics>>,
    /// NATS.
    pub nats: Nats,
    /// Image, NATS URL, timings.
    pub config: OperatorConfig,
    /// Per `namespace/name`: the job's autoscaler (R2.2 keeps windows, so it lives across
    /// reconciles).
    scalers: Mutex<HashMap<String, JobScaler>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("nats", &self.nats)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context; `diagnostics.reporter` names the Events' reporter.
    pub fn new(
        client: kube::Client,
        nats: Nats,
        config: OperatorConfig,
        metrics: Arc<Metrics>,
        diagnostics: Diagnostics,
    ) -> Context {
        let recorder = Recorder::new(client.clone(), diagnostics.reporter.clone());
        Context {
            client,
            recorder,
            metrics,
            diagnostics: Arc::new(RwLock::new(diagnostics)),
            nats,
            config,
            scalers: Mutex::new(HashMap::new()),
        }
    }
}

/// Reconciles one `FederatedJob` through the finalizer (apply or cleanup).
///
/// # Errors
/// [`Error::Finalizer`] wrapping the apply or cleanup error, or the finalizer patch's.
pub async fn reconcile(fj: Arc<FederatedJob>, ctx: Arc<Context>) -> Result<Action> {
    ctx.diagnostics.write().await.last_event = Timestamp::now();
    ctx.metrics.reconciliations.inc();
    let started = Instant::now();
    let ns = fj.namespace().ok_or(Error::MissingObjectKey("namespace"))?;
    let api: Api<FederatedJob> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, fj, |event| async {
        match event {
            Event::Apply(fj) => apply(fj, ctx.clone()).await,
            Event::Cleanup(fj) => cleanup(fj, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics.duration.observe(started.elapsed().as_secs_f64());
    result
}

/// After a failed reconcile: count it by kind and retry after `error_requeue`.
pub fn error_policy(fj: Arc<FederatedJob>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(federatedjob = %fj.name_any(), error = %error, kind = error.kind().as_str(), "reconcile failed");
    ctx.metrics.failure(error.kind());
    Action::requeue(ctx.config.error_requeue)
}

/// `namespace/name` and the two names of one reconcile.
struct Key {
    ns: String,
    name: String,
}

impl Key {
    fn of(fj: &FederatedJob) -> Result<Key> {
        Ok(Key {
            ns: fj.namespace().ok_or(Error::MissingObjectKey("namespace"))?,
            name: fj.metadata.name.clone().ok_or(Error::MissingObjectKey("name"))?,
        })
    }

    fn id(&self) -> String {
        format!("{}/{}", self.ns, self.name)
    }
}

/// The job's state in NATS, as far as reconcile needs it.
struct JobSync {
    state: Option<JobState>,
    top_node: Option<String>,
    created: bool,
    changed: Option<String>,
}

/// The owned function-host Deployments: per node, (name, replicas, ready).
type Owned = BTreeMap<NodeName, (String, u32, u32)>;

fn validate(fj: &FederatedJob) -> Result<(JobSpec, ScalingSpec), String> {
    let spec = fj.spec.effective_job_spec()?;
    shoal_functions::factory::validate(&spec).map_err(|e| format!("spec.jobSpec: {}", e.0))?;
    let scaling = fj.spec.scaling();
    scaling.validate().map_err(|e| match e.field() {
        Some(field) => format!("spec.{field}: {e}"),
        None => format!("spec: {e}"),
    })?;
    Ok((spec, scaling))
}

async fn apply(fj: Arc<FederatedJob>, ctx: Arc<Context>) -> Result<Action> {
    let key = Key::of(&fj)?;
    let (spec, scaling) = match validate(&fj) {
        Ok(v) => v,
        Err(message) => {
            let facts = facts(&fj, &ctx, Some(Problem::InvalidSpec(message)), None);
            finish(&fj, &ctx, &key, facts, &[]).await?;
            return Ok(Action::await_change());
        }
    };
    let sync = sync_job(&ctx, &spec, fj.spec.suspend).await?;
    let owned = list_owned(&ctx, &key, &spec.job).await?;
    let view = ctx.nats.demand.observe(&spec.job, Instant::now(), ctx.config.demand_stale_after);
    let mut names: BTreeSet<String> = owned.values().map(|(n, _, _)| n.clone()).collect();
    names.extend(view.nodes.iter().map(|n| render::deployment_name(&key.name, &n.node)));
    let conflicts = competing_autoscalers(&ctx, &key.ns, &names).await?;
    let running = sync.state.as_ref().is_some_and(|s| s.phase == JobPhase::Running) && !fj.spec.suspend;
    let ticked =
        if running && view.reporting_nodes > 0 { tick(&ctx, &key, &scaling, &view, &owned) } else { None };
    let desired = desired_hosts(&owned, ticked.as_ref().map(|t| &t.decision), running);
    apply_deployments(&fj, &ctx, &key, &desired, &owned, &conflicts).await?;
    record_metrics(&ctx, &key, &spec.job, &desired, ticked.as_ref().map(|t| &t.decision), view.num_pending);
    let desired_named: BTreeMap<String, u32> = desired.iter().map(|(n, h)| (n.to_string(), *h)).collect();
    let conflict_list: Vec<String> = conflicts.values().cloned().collect();
    let ready: BTreeMap<String, u32> = owned.iter().map(|(n, (_, _, r))| (n.to_string(), *r)).collect();
    let mut facts = facts(&fj, &ctx, sync.changed.clone().map(Problem::JobSpecChanged), sync.state.as_ref());
    facts.top_node = sync.top_node.clone();
    facts.desired = &desired_named;
    facts.conflicts = &conflict_list;
    facts.scaling = ticked.as_ref().map(|t| Scaling {
        decision: &t.decision,
        ready: &ready,
        nodes_serving_job: view.nodes_serving_job,
        last_scale_time: t.last_scale,
    });
    let mut events = Vec::new();
    if sync.created {
        events.push(normal("JobCreated", "Create", format!("created job {} in NATS", spec.job)));
    }
    let fresh_events = ticked.iter().filter(|t| t.fresh).flat_map(|t| &t.decision.events);
    events.extend(fresh_events.map(|e| normal(e.reason.as_str(), "Scale", e.message.clone())));
    finish(&fj, &ctx, &key, facts, &events).await?;
    Ok(if running {
        Action::requeue(scaling.autoscaling.tick_interval.get())
    } else {
        Action::requeue(ctx.config.idle_requeue)
    })
}

fn facts<'a>(
    fj: &'a FederatedJob,
    ctx: &Context,
    problem: Option<Problem>,
    state: Option<&'a JobState>,
) -> Facts<'a> {
    const EMPTY: &BTreeMap<String, u32> = &BTreeMap::new();
    Facts {
        now: Timestamp::now(),
        generation: fj.metadata.generation,
        previous: fj.status.as_ref(),
        problem,
        suspended: fj.spec.suspend,
        state,
        top_node: None,
        scaling: None,
        desired: EMPTY,
        conflicts: &[],
        deadline_grace_ms: u64::try_from(ctx.config.round_deadline_grace.as_millis()).unwrap_or(u64::MAX),
    }
}

/// Writes the status, then records `events` and one Event per condition transition worth
/// one.
async fn finish(
    fj: &FederatedJob,
    ctx: &Context,
    key: &Key,
    facts: Facts<'_>,
    events: &[KubeEvent],
) -> Result<()> {
    let built = status::build(&facts);
    let api: Api<FederatedJob> = Api::namespaced(ctx.client.clone(), &key.ns);
    let patch = json!({
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "FederatedJob",
        "status": built.status,
    });
    api.patch_status(&key.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map_err(Error::kube("patch FederatedJob status"))?;
    let reference = fj.object_ref(&());
    let transitions = built.transitions.iter().filter_map(transition_event);
    for event in events.iter().map(clone_event).chain(transitions) {
        ctx.recorder.publish(&event, &reference).await.map_err(Error::kube("record Event"))?;
    }
    Ok(())
}

fn normal(reason: &str, action: &str, note: String) -> KubeEvent {
    KubeEvent {
        type_: EventType::Normal,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    }
}

fn clone_event(e: &KubeEvent) -> KubeEvent {
    KubeEvent {
        type_: e.type_,
        reason: e.reason.clone(),
        note: e.note.clone(),
        action: e.action.clone(),
        secondary: e.secondary.clone(),
    }
}

/// The Event a condition transition deserves, if any.
fn transition_event(t: &status::Transition) -> Option<KubeEvent> {
    let warning = |reason: &str| KubeEvent {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(t.message.clone()),
        action: "Reconcile".into(),
        secondary: None,
    };
    match (t.kind, t.reason.as_str()) {
        (ConditionType::Ready, r @ ("InvalidSpec" | "JobSpecChanged" | "JobFailed")) => Some(warning(r)),
        (ConditionType::Ready, "JobFinished") => Some(normal("JobFinished", "Reconcile", t.message.clone())),
        (ConditionType::ScalingActive, "ConflictingAutoscaler") => Some(warning("ConflictingAutoscaler")),
        (ConditionType::RoundProgressing, "DeadlineExceeded") => Some(warning("DeadlineExceeded")),
        _ => None,
    }
}

/// Creates the job in NATS unless it exists (or the spec is suspended), and reads its state
/// and top lease.
async fn sync_job(ctx: &Context, spec: &JobSpec, suspended: bool) -> Result<JobSync> {
    let infra = &ctx.nats.infra;
    let mut created = false;
    let state = match jobs::load_state(&infra, &spec.job).await {
        Ok((state, _)) => Some(state),
        Err(e) if e.kind() == shoal_client::ErrorKind::UnknownJob && suspended => None,
        Err(e) if e.kind() == shoal_client::ErrorKind::UnknownJob => {
            match jobs::create_job(infra, spec, None).await {
                Ok(()) => created = true,
                Err(e) if e.kind() == shoal_client::ErrorKind::JobExists => {}
                Err(e) => return Err(Error::nats("create job")(e)),
            }
            Some(jobs::load_state(&infra, &spec.job).await.map_err(Error::nats("load job state"))?.0)
        }
        Err(e) => return Err(Error::nats("load job state")(e)),
    };
    let changed = match (&state, created) {
        (Some(_), false) => {
            let stored = jobs::load_spec(&infra, &spec.job).await.map_err(Error::nats("load job spec"))?;
            // The stored spec carries the limits job creation filled in from the server's
            // max_payload; compare with the CR's spec as it would have been stored.
            let published = spec.clone().with_published_limits(infra.max_payload() as u64);
            (published.as_ref() != Ok(&stored)).then(|| {
                format!(
                    "job {} exists in NATS with a different spec; a job spec cannot change (create a new job id)",
                    spec.job
                )
            })
        }
        _ => None,
    };
    let top_node = top_node(infra, &spec.job).await;
    Ok(JobSync { state, top_node, created, changed })
}

/// The node holding the job's top lease (`<job>.top` in KV `shoal-jobs`), if readable.
async fn top_node(infra: &Infra, job: &JobId) -> Option<String> {
    let key = shoal_proto::subjects::top_lease_key(job);
    let (bytes, _) = jobs::read_key(&infra.js, &infra.subjects.jobs_bucket(), &key).await.ok().flatten()?;
    let lease: shoal_proto::cluster::Lease = shoal_proto::decode("top lease", &bytes).ok()?;
    Some(lease.node.to_string())
}

async fn list_owned(ctx: &Context, key: &Key, job: &JobId) -> Result<Owned> {
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &key.ns);
    let list = api
        .list(&ListParams::default().labels(&render::job_selector(job.as_str())))
        .await
        .map_err(Error::kube("list function-host Deployments"))?;
    let mut owned = Owned::new();
    for d in list.items {
        let owner = d
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.kind == "FederatedJob" && o.name == key.name);
        let node_text = d
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_NODE))
            .or_else(|| d.metadata.labels.as_ref().and_then(|l| l.get(LABEL_NODE)));
        let (Some(name), Some(node), true) =
            (d.metadata.name.clone(), node_text.and_then(|n| NodeName::new(n.as_str()).ok()), owner)
        else {
            continue;
        };
        let replicas = d.spec.replicas.map_or(1, |r| u32::try_from(r).unwrap_or(0));
        let ready =
            d.status.as_ref().and_then(|s| s.ready_replicas).map_or(0, |r| u32::try_from(r).unwrap_or(0));
        owned.insert(node, (name, replicas, ready));
    }
    Ok(owned)
}

/// Deployment name → who else scales it (HPA v2, or a KEDA ScaledObject).
async fn competing_autoscalers(
    ctx: &Context,
    ns: &str,
    names: &BTreeSet<String>,
) -> Result<BTreeMap<String, String>> {
    let mut found = BTreeMap::new();
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(ctx.client.clone(), ns);
    for hpa in
        hpas.list(&ListParams::default()).await.map_err(Error::kube("list HorizontalPodAutoscalers"))?
    {
        let t = &hpa.spec.scale_target_ref;
        if t.kind == "Deployment" && names.contains(&t.name) {
            found.insert(
                t.name.clone(),
                format!("HorizontalPodAutoscaler {ns}/{} targets Deployment {}", hpa.name_any(), t.name),
            );
        }
    }
    let gvk = GroupVersionKind::gvk("keda.sh", "v1alpha1", "ScaledObject");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "scaledobjects");
    let scaled: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, &resource);
    match scaled.list(&ListParams::default()).await {
        Ok(list) => {
            for so in list {
                let target = &so.data["spec"]["scaleTargetRef"];
                let kind = target["kind"].as_str().unwrap_or("Deployment");
                if let Some(name) =
                    target["name"].as_str().filter(|n| kind == "Deployment" && names.contains(*n))
                {
                    found.insert(
                        name.to_owned(),
                        format!("KEDA ScaledObject {ns}/{} targets Deployment {name}", so.name_any()),
                    );
                }
            }
        }
        // No ScaledObject CRD: KEDA is not installed, so nothing can target us.
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(Error::kube("list KEDA ScaledObjects")(e)),
    }
    Ok(found)
}

/// The decision in force for a job.
struct Ticked {
    decision: Decision,
    /// Whether this reconcile made it (its events are new).
    fresh: bool,
    last_scale: Option<Timestamp>,
}

/// Ticks the job's autoscaler if a `tickInterval` has passed since its last tick; else returns
/// the last decision.
fn tick(
    ctx: &Context,
    key: &Key,
    scaling: &ScalingSpec,
    view: &crate::demand::JobDemandView,
    owned: &Owned,
) -> Option<Ticked> {
    let mut scalers = ctx.scalers.lock().ok()?;
    let now = Instant::now();
    let stale = scalers.get(&key.id()).is_some_and(|j| j.policy != *scaling);
    if stale || !scalers.contains_key(&key.id()) {
        // `validate` accepted the policy, so this does not fail; if it did, nothing is decided.
        let autoscaler = Autoscaler::new(scaling).ok()?;
        let job = JobScaler {
            policy: scaling.clone(),
            autoscaler,
            origin: now,
            last_tick: None,
            last_scale: None,
            last: None,
        };
        scalers.insert(key.id(), job);
    }
    let entry = scalers.get_mut(&key.id())?;
    let interval = scaling.autoscaling.tick_interval.get();
    if let (Some(t), Some(last)) = (entry.last_tick, &entry.last) {
        if now.saturating_duration_since(t) < interval {
            return Some(Ticked { decision: last.clone(), fresh: false, last_scale: entry.last_scale });
        }
    }
    entry.last_tick = Some(now);
    let obs = Observation {
        now: now.saturating_duration_since(entry.origin),
        nodes: view.nodes.clone(),
        num_pending: view.num_pending,
        current: owned.iter().filter(|(_, (_, r, _))| *r > 0).map(|(n, (_, r, _))| (n.clone(), *r)).collect(),
    };
    let decision = entry.autoscaler.tick(&obs);
    if decision.total != decision.current_total {
        entry.last_scale = Some(Timestamp::now());
    }
    entry.last = Some(decision.clone());
    Some(Ticked { decision, fresh: true, last_scale: entry.last_scale })
}

/// Hosts per node to write: the decision's; else, while running, the Deployments as they
/// are; else (suspended, ended) zero everywhere.
fn desired_hosts(owned: &Owned, fresh: Option<&Decision>, running: bool) -> BTreeMap<NodeName, u32> {
    match fresh {
        // A node with no host and no Deployment gets none (fit strategies place only where
        // updates are staged; the decision lists every reporting node, zeros included).
        Some(d) => d
            .desired
            .iter()
            .filter(|(n, h)| **h > 0 || owned.contains_key(*n))
            .map(|(n, h)| (n.clone(), *h))
            .collect(),
        None if running => owned.iter().map(|(n, (_, r, _))| (n.clone(), *r)).collect(),
        None => owned.keys().map(|n| (n.clone(), 0)).collect(),
    }
}

async fn apply_deployments(
    fj: &FederatedJob,
    ctx: &Context,
    key: &Key,
    desired: &BTreeMap<NodeName, u32>,
    owned: &Owned,
    conflicts: &BTreeMap<String, String>,
) -> Result<()> {
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &key.ns);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for (node, hosts) in desired {
        let d = render::function_host_deployment(fj, node, *hosts, &ctx.config);
        let name = d.metadata.name.clone().unwrap_or_default();
        if conflicts.contains_key(&name) {
            continue;
        }
        api.patch(&name, &params, &Patch::Apply(&d))
            .await
            .map_err(Error::kube("apply function-host Deployment"))?;
    }
    for (node, (name, _, _)) in owned {
        if desired.contains_key(node) || conflicts.contains_key(name) {
            continue;
        }
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(Error::kube("delete function-host Deployment")(e)),
        }
    }
    Ok(())
}

fn record_metrics(
    ctx: &Context,
    key: &Key,
    job: &JobId,
    desired: &BTreeMap<NodeName, u32>,
    decision: Option<&Decision>,
    num_pending: u64,
) {
    let m = &ctx.metrics;
    for (node, hosts) in desired {
        let labels = NodeLabels { namespace: key.ns.clone(), job: job.to_string(), node: node.to_string() };
        m.desired_hosts.get_or_create(&labels).set(i64::from(*hosts));
    }
    m.num_pending.set(i64::try_from(num_pending).unwrap_or(i64::MAX));
    if let Some(d) = decision {
        let labels = JobLabels { namespace: key.ns.clone(), job: job.to_string() };
        m.staged_backlog.get_or_create(&labels).set(i64::try_from(d.backlog).unwrap_or(i64::MAX));
        m.panic.get_or_create(&labels).set(i64::from(d.mode == crate::autoscaler::Mode::Panic));
    }
}

async fn cleanup(fj: Arc<FederatedJob>, ctx: Arc<Context>) -> Result<Action> {
    let key = Key::of(&fj)?;
    let job = &fj.spec.job_spec.job;
    let cancelled = cancel_job(&ctx, job).await?;
    let owned = list_owned(&ctx, &key, job).await?;
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &key.ns);
    for (name, _, _) in owned.values() {
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(Error::kube("delete function-host Deployment")(e)),
        }
    }
    if let Ok(mut scalers) = ctx.scalers.lock() {
        scalers.remove(&key.id());
    }
    let note = if cancelled {
        format!("cancelled job {job} in NATS and deleted {} function-host Deployment(s)", owned.len())
    } else {
        format!("job {job} was not running; deleted {} function-host Deployment(s)", owned.len())
    };
    let event = normal("JobCancelled", "Delete", note);
    ctx.recorder.publish(&event, &fj.object_ref(&())).await.map_err(Error::kube("record Event"))?;
    Ok(Action::await_change())
}

/// The reason a job cancelled by deleting its FederatedJob gives.
pub const CANCEL_REASON: &str = "the FederatedJob was deleted";

/// Writes `Cancelled` into a running job's state by compare-and-set;
/// `false` when the job is absent or already ended.
async fn cancel_job(ctx: &Context, job: &JobId) -> Result<bool> {
    let infra = &ctx.nats.infra;
    for _ in 0..ctx.config.cancel_attempts {
        let (mut state, revision) = match jobs::load_state(&infra, job).await {
            Ok(s) => s,
            Err(e) if e.kind() == shoal_client::ErrorKind::UnknownJob => return Ok(false),
            Err(e) => return Err(Error::nats("load job state")(e)),
        };
        if state.phase != JobPhase::Running {
            return Ok(false);
        }
        state.phase = JobPhase::Cancelled { reason: CANCEL_REASON.into() };
        match jobs::cas_state(infra, job, &state, revision).await.map_err(Error::nats("cancel job"))? {
            CasOutcome::Written(_) => return Ok(true),
            CasOutcome::Conflict => continue,
        }
    }
    Err(Error::CancelConflict { job: job.to_string(), attempts: ctx.config.cancel_attempts })
}

/// Runs the controller (watching `FederatedJob`s in `namespace`, or in every namespace, and
/// the function-host Deployments they own) until `shutdown` resolves.
///
/// # Errors
/// [`Error::Kube`] when `FederatedJob`s cannot be listed (the CRD is not installed, or RBAC
/// forbids it).
pub async fn run<F>(ctx: Arc<Context>, namespace: Option<&str>, shutdown: F) -> Result<()>
where
    F: std::future::Future<Output = ()> + Send + Sync + 'static,
{
    use futures::StreamExt;
    use kube::runtime::{watcher, Controller};
    let client = ctx.client.clone();
    let (jobs, deployments): (Api<FederatedJob>, Api<Deployment>) = match namespace {
        Some(ns) => (Api::namespaced(client.clone(), ns), Api::namespaced(client, ns)),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    jobs.list(&ListParams::default().limit(1))
        .await
        .map_err(Error::kube("list FederatedJobs (is the CRD installed?)"))?;
    let owned =
        watcher::Config::default().labels(&format!("{}={}", render::LABEL_COMPONENT, render::COMPONENT));
    Controller::new(jobs, watcher::Config::default().any_semantic())
        .owns(deployments, owned)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile round");
            }
        })
        .await;
    Ok(())
}
