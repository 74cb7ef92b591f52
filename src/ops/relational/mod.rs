//! Primitives for the relation-based losses (`docs/LOSSES.md` section 7), composed on the tape:
//!
//! - similarity-preserving (Tung and Mori 2019): `G = row_l2_normalize(F F^T)`,
//!   `L = (1/N^2) ||G_s - G_t||_F^2` (matmul, [`reference::row_normalize`], MSE);
//! - RKD distance (Park et al. 2019): `D = pairwise distances`, divided by the mean of its
//!   off-diagonal entries, compared with smooth L1 (Huber, delta 1), mean over all `N*N` entries
//!   ([`reference::pairwise_distance`], [`reference::offdiag_normalize`],
//!   [`super::feature::reference::smooth_l1`]).
//!
//! | piece | file |
//! | --- | --- |
//! | f64 reference (the compositions too) | `reference.rs` |
//! | WGSL and its dispatch | `relational.wgsl`, `wgpu.rs` |
//! | CUDA and its launch | `relational.cu`, `cuda.rs` |
//!
//! Smooth L1 runs on the MSE kernels ([`super::feature`]).

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod reference;
pub mod wgpu;
