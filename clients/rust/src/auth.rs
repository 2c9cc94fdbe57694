//! NATS authentication, TLS, and Shoal's least-privilege permission model (DESIGN.md §6).
//!
//! - [`NatsAuth`] and [`NatsTls`]: what a process presents to NATS. Credentials are one of
//!   user + password, a token, a `.creds` file (JWT + nkey) or an nkey seed file. TLS takes
//!   a CA file (root certificates), an optional client certificate + key, and `require`.
//!   Secrets are [`Secret`]s: their `Debug` and `Display` print `***`.
//! - [`client_permissions`]: exactly the subjects a client of one job may publish and
//!   subscribe to. The update subject `<prefix>.<job>.update.<client>` is the only update
//!   subject it may publish to, so the subject *is* its authenticated identity.
//! - [`authorization_block`] and [`job_users`]: the nats-server `authorization { users = [...] }`
//!   text for a job (`shoal auth nats-config` prints it).
//! - [`Violations`]: the permission violations the server reports on a connection. NATS answers
//!   a forbidden publish or subscribe with an asynchronous `-ERR`, not a reply, so without this
//!   a forbidden request would only time out; [`Violations::guard`] turns it into
//!   [`Error::Unauthorized`].
//!
//! What the permissions cannot express (ARCHITECTURE.md, "Authentication and permissions"):
//! object-store chunk subjects carry random NUIDs and metadata subjects carry base64 object
//! names, so a client may publish chunks and metadata into `shoal-updates` under any name. The
//! gateway therefore accepts an object only when its name is the publishing subject's own
//! `<job>/<round>/<client>` and its bytes match the `Shoal-Digest` header that only that client
//! could publish; and no client may read anything from `shoal-updates`. Models in
//! `shoal-models` are readable by every client of the NATS account.

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::str::FromStr;

use shoal_proto::{ClientId, JobId};

use crate::error::{Error, Result};

/// A secret string (password, token). `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Secret {
        Secret(secret.into())
    }

    /// The secret itself, for handing to the NATS client.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Secret, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// Credentials presented to NATS. At most one method: user + password, token, `.creds` file or
/// nkey seed file. All `None` connects without credentials.
#[derive(Debug, Clone, Default)]
pub struct NatsAuth {
    /// User name (with `password`).
    pub user: Option<String>,
    /// Password (with `user`).
    pub password: Option<Secret>,
    /// Token (`authorization { token: ... }` on the server).
    pub token: Option<Secret>,
    /// A `.creds` file: a user JWT and its nkey seed (operator/JWT mode).
    pub creds_file: Option<PathBuf>,
    /// A file holding an nkey user seed (`SU...`); the server lists the public key.
    pub nkey_seed_file: Option<PathBuf>,
}

impl NatsAuth {
    /// User and password.
    pub fn user_password(user: impl Into<String>, password: impl Into<String>) -> NatsAuth {
        NatsAuth { user: Some(user.into()), password: Some(Secret::new(password)), ..NatsAuth::default() }
    }

    /// Whether any credential is set.
    pub fn is_set(&self) -> bool {
        self.user.is_some()
            || self.password.is_some()
            || self.token.is_some()
            || self.creds_file.is_some()
            || self.nkey_seed_file.is_some()
    }

    /// Checks that the options name exactly one complete method (or none).
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] naming the conflict or the missing half.
    pub fn validate(&self) -> Result<()> {
        let methods = [
            ("user/password", self.user.is_some() || self.password.is_some()),
            ("token", self.token.is_some()),
            ("creds file", self.creds_file.is_some()),
            ("nkey seed file", self.nkey_seed_file.is_some()),
        ];
        let chosen: Vec<&str> = methods.iter().filter(|(_, on)| *on).map(|(name, _)| *name).collect();
        if chosen.len() > 1 {
            return Err(Error::InvalidOptions(format!(
                "choose one NATS credential, not {}",
                chosen.join(" and ")
            )));
        }
        match (&self.user, &self.password) {
            (Some(_), None) => Err(Error::InvalidOptions("a NATS user needs a password".into())),
            (None, Some(_)) => Err(Error::InvalidOptions("a NATS password needs a user".into())),
            _ => Ok(()),
        }
    }

    /// Adds these credentials to `opts`.
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] (see [`Self::validate`], or a seed file without a user seed);
    /// [`Error::Io`] when a creds or seed file cannot be read.
    pub async fn apply(&self, opts: async_nats::ConnectOptions) -> Result<async_nats::ConnectOptions> {
        self.validate()?;
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            return Ok(opts.user_and_password(user.clone(), password.expose().to_owned()));
        }
        if let Some(token) = &self.token {
            return Ok(opts.token(token.expose().to_owned()));
        }
        if let Some(path) = &self.creds_file {
            return opts
                .credentials_file(path)
                .await
                .map_err(|e| Error::io(format!("reading NATS creds file {}", path.display()), e));
        }
        if let Some(path) = &self.nkey_seed_file {
            let text = tokio::fs::read_to_string(path)
                .await
                .map_err(|e| Error::io(format!("reading nkey seed file {}", path.display()), e))?;
            let seed = text.lines().map(str::trim).find(|l| l.starts_with("SU")).ok_or_else(|| {
                Error::InvalidOptions(format!("{} holds no nkey user seed (SU...)", path.display()))
            })?;
            if nkeys::KeyPair::from_seed(seed).is_err() {
                return Err(Error::InvalidOptions(format!("{} holds an invalid nkey seed", path.display())));
            }
            return Ok(opts.nkey(seed.to_owned()));
        }
        Ok(opts)
    }
}

/// TLS to NATS.
#[derive(Debug, Clone, Default)]
pub struct NatsTls {
    /// PEM file of the CA certificate(s) that signed the server's certificate. Without it the
    /// platform's roots are used.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that verify clients (`verify: true`).
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
    /// Refuse to talk to a server that does not offer TLS.
    pub require: bool,
}

impl NatsTls {
    /// Adds these TLS settings to `opts`.
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] for a certificate without a key (or the reverse);
    /// [`Error::Io`] when a named file is unreadable.
    pub fn apply(&self, mut opts: async_nats::ConnectOptions) -> Result<async_nats::ConnectOptions> {
        for path in [&self.ca_file, &self.client_cert, &self.client_key].into_iter().flatten() {
            std::fs::metadata(path).map_err(|e| Error::io(format!("TLS file {}", path.display()), e))?;
        }
        if let Some(ca) = &self.ca_file {
            opts = opts.add_root_certificates(ca.clone());
        }
        match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => opts = opts.add_client_certificate(cert.clone(), key.clone()),
            (None, None) => {}
            _ => {
                return Err(Error::InvalidOptions("a TLS client certificate and its key go together".into()))
            }
        }
        if self.require || self.ca_file.is_some() || self.client_cert.is_some() {
            opts = opts.require_tls(true);
        }
        Ok(opts)
    }
}

/// Permission violations reported by the server on one connection.
///
/// NATS refuses a forbidden publish or subscription with an asynchronous `-ERR 'Permissions
/// Violation for Publish to "<subject>"'` and keeps the connection open, so a forbidden request
/// would otherwise surface only as a time-out. The connection's event callback (installed by
/// [`crate::connect::connect_client`]) reports each violation here.
#[derive(Debug, Clone)]
pub struct Violations {
    tx: tokio::sync::broadcast::Sender<String>,
}

impl Default for Violations {
    fn default() -> Self {
        Violations { tx: tokio::sync::broadcast::channel(64).0 }
    }
}

impl Violations {
    /// Records a violation message from the server.
    pub(crate) fn report(&self, message: String) {
        let _ = self.tx.send(message);
    }

    /// Every violation from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.tx.subscribe()
    }

    /// Runs `op`, failing with [`Error::Unauthorized`] as soon as the server reports a
    /// permission violation on this connection while `op` runs. Operations running concurrently
    /// on the same connection cannot be told apart: a violation caused by one fails every
    /// guarded operation in flight.
    ///
    /// # Errors
    /// [`Error::Unauthorized`] with the server's message, or `op`'s own error.
    pub async fn guard<T>(&self, what: &'static str, op: impl Future<Output = Result<T>>) -> Result<T> {
        let mut rx = self.tx.subscribe();
        tokio::pin!(op);
        loop {
            tokio::select! {
                biased;
                v = rx.recv() => match v {
                    Ok(detail) => return Err(Error::Unauthorized { op: what, detail }),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return op.await,
                },
                r = &mut op => return r,
            }
        }
    }
}

/// Whether a server error is a permission violation.
pub(crate) fn is_permission_violation(message: &str) -> bool {
    message.to_ascii_lowercase().contains("permissions violation")
}

pub use shoal_proto::permissions::{client_inbox_prefix, client_permissions, Permissions};

/// How a user authenticates in the generated server config.
#[derive(Debug, Clone)]
pub enum UserCredential {
    /// A password read by nats-server from this environment variable (`password: $VAR`); the
    /// variable must hold the password double-quoted (see [`authorization_block`]).
    PasswordEnv(String),
    /// A password written into the config, double-quoted ([`check_password`] limits it to
    /// `[A-Za-z0-9._~-]`).
    Password(Secret),
    /// An nkey user public key (`U...`): the preferred credential (no secret in the config or
    /// the server's environment, nothing to quote).
    Nkey(String),
}

/// One user of the generated `authorization` block.
#[derive(Debug, Clone)]
pub struct NatsUser {
    /// User name (ignored for nkey users, which are named by their key).
    pub name: String,
    /// How it authenticates.
    pub credential: UserCredential,
    /// `None`: every subject (the node).
    pub permissions: Option<Permissions>,
    /// A comment line above the entry.
    pub comment: String,
}

/// The environment variable holding a user's password in the generated config:
/// `SHOAL_NATS_PASSWORD_<NAME>`, upper case, `-` as `_`.
pub fn password_env_var(user: &str) -> String {
    format!("SHOAL_NATS_PASSWORD_{}", user.to_ascii_uppercase().replace('-', "_"))
}

/// The users of one job: `node_user` with every permission, then one least-privilege user per
/// client, named by its id. `credential` says how each user (by name) authenticates.
///
/// # Errors
/// [`Error::InvalidOptions`] for a prefix that is not one subject token, duplicate clients, a
/// client named like the node user, or two users whose password variables collide.
pub fn job_users(
    prefix: &str,
    job: &JobId,
    node_user: &str,
    clients: &[ClientId],
    mut credential: impl FnMut(&str) -> UserCredential,
) -> Result<Vec<NatsUser>> {
    let token_ok = |t: &str| {
        !t.is_empty()
            && t.len() <= 64
            && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    if !token_ok(prefix) {
        return Err(Error::InvalidOptions(format!(
            "prefix {prefix:?} must be 1-64 characters of [A-Za-z0-9_-]"
        )));
    }
    if !token_ok(node_user) {
        return Err(Error::InvalidOptions(format!(
            "node user {node_user:?} must be 1-64 characters of [A-Za-z0-9_-]"
        )));
    }
    let mut vars = std::collections::HashMap::new();
    vars.insert(password_env_var(node_user), node_user.to_owned());
    for c in clients {
        if let Some(other) = vars.insert(password_env_var(c.as_str()), c.to_string()) {
            return Err(Error::InvalidOptions(format!(
                "client {c} collides with {other} (same user or password variable)"
            )));
        }
    }
    let mut users = vec![NatsUser {
        name: node_user.to_owned(),
        credential: credential(node_user),
        permissions: None,
        comment: format!("node: every subject (gateway, coordinators, `shoal job create`), prefix {prefix}"),
    }];
    for c in clients {
        users.push(NatsUser {
            name: c.to_string(),
            credential: credential(c.as_str()),
            permissions: Some(client_permissions(prefix, job, c)),
            comment: format!("client {c} of job {job}: its own update subject only"),
        });
    }
    Ok(users)
}

/// Bytes a literal password may hold: `[A-Za-z0-9._~-]` (decision 6 of docs/protocol.md). Inside
/// double quotes nats-server reads these bytes as written; every other byte is refused rather than
/// escaped, so no password can end, split or comment out a config value.
fn password_byte_ok(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-')
}

/// Checks a literal password for [`authorization_block`]: 1 to 1024 bytes of `[A-Za-z0-9._~-]`.
/// Number-like passwords (`12345`, `1e10`, `5m`, `true`) are fine: they are always written
/// quoted, so nats-server reads them as strings.
///
/// # Errors
/// [`Error::InvalidOptions`] naming the first offending byte's position (never the password).
pub fn check_password(password: &str) -> Result<()> {
    if password.is_empty() || password.len() > 1024 {
        return Err(Error::InvalidOptions("a password must be 1 to 1024 bytes long".into()));
    }
    match password.bytes().position(|b| !password_byte_ok(b)) {
        None => Ok(()),
        Some(i) => Err(Error::InvalidOptions(format!(
            "a password may hold only [A-Za-z0-9._~-]; byte {} is not one of them (nats-server would read \
             some such characters as the end of the value)",
            i + 1
        ))),
    }
}

/// nats-server's `authorization { users = [...] }` block for `users`.
///
/// Literal passwords are written double-quoted and must pass [`check_password`]. A password read
/// from the environment is written as the reference `$VAR`: nats-server parses the variable's
/// *value* as a config value (`12345` becomes a number and the server refuses to start, `ab;`
/// becomes `ab`), so the block's comment says to store the password in the variable
/// double-quoted (`VAR='"<password>"'`), which nats-server reads as the exact string. nkeys
/// need neither and are preferred.
///
/// # Errors
/// [`Error::InvalidOptions`] for a literal password that fails [`check_password`], a name or
/// subject that cannot be written into the config (quotes, backslashes, control characters), or
/// an environment variable name that is not `[A-Z0-9_]+`.
pub fn authorization_block(users: &[NatsUser]) -> Result<String> {
    use std::fmt::Write as _;
    let quoted = |what: &str, s: &str| -> Result<String> {
        if s.chars().any(|c| c == '"' || c == '\\' || c.is_control()) {
            return Err(Error::InvalidOptions(format!(
                "{what} holds a quote, backslash or control character"
            )));
        }
        Ok(format!("\"{s}\""))
    };
    let list = |subjects: &[String]| -> Result<String> {
        let items: Result<Vec<String>> = subjects.iter().map(|s| quoted("a subject", s)).collect();
        Ok(items?.join(", "))
    };
    let mut out = String::from("authorization {\n  users = [\n");
    for u in users {
        let _ = writeln!(out, "    # {}", u.comment.replace('\n', " "));
        let who = match &u.credential {
            UserCredential::PasswordEnv(var) => {
                if var.is_empty()
                    || !var.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
                {
                    return Err(Error::InvalidOptions(format!("{var:?} is not a [A-Z0-9_] variable name")));
                }
                let _ = writeln!(
                    out,
                    "    # nats-server parses the value of ${var} as a config value: store the password \
                     double-quoted, {var}='\"<password>\"' (unquoted, 12345 or true stop the server and ab; logs in as ab)"
                );
                format!("user: {}, password: ${var}", quoted("a user name", &u.name)?)
            }
            UserCredential::Password(p) => {
                check_password(p.expose())?;
                format!("user: {}, password: \"{}\"", quoted("a user name", &u.name)?, p.expose())
            }
            UserCredential::Nkey(key) => format!("nkey: {}", quoted("an nkey", key)?),
        };
        match &u.permissions {
            None => {
                let _ = writeln!(out, "    {{ {who} }}");
            }
            Some(p) => {
                let _ = writeln!(out, "    {{ {who}, permissions: {{");
                let _ = writeln!(out, "        publish: {{ allow: [{}] }}", list(&p.publish)?);
                let _ = writeln!(out, "        subscribe: {{ allow: [{}] }}", list(&p.subscribe)?);
                let _ = writeln!(out, "    }} }}");
            }
        }
    }
    out.push_str("  ]\n}\n");
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn secrets_never_print() {
        let auth = NatsAuth::user_password("node", "hunter2");
        let text = format!("{auth:?} {}", auth.password.as_ref().unwrap());
        assert!(!text.contains("hunter2"), "{text}");
        let token = NatsAuth { token: Some("tok-123".parse().unwrap()), ..Default::default() };
        assert!(!format!("{token:?}").contains("tok-123"));
    }

    #[test]
    fn conflicting_or_half_credentials_are_refused() {
        let both = NatsAuth { token: Some(Secret::new("t")), ..NatsAuth::user_password("u", "p") };
        assert!(matches!(both.validate(), Err(Error::InvalidOptions(m)) if m.contains("token")));
        let user_only = NatsAuth { user: Some("u".into()), ..Default::default() };
        assert!(matches!(user_only.validate(), Err(Error::InvalidOptions(_))));
        assert!(NatsAuth::default().validate().is_ok());
    }

    #[test]
    fn client_permissions_name_only_its_own_subjects() {
        let (job, me) = (JobId::new("mnist").unwrap(), ClientId::new("c-1").unwrap());
        let p = client_permissions("shoal", &job, &me);
        assert!(p.publish.contains(&"shoal.mnist.update.c-1".to_string()));
        assert!(p.publish.iter().all(|s| !s.contains("update.*") && !s.contains("update.>")));
        assert!(p
            .publish
            .contains(&"$JS.API.DIRECT.GET.KV_shoal-jobs.$KV.shoal-jobs.mnist.state".to_string()));
        assert!(p.publish.iter().all(|s| !s.starts_with("$JS.API.CONSUMER")));
        assert!(p.publish.iter().all(|s| !s.starts_with("$O.shoal-models") && !s.starts_with("$KV.")));
        assert!(p.publish.iter().all(|s| !s.contains("DIRECT.GET.OBJ_shoal-updates")));
        assert_eq!(p.subscribe, ["_INBOX_c-1.>", "shoal.mnist.round", "shoal.mnist.rejected.c-1"]);
    }

    #[test]
    fn authorization_block_quotes_subjects_and_refuses_bad_input() {
        let job = JobId::new("j").unwrap();
        let clients = [ClientId::new("a").unwrap(), ClientId::new("b-2").unwrap()];
        let users =
            job_users("shoal", &job, "node", &clients, |u| UserCredential::PasswordEnv(password_env_var(u)))
                .unwrap();
        let text = authorization_block(&users).unwrap();
        assert!(text.contains("{ user: \"node\", password: $SHOAL_NATS_PASSWORD_NODE }"), "{text}");
        assert!(text.contains("password: $SHOAL_NATS_PASSWORD_B_2"), "{text}");
        assert!(text.contains("\"shoal.j.upload.b-2.>\""), "{text}");
        assert!(!text.contains("STREAM.INFO"), "{text}");
        let dup = [ClientId::new("a-b").unwrap(), ClientId::new("a_b").unwrap()];
        assert!(job_users("shoal", &job, "node", &dup, |_| UserCredential::Nkey("U".into())).is_err());
        assert!(job_users("a.b", &job, "node", &clients, |_| UserCredential::Nkey("U".into())).is_err());
        let bad = vec![NatsUser {
            name: "x".into(),
            credential: UserCredential::Password(Secret::new("a\"b")),
            permissions: None,
            comment: String::new(),
        }];
        assert!(authorization_block(&bad).is_err());
    }

    /// Decision 6: literal passwords are `[A-Za-z0-9._~-]`, always quoted (number-like ones
    /// too); anything else is refused without echoing the password.
    #[test]
    fn literal_passwords_are_checked_and_quoted() {
        for ok in ["12345", "5m", "true", "1e10", "a.b~c-d_E"] {
            check_password(ok).unwrap();
        }
        for bad in ["", "a;b", "a,b", "a}b", "a b", "a#b", "a$b", "é", "a\tb"] {
            let e = check_password(bad).unwrap_err().to_string();
            assert!(bad.len() < 3 || !e.contains(bad), "{e}");
        }
        assert!(check_password(&"x".repeat(1025)).is_err());
        let user =
            |c| NatsUser { name: "u".into(), credential: c, permissions: None, comment: String::new() };
        let text = authorization_block(&[user(UserCredential::Password(Secret::new("1e10")))]).unwrap();
        assert!(text.contains("{ user: \"u\", password: \"1e10\" }"), "{text}");
        let env = authorization_block(&[user(UserCredential::PasswordEnv("SHOAL_X".into()))]).unwrap();
        assert!(env.contains("password: $SHOAL_X") && env.contains("SHOAL_X='\"<password>\"'"), "{env}");
    }
}
