//! The f64 CPU references of [`super`]'s primitives and of the two losses composed from them.

use crate::ops::feature::reference::smooth_l1;

/// The norm floor of `F.normalize`.
pub const NORM_EPS: f64 = 1e-12;
/// The squared-distance floor of the RKD reference implementation's `pdist` (before the sqrt).
pub const DIST_EPS: f64 = 1e-12;

/// `y = x / max(||x_row||, 1e-12)` per row of `[rows, cols]`.
pub fn row_normalize(x: &[f64], cols: usize) -> Vec<f64> {
    x.chunks(cols)
        .flat_map(|r| {
            let n = r.iter().map(|v| v * v).sum::<f64>().sqrt().max(NORM_EPS);
            r.iter().map(move |v| v / n)
        })
        .collect()
}

/// `dx = (dy - y (y . dy)) / ||x||` per row (`dy / 1e-12` where the norm was floored).
pub fn row_normalize_backward(x: &[f64], dy: &[f64], cols: usize) -> Vec<f64> {
    let mut dx = Vec::with_capacity(x.len());
    for (r, d) in x.chunks(cols).zip(dy.chunks(cols)) {
        let n = r.iter().map(|v| v * v).sum::<f64>().sqrt();
        if n > NORM_EPS {
            let dot: f64 = r.iter().zip(d).map(|(a, b)| a / n * b).sum();
            dx.extend(r.iter().zip(d).map(|(a, b)| (b - a / n * dot) / n));
        } else {
            dx.extend(d.iter().map(|b| b / NORM_EPS));
        }
    }
    dx
}

/// `D[i, j] = sqrt(max(||f_i - f_j||^2, 1e-12))` for `i != j`, `D[i, i] = 0`; `f` is `[n, dim]`.
pub fn pairwise_distance(f: &[f64], n: usize, dim: usize) -> Vec<f64> {
    let mut d = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            if i != j {
                let s: f64 = (0..dim)
                    .map(|k| (f[i * dim + k] - f[j * dim + k]).powi(2))
                    .sum();
                d[i * n + j] = s.max(DIST_EPS).sqrt();
            }
        }
    }
    d
}

/// `dF_i = sum_{j != i} (dD_ij + dD_ji) (f_i - f_j) / D_ij` (0 where the distance was floored).
pub fn pairwise_distance_backward(
    f: &[f64],
    d: &[f64],
    dd: &[f64],
    n: usize,
    dim: usize,
) -> Vec<f64> {
    let mut df = vec![0.0; n * dim];
    for i in 0..n {
        for j in 0..n {
            let dij = d[i * n + j];
            if i == j || dij * dij <= DIST_EPS {
                continue;
            }
            let g = (dd[i * n + j] + dd[j * n + i]) / dij;
            for k in 0..dim {
                df[i * dim + k] += g * (f[i * dim + k] - f[j * dim + k]);
            }
        }
    }
    df
}

/// `y = D / m`, `m` the mean of the off-diagonal entries of the `[n, n]` matrix `D` (n >= 2).
pub fn offdiag_normalize(d: &[f64], n: usize) -> Vec<f64> {
    let m = offdiag_mean(d, n);
    d.iter().map(|v| v / m).collect()
}

fn offdiag_mean(d: &[f64], n: usize) -> f64 {
    let s: f64 = (0..n * n).filter(|k| k / n != k % n).map(|k| d[k]).sum();
    s / (n * (n - 1)) as f64
}

/// `dD = dy / m - [off-diagonal] (dy . D) / (m^2 n (n - 1))`.
pub fn offdiag_normalize_backward(d: &[f64], dy: &[f64], n: usize) -> Vec<f64> {
    let m = offdiag_mean(d, n);
    let dot: f64 = d.iter().zip(dy).map(|(a, b)| a * b).sum();
    let c = dot / (m * m * (n * (n - 1)) as f64);
    (0..n * n)
        .map(|k| dy[k] / m - if k / n != k % n { c } else { 0.0 })
        .collect()
}

/// `a [m, k] @ a^T`.
fn gram(f: &[f64], n: usize, dim: usize) -> Vec<f64> {
    let mut g = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            g[i * n + j] = (0..dim).map(|k| f[i * dim + k] * f[j * dim + k]).sum();
        }
    }
    g
}

/// `dF = (dG + dG^T) F` for `G = F F^T`.
fn gram_backward(f: &[f64], dg: &[f64], n: usize, dim: usize) -> Vec<f64> {
    let mut df = vec![0.0; n * dim];
    for i in 0..n {
        for j in 0..n {
            let g = dg[i * n + j] + dg[j * n + i];
            for k in 0..dim {
                df[i * dim + k] += g * f[j * dim + k];
            }
        }
    }
    df
}

/// Similarity-preserving loss of `[n, ds]` and `[n, dt]` features: `(loss, dL/dfs, dL/dft)`.
pub fn similarity_preserving(fs: &[f64], ft: &[f64], n: usize) -> (f64, Vec<f64>, Vec<f64>) {
    let (ds, dt) = (fs.len() / n, ft.len() / n);
    let (gs, gt) = (gram(fs, n, ds), gram(ft, n, dt));
    let (ns, nt) = (row_normalize(&gs, n), row_normalize(&gt, n));
    let m = (n * n) as f64;
    let loss = ns
        .iter()
        .zip(&nt)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f64>()
        / m;
    let dns: Vec<f64> = ns.iter().zip(&nt).map(|(a, b)| 2.0 * (a - b) / m).collect();
    let dnt: Vec<f64> = dns.iter().map(|v| -v).collect();
    let dgs = row_normalize_backward(&gs, &dns, n);
    let dgt = row_normalize_backward(&gt, &dnt, n);
    (
        loss,
        gram_backward(fs, &dgs, n, ds),
        gram_backward(ft, &dgt, n, dt),
    )
}

/// RKD distance loss of `[n, ds]` and `[n, dt]` features (n >= 2): `(loss, dL/dfs, dL/dft)`.
pub fn rkd_distance(fs: &[f64], ft: &[f64], n: usize) -> (f64, Vec<f64>, Vec<f64>) {
    let (ds, dt) = (fs.len() / n, ft.len() / n);
    let (ps, pt) = (pairwise_distance(fs, n, ds), pairwise_distance(ft, n, dt));
    let (ys, yt) = (offdiag_normalize(&ps, n), offdiag_normalize(&pt, n));
    let (loss, dys, dyt) = smooth_l1(&ys, &yt, 1.0);
    let dps = offdiag_normalize_backward(&ps, &dys, n);
    let dpt = offdiag_normalize_backward(&pt, &dyt, n);
    (
        loss,
        pairwise_distance_backward(fs, &ps, &dps, n, ds),
        pairwise_distance_backward(ft, &pt, &dpt, n, dt),
    )
}
