//! A small autograd tape (after micrograd): values live on the backend, each op records its backward
//! on the tape in push order, and [`Tape::backward`] walks the tape in reverse, accumulating
//! gradients into each input.
//!
//! Losses are roots: a loss op computes its gradient in the same fused kernel as its value, scaled
//! by the `grad_scale` (weight) given when it is recorded; `backward(&[loss, ..])` starts from
//! those gradients. Every other op's backward receives the gradient of its output.

use std::cell::RefCell;
use std::rc::Rc;

use crate::backend::{Backend, GradOut, LossOut};
use crate::error::{Error, Result};
use crate::ops::conv::{ConvSpec, PoolSpec};
use crate::ops::dense::MatmulSpec;
use crate::ops::{AttentionSpec, CrossEntropySpec, DivergenceSpec, HintonSpec, MseSpec, RowShape};

/// A device buffer and its shape (row-major). Cloning shares the buffer.
pub struct Tensor<B: Backend> {
    pub buf: Rc<B::Buffer>,
    pub shape: Vec<usize>,
}

impl<B: Backend> Clone for Tensor<B> {
    fn clone(&self) -> Self {
        Tensor {
            buf: self.buf.clone(),
            shape: self.shape.clone(),
        }
    }
}

impl<B: Backend> Tensor<B> {
    pub fn new(buf: B::Buffer, shape: &[usize]) -> Self {
        Tensor {
            buf: Rc::new(buf),
            shape: shape.to_vec(),
        }
    }

    pub fn from_host(backend: &B, data: &[f32], shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::shape(
                "tensor data",
                data.len(),
                n,
                format!("shape {shape:?}"),
            ));
        }
        Ok(Tensor::new(backend.upload(data)?, shape))
    }

    pub fn zeros(backend: &B, shape: &[usize]) -> Result<Self> {
        Ok(Tensor::new(
            backend.filled(shape.iter().product(), 0.0)?,
            shape,
        ))
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `[rows, cols]` of a matrix (a 1-D tensor is one row).
    pub fn rows_cols(&self) -> (usize, usize) {
        match self.shape.as_slice() {
            [c] => (1, *c),
            [r, rest @ ..] => (*r, rest.iter().product()),
            [] => (1, 1),
        }
    }

    pub fn to_host(&self, backend: &B) -> Result<Vec<f32>> {
        backend.download(&self.buf)
    }
}

/// A value recorded on a tape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Var(usize);

type Backward<'a, B> = Box<dyn Fn(&Tape<'a, B>, &Tensor<B>) -> Result<()> + 'a>;

struct Node<'a, B: Backend> {
    value: Tensor<B>,
    requires_grad: bool,
    /// Given the gradient of this node's value, adds the gradients of its inputs.
    backward: Option<Backward<'a, B>>,
    /// For loss roots: the gradient of the loss w.r.t. its inputs, computed in the forward kernel.
    is_loss: bool,
}

/// The tape of one forward pass.
pub struct Tape<'a, B: Backend> {
    backend: &'a B,
    nodes: RefCell<Vec<Node<'a, B>>>,
    grads: RefCell<Vec<Option<Tensor<B>>>>,
}

impl<'a, B: Backend + 'a> Tape<'a, B> {
    pub fn new(backend: &'a B) -> Self {
        Tape {
            backend,
            nodes: RefCell::new(Vec::new()),
            grads: RefCell::new(Vec::new()),
        }
    }

    pub fn backend(&self) -> &'a B {
        self.backend
    }

    fn push(
        &self,
        value: Tensor<B>,
        requires_grad: bool,
        backward: Option<Backward<'a, B>>,
        is_loss: bool,
    ) -> Var {
        let mut nodes = self.nodes.borrow_mut();
        nodes.push(Node {
            value,
            requires_grad,
            backward,
            is_loss,
        });
        self.grads.borrow_mut().push(None);
        Var(nodes.len() - 1)
    }

    /// A constant input (no gradient).
    pub fn constant(&self, value: Tensor<B>) -> Var {
        self.push(value, false, None, false)
    }

    /// A trainable leaf (a parameter): its gradient is kept for [`Tape::grad`].
    pub fn leaf(&self, value: Tensor<B>) -> Var {
        self.push(value, true, None, false)
    }

    pub fn value(&self, v: Var) -> Tensor<B> {
        self.nodes.borrow()[v.0].value.clone()
    }

    fn requires_grad(&self, v: Var) -> bool {
        self.nodes.borrow()[v.0].requires_grad
    }

    /// The accumulated gradient of `v` after [`Tape::backward`].
    pub fn grad(&self, v: Var) -> Option<Tensor<B>> {
        self.grads.borrow()[v.0].clone()
    }

    /// `v`'s gradient buffer to add into, or `None` before its first gradient. A buffer someone
    /// else also holds (a loss root's saved gradient, the output gradient a reshape or bias add
    /// passed on, a tensor from [`Tape::grad`]) is first replaced by a copy the tape alone holds,
    /// so that accumulating never changes another node's buffer.
    fn grad_to_add_into(&self, v: Var) -> Result<Option<Rc<B::Buffer>>> {
        let mut grads = self.grads.borrow_mut();
        let Some(g) = grads[v.0].as_mut() else {
            return Ok(None);
        };
        if Rc::strong_count(&g.buf) > 1 {
            // -0.0 is the additive identity of every f32 (both zeros included): an exact copy.
            let copy = self.backend.filled(g.len(), -0.0)?;
            self.backend.axpy(1.0, &g.buf, &copy)?;
            g.buf = Rc::new(copy);
        }
        Ok(Some(g.buf.clone()))
    }

    /// Adds a gradient into `v` through `write(dst, accumulate)`: the first gradient gets a new
    /// buffer (`accumulate = false`), later ones add into it.
    fn add_grad(&self, v: Var, write: impl FnOnce(&B::Buffer, bool) -> Result<()>) -> Result<()> {
        if !self.requires_grad(v) {
            return Ok(());
        }
        if let Some(acc) = self.grad_to_add_into(v)? {
            return write(&acc, true);
        }
        let shape = self.nodes.borrow()[v.0].value.shape.clone();
        let g = Tensor::zeros(self.backend, &shape)?;
        write(&g.buf, false)?;
        self.grads.borrow_mut()[v.0] = Some(g);
        Ok(())
    }

    /// Adds a whole gradient tensor into `v`: the first is kept as it is (shared, not copied),
    /// later ones are added into a buffer the tape alone holds.
    fn add_grad_tensor(&self, v: Var, g: &Tensor<B>) -> Result<()> {
        if !self.requires_grad(v) {
            return Ok(());
        }
        match self.grad_to_add_into(v)? {
            Some(acc) => self.backend.axpy(1.0, &g.buf, &acc),
            None => {
                self.grads.borrow_mut()[v.0] = Some(g.clone());
                Ok(())
            }
        }
    }

    // ---- ops ----

    /// `x [m, k] @ w [k, n]`.
    pub fn matmul(&self, x: Var, w: Var) -> Result<Var> {
        self.matmul_op(x, w, false)
    }

    /// `a [m, k] @ b^T` with `b` `[n, k]`: `[m, n]` (e.g. the Gram matrix `F F^T`).
    pub fn matmul_nt(&self, a: Var, b: Var) -> Result<Var> {
        self.matmul_op(a, b, true)
    }

    /// `a @ op(b)`, `op(b) = b` `[k, n]` or, with `trans_b`, `b^T` for `b` `[n, k]`.
    fn matmul_op(&self, a: Var, b: Var, trans_b: bool) -> Result<Var> {
        let (av, bv) = (self.value(a), self.value(b));
        let (m, k) = av.rows_cols();
        let (k2, n) = if trans_b {
            let (r, c) = bv.rows_cols();
            (c, r)
        } else {
            bv.rows_cols()
        };
        if k != k2 {
            let form = if trans_b {
                format!("[{m}, {k}] @ [n, {k}]^T")
            } else {
                format!("[{m}, {k}] @ [{k}, n]")
            };
            return Err(Error::shape("matmul right operand", k2, k, form));
        }
        let out = Tensor::new(self.backend.filled(m * n, 0.0)?, &[m, n]);
        self.backend.matmul(
            &MatmulSpec {
                trans_b,
                ..MatmulSpec::new(m, k, n)
            },
            &av.buf,
            &bv.buf,
            &out.buf,
        )?;
        let needs = self.requires_grad(a) || self.requires_grad(b);
        Ok(self.push(
            out,
            needs,
            Some(Box::new(move |t, dy| {
                // da = dy op(b)^T: [m, n] x [n, k] (b^T read transposed when b is [k, n]).
                t.add_grad(a, |dst, acc| {
                    let spec = MatmulSpec {
                        trans_b: !trans_b,
                        accumulate: acc,
                        ..MatmulSpec::new(m, n, k)
                    };
                    t.backend.matmul(&spec, &dy.buf, &bv.buf, dst)
                })?;
                // db = a^T dy ([k, n]), or for b^T: dy^T a ([n, k]).
                t.add_grad(b, |dst, acc| {
                    if trans_b {
                        let spec = MatmulSpec {
                            trans_a: true,
                            accumulate: acc,
                            ..MatmulSpec::new(n, m, k)
                        };
                        t.backend.matmul(&spec, &dy.buf, &av.buf, dst)
                    } else {
                        let spec = MatmulSpec {
                            trans_a: true,
                            accumulate: acc,
                            ..MatmulSpec::new(k, m, n)
                        };
                        t.backend.matmul(&spec, &av.buf, &dy.buf, dst)
                    }
                })
            })),
            false,
        ))
    }

    /// `x [m, n] + b [n]` on every row.
    pub fn bias_add(&self, x: Var, b: Var) -> Result<Var> {
        let (xv, bv) = (self.value(x), self.value(b));
        let out = Tensor::new(self.backend.filled(xv.len(), 0.0)?, &xv.shape);
        self.backend.bias_add(&xv.buf, &bv.buf, &out.buf)?;
        let needs = self.requires_grad(x) || self.requires_grad(b);
        Ok(self.push(
            out,
            needs,
            Some(Box::new(move |t, dy| {
                t.add_grad_tensor(x, dy)?;
                t.add_grad(b, |dst, acc| t.backend.sum_rows(&dy.buf, dst, acc))
            })),
            false,
        ))
    }

    /// `max(x, 0)`.
    pub fn relu(&self, x: Var) -> Result<Var> {
        let xv = self.value(x);
        let out = Tensor::new(self.backend.filled(xv.len(), 0.0)?, &xv.shape);
        self.backend.relu(&xv.buf, &out.buf)?;
        let y = out.clone();
        let needs = self.requires_grad(x);
        Ok(self.push(
            out,
            needs,
            Some(Box::new(move |t, dy| {
                let dx = Tensor::new(t.backend.filled(dy.len(), 0.0)?, &dy.shape);
                t.backend.relu_backward(&y.buf, &dy.buf, &dx.buf)?;
                t.add_grad_tensor(x, &dx)
            })),
            false,
        ))
    }

    /// The same values under another shape with as many elements (e.g. flatten).
    pub fn reshape(&self, x: Var, shape: &[usize]) -> Result<Var> {
        let xv = self.value(x);
        let n: usize = shape.iter().product();
        if n != xv.len() {
            return Err(Error::shape(
                "reshape",
                n,
                xv.len(),
                format!("{:?} -> {shape:?}", xv.shape),
            ));
        }
        let out = Tensor {
            buf: xv.buf.clone(),
            shape: shape.to_vec(),
        };
        let needs = self.requires_grad(x);
        let in_shape = xv.shape.clone();
        Ok(self.push(
            out,
            needs,
            Some(Box::new(move |t, dy| {
                t.add_grad_tensor(
                    x,
                    &Tensor {
                        buf: dy.buf.clone(),
                        shape: in_shape.clone(),
                    },
                )
            })),
            false,
        ))
    }

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

    /// Each row divided by its L2 norm (floored at 1e-12).
    pub fn row_normalize(&self, x: Var) -> Result<Var> {
        let xv = self.value(x);
        let (_, cols) = xv.rows_cols();
        let out = Tensor::new(self.backend.filled(xv.len(), 0.0)?, &xv.shape);
        self.backend.row_normalize(cols, &xv.buf, &out.buf)?;
        let needs = self.requires_grad(x);
        Ok(self.push(
            out,
            needs,
            Some(Box::new(move |t, dy| {
                let dx = Tensor::new(t.backend.filled(dy.len(), 0.0)?, &dy.shape);
                t.backend
                    .row_normalize_backward(cols, &xv.buf, &dy.buf, &dx.buf)?;
                t.add_grad_tensor(x, &dx)
            })),
            false,
        ))
    }

    /// Pairwise Euclidean distances `[n, n]` between the rows of `f` `[n, dim]`.
    pub fn pairwise_distance(&self, f: Var) -> Result<Var> {
        let fv = self.value(f);
        let (n, dim) = fv.rows_cols();
        let out = Tensor::new(self.backend.filled(n * n, 0.0)?, &[n, n]);
        self.backend.pairwise_distance(n, dim, &fv.buf, &out.buf)?;
        let d = out.clone();
        let needs = self.requires_grad(f);
        Ok(self.push(
            out,
            needs,
            Some(Box::new(move |t, dy| {
                let df = Tensor::new(t.backend.filled(n * dim, 0.0)?, &fv.shape);
                t.backend
                    .pairwise_distance_backward(n, dim, &fv.buf, &d.buf, &dy.buf, &df.buf)?;
                t.add_grad_tensor(f, &df)
            })),
            false,
        ))
    }

    /// An `[n, n]` matrix divided by the mean of its off-diagonal entries.
    pub fn offdiag_normalize(&self, d: Var) -> Result<Var> {
        let dv = self.value(d);
        let (n, _) = dv.rows_cols();
        let out = Tensor::new(self.backend.filled(n * n, 0.0)?, &[n, n]);
        self.backend.offdiag_normalize(n, &dv.buf, &out.buf)?;
        let needs = self.requires_grad(d);
        Ok(self.push(
            out,
            needs,
            Some(Box::new(move |t, dy| {
                let dd = Tensor::new(t.backend.filled(n * n, 0.0)?, &[n, n]);
                t.backend
                    .offdiag_normalize_backward(n, &dv.buf, &dy.buf, &dd.buf)?;
                t.add_grad_tensor(d, &dd)
            })),
            false,
        ))
    }

    // ---- losses (roots) ----

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

    /// Similarity-preserving KD (Tung and Mori 2019) between `[N, Ds]` and `[N, Dt]` features:
    /// `(1/N^2) ||normalize(Fs Fs^T) - normalize(Ft Ft^T)||^2` (`docs/LOSSES.md` section 7), built
    /// from matmul, row normalisation and MSE on the tape.
    pub fn similarity_preserving(&self, fs: Var, ft: Var, weight: f32) -> Result<Var> {
        let gs = self.matmul_nt(fs, fs)?;
        let gt = self.matmul_nt(ft, ft)?;
        let (ns, nt) = (self.row_normalize(gs)?, self.row_normalize(gt)?);
        self.mse(ns, nt, weight)
    }

    /// RKD distance (Park et al. 2019): pairwise distances of each side divided by their
    /// off-diagonal mean, compared with smooth L1, mean over `N*N` (`docs/LOSSES.md` section 7).
    pub fn rkd_distance(&self, fs: Var, ft: Var, weight: f32) -> Result<Var> {
        let ds = self.pairwise_distance(fs)?;
        let dt = self.pairwise_distance(ft)?;
        let (ys, yt) = (self.offdiag_normalize(ds)?, self.offdiag_normalize(dt)?);
        self.smooth_l1(ys, yt, weight)
    }

    /// Back-propagates from the given loss roots, in reverse push order. The gradients of an
    /// earlier `backward` on this tape are dropped first: each call gives the gradients of the
    /// roots it is given.
    pub fn backward(&self, losses: &[Var]) -> Result<()> {
        let len = self.nodes.borrow().len();
        let mut active = vec![false; len];
        for l in losses {
            if !self.nodes.borrow()[l.0].is_loss {
                return Err(Error::Unsupported(
                    "backward starts from loss values (hinton, divergence, cross_entropy, mse, smooth_l1, \
                     attention_transfer, similarity_preserving, rkd_distance)"
                        .into(),
                ));
            }
            active[l.0] = true;
        }
        self.grads.borrow_mut().fill(None);
        for i in (0..len).rev() {
            let dy = if active[i] {
                self.value(Var(i)) // a loss root ignores its incoming gradient
            } else {
                match self.grads.borrow()[i].clone() {
                    Some(g) => g,
                    None => continue,
                }
            };
            let nodes = self.nodes.borrow();
            if let Some(f) = &nodes[i].backward {
                if nodes[i].is_loss && !active[i] {
                    continue; // a loss not asked for contributes nothing
                }
                f(self, &dy)?;
            }
        }
        Ok(())
    }
}
