//! The page, as maud templates (which escape every string they interpolate): the verdict first,
//! then the sections in the order a reader asks their questions (where the error grows, whether
//! routing changed, how the token distributions differ, which tensors are worst), then every
//! figure in a table and the result as JSON.

use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::format::{
    fmt_count, fmt_fixed, fmt_percent, fmt_percent_plus_minus, fmt_plus_minus, fmt_relative_change, fmt_shape, fmt_sig,
};
use super::plots::{
    TENSOR_BARS, expert_load_plot, hidden_error_plot, kld_histogram_plot, routing_agreement_plot, sorted_tensor_errors,
    tensor_error_plot,
};
use super::verdict::{PERPLEXITY_BUDGET_PERCENT, Verdict, subject};
use crate::metrics::{Comparison, EvalResult, LayerStats, TensorError};

/// Rows of the table of the worst tensors.
const TENSOR_TABLE_ROWS: usize = 20;

/// Inline style sheet of the page.
const STYLE: &str = "
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:#222;
  max-width:780px;margin:24px auto;padding:0 12px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 6px;border-bottom:1px solid #ddd;padding-bottom:3px}
p.sub{color:#555;margin:0 0 14px;word-break:break-all}p.note{color:#555;font-style:italic}
.verdict{border:1px solid;border-left-width:6px;border-radius:4px;padding:10px 14px;margin:14px 0 8px}
.verdict.within{border-color:#2b8a3e;background:#f1faf3}.verdict.over{border-color:#c92a2a;background:#fff4f4}
.verdict.unknown{border-color:#868e96;background:#f6f7f8}.verdict p{margin:4px 0}
.verdict p.claim{font-size:19px;font-weight:600}.verdict code{overflow-wrap:anywhere}
.badge{display:inline-block;font-size:12px;font-weight:700;text-transform:uppercase;letter-spacing:.04em;
  padding:1px 7px;border-radius:3px;color:#fff;margin-right:8px;vertical-align:2px}
.within .badge{background:#2b8a3e}.over .badge{background:#c92a2a}.unknown .badge{background:#868e96}
.figures{display:flex;flex-wrap:wrap;gap:6px 32px;margin:10px 0 2px}
.figures .value{font-size:18px;font-weight:600;font-variant-numeric:tabular-nums}
.figures .label{display:block;color:#555;font-size:12.5px}
table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
table.headline td:first-child{color:#444;white-space:nowrap}table.headline td:last-child{word-break:break-all}
table.worst{font-size:12.5px}table.worst td.name{word-break:break-all}
table.compact{font-size:12.5px}th.num{text-align:right}
svg{display:block;max-width:100%;height:auto;margin:6px 0}
svg text{font:12px system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;fill:#333}
svg text.axis{font-size:12.5px;fill:#111}svg text.panel{font-weight:600}
";

/// The whole page for `r`.
pub(super) fn page(r: &EvalResult) -> String {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { "fp8forge eval: " (r.model) }
                style { (PreEscaped(STYLE)) }
            }
            body {
                h1 { "fp8forge eval" }
                p.sub {
                    (r.model)
                    @if let Some(c) = &r.baseline { " compared with " (c.baseline_model) }
                    br;
                    "weights: " (r.weights) " · activation quantization: " (r.act_quant)
                }
                (verdict_box(r))
                @if r.baseline.is_some() { (layer_sections(&r.layers)) }
                (expert_load_section(&r.layers))
                @if let Some(c) = &r.baseline {
                    (kld_section(c))
                    (tensor_section(c))
                }
                h2 { "All figures" }
                (figures_table(r))
                (embedded_json(r))
            }
        }
    };
    let mut page = markup.into_string();
    page.push('\n');
    page
}

/// The box at the top: what the model costs in perplexity against the budget, and the agreement
/// figures; without a baseline, that there is nothing to compare and the model's own perplexity.
fn verdict_box(r: &EvalResult) -> Markup {
    let verdict = Verdict::of(r);
    let budget = format!("+{PERPLEXITY_BUDGET_PERCENT:.1}% perplexity");
    html! {
        section class=(verdict.class()) {
            @match (verdict, &r.baseline) {
                (Verdict::Within { change_percent } | Verdict::Over { change_percent }, Some(c)) => {
                    p.claim {
                        span.badge { (verdict.badge()) }
                        (cost_claim(subject(r), change_percent, r.perplexity, c.baseline_perplexity))
                    }
                    p { "Budget: at most " (budget) " over the baseline. " (change_against_budget(change_percent)) }
                    (key_figures(c))
                }
                (_, Some(c)) => {
                    p.claim {
                        span.badge { (verdict.badge()) }
                        "The change of perplexity could not be computed (model "
                        (fmt_fixed(r.perplexity, 4)) ", baseline " (fmt_fixed(c.baseline_perplexity, 4)) ")."
                    }
                    p { "Budget: at most " (budget) " over the baseline." }
                    (key_figures(c))
                }
                (_, None) => {
                    p.claim { span.badge { (verdict.badge()) } "No baseline was given, so nothing is compared." }
                    p {
                        "Perplexity " (fmt_plus_minus(r.perplexity, r.perplexity_stderr)) " on "
                        (fmt_count(r.tokens_scored)) " tokens. To measure what FP8 costs against the budget ("
                        (budget) "), run the same " code { "fp8forge eval" } " again with "
                        code { "--baseline BF16_DIR" } ", the BF16 original."
                    }
                }
            }
        }
    }
}

/// "FP8 costs +2.06% perplexity (6.0000 → 6.1234)", or "costs no perplexity" when it fell.
fn cost_claim(subject: &str, change_percent: f64, perplexity: f64, baseline: f64) -> Markup {
    let change = fmt_relative_change(perplexity, baseline);
    let from_to = format!("({} → {})", fmt_fixed(baseline, 4), fmt_fixed(perplexity, 4));
    html! {
        @if change_percent > 0.0 {
            (subject) " costs " (change) " perplexity " (from_to)
        } @else {
            (subject) " costs no perplexity: " (change) " " (from_to)
        }
    }
}

/// How far the change is from the budget, in percentage points.
fn change_against_budget(change_percent: f64) -> String {
    let margin = PERPLEXITY_BUDGET_PERCENT - change_percent;
    if margin >= 0.0 {
        format!("{} percentage points to spare.", fmt_fixed(margin, 2))
    } else {
        format!("Exceeded by {} percentage points.", fmt_fixed(-margin, 2))
    }
}

/// Top-1 agreement, KL divergence and routing agreement, large.
fn key_figures(c: &Comparison) -> Markup {
    let figures = [
        (fmt_percent(c.top1_agreement), "top-1 agreement"),
        (nats(c.kld_mean), "KL divergence, mean per token"),
        (nats(c.kld_p99), "KL divergence, 99th percentile"),
        (fmt_percent(c.routing_agreement), "routing agreement"),
    ];
    html! {
        div.figures {
            @for (value, label) in figures {
                div { span.value { (value) } span.label { (label) } }
            }
        }
    }
}

/// A KL divergence with three significant digits and its unit ("n/a" alone when not finite).
fn nats(kld: f64) -> String {
    if kld.is_finite() { format!("{} nats", fmt_sig(kld, 3)) } else { fmt_sig(kld, 3) }
}

/// Hidden-state error and routing agreement per layer.
fn layer_sections(layers: &[LayerStats]) -> Markup {
    html! {
        h2 { "Hidden-state error per layer" }
        p {
            "Relative error " code { "‖h − h" sub { "baseline" } "‖ / ‖h" sub { "baseline" } "‖" }
            " of the hidden states leaving each decoder layer."
        }
        (plot_or_note(hidden_error_plot(layers), "No per-layer hidden-state errors were recorded."))
        h2 { "Routing agreement per layer" }
        p { "Share of tokens whose selected expert set is the same as the baseline's." }
        (plot_or_note(routing_agreement_plot(layers), "No per-layer routing agreement was recorded."))
    }
}

/// Tokens routed to each expert.
fn expert_load_section(layers: &[LayerStats]) -> Markup {
    html! {
        h2 { "Expert load" }
        @match expert_load_plot(layers) {
            Some(plot) => { p { (plot.reading) } (plot.svg) }
            None => p.note { "No MoE layer with routing figures." },
        }
    }
}

/// The distribution of the per-token KL divergence.
fn kld_section(c: &Comparison) -> Markup {
    html! {
        h2 { "KL divergence per token" }
        @match kld_histogram_plot(c) {
            Some(svg) => {
                (svg)
                p {
                    "KL(P" sub { "baseline" } " ‖ P" sub { "model" } ") in nats over log-spaced bins; values \
                     below the first bin count in it, values above the last in the last. Largest: "
                    (fmt_sig(c.kld_max, 3)) "."
                }
            }
            None => p.note { "No KL divergence histogram was recorded." },
        }
        (llama_cpp_figures(c))
    }
}

/// The figures of llama.cpp's `perplexity --kl-divergence`, under its names: the percentiles of
/// the KL divergence in one row, then the per-token statistics.
fn llama_cpp_figures(c: &Comparison) -> Markup {
    let levels = c.kld_percentiles.levels();
    html! {
        p {
            "The figures of llama.cpp's " code { "perplexity --kl-divergence" } ", defined as it defines them \
             (P, Q: the baseline's and the model's distributions; p, q: the probability each gives the \
             correct token; ± one standard error):"
        }
        table.compact {
            tr { th { "KLD percentile" } @for (label, _) in levels { th.num { (label) } } }
            tr { td { "nats" } @for (_, value) in levels { td.num { (fmt_sig(value, 3)) } } }
        }
        table.compact {
            @for (label, value) in token_statistics(c) {
                tr { td { (label) } td.num { (value) } }
            }
        }
    }
}

/// The rows of the per-token statistics of [`llama_cpp_figures`].
fn token_statistics(c: &Comparison) -> [(&'static str, String); 7] {
    [
        ("Mean KLD", format!("{} ± {} nats", fmt_sig(c.kld_mean, 3), fmt_sig(c.kld_mean_stderr, 3))),
        ("Mean ln(PPL(Q)/PPL(base)), paired", ln_ppl_ratio(c)),
        ("Mean Δp = q − p", fmt_percent_plus_minus(c.delta_p_mean, c.delta_p_mean_stderr)),
        ("RMS Δp", fmt_percent_plus_minus(c.delta_p_rms, c.delta_p_rms_stderr)),
        ("Same top p (top-1 agreement)", fmt_percent_plus_minus(c.top1_agreement, c.top1_agreement_stderr)),
        ("Top-5 agreement: P's top 1 in Q's top 5", fmt_percent(c.top5_agreement)),
        ("Top-5 overlap: |top5(P) ∩ top5(Q)| / 5", fmt_percent(c.top5_overlap)),
    ]
}

/// ln(PPL(Q)/PPL(base)) with its standard error, six decimals as llama.cpp prints it.
fn ln_ppl_ratio(c: &Comparison) -> String {
    format!("{} ± {}", fmt_fixed(c.ln_ppl_ratio, 6), fmt_fixed(c.ln_ppl_ratio_stderr, 6))
}

/// The worst tensors as a table, then the largest errors as bars.
fn tensor_section(c: &Comparison) -> Markup {
    let sorted = sorted_tensor_errors(&c.tensor_errors);
    html! {
        h2 { "Weight error per tensor" }
        @match tensor_error_plot(&sorted) {
            Some(svg) => {
                p {
                    "Relative RMS error " code { "‖w − w" sub { "ref" } "‖ / ‖w" sub { "ref" } "‖" }
                    " of the weights that differ from the baseline's, the worst first:"
                }
                (worst_tensor_table(&sorted))
                p {
                    "Relative RMS error of the " (fmt_count(sorted.len().min(TENSOR_BARS))) " largest of "
                    (fmt_count(sorted.len())) " tensors that differ, largest first (hover a bar for its name):"
                }
                (svg)
            }
            None => p.note { "No per-tensor weight errors were recorded." },
        }
    }
}

/// `svg`, or `note` in its place.
fn plot_or_note(svg: Option<Markup>, note: &str) -> Markup {
    html! {
        @match svg {
            Some(svg) => (svg),
            None => p.note { (note) },
        }
    }
}

/// The table of every figure of the run, in the order of the old headline table.
fn figures_table(r: &EvalResult) -> Markup {
    html! {
        table.headline {
            @for (label, value) in figure_rows(r) {
                tr { td { (label) } td { (value) } }
            }
        }
    }
}

/// The rows of [`figures_table`].
fn figure_rows(r: &EvalResult) -> Vec<(&'static str, Markup)> {
    let text = |s: String| html! { (s) };
    let mut rows = vec![("Model", text(r.model.clone()))];
    if let Some(c) = &r.baseline {
        rows.push(("Baseline", text(c.baseline_model.clone())));
    }
    rows.push(("Model type", text(r.model_type.clone())));
    rows.push(("Weights", text(r.weights.clone())));
    rows.push(("Activation quantization", text(r.act_quant.to_string())));
    rows.push(("Context", text(format!("{} tokens × {} windows", fmt_count(r.ctx), fmt_count(r.windows)))));
    rows.push(("Tokens scored", text(format!("{} of {}", fmt_count(r.tokens_scored), fmt_count(r.tokens)))));
    rows.push(("Perplexity (model)", text(fmt_plus_minus(r.perplexity, r.perplexity_stderr))));
    match &r.baseline {
        Some(c) => rows.extend(comparison_rows(r, c)),
        None => rows.push(("Mean NLL", text(format!("{} nats", fmt_fixed(r.nll_mean, 4))))),
    }
    rows.push(("Streamed", text(if r.streamed { "yes" } else { "no" }.to_string())));
    rows.push(("Time", text(format!("{} s", fmt_fixed(r.seconds, 1)))));
    rows.push(("Throughput", text(format!("{} tokens/s", fmt_fixed(r.tokens_per_second, 1)))));
    rows
}

/// The rows of [`figures_table`] that need a baseline.
fn comparison_rows(r: &EvalResult, c: &Comparison) -> Vec<(&'static str, Markup)> {
    let kld = format!("{} / {} / {} nats", fmt_sig(c.kld_mean, 3), fmt_sig(c.kld_p99, 3), fmt_sig(c.kld_max, 3));
    let nll = format!("{} / {} nats", fmt_fixed(r.nll_mean, 4), fmt_fixed(c.baseline_nll_mean, 4));
    let levels = c.kld_percentiles.levels().map(|(_, value)| fmt_sig(value, 3));
    let percentiles = format!("{} nats", levels.join(" / "));
    let delta_p = format!(
        "{} / {}",
        fmt_percent_plus_minus(c.delta_p_mean, c.delta_p_mean_stderr),
        fmt_percent_plus_minus(c.delta_p_rms, c.delta_p_rms_stderr)
    );
    let top5 = format!("{} / {}", fmt_percent(c.top5_agreement), fmt_percent(c.top5_overlap));
    vec![
        ("Perplexity (baseline)", html! { (fmt_plus_minus(c.baseline_perplexity, c.baseline_perplexity_stderr)) }),
        ("Perplexity change", html! { b { (fmt_relative_change(r.perplexity, c.baseline_perplexity)) } }),
        ("Mean NLL model / baseline", html! { (nll) }),
        ("ln(PPL(Q)/PPL(base)), paired", html! { (ln_ppl_ratio(c)) }),
        ("KL divergence mean / p99 / max", html! { (kld) }),
        ("KL divergence 99.9 / 99 / 95 / 90 / 50 / 10 / 5 / 1%", html! { (percentiles) }),
        ("Δp mean / RMS", html! { (delta_p) }),
        ("Top-1 agreement (same top p)", html! { (fmt_percent_plus_minus(c.top1_agreement, c.top1_agreement_stderr)) }),
        ("Top-5 agreement / overlap", html! { (top5) }),
        ("Routing agreement", html! { (fmt_percent(c.routing_agreement)) }),
    ]
}

/// The table of the tensors with the largest relative error (`sorted` is largest first).
fn worst_tensor_table(sorted: &[&TensorError]) -> Markup {
    html! {
        table.worst {
            tr { th { "#" } th { "tensor" } th { "shape" } th { "rel. RMS" } th { "max abs" } th { "SNR (dB)" } }
            @for (rank, t) in sorted.iter().take(TENSOR_TABLE_ROWS).enumerate() {
                tr {
                    td.num { (rank + 1) }
                    td.name { (t.name) }
                    td { (fmt_shape(&t.shape)) }
                    td.num { (fmt_sig(t.rel_rms, 4)) }
                    td.num { (fmt_sig(t.max_abs, 3)) }
                    td.num { @match t.snr_db { Some(db) => (fmt_fixed(db, 1)), None => "equal" } }
                }
            }
        }
    }
}

/// `r` as JSON in a `<script type="application/json">` element. It is a raw-text element (no
/// entities), so the JSON goes in unescaped, with every `<` written as `\u003c` (the same string
/// to a JSON parser): no `</script>` in a name can end the element early.
fn embedded_json(r: &EvalResult) -> Markup {
    let json = serde_json::to_string(r).unwrap_or_else(|_| "null".to_string());
    html! {
        script type="application/json" id="fp8forge-result" { (PreEscaped(json.replace('<', "\\u003c"))) }
    }
}
