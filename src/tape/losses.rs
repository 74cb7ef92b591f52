//! The losses: the roots of the tape. Each runs one fused kernel that writes the loss value `l`
//! and, for the inputs that need them, the weighted gradients `w dl/dx`; the root keeps those
//! gradients and its weight `w` (a spec's `grad_scale`, or the `weight` argument). Its value stays
//! the unweighted `l`: [`Tape::loss_weight`] and [`Tape::add_weighted_loss`] give the weighted one.

use super::{Tape, Tensor, Var};
use crate::backend::{Backend, GradOut, LossOut};
use crate::error::{Error, Result};
use crate::ops::{
    AttentionSpec, CrossEntropySpec, DivergenceSpec, DkdSpec, HintonSpec, MseSpec, RowShape,
    TeacherInput,
};

impl<'a, B: Backend + 'a> Tape<'a, B> {
    /// The weight a loss root was recorded with (`None` for a value that is not a loss): the
    /// factor its gradients carry, `L = sum_j w_j l_j` over the roots given to `backward`.
    pub fn loss_weight(&self, loss: Var) -> Result<Option<f32>> {
        self.owns(&[loss])?;
        Ok(self.nodes.borrow()[loss.index].weight)
    }

    /// Adds a loss root's weighted value `w l` into the one-element `total`, on the device (the
    /// running objective of a training loop).
    pub fn add_weighted_loss(&self, loss: Var, total: &Tensor<B>) -> Result<()> {
        let w = self.loss_weight(loss)?.ok_or_else(not_a_loss)?;
        self.backend.axpy(w, &self.val(loss).buf, &total.buf)
    }

    /// Runs a fused loss kernel on inputs `a` and `b` and records its root of weight `weight`:
    /// allocates the loss and the gradients wanted (`want_a`, `want_b`), and calls
    /// `kernel(loss, grad_a, grad_b)`, which writes the loss and the gradients times `weight`.
    fn loss_op(
        &self,
        weight: f32,
        (a, want_a): (Var, bool),
        (b, want_b): (Var, bool),
        kernel: impl FnOnce(&B::Buffer, Option<&B::Buffer>, Option<&B::Buffer>) -> Result<()>,
    ) -> Result<Var> {
        let grad = |v: Var, wanted: bool| -> Result<Option<(Var, Tensor<B>)>> {
            match wanted {
                true => Ok(Some((v, Tensor::zeros(self.backend, &self.val(v).shape)?))),
                false => Ok(None),
            }
        };
        let (ga, gb) = (grad(a, want_a)?, grad(b, want_b)?);
        let loss = Tensor::zeros(self.backend, &[1])?;
        kernel(
            &loss.buf,
            ga.as_ref().map(|(_, g)| &*g.buf),
            gb.as_ref().map(|(_, g)| &*g.buf),
        )?;
        let grads: Vec<(Var, Tensor<B>)> = ga.into_iter().chain(gb).collect();
        Ok(self.push(
            loss,
            true,
            Some(Box::new(move |t, _| {
                for (v, g) in &grads {
                    t.add_grad_tensor(*v, g)?;
                }
                Ok(())
            })),
            Some(weight),
        ))
    }

    fn row_shape(&self, logits: Var) -> RowShape {
        let (r, c) = self.val(logits).rows_cols();
        RowShape::new(r, c)
    }

    /// `a` and `b` have one shape (the kernels compare only their lengths: a transposed teacher
    /// would pass with its rows misaligned).
    fn same_shape(&self, (an, a): (&'static str, Var), (bn, b): (&'static str, Var)) -> Result<()> {
        let (sa, sb) = (self.val(a).shape, self.val(b).shape);
        if sa != sb {
            return Err(Error::shape(
                bn,
                sb.iter().product(),
                sa.iter().product(),
                format!("{bn} has shape {sb:?} and {an} {sa:?}: they must match"),
            ));
        }
        Ok(())
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

    /// The fused Hinton loss `alpha CE(s, labels) + (1 - alpha) T^2 KL(softmax(t/T) ||
    /// softmax(s/T))` of student logits against teacher logits (a constant, or a variable whose
    /// gradient is wanted: online distillation); weight `spec.grad_scale`. `spec.shape` is taken
    /// from the logits.
    pub fn hinton(
        &self,
        student: Var,
        teacher: Var,
        labels: &B::Labels,
        spec: HintonSpec,
    ) -> Result<Var> {
        self.owns(&[student, teacher])?;
        self.same_shape(("student", student), ("teacher", teacher))?;
        let spec = HintonSpec {
            shape: self.row_shape(student),
            ..spec
        };
        let (s, t) = (self.val(student), self.val(teacher));
        self.loss_op(
            spec.grad_scale,
            (student, self.requires_grad(student)),
            (teacher, self.requires_grad(teacher)),
            |l, gs, gt| {
                self.backend
                    .hinton(&spec, &s.buf, &t.buf, labels, Self::loss_out(l, gs, gt))
            },
        )
    }

    /// Decoupled knowledge distillation `w_ce CE + T^2 (w_tc TCKD + w_nc NCKD)` (`docs/LOSSES.md`
    /// section 8) of student logits against teacher logits, which are detached: the teacher
    /// gets no gradient even where it is a variable (DKD distils a fixed teacher). Weight
    /// `spec.grad_scale`; `spec.shape` is taken from the logits.
    pub fn dkd(
        &self,
        student: Var,
        teacher: Var,
        labels: &B::Labels,
        spec: DkdSpec,
    ) -> Result<Var> {
        self.owns(&[student, teacher])?;
        self.same_shape(("student", student), ("teacher", teacher))?;
        let spec = DkdSpec {
            shape: self.row_shape(student),
            ..spec
        };
        let (s, t) = (self.val(student), self.val(teacher));
        self.loss_op(
            spec.grad_scale,
            (student, self.requires_grad(student)),
            (teacher, false),
            |l, gs, _| {
                self.backend
                    .dkd(&spec, &s.buf, &t.buf, labels, Self::loss_out(l, gs, None))
            },
        )
    }

    /// A soft-target divergence at temperature `T`, `T^2 D(teacher || student)` (forward KL,
    /// reverse KL or JSD; `docs/LOSSES.md` section 2) of student logits against a teacher
    /// (logits, or probabilities, which get no gradient); weight `spec.grad_scale`.
    pub fn divergence(
        &self,
        student: Var,
        teacher: Var,
        labels: Option<&B::Labels>,
        spec: DivergenceSpec,
    ) -> Result<Var> {
        self.owns(&[student, teacher])?;
        self.same_shape(("student", student), ("teacher", teacher))?;
        let spec = DivergenceSpec {
            shape: self.row_shape(student),
            ..spec
        };
        let want_t = self.requires_grad(teacher) && spec.teacher == TeacherInput::Logits;
        let (s, t) = (self.val(student), self.val(teacher));
        self.loss_op(
            spec.grad_scale,
            (student, self.requires_grad(student)),
            (teacher, want_t),
            |l, gs, gt| {
                self.backend
                    .divergence(&spec, &s.buf, &t.buf, labels, Self::loss_out(l, gs, gt))
            },
        )
    }

    /// Cross-entropy `-log softmax(x)_label` (label smoothing, rows labelled `IGNORE_INDEX`
    /// masked) of logits against hard labels; weight `spec.grad_scale`.
    pub fn cross_entropy(
        &self,
        logits: Var,
        labels: &B::Labels,
        spec: CrossEntropySpec,
    ) -> Result<Var> {
        self.owns(&[logits])?;
        let spec = CrossEntropySpec {
            shape: self.row_shape(logits),
            ..spec
        };
        let s = self.val(logits);
        self.loss_op(
            spec.grad_scale,
            (logits, self.requires_grad(logits)),
            (logits, false),
            |l, gs, _| {
                self.backend
                    .cross_entropy(&spec, &s.buf, labels, Self::loss_out(l, gs, None))
            },
        )
    }

    /// Feature MSE `mean((a - b)^2)` between two equal-shape values, of weight `weight`.
    pub fn mse(&self, a: Var, b: Var, weight: f32) -> Result<Var> {
        self.owns(&[a, b])?;
        self.same_shape(("a", a), ("b", b))?;
        let (av, bv) = (self.val(a), self.val(b));
        let spec = MseSpec {
            len: av.len(),
            grad_scale: weight,
        };
        self.loss_op(
            weight,
            (a, self.requires_grad(a)),
            (b, self.requires_grad(b)),
            |l, ga, gb| self.backend.mse(&spec, &av.buf, &bv.buf, l, ga, gb),
        )
    }

    /// Attention transfer between `[N, C, H, W]` feature maps (channels may differ): the mean of
    /// `(u_s - u_t)^2`, `u` the L2-normalised spatial map `mean_c A_c^2` of each example
    /// (`docs/LOSSES.md` section 6), of weight `weight`.
    pub fn attention_transfer(&self, s: Var, t: Var, weight: f32) -> Result<Var> {
        self.owns(&[s, t])?;
        let (sv, tv) = (self.val(s), self.val(t));
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
            weight,
            (s, self.requires_grad(s)),
            (t, self.requires_grad(t)),
            |l, gs, gt| {
                self.backend
                    .attention_transfer(&spec, &sv.buf, &tv.buf, l, gs, gt)
            },
        )
    }

    /// Smooth L1 (Huber, delta 1) between two equal-shape values, mean over elements, of weight
    /// `weight`.
    pub fn smooth_l1(&self, a: Var, b: Var, weight: f32) -> Result<Var> {
        self.owns(&[a, b])?;
        self.same_shape(("a", a), ("b", b))?;
        let (av, bv) = (self.val(a), self.val(b));
        let spec = MseSpec {
            len: av.len(),
            grad_scale: weight,
        };
        self.loss_op(
            weight,
            (a, self.requires_grad(a)),
            (b, self.requires_grad(b)),
            |l, ga, gb| self.backend.smooth_l1(&spec, &av.buf, &bv.buf, l, ga, gb),
        )
    }
}

/// The error for a loss operation on a value that is not a loss.
pub(super) fn not_a_loss() -> Error {
    Error::Unsupported(
        "not a loss value: backward and the loss weights take the values of hinton, dkd, \
         divergence, cross_entropy, mse, smooth_l1, attention_transfer, similarity_preserving, \
         rkd_distance"
            .into(),
    )
}
