//! transformers `MimiModel` parity: motley's codes of real espeak-ng clips equal transformers'
//! (a code may differ only where the reference's two nearest codes tie within 1e-3, and then
//! only that frame's later codes of the same quantizer), and decoding transformers' codes gives
//! its audio within 1e-4 of its peak; the flattened token layout, the saved tokenizer file, the
//! file path through the resampler, and bad input.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use motley_shards::{Modality, Segment, SegmentData};
use motley_tokenizers::AudioTokenizer;
use motley_tokenizers::pretrained::MimiTokenizer;
use safetensors::SafeTensors;

use crate::common;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pretrained")
}

fn f32s(st: &SafeTensors<'_>, name: &str) -> Result<Vec<f32>> {
    let v = st.tensor(name)?;
    anyhow::ensure!(v.dtype() == safetensors::Dtype::F32, "{name}: {:?}", v.dtype());
    Ok(v.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

fn codes(st: &SafeTensors<'_>, name: &str) -> Result<(Vec<Vec<u32>>, Vec<usize>)> {
    let v = st.tensor(name)?;
    let shape = v.shape().to_vec();
    let flat: Vec<u32> = v
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as u32)
        .collect();
    Ok((flat.chunks_exact(shape[1]).map(<[u32]>::to_vec).collect(), shape))
}

fn wav_samples(bytes: &[u8]) -> Result<Vec<f32>> {
    let a = motley_tokenizers::speech::audio::decode_bytes(bytes, Some("wav"), "decoded.wav")?;
    Ok(a.samples)
}

#[test]
fn mimi_codes_and_decodes_match_transformers() -> Result<()> {
    let mimi = MimiTokenizer::from_folder(fixtures().join("mimi"), None)?;
    assert_eq!((mimi.codebooks(), mimi.codebook_size(), mimi.vocab_size(), mimi.sample_rate()), (4, 64, 256, 24_000));
    assert_eq!(mimi.frames_per_second(), 12.5);
    assert_eq!(mimi.frame_rate(), 50.0);
    let buf = std::fs::read(fixtures().join("mimi_reference.safetensors"))?;
    let (_, meta) = SafeTensors::read_metadata(&buf)?;
    let clips: Vec<String> = serde_json::from_str(meta.metadata().as_ref().context("metadata")?["clips"].as_str())?;
    let st = SafeTensors::deserialize(&buf)?;
    let mut excused = 0;
    let mut distinct = std::collections::BTreeSet::new();
    for (i, clip) in clips.iter().enumerate() {
        let input = f32s(&st, &format!("input.{i}"))?;
        let (want, shape) = codes(&st, &format!("codes.{i}"))?;
        let gaps = f32s(&st, &format!("gaps.{i}"))?;
        let got = mimi.encode_codes(&input)?;
        assert_eq!((got.len(), got[0].len()), (shape[0], shape[1]), "{clip}: code grid");
        for f in 0..shape[1] {
            // Codebook 0 is the semantic quantizer, 1.. the acoustic one's residual chain: a tie
            // at q excuses q and the later codes of its chain in this frame.
            let mut excused_chain = None;
            for q in 0..shape[0] {
                let chain = usize::from(q > 0);
                if excused_chain == Some(chain) {
                    continue;
                }
                distinct.insert((q, want[q][f]));
                if got[q][f] != want[q][f] {
                    let gap = gaps[q * shape[1] + f];
                    assert!(
                        gap < 1e-3,
                        "{clip}: frame {f} codebook {q}: {} vs transformers' {} (gap {gap})",
                        got[q][f],
                        want[q][f]
                    );
                    excused += 1;
                    excused_chain = Some(chain);
                }
            }
        }
        // Decoding transformers' codes gives transformers' audio.
        let want_pcm = f32s(&st, &format!("decoded.{i}"))?;
        let pcm = mimi.decode_codes(&want)?;
        assert_eq!(pcm.len(), want_pcm.len(), "{clip}: decoded length");
        let peak = want_pcm.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = pcm.iter().zip(&want_pcm).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(d <= 1e-4 * peak.max(1.0), "{clip}: decoded audio differs by {d} (peak {peak})");
        eprintln!("{clip}: {} frames; decoded audio within {d:.2e} of transformers' (peak {peak:.2})", shape[1]);

        // The segment path: frame-major flat ids, each codebook in its own id range.
        let seg = mimi.encode_samples(&input, 24_000, Some(clip))?;
        let SegmentData::Tokens(ids) = &seg.data else { anyhow::bail!("not tokens") };
        assert_eq!(ids.len(), shape[0] * shape[1]);
        for (j, &id) in ids.iter().enumerate() {
            let (f, q) = (j / 4, j % 4);
            assert_eq!(id, q as u32 * 64 + got[q][f], "{clip}: flat id {j}");
        }
        assert_eq!(mimi.unflatten(ids), got);
        assert_eq!(seg.meta.frame_rate, Some(50.0));
        let wav = mimi.decode_to_wav(&seg)?;
        assert_eq!(wav_samples(&wav)?.len(), shape[1] * 1920, "{clip}: one frame is 1920 samples at 24 kHz");
    }
    eprintln!("{excused} codes excused as ties");
    assert!(excused <= 2, "{excused} codes excused as ties");
    assert!(distinct.len() > 40, "reference codes barely vary ({} distinct)", distinct.len());
    Ok(())
}

#[test]
fn mimi_file_path_saved_file_fewer_codebooks_and_bad_segments() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mimi = MimiTokenizer::from_folder(fixtures().join("mimi"), None)?;
    // A 16 kHz espeak-ng clip through the decoder and the resampler.
    let clip = fixtures().join("../../../../data/sample/speech/seven_t1_gb.wav");
    let seg = mimi.encode_file(&clip)?;
    let SegmentData::Tokens(ids) = &seg.data else { anyhow::bail!("not tokens") };
    assert!(ids.len() % 4 == 0 && !ids.is_empty());
    assert!(seg.meta.source.as_deref().is_some_and(|s| s.ends_with("seven_t1_gb.wav")));

    // Saved as one tokenizer file; loaded back through the generic loaders.
    let file = dir.path().join("speech.safetensors");
    mimi.save(&file)?;
    let back = motley_tokenizers::load_speech(&file)?;
    assert_eq!((back.kind(), back.vocab_size()), ("mimi", 256));
    assert_eq!(back.encode_file(&clip)?, seg);
    let any = motley_tokenizers::load_any(&file)?;
    assert_eq!((any.modality(), any.token_vocab_size()), (Modality::Speech, 256));
    assert_eq!(motley_tokenizers::load_speech(fixtures().join("mimi"))?.vocab_size(), 256);

    // Keeping the first two codebooks keeps their codes.
    let two = MimiTokenizer::from_folder(fixtures().join("mimi"), Some(2))?;
    assert_eq!(two.vocab_size(), 128);
    let s2 = two.encode_file(&clip)?;
    let SegmentData::Tokens(ids2) = &s2.data else { anyhow::bail!("not tokens") };
    let first_two: Vec<u32> = ids.chunks_exact(4).flat_map(|f| f[..2].to_vec()).collect();
    assert_eq!(ids2, &first_two);
    assert!(MimiTokenizer::from_folder(fixtures().join("mimi"), Some(5)).is_err());

    // A generated sequence with a trailing partial frame still decodes; bad ids are errors.
    let mut partial = ids.clone();
    partial.truncate(ids.len() - 1);
    let part = Segment::tokens(Modality::Speech, partial);
    assert_eq!(wav_samples(&mimi.decode_to_wav(&part)?)?.len(), (ids.len() / 4 - 1) * 1920);
    for bad in [vec![256u32; 8], vec![1u32; 3], vec![]] {
        let e = mimi.decode_to_wav(&Segment::tokens(Modality::Speech, bad)).expect_err("a bad segment decoded");
        assert!(matches!(e, motley_tokenizers::TokenizerError::BadSegment { .. }), "{e}");
    }
    assert!(mimi.decode_to_wav(&Segment::tokens(Modality::Image, ids.clone())).is_err());
    // Not audio: a clear error naming the source.
    let e = mimi.encode_bytes(b"not audio at all", Some("wav"), "x.wav").expect_err("not audio").to_string();
    assert!(e.contains("x.wav"), "{e}");
    Ok(())
}

fn broken_model(edit: impl FnOnce(&mut Vec<common::RawTensor>, &mut serde_json::Value)) -> Result<tempfile::TempDir> {
    common::broken_model("mimi", "model.safetensors", edit)
}

fn load_err(dir: &Path) -> String {
    match MimiTokenizer::from_folder(dir, None) {
        Ok(_) => panic!("a broken model folder loaded"),
        Err(e @ motley_tokenizers::TokenizerError::Model { .. }) => e.to_string(),
        Err(e) => panic!("wrong error kind: {e}"),
    }
}

#[test]
fn broken_mimi_folders_are_clear_errors() -> Result<()> {
    // A missing tensor: the error names the weights file and the tensor.
    let name = "encoder_transformer.layers.1.self_attn.q_proj.weight";
    let dir = broken_model(|t, _| t.retain(|(n, _, _)| n != name))?;
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors") && e.contains(name), "{e}");

    // A tensor of the wrong shape.
    let dir = broken_model(|t, _| {
        let x = t.iter_mut().find(|(n, _, _)| n == "decoder.layers.0.conv.weight").expect("fixture tensor");
        x.1[0] /= 2;
        x.2.truncate(x.1.iter().product::<usize>() * 4);
    })?;
    let e = load_err(dir.path());
    assert!(
        e.contains("model.safetensors") && e.contains("decoder.layers.0.conv.weight") && e.contains("shape"),
        "{e}"
    );

    // An unknown architecture, and a setting candle's Mimi cannot run, name config.json.
    let dir = broken_model(|_, c| {
        c["architectures"] = serde_json::json!(["EncodecModel"]);
        c["model_type"] = "encodec".into();
    })?;
    let e = load_err(dir.path());
    assert!(e.contains("config.json") && e.contains("EncodecModel"), "{e}");
    let dir = broken_model(|_, c| c["pad_mode"] = "reflect".into())?;
    let e = load_err(dir.path());
    assert!(e.contains("config.json") && e.contains("pad_mode"), "{e}");

    // Zeros candle divides by or indexes with (its panics, once), and a nonsense RoPE period.
    for (key, value, named) in [
        ("compress", serde_json::json!(0), "compress"),
        ("num_hidden_layers", serde_json::json!(0), "num_hidden_layers"),
        ("max_position_embeddings", serde_json::json!(0), "max_position_embeddings"),
        ("rope_parameters", serde_json::json!({"rope_theta": -1.0}), "rope_theta"),
    ] {
        let dir = broken_model(|_, c| c[key] = value.clone())?;
        let e = load_err(dir.path());
        assert!(e.contains("config.json") && e.contains(named), "{key}: {e}");
    }

    // A speech codec given as an image tokenizer (and the reverse) says which it is.
    let e = motley_tokenizers::load_image(fixtures().join("mimi")).expect_err("a codec as an image model").to_string();
    assert!(e.contains("speech codec"), "{e}");
    let e = motley_tokenizers::load_speech(fixtures().join("vae")).expect_err("a VAE as a codec").to_string();
    assert!(e.contains("image model"), "{e}");
    Ok(())
}

/// A python with transformers: `$MOTLEY_PYTHON` (the test command sets it), else the
/// repository's `.venv`; `None` (the test says so) when neither exists.
fn python() -> Option<PathBuf> {
    std::env::var_os("MOTLEY_PYTHON").map(PathBuf::from).or_else(|| {
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
        venv.is_file().then_some(venv)
    })
}

/// 12+ s of espeak-ng speech at 24 kHz: the sample corpus's clips back to back.
fn long_clip() -> Result<Vec<f32>> {
    let speech = fixtures().join("../../../../data/sample/speech");
    let mut clips: Vec<PathBuf> =
        std::fs::read_dir(&speech)?.map(|e| e.map(|e| e.path())).collect::<std::io::Result<_>>()?;
    clips.retain(|p| p.extension().is_some_and(|x| x == "wav"));
    clips.sort();
    let mut x = Vec::new();
    for c in &clips {
        let a = motley_tokenizers::speech::audio::decode_file(c)?;
        x.extend(motley_tokenizers::speech::audio::resample(&a, 24_000, &c.display().to_string())?);
        if x.len() > 24_000 * 12 {
            break;
        }
    }
    Ok(x)
}

/// transformers' codes `[K][frames]`, their shape, tie gaps and decoded audio.
type Reference = (Vec<Vec<u32>>, Vec<usize>, Vec<f32>, Vec<f32>);

/// transformers' codes, tie gaps and decoded audio of `x` through the model folder `model`,
/// run by `mimi_encode.py` with `py`.
fn transformers_reference(py: &Path, model: &Path, x: &[f32]) -> Result<Reference> {
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("input.f32");
    std::fs::write(&input, x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())?;
    let out = dir.path().join("reference.safetensors");
    let status = std::process::Command::new(py)
        .arg(fixtures().join("mimi_encode.py"))
        .arg(model)
        .arg(&input)
        .arg(&out)
        .status()
        .with_context(|| format!("running {}", py.display()))?;
    anyhow::ensure!(status.success(), "mimi_encode.py failed ({status})");
    let buf = std::fs::read(&out)?;
    let st = SafeTensors::deserialize(&buf)?;
    let (want, shape) = codes(&st, "codes")?;
    Ok((want, shape, f32s(&st, "gaps")?, f32s(&st, "decoded")?))
}

/// Encodes `x` with `model_dir` in motley and in transformers: codes equal but for ties
/// (at most `max_excused`), and motley's decode of transformers' codes within 1e-4 of its
/// peak. Returns the frame count.
fn assert_parity_with_transformers(py: &Path, model_dir: &Path, x: &[f32], max_excused: usize) -> Result<usize> {
    let mimi = MimiTokenizer::from_folder(model_dir, None)?;
    let (want, shape, gaps, want_pcm) = transformers_reference(py, model_dir, x)?;
    let got = mimi.encode_codes(x)?;
    assert_eq!((got.len(), got[0].len()), (shape[0], shape[1]), "code grid");
    let mut excused = 0;
    for f in 0..shape[1] {
        let mut excused_chain = None;
        for q in 0..shape[0] {
            let chain = usize::from(q > 0);
            if excused_chain == Some(chain) || got[q][f] == want[q][f] {
                continue;
            }
            let gap = gaps[q * shape[1] + f];
            assert!(gap < 1e-3, "frame {f} codebook {q}: {} vs transformers' {} (gap {gap})", got[q][f], want[q][f]);
            excused += 1;
            excused_chain = Some(chain);
        }
    }
    assert!(excused <= max_excused, "{excused} codes excused as ties");
    let pcm = mimi.decode_codes(&want)?;
    assert_eq!(pcm.len(), want_pcm.len());
    let peak = want_pcm.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = pcm.iter().zip(&want_pcm).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(d <= 1e-4 * peak.max(1.0), "decoded audio differs by {d} (peak {peak})");
    eprintln!("{} frames: {excused} ties excused, decoded within {d:.2e} (peak {peak:.2})", shape[1]);
    Ok(shape[1])
}

/// A clip longer than the transformer's 250-frame sliding window (10 s at the encoder's 25 Hz)
/// against transformers run in the test: the window, the rotary positions past it and the
/// decoder's own window must agree, not only the short clips of the committed reference.
#[test]
fn mimi_matches_transformers_past_the_sliding_window() -> Result<()> {
    let Some(py) = python() else {
        eprintln!("NOTICE: skipping the long-clip Mimi parity: no python with transformers ($MOTLEY_PYTHON or .venv)");
        return Ok(());
    };
    let frames = assert_parity_with_transformers(&py, &fixtures().join("mimi"), &long_clip()?, 4)?;
    assert!(frames > 125, "{frames} frames: not past the 250-frame window at 25 Hz");
    Ok(())
}

/// The fixture Mimi with `max_position_embeddings` positions and a 20-frame sliding window;
/// `gain` multiplies its transformers' attention projections and (×50 when not 1) their layer
/// scales. At transformers' initial scales (0.01, weights of std 0.02) the transformers barely
/// move the residual stream, so frames missing from a window's far edge would change nothing
/// a test can see; amplified, they do.
/// Loud enough that a window 4 code frames short of the reach fails (decode off by 7.6e-5 of
/// the peak, against 8e-7 for the right overlap); much louder saturates the softmax onto the
/// nearest frames and hides the far edge again.
const GAIN: f32 = 20.0;
fn windowed_mimi(max_position_embeddings: usize, gain: f32) -> Result<tempfile::TempDir> {
    broken_model(|tensors, cfg| {
        for (name, _, data) in tensors.iter_mut() {
            let g = if name.ends_with("layer_scale.scale") {
                if gain == 1.0 { 1.0 } else { 50.0 }
            } else if name.contains("self_attn.") && name.ends_with("proj.weight") {
                gain
            } else {
                continue;
            };
            for b in data.chunks_exact_mut(4) {
                b.copy_from_slice(&(f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * g).to_le_bytes());
            }
        }
        cfg["max_position_embeddings"] = serde_json::json!(max_position_embeddings);
        cfg["sliding_window"] = serde_json::json!(20);
    })
}

/// A clip longer than `max_position_embeddings` is encoded and decoded in overlapping windows.
/// transformers runs it in one pass (its rotary table grows): the codes and audio must be the
/// same. The fixture's model gets 120 positions and a 20-frame sliding window, so the 12 s clip
/// (300 encoder frames) takes five windows. Then, with the transformers amplified (see
/// [`windowed_mimi`]; too loud for float32 parity with transformers), against motley's own
/// one pass: a window overlapping less than the model's reach fails here.
#[test]
fn mimi_windows_clips_past_max_position_embeddings_like_one_pass() -> Result<()> {
    let Some(py) = python() else {
        eprintln!("NOTICE: skipping the windowed Mimi parity: no python with transformers ($MOTLEY_PYTHON or .venv)");
        return Ok(());
    };
    let x = long_clip()?;
    let dir = windowed_mimi(120, 1.0)?;
    let mimi = MimiTokenizer::from_folder(dir.path(), None)?;
    assert!(x.len() > 2 * mimi.max_samples(), "{} samples: not two windows", x.len());
    assert_parity_with_transformers(&py, dir.path(), &x, 4)?;

    let windowed = MimiTokenizer::from_folder(windowed_mimi(120, GAIN)?.path(), None)?;
    let one_pass = MimiTokenizer::from_folder(windowed_mimi(1000, GAIN)?.path(), None)?;
    let codes = windowed.encode_codes(&x)?;
    let want_codes = one_pass.encode_codes(&x)?;
    let (pcm, want) = (windowed.decode_codes(&codes)?, one_pass.decode_codes(&codes)?);
    assert_eq!(pcm.len(), want.len());
    let peak = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = pcm.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert_eq!(codes, want_codes, "windowed codes differ from one pass");
    assert!(d <= 1e-5 * peak, "windowed decode differs from one pass by {d} (peak {peak})");
    eprintln!("windows vs one pass: codes equal, decoded within {d:.2e} (peak {peak:.2})");

    // A window too short for the model's reach is refused, naming what to change.
    let cfg_path = dir.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg_path)?)?;
    cfg["sliding_window"] = serde_json::json!(250);
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg)?)?;
    let mimi = MimiTokenizer::from_folder(dir.path(), None)?;
    let e = mimi.encode_codes(&x).expect_err("a window shorter than the reach").to_string();
    assert!(e.contains("120 transformer positions") && e.contains("sliding_window 250"), "{e}");
    Ok(())
}
