//! The step-matching study end to end on a synthetic corpus whose answer is known: three
//! modalities with independent rules that each need their own attention pattern (text copies
//! the token two back, an image row repeats the row above shifted by one code, speech steps
//! by a constant), so per-modality towers reach dense's image loss in fewer steps (0.42-0.59 of
//! them over seeds 0-3 when this test was written; it asserts < 1 for each seed).

mod common;

use std::path::Path;

use motley_shards::{CorpusWriter, Document, Modality, Segment, Vocab, WriterProperties};
use motley_trainer::Arch;
use motley_trainer::study::{StudyOptions, StudyReport, first_reach, run_study};

/// splitmix64: a fixed generator, so the corpus is the same everywhere.
struct Mix(u64);
impl Mix {
    fn below(&mut self, n: u32) -> u32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % u64::from(n)) as u32
    }
}

/// Documents of three segments with independent rules that need different attention:
/// text repeats the token two back, an image is a 4x4 grid whose rows repeat the row above
/// shifted by one code, speech steps its unit by 3. Only the first tokens of each are random.
fn write_rule_corpus(dir: &Path, docs: u64) -> anyhow::Result<()> {
    let vocab = Vocab::build(32, 64, 24, None);
    let mut w = CorpusWriter::create(dir, &vocab, WriterProperties::default(), "rules")?;
    let mut r = Mix(7);
    for _ in 0..docs {
        let mut text = vec![r.below(32), r.below(32)];
        for i in 2..16 {
            text.push(text[i - 2]);
        }
        let mut image: Vec<u32> = (0..4).map(|_| r.below(64)).collect();
        for i in 4..16 {
            image.push((image[i - 4] + 1) % 64);
        }
        let mut speech = vec![r.below(24)];
        for i in 1..12 {
            speech.push((speech[i - 1] + 3) % 24);
        }
        let mut segs = vec![
            Segment::tokens(Modality::Text, text),
            Segment::tokens(Modality::Image, image),
            Segment::tokens(Modality::Speech, speech),
        ];
        segs.rotate_left(r.below(3) as usize);
        w.add_document(&Document::new(segs))?;
    }
    w.finish_with_manifest()?;
    Ok(())
}

#[test]
fn mot_reaches_dense_image_loss_in_fewer_steps_on_rule_data() -> anyhow::Result<()> {
    let corpus = tempfile::tempdir()?;
    write_rule_corpus(corpus.path(), 3000)?;
    let mut cfg = common::tiny_cfg();
    cfg.data.synthetic = false;
    cfg.data.paths = vec![corpus.path().to_path_buf()];
    cfg.data.eval_fraction = 0.1;
    cfg.data.prefetch = 0;
    cfg.train.steps = 40;
    cfg.train.eval_every = 5;
    cfg.train.eval_batches = 2;
    cfg.train.checkpoint_every = 0;
    let dir = tempfile::tempdir()?;
    let opts =
        StudyOptions { seeds: vec![0, 1], archs: vec![Arch::Dense, Arch::Mot], overwrite: false, verbose: false };
    let report = run_study(&cfg, dir.path(), &opts)?;
    // Every run's curve: the untrained model at step 0, then every 5 steps up to 40.
    assert_eq!(report.runs.len(), 4);
    for r in &report.runs {
        let steps: Vec<u64> = r.curve.iter().map(|p| p.step).collect();
        assert_eq!(steps, (0..=40).step_by(5).collect::<Vec<_>>(), "{}", r.arch);
        assert!(dir.path().join(format!("seed-{}/{}/metrics.jsonl", r.seed, r.arch)).exists());
    }
    // Text, image and speech positions all make up a good share of the stream.
    let p = report.positions;
    assert!(p.text > 0.25 && p.image > 0.25 && p.speech > 0.15, "{p:?}");
    assert!((p.text + p.image + p.speech - 1.0).abs() < 1e-9);
    let image = report.matches.iter().find(|m| m.curve == "image" && m.arch == Arch::Mot).expect("image match");
    assert_eq!((image.reached, image.seeds), (2, 2), "{image:?}");
    for s in &image.per_seed {
        let f = s.fraction.expect("reached");
        assert!(f > 0.0 && f < 1.0, "seed {}: MoT image fraction {f}", s.seed);
        // The reported step is the interpolated crossing of that seed's MoT curve at that
        // seed's dense final loss.
        let run = |a: Arch| report.runs.iter().find(|r| r.arch == a && r.seed == s.seed).expect("run");
        let target = run(Arch::Dense).series(1).last().expect("dense image curve").1;
        assert_eq!(s.dense_final, target);
        assert_eq!(s.step, first_reach(&run(Arch::Mot).series(1), target));
    }
    // text, image and speech are matched; the corpus has no latent images.
    let curves: Vec<&str> = report.matches.iter().map(|m| m.curve.as_str()).collect();
    assert_eq!(curves, ["text", "image", "speech"]);
    // study.json holds the same report; the plot is a PNG.
    let back: StudyReport = serde_json::from_str(&std::fs::read_to_string(dir.path().join("study.json"))?)?;
    assert_eq!(back.runs.len(), report.runs.len());
    for (a, b) in back.matches.iter().zip(&report.matches) {
        let (fa, fb) = (a.fraction.expect("fraction").mean, b.fraction.expect("fraction").mean);
        assert!((a.curve == b.curve) && (fa - fb).abs() < 1e-12);
    }
    assert_eq!(&std::fs::read(dir.path().join("study.png"))?[1..4], b"PNG");
    // A second study into the same directory needs --overwrite.
    assert!(run_study(&cfg, dir.path(), &opts).is_err());
    Ok(())
}

#[test]
fn study_refuses_configs_that_cannot_give_a_curve() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = StudyOptions { seeds: vec![0], archs: vec![Arch::Dense, Arch::Mot], overwrite: true, verbose: false };
    let mut cfg = common::tiny_cfg();
    cfg.data.eval_fraction = 0.0;
    let e = run_study(&cfg, dir.path(), &opts).expect_err("no held-out split");
    assert!(e.to_string().contains("eval_fraction"), "{e}");
    let mut cfg = common::tiny_cfg();
    cfg.train.eval_every = 0;
    assert!(run_study(&cfg, dir.path(), &opts).is_err());
    let mot_only = StudyOptions { archs: vec![Arch::Mot], ..opts.clone() };
    assert!(run_study(&common::tiny_cfg(), dir.path(), &mot_only).is_err());
}
