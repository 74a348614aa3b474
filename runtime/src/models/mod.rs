//! One file per architecture, each with its `config.json` fields (`#[derive(Deserialize)]`), a
//! `validate` that refuses what the runtime does not implement, the validated architecture (it
//! owns its dimensions) and the loading of its decoder layers. Adding an architecture is adding a
//! file and its line in [`ARCHITECTURES`].

use std::any::Any;
use std::fmt;
use std::path::Path;

use crate::config::{Common, RopeConfig, Shapes};
use crate::error::Result;
use crate::model::Layer;
use crate::prefix::Prefix;
use crate::weights::Weights;

pub mod deepseek_v3;
pub mod mixtral;
pub mod qwen3_moe;

/// Reads an architecture's own fields from the config text and validates them with the shared
/// ones (`file` names the config in errors).
pub type Parse = fn(file: &Path, text: &str, common: &Common) -> Result<Box<dyn Architecture>>;

/// The architectures: the `model_type` values each reads, and its parser.
pub const ARCHITECTURES: &[(&[&str], Parse)] = &[
    (&["deepseek_v3", "kimi_k2"], deepseek_v3::parse),
    (&["mixtral"], mixtral::parse),
    (&["qwen3_moe"], qwen3_moe::parse),
];

/// The parser of `model_type`, if the runtime implements it.
pub fn find(model_type: &str) -> Option<Parse> {
    ARCHITECTURES.iter().find(|(names, _)| names.contains(&model_type)).map(|&(_, p)| p)
}

/// Every `model_type` the runtime implements.
pub fn supported() -> Vec<&'static str> {
    ARCHITECTURES.iter().flat_map(|(names, _)| names.iter().copied()).collect()
}

/// A validated architecture: its dimensions, routing and RoPE, and how to load its layers.
pub trait Architecture: fmt::Debug + Send + Sync + Any {
    /// Decoder layers evaluated (DeepSeek's multi-token-prediction layers are not among them).
    fn num_layers(&self) -> usize;

    /// The rotary embedding.
    fn rope(&self) -> &RopeConfig;

    /// The weight GEMM dimensions.
    fn shapes(&self) -> Shapes;

    /// Loads decoder layer `i` (`i < num_layers()`).
    fn load_layer<'a>(&self, w: &'a Weights, i: usize) -> Result<Layer<'a>>;

    /// True when `other` is the same architecture with the same dimensions and routing.
    fn same_as(&self, other: &dyn Architecture) -> bool;
}

/// [`Architecture::same_as`] for an architecture that compares with `==`.
pub(crate) fn same<T: Architecture + PartialEq>(a: &T, other: &dyn Architecture) -> bool {
    let other: &dyn Any = other;
    other.downcast_ref::<T>() == Some(a)
}

/// The prefix of every decoder layer's tensors, `model.layers`.
pub fn layers_prefix() -> Prefix {
    Prefix::new("model.layers")
}

/// The prefix of decoder layer `i`'s tensors, `model.layers.{i}`.
pub fn layer_prefix(i: usize) -> Prefix {
    layers_prefix().join(i)
}
