//! Writing one shard while its tensors are computed: the caller's thread produces the data of the
//! output tensors in file order (quantizing, dequantizing, or borrowing bytes from an input map),
//! a writer thread writes and hashes them, and a byte budget bounds what is in flight between
//! the two. Conversion and dequantization are producers of tensor bytes over this one writer.

use std::borrow::Cow;
use std::path::Path;
use std::sync::{Condvar, Mutex, PoisonError, mpsc};

use crate::atomic::WrittenFile;
use crate::error::FormatError;
use crate::writer::{PlannedTensor, ShardWriter};

/// Consecutive output tensors on their way to the writer, and what to do once they are written.
pub struct Piece<'a> {
    /// The data of the next output tensors of the file, in planned order.
    pub tensors: Vec<Cow<'a, [u8]>>,
    /// Bytes of owned data this piece holds in flight (taken with [`Producer::reserve`]).
    pub reserved: u64,
    /// Run by the writer once the tensors are written (release input pages, report progress).
    pub done: Box<dyn FnOnce() + Send + 'a>,
}

/// Bytes in flight and a spare buffer, shared by the producer and the writer.
struct Budget {
    /// Bytes in flight, and whether the writer has stopped (then nothing waits any more).
    used: Mutex<(u64, bool)>,
    freed: Condvar,
    limit: u64,
    /// An owned buffer the writer is done with, kept for the next tensor: reusing it saves
    /// faulting in and zeroing fresh pages for every tensor.
    spare: Mutex<Option<Vec<u8>>>,
}

impl Budget {
    fn take(&self, bytes: u64) {
        let mut used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        while !used.1 && used.0 > 0 && used.0 + bytes > self.limit {
            used = self.freed.wait(used).unwrap_or_else(PoisonError::into_inner);
        }
        used.0 += bytes;
    }

    fn give(&self, bytes: u64) {
        let mut used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        used.0 = used.0.saturating_sub(bytes);
        self.freed.notify_all();
    }

    fn close(&self) {
        self.used.lock().unwrap_or_else(PoisonError::into_inner).1 = true;
        self.freed.notify_all();
    }
}

/// The producer's end of a shard being written.
pub struct Producer<'s, 'a> {
    tx: mpsc::Sender<Piece<'a>>,
    budget: &'s Budget,
}

impl<'a> Producer<'_, 'a> {
    /// Waits until `bytes` more fit in flight (a piece larger than the budget goes through alone),
    /// then takes them; give them back by sending a piece with `reserved: bytes`.
    pub fn reserve(&self, bytes: u64) {
        self.budget.take(bytes);
    }

    /// A buffer of `len` bytes: a recycled one when there is one (its old bytes are left: the
    /// caller overwrites them all), else a new, zeroed one.
    pub fn buffer(&self, len: usize) -> Vec<u8> {
        match self.budget.spare.lock().unwrap_or_else(PoisonError::into_inner).take() {
            Some(mut buf) => {
                buf.resize(len, 0);
                buf
            }
            None => vec![0u8; len],
        }
    }

    /// Hands `piece` to the writer. Returns false when the writer has stopped on an error (which
    /// [`write_shard`] then returns): the producer should stop.
    #[must_use]
    pub fn send(&self, piece: Piece<'a>) -> bool {
        self.tx.send(piece).is_ok()
    }
}

/// Writes the shard `path` of `tensors` (in this order): `produce` runs on the calling thread and
/// sends the tensors' data through its [`Producer`], while a writer thread writes and hashes them,
/// with at most `in_flight` bytes of owned data between the two.
///
/// # Errors
///
/// The producer's error first (the writer then only saw its input end early), else the
/// writer's: a write failure, or data that does not match the planned tensors.
pub fn write_shard<'a, E>(
    path: &Path,
    tensors: Vec<PlannedTensor>,
    in_flight: u64,
    produce: impl FnOnce(&Producer<'_, 'a>) -> Result<(), E>,
) -> Result<WrittenFile, E>
where
    E: From<FormatError>,
{
    let mut writer = ShardWriter::create(path, tensors)?;
    let budget =
        Budget { used: Mutex::new((0, false)), freed: Condvar::new(), limit: in_flight, spare: Mutex::new(None) };
    let (tx, rx) = mpsc::channel::<Piece<'a>>();
    std::thread::scope(|scope| {
        let budget = &budget;
        let handle = scope.spawn(move || {
            let r = write_all(&mut writer, rx, budget).and_then(|()| writer.finish());
            budget.close();
            r
        });
        let produced = produce(&Producer { tx, budget });
        let written = handle.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        produced?;
        Ok(written?)
    })
}

/// The writer thread: writes the pieces in order, gives their bytes back, keeps the largest owned
/// buffer for reuse, and runs their `done`.
fn write_all<'a>(w: &mut ShardWriter, rx: mpsc::Receiver<Piece<'a>>, budget: &Budget) -> Result<(), FormatError> {
    for piece in rx {
        for data in &piece.tensors {
            w.write_next(&[data])?;
        }
        let largest = piece.tensors.into_iter().filter_map(|d| match d {
            Cow::Owned(v) => Some(v),
            Cow::Borrowed(_) => None,
        });
        if let Some(buf) = largest.max_by_key(Vec::capacity) {
            *budget.spare.lock().unwrap_or_else(PoisonError::into_inner) = Some(buf);
        }
        budget.give(piece.reserved);
        (piece.done)();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use safetensors::Dtype;

    use super::*;
    use crate::reader::SafetensorsFile;

    fn planned(n: usize) -> Vec<PlannedTensor> {
        (0..n).map(|i| PlannedTensor { name: format!("t{i}"), dtype: Dtype::U8, shape: vec![1000 + i] }).collect()
    }

    #[test]
    fn pieces_are_written_in_order_with_owned_and_borrowed_data_and_their_done_runs() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("s.safetensors");
        let input: Vec<u8> = (0..1001u32).map(|i| i as u8).collect();
        let done = std::sync::atomic::AtomicUsize::new(0);
        let w = write_shard::<FormatError>(&p, planned(3), 1500, |out| {
            out.reserve(1000);
            let mut a = out.buffer(1000);
            a.fill(7);
            let done = &done;
            let bump = move || {
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            };
            assert!(out.send(Piece { tensors: vec![Cow::Owned(a)], reserved: 1000, done: Box::new(bump) }));
            // Waits for the writer to give the first 1000 bytes back, then reuses its buffer.
            out.reserve(1002);
            let c = out.buffer(1002);
            assert!(out.send(Piece {
                tensors: vec![Cow::Borrowed(&input[..]), Cow::Owned(c)],
                reserved: 1002,
                done: Box::new(bump)
            }));
            Ok(())
        })
        .expect("written");
        assert_eq!(done.load(std::sync::atomic::Ordering::SeqCst), 2);
        let f = SafetensorsFile::open(&p).expect("open");
        assert_eq!(f.tensor("t0").expect("t0").1, &[7u8; 1000][..]);
        assert_eq!(f.tensor("t1").expect("t1").1, &input[..]);
        assert_eq!(f.tensor("t2").expect("t2").1.len(), 1002);
        assert_eq!(w.bytes, std::fs::metadata(&p).expect("stat").len());
    }

    #[test]
    fn a_producer_error_comes_first_and_leaves_no_file() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("s.safetensors");
        let r = write_shard::<FormatError>(&p, planned(2), 1 << 20, |_| {
            Err(FormatError::Output { path: p.clone(), reason: "producer failed".into() })
        });
        assert!(r.is_err_and(|e| e.to_string().contains("producer failed")));
        assert!(!p.exists());
        // Too few tensors: the writer's own error.
        let r = write_shard::<FormatError>(&p, planned(2), 1 << 20, |out| {
            assert!(out.send(Piece { tensors: vec![Cow::Owned(vec![0; 1000])], reserved: 0, done: Box::new(|| {}) }));
            Ok(())
        });
        assert!(r.is_err_and(|e| e.to_string().contains("before tensor t1")));
        assert!(!p.exists());
    }
}
