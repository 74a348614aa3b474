//! A lock on an output directory, so that two runs cannot write the same files.
//!
//! The lock is an advisory `flock` on a file: the kernel releases it when the process exits,
//! SIGKILL included, so a crashed run never leaves a stale lock behind.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{FormatError, Result};

/// A held lock; released on drop.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    path: PathBuf,
}

impl DirLock {
    /// Takes the lock file `path` exclusively without waiting; fails if another process holds it.
    pub fn acquire(path: &Path) -> Result<Self> {
        Self::take(path, false)
    }

    /// Takes the lock file `path` shared without waiting: other shared holders may coexist, an
    /// exclusive holder may not.
    pub fn acquire_shared(path: &Path) -> Result<Self> {
        Self::take(path, true)
    }

    fn take(path: &Path, shared: bool) -> Result<Self> {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(FormatError::io(path, "open lock"))?;
        let attempt = if shared { file.try_lock_shared() } else { file.try_lock() };
        match attempt {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(path).unwrap_or_default();
                return Err(FormatError::Output {
                    path: path.to_owned(),
                    reason: format!("another fp8forge run ({}) is writing this output", holder.trim()),
                });
            }
            Err(TryLockError::Error(e)) => {
                return Err(FormatError::Io { path: path.to_owned(), op: "lock", source: e });
            }
        }
        if !shared {
            let _ = file.set_len(0);
            let _ = write!(file, "pid {}", std::process::id());
        }
        Ok(DirLock { _file: file, path: path.to_owned() })
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_on_the_same_file_is_refused_until_the_first_is_dropped() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join(".lock");
        let a = DirLock::acquire(&p).expect("first");
        let e = DirLock::acquire(&p).expect_err("second must fail").to_string();
        assert!(e.contains("another fp8forge run"), "{e}");
        drop(a);
        DirLock::acquire(&p).expect("after release");
    }
}
