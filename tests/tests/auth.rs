//! Authentication, authorization and TLS against a real nats-server and a real `shoal node`.
//!
//! The server runs with the users `shoal_client::auth` generates: the node as an nkey user
//! with every permission, each client as a password user with `client_permissions` for its
//! job. The tests show that a client cannot publish as another client (and nothing is stored
//! for the victim), that its own update commits (also through `shoal client`), that it can
//! neither write nor read another client's upload chunks (by any route) nor the node-to-node
//! object store, that an update message squatting another client's message id is refused and
//! the victim's update still counts,
//! that it cannot write models or job state nor read another job's state; that tokens work
//! and wrong credentials fail at connect; and that node and clients work over mutual TLS with
//! a CA generated at test time while a client without that CA fails with a TLS error.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_nats::jetstream::consumer::push;
use async_nats::HeaderMap;
use bytes::Bytes;
use shoal_client::auth::{self, NatsAuth, NatsTls, UserCredential};
use shoal_client::connect::ConnectOptions;
use shoal_client::{objects, Error};
use shoal_client::{ShoalClient, Transport, UpdateRequest};
use shoal_functions::{
    ClientId, DType, JobId, ModelManifest, ModelVersion, Parameters, RoundId, TensorSpec, UpdateKind,
};
use shoal_proto::subjects;
use shoal_proto::RoundOutcome;
use shoal_runtime::{jobs, RejectReason};
use shoal_testkit::*;

const NODE_USER: &str = "shoal-node";
/// Jobs of the shared secured cluster and their clients.
const JOBS: &[(&str, &[&str])] = &[
    ("forge", &["fa", "fb"]),
    ("objects", &["oa", "ob"]),
    ("hijack", &["ha", "hb"]),
    ("writes", &["wa"]),
    ("cli", &["cc"]),
    ("flood", &["fl", "fm"]),
    ("calm", &["ca"]),
];
const TIMEOUT: Duration = Duration::from_secs(60);

fn password(user: &str) -> String {
    format!("pw-{user}-not-a-real-secret")
}

/// A nats-server with per-user permissions and a node logged in with an nkey seed.
#[derive(Debug)]
struct Secured {
    nats: NatsServer,
    _node: NodeProcess,
    node_opts: ConnectOptions,
    _seed_dir: tempfile::TempDir,
}

static SECURED: OnceLock<Secured> = OnceLock::new();

fn secured() -> &'static Secured {
    SECURED.get_or_init(|| {
        std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let node_key = nkeys::KeyPair::new_user();
                let seed_dir = tempfile::tempdir().unwrap();
                let seed_file = seed_dir.path().join("node.nk");
                std::fs::write(&seed_file, format!("{}\n", node_key.seed().unwrap())).unwrap();
                let mut users = Vec::new();
                for (job, clients) in JOBS {
                    let job = JobId::new(*job).unwrap();
                    let clients: Vec<ClientId> = clients.iter().map(|c| ClientId::new(*c).unwrap()).collect();
                    let job_users = auth::job_users("shoal", &job, NODE_USER, &clients, |u| {
                        if u == NODE_USER {
                            UserCredential::Nkey(node_key.public_key())
                        } else {
                            UserCredential::Password(auth::Secret::new(password(u)))
                        }
                    })
                    .unwrap();
                    // The node user once; then this job's clients.
                    let first = users.is_empty();
                    users.extend(job_users.into_iter().filter(|u| first || u.name != NODE_USER));
                }
                let authorization = auth::authorization_block(&users).unwrap();
                let nats = NatsServer::start_with(NatsOptions {
                    authorization: Some(authorization),
                    ..Default::default()
                })
                .unwrap();
                let node_opts = ConnectOptions {
                    url: nats.url(),
                    auth: NatsAuth { nkey_seed_file: Some(seed_file.clone()), ..Default::default() },
                    ..Default::default()
                };
                let seed = seed_file.display().to_string();
                // The seed file through the environment, as a Helm chart would pass it.
                let node = NodeProcess::start_with(
                    &nats.url(),
                    "secured",
                    &["--ack-wait-ms", "5000"],
                    &[("SHOAL_NATS_NKEY", seed.as_str())],
                    Some(node_opts.clone()),
                )
                .await;
                Secured { nats, _node: node, node_opts, _seed_dir: seed_dir }
            })
        })
        .join()
        .unwrap()
    })
}

async fn node_client() -> ShoalClient {
    init_logging();
    ShoalClient::connect(&secured().node_opts).await.unwrap()
}

/// A client logged in as `id` with its least permissions.
async fn client(id: &str) -> ShoalClient {
    let opts = ConnectOptions {
        url: secured().nats.url(),
        auth: NatsAuth::user_password(id, password(id)),
        ..Default::default()
    }
    .for_client(&ClientId::new(id).unwrap());
    ShoalClient::connect(&opts).await.unwrap()
}

fn small_manifest() -> Arc<ModelManifest> {
    Arc::new(ModelManifest::new(vec![TensorSpec::new("w", DType::F32, vec![64])]).unwrap())
}

/// 1.2 MB of f32: above the job's inline limit (1 MiB − 4 KiB), two upload chunks.
fn large_manifest() -> Arc<ModelManifest> {
    Arc::new(ModelManifest::new(vec![TensorSpec::new("w", DType::F32, vec![300_000])]).unwrap())
}

fn request(
    job: &JobId,
    who: &str,
    round: RoundId,
    m: &Arc<ModelManifest>,
    values: &[Vec<f64>],
    n: u64,
) -> UpdateRequest {
    UpdateRequest {
        job: job.clone(),
        client: ClientId::new(who).unwrap(),
        round,
        base_version: ModelVersion(0),
        num_examples: n,
        kind: UpdateKind::Parameters,
        payload: payload(m, values),
        force_upload: false,
    }
}

fn assert_unauthorized<T: std::fmt::Debug>(r: Result<T, Error>, subject_part: &str) {
    match r {
        Err(Error::Unauthorized { detail, .. }) => {
            assert!(detail.contains(subject_part), "refusal {detail:?} does not name {subject_part:?}")
        }
        other => panic!("expected a permissions violation naming {subject_part:?}, got {other:?}"),
    }
}

async fn assert_matches_oracle(
    c: &ShoalClient,
    job: &JobId,
    m: &Arc<ModelManifest>,
    sent: &[(Vec<Vec<f64>>, f64)],
) {
    let bytes = c.fetch_model(job, ModelVersion(1)).await.unwrap();
    let model = Parameters::from_safetensors(Arc::clone(m), &bytes).unwrap();
    let oracle = weighted_mean_oracle(sent);
    for (g, o) in model.tensor_f64(0).iter().zip(&oracle[0]) {
        assert!((g - o).abs() <= 1e-6 * o.abs().max(1e-30), "committed {g}, oracle {o}");
    }
}

#[tokio::test]
async fn a_client_cannot_publish_as_another_and_its_own_update_commits() {
    let node = node_client().await;
    let m = small_manifest();
    let job = JobId::new("forge").unwrap();
    jobs::create_job(
        &shoal_testkit::infra_of(&node).await,
        &job_spec("forge", (*m).clone(), 2, 2, 60_000, 1),
        None,
    )
    .await
    .unwrap();
    let (fa, fb) = (client("fa").await, client("fb").await);
    let state = fa.wait_for_open_round(&job, RoundId(1), TIMEOUT).await.unwrap();

    // fa publishes an update as fb: NATS refuses the subject.
    let forged = as_sent(&m, &random_values(&m, 99));
    let r = fa.publish_update(request(&job, "fb", state.round, &m, &forged, 1000)).await;
    assert_unauthorized(r, "Publish to \"shoal.forge.update.fb\"");
    // Nothing was stored for fb.
    let stream = node.connection().js.get_stream(subjects::UPDATES_STREAM).await.unwrap();
    let stored = stream.get_last_raw_message_by_subject("shoal.forge.update.fb").await;
    assert!(stored.is_err(), "a message for fb was stored: {stored:?}");

    // fa's own update (same connection) and fb's are accepted; the round commits their mean.
    let a = as_sent(&m, &random_values(&m, 1));
    let b = as_sent(&m, &random_values(&m, 2));
    assert_eq!(
        fa.publish_update(request(&job, "fa", state.round, &m, &a, 10)).await.unwrap(),
        Transport::Inline
    );
    fb.publish_update(request(&job, "fb", state.round, &m, &b, 30)).await.unwrap();
    let after = fa.wait_for_round_closed(&job, RoundId(1), TIMEOUT).await.unwrap();
    assert!(matches!(after.last_outcome, Some(RoundOutcome::Committed { clients: 2, .. })), "{after:?}");
    assert_matches_oracle(&fa, &job, &m, &[(a, 10.0), (b, 30.0)]).await;
}

/// Large updates travel on the upload path: a client can neither write nor read another
/// client's upload chunks (by any route), nor purge the job's upload stream, nor read the
/// node-to-node object store; an update message still carrying the retired `Shoal-Object` header
/// is refused as malformed; both clients' honest uploads commit.
#[tokio::test]
async fn a_client_cannot_write_or_read_another_clients_upload() {
    let node = node_client().await;
    let m = large_manifest();
    let job = JobId::new("objects").unwrap();
    jobs::create_job(
        &shoal_testkit::infra_of(&node).await,
        &job_spec("objects", (*m).clone(), 2, 2, 60_000, 1),
        None,
    )
    .await
    .unwrap();
    let (oa, ob) = (client("oa").await, client("ob").await);
    let state = ob.wait_for_open_round(&job, RoundId(1), TIMEOUT).await.unwrap();
    let b = as_sent(&m, &random_values(&m, 3));
    let via = ob.publish_update(request(&job, "ob", state.round, &m, &b, 20)).await.unwrap();
    assert_eq!(via, Transport::Upload, "a 1.2 MB update takes the upload path");
    let ob_id = ClientId::new("ob").unwrap();
    let chunk0 = node.connection().subjects.upload_chunk(&job, &ob_id, state.round, 0);
    let uploads = subjects::Subjects::default().uploads_stream(&job);

    let infra = oa.connection();
    let v = &infra.violations;
    // Writing a chunk under ob's name.
    let r = v
        .guard("publish chunk", async {
            let ack = infra.js.publish(chunk0.clone(), Bytes::from_static(b"forged")).await;
            ack.map_err(|e| Error::nats("p", e))?.await.map_err(|e| Error::nats("a", e))
        })
        .await;
    assert_unauthorized(r.map(|_| ()), &format!("Publish to \"{chunk0}\""));
    // Reading ob's chunks: direct get, stream message get, a consumer, a subscription.
    let stream = infra.js.get_stream_no_info(&uploads).await.unwrap();
    let r = v
        .guard("direct", async {
            stream.direct_get_last_for_subject(&chunk0).await.map_err(|e| Error::nats("d", e))
        })
        .await;
    assert_unauthorized(r.map(|_| ()), &format!("$JS.API.DIRECT.GET.{uploads}"));
    let r =
        v.guard("msg get", async { stream.get_raw_message(1).await.map_err(|e| Error::nats("m", e)) }).await;
    assert_unauthorized(r.map(|_| ()), &format!("$JS.API.STREAM.MSG.GET.{uploads}"));
    let consumer = push::OrderedConfig {
        deliver_subject: infra.client.new_inbox(),
        filter_subject: "shoal.objects.upload.>".into(),
        ..Default::default()
    };
    let r = v
        .guard("consume", async { stream.create_consumer(consumer).await.map_err(|e| Error::nats("c", e)) })
        .await;
    assert_unauthorized(r.map(|_| ()), &format!("$JS.API.CONSUMER.CREATE.{uploads}"));
    let r = v.guard("purge", async { stream.purge().await.map_err(|e| Error::nats("p", e)) }).await;
    assert_unauthorized(r.map(|_| ()), &format!("$JS.API.STREAM.PURGE.{uploads}"));
    let r =
        v.guard("info", async { infra.js.get_stream(&uploads).await.map_err(|e| Error::nats("i", e)) }).await;
    assert_unauthorized(r.map(|_| ()), &format!("$JS.API.STREAM.INFO.{uploads}"));
    // The node-to-node object store is closed to clients.
    let r =
        v.guard("read", objects::read_object(&infra.js, subjects::UPDATES_BUCKET, "objects/1/n1/1")).await;
    assert_unauthorized(r, "$JS.API.DIRECT.GET.OBJ_shoal-updates.");
    // Listening to chunks as they are published, or to the node's inbox where the gateway's
    // reads of them are delivered.
    for subject in ["shoal.objects.upload.>", "_INBOX.>"] {
        let r = v
            .guard("subscribe", async {
                let sub = infra.client.subscribe(subject).await.map_err(|e| Error::nats("s", e))?;
                infra.client.flush().await.map_err(|e| Error::nats("f", e))?;
                // The refusal arrives asynchronously; wait for it (bounded).
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(sub)
            })
            .await;
        assert_unauthorized(r.map(|_| ()), &format!("Subscription to \"{subject}\""));
    }

    // An update message in the retired object-store form is refused as malformed headers.
    let me = ClientId::new("oa").unwrap();
    let mut rejections = oa.rejections(&job, &me).await.unwrap();
    let mut h = HeaderMap::new();
    h.insert(shoal_proto::headers::HDR_ROUND, state.round.to_string().as_str());
    h.insert(shoal_proto::headers::HDR_BASE_VERSION, "0");
    h.insert(shoal_proto::headers::HDR_NUM_EXAMPLES, "20");
    h.insert(shoal_proto::headers::HDR_OBJECT, "objects/1/ob");
    let subject = infra.subjects.update(&job, &me);
    infra.js.publish_with_headers(subject, h, Bytes::new()).await.unwrap().await.unwrap();
    let notice = next_rejection(&mut rejections).await;
    assert_eq!(notice.reason, RejectReason::MalformedHeaders, "{notice:?}");
    assert!(notice.detail.contains("Shoal-Object"), "{notice:?}");

    // oa's own large update commits with ob's.
    let a = as_sent(&m, &random_values(&m, 4));
    assert_eq!(
        oa.publish_update(request(&job, "oa", state.round, &m, &a, 60)).await.unwrap(),
        Transport::Upload
    );
    let after = oa.wait_for_round_closed(&job, RoundId(1), TIMEOUT).await.unwrap();
    assert!(matches!(after.last_outcome, Some(RoundOutcome::Committed { clients: 2, .. })), "{after:?}");
    assert_matches_oracle(&oa, &job, &m, &[(a, 60.0), (b, 20.0)]).await;
}

/// `shoal client` as a least-privilege user (password from the environment) publishes, waits
/// and sees its round commit.
#[tokio::test]
async fn the_cli_client_works_with_least_permissions() {
    let node = node_client().await;
    let m = small_manifest();
    let job = JobId::new("cli").unwrap();
    jobs::create_job(
        &shoal_testkit::infra_of(&node).await,
        &job_spec("cli", (*m).clone(), 1, 1, 60_000, 1),
        None,
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cc.safetensors");
    let values = as_sent(&m, &random_values(&m, 8));
    std::fs::write(&file, payload(&m, &values)).unwrap();
    let url = secured().nats.url();
    let out = tokio::process::Command::new(shoal_bin())
        .args(["client", "--nats-url", &url, "--nats-user", "cc", "--job", "cli", "--client-id", "cc"])
        .args(["--num-examples", "5", "--wait", "--timeout-secs", "60", "--update"])
        .arg(&file)
        .env("SHOAL_NATS_PASSWORD", password("cc"))
        .output()
        .await
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "shoal client failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("round 1 closed: committed"), "{stdout}");
    assert!(!stderr.contains(&password("cc")), "the password leaked: {stderr}");
    assert_matches_oracle(&node, &job, &m, &[(values, 5.0)]).await;
}

/// A message id is only a header: client ha may publish, on its own subject, the id hb's update
/// will carry, so that JetStream would drop hb's real update as a duplicate. The node refuses
/// ha's message (the id names another client); hb's SDK sees a duplicate it never sent and
/// publishes again under a fresh id; the round commits the honest mean.
#[tokio::test]
async fn a_squatted_message_id_is_refused_and_the_victims_update_still_counts() {
    let node = node_client().await;
    let m = large_manifest();
    let job = JobId::new("hijack").unwrap();
    jobs::create_job(
        &shoal_testkit::infra_of(&node).await,
        &job_spec("hijack", (*m).clone(), 2, 2, 60_000, 1),
        None,
    )
    .await
    .unwrap();
    let (ha, hb) = (client("ha").await, client("hb").await);
    let state = hb.wait_for_open_round(&job, RoundId(1), TIMEOUT).await.unwrap();
    let (ha_id, hb_id) = (ClientId::new("ha").unwrap(), ClientId::new("hb").unwrap());
    let b = as_sent(&m, &random_values(&m, 6));
    let b_bytes = payload(&m, &b);
    let limits = hb.limits(&job).await.unwrap();
    let chunks = (b_bytes.len() as u64).div_ceil(limits.chunk_bytes);
    assert!(chunks >= 2, "the update spans several chunks");
    let squatted = shoal_proto::headers::update_msg_id(&shoal_proto::headers::MsgIdFields {
        job: &job,
        round: state.round,
        client: &hb_id,
        base_version: ModelVersion(0),
        num_examples: 50,
        kind: UpdateKind::Parameters,
        transport: shoal_proto::headers::Transport::Upload { chunks, bytes: b_bytes.len() as u64 },
        payload_sha256: &hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&b_bytes)),
    });
    let mut ha_rejections = ha.rejections(&job, &ha_id).await.unwrap();
    let mut h = HeaderMap::new();
    h.insert(shoal_proto::headers::HDR_ROUND, state.round.to_string().as_str());
    h.insert(shoal_proto::headers::HDR_BASE_VERSION, "0");
    h.insert(shoal_proto::headers::HDR_NUM_EXAMPLES, "50");
    h.insert(shoal_proto::headers::HDR_MSG_ID, squatted.as_str());
    let forged = payload(&small_of(&m), &as_sent(&small_of(&m), &random_values(&small_of(&m), 66)));
    let subject = ha.connection().subjects.update(&job, &ha_id);
    let ack = ha.connection().js.publish_with_headers(subject, h, forged).await.unwrap().await.unwrap();
    assert!(!ack.duplicate);
    let notice = next_rejection(&mut ha_rejections).await;
    assert_eq!(notice.reason, RejectReason::Unauthorized, "{notice:?}");
    assert!(notice.detail.contains("Nats-Msg-Id"), "{notice:?}");

    // hb publishes its real update: JetStream calls it a duplicate of ha's message, the SDK
    // publishes again under a fresh id.
    assert_eq!(
        hb.publish_update(request(&job, "hb", state.round, &m, &b, 50)).await.unwrap(),
        Transport::Upload
    );
    let a = as_sent(&m, &random_values(&m, 7));
    ha.publish_update(request(&job, "ha", state.round, &m, &a, 25)).await.unwrap();
    let after = hb.wait_for_round_closed(&job, RoundId(1), TIMEOUT).await.unwrap();
    assert!(matches!(after.last_outcome, Some(RoundOutcome::Committed { clients: 2, .. })), "{after:?}");
    assert_matches_oracle(&hb, &job, &m, &[(a, 25.0), (b, 50.0)]).await;
}

/// A manifest of the same tensor names but one element each (a small forged payload).
fn small_of(m: &Arc<ModelManifest>) -> Arc<ModelManifest> {
    let specs = m.tensors().iter().map(|t| TensorSpec::new(t.name.clone(), t.dtype, vec![1])).collect();
    Arc::new(ModelManifest::new(specs).unwrap())
}

#[tokio::test]
async fn a_client_cannot_write_models_or_job_state_nor_read_other_jobs() {
    let node = node_client().await;
    let m = small_manifest();
    let job = JobId::new("writes").unwrap();
    jobs::create_job(
        &shoal_testkit::infra_of(&node).await,
        &job_spec("writes", (*m).clone(), 1, 1, 60_000, 1),
        None,
    )
    .await
    .unwrap();
    let wa = client("wa").await;
    // It can read its own job (and wait for its round through events and state reads).
    wa.wait_for_open_round(&job, RoundId(1), TIMEOUT).await.unwrap();
    let (state_before, rev_before) = jobs::load_state(&node.connection(), &job).await.unwrap();
    assert_eq!(wa.job_state(&job).await.unwrap(), state_before);
    let infra = wa.connection();
    let v = &infra.violations;
    assert!(wa.fetch_model(&job, ModelVersion(0)).await.is_ok());
    // Not even the buckets' stream information (async-nats's bucket handles need it).
    let r = v
        .guard("open models", async {
            infra.js.get_object_store(subjects::MODELS_BUCKET).await.map_err(|e| Error::nats("open", e))
        })
        .await;
    assert_unauthorized(r.map(|_| ()), "$JS.API.STREAM.INFO.OBJ_shoal-models");

    let forged = Bytes::from(Parameters::zeros(Arc::clone(&m)).to_safetensors().unwrap());
    let r = v
        .guard(
            "put model",
            objects::put_object(&infra.js, subjects::MODELS_BUCKET, "writes/0", &forged, 1 << 20),
        )
        .await;
    assert_unauthorized(r, "Publish to \"$O.shoal-models.C.");
    for key in ["writes.state", "writes.spec", "other.state"] {
        let value = Bytes::from(shoal_proto::encode(&state_before));
        let r = v
            .guard("put kv", async {
                let ack = infra.js.publish(format!("$KV.shoal-jobs.{key}"), value).await;
                ack.map_err(|e| Error::nats("kv", e))?.await.map_err(|e| Error::nats("kv", e))
            })
            .await;
        assert_unauthorized(r.map(|_| ()), &format!("Publish to \"$KV.shoal-jobs.{key}\""));
    }
    let r = v
        .guard("delete stream", async {
            infra.js.delete_stream("OBJ_shoal-models").await.map_err(|e| Error::nats("delete", e))
        })
        .await;
    assert_unauthorized(r.map(|_| ()), "$JS.API.STREAM.DELETE.OBJ_shoal-models");
    // Another job's state is not readable.
    assert_unauthorized(wa.job_state(&JobId::new("forge").unwrap()).await, "$KV.shoal-jobs.forge.state");

    // Nothing changed.
    assert!(node.fetch_model(&job, ModelVersion(1)).await.is_err(), "no version 1 appeared");
    let v0 = node.fetch_model(&job, ModelVersion(0)).await.unwrap();
    let zeros = Parameters::from_safetensors(Arc::clone(&m), &v0).unwrap();
    assert!(zeros.tensor_f64(0).iter().all(|x| *x == 0.0));
    // Round 1 stays open (no update, 60 s deadline): nobody wrote the state.
    let (state_after, rev_after) = jobs::load_state(&node.connection(), &job).await.unwrap();
    assert_eq!((state_after, rev_after), (state_before, rev_before));

    // Wrong credentials are refused at connect, at once.
    let wrong = ConnectOptions {
        url: secured().nats.url(),
        auth: NatsAuth::user_password("wa", "wrong"),
        ..Default::default()
    };
    let r = ShoalClient::connect(&wrong).await;
    assert!(matches!(r, Err(Error::Unauthorized { op: "connect", .. })), "{r:?}");
}

#[tokio::test]
async fn node_and_clients_work_over_tls_and_a_client_without_the_ca_gets_a_tls_error() {
    init_logging();
    let pki = TestPki::generate();
    let nats = NatsServer::start_with(NatsOptions {
        tls: Some(ServerTls {
            cert_file: pki.server_cert.clone(),
            key_file: pki.server_key.clone(),
            ca_file: Some(pki.ca_cert.clone()),
            verify_clients: true,
        }),
        ..Default::default()
    })
    .unwrap();
    let tls = NatsTls {
        ca_file: Some(pki.ca_cert.clone()),
        client_cert: Some(pki.client_cert.clone()),
        client_key: Some(pki.client_key.clone()),
        require: true,
    };
    let opts = ConnectOptions { url: nats.tls_url(), tls: tls.clone(), ..Default::default() };
    let (ca, cert, key) = (
        pki.ca_cert.display().to_string(),
        pki.client_cert.display().to_string(),
        pki.client_key.display().to_string(),
    );
    let _node = NodeProcess::start_with(
        &nats.tls_url(),
        "tls-node",
        &["--nats-ca", &ca, "--nats-cert", &cert, "--nats-key", &key, "--nats-require-tls"],
        &[],
        Some(opts.clone()),
    )
    .await;

    let c = ShoalClient::connect(&opts).await.unwrap();
    let m = small_manifest();
    let job = JobId::new("tls").unwrap();
    jobs::create_job(
        &shoal_testkit::infra_of(&c).await,
        &job_spec("tls", (*m).clone(), 1, 1, 60_000, 1),
        None,
    )
    .await
    .unwrap();
    let state = c.wait_for_open_round(&job, RoundId(1), TIMEOUT).await.unwrap();
    let a = as_sent(&m, &random_values(&m, 5));
    c.publish_update(request(&job, "t1", state.round, &m, &a, 7)).await.unwrap();
    let after = c.wait_for_round_closed(&job, RoundId(1), TIMEOUT).await.unwrap();
    assert!(matches!(after.last_outcome, Some(RoundOutcome::Committed { clients: 1, .. })), "{after:?}");
    assert_matches_oracle(&c, &job, &m, &[(a, 7.0)]).await;

    // Without the CA (platform roots only), and trusting an unrelated CA: TLS errors, not hangs.
    for (what, ca_file) in [("no CA", None), ("another CA", Some(pki.other_ca_cert.clone()))] {
        let bad =
            ConnectOptions { url: nats.url(), tls: NatsTls { ca_file, ..tls.clone() }, ..Default::default() };
        match ShoalClient::connect(&bad).await {
            Err(Error::Tls { detail, .. }) => {
                assert!(detail.contains("certificate"), "{what}: {detail}");
                eprintln!("{what}: {detail}");
            }
            other => panic!("{what}: expected a TLS error, got {other:?}"),
        }
    }
    // With the CA but without a client certificate: the server refuses the handshake.
    let no_cert = ConnectOptions {
        url: nats.url(),
        tls: NatsTls { ca_file: Some(pki.ca_cert.clone()), ..Default::default() },
        ..Default::default()
    };
    match ShoalClient::connect(&no_cert).await {
        Err(Error::Tls { detail, .. }) => eprintln!("no client certificate: {detail}"),
        other => panic!("no client certificate: expected a TLS error, got {other:?}"),
    }
}

#[tokio::test]
async fn token_authentication_connects_and_a_wrong_token_is_refused_at_once() {
    init_logging();
    let nats = NatsServer::start_with(NatsOptions {
        authorization: Some("authorization { token: \"s3cret-token\" }".into()),
        ..Default::default()
    })
    .unwrap();
    let with = |token: &str| ConnectOptions {
        url: nats.url(),
        auth: NatsAuth { token: Some(auth::Secret::new(token)), ..Default::default() },
        ..Default::default()
    };
    // A full-rights token user creates the resources, as a node would.
    ShoalClient::connect(&with("s3cret-token")).await.unwrap();
    let r = ShoalClient::connect(&with("wrong")).await;
    assert!(matches!(r, Err(Error::Unauthorized { op: "connect", .. })), "{r:?}");
    // A token in the URL works too, and never appears in errors.
    let in_url =
        ConnectOptions { url: nats.url().replace("nats://", "nats://wrong-in-url@"), ..Default::default() };
    let err = ShoalClient::connect(&in_url).await.unwrap_err().to_string();
    assert!(!err.contains("wrong-in-url"), "{err}");
    let ok =
        ConnectOptions { url: nats.url().replace("nats://", "nats://s3cret-token@"), ..Default::default() };
    ShoalClient::connect(&ok).await.unwrap();
}

/// Decision 6 (issue 13, defect 2): the generator never writes a password nats-server could
/// misparse. Literal passwords are double-quoted and limited to `[A-Za-z0-9._~-]`: characters
/// that end or split a config value (`;` `,` `}` space, quotes, backslashes) are refused with an
/// error that does not echo the password, and number-like passwords (`12345`, `5m`, `true`,
/// `1e10`) reach the real nats-server as the exact strings: a client logs in with exactly that
/// password, and the truncated one is refused. Environment passwords stay `$VAR` references,
/// with the generated comment saying how nats-server parses the variable's value.
#[tokio::test]
async fn generated_passwords_reach_nats_server_exactly_or_are_refused() {
    init_logging();
    let user = |name: &str, credential: UserCredential| auth::NatsUser {
        name: name.into(),
        credential,
        permissions: None,
        comment: format!("user {name}"),
    };
    for bad in ["a;b", "a,b", "a}b", "a b", "ab;", "a#b", "", "a\"b", "a\\b", "pässword", "a\nb"] {
        let r = auth::authorization_block(&[user("u", UserCredential::Password(auth::Secret::new(bad)))]);
        match r {
            Err(Error::InvalidOptions(m)) => {
                assert!(bad.len() < 2 || !m.contains(bad), "the error echoes the password: {m}")
            }
            other => panic!("password {bad:?} was not refused: {other:?}"),
        }
    }
    let literal = ["12345", "5m", "true", "1e10", "0.5", "-1", "a.b~c-d_E9"];
    let users: Vec<auth::NatsUser> = literal
        .iter()
        .enumerate()
        .map(|(i, p)| user(&format!("u{i}"), UserCredential::Password(auth::Secret::new(*p))))
        .chain([user("envuser", UserCredential::PasswordEnv("SHOAL_NATS_PASSWORD_ENVUSER".into()))])
        .collect();
    let text = auth::authorization_block(&users).unwrap();
    assert!(text.contains("password: \"12345\"") && text.contains("password: \"true\""), "{text}");
    assert!(text.contains("password: $SHOAL_NATS_PASSWORD_ENVUSER"), "{text}");
    assert!(
        text.contains("parses the value of $SHOAL_NATS_PASSWORD_ENVUSER"),
        "no guidance for the variable: {text}"
    );
    // The real server accepts the block (the variable is set, quoted as the comment says).
    std::env::set_var("SHOAL_NATS_PASSWORD_ENVUSER", "\"env;pw 1\"");
    let nats =
        NatsServer::start_with(NatsOptions { authorization: Some(text), ..Default::default() }).unwrap();
    let login = |name: String, password: &str| {
        let opts = ConnectOptions {
            url: nats.url(),
            auth: NatsAuth::user_password(name, password),
            ..Default::default()
        };
        async move { ShoalClient::connect(&opts).await.map(drop) }
    };
    for (i, p) in literal.iter().enumerate() {
        login(format!("u{i}"), p).await.unwrap_or_else(|e| panic!("{p:?} refused: {e}"));
        let truncated = &p[..p.len() - 1];
        let r = login(format!("u{i}"), truncated).await;
        assert!(
            matches!(r, Err(Error::Unauthorized { op: "connect", .. })),
            "{truncated:?} for {p:?}: {r:?}"
        );
    }
    login("envuser".into(), "env;pw 1").await.unwrap();
    assert!(login("envuser".into(), "env").await.is_err());
}

/// A least-permission client floods its job's upload stream with chunks under its own name (the
/// only upload subjects it may write): JetStream refuses them once the job's upload quota is
/// full. Another job is not hurt: its large update commits meanwhile. The flooding job's own
/// uploads are blocked until its round closes (the quota is per job: see docs/reliability.md);
/// then the node purges the round's uploads and the job's clients upload again in the next
/// round, without anyone restarting anything.
#[tokio::test]
async fn a_client_flooding_its_uploads_hurts_no_other_job_and_its_job_recovers() {
    let node = node_client().await;
    let large = large_manifest();
    let (flood, calm) = (JobId::new("flood").unwrap(), JobId::new("calm").unwrap());
    // The flooding job: large updates (two 1 MiB chunks each), a quota of 3 MiB, short rounds.
    let mut spec = job_spec("flood", (*large).clone(), 1, 1, 4_000, 1);
    spec.upload_quota_bytes = Some(3 << 20);
    jobs::create_job(&shoal_testkit::infra_of(&node).await, &spec, None).await.unwrap();
    jobs::create_job(
        &shoal_testkit::infra_of(&node).await,
        &job_spec("calm", (*large).clone(), 1, 1, 60_000, 1),
        None,
    )
    .await
    .unwrap();
    let (fl, fm, ca) = (client("fl").await, client("fm").await, client("ca").await);
    let state = fl.wait_for_open_round(&flood, RoundId(1), TIMEOUT).await.unwrap();

    // A rollup on its own upload subject would wipe every chunk of the stream (others'
    // included): the upload stream refuses rollups, and fm's chunk stays.
    let fl_id = ClientId::new("fl").unwrap();
    let fm_id = ClientId::new("fm").unwrap();
    let fm_chunk = fm.connection().subjects.upload_chunk(&flood, &fm_id, state.round, 0);
    fm.connection()
        .js
        .publish(fm_chunk.clone(), Bytes::from_static(b"fm's chunk"))
        .await
        .unwrap()
        .await
        .unwrap();
    let mut rollup = HeaderMap::new();
    rollup.insert("Nats-Rollup", "all");
    let own = fl.connection().subjects.upload_chunk(&flood, &fl_id, state.round, 99);
    let r = match fl.connection().js.publish_with_headers(own, rollup, Bytes::from_static(b"x")).await {
        Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert!(r.is_err(), "a rollup on the upload stream was accepted");
    let uploads =
        node.connection().js.get_stream(node.connection().subjects.uploads_stream(&flood)).await.unwrap();
    let kept = uploads.get_last_raw_message_by_subject(&fm_chunk).await.unwrap();
    assert_eq!(&kept.payload[..], b"fm's chunk", "another client's chunk was wiped");
    uploads.purge().filter(&fm_chunk).await.unwrap();

    // The flood: 512 KiB chunks under fl's own upload subjects until JetStream refuses them.
    let junk = Bytes::from(vec![0xAB; 512 << 10]);
    let (mut stored, mut refused) = (0u64, 0u32);
    for i in 0..16 {
        let subject = fl.connection().subjects.upload_chunk(&flood, &fl_id, state.round, i);
        let ack = match fl.connection().js.publish(subject, junk.clone()).await {
            Ok(ack) => ack.await,
            Err(e) => panic!("publishing under its own name is allowed: {e}"),
        };
        match ack {
            Ok(_) => stored += junk.len() as u64,
            Err(_) => refused += 1,
        }
    }
    assert!(stored <= 3 << 20, "{stored} bytes stored past the 3 MiB quota");
    assert!(refused >= 8, "only {refused} of 16 flood chunks refused");
    // The job's clients cannot upload now: a typed error (nothing half-sent is counted).
    let b = as_sent(&large, &random_values(&large, 73));
    let r = fm.publish_update(request(&flood, "fm", state.round, &large, &b, 20)).await;
    assert!(matches!(r, Err(Error::UploadQuotaFull { .. })), "{r:?}");

    // Another job is untouched: its large update goes through the upload path and commits.
    let cstate = ca.wait_for_open_round(&calm, RoundId(1), TIMEOUT).await.unwrap();
    let c = as_sent(&large, &random_values(&large, 72));
    let via = ca.publish_update(request(&calm, "ca", cstate.round, &large, &c, 30)).await.unwrap();
    assert_eq!(via, Transport::Upload);
    let after = ca.wait_for_round_closed(&calm, RoundId(1), TIMEOUT).await.unwrap();
    assert!(matches!(after.last_outcome, Some(RoundOutcome::Committed { clients: 1, .. })), "{after:?}");
    assert_matches_oracle(&ca, &calm, &large, &[(c, 30.0)]).await;

    // The flooded round ends at its deadline with nothing; its uploads are purged, and the next
    // round takes fm's large update through the upload path again.
    let closed = fm.wait_for_round_closed(&flood, state.round, TIMEOUT).await.unwrap();
    assert!(matches!(closed.last_outcome, Some(RoundOutcome::QuorumNotMet { .. })), "{closed:?}");
    let next = fm.wait_for_open_round(&flood, state.round.next(), TIMEOUT).await.unwrap();
    let mut req = request(&flood, "fm", next.round, &large, &b, 20);
    req.base_version = next.model_version;
    assert_eq!(fm.publish_update(req).await.unwrap(), Transport::Upload, "the job recovered");
    let done = fm.wait_for_round_closed(&flood, next.round, TIMEOUT).await.unwrap();
    assert!(matches!(done.last_outcome, Some(RoundOutcome::Committed { clients: 1, .. })), "{done:?}");
    assert_matches_oracle(&fm, &flood, &large, &[(b, 20.0)]).await;
}
