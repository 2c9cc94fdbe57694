//! Shared by the real-API-server tests: start a control plane and say how long it took.

use shoal_testkube::ControlPlane;

/// Starts a control plane from `$SHOAL_TOOLS` (failing, never skipping, when the binaries are
/// missing) and prints its start-up times (shown with `--nocapture`).
pub async fn start() -> anyhow::Result<ControlPlane> {
    let plane = ControlPlane::start().await?;
    let s = plane.startup();
    eprintln!(
        "control plane ready in {:.2} s (etcd {:.2} s, kube-apiserver {:.2} s) at {}",
        s.total.as_secs_f64(),
        s.etcd.as_secs_f64(),
        s.apiserver.as_secs_f64(),
        plane.server_url()
    );
    Ok(plane)
}
