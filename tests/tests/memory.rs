//! A node's memory is O(model), not O(clients × model) (issue 16, finding 6): `shoal bench
//! memory` runs a real `shoal node` process and a real nats-server, publishes 8 updates of
//! 64 MiB on the upload path for one FedAvg round, and reads the node's `VmHWM`.
//!
//! The design bound is the f64 accumulator (2 × an f32 model) plus the one slot being staged
//! (1 ×) = 3 × the model, plus what does not grow with the model: the process's own memory
//! before the job (measured by the bench: the executable's pages and heap, 15 MiB in a release
//! build, 31 MiB in a debug one) and the allocator's and NATS client's buffers (13–38 MiB
//! measured at 64 and 256 MiB models, varying between runs; 48 MiB allowed, still less than the
//! 64 MiB copy of the model this test exists to catch). Before the change (upload payload assembled in the
//! heap, every segment pre-faulted, the global model cloned twice at the close) the same run
//! peaked at 9.15 × the model, so one model-sized copy coming back fails this test.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use shoal_testkit::shoal_bin;

#[test]
fn eight_updates_of_64_mib_peak_at_the_accumulator_plus_one_slot() {
    let shm = tempfile::Builder::new().prefix("shoal-mem-").tempdir_in("/dev/shm").unwrap();
    let out = std::process::Command::new(shoal_bin())
        .args(["bench", "memory", "--updates", "8", "--params", "16777216", "--json", "--shm-dir"])
        .arg(shm.path().join("bench"))
        .output()
        .unwrap();
    assert!(out.status.success(), "bench failed: {}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("{r}");
    let model = r["model_bytes"].as_u64().unwrap();
    assert_eq!(model, 64 << 20);
    let hwm = r["vm_hwm_bytes"].as_u64().unwrap();
    // The accumulator alone is 2 × the model: a run that never folded would not reach it.
    assert!(hwm >= 2 * model, "VmHWM {hwm} below the f64 accumulator's 2 x {model}");
    let b = &r["baseline"];
    let baseline =
        ["anon_kib", "shmem_kib", "file_kib"].iter().map(|k| b[k].as_u64().unwrap()).sum::<u64>() * 1024;
    let buffers = 48u64 << 20;
    assert!(
        hwm <= 3 * model + baseline + buffers,
        "VmHWM {:.1} MiB > 3 x the model + the node's own {:.1} MiB + {} MiB ({:.2} x): {r}",
        hwm as f64 / f64::from(1 << 20),
        baseline as f64 / f64::from(1 << 20),
        buffers >> 20,
        hwm as f64 / model as f64
    );
    // The slots staged at the peak: at most the one being written (the budget holds one).
    let shmem = r["peak"]["shmem_kib"].as_u64().unwrap() * 1024;
    assert!(shmem <= model + (1 << 20), "{shmem} bytes of shared memory at the peak: more than one slot");
}
