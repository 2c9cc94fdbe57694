//! Reconcile against a mocked API server (kube-rs/controller-rs `fixtures.rs`): a
//! [`tower_test`] service stands in for the API server, and an [`ApiServerVerifier`] expects an
//! exact sequence of calls (method, path, query parameters, body fields) and answers each one.
//! NATS is real: every test starts its own nats-server (`shoal_natsd`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, Request, Response};
use kube::client::Body;
use kube::runtime::controller::Action;
use serde_json::{json, Value};
use shoal_client::{ConnectOptions, Infra};
use shoal_natsd::NatsServer;
use shoal_proto::cluster::{DemandReport, JobDemand};
use shoal_proto::{JobId, NodeId};

use crate::config::OperatorConfig;
use crate::controller::{self, Context, Diagnostics, Nats};
use crate::crd::FederatedJob;
use crate::demand::DemandBook;
use crate::error::Result;
use crate::metrics::Metrics;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// Plays the API server: each `expect` takes the next request, checks it and answers.
pub struct ApiServerVerifier(Handle);

/// One request as the verifier saw it.
pub struct Seen {
    /// The JSON body (`Null` when empty).
    pub body: Value,
    respond: tower_test::mock::SendResponse<Response<Body>>,
}

impl Seen {
    /// Answers with `status` and a JSON body.
    pub fn reply(self, status: u16, body: &Value) {
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        let response = Response::builder().status(status).body(Body::from(bytes));
        self.respond.send_response(response.unwrap_or_else(|_| Response::new(Body::empty())));
    }

    /// Answers a status patch: the `FederatedJob` with the patched status.
    pub fn reply_status(self) {
        let mut object = serde_json::to_value(federated_job(true)).unwrap_or_default();
        object["status"] = self.body["status"].clone();
        self.reply(200, &object);
    }

    /// Answers 200 with the request's own body (what an apply or a create returns, roughly).
    pub fn echo(self) {
        let body = self.body.clone();
        self.reply(200, &body);
    }
}

/// The query parameters as a sorted set of `key=value` (order is the client's business).
fn query_set(query: Option<&str>) -> BTreeSet<String> {
    query.unwrap_or_default().split('&').filter(|p| !p.is_empty()).map(str::to_owned).collect()
}

impl ApiServerVerifier {
    /// Takes the next request and asserts its method, path and query parameters.
    pub async fn expect(&mut self, method: Method, path: &str, query: &[&str]) -> Seen {
        let (request, respond) =
            self.0.next_request().await.unwrap_or_else(|| panic!("no request; expected {method} {path}"));
        assert_eq!((request.method(), request.uri().path()), (&method, path), "unexpected call");
        let wanted: BTreeSet<String> = query.iter().map(|q| (*q).to_owned()).collect();
        assert_eq!(query_set(request.uri().query()), wanted, "query of {method} {path}");
        let bytes = request.into_body().collect_bytes().await.unwrap_or_default();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        Seen { body, respond }
    }

    /// Asserts that no further request comes.
    pub async fn done(mut self) {
        let next = tokio::time::timeout(Duration::from_millis(200), self.0.next_request()).await;
        if let Ok(Some((request, _))) = next {
            panic!("unexpected extra call {} {}", request.method(), request.uri());
        }
    }
}

/// `fieldManager=shoal-operator&force=true`: every server-side apply.
pub const SSA: &[&str] = &["fieldManager=shoal-operator", "force=true"];
/// The list of the job's function-host Deployments.
pub const DEPLOYMENTS_QUERY: &[&str] =
    &["labelSelector=app.kubernetes.io%2Fcomponent%3Dfunction-host%2Cshoal.dev%2Fjob%3Dmnist-job"];
/// Paths.
pub const FJ_PATH: &str = "/apis/shoal.dev/v1alpha1/namespaces/fl/federatedjobs/mnist";
/// The status subresource.
pub const STATUS_PATH: &str = "/apis/shoal.dev/v1alpha1/namespaces/fl/federatedjobs/mnist/status";
/// Deployments of namespace `fl`.
pub const DEPLOYMENTS_PATH: &str = "/apis/apps/v1/namespaces/fl/deployments";
/// HPAs of namespace `fl`.
pub const HPA_PATH: &str = "/apis/autoscaling/v2/namespaces/fl/horizontalpodautoscalers";
/// KEDA ScaledObjects of namespace `fl`.
pub const KEDA_PATH: &str = "/apis/keda.sh/v1alpha1/namespaces/fl/scaledobjects";
/// Events of namespace `fl`.
pub const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/fl/events";

/// An empty list of `kind`.
pub fn empty_list(api_version: &str, kind: &str) -> Value {
    json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": "1"}, "items": []})
}

/// A `Status` failure with `code`.
pub fn status_error(code: u16, reason: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
           "message": format!("mock {reason}"), "reason": reason, "code": code})
}

/// A test's world: a real nats-server, a context on a mocked API server, and its verifier.
pub struct World {
    /// The nats-server (killed on drop).
    pub nats: NatsServer,
    /// The context reconcile gets.
    pub ctx: Arc<Context>,
    /// The mocked API server.
    pub api: ApiServerVerifier,
}

impl World {
    /// Starts nats-server, connects and provisions, builds the context.
    pub async fn start() -> World {
        let nats = NatsServer::start().unwrap_or_else(|e| panic!("{e}"));
        let opts = ConnectOptions { url: nats.url(), ..ConnectOptions::default() };
        let infra = Infra::connect(&opts).await.unwrap_or_else(|e| panic!("{e}"));
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        let config =
            OperatorConfig { nats_url: "nats://nats.shoal:4222".into(), ..OperatorConfig::default() };
        let ctx = Context::new(
            client,
            Nats { infra, demand: Arc::new(DemandBook::default()) },
            config,
            Arc::new(Metrics::default()),
            Diagnostics::new(Some("test".into())),
        );
        World { nats, ctx: Arc::new(ctx), api: ApiServerVerifier(handle) }
    }

    /// Records a demand report of `node` listing `jobs` as `(job, updates/s, backlog)`.
    pub fn report(&self, node: &str, jobs: &[(&str, f64, u64)]) {
        let report = DemandReport {
            node: NodeId::new(node).unwrap_or_else(|e| panic!("{e}")),
            at_ms: 0,
            num_pending: 0,
            jobs: jobs
                .iter()
                .map(|(job, rate, backlog)| JobDemand {
                    job: JobId::new(*job).unwrap_or_else(|e| panic!("{e}")),
                    arrivals_per_second: *rate,
                    backlog: *backlog,
                    hosts: 0,
                })
                .collect(),
        };
        self.ctx.nats.demand.record(None, report, Instant::now()).unwrap_or_else(|e| panic!("{e:?}"));
    }

    /// Runs one reconcile while `script` plays the API server; returns reconcile's result.
    pub async fn reconcile<F, Fut>(
        self,
        fj: FederatedJob,
        script: F,
    ) -> (Result<Action>, Arc<Context>, NatsServer)
    where
        F: FnOnce(ApiServerVerifier) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let verifier = tokio::spawn(script(self.api));
        let result = tokio::time::timeout(
            Duration::from_secs(10),
            controller::reconcile(Arc::new(fj), self.ctx.clone()),
        )
        .await
        .unwrap_or_else(|_| panic!("reconcile hung"));
        tokio::time::timeout(Duration::from_secs(2), verifier)
            .await
            .unwrap_or_else(|_| {
                panic!("the verifier timed out waiting for a call; reconcile returned {result:?}")
            })
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        (result, self.ctx, self.nats)
    }
}

/// A `FederatedJob` `fl/mnist` (job id `mnist-job`, sync rounds of 4, quorum 2).
pub fn federated_job(finalized: bool) -> FederatedJob {
    let mut value = json!({
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "mnist", "namespace": "fl", "uid": "uid-1", "generation": 1, "resourceVersion": "7"},
        "spec": {
            "jobSpec": {
                "job": "mnist-job",
                "manifest": {"tensors": [{"name": "w", "dtype": "F32", "shape": [10]}]},
                "round_policy": {"mode": "sync", "cohort_size": 4, "min_clients": 2, "deadline_ms": 60000},
                "rounds": 3
            }
        }
    });
    if finalized {
        value["metadata"]["finalizers"] = json!([crate::crd::FINALIZER]);
    }
    serde_json::from_value(value).unwrap_or_else(|e| panic!("{e}"))
}

#[cfg(test)]
mod tests;
