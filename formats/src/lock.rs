//! A lock on an output directory, so that two runs cannot write the same files.
//!
//! The lock is an advisory `flock` on a file: the kernel releases it when the process exits,
//! SIGKILL included, so a crashed run never leaves a stale lock behind. The lock file may be
//! removed by the run that holds it (a finished run removes its state directory): a lock taken on
//! a file that is no longer at its path is let go and taken again on the new file, so two runs
//! never both believe they hold the lock.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
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
        // A few rounds: each one that fails finds the file replaced by another run's, which
        // happens at most once per run that finishes meanwhile.
        for _ in 0..8 {
            if let Some(lock) = Self::take_once(path, shared)? {
                return Ok(lock);
            }
        }
        Err(FormatError::Output {
            path: path.to_owned(),
            reason: "the lock file keeps being replaced by other fp8forge runs".into(),
        })
    }

    /// Takes the lock on the file now at `path`; `None` when that file was removed or replaced
    /// while the lock was being taken (the lock would then protect nothing).
    fn take_once(path: &Path, shared: bool) -> Result<Option<Self>> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(FormatError::io(dir, "create"))?;
        }
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
        let held = file.metadata().map_err(FormatError::io(path, "stat"))?;
        match std::fs::metadata(path) {
            Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => {}
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(FormatError::Io { path: path.to_owned(), op: "stat", source: e }),
        }
        if !shared {
            let _ = file.set_len(0);
            let _ = write!(file, "pid {}", std::process::id());
        }
        Ok(Some(DirLock { _file: file, path: path.to_owned() }))
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

    #[test]
    fn a_lock_whose_file_was_removed_is_taken_again_on_a_new_file() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("state").join("lock");
        let a = DirLock::acquire(&p).expect("first");
        // The holder removes its state directory (as a finished run does) but still holds the
        // lock on the unlinked file: a newcomer must get a lock on a file at the path.
        std::fs::remove_dir_all(d.path().join("state")).expect("remove");
        let b = DirLock::acquire(&p).expect("second, on a new file");
        assert!(p.exists());
        assert!(DirLock::acquire(&p).is_err(), "the new file is locked");
        drop((a, b));
    }
}
