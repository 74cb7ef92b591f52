//! The integration tests, one binary: each file below was a test target of its own. One binary
//! compiles and links the crate's tests once instead of 25 times (CI's time limit; run one file's
//! tests with `cargo test --test suite sparse::`, one test by its path, e.g.
//! `cargo test --test suite sharded::wgpu::`). The candle and burn adapters keep their own targets
//! (`tests/candle.rs`, `tests/burn.rs`: they need their features).

// First, so that its `backend_tests!` macro is in scope in every module after it.
#[macro_use]
mod common;

mod big;
mod capi;
mod contract;
mod conv;
mod cpu_fast;
mod dense;
mod dkd;
mod errors;
mod fixtures;
mod fused_linear;
mod fused_linear_errors;
mod half;
mod kernels;
mod nvrtc;
mod own_teacher_and_data;
mod pipeline;
mod properties;
mod record;
mod reference;
mod relational;
mod shaders;
mod sharded;
mod sparse;
mod tape;
mod topk_cache;
