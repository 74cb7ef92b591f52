//! Convolution ops on channels-last `[N, H, W, C]` values: im2col, conv2d, pooling and the
//! transpose to channels-first.

use super::{Tape, Var};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::ops::conv::{ConvSpec, PoolSpec};

impl<'a, B: Backend + 'a> Tape<'a, B> {
    /// im2col of a channels-last `[N, H, W, C]` value: `[N*OH*OW, K*K*C]`, row `(n, oy, ox)`
    /// holding the `K x K x C` patch under output pixel `(oy, ox)`; backward: col2im, each input
    /// element gathering the patch entries it was copied to.
    pub fn im2col(&self, x: Var, spec: ConvSpec) -> Result<Var> {
        self.owns(&[x])?;
        spec.validate()?;
        let (r, c) = spec.cols_shape();
        self.unary(
            x,
            &[r, c],
            |b, x, cols| b.im2col(&spec, x, cols),
            move |b, _, _, dy, dx| b.col2im(&spec, dy, dx),
        )
    }

    /// 2-D convolution of `x` `[N, H, W, C]` with `w` `[K*K*C, OC]` and bias `b` `[OC]`:
    /// `[N, OH, OW, OC]`, as im2col, matmul and bias add on the tape.
    pub fn conv2d(
        &self,
        x: Var,
        w: Var,
        b: Var,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Result<Var> {
        self.owns(&[x, w, b])?;
        let xs = self.val(x).shape;
        let [n, h, wd, c] = xs[..] else {
            return Err(Error::Unsupported(format!(
                "conv2d takes [N, H, W, C] input, got {xs:?}"
            )));
        };
        let spec = ConvSpec {
            n,
            h,
            w: wd,
            c,
            k,
            stride,
            pad,
        };
        spec.validate()?;
        let (oh, ow) = spec.out_hw();
        let cols = self.im2col(x, spec)?;
        let y = self.matmul(cols, w)?;
        let y = self.bias_add(y, b)?;
        let oc = self.val(y).shape[1];
        self.reshape(y, &[n, oh, ow, oc])
    }

    /// `k x k` max or average pooling with stride `k` of a `[N, H, W, C]` value: `[N, H/k, W/k,
    /// C]` (a last partial window dropped); backward: each window's `dy` to its first maximum
    /// (max) or `dy / k^2` to each of its elements (average).
    pub fn pool(&self, x: Var, k: usize, max: bool) -> Result<Var> {
        self.owns(&[x])?;
        let xs = self.val(x).shape;
        let [n, h, w, c] = xs[..] else {
            return Err(Error::Unsupported(format!(
                "pooling takes [N, H, W, C] input, got {xs:?}"
            )));
        };
        let spec = PoolSpec { n, h, w, c, k, max };
        spec.validate()?;
        let (oh, ow) = spec.out_hw();
        self.unary(
            x,
            &[n, oh, ow, c],
            |b, x, y| b.pool(&spec, x, y),
            move |b, x, _, dy, dx| b.pool_backward(&spec, x, dy, dx),
        )
    }

    /// Channels-last `[N, H, W, C]` to `[N, C, H, W]` (for attention transfer), a transpose of
    /// each example's `[H*W, C]`; backward: the transpose back.
    pub fn to_channels_first(&self, x: Var) -> Result<Var> {
        self.owns(&[x])?;
        let xs = self.val(x).shape;
        let [n, h, w, c] = xs[..] else {
            return Err(Error::Unsupported(format!(
                "to_channels_first takes [N, H, W, C], got {xs:?}"
            )));
        };
        self.unary(
            x,
            &[n, c, h, w],
            |b, x, y| b.transpose(n, h * w, c, x, y),
            move |b, _, _, dy, dx| b.transpose(n, c, h * w, dy, dx),
        )
    }
}
