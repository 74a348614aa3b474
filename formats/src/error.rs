//! The one error type of `fp8forge-formats`.

use std::path::PathBuf;

/// Result of this crate.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;

/// What went wrong reading or writing a checkpoint. Every variant names the file, and the tensor
/// where there is one, so the message alone tells a user what to fix.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// An operating-system call on a file failed.
    #[error("{path}: {op}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done ("open", "read", "write", "rename", ...).
        op: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A safetensors header is malformed: the file is not a valid safetensors file.
    #[error("{path}: invalid safetensors header: {reason}")]
    BadHeader {
        /// The file.
        path: PathBuf,
        /// Why the header was refused.
        reason: String,
    },
    /// One tensor's entry in a safetensors header is malformed.
    #[error("{path}: tensor {tensor}: {reason}")]
    BadTensor {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// Why the entry was refused.
        reason: String,
    },
    /// A JSON file (config.json, an index) is malformed or lacks what is needed.
    #[error("{path}: {reason}")]
    BadJson {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A checkpoint directory is not usable as given (missing shard, path escaping the directory, ...).
    #[error("{path}: {reason}")]
    BadCheckpoint {
        /// The directory or file at fault.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The output location cannot be used (exists, locked by another run, ...).
    #[error("{path}: {reason}")]
    Output {
        /// The output path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An input file is not what it was when the output was started or finished from it.
    #[error("{path}: changed since {since} ({what}); use --force to convert again from the current input")]
    InputChanged {
        /// The input file.
        path: PathBuf,
        /// Since when: "this conversion started" or "the output was finished".
        since: &'static str,
        /// What differs (size, modification time, presence).
        what: String,
    },
    /// A file's content does not match the sha256 its manifest records.
    #[error("{path}: sha256 mismatch: manifest says {expected}, file has {actual}")]
    HashMismatch {
        /// The file.
        path: PathBuf,
        /// The digest in the manifest.
        expected: String,
        /// The digest of the file.
        actual: String,
    },
}

impl FormatError {
    /// Builds a closure mapping an `io::Error` to [`FormatError::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, op: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| FormatError::Io { path, op, source }
    }

    /// True when the error is the input's fault (bad file, bad index) rather than the system's.
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, FormatError::Io { .. })
    }
}
