//! Bad input never panics: unusual-but-valid images are converted, broken ones are typed
//! errors naming the source; the same for audio.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::PathBuf;

use image::{DynamicImage, ImageBuffer, Luma, LumaA, Rgb, Rgba};
use indicatif::ProgressBar;
use motley_tokenizers::speech::audio;
use motley_tokenizers::{
    AudioTokenizer, ImageTokenizer, SpeechConfig, SpeechTokenizer, TokenizerError, VqConfig, VqImageTokenizer,
    decode_image_bytes,
};

fn vq() -> anyhow::Result<VqImageTokenizer> {
    let imgs = common::synthetic_images(8, 11);
    let c = VqConfig { codebook_size: 8, max_iter: 3, holdout: 0.0, ..VqConfig::default() };
    Ok(VqImageTokenizer::fit_images(&imgs, &c, &ProgressBar::hidden())?.0)
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Standard CRC-32 (PNG chunk checksums), to forge a consistent header.
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

#[test]
fn unusual_colour_types_are_converted() -> anyhow::Result<()> {
    let t = vq()?;
    let grey = DynamicImage::ImageLuma8(ImageBuffer::from_fn(20, 20, |x, _| Luma([(x * 12) as u8])));
    let grey_alpha =
        DynamicImage::ImageLumaA8(ImageBuffer::from_fn(20, 20, |x, y| LumaA([(x * 12) as u8, (y * 12) as u8])));
    let rgba = DynamicImage::ImageRgba8(ImageBuffer::from_fn(33, 31, |x, y| Rgba([x as u8 * 7, y as u8 * 7, 90, 128])));
    let rgb16 =
        DynamicImage::ImageRgb16(ImageBuffer::from_fn(40, 40, |x, y| Rgb([x as u16 * 1600, y as u16 * 1600, 30_000])));
    let grey16 = DynamicImage::ImageLuma16(ImageBuffer::from_fn(16, 16, |x, _| Luma([x as u16 * 4000])));
    for (name, img) in
        [("grey", grey), ("grey_alpha", grey_alpha), ("rgba", rgba), ("rgb16", rgb16), ("grey16", grey16)]
    {
        let bytes = common::png(&img);
        let seg = t.encode_bytes(&bytes, name)?;
        assert_eq!(seg.data.len(), 64, "{name}");
        t.decode_to_png(&seg)?;
    }
    Ok(())
}

#[test]
fn cmyk_jpeg_is_converted_to_rgb() -> anyhow::Result<()> {
    let bytes = std::fs::read(fixture("cmyk.jpg"))?;
    let img = decode_image_bytes(&bytes, "cmyk.jpg")?;
    let rgb = motley_tokenizers::image::to_rgb8(&img);
    let (l, r) = (rgb.get_pixel(2, 6).0, rgb.get_pixel(13, 6).0);
    // Left cyan (low red, high green and blue), right yellow (high red and green, low blue).
    assert!(l[0] < 80 && l[1] > 170 && l[2] > 170, "left {l:?}");
    assert!(r[0] > 170 && r[1] > 170 && r[2] < 80, "right {r:?}");
    assert_eq!(vq()?.encode_bytes(&bytes, "cmyk.jpg")?.data.len(), 64);
    Ok(())
}

#[test]
fn crawled_image_formats_decode() -> anyhow::Result<()> {
    // Written from raw bytes (WebP: lossy, by cwebp) by fixtures/make_image_formats_fixture.py:
    // 24x16, left half red, right half blue, a green bar along the top.
    let t = vq()?;
    for name in ["formats.bmp", "formats.gif", "formats.tif", "formats.webp"] {
        let bytes = std::fs::read(fixture(name))?;
        let img = decode_image_bytes(&bytes, name)?;
        assert_eq!((img.width(), img.height()), (24, 16), "{name}");
        let rgb = motley_tokenizers::image::to_rgb8(&img);
        for ((x, y), want) in [((3, 10), [220, 30, 30]), ((20, 10), [30, 30, 220]), ((12, 0), [30, 200, 30])] {
            let got = rgb.get_pixel(x, y).0;
            let off = got.iter().zip(want).map(|(&g, w)| (g as i32 - w).abs()).max().unwrap_or(0);
            assert!(off <= 40, "{name} pixel ({x}, {y}) is {got:?}, want about {want:?}");
        }
        assert_eq!(t.encode_bytes(&bytes, name)?.data.len(), 64, "{name}");
    }
    Ok(())
}

#[test]
fn broken_images_are_typed_errors_naming_the_source() -> anyhow::Result<()> {
    let t = vq()?;
    let good = common::png(&common::synthetic_images(1, 3)[0]);

    let e = t.encode_bytes(&[], "empty.png").unwrap_err();
    assert!(matches!(e, TokenizerError::ImageDecode { .. }) && e.to_string().contains("empty.png"), "{e}");

    let e = t.encode_bytes(b"definitely not an image", "junk.png").unwrap_err();
    assert!(matches!(e, TokenizerError::ImageDecode { .. }) && e.to_string().contains("junk.png"), "{e}");
    // GIF magic then text: the text reads as a 25,632-pixel-wide screen, which the limits refuse.
    let e = t.encode_bytes(b"GIF89a definitely not a png", "junk.gif").unwrap_err();
    assert!(matches!(e, TokenizerError::ImageTooLarge { .. }) && e.to_string().contains("junk.gif"), "{e}");
    let e = t.encode_bytes(b"BM\x10\x00\x00\x00 truncated bitmap", "junk.bmp").unwrap_err();
    assert!(matches!(e, TokenizerError::ImageDecode { .. }) && e.to_string().contains("junk.bmp"), "{e}");

    for cut in [good.len() / 2, 40, good.len() - 13] {
        let e = t.encode_bytes(&good[..cut], "truncated.png").unwrap_err();
        assert!(matches!(e, TokenizerError::ImageDecode { .. }), "cut at {cut}: {e}");
        assert!(e.to_string().contains("truncated.png"));
    }

    // A PNG whose header claims 100000 x 100000 pixels (a decompression bomb).
    let mut bomb = good.clone();
    bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let crc = crc32(&bomb[12..29]);
    bomb[29..33].copy_from_slice(&crc.to_be_bytes());
    let e = t.encode_bytes(&bomb, "bomb.png").unwrap_err();
    assert!(matches!(e, TokenizerError::ImageTooLarge { .. }), "{e}");
    assert!(e.to_string().contains("bomb.png"));

    let e = t.encode_file(std::path::Path::new("/nonexistent/motley/x.png")).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/motley/x.png"), "{e}");
    Ok(())
}

#[test]
fn broken_audio_is_a_typed_error_naming_the_file() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;

    let empty_wav = dir.path().join("silence0.wav");
    common::write_wav(&empty_wav, &[], 16_000);
    let e = audio::decode_file(&empty_wav).unwrap_err();
    assert!(matches!(e, TokenizerError::AudioEmpty { .. }), "{e}");
    assert!(e.to_string().contains("silence0.wav"));

    let zero = dir.path().join("zero.flac");
    std::fs::write(&zero, b"")?;
    let e = audio::decode_file(&zero).unwrap_err();
    assert!(e.to_string().contains("zero.flac"), "{e}");

    let junk = dir.path().join("junk.mp3");
    std::fs::write(&junk, vec![0x55u8; 4096])?;
    let e = audio::decode_file(&junk).unwrap_err();
    assert!(matches!(e, TokenizerError::AudioDecode { .. }) && e.to_string().contains("junk.mp3"), "{e}");

    // Truncated WAV: the header promises more data than the file holds.
    let full = dir.path().join("full.wav");
    common::write_wav(&full, &common::clip_samples(), common::CLIP_RATE);
    let bytes = std::fs::read(&full)?;
    let cut = dir.path().join("cut.wav");
    std::fs::write(&cut, &bytes[..bytes.len() / 2 + 1])?;
    let e = audio::decode_file(&cut).unwrap_err();
    assert!(matches!(e, TokenizerError::AudioDecode { .. }) && e.to_string().contains("cut.wav"), "{e}");

    // Truncated FLAC.
    let flac = std::fs::read(fixture("clip.flac"))?;
    let e = audio::decode_bytes(&flac[..flac.len() / 2], Some("flac"), "cut.flac").unwrap_err();
    assert!(e.to_string().contains("cut.flac"), "{e}");

    // Header only (RIFF cut inside the fmt chunk).
    let e = audio::decode_bytes(&bytes[..30], Some("wav"), "header.wav").unwrap_err();
    assert!(e.to_string().contains("header.wav"), "{e}");

    // A fit over a broken file names it; with skip_bad it is skipped.
    let good = dir.path().join("good.wav");
    common::write_wav(&good, &common::babble(2.0, 16_000, 1), 16_000);
    let cfg = SpeechConfig { units: 8, max_iter: 3, ..SpeechConfig::default() };
    let e = SpeechTokenizer::fit_files(&[good.clone(), junk.clone()], &cfg, &ProgressBar::hidden()).unwrap_err();
    assert!(e.to_string().contains("junk.mp3"), "{e}");
    let (tok, s) =
        SpeechTokenizer::fit_files(&[good, junk], &SpeechConfig { skip_bad: true, ..cfg }, &ProgressBar::hidden())?;
    assert_eq!((s.files, s.skipped_files), (1, 1));
    let e = tok.encode_samples(&[], 16_000, Some("nothing")).unwrap_err();
    assert!(matches!(e, TokenizerError::AudioEmpty { .. }));
    Ok(())
}

#[test]
fn stereo_and_float_wav_are_mixed_to_mono() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("stereo.wav");
    let spec = hound::WavSpec {
        channels: 2,
        sample_rate: 8_000,
        bits_per_sample: 32,
        sample_format: hound::SampleFormat::Float,
    };
    let mut w = hound::WavWriter::create(&p, spec)?;
    for i in 0..8_000 {
        w.write_sample(0.5f32)?;
        w.write_sample(if i % 2 == 0 { -0.5f32 } else { 0.5 })?;
    }
    w.finalize()?;
    let a = audio::decode_file(&p)?;
    assert_eq!((a.sample_rate, a.samples.len()), (8_000, 8_000));
    assert!((a.samples[0] - 0.0).abs() < 1e-6 && (a.samples[1] - 0.5).abs() < 1e-6);
    let r = audio::resample(&a, 16_000, "stereo.wav")?;
    assert_eq!(r.len(), 16_000);
    Ok(())
}
