//! NVRTC: the kernel files compiled to PTX at run time for the device's architecture, once per
//! process (cached), with `common.cuh` prepended. Needs neither a GPU nor the driver.

use std::collections::HashMap;
use std::ffi::CString;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, OnceLock};

use super::kernels::{COMMON_SOURCE, SOURCES};
use super::{poisoned, BACKEND};
use crate::error::{Error, Result};

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

pub(crate) fn nvrtc_missing() -> Error {
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
    let src = SOURCES
        .iter()
        .find(|s| s.file == file)
        .map(|s| s.code)
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

/// Compiles one kernel file (a file of [`SOURCES`]) to PTX for `arch` (`"sm_80"`, `"sm_90"`,
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
    SOURCES
        .iter()
        .map(|s| compile_kernel(s.file, arch))
        .collect()
}

/// PTX by (architecture, kernel file).
type PtxCache = Mutex<HashMap<(String, &'static str), Arc<str>>>;

/// PTX per (architecture, file), compiled once per process.
pub(crate) fn cached_ptx(file: &'static str, arch: &str) -> Result<Arc<str>> {
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

pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}
