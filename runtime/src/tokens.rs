//! The evaluation input: token ids from a file, or text tokenized with the model's `tokenizer.json`.

use std::path::Path;

use crate::error::{Result, RuntimeError};

/// Reads whitespace-separated token ids.
pub fn read_token_file(file: &Path) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| RuntimeError::Input { file: file.to_owned(), reason: format!("cannot read: {e}") })?;
    text.split_whitespace()
        .enumerate()
        .map(|(i, w)| {
            w.parse::<u32>().map_err(|_| RuntimeError::Input {
                file: file.to_owned(),
                reason: format!("token {i} ({w:?}) is not a non-negative integer"),
            })
        })
        .collect()
}

/// Tokenizes the text of `file` with `tokenizer` (a Hugging Face `tokenizer.json`), without
/// adding special tokens: the token stream is the text's own.
pub fn tokenize_file(file: &Path, tokenizer: &Path) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(file).map_err(|e| RuntimeError::Input {
        file: file.to_owned(),
        reason: format!("cannot read as UTF-8 text: {e}"),
    })?;
    tokenize(&text, tokenizer)
}

/// Tokenizes `text` with `tokenizer` (a Hugging Face `tokenizer.json`), without special tokens.
pub fn tokenize(text: &str, tokenizer: &Path) -> Result<Vec<u32>> {
    fp8forge_formats::input::open_regular(tokenizer)?; // a FIFO would block the tokenizer's read
    let tk = tokenizers::Tokenizer::from_file(tokenizer).map_err(|e| RuntimeError::Input {
        file: tokenizer.to_owned(),
        reason: format!("cannot load tokenizer: {e}"),
    })?;
    let enc = tk
        .encode(text, false)
        .map_err(|e| RuntimeError::Input { file: tokenizer.to_owned(), reason: format!("cannot tokenize: {e}") })?;
    Ok(enc.get_ids().to_vec())
}

/// Cuts a token stream into consecutive windows of `ctx` tokens; a shorter last window is kept
/// when it has at least 2 tokens (the perplexity protocol of ARCHITECTURE.md).
pub fn windows(tokens: &[u32], ctx: usize) -> Vec<&[u32]> {
    tokens.chunks(ctx.max(2)).filter(|w| w.len() >= 2).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_keep_a_last_window_of_two_and_drop_one_of_one() {
        let t: Vec<u32> = (0..10).collect();
        let w = windows(&t, 4);
        assert_eq!(w, vec![&t[0..4], &t[4..8], &t[8..10]]);
        let w = windows(&t[..9], 4);
        assert_eq!(w.len(), 2);
    }
}
