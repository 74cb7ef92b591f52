//! Dense-network ops for the autograd tape: matmul with optional transposes, bias add and its
//! gradient (column sums), ReLU, and `y += alpha x`. CPU references here (f64 accumulation);
//! WGSL in `dense.wgsl`.
//!
//! Matmul: `C[m, n] (+)= op(A)[m, k] op(B)[k, n]`, `op(A) = A` stored `[m, k]` or, transposed,
//! `A^T` with `A` stored `[k, m]`; likewise `B` stored `[k, n]` or `[n, k]`.
//!
//! | piece | file |
//! | --- | --- |
//! | specs and validation | here |
//! | f64 reference | `reference.rs` |
//! | WGSL and its dispatch | `dense.wgsl`, `wgpu.rs` |
//! | CUDA and its launch | `dense.cu`, `cuda.rs` |

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod reference;
pub mod wgpu;

use crate::error::{Error, Result};

/// Shape and layout of a matmul.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulSpec {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    /// Add into C instead of overwriting it.
    pub accumulate: bool,
}

impl MatmulSpec {
    pub fn new(m: usize, k: usize, n: usize) -> Self {
        MatmulSpec {
            m,
            k,
            n,
            trans_a: false,
            trans_b: false,
            accumulate: false,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.m == 0 || self.k == 0 || self.n == 0 {
            return Err(Error::Unsupported(format!(
                "matmul [{}, {}] x [{}, {}]: every dimension must be at least 1",
                self.m, self.k, self.k, self.n
            )));
        }
        let biggest = (self.m * self.k).max(self.k * self.n).max(self.m * self.n);
        if biggest > u32::MAX as usize {
            return Err(Error::Limit("matmul operand over 2^32 elements".into()));
        }
        Ok(())
    }
}
