//! The table of CUDA kernels: every `.cu` file and every entry point the backend launches, each
//! declared beside its source in the op's folder (`src/ops/<family>/cuda.rs`) and listed here
//! once. `tests/suite/nvrtc.rs` compiles every file and checks each signature against the PTX.

use crate::ops;

/// `common.cuh`, prepended to every kernel file (warp and block reductions, the online-softmax
/// state, the numerics the row losses share).
pub const COMMON_SOURCE: &str = include_str!("common.cuh");

/// One `.cu` file.
#[derive(Debug)]
pub struct CudaSource {
    pub file: &'static str,
    pub code: &'static str,
}

/// One entry point of a `.cu` file, with its parameter kinds: one letter per parameter, in
/// order: `p` a device pointer, `u` u32, `i` i32, `l` u64, `f` f32, `d` f64. Each launch is
/// checked against it.
#[derive(Debug)]
pub struct CudaKernel {
    pub file: &'static str,
    pub name: &'static str,
    pub signature: &'static str,
}

/// `reduce.cu`: the valid-row count and the fixed-order reduction of the row losses.
pub(crate) const REDUCE: CudaSource = CudaSource {
    file: "reduce.cu",
    code: include_str!("reduce.cu"),
};
pub(crate) const COUNT_VALID: CudaKernel = CudaKernel {
    file: "reduce.cu",
    name: "count_valid",
    signature: "puip",
};
pub(crate) const REDUCE_ROWS: CudaKernel = CudaKernel {
    file: "reduce.cu",
    name: "reduce_rows",
    signature: "pupup",
};

/// Every kernel file, one line each.
pub const SOURCES: &[&CudaSource] = &[
    &ops::softmax::cuda::SOURCE,
    &REDUCE,
    &ops::divergence::cuda::SOURCE,
    &ops::cross_entropy::cuda::SOURCE,
    &ops::hinton::cuda::SOURCE,
    &ops::dkd::cuda::SOURCE,
    &ops::sparse::cuda::SOURCE,
    &ops::sharded::cuda::SOURCE,
    &ops::feature::cuda::SOURCE,
    &ops::dense::cuda::SOURCE,
    &ops::optim::cuda::SOURCE,
    &ops::conv::cuda::SOURCE,
    &ops::relational::cuda::SOURCE,
];

/// Every entry point the backend launches, one line each.
pub const KERNELS: &[&CudaKernel] = &[
    &ops::softmax::cuda::FORWARD_WARP,
    &ops::softmax::cuda::FORWARD_BLOCK,
    &ops::softmax::cuda::BACKWARD_WARP,
    &ops::softmax::cuda::BACKWARD_BLOCK,
    &COUNT_VALID,
    &REDUCE_ROWS,
    &ops::divergence::cuda::WARP,
    &ops::divergence::cuda::BLOCK,
    &ops::cross_entropy::cuda::WARP,
    &ops::cross_entropy::cuda::BLOCK,
    &ops::hinton::cuda::WARP,
    &ops::hinton::cuda::BLOCK,
    &ops::dkd::cuda::WARP,
    &ops::dkd::cuda::BLOCK,
    &ops::sparse::cuda::KERNEL,
    &ops::sharded::cuda::STATS_KERNEL,
    &ops::sharded::cuda::JSD_KERNEL,
    &ops::sharded::cuda::LOSS_KERNEL,
    &ops::feature::cuda::MSE_PARTIAL,
    &ops::feature::cuda::MSE_FINAL,
    &ops::feature::cuda::AT_MAP,
    &ops::feature::cuda::AT_NORM,
    &ops::feature::cuda::AT_LOSS,
    &ops::feature::cuda::AT_GRAD,
    &ops::dense::cuda::MATMUL,
    &ops::dense::cuda::BIAS_ADD,
    &ops::dense::cuda::SUM_ROWS,
    &ops::dense::cuda::RELU,
    &ops::dense::cuda::RELU_BACKWARD,
    &ops::dense::cuda::AXPY,
    &ops::dense::cuda::COPY_ROWS,
    &ops::optim::cuda::ADAM,
    &ops::optim::cuda::SGD,
    &ops::conv::cuda::IM2COL,
    &ops::conv::cuda::COL2IM,
    &ops::conv::cuda::POOL,
    &ops::conv::cuda::POOL_BACKWARD,
    &ops::conv::cuda::TRANSPOSE,
    &ops::relational::cuda::ROW_NORMALIZE,
    &ops::relational::cuda::ROW_NORMALIZE_BACKWARD,
    &ops::relational::cuda::PAIRWISE_DISTANCE,
    &ops::relational::cuda::PAIRWISE_DISTANCE_BACKWARD,
    &ops::relational::cuda::OFFDIAG_NORMALIZE,
    &ops::relational::cuda::OFFDIAG_NORMALIZE_BACKWARD,
];
