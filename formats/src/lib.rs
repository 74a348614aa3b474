//! Hugging Face safetensors checkpoints on disk, for fp8forge.
//!
//! Reading is memory-mapped and validated at the door: a file's header is checked whole (size
//! capped, known dtypes, offsets in bounds, tiling the data exactly, dtype × shape = byte length)
//! before any tensor byte is handed out, and a sharded directory's index may only name plain files
//! inside the directory. Writing is atomic: every output file is written under a temporary name,
//! fsynced and renamed, so a failed or killed run never leaves a half-written file under a final
//! name. This crate knows nothing of FP8 math.

#![deny(missing_docs)]

pub mod atomic;
pub mod checkpoint;
pub mod error;
pub mod header;
pub mod input;
pub mod lock;
pub mod manifest;
pub mod outdir;
pub mod pipeline;
pub mod qconfig;
pub mod reader;
pub mod sigbus;
pub mod writer;

pub use atomic::WrittenFile;
pub use checkpoint::{Checkpoint, Shard};
pub use error::{FormatError, Result};
pub use header::{Header, TensorInfo};
pub use reader::SafetensorsFile;
pub use safetensors::Dtype;
pub use writer::{PlannedTensor, ShardWriter};
