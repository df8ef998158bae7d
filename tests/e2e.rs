//! End-to-end tests: the `motley` binary driven like a user would.

use std::process::Command;

fn motley() -> Command {
    Command::new(env!("CARGO_BIN_EXE_motley"))
}

#[test]
fn help_lists_the_data_flow() {
    let out = motley().arg("--help").output().expect("run motley --help");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for sub in ["tokenizer", "ingest", "shards", "train", "sample", "bench", "demo"] {
        assert!(text.contains(sub), "--help misses {sub}:\n{text}");
    }
}
