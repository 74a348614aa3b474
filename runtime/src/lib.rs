//! Minimal MoE runtime for validating converted checkpoints (issue 3; not yet implemented).
