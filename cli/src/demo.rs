//! `fp8forge demo`: the whole pipeline on the bundled tiny MoE. It writes the bundled BF16 model,
//! converts it to block-scaled FP8, evaluates both on held-out Shakespeare (weight-only and W8A8),
//! and writes the HTML report. Everything it needs ships inside the binary: the model and the
//! held-out text.

use std::path::{Path, PathBuf};

use fp8forge_formats::atomic::write_atomic;
use fp8forge_quant::convert::{self, NoProgress as NoConvertProgress, RunOptions};
use fp8forge_quant::plan::ConvertOptions;
use serde::Serialize;

use fp8forge_runtime::RuntimeError;
use fp8forge_runtime::eval::{ActQuant, EvalOptions, EvalProgress, Input, evaluate};
use fp8forge_runtime::metrics::EvalResult;

/// Result of the demo.
type Result<T> = std::result::Result<T, RuntimeError>;

/// The bundled model: a tiny DeepSeek-V3-architecture MoE trained on the first 90% of
/// tinyshakespeare (byte-level tokens), as transformers saved it (see assets/tiny-moe/TRAINING.md).
pub const BUNDLED_MODEL: &[(&str, &[u8])] = &[
    ("config.json", include_bytes!("../assets/tiny-moe/config.json")),
    ("generation_config.json", include_bytes!("../assets/tiny-moe/generation_config.json")),
    ("model.safetensors", include_bytes!("../assets/tiny-moe/model.safetensors")),
    ("tokenizer.json", include_bytes!("../assets/tiny-moe/tokenizer.json")),
];

/// The held-out text: the last 10% of the bytes of tinyshakespeare (public domain; 111,540 bytes
/// from byte 1,003,854 of the 1,115,394-byte file), which the bundled model never saw in training.
pub const HELD_OUT: &str = include_str!("../assets/tiny-moe/heldout.txt");

/// What [`DemoResult::data`] says for the bundled text.
pub const HELD_OUT_NAME: &str = "bundled held-out tinyshakespeare (last 10%)";

/// A file in OUT that marks it as a demo directory, which the demo may overwrite.
const MARKER: &str = ".fp8forge-demo";

/// Demo settings.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Output directory (created; reused when it is an earlier demo's).
    pub out: PathBuf,
    /// A text to evaluate on, whole (`None`: the bundled held-out text, [`HELD_OUT`]).
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
    /// The text evaluated: the file given, or [`HELD_OUT_NAME`].
    pub data: String,
    /// The HTML report.
    pub report: PathBuf,
    /// FP8 with FP8 activations (W8A8, as served) against BF16.
    pub w8a8: EvalResult,
    /// FP8 weights only against BF16.
    pub weight_only: EvalResult,
}

/// Runs the demo. `progress` sees each evaluation in turn.
pub fn run(opts: &DemoOptions, progress: &dyn EvalProgress) -> Result<DemoResult> {
    prepare_out(&opts.out)?;
    let (data, text) = match &opts.data {
        Some(d) => {
            let text = std::fs::read_to_string(d)
                .map_err(|e| RuntimeError::Input { file: d.clone(), reason: format!("cannot read: {e}") })?;
            (d.display().to_string(), std::borrow::Cow::Owned(text))
        }
        None => (HELD_OUT_NAME.to_owned(), std::borrow::Cow::Borrowed(HELD_OUT)),
    };
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
    let mut ids = fp8forge_runtime::tokens::tokenize(&text, &bf16.join("tokenizer.json"))?;
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
    let html = fp8forge_runtime::report::render_html(&w8a8);
    write_atomic(&report, html.as_bytes()).map_err(RuntimeError::Format)?;
    let result = DemoResult { bf16, fp8, data, report, w8a8, weight_only };
    let path = opts.out.join("demo.json");
    let json = fp8forge_formats::checkpoint::pretty_json(&result, &path)?;
    write_atomic(&path, &json).map_err(RuntimeError::Format)?;
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
    fn bundled_held_out_text_is_the_last_tenth_of_tinyshakespeare() {
        // The bytes cut by tools/train_tiny.py (`data[len(data) * 9 // 10:]` of the 1,115,394-byte
        // file), pinned by their sha256 so that the bundle cannot drift from the training split.
        use sha2::Digest;
        assert_eq!(HELD_OUT.len(), 1_115_394 - 1_115_394 * 9 / 10);
        let h = fp8forge_formats::atomic::hex(&sha2::Sha256::digest(HELD_OUT.as_bytes()));
        assert_eq!(h, "c54f3753a4e6e3c3d1759212815a7caf826e68a33021b25312984400bed40a1f");
        assert!(HELD_OUT.starts_with("?\n\nGREMIO:\nGood morrow, neighbour Baptista."));
    }
}
