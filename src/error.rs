//! The crate's one error type. Every public function returns `Result<T>`; bad input never panics.

/// What went wrong, and (in the message) how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A buffer or tensor has the wrong number of elements for the shape it was given with.
    #[error("shape mismatch: {what} has {got} elements, expected {expected} ({hint})")]
    Shape {
        what: &'static str,
        got: usize,
        expected: usize,
        hint: String,
    },

    /// A scalar parameter is out of its domain.
    #[error("invalid parameter {name} = {value}: {hint}")]
    Param {
        name: &'static str,
        value: f64,
        hint: &'static str,
    },

    /// A label is neither a class in `0..classes` nor `ignore_index`.
    #[error(
        "label out of range: row {row} has label {label}, but labels must be in 0..{classes} \
         or equal to ignore_index ({ignore_index})"
    )]
    Label {
        row: usize,
        label: i64,
        classes: usize,
        ignore_index: i32,
    },

    /// The caller asked for the input check and an input holds a NaN or an infinity.
    #[error("non-finite input: {what}[{index}] = {value} (losses need finite logits)")]
    NonFinite {
        what: &'static str,
        index: usize,
        value: f32,
    },

    /// An argument combination the op does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// A buffer is larger than the device allows and cannot be processed in chunks.
    #[error("device limit exceeded: {0}")]
    Limit(String),

    /// The backend cannot run on this machine (no adapter, no CUDA driver, no device).
    #[error("backend {backend} unavailable: {reason}")]
    Unavailable {
        backend: &'static str,
        reason: String,
    },

    /// The device or the driver reported an error while running.
    #[error("{backend} device error: {message}")]
    Device {
        backend: &'static str,
        message: String,
    },

    /// A kernel failed to compile (the log says why).
    #[error("kernel {file} failed to compile:\n{log}")]
    Compile { file: String, log: String },

    /// A buffer passed as two outputs, or an output also used as an input where that is not allowed.
    #[error("buffer aliasing: {0}")]
    Alias(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A shape error for a buffer of `got` elements where `expected` were needed.
    pub fn shape(what: &'static str, got: usize, expected: usize, hint: impl Into<String>) -> Self {
        Error::Shape {
            what,
            got,
            expected,
            hint: hint.into(),
        }
    }
}
