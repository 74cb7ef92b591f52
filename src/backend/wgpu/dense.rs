//! Recording the dense ops of the tape (`shaders/dense.wgsl`, `shaders/optim.wgsl`).

use bytemuck::{Pod, Zeroable};

use super::pipelines::Kernel;
use super::record::Window;
use super::{WgpuBackend, WgpuBuffer};
use crate::error::{Error, Result};
use crate::ops::conv::{ConvSpec, PoolSpec};
use crate::ops::dense::MatmulSpec;
use crate::ops::optim::{AdamSpec, SgdSpec};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct DenseParams {
    m: u32,
    k: u32,
    n: u32,
    trans_a: u32,
    trans_b: u32,
    accumulate: u32,
    len: u32,
    alpha: f32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct OptimParams {
    len: u32,
    lr: f32,
    inv_c2: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct ConvParams {
    n: u32,
    h: u32,
    w: u32,
    c: u32,
    k: u32,
    stride: u32,
    pad: u32,
    oh: u32,
    ow: u32,
    max_pool: u32,
    len: u32,
    rows: u32,
    cols: u32,
    pad0: [u32; 3],
}

impl ConvParams {
    fn conv(s: &ConvSpec, len: usize) -> Self {
        let (oh, ow) = s.out_hw();
        ConvParams {
            n: s.n as u32,
            h: s.h as u32,
            w: s.w as u32,
            c: s.c as u32,
            k: s.k as u32,
            stride: s.stride as u32,
            pad: s.pad as u32,
            oh: oh as u32,
            ow: ow as u32,
            len: len as u32,
            ..Default::default()
        }
    }

    fn pool(s: &PoolSpec, len: usize) -> Self {
        let (oh, ow) = s.out_hw();
        ConvParams {
            n: s.n as u32,
            h: s.h as u32,
            w: s.w as u32,
            c: s.c as u32,
            k: s.k as u32,
            stride: s.k as u32,
            oh: oh as u32,
            ow: ow as u32,
            max_pool: s.max as u32,
            len: len as u32,
            ..Default::default()
        }
    }
}

fn whole(b: &WgpuBuffer) -> Option<Window<'_>> {
    Some(Window::whole(&b.buffer, b.bytes()))
}

impl WgpuBackend {
    fn check_binding(&self, bufs: &[&WgpuBuffer]) -> Result<()> {
        for b in bufs {
            if b.bytes() > self.max_binding {
                return Err(Error::Limit(format!(
                    "a buffer of {} bytes exceeds the device's storage binding limit of {} bytes",
                    b.bytes(),
                    self.max_binding
                )));
            }
        }
        Ok(())
    }

    pub(super) fn encode_matmul(
        &self,
        enc: &mut wgpu::CommandEncoder,
        spec: &MatmulSpec,
        a: &WgpuBuffer,
        b: &WgpuBuffer,
        c: &WgpuBuffer,
    ) -> Result<()> {
        self.check_binding(&[a, b, c])?;
        let max = self.limits.max_compute_workgroups_per_dimension as usize;
        let (gx, gy) = (spec.n.div_ceil(16), spec.m.div_ceil(16));
        if gx > max || gy > max {
            return Err(Error::Limit(format!(
                "matmul of [{}, {}] exceeds the dispatch limit",
                spec.m, spec.n
            )));
        }
        let params = DenseParams {
            m: spec.m as u32,
            k: spec.k as u32,
            n: spec.n as u32,
            trans_a: spec.trans_a as u32,
            trans_b: spec.trans_b as u32,
            accumulate: spec.accumulate as u32,
            ..Default::default()
        };
        self.dispatch_2d(
            enc,
            Kernel::Matmul,
            bytemuck::bytes_of(&params),
            &[whole(a), whole(b), whole(c)],
            gx as u32,
            gy as u32,
        )
    }

    pub(super) fn encode_bias_add(
        &self,
        enc: &mut wgpu::CommandEncoder,
        x: &WgpuBuffer,
        bias: &WgpuBuffer,
        y: &WgpuBuffer,
    ) -> Result<()> {
        self.check_binding(&[x, bias, y])?;
        let params = DenseParams {
            k: bias.len as u32,
            len: x.len as u32,
            ..Default::default()
        };
        self.dispatch(
            enc,
            Kernel::BiasAdd,
            256,
            bytemuck::bytes_of(&params),
            &[whole(x), whole(bias), whole(y)],
            x.len.div_ceil(256) as u32,
        )
    }

    pub(super) fn encode_sum_rows(
        &self,
        enc: &mut wgpu::CommandEncoder,
        x: &WgpuBuffer,
        out: &WgpuBuffer,
        accumulate: bool,
    ) -> Result<()> {
        self.check_binding(&[x, out])?;
        let params = DenseParams {
            m: (x.len / out.len) as u32,
            n: out.len as u32,
            accumulate: accumulate as u32,
            ..Default::default()
        };
        self.dispatch(
            enc,
            Kernel::SumRows,
            256,
            bytemuck::bytes_of(&params),
            &[whole(x), None, whole(out)],
            out.len.div_ceil(256) as u32,
        )
    }

    pub(super) fn encode_elementwise(
        &self,
        enc: &mut wgpu::CommandEncoder,
        kernel: Kernel,
        a: &WgpuBuffer,
        b: Option<&WgpuBuffer>,
        c: &WgpuBuffer,
        alpha: f32,
    ) -> Result<()> {
        self.check_binding(&[a, c])?;
        let params = DenseParams {
            len: a.len as u32,
            alpha,
            ..Default::default()
        };
        self.dispatch(
            enc,
            kernel,
            256,
            bytemuck::bytes_of(&params),
            &[whole(a), b.and_then(whole), whole(c)],
            a.len.div_ceil(256) as u32,
        )
    }

    pub(super) fn encode_adam(
        &self,
        enc: &mut wgpu::CommandEncoder,
        spec: &AdamSpec,
        w: &WgpuBuffer,
        grad: &WgpuBuffer,
        m: &WgpuBuffer,
        v: &WgpuBuffer,
    ) -> Result<()> {
        self.check_binding(&[w, grad, m, v])?;
        let (lr_c1, inv_c2) = spec.corrections();
        let params = OptimParams {
            len: w.len as u32,
            lr: lr_c1,
            inv_c2,
            beta1: spec.beta1,
            beta2: spec.beta2,
            eps: spec.eps,
            weight_decay: spec.weight_decay,
            pad: 0,
        };
        self.dispatch(
            enc,
            Kernel::Adam,
            256,
            bytemuck::bytes_of(&params),
            &[whole(grad), whole(w), whole(m), whole(v)],
            w.len.div_ceil(256) as u32,
        )
    }

    pub(super) fn encode_sgd(
        &self,
        enc: &mut wgpu::CommandEncoder,
        spec: &SgdSpec,
        w: &WgpuBuffer,
        grad: &WgpuBuffer,
        velocity: &WgpuBuffer,
    ) -> Result<()> {
        self.check_binding(&[w, grad, velocity])?;
        let params = OptimParams {
            len: w.len as u32,
            lr: spec.lr,
            beta1: spec.momentum,
            weight_decay: spec.weight_decay,
            ..Default::default()
        };
        self.dispatch(
            enc,
            Kernel::Sgd,
            256,
            bytemuck::bytes_of(&params),
            &[whole(grad), whole(w), whole(velocity), None],
            w.len.div_ceil(256) as u32,
        )
    }

    /// One invocation per element of `out` for a conv.wgsl entry point.
    pub(super) fn encode_conv(
        &self,
        enc: &mut wgpu::CommandEncoder,
        kernel: Kernel,
        params: ConvParamsBytes,
        a: &WgpuBuffer,
        b: Option<&WgpuBuffer>,
        out: &WgpuBuffer,
    ) -> Result<()> {
        self.check_binding(&[a, out])?;
        self.dispatch(
            enc,
            kernel,
            256,
            &params.0,
            &[whole(a), b.and_then(whole), whole(out)],
            out.len.div_ceil(256) as u32,
        )
    }

    pub(super) fn conv_params(spec: &ConvSpec, len: usize) -> ConvParamsBytes {
        ConvParamsBytes(bytemuck::bytes_of(&ConvParams::conv(spec, len)).to_vec())
    }

    pub(super) fn pool_params(spec: &PoolSpec, len: usize) -> ConvParamsBytes {
        ConvParamsBytes(bytemuck::bytes_of(&ConvParams::pool(spec, len)).to_vec())
    }

    pub(super) fn transpose_params(batch: usize, rows: usize, cols: usize) -> ConvParamsBytes {
        let p = ConvParams {
            n: batch as u32,
            rows: rows as u32,
            cols: cols as u32,
            len: (batch * rows * cols) as u32,
            ..Default::default()
        };
        ConvParamsBytes(bytemuck::bytes_of(&p).to_vec())
    }
}

impl WgpuBackend {
    /// A relational.wgsl dispatch: `threads` invocations (0: one workgroup).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn encode_relational(
        &self,
        enc: &mut wgpu::CommandEncoder,
        kernel: Kernel,
        n: usize,
        dim: usize,
        inputs: [Option<&WgpuBuffer>; 3],
        out: &WgpuBuffer,
        threads: usize,
    ) -> Result<()> {
        // The bytes of a RelationalParams (its layout is checked against the shader).
        let params = [n as u32, dim as u32, 0, 0];
        let [a, b, c] = inputs;
        self.dispatch(
            enc,
            kernel,
            256,
            bytemuck::cast_slice(&params),
            &[
                a.and_then(whole),
                b.and_then(whole),
                c.and_then(whole),
                whole(out),
            ],
            threads.div_ceil(256).max(1) as u32,
        )
    }
}

/// `relational.wgsl`'s uniform: `[n, dim, 0, 0]` as written by `encode_relational`.
#[repr(C)]
struct RelationalParams {
    n: u32,
    dim: u32,
    pad: [u32; 2],
}

/// The layouts of this file's uniform structs (see [`super::uniform_layouts`]).
pub(super) fn uniform_layouts() -> Vec<super::UniformLayout> {
    use super::uniform_layout as l;
    vec![
        l!(
            DenseParams,
            "dense.wgsl",
            [m, k, n, trans_a, trans_b, accumulate, len, alpha]
        ),
        l!(
            OptimParams,
            "optim.wgsl",
            [len, lr, inv_c2, beta1, beta2, eps, weight_decay]
        ),
        l!(
            ConvParams,
            "conv.wgsl",
            [n, h, w, c, k, stride, pad, oh, ow, max_pool, len, rows, cols]
        ),
        l!(RelationalParams, "relational.wgsl", [n, dim]),
    ]
}

/// The uniform bytes of a conv.wgsl dispatch.
pub(super) struct ConvParamsBytes(Vec<u8>);
