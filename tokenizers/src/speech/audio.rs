//! Audio in: symphonia decodes WAV, FLAC, MP3 and Ogg Vorbis to mono f32, rubato resamples
//! to the tokenizer's rate; WAV out through hound.

use std::io::Cursor;
use std::path::Path;

use rubato::{FftFixedIn, Resampler};
use symphonia::core::codecs::audio::AudioDecoderOptions;
use symphonia::core::errors::Error as SymError;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, TrackType};
use symphonia::core::io::{MediaSource, MediaSourceStream};
use symphonia::core::meta::MetadataOptions;

use crate::error::{Result, TokenizerError};

/// Longest audio accepted, in seconds (guards against absurd allocations).
pub const MAX_SECONDS: f64 = 4.0 * 3600.0;

/// Sample rates accepted, in Hz: telephone speech (8 kHz) with room below, studio masters
/// (768 kHz) at the top. A header's rate sizes the resampler's FFTs (a 4 GHz rate asked for
/// 3.4 GB), so a corrupt one must be refused, not trusted.
pub const SAMPLE_RATES: std::ops::RangeInclusive<u32> = 1_000..=768_000;

/// Largest sample magnitude accepted (full scale is 1.0). Integer PCM cannot pass 1.0; float
/// WAVs can, and one holding 1e30 turns every feature downstream into inf or NaN codes.
pub const MAX_AMPLITUDE: f32 = 1000.0;

fn check_rate(rate: u32) -> std::result::Result<(), String> {
    if SAMPLE_RATES.contains(&rate) {
        Ok(())
    } else {
        Err(format!(
            "sample rate {rate} Hz is outside {}..={} Hz (a corrupt header?)",
            SAMPLE_RATES.start(),
            SAMPLE_RATES.end()
        ))
    }
}

/// Decoded mono audio.
#[derive(Debug, Clone, PartialEq)]
pub struct Audio {
    pub samples: Vec<f32>,
    pub sample_rate: u32,
}

impl Audio {
    pub fn seconds(&self) -> f64 {
        if self.sample_rate == 0 { 0.0 } else { self.samples.len() as f64 / self.sample_rate as f64 }
    }
}

/// Decodes an audio file to mono f32 at its own rate.
pub fn decode_file(path: &Path) -> Result<Audio> {
    let file = std::fs::File::open(path).map_err(|e| TokenizerError::io("open", path, e))?;
    let ext = path.extension().and_then(|e| e.to_str());
    decode_source(Box::new(file), ext, &path.display().to_string())
}

/// Decodes in-memory audio; `hint` is a file extension (`wav`, `flac`, `mp3`, `ogg`) if known.
pub fn decode_bytes(bytes: &[u8], hint: Option<&str>, source: &str) -> Result<Audio> {
    if bytes.is_empty() {
        return Err(TokenizerError::AudioDecode { source_name: source.into(), msg: "file is empty (0 bytes)".into() });
    }
    decode_source(Box::new(Cursor::new(bytes.to_vec())), hint, source)
}

fn decode_source(src: Box<dyn MediaSource>, hint_ext: Option<&str>, source: &str) -> Result<Audio> {
    crate::error::catch_panic(|| decode_unguarded(src, hint_ext, source)).unwrap_or_else(|msg| {
        Err(TokenizerError::AudioDecode { source_name: source.into(), msg: format!("the decoder panicked: {msg}") })
    })
}

fn decode_unguarded(src: Box<dyn MediaSource>, hint_ext: Option<&str>, source: &str) -> Result<Audio> {
    let err = |msg: String| TokenizerError::AudioDecode { source_name: source.into(), msg };
    let mss = MediaSourceStream::new(src, Default::default());
    let mut hint = Hint::new();
    if let Some(e) = hint_ext {
        hint.with_extension(e);
    }
    let mut format = symphonia::default::get_probe()
        .probe(&hint, mss, FormatOptions::default(), MetadataOptions::default())
        .map_err(|e| err(format!("unrecognized or unsupported container: {e}")))?;
    let track = format.default_track(TrackType::Audio).ok_or_else(|| err("no audio track".into()))?;
    let track_id = track.id;
    let params = track
        .codec_params
        .as_ref()
        .and_then(|p| p.audio())
        .ok_or_else(|| err("audio track has no codec parameters".into()))?;
    let declared_rate = params.sample_rate;
    if let Some(r) = declared_rate {
        check_rate(r).map_err(err)?;
    }
    let mut decoder = symphonia::default::get_codecs()
        .make_audio_decoder(params, &AudioDecoderOptions::default())
        .map_err(|e| err(format!("unsupported codec: {e}")))?;

    let mut mono: Vec<f32> = Vec::new();
    let mut rate: Option<u32> = declared_rate;
    let mut interleaved: Vec<f32> = Vec::new();
    let mut packets = 0usize;
    let mut bad_packets = 0usize;
    loop {
        let packet = match format.next_packet() {
            Ok(Some(p)) => p,
            Ok(None) => break,
            // A chained stream changing its tracks: what came before is a complete clip.
            Err(SymError::ResetRequired) => break,
            Err(SymError::IoError(e)) => {
                return Err(err(format!("truncated or unreadable after {} samples: {e}", mono.len())));
            }
            Err(e) => return Err(err(format!("demuxing failed after {} samples: {e}", mono.len()))),
        };
        if packet.track_id != track_id {
            continue;
        }
        packets += 1;
        let buf = match decoder.decode(&packet) {
            Ok(b) => b,
            // One corrupt packet (common at MP3 starts) is skipped; see the check below.
            Err(SymError::DecodeError(_)) => {
                bad_packets += 1;
                continue;
            }
            Err(e) => return Err(err(format!("decoding failed after {} samples: {e}", mono.len()))),
        };
        let spec = buf.spec();
        let ch = spec.channels().count().max(1);
        let r = spec.rate();
        check_rate(r).map_err(err)?;
        match rate {
            Some(prev) if prev != r && !mono.is_empty() => {
                return Err(err(format!("sample rate changes mid-stream ({prev} Hz to {r} Hz)")));
            }
            _ => rate = Some(r),
        }
        interleaved.clear();
        buf.copy_to_vec_interleaved(&mut interleaved);
        let inv = 1.0 / ch as f32;
        mono.extend(interleaved.chunks_exact(ch).map(|f| f.iter().sum::<f32>() * inv));
        if mono.len() as f64 > MAX_SECONDS * r.max(1) as f64 {
            return Err(err(format!("longer than the {MAX_SECONDS} s limit")));
        }
    }
    if packets > 0 && bad_packets * 2 > packets {
        return Err(err(format!("{bad_packets} of {packets} packets are malformed")));
    }
    let sample_rate = rate.unwrap_or(0);
    if mono.is_empty() || sample_rate == 0 {
        return Err(TokenizerError::AudioEmpty { source_name: source.into(), samples: mono.len(), rate: sample_rate });
    }
    if let Some((i, v)) = mono.iter().enumerate().find(|(_, v)| !(v.abs() <= MAX_AMPLITUDE)) {
        return Err(err(format!(
            "sample {i} is {v:e}, past {MAX_AMPLITUDE} times full scale: corrupt or unnormalized float audio"
        )));
    }
    Ok(Audio { samples: mono, sample_rate })
}

/// Resamples mono audio to `to` Hz (FFT resampler; delay removed, length `ceil(n·to/from)`).
pub fn resample(audio: &Audio, to: u32, source: &str) -> Result<Vec<f32>> {
    if audio.sample_rate == to {
        return Ok(audio.samples.clone());
    }
    let rerr = |msg: String| TokenizerError::Resample { source_name: source.into(), from: audio.sample_rate, msg };
    check_rate(audio.sample_rate).and_then(|()| check_rate(to)).map_err(rerr)?;
    // realfft unwraps on a NaN its inverse transform meets (float WAVs holding 1e38 overflow
    // the FFT): that input is an error of this record, not a panic.
    let out = crate::error::catch_panic(|| resample_unguarded(audio, to, &rerr))
        .unwrap_or_else(|msg| Err(rerr(format!("the resampler panicked: {msg}"))))?;
    if out.iter().any(|v| !v.is_finite()) {
        let peak = audio.samples.iter().fold(0f32, |m, v| m.max(v.abs()));
        return Err(rerr(format!("resampling overflowed: samples reach {peak:e} (full scale is 1.0)")));
    }
    Ok(out)
}

fn resample_unguarded(audio: &Audio, to: u32, rerr: &dyn Fn(String) -> TokenizerError) -> Result<Vec<f32>> {
    let chunk = 1024;
    let mut rs = FftFixedIn::<f32>::new(audio.sample_rate as usize, to as usize, chunk, 2, 1)
        .map_err(|e| rerr(e.to_string()))?;
    let expected = (audio.samples.len() as u64 * to as u64).div_ceil(audio.sample_rate as u64) as usize;
    let delay = rs.output_delay();
    let mut out: Vec<f32> = Vec::with_capacity(expected + delay + chunk * 2);
    let mut pos = 0;
    let mut outbuf = rs.output_buffer_allocate(true);
    while pos + rs.input_frames_next() <= audio.samples.len() {
        let need = rs.input_frames_next();
        let (_, n) = rs
            .process_into_buffer(&[&audio.samples[pos..pos + need]], &mut outbuf, None)
            .map_err(|e| rerr(e.to_string()))?;
        out.extend_from_slice(&outbuf[0][..n]);
        pos += need;
    }
    if pos < audio.samples.len() {
        let (_, n) = rs
            .process_partial_into_buffer(Some(&[&audio.samples[pos..]]), &mut outbuf, None)
            .map_err(|e| rerr(e.to_string()))?;
        out.extend_from_slice(&outbuf[0][..n]);
    }
    // Flush the resampler's delay line with silence.
    let mut guard = 0;
    while out.len() < expected + delay && guard < 64 {
        let (_, n) =
            rs.process_partial_into_buffer(None::<&[&[f32]]>, &mut outbuf, None).map_err(|e| rerr(e.to_string()))?;
        out.extend_from_slice(&outbuf[0][..n]);
        guard += 1;
    }
    let end = (delay + expected).min(out.len());
    Ok(out[delay.min(end)..end].to_vec())
}

/// Encodes mono f32 samples as a 16-bit PCM WAV file in memory (peak-limited to ±1).
pub fn wav_bytes(samples: &[f32], sample_rate: u32) -> Result<Vec<u8>> {
    let spec =
        hound::WavSpec { channels: 1, sample_rate, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
    let peak = samples.iter().fold(0f32, |a, &b| a.max(b.abs()));
    let gain = if peak > 0.99 { 0.99 / peak } else { 1.0 };
    let mut out = Cursor::new(Vec::new());
    {
        let mut w = hound::WavWriter::new(&mut out, spec)
            .map_err(|e| TokenizerError::Render { what: "WAV", msg: e.to_string() })?;
        for &s in samples {
            w.write_sample((s * gain * 32767.0).round() as i16)
                .map_err(|e| TokenizerError::Render { what: "WAV", msg: e.to_string() })?;
        }
        w.finalize().map_err(|e| TokenizerError::Render { what: "WAV", msg: e.to_string() })?;
    }
    Ok(out.into_inner())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn wav_roundtrip_and_resample_length() {
        let tone: Vec<f32> =
            (0..22_050).map(|i| 0.5 * (2.0 * std::f32::consts::PI * 300.0 * i as f32 / 22_050.0).sin()).collect();
        let bytes = wav_bytes(&tone, 22_050).unwrap();
        let a = decode_bytes(&bytes, Some("wav"), "tone.wav").unwrap();
        assert_eq!(a.sample_rate, 22_050);
        assert_eq!(a.samples.len(), 22_050);
        assert!((a.samples[100] - tone[100]).abs() < 1e-3);
        let r = resample(&a, 16_000, "tone.wav").unwrap();
        assert_eq!(r.len(), 16_000);
        // The resampled tone is still a 0.5-amplitude sine, in phase (delay removed).
        let t = 8000;
        let expect = 0.5 * (2.0 * std::f32::consts::PI * 300.0 * t as f32 / 16_000.0).sin();
        assert!((r[t] - expect).abs() < 0.02, "{} vs {expect}", r[t]);
    }

    #[test]
    fn garbage_and_empty_are_errors() {
        assert!(matches!(decode_bytes(b"", None, "x"), Err(TokenizerError::AudioDecode { .. })));
        let e = decode_bytes(b"this is not audio at all, not even close", Some("wav"), "junk.wav").unwrap_err();
        assert!(e.to_string().contains("junk.wav"), "{e}");
    }
}
