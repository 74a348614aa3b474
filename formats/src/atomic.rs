//! Atomic file writing: a temporary name in the destination directory, fsync, rename, fsync of
//! the directory. A failed or killed writer leaves at most a hidden `.NAME.PID.partial` file, never a
//! half-written file under the final name.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

use crate::error::{FormatError, Result};

/// Size of the write buffer: large writes keep the kernel's per-call cost out of the profile.
const BUF: usize = 8 << 20;

/// Writes at least this long are hashed on a second thread while this one hands them to the
/// kernel (a thread costs tens of microseconds; hashing 1 MiB takes about a millisecond).
const HASH_APART: usize = 1 << 20;

/// Once this many bytes have reached the kernel since the last request, a background thread is
/// asked to make them durable ([`Syncer`]).
const SYNC_STEP: u64 = 16 << 20;

/// A file being written under a temporary name, hashed as it is written.
pub struct AtomicFile {
    final_path: PathBuf,
    tmp_path: PathBuf,
    out: Option<BufWriter<File>>,
    hasher: Sha256,
    written: u64,
    /// Makes the file durable in the background once it is large enough to be worth it.
    syncer: Option<Syncer>,
    /// Bytes of the file that had reached the kernel at the last request to `syncer`.
    sync_requested: u64,
}

/// What a committed file is: its path, size and sha256.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenFile {
    /// Final path.
    pub path: PathBuf,
    /// Size in bytes.
    pub bytes: u64,
    /// Lowercase hex sha256 of the content.
    pub sha256: String,
}

/// The hidden temporary name used while `path` is being written by this process. The process id
/// keeps concurrent writers of one directory (jobs of a sharded conversion) apart.
pub fn partial_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.partial", std::process::id()))
}

/// True for the name of a temporary file left by [`AtomicFile`] (of any process).
pub fn is_partial_name(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".partial")
}

impl AtomicFile {
    /// Starts writing `final_path` (its directory must exist). A stale temporary file of an
    /// earlier, interrupted run is replaced.
    pub fn create(final_path: &Path) -> Result<Self> {
        let tmp_path = partial_path(final_path);
        let file = File::create(&tmp_path).map_err(FormatError::io(&tmp_path, "create"))?;
        Ok(AtomicFile {
            final_path: final_path.to_owned(),
            tmp_path,
            out: Some(BufWriter::with_capacity(BUF, file)),
            hasher: Sha256::new(),
            written: 0,
            syncer: None,
            sync_requested: 0,
        })
    }

    /// Appends bytes.
    pub fn write_all(&mut self, data: &[u8]) -> Result<()> {
        let out = self.out.as_mut().ok_or_else(|| closed(&self.tmp_path))?;
        let (written, hashed) = if data.len() < HASH_APART {
            (out.write_all(data), false)
        } else {
            // Hashing and writing each take about as long: do both at once.
            let hasher = &mut self.hasher;
            std::thread::scope(|scope| {
                let apart = std::thread::Builder::new().spawn_scoped(scope, || hasher.update(data));
                let written = out.write_all(data);
                let hashed = apart.map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).is_ok();
                (written, hashed)
            })
        };
        written.map_err(FormatError::io(&self.tmp_path, "write"))?;
        if !hashed {
            // A short write, or no thread could be had.
            self.hasher.update(data);
        }
        self.written += data.len() as u64;
        let in_kernel = self.written - out.buffer().len() as u64;
        if in_kernel >= self.sync_requested + SYNC_STEP {
            if self.syncer.is_none() {
                self.syncer = Syncer::start(out.get_ref());
            }
            if let Some(s) = &self.syncer {
                s.request();
            }
            self.sync_requested = in_kernel;
        }
        Ok(())
    }

    /// The final path of the file.
    pub fn path(&self) -> &Path {
        &self.final_path
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Flushes, fsyncs, renames to the final name and fsyncs the directory. On failure (a full
    /// disk shows at the flush or the fsync) the temporary file is removed.
    pub fn commit(mut self) -> Result<WrittenFile> {
        let out = self.out.take().ok_or_else(|| closed(&self.tmp_path))?;
        let placed = place(out, self.syncer.take(), &self.tmp_path, &self.final_path);
        if placed.is_err() {
            let _ = std::fs::remove_file(&self.tmp_path);
        }
        placed?;
        sync_parent(&self.final_path)?;
        let sha256 = hex(&std::mem::take(&mut self.hasher).finalize());
        Ok(WrittenFile { path: self.final_path.clone(), bytes: self.written, sha256 })
    }
}

/// Flushes `out` (writing `tmp`), waits for the background syncs, fsyncs it and renames it to
/// `dst`. The syncer is waited for whatever happens, so that nothing writes to `tmp` once this
/// returns.
fn place(out: BufWriter<File>, syncer: Option<Syncer>, tmp: &Path, dst: &Path) -> Result<()> {
    let flushed =
        out.into_inner().map_err(|e| FormatError::Io { path: tmp.to_owned(), op: "write", source: e.into_error() });
    let synced = syncer.map_or(Ok(()), Syncer::finish).map_err(FormatError::io(tmp, "fsync"));
    let file = flushed?;
    synced?;
    file.sync_all().map_err(FormatError::io(tmp, "fsync"))?;
    drop(file);
    std::fs::rename(tmp, dst).map_err(FormatError::io(dst, "rename"))
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        // Not committed: let the background sync end (its error no longer matters), then remove
        // the temporary file so nothing half-written stays behind.
        if let Some(s) = self.syncer.take() {
            drop(s.requests);
            let _ = s.thread.join();
        }
        if self.out.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}

/// A thread that makes a file being written durable (fdatasync) whenever asked, on its own
/// handle, while the writer goes on: the disk (or the host of a virtual disk) persists the
/// data as it is produced instead of all of it at the final fsync, which then waits only for
/// the tail. Errors are kept and reported by [`Syncer::finish`]: the handle shares the file's
/// error state, so an error it saw would not be seen again by the final fsync.
struct Syncer {
    /// Requests; at most one waits (a sync started after the request covers it).
    requests: mpsc::SyncSender<()>,
    /// The thread, which returns the first error of its syncs.
    thread: JoinHandle<std::io::Result<()>>,
}

impl Syncer {
    /// Starts a syncer for `file`, or `None` if no handle or thread can be had (then the final
    /// fsync does all the work, as it would anyway).
    fn start(file: &File) -> Option<Syncer> {
        let file = file.try_clone().ok()?;
        let (requests, rx) = mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("fp8forge-sync".into())
            .spawn(move || {
                for () in rx {
                    file.sync_data()?;
                }
                Ok(())
            })
            .ok()?;
        Some(Syncer { requests, thread })
    }

    /// Asks for a sync of everything written so far, unless one is already waiting to start.
    fn request(&self) {
        let _ = self.requests.try_send(());
    }

    /// Waits for the syncs asked for and returns the first error of any of them.
    fn finish(self) -> std::io::Result<()> {
        drop(self.requests);
        self.thread.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
    }
}

fn closed(path: &Path) -> FormatError {
    FormatError::Io { path: path.to_owned(), op: "write", source: std::io::Error::other("file already committed") }
}

/// fsyncs the directory holding `path`, so that a rename into it survives a crash.
pub fn sync_parent(path: &Path) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let d = File::open(dir).map_err(FormatError::io(dir, "open"))?;
    d.sync_all().map_err(FormatError::io(dir, "fsync"))
}

/// Writes `data` to `path` atomically.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<WrittenFile> {
    let mut f = AtomicFile::create(path)?;
    f.write_all(data)?;
    f.commit()
}

/// Copies `src` to `dst` atomically (following symbolic links), hashing on the way.
pub fn copy_atomic(src: &Path, dst: &Path) -> Result<WrittenFile> {
    let mut input = File::open(src).map_err(FormatError::io(src, "open"))?;
    let mut f = AtomicFile::create(dst)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut input, &mut buf).map_err(FormatError::io(src, "read"))?;
        if n == 0 {
            break;
        }
        f.write_all(&buf[..n])?;
    }
    f.commit()
}

/// Lowercase hex of a byte string.
pub fn hex(bytes: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    bytes.iter().flat_map(|b| [D[(b >> 4) as usize] as char, D[(b & 15) as usize] as char]).collect()
}

/// sha256 of a whole file, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut input = File::open(path).map_err(FormatError::io(path, "open"))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut input, &mut buf).map_err(FormatError::io(path, "read"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncommitted_file_leaves_nothing_behind() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("a.bin");
        {
            let mut f = AtomicFile::create(&p).expect("create");
            f.write_all(b"half").expect("write");
        }
        assert!(!p.exists() && !partial_path(&p).exists());
    }

    #[test]
    fn a_commit_that_cannot_flush_removes_its_temporary_file() {
        let d = tempfile::tempdir().expect("tempdir");
        // The final name is a non-empty directory: the rename fails after the flush.
        let p = d.path().join("a.bin");
        std::fs::create_dir_all(p.join("x")).expect("mkdir");
        let mut f = AtomicFile::create(&p).expect("create");
        f.write_all(b"data").expect("write");
        assert!(f.commit().is_err());
        assert!(!partial_path(&p).exists(), "temporary file left behind");
        // A full disk (/dev/full): the buffered bytes cannot be written at the flush.
        let tmp = d.path().join(".b.bin.partial");
        std::fs::write(&tmp, b"").expect("stand-in temporary file");
        let mut full = AtomicFile {
            final_path: d.path().join("b.bin"),
            tmp_path: tmp.clone(),
            out: Some(BufWriter::new(File::options().write(true).open("/dev/full").expect("/dev/full"))),
            hasher: Sha256::new(),
            written: 0,
            syncer: None,
            sync_requested: 0,
        };
        full.write_all(b"data").expect("buffered");
        let e = full.commit().expect_err("flush to a full disk");
        assert!(e.to_string().contains("No space left"), "{e}");
        assert!(!tmp.exists(), "temporary file left behind");
    }

    #[test]
    fn large_file_hashed_apart_and_synced_in_the_background_has_its_content_and_sha256() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("big.bin");
        // Small and large writes mixed (hashed here and apart), past several sync steps.
        let big: Vec<u8> = (0..(3 << 20) + 5).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        let mut f = AtomicFile::create(&p).expect("create");
        let mut want = Vec::new();
        for i in 0..20 {
            let part = if i % 3 == 0 { &big[..1000 + i] } else { &big[i..] };
            f.write_all(part).expect("write");
            want.extend_from_slice(part);
        }
        assert!(f.written() > 2 * SYNC_STEP && f.syncer.is_some(), "the test must reach the background sync");
        let w = f.commit().expect("commit");
        assert!(std::fs::read(&p).expect("read") == want, "content differs");
        assert_eq!(w.bytes, want.len() as u64);
        assert_eq!(w.sha256, hex(&Sha256::digest(&want)));
        assert_eq!(sha256_file(&p).expect("hash"), w.sha256);
        // Dropped uncommitted after background syncs: nothing left.
        let q = d.path().join("dropped.bin");
        let mut f = AtomicFile::create(&q).expect("create");
        for _ in 0..8 {
            f.write_all(&big).expect("write");
        }
        drop(f);
        assert!(!q.exists() && !partial_path(&q).exists());
    }

    #[test]
    fn committed_file_has_content_and_known_sha256() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("a.bin");
        let w = write_atomic(&p, b"abc").expect("write");
        assert_eq!(std::fs::read(&p).expect("read"), b"abc");
        assert_eq!(w.sha256, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(sha256_file(&p).expect("hash"), w.sha256);
    }
}
