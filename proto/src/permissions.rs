//! The least permissions of a client (DESIGN.md §6): which subjects a client's NATS user may
//! publish and subscribe to. `shoal auth nats-config` (the client crate) writes them out as a
//! nats-server `authorization` block; the operator and the chart render the same sets.

use crate::ids::{ClientId, JobId};
use crate::subjects;

/// The inbox prefix of a client: `_INBOX_<client>`. A client may subscribe only below its own
/// prefix, so it cannot read the replies and consumer deliveries of others (the node's gateway
/// reads update objects through its own `_INBOX.` deliveries).
pub fn client_inbox_prefix(client: &ClientId) -> String {
    format!("_INBOX_{client}")
}

/// What one NATS user may publish and subscribe to (allow lists; everything else is denied).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Permissions {
    /// Subjects it may publish to (wildcards allowed).
    pub publish: Vec<String>,
    /// Subjects it may subscribe to.
    pub subscribe: Vec<String>,
}

impl Permissions {
    /// The union of two permission sets (a client in several jobs).
    pub fn merge(mut self, other: &Permissions) -> Permissions {
        for s in &other.publish {
            if !self.publish.contains(s) {
                self.publish.push(s.clone());
            }
        }
        for s in &other.subscribe {
            if !self.subscribe.contains(s) {
                self.subscribe.push(s.clone());
            }
        }
        self
    }
}

/// The least permissions client `client` of job `job` needs with subject prefix `prefix`.
///
/// Publish:
/// - `<p>.<job>.update.<client>`: its own updates (into stream `SHOAL_UPDATES`; the names here
///   are the default prefix's, see [`crate::subjects`]), nothing else;
/// - `<p>.<job>.upload.<client>.>`: the chunks of its own large updates (stream
///   `UPLOADS_<job>`, which allows no rollup, so a client cannot purge the stream);
/// - `<p>.<job>.reward.<client>`: its own reward request;
/// - `$JS.API.DIRECT.GET.KV_shoal-jobs.$KV.shoal-jobs.<job>.spec` and `.state`: reading its own
///   job's spec and state, and no other key;
/// - `$JS.API.DIRECT.GET.OBJ_shoal-models` and `$JS.API.DIRECT.GET.OBJ_shoal-models.>`:
///   reading models (metadata by name, chunks by sequence).
///
/// Subscribe: `_INBOX_<client>.>` (replies, see [`client_inbox_prefix`]), `<p>.<job>.round`,
/// `<p>.<job>.rejected.<client>`.
///
/// Not granted: stream information (`$JS.API.STREAM.INFO`, which would list other jobs'
/// subjects), creating consumers (no push deliveries to chosen subjects), any read of another
/// client's uploads or of `shoal-updates`, any write to `shoal-models` or `shoal-jobs`, stream
/// management.
pub fn client_permissions(prefix: &str, job: &JobId, client: &ClientId) -> Permissions {
    let s = subjects::Subjects::new(prefix);
    let models = subjects::object_stream(&s.models_bucket());
    let jobs = s.jobs_bucket();
    let kv = subjects::kv_stream(&jobs);
    let mut publish = vec![s.update(job, client), s.uploads_of(job, client), s.reward(job, client)];
    for key in [subjects::job_spec_key(job), subjects::job_state_key(job)] {
        publish.push(format!("$JS.API.DIRECT.GET.{kv}.$KV.{jobs}.{key}"));
    }
    publish.push(format!("$JS.API.DIRECT.GET.{models}"));
    publish.push(format!("$JS.API.DIRECT.GET.{models}.>"));
    let subscribe =
        vec![format!("{}.>", client_inbox_prefix(client)), s.round_events(job), s.rejected(job, client)];
    Permissions { publish, subscribe }
}
