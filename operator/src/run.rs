//! `shoal-operator run`: the operator process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use clap::{ArgAction, Args};
use shoal_client::auth::{NatsAuth, NatsTls, Secret};
use shoal_client::{ConnectOptions, Infra};
use shoal_operator::config::OperatorConfig;
use shoal_operator::controller::{self, Context, Diagnostics, Nats};
use shoal_operator::crd::FunctionHostTemplate;
use shoal_operator::demand::{self, DemandBook};
use shoal_operator::leader::{self, LeaseConfig};
use shoal_operator::metrics::Metrics;
use shoal_operator::server::{self, Health};
use shoal_operator::KubeDuration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Default function-host image (a FederatedJob's spec.podTemplate.image overrides it).
    #[arg(long, env = "SHOAL_IMAGE", default_value = "ghcr.io/shoal/shoal:latest")]
    image: String,
    /// NATS URL, for the operator and rendered into function hosts.
    #[arg(long, env = "SHOAL_NATS_URL", default_value = "nats://nats:4222")]
    nats_url: String,
    /// Secret whose keys SHOAL_NATS_USER / SHOAL_NATS_PASSWORD / SHOAL_NATS_TOKEN function
    /// hosts get as environment variables.
    #[arg(long, env = "SHOAL_NATS_CREDENTIALS_SECRET")]
    nats_credentials_secret: Option<String>,
    /// The operator's own NATS user (with SHOAL_NATS_PASSWORD).
    #[arg(long, env = "SHOAL_NATS_USER")]
    nats_user: Option<String>,
    /// The operator's own NATS password.
    #[arg(long, env = "SHOAL_NATS_PASSWORD", hide_env_values = true)]
    nats_password: Option<Secret>,
    /// The operator's own NATS token.
    #[arg(long, env = "SHOAL_NATS_TOKEN", hide_env_values = true)]
    nats_token: Option<Secret>,
    /// The operator's own NATS `.creds` file (user JWT + nkey seed).
    #[arg(long, env = "SHOAL_NATS_CREDS")]
    nats_creds: Option<PathBuf>,
    /// File holding the operator's own nkey user seed (`SU...`).
    #[arg(long, env = "SHOAL_NATS_NKEY")]
    nats_nkey: Option<PathBuf>,
    /// PEM file of the CA that signed the NATS server's certificate (turns TLS on).
    #[arg(long, env = "SHOAL_NATS_CA")]
    nats_ca: Option<PathBuf>,
    /// PEM client certificate, for servers that verify clients (with --nats-key).
    #[arg(long, env = "SHOAL_NATS_CERT")]
    nats_cert: Option<PathBuf>,
    /// PEM private key of --nats-cert.
    #[arg(long, env = "SHOAL_NATS_KEY")]
    nats_key: Option<PathBuf>,
    /// Refuse a NATS server that does not offer TLS.
    #[arg(long, env = "SHOAL_NATS_REQUIRE_TLS")]
    nats_require_tls: bool,
    /// NATS subject prefix.
    #[arg(long, env = "SHOAL_PREFIX", default_value = "shoal")]
    prefix: String,
    /// YAML file with the defaults of every function-host pod, in the shape of a FederatedJob's
    /// spec.podTemplate (which overrides it field by field); the chart renders it from
    /// `functionHost.template`.
    #[arg(long, env = "SHOAL_FUNCTION_HOST_TEMPLATE")]
    function_host_template: Option<PathBuf>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "SHOAL_OPERATOR_HTTP", default_value = "0.0.0.0:8080")]
    http: SocketAddr,
    /// Watch FederatedJobs in this namespace only (default: all namespaces).
    #[arg(long, env = "SHOAL_OPERATOR_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Leader election (keep on when running more than one replica).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    leader_election: bool,
    /// The leader Lease's name.
    #[arg(long, default_value = "shoal-operator")]
    lease_name: String,
    /// The leader Lease's namespace (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This replica's identity in the Lease and in Events (default: $POD_NAME or a random id).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Ignore a node's demand report older than this.
    #[arg(long, default_value = "6s")]
    demand_stale_after: KubeDuration,
    /// Time after a round's deadline before RoundProgressing=False reason=DeadlineExceeded.
    #[arg(long, default_value = "30s")]
    round_deadline_grace: KubeDuration,
}

pub(crate) fn main(args: RunArgs) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = tokio::runtime::Runtime::new().context("tokio runtime")?;
    runtime.block_on(operate(args))
}

async fn operate(args: RunArgs) -> Result<()> {
    let cancel = CancellationToken::new();
    tokio::spawn(signals(cancel.clone()));
    let metrics = Arc::new(Metrics::default());
    let health = Health::new(metrics.clone());
    let http = tokio::spawn(server::serve(args.http, health.clone(), cancel.clone()));
    let identity =
        args.identity.clone().unwrap_or_else(|| format!("shoal-operator-{:08x}", rand::random::<u32>()));
    let client = kube::Client::try_default().await.context("Kubernetes client (KUBECONFIG or in-cluster)")?;
    let config = OperatorConfig {
        image: args.image.clone(),
        nats_url: args.nats_url.clone(),
        prefix: args.prefix.clone(),
        nats_credentials_secret: args.nats_credentials_secret.clone(),
        host_defaults: match &args.function_host_template {
            Some(path) => read_host_template(path)?,
            None => FunctionHostTemplate::default(),
        },
        demand_stale_after: args.demand_stale_after.get(),
        round_deadline_grace: args.round_deadline_grace.get(),
        ..OperatorConfig::default()
    };
    let infra = connect(&args).await?;
    let book = Arc::new(DemandBook::default());
    let reports = demand::subscribe(
        infra.client.clone(),
        &infra.subjects,
        book.clone(),
        metrics.clone(),
        cancel.clone(),
    )
    .await
    .context("subscribe to demand reports")?;
    health.ready.store(true, Ordering::Relaxed);
    let nats = Nats { infra, demand: book };
    let ctx = Arc::new(Context::new(
        client.clone(),
        nats,
        config,
        metrics.clone(),
        Diagnostics::new(Some(identity.clone())),
    ));
    *health.diagnostics.write().await = Some(ctx.diagnostics.clone());
    let lost = if args.leader_election {
        let lease = LeaseConfig {
            name: args.lease_name.clone(),
            namespace: args.lease_namespace.clone(),
            identity: identity.clone(),
            duration: std::time::Duration::from_secs(15),
            grace: std::time::Duration::from_secs(5),
        };
        let mut rx = leader::elect(client, &lease).await.context("leader election Lease")?;
        tracing::info!(identity, lease = %lease.name, "waiting to lead");
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            r = leader::until_leader(&mut rx) => r.context("leader election ended")?,
        }
        Some(rx)
    } else {
        None
    };
    health.leader.store(true, Ordering::Relaxed);
    metrics.leader.set(1);
    tracing::info!(identity, "leading: reconciling FederatedJobs");
    let leadership_lost = CancellationToken::new();
    if let Some(mut rx) = lost {
        let (lost, stop) = (leadership_lost.clone(), cancel.clone());
        tokio::spawn(async move {
            leader::until_lost(&mut rx).await;
            lost.cancel();
            stop.cancel();
        });
    }
    let stop = cancel.clone();
    controller::run(ctx, args.watch_namespace.as_deref(), async move { stop.cancelled().await }).await?;
    cancel.cancel();
    let _ = reports.await;
    let _ = http.await;
    if leadership_lost.is_cancelled() {
        anyhow::bail!("lost the leader Lease; exiting so that this replica restarts as a standby");
    }
    Ok(())
}

/// The function-host defaults file (`--function-host-template`): YAML or JSON, a FederatedJob's
/// `spec.podTemplate` in shape; an empty file is no defaults.
fn read_host_template(path: &Path) -> Result<FunctionHostTemplate> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if text.trim().is_empty() {
        return Ok(FunctionHostTemplate::default());
    }
    serde_yaml::from_str(&text)
        .with_context(|| format!("{}: not a function-host pod template", path.display()))
}

/// Connects to NATS and provisions Shoal's streams and buckets, retrying until it works.
async fn connect(args: &RunArgs) -> Result<Infra> {
    let auth = NatsAuth {
        user: args.nats_user.clone(),
        password: args.nats_password.clone(),
        token: args.nats_token.clone(),
        creds_file: args.nats_creds.clone(),
        nkey_seed_file: args.nats_nkey.clone(),
    };
    auth.validate().context("NATS credentials")?;
    let opts = ConnectOptions {
        url: args.nats_url.clone(),
        prefix: args.prefix.clone(),
        name: "shoal-operator".into(),
        auth,
        tls: NatsTls {
            ca_file: args.nats_ca.clone(),
            client_cert: args.nats_cert.clone(),
            client_key: args.nats_key.clone(),
            require: args.nats_require_tls,
        },
        ..ConnectOptions::default()
    }
    .without_url_credentials()
    .context("NATS URL")?;
    loop {
        match Infra::connect(&opts).await {
            Ok(infra) => return Ok(infra),
            Err(e) if e.kind() == shoal_client::ErrorKind::Connect => {
                tracing::warn!(error = %e, "NATS unreachable; retrying");
            }
            Err(e) => return Err(e).context("NATS"),
        }
    }
}

async fn signals(cancel: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else { return };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
    cancel.cancel();
}
