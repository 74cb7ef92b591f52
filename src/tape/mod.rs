//! A small autograd tape (after micrograd): values live on the backend, each op records its backward
//! on the tape in push order, and [`Tape::backward`] walks the tape in reverse, accumulating
//! gradients into each input.
//!
//! Losses are roots: a loss op computes its gradient in the same fused kernel as its value, scaled
//! by the `grad_scale` (weight) given when it is recorded; `backward(&[loss, ..])` starts from
//! those gradients. Every other op's backward receives the gradient of its output.

use std::cell::RefCell;
use std::rc::Rc;

use crate::backend::Backend;
use crate::error::{Error, Result};

mod conv;
mod dense;
mod losses;
mod relational;

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

    /// Records a one-input op `y = f(x)`, the form most ops take: allocates `y` of `shape` (zeroed)
    /// and runs `forward(backend, x, y)`; its backward allocates `dx` of `x`'s shape (zeroed),
    /// runs `backward(backend, x, y, dy, dx)` to write `dL/dx` from `dy = dL/dy`, and adds `dx`
    /// into `x`'s gradient.
    fn unary(
        &self,
        x: Var,
        shape: &[usize],
        forward: impl FnOnce(&B, &B::Buffer, &B::Buffer) -> Result<()>,
        backward: impl Fn(&B, &B::Buffer, &B::Buffer, &B::Buffer, &B::Buffer) -> Result<()> + 'a,
    ) -> Result<Var> {
        let xv = self.value(x);
        let y = Tensor::zeros(self.backend, shape)?;
        forward(self.backend, &xv.buf, &y.buf)?;
        let yv = y.clone();
        let needs = self.requires_grad(x);
        Ok(self.push(
            y,
            needs,
            Some(Box::new(move |t, dy| {
                let dx = Tensor::zeros(t.backend, &xv.shape)?;
                backward(t.backend, &xv.buf, &yv.buf, &dy.buf, &dx.buf)?;
                t.add_grad_tensor(x, &dx)
            })),
            false,
        ))
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

    /// Adds a whole gradient tensor into `v` (of `v`'s shape, in any shape of as many elements):
    /// the first is kept as it is (shared, not copied), later ones are added into a buffer the
    /// tape alone holds.
    fn add_grad_tensor(&self, v: Var, g: &Tensor<B>) -> Result<()> {
        if !self.requires_grad(v) {
            return Ok(());
        }
        match self.grad_to_add_into(v)? {
            Some(acc) => self.backend.axpy(1.0, &g.buf, &acc),
            None => {
                let shape = self.nodes.borrow()[v.0].value.shape.clone();
                let g = Tensor {
                    buf: g.buf.clone(),
                    shape,
                };
                self.grads.borrow_mut()[v.0] = Some(g);
                Ok(())
            }
        }
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
