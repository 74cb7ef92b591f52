//! The crate's one error type. Every public function returns `Result<T>`; bad input never panics.

use std::path::Path;

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
    #[error("invalid parameter {name} = {}: {hint}", show_param(*value))]
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

    /// The caller asked for the input check and an input holds a NaN or an infinity where the
    /// input's form does not allow one (logits must be finite; teacher log-probabilities may be
    /// `-inf`, a probability of exactly 0).
    #[error("non-finite input: {what}[{index}] = {value} ({hint})")]
    NonFinite {
        what: &'static str,
        index: usize,
        value: f32,
        hint: &'static str,
    },

    /// An input's values are outside what its form allows: teacher probabilities that are
    /// negative or whose row does not sum to 1, log-probabilities above 0, or a reverse KL whose
    /// teacher gives a class probability 0 (an infinite divergence).
    #[error("invalid input: {what}, row {row}: {problem}")]
    Input {
        what: &'static str,
        row: usize,
        problem: String,
    },

    /// An input with no elements (a shape with a zero dimension).
    #[error("{0}")]
    Empty(String),

    /// An argument combination the op does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// A size is beyond what the crate or the device can index (more than 2^32 elements, or a
    /// buffer larger than the device allows that cannot be processed in chunks).
    #[error("size limit exceeded: {0}")]
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

    /// A file could not be read or written, or what was read is not in the format expected: a
    /// missing data file, a folder that cannot be created, a truncated or mislabelled IDX file.
    /// `file` is the path (or, for data parsed from memory, what the data is).
    #[error("cannot {action} {file}: {problem}")]
    Io {
        action: &'static str,
        file: String,
        problem: String,
    },

    /// An experiment configuration that cannot run: command-line flags or [`Config`] fields that
    /// contradict each other or the data (a count of 0, more folds than examples, a method that
    /// needs a model, a layer or image data the configuration does not have).
    ///
    /// [`Config`]: crate::experiment::Config
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// A parameter's value as the caller wrote it: an `f32` parameter (widened to `f64` in
/// [`Error::Param`]) prints as the `f32` it was (`1.0000001`, not `1.0000001192092896`).
fn show_param(value: f64) -> String {
    let narrow = value as f32;
    if narrow as f64 == value || value.is_nan() {
        format!("{narrow}")
    } else {
        format!("{value}")
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error: `action` (`"read"`, `"write"`, `"create"`...) on `file` failed with `problem`,
    /// which should say how to fix it.
    pub fn io(
        action: &'static str,
        file: impl AsRef<Path>,
        problem: impl std::fmt::Display,
    ) -> Self {
        Error::Io {
            action,
            file: file.as_ref().display().to_string(),
            problem: problem.to_string(),
        }
    }

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
