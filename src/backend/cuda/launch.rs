//! Launching: arguments checked against each kernel's signature, launch configurations, the
//! reusable scratch memory, and [`CudaBackend::row_loss`], the sequence every row loss shares.
//!
//! Launch configurations (kept in sync with the comments of each `.cu` file):
//! - row kernels (`softmax_*`, `divergence_*`, `cross_entropy_*`, `hinton_*`, `dkd_*`): `*_warp`
//!   (256 threads, a warp per row, 8 rows per block) when C <= 1024, else `*_block` (a block per
//!   row, 128 to 1024 threads as C grows); grids go 2D past 2^31-1 blocks (`grid_for`);
//! - `sparse_kd`: a block per row at every C (128 to 1024 threads as C grows,
//!   `ops::sparse::cuda::threads_for`; [`CudaBackend::row_loss_blocks`]);
//! - `count_valid`, `reduce_rows`, `mse_final`, `at_loss`, `offdiag_normalize*`: one block of 1024
//!   threads;
//! - `mse_partial` (MSE, and smooth L1 in mode 1): min(ceil(M/2048), 1024) blocks of 256, a
//!   function of M alone (deterministic);
//! - `at_map`, `at_grad`: grid-stride, 256 threads; `at_norm`: a block of 256 per sample.
//! - `matmul`: a block of 256 threads per 16 x 16 tile of C, ceil(m/16) * ceil(n/16) blocks;
//! - `pairwise_distance`: as `matmul`, a block of 256 per 16 x 16 tile of the `[n, n]` output;
//! - `row_normalize*`: a warp per row, 8 rows per block of 256 (as the `*_warp` row kernels);
//! - the other kernels of `dense.cu`, `optim.cu`, `conv.cu` and `relational.cu`: one thread per
//!   output element (per column for `sum_rows`), 256 threads per block (`elementwise`).

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

use super::buffer::{slice_ptr, CudaBuffer, CudaLabels};
use super::kernels::{CudaKernel, COUNT_VALID, REDUCE_ROWS};
use super::nvrtc::cached_ptx;
use super::{device_error, poisoned, CudaBackend, BACKEND};
use crate::backend::GradOut;
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::ops::{Reduction, RowShape};

/// A kernel argument (see [`CudaKernel::signature`] for the letters).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg {
    Ptr(u64),
    U32(u32),
    I32(i32),
    U64(u64),
    F32(f32),
    F64(f64),
}

impl Arg {
    fn letter(&self) -> char {
        match self {
            Arg::Ptr(_) => 'p',
            Arg::U32(_) => 'u',
            Arg::I32(_) => 'i',
            Arg::U64(_) => 'l',
            Arg::F32(_) => 'f',
            Arg::F64(_) => 'd',
        }
    }
}

/// The largest grid x dimension.
pub(crate) const MAX_GRID_X: u64 = (1 << 31) - 1;

/// A grid of at least `blocks` blocks: 1D up to 2^31-1 blocks, then 2D (kernels compute
/// `blockIdx.y * gridDim.x + blockIdx.x` and skip indices past their work).
pub(crate) fn grid_for(blocks: u64) -> (u32, u32, u32) {
    let blocks = blocks.max(1);
    if blocks <= MAX_GRID_X {
        (blocks as u32, 1, 1)
    } else {
        (MAX_GRID_X as u32, blocks.div_ceil(MAX_GRID_X) as u32, 1)
    }
}

pub(crate) fn config(blocks: u64, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid_for(blocks),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Rows per block of the warp-per-row layout (256 threads).
pub(crate) const WARP_ROWS: u64 = 8;
/// The largest C handled by a warp per row.
pub(crate) const WARP_MAX_COLS: usize = 1024;

/// The layout of a row kernel: whether it is the block-per-row form, and its launch.
pub(crate) fn row_launch(rows: usize, cols: usize) -> (bool, LaunchConfig) {
    if cols <= WARP_MAX_COLS {
        (
            false,
            config((rows as u64).div_ceil(WARP_ROWS), 32 * WARP_ROWS as u32),
        )
    } else {
        // Enough threads that each handles 8 to 32 elements per pass, up to 1024.
        let threads = if cols <= 4096 {
            128
        } else if cols <= 16384 {
            256
        } else if cols <= 65536 {
            512
        } else {
            1024
        };
        (true, config(rows as u64, threads))
    }
}

/// One block for the single-block kernels (count, reductions).
pub(crate) fn one_block() -> LaunchConfig {
    config(1, 1024)
}

/// Grid-stride kernels: 256 threads, at most 65535 * 4 blocks.
pub(crate) fn stride_launch(elements: u64) -> LaunchConfig {
    config(elements.div_ceil(256).clamp(1, 4 * 65535), 256)
}

/// One thread per element of `len`, 256 threads per block (`dense.cu`, `optim.cu`, `conv.cu`).
pub(crate) fn elementwise(len: usize) -> LaunchConfig {
    config((len as u64).div_ceil(256), 256)
}

/// `len` as a u32 element count, for the kernels that index with 32 bits.
pub(crate) fn index_u32(what: &str, len: usize) -> Result<u32> {
    u32::try_from(len).map_err(|_| {
        Error::Limit(format!(
            "{what}: {len} elements; the CUDA kernel indexes with 32 bits (at most 2^32 - 1)"
        ))
    })
}

/// Reusable scratch memory, grown on demand. Used under the backend's lock only, so a call's
/// launches are contiguous on the stream and reuse across calls is ordered.
#[derive(Default)]
pub(crate) struct Scratch {
    count: Option<CudaSlice<u32>>,
    pub(crate) f32s: [Option<CudaSlice<f32>>; 3],
    pub(crate) f64s: Option<CudaSlice<f64>>,
}

pub(crate) fn ensure<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    slot: &mut Option<CudaSlice<T>>,
    len: usize,
) -> Result<u64> {
    let len = len.max(1);
    if slot.as_ref().is_none_or(|s| s.len() < len) {
        *slot = None; // freed in stream order
        *slot = Some(
            stream
                .alloc_zeros::<T>(len)
                .map_err(|e| device_error("allocating scratch memory", e))?,
        );
    }
    Ok(slot.as_ref().map(slice_ptr).unwrap_or(0))
}

pub(crate) struct State {
    pub(crate) modules: HashMap<&'static str, Arc<CudaModule>>,
    pub(crate) functions: HashMap<&'static str, CudaFunction>,
    pub(crate) scratch: Scratch,
}

/// What [`CudaBackend::row_loss`] launches.
pub(crate) struct RowLaunch<'a> {
    /// The warp-per-row form (C <= 1024) and the block-per-row form of the row kernel.
    pub warp: &'static CudaKernel,
    pub block: &'static CudaKernel,
    pub shape: RowShape,
    /// Rows whose label is `ignore_index` are masked (none without labels).
    pub labels: Option<&'a CudaLabels>,
    pub ignore_index: i32,
    pub reduction: Reduction,
    /// The caller's per-row losses, or scratch.
    pub row_loss: Option<&'a CudaBuffer>,
    pub loss: &'a CudaBuffer,
}

impl CudaBackend {
    pub(crate) fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        self.state.lock().map_err(|_| poisoned())
    }

    /// The kernel, compiling and loading its file on first use.
    fn function(&self, st: &mut State, kernel: &'static CudaKernel) -> Result<CudaFunction> {
        let (file, name) = (kernel.file, kernel.name);
        if let Some(f) = st.functions.get(name) {
            return Ok(f.clone());
        }
        let module = match st.modules.get(file) {
            Some(m) => m.clone(),
            None => {
                let ptx = cached_ptx(file, &self.arch)?;
                let m = self
                    .ctx
                    .load_module(Ptx::from_src(ptx.to_string()))
                    .map_err(|e| device_error(&format!("loading the PTX of {file}"), e))?;
                st.modules.insert(file, m.clone());
                m
            }
        };
        let f = module
            .load_function(name)
            .map_err(|e| device_error(&format!("finding kernel {name} in {file}"), e))?;
        st.functions.insert(name, f.clone());
        Ok(f)
    }

    /// Launches `kernel` with `args`, checked against its signature.
    pub(crate) fn launch(
        &self,
        st: &mut State,
        kernel: &'static CudaKernel,
        cfg: LaunchConfig,
        args: &[Arg],
    ) -> Result<()> {
        let f = self.function(st, kernel)?;
        let (name, sig) = (kernel.name, kernel.signature);
        let got: String = args.iter().map(Arg::letter).collect();
        if got != sig {
            return Err(Error::Device {
                backend: BACKEND,
                message: format!("internal: kernel {name} takes ({sig}) but was given ({got})"),
            });
        }
        let mut b = self.stream.launch_builder(&f);
        for a in args {
            match a {
                Arg::Ptr(v) | Arg::U64(v) => b.arg(v),
                Arg::U32(v) => b.arg(v),
                Arg::I32(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
                Arg::F64(v) => b.arg(v),
            };
        }
        // SAFETY: the arguments match the kernel's parameter list (checked above against the table
        // that tests/suite/nvrtc.rs checks against the PTX); every pointer is a live device buffer whose
        // length the Backend trait checked; the kernels guard every index.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| device_error(&format!("launching {name}"), e))
    }

    /// Launches one kernel under the lock (the kernels of `dense.cu`, `optim.cu`, `conv.cu`).
    pub(crate) fn launch_one(
        &self,
        kernel: &'static CudaKernel,
        cfg: LaunchConfig,
        args: &[Arg],
    ) -> Result<()> {
        let mut st = self.lock()?;
        self.launch(&mut st, kernel, cfg, args)
    }

    pub(crate) fn check_cols(cols: usize) -> Result<()> {
        if cols > (1 << 31) {
            return Err(Error::Limit(format!(
                "{cols} classes: the CUDA kernels index a row with 32 bits (at most 2^31 classes)"
            )));
        }
        Ok(())
    }

    /// `count_valid` into the scratch count; returns its pointer.
    fn count_valid(
        &self,
        st: &mut State,
        labels: Option<&CudaLabels>,
        rows: usize,
        ignore: i32,
    ) -> Result<u64> {
        let count = ensure(&self.stream, &mut st.scratch.count, 1)?;
        self.launch(
            st,
            &COUNT_VALID,
            one_block(),
            &[
                Arg::Ptr(labels.map_or(0, |l| l.ptr)),
                Arg::U32(rows as u32),
                Arg::I32(ignore),
                Arg::Ptr(count),
            ],
        )?;
        Ok(count)
    }

    fn reduce_rows(
        &self,
        st: &mut State,
        rows_ptr: u64,
        rows: usize,
        count: u64,
        reduction: u32,
        loss: u64,
    ) -> Result<()> {
        self.launch(
            st,
            &REDUCE_ROWS,
            one_block(),
            &[
                Arg::Ptr(rows_ptr),
                Arg::U32(rows as u32),
                Arg::Ptr(count),
                Arg::U32(reduction),
                Arg::Ptr(loss),
            ],
        )
    }

    /// The launch sequence of every row loss (`docs/ARCHITECTURE.md`): `count_valid` (the valid
    /// rows, on the device), the row kernel (`warp` for C <= 1024, else `block`) with the
    /// arguments `args(count, row_loss)` builds from the count's and the row losses' device
    /// pointers, then `reduce_rows` into `loss` in a fixed order. The three launches are
    /// contiguous on the stream (under the lock, which also orders the scratch row losses).
    pub(crate) fn row_loss(
        &self,
        launch: RowLaunch<'_>,
        args: impl FnOnce(u64, u64) -> Vec<Arg>,
    ) -> Result<()> {
        let RowLaunch {
            warp, block, shape, ..
        } = launch;
        let (is_block, cfg) = row_launch(shape.rows, shape.cols);
        let kernel = if is_block { block } else { warp };
        self.row_loss_with(kernel, cfg, launch, args)
    }

    /// [`CudaBackend::row_loss`] with a block of `threads` per row at every C (`launch.block`;
    /// `launch.warp` is not used): the kernels that keep a row's data in shared memory.
    pub(crate) fn row_loss_blocks(
        &self,
        launch: RowLaunch<'_>,
        threads: u32,
        args: impl FnOnce(u64, u64) -> Vec<Arg>,
    ) -> Result<()> {
        let cfg = config(launch.shape.rows as u64, threads);
        self.row_loss_with(launch.block, cfg, launch, args)
    }

    fn row_loss_with(
        &self,
        kernel: &'static CudaKernel,
        cfg: LaunchConfig,
        launch: RowLaunch<'_>,
        args: impl FnOnce(u64, u64) -> Vec<Arg>,
    ) -> Result<()> {
        let RowLaunch {
            shape,
            labels,
            ignore_index,
            reduction,
            row_loss,
            loss,
            ..
        } = launch;
        let (rows, cols) = (shape.rows, shape.cols);
        Self::check_cols(cols)?;
        let mut st = self.lock()?;
        let count = self.count_valid(&mut st, labels, rows, ignore_index)?;
        let row_loss = match row_loss {
            Some(r) => r.ptr,
            None => ensure(&self.stream, &mut st.scratch.f32s[0], rows)?,
        };
        self.launch(&mut st, kernel, cfg, &args(count, row_loss))?;
        self.reduce_rows(&mut st, row_loss, rows, count, reduction.code(), loss.ptr)
    }

    pub(crate) fn copy_to_host<T: Default + Clone>(&self, ptr: u64, len: usize) -> Result<Vec<T>> {
        let mut host = vec![T::default(); len];
        if len == 0 {
            return Ok(host);
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| device_error("binding the context", e))?;
        // SAFETY: `ptr` holds `len` elements of T (the buffer's length); the copy is ordered on
        // our stream after every kernel launched so far, and we wait for it below.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(&mut host, ptr, self.stream.cu_stream())
        }
        .map_err(|e| device_error("copying to the host", e))?;
        self.synchronize()?;
        Ok(host)
    }
}

/// The student gradient's dtype: its buffer's, or the student's in place (f32 for none).
pub(crate) fn grad_dtype(grad: GradOut<'_, CudaBackend>, student: &CudaBuffer) -> Dtype {
    match grad {
        GradOut::None => Dtype::F32,
        GradOut::Into(g) => g.dtype,
        GradOut::InPlace => student.dtype,
    }
}

/// The student gradient's device pointer: 0 for none, the student itself in place.
pub(crate) fn grad_ptr(grad: GradOut<'_, CudaBackend>, student: &CudaBuffer) -> u64 {
    match grad {
        GradOut::None => 0,
        GradOut::Into(g) => g.ptr,
        GradOut::InPlace => student.ptr,
    }
}
