//! Convolution ops on channels-last `[N, H, W, C]` values: im2col, conv2d, pooling and the
//! transpose to channels-first.

use super::{Tape, Tensor, Var};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::ops::conv::{ConvSpec, PoolSpec};

impl<'a, B: Backend + 'a> Tape<'a, B> {
    /// im2col of a channels-last `[N, H, W, C]` value: `[N*OH*OW, K*K*C]` (backward: col2im).
    pub fn im2col(&self, x: Var, spec: ConvSpec) -> Result<Var> {
        let xv = self.value(x);
        let (r, c) = spec.cols_shape();
        let out = Tensor::new(self.backend.filled(r * c, 0.0)?, &[r, c]);
        self.backend.im2col(&spec, &xv.buf, &out.buf)?;
        let needs = self.requires_grad(x);
        let shape = xv.shape.clone();
        Ok(self.push(
            out,
            needs,
            Some(Box::new(move |t, dy| {
                let dx = Tensor::new(t.backend.filled(spec.input_len(), 0.0)?, &shape);
                t.backend.col2im(&spec, &dy.buf, &dx.buf)?;
                t.add_grad_tensor(x, &dx)
            })),
            false,
        ))
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
        let xs = self.value(x).shape;
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
        let oc = self.value(y).shape[1];
        self.reshape(y, &[n, oh, ow, oc])
    }

    /// `k x k` max or average pooling with stride `k` of a `[N, H, W, C]` value.
    pub fn pool(&self, x: Var, k: usize, max: bool) -> Result<Var> {
        let xv = self.value(x);
        let [n, h, w, c] = xv.shape[..] else {
            return Err(Error::Unsupported(format!(
                "pooling takes [N, H, W, C] input, got {:?}",
                xv.shape
            )));
        };
        let spec = PoolSpec { n, h, w, c, k, max };
        spec.validate()?;
        let (oh, ow) = spec.out_hw();
        let out = Tensor::new(
            self.backend.filled(spec.output_len(), 0.0)?,
            &[n, oh, ow, c],
        );
        self.backend.pool(&spec, &xv.buf, &out.buf)?;
        let needs = self.requires_grad(x);
        Ok(self.push(
            out,
            needs,
            Some(Box::new(move |t, dy| {
                let dx = Tensor::new(t.backend.filled(spec.input_len(), 0.0)?, &xv.shape);
                t.backend.pool_backward(&spec, &xv.buf, &dy.buf, &dx.buf)?;
                t.add_grad_tensor(x, &dx)
            })),
            false,
        ))
    }

    /// Channels-last `[N, H, W, C]` to `[N, C, H, W]` (for attention transfer).
    pub fn to_channels_first(&self, x: Var) -> Result<Var> {
        let xv = self.value(x);
        let [n, h, w, c] = xv.shape[..] else {
            return Err(Error::Unsupported(format!(
                "to_channels_first takes [N, H, W, C], got {:?}",
                xv.shape
            )));
        };
        let out = Tensor::new(self.backend.filled(xv.len(), 0.0)?, &[n, c, h, w]);
        self.backend.transpose(n, h * w, c, &xv.buf, &out.buf)?;
        let needs = self.requires_grad(x);
        Ok(self.push(
            out,
            needs,
            Some(Box::new(move |t, dy| {
                let dx = Tensor::new(t.backend.filled(dy.len(), 0.0)?, &[n, h, w, c]);
                t.backend.transpose(n, c, h * w, &dy.buf, &dx.buf)?;
                t.add_grad_tensor(x, &dx)
            })),
            false,
        ))
    }
}
