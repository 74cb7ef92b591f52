//! The losses: roots of the tape, each computing its value and its input gradients in one fused
//! kernel.

use super::{Tape, Tensor, Var};
use crate::backend::{Backend, GradOut, LossOut};
use crate::error::{Error, Result};
use crate::ops::{AttentionSpec, CrossEntropySpec, DivergenceSpec, HintonSpec, MseSpec, RowShape};

impl<'a, B: Backend + 'a> Tape<'a, B> {
    /// Records a loss whose kernel has already produced its value and its input gradients.
    fn push_loss(&self, loss: B::Buffer, grads: Vec<(Var, Tensor<B>)>) -> Var {
        let value = Tensor::new(loss, &[1]);
        self.push(
            value,
            true,
            Some(Box::new(move |t, _| {
                for (v, g) in &grads {
                    t.add_grad_tensor(*v, g)?;
                }
                Ok(())
            })),
            true,
        )
    }

    /// Runs a loss kernel on inputs `a` and `b`: allocates the loss and the gradients that are wanted,
    /// calls `kernel(loss, grad_a, grad_b)`, and records the loss as a root.
    fn loss_op(
        &self,
        a: Var,
        want_a: bool,
        b: Var,
        want_b: bool,
        kernel: impl FnOnce(&B::Buffer, Option<&B::Buffer>, Option<&B::Buffer>) -> Result<()>,
    ) -> Result<Var> {
        let grad = |v: Var, wanted: bool| -> Result<Option<Tensor<B>>> {
            if !wanted {
                return Ok(None);
            }
            let shape = self.value(v).shape;
            Ok(Some(Tensor::new(
                self.backend.filled(shape.iter().product(), 0.0)?,
                &shape,
            )))
        };
        let (ga, gb) = (grad(a, want_a)?, grad(b, want_b)?);
        let loss = self.backend.filled(1, 0.0)?;
        kernel(
            &loss,
            ga.as_ref().map(|g| &*g.buf),
            gb.as_ref().map(|g| &*g.buf),
        )?;
        Ok(self.push_loss(
            loss,
            ga.map(|g| (a, g))
                .into_iter()
                .chain(gb.map(|g| (b, g)))
                .collect(),
        ))
    }

    fn row_shape(&self, logits: Var) -> RowShape {
        let (r, c) = self.value(logits).rows_cols();
        RowShape::new(r, c)
    }

    fn loss_out<'b>(
        loss: &'b B::Buffer,
        gs: Option<&'b B::Buffer>,
        gt: Option<&'b B::Buffer>,
    ) -> LossOut<'b, B> {
        LossOut {
            loss,
            row_loss: None,
            grad_student: gs.map_or(GradOut::None, GradOut::Into),
            grad_teacher: gt,
        }
    }

    /// The fused Hinton loss of student logits against teacher logits (a constant, or a variable
    /// whose gradient is wanted: online distillation). `spec.shape` is taken from the logits.
    pub fn hinton(
        &self,
        student: Var,
        teacher: Var,
        labels: &B::Labels,
        spec: HintonSpec,
    ) -> Result<Var> {
        let spec = HintonSpec {
            shape: self.row_shape(student),
            ..spec
        };
        let (s, t) = (self.value(student), self.value(teacher));
        self.loss_op(
            student,
            self.requires_grad(student),
            teacher,
            self.requires_grad(teacher),
            |l, gs, gt| {
                self.backend
                    .hinton(&spec, &s.buf, &t.buf, labels, Self::loss_out(l, gs, gt))
            },
        )
    }

    /// A soft-target divergence (forward KL, reverse KL, JSD) of student logits against a teacher.
    pub fn divergence(
        &self,
        student: Var,
        teacher: Var,
        labels: Option<&B::Labels>,
        spec: DivergenceSpec,
    ) -> Result<Var> {
        let spec = DivergenceSpec {
            shape: self.row_shape(student),
            ..spec
        };
        let want_t =
            self.requires_grad(teacher) && spec.teacher == crate::ops::TeacherInput::Logits;
        let (s, t) = (self.value(student), self.value(teacher));
        self.loss_op(
            student,
            self.requires_grad(student),
            teacher,
            want_t,
            |l, gs, gt| {
                self.backend
                    .divergence(&spec, &s.buf, &t.buf, labels, Self::loss_out(l, gs, gt))
            },
        )
    }

    /// Cross-entropy of logits against hard labels.
    pub fn cross_entropy(
        &self,
        logits: Var,
        labels: &B::Labels,
        spec: CrossEntropySpec,
    ) -> Result<Var> {
        let spec = CrossEntropySpec {
            shape: self.row_shape(logits),
            ..spec
        };
        let s = self.value(logits);
        self.loss_op(
            logits,
            self.requires_grad(logits),
            logits,
            false,
            |l, gs, _| {
                self.backend
                    .cross_entropy(&spec, &s.buf, labels, Self::loss_out(l, gs, None))
            },
        )
    }

    /// Feature MSE between two equal-shape values, times `weight` in the gradients.
    pub fn mse(&self, a: Var, b: Var, weight: f32) -> Result<Var> {
        let (av, bv) = (self.value(a), self.value(b));
        let spec = MseSpec {
            len: av.len(),
            grad_scale: weight,
        };
        self.loss_op(
            a,
            self.requires_grad(a),
            b,
            self.requires_grad(b),
            |l, ga, gb| self.backend.mse(&spec, &av.buf, &bv.buf, l, ga, gb),
        )
    }

    /// Attention transfer between `[N, C, H, W]` feature maps (channels may differ).
    pub fn attention_transfer(&self, s: Var, t: Var, weight: f32) -> Result<Var> {
        let (sv, tv) = (self.value(s), self.value(t));
        if sv.shape.len() != 4
            || tv.shape.len() != 4
            || sv.shape[0] != tv.shape[0]
            || sv.shape[2..] != tv.shape[2..]
        {
            return Err(Error::Unsupported(format!(
                "attention transfer needs [N, C, H, W] maps with the same N, H, W; got {:?} and {:?}",
                sv.shape, tv.shape
            )));
        }
        let spec = AttentionSpec {
            grad_scale: weight,
            ..AttentionSpec::new(
                sv.shape[0],
                sv.shape[1],
                tv.shape[1],
                sv.shape[2] * sv.shape[3],
            )
        };
        self.loss_op(
            s,
            self.requires_grad(s),
            t,
            self.requires_grad(t),
            |l, gs, gt| {
                self.backend
                    .attention_transfer(&spec, &sv.buf, &tv.buf, l, gs, gt)
            },
        )
    }

    /// Smooth L1 (Huber, delta 1) between two equal-shape values, mean over elements.
    pub fn smooth_l1(&self, a: Var, b: Var, weight: f32) -> Result<Var> {
        let (av, bv) = (self.value(a), self.value(b));
        let spec = MseSpec {
            len: av.len(),
            grad_scale: weight,
        };
        self.loss_op(
            a,
            self.requires_grad(a),
            b,
            self.requires_grad(b),
            |l, ga, gb| self.backend.smooth_l1(&spec, &av.buf, &bv.buf, l, ga, gb),
        )
    }
}
