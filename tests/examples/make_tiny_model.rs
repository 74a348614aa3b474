//! Writes a tiny random BF16 checkpoint laid out as transformers saves DeepSeek-V3 (or Mixtral,
//! Qwen3-MoE), for trying `fp8forge` without downloading a model.
//!
//! Usage: make_tiny_model DIR [deepseek_v3|mixtral|qwen3_moe]

use fp8forge_tests::{Arch, write_model};

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().unwrap_or_else(|| "tiny-model".into()));
    let arch = match args.next().as_deref() {
        Some("mixtral") => Arch::Mixtral,
        Some("qwen3_moe") => Arch::Qwen3Moe,
        _ => Arch::DeepseekV3,
    };
    if dir.exists() {
        eprintln!("{} exists; give a new directory", dir.display());
        std::process::exit(2);
    }
    write_model(&dir, arch, 2);
    println!("wrote a tiny {arch:?} checkpoint to {}", dir.display());
}
