//! The CPU backend: the reference every GPU result is checked against.
//!
//! Each kernel converts its inputs to f64, calls the op family's `reference` function in
//! [`crate::ops`], and writes f32 results. It is written to be read, not to be fast.

use std::cell::RefCell;

use crate::dtype::{Dtype, HostSlice, HostVec};

use super::{Backend, GradOut, LossOut};
use crate::error::{Error, Result};
use crate::ops::conv::{self, ConvSpec, PoolSpec};
use crate::ops::dense::{self, CopySpec, MatmulSpec};
use crate::ops::optim::{self as optim_ops, AdamSpec, SgdSpec};
use crate::ops::relational as rel;
use crate::ops::RowLossResult;
use crate::ops::{
    self, AttentionSpec, CrossEntropySpec, DivergenceSpec, DkdSpec, HintonSpec, MseSpec,
    SoftmaxSpec, SparseSpec,
};

/// A host array of any [`Dtype`] standing in for a device buffer.
#[derive(Debug, Default)]
pub struct CpuBuffer(pub(super) RefCell<HostVec>);

impl CpuBuffer {
    pub(super) fn new(data: HostVec) -> Self {
        CpuBuffer(RefCell::new(data))
    }

    pub(super) fn dtype(&self) -> Dtype {
        self.0.borrow().dtype()
    }

    fn to_f64(&self) -> Vec<f64> {
        self.0.borrow().to_f64()
    }

    fn to_f32(&self) -> Vec<f32> {
        self.0.borrow().clone().to_f32()
    }

    /// Stores `values`, each rounded once to the buffer's dtype.
    fn store(&self, what: &str, values: &[f64]) -> Result<()> {
        let mut dst = self
            .0
            .try_borrow_mut()
            .map_err(|_| Error::Alias(format!("{what} is borrowed elsewhere")))?;
        dst.store_f64(values);
        Ok(())
    }
}

/// The reference backend.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend
    }

    /// Stores a pointwise loss and the gradients that are wanted.
    fn store_pair(
        loss: &CpuBuffer,
        l: f64,
        grad_a: Option<&CpuBuffer>,
        ga: &[f64],
        grad_b: Option<&CpuBuffer>,
        gb: &[f64],
    ) -> Result<()> {
        loss.store("loss", &[l])?;
        if let Some(g) = grad_a {
            g.store("grad_a", ga)?;
        }
        if let Some(g) = grad_b {
            g.store("grad_b", gb)?;
        }
        Ok(())
    }

    fn write_loss_out(
        &self,
        student: &CpuBuffer,
        r: &RowLossResult,
        out: LossOut<'_, Self>,
    ) -> Result<()> {
        out.loss.store("loss", &[r.loss])?;
        if let Some(rows) = out.row_loss {
            rows.store("row_loss", &r.row_loss)?;
        }
        match out.grad_student {
            GradOut::None => {}
            GradOut::Into(g) => g.store("grad_student", &r.grad_student)?,
            GradOut::InPlace => student.store("student (in-place gradient)", &r.grad_student)?,
        }
        if let Some(g) = out.grad_teacher {
            g.store("grad_teacher", &r.grad_teacher)?;
        }
        Ok(())
    }
}

impl Backend for CpuBackend {
    type Buffer = CpuBuffer;
    type Labels = Vec<i32>;

    fn name(&self) -> String {
        "cpu (f64 reference)".into()
    }

    fn upload_host(&self, data: HostSlice<'_>) -> Result<CpuBuffer> {
        Ok(CpuBuffer::new(data.to_vec()))
    }

    fn filled(&self, len: usize, value: f32) -> Result<CpuBuffer> {
        Ok(CpuBuffer::new(HostVec::F32(super::host_filled(
            len, value,
        )?)))
    }

    fn download_host(&self, buf: &CpuBuffer) -> Result<HostVec> {
        Ok(buf.0.borrow().clone())
    }

    fn dtype(&self, buf: &CpuBuffer) -> Dtype {
        buf.dtype()
    }

    fn upload_labels(&self, labels: &[i32]) -> Result<Vec<i32>> {
        Ok(labels.to_vec())
    }

    fn len(&self, buf: &CpuBuffer) -> usize {
        buf.0.borrow().len()
    }

    fn overlaps(&self, a: &CpuBuffer, b: &CpuBuffer) -> bool {
        // Each CpuBuffer owns its own Vec: two share memory only when they are the same buffer.
        std::ptr::eq(a, b)
    }

    fn labels_len(&self, labels: &Vec<i32>) -> usize {
        labels.len()
    }

    fn check_labels(&self, labels: &Vec<i32>, classes: usize, ignore_index: i32) -> Result<()> {
        ops::check_labels(labels, classes, ignore_index)
    }

    unsafe fn softmax_unchecked(
        &self,
        spec: &SoftmaxSpec,
        x: &CpuBuffer,
        y: &CpuBuffer,
    ) -> Result<()> {
        let out = ops::softmax::reference::softmax(
            &x.to_f64(),
            spec.shape.cols,
            spec.temperature as f64,
            spec.log,
        );
        y.store("y", &out)
    }

    unsafe fn softmax_backward_unchecked(
        &self,
        spec: &SoftmaxSpec,
        y: &CpuBuffer,
        dy: &CpuBuffer,
        dx: &CpuBuffer,
    ) -> Result<()> {
        let out = ops::softmax::reference::softmax_backward(
            &y.to_f64(),
            &dy.to_f64(),
            spec.shape.cols,
            spec.temperature as f64,
            spec.log,
        );
        dx.store("dx", &out)
    }

    unsafe fn divergence_unchecked(
        &self,
        spec: &DivergenceSpec,
        student: &CpuBuffer,
        teacher: &CpuBuffer,
        labels: Option<&Vec<i32>>,
        out: LossOut<'_, Self>,
    ) -> Result<()> {
        if let Some(l) = labels {
            ops::check_labels(l, spec.shape.cols, spec.ignore_index)?;
        }
        ops::check_reverse_kl_support(spec, &teacher.to_f32(), labels.map(|l| l.as_slice()))?;
        let r = ops::divergence::reference::divergence(
            spec,
            &student.to_f64(),
            &teacher.to_f64(),
            labels.map(|l| l.as_slice()),
        );
        self.write_loss_out(student, &r, out)
    }

    unsafe fn cross_entropy_unchecked(
        &self,
        spec: &CrossEntropySpec,
        student: &CpuBuffer,
        labels: &Vec<i32>,
        out: LossOut<'_, Self>,
    ) -> Result<()> {
        ops::check_labels(labels, spec.shape.cols, spec.ignore_index)?;
        let r = ops::cross_entropy::reference::cross_entropy(spec, &student.to_f64(), labels);
        self.write_loss_out(student, &r, out)
    }

    unsafe fn hinton_unchecked(
        &self,
        spec: &HintonSpec,
        student: &CpuBuffer,
        teacher: &CpuBuffer,
        labels: &Vec<i32>,
        out: LossOut<'_, Self>,
    ) -> Result<()> {
        ops::check_labels(labels, spec.shape.cols, spec.ignore_index)?;
        let r = ops::hinton::reference::hinton(spec, &student.to_f64(), &teacher.to_f64(), labels);
        self.write_loss_out(student, &r, out)
    }

    unsafe fn dkd_unchecked(
        &self,
        spec: &DkdSpec,
        student: &CpuBuffer,
        teacher: &CpuBuffer,
        labels: &Vec<i32>,
        out: LossOut<'_, Self>,
    ) -> Result<()> {
        ops::check_labels(labels, spec.shape.cols, spec.ignore_index)?;
        let r = ops::dkd::reference::dkd(spec, &student.to_f64(), &teacher.to_f64(), labels);
        self.write_loss_out(student, &r, out)
    }

    unsafe fn sparse_kd_unchecked(
        &self,
        spec: &SparseSpec,
        student: &CpuBuffer,
        indices: &Vec<i32>,
        values: &CpuBuffer,
        labels: Option<&Vec<i32>>,
        out: LossOut<'_, Self>,
    ) -> Result<()> {
        let labels = labels.map(|l| l.as_slice());
        if let Some(l) = labels {
            ops::check_labels(l, spec.shape.cols, spec.ignore_index)?;
        }
        ops::sparse::check_sparse_teacher(spec, indices, &values.to_f32(), labels)?;
        let r = ops::sparse::reference::sparse_kd(
            spec,
            &student.to_f64(),
            indices,
            &values.to_f64(),
            labels,
        );
        self.write_loss_out(student, &r, out)
    }

    unsafe fn mse_unchecked(
        &self,
        spec: &MseSpec,
        a: &CpuBuffer,
        b: &CpuBuffer,
        loss: &CpuBuffer,
        grad_a: Option<&CpuBuffer>,
        grad_b: Option<&CpuBuffer>,
    ) -> Result<()> {
        let (l, ga, gb) = ops::feature::reference::mse(spec, &a.to_f64(), &b.to_f64());
        Self::store_pair(loss, l, grad_a, &ga, grad_b, &gb)
    }

    unsafe fn attention_transfer_unchecked(
        &self,
        spec: &AttentionSpec,
        student: &CpuBuffer,
        teacher: &CpuBuffer,
        loss: &CpuBuffer,
        grad_student: Option<&CpuBuffer>,
        grad_teacher: Option<&CpuBuffer>,
    ) -> Result<()> {
        let (l, gs, gt) =
            ops::feature::reference::attention_transfer(spec, &student.to_f64(), &teacher.to_f64());
        Self::store_pair(loss, l, grad_student, &gs, grad_teacher, &gt)
    }

    unsafe fn matmul_unchecked(
        &self,
        spec: &MatmulSpec,
        a: &CpuBuffer,
        b: &CpuBuffer,
        c: &CpuBuffer,
    ) -> Result<()> {
        let mut out = c.to_f64();
        dense::reference::matmul(spec, &a.to_f64(), &b.to_f64(), &mut out);
        c.store("c", &out)
    }

    fn matmul_reads_half(&self) -> bool {
        true
    }

    unsafe fn copy_rows_unchecked(
        &self,
        spec: &CopySpec,
        src: &CpuBuffer,
        dst: &CpuBuffer,
    ) -> Result<()> {
        let mut out = dst.to_f64();
        dense::reference::copy_rows(spec, &src.to_f64(), &mut out);
        dst.store("dst", &out)
    }

    unsafe fn bias_add_unchecked(
        &self,
        x: &CpuBuffer,
        bias: &CpuBuffer,
        y: &CpuBuffer,
    ) -> Result<()> {
        y.store(
            "y",
            &dense::reference::bias_add(&x.to_f64(), &bias.to_f64()),
        )
    }

    unsafe fn sum_rows_unchecked(
        &self,
        x: &CpuBuffer,
        out: &CpuBuffer,
        accumulate: bool,
    ) -> Result<()> {
        let mut o = out.to_f64();
        let cols = o.len();
        dense::reference::sum_rows(&x.to_f64(), cols, &mut o, accumulate);
        out.store("out", &o)
    }

    unsafe fn relu_unchecked(&self, x: &CpuBuffer, y: &CpuBuffer) -> Result<()> {
        y.store("y", &dense::reference::relu(&x.to_f64()))
    }

    unsafe fn relu_backward_unchecked(
        &self,
        y: &CpuBuffer,
        dy: &CpuBuffer,
        dx: &CpuBuffer,
    ) -> Result<()> {
        dx.store(
            "dx",
            &dense::reference::relu_backward(&y.to_f64(), &dy.to_f64()),
        )
    }

    unsafe fn axpy_unchecked(&self, alpha: f32, x: &CpuBuffer, y: &CpuBuffer) -> Result<()> {
        let out: Vec<f64> = y
            .to_f64()
            .iter()
            .zip(x.to_f64())
            .map(|(y, x)| y + alpha as f64 * x)
            .collect();
        y.store("y", &out)
    }

    unsafe fn adam_step_unchecked(
        &self,
        spec: &AdamSpec,
        w: &CpuBuffer,
        grad: &CpuBuffer,
        m: &CpuBuffer,
        v: &CpuBuffer,
    ) -> Result<()> {
        let (mut wv, mut mv, mut vv) = (w.to_f64(), m.to_f64(), v.to_f64());
        optim_ops::reference::adam_step(spec, &mut wv, &grad.to_f64(), &mut mv, &mut vv);
        w.store("w", &wv)?;
        m.store("m", &mv)?;
        v.store("v", &vv)
    }

    unsafe fn sgd_step_unchecked(
        &self,
        spec: &SgdSpec,
        w: &CpuBuffer,
        grad: &CpuBuffer,
        velocity: &CpuBuffer,
    ) -> Result<()> {
        let (mut wv, mut vel) = (w.to_f64(), velocity.to_f64());
        optim_ops::reference::sgd_step(spec, &mut wv, &grad.to_f64(), &mut vel);
        w.store("w", &wv)?;
        velocity.store("velocity", &vel)
    }

    unsafe fn im2col_unchecked(
        &self,
        spec: &ConvSpec,
        x: &CpuBuffer,
        cols: &CpuBuffer,
    ) -> Result<()> {
        cols.store("cols", &conv::reference::im2col(spec, &x.to_f64()))
    }

    unsafe fn col2im_unchecked(
        &self,
        spec: &ConvSpec,
        dcols: &CpuBuffer,
        dx: &CpuBuffer,
    ) -> Result<()> {
        dx.store("dx", &conv::reference::col2im(spec, &dcols.to_f64()))
    }

    unsafe fn pool_unchecked(&self, spec: &PoolSpec, x: &CpuBuffer, y: &CpuBuffer) -> Result<()> {
        y.store("y", &conv::reference::pool(spec, &x.to_f64()))
    }

    unsafe fn pool_backward_unchecked(
        &self,
        spec: &PoolSpec,
        x: &CpuBuffer,
        dy: &CpuBuffer,
        dx: &CpuBuffer,
    ) -> Result<()> {
        dx.store(
            "dx",
            &conv::reference::pool_backward(spec, &x.to_f64(), &dy.to_f64()),
        )
    }

    unsafe fn transpose_unchecked(
        &self,
        batch: usize,
        rows: usize,
        cols: usize,
        x: &CpuBuffer,
        y: &CpuBuffer,
    ) -> Result<()> {
        y.store(
            "y",
            &conv::reference::transpose(&x.to_f64(), batch, rows, cols),
        )
    }

    unsafe fn row_normalize_unchecked(
        &self,
        cols: usize,
        x: &CpuBuffer,
        y: &CpuBuffer,
    ) -> Result<()> {
        y.store("y", &rel::reference::row_normalize(&x.to_f64(), cols))
    }

    unsafe fn row_normalize_backward_unchecked(
        &self,
        cols: usize,
        x: &CpuBuffer,
        dy: &CpuBuffer,
        dx: &CpuBuffer,
    ) -> Result<()> {
        dx.store(
            "dx",
            &rel::reference::row_normalize_backward(&x.to_f64(), &dy.to_f64(), cols),
        )
    }

    unsafe fn pairwise_distance_unchecked(
        &self,
        n: usize,
        dim: usize,
        f: &CpuBuffer,
        d: &CpuBuffer,
    ) -> Result<()> {
        d.store("d", &rel::reference::pairwise_distance(&f.to_f64(), n, dim))
    }

    unsafe fn pairwise_distance_backward_unchecked(
        &self,
        n: usize,
        dim: usize,
        f: &CpuBuffer,
        d: &CpuBuffer,
        dd: &CpuBuffer,
        df: &CpuBuffer,
    ) -> Result<()> {
        df.store(
            "df",
            &rel::reference::pairwise_distance_backward(
                &f.to_f64(),
                &d.to_f64(),
                &dd.to_f64(),
                n,
                dim,
            ),
        )
    }

    unsafe fn offdiag_normalize_unchecked(
        &self,
        n: usize,
        d: &CpuBuffer,
        y: &CpuBuffer,
    ) -> Result<()> {
        y.store("y", &rel::reference::offdiag_normalize(&d.to_f64(), n))
    }

    unsafe fn offdiag_normalize_backward_unchecked(
        &self,
        n: usize,
        d: &CpuBuffer,
        dy: &CpuBuffer,
        dd: &CpuBuffer,
    ) -> Result<()> {
        dd.store(
            "dd",
            &rel::reference::offdiag_normalize_backward(&d.to_f64(), &dy.to_f64(), n),
        )
    }

    unsafe fn smooth_l1_unchecked(
        &self,
        spec: &MseSpec,
        a: &CpuBuffer,
        b: &CpuBuffer,
        loss: &CpuBuffer,
        grad_a: Option<&CpuBuffer>,
        grad_b: Option<&CpuBuffer>,
    ) -> Result<()> {
        let (l, ga, gb) = crate::ops::feature::reference::smooth_l1(
            &a.to_f64(),
            &b.to_f64(),
            spec.grad_scale as f64,
        );
        Self::store_pair(loss, l, grad_a, &ga, grad_b, &gb)
    }
}
