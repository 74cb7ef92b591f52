//! The relational primitives (row normalisation, pairwise distances, off-diagonal
//! normalisation) and the relation-based losses composed from them.

use super::{Tape, Var};
use crate::backend::Backend;
use crate::error::Result;

impl<'a, B: Backend + 'a> Tape<'a, B> {
    /// Each row divided by its L2 norm, `y = x / max(||x||, 1e-12)` row by row.
    pub fn row_normalize(&self, x: Var) -> Result<Var> {
        self.owns(&[x])?;
        let xv = self.val(x);
        let (_, cols) = xv.rows_cols();
        self.unary(
            x,
            &xv.shape,
            |b, x, y| b.row_normalize(cols, x, y),
            move |b, x, _, dy, dx| b.row_normalize_backward(cols, x, dy, dx),
        )
    }

    /// Pairwise Euclidean distances between the rows of `f` `[n, dim]`: `[n, n]`, `d_ij =
    /// sqrt(max(||f_i - f_j||^2, 1e-12))` off the diagonal, 0 on it.
    pub fn pairwise_distance(&self, f: Var) -> Result<Var> {
        self.owns(&[f])?;
        let (n, dim) = self.val(f).rows_cols();
        self.unary(
            f,
            &[n, n],
            |b, f, d| b.pairwise_distance(n, dim, f, d),
            move |b, f, d, dy, df| b.pairwise_distance_backward(n, dim, f, d, dy, df),
        )
    }

    /// An `[n, n]` matrix divided by the mean of its off-diagonal entries: `y = d / m`,
    /// `m = sum_{i != j} d_ij / (n (n - 1))`.
    pub fn offdiag_normalize(&self, d: Var) -> Result<Var> {
        self.owns(&[d])?;
        let (n, _) = self.val(d).rows_cols();
        self.unary(
            d,
            &[n, n],
            |b, d, y| b.offdiag_normalize(n, d, y),
            move |b, d, _, dy, dd| b.offdiag_normalize_backward(n, d, dy, dd),
        )
    }

    /// Similarity-preserving KD (Tung and Mori 2019) between `[N, Ds]` and `[N, Dt]` features:
    /// `(1/N^2) ||normalize(Fs Fs^T) - normalize(Ft Ft^T)||^2` (`docs/LOSSES.md` section 7), built
    /// from matmul, row normalisation and MSE on the tape.
    pub fn similarity_preserving(&self, fs: Var, ft: Var, weight: f32) -> Result<Var> {
        self.owns(&[fs, ft])?;
        let gs = self.matmul_nt(fs, fs)?;
        let gt = self.matmul_nt(ft, ft)?;
        let (ns, nt) = (self.row_normalize(gs)?, self.row_normalize(gt)?);
        self.mse(ns, nt, weight)
    }

    /// RKD distance (Park et al. 2019): pairwise distances of each side divided by their
    /// off-diagonal mean, compared with smooth L1, mean over `N*N` (`docs/LOSSES.md` section 7).
    pub fn rkd_distance(&self, fs: Var, ft: Var, weight: f32) -> Result<Var> {
        self.owns(&[fs, ft])?;
        let ds = self.pairwise_distance(fs)?;
        let dt = self.pairwise_distance(ft)?;
        let (ys, yt) = (self.offdiag_normalize(ds)?, self.offdiag_normalize(dt)?);
        self.smooth_l1(ys, yt, weight)
    }
}
