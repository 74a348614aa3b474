//! FP8 quantization for fp8forge: the E4M3FN and E5M2 codecs, 128×128 block scaling of weights,
//! 1×128 per-token-group scaling of activations, error statistics, tensor selection and the
//! checkpoint conversion pipeline (plan -> execute -> verify) built on `fp8forge-formats`.

#![deny(missing_docs)]

pub mod block;
pub mod convert;
pub mod dequant;
pub mod finite;
pub mod fp8;
pub mod groups;
pub mod inspect;
pub mod plan;
pub mod scheme;
pub mod select;
pub mod stats;
pub mod tp;
pub mod verify;
