//! k-means++ codebooks shared by the image VQ and the speech units: seeding, Lloyd or
//! mini-batch refinement, and fast nearest-codeword search.
//!
//! Determinism: every random choice comes from one ChaCha stream seeded by the caller, the
//! parallel parts (assignment, distance updates) are per-point and order-free, and every
//! floating-point reduction runs sequentially in index order, so a fit depends only on the
//! data and the seed, never on the thread count.

use indicatif::ProgressBar;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TokenizerError};

/// Points handled per rayon task; large enough to amortize scheduling, small enough to balance.
const PAR_CHUNK: usize = 512;

/// How to fit a codebook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KMeansConfig {
    /// Number of codewords.
    pub k: usize,
    /// Lloyd iterations (full batch), or the number of passes' worth of mini-batch steps.
    pub max_iter: usize,
    /// Above this many points, refine with mini-batches instead of full Lloyd passes.
    pub full_batch_limit: usize,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Mini-batch steps (used only above `full_batch_limit`).
    pub minibatch_steps: usize,
    /// k-means++ seeding runs on at most this many points (at least `4 * k` are used when available).
    pub init_sample: usize,
    /// Stop Lloyd early when the relative inertia improvement falls below this.
    pub tol: f64,
    /// Most point-to-codeword distance evaluations to spend refining; large codebooks get
    /// fewer Lloyd iterations (or mini-batch steps) so a fit stays in minutes on 2 cores.
    pub work_budget: u64,
    pub seed: u64,
}

impl KMeansConfig {
    pub fn new(k: usize, seed: u64) -> Self {
        KMeansConfig {
            k,
            max_iter: 25,
            full_batch_limit: 250_000,
            batch_size: 8192,
            minibatch_steps: 300,
            init_sample: 20_000,
            tol: 1e-4,
            work_budget: 3_000_000_000,
            seed,
        }
    }
}

/// What a fit did, for summaries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KMeansReport {
    pub points: usize,
    pub iterations: usize,
    pub minibatch: bool,
    /// Mean squared distance from each training point to its codeword.
    pub inertia: f64,
    /// Mean squared distance from each training point to the data mean (inertia of k = 1).
    pub total_variance: f64,
    /// Codewords that ended with no training point assigned.
    pub empty_codewords: usize,
}

/// `k` codewords of `dim` f32 values, row-major, with cached squared norms.
#[derive(Debug, Clone, PartialEq)]
pub struct Codebook {
    dim: usize,
    words: Vec<f32>,
    norms: Vec<f32>,
}

impl Codebook {
    pub fn new(dim: usize, words: Vec<f32>) -> Result<Self> {
        if dim == 0 || words.is_empty() || !words.len().is_multiple_of(dim) {
            return Err(TokenizerError::config(
                "codebook",
                format!("{} values do not make rows of dimension {dim}", words.len()),
            ));
        }
        if words.iter().any(|v| !v.is_finite()) {
            return Err(TokenizerError::config("codebook", "non-finite codeword value"));
        }
        let norms = words.chunks_exact(dim).map(|w| dot(w, w)).collect();
        Ok(Codebook { dim, words, norms })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn len(&self) -> usize {
        self.norms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.norms.is_empty()
    }

    pub fn words(&self) -> &[f32] {
        &self.words
    }

    pub fn word(&self, id: usize) -> Option<&[f32]> {
        self.words.get(id * self.dim..(id + 1) * self.dim)
    }

    /// Nearest codeword to `x` and the squared distance to it.
    pub fn nearest(&self, x: &[f32]) -> (u32, f32) {
        let mut best = 0usize;
        let mut best_score = f32::INFINITY;
        // ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is constant over c.
        for (j, (w, n)) in self.words.chunks_exact(self.dim).zip(&self.norms).enumerate() {
            let score = n - 2.0 * dot(x, w);
            if score < best_score {
                best_score = score;
                best = j;
            }
        }
        let d = (dot(x, x) + best_score).max(0.0);
        (best as u32, d)
    }

    /// Assigns every row of `data` in parallel; returns ids and squared distances.
    pub fn assign(&self, data: &[f32]) -> (Vec<u32>, Vec<f32>) {
        let n = data.len() / self.dim;
        let mut ids = vec![0u32; n];
        let mut dists = vec![0f32; n];
        ids.par_chunks_mut(PAR_CHUNK)
            .zip(dists.par_chunks_mut(PAR_CHUNK))
            .zip(data.par_chunks(PAR_CHUNK * self.dim))
            .for_each(|((ids, dists), rows)| {
                for ((id, d), x) in ids.iter_mut().zip(dists.iter_mut()).zip(rows.chunks_exact(self.dim)) {
                    let (i, dd) = self.nearest(x);
                    *id = i;
                    *d = dd;
                }
            });
        (ids, dists)
    }

    /// Assigns rows without parallelism (for callers already running inside a parallel loop).
    pub fn assign_serial(&self, data: &[f32]) -> Vec<u32> {
        data.chunks_exact(self.dim).map(|x| self.nearest(x).0).collect()
    }
}

/// Dot product written in 8 independent lanes so the compiler vectorizes it.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s
}

#[inline]
fn sq_dist(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            let d = x[l] - y[l];
            acc[l] += d * d;
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += (x - y) * (x - y);
    }
    s
}

/// Fits a codebook to the rows of `data` (n × dim, row-major) by k-means++ seeding and
/// Lloyd (small data) or mini-batch (large data) refinement. `what` names the fit in errors.
pub fn fit(
    data: &[f32],
    dim: usize,
    cfg: &KMeansConfig,
    what: &'static str,
    progress: &ProgressBar,
) -> Result<(Codebook, KMeansReport)> {
    if dim == 0 || !data.len().is_multiple_of(dim) {
        return Err(TokenizerError::config("k-means input", format!("{} values, dimension {dim}", data.len())));
    }
    let n = data.len() / dim;
    if cfg.k < 2 {
        return Err(TokenizerError::config("codebook size", format!("{} (need at least 2)", cfg.k)));
    }
    if n < cfg.k {
        return Err(TokenizerError::NoData {
            what,
            msg: format!("{n} training vectors for {} codewords; give more data or a smaller codebook", cfg.k),
        });
    }
    if data.iter().any(|v| !v.is_finite()) {
        return Err(TokenizerError::NoData { what, msg: "training vectors contain NaN or infinity".into() });
    }
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);

    // Seeding sample: a seeded random subset, in index order.
    let want = cfg.init_sample.max(4 * cfg.k).min(n);
    let sample_idx: Vec<usize> = if want == n {
        (0..n).collect()
    } else {
        let mut idx = rand::seq::index::sample(&mut rng, n, want).into_vec();
        idx.sort_unstable();
        idx
    };
    let mut sample = Vec::with_capacity(want * dim);
    for &i in &sample_idx {
        sample.extend_from_slice(&data[i * dim..(i + 1) * dim]);
    }
    progress.set_message(format!("{what}: k-means++ seeding"));
    let mut words = kmeans_pp(&sample, dim, cfg.k, &mut rng);
    drop(sample);

    let minibatch = n > cfg.full_batch_limit;
    let per_step = (if minibatch { cfg.batch_size.clamp(1, n) } else { n } as u64) * cfg.k as u64;
    let affordable = (cfg.work_budget / per_step.max(1)).max(3) as usize;
    let steps = if minibatch { cfg.minibatch_steps } else { cfg.max_iter }.min(affordable);
    progress.set_length(steps as u64);
    progress.set_position(0);
    progress.set_message(format!("{what}: {} k-means", if minibatch { "mini-batch" } else { "Lloyd" }));

    let mut iterations = 0;
    if minibatch {
        let b = cfg.batch_size.clamp(1, n);
        let mut counts = vec![0u64; cfg.k];
        let mut batch = vec![0f32; b * dim];
        for _ in 0..steps {
            let book = Codebook::new(dim, words.clone())?;
            for r in 0..b {
                let i = rng.random_range(0..n);
                batch[r * dim..(r + 1) * dim].copy_from_slice(&data[i * dim..(i + 1) * dim]);
            }
            let (ids, _) = book.assign(&batch);
            // Sculley's per-centre learning rate 1/count, applied in batch order.
            for (x, &c) in batch.chunks_exact(dim).zip(&ids) {
                let c = c as usize;
                counts[c] += 1;
                let lr = 1.0 / counts[c] as f32;
                for (w, v) in words[c * dim..(c + 1) * dim].iter_mut().zip(x) {
                    *w += lr * (v - *w);
                }
            }
            iterations += 1;
            progress.inc(1);
        }
    } else {
        let mut prev = f64::INFINITY;
        for _ in 0..steps {
            let book = Codebook::new(dim, words.clone())?;
            let (ids, dists) = book.assign(data);
            let inertia = dists.iter().map(|&d| d as f64).sum::<f64>() / n as f64;
            let mut sums = vec![0f64; cfg.k * dim];
            let mut counts = vec![0u64; cfg.k];
            for (x, &c) in data.chunks_exact(dim).zip(&ids) {
                let c = c as usize;
                counts[c] += 1;
                for (s, v) in sums[c * dim..(c + 1) * dim].iter_mut().zip(x) {
                    *s += *v as f64;
                }
            }
            for c in 0..cfg.k {
                if counts[c] > 0 {
                    for (w, s) in words[c * dim..(c + 1) * dim].iter_mut().zip(&sums[c * dim..(c + 1) * dim]) {
                        *w = (*s / counts[c] as f64) as f32;
                    }
                } else {
                    // An empty codeword restarts on the point worst served by the current book.
                    let (far, _) = dists
                        .iter()
                        .enumerate()
                        .fold((0usize, f32::NEG_INFINITY), |acc, (i, &d)| if d > acc.1 { (i, d) } else { acc });
                    words[c * dim..(c + 1) * dim].copy_from_slice(&data[far * dim..(far + 1) * dim]);
                }
            }
            iterations += 1;
            progress.inc(1);
            if prev.is_finite() && (prev - inertia) <= cfg.tol * prev.max(f64::MIN_POSITIVE) {
                break;
            }
            prev = inertia;
        }
    }

    let book = Codebook::new(dim, words)?;
    let (ids, dists) = book.assign(data);
    let inertia = dists.iter().map(|&d| d as f64).sum::<f64>() / n as f64;
    let mut used = vec![false; cfg.k];
    for &i in &ids {
        used[i as usize] = true;
    }
    let empty_codewords = used.iter().filter(|u| !**u).count();
    let total_variance = variance(data, dim);
    Ok((book, KMeansReport { points: n, iterations, minibatch, inertia, total_variance, empty_codewords }))
}

/// Mean squared distance to the mean (sequential, f64, for determinism).
fn variance(data: &[f32], dim: usize) -> f64 {
    let n = data.len() / dim;
    if n == 0 {
        return 0.0;
    }
    let mut mean = vec![0f64; dim];
    for x in data.chunks_exact(dim) {
        for (m, v) in mean.iter_mut().zip(x) {
            *m += *v as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    let mut s = 0f64;
    for x in data.chunks_exact(dim) {
        for (m, v) in mean.iter().zip(x) {
            let d = *v as f64 - m;
            s += d * d;
        }
    }
    s / n as f64
}

/// k-means++ seeding (Arthur & Vassilvitskii 2007) on `sample` (m × dim).
fn kmeans_pp(sample: &[f32], dim: usize, k: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let m = sample.len() / dim;
    let mut words = Vec::with_capacity(k * dim);
    let first = rng.random_range(0..m);
    words.extend_from_slice(&sample[first * dim..(first + 1) * dim]);
    let mut d2: Vec<f32> = vec![f32::INFINITY; m];
    let mut last = first;
    for _ in 1..k {
        let c = &sample[last * dim..(last + 1) * dim];
        d2.par_chunks_mut(PAR_CHUNK).zip(sample.par_chunks(PAR_CHUNK * dim)).for_each(|(d2, rows)| {
            for (d, x) in d2.iter_mut().zip(rows.chunks_exact(dim)) {
                let nd = sq_dist(x, c);
                if nd < *d {
                    *d = nd;
                }
            }
        });
        let total: f64 = d2.iter().map(|&d| d as f64).sum();
        let next = if total > 0.0 {
            let target = rng.random::<f64>() * total;
            let mut acc = 0f64;
            let mut pick = m - 1;
            for (i, &d) in d2.iter().enumerate() {
                acc += d as f64;
                if acc > target {
                    pick = i;
                    break;
                }
            }
            pick
        } else {
            // Fewer distinct points than codewords: duplicates are harmless, just unused.
            rng.random_range(0..m)
        };
        words.extend_from_slice(&sample[next * dim..(next + 1) * dim]);
        last = next;
    }
    words
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn blobs(seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let centres = [[0.0f32, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]];
        let mut v = Vec::new();
        for i in 0..2000 {
            let c = centres[i % 4];
            v.push(c[0] + rng.random::<f32>() - 0.5);
            v.push(c[1] + rng.random::<f32>() - 0.5);
        }
        v
    }

    #[test]
    fn finds_four_blobs_and_is_deterministic() {
        let data = blobs(1);
        let cfg = KMeansConfig::new(4, 7);
        let pb = ProgressBar::hidden();
        let (a, ra) = fit(&data, 2, &cfg, "test", &pb).unwrap();
        let (b, _) = fit(&data, 2, &cfg, "test", &pb).unwrap();
        assert_eq!(a, b);
        assert!(ra.inertia < 0.2, "inertia {}", ra.inertia);
        assert!(ra.total_variance > 40.0);
        let (id0, _) = a.nearest(&[0.1, 0.1]);
        let (id1, _) = a.nearest(&[9.9, 9.9]);
        assert_ne!(id0, id1);
    }

    #[test]
    fn minibatch_path_converges() {
        let data = blobs(2);
        let mut cfg = KMeansConfig::new(4, 3);
        cfg.full_batch_limit = 100;
        cfg.batch_size = 256;
        cfg.minibatch_steps = 50;
        let (_, r) = fit(&data, 2, &cfg, "test", &ProgressBar::hidden()).unwrap();
        assert!(r.minibatch);
        assert!(r.inertia < 0.5, "inertia {}", r.inertia);
    }

    #[test]
    fn too_few_points_is_an_error() {
        let data = vec![0.0f32; 6];
        let e = fit(&data, 2, &KMeansConfig::new(4, 0), "test", &ProgressBar::hidden()).unwrap_err();
        assert!(matches!(e, TokenizerError::NoData { .. }));
    }

    #[test]
    fn dot_matches_naive() {
        let a: Vec<f32> = (0..19).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..19).map(|i| 1.0 - i as f32).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-3);
        assert!((sq_dist(&a, &b) - a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>()).abs() < 1e-2);
    }
}
