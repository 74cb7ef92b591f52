//! Status codes, the mapping from [`Error`] to them, the per-thread last error message, and
//! [`ffi`], which runs an entry point's body and turns its result (or a panic) into a status.

use std::cell::RefCell;
use std::ffi::CString;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::Error;

/// The version of this C ABI; bumped on any incompatible change of the header, and when codes
/// are added (4: [`DST_ERR_IO`] and [`DST_ERR_CONFIG`]; 5: the DKD entry points `dst_*_dkd`; 6: a
/// dtype argument after each student, teacher and gradient pointer of the row losses, with
/// [`DST_F32`], [`DST_BF16`], [`DST_F16`]; 7: the vocab-sharded losses `dst_*_sharded_*` and
/// `DstShardedSpec`, the sparse top-k teacher entry points `dst_*_sparse_kd`; 8: the fused linear
/// layer + loss `dst_*_fused_linear_kd`, `DstFusedLinearSpec` and `DST_WEIGHTING_*`; 9:
/// `DstShardedSpec::teacher_input`, the sharded losses' teacher as probabilities or
/// log-probabilities; 10: sharded DKD, `DST_SHARDED_DKD` and `DstShardedSpec::ce_weight`,
/// `tckd_weight`, `nckd_weight`, the fused linear loss with a sparse top-k teacher
/// `dst_*_fused_linear_sparse_kd`, and the sharded losses on device memory
/// `dst_cuda_sharded_*`).
pub const DST_ABI_VERSION: u32 = 10;

/// The dtype code of f32 arrays (a row loss's `*_dtype` arguments).
pub const DST_F32: i32 = 0;
/// The dtype code of bfloat16 arrays (8 exponent bits, 7 mantissa bits; PyTorch's `torch.bfloat16`).
pub const DST_BF16: i32 = 1;
/// The dtype code of IEEE half arrays (`torch.float16`).
pub const DST_F16: i32 = 2;

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
/// A file could not be read or written, or its contents are not in the format expected. No loss
/// entry point touches files today; the code exists so that every library error has its own.
pub const DST_ERR_IO: i32 = 12;
/// An experiment configuration that cannot run (flags or settings that contradict each other or
/// the data). No loss entry point takes one today; reserved, as [`DST_ERR_IO`].
pub const DST_ERR_CONFIG: i32 = 13;

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
        Error::Io { .. } => DST_ERR_IO,
        Error::Config(_) => DST_ERR_CONFIG,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// One example of every [`Error`] variant, with the code the header documents for it.
    fn examples() -> Vec<(Error, i32)> {
        vec![
            (Error::shape("student", 5, 6, "2 rows of 3"), DST_ERR_SHAPE),
            (
                Error::Param {
                    name: "temperature",
                    value: 0.0,
                    hint: "must be > 0",
                },
                DST_ERR_INVALID_ARGUMENT,
            ),
            (
                Error::Label {
                    row: 1,
                    label: 7,
                    classes: 5,
                    ignore_index: -100,
                },
                DST_ERR_LABEL,
            ),
            (
                Error::NonFinite {
                    what: "student",
                    index: 3,
                    value: f32::NAN,
                    hint: "logits must be finite",
                },
                DST_ERR_INPUT,
            ),
            (
                Error::Input {
                    what: "teacher",
                    row: 0,
                    problem: "sums to 2".into(),
                },
                DST_ERR_INPUT,
            ),
            (Error::Empty("n is 0".into()), DST_ERR_SHAPE),
            (
                Error::Unsupported("teacher gradient".into()),
                DST_ERR_UNSUPPORTED,
            ),
            (Error::Limit("2^32 elements".into()), DST_ERR_LIMIT),
            (
                Error::Unavailable {
                    backend: "cuda",
                    reason: "no driver".into(),
                },
                DST_ERR_UNAVAILABLE,
            ),
            (
                Error::Device {
                    backend: "cuda",
                    message: "launch failed".into(),
                },
                DST_ERR_DEVICE,
            ),
            (
                Error::Compile {
                    file: "hinton.cu".into(),
                    log: "syntax error".into(),
                },
                DST_ERR_DEVICE,
            ),
            (
                Error::Alias("grad_teacher and teacher".into()),
                DST_ERR_ALIAS,
            ),
            (Error::io("read", "/no/such/file", "not found"), DST_ERR_IO),
            (Error::Config("0 epochs".into()), DST_ERR_CONFIG),
        ]
    }

    /// The variant's name. A new variant does not compile until it has a code in [`code`] and a
    /// name here; then give it an example in [`examples`] and count it in [`VARIANTS`].
    fn variant(e: &Error) -> &'static str {
        match e {
            Error::Shape { .. } => "Shape",
            Error::Param { .. } => "Param",
            Error::Label { .. } => "Label",
            Error::NonFinite { .. } => "NonFinite",
            Error::Input { .. } => "Input",
            Error::Empty(_) => "Empty",
            Error::Unsupported(_) => "Unsupported",
            Error::Limit(_) => "Limit",
            Error::Unavailable { .. } => "Unavailable",
            Error::Device { .. } => "Device",
            Error::Compile { .. } => "Compile",
            Error::Alias(_) => "Alias",
            Error::Io { .. } => "Io",
            Error::Config(_) => "Config",
        }
    }

    /// The number of [`Error`] variants.
    const VARIANTS: usize = 14;

    /// Every status code of the header.
    const CODES: [i32; 14] = [
        DST_OK,
        DST_ERR_NULL_POINTER,
        DST_ERR_INVALID_ARGUMENT,
        DST_ERR_SHAPE,
        DST_ERR_LABEL,
        DST_ERR_ALIAS,
        DST_ERR_UNAVAILABLE,
        DST_ERR_DEVICE,
        DST_ERR_PANIC,
        DST_ERR_UNSUPPORTED,
        DST_ERR_LIMIT,
        DST_ERR_INPUT,
        DST_ERR_IO,
        DST_ERR_CONFIG,
    ];

    #[test]
    fn every_variant_has_its_documented_code() {
        let examples = examples();
        let mut names: Vec<&str> = examples.iter().map(|(e, _)| variant(e)).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(
            names.len(),
            VARIANTS,
            "one example of each variant: {names:?}"
        );
        assert_eq!(examples.len(), VARIANTS);
        for (e, want) in &examples {
            assert_eq!(code(e), *want, "{} ({e})", variant(e));
            assert!(CODES.contains(want) && *want != DST_OK);
        }
    }

    #[test]
    fn codes_are_distinct_and_keep_their_numbers() {
        // The numbers are the ABI: 0..=11 as in ABI 3, then the codes added in ABI 4.
        assert_eq!(CODES, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]);
        assert_eq!(DST_ABI_VERSION, 10);
        assert_eq!((DST_F32, DST_BF16, DST_F16), (0, 1, 2));
        // I/O and configuration errors have codes of their own, not another variant's.
        let others: Vec<i32> = examples()
            .iter()
            .filter(|(e, _)| !matches!(e, Error::Io { .. } | Error::Config(_)))
            .map(|(e, _)| code(e))
            .collect();
        assert!(!others.contains(&DST_ERR_IO) && !others.contains(&DST_ERR_CONFIG));
    }

    #[test]
    fn messages_come_through() {
        let fail = Fail::from(Error::io(
            "read",
            "/data/x.idx",
            "No such file (check the path)",
        ));
        assert_eq!(fail.code, DST_ERR_IO);
        assert_eq!(
            fail.message,
            "cannot read /data/x.idx: No such file (check the path)"
        );
        let fail = Fail::from(Error::Config("0 epochs: use at least 1".into()));
        assert_eq!(fail.code, DST_ERR_CONFIG);
        assert_eq!(
            fail.message,
            "invalid configuration: 0 epochs: use at least 1"
        );
    }
}
