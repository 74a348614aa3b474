//! The one error type of `fp8forge-formats`.

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};

/// Result of this crate.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;

/// What went wrong reading or writing a checkpoint. Every variant names the file, and the tensor
/// where there is one, so the message alone tells a user what to fix. Messages are one line:
/// paths, tensor names and reasons are shown [`escaped`], since a header or an index may put a
/// newline or a terminal escape into a name.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// An operating-system call on a file failed.
    #[error("{}: {op}: {source}", EscPath(.path))]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done ("open", "read", "write", "rename", ...).
        op: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An input file or directory is not there (or a component of its path is not a directory).
    #[error("{}: no such file or directory", EscPath(.path))]
    Missing {
        /// The path as given or as named by the checkpoint.
        path: PathBuf,
    },
    /// An input is a FIFO, a device or a socket where a regular file (or a directory) is needed:
    /// refused before it is opened for reading, which could block or never end.
    #[error("{}: is a {kind}, not a regular file", EscPath(.path))]
    NotRegularFile {
        /// The path.
        path: PathBuf,
        /// What it is instead ("FIFO", "character device", ...).
        kind: &'static str,
    },
    /// A safetensors header is malformed: the file is not a valid safetensors file.
    #[error("{}: invalid safetensors header: {}", EscPath(.path), escaped(.reason))]
    BadHeader {
        /// The file.
        path: PathBuf,
        /// Why the header was refused.
        reason: String,
    },
    /// One tensor's entry in a safetensors header is malformed.
    #[error("{}: tensor {}: {}", EscPath(.path), escaped(&shortened(.tensor)), escaped(.reason))]
    BadTensor {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// Why the entry was refused.
        reason: String,
    },
    /// A JSON file (config.json, an index) is malformed or lacks what is needed.
    #[error("{}: {}", EscPath(.path), escaped(.reason))]
    BadJson {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A checkpoint directory is not usable as given (missing shard, path escaping the directory, ...).
    #[error("{}: {}", EscPath(.path), escaped(.reason))]
    BadCheckpoint {
        /// The directory or file at fault.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The output location cannot be used (exists, locked by another run, ...).
    #[error("{}: {}", EscPath(.path), escaped(.reason))]
    Output {
        /// The output path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The output directory holds something this run must not write over: another conversion, a
    /// checkpoint of its own, other files. Starting over is the user's call (the CLI says how).
    #[error("{}: {why}", EscPath(.path))]
    Refused {
        /// The output directory.
        path: PathBuf,
        /// What it holds.
        why: Refusal,
    },
    /// An input file is not what it was when the output was started or finished from it.
    #[error("{}: changed since {since} ({what}); converting again from the current input means starting over", EscPath(.path))]
    InputChanged {
        /// The input file.
        path: PathBuf,
        /// Since when: "this conversion started" or "the output was finished".
        since: &'static str,
        /// What differs (size, modification time, presence).
        what: String,
    },
    /// A file's content does not match the sha256 its manifest records.
    #[error("{}: sha256 mismatch: manifest says {expected}, file has {actual}", EscPath(.path))]
    HashMismatch {
        /// The file.
        path: PathBuf,
        /// The digest in the manifest.
        expected: String,
        /// The digest of the file.
        actual: String,
    },
}

/// What an output directory holds that a run must not write over.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// An unfinished conversion of other input or options (plan digests, shortened).
    #[error("holds an unfinished conversion of other input or options (plan {there} there, {now} now)")]
    OtherUnfinished {
        /// The plan recorded in OUT.
        there: String,
        /// This run's plan.
        now: String,
    },
    /// A finished conversion of other input or options.
    #[error("holds a finished conversion of other input or options (plan {there} there, {now} now)")]
    OtherFinished {
        /// The plan recorded in OUT.
        there: String,
        /// This run's plan.
        now: String,
    },
    /// A finished checkpoint (with a manifest) that fp8forge did not record.
    #[error("already holds a finished checkpoint (SHA256SUMS present) that fp8forge did not record")]
    UnrecordedCheckpoint,
    /// Files of other origin.
    #[error("exists and is not empty")]
    NotEmpty,
    /// A finished output whose files changed since it was finished.
    #[error("is a finished output that was changed since ({what})")]
    ChangedSince {
        /// The first file that differs.
        what: String,
    },
    /// State files (journal, record, commit) that fp8forge did not write or cannot read.
    #[error("holds fp8forge state it cannot use: {what}")]
    UnusableState {
        /// Which file, and why.
        what: String,
    },
}

impl FormatError {
    /// Builds a closure mapping an `io::Error` to [`FormatError::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, op: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| FormatError::Io { path, op, source }
    }

    /// Like [`FormatError::io`] for reading an input: a path that is not there (or runs through
    /// something that is not a directory) is [`FormatError::Missing`], the input's fault; any
    /// other failure (permissions, I/O) stays [`FormatError::Io`], the system's.
    pub fn input(path: impl Into<PathBuf>, op: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| match source.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory => FormatError::Missing { path },
            _ => FormatError::Io { path, op, source },
        }
    }

    /// True when the error is the input's fault (bad file, bad index) rather than the system's.
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, FormatError::Io { .. })
    }
}

/// `s` on one line: control characters (newline, tab, escape, ...) and the Unicode line and
/// paragraph separators are written as Rust escapes (`\n`, `\u{1b}`); everything else, other
/// scripts included, is kept as is. Names come from files the user does not control; a message
/// naming them must still be one line and must not drive the terminal.
pub fn escaped(s: &str) -> Cow<'_, str> {
    let odd = |c: char| c.is_control() || c == '\u{2028}' || c == '\u{2029}';
    if !s.chars().any(odd) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if odd(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A name of at most 200 characters: a longer one (a corrupt header can hold a name of megabytes)
/// is cut, saying how long it was, so that the message stays readable.
pub fn shortened(name: &str) -> Cow<'_, str> {
    const MAX: usize = 200;
    match name.char_indices().nth(MAX) {
        Some((cut, _)) => Cow::Owned(format!("{}... ({} bytes)", &name[..cut], name.len())),
        None => Cow::Borrowed(name),
    }
}

/// Displays a path [`escaped`] (bytes that are not UTF-8 as U+FFFD, as `Path::display` does).
pub struct EscPath<'a>(pub &'a Path);

impl fmt::Display for EscPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&escaped(&self.0.to_string_lossy()))
    }
}
