//! Test data made in-test: seeded synthetic images, the integer-exact speech clip that
//! fixtures/make_flac_fixture.py also writes (as FLAC), and broken copies of the pretrained
//! model fixtures.
#![allow(dead_code)]

use image::{DynamicImage, Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `n` 32×32 images: a colour gradient background with a few filled rectangles and discs.
pub fn synthetic_images(n: usize, seed: u64) -> Vec<DynamicImage> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let base: [f32; 3] = [rng.random(), rng.random(), rng.random()];
            let slope: [f32; 3] = [rng.random::<f32>() - 0.5, rng.random::<f32>() - 0.5, rng.random::<f32>() - 0.5];
            let mut img = RgbImage::from_fn(32, 32, |x, y| {
                let t = (x + y) as f32 / 62.0;
                Rgb([0, 1, 2].map(|c| ((base[c] + slope[c] * t).clamp(0.0, 1.0) * 255.0) as u8))
            });
            for _ in 0..3 {
                let colour = Rgb([rng.random::<u8>(), rng.random::<u8>(), rng.random::<u8>()]);
                let (cx, cy, r) = (rng.random_range(0..32i32), rng.random_range(0..32i32), rng.random_range(3..10i32));
                let disc = rng.random::<bool>();
                for y in 0..32i32 {
                    for x in 0..32i32 {
                        let inside = if disc {
                            (x - cx).pow(2) + (y - cy).pow(2) <= r * r
                        } else {
                            (x - cx).abs() <= r && (y - cy).abs() <= r / 2
                        };
                        if inside {
                            img.put_pixel(x as u32, y as u32, colour);
                        }
                    }
                }
            }
            DynamicImage::ImageRgb8(img)
        })
        .collect()
}

/// PNG bytes of an image.
pub fn png(img: &DynamicImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).expect("encode PNG");
    out.into_inner()
}

pub const CLIP_RATE: u32 = 22_050;

/// Same integer formula as fixtures/make_flac_fixture.py (non-negative divisions only, so
/// Python's floor division and Rust's truncating division agree).
pub fn clip_samples() -> Vec<i16> {
    const N: usize = 33_075;
    const SEG: usize = 5_513;
    const PERIODS: [i64; 6] = [50, 37, 101, 23, 70, 150];
    const AMPS: [i64; 6] = [8000, 5000, 11000, 3000, 9000, 6000];
    let mut state: i64 = 777;
    (0..N)
        .map(|i| {
            let s = (i / SEG).min(PERIODS.len() - 1);
            let (p, a) = (PERIODS[s], AMPS[s]);
            let phase = i as i64 % p;
            let tri = (2 * phase - p).abs() * 2 * a / p - a;
            state = (state * 1_103_515_245 + 12_345) % (1 << 31);
            let noise = (state >> 16) % 128 - 64;
            (tri + noise) as i16
        })
        .collect()
}

/// Writes 16-bit mono samples as a WAV file.
pub fn write_wav(path: &std::path::Path, samples: &[i16], rate: u32) {
    let spec =
        hound::WavSpec { channels: 1, sample_rate: rate, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
    let mut w = hound::WavWriter::create(path, spec).expect("create wav");
    for &s in samples {
        w.write_sample(s).expect("write sample");
    }
    w.finalize().expect("finalize wav");
}

/// A speech-like clip: a sequence of vowel-ish harmonic tones with noise bursts, seeded.
pub fn babble(seconds: f32, rate: u32, seed: u64) -> Vec<i16> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = (seconds * rate as f32) as usize;
    let mut out = Vec::with_capacity(n);
    let mut f0 = 120.0f32;
    let mut formant = 700.0f32;
    let mut noisy = false;
    let mut phase = 0f32;
    for i in 0..n {
        if i % (rate as usize / 8) == 0 {
            f0 = rng.random_range(90.0..220.0);
            formant = rng.random_range(300.0..2500.0);
            noisy = rng.random::<f32>() < 0.25;
        }
        phase += f0 / rate as f32;
        let t = i as f32 / rate as f32;
        let v = if noisy {
            (rng.random::<f32>() - 0.5) * 0.3
        } else {
            let mut s = 0.0;
            for h in 1..12 {
                let f = f0 * h as f32;
                let gain = (-((f - formant) / 400.0).powi(2)).exp() + 0.05 / h as f32;
                s += gain * (2.0 * std::f32::consts::PI * phase * h as f32).sin();
            }
            0.25 * s
        };
        let env = 0.6 + 0.4 * (2.0 * std::f32::consts::PI * 3.0 * t).sin().abs();
        out.push((v * env * 32767.0).clamp(-32767.0, 32767.0) as i16);
    }
    out
}

/// A tensor of a safetensors file: name, shape, little-endian f32 bytes.
pub type RawTensor = (String, Vec<usize>, Vec<u8>);

/// Copies the pretrained fixture model folder `tests/fixtures/pretrained/{model}` (weights in
/// `weights`) into a temp dir, letting `edit` change its tensors and config.
pub fn broken_model(
    model: &str,
    weights: &str,
    edit: impl FnOnce(&mut Vec<RawTensor>, &mut serde_json::Value),
) -> anyhow::Result<tempfile::TempDir> {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pretrained").join(model);
    let buf = std::fs::read(src.join(weights))?;
    let st = safetensors::SafeTensors::deserialize(&buf)?;
    let mut tensors: Vec<RawTensor> =
        st.tensors().into_iter().map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec())).collect();
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(src.join("config.json"))?)?;
    edit(&mut tensors, &mut config);
    let dir = tempfile::tempdir()?;
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, d)| Ok((n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)?)))
        .collect::<anyhow::Result<_>>()?;
    std::fs::write(dir.path().join(weights), safetensors::serialize(views, None)?)?;
    std::fs::write(dir.path().join("config.json"), serde_json::to_vec(&config)?)?;
    Ok(dir)
}
