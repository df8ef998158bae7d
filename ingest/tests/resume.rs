//! Kill-and-resume: a run killed at several points (MOTLEY_FAILPOINT, in a child process)
//! and re-run ends with a corpus identical to an uninterrupted run; output protection rules.

mod common;

use std::path::Path;
use std::process::Command;

use motley_ingest::{Error, Part, ingest};

/// A corpus with several tasks of every kind (two files per task).
fn resume_recipe(data: &Path) -> motley_ingest::Recipe {
    common::recipe(
        "[options]\ntask_files = 2\nmax_text_bytes = 2048\n\
         [[source]]\nkind = \"text\"\npaths = [\"text/*.txt\"]\n\
         [[source]]\nkind = \"image\"\npaths = [\"images.jsonl\"]\n\
         [[source]]\nkind = \"speech\"\npaths = [\"speech.jsonl\"]\n\
         [[source]]\nkind = \"interleaved\"\npaths = [\"interleaved.jsonl\"]\n",
        data,
    )
}

/// Small copy of the sample corpus: 7 text files, 12 images, 6 clips, 4 interleaved docs.
fn make_data(dir: &Path) -> anyhow::Result<()> {
    let sample = common::repo().join("data/sample");
    std::fs::create_dir_all(dir.join("text"))?;
    let dict = std::fs::read_to_string(sample.join("text/devils_dictionary.txt"))?;
    let lines: Vec<&str> = dict.lines().collect();
    for i in 0..7 {
        let chunk = lines.iter().skip(i * 40).take(40).cloned().collect::<Vec<_>>().join("\n");
        std::fs::write(dir.join(format!("text/{i}.txt")), chunk)?;
    }
    for sub in ["images", "speech"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let take = |name: &str, n: usize| -> anyhow::Result<Vec<String>> {
        Ok(std::fs::read_to_string(sample.join(name))?.lines().take(n).map(str::to_string).collect())
    };
    let copy = |rel: &str| -> anyhow::Result<()> {
        std::fs::copy(sample.join(rel), dir.join(rel))?;
        Ok(())
    };
    let images = take("images.jsonl", 12)?;
    let speech = take("speech.jsonl", 6)?;
    let inter = take("interleaved.jsonl", 4)?;
    for line in images.iter().chain(&speech).chain(&inter) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        for key in ["image", "audio"] {
            if let Some(p) = v.get(key).and_then(|p| p.as_str()) {
                copy(p)?;
            }
        }
        for part in v.get("parts").and_then(|p| p.as_array()).into_iter().flatten() {
            for key in ["image", "audio"] {
                if let Some(p) = part.get(key).and_then(|p| p.as_str()) {
                    copy(p)?;
                }
            }
        }
    }
    std::fs::write(dir.join("images.jsonl"), images.join("\n") + "\n")?;
    std::fs::write(dir.join("speech.jsonl"), speech.join("\n") + "\n")?;
    std::fs::write(dir.join("interleaved.jsonl"), inter.join("\n") + "\n")?;
    Ok(())
}

/// The child side: runs the ingest described by the environment (and may die at a failpoint).
#[test]
fn child_ingest() -> anyhow::Result<()> {
    let (Ok(data), Ok(out)) = (std::env::var("MOTLEY_TEST_DATA"), std::env::var("MOTLEY_TEST_OUT")) else {
        return Ok(()); // not a child run
    };
    let cfg = common::config(resume_recipe(Path::new(&data)), Path::new(&out));
    ingest(&cfg)?;
    Ok(())
}

fn run_child(data: &Path, out: &Path, failpoint: Option<&str>) -> anyhow::Result<std::process::ExitStatus> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["--exact", "child_ingest", "--test-threads=1", "--nocapture"])
        .env("MOTLEY_TEST_DATA", data)
        .env("MOTLEY_TEST_OUT", out)
        .env("MOTLEY_TEST_TOKENIZERS", common::tokenizers_dir())
        .env_remove("MOTLEY_FAILPOINT");
    if let Some(f) = failpoint {
        cmd.env("MOTLEY_FAILPOINT", f);
    }
    Ok(cmd.status()?)
}

#[test]
fn killed_runs_resume_to_the_identical_corpus() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    make_data(&data)?;
    let reference = tmp.path().join("reference");
    let s = ingest(&common::config(resume_recipe(&data), &reference))?;
    assert!(s.tasks >= 6, "enough tasks to kill in between: {}", s.tasks);
    assert!(s.tokens.text > 0 && s.tokens.image > 0 && s.tokens.speech > 0);
    let want = common::corpus_files(&reference);
    assert!(want.contains_key("manifest.json") && want.contains_key("tokenizers/text.json"));

    let out = tmp.path().join("killed");
    let mut kills = 0;
    for fp in ["after_task:1", "mid_task:2", "after_task:2", "mid_task:1"] {
        let st = run_child(&data, &out, Some(fp))?;
        if !st.success() {
            kills += 1;
        }
        assert!(!out.join("manifest.json").exists() || st.success(), "a killed run leaves no manifest");
    }
    assert!(kills >= 3, "the failpoints fired ({kills})");
    let st = run_child(&data, &out, None)?;
    assert!(st.success(), "final resume succeeds");
    let got = common::corpus_files(&out);
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    for (name, bytes) in &want {
        assert!(got.get(name) == Some(bytes), "{name} differs after kill and resume");
    }
    // The same command once more: the corpus exists, so it needs --overwrite.
    let again = ingest(&common::config(resume_recipe(&data), &out));
    assert!(matches!(again, Err(Error::OutputExists { .. })), "{again:?}");
    let mut cfg = common::config(resume_recipe(&data), &out);
    cfg.overwrite = true;
    let s2 = ingest(&cfg)?;
    assert_eq!(s2.tasks_run, s2.tasks);
    assert_eq!(common::corpus_files(&out), want);
    Ok(())
}

#[test]
fn parts_split_the_tasks_and_limit_is_deterministic() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    make_data(&data)?;
    let full = ingest(&common::config(resume_recipe(&data), &tmp.path().join("full")))?;
    let mut docs = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for i in 0..3 {
        let out = tmp.path().join(format!("part{i}"));
        let mut cfg = common::config(resume_recipe(&data), &out);
        cfg.part = Part { index: i, count: 3 };
        ingest(&cfg)?;
        docs.extend(common::documents(&out));
        names.extend(common::corpus_files(&out).into_keys().filter(|n| n.ends_with(".mshard")));
    }
    assert_eq!(docs, common::documents(&tmp.path().join("full")), "parts in order = the full corpus");
    let unique: std::collections::BTreeSet<_> = names.iter().collect();
    assert_eq!(unique.len(), names.len(), "shard names never collide across parts");
    assert!(full.documents > 10);

    let mut cfg = common::config(resume_recipe(&data), &tmp.path().join("limited"));
    cfg.limit = Some(10);
    let s = ingest(&cfg)?;
    assert_eq!(s.documents, 10);
    assert_eq!(common::documents(&tmp.path().join("limited"))[..], common::documents(&tmp.path().join("full"))[..10]);
    Ok(())
}

#[test]
fn refuses_to_clobber_what_is_not_a_corpus_and_dedups() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data)?;
    for (i, t) in ["same words", "other words", "same words", "third", "other words"].iter().enumerate() {
        std::fs::write(data.join(format!("{i}.txt")), t)?;
    }
    let recipe = |dedup: bool| {
        common::recipe(
            &format!("[options]\ndedup = {dedup}\ntask_files = 2\n[[source]]\nkind = \"text\"\npaths = [\"*.txt\"]\n"),
            &data,
        )
    };
    let notes = tmp.path().join("notes");
    std::fs::create_dir_all(&notes)?;
    std::fs::write(notes.join("keep.md"), "mine")?;
    let mut cfg = common::config(recipe(false), &notes);
    cfg.overwrite = true;
    assert!(matches!(ingest(&cfg), Err(Error::NotACorpus { .. })));
    assert!(notes.join("keep.md").exists());

    let out = tmp.path().join("dedup");
    let s = ingest(&common::config(recipe(true), &out))?;
    assert_eq!((s.documents, s.duplicates), (3, 2));
    let plain = ingest(&common::config(recipe(false), &tmp.path().join("plain")))?;
    assert_eq!(plain.documents, 5);
    let kept = common::documents(&out);
    let all = common::documents(&tmp.path().join("plain"));
    assert_eq!(kept, vec![all[0].clone(), all[1].clone(), all[3].clone()], "first occurrences kept, in order");
    // A different command over an unfinished or finished corpus needs --overwrite.
    assert!(matches!(ingest(&common::config(recipe(false), &out)), Err(Error::OutputExists { .. })));
    // An absurd thread count is refused up front instead of spawning threads for minutes.
    let mut cfg = common::config(recipe(false), &tmp.path().join("threads"));
    cfg.workers = Some(motley_ingest::MAX_WORKERS + 1);
    assert!(matches!(ingest(&cfg), Err(Error::Options(m)) if m.contains("workers")));
    assert!(!tmp.path().join("threads").exists(), "nothing written");
    Ok(())
}

/// A resumed run trusts a finished task only if the shards its marker lists still have the
/// footers the marker records; an edited marker (or a replaced shard) makes the task run again,
/// and the corpus still comes out identical instead of failing `shards verify` later.
#[test]
fn a_marker_that_disagrees_with_its_shards_reruns_the_task() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    make_data(&data)?;
    let reference = tmp.path().join("reference");
    ingest(&common::config(resume_recipe(&data), &reference))?;

    let out = tmp.path().join("edited");
    assert!(!run_child(&data, &out, Some("after_task:3"))?.success(), "the failpoint fired");
    let mut markers: Vec<_> = std::fs::read_dir(out.join(".ingest"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "done"))
        .collect();
    markers.sort();
    assert!(markers.len() >= 3, "{markers:?}");
    let edit = |path: &Path, f: &dyn Fn(&mut serde_json::Value)| -> anyhow::Result<()> {
        let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(path)?)?;
        f(&mut m);
        std::fs::write(path, serde_json::to_vec(&m)?)?;
        Ok(())
    };
    let bump = |v: &mut serde_json::Value| *v = (v.as_u64().unwrap_or(0) + 1).into();
    // A shard's document count no longer matches its footer (the total is kept consistent).
    edit(&markers[0], &|m| {
        bump(&mut m["shards"][0]["num_docs"]);
        bump(&mut m["documents"]);
    })?;
    // The total no longer matches the shards.
    edit(&markers[1], &|m| bump(&mut m["documents"]))?;

    let s = ingest(&common::config(resume_recipe(&data), &out))?;
    let trusted = markers.len() as u64 - 2;
    assert_eq!(s.tasks_run, s.tasks - trusted, "the two edited tasks ran again");
    assert_eq!(common::corpus_files(&out), common::corpus_files(&reference));
    Ok(())
}
