//! Log-mel features (realfft STFT + triangular mel filterbank), their approximate inverse to a
//! linear magnitude spectrogram, and Griffin-Lim phase reconstruction for listening.

use std::sync::Arc;

use rand::{Rng, SeedableRng};
use realfft::num_complex::Complex;
use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TokenizerError};

/// Floor added to mel power before the log, so silence maps to a finite value.
const LOG_FLOOR: f32 = 1e-10;

/// STFT and mel filterbank parameters. Units come at `sample_rate / hop_length` per second.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MelConfig {
    pub sample_rate: u32,
    pub n_fft: usize,
    pub win_length: usize,
    pub hop_length: usize,
    pub n_mels: usize,
    pub f_min: f32,
    pub f_max: f32,
}

impl Default for MelConfig {
    /// 16 kHz, 64 ms Hann window, 40 ms hop: 25 frames per second, 80 mel bands.
    fn default() -> Self {
        MelConfig {
            sample_rate: 16_000,
            n_fft: 1024,
            win_length: 1024,
            hop_length: 640,
            n_mels: 80,
            f_min: 0.0,
            f_max: 8_000.0,
        }
    }
}

impl MelConfig {
    /// Frames (units) per second.
    pub fn frame_rate(&self) -> f32 {
        self.sample_rate as f32 / self.hop_length as f32
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TokenizerError::config("mel features", m));
        if self.sample_rate < 1000 || self.sample_rate > 192_000 {
            return bad(format!("sample rate {} Hz out of range", self.sample_rate));
        }
        if !self.n_fft.is_power_of_two() || self.n_fft < 64 || self.n_fft > 16_384 {
            return bad(format!("n_fft {} must be a power of two in 64..=16384", self.n_fft));
        }
        if self.win_length == 0 || self.win_length > self.n_fft {
            return bad(format!("window {} must be in 1..=n_fft ({})", self.win_length, self.n_fft));
        }
        if self.hop_length == 0 || self.hop_length > self.win_length * 4 {
            return bad(format!("hop {} must be in 1..=4×window", self.hop_length));
        }
        if self.n_mels < 2 || self.n_mels > self.n_fft / 2 {
            return bad(format!("{} mel bands for n_fft {}", self.n_mels, self.n_fft));
        }
        if !(self.f_min >= 0.0 && self.f_min < self.f_max && self.f_max <= self.sample_rate as f32 / 2.0 + 0.5) {
            return bad(format!("mel range {}..{} Hz at {} Hz", self.f_min, self.f_max, self.sample_rate));
        }
        Ok(())
    }

    /// Number of frames for `n` samples: one per hop, at least one.
    pub fn frames_for(&self, n: usize) -> usize {
        n.div_ceil(self.hop_length).max(1)
    }
}

fn hz_to_mel(f: f32) -> f32 {
    2595.0 * (1.0 + f / 700.0).log10()
}

fn mel_to_hz(m: f32) -> f32 {
    700.0 * (10f32.powf(m / 2595.0) - 1.0)
}

/// One triangular filter: first FFT bin and its weights.
#[derive(Debug, Clone)]
struct Filter {
    start: usize,
    weights: Vec<f32>,
    area: f32,
}

/// The analysis / synthesis front end: FFT plans, window and filterbank. Cheap to share.
#[derive(Clone)]
pub struct MelFrontend {
    cfg: MelConfig,
    window: Vec<f32>,
    filters: Vec<Filter>,
    /// Per FFT bin: sum over filters of weight (for the inverse's partition of unity).
    coverage: Vec<f32>,
    fwd: Arc<dyn RealToComplex<f32>>,
    inv: Arc<dyn ComplexToReal<f32>>,
}

impl std::fmt::Debug for MelFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MelFrontend").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

impl MelFrontend {
    pub fn new(cfg: &MelConfig) -> Result<Self> {
        cfg.validate()?;
        let n_bins = cfg.n_fft / 2 + 1;
        // Periodic Hann window of win_length, centred in n_fft.
        let mut window = vec![0f32; cfg.n_fft];
        let off = (cfg.n_fft - cfg.win_length) / 2;
        for i in 0..cfg.win_length {
            window[off + i] = 0.5 - 0.5 * (2.0 * std::f32::consts::PI * i as f32 / cfg.win_length as f32).cos();
        }
        let (mlo, mhi) = (hz_to_mel(cfg.f_min), hz_to_mel(cfg.f_max));
        let edges: Vec<f32> =
            (0..cfg.n_mels + 2).map(|i| mel_to_hz(mlo + (mhi - mlo) * i as f32 / (cfg.n_mels + 1) as f32)).collect();
        let bin_hz = cfg.sample_rate as f32 / cfg.n_fft as f32;
        let mut filters = Vec::with_capacity(cfg.n_mels);
        let mut coverage = vec![0f32; n_bins];
        for m in 0..cfg.n_mels {
            let (lo, c, hi) = (edges[m], edges[m + 1], edges[m + 2]);
            let mut weights = Vec::new();
            let mut start = None;
            for (k, cov) in coverage.iter_mut().enumerate() {
                let f = k as f32 * bin_hz;
                let w =
                    if f > lo && f < hi { if f <= c { (f - lo) / (c - lo) } else { (hi - f) / (hi - c) } } else { 0.0 };
                if w > 0.0 {
                    if start.is_none() {
                        start = Some(k);
                    }
                    weights.push(w);
                    *cov += w;
                } else if start.is_some() {
                    break;
                }
            }
            let start = match start {
                Some(s) => s,
                None => {
                    // Narrow low bands can fall between bins: give them the nearest bin.
                    let k = ((c / bin_hz).round() as usize).min(n_bins - 1);
                    weights.push(1.0);
                    coverage[k] += 1.0;
                    k
                }
            };
            let area = weights.iter().sum();
            filters.push(Filter { start, weights, area });
        }
        let mut planner = RealFftPlanner::<f32>::new();
        let fwd = planner.plan_fft_forward(cfg.n_fft);
        let inv = planner.plan_fft_inverse(cfg.n_fft);
        Ok(MelFrontend { cfg: cfg.clone(), window, filters, coverage, fwd, inv })
    }

    pub fn config(&self) -> &MelConfig {
        &self.cfg
    }

    /// Log-mel features, `frames × n_mels`, row-major. Frame `t` is centred on sample
    /// `t·hop + hop/2` (zero padding outside the signal), so `frames = ceil(len / hop)`.
    pub fn log_mel(&self, samples: &[f32]) -> Vec<f32> {
        let c = &self.cfg;
        let frames = c.frames_for(samples.len());
        let mut out = Vec::with_capacity(frames * c.n_mels);
        let mut buf = self.fwd.make_input_vec();
        let mut spec = self.fwd.make_output_vec();
        let mut scratch = self.fwd.make_scratch_vec();
        let mut power = vec![0f32; spec.len()];
        for t in 0..frames {
            let centre = (t * c.hop_length + c.hop_length / 2) as isize;
            let start = centre - (c.n_fft / 2) as isize;
            for (i, b) in buf.iter_mut().enumerate() {
                let s = start + i as isize;
                *b = if s >= 0 && (s as usize) < samples.len() { samples[s as usize] * self.window[i] } else { 0.0 };
            }
            // Lengths come from the plan itself, so this cannot fail.
            let _ = self.fwd.process_with_scratch(&mut buf, &mut spec, &mut scratch);
            for (p, z) in power.iter_mut().zip(&spec) {
                *p = z.norm_sqr();
            }
            for f in &self.filters {
                let e: f32 = f.weights.iter().zip(&power[f.start..]).map(|(w, p)| w * p).sum();
                out.push((e + LOG_FLOOR).ln());
            }
        }
        out
    }

    /// Approximate inverse of the filterbank: mel power spread back over each band's bins.
    fn mel_to_magnitude(&self, log_mel: &[f32]) -> Vec<Vec<f32>> {
        let n_bins = self.cfg.n_fft / 2 + 1;
        log_mel
            .chunks_exact(self.cfg.n_mels)
            .map(|frame| {
                let mut p = vec![0f32; n_bins];
                for (f, &lm) in self.filters.iter().zip(frame) {
                    let per_bin = ((lm.exp() - LOG_FLOOR).max(0.0)) / f.area.max(1e-6);
                    for (k, w) in f.weights.iter().enumerate() {
                        p[f.start + k] += w * per_bin;
                    }
                }
                for (v, cov) in p.iter_mut().zip(&self.coverage) {
                    if *cov > 0.0 {
                        *v /= cov.max(1.0);
                    }
                    *v = v.sqrt();
                }
                p
            })
            .collect()
    }

    /// Reconstructs a waveform from log-mel frames by Griffin-Lim. Frames are interpolated to a
    /// quarter hop first, so the synthesis STFT overlaps enough for phase recovery.
    pub fn griffin_lim(&self, log_mel: &[f32], iterations: usize, seed: u64) -> Vec<f32> {
        let c = &self.cfg;
        let mags = self.mel_to_magnitude(log_mel);
        if mags.is_empty() {
            return Vec::new();
        }
        let up = 4usize;
        let hop = (c.hop_length / up).max(1);
        let n_bins = c.n_fft / 2 + 1;
        // Linear interpolation in time between analysis frames (frame t sits at t·hop_a + hop_a/2).
        let n_out = mags.len() * up;
        let mut target = Vec::with_capacity(n_out);
        for j in 0..n_out {
            let pos = (j as f32 + 0.5) / up as f32 - 0.5;
            let i0 = pos.floor().max(0.0) as usize;
            let i1 = (i0 + 1).min(mags.len() - 1);
            let a = (pos - i0 as f32).clamp(0.0, 1.0);
            let frame: Vec<f32> = mags[i0].iter().zip(&mags[i1]).map(|(x, y)| x * (1.0 - a) + y * a).collect();
            target.push(frame);
        }
        let len = n_out * hop;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut spec: Vec<Vec<Complex<f32>>> = target
            .iter()
            .map(|m| {
                m.iter()
                    .map(|&a| {
                        let ph = rng.random::<f32>() * 2.0 * std::f32::consts::PI;
                        Complex::new(a * ph.cos(), a * ph.sin())
                    })
                    .collect()
            })
            .collect();
        let mut signal = self.istft(&spec, hop, len);
        for _ in 0..iterations {
            let est = self.stft(&signal, hop, n_out);
            for ((s, e), m) in spec.iter_mut().zip(&est).zip(&target) {
                for ((sv, ev), &mv) in s.iter_mut().zip(e).zip(m) {
                    let n = ev.norm();
                    *sv = if n > 1e-12 { ev * (mv / n) } else { Complex::new(mv, 0.0) };
                }
            }
            signal = self.istft(&spec, hop, len);
        }
        debug_assert!(spec.iter().all(|s| s.len() == n_bins));
        signal
    }

    fn stft(&self, signal: &[f32], hop: usize, frames: usize) -> Vec<Vec<Complex<f32>>> {
        let n = self.cfg.n_fft;
        let mut buf = self.fwd.make_input_vec();
        let mut scratch = self.fwd.make_scratch_vec();
        (0..frames)
            .map(|t| {
                let start = (t * hop + hop / 2) as isize - (n / 2) as isize;
                for (i, b) in buf.iter_mut().enumerate() {
                    let s = start + i as isize;
                    *b = if s >= 0 && (s as usize) < signal.len() { signal[s as usize] * self.window[i] } else { 0.0 };
                }
                let mut out = self.fwd.make_output_vec();
                let _ = self.fwd.process_with_scratch(&mut buf, &mut out, &mut scratch);
                out
            })
            .collect()
    }

    /// Weighted overlap-add inverse STFT (least-squares, Griffin & Lim 1984).
    fn istft(&self, spec: &[Vec<Complex<f32>>], hop: usize, len: usize) -> Vec<f32> {
        let n = self.cfg.n_fft;
        let mut out = vec![0f32; len];
        let mut wsum = vec![0f32; len];
        let mut buf = self.inv.make_input_vec();
        let mut frame = self.inv.make_output_vec();
        let mut scratch = self.inv.make_scratch_vec();
        for (t, s) in spec.iter().enumerate() {
            buf.copy_from_slice(s);
            // A real signal's DC and Nyquist bins are real; realfft insists.
            buf[0].im = 0.0;
            if let Some(last) = buf.last_mut() {
                last.im = 0.0;
            }
            let _ = self.inv.process_with_scratch(&mut buf, &mut frame, &mut scratch);
            let start = (t * hop + hop / 2) as isize - (n / 2) as isize;
            for (i, (&f, &w)) in frame.iter().zip(&self.window).enumerate() {
                let p = start + i as isize;
                if p >= 0 && (p as usize) < len {
                    out[p as usize] += f / n as f32 * w;
                    wsum[p as usize] += w * w;
                }
            }
        }
        for (o, w) in out.iter_mut().zip(&wsum) {
            if *w > 1e-8 {
                *o /= w;
            }
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn default_is_25_hz_and_frame_count_follows_hops() {
        let cfg = MelConfig::default();
        assert_eq!(cfg.frame_rate(), 25.0);
        let fe = MelFrontend::new(&cfg).unwrap();
        let feats = fe.log_mel(&vec![0.0; 16_000]);
        assert_eq!(feats.len(), 25 * 80);
        assert_eq!(fe.log_mel(&[0.1; 10]).len(), 80);
        assert!(feats.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn tone_lands_in_the_right_band() {
        let cfg = MelConfig::default();
        let fe = MelFrontend::new(&cfg).unwrap();
        let tone: Vec<f32> =
            (0..16_000).map(|i| (2.0 * std::f32::consts::PI * 1000.0 * i as f32 / 16_000.0).sin()).collect();
        let feats = fe.log_mel(&tone);
        let frame = &feats[10 * 80..11 * 80];
        let argmax = frame.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|x| x.0).unwrap();
        let centre_hz = mel_to_hz(hz_to_mel(8000.0) * (argmax + 1) as f32 / 81.0);
        assert!((centre_hz - 1000.0).abs() < 80.0, "peak band centre {centre_hz} Hz");
    }

    #[test]
    fn griffin_lim_recovers_a_tone() {
        let cfg = MelConfig::default();
        let fe = MelFrontend::new(&cfg).unwrap();
        let tone: Vec<f32> =
            (0..16_000).map(|i| 0.5 * (2.0 * std::f32::consts::PI * 440.0 * i as f32 / 16_000.0).sin()).collect();
        let wav = fe.griffin_lim(&fe.log_mel(&tone), 16, 0);
        assert_eq!(wav.len(), 16_000);
        // Same dominant band after resynthesis.
        let a = fe.log_mel(&tone);
        let b = fe.log_mel(&wav);
        let peak = |f: &[f32]| f.iter().enumerate().max_by(|x, y| x.1.total_cmp(y.1)).map(|x| x.0).unwrap();
        assert_eq!(peak(&a[800..880]), peak(&b[800..880]));
        let rms = (wav.iter().map(|v| v * v).sum::<f32>() / wav.len() as f32).sqrt();
        assert!(rms > 0.1 && rms < 0.8, "rms {rms}");
    }
}
