//! `fp8forge demo`: the whole pipeline on the bundled tiny MoE. It writes the bundled BF16 model,
//! converts it to block-scaled FP8, evaluates both on held-out Shakespeare (weight-only and W8A8),
//! and writes the HTML report.

use std::path::{Path, PathBuf};

use fp8forge_formats::atomic::write_atomic;
use fp8forge_quant::convert::{self, NoProgress as NoConvertProgress, RunOptions};
use fp8forge_quant::plan::ConvertOptions;
use serde::Serialize;

use crate::error::{Result, RuntimeError};
use crate::eval::{ActQuant, EvalOptions, EvalProgress, Input, evaluate};
use crate::metrics::EvalResult;

/// The bundled model: a tiny DeepSeek-V3-architecture MoE trained on the first 90% of
/// tinyshakespeare (byte-level tokens), as transformers saved it (see assets/tiny-moe/TRAINING.md).
pub const BUNDLED_MODEL: &[(&str, &[u8])] = &[
    ("config.json", include_bytes!("../assets/tiny-moe/config.json")),
    ("generation_config.json", include_bytes!("../assets/tiny-moe/generation_config.json")),
    ("model.safetensors", include_bytes!("../assets/tiny-moe/model.safetensors")),
    ("tokenizer.json", include_bytes!("../assets/tiny-moe/tokenizer.json")),
];

/// File name of the held-out text's source, looked up in `shared/data/` beside the checkout.
pub const DATA_FILE: &str = "tinyshakespeare.txt";

/// A file in OUT that marks it as a demo directory, which the demo may overwrite.
const MARKER: &str = ".fp8forge-demo";

/// Demo settings.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Output directory (created; reused when it is an earlier demo's).
    pub out: PathBuf,
    /// The tinyshakespeare text (`None`: search `shared/data/` above the working directory and the executable).
    pub data: Option<PathBuf>,
    /// Window length.
    pub ctx: usize,
    /// Evaluate at most this many held-out tokens (`None`: all of them).
    pub max_tokens: Option<usize>,
}

/// What the demo measured.
#[derive(Clone, Debug, Serialize)]
pub struct DemoResult {
    /// The BF16 model written from the bundle.
    pub bf16: PathBuf,
    /// Its FP8 conversion.
    pub fp8: PathBuf,
    /// The held-out text.
    pub data: PathBuf,
    /// The HTML report.
    pub report: PathBuf,
    /// FP8 with FP8 activations (W8A8, as served) against BF16.
    pub w8a8: EvalResult,
    /// FP8 weights only against BF16.
    pub weight_only: EvalResult,
}

/// Finds tinyshakespeare in `shared/data/` of an ancestor of the working directory or of the executable.
pub fn find_data() -> Option<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    roots.extend(std::env::current_dir().ok());
    roots.extend(std::env::current_exe().ok());
    roots.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    roots.iter().flat_map(|r| r.ancestors()).map(|a| a.join("shared/data").join(DATA_FILE)).find(|p| p.is_file())
}

/// The held-out part of the text: its last 10% (the bundled model was trained on the first 90%).
pub fn held_out(text: &str) -> &str {
    let mut cut = text.len() * 9 / 10;
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    &text[cut..]
}

/// Runs the demo. `progress` sees each evaluation in turn.
pub fn run(opts: &DemoOptions, progress: &dyn EvalProgress) -> Result<DemoResult> {
    prepare_out(&opts.out)?;
    let data = match &opts.data {
        Some(d) => d.clone(),
        None => find_data().ok_or_else(|| RuntimeError::Input {
            file: PathBuf::from("shared/data").join(DATA_FILE),
            reason: "not found above the working directory or the executable; pass --data FILE".into(),
        })?,
    };
    let text = std::fs::read_to_string(&data)
        .map_err(|e| RuntimeError::Input { file: data.clone(), reason: format!("cannot read: {e}") })?;
    let bf16 = opts.out.join("bf16");
    let fp8 = opts.out.join("fp8");
    write_bundle(&bf16)?;
    convert::convert(
        &bf16,
        &fp8,
        &ConvertOptions::default(),
        &RunOptions { force: true, ..RunOptions::default() },
        &NoConvertProgress,
    )?;
    let mut ids = crate::tokens::tokenize(held_out(&text), &bf16.join("tokenizer.json"))?;
    if let Some(n) = opts.max_tokens {
        ids.truncate(n);
    }
    let eval = |aq: ActQuant| {
        let o = EvalOptions { ctx: Some(opts.ctx), act_quant: aq, ..EvalOptions::default() };
        evaluate(&fp8, Some(&bf16), &Input::Ids(ids.clone()), &o, progress)
    };
    let w8a8 = eval(ActQuant::Fp8)?;
    let weight_only = eval(ActQuant::None)?;
    let report = opts.out.join("report.html");
    let html = crate::report::render_html(&w8a8);
    write_atomic(&report, html.as_bytes()).map_err(RuntimeError::Format)?;
    let result = DemoResult { bf16, fp8, data, report, w8a8, weight_only };
    let json = serde_json::to_vec_pretty(&result).unwrap_or_default();
    write_atomic(&opts.out.join("demo.json"), &json).map_err(RuntimeError::Format)?;
    Ok(result)
}

/// Creates OUT, or accepts it when empty or an earlier demo's.
fn prepare_out(out: &Path) -> Result<()> {
    let io = |e: std::io::Error| RuntimeError::Io { file: out.to_owned(), source: e };
    if out.exists() {
        let marked = out.join(MARKER).is_file();
        let empty = std::fs::read_dir(out).map_err(io)?.next().is_none();
        if !marked && !empty {
            return Err(RuntimeError::Input {
                file: out.to_owned(),
                reason: "exists and is not an fp8forge demo directory; choose another --out".into(),
            });
        }
    }
    std::fs::create_dir_all(out).map_err(io)?;
    std::fs::write(out.join(MARKER), b"fp8forge demo output; `fp8forge demo` may overwrite this directory\n")
        .map_err(io)
}

/// Writes the bundled BF16 model into `dir`.
fn write_bundle(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| RuntimeError::Io { file: dir.to_owned(), source: e })?;
    for (name, bytes) in BUNDLED_MODEL {
        write_atomic(&dir.join(name), bytes).map_err(RuntimeError::Format)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_out_is_the_last_tenth() {
        let t = "0123456789".repeat(10);
        assert_eq!(held_out(&t), "0123456789");
    }
}
