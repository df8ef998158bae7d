//! PCA for latent image patches: covariance in f64 and a cyclic Jacobi eigensolver.
//!
//! Patch dimensions are small (p²·3, 48 for 4×4 patches, capped at 768), so an exact dense
//! solver is both simpler and more predictable than pulling in a linear-algebra crate.

use rayon::prelude::*;

/// Rows per partial covariance; partials are summed in order, so the result is deterministic.
const COV_CHUNK: usize = 8192;

/// A fitted projection: `z = components · (x - mean)`, inverse `x ≈ mean + componentsᵀ · z`.
#[derive(Debug, Clone, PartialEq)]
pub struct Pca {
    pub input_dim: usize,
    pub output_dim: usize,
    pub mean: Vec<f32>,
    /// `output_dim × input_dim`, rows are unit eigenvectors by decreasing variance.
    pub components: Vec<f32>,
    /// Fraction of the total variance the kept components explain.
    pub explained: f64,
}

impl Pca {
    /// Fits on the rows of `data` (n × dim), keeping `k` components.
    pub fn fit(data: &[f32], dim: usize, k: usize) -> Pca {
        let n = (data.len() / dim).max(1);
        let mut mean = vec![0f64; dim];
        for x in data.chunks_exact(dim) {
            for (m, v) in mean.iter_mut().zip(x) {
                *m += *v as f64;
            }
        }
        mean.iter_mut().for_each(|m| *m /= n as f64);
        let partials: Vec<Vec<f64>> = data
            .par_chunks(COV_CHUNK * dim)
            .map(|rows| {
                let mut c = vec![0f64; dim * dim];
                let mut centred = vec![0f64; dim];
                for x in rows.chunks_exact(dim) {
                    for ((c, v), m) in centred.iter_mut().zip(x).zip(&mean) {
                        *c = *v as f64 - m;
                    }
                    for i in 0..dim {
                        let ci = centred[i];
                        let row = &mut c[i * dim..i * dim + i + 1];
                        for (j, r) in row.iter_mut().enumerate() {
                            *r += ci * centred[j];
                        }
                    }
                }
                c
            })
            .collect();
        let mut cov = vec![0f64; dim * dim];
        for p in &partials {
            for (c, v) in cov.iter_mut().zip(p) {
                *c += v;
            }
        }
        for i in 0..dim {
            for j in 0..=i {
                let v = cov[i * dim + j] / n as f64;
                cov[i * dim + j] = v;
                cov[j * dim + i] = v;
            }
        }
        let (vals, vecs) = jacobi_eigen(cov, dim);
        let mut order: Vec<usize> = (0..dim).collect();
        order.sort_by(|&a, &b| vals[b].total_cmp(&vals[a]).then(a.cmp(&b)));
        let total: f64 = vals.iter().map(|v| v.max(0.0)).sum();
        let k = k.clamp(1, dim);
        let mut components = Vec::with_capacity(k * dim);
        let mut kept = 0f64;
        for &o in order.iter().take(k) {
            kept += vals[o].max(0.0);
            // Column o of the eigenvector matrix; fix the sign so results are reproducible.
            let mut v: Vec<f64> = (0..dim).map(|r| vecs[r * dim + o]).collect();
            let pivot = v.iter().copied().fold(0f64, |a, b| if b.abs() > a.abs() { b } else { a });
            if pivot < 0.0 {
                v.iter_mut().for_each(|x| *x = -*x);
            }
            components.extend(v.iter().map(|&x| x as f32));
        }
        Pca {
            input_dim: dim,
            output_dim: k,
            mean: mean.iter().map(|&m| m as f32).collect(),
            components,
            explained: if total > 0.0 { kept / total } else { 1.0 },
        }
    }

    /// Projects one vector.
    pub fn project(&self, x: &[f32], out: &mut Vec<f32>) {
        let centred: Vec<f32> = x.iter().zip(&self.mean).map(|(v, m)| v - m).collect();
        for row in self.components.chunks_exact(self.input_dim) {
            out.push(crate::kmeans::dot(row, &centred));
        }
    }

    /// Maps one projected vector back.
    pub fn inverse(&self, z: &[f32], out: &mut Vec<f32>) {
        let start = out.len();
        out.extend_from_slice(&self.mean);
        let x = &mut out[start..];
        for (zi, row) in z.iter().zip(self.components.chunks_exact(self.input_dim)) {
            for (xv, r) in x.iter_mut().zip(row) {
                *xv += zi * r;
            }
        }
    }
}

/// Eigen-decomposition of a symmetric matrix by cyclic Jacobi rotations.
/// Returns eigenvalues and the row-major matrix whose columns are the eigenvectors.
fn jacobi_eigen(mut a: Vec<f64>, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut v = vec![0f64; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    let scale: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt().max(f64::MIN_POSITIVE);
    for _sweep in 0..100 {
        let mut off = 0f64;
        for p in 0..n {
            for q in p + 1..n {
                off += a[p * n + q] * a[p * n + q];
            }
        }
        if off.sqrt() <= 1e-12 * scale {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq.abs() <= 1e-300 {
                    continue;
                }
                let app = a[p * n + p];
                let aqq = a[q * n + q];
                let theta = (aqq - app) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let akp = a[k * n + p];
                    let akq = a[k * n + q];
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let apk = a[p * n + k];
                    let aqk = a[q * n + k];
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let vkp = v[k * n + p];
                    let vkq = v[k * n + q];
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    let vals = (0..n).map(|i| a[i * n + i]).collect();
    (vals, v)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn jacobi_diagonalizes() {
        let a = vec![4.0, 1.0, 0.5, 1.0, 3.0, 0.2, 0.5, 0.2, 1.0];
        let (vals, v) = jacobi_eigen(a.clone(), 3);
        for j in 0..3 {
            for i in 0..3 {
                let av: f64 = (0..3).map(|k| a[i * 3 + k] * v[k * 3 + j]).sum();
                assert!((av - vals[j] * v[i * 3 + j]).abs() < 1e-9);
            }
        }
    }

    #[test]
    fn full_rank_pca_inverts_exactly_and_low_rank_keeps_the_big_axis() {
        // Points along (1, 2, 0) with small noise on the other axes.
        let mut data = Vec::new();
        for i in 0..200 {
            let t = i as f32 / 10.0 - 10.0;
            data.extend_from_slice(&[t + 0.01 * ((i * 7) % 5) as f32, 2.0 * t, 0.02 * ((i * 3) % 4) as f32]);
        }
        let full = Pca::fit(&data, 3, 3);
        let (mut z, mut back) = (Vec::new(), Vec::new());
        full.project(&data[..3], &mut z);
        full.inverse(&z, &mut back);
        for (a, b) in back.iter().zip(&data[..3]) {
            assert!((a - b).abs() < 1e-4);
        }
        let one = Pca::fit(&data, 3, 1);
        assert!(one.explained > 0.99, "{}", one.explained);
        let c = &one.components;
        assert!((c[1] / c[0] - 2.0).abs() < 0.01, "{c:?}");
    }
}
