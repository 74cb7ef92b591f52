//! Convolution and pooling for the CNN path of the tape, channels-last (`[N, H, W, C]`). Conv2d is
//! im2col + matmul: `cols[(n, oy, ox), (ky, kx, c)] = x[n, oy*s - p + ky, ox*s - p + kx, c]` (0 out
//! of the image), then `cols @ W[(ky, kx, c), oc]` is the `[N, OH, OW, OC]` output directly.
//! col2im is its adjoint, written as a gather (each input element sums the columns that read it,
//! in a fixed order) so the GPU needs no atomics. Pooling windows are `k x k` with stride `k`.
//! `transpose` turns `[N, R, C]` into `[N, C, R]` (channels-last to `[N, C, H*W]` for attention
//! transfer). CPU references here; WGSL in `shaders/conv.wgsl`.

use crate::error::{Error, Result};

/// A 2-D convolution's geometry (square kernel, same stride and padding on both axes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvSpec {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ConvSpec {
    pub fn out_hw(&self) -> (usize, usize) {
        (
            (self.h + 2 * self.pad - self.k) / self.stride + 1,
            (self.w + 2 * self.pad - self.k) / self.stride + 1,
        )
    }

    /// `[N * OH * OW, K * K * C]`.
    pub fn cols_shape(&self) -> (usize, usize) {
        let (oh, ow) = self.out_hw();
        (self.n * oh * ow, self.k * self.k * self.c)
    }

    pub fn input_len(&self) -> usize {
        self.n * self.h * self.w * self.c
    }

    pub fn validate(&self) -> Result<()> {
        if self.n == 0
            || self.h == 0
            || self.w == 0
            || self.c == 0
            || self.k == 0
            || self.stride == 0
        {
            return Err(Error::Unsupported(format!(
                "convolution {self:?}: sizes, kernel and stride must be >= 1"
            )));
        }
        if self.k > self.h + 2 * self.pad || self.k > self.w + 2 * self.pad {
            return Err(Error::Unsupported(format!(
                "a {k}x{k} kernel does not fit a {}x{} image padded by {}",
                self.h,
                self.w,
                self.pad,
                k = self.k
            )));
        }
        let (r, c) = self.cols_shape();
        if r.checked_mul(c).is_none_or(|v| v > u32::MAX as usize) {
            return Err(Error::Limit(
                "im2col buffer over 2^32 elements: use a smaller batch".into(),
            ));
        }
        Ok(())
    }
}

/// `k x k` pooling with stride `k` over `[N, H, W, C]` (H and W multiples of k are not required:
/// the last partial window is dropped, as PyTorch's default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolSpec {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub k: usize,
    /// Max pooling, else average pooling.
    pub max: bool,
}

impl PoolSpec {
    pub fn out_hw(&self) -> (usize, usize) {
        (self.h / self.k, self.w / self.k)
    }

    pub fn input_len(&self) -> usize {
        self.n * self.h * self.w * self.c
    }

    pub fn output_len(&self) -> usize {
        let (oh, ow) = self.out_hw();
        self.n * oh * ow * self.c
    }

    pub fn validate(&self) -> Result<()> {
        if self.n == 0 || self.c == 0 || self.k == 0 || self.h < self.k || self.w < self.k {
            return Err(Error::Unsupported(format!(
                "pooling {self:?}: needs a k x k window inside the image, k >= 1"
            )));
        }
        Ok(())
    }
}

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

pub fn im2col_reference(s: &ConvSpec, x: &[f64]) -> Vec<f64> {
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
pub fn col2im_reference(s: &ConvSpec, dcols: &[f64]) -> Vec<f64> {
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
pub fn pool_reference(s: &PoolSpec, x: &[f64]) -> Vec<f64> {
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
pub fn pool_backward_reference(s: &PoolSpec, x: &[f64], dy: &[f64]) -> Vec<f64> {
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
pub fn transpose_reference(x: &[f64], batch: usize, rows: usize, cols: usize) -> Vec<f64> {
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
