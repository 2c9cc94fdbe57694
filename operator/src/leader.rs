//! Leader election, so that two operator replicas are safe (R6.9): only the holder of the
//! `coordination.k8s.io/v1` Lease `shoal-operator` (in the operator's namespace) reconciles.
//!
//! Built on `kube-lease-manager` (0.13, made for kube 5 and k8s-openapi 0.29): it takes and
//! renews the Lease by server-side apply with conflict detection, tolerates clock skew with a
//! grace period, and releases the Lease when dropped. A replica that loses the Lease stops
//! reconciling at once and exits with an error, so its pod restarts as a standby (what
//! client-go's leader election does); the standby takes over once the Lease expires.

use std::time::Duration;

use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;

/// Lease timings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// The Lease's name.
    pub name: String,
    /// Its namespace (the operator's own).
    pub namespace: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// How long a Lease stays valid after its last renewal (client-go's default 15 s).
    pub duration: Duration,
    /// How long before expiry the holder renews (also the clock skew tolerated; 5 s).
    pub grace: Duration,
}

/// Starts competing for the Lease; the receiver turns `true` while this replica leads.
///
/// # Errors
/// The API server refused to read or create the Lease.
pub async fn elect(
    client: kube::Client,
    cfg: &LeaseConfig,
) -> Result<watch::Receiver<bool>, LeaseManagerError> {
    let manager = LeaseManagerBuilder::new(client, &cfg.name)
        .with_namespace(&cfg.namespace)
        .with_identity(&cfg.identity)
        .with_duration(cfg.duration.as_secs().max(2))
        .with_grace(cfg.grace.as_secs().max(1))
        .with_field_manager(crate::config::FIELD_MANAGER)
        .build()
        .await?;
    let (rx, _task) = manager.watch().await;
    Ok(rx)
}

/// Waits until `rx` says this replica leads.
///
/// # Errors
/// The election task ended.
pub async fn until_leader(rx: &mut watch::Receiver<bool>) -> Result<(), watch::error::RecvError> {
    while !*rx.borrow_and_update() {
        rx.changed().await?;
    }
    Ok(())
}

/// Resolves when this replica stops leading (or the election task ends).
pub async fn until_lost(rx: &mut watch::Receiver<bool>) {
    while *rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}
