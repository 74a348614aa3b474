//! Opening inputs: what a checkpoint names must be a regular file (or, at the top, a directory).
//!
//! Opening a FIFO for reading blocks until a writer comes, reading `/dev/zero` never ends, and a
//! socket or a tape may do anything; none of them is a checkpoint. So an input is looked at with
//! `stat` before it is opened, opened with `O_NONBLOCK` (which cannot block, and does nothing to a
//! regular file), and looked at again with `fstat` on the descriptor, in case the path was
//! replaced in between. A path that is not there is the input's fault ([`FormatError::Missing`]),
//! as is a path to something else than a regular file ([`FormatError::NotRegularFile`]).

use std::fs::{File, FileType, Metadata, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{FormatError, Result};

/// What a file type is, in words, when it is not a regular file or a directory.
fn odd_kind(t: FileType) -> Option<&'static str> {
    if t.is_file() || t.is_dir() {
        None
    } else if t.is_fifo() {
        Some("FIFO")
    } else if t.is_char_device() {
        Some("character device")
    } else if t.is_block_device() {
        Some("block device")
    } else if t.is_socket() {
        Some("socket")
    } else {
        Some("special file")
    }
}

/// Looks at an input path (following symbolic links): it must exist and be a regular file or a
/// directory. Nothing is opened.
pub fn stat_input(path: &Path) -> Result<Metadata> {
    let meta = std::fs::metadata(path).map_err(FormatError::input(path, "stat"))?;
    match odd_kind(meta.file_type()) {
        Some(kind) => Err(FormatError::NotRegularFile { path: path.to_owned(), kind }),
        None => Ok(meta),
    }
}

/// Opens a regular file for reading, never blocking: anything else (a directory included) is
/// refused before it is opened.
pub fn open_regular(path: &Path) -> Result<File> {
    let not_regular =
        |t: FileType| FormatError::NotRegularFile { path: path.to_owned(), kind: odd_kind(t).unwrap_or("directory") };
    let meta = stat_input(path)?;
    if !meta.is_file() {
        return Err(not_regular(meta.file_type()));
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(FormatError::input(path, "open"))?;
    let meta = file.metadata().map_err(FormatError::io(path, "stat"))?;
    if !meta.is_file() {
        return Err(not_regular(meta.file_type()));
    }
    Ok(file)
}

/// Reads a whole regular file (see [`open_regular`]).
pub fn read_regular(path: &Path) -> Result<Vec<u8>> {
    let mut file = open_regular(path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(FormatError::io(path, "read"))?;
    Ok(bytes)
}

/// Reads a whole regular file as UTF-8 text (see [`open_regular`]).
pub fn read_regular_to_string(path: &Path) -> Result<String> {
    String::from_utf8(read_regular(path)?)
        .map_err(|e| FormatError::BadJson { path: path.to_owned(), reason: format!("not UTF-8 text: {e}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mkfifo(p: &Path) {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("no NUL");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", p.display());
    }

    #[test]
    fn fifo_device_missing_and_directory_are_refused_without_blocking() {
        let d = tempfile::tempdir().expect("tempdir");
        let fifo = d.path().join("fifo");
        mkfifo(&fifo);
        let e = open_regular(&fifo).expect_err("fifo");
        assert!(matches!(e, FormatError::NotRegularFile { kind: "FIFO", .. }), "{e}");
        let e = open_regular(Path::new("/dev/zero")).expect_err("device");
        assert!(matches!(e, FormatError::NotRegularFile { kind: "character device", .. }), "{e}");
        let e = open_regular(&d.path().join("nope")).expect_err("missing");
        assert!(matches!(e, FormatError::Missing { .. }) && e.is_bad_input(), "{e}");
        let e = open_regular(&d.path().join("nope/x")).expect_err("missing dir");
        assert!(matches!(e, FormatError::Missing { .. }), "{e}");
        let e = open_regular(d.path()).expect_err("directory");
        assert!(matches!(e, FormatError::NotRegularFile { kind: "directory", .. }), "{e}");
        assert!(stat_input(d.path()).is_ok());
        let f = d.path().join("f");
        std::fs::write(&f, b"abc").expect("write");
        assert_eq!(read_regular(&f).expect("regular"), b"abc");
    }
}
