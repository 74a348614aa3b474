//! Tensor names built from a dotted prefix: `Prefix::new("model.layers").join(3).join("self_attn")
//! .name("q_proj.weight")` is `model.layers.3.self_attn.q_proj.weight`, the way checkpoints name
//! their tensors.

use std::fmt;

/// A dotted prefix of tensor names (`model.layers.3.self_attn`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Prefix(String);

impl Prefix {
    /// The prefix `p` as written (`""` is the root: names under it have no leading dot).
    pub fn new(p: impl Into<String>) -> Self {
        Prefix(p.into())
    }

    /// The prefix one level down: `self.part` (a name or an index).
    pub fn join(&self, part: impl fmt::Display) -> Prefix {
        Prefix(self.name(part))
    }

    /// The full name of `leaf` under this prefix: `self.leaf`.
    pub fn name(&self, leaf: impl fmt::Display) -> String {
        if self.0.is_empty() { leaf.to_string() } else { format!("{}.{leaf}", self.0) }
    }

    /// The prefix as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joined_prefixes_name_tensors_the_way_checkpoints_do() {
        let attn = Prefix::new("model.layers").join(3).join("self_attn");
        assert_eq!(attn.as_str(), "model.layers.3.self_attn");
        assert_eq!(attn.name("q_proj.weight"), "model.layers.3.self_attn.q_proj.weight");
        assert_eq!(
            Prefix::new("model.layers.3").join("mlp").join("experts").join(7).name("w1.weight"),
            "model.layers.3.mlp.experts.7.w1.weight"
        );
        assert_eq!(Prefix::new("").name("lm_head.weight"), "lm_head.weight");
        assert_eq!(Prefix::new("").join("model").to_string(), "model");
    }
}
