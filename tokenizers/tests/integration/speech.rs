//! Speech units: WAV and FLAC of the same audio give the same units, fits are deterministic,
//! files round-trip, decode gives audible WAV and a spectrogram.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use motley_shards::{Modality, SegmentData};
use motley_tokenizers::speech::audio;
use motley_tokenizers::{AudioTokenizer, SpeechConfig, SpeechTokenizer, load_speech};

fn training_clips(dir: &Path) -> Vec<PathBuf> {
    (0..4)
        .map(|i| {
            let p = dir.join(format!("babble{i}.wav"));
            let rate = if i % 2 == 0 { 16_000 } else { 22_050 };
            common::write_wav(&p, &common::babble(2.0, rate, i), rate);
            p
        })
        .collect()
}

fn small_cfg(seed: u64) -> SpeechConfig {
    SpeechConfig { units: 24, max_iter: 10, seed, ..SpeechConfig::default() }
}

fn flac_fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip.flac")
}

#[test]
fn wav_and_flac_of_the_same_audio_give_the_same_units() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let wav = dir.path().join("clip.wav");
    common::write_wav(&wav, &common::clip_samples(), common::CLIP_RATE);
    let a = audio::decode_file(&wav)?;
    let b = audio::decode_file(&flac_fixture())?;
    assert_eq!(a.sample_rate, common::CLIP_RATE);
    assert_eq!(a, b, "WAV and FLAC decode to identical PCM");

    let (tok, _) = SpeechTokenizer::fit_files(&training_clips(dir.path()), &small_cfg(1), &ProgressBar::hidden())?;
    let sw = tok.encode_file(&wav)?;
    let sf = tok.encode_file(&flac_fixture())?;
    assert_eq!(sw.data, sf.data);
    let SegmentData::Tokens(units) = &sw.data else { anyhow::bail!("units are tokens") };
    // 1.5 s at 25 Hz.
    assert_eq!(units.len(), 38);
    assert_eq!(sw.modality, Modality::Speech);
    assert_eq!(sw.meta.frame_rate, Some(25.0));
    assert!(sw.meta.source.as_deref().is_some_and(|s| s.ends_with("clip.wav")));
    // The clip's six tones are not all one unit.
    let mut distinct = units.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert!(distinct.len() >= 3, "{units:?}");

    // Bytes in memory with only a hint agree with the file path.
    let bytes = std::fs::read(flac_fixture())?;
    assert_eq!(tok.encode_bytes(&bytes, Some("flac"), "clip.flac")?.data, sf.data);
    assert_eq!(tok.encode_bytes(&bytes, None, "clip")?.data, sf.data);
    Ok(())
}

#[test]
fn fits_are_deterministic_for_a_seed_and_files_round_trip() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let clips = training_clips(dir.path());
    let (a, sa) = SpeechTokenizer::fit_files(&clips, &small_cfg(5), &ProgressBar::hidden())?;
    let (b, sb) = SpeechTokenizer::fit_files(&clips, &small_cfg(5), &ProgressBar::hidden())?;
    assert_eq!(sa.quantization_error, sb.quantization_error);
    assert_eq!(sa.files, 4);
    assert!((sa.audio_seconds - 8.0).abs() < 0.01);
    assert_eq!(sa.frames, 4 * 50);
    assert!(sa.relative_error > 0.0 && sa.relative_error < 1.0);
    let (pa, pb) = (dir.path().join("a.safetensors"), dir.path().join("b.safetensors"));
    a.save(&pa)?;
    b.save(&pb)?;
    assert_eq!(std::fs::read(&pa)?, std::fs::read(&pb)?, "same seed, same bytes");

    let loaded = load_speech(&pa)?;
    assert_eq!(loaded.vocab_size(), 24);
    for c in &clips {
        assert_eq!(loaded.encode_file(c)?, a.encode_file(c)?);
    }
    let (c, _) = SpeechTokenizer::fit_files(&clips, &small_cfg(6), &ProgressBar::hidden())?;
    assert_ne!(c.encode_file(&clips[0])?, a.encode_file(&clips[0])?, "another seed, other units");
    Ok(())
}

#[test]
fn decode_gives_wav_and_spectrogram_and_collapse_removes_repeats() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let clips = training_clips(dir.path());
    let (tok, _) = SpeechTokenizer::fit_files(&clips, &small_cfg(2), &ProgressBar::hidden())?;
    let seg = tok.encode_file(&clips[0])?;
    let wav = tok.decode_to_wav(&seg)?;
    let r = hound::WavReader::new(std::io::Cursor::new(&wav))?;
    assert_eq!(r.spec().sample_rate, 16_000);
    assert_eq!(r.len() as usize, seg.data.len() * 640);
    let samples: Vec<i16> = r.into_samples::<i16>().collect::<Result<_, _>>()?;
    let rms = (samples.iter().map(|&s| (s as f64).powi(2)).sum::<f64>() / samples.len() as f64).sqrt();
    assert!(rms > 100.0, "reconstruction should be audible, rms {rms}");
    let png = tok.spectrogram_png(&seg)?;
    let img = image::load_from_memory(&png)?;
    let px = motley_tokenizers::speech::spectrogram_px_per_frame(seg.data.len());
    assert_eq!((img.width(), img.height()), (seg.data.len() as u32 * px, 160));
    assert!(img.width() >= 480);
    let original = image::load_from_memory(&tok.audio_spectrogram_png(&clips[0])?)?;
    assert_eq!(original.width(), img.width());
    let rendered = tok.render(&seg)?;
    assert_eq!(rendered.iter().map(|r| r.extension).collect::<Vec<_>>(), ["wav", "png"]);

    let (collapsed, _) = SpeechTokenizer::fit_files(
        &clips,
        &SpeechConfig { collapse_repeats: true, ..small_cfg(2) },
        &ProgressBar::hidden(),
    )?;
    let cs = collapsed.encode_file(&clips[0])?;
    let (SegmentData::Tokens(full), SegmentData::Tokens(short)) = (&seg.data, &cs.data) else {
        anyhow::bail!("tokens")
    };
    let mut dedup = full.clone();
    dedup.dedup();
    assert_eq!(short, &dedup);
    assert!(short.windows(2).all(|w| w[0] != w[1]));
    Ok(())
}
