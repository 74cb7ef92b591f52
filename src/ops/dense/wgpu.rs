//! Dispatch of `dense.wgsl`: the tiled matmul (a workgroup per 16 x 16 tile of C), bias add,
//! column sums, ReLU and its backward, and `y += alpha x` (one invocation per output element).

use bytemuck::{Pod, Zeroable};

use super::{CopySpec, MatmulSpec};
use crate::backend::wgpu::dispatch::{whole, WG};
use crate::backend::wgpu::pipelines::{Bind, WgslKernel};
use crate::backend::wgpu::{uniform_layout, UniformLayout, WgpuBackend, WgpuBuffer};
use crate::error::{Error, Result};

const BODY: &str = include_str!("dense.wgsl");
const BINDINGS: &[Bind] = &[Bind::Uniform, Bind::Read, Bind::Read, Bind::ReadWrite];

const fn kernel(entry: &'static str) -> WgslKernel {
    WgslKernel {
        file: "dense.wgsl",
        body: BODY,
        entry,
        row_io: false,
        bindings: BINDINGS,
    }
}

pub(crate) const MATMUL: WgslKernel = kernel("matmul");
pub(crate) const BIAS_ADD: WgslKernel = kernel("bias_add");
pub(crate) const SUM_ROWS: WgslKernel = kernel("sum_rows");
pub(crate) const RELU: WgslKernel = kernel("relu");
pub(crate) const RELU_BACKWARD: WgslKernel = kernel("relu_backward");
pub(crate) const AXPY: WgslKernel = kernel("axpy");
pub(crate) const COPY_ROWS: WgslKernel = WgslKernel {
    file: "copy.wgsl",
    body: include_str!("copy.wgsl"),
    entry: "copy_rows",
    row_io: false,
    bindings: &[Bind::Uniform, Bind::Read, Bind::ReadWrite],
};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct CopyParams {
    rows: u32,
    cols: u32,
    src_offset: u32,
    src_stride: u32,
    dst_offset: u32,
    dst_stride: u32,
    src_dtype: u32,
    dst_dtype: u32,
    first_unit: u32,
    units: u32,
    pad0: u32,
    pad1: u32,
}

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

pub(crate) fn uniform_layouts() -> Vec<UniformLayout> {
    vec![
        uniform_layout!(
            DenseParams,
            "dense.wgsl",
            [m, k, n, trans_a, trans_b, accumulate, len, alpha]
        ),
        uniform_layout!(
            CopyParams,
            "copy.wgsl",
            [
                rows, cols, src_offset, src_stride, dst_offset, dst_stride, src_dtype, dst_dtype,
                first_unit, units
            ]
        ),
    ]
}

/// The strided block copy of [`CopySpec`] (`copy.wgsl`).
pub(crate) fn copy_rows(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    spec: &CopySpec,
    src: &WgpuBuffer,
    dst: &WgpuBuffer,
) -> Result<()> {
    w.check_binding(&[src, dst])?;
    // CopySpec::validate: every index below 2^32.
    let (start, end) = (spec.dst_offset, spec.dst_end());
    let (first_unit, units) = if dst.dtype().size() == 4 {
        (start, end - start)
    } else {
        (start / 2, end.div_ceil(2) - start / 2)
    };
    let params = CopyParams {
        rows: spec.rows as u32,
        cols: spec.cols as u32,
        src_offset: spec.src_offset as u32,
        src_stride: spec.src_stride as u32,
        dst_offset: spec.dst_offset as u32,
        dst_stride: if spec.rows == 1 {
            spec.cols
        } else {
            spec.dst_stride
        } as u32,
        src_dtype: src.dtype().code(),
        dst_dtype: dst.dtype().code(),
        first_unit: first_unit as u32,
        units: units as u32,
        ..Default::default()
    };
    w.dispatch(
        enc,
        &COPY_ROWS,
        WG,
        bytemuck::bytes_of(&params),
        &[whole(src), whole(dst)],
        units.div_ceil(WG as usize) as u32,
    )
}

/// `C (+)= op(A) op(B)`.
pub(crate) fn matmul(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    spec: &MatmulSpec,
    a: &WgpuBuffer,
    b: &WgpuBuffer,
    c: &WgpuBuffer,
) -> Result<()> {
    w.check_binding(&[a, b, c])?;
    let max = w.limits().max_compute_workgroups_per_dimension as usize;
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
    w.dispatch_2d(
        enc,
        &MATMUL,
        bytemuck::bytes_of(&params),
        &[whole(a), whole(b), whole(c)],
        gx as u32,
        gy as u32,
    )
}

/// `y = x + bias` per row.
pub(crate) fn bias_add(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    x: &WgpuBuffer,
    bias: &WgpuBuffer,
    y: &WgpuBuffer,
) -> Result<()> {
    w.check_binding(&[x, bias, y])?;
    let params = DenseParams {
        k: bias.len() as u32,
        len: x.len() as u32,
        ..Default::default()
    };
    w.dispatch(
        enc,
        &BIAS_ADD,
        WG,
        bytemuck::bytes_of(&params),
        &[whole(x), whole(bias), whole(y)],
        x.len().div_ceil(256) as u32,
    )
}

/// `out (+)= column sums of x`.
pub(crate) fn sum_rows(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    x: &WgpuBuffer,
    out: &WgpuBuffer,
    accumulate: bool,
) -> Result<()> {
    w.check_binding(&[x, out])?;
    let params = DenseParams {
        m: (x.len() / out.len()) as u32,
        n: out.len() as u32,
        accumulate: accumulate as u32,
        ..Default::default()
    };
    w.dispatch(
        enc,
        &SUM_ROWS,
        WG,
        bytemuck::bytes_of(&params),
        &[whole(x), None, whole(out)],
        out.len().div_ceil(256) as u32,
    )
}

/// `y = max(x, 0)`.
pub(crate) fn relu(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    x: &WgpuBuffer,
    y: &WgpuBuffer,
) -> Result<()> {
    elementwise(w, enc, &RELU, x, None, y, 0.0)
}

/// `dx = dy (y > 0)`.
pub(crate) fn relu_backward(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    y: &WgpuBuffer,
    dy: &WgpuBuffer,
    dx: &WgpuBuffer,
) -> Result<()> {
    elementwise(w, enc, &RELU_BACKWARD, y, Some(dy), dx, 0.0)
}

/// `y += alpha x`.
pub(crate) fn axpy(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    alpha: f32,
    x: &WgpuBuffer,
    y: &WgpuBuffer,
) -> Result<()> {
    elementwise(w, enc, &AXPY, x, None, y, alpha)
}

fn elementwise(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    kernel: &WgslKernel,
    a: &WgpuBuffer,
    b: Option<&WgpuBuffer>,
    c: &WgpuBuffer,
    alpha: f32,
) -> Result<()> {
    w.check_binding(&[a, c])?;
    let params = DenseParams {
        len: a.len() as u32,
        alpha,
        ..Default::default()
    };
    w.dispatch(
        enc,
        kernel,
        WG,
        bytemuck::bytes_of(&params),
        &[whole(a), b.and_then(whole), whole(c)],
        a.len().div_ceil(256) as u32,
    )
}
