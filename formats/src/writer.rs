//! Writing one safetensors file, tensor by tensor, with the header known up front.
//!
//! The header is computed from the planned tensors before any data is produced, so a shard can
//! be streamed to disk one tensor at a time with only that tensor in memory.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::Dtype;

use crate::atomic::{AtomicFile, WrittenFile};
use crate::error::{FormatError, Result};
use crate::header::serialize_header;

/// A tensor as it will be written: name, dtype and shape (its size follows).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PlannedTensor {
    /// Name in the output.
    pub name: String,
    /// Output dtype.
    #[serde(with = "dtype_serde")]
    pub dtype: Dtype,
    /// Output shape.
    pub shape: Vec<usize>,
}

impl PlannedTensor {
    /// Size of the data in bytes.
    pub fn nbytes(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product::<u64>() * self.dtype.bitsize() as u64 / 8
    }
}

/// Streams the tensors of one safetensors file, in planned order, to an atomic file.
pub struct ShardWriter {
    file: AtomicFile,
    tensors: Vec<PlannedTensor>,
    next: usize,
    data_start: u64,
}

impl ShardWriter {
    /// Starts the file at `path` with the header of `tensors` (written in this order) and
    /// `{"format": "pt"}` metadata, as transformers writes it.
    pub fn create(path: &Path, tensors: Vec<PlannedTensor>) -> Result<Self> {
        let entries: Vec<_> = tensors.iter().map(|t| (t.name.clone(), t.dtype, t.shape.clone())).collect();
        let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let (prefix, _) = serialize_header(&entries, Some(&metadata));
        let mut file = AtomicFile::create(path)?;
        file.write_all(&prefix)?;
        Ok(ShardWriter { file, tensors, next: 0, data_start: prefix.len() as u64 })
    }

    /// The next tensor the writer expects, if any.
    pub fn next_tensor(&self) -> Option<&PlannedTensor> {
        self.tensors.get(self.next)
    }

    /// Writes the data of the next planned tensor, given as consecutive parts.
    pub fn write_tensor(&mut self, name: &str, parts: &[&[u8]]) -> Result<()> {
        let path = self.file.path().to_owned();
        let Some(t) = self.tensors.get(self.next) else {
            return Err(FormatError::Output {
                path,
                reason: format!("tensor {name} written past the end of the planned shard"),
            });
        };
        let got: u64 = parts.iter().map(|p| p.len() as u64).sum();
        if t.name != name || t.nbytes() != got {
            return Err(FormatError::Output {
                path,
                reason: format!("writer expected tensor {} ({} bytes), got {name} ({got} bytes)", t.name, t.nbytes()),
            });
        }
        for p in parts {
            self.file.write_all(p)?;
        }
        self.next += 1;
        Ok(())
    }

    /// Writes the data of the next planned tensor, whatever its name.
    pub fn write_next(&mut self, parts: &[&[u8]]) -> Result<()> {
        let name = match self.tensors.get(self.next) {
            Some(t) => t.name.clone(),
            None => {
                return Err(FormatError::Output {
                    path: self.file.path().to_owned(),
                    reason: "a tensor written past the end of the planned shard".into(),
                });
            }
        };
        self.write_tensor(&name, parts)
    }

    /// Commits the file (fsync, rename); every planned tensor must have been written.
    pub fn finish(self) -> Result<WrittenFile> {
        if let Some(t) = self.tensors.get(self.next) {
            return Err(FormatError::Output {
                path: self.file.path().to_owned(),
                reason: format!("shard closed before tensor {} was written", t.name),
            });
        }
        debug_assert_eq!(
            self.file.written(),
            self.data_start + self.tensors.iter().map(PlannedTensor::nbytes).sum::<u64>()
        );
        self.file.commit()
    }
}

/// Serde for [`Dtype`] as its safetensors name.
pub mod dtype_serde {
    use safetensors::Dtype;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// Serializes a dtype by name.
    pub fn serialize<S: Serializer>(d: &Dtype, s: S) -> Result<S::Ok, S::Error> {
        d.serialize(s)
    }

    /// Deserializes a dtype by name.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Dtype, D::Error> {
        Dtype::deserialize(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reader::SafetensorsFile;

    #[test]
    fn written_shard_reads_back_with_the_same_tensors_and_bytes() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("m.safetensors");
        let plan = vec![
            PlannedTensor { name: "w".into(), dtype: Dtype::F8_E4M3, shape: vec![2, 3] },
            PlannedTensor { name: "w_scale_inv".into(), dtype: Dtype::F32, shape: vec![1, 1] },
        ];
        let mut w = ShardWriter::create(&p, plan).expect("create");
        w.write_tensor("w", &[&[1, 2, 3], &[4, 5, 6]]).expect("w");
        w.write_tensor("w_scale_inv", &[&1.5f32.to_le_bytes()]).expect("s");
        let done = w.finish().expect("finish");
        let f = SafetensorsFile::open(&p).expect("open");
        assert_eq!(f.tensor("w").expect("w").1, &[1, 2, 3, 4, 5, 6]);
        assert_eq!(f.tensor("w_scale_inv").expect("s").1, &1.5f32.to_le_bytes());
        assert_eq!(done.bytes, std::fs::metadata(&p).expect("stat").len());
    }

    #[test]
    fn writing_out_of_plan_is_refused_and_leaves_no_file() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("m.safetensors");
        let plan = vec![PlannedTensor { name: "w".into(), dtype: Dtype::U8, shape: vec![2] }];
        let mut w = ShardWriter::create(&p, plan).expect("create");
        assert!(w.write_tensor("w", &[&[1, 2, 3]]).is_err());
        assert!(w.finish().is_err());
        assert!(!p.exists());
    }
}
