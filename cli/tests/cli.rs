//! The `shoal` binary's command line, run as a user would. (Having an integration test here also
//! makes `cargo test --workspace` build the `shoal` binary that the `shoal-tests` crate's
//! multi-process tests start.)

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Command;

fn shoal() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
}

#[test]
fn help_lists_the_commands() {
    let out = shoal().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["node", "job", "client", "demo"] {
        assert!(text.contains(cmd), "--help lacks {cmd}: {text}");
    }
}

#[test]
fn bad_node_id_is_a_clear_error() {
    let out =
        shoal().args(["node", "--node-id", "a.b", "--nats-url", "nats://127.0.0.1:1"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid node id"), "{err}");
}

#[test]
fn job_create_with_a_missing_spec_file_names_it() {
    let out = shoal()
        .args(["job", "create", "--spec", "/nonexistent/spec.json", "--nats-url", "nats://127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/spec.json"), "{err}");
}

#[test]
fn auth_nats_config_prints_a_config_nats_server_accepts() {
    let out =
        shoal().args(["auth", "nats-config", "--job", "mnist", "--clients", "c-1,c2"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("{ user: \"shoal-node\", password: $SHOAL_NATS_PASSWORD_SHOAL_NODE }"), "{text}");
    assert!(text.contains("\"shoal.mnist.update.c-1\""), "{text}");
    assert!(!text.contains("shoal.mnist.update.*"), "{text}");
    // nats-server parses it (-t: test the configuration and exit), the passwords coming from
    // the environment.
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("auth.conf");
    std::fs::write(&conf, &text).unwrap();
    let bin = shoal_natsd::find_nats_server(None).unwrap();
    let check = Command::new(bin)
        .args(["-t", "-c"])
        .arg(&conf)
        .env("SHOAL_NATS_PASSWORD_SHOAL_NODE", "n")
        .env("SHOAL_NATS_PASSWORD_C_1", "a")
        .env("SHOAL_NATS_PASSWORD_C2", "b")
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
}

#[test]
fn auth_nats_config_with_nkeys_writes_private_seeds() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let seeds = dir.path().join("seeds");
    let out = shoal()
        .args(["auth", "nats-config", "--job", "j", "--clients", "a", "--nkeys-dir"])
        .arg(&seeds)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("{ nkey: \"U").count(), 2, "{text}");
    for user in ["shoal-node", "a"] {
        let path = seeds.join(format!("{user}.nk"));
        let seed = std::fs::read_to_string(&path).unwrap();
        assert!(seed.starts_with("SU"), "{seed}");
        assert!(!text.contains(seed.trim()), "a seed leaked into the config");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
    // Running it again does not overwrite the seeds.
    let again = shoal()
        .args(["auth", "nats-config", "--job", "j", "--clients", "a", "--nkeys-dir"])
        .arg(&seeds)
        .output()
        .unwrap();
    assert!(!again.status.success());
}

#[test]
fn auth_nats_config_refuses_bad_ids_and_help_hides_secrets() {
    let out = shoal().args(["auth", "nats-config", "--job", "j", "--clients", "a.b"]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid client id"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let help = shoal()
        .args(["node", "--help"])
        .env("SHOAL_NATS_PASSWORD", "hunter2-secret")
        .env("SHOAL_NATS_TOKEN", "token-secret")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("--nats-password") && text.contains("--nats-ca"), "{text}");
    assert!(!text.contains("hunter2-secret") && !text.contains("token-secret"), "{text}");
}

#[test]
fn conflicting_credentials_are_a_clear_error() {
    let out = shoal()
        .args(["job", "status", "j", "--nats-url", "nats://127.0.0.1:1", "--nats-user", "u"])
        .env("SHOAL_NATS_PASSWORD", "p")
        .env("SHOAL_NATS_TOKEN", "t")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("choose one NATS credential"), "{err}");
    assert!(!err.contains("\"p\"") && !err.contains("\"t\""), "{err}");
}
