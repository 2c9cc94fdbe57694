//! Support shared by the operator's real-API-server tests (`apiserver.rs`, `chart.rs`).

#![allow(dead_code)] // each test file uses its own part

use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::{json, Value};
use shoal_client::Infra;
use shoal_proto::cluster::{DemandReport, JobDemand};
use shoal_proto::{JobId, NodeId};

/// A FederatedJob `name` in namespace `fl` running job `job` for `rounds` rounds (FedAvg, a
/// cohort of 2, one tensor of 10 f32).
pub fn federated_job(name: &str, job: &str, rounds: u64) -> Value {
    json!({
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": name, "namespace": "fl"},
        "spec": {
            "jobSpec": {
                "job": job,
                "manifest": {"tensors": [{"name": "w", "dtype": "F32", "shape": [10]}]},
                "strategy": {"name": "fedavg"},
                "round_policy": {"mode": "sync", "cohort_size": 2, "min_clients": 1, "deadline_ms": 600000},
                "rounds": rounds
            },
            "hierarchy": {"fanIn": 2},
            "autoscaling": {"maxHosts": 20}
        }
    })
}

/// A child process (the operator), killed on drop.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `check` every 200 ms until it returns `Some`, or fails after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Publishes node-a's (20 updates/s, 5 staged) and node-b's (3/s, 1 staged) demand for `job`
/// every 500 ms, as their gateways would.
pub fn publish_demand(infra: &Infra, job: &str) -> tokio::task::JoinHandle<()> {
    let client = infra.client.clone();
    let subjects = infra.subjects.clone();
    let job = JobId::new(job).unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        loop {
            for (node, rate, backlog) in [("node-a", 20.0, 5), ("node-b", 3.0, 1)] {
                let node = NodeId::new(node).unwrap_or_else(|e| panic!("{e}"));
                let report = DemandReport {
                    node: node.clone(),
                    at_ms: 0,
                    num_pending: 0,
                    jobs: vec![JobDemand { job: job.clone(), arrivals_per_second: rate, backlog, hosts: 0 }],
                };
                let _ = client.publish(subjects.demand(&node), shoal_proto::encode(&report).into()).await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}
