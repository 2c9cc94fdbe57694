//! The Helm chart (`charts/shoal`) against the real tools: helm v4 from `$SHOAL_TOOLS/bin`
//! (`tools/build-go-tools.sh`), `kubernetes-validate` (PyPI, on `PATH`), and a real
//! kube-apiserver v1.37 + etcd (`shoal-testkube`) with the real `shoal-operator` binary and a real
//! nats-server.
//!
//! - `helm lint --strict` passes for the default values and every value set in
//!   `charts/shoal/ci/` (external NATS, TLS with cert-manager and nkeys, split mode with eBPF off
//!   and required, monitoring on, a private registry with one watched namespace);
//! - `helm template` of each, piped into `kubernetes-validate --strict` for Kubernetes 1.33.0 and
//!   1.37.0, has no error;
//! - values.schema.json refuses wrong types and unknown keys (helm template and helm lint both
//!   fail, naming the key), and the cross-value checks fail with their message;
//! - `helm package` makes the archive, and it renders;
//! - the only images are the configured ones; probes are `/healthz` and `/readyz` on a named port
//!   bound to 0.0.0.0; no hostPort, no hostPath outside split mode's shared memory (and eBPF's
//!   cgroup), every namespaced object in the release namespace; capabilities only where eBPF is on;
//! - every value set's rendered manifests are applied with server-side apply (CRDs first) to the
//!   real API server and every object is accepted (cert-manager's and the Prometheus Operator's
//!   CRDs are installed first from `tests/fixtures/crds`), and so is docs/examples/federatedjob.yaml
//!   against the CRD the chart installs; then the operator **as the chart runs
//!   it** (its rendered arguments and environment, its ServiceAccount's RBAC by impersonation, the
//!   function-host template from the rendered ConfigMap) reconciles a FederatedJob: the job is
//!   created in NATS, function-host Deployments appear with the chart's image and defaults, the
//!   status turns Running, the leader Lease and the Events are written.
//!
//! helm or kubernetes-validate missing: every test says so loudly and passes, unless
//! `SHOAL_CHART_TOOLS_REQUIRED=1` or `CI` is set (`.ci/run`), where it fails.

mod common;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, PostParams};
use serde_json::{json, Value};
use shoal_client::{jobs, ConnectOptions, Infra};
use shoal_natsd::NatsServer;
use shoal_operator::crd::{FederatedJob, Phase};
use shoal_proto::JobId;
use shoal_testkube::{apply_stream, ApplyOptions, ControlPlane, DEFAULT_TOOLS_DIR, TOOLS_ENV};

use common::{eventually, federated_job, publish_demand, Killed};

/// The repository root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart_dir() -> PathBuf {
    root().join("charts/shoal")
}

/// The value sets: `None` is the chart's defaults, then every `charts/shoal/ci/*-values.yaml`.
fn value_sets() -> Result<Vec<Option<PathBuf>>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart_dir().join("ci"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with("-values.yaml"))
        .collect();
    files.sort();
    Ok(std::iter::once(None).chain(files.into_iter().map(Some)).collect())
}

fn set_name(set: &Option<PathBuf>) -> String {
    set.as_ref().and_then(|p| p.file_name()).map_or_else(
        || "default".to_owned(),
        |n| n.to_string_lossy().trim_end_matches("-values.yaml").to_owned(),
    )
}

/// The tools, or `None` (after a loud message) when one is missing and they are not required.
struct Tools {
    helm: PathBuf,
    validate: PathBuf,
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|dir| dir.join(name)).find(|p| p.is_file()))
}

fn tools() -> Option<Tools> {
    let dir = std::env::var_os(TOOLS_ENV).map_or_else(|| PathBuf::from(DEFAULT_TOOLS_DIR), PathBuf::from);
    let helm = dir.join("bin/helm");
    let validate = find_on_path("kubernetes-validate");
    let required = std::env::var("SHOAL_CHART_TOOLS_REQUIRED").is_ok_and(|v| v == "1")
        || std::env::var_os("CI").is_some_and(|v| !v.is_empty());
    let missing: Vec<String> = [
        (!helm.is_file())
            .then(|| format!("helm ({} — build it with tools/build-go-tools.sh helm)", helm.display())),
        validate
            .is_none()
            .then(|| "kubernetes-validate (pip install kubernetes-validate==1.37.0)".to_owned()),
    ]
    .into_iter()
    .flatten()
    .collect();
    if missing.is_empty() {
        return Some(Tools { helm, validate: validate.unwrap_or_default() });
    }
    assert!(!required, "the chart tests need {}", missing.join(" and "));
    eprintln!(
        "\n!!! SKIPPED: the chart test needs {} (set SHOAL_CHART_TOOLS_REQUIRED=1 to fail instead)\n",
        missing.join(" and ")
    );
    None
}

struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn run(program: &Path, args: &[&str], stdin: Option<&str>) -> Result<Output> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", program.display()))?;
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().context("stdin")?;
        let text = text.to_owned();
        // A writer thread, so that a child filling its stdout pipe cannot deadlock us.
        std::thread::spawn(move || {
            let _ = pipe.write_all(text.as_bytes());
        });
    }
    let out = child.wait_with_output()?;
    Ok(Output {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// `helm template <release> charts/shoal -n <namespace> [-f set] [args]`.
fn template(
    t: &Tools,
    release: &str,
    namespace: &str,
    set: &Option<PathBuf>,
    extra: &[&str],
) -> Result<Output> {
    let chart = chart_dir();
    let mut args = vec!["template", release, chart.to_str().context("chart path")?, "--namespace", namespace];
    let file;
    if let Some(path) = set {
        file = path.to_string_lossy().into_owned();
        args.extend(["--values", &file]);
    }
    args.extend(extra);
    run(&t.helm, &args, None)
}

fn rendered(
    t: &Tools,
    release: &str,
    namespace: &str,
    set: &Option<PathBuf>,
    extra: &[&str],
) -> Result<String> {
    let out = template(t, release, namespace, set, extra)?;
    ensure!(out.ok, "helm template ({}) failed:\n{}", set_name(set), out.stderr);
    Ok(out.stdout)
}

/// The rendered documents as JSON values (empty documents dropped).
fn documents(yaml: &str) -> Result<Vec<Value>> {
    let objects = shoal_testkube::parse_stream(yaml)?;
    objects.into_iter().map(|o| serde_json::to_value(o).context("object to JSON")).collect()
}

/// The pod template spec of a workload, if it is one.
fn pod_spec(doc: &Value) -> Option<&Value> {
    match doc["kind"].as_str()? {
        "Deployment" | "DaemonSet" | "StatefulSet" => Some(&doc["spec"]["template"]["spec"]),
        "Pod" => Some(&doc["spec"]),
        _ => None,
    }
}

fn containers(spec: &Value) -> Vec<&Value> {
    ["initContainers", "containers"].iter().filter_map(|k| spec[*k].as_array()).flatten().collect()
}

fn is_shoal(doc: &Value) -> bool {
    doc["metadata"]["labels"]["app.kubernetes.io/name"] == "shoal"
}

fn find<'a>(docs: &'a [Value], kind: &str, component: &str) -> Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["labels"]["app.kubernetes.io/component"] == component)
        .with_context(|| format!("no {kind} for {component}"))
}

#[test]
fn helm_lint_strict_passes_for_every_value_set() -> Result<()> {
    let Some(t) = tools() else { return Ok(()) };
    let sets = value_sets()?;
    assert!(sets.len() >= 6, "default + at least five value sets, found {}", sets.len());
    let chart = chart_dir();
    for set in &sets {
        let mut args = vec!["lint".to_owned(), "--strict".to_owned(), chart.to_string_lossy().into_owned()];
        if let Some(p) = set {
            args.extend(["--values".to_owned(), p.to_string_lossy().into_owned()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run(&t.helm, &args, None)?;
        assert!(
            out.ok && out.stdout.contains("0 chart(s) failed"),
            "helm lint {}:\n{}{}",
            set_name(set),
            out.stdout,
            out.stderr
        );
        eprintln!("helm lint --strict {}: ok", set_name(set));
    }
    Ok(())
}

#[test]
fn every_value_set_renders_manifests_kubernetes_1_33_and_1_37_accept() -> Result<()> {
    let Some(t) = tools() else { return Ok(()) };
    for set in value_sets()? {
        let yaml = rendered(&t, "shoal", "shoal-system", &set, &[])?;
        let count = documents(&yaml)?.len();
        for version in ["1.33.0", "1.37.0"] {
            let out = run(&t.validate, &["--strict", "-k", version, "-"], Some(&yaml))?;
            let errors: Vec<&str> =
                out.stdout.lines().chain(out.stderr.lines()).filter(|l| l.starts_with("ERROR")).collect();
            assert!(
                out.ok && errors.is_empty(),
                "kubernetes-validate -k {version} on {}:\n{}{}",
                set_name(&set),
                out.stdout,
                out.stderr
            );
            let warned =
                out.stdout.lines().chain(out.stderr.lines()).filter(|l| l.starts_with("WARN")).count();
            eprintln!(
                "{}: {count} objects, kubernetes-validate --strict -k {version}: 0 errors ({warned} custom resources without a schema)",
                set_name(&set)
            );
        }
    }
    Ok(())
}

/// A values file with a wrong type or an unknown key is refused by values.schema.json, by both
/// `helm template` and `helm lint`, with the offending key named.
#[test]
fn the_schema_refuses_wrong_types_and_unknown_keys() -> Result<()> {
    let Some(t) = tools() else { return Ok(()) };
    let dir = tempfile::tempdir()?;
    let cases: [(&str, &str, &str); 8] = [
        ("replicas-as-text", "operator:\n  replicas: two\n", "/operator/replicas"),
        ("unknown-top-level", "gatway:\n  mode: node\n", "additional properties 'gatway'"),
        ("unknown-nested", "gateway:\n  shm:\n    budgetMib: 10\n", "additional properties 'budgetMib'"),
        ("unknown-under-nats", "nats:\n  tsl:\n    enabled: true\n", "additional properties 'tsl'"),
        ("mode-not-an-enum", "gateway:\n  mode: sidecar\n", "/gateway/mode"),
        ("auth-mode", "nats:\n  auth:\n    mode: password\n", "/nats/auth/mode"),
        ("port-as-text", "operator:\n  httpPort: \"8080\"\n", "/operator/httpPort"),
        ("labels-not-strings", "global:\n  labels:\n    team: 7\n", "/global/labels/team"),
    ];
    let chart = chart_dir();
    let chart = chart.to_string_lossy();
    for (name, body, needle) in cases {
        let file = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&file, body)?;
        let file = file.to_string_lossy();
        let out = run(&t.helm, &["template", "x", &chart, "--values", &file], None)?;
        assert!(!out.ok, "{name}: helm template accepted it");
        assert!(out.stderr.contains(needle), "{name}: expected {needle:?} in:\n{}", out.stderr);
        let lint = run(&t.helm, &["lint", "--strict", &chart, "--values", &file], None)?;
        assert!(!lint.ok, "{name}: helm lint accepted it:\n{}", lint.stdout);
        eprintln!("refused {name}: {}", out.stderr.lines().find(|l| l.contains(needle)).unwrap_or("").trim());
    }
    // What the schema cannot say, the templates check.
    let checks: [(&[&str], &str); 4] = [
        (
            &["--set", "operator.replicas=2", "--set", "operator.leaderElection=false"],
            "needs operator.leaderElection",
        ),
        (&["--set", "nats.enabled=false"], "nats.url is required"),
        (&["--set", "nats.tls.enabled=true"], "needs its server TLS too"),
        (
            &[
                "--set",
                "gateway.mode=split",
                "--set",
                "nats.auth.mode=nkey",
                "--set",
                "nats.auth.existingSecret=s",
            ],
            "function hosts take NATS credentials",
        ),
    ];
    for (args, needle) in checks {
        let out = template(&t, "x", "x", &None, args)?;
        assert!(!out.ok && out.stderr.contains(needle), "{args:?}: expected {needle:?} in:\n{}", out.stderr);
    }
    Ok(())
}

#[test]
fn helm_package_makes_an_archive_that_renders() -> Result<()> {
    let Some(t) = tools() else { return Ok(()) };
    let dir = tempfile::tempdir()?;
    let out = run(
        &t.helm,
        &["package", &chart_dir().to_string_lossy(), "--destination", &dir.path().to_string_lossy()],
        None,
    )?;
    assert!(out.ok, "helm package:\n{}{}", out.stdout, out.stderr);
    let archive = dir.path().join("shoal-0.1.0.tgz");
    let size = std::fs::metadata(&archive).with_context(|| format!("{} not made", archive.display()))?.len();
    let shown = run(&t.helm, &["show", "chart", &archive.to_string_lossy()], None)?;
    assert!(
        shown.ok && shown.stdout.contains("name: shoal") && shown.stdout.contains("version: 0.1.0"),
        "{}",
        shown.stdout
    );
    let from_archive = run(&t.helm, &["template", "shoal", &archive.to_string_lossy(), "-n", "shoal"], None)?;
    assert!(from_archive.ok, "{}", from_archive.stderr);
    let from_dir = rendered(&t, "shoal", "shoal", &None, &[])?;
    assert_eq!(from_archive.stdout, from_dir, "the archive renders what the directory does");
    eprintln!(
        "helm package: {} ({size} bytes), renders {} objects",
        archive.display(),
        documents(&from_dir)?.len()
    );
    Ok(())
}

/// `helm template | grep image:` names only the configured image: with an external NATS, every
/// image line is it; with the bundled NATS, the Shoal pods use it and the others are exactly the
/// images the nats chart's values name.
#[test]
fn the_only_images_are_the_configured_ones() -> Result<()> {
    let Some(t) = tools() else { return Ok(()) };
    let image = ["--set", "image.repository=registry.example.com/acme/shoal", "--set", "image.tag=9.9.9"];
    let configured = "registry.example.com/acme/shoal:9.9.9";
    let external = Some(chart_dir().join("ci/external-nats-values.yaml"));
    for (set, extra) in [(external, &[][..]), (None, &[][..]), (None, &["--set", "gateway.mode=split"][..])] {
        let yaml = rendered(&t, "shoal", "shoal", &set, &[&image[..], extra].concat())?;
        // The grep: lines with `image:` and a value (the CRD's schema has an `image:` property key).
        let grep: Vec<&str> = yaml
            .lines()
            .filter_map(|l| l.trim_start().trim_start_matches("- ").strip_prefix("image:"))
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        let docs = documents(&yaml)?;
        let mut shoal_images = BTreeSet::new();
        let mut other_images = BTreeSet::new();
        for doc in &docs {
            for c in pod_spec(doc).map(containers).unwrap_or_default() {
                let image = c["image"].as_str().unwrap_or_default().to_owned();
                if is_shoal(doc) {
                    shoal_images.insert(image)
                } else {
                    other_images.insert(image)
                };
            }
        }
        assert_eq!(shoal_images, BTreeSet::from([configured.to_owned()]), "{}", set_name(&set));
        if set.is_some() {
            assert!(grep.iter().all(|i| *i == configured), "grep image: {grep:?}");
            assert!(other_images.is_empty(), "{other_images:?}");
        } else {
            let nats = BTreeSet::from([
                "nats:2.14.2-alpine".to_owned(),
                "natsio/nats-server-config-reloader:0.23.0".to_owned(),
            ]);
            assert_eq!(other_images, nats, "the bundled NATS runs the nats chart's images");
            assert!(grep.iter().all(|i| *i == configured || nats.contains(*i)), "grep image: {grep:?}");
        }
        eprintln!(
            "{} {extra:?}: grep -c image: {} lines with a value, images {shoal_images:?} + {other_images:?}",
            set_name(&set),
            grep.len()
        );
    }
    Ok(())
}

/// Probes on 0.0.0.0 and named ports, no hostPort, hostPath only for split mode's shared memory
/// (and eBPF's cgroup root), no namespace but the release's, capabilities only with eBPF.
#[test]
fn pods_follow_the_chart_rules() -> Result<()> {
    let Some(t) = tools() else { return Ok(()) };
    for set in value_sets()? {
        let name = set_name(&set);
        let yaml = rendered(&t, "rel", "team-a", &set, &[])?;
        assert!(!yaml.contains("hostPort"), "{name}: hostPort");
        assert!(!yaml.contains("namespace: default"), "{name}: a hard-coded namespace");
        let docs = documents(&yaml)?;
        let split = docs
            .iter()
            .any(|d| d["kind"] == "DaemonSet" && d.to_string().contains("\"gateway\",\"--node-id"));
        let ebpf_on = split && !name.contains("ebpf-off");
        for doc in &docs {
            let ns = doc["metadata"]["namespace"].as_str();
            let cluster_scoped = ["CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"]
                .contains(&doc["kind"].as_str().unwrap_or(""));
            if is_shoal(doc) && !cluster_scoped {
                let expected = match (doc["kind"].as_str(), name.as_str()) {
                    (Some("ConfigMap"), "monitoring") if doc["metadata"]["name"] == "rel-shoal-dashboard" => {
                        "monitoring"
                    }
                    (Some("Role" | "RoleBinding"), "custom")
                        if !doc["metadata"]["name"].as_str().unwrap_or("").ends_with("leader-election") =>
                    {
                        "fl"
                    }
                    _ => "team-a",
                };
                assert_eq!(ns, Some(expected), "{name}: {} {}", doc["kind"], doc["metadata"]["name"]);
            }
            let Some(spec) = pod_spec(doc) else { continue };
            for v in spec["volumes"].as_array().into_iter().flatten() {
                if let Some(path) = v["hostPath"]["path"].as_str() {
                    assert!(is_shoal(doc) && split, "{name}: hostPath {path} outside split mode");
                    assert!(
                        path == "/dev/shm/shoal" || (ebpf_on && path == "/sys/fs/cgroup"),
                        "{name}: hostPath {path}"
                    );
                }
            }
            if !is_shoal(doc) {
                continue;
            }
            for c in containers(spec) {
                let cname = c["name"].as_str().unwrap_or("");
                let adds: Vec<&str> = c["securityContext"]["capabilities"]["add"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]), "{name}/{cname}");
                assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false, "{name}/{cname}");
                assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true, "{name}/{cname}");
                match cname {
                    "shm-owner" => assert_eq!(adds, ["CHOWN", "FOWNER"], "{name}"),
                    "gateway" if ebpf_on => assert_eq!(adds, ["BPF", "NET_ADMIN"], "{name}"),
                    _ => {
                        assert!(adds.is_empty(), "{name}/{cname} adds {adds:?}");
                        assert_eq!(c["securityContext"]["runAsNonRoot"], true, "{name}/{cname}");
                    }
                }
                let args = c["args"].to_string();
                if let Some(port) = c["ports"].as_array().and_then(|p| p.iter().find(|p| p["name"] == "http"))
                {
                    let number = port["containerPort"].as_i64().context("containerPort")?;
                    assert!(args.contains(&format!("--http=0.0.0.0:{number}")), "{name}/{cname}: {args}");
                    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
                        assert_eq!(
                            c[probe]["httpGet"],
                            json!({"path": path, "port": "http"}),
                            "{name}/{cname} {probe}"
                        );
                    }
                } else {
                    assert!(!args.contains("--http"), "{name}/{cname}: --http without a port");
                }
            }
        }
    }
    Ok(())
}

/// The dashboard ConfigMap carries Grafana's sidecar label and the committed JSON unchanged.
#[test]
fn the_dashboard_configmap_carries_the_label_and_the_json() -> Result<()> {
    let Some(t) = tools() else { return Ok(()) };
    let docs = documents(&rendered(&t, "shoal", "shoal", &None, &[])?)?;
    let cm = find(&docs, "ConfigMap", "dashboard")?;
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let committed = std::fs::read_to_string(chart_dir().join("files/dashboards/shoal.json"))?;
    assert_eq!(cm["data"]["shoal.json"].as_str().map(str::trim_end), Some(committed.trim_end()));
    let off =
        documents(&rendered(&t, "shoal", "shoal", &None, &["--set", "grafana.dashboards.enabled=false"])?)?;
    assert!(find(&off, "ConfigMap", "dashboard").is_err());
    Ok(())
}

/// The CRDs other projects own that some value sets render objects of.
fn third_party_crds() -> Result<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/crds");
    let mut text = String::new();
    for name in [
        "cert-manager.io_certificates.yaml",
        "monitoring.coreos.com_servicemonitors.yaml",
        "monitoring.coreos.com_podmonitors.yaml",
    ] {
        text.push_str(&std::fs::read_to_string(dir.join(name))?);
        text.push_str("\n---\n");
    }
    Ok(text)
}

async fn namespace(client: &kube::Client, name: &str) -> Result<()> {
    let ns = serde_json::from_value::<Namespace>(json!({"metadata": {"name": name}}))?;
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
    Ok(())
}

/// A free loopback port (bound and released: good enough for a child about to bind it).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// GET `path` from 127.0.0.1:`port` (HTTP/1.0), the body.
async fn http_get(port: u16, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").context("no HTTP header")?;
    ensure!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{head}");
    Ok(body.to_owned())
}

/// The operator process as the chart's Deployment runs it: its rendered arguments and plain
/// environment, the downward-API variables filled in, the function-host template from the
/// rendered ConfigMap, `/metrics` on a loopback port, and the kubeconfig impersonating the
/// chart's ServiceAccount (so the chart's RBAC is what it gets).
fn start_chart_operator(
    docs: &[Value],
    plane: &ControlPlane,
    work: &Path,
    namespace: &str,
    http: u16,
) -> Result<Killed> {
    let deployment = find(docs, "Deployment", "operator")?;
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    ensure!(container["command"] == json!(["shoal-operator"]), "{}", container["command"]);
    let template = find(docs, "ConfigMap", "function-host")?["data"]["template.yaml"]
        .as_str()
        .context("template.yaml")?
        .to_owned();
    let template_path = work.join("function-host-template.yaml");
    std::fs::write(&template_path, template)?;
    let args: Vec<String> = container["args"]
        .as_array()
        .context("args")?
        .iter()
        .filter_map(Value::as_str)
        .map(|a| {
            if a.starts_with("--http=") {
                format!("--http=127.0.0.1:{http}")
            } else if a.starts_with("--function-host-template=") {
                format!("--function-host-template={}", template_path.display())
            } else {
                a.to_owned()
            }
        })
        .collect();
    let mut command = Command::new(env!("CARGO_BIN_EXE_shoal-operator"));
    command.args(&args).env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
    for e in container["env"].as_array().context("env")? {
        let name = e["name"].as_str().context("env name")?;
        match (e["value"].as_str(), e["valueFrom"]["fieldRef"]["fieldPath"].as_str()) {
            (Some(v), _) => command.env(name, v),
            (None, Some("metadata.namespace")) => command.env(name, namespace),
            (None, Some("metadata.name")) => command.env(name, "shoal-operator-0"),
            _ => bail!("env {name} needs a Secret: render the operator without nats.auth"),
        };
    }
    let service_account = pod["serviceAccountName"].as_str().context("serviceAccountName")?;
    let mut kubeconfig: Value = serde_json::from_str(&std::fs::read_to_string(plane.kubeconfig_path())?)?;
    let user = &mut kubeconfig["users"][0]["user"];
    user["as"] = json!(format!("system:serviceaccount:{namespace}:{service_account}"));
    user["as-groups"] = json!([
        "system:serviceaccounts",
        format!("system:serviceaccounts:{namespace}"),
        "system:authenticated"
    ]);
    let kubeconfig_path = work.join("kubeconfig-operator");
    std::fs::write(&kubeconfig_path, kubeconfig.to_string())?;
    let child = command
        .env("KUBECONFIG", &kubeconfig_path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start shoal-operator")?;
    Ok(Killed(child))
}

/// Other projects' CRDs, then every value set into its own namespace, as `helm install` would:
/// every object must be accepted.
async fn apply_every_value_set(t: &Tools, client: &kube::Client) -> Result<()> {
    apply_stream(client, &third_party_crds()?, &ApplyOptions::new("test-fixtures")).await?;
    namespace(client, "fl").await?;
    let mut example_applied = false;
    for (i, set) in value_sets()?.into_iter().enumerate() {
        let name = set_name(&set);
        let (release, ns) = (format!("r{i}"), format!("set-{name}"));
        namespace(client, &ns).await?;
        if name == "monitoring" {
            namespace(client, "monitoring").await.ok();
        }
        let yaml = rendered(t, &release, &ns, &set, &[])?;
        let expected = documents(&yaml)?.len();
        let mut options = ApplyOptions::new("helm");
        options.namespace = ns.clone();
        let applied =
            apply_stream(client, &yaml, &options).await.with_context(|| format!("value set {name}"))?;
        assert_eq!(applied.len(), expected, "{name}: every object accepted");
        let crd_first = applied.first().is_some_and(|o| o.kind == "CustomResourceDefinition");
        if crd_first && !example_applied {
            // The documentation's FederatedJob, against the CRD the chart installed (its CEL
            // rules included).
            let example = std::fs::read_to_string(root().join("docs/examples/federatedjob.yaml"))?;
            let applied = apply_stream(client, &example, &ApplyOptions::new("docs")).await?;
            assert_eq!(applied.len(), 1);
            example_applied = true;
        }
        eprintln!(
            "{name}: {} objects applied server-side (CRDs first: {crd_first}), all accepted",
            applied.len()
        );
    }
    assert!(example_applied, "no value set installed the CRD");
    Ok(())
}

#[tokio::test]
async fn the_rendered_chart_applies_server_side_and_its_operator_reconciles_a_job() -> Result<()> {
    let Some(t) = tools() else { return Ok(()) };
    let plane = ControlPlane::start().await?;
    let client = plane.client();
    let nats = NatsServer::start()?;
    let work = tempfile::tempdir()?;

    apply_every_value_set(&t, &client).await?;

    // The chart's operator, pointed at the test nats-server, reconciles a FederatedJob.
    let operator_ns = "shoal-system";
    namespace(&client, operator_ns).await?;
    let settings = [
        "--set",
        "nats.enabled=false",
        "--set",
        &format!("nats.url={}", nats.url()),
        "--set",
        "image.repository=registry.example.com/acme/shoal",
        "--set",
        "image.tag=9.9.9",
        "--set",
        "functionHost.template.priorityClassName=shoal-hosts",
        "--set",
        "operator.replicas=2",
    ];
    let yaml = rendered(&t, "shoal", operator_ns, &None, &settings)?;
    let docs = documents(&yaml)?;
    let mut options = ApplyOptions::new("helm");
    options.namespace = operator_ns.to_owned();
    apply_stream(&client, &yaml, &options).await?;
    let http = free_port()?;
    let _operator = start_chart_operator(&docs, &plane, work.path(), operator_ns, http)?;

    let infra = Infra::connect(&ConnectOptions { url: nats.url(), ..ConnectOptions::default() }).await?;
    let api: Api<FederatedJob> = Api::namespaced(client.clone(), "fl");
    let fj: FederatedJob = serde_json::from_value(federated_job("mnist", "mnist-job", 3))?;
    api.create(&PostParams::default(), &fj).await?;
    let job = JobId::new("mnist-job")?;
    eventually("the job in NATS", Duration::from_secs(60), || async {
        jobs::load_state(&infra, &job).await.ok()
    })
    .await?;
    let demand = publish_demand(&infra, "mnist-job");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "fl");
    let host = eventually("node-a's function hosts", Duration::from_secs(30), || async {
        deployments.get("mnist-node-a").await.ok().filter(|d| d.spec.replicas > Some(0))
    })
    .await?;
    demand.abort();
    let host = serde_json::to_value(&host)?;
    let pod = &host["spec"]["template"]["spec"];
    assert_eq!(pod["containers"][0]["image"], "registry.example.com/acme/shoal:9.9.9", "the chart's image");
    assert_eq!(pod["priorityClassName"], "shoal-hosts", "the chart's function-host template");
    assert_eq!(
        pod["containers"][0]["resources"],
        json!({"limits": {"memory": "2Gi"}, "requests": {"cpu": "500m", "memory": "512Mi"}}),
        "the chart's function-host resources"
    );
    let env = pod["containers"][0]["env"].as_array().context("env")?;
    assert!(
        env.iter().any(|e| e["name"] == "SHOAL_PREFIX" && e["value"] == "shoal"),
        "the subject prefix reaches the function hosts: {env:?}"
    );
    let status = eventually("status Running", Duration::from_secs(30), || async {
        api.get("mnist").await.ok().and_then(|fj| fj.status).filter(|s| s.phase == Some(Phase::Running))
    })
    .await?;
    let lease: Api<Lease> = Api::namespaced(client.clone(), operator_ns);
    let holder = lease.get("shoal-operator").await?.spec.and_then(|s| s.holder_identity);
    assert_eq!(holder.as_deref(), Some("shoal-operator-0"), "the leader Lease in the release namespace");
    let events: Api<Event> = Api::namespaced(client.clone(), "fl");
    let reasons: BTreeSet<String> =
        events.list(&ListParams::default()).await?.items.into_iter().filter_map(|e| e.reason).collect();
    assert!(reasons.contains("JobCreated"), "Events written under the chart's RBAC: {reasons:?}");
    let metrics = http_get(http, "/metrics").await?;
    assert!(metrics.lines().any(|l| l == "shoal_operator_leader 1"), "{metrics}");
    let failures: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("shoal_operator_reconcile_failures_total{") && !l.ends_with(" 0"))
        .collect();
    eprintln!(
        "the chart's operator (as its ServiceAccount): job created, {} desired hosts, events {reasons:?}, failures {failures:?}",
        status.desired_hosts
    );
    assert!(
        failures.iter().all(|l| !l.contains("error=\"kube\"")),
        "the chart's RBAC refused a call: {failures:?}"
    );
    Ok(())
}

/// No Docker engine runs here, so the Dockerfile is checked against the repository instead: it
/// builds the packages and binaries that exist, copies them onto `PATH` where the chart's
/// commands find them, copies the eBPF object `shoal` embeds, runs as the chart's user, and its
/// builder and runtime are the same Debian release with a Rust at least the workspace's.
#[test]
fn the_dockerfile_builds_what_the_chart_runs() -> Result<()> {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile"))?;
    let arg = |name: &str| {
        dockerfile
            .lines()
            .find_map(|l| l.strip_prefix(&format!("ARG {name}=")))
            .map(str::to_owned)
            .with_context(|| format!("ARG {name}"))
    };
    let build = dockerfile
        .lines()
        .find(|l| l.trim_start().starts_with("cargo build --release"))
        .context("cargo build")?;
    for (flag, name, manifest) in [
        ("-p", "shoal-cli", "cli/Cargo.toml"),
        ("-p", "shoal-operator", "operator/Cargo.toml"),
        ("--bin", "shoal", "cli/Cargo.toml"),
        ("--bin", "shoal-operator", "operator/Cargo.toml"),
    ] {
        assert!(
            build.contains(&format!("{flag} {name} ")) || build.ends_with(&format!("{flag} {name}")),
            "{build}"
        );
        let text = std::fs::read_to_string(root().join(manifest))?;
        assert!(text.contains(&format!("name = \"{name}\"")), "{manifest} has no {name}");
    }
    assert!(dockerfile.contains("COPY --from=build /out/shoal /out/shoal-operator /usr/local/bin/"));
    let sidecar = std::fs::read_to_string(root().join("ebpf/src/sidecar.rs"))?;
    assert!(sidecar.contains("../bpf/shoal.bpf.o"), "shoal embeds ebpf/bpf/shoal.bpf.o");
    assert!(
        dockerfile.contains("COPY ebpf/bpf/shoal.bpf.o ") && root().join("ebpf/bpf/shoal.bpf.o").is_file()
    );
    let values: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("values.yaml"))?)?;
    let user = format!(
        "USER {}:{}",
        values["runAsUser"].as_u64().context("runAsUser")?,
        values["runAsGroup"].as_u64().context("runAsGroup")?
    );
    assert!(dockerfile.lines().any(|l| l == user), "the image runs as the chart's {user}");
    let froms: Vec<&str> = dockerfile.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert!(froms.iter().all(|f| f.contains("${DEBIAN_RELEASE}")), "one Debian release: {froms:?}");
    let workspace = std::fs::read_to_string(root().join("Cargo.toml"))?;
    let wanted = workspace
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .context("rust-version")?
        .trim_matches('"');
    let parse = |v: &str| v.split('.').map(|p| p.parse::<u32>().unwrap_or(0)).collect::<Vec<_>>();
    assert!(parse(&arg("RUST_VERSION")?) >= parse(wanted), "the builder's Rust is older than {wanted}");
    let commands = rendered_command_names()?;
    for command in ["shoal-operator", "shoal"] {
        assert!(commands.contains(command), "the chart runs {command}: {commands:?}");
    }
    Ok(())
}

/// The commands the chart's templates run (`command: ["..."`).
fn rendered_command_names() -> Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for entry in walk(&chart_dir().join("templates"))? {
        for line in std::fs::read_to_string(entry)?.lines() {
            if let Some(rest) = line.trim().strip_prefix("command: [\"") {
                names.insert(rest.split('"').next().unwrap_or("").to_owned());
            }
        }
    }
    Ok(names)
}

fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            files.extend(walk(&path)?);
        } else {
            files.push(path);
        }
    }
    Ok(files)
}

/// Every value Shoal owns has a comment right above it in values.yaml (the contents of
/// Kubernetes-typed blocks such as `resources` excepted, and the official nats chart's own keys,
/// which its values.yaml documents).
#[test]
fn every_value_is_documented_in_values_yaml() -> Result<()> {
    let text = std::fs::read_to_string(chart_dir().join("values.yaml"))?;
    let (mut path, mut previous, mut nats_own, mut undocumented) =
        (Vec::<String>::new(), "", false, Vec::new());
    let mut keys = 0;
    for line in text.lines() {
        if line.trim_start().starts_with("# ---- from here on") {
            nats_own = true;
        }
        let indent = line.len() - line.trim_start().len();
        let key = line.trim_start().split_once(':').map(|(k, _)| k).filter(|k| {
            !k.is_empty()
                && !k.starts_with('#')
                && !k.starts_with('-')
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
        });
        if let Some(key) = key {
            let depth = indent / 2;
            path.truncate(depth);
            path.push(key.to_owned());
            if depth == 0 {
                nats_own = false;
            }
            let exempt =
                nats_own || path[..path.len() - 1].iter().any(|p| p == "resources" || p == "updateStrategy");
            if !exempt {
                keys += 1;
                if !previous.trim_start().starts_with('#') {
                    undocumented.push(path.join("."));
                }
            }
        }
        if !line.trim().is_empty() {
            previous = line;
        }
    }
    assert!(undocumented.is_empty(), "values without a comment above them: {undocumented:?}");
    eprintln!("values.yaml: {keys} keys, each with its comment");
    Ok(())
}
