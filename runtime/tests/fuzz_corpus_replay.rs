//! Replays every committed fuzz corpus file (`fuzz/corpus/<target>/*`) through the same checks
//! the libFuzzer targets run (`fuzz/src/lib.rs`, included here), without libFuzzer, so the
//! inputs the fuzzers found interesting stay regression tests on stable `cargo test`.

use std::path::{Path, PathBuf};

#[path = "../../fuzz/src/lib.rs"]
mod checks;

fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus")
}

#[test]
fn committed_corpora_replay_through_the_fuzz_checks() {
    for target in checks::TARGETS {
        let dir = corpus_root().join(target);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
            .map(|e| e.expect("corpus entry").path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "corpus {} is empty", dir.display());
        let mut accepted = 0;
        for path in &files {
            let bytes = std::fs::read(path).expect("read corpus file");
            // Printed only when the test fails: names the input that broke a check.
            eprintln!("replaying {}", path.display());
            accepted += usize::from(checks::check(target, &bytes));
        }
        assert!(accepted > 0, "no input of the {target} corpus is accepted: the corpus is all noise");
    }
}

#[test]
fn seeds_pass_the_checks_with_the_expected_verdict() {
    let seeds = checks::seeds();
    for target in checks::TARGETS {
        assert!(seeds.iter().any(|s| s.target == target), "no seed for {target}");
    }
    for s in &seeds {
        assert_eq!(checks::check(s.target, &s.bytes), s.accepted, "seed {} of {}", s.name, s.target);
    }
}

/// Writes the seeds into `fuzz/corpus/<target>/` (run once before fuzzing a new corpus):
/// `cargo test -p shoal-runtime --test fuzz_corpus_replay -- --ignored write_seed_corpora`.
#[test]
#[ignore = "writes files into fuzz/corpus"]
fn write_seed_corpora() {
    for s in checks::seeds() {
        let dir = corpus_root().join(s.target);
        std::fs::create_dir_all(&dir).expect("create corpus dir");
        std::fs::write(dir.join(&s.name), &s.bytes).expect("write seed");
    }
}
