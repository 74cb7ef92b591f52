//! The relational primitives (row normalisation, pairwise distances, off-diagonal
//! normalisation) and the relation-based losses composed from them.

use super::{Tape, Tensor, Var};
use crate::backend::Backend;
use crate::error::Result;

impl<'a, B: Backend + 'a> Tape<'a, B> {
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
}
