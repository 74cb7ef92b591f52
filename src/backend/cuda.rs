//! The CUDA backend: the kernels of `kernels/*.cu`, compiled at run time by NVRTC for the device's
//! compute capability, launched through the CUDA driver API ([`cudarc`], loaded dynamically).
//!
//! - Nothing is linked at build time: `libcuda.so` and `libnvrtc.so.13` are opened when
//!   [`CudaBackend::new`] runs. Where either is missing, or there is no device, it returns
//!   [`Error::Unavailable`] (never a panic).
//! - Each kernel file is compiled with `kernels/common.cuh` prepended (NVRTC has no standard
//!   headers), once per process and architecture ([`compile_kernel`]; PTX cached), and loaded once
//!   per backend. [`compile_all_kernels`] compiles them all without a GPU or a driver (CI).
//! - Every kernel runs on the backend's stream (the context's default stream, or the caller's from
//!   [`CudaBackend::with_stream`]), in the order the calls are made. A row loss
//!   is three launches (`count_valid`, the op, `reduce_rows`) with no host read-back in between;
//!   [`Backend::download`] synchronizes.
//! - Buffers are raw device pointers plus a length ([`CudaBuffer`]); buffers this backend allocates
//!   own their memory (a [`CudaSlice`]), [`CudaBuffer::from_slice`] and [`CudaBuffer::from_raw`] wrap
//!   a caller's memory. The caller's work on that memory must be ordered before ours (the default
//!   stream, or a synchronization).
//!
//! Launch configurations (kept in sync with the comments of each `.cu` file):
//! - row kernels (`softmax_*`, `divergence_*`, `cross_entropy_*`, `hinton_*`): `*_warp` (256 threads,
//!   a warp per row, 8 rows per block) when C <= 1024, else `*_block` (a block per row, 128 to 1024
//!   threads as C grows); grids go 2D past 2^31-1 blocks (`grid_for`);
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
use std::ffi::CString;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    DriverError, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

use super::{Backend, GradOut, LossOut};
use crate::error::{Error, Result};
use crate::ops::conv::{ConvSpec, PoolSpec};
use crate::ops::dense::MatmulSpec;
use crate::ops::optim::{AdamSpec, SgdSpec};
use crate::ops::{
    self, AttentionSpec, CrossEntropySpec, DivergenceSpec, HintonSpec, MseSpec, SoftmaxSpec,
};

const BACKEND: &str = "cuda";

/// `kernels/common.cuh`, prepended to every kernel file.
pub const COMMON_SOURCE: &str = include_str!("../../kernels/common.cuh");

/// The kernel files, by name, with their sources.
pub const KERNEL_FILES: &[(&str, &str)] = &[
    ("softmax.cu", include_str!("../../kernels/softmax.cu")),
    ("reduce.cu", include_str!("../../kernels/reduce.cu")),
    ("divergence.cu", include_str!("../../kernels/divergence.cu")),
    (
        "cross_entropy.cu",
        include_str!("../../kernels/cross_entropy.cu"),
    ),
    ("hinton.cu", include_str!("../../kernels/hinton.cu")),
    ("feature.cu", include_str!("../../kernels/feature.cu")),
    ("dense.cu", include_str!("../../kernels/dense.cu")),
    ("optim.cu", include_str!("../../kernels/optim.cu")),
    ("conv.cu", include_str!("../../kernels/conv.cu")),
    ("relational.cu", include_str!("../../kernels/relational.cu")),
];

/// Every entry point the backend launches: (file, kernel, parameter kinds). One letter per
/// parameter, in order: `p` a device pointer, `u` u32, `i` i32, `l` u64, `f` f32, `d` f64.
/// Each launch is checked against this table, and `tests/nvrtc.rs` checks the table against the
/// parameter lists of the compiled PTX.
pub const KERNEL_SIGNATURES: &[(&str, &str, &str)] = &[
    ("softmax.cu", "softmax_fwd_warp", "ppuufu"),
    ("softmax.cu", "softmax_fwd_block", "ppuufu"),
    ("softmax.cu", "softmax_bwd_warp", "pppuufu"),
    ("softmax.cu", "softmax_bwd_block", "pppuufu"),
    ("reduce.cu", "count_valid", "puip"),
    ("reduce.cu", "reduce_rows", "pupup"),
    ("divergence.cu", "divergence_warp", "pppppppuufffffiuuu"),
    ("divergence.cu", "divergence_block", "pppppppuufffffiuuu"),
    ("cross_entropy.cu", "cross_entropy_warp", "pppppuuffiu"),
    ("cross_entropy.cu", "cross_entropy_block", "pppppuuffiu"),
    ("hinton.cu", "hinton_warp", "pppppppuufffffiu"),
    ("hinton.cu", "hinton_block", "pppppppuufffffiu"),
    ("feature.cu", "mse_partial", "pppplfpu"),
    ("feature.cu", "mse_final", "pudp"),
    ("feature.cu", "at_map", "ppuuu"),
    ("feature.cu", "at_norm", "ppuupp"),
    ("feature.cu", "at_loss", "pudp"),
    ("feature.cu", "at_grad", "pppppuuuuf"),
    ("dense.cu", "matmul", "pppuuuuuu"),
    ("dense.cu", "bias_add", "pppuu"),
    ("dense.cu", "sum_rows", "ppuuu"),
    ("dense.cu", "relu", "ppl"),
    ("dense.cu", "relu_backward", "pppl"),
    ("dense.cu", "axpy", "pplf"),
    ("optim.cu", "adam_step", "pppplffffff"),
    ("optim.cu", "sgd_step", "ppplfff"),
    ("conv.cu", "im2col", "ppuuuuuuuuu"),
    ("conv.cu", "col2im", "ppuuuuuuuuu"),
    ("conv.cu", "pool", "ppuuuuuuuu"),
    ("conv.cu", "pool_backward", "pppuuuuuuuu"),
    ("conv.cu", "transpose", "ppuuu"),
    ("relational.cu", "row_normalize", "ppuu"),
    ("relational.cu", "row_normalize_backward", "pppuu"),
    ("relational.cu", "pairwise_distance", "ppuu"),
    ("relational.cu", "pairwise_distance_backward", "ppppuu"),
    ("relational.cu", "offdiag_normalize", "ppu"),
    ("relational.cu", "offdiag_normalize_backward", "pppu"),
];

// ---- NVRTC ------------------------------------------------------------------------------------

/// True when NVRTC (`libnvrtc.so.13`, or one of the other names cudarc tries) can be loaded.
/// Never panics.
pub fn nvrtc_available() -> bool {
    // SAFETY: only dlopen()s the library (and closes it again).
    catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false)
}

/// True when the CUDA driver library (`libcuda.so`, `libcuda.so.1`, ...) can be loaded. Never
/// panics. It says nothing about a device being present.
pub fn driver_available() -> bool {
    // SAFETY: only dlopen()s the library (and closes it again).
    catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false)
}

fn nvrtc_missing() -> Error {
    Error::Unavailable {
        backend: BACKEND,
        reason: format!(
            "NVRTC (CUDA 13 libnvrtc.so.13) not found; searched {:?}. Install it (e.g. `bash \
             .ci/install-nvrtc.sh`, which prints the directory) and add its directory to \
             LD_LIBRARY_PATH",
            cudarc::get_lib_name_candidates("nvrtc")
        ),
    }
}

/// One kernel file compiled to PTX, with NVRTC's log (empty when it had nothing to say).
#[derive(Clone, Debug)]
pub struct CompiledKernel {
    pub file: String,
    pub ptx: String,
    pub log: String,
}

/// The source NVRTC compiles for a kernel file: `common.cuh`, then the file, with `#line`
/// directives so that messages name the right file and line.
pub fn kernel_source(file: &str) -> Result<String> {
    let (_, src) = KERNEL_FILES
        .iter()
        .find(|(name, _)| *name == file)
        .ok_or_else(|| Error::Unsupported(format!("no kernel file {file}")))?;
    Ok(format!(
        "#line 1 \"common.cuh\"\n{COMMON_SOURCE}\n#line 1 \"{file}\"\n{src}"
    ))
}

fn c_chars_to_string(chars: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = chars
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compiles one kernel file (a name of [`KERNEL_FILES`]) to PTX for `arch` (`"sm_80"`, `"sm_90"`,
/// ...) with NVRTC. Needs neither a GPU nor the driver. A compile error is [`Error::Compile`] with
/// NVRTC's log; a missing NVRTC is [`Error::Unavailable`].
pub fn compile_kernel(file: &str, arch: &str) -> Result<CompiledKernel> {
    let source = kernel_source(file)?;
    if !nvrtc_available() {
        return Err(nvrtc_missing());
    }
    let src = CString::new(source).map_err(|_| Error::Compile {
        file: file.into(),
        log: "the source holds a NUL byte".into(),
    })?;
    let name =
        CString::new(file).map_err(|_| Error::Unsupported(format!("bad file name {file}")))?;
    // No --use_fast_math: expf/logf stay accurate, and division and sqrt IEEE-rounded.
    let options = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "--generate-line-info".to_string(),
    ];
    let compile = || -> Result<CompiledKernel> {
        use cudarc::nvrtc::result as nvrtc;
        let prog = nvrtc::create_program(&src, Some(&name)).map_err(|e| Error::Compile {
            file: file.into(),
            log: format!("nvrtcCreateProgram failed: {e:?}"),
        })?;
        // SAFETY: `prog` was just created and is destroyed once, below.
        let compiled = unsafe { nvrtc::compile_program(prog, &options) };
        let log = unsafe { nvrtc::get_program_log(prog) }
            .map(|l| c_chars_to_string(&l))
            .unwrap_or_default();
        let out = match compiled {
            Ok(()) => unsafe { nvrtc::get_ptx(prog) }
                .map(|ptx| CompiledKernel {
                    file: file.into(),
                    ptx: c_chars_to_string(&ptx),
                    log: log.trim().to_string(),
                })
                .map_err(|e| Error::Compile {
                    file: file.into(),
                    log: format!("nvrtcGetPTX failed: {e:?}\n{log}"),
                }),
            Err(e) => Err(Error::Compile {
                file: file.into(),
                log: format!("{e:?} (options {options:?})\n{log}"),
            }),
        };
        let _ = unsafe { nvrtc::destroy_program(prog) };
        out
    };
    // cudarc panics where a symbol is missing from the library it found (e.g. an older NVRTC).
    catch_unwind(AssertUnwindSafe(compile)).unwrap_or_else(|panic| {
        Err(Error::Unavailable {
            backend: BACKEND,
            reason: format!("NVRTC could not be used: {}", panic_message(&panic)),
        })
    })
}

/// Compiles every kernel file for `arch` (`"sm_80"`, `"sm_90"`, ...): `(file, ptx)` pairs. Needs
/// neither a GPU nor the driver, only NVRTC (CI uses it to check the kernels compile).
pub fn compile_all_kernels(arch: &str) -> Result<Vec<(String, String)>> {
    Ok(compile_all_kernels_with_logs(arch)?
        .into_iter()
        .map(|k| (k.file, k.ptx))
        .collect())
}

/// [`compile_all_kernels`] with NVRTC's log of each file (warnings).
pub fn compile_all_kernels_with_logs(arch: &str) -> Result<Vec<CompiledKernel>> {
    KERNEL_FILES
        .iter()
        .map(|(file, _)| compile_kernel(file, arch))
        .collect()
}

/// PTX by (architecture, kernel file).
type PtxCache = Mutex<HashMap<(String, &'static str), Arc<str>>>;

/// PTX per (architecture, file), compiled once per process.
fn cached_ptx(file: &'static str, arch: &str) -> Result<Arc<str>> {
    static CACHE: OnceLock<PtxCache> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let key = (arch.to_string(), file);
    if let Some(ptx) = cache.lock().map_err(|_| poisoned())?.get(&key) {
        return Ok(ptx.clone());
    }
    // Compiled without holding the lock (other files may compile meanwhile).
    let ptx: Arc<str> = compile_kernel(file, arch)?.ptx.into();
    let mut guard = cache.lock().map_err(|_| poisoned())?;
    Ok(guard.entry(key).or_insert(ptx).clone())
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

fn poisoned() -> Error {
    Error::Device {
        backend: BACKEND,
        message: "a lock was poisoned by a panic in another thread".into(),
    }
}

fn device_error(what: &str, e: DriverError) -> Error {
    Error::Device {
        backend: BACKEND,
        message: format!("{what}: {e}"),
    }
}

// ---- buffers ----------------------------------------------------------------------------------

fn slice_ptr<T>(slice: &CudaSlice<T>) -> u64 {
    // The guard records a read event only for contexts tracking several streams; dropping it at
    // once is what we want (our own context tracks nothing).
    let (ptr, _guard) = slice.device_ptr(slice.stream());
    ptr
}

/// A device array of `f32`: a device pointer and a length, owning its memory or not.
pub struct CudaBuffer {
    ptr: u64,
    len: usize,
    owner: Option<CudaSlice<f32>>,
}

impl CudaBuffer {
    /// Wraps a cudarc slice (its memory is freed when the buffer is dropped).
    pub fn from_slice(slice: CudaSlice<f32>) -> Self {
        CudaBuffer {
            ptr: slice_ptr(&slice),
            len: slice.len(),
            owner: Some(slice),
        }
    }

    /// Wraps device memory the caller owns (another library's tensor); it is not freed here.
    ///
    /// # Safety
    /// `ptr` must point to at least `len` `f32` of device memory in the context of the backend the
    /// buffer is used with, alive and not written by others for as long as the buffer is used.
    pub unsafe fn from_raw(ptr: u64, len: usize) -> Self {
        CudaBuffer {
            ptr,
            len,
            owner: None,
        }
    }

    /// The device address.
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }

    /// Number of `f32` elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The cudarc slice, when the buffer owns one.
    pub fn as_slice(&self) -> Option<&CudaSlice<f32>> {
        self.owner.as_ref()
    }

    /// Gives the cudarc slice back, when the buffer owns one.
    pub fn into_slice(self) -> Option<CudaSlice<f32>> {
        self.owner
    }
}

impl std::fmt::Debug for CudaBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBuffer")
            .field("ptr", &format_args!("{:#x}", self.ptr))
            .field("len", &self.len)
            .field("owned", &self.owner.is_some())
            .finish()
    }
}

/// A device array of `i32` labels.
pub struct CudaLabels {
    ptr: u64,
    len: usize,
    owner: Option<CudaSlice<i32>>,
}

impl CudaLabels {
    /// Wraps a cudarc slice of labels.
    pub fn from_slice(slice: CudaSlice<i32>) -> Self {
        CudaLabels {
            ptr: slice_ptr(&slice),
            len: slice.len(),
            owner: Some(slice),
        }
    }

    /// Wraps caller-owned device memory holding `len` `i32` labels.
    ///
    /// # Safety
    /// As [`CudaBuffer::from_raw`].
    pub unsafe fn from_raw(ptr: u64, len: usize) -> Self {
        CudaLabels {
            ptr,
            len,
            owner: None,
        }
    }

    /// The device address.
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }

    /// Number of labels.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there is no label.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::fmt::Debug for CudaLabels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaLabels")
            .field("ptr", &format_args!("{:#x}", self.ptr))
            .field("len", &self.len)
            .field("owned", &self.owner.is_some())
            .finish()
    }
}

// ---- launches ---------------------------------------------------------------------------------

/// A kernel argument (see [`KERNEL_SIGNATURES`] for the letters).
#[derive(Clone, Copy, Debug)]
enum Arg {
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
const MAX_GRID_X: u64 = (1 << 31) - 1;

/// A grid of at least `blocks` blocks: 1D up to 2^31-1 blocks, then 2D (kernels compute
/// `blockIdx.y * gridDim.x + blockIdx.x` and skip indices past their work).
fn grid_for(blocks: u64) -> (u32, u32, u32) {
    let blocks = blocks.max(1);
    if blocks <= MAX_GRID_X {
        (blocks as u32, 1, 1)
    } else {
        (MAX_GRID_X as u32, blocks.div_ceil(MAX_GRID_X) as u32, 1)
    }
}

fn config(blocks: u64, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid_for(blocks),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Rows per block of the warp-per-row layout (256 threads).
const WARP_ROWS: u64 = 8;
/// The largest C handled by a warp per row.
const WARP_MAX_COLS: usize = 1024;

/// The layout of a row kernel: whether it is the block-per-row form, and its launch.
fn row_launch(rows: usize, cols: usize) -> (bool, LaunchConfig) {
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
fn one_block() -> LaunchConfig {
    config(1, 1024)
}

/// Grid-stride kernels: 256 threads, at most 65535 * 4 blocks.
fn stride_launch(elements: u64) -> LaunchConfig {
    config(elements.div_ceil(256).clamp(1, 4 * 65535), 256)
}

/// One thread per element of `len`, 256 threads per block (`dense.cu`, `optim.cu`, `conv.cu`).
fn elementwise(len: usize) -> LaunchConfig {
    config((len as u64).div_ceil(256), 256)
}

/// `len` as a u32 element count, for the kernels that index with 32 bits.
fn index_u32(what: &str, len: usize) -> Result<u32> {
    u32::try_from(len).map_err(|_| {
        Error::Limit(format!(
            "{what}: {len} elements; the CUDA kernel indexes with 32 bits (at most 2^32 - 1)"
        ))
    })
}

/// The arguments `h, w, c, k, stride, pad, oh, ow, len` of `im2col` / `col2im` (`len` the number of
/// elements written). `conv.cu` computes padded coordinates in an `int` and indices in u32.
fn conv_args(spec: &ConvSpec, len: usize) -> Result<[Arg; 9]> {
    let fits_int = |v: Option<usize>| v.is_some_and(|v| v < (1 << 31));
    let padded = |d: usize| spec.pad.checked_mul(2).and_then(|p| p.checked_add(d));
    if !fits_int(padded(spec.h)) || !fits_int(padded(spec.w)) || !fits_int(Some(spec.stride)) {
        return Err(Error::Limit(format!(
            "convolution {spec:?}: the CUDA kernels need H + 2 pad, W + 2 pad and the stride below 2^31"
        )));
    }
    index_u32("convolution input", spec.input_len())?;
    let (oh, ow) = spec.out_hw();
    Ok([
        Arg::U32(spec.h as u32),
        Arg::U32(spec.w as u32),
        Arg::U32(spec.c as u32),
        Arg::U32(spec.k as u32),
        Arg::U32(spec.stride as u32),
        Arg::U32(spec.pad as u32),
        Arg::U32(oh as u32),
        Arg::U32(ow as u32),
        Arg::U32(index_u32("convolution", len)?),
    ])
}

/// The arguments `h, w, c, k, oh, ow, max_pool, len` of `pool` / `pool_backward`.
fn pool_args(spec: &PoolSpec, len: usize) -> Result<[Arg; 8]> {
    index_u32("pooling input", spec.input_len())?;
    let (oh, ow) = spec.out_hw();
    Ok([
        Arg::U32(spec.h as u32),
        Arg::U32(spec.w as u32),
        Arg::U32(spec.c as u32),
        Arg::U32(spec.k as u32),
        Arg::U32(oh as u32),
        Arg::U32(ow as u32),
        Arg::U32(spec.max as u32),
        Arg::U32(index_u32("pooling", len)?),
    ])
}

/// `mse_partial`'s modes (`kernels/feature.cu`).
const MSE_MODE_SQUARED: u32 = 0;
const MSE_MODE_SMOOTH_L1: u32 = 1;

/// The `n` of an `[n, n]` relational matrix as u32: `relational.cu` indexes `n * n` (and `n * dim`)
/// with 32 bits, which also keeps its loops from wrapping.
fn relational_n(what: &str, n: usize, dim: usize) -> Result<u32> {
    if n.checked_mul(n.max(dim))
        .is_none_or(|len| len > u32::MAX as usize)
    {
        return Err(Error::Limit(format!(
            "{what}: n = {n}, dim = {dim}; the CUDA kernel indexes n * max(n, dim) with 32 bits"
        )));
    }
    Ok(n as u32)
}

/// The `[rows, cols]` shape of a row normalisation as u32s.
fn row_shape(len: usize, cols: usize) -> Result<(u32, u32)> {
    CudaBackend::check_cols(cols)?;
    let rows = len / cols;
    let rows = u32::try_from(rows).map_err(|_| {
        Error::Limit(format!(
            "row_normalize: {rows} rows; the CUDA kernel counts rows with 32 bits"
        ))
    })?;
    Ok((rows, cols as u32))
}

/// Blocks of `mse_partial`: a function of M alone, so the summation order is too.
fn mse_blocks(m: u64) -> u64 {
    m.div_ceil(2048).clamp(1, 1024)
}

/// Reusable scratch memory, grown on demand. Used under the backend's lock only, so a call's
/// launches are contiguous on the stream and reuse across calls is ordered.
#[derive(Default)]
struct Scratch {
    count: Option<CudaSlice<u32>>,
    f32s: [Option<CudaSlice<f32>>; 3],
    f64s: Option<CudaSlice<f64>>,
}

fn ensure<T: DeviceRepr + ValidAsZeroBits>(
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

struct State {
    modules: HashMap<&'static str, Arc<CudaModule>>,
    functions: HashMap<&'static str, CudaFunction>,
    scratch: Scratch,
}

/// The CUDA backend on one device. See the module documentation.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: String,
    device_name: String,
    state: Mutex<State>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.device_name)
            .field("ordinal", &self.ctx.ordinal())
            .field("arch", &self.arch)
            .finish()
    }
}

fn unavailable(reason: String) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        reason,
    }
}

impl CudaBackend {
    /// The backend on CUDA device 0.
    pub fn new() -> Result<Self> {
        Self::with_device(0)
    }

    /// The backend on CUDA device `ordinal`. [`Error::Unavailable`] when the driver library, a
    /// device or NVRTC is missing.
    pub fn with_device(ordinal: usize) -> Result<Self> {
        Self::open(ordinal, None)
    }

    /// The backend on device `ordinal` running every kernel on the caller's stream `stream` (a
    /// `CUstream` / `cudaStream_t`, e.g. PyTorch's `torch.cuda.current_stream().cuda_stream`), so
    /// its work is ordered with the caller's without synchronizing. 0 is the legacy default stream.
    ///
    /// # Safety
    /// `stream` must be 0 or a valid stream of the device's primary context (the context the CUDA
    /// runtime, and so PyTorch, uses), and must outlive the backend.
    pub unsafe fn with_stream(ordinal: usize, stream: u64) -> Result<Self> {
        Self::open(ordinal, Some(stream))
    }

    fn open(ordinal: usize, stream: Option<u64>) -> Result<Self> {
        if !driver_available() {
            return Err(unavailable(format!(
                "no CUDA driver library (libcuda.so) found: searched {:?}; install the NVIDIA \
                 driver or add the directory of libcuda.so.1 to LD_LIBRARY_PATH",
                cudarc::get_lib_name_candidates("cuda")
            )));
        }
        let ctx = catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|p| {
                unavailable(format!(
                    "the CUDA driver could not be used: {}",
                    panic_message(&p)
                ))
            })?
            .map_err(|e| unavailable(format!("no usable CUDA device {ordinal}: {e}")))?;
        if !nvrtc_available() {
            return Err(nvrtc_missing());
        }
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| device_error("reading the compute capability", e))?;
        let device_name = ctx.name().unwrap_or_else(|_| "unknown device".into());
        // One stream and no other: the per-buffer events cudarc records for multi-stream use are
        // not needed.
        // SAFETY: called before this context allocates anything; we never create another stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = match stream {
            // SAFETY: `with_stream`'s contract: a live stream of this (primary) context, kept alive
            // by its owner for the backend's life; ordering with its owner's work is the stream's.
            Some(raw) => unsafe { ctx.wrap_borrowed_stream(raw as cudarc::driver::sys::CUstream) },
            None => ctx.default_stream(),
        };
        Ok(CudaBackend {
            ctx,
            stream,
            arch: format!("sm_{major}{minor}"),
            device_name,
            state: Mutex::new(State {
                modules: HashMap::new(),
                functions: HashMap::new(),
                scratch: Scratch::default(),
            }),
        })
    }

    /// The NVRTC architecture the kernels are compiled for (`sm_90` on an H100).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The cudarc context (to allocate [`CudaSlice`]s to wrap with [`CudaBuffer::from_slice`]).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every kernel of this backend runs on (the context's default stream, or the
    /// caller's from [`CudaBackend::with_stream`]).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits for every launched kernel; reports an asynchronous error of an earlier launch.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| device_error("synchronizing the stream", e))
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        self.state.lock().map_err(|_| poisoned())
    }

    /// The kernel `name`, compiling and loading its file on first use.
    fn function(&self, st: &mut State, name: &'static str) -> Result<(CudaFunction, &'static str)> {
        let &(file, _, sig) = KERNEL_SIGNATURES
            .iter()
            .find(|(_, n, _)| *n == name)
            .ok_or_else(|| Error::Unsupported(format!("no kernel {name}")))?;
        if let Some(f) = st.functions.get(name) {
            return Ok((f.clone(), sig));
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
        Ok((f, sig))
    }

    /// Launches kernel `name` with `args`, checked against its signature.
    fn launch(
        &self,
        st: &mut State,
        name: &'static str,
        cfg: LaunchConfig,
        args: &[Arg],
    ) -> Result<()> {
        let (f, sig) = self.function(st, name)?;
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
        // that tests/nvrtc.rs checks against the PTX); every pointer is a live device buffer whose
        // length the Backend trait checked; the kernels guard every index.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| device_error(&format!("launching {name}"), e))
    }

    /// Launches `name` under the lock (the kernels of `dense.cu`, `optim.cu`, `conv.cu`).
    fn launch_one(&self, name: &'static str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let mut st = self.lock()?;
        self.launch(&mut st, name, cfg, args)
    }

    fn check_cols(cols: usize) -> Result<()> {
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
            "count_valid",
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

    /// The row-loss buffer: the caller's, or scratch.
    fn row_loss_ptr(&self, st: &mut State, out: &LossOut<'_, Self>, rows: usize) -> Result<u64> {
        match out.row_loss {
            Some(r) => Ok(r.ptr),
            None => ensure(&self.stream, &mut st.scratch.f32s[0], rows),
        }
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
            "reduce_rows",
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

    /// `mse_partial` then `mse_final`: MSE (`MSE_MODE_SQUARED`) or smooth L1 (`MSE_MODE_SMOOTH_L1`).
    #[allow(clippy::too_many_arguments)]
    fn pointwise_loss(
        &self,
        mode: u32,
        spec: &MseSpec,
        a: &CudaBuffer,
        b: &CudaBuffer,
        loss: &CudaBuffer,
        grad_a: Option<&CudaBuffer>,
        grad_b: Option<&CudaBuffer>,
    ) -> Result<()> {
        let m = spec.len as u64;
        let blocks = mse_blocks(m);
        let factor = if mode == MSE_MODE_SQUARED { 2.0 } else { 1.0 };
        let k = (factor * spec.grad_scale as f64 / m as f64) as f32;
        let mut st = self.lock()?;
        let partials = ensure(&self.stream, &mut st.scratch.f64s, blocks as usize)?;
        self.launch(
            &mut st,
            "mse_partial",
            config(blocks, 256),
            &[
                Arg::Ptr(a.ptr),
                Arg::Ptr(b.ptr),
                Arg::Ptr(grad_a.map_or(0, |g| g.ptr)),
                Arg::Ptr(grad_b.map_or(0, |g| g.ptr)),
                Arg::U64(m),
                Arg::F32(k),
                Arg::Ptr(partials),
                Arg::U32(mode),
            ],
        )?;
        self.launch(
            &mut st,
            "mse_final",
            one_block(),
            &[
                Arg::Ptr(partials),
                Arg::U32(blocks as u32),
                Arg::F64(m as f64),
                Arg::Ptr(loss.ptr),
            ],
        )
    }

    fn copy_to_host<T: Default + Clone>(&self, ptr: u64, len: usize) -> Result<Vec<T>> {
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

fn grad_ptr(grad: GradOut<'_, CudaBackend>, student: &CudaBuffer) -> u64 {
    match grad {
        GradOut::None => 0,
        GradOut::Into(g) => g.ptr,
        GradOut::InPlace => student.ptr,
    }
}

impl Backend for CudaBackend {
    type Buffer = CudaBuffer;
    type Labels = CudaLabels;

    fn name(&self) -> String {
        format!("cuda ({}, {}, NVRTC)", self.device_name, self.arch)
    }

    fn upload(&self, data: &[f32]) -> Result<CudaBuffer> {
        if data.is_empty() {
            return Ok(CudaBuffer {
                ptr: 0,
                len: 0,
                owner: None,
            });
        }
        let slice = self
            .stream
            .clone_htod(data)
            .map_err(|e| device_error("copying to the device", e))?;
        Ok(CudaBuffer::from_slice(slice))
    }

    fn upload_labels(&self, labels: &[i32]) -> Result<CudaLabels> {
        if labels.is_empty() {
            return Ok(CudaLabels {
                ptr: 0,
                len: 0,
                owner: None,
            });
        }
        let slice = self
            .stream
            .clone_htod(labels)
            .map_err(|e| device_error("copying labels to the device", e))?;
        Ok(CudaLabels::from_slice(slice))
    }

    fn download(&self, buf: &CudaBuffer) -> Result<Vec<f32>> {
        self.copy_to_host(buf.ptr, buf.len)
    }

    fn len(&self, buf: &CudaBuffer) -> usize {
        buf.len
    }

    fn synchronize(&self) -> Result<()> {
        CudaBackend::synchronize(self)
    }

    fn overlaps(&self, a: &CudaBuffer, b: &CudaBuffer) -> bool {
        // Caller memory is wrapped by address: compare the byte ranges.
        let (a0, b0) = (a.ptr, b.ptr);
        let (a1, b1) = (a0 + a.len as u64 * 4, b0 + b.len as u64 * 4);
        a0 < b1 && b0 < a1
    }

    fn labels_len(&self, labels: &CudaLabels) -> usize {
        labels.len
    }

    fn check_labels(&self, labels: &CudaLabels, classes: usize, ignore_index: i32) -> Result<()> {
        let host: Vec<i32> = self.copy_to_host(labels.ptr, labels.len)?;
        ops::check_labels(&host, classes, ignore_index)
    }

    unsafe fn softmax_unchecked(
        &self,
        spec: &SoftmaxSpec,
        x: &CudaBuffer,
        y: &CudaBuffer,
    ) -> Result<()> {
        let (rows, cols) = (spec.shape.rows, spec.shape.cols);
        Self::check_cols(cols)?;
        let (block, cfg) = row_launch(rows, cols);
        let name = if block {
            "softmax_fwd_block"
        } else {
            "softmax_fwd_warp"
        };
        let mut st = self.lock()?;
        self.launch(
            &mut st,
            name,
            cfg,
            &[
                Arg::Ptr(x.ptr),
                Arg::Ptr(y.ptr),
                Arg::U32(rows as u32),
                Arg::U32(cols as u32),
                Arg::F32(inv(spec.temperature)),
                Arg::U32(spec.log as u32),
            ],
        )
    }

    unsafe fn softmax_backward_unchecked(
        &self,
        spec: &SoftmaxSpec,
        y: &CudaBuffer,
        dy: &CudaBuffer,
        dx: &CudaBuffer,
    ) -> Result<()> {
        let (rows, cols) = (spec.shape.rows, spec.shape.cols);
        Self::check_cols(cols)?;
        let (block, cfg) = row_launch(rows, cols);
        let name = if block {
            "softmax_bwd_block"
        } else {
            "softmax_bwd_warp"
        };
        let mut st = self.lock()?;
        self.launch(
            &mut st,
            name,
            cfg,
            &[
                Arg::Ptr(y.ptr),
                Arg::Ptr(dy.ptr),
                Arg::Ptr(dx.ptr),
                Arg::U32(rows as u32),
                Arg::U32(cols as u32),
                Arg::F32(inv(spec.temperature)),
                Arg::U32(spec.log as u32),
            ],
        )
    }

    unsafe fn divergence_unchecked(
        &self,
        spec: &DivergenceSpec,
        student: &CudaBuffer,
        teacher: &CudaBuffer,
        labels: Option<&CudaLabels>,
        out: LossOut<'_, Self>,
    ) -> Result<()> {
        let (rows, cols) = (spec.shape.rows, spec.shape.cols);
        Self::check_cols(cols)?;
        let (block, cfg) = row_launch(rows, cols);
        let name = if block {
            "divergence_block"
        } else {
            "divergence_warp"
        };
        let mut st = self.lock()?;
        let count = self.count_valid(&mut st, labels, rows, spec.ignore_index)?;
        let row_loss = self.row_loss_ptr(&mut st, &out, rows)?;
        self.launch(
            &mut st,
            name,
            cfg,
            &[
                Arg::Ptr(student.ptr),
                Arg::Ptr(teacher.ptr),
                Arg::Ptr(labels.map_or(0, |l| l.ptr)),
                Arg::Ptr(count),
                Arg::Ptr(row_loss),
                Arg::Ptr(grad_ptr(out.grad_student, student)),
                Arg::Ptr(out.grad_teacher.map_or(0, |g| g.ptr)),
                Arg::U32(rows as u32),
                Arg::U32(cols as u32),
                Arg::F32(inv(spec.temperature)),
                Arg::F32(spec.temperature),
                Arg::F32(spec.divergence.beta()),
                Arg::F32(spec.teacher_eps),
                Arg::F32(spec.grad_scale),
                Arg::I32(spec.ignore_index),
                Arg::U32(spec.divergence.code()),
                Arg::U32(spec.teacher.code()),
                Arg::U32(spec.reduction.code()),
            ],
        )?;
        self.reduce_rows(
            &mut st,
            row_loss,
            rows,
            count,
            spec.reduction.code(),
            out.loss.ptr,
        )
    }

    unsafe fn cross_entropy_unchecked(
        &self,
        spec: &CrossEntropySpec,
        student: &CudaBuffer,
        labels: &CudaLabels,
        out: LossOut<'_, Self>,
    ) -> Result<()> {
        let (rows, cols) = (spec.shape.rows, spec.shape.cols);
        Self::check_cols(cols)?;
        let (block, cfg) = row_launch(rows, cols);
        let name = if block {
            "cross_entropy_block"
        } else {
            "cross_entropy_warp"
        };
        let mut st = self.lock()?;
        let count = self.count_valid(&mut st, Some(labels), rows, spec.ignore_index)?;
        let row_loss = self.row_loss_ptr(&mut st, &out, rows)?;
        self.launch(
            &mut st,
            name,
            cfg,
            &[
                Arg::Ptr(student.ptr),
                Arg::Ptr(labels.ptr),
                Arg::Ptr(count),
                Arg::Ptr(row_loss),
                Arg::Ptr(grad_ptr(out.grad_student, student)),
                Arg::U32(rows as u32),
                Arg::U32(cols as u32),
                Arg::F32(spec.label_smoothing),
                Arg::F32(spec.grad_scale),
                Arg::I32(spec.ignore_index),
                Arg::U32(spec.reduction.code()),
            ],
        )?;
        self.reduce_rows(
            &mut st,
            row_loss,
            rows,
            count,
            spec.reduction.code(),
            out.loss.ptr,
        )
    }

    unsafe fn hinton_unchecked(
        &self,
        spec: &HintonSpec,
        student: &CudaBuffer,
        teacher: &CudaBuffer,
        labels: &CudaLabels,
        out: LossOut<'_, Self>,
    ) -> Result<()> {
        let (rows, cols) = (spec.shape.rows, spec.shape.cols);
        Self::check_cols(cols)?;
        let (block, cfg) = row_launch(rows, cols);
        let name = if block { "hinton_block" } else { "hinton_warp" };
        let mut st = self.lock()?;
        let count = self.count_valid(&mut st, Some(labels), rows, spec.ignore_index)?;
        let row_loss = self.row_loss_ptr(&mut st, &out, rows)?;
        self.launch(
            &mut st,
            name,
            cfg,
            &[
                Arg::Ptr(student.ptr),
                Arg::Ptr(teacher.ptr),
                Arg::Ptr(labels.ptr),
                Arg::Ptr(count),
                Arg::Ptr(row_loss),
                Arg::Ptr(grad_ptr(out.grad_student, student)),
                Arg::Ptr(out.grad_teacher.map_or(0, |g| g.ptr)),
                Arg::U32(rows as u32),
                Arg::U32(cols as u32),
                Arg::F32(inv(spec.temperature)),
                Arg::F32(spec.temperature),
                Arg::F32(spec.alpha),
                Arg::F32(spec.label_smoothing),
                Arg::F32(spec.grad_scale),
                Arg::I32(spec.ignore_index),
                Arg::U32(spec.reduction.code()),
            ],
        )?;
        self.reduce_rows(
            &mut st,
            row_loss,
            rows,
            count,
            spec.reduction.code(),
            out.loss.ptr,
        )
    }

    unsafe fn mse_unchecked(
        &self,
        spec: &MseSpec,
        a: &CudaBuffer,
        b: &CudaBuffer,
        loss: &CudaBuffer,
        grad_a: Option<&CudaBuffer>,
        grad_b: Option<&CudaBuffer>,
    ) -> Result<()> {
        self.pointwise_loss(MSE_MODE_SQUARED, spec, a, b, loss, grad_a, grad_b)
    }

    unsafe fn attention_transfer_unchecked(
        &self,
        spec: &AttentionSpec,
        student: &CudaBuffer,
        teacher: &CudaBuffer,
        loss: &CudaBuffer,
        grad_student: Option<&CudaBuffer>,
        grad_teacher: Option<&CudaBuffer>,
    ) -> Result<()> {
        let (n, cs, ct, hw) = (
            spec.n,
            spec.student_channels,
            spec.teacher_channels,
            spec.hw,
        );
        let maps = n * hw;
        let denom = maps as f64;
        let kk = (spec.grad_scale as f64 * 2.0 / denom) as f32;
        let mut guard = self.lock()?;
        let st = &mut *guard;
        let qs = ensure(&self.stream, &mut st.scratch.f32s[0], maps)?;
        let qt = ensure(&self.stream, &mut st.scratch.f32s[1], maps)?;
        let diff = ensure(&self.stream, &mut st.scratch.f32s[2], maps)?;
        let stats = ensure(&self.stream, &mut st.scratch.f64s, n * 8)?;
        let (n32, hw32) = (n as u32, hw as u32);
        for (a, q, ch) in [(student, qs, cs), (teacher, qt, ct)] {
            self.launch(
                st,
                "at_map",
                stride_launch(maps as u64),
                &[
                    Arg::Ptr(a.ptr),
                    Arg::Ptr(q),
                    Arg::U32(n32),
                    Arg::U32(ch as u32),
                    Arg::U32(hw32),
                ],
            )?;
        }
        self.launch(
            st,
            "at_norm",
            config(n as u64, 256),
            &[
                Arg::Ptr(qs),
                Arg::Ptr(qt),
                Arg::U32(n32),
                Arg::U32(hw32),
                Arg::Ptr(stats),
                Arg::Ptr(diff),
            ],
        )?;
        self.launch(
            st,
            "at_loss",
            one_block(),
            &[
                Arg::Ptr(stats),
                Arg::U32(n32),
                Arg::F64(denom),
                Arg::Ptr(loss.ptr),
            ],
        )?;
        // at_norm left u_s in qs and u_t in qt.
        let sides = [
            (grad_student, student, qs, 0u32, cs),
            (grad_teacher, teacher, qt, 1u32, ct),
        ];
        for (grad, a, u_this, side, ch) in sides {
            let Some(g) = grad else { continue };
            self.launch(
                st,
                "at_grad",
                stride_launch((n * ch * hw) as u64),
                &[
                    Arg::Ptr(a.ptr),
                    Arg::Ptr(g.ptr),
                    Arg::Ptr(u_this),
                    Arg::Ptr(diff),
                    Arg::Ptr(stats),
                    Arg::U32(side),
                    Arg::U32(n32),
                    Arg::U32(ch as u32),
                    Arg::U32(hw32),
                    Arg::F32(kk),
                ],
            )?;
        }
        Ok(())
    }

    unsafe fn matmul_unchecked(
        &self,
        spec: &MatmulSpec,
        a: &CudaBuffer,
        b: &CudaBuffer,
        c: &CudaBuffer,
    ) -> Result<()> {
        // MatmulSpec::validate: every operand below 2^32 elements, so m, k, n fit u32.
        let tiles = (spec.m as u64).div_ceil(16) * (spec.n as u64).div_ceil(16);
        self.launch_one(
            "matmul",
            config(tiles, 256),
            &[
                Arg::Ptr(a.ptr),
                Arg::Ptr(b.ptr),
                Arg::Ptr(c.ptr),
                Arg::U32(spec.m as u32),
                Arg::U32(spec.k as u32),
                Arg::U32(spec.n as u32),
                Arg::U32(spec.trans_a as u32),
                Arg::U32(spec.trans_b as u32),
                Arg::U32(spec.accumulate as u32),
            ],
        )
    }

    unsafe fn bias_add_unchecked(
        &self,
        x: &CudaBuffer,
        bias: &CudaBuffer,
        y: &CudaBuffer,
    ) -> Result<()> {
        let len = index_u32("bias_add", x.len)?;
        self.launch_one(
            "bias_add",
            elementwise(x.len),
            &[
                Arg::Ptr(x.ptr),
                Arg::Ptr(bias.ptr),
                Arg::Ptr(y.ptr),
                Arg::U32(len),
                Arg::U32(bias.len as u32),
            ],
        )
    }

    unsafe fn sum_rows_unchecked(
        &self,
        x: &CudaBuffer,
        out: &CudaBuffer,
        accumulate: bool,
    ) -> Result<()> {
        index_u32("sum_rows", x.len)?;
        self.launch_one(
            "sum_rows",
            elementwise(out.len),
            &[
                Arg::Ptr(x.ptr),
                Arg::Ptr(out.ptr),
                Arg::U32((x.len / out.len) as u32),
                Arg::U32(out.len as u32),
                Arg::U32(accumulate as u32),
            ],
        )
    }

    unsafe fn relu_unchecked(&self, x: &CudaBuffer, y: &CudaBuffer) -> Result<()> {
        self.launch_one(
            "relu",
            elementwise(x.len),
            &[Arg::Ptr(x.ptr), Arg::Ptr(y.ptr), Arg::U64(x.len as u64)],
        )
    }

    unsafe fn relu_backward_unchecked(
        &self,
        y: &CudaBuffer,
        dy: &CudaBuffer,
        dx: &CudaBuffer,
    ) -> Result<()> {
        self.launch_one(
            "relu_backward",
            elementwise(y.len),
            &[
                Arg::Ptr(y.ptr),
                Arg::Ptr(dy.ptr),
                Arg::Ptr(dx.ptr),
                Arg::U64(y.len as u64),
            ],
        )
    }

    unsafe fn axpy_unchecked(&self, alpha: f32, x: &CudaBuffer, y: &CudaBuffer) -> Result<()> {
        self.launch_one(
            "axpy",
            elementwise(x.len),
            &[
                Arg::Ptr(x.ptr),
                Arg::Ptr(y.ptr),
                Arg::U64(x.len as u64),
                Arg::F32(alpha),
            ],
        )
    }

    unsafe fn adam_step_unchecked(
        &self,
        spec: &AdamSpec,
        w: &CudaBuffer,
        grad: &CudaBuffer,
        m: &CudaBuffer,
        v: &CudaBuffer,
    ) -> Result<()> {
        let (lr_c1, inv_c2) = spec.corrections();
        self.launch_one(
            "adam_step",
            elementwise(w.len),
            &[
                Arg::Ptr(w.ptr),
                Arg::Ptr(grad.ptr),
                Arg::Ptr(m.ptr),
                Arg::Ptr(v.ptr),
                Arg::U64(w.len as u64),
                Arg::F32(lr_c1),
                Arg::F32(inv_c2),
                Arg::F32(spec.beta1),
                Arg::F32(spec.beta2),
                Arg::F32(spec.eps),
                Arg::F32(spec.weight_decay),
            ],
        )
    }

    unsafe fn sgd_step_unchecked(
        &self,
        spec: &SgdSpec,
        w: &CudaBuffer,
        grad: &CudaBuffer,
        velocity: &CudaBuffer,
    ) -> Result<()> {
        self.launch_one(
            "sgd_step",
            elementwise(w.len),
            &[
                Arg::Ptr(w.ptr),
                Arg::Ptr(grad.ptr),
                Arg::Ptr(velocity.ptr),
                Arg::U64(w.len as u64),
                Arg::F32(spec.lr),
                Arg::F32(spec.momentum),
                Arg::F32(spec.weight_decay),
            ],
        )
    }

    unsafe fn im2col_unchecked(
        &self,
        spec: &ConvSpec,
        x: &CudaBuffer,
        cols: &CudaBuffer,
    ) -> Result<()> {
        let geometry = conv_args(spec, cols.len)?;
        let mut args = vec![Arg::Ptr(x.ptr), Arg::Ptr(cols.ptr)];
        args.extend(geometry);
        self.launch_one("im2col", elementwise(cols.len), &args)
    }

    unsafe fn col2im_unchecked(
        &self,
        spec: &ConvSpec,
        dcols: &CudaBuffer,
        dx: &CudaBuffer,
    ) -> Result<()> {
        let geometry = conv_args(spec, dx.len)?;
        let mut args = vec![Arg::Ptr(dcols.ptr), Arg::Ptr(dx.ptr)];
        args.extend(geometry);
        self.launch_one("col2im", elementwise(dx.len), &args)
    }

    unsafe fn pool_unchecked(&self, spec: &PoolSpec, x: &CudaBuffer, y: &CudaBuffer) -> Result<()> {
        let geometry = pool_args(spec, y.len)?;
        let mut args = vec![Arg::Ptr(x.ptr), Arg::Ptr(y.ptr)];
        args.extend(geometry);
        self.launch_one("pool", elementwise(y.len), &args)
    }

    unsafe fn pool_backward_unchecked(
        &self,
        spec: &PoolSpec,
        x: &CudaBuffer,
        dy: &CudaBuffer,
        dx: &CudaBuffer,
    ) -> Result<()> {
        let geometry = pool_args(spec, dx.len)?;
        let mut args = vec![Arg::Ptr(x.ptr), Arg::Ptr(dy.ptr), Arg::Ptr(dx.ptr)];
        args.extend(geometry);
        self.launch_one("pool_backward", elementwise(dx.len), &args)
    }

    unsafe fn transpose_unchecked(
        &self,
        _batch: usize,
        rows: usize,
        cols: usize,
        x: &CudaBuffer,
        y: &CudaBuffer,
    ) -> Result<()> {
        let len = index_u32("transpose", y.len)?;
        self.launch_one(
            "transpose",
            elementwise(y.len),
            &[
                Arg::Ptr(x.ptr),
                Arg::Ptr(y.ptr),
                Arg::U32(rows as u32),
                Arg::U32(cols as u32),
                Arg::U32(len),
            ],
        )
    }

    unsafe fn row_normalize_unchecked(
        &self,
        cols: usize,
        x: &CudaBuffer,
        y: &CudaBuffer,
    ) -> Result<()> {
        let (rows, cols) = row_shape(x.len, cols)?;
        self.launch_one(
            "row_normalize",
            config((rows as u64).div_ceil(WARP_ROWS), 32 * WARP_ROWS as u32),
            &[
                Arg::Ptr(x.ptr),
                Arg::Ptr(y.ptr),
                Arg::U32(rows),
                Arg::U32(cols),
            ],
        )
    }

    unsafe fn row_normalize_backward_unchecked(
        &self,
        cols: usize,
        x: &CudaBuffer,
        dy: &CudaBuffer,
        dx: &CudaBuffer,
    ) -> Result<()> {
        let (rows, cols) = row_shape(x.len, cols)?;
        self.launch_one(
            "row_normalize_backward",
            config((rows as u64).div_ceil(WARP_ROWS), 32 * WARP_ROWS as u32),
            &[
                Arg::Ptr(x.ptr),
                Arg::Ptr(dy.ptr),
                Arg::Ptr(dx.ptr),
                Arg::U32(rows),
                Arg::U32(cols),
            ],
        )
    }

    unsafe fn pairwise_distance_unchecked(
        &self,
        n: usize,
        dim: usize,
        f: &CudaBuffer,
        d: &CudaBuffer,
    ) -> Result<()> {
        let n32 = relational_n("pairwise_distance", n, dim)?;
        let tiles = (n as u64).div_ceil(16);
        self.launch_one(
            "pairwise_distance",
            config(tiles * tiles, 256),
            &[
                Arg::Ptr(f.ptr),
                Arg::Ptr(d.ptr),
                Arg::U32(n32),
                Arg::U32(dim as u32),
            ],
        )
    }

    unsafe fn pairwise_distance_backward_unchecked(
        &self,
        n: usize,
        dim: usize,
        f: &CudaBuffer,
        d: &CudaBuffer,
        dd: &CudaBuffer,
        df: &CudaBuffer,
    ) -> Result<()> {
        let n32 = relational_n("pairwise_distance_backward", n, dim)?;
        self.launch_one(
            "pairwise_distance_backward",
            elementwise(n * dim),
            &[
                Arg::Ptr(f.ptr),
                Arg::Ptr(d.ptr),
                Arg::Ptr(dd.ptr),
                Arg::Ptr(df.ptr),
                Arg::U32(n32),
                Arg::U32(dim as u32),
            ],
        )
    }

    unsafe fn offdiag_normalize_unchecked(
        &self,
        n: usize,
        d: &CudaBuffer,
        y: &CudaBuffer,
    ) -> Result<()> {
        let n32 = relational_n("offdiag_normalize", n, n)?;
        self.launch_one(
            "offdiag_normalize",
            one_block(),
            &[Arg::Ptr(d.ptr), Arg::Ptr(y.ptr), Arg::U32(n32)],
        )
    }

    unsafe fn offdiag_normalize_backward_unchecked(
        &self,
        n: usize,
        d: &CudaBuffer,
        dy: &CudaBuffer,
        dd: &CudaBuffer,
    ) -> Result<()> {
        let n32 = relational_n("offdiag_normalize_backward", n, n)?;
        self.launch_one(
            "offdiag_normalize_backward",
            one_block(),
            &[
                Arg::Ptr(d.ptr),
                Arg::Ptr(dy.ptr),
                Arg::Ptr(dd.ptr),
                Arg::U32(n32),
            ],
        )
    }

    unsafe fn smooth_l1_unchecked(
        &self,
        spec: &MseSpec,
        a: &CudaBuffer,
        b: &CudaBuffer,
        loss: &CudaBuffer,
        grad_a: Option<&CudaBuffer>,
        grad_b: Option<&CudaBuffer>,
    ) -> Result<()> {
        self.pointwise_loss(MSE_MODE_SMOOTH_L1, spec, a, b, loss, grad_a, grad_b)
    }
}

/// `1/T`, rounded once.
fn inv(t: f32) -> f32 {
    (1.0 / t as f64) as f32
}
