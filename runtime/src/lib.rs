//! Minimal MoE runtime for validating converted checkpoints: DeepSeek-V3 (MLA, group-limited
//! sigmoid routing), Mixtral and Qwen3-MoE on the CPU, f32 arithmetic, weights read from BF16,
//! F16, F32 or block-scaled FP8 checkpoints. Evaluation streams the model one decoder layer at a
//! time over all tokens, so a model larger than RAM still evaluates, and compares a model with its
//! baseline: perplexity, KL divergence, top-1 and expert-routing agreement.

#![deny(missing_docs)]

pub mod attention;
pub mod config;
pub mod cost;
mod divergence;
pub mod error;
pub mod eval;
#[cfg(target_arch = "x86_64")]
mod kernels_x86;
pub mod metrics;
pub mod model;
pub mod models;
pub mod ops;
pub mod prefix;
mod product;
pub mod report;
pub mod router;
pub mod tokens;
pub mod weights;

pub use error::{Result, RuntimeError};
