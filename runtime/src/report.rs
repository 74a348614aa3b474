//! The HTML report of an evaluation (being written).

use crate::metrics::EvalResult;

/// Renders `r` as a self-contained HTML page.
pub fn render_html(r: &EvalResult) -> String {
    format!(
        "<!doctype html><title>fp8forge eval</title><pre>{}</pre>",
        serde_json::to_string_pretty(r).unwrap_or_default()
    )
}
