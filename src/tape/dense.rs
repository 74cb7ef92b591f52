//! Dense ops: matmul (with a transposed right operand), bias add, ReLU and reshape.

use super::{Tape, Tensor, Var};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::ops::dense::MatmulSpec;

impl<'a, B: Backend + 'a> Tape<'a, B> {
    /// `y = x w` for `x [m, k]`, `w [k, n]`; backward: `dx = dy w^T`, `dw = x^T dy`.
    pub fn matmul(&self, x: Var, w: Var) -> Result<Var> {
        self.owns(&[x, w])?;
        self.matmul_op(x, w, false)
    }

    /// `y = a b^T` for `a [m, k]`, `b [n, k]`: `[m, n]` (e.g. the Gram matrix `F F^T`); backward:
    /// `da = dy b`, `db = dy^T a`.
    pub fn matmul_nt(&self, a: Var, b: Var) -> Result<Var> {
        self.owns(&[a, b])?;
        self.matmul_op(a, b, true)
    }

    /// `a @ op(b)`, `op(b) = b` `[k, n]` or, with `trans_b`, `b^T` for `b` `[n, k]`.
    fn matmul_op(&self, a: Var, b: Var, trans_b: bool) -> Result<Var> {
        let (av, bv) = (self.val(a), self.val(b));
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
            None,
        ))
    }

    /// `y = x + b` for `x [m, n]`, `b [n]` added to every row; backward: `dx = dy` (passed on
    /// shared), `db = sum of dy's rows`.
    pub fn bias_add(&self, x: Var, b: Var) -> Result<Var> {
        self.owns(&[x, b])?;
        let (xv, bv) = (self.val(x), self.val(b));
        // (the backend's bias add only needs len(x) to be a multiple of len(b): a bias of the
        // wrong length would be tiled over a flattened view)
        let cols = xv.shape.last().copied().unwrap_or(1);
        if bv.len() != cols {
            return Err(Error::shape(
                "bias",
                bv.len(),
                cols,
                format!(
                    "one bias per entry of x's last dimension (x is {:?})",
                    xv.shape
                ),
            ));
        }
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
            None,
        ))
    }

    /// `y = max(x, 0)`; `dx = dy` where `y > 0`, else 0.
    pub fn relu(&self, x: Var) -> Result<Var> {
        self.owns(&[x])?;
        let shape = self.val(x).shape;
        self.unary(
            x,
            &shape,
            |b, x, y| b.relu(x, y),
            |b, _, y, dy, dx| b.relu_backward(y, dy, dx),
        )
    }

    /// The same values under another shape with as many elements (e.g. flatten); the buffer is
    /// shared, and so is the gradient passed back.
    pub fn reshape(&self, x: Var, shape: &[usize]) -> Result<Var> {
        self.owns(&[x])?;
        let xv = self.val(x);
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
        Ok(self.push(
            out,
            needs,
            Some(Box::new(move |t, dy| t.add_grad_tensor(x, dy))),
            None,
        ))
    }
}
