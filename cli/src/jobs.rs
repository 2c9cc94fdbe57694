//! The job lifecycle and model commands: `shoal job list|status|cancel|delete` and
//! `shoal model get`. Each prints text for people and, with `--json`, one JSON document for
//! scripts; exit codes are documented in each command's `--help`.

use std::collections::BTreeMap;
use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use futures::StreamExt as _;
use serde::Serialize;
use shoal_client::jobs::{self, CancelOutcome};
use shoal_client::{Connection, ErrorKind, Infra, ShoalClient};
use shoal_functions::{JobId, JobSpec, ModelVersion};
use shoal_proto::cluster::LeafProgress;
use shoal_proto::config::Timings;
use shoal_proto::{JobPhase, JobState, RoundOutcome};

use crate::cli::{Exit, NatsArgs};

/// Exit code of `shoal job status` for a failed job.
pub const EXIT_JOB_FAILED: u8 = 3;
/// Exit code of `shoal model get` when the version is not committed yet (`EX_TEMPFAIL`).
pub const EXIT_NOT_READY: u8 = 75;

/// `shoal job list` flags.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Print one JSON array (one object per job) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `shoal job status` flags.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Job id.
    pub job: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// How long to listen for the nodes' progress reports of the open round (they come every
    /// 500 ms), in milliseconds.
    #[arg(long, default_value_t = 1200, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub listen_ms: u64,
}

/// `shoal job cancel` flags.
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Job id.
    pub job: String,
    /// Why, recorded in the job's state (`cancelled (<reason>)`).
    #[arg(long, default_value = "cancelled with shoal job cancel")]
    pub reason: String,
}

/// `shoal job delete` flags.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Job id.
    pub job: String,
    /// Do not ask for confirmation (for scripts).
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// How long to wait for the node serving a running job to stop it, in seconds.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub wait_secs: u64,
}

/// `shoal model get` flags.
#[derive(Debug, Args)]
pub struct ModelGetArgs {
    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Job id.
    #[arg(long)]
    pub job: String,
    /// Model version to fetch (0 is the initial model).
    #[arg(long, conflicts_with = "latest")]
    pub version: Option<u64>,
    /// Fetch the latest committed version (the default).
    #[arg(long)]
    pub latest: bool,
    /// Output file (safetensors); `-` writes to stdout. The file appears only once the whole
    /// model has been read and its digest checked.
    #[arg(long, short = 'o')]
    pub output: PathBuf,
    /// Wait up to this many seconds for the version to be committed instead of failing with
    /// "not ready" (exit code 75).
    #[arg(long, default_value_t = 0)]
    pub wait_secs: u64,
}

/// Connects with the node's credentials and opens the provisioned resources (creating nothing).
async fn admin(nats: &NatsArgs) -> anyhow::Result<Infra> {
    let conn = Connection::connect(&nats.options("shoal-cli")?).await?;
    Infra::open(&conn).await.context("opening Shoal's streams and buckets (has a node run?)")
}

/// One job as `job list --json` prints it.
#[derive(Debug, Serialize)]
struct ListedJob {
    job: String,
    phase: String,
    reason: Option<String>,
    round: u64,
    round_open: bool,
    model_version: u64,
    rounds: Option<u64>,
    strategy: Option<String>,
    last_outcome: Option<RoundOutcome>,
}

fn phase_name(p: &JobPhase) -> (&'static str, Option<String>) {
    match p {
        JobPhase::Running => ("running", None),
        JobPhase::Finished => ("finished", None),
        JobPhase::Failed { reason } => ("failed", Some(reason.clone())),
        JobPhase::Cancelled { reason } => ("cancelled", Some(reason.clone())),
    }
}

fn strategy_name(spec: &JobSpec) -> String {
    serde_json::to_value(&spec.strategy)
        .ok()
        .and_then(|v| v.get("name").and_then(|n| n.as_str()).map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// `shoal job list`.
pub async fn list(a: ListArgs) -> anyhow::Result<()> {
    let infra = admin(&a.nats).await?;
    let mut rows = Vec::new();
    for (job, state) in jobs::list_jobs(&infra).await? {
        let spec = jobs::load_spec(&infra, &job).await.ok();
        let (phase, reason) = phase_name(&state.phase);
        rows.push(ListedJob {
            job: job.to_string(),
            phase: phase.into(),
            reason,
            round: state.round.0,
            round_open: state.is_open(),
            model_version: state.model_version.0,
            rounds: spec.as_ref().map(|s| s.rounds),
            strategy: spec.as_ref().map(strategy_name),
            last_outcome: state.last_outcome.clone(),
        });
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no jobs");
        return Ok(());
    }
    println!("{:<24} {:<10} {:>7} {:>9}  {:<13} LAST ROUND", "JOB", "PHASE", "ROUND", "VERSION", "STRATEGY");
    for r in rows {
        let version = match r.rounds {
            Some(n) => format!("{}/{n}", r.model_version),
            None => r.model_version.to_string(),
        };
        let round = format!("{}{}", r.round, if r.round_open { "*" } else { "" });
        let last = match (&r.reason, &r.last_outcome) {
            (Some(why), _) => why.clone(),
            (None, Some(o)) => o.to_string(),
            (None, None) => "-".into(),
        };
        let strategy = r.strategy.unwrap_or_else(|| "?".into());
        println!("{:<24} {:<10} {round:>7} {version:>9}  {strategy:<13} {last}", r.job, r.phase);
    }
    println!("(* the round is open)");
    Ok(())
}

/// `job status --json`.
#[derive(Debug, Serialize)]
struct Status {
    job: String,
    phase: String,
    reason: Option<String>,
    strategy: String,
    round: u64,
    round_open: bool,
    received: Option<u64>,
    expected: Option<u64>,
    min_clients: u64,
    opened_at_ms: Option<u64>,
    deadline_at_ms: Option<u64>,
    deadline: Option<String>,
    deadline_in_ms: Option<i64>,
    model_version: u64,
    rounds: u64,
    model_object: String,
    models_bucket: String,
    last_outcome: Option<RoundOutcome>,
    failed_rounds_in_a_row: u32,
    top: Option<String>,
    serving_nodes: Vec<String>,
    received_by_node: BTreeMap<String, u64>,
}

/// `shoal job status`: the job's state, spec and, for an open round, what the nodes report.
pub async fn status(a: StatusArgs) -> anyhow::Result<()> {
    let infra = admin(&a.nats).await?;
    let job = JobId::new(&a.job)?;
    // Listen first, so the reports of the round read below are not missed.
    let mut progress = infra.subscribe(infra.subjects.progress(&job), "subscribe to progress").await?;
    infra.client.flush().await.context("flush")?;
    let spec = jobs::load_spec(&infra, &job).await?;
    let (state, _) = jobs::load_state(&infra, &job).await?;
    let mut by_node: BTreeMap<String, u64> = BTreeMap::new();
    if state.phase == JobPhase::Running {
        let until = tokio::time::Instant::now() + Duration::from_millis(a.listen_ms);
        loop {
            let m = tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                m = progress.next() => m,
            };
            let Some(m) = m else { break };
            if let Ok(p) = shoal_proto::decode::<LeafProgress>("leaf progress", &m.payload) {
                if p.round == state.round {
                    by_node.insert(p.node.to_string(), u64::from(p.accepted));
                } else {
                    by_node.entry(p.node.to_string()).or_insert(0);
                }
            }
        }
    }
    let top = jobs::top_holder(&infra, &job, Timings::default().lease_stale()).await?.map(|n| n.to_string());
    let status = build_status(&job, &spec, &state, (top, by_node), &infra.subjects.models_bucket(), now_ms());
    if a.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print_status(&status, &spec);
    }
    if let JobPhase::Failed { reason } = &state.phase {
        eprintln!("job {job} failed: {reason}");
        return Err(Exit(EXIT_JOB_FAILED).into());
    }
    Ok(())
}

fn build_status(
    job: &JobId,
    spec: &JobSpec,
    state: &JobState,
    (top, by_node): (Option<String>, BTreeMap<String, u64>),
    models_bucket: &str,
    now: u64,
) -> Status {
    let (phase, reason) = phase_name(&state.phase);
    let rule = spec.round_rule();
    let open = state.is_open();
    let mut serving: Vec<String> = by_node.keys().cloned().chain(top.clone()).collect();
    serving.sort();
    serving.dedup();
    let received = (open && !by_node.is_empty()).then(|| by_node.values().sum());
    Status {
        job: job.to_string(),
        phase: phase.into(),
        reason,
        strategy: strategy_name(spec),
        round: state.round.0,
        round_open: open,
        received: if open { Some(received.unwrap_or(0)) } else { None },
        expected: (rule.cohort_size != u32::MAX).then_some(u64::from(rule.cohort_size)),
        min_clients: u64::from(rule.min_clients),
        opened_at_ms: open.then_some(state.opened_at_ms),
        deadline_at_ms: open.then_some(state.deadline_at_ms),
        deadline: open.then(|| rfc3339(state.deadline_at_ms)),
        deadline_in_ms: open.then(|| i64::try_from(state.deadline_at_ms).unwrap_or(i64::MAX) - now as i64),
        model_version: state.model_version.0,
        rounds: spec.rounds,
        model_object: shoal_proto::subjects::model_object(job, state.model_version),
        models_bucket: models_bucket.to_owned(),
        last_outcome: state.last_outcome.clone(),
        failed_rounds_in_a_row: state.failed_rounds_in_a_row,
        top,
        serving_nodes: serving,
        received_by_node: by_node,
    }
}

fn print_status(s: &Status, spec: &JobSpec) {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<15}{v}\n"));
    line("job:", s.job.clone());
    line(
        "phase:",
        match &s.reason {
            Some(r) => format!("{} ({r})", s.phase),
            None => s.phase.clone(),
        },
    );
    line("strategy:", format!("{} ({})", s.strategy, policy_text(spec)));
    let round_state = if s.round_open {
        "open"
    } else if s.phase == "running" {
        "waiting for a node to open it"
    } else {
        "last round run"
    };
    line("round:", format!("{} ({round_state})", s.round));
    if s.round_open {
        let expected = s.expected.map_or_else(|| "-".to_string(), |e| e.to_string());
        let per_node: Vec<String> = s.received_by_node.iter().map(|(n, c)| format!("{n} {c}")).collect();
        let detail = if per_node.is_empty() { String::new() } else { format!(" ({})", per_node.join(", ")) };
        line(
            "received:",
            format!(
                "{} of {expected} updates, {} needed at the deadline{detail}",
                s.received.unwrap_or(0),
                s.min_clients
            ),
        );
        if let (Some(d), Some(ms)) = (&s.deadline, s.deadline_in_ms) {
            let when = if ms >= 0 {
                format!("in {}", human(ms as u64))
            } else {
                format!("passed {} ago; the round is being closed", human(ms.unsigned_abs()))
            };
            line("deadline:", format!("{d} ({when})"));
        }
    }
    line(
        "model version:",
        format!("{} of {} (object {} in {})", s.model_version, s.rounds, s.model_object, s.models_bucket),
    );
    if let Some(o) = &s.last_outcome {
        line("last round:", o.to_string());
    }
    if s.failed_rounds_in_a_row > 0 {
        line(
            "failed rounds:",
            format!("{} in a row (the job fails at {})", s.failed_rounds_in_a_row, spec.max_failed_rounds),
        );
    }
    if s.phase == "running" {
        let nodes = if s.serving_nodes.is_empty() {
            "none: no node serves this job (is a node running, and does its --max-jobs leave room?)"
                .to_string()
        } else {
            s.serving_nodes
                .iter()
                .map(|n| if s.top.as_deref() == Some(n) { format!("{n} (top)") } else { n.clone() })
                .collect::<Vec<_>>()
                .join(", ")
        };
        line("serving nodes:", nodes);
    }
    print!("{out}");
}

fn policy_text(spec: &JobSpec) -> String {
    use shoal_functions::RoundPolicy as P;
    match &spec.round_policy {
        P::Sync { cohort_size, min_clients, deadline_ms } => format!(
            "sync rounds: cohort {cohort_size}, at least {min_clients} by the deadline of {}",
            human(*deadline_ms)
        ),
        P::Buffered { max_wait_ms, max_staleness } => {
            format!("buffered: flush after {}, staleness up to {max_staleness}", human(*max_wait_ms))
        }
        P::Periodic { period_ms, max_staleness } => {
            format!("periodic: every {}, staleness up to {max_staleness}", human(*period_ms))
        }
    }
}

/// `shoal job cancel`.
pub async fn cancel(a: CancelArgs) -> anyhow::Result<()> {
    let infra = admin(&a.nats).await?;
    let job = JobId::new(&a.job)?;
    match jobs::cancel_job(&infra, &job, &a.reason).await? {
        CancelOutcome::Cancelled(state) => {
            println!(
                "job {job} cancelled in round {}; its model stays at version {}",
                state.round, state.model_version
            );
        }
        CancelOutcome::AlreadyEnded(state) => println!("job {job} had already ended: {}", state.phase),
    }
    Ok(())
}

/// `shoal job delete`.
pub async fn delete(a: DeleteArgs) -> anyhow::Result<()> {
    let infra = admin(&a.nats).await?;
    let job = JobId::new(&a.job)?;
    let state = match jobs::load_state(&infra, &job).await {
        Ok((s, _)) => Some(s),
        Err(e) if e.kind() == ErrorKind::UnknownJob => None,
        Err(e) => return Err(e.into()),
    };
    let what = match &state {
        Some(s) if s.phase == JobPhase::Running => {
            format!("job {job} is running (round {}): it will be cancelled, then", s.round)
        }
        Some(s) => format!("job {job} ({})", s.phase),
        None => format!("job {job} (no state: an interrupted create or delete)"),
    };
    if !a.yes
        && !confirm(&format!(
        "{what} deleted with its models, spec, state and upload stream; this cannot be undone. Delete? [y/N] "
    ))? {
        anyhow::bail!("not deleted (pass --yes to delete without asking)");
    }
    if state.as_ref().is_some_and(|s| s.phase == JobPhase::Running) {
        if let CancelOutcome::Cancelled(_) =
            jobs::cancel_job(&infra, &job, "deleted with shoal job delete").await?
        {
            eprintln!("job {job} cancelled");
        }
    }
    wait_unserved(&infra, &job, Duration::from_secs(a.wait_secs)).await?;
    let r = jobs::delete_job(&infra, &job).await?;
    println!(
        "job {job} deleted: {} model object(s), {} KV message(s), {} queued update(s), {} claim(s), {} transfer(s){}",
        r.models,
        r.keys,
        r.updates,
        r.claims,
        r.transfers,
        if r.upload_stream { ", its upload stream" } else { "" }
    );
    Ok(())
}

/// Waits until no node holds the job's top lease (a cancelled job's top stops and releases it
/// at once; a dead node's lease goes stale).
async fn wait_unserved(infra: &Infra, job: &JobId, within: Duration) -> anyhow::Result<()> {
    let stale = Timings::default().lease_stale();
    let until = tokio::time::Instant::now() + within;
    loop {
        match jobs::top_holder(infra, job, stale).await? {
            None => return Ok(()),
            Some(node) if tokio::time::Instant::now() >= until => {
                anyhow::bail!(
                    "node {node} still serves job {job} after {within:?}; nothing was deleted, try again"
                )
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Asks on stderr; reads the answer from stdin (a pipe works too; no answer is no).
fn confirm(question: &str) -> anyhow::Result<bool> {
    eprint!("{question}");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES"))
}

/// A file (or stdout) that takes a model chunk by chunk, with a progress bar on a terminal.
struct ModelSink {
    out: Box<dyn std::io::Write>,
    bar: indicatif::ProgressBar,
    hasher: sha2::Sha256,
}

impl shoal_client::objects::ChunkSink for ModelSink {
    fn start(&mut self, size: usize) -> std::io::Result<()> {
        self.bar.set_length(size as u64);
        Ok(())
    }

    fn chunk(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use sha2::Digest as _;
        self.out.write_all(bytes)?;
        self.hasher.update(bytes);
        self.bar.inc(bytes.len() as u64);
        Ok(())
    }
}

/// `shoal model get`.
pub async fn model_get(a: ModelGetArgs) -> anyhow::Result<()> {
    let client = ShoalClient::connect(&a.nats.options("shoal-cli")?).await?;
    let job = JobId::new(&a.job)?;
    let mut state = client.job_state(&job).await?;
    let version = match a.version {
        Some(v) => ModelVersion(v),
        None => state.model_version,
    };
    // `rounds` is the number of models a job commits: a version past it never exists.
    let spec = client.job_spec(&job).await?;
    anyhow::ensure!(
        version.0 <= spec.rounds,
        "job {job} commits versions 0 to {} (its `rounds`); version {version} will never exist",
        spec.rounds
    );
    if version > state.model_version && a.wait_secs > 0 {
        let timeout = Duration::from_secs(a.wait_secs);
        eprintln!(
            "waiting up to {} for model version {version} of job {job}",
            human(timeout.as_millis() as u64)
        );
        state = match client
            .wait_for_state(&job, timeout, "the model version", |s| s.model_version >= version)
            .await
        {
            Ok(s) => s,
            Err(e) if e.kind() == ErrorKind::JobEnded => client.job_state(&job).await?,
            Err(e) if e.kind() == ErrorKind::Timeout => return Err(not_ready(&job, version, &state)),
            Err(e) => return Err(e.into()),
        };
    }
    if version > state.model_version {
        return Err(not_ready(&job, version, &state));
    }
    let to_stdout = a.output.as_os_str() == "-";
    let part = part_path(&a.output);
    let out: Box<dyn std::io::Write> = if to_stdout {
        Box::new(std::io::BufWriter::new(std::io::stdout()))
    } else {
        let f = std::fs::File::create(&part).with_context(|| format!("creating {}", part.display()))?;
        Box::new(std::io::BufWriter::with_capacity(1 << 20, f))
    };
    let bar = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(format!("{job} v{version}"));
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut sink = ModelSink { out, bar, hasher: sha2::Digest::new() };
    let fetched = client.fetch_model_into(&job, version, &mut sink).await;
    sink.bar.finish_and_clear();
    let flushed = sink.out.flush();
    let info =
        match fetched.and_then(|i| flushed.map(|()| i).map_err(|e| shoal_client::Error::io("flush", e))) {
            Ok(i) => i,
            Err(e) => {
                if !to_stdout {
                    let _ = std::fs::remove_file(&part);
                }
                if e.kind() == ErrorKind::ModelNotReady {
                    eprintln!("error: {e}");
                    return Err(Exit(EXIT_NOT_READY).into());
                }
                return Err(e.into());
            }
        };
    drop(sink.out);
    let digest = hex::encode(sha2::Digest::finalize(sink.hasher));
    let text = format!(
        "model version {version} of job {job}: {} bytes, sha256 {digest} (checked against the stored digest)",
        info.size
    );
    if to_stdout {
        eprintln!("{text}");
    } else {
        std::fs::rename(&part, &a.output)
            .with_context(|| format!("renaming {} to {}", part.display(), a.output.display()))?;
        println!("{text} -> {}", a.output.display());
    }
    Ok(())
}

fn not_ready(job: &JobId, version: ModelVersion, state: &JobState) -> anyhow::Error {
    let hint = match &state.phase {
        JobPhase::Running => format!(
            "round {} is {}; retry when it has committed, or pass --wait-secs",
            state.round,
            if state.is_open() { "open" } else { "about to open" }
        ),
        other => format!("the job is {other} and will commit no more versions"),
    };
    eprintln!(
        "error: model version {version} of job {job} is not committed yet (the job is at version {}); {hint}",
        state.model_version
    );
    Exit(EXIT_NOT_READY).into()
}

/// `<file>.part` next to `<file>`.
fn part_path(p: &Path) -> PathBuf {
    let mut name = p.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".part");
    p.with_file_name(name)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `1 h 2 min`, `42 s`, `350 ms`.
pub fn human(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0 => format!("{ms} ms"),
        1..=119 => format!("{s} s"),
        120..=7199 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC (`2025-01-31T12:00:00Z`).
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm), for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, (rem % 3600) / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_people_write_them() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_767_225_599_999), "2025-12-31T23:59:59Z");
        assert_eq!(human(350), "350 ms");
        assert_eq!(human(42_000), "42 s");
        assert_eq!(human(600_000), "10 min 0 s");
        assert_eq!(human(7_260_000), "2 h 1 min");
        assert_eq!(part_path(Path::new("out/m.safetensors")), PathBuf::from("out/m.safetensors.part"));
    }
}
