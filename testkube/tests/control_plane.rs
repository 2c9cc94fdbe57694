//! The control plane itself: it starts, is the version the tools script pins, authenticates the
//! admin as `system:masters`, serves Go clients through its kubeconfig, and leaves nothing behind.

mod common;

use std::path::Path;
use std::process::Command;

use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use kube::api::{Api, PostParams};
use shoal_testkube::{ControlPlane, ControlPlaneConfig, ErrorKind, ADMIN_GROUP, ADMIN_USER};

#[tokio::test]
async fn starts_and_reports_kubernetes_1_37() -> anyhow::Result<()> {
    let plane = common::start().await?;
    let version = plane.client().apiserver_version().await?;
    assert_eq!((version.major.as_str(), version.minor.as_str()), ("1", "37"), "{version:?}");
    assert!(version.git_version.starts_with("v1.37."), "{version:?}");
    assert!(plane.etcd_version().starts_with("3.6."), "etcd {}", plane.etcd_version());
    // A second client, built from the kubeconfig file, reaches the same server.
    let again = plane.new_client().await?.apiserver_version().await?;
    assert_eq!(again.git_version, version.git_version);

    // The client is the admin of the throwaway PKI, in system:masters.
    let review = Api::<SelfSubjectReview>::all(plane.client())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await?;
    let user = review.status.and_then(|s| s.user_info).unwrap_or_default();
    assert_eq!(user.username.as_deref(), Some(ADMIN_USER));
    assert!(user.groups.unwrap_or_default().iter().any(|g| g == ADMIN_GROUP));
    Ok(())
}

#[tokio::test]
async fn a_go_client_works_with_the_kubeconfig() -> anyhow::Result<()> {
    let plane = common::start().await?;
    let helm = ControlPlaneConfig::from_env().binary("helm");
    let output = Command::new(&helm)
        .args(["list", "--all-namespaces", "--kubeconfig"])
        .arg(plane.kubeconfig_path())
        .output()
        .map_err(|e| anyhow::anyhow!("{}: {e} (build it with tools/build-go-tools.sh)", helm.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "helm list failed: {stderr}");
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("NAME"), "{output:?}");
    Ok(())
}

#[tokio::test]
async fn drop_kills_both_processes_and_removes_the_temp_dir() -> anyhow::Result<()> {
    let plane = common::start().await?;
    let pids = plane.process_ids();
    let dir = plane.work_dir().to_owned();
    for pid in pids {
        assert!(Path::new(&format!("/proc/{pid}")).exists(), "pid {pid} not running while up");
    }
    assert!(dir.join("kubeconfig").is_file());
    drop(plane);
    for pid in pids {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "pid {pid} still there after drop");
    }
    assert!(!dir.exists(), "{} left behind", dir.display());
    Ok(())
}

#[tokio::test]
async fn missing_binaries_fail_with_the_build_script_named() -> anyhow::Result<()> {
    let empty = tempfile::tempdir()?;
    let config = ControlPlaneConfig { tools_dir: empty.path().to_owned(), ..ControlPlaneConfig::default() };
    let err = ControlPlane::start_with(config).await.expect_err("started without binaries");
    assert_eq!(err.kind(), ErrorKind::MissingBinary);
    let text = err.to_string();
    assert!(text.contains("tools/build-go-tools.sh") && text.contains("bin/etcd"), "{text}");
    Ok(())
}
