//! Memory-mapped safetensors files.

use std::path::{Path, PathBuf};

use memmap2::{Advice, Mmap, UncheckedAdvice};

use crate::error::{FormatError, Result};
use crate::header::{Header, TensorInfo, header_len, parse_header};
use crate::input::open_regular;
use crate::sigbus::Guard;

/// A safetensors file, memory-mapped, with its validated header.
///
/// Tensor data is handed out as slices borrowing the map: nothing is copied until the bytes
/// change. The file must not be modified while it is open (as with any memory map); one that is
/// truncated anyway ends the process with one line naming it once [`crate::sigbus::install`]
/// has been called, instead of a bare SIGBUS.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    /// The map's SIGBUS registration: declared before `map`, so dropped (unregistered) before
    /// the map is unmapped.
    _guard: Guard,
    map: Mmap,
    header: Header,
}

impl SafetensorsFile {
    /// Opens and validates `path`, which must be a regular file (a FIFO or a device is refused
    /// before it is opened). No tensor data is read.
    pub fn open(path: &Path) -> Result<Self> {
        let file = open_regular(path)?;
        let file_len = file.metadata().map_err(FormatError::io(path, "stat"))?.len();
        // SAFETY: the map is read-only and we document that the file must not change while open;
        // if it shrinks anyway, the guard registered next turns the SIGBUS into a message.
        let map = unsafe { Mmap::map(&file) }.map_err(FormatError::io(path, "mmap"))?;
        let guard = Guard::register(path, map.as_ptr(), map.len());
        let n = header_len(path, &map, file_len)?;
        let header = parse_header(path, &map[8..8 + n], file_len)?;
        // Conversion walks the file front to back: let the kernel read ahead.
        let _ = map.advise(Advice::Sequential);
        Ok(SafetensorsFile { path: path.to_owned(), _guard: guard, map, header })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The raw little-endian bytes of a tensor of this file's header.
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        let start = self.header.data_start;
        &self.map[start + t.begin..start + t.end]
    }

    /// Finds a tensor by name and returns its info and bytes.
    pub fn tensor(&self, name: &str) -> Option<(&TensorInfo, &[u8])> {
        self.header.get(name).map(|t| (t, self.data(t)))
    }

    /// Drops the pages of a tensor from this process's resident memory once it has been used,
    /// so that converting a file keeps only the tensors in flight resident, not the whole file.
    /// Later reads of the range fault the pages in again from the file.
    pub fn release(&self, t: &TensorInfo) {
        let page = page_size();
        let begin = (self.header.data_start + t.begin) / page * page;
        let end = (self.header.data_start + t.end).min(self.map.len());
        if end > begin {
            // SAFETY: the map is a read-only mapping of a regular file; MADV_DONTNEED only drops
            // resident pages, which are faulted back in with the same content on the next access.
            let _ = unsafe { self.map.unchecked_advise_range(UncheckedAdvice::DontNeed, begin, end - begin) };
        }
    }
}

impl SafetensorsFile {
    /// Drops every resident page of the file from this process's memory (the kernel maps pages
    /// around each fault, so releasing tensor by tensor can leave neighbours resident).
    pub fn release_all(&self) {
        if !self.map.is_empty() {
            // SAFETY: as in `release`: a read-only file mapping, refaulted with the same content.
            let _ = unsafe { self.map.unchecked_advise_range(UncheckedAdvice::DontNeed, 0, self.map.len()) };
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as usize } else { 4096 }
}
