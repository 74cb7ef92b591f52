//! Status codes, the mapping from [`Error`] to them, the per-thread last error message, and
//! [`ffi`], which runs an entry point's body and turns its result (or a panic) into a status.

use std::cell::RefCell;
use std::ffi::CString;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::Error;

/// The version of this C ABI; bumped on any incompatible change of the header.
pub const DST_ABI_VERSION: u32 = 3;

/// Success.
pub const DST_OK: i32 = 0;
/// A required pointer argument is `NULL` (or the context handle is).
pub const DST_ERR_NULL_POINTER: i32 = 1;
/// A scalar argument is out of its domain (temperature, alpha, label smoothing, beta, grad_scale,
/// reduction or enum codes).
pub const DST_ERR_INVALID_ARGUMENT: i32 = 2;
/// A shape is unsupported: `n` or `c` is 0, or the sizes exceed the limits.
pub const DST_ERR_SHAPE: i32 = 3;
/// A label is neither a class in `0..c` nor `ignore_index`.
pub const DST_ERR_LABEL: i32 = 4;
/// An output aliases an input where that is not allowed.
pub const DST_ERR_ALIAS: i32 = 5;
/// The backend cannot run here (no CUDA driver, no device, no NVRTC, or built without CUDA).
pub const DST_ERR_UNAVAILABLE: i32 = 6;
/// The device or the driver reported an error (or a kernel failed to compile).
pub const DST_ERR_DEVICE: i32 = 7;
/// A bug: the library panicked (caught at the boundary). Please report the message.
pub const DST_ERR_PANIC: i32 = 8;
/// An argument combination the op does not support (e.g. a teacher gradient with the teacher
/// given as probabilities).
pub const DST_ERR_UNSUPPORTED: i32 = 9;
/// A size beyond what the library indexes (more than 2^32 elements) or the device allows.
pub const DST_ERR_LIMIT: i32 = 10;
/// An input's values are invalid for its form: a NaN or infinity where the input check forbids
/// it, teacher probabilities that are negative or do not sum to 1, or a reverse KL whose teacher
/// gives a class probability 0 (an infinite divergence).
pub const DST_ERR_INPUT: i32 = 11;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// An error on its way out: a status code and a message.
pub(super) struct Fail {
    pub code: i32,
    pub message: String,
}

impl Fail {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Fail {
            code,
            message: message.into(),
        }
    }
}

/// The status code of an error. Exhaustive, with no wildcard arm: a new [`Error`] variant does
/// not compile until it is given a code here.
pub(super) fn code(e: &Error) -> i32 {
    match e {
        Error::Param { .. } => DST_ERR_INVALID_ARGUMENT,
        Error::Shape { .. } | Error::Empty(_) => DST_ERR_SHAPE,
        Error::Label { .. } => DST_ERR_LABEL,
        Error::Alias(_) => DST_ERR_ALIAS,
        Error::Unavailable { .. } => DST_ERR_UNAVAILABLE,
        Error::Device { .. } | Error::Compile { .. } => DST_ERR_DEVICE,
        Error::Unsupported(_) => DST_ERR_UNSUPPORTED,
        Error::Limit(_) => DST_ERR_LIMIT,
        Error::NonFinite { .. } | Error::Input { .. } => DST_ERR_INPUT,
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::new(code(&e), e.to_string())
    }
}

/// What an entry point's body returns.
pub(super) type FfiResult<T = ()> = std::result::Result<T, Fail>;

fn set_last_error(message: &str) {
    // Interior NULs cannot be represented in a C string; replace them.
    let c = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// The last error message of this thread, as a C string valid until the next call on it.
pub(super) fn last_error() -> *const std::ffi::c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Runs one entry point: catches panics, records the error message, returns the status code.
pub(super) fn ffi(f: impl FnOnce() -> FfiResult) -> i32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            set_last_error("");
            DST_OK
        }
        Ok(Err(fail)) => {
            set_last_error(&fail.message);
            fail.code
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!(
                "internal error (panic caught at the C ABI): {what}"
            ));
            DST_ERR_PANIC
        }
    }
}
