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
