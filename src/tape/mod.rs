//! A small autograd tape, after micrograd: values live on the backend, each op records how to
//! send a gradient back to its inputs, and [`Tape::backward`] replays those records in reverse.
//!
//! - A [`Tape`] is one forward pass. An op runs its backend kernel and pushes a node: its value
//!   `y`, whether it needs a gradient, and its backward, a closure that, given `dy = dL/dy`, adds
//!   `dL/dx` into the gradient of each input `x`.
//! - Losses are the roots. A loss kernel writes the loss `l` and, in the same pass, `w dl/dx` for
//!   its inputs; the root keeps those gradients and its weight `w` (`losses.rs`). `backward(&[l_1,
//!   .., l_k])` gives the gradients of `L = sum_j w_j l_j`.
//! - `backward` walks the nodes from the last pushed to the first: every consumer of a value was
//!   pushed after it, so a node's gradient is complete when its turn comes.
//! - A value used several times gets the sum of its consumers' gradients. A gradient tensor
//!   handed over first is kept as it is, shared with whoever made it (a loss root, the op that
//!   passed `dy` on); later ones are added into a buffer the tape alone holds (a shared first one
//!   is copied then), so no other node's buffer ever changes.
//!
//! Most ops take one input and are recorded by `Tape::unary`: allocate `y`, run the forward
//! kernel, push a backward that writes `dx` from `dy`. After the engine come the ops, one file per
//! family: `dense.rs` (matmul, bias add, ReLU, reshape),
//! `conv.rs` (im2col, conv2d, pooling, channels-first), `relational.rs` (row normalisation,
//! pairwise distances, off-diagonal normalisation, similarity-preserving and RKD losses) and
//! `losses.rs` (Hinton, DKD, divergences, cross-entropy, MSE, attention transfer, smooth L1).

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

/// A value recorded on a tape: its node, and which tape (a `Var` of another tape is an error,
/// not another node's value).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Var {
    index: usize,
    tape: u64,
}

/// Each tape's id, distinct within the process.
static NEXT_TAPE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Given `dy`, the gradient of a node's value, adds the gradients of its inputs.
type Backward<'a, B> = Box<dyn Fn(&Tape<'a, B>, &Tensor<B>) -> Result<()> + 'a>;

struct Node<'a, B: Backend> {
    value: Tensor<B>,
    requires_grad: bool,
    backward: Option<Backward<'a, B>>,
    /// A loss root's weight (its backward adds the gradients its kernel wrote, ignoring `dy`).
    weight: Option<f32>,
}

/// The tape of one forward pass.
pub struct Tape<'a, B: Backend> {
    backend: &'a B,
    id: u64,
    nodes: RefCell<Vec<Node<'a, B>>>,
    /// `grads[i]`: `dL/dy` of node `i` once `backward` has reached it (`None`: no gradient).
    grads: RefCell<Vec<Option<Tensor<B>>>>,
}

impl<'a, B: Backend + 'a> Tape<'a, B> {
    pub fn new(backend: &'a B) -> Self {
        Tape {
            backend,
            id: NEXT_TAPE.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
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
        weight: Option<f32>,
    ) -> Var {
        let mut nodes = self.nodes.borrow_mut();
        nodes.push(Node {
            value,
            requires_grad,
            backward,
            weight,
        });
        self.grads.borrow_mut().push(None);
        Var {
            index: nodes.len() - 1,
            tape: self.id,
        }
    }

    /// An error unless every one of `vars` was recorded on this tape (each public op checks its
    /// inputs; the private accessors below then index the nodes directly).
    pub(crate) fn owns(&self, vars: &[Var]) -> Result<()> {
        let len = self.nodes.borrow().len();
        for v in vars {
            if v.tape != self.id || v.index >= len {
                return Err(crate::Error::Unsupported(format!(
                    "{v:?} was recorded on another tape: pass values of the tape the op runs \
                     on (a new forward pass records a new tape; move a value across with \
                     tape.constant(other.value(v)?))"
                )));
            }
        }
        Ok(())
    }

    /// A constant input (no gradient).
    pub fn constant(&self, value: Tensor<B>) -> Var {
        self.push(value, false, None, None)
    }

    /// A trainable leaf (a parameter): its gradient is kept for [`Tape::grad`].
    pub fn leaf(&self, value: Tensor<B>) -> Var {
        self.push(value, true, None, None)
    }

    /// `v`'s value (an error for a `Var` of another tape).
    pub fn value(&self, v: Var) -> Result<Tensor<B>> {
        self.owns(&[v])?;
        Ok(self.val(v))
    }

    /// `v`'s value, `v` checked by the caller ([`Tape::owns`]).
    fn val(&self, v: Var) -> Tensor<B> {
        self.nodes.borrow()[v.index].value.clone()
    }

    fn requires_grad(&self, v: Var) -> bool {
        self.nodes.borrow()[v.index].requires_grad
    }

    /// The gradient `dL/dv` after [`Tape::backward`] (`None` if `v` got none; an error for a
    /// `Var` of another tape).
    pub fn grad(&self, v: Var) -> Result<Option<Tensor<B>>> {
        self.owns(&[v])?;
        Ok(self.grad_of(v))
    }

    fn grad_of(&self, v: Var) -> Option<Tensor<B>> {
        self.grads.borrow()[v.index].clone()
    }

    /// Records a one-input op `y = f(x)`, the form most ops take: allocates `y` of `shape` (zeroed)
    /// and runs `forward(backend, x, y)`; its backward allocates `dx` of `x`'s shape (zeroed),
    /// runs `backward(backend, x, y, dy, dx)` to write `dL/dx`, and adds `dx` into `x`'s gradient.
    fn unary(
        &self,
        x: Var,
        shape: &[usize],
        forward: impl FnOnce(&B, &B::Buffer, &B::Buffer) -> Result<()>,
        backward: impl Fn(&B, &B::Buffer, &B::Buffer, &B::Buffer, &B::Buffer) -> Result<()> + 'a,
    ) -> Result<Var> {
        let xv = self.val(x);
        let y = Tensor::zeros(self.backend, shape)?;
        forward(self.backend, &xv.buf, &y.buf)?;
        let yv = y.clone();
        let backward: Backward<'a, B> = Box::new(move |t, dy| {
            let dx = Tensor::zeros(t.backend, &xv.shape)?;
            backward(t.backend, &xv.buf, &yv.buf, &dy.buf, &dx.buf)?;
            t.add_grad_tensor(x, &dx)
        });
        Ok(self.push(y, self.requires_grad(x), Some(backward), None))
    }

    /// Adds a gradient into `v` through `write(dst, accumulate)`: the first gets a new zeroed
    /// buffer (`accumulate = false`), later ones add into the tape's own one.
    fn add_grad(&self, v: Var, write: impl FnOnce(&B::Buffer, bool) -> Result<()>) -> Result<()> {
        if !self.requires_grad(v) {
            return Ok(());
        }
        if let Some(acc) = self.grad_to_add_into(v)? {
            return write(&acc, true);
        }
        let g = Tensor::zeros(self.backend, &self.nodes.borrow()[v.index].value.shape)?;
        write(&g.buf, false)?;
        self.grads.borrow_mut()[v.index] = Some(g);
        Ok(())
    }

    /// Adds the gradient `g` into `v` (in `v`'s shape or another of as many elements): the first
    /// is kept as it is, shared; later ones are added into the tape's own buffer.
    fn add_grad_tensor(&self, v: Var, g: &Tensor<B>) -> Result<()> {
        if !self.requires_grad(v) {
            return Ok(());
        }
        if let Some(acc) = self.grad_to_add_into(v)? {
            return self.backend.axpy(1.0, &g.buf, &acc);
        }
        let shape = self.nodes.borrow()[v.index].value.shape.clone();
        self.grads.borrow_mut()[v.index] = Some(Tensor {
            buf: g.buf.clone(),
            shape,
        });
        Ok(())
    }

    /// `v`'s gradient buffer to add into, or `None` before its first gradient. A buffer someone
    /// else also holds (a loss root's saved gradient, the `dy` a reshape or bias add passed on, a
    /// tensor from [`Tape::grad`]) is first replaced by a copy the tape alone holds.
    fn grad_to_add_into(&self, v: Var) -> Result<Option<Rc<B::Buffer>>> {
        let mut grads = self.grads.borrow_mut();
        let Some(g) = grads[v.index].as_mut() else {
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

    /// Back-propagates from the given loss roots: the gradients of `L = sum_j w_j l_j`, each root
    /// `l_j` of weight `w_j`. The gradients of an earlier `backward` on this tape are dropped
    /// first, so each call gives those of the roots it is given.
    pub fn backward(&self, losses: &[Var]) -> Result<()> {
        self.owns(losses)?;
        let len = self.nodes.borrow().len();
        let mut roots = vec![false; len];
        for l in losses {
            if self.loss_weight(*l)?.is_none() {
                return Err(losses::not_a_loss());
            }
            roots[l.index] = true;
        }
        self.grads.borrow_mut().fill(None);
        for i in (0..len).rev() {
            let nodes = self.nodes.borrow();
            let node = &nodes[i];
            let Some(backward) = &node.backward else {
                continue;
            };
            let dy = match node.weight {
                // A root starts from its own gradients; one not asked for contributes nothing.
                Some(_) if roots[i] => node.value.clone(),
                Some(_) => continue,
                None => match self.grad_of(Var {
                    index: i,
                    tape: self.id,
                }) {
                    Some(g) => g,
                    None => continue,
                },
            };
            backward(self, &dy)?;
        }
        Ok(())
    }
}
