//! Deterministic mutation testing of the media decoders motley feeds user bytes to (symphonia
//! for audio, image for pictures, then the resampler): mangled files are errors naming the
//! source, never a panic, an abort or a runaway allocation. Fixtures: fixtures/codecs/ (from
//! make_codec_fixtures.py), clip.flac and the image format fixtures.

use std::path::PathBuf;

use motley_tokenizers::image::{decode_image_bytes, square, to_rgb8};
use motley_tokenizers::speech::audio;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::common;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// One mutant of `good`: flipped bits, overwritten bytes, a truncation, a run of a boundary
/// value near the header, or a duplicated span.
fn mutate(rng: &mut ChaCha8Rng, good: &[u8]) -> Vec<u8> {
    let mut b = good.to_vec();
    match rng.random_range(0..5) {
        0 => {
            for _ in 0..rng.random_range(1..6) {
                let i = rng.random_range(0..b.len());
                b[i] ^= 1 << rng.random_range(0..8);
            }
        }
        1 => {
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..b.len());
                b[i] = rng.random();
            }
        }
        2 => b.truncate(rng.random_range(0..b.len())),
        3 => {
            let i = rng.random_range(0..b.len().min(200));
            let v = [0u8, 0xff, 0x7f, 0x80][rng.random_range(0..4)];
            let end = (i + 4).min(b.len());
            b[i..end].fill(v);
        }
        _ => {
            let i = rng.random_range(0..b.len());
            let j = rng.random_range(i..b.len());
            let span = b[i..j].to_vec();
            b.splice(i..i, span);
        }
    }
    b
}

/// Decodes and resamples to both tokenizer rates; Ok(false) for an error naming `name`.
fn exercise_audio(bytes: &[u8], ext: Option<&str>, name: &str) -> anyhow::Result<bool> {
    let a = match audio::decode_bytes(bytes, ext, name) {
        Ok(a) => a,
        Err(e) => {
            anyhow::ensure!(e.to_string().contains(name), "error does not name the source: {e}");
            return Ok(false);
        }
    };
    for to in [16_000, 24_000] {
        if let Err(e) = audio::resample(&a, to, name) {
            anyhow::ensure!(e.to_string().contains(name), "error does not name the source: {e}");
            return Ok(false);
        }
    }
    Ok(true)
}

#[test]
fn mangled_audio_is_an_error_never_a_panic() -> anyhow::Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(fixtures().join("codecs"))?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    files.sort();
    files.push(fixtures().join("clip.flac"));
    assert!(files.len() >= 8, "fixtures/codecs/ is missing files: {files:?}");
    for path in &files {
        let good = std::fs::read(path)?;
        let ext = path.extension().and_then(|e| e.to_str());
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("fixture");
        assert!(exercise_audio(&good, ext, name)?, "{name} itself does not decode");
        let mut decoded = 0;
        for k in 0..200 {
            let mutant = mutate(&mut rng, &good);
            let label = format!("{name}#mutant{k}");
            decoded += exercise_audio(&mutant, ext, &label)? as usize;
        }
        // Both outcomes are exercised: mutants of a good file mostly still decode.
        assert!(decoded > 0, "{name}: no mutant decoded");
    }
    Ok(())
}

/// Byte offset of a RIFF chunk's payload.
fn riff_chunk(wav: &[u8], id: &[u8; 4]) -> Option<usize> {
    let mut at = 12;
    while at + 8 <= wav.len() {
        let len = u32::from_le_bytes(wav[at + 4..at + 8].try_into().ok()?) as usize;
        if &wav[at..at + 4] == id {
            return Some(at + 8);
        }
        at += 8 + len + (len & 1);
    }
    None
}

#[test]
fn a_corrupt_sample_rate_is_refused_before_it_sizes_the_resampler() -> anyhow::Result<()> {
    // The fmt chunk's rate field (payload offset 4). A rate of 2^32-1 Hz once asked the FFT
    // resampler for 3.4 GB; 0 and 1 Hz are as corrupt.
    let good = std::fs::read(fixtures().join("codecs/pcm24.wav"))?;
    let fmt = riff_chunk(&good, b"fmt ").expect("fmt chunk");
    for rate in [u32::MAX, 4_000_000, 1, 0] {
        let mut bad = good.clone();
        bad[fmt + 4..fmt + 8].copy_from_slice(&rate.to_le_bytes());
        let e = audio::decode_bytes(&bad, Some("wav"), "rate.wav").expect_err("a corrupt rate decoded");
        let msg = e.to_string();
        assert!(msg.contains("rate.wav") && msg.contains("sample rate"), "{rate}: {msg}");
    }
    let silence = audio::Audio { samples: vec![0.0; 100], sample_rate: u32::MAX };
    let e = audio::resample(&silence, 16_000, "built.wav").expect_err("resampled from 4 GHz");
    assert!(e.to_string().contains("outside"), "{e}");
    Ok(())
}

#[test]
fn an_adpcm_block_whose_step_overflows_is_an_error() -> anyhow::Result<()> {
    // An MS ADPCM block header (predictor, then an i16 step `delta`) with the largest step and
    // nibbles that triple it each sample: symphonia's i32 arithmetic overflows within the
    // block. Encoders never write this; a corrupt file can.
    let mut wav = std::fs::read(fixtures().join("codecs/ms_adpcm.wav"))?;
    let data = riff_chunk(&wav, b"data").expect("data chunk");
    wav[data] = 0;
    wav[data + 1..data + 3].copy_from_slice(&i16::MAX.to_le_bytes());
    wav[data + 7..data + 64].fill(0x77);
    let result = audio::decode_bytes(&wav, Some("wav"), "step.wav");
    if cfg!(debug_assertions) {
        // Overflow checks on (test builds): symphonia panics, the guard makes it this record's error.
        let msg = result.expect_err("an overflowing block decoded").to_string();
        assert!(msg.contains("step.wav") && msg.contains("the decoder panicked"), "{msg}");
    } else if let Ok(a) = result {
        // Release builds wrap instead: still one clip, clamped to full scale.
        assert!(a.samples.iter().all(|v| v.abs() <= 1.0));
    }
    Ok(())
}

#[test]
fn float_audio_far_past_full_scale_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // 0.1 s of float samples at 0.1 with one sample of `peak` at index 800.
    let wav = |name: &str, peak: f32| -> anyhow::Result<PathBuf> {
        let path = dir.path().join(name);
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 16_000,
            bits_per_sample: 32,
            sample_format: hound::SampleFormat::Float,
        };
        let mut w = hound::WavWriter::create(&path, spec)?;
        for i in 0..1600 {
            w.write_sample(if i == 800 { peak } else { 0.1 })?;
        }
        w.finalize()?;
        Ok(path)
    };
    let e = audio::decode_file(&wav("loud.wav", 3e30)?).expect_err("1e30 samples decoded");
    let msg = e.to_string();
    assert!(msg.contains("loud.wav") && msg.contains("sample 800"), "{msg}");
    // Overs a mastering chain leaves (2x full scale) are kept.
    assert_eq!(audio::decode_file(&wav("over.wav", 2.0)?)?.samples.len(), 1600);
    Ok(())
}

fn exercise_image(bytes: &[u8], name: &str) -> anyhow::Result<bool> {
    match decode_image_bytes(bytes, name) {
        Ok(img) => {
            let _ = to_rgb8(&img);
            square(&img, 32, Some(name))?;
            Ok(true)
        }
        Err(e) => {
            anyhow::ensure!(e.to_string().contains(name), "error does not name the source: {e}");
            Ok(false)
        }
    }
}

#[test]
fn mangled_images_are_an_error_never_a_panic() -> anyhow::Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let mut inputs: Vec<(String, Vec<u8>)> = Vec::new();
    for f in ["formats.bmp", "formats.gif", "formats.tif", "formats.webp", "cmyk.jpg"] {
        inputs.push((f.into(), std::fs::read(fixtures().join(f))?));
    }
    let img = &common::synthetic_images(1, 5)[0];
    inputs.push(("synthetic.png".into(), common::png(img)));
    let mut jpeg = std::io::Cursor::new(Vec::new());
    img.write_to(&mut jpeg, image::ImageFormat::Jpeg)?;
    inputs.push(("synthetic.jpg".into(), jpeg.into_inner()));
    for (name, good) in &inputs {
        assert!(exercise_image(good, name)?, "{name} itself does not decode");
        let mut decoded = 0;
        for k in 0..300 {
            decoded += exercise_image(&mutate(&mut rng, good), &format!("{name}#mutant{k}"))? as usize;
        }
        assert!(decoded > 0, "{name}: no mutant decoded");
    }
    Ok(())
}
