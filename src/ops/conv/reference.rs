//! The f64 CPU references of [`super`]'s ops, written to be read.

use super::{ConvSpec, PoolSpec};

fn in_index(s: &ConvSpec, n: usize, y: usize, x: usize, c: usize) -> usize {
    ((n * s.h + y) * s.w + x) * s.c + c
}

/// The input pixel a column entry reads, or `None` in the padding.
fn source(s: &ConvSpec, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<(usize, usize)> {
    let y = (oy * s.stride + ky) as isize - s.pad as isize;
    let x = (ox * s.stride + kx) as isize - s.pad as isize;
    (y >= 0 && x >= 0 && (y as usize) < s.h && (x as usize) < s.w)
        .then_some((y as usize, x as usize))
}

pub fn im2col(s: &ConvSpec, x: &[f64]) -> Vec<f64> {
    let (oh, ow) = s.out_hw();
    let (_, cols) = s.cols_shape();
    let mut out = vec![0.0; s.n * oh * ow * cols];
    for n in 0..s.n {
        for oy in 0..oh {
            for ox in 0..ow {
                let row = (n * oh + oy) * ow + ox;
                for ky in 0..s.k {
                    for kx in 0..s.k {
                        if let Some((y, xx)) = source(s, oy, ox, ky, kx) {
                            for c in 0..s.c {
                                out[row * cols + (ky * s.k + kx) * s.c + c] =
                                    x[in_index(s, n, y, xx, c)];
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// The adjoint of im2col: `dx[p] = sum of dcols entries that read p`.
pub fn col2im(s: &ConvSpec, dcols: &[f64]) -> Vec<f64> {
    let (oh, ow) = s.out_hw();
    let (_, cols) = s.cols_shape();
    let mut dx = vec![0.0; s.input_len()];
    for n in 0..s.n {
        for oy in 0..oh {
            for ox in 0..ow {
                let row = (n * oh + oy) * ow + ox;
                for ky in 0..s.k {
                    for kx in 0..s.k {
                        if let Some((y, xx)) = source(s, oy, ox, ky, kx) {
                            for c in 0..s.c {
                                dx[in_index(s, n, y, xx, c)] +=
                                    dcols[row * cols + (ky * s.k + kx) * s.c + c];
                            }
                        }
                    }
                }
            }
        }
    }
    dx
}

/// Pooling forward.
pub fn pool(s: &PoolSpec, x: &[f64]) -> Vec<f64> {
    let (oh, ow) = s.out_hw();
    let mut y = vec![0.0; s.output_len()];
    for n in 0..s.n {
        for oy in 0..oh {
            for ox in 0..ow {
                for c in 0..s.c {
                    let vals = (0..s.k * s.k).map(|t| {
                        x[((n * s.h + oy * s.k + t / s.k) * s.w + ox * s.k + t % s.k) * s.c + c]
                    });
                    y[((n * oh + oy) * ow + ox) * s.c + c] = if s.max {
                        vals.fold(f64::NEG_INFINITY, f64::max)
                    } else {
                        vals.sum::<f64>() / (s.k * s.k) as f64
                    };
                }
            }
        }
    }
    y
}

/// Pooling backward: max pooling routes each window's gradient to its first maximum (row-major
/// order in the window), average pooling spreads it evenly.
pub fn pool_backward(s: &PoolSpec, x: &[f64], dy: &[f64]) -> Vec<f64> {
    let (oh, ow) = s.out_hw();
    let mut dx = vec![0.0; s.input_len()];
    for n in 0..s.n {
        for oy in 0..oh {
            for ox in 0..ow {
                for c in 0..s.c {
                    let g = dy[((n * oh + oy) * ow + ox) * s.c + c];
                    let at = |t: usize| {
                        ((n * s.h + oy * s.k + t / s.k) * s.w + ox * s.k + t % s.k) * s.c + c
                    };
                    if s.max {
                        let best =
                            (0..s.k * s.k).fold(0, |b, t| if x[at(t)] > x[at(b)] { t } else { b });
                        dx[at(best)] += g;
                    } else {
                        for t in 0..s.k * s.k {
                            dx[at(t)] += g / (s.k * s.k) as f64;
                        }
                    }
                }
            }
        }
    }
    dx
}

/// `y[b, j, i] = x[b, i, j]` for `batch` matrices `[rows, cols]`.
pub fn transpose(x: &[f64], batch: usize, rows: usize, cols: usize) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    for b in 0..batch {
        for i in 0..rows {
            for j in 0..cols {
                y[(b * cols + j) * rows + i] = x[(b * rows + i) * cols + j];
            }
        }
    }
    y
}
